//! `switchboard-bench`: measures switchboard against a bare axum handler on the same machine
//! in the same run, and prints requests/s, p50/p99 latency and the ratios.
//!
//! It starts both servers as child processes (so neither shares a runtime with the load
//! generator), drives each scenario with N keep-alive HTTP/1.1 connections for a fixed time
//! after a warm-up, and stops the children by pid. Numbers, not pass/fail.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use switchboard_bench::child::Server;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;
use tokio::process::Command;

#[derive(Debug, Parser)]
#[command(about = "Load benchmark for switchboard")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The switchboard binary to measure.
    #[arg(long, default_value = "target/release/switchboard")]
    switchboard: PathBuf,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up seconds per scenario (not measured).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Extra flags for `switchboard serve` (e.g. `--sync=normal`).
    #[arg(long, allow_hyphen_values = true)]
    serve_arg: Vec<String>,
    /// Measure on PostgreSQL: a fresh database is made on the server of this admin URL
    /// (e.g. postgres://postgres@127.0.0.1:5432/test) and dropped afterwards. Without it,
    /// switchboard runs on a temporary SQLite file.
    #[arg(long, env = "SWITCHBOARD_BENCH_POSTGRES")]
    postgres: Option<String>,
    /// switchboard instances sharing the database (PostgreSQL only); the connections are
    /// spread over them round-robin, as a load balancer would.
    #[arg(long, default_value_t = 1)]
    instances: usize,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve fixed JSON with a bare axum handler (the baseline; started by the benchmark).
    BareServer,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::BareServer) = cli.command {
        return bare_server();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

/// The baseline: the smallest axum server that answers JSON, on the same runtime setup.
#[tokio::main]
async fn bare_server() -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/bare",
        axum::routing::get(|| async {
            axum::Json(serde_json::json!({
                "id": "eYBEm3gq3zc5ayE2g", "type": "agent", "text": "Hello! How can I help you?",
                "html": "Hello! How can I help you?", "visitorId": "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg",
                "agentId": "d9nKoegKSjmCtyK78", "agentName": "Liz", "createdAt": 1482512803740u64,
                "isPushed": false, "isMissed": false, "isMissedByVisitor": false, "isTrigger": false
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    method: http::Method,
    path: String,
    body: Option<Bytes>,
    api_key: Option<String>,
}

#[derive(Debug, Clone)]
struct Stats {
    requests: u64,
    errors: u64,
    rps: f64,
    p50_us: u64,
    p99_us: u64,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let pg = match &cli.postgres {
        Some(admin) => Some(switchboard_bench::pgdb::TempDatabase::create(admin).await?),
        None => None,
    };
    let db: std::ffi::OsString = match &pg {
        Some(pg) => pg.url().into(),
        None => dir.path().join("bench.db").into(),
    };
    if cli.instances > 1 && pg.is_none() {
        bail!("--instances needs --postgres (SQLite is one process's file)");
    }
    let key = "xkeysib-bench";

    let mut bare_cmd = Command::new(&exe);
    bare_cmd.arg("bare-server");
    let bare = Server::start(bare_cmd).await?;
    let bare_stats = load(
        &cli,
        std::slice::from_ref(&bare.addr),
        Scenario {
            name: "bare axum, fixed JSON",
            method: http::Method::GET,
            path: "/bare".into(),
            body: None,
            api_key: None,
        },
    )
    .await?;
    bare.stop().await;

    let mut instances = Vec::new();
    for _ in 0..cli.instances.max(1) {
        let mut sb_cmd = Command::new(&cli.switchboard);
        sb_cmd
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--db")
            .arg(&db)
            .args(&cli.serve_arg)
            .env("SWITCHBOARD_API_KEY", key)
            // SWITCHBOARD_BENCH_LOG sets the server's RUST_LOG (to look inside a run).
            .env(
                "RUST_LOG",
                std::env::var("SWITCHBOARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            );
        instances.push(Server::start(sb_cmd).await?);
    }
    let addrs: Vec<String> = instances.iter().map(|s| s.addr.clone()).collect();
    let sb = &instances[0];
    let rss_idle = sb.rss_kib().ok();

    let seed = request(&sb.addr, Scenario {
        name: "seed",
        method: http::Method::POST,
        path: "/v3/conversations/messages".into(),
        body: Some(Bytes::from_static(
            br#"{"visitorId":"kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg","text":"Hello! How can I help you?","agentEmail":"liz@getwear.com","agentName":"Liz"}"#,
        )),
        api_key: Some(key.into()),
    })
    .await?;
    let id = serde_json::from_slice::<serde_json::Value>(&seed)?["id"]
        .as_str()
        .context("seed message id")?
        .to_owned();

    let get_stats = load(
        &cli,
        &addrs,
        Scenario {
            name: "switchboard GET message by id",
            method: http::Method::GET,
            path: format!("/v3/conversations/messages/{id}"),
            body: None,
            api_key: Some(key.into()),
        },
    )
    .await?;
    let post_stats = load(&cli, &addrs, Scenario {
        name: "switchboard POST message (durable)",
        method: http::Method::POST,
        path: "/v3/conversations/messages".into(),
        body: Some(Bytes::from_static(
            br#"{"visitorId":"kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg","text":"Hello! How can I help you?","agentEmail":"liz@getwear.com","agentName":"Liz","receivedFrom":"bench"}"#,
        )),
        api_key: Some(key.into()),
    })
    .await?;
    let rss_after = sb.rss_kib().ok();
    for sb in instances {
        sb.stop().await;
    }
    drop(pg);
    drop(dir);

    println!();
    println!(
        "switchboard-bench: {} on {}, {} connections, {} s measured after {} s warm-up, {} cores",
        match cli.instances {
            0 | 1 => "one instance".to_owned(),
            n => format!("{n} instances"),
        },
        if cli.postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        cli.connections,
        cli.duration,
        cli.warmup,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<38} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "requests", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for (name, s) in [
        ("bare axum, fixed JSON", &bare_stats),
        ("switchboard GET message by id", &get_stats),
        ("switchboard POST message (durable)", &post_stats),
    ] {
        println!(
            "{:<38} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>8}",
            name,
            s.requests,
            s.rps,
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0,
            s.errors
        );
    }
    println!(
        "ratio GET/bare: {:.0}%   ratio POST/bare: {:.0}%",
        100.0 * get_stats.rps / bare_stats.rps,
        100.0 * post_stats.rps / bare_stats.rps
    );
    if let (Some(a), Some(b)) = (rss_idle, rss_after) {
        println!("switchboard RSS: {a} KiB idle, {b} KiB after the run");
    }
    Ok(())
}

async fn connect(
    addr: &str,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn build(addr: &str, s: &Scenario) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(s.method.clone())
        .uri(&s.path)
        .header("host", addr)
        .header("accept", "application/json");
    if let Some(k) = &s.api_key {
        req = req.header("api-key", k);
    }
    if s.body.is_some() {
        req = req.header("content-type", "application/json");
    }
    Ok(req.body(Full::new(s.body.clone().unwrap_or_default()))?)
}

async fn request(addr: &str, s: Scenario) -> anyhow::Result<Bytes> {
    let mut sender = connect(addr).await?;
    let res = sender.send_request(build(addr, &s)?).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{} answered {status}: {}",
            s.name,
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body)
}

/// Drives one scenario: every connection sends requests back to back; latencies of the
/// measured window are merged into percentiles.
async fn load(cli: &Cli, addrs: &[String], s: Scenario) -> anyhow::Result<Stats> {
    eprintln!("running: {} ...", s.name);
    let start = Instant::now();
    let warm_end = start + Duration::from_secs(cli.warmup);
    let end = warm_end + Duration::from_secs(cli.duration);
    let mut tasks = Vec::with_capacity(cli.connections);
    for i in 0..cli.connections {
        let (addr, s) = (addrs[i % addrs.len()].clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut sender = connect(&addr).await?;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = match sender.send_request(build(&addr, &s)?).await {
                    Ok(res) => {
                        let ok = res.status().is_success();
                        res.into_body().collect().await.is_ok() && ok
                    }
                    Err(_) => false,
                };
                let t1 = Instant::now();
                if t0 >= warm_end {
                    if ok {
                        lat.push(u32::try_from((t1 - t0).as_micros()).unwrap_or(u32::MAX));
                    } else {
                        errors += 1;
                    }
                }
                if !ok {
                    sender = connect(&addr).await?;
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            return 0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        u64::from(all[i])
    };
    let requests = all.len() as u64;
    Ok(Stats {
        requests,
        errors,
        rps: requests as f64 / cli.duration as f64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

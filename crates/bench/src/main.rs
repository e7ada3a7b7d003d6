//! `switchboard-bench`: measures switchboard against a bare axum handler on the same machine
//! in the same run, and prints requests/s, p50/p99 latency and the ratios.
//!
//! It starts both servers as child processes (so neither shares a runtime with the load
//! generator), drives each scenario with N keep-alive HTTP/1.1 connections for a fixed time
//! after a warm-up, and stops the children by pid. Numbers, not pass/fail.

mod reference;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use switchboard_bench::child::Server;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
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
    /// Measured seconds per scenario and round.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Rounds: each measures the bare handler, GET and POST back to back, and the ratios
    /// are taken within a round, so that the machine's drift between rounds cancels out.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
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
    /// A second switchboard binary to measure in the same rounds, on a database of its
    /// own, for before/after comparisons on a noisy machine: each round runs bare, then
    /// both builds (taking turns going first), and prints GET and POST of B against A.
    #[arg(long)]
    against: Option<PathBuf>,
    /// Leave out the reference (a minimal axum + SQLite server with one writer doing group
    /// commit, measured in every round on SQLite).
    #[arg(long)]
    no_reference: bool,
    /// What the GET scenario reads: a message by id, or the latest page of a visitor's ten
    /// messages (two reads of the database: the visitor, then the page).
    #[arg(long, value_enum, default_value_t = Read::Message)]
    read: Read,
    /// Serve switchboard over HTTPS (`--tls-cert`, a self-signed certificate made here);
    /// the bare handler and the reference stay plain HTTP, so the ratios include TLS.
    #[arg(long)]
    tls: bool,
}

/// What the GET scenario reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Read {
    /// `GET /v3/conversations/messages/{id}`.
    Message,
    /// `GET /v3/conversations/visitors/{visitorId}/messages?limit=10`.
    VisitorMessages,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve fixed JSON with a bare axum handler (the baseline; started by the benchmark).
    BareServer,
    /// Serve the minimal durable POST (the reference; started by the benchmark).
    ReferenceServer {
        /// Where its SQLite file goes.
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Cmd::BareServer) => return bare_server(),
        Some(Cmd::ReferenceServer { dir }) => return reference::serve(dir),
        None => {}
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
    name: &'static str,
    requests: u64,
    errors: u64,
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    /// CPU time (user + system) the servers used in the measured window, per request.
    server_cpu_us: f64,
    /// CPU time this load generator used in the measured window, per request.
    client_cpu_us: f64,
    /// The servers' threads by name: CPU time and time spent runnable but waiting for a
    /// CPU in the measured window, per request (empty where `/proc` has no schedstat).
    threads: Vec<(String, f64, f64)>,
}

/// User + system CPU time of a process so far, in microseconds, from `/proc/<pid>/stat`.
fn cpu_us(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s on Linux.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10_000)
}

/// CPU used so far by the given server pids and by this process.
fn cpu_now(pids: &[u32]) -> (u64, u64) {
    let servers = pids.iter().filter_map(|p| cpu_us(&p.to_string())).sum();
    (servers, cpu_us("self").unwrap_or(0))
}

/// Nanoseconds a thread has run and has waited runnable for a CPU, from its
/// `/proc/<pid>/task/<tid>/schedstat` (`<on cpu> <waiting> <timeslices>`).
fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// CPU and run-queue wait so far of every thread of the given pids, in nanoseconds, summed
/// by thread name (the kernel keeps its first 15 bytes). A thread that ends in the window
/// takes its time with it; the servers' threads live as long as they do.
fn threads_now(pids: &[u32]) -> BTreeMap<String, (u64, u64)> {
    let mut by_name = BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let (Ok(name), Ok(stat)) = (
                std::fs::read_to_string(path.join("comm")),
                std::fs::read_to_string(path.join("schedstat")),
            ) else {
                continue;
            };
            if let Some((run, wait)) = parse_schedstat(&stat) {
                let e: &mut (u64, u64) = by_name.entry(name.trim().to_owned()).or_default();
                e.0 += run;
                e.1 += wait;
            }
        }
    }
    by_name
}

/// One switchboard build under test: its instances, their database and its scenarios.
struct Target {
    /// How the rows name it (the binary's path when there are two).
    label: String,
    instances: Vec<Server>,
    addrs: Vec<String>,
    pids: Vec<u32>,
    get: Scenario,
    post: Scenario,
    /// Dropped (the database with it) after the instances stop.
    _pg: Option<switchboard_bench::pgdb::TempDatabase>,
}

const KEY: &str = "xkeysib-bench";

/// The body of every measured POST, switchboard's and the reference's.
const POST_BODY: &[u8] = br#"{"visitorId":"kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg","text":"Hello! How can I help you?","agentEmail":"liz@getwear.com","agentName":"Liz","receivedFrom":"bench"}"#;

impl Target {
    /// Starts `cli.instances` instances of `binary` on a database of their own (a file in
    /// `dir`, or a fresh PostgreSQL database) and writes the message that GET reads.
    async fn start(
        cli: &Cli,
        binary: &std::path::Path,
        dir: &std::path::Path,
        label: String,
    ) -> anyhow::Result<Self> {
        let pg = match &cli.postgres {
            Some(admin) => Some(switchboard_bench::pgdb::TempDatabase::create(admin).await?),
            None => None,
        };
        let db: std::ffi::OsString = match &pg {
            Some(pg) => pg.url().into(),
            None => tempfile::tempdir_in(dir)?.keep().join("bench.db").into(),
        };
        let mut instances = Vec::new();
        for _ in 0..cli.instances.max(1) {
            let mut sb_cmd = Command::new(binary);
            sb_cmd
                .arg("serve")
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--db")
                .arg(&db)
                .args(&cli.serve_arg)
                .args(tls_flags(cli, dir)?)
                .env("SWITCHBOARD_API_KEY", KEY)
                // SWITCHBOARD_BENCH_LOG sets the server's RUST_LOG (to look inside a run).
                .env(
                    "RUST_LOG",
                    std::env::var("SWITCHBOARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                );
            instances.push(Server::start(sb_cmd).await?);
        }
        let addrs: Vec<String> = instances.iter().map(|s| s.addr.clone()).collect();
        let pids: Vec<u32> = instances.iter().filter_map(|s| s.pid()).collect();
        // The visitor whose messages are listed has ten (a full page) and no more: POSTs go
        // to another visitor.
        let (seeds, seed_body): (usize, &'static [u8]) = match cli.read {
            Read::Message => (
                1,
                br#"{"visitorId":"kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg","text":"Hello! How can I help you?","agentEmail":"liz@getwear.com","agentName":"Liz"}"#,
            ),
            Read::VisitorMessages => (
                10,
                br#"{"visitorId":"p2Fq9YbWnL4xT7sKd3Hv6RcM8uJzA5eG","text":"Hello! How can I help you?","agentEmail":"liz@getwear.com","agentName":"Liz"}"#,
            ),
        };
        let mut id = String::new();
        for _ in 0..seeds {
            let seed = request(
                &addrs[0],
                Scenario {
                    name: "seed",
                    method: http::Method::POST,
                    path: "/v3/conversations/messages".into(),
                    body: Some(Bytes::from_static(seed_body)),
                    api_key: Some(KEY.into()),
                },
            )
            .await?;
            id = serde_json::from_slice::<serde_json::Value>(&seed)?["id"]
                .as_str()
                .context("seed message id")?
                .to_owned();
        }
        let get = match cli.read {
            Read::Message => Scenario {
                name: "switchboard GET message by id",
                method: http::Method::GET,
                path: format!("/v3/conversations/messages/{id}"),
                body: None,
                api_key: Some(KEY.into()),
            },
            Read::VisitorMessages => Scenario {
                name: "switchboard GET visitor's messages",
                method: http::Method::GET,
                path:
                    "/v3/conversations/visitors/p2Fq9YbWnL4xT7sKd3Hv6RcM8uJzA5eG/messages?limit=10"
                        .into(),
                body: None,
                api_key: Some(KEY.into()),
            },
        };
        Ok(Self {
            label,
            instances,
            addrs,
            pids,
            get,
            post: Scenario {
                name: "switchboard POST message (durable)",
                method: http::Method::POST,
                path: "/v3/conversations/messages".into(),
                body: Some(Bytes::from_static(POST_BODY)),
                api_key: Some(KEY.into()),
            },
            _pg: pg,
        })
    }

    async fn stop(self) {
        for sb in self.instances {
            sb.stop().await;
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    if cli.instances > 1 && cli.postgres.is_none() {
        bail!("--instances needs --postgres (SQLite is one process's file)");
    }

    // Every server runs for the whole benchmark (an idle one costs nothing), so that each
    // round can measure them back to back: the machine is shared and its speed drifts.
    let mut bare_cmd = Command::new(&exe);
    bare_cmd.arg("bare-server");
    let bare = Server::start(bare_cmd).await?;
    let bare_pids: Vec<u32> = bare.pid().into_iter().collect();

    let reference = if cli.no_reference || cli.postgres.is_some() {
        None
    } else {
        let mut cmd = Command::new(&exe);
        cmd.arg("reference-server").arg(dir.path());
        Some(Server::start(cmd).await?)
    };
    let reference_pids: Vec<u32> = reference.iter().filter_map(|r| r.pid()).collect();
    let reference_scenario = Scenario {
        name: "reference: minimal axum + SQLite POST",
        method: http::Method::POST,
        path: "/reference".into(),
        body: Some(Bytes::from_static(POST_BODY)),
        api_key: None,
    };

    let mut targets = Vec::new();
    let label = |p: &std::path::Path| p.display().to_string();
    targets.push(Target::start(&cli, &cli.switchboard, dir.path(), label(&cli.switchboard)).await?);
    if let Some(other) = &cli.against {
        targets.push(Target::start(&cli, other, dir.path(), label(other)).await?);
    }
    let rss_idle = targets[0].instances[0].rss_kib().ok();

    let bare_scenario = Scenario {
        name: "bare axum, fixed JSON",
        method: http::Method::GET,
        path: "/bare".into(),
        body: None,
        api_key: None,
    };
    // rounds[r][0] is bare; then GET and POST of each target, in the targets' order.
    let mut rounds: Vec<Vec<Stats>> = Vec::new();
    // The reference's POST, per round (when it runs).
    let mut reference_rounds: Vec<Stats> = Vec::new();
    for round in 1..=cli.rounds.max(1) {
        eprintln!("round {round} of {}", cli.rounds.max(1));
        let bare_addr = std::slice::from_ref(&bare.addr);
        let mut stats = vec![load(&cli, bare_addr, &bare_pids, bare_scenario.clone()).await?];
        stats.resize(1 + 2 * targets.len(), stats[0].clone());
        if let Some(r) = &reference {
            let addr = std::slice::from_ref(&r.addr);
            reference_rounds
                .push(load(&cli, addr, &reference_pids, reference_scenario.clone()).await?);
        }
        // Two builds take turns going first, so that neither always runs right after bare.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..targets.len()).rev().collect()
        } else {
            (0..targets.len()).collect()
        };
        for t in order {
            let target = &targets[t];
            stats[1 + 2 * t] = load(&cli, &target.addrs, &target.pids, target.get.clone()).await?;
            stats[2 + 2 * t] = load(&cli, &target.addrs, &target.pids, target.post.clone()).await?;
        }
        rounds.push(stats);
    }
    let rss_after = targets[0].instances[0].rss_kib().ok();
    bare.stop().await;
    if let Some(r) = reference {
        r.stop().await;
    }
    let labels: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();
    for t in targets {
        t.stop().await;
    }
    drop(dir);

    println!();
    println!(
        "switchboard-bench: {}{} on {}, {} connections, {} round(s) of {} s per scenario after {} s warm-up, {} cores",
        match cli.instances {
            0 | 1 => "one instance".to_owned(),
            n => format!("{n} instances"),
        },
        if cli.tls { " over HTTPS" } else { "" },
        if cli.postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        cli.connections,
        rounds.len(),
        cli.duration,
        cli.warmup,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if labels.len() > 1 {
        for (i, l) in labels.iter().enumerate() {
            println!("build {}: {l}", (b'A' + i as u8) as char);
        }
    }
    println!(
        "{:<5} {:<40} {:>10} {:>9} {:>9} {:>9} {:>8} {:>14} {:>14}",
        "round",
        "scenario",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU/req",
        "client CPU/req"
    );
    // Every round's rows, in the order measured: bare, the reference, the builds.
    let table: Vec<Vec<(String, &Stats)>> = rounds
        .iter()
        .enumerate()
        .map(|(i, stats)| {
            let mut rows: Vec<(String, &Stats)> = stats
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let name = if labels.len() > 1 && j > 0 {
                        format!("{} {}", (b'A' + ((j - 1) / 2) as u8) as char, s.name)
                    } else {
                        s.name.to_owned()
                    };
                    (name, s)
                })
                .collect();
            if let Some(r) = reference_rounds.get(i) {
                rows.insert(1, (r.name.to_owned(), r));
            }
            rows
        })
        .collect();
    let mut get_ratios = vec![Vec::new(); labels.len()];
    let mut post_ratios = vec![Vec::new(); labels.len()];
    for (i, (stats, rows)) in rounds.iter().zip(&table).enumerate() {
        for (name, s) in rows {
            println!(
                "{:<5} {:<40} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>11.1} µs {:>11.1} µs",
                i + 1,
                name,
                s.requests,
                s.rps,
                s.p50_us as f64 / 1000.0,
                s.p99_us as f64 / 1000.0,
                s.errors,
                s.server_cpu_us,
                s.client_cpu_us
            );
        }
        for t in 0..labels.len() {
            get_ratios[t].push(100.0 * stats[1 + 2 * t].rps / stats[0].rps);
            post_ratios[t].push(100.0 * stats[2 + 2 * t].rps / stats[0].rps);
        }
    }
    if table.iter().flatten().any(|(_, s)| !s.threads.is_empty()) {
        println!("server threads per request: CPU time (time runnable, waiting for a CPU)");
        for (i, rows) in table.iter().enumerate() {
            for (name, s) in rows {
                let threads: Vec<String> = s
                    .threads
                    .iter()
                    .map(|(thread, run, wait)| format!("{thread} {run:.1} ({wait:.1}) µs"))
                    .collect();
                println!("{:<5} {:<40} {}", i + 1, name, threads.join(", "));
            }
        }
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}%"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for t in 0..labels.len() {
        println!(
            "{}ratio GET/bare: median {:.0}% (rounds: {})   ratio POST/bare: median {:.0}% (rounds: {})",
            if labels.len() > 1 {
                format!("{}: ", (b'A' + t as u8) as char)
            } else {
                String::new()
            },
            median(&get_ratios[t]),
            list(&get_ratios[t]),
            median(&post_ratios[t]),
            list(&post_ratios[t])
        );
    }
    if !reference_rounds.is_empty() {
        let of_bare: Vec<f64> = rounds
            .iter()
            .zip(&reference_rounds)
            .map(|(s, r)| 100.0 * r.rps / s[0].rps)
            .collect();
        let ours: Vec<f64> = rounds
            .iter()
            .zip(&reference_rounds)
            .map(|(s, r)| 100.0 * s[2].rps / r.rps)
            .collect();
        println!(
            "ratio reference POST/bare: median {:.0}% (rounds: {})   ratio {}POST/reference POST: median {:.0}% (rounds: {})",
            median(&of_bare),
            list(&of_bare),
            if labels.len() > 1 { "A " } else { "" },
            median(&ours),
            list(&ours)
        );
    }
    if labels.len() > 1 {
        // Build B against build A, round by round (the same bare run divides both).
        let get: Vec<f64> = rounds.iter().map(|s| 100.0 * s[3].rps / s[1].rps).collect();
        let post: Vec<f64> = rounds.iter().map(|s| 100.0 * s[4].rps / s[2].rps).collect();
        println!(
            "GET B/A: median {:.0}% (rounds: {})   POST B/A: median {:.0}% (rounds: {})",
            median(&get),
            list(&get),
            median(&post),
            list(&post)
        );
    }
    if let (Some(a), Some(b)) = (rss_idle, rss_after) {
        println!("switchboard RSS: {a} KiB idle, {b} KiB after the run");
    }
    Ok(())
}

/// The median of a few numbers (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The certificate switchboard serves with `--tls`, and a client trusting only it.
struct Tls {
    cert: PathBuf,
    key: PathBuf,
    connector: tokio_rustls::TlsConnector,
}

static TLS: std::sync::OnceLock<Tls> = std::sync::OnceLock::new();

/// `--tls-cert`/`--tls-key` for `switchboard serve` with `--tls` (the pair is made once, in
/// `dir`); nothing without it.
fn tls_flags(cli: &Cli, dir: &std::path::Path) -> anyhow::Result<Vec<std::ffi::OsString>> {
    if !cli.tls {
        return Ok(Vec::new());
    }
    if TLS.get().is_none() {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])?;
        let (cert, key) = (dir.join("bench.crt"), dir.join("bench.key"));
        std::fs::write(&cert, made.cert.pem())?;
        std::fs::write(&key, made.key_pair.serialize_pem())?;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone())?;
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let _ = TLS.set(Tls {
            cert,
            key,
            connector,
        });
    }
    let tls = TLS.get().context("TLS set up")?;
    Ok(vec![
        "--tls-cert".into(),
        tls.cert.clone().into(),
        "--tls-key".into(),
        tls.key.clone().into(),
    ])
}

/// A keep-alive HTTP/1.1 connection to `addr` (`tls://host:port` for HTTPS).
async fn connect(
    addr: &str,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let (host, tls) = match addr.strip_prefix("tls://") {
        Some(host) => (host, Some(TLS.get().context("a TLS server without --tls")?)),
        None => (addr, None),
    };
    let stream = TcpStream::connect(host).await?;
    stream.set_nodelay(true)?;
    match tls {
        None => http1(stream).await,
        Some(tls) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")?;
            http1(tls.connector.connect(name, stream).await?).await
        }
    }
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn http1<IO>(io: IO) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn build(addr: &str, s: &Scenario) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(s.method.clone())
        .uri(&s.path)
        .header("host", addr.trim_start_matches("tls://"))
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
async fn load(cli: &Cli, addrs: &[String], pids: &[u32], s: Scenario) -> anyhow::Result<Stats> {
    eprintln!("running: {} ...", s.name);
    let start = Instant::now();
    let warm_end = start + Duration::from_secs(cli.warmup);
    let end = warm_end + Duration::from_secs(cli.duration);
    let cpu_pids = pids.to_vec();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        let (s0, c0) = cpu_now(&cpu_pids);
        let t0 = threads_now(&cpu_pids);
        tokio::time::sleep_until(end.into()).await;
        let (s1, c1) = cpu_now(&cpu_pids);
        let threads: BTreeMap<String, (u64, u64)> = threads_now(&cpu_pids)
            .into_iter()
            .map(|(name, (run, wait))| {
                let (run0, wait0) = t0.get(&name).copied().unwrap_or_default();
                (name, (run.saturating_sub(run0), wait.saturating_sub(wait0)))
            })
            .collect();
        (s1.saturating_sub(s0), c1.saturating_sub(c0), threads)
    });
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
    let (server_cpu, client_cpu, threads) = cpu.await?;
    let per_request = |us: u64| us as f64 / requests.max(1) as f64;
    let threads = threads
        .into_iter()
        .map(|(name, (run, wait))| (name, per_request(run) / 1e3, per_request(wait) / 1e3))
        // Threads that did next to nothing in the window (idle ones) are left out.
        .filter(|(_, run, _)| *run >= 0.05)
        .collect();
    Ok(Stats {
        name: s.name,
        requests,
        errors,
        rps: requests as f64 / cli.duration as f64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        server_cpu_us: per_request(server_cpu),
        client_cpu_us: per_request(client_cpu),
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_time_on_cpu_and_waiting() {
        assert_eq!(parse_schedstat("123456 789 10\n"), Some((123_456, 789)));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn threads_are_listed_by_name_with_their_cpu_time() {
        let (done, wait_done) = std::sync::mpsc::channel::<()>();
        let (ready, wait_ready) = std::sync::mpsc::channel::<()>();
        let probe = std::thread::Builder::new()
            .name("bench-probe".into())
            .spawn(move || {
                let mut x = 0u64;
                for i in 0..5_000_000u64 {
                    x = std::hint::black_box(x.wrapping_add(i.wrapping_mul(i)));
                }
                ready.send(()).unwrap();
                wait_done.recv().ok();
            })
            .unwrap();
        wait_ready.recv().unwrap();
        let threads = threads_now(&[std::process::id()]);
        done.send(()).unwrap();
        probe.join().unwrap();
        let (run, _) = threads
            .get("bench-probe")
            .expect("the probe thread is listed");
        assert!(*run > 0, "the probe ran for {run} ns");
    }
}

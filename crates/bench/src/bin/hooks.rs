//! `switchboard-hooks-bench`: webhook delivery under a steady load of visitor messages.
//!
//! It starts the `switchboard` binary (`--fragment-delay 0`, no session or visitor rate
//! limits) as a child process and a webhook receiver in this process (axum on 127.0.0.1,
//! answering 204 at once), registers the receiver for `conversationFragment` only, creates
//! K visitor sessions, then for D seconds sends visitor messages
//! (`POST /widget/v1/{widgetId}/messages`) at a steady rate R spread over the visitors. For
//! each message it measures the time from the `200` of that POST to the arrival at the
//! receiver of a `conversationFragment` whose `messages` contain that message id (the bench
//! holds both ends, so it is one clock). Numbers, not pass/fail.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_bench::child::{admin, Server};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::process::Command;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(
    about = "Webhook benchmark for switchboard: conversationFragment delivery delay and \
             throughput under a steady load of visitor messages"
)]
struct Cli {
    /// The switchboard binary to measure (default: `switchboard` next to this binary, else
    /// target/release/switchboard).
    #[arg(long)]
    switchboard: Option<PathBuf>,
    /// Visitors (sessions) the messages are spread over.
    #[arg(long, default_value_t = 200)]
    visitors: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Visitor messages per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Most visitor messages in flight at once (beyond it sending falls behind the rate).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds to wait after the last message for fragments still on their way.
    #[arg(long, default_value_t = 5)]
    grace: u64,
    /// Webhook endpoints, each getting every fragment (deliveries = endpoints × fragments).
    #[arg(long, default_value_t = 1)]
    endpoints: usize,
    /// Extra flags for `switchboard serve` (e.g. `--sync=normal`).
    #[arg(long, allow_hyphen_values = true)]
    serve_arg: Vec<String>,
}

/// The API key registered with `switchboard serve --api-key`.
const API_KEY: &str = "xkeysib-bench";
/// Longest wait for one HTTP answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

// ---------------------------------------------------------------------------------------
// The switchboard child

fn switchboard_exe(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.switchboard {
        return Ok(p.clone());
    }
    let beside = std::env::current_exe()?.with_file_name("switchboard");
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from("target/release/switchboard"))
}

// ---------------------------------------------------------------------------------------
// The webhook receiver

#[derive(Default)]
struct Receiver {
    /// Webhook POSTs received.
    posts: AtomicU64,
    /// POSTs that were not a conversationFragment (there should be none).
    other_events: AtomicU64,
    /// Message id -> first arrival in a conversationFragment.
    arrivals: Mutex<HashMap<String, Instant>>,
    /// Message ids that arrived in more than one fragment (or more than once).
    repeats: AtomicU64,
}

async fn hook(
    axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
    axum::extract::Path(endpoint): axum::extract::Path<usize>,
    body: Bytes,
) -> axum::http::StatusCode {
    let at = Instant::now();
    r.posts.fetch_add(1, Ordering::Relaxed);
    let ids: Vec<String> = match serde_json::from_slice::<Value>(&body) {
        Ok(p) if p["eventName"] == "conversationFragment" => p["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect(),
        _ => {
            r.other_events.fetch_add(1, Ordering::Relaxed);
            Vec::new()
        }
    };
    let mut arrivals = r.arrivals.lock().expect("arrivals");
    for id in ids {
        if arrivals.insert(format!("{endpoint}:{id}"), at).is_some() {
            r.repeats.fetch_add(1, Ordering::Relaxed);
        }
    }
    axum::http::StatusCode::NO_CONTENT
}

// ---------------------------------------------------------------------------------------
// HTTP client

type Http = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> Http {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(conn)
}

/// POSTs JSON; returns the status and the JSON answer (`Null` when not JSON).
async fn post_json(
    http: &Http,
    addr: &str,
    path: &str,
    bearer: Option<&str>,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let mut req = hyper::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("accept", "application/json");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let (status, body) = tokio::time::timeout(STEP_TIMEOUT, async {
        let res = http.request(req).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .with_context(|| format!("POST {path}: no answer within {STEP_TIMEOUT:?}"))??;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

// ---------------------------------------------------------------------------------------
// The run

/// What the senders saw.
#[derive(Default)]
struct Sent {
    /// (message id, when its 200 was read).
    acked: Vec<(String, Instant)>,
    /// Failed sends, by status (0: no answer / transport error).
    errors: HashMap<u16, u64>,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.visitors == 0 || cli.rate == 0 || cli.duration == 0 || cli.concurrency == 0 {
        bail!("--visitors, --rate, --duration and --concurrency must be at least 1");
    }
    let exe = switchboard_exe(&cli)?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("hooks-bench.db");

    // The receiver.
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_base = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook/{endpoint}", axum::routing::post(hook))
        .with_state(receiver.clone());
    let receiver_task = tokio::spawn(async move { axum::serve(listener, app).await });

    // The endpoint and the widget id, through the CLI, before the server starts.
    let endpoints = cli.endpoints.max(1);
    let mut webhook_id = String::new();
    for i in 0..endpoints {
        let hook_url = format!("{hook_base}/{i}");
        let webhook = admin(
            &exe,
            &db,
            &[
                "webhooks",
                "add",
                "--url",
                &hook_url,
                "--event",
                "conversationFragment",
            ],
        )
        .await?;
        if i == 0 {
            webhook_id = webhook["id"].as_str().context("webhook id")?.to_owned();
        }
    }
    let widget = admin(&exe, &db, &["accounts", "widget"]).await?["widgetId"]
        .as_str()
        .context("widgetId")?
        .to_owned();

    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(&db)
        .args(["--fragment-delay", "0", "--session-rate", "0"])
        .args(["--visitor-rate", "0", "--api-key", API_KEY])
        .args(&cli.serve_arg)
        .env_remove("SWITCHBOARD_API_KEY")
        // SWITCHBOARD_BENCH_LOG sets the server's RUST_LOG (to look inside a run).
        .env(
            "RUST_LOG",
            std::env::var("SWITCHBOARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let server = Server::start(cmd).await?;
    let addr = server.addr.clone();
    let http = http_client();

    // Visitor sessions.
    eprintln!("creating {} visitor sessions ...", cli.visitors);
    let session_path = format!("/widget/v1/{widget}/session");
    let tokens: Vec<String> = futures::stream::iter(0..cli.visitors)
        .map(|_| {
            let (http, addr, path) = (http.clone(), addr.clone(), session_path.clone());
            async move {
                let (status, s) = post_json(&http, &addr, &path, None, &json!({})).await?;
                if status != 200 {
                    bail!("POST {path} answered {status}: {s}");
                }
                Ok(s["token"].as_str().context("token")?.to_owned())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<anyhow::Result<String>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let tokens = Arc::new(tokens);

    // Sending: message i is due at start + i / rate; at most `concurrency` in flight.
    eprintln!(
        "sending {} visitor messages/s for {} s over {} visitors ...",
        cli.rate, cli.duration, cli.visitors
    );
    let sent = Arc::new(Mutex::new(Sent::default()));
    let permits = Arc::new(Semaphore::new(cli.concurrency));
    let message_path = Arc::new(format!("/widget/v1/{widget}/messages"));
    let window = Duration::from_secs(cli.duration);
    let start = Instant::now();
    let end = start + window;
    let posts_at_start = receiver.posts.load(Ordering::Relaxed);
    let mut issued: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = ((now - start).as_secs_f64() * f64::from(cli.rate)) as u64 + 1;
        while issued < due && Instant::now() < end {
            // Waits when `concurrency` messages are in flight (bounded by STEP_TIMEOUT each).
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let i = issued;
            issued += 1;
            let (http, addr, path, tokens, sent) = (
                http.clone(),
                addr.clone(),
                message_path.clone(),
                tokens.clone(),
                sent.clone(),
            );
            tasks.spawn(async move {
                let token = &tokens[(i % tokens.len() as u64) as usize];
                let body = json!({ "text": format!("bench message {i}") });
                let res = post_json(&http, &addr, &path, Some(token), &body).await;
                let at = Instant::now();
                let mut sent = sent.lock().expect("sent");
                match res {
                    Ok((200, m)) => match m["id"].as_str() {
                        Some(id) => sent.acked.push((id.to_owned(), at)),
                        None => *sent.errors.entry(200).or_default() += 1,
                    },
                    Ok((status, _)) => *sent.errors.entry(status).or_default() += 1,
                    Err(_) => *sent.errors.entry(0).or_default() += 1,
                }
                drop(permit);
            });
            // Reap finished tasks so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The last sends (each bounded by STEP_TIMEOUT).
    let drain = tokio::time::timeout(STEP_TIMEOUT + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drain.is_err() {
        tasks.abort_all();
    }
    let sent_end = Instant::now();
    let send_secs = (sent_end - start).as_secs_f64();
    let posts_in_window = receiver.posts.load(Ordering::Relaxed) - posts_at_start;

    // Wait (bounded) for the fragments still on their way.
    let (acked, errors) = {
        let mut s = sent.lock().expect("sent");
        (std::mem::take(&mut s.acked), std::mem::take(&mut s.errors))
    };
    let grace_end = sent_end + Duration::from_secs(cli.grace);
    loop {
        let all = {
            let arrivals = receiver.arrivals.lock().expect("arrivals");
            acked
                .iter()
                .all(|(id, _)| (0..endpoints).all(|e| arrivals.contains_key(&format!("{e}:{id}"))))
        };
        if all || Instant::now() >= grace_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = Instant::now() - sent_end;
    let posts_total = receiver.posts.load(Ordering::Relaxed) - posts_at_start;

    // Delays.
    let mut delays_us: Vec<u64> = Vec::with_capacity(acked.len());
    let mut missing = 0u64;
    let mut before_ack = 0u64;
    {
        let arrivals = receiver.arrivals.lock().expect("arrivals");
        for (id, acked_at) in &acked {
            for e in 0..endpoints {
                match arrivals.get(&format!("{e}:{id}")) {
                    Some(at) => {
                        if at < acked_at {
                            before_ack += 1;
                        }
                        let d = at.saturating_duration_since(*acked_at);
                        delays_us.push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                    }
                    None => missing += 1,
                }
            }
        }
    }
    delays_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if delays_us.is_empty() {
            return f64::NAN;
        }
        let i = ((delays_us.len() as f64 * p).ceil() as usize).clamp(1, delays_us.len()) - 1;
        delays_us[i] as f64 / 1000.0
    };

    // The server's own view of the endpoint (for the record).
    let health = {
        let req = hyper::Request::builder()
            .uri(format!(
                "http://{addr}/v3/conversations/webhooks/{webhook_id}"
            ))
            .header("api-key", API_KEY)
            .body(Full::new(Bytes::new()))?;
        match tokio::time::timeout(STEP_TIMEOUT, http.request(req)).await {
            Ok(Ok(res)) => {
                let b = res.into_body().collect().await?.to_bytes();
                serde_json::from_slice::<Value>(&b)
                    .ok()
                    .and_then(|w| w["status"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "?".into())
            }
            _ => "?".into(),
        }
    };
    server.stop().await;
    receiver_task.abort();

    let errors_total: u64 = errors.values().sum();
    let mut error_kinds: Vec<_> = errors.iter().collect();
    error_kinds.sort();
    println!();
    println!(
        "switchboard-hooks-bench: {} visitors, target {} msg/s for {} s, {} endpoint(s), \
         concurrency {}, {} cores",
        cli.visitors,
        cli.rate,
        cli.duration,
        endpoints,
        cli.concurrency,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "messages sent:        {} acknowledged (200), {} issued, {} failed {:?}",
        acked.len(),
        issued,
        errors_total,
        error_kinds
    );
    println!(
        "achieved send rate:   {:.0} msg/s ({} acknowledged in {:.2} s, from the first send to \
         the last answer)",
        acked.len() as f64 / send_secs,
        acked.len(),
        send_secs
    );
    println!(
        "webhook POSTs:        {} during sending ({:.0}/s over {} s), {} in all incl. the wait \
         ({:.0}/s = all / {} s), {:.2} messages per fragment",
        posts_in_window,
        posts_in_window as f64 / cli.duration as f64,
        cli.duration,
        posts_total,
        posts_total as f64 / cli.duration as f64,
        cli.duration,
        (acked.len() as u64 * endpoints as u64 - missing) as f64 / posts_total.max(1) as f64
    );
    println!(
        "delay 200 -> fragment: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} deliveries of a \
         message to an endpoint; {} arrived before their 200 was read, counted as 0)",
        pct(0.50),
        pct(0.99),
        delays_us.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
        delays_us.len(),
        before_ack
    );
    println!(
        "never arrived:        {} of {} (message, endpoint) pairs within {} s after the end \
         (waited {:.2} s)",
        missing,
        acked.len() * endpoints,
        cli.grace,
        waited.as_secs_f64()
    );
    println!(
        "receiver:             {} message ids repeated, {} POSTs not conversationFragment; \
         endpoint status at the end: {health}",
        receiver.repeats.load(Ordering::Relaxed),
        receiver.other_events.load(Ordering::Relaxed)
    );
    Ok(())
}

//! `switchboard-ws-bench`: the visitor WebSocket (`/widget/v1/{widgetId}/ws`) under load,
//! against a bare axum WebSocket server on the same machine in the same run.
//!
//! 1. Memory: the server's RSS (`VmRSS` of `/proc/<pid>/status`) after a warm-up, after
//!    creating N visitor sessions, and after N idle visitor WebSockets are established (each
//!    one has received its `ready` frame); printed per socket, and as a ratio to the same
//!    measure for a bare axum WebSocket server that only sends `{"event":"ready"}`.
//! 2. Delivery latency: with the N sockets open, agent messages are posted through
//!    `POST /v3/conversations/messages` at a steady rate to random connected visitors; for each
//!    one, the time from the API's `200` to the `messageCreated` frame with that message id on
//!    that visitor's socket (the bench holds both ends, so it is one clock).
//!
//! Both servers run as child processes (so neither shares a runtime with the load generator)
//! and are stopped by pid. Numbers, not pass/fail.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_bench::child::rss_kib;
use switchboard_bench::child::{admin, Server};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Parser)]
#[command(
    about = "WebSocket benchmark for switchboard: memory per idle visitor socket and \
                   delivery latency, against a bare axum WebSocket server"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The switchboard binary to measure.
    #[arg(long, default_value = "target/release/switchboard")]
    switchboard: PathBuf,
    /// Idle visitor WebSockets to open (on each server).
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Sessions created / sockets being opened at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Agent messages per second in the delivery-latency phase.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds of the delivery-latency phase.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Run only one of the two servers.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Extra flags for `switchboard serve` (e.g. `--sync=normal`).
    #[arg(long, allow_hyphen_values = true)]
    serve_arg: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Bare,
    Switchboard,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A bare axum WebSocket server (the baseline; started by the benchmark).
    BareWsServer {
        /// `WebSocketUpgrade::read_buffer_size` (default: axum's, 128 KiB).
        #[arg(long)]
        read_buffer: Option<usize>,
    },
}

/// The read buffer of the second bare baseline: enough for any client frame of this protocol.
const SMALL_READ_BUFFER: usize = 4096;
/// The API key registered with `switchboard serve --api-key`.
const API_KEY: &str = "xkeysib-bench";
/// Sockets opened and closed before the first RSS reading (allocator and runtime warm-up).
const WARMUP_CONNS: usize = 64;
/// Longest wait for one HTTP answer, one WebSocket handshake + `ready`.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long frames may still arrive after the last message was answered.
const GRACE: Duration = Duration::from_secs(5);
/// Most agent messages in flight; beyond it a tick is skipped (and counted).
const MAX_IN_FLIGHT: usize = 512;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::BareWsServer { read_buffer }) = cli.command {
        return bare_ws_server(read_buffer);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

/// The baseline: the smallest axum WebSocket server, with axum's default socket settings
/// (or another read buffer size), on the same runtime setup as switchboard. It sends one
/// `ready` frame and holds the socket.
///
/// The read buffer matters: tungstenite zero-fills its whole capacity before the first read
/// (`FrameCodec::read_in`), so every idle socket keeps all of it resident.
#[tokio::main]
async fn bare_ws_server(read_buffer: Option<usize>) -> anyhow::Result<()> {
    use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
    let app = axum::Router::new().route(
        "/ws",
        axum::routing::get(move |ws: WebSocketUpgrade| async move {
            let ws = match read_buffer {
                Some(n) => ws.read_buffer_size(n),
                None => ws,
            };
            ws.on_upgrade(|mut socket| async move {
                let ready = AxMessage::Text(r#"{"event":"ready","cursor":0}"#.into());
                if socket.send(ready).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = socket.recv().await {
                    if let AxMessage::Close(_) = msg {
                        break;
                    }
                }
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Child servers

// ---------------------------------------------------------------------------------------
// Limits

/// The soft limit of open files of this process (the servers inherit it).
fn open_files_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

fn check_limits(conns: usize) -> anyhow::Result<()> {
    let need = conns as u64 + 1024;
    match open_files_soft_limit() {
        Some(soft) if soft < need => bail!(
            "the soft limit of open files (`ulimit -n`) is {soft}, and this run needs about \
             {need} in this process and in the server ({conns} visitor sockets + HTTP \
             connections + files): run `ulimit -n {need}` in this shell first (the hard limit \
             allows up to what `ulimit -Hn` prints), or pass a smaller --conns"
        ),
        Some(_) => {}
        None => eprintln!("warning: could not read the open-files limit from /proc/self/limits"),
    }
    if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
        let v: Vec<u64> = range
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [lo, hi] = v[..] {
            if hi.saturating_sub(lo) < conns as u64 + 1024 {
                bail!(
                    "the local port range ({lo}-{hi}) is too small for {conns} client sockets \
                     to one address: pass a smaller --conns"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP

type Http = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> Http {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(conn)
}

/// POSTs JSON and returns the JSON answer; anything but a 2xx is an error.
async fn post_json(
    http: &Http,
    addr: &str,
    path: &str,
    api_key: Option<&str>,
    body: &Value,
) -> anyhow::Result<Value> {
    let mut req = hyper::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("accept", "application/json");
    if let Some(k) = api_key {
        req = req.header("api-key", k);
    }
    let req = req.body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let res = tokio::time::timeout(STEP_TIMEOUT, async {
        let res = http.request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .with_context(|| format!("POST {path}: no answer within {STEP_TIMEOUT:?}"))??;
    let (status, body) = res;
    if !status.is_success() {
        bail!(
            "POST {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

// ---------------------------------------------------------------------------------------
// WebSockets

type Ws = WebSocketStream<TcpStream>;

/// The client's side stays small: frames here are well under 4 KiB.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// Opens a WebSocket and waits for its `ready` frame.
async fn open_ws(addr: &str, path: &str) -> anyhow::Result<Ws> {
    tokio::time::timeout(STEP_TIMEOUT, async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}{path}"),
            stream,
            Some(ws_config()),
        )
        .await?;
        while let Some(msg) = ws.next().await {
            match msg? {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str())
                        .with_context(|| format!("frame is not JSON: {t}"))?;
                    if v["event"] == "ready" {
                        return Ok(ws);
                    }
                }
                Message::Close(c) => bail!("closed before ready: {c:?}"),
                _ => {}
            }
        }
        bail!("stream ended before ready")
    })
    .await
    .with_context(|| format!("no ready frame within {STEP_TIMEOUT:?}"))?
}

/// A `messageCreated` frame as the bench saw it.
struct Arrival {
    visitor: usize,
    message_id: String,
    at: Instant,
}

/// What happened to the held sockets.
#[derive(Default)]
struct SocketLog {
    /// Close reasons (or errors) of sockets that ended while held, by reason.
    ended: HashMap<String, usize>,
    /// Frames that were neither `messageCreated` nor `pong`.
    other_frames: usize,
}

struct Held {
    tasks: JoinSet<()>,
    alive: Arc<Vec<AtomicBool>>,
    log: Arc<Mutex<SocketLog>>,
}

impl Held {
    fn new(n: usize) -> Self {
        Self {
            tasks: JoinSet::new(),
            alive: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            log: Arc::new(Mutex::new(SocketLog::default())),
        }
    }

    fn connected(&self) -> usize {
        self.alive
            .iter()
            .filter(|a| a.load(Ordering::Relaxed))
            .count()
    }

    /// Keeps a socket open and reads it until the end of the run.
    fn hold(&mut self, visitor: usize, mut ws: Ws, arrivals: mpsc::UnboundedSender<Arrival>) {
        let (alive, log) = (self.alive.clone(), self.log.clone());
        alive[visitor].store(true, Ordering::Relaxed);
        self.tasks.spawn(async move {
            let ended = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let at = Instant::now();
                        match serde_json::from_str::<Value>(t.as_str()) {
                            Ok(v) if v["event"] == "messageCreated" => {
                                let message_id = v["message"]["id"].as_str().unwrap_or("");
                                let _ = arrivals.send(Arrival {
                                    visitor,
                                    message_id: message_id.to_owned(),
                                    at,
                                });
                            }
                            Ok(v) if v["event"] == "pong" => {}
                            _ => log.lock().expect("log").other_frames += 1,
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        break match c {
                            Some(c) => format!("closed by server: {} {}", c.code, c.reason),
                            None => "closed by server without a code".to_owned(),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("error: {e}"),
                    None => break "stream ended".to_owned(),
                }
            };
            alive[visitor].store(false, Ordering::Relaxed);
            *log.lock().expect("log").ended.entry(ended).or_default() += 1;
        });
    }

    /// Drops every held socket (without a closing handshake).
    async fn close_all(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Runs `f(0..n)` with at most `concurrency` in flight; results in index order.
async fn par<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<anyhow::Result<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut out: Vec<(usize, anyhow::Result<T>)> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            async move { (i, fut.await) }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Keeps the successes; prints how many failed and the first error.
fn successes<T>(what: &str, results: Vec<anyhow::Result<T>>) -> Vec<Option<T>> {
    let mut failed = 0;
    let mut first = None;
    let out = results
        .into_iter()
        .map(|r| match r {
            Ok(v) => Some(v),
            Err(e) => {
                failed += 1;
                first.get_or_insert_with(|| format!("{e:#}"));
                None
            }
        })
        .collect();
    if let Some(e) = first {
        eprintln!("  {failed} {what} failed; first error: {e}");
    }
    out
}

/// Opens `n` sockets (`path(i)`), waits for every `ready`, and holds them.
async fn open_and_hold(
    addr: &str,
    n: usize,
    concurrency: usize,
    path: impl Fn(usize) -> Option<String>,
    arrivals: &mpsc::UnboundedSender<Arrival>,
) -> (Held, Duration) {
    let t0 = Instant::now();
    let mut held = Held::new(n);
    let results = par(n, concurrency, |i| {
        let p = path(i);
        async move {
            match p {
                Some(p) => open_ws(addr, &p).await,
                None => bail!("no session"),
            }
        }
    })
    .await;
    let took = t0.elapsed();
    for (i, ws) in successes("WebSocket connects", results)
        .into_iter()
        .enumerate()
    {
        if let Some(ws) = ws {
            held.hold(i, ws, arrivals.clone());
        }
    }
    (held, took)
}

/// Opens and closes a few sockets so that the first RSS reading is of a warm server.
async fn warm_up(addr: &str, concurrency: usize, path: impl Fn(usize) -> Option<String>) {
    let (tx, _rx) = mpsc::unbounded_channel();
    let (held, _) = open_and_hold(addr, WARMUP_CONNS, concurrency, path, &tx).await;
    held.close_all().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// RSS after the server has had a moment to finish what the last connects started.
async fn settled_rss(server: &Server) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.rss_kib()
}

// ---------------------------------------------------------------------------------------
// The run

struct MemResult {
    conns: usize,
    before_kib: u64,
    after_kib: u64,
    connect_secs: f64,
}

impl MemResult {
    fn per_conn_bytes(&self) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) * 1024.0 / self.conns.max(1) as f64
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    check_limits(cli.conns)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);

    let mut bare = Vec::new();
    if cli.only != Some(Only::Switchboard) {
        for (name, read_buffer) in [
            ("bare axum WebSocket (defaults: 128 KiB rbuf)", None),
            (
                "bare axum WebSocket (4 KiB read buffer)",
                Some(SMALL_READ_BUFFER),
            ),
        ] {
            bare.push((name, run_bare(&cli, name, read_buffer).await?));
        }
    }
    let sb = if cli.only != Some(Only::Bare) {
        Some(run_switchboard(&cli).await?)
    } else {
        None
    };

    println!();
    println!(
        "switchboard-ws-bench: {} idle visitor WebSockets, {} cores, client rss {} KiB",
        cli.conns,
        cores,
        rss_kib("/proc/self/status").unwrap_or(0)
    );
    println!();
    println!("memory per idle WebSocket (server VmRSS after all `ready` minus before, / sockets)");
    println!(
        "{:<46} {:>7} {:>11} {:>11} {:>10} {:>8} {:>11}",
        "server", "sockets", "before KiB", "after KiB", "B/socket", "KiB/sock", "connects/s"
    );
    let row = |name: &str, m: &MemResult| {
        println!(
            "{:<46} {:>7} {:>11} {:>11} {:>10.0} {:>8.2} {:>11.0}",
            name,
            m.conns,
            m.before_kib,
            m.after_kib,
            m.per_conn_bytes(),
            m.per_conn_bytes() / 1024.0,
            m.conns as f64 / m.connect_secs.max(1e-9)
        );
    };
    for (name, b) in &bare {
        row(name, b);
    }
    if let Some(s) = &sb {
        row("switchboard visitor WebSocket", &s.ws);
        row("switchboard session + WebSocket (per visitor)", &s.visitor);
        println!(
            "switchboard sessions: {} created in {:.1} s ({:.0}/s, {} in flight)",
            s.ws.conns,
            s.session_secs,
            s.ws.conns as f64 / s.session_secs.max(1e-9),
            cli.concurrency
        );
    }
    if let Some(s) = &sb {
        for (name, b) in &bare {
            println!(
                "ratio switchboard/{name}: {:.2}x (WebSocket only), {:.2}x (with session)",
                s.ws.per_conn_bytes() / b.per_conn_bytes(),
                s.visitor.per_conn_bytes() / b.per_conn_bytes()
            );
        }
    }
    if let Some(s) = &sb {
        s.latency.print(&cli);
        println!(
            "switchboard RSS after the latency phase: {} KiB",
            s.rss_end_kib
        );
        if !s.socket_log.ended.is_empty() {
            println!("sockets that ended while held:");
            for (why, n) in &s.socket_log.ended {
                println!("  {n:>6}  {why}");
            }
        }
        if s.socket_log.other_frames > 0 {
            println!(
                "unexpected frames (not messageCreated/pong): {}",
                s.socket_log.other_frames
            );
        }
    }
    Ok(())
}

async fn run_bare(cli: &Cli, name: &str, read_buffer: Option<usize>) -> anyhow::Result<MemResult> {
    eprintln!("{name}: starting ...");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("bare-ws-server");
    if let Some(n) = read_buffer {
        cmd.arg("--read-buffer").arg(n.to_string());
    }
    let server = Server::start(cmd).await?;
    let addr = server.addr.clone();
    let path = |_: usize| Some("/ws".to_owned());
    warm_up(&addr, cli.concurrency, path).await;
    let before = server.rss_kib()?;
    eprintln!("{name}: opening {} sockets ...", cli.conns);
    let (tx, _rx) = mpsc::unbounded_channel();
    let (held, took) = open_and_hold(&addr, cli.conns, cli.concurrency, path, &tx).await;
    let after = settled_rss(&server).await?;
    let conns = held.connected();
    eprintln!("{name}: {conns} sockets in {:.1} s", took.as_secs_f64());
    held.close_all().await;
    server.stop().await;
    if conns == 0 {
        bail!("{name}: no WebSocket could be opened");
    }
    Ok(MemResult {
        conns,
        before_kib: before,
        after_kib: after,
        connect_secs: took.as_secs_f64(),
    })
}

struct SbResult {
    /// Sessions already created before and after: the WebSockets only.
    ws: MemResult,
    /// From before the sessions to after the WebSockets.
    visitor: MemResult,
    session_secs: f64,
    latency: Latency,
    rss_end_kib: u64,
    socket_log: SocketLog,
}

struct Session {
    visitor_id: String,
    token: String,
}

async fn create_sessions(
    http: &Http,
    addr: &str,
    widget: &str,
    n: usize,
    concurrency: usize,
) -> Vec<Option<Session>> {
    let path = format!("/widget/v1/{widget}/session");
    let results = par(n, concurrency, |_| async {
        let v = post_json(http, addr, &path, None, &json!({})).await?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("session answer without {k}: {v}"))
        };
        Ok(Session {
            visitor_id: field("visitorId")?,
            token: field("token")?,
        })
    })
    .await;
    successes("sessions", results)
}

fn ws_path<'a>(
    widget: &str,
    sessions: &'a [Option<Session>],
) -> impl Fn(usize) -> Option<String> + 'a {
    let widget = widget.to_owned();
    move |i| {
        sessions[i]
            .as_ref()
            .map(|s| format!("/widget/v1/{widget}/ws?token={}", query_escape(&s.token)))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run_switchboard(cli: &Cli) -> anyhow::Result<SbResult> {
    let exe = &cli.switchboard;
    if !exe.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p switchboard-server` \
             or pass --switchboard",
            exe.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");

    eprintln!("switchboard: preparing the account ...");
    let agent = admin(exe, &db, &["agents", "add", "--name", "Bench"]).await?;
    let agent_id = agent["id"]
        .as_str()
        .with_context(|| format!("`agents add` printed no id: {agent}"))?
        .to_owned();
    let widget = admin(exe, &db, &["accounts", "widget"]).await?;
    let widget_id = widget["widgetId"]
        .as_str()
        .with_context(|| format!("`accounts widget` printed no widgetId: {widget}"))?
        .to_owned();

    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(&db)
        .arg("--api-key")
        .arg(API_KEY)
        // Every bench visitor comes from 127.0.0.1: lift the per-address session limit.
        .arg("--session-rate")
        .arg("0")
        .args(&cli.serve_arg)
        .env("RUST_LOG", "warn");
    let server = Server::start(cmd).await?;
    let addr = server.addr.clone();
    let http = http_client();

    // Warm-up: a few visitors with a socket each, then closed.
    let warm = create_sessions(&http, &addr, &widget_id, WARMUP_CONNS, cli.concurrency).await;
    warm_up(&addr, cli.concurrency, ws_path(&widget_id, &warm)).await;
    let rss0 = server.rss_kib()?;

    eprintln!("switchboard: creating {} sessions ...", cli.conns);
    let t0 = Instant::now();
    let sessions = create_sessions(&http, &addr, &widget_id, cli.conns, cli.concurrency).await;
    let session_secs = t0.elapsed().as_secs_f64();
    let made = sessions.iter().filter(|s| s.is_some()).count();
    eprintln!("switchboard: {made} sessions in {session_secs:.1} s");
    if made == 0 {
        bail!("no visitor session could be created");
    }
    let rss1 = settled_rss(&server).await?;

    eprintln!("switchboard: opening {made} visitor sockets ...");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (held, took) = open_and_hold(
        &addr,
        cli.conns,
        cli.concurrency,
        ws_path(&widget_id, &sessions),
        &tx,
    )
    .await;
    drop(tx);
    let rss2 = settled_rss(&server).await?;
    let conns = held.connected();
    eprintln!(
        "switchboard: {conns} sockets ready in {:.1} s",
        took.as_secs_f64()
    );
    if conns == 0 {
        bail!("no visitor WebSocket could be opened");
    }

    eprintln!(
        "switchboard: {} agent messages/s for {} s ...",
        cli.rate, cli.secs
    );
    let latency = measure_latency(
        cli,
        &http,
        &addr,
        &agent_id,
        &sessions,
        &held.alive,
        &mut rx,
    )
    .await;
    let rss_end_kib = server.rss_kib()?;
    let socket_log = std::mem::take(&mut *held.log.lock().expect("log"));
    held.close_all().await;
    server.stop().await;
    drop(dir);

    Ok(SbResult {
        ws: MemResult {
            conns,
            before_kib: rss1,
            after_kib: rss2,
            connect_secs: took.as_secs_f64(),
        },
        visitor: MemResult {
            conns,
            before_kib: rss0,
            after_kib: rss2,
            connect_secs: took.as_secs_f64(),
        },
        session_secs,
        latency,
        rss_end_kib,
        socket_log,
    })
}

// ---------------------------------------------------------------------------------------
// Delivery latency

struct Sent {
    visitor: usize,
    message_id: String,
    t_send: Instant,
    t_answer: Instant,
}

#[derive(Default)]
struct Latency {
    skipped: usize,
    api_errors: usize,
    first_api_error: Option<String>,
    sent: usize,
    delivered: usize,
    missing: usize,
    wrong_socket: usize,
    duplicates: usize,
    unknown: usize,
    before_answer: usize,
    measured_secs: f64,
    /// 200 -> frame, clipped at 0 (µs).
    answer_to_frame: Vec<u64>,
    /// Request sent -> frame (µs).
    send_to_frame: Vec<u64>,
    /// Request sent -> 200 read (µs).
    api: Vec<u64>,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

impl Latency {
    fn print(&self, cli: &Cli) {
        println!();
        println!(
            "delivery latency: {} agent messages/s for {} s to random connected visitors \
             (POST /v3/conversations/messages -> messageCreated on the visitor's socket)",
            cli.rate, cli.secs
        );
        println!(
            "sent {} of {} scheduled in {:.1} s ({:.0}/s), API errors {}, \
             skipped (>{} in flight) {}",
            self.sent,
            u64::from(cli.rate) * cli.secs,
            self.measured_secs,
            self.sent as f64 / self.measured_secs.max(1e-9),
            self.api_errors,
            MAX_IN_FLIGHT,
            self.skipped
        );
        if let Some(e) = &self.first_api_error {
            println!("first API error: {e}");
        }
        println!(
            "delivered {}   missing {} (no frame within {} s after the last answer)   \
             on another socket {}   duplicates {}   unknown ids {}",
            self.delivered,
            self.missing,
            GRACE.as_secs(),
            self.wrong_socket,
            self.duplicates,
            self.unknown
        );
        println!("{:<40} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
        for (name, v) in [
            ("200 read -> frame (clipped at 0)", &self.answer_to_frame),
            ("request sent -> frame", &self.send_to_frame),
            ("request sent -> 200 read (API)", &self.api),
        ] {
            println!(
                "{:<40} {:>9.2} {:>9.2} {:>9.2}",
                name,
                pct(v, 0.50),
                pct(v, 0.99),
                pct(v, 1.0)
            );
        }
        println!(
            "frames that arrived before the 200 was read (counted as 0): {} of {}",
            self.before_answer, self.delivered
        );
    }
}

/// xorshift64*: enough to pick visitors at random without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Moves the frames seen so far into `seen` (message id -> visitor, arrival).
fn drain(
    rx: &mut mpsc::UnboundedReceiver<Arrival>,
    seen: &mut HashMap<String, (usize, Instant)>,
    lat: &mut Latency,
) {
    while let Ok(a) = rx.try_recv() {
        if seen.insert(a.message_id, (a.visitor, a.at)).is_some() {
            lat.duplicates += 1;
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn measure_latency(
    cli: &Cli,
    http: &Http,
    addr: &str,
    agent_id: &str,
    sessions: &[Option<Session>],
    alive: &Arc<Vec<AtomicBool>>,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
) -> Latency {
    let mut lat = Latency::default();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng(seed | 1);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tasks: JoinSet<anyhow::Result<Sent>> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / cli.rate.max(1));
    // Open loop: a tick the client was late for is sent at once, so the rate holds.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let end = start + Duration::from_secs(cli.secs);
    let mut seen: HashMap<String, (usize, Instant)> = HashMap::new();
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        drain(arrivals, &mut seen, &mut lat);
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            lat.skipped += 1;
            continue;
        }
        // A random visitor whose socket is open (a few tries, then skip the tick).
        let Some(visitor) = (0..16).find_map(|_| {
            let i = (rng.next() % sessions.len() as u64) as usize;
            (sessions[i].is_some() && alive[i].load(Ordering::Relaxed)).then_some(i)
        }) else {
            lat.skipped += 1;
            continue;
        };
        let visitor_id = sessions[visitor]
            .as_ref()
            .map(|s| s.visitor_id.clone())
            .unwrap_or_default();
        n += 1;
        let body = json!({"visitorId": visitor_id, "text": format!("bench message {n}"), "agentId": agent_id});
        let (http, addr, in_flight) = (http.clone(), addr.to_owned(), in_flight.clone());
        in_flight.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            let t_send = Instant::now();
            let res = post_json(
                &http,
                &addr,
                "/v3/conversations/messages",
                Some(API_KEY),
                &body,
            )
            .await;
            let t_answer = Instant::now();
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let v = res?;
            let message_id = v["id"]
                .as_str()
                .with_context(|| format!("message answer without id: {v}"))?
                .to_owned();
            Ok(Sent {
                visitor,
                message_id,
                t_send,
                t_answer,
            })
        });
    }
    lat.measured_secs = start.elapsed().as_secs_f64();

    // Every answer (each is bounded by STEP_TIMEOUT), then the frames still on their way.
    let mut sent = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(s)) => sent.push(s),
            Ok(Err(e)) => {
                lat.api_errors += 1;
                lat.first_api_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                lat.api_errors += 1;
                lat.first_api_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let grace_end = Instant::now() + GRACE;
    loop {
        drain(arrivals, &mut seen, &mut lat);
        if Instant::now() >= grace_end || sent.iter().all(|s| seen.contains_key(&s.message_id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drain(arrivals, &mut seen, &mut lat);

    lat.sent = sent.len();
    for s in &sent {
        lat.api.push(micros(s.t_answer - s.t_send));
        match seen.remove(&s.message_id) {
            None => lat.missing += 1,
            Some((v, _)) if v != s.visitor => lat.wrong_socket += 1,
            Some((_, at)) => {
                lat.delivered += 1;
                if at < s.t_answer {
                    lat.before_answer += 1;
                }
                lat.answer_to_frame
                    .push(micros(at.saturating_duration_since(s.t_answer)));
                lat.send_to_frame
                    .push(micros(at.saturating_duration_since(s.t_send)));
            }
        }
    }
    lat.unknown = seen.len();
    lat.answer_to_frame.sort_unstable();
    lat.send_to_frame.sort_unstable();
    lat.api.sort_unstable();
    lat
}

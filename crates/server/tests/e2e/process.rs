//! The `switchboard` binary as a user runs it: CLI verbs, start-up, SIGTERM and SIGKILL,
//! on the backend the environment selects (see [`crate::db`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::db::{Conn, TestDb};
use crate::tls::{self_signed, trusting, write_pair};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

pub(crate) fn cli(db: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(BIN)
        .arg("--db")
        .arg(db)
        .arg("--json")
        .args(args)
        .env_remove("SWITCHBOARD_API_KEY")
        .output()
        .expect("run switchboard");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Starts `switchboard serve` on port 0; returns the child, its URL and the stdout lines
/// printed before the listening line.
pub(crate) async fn serve(db: &Path, api_key: Option<&str>) -> (Child, String, Vec<String>) {
    serve_with(db, api_key, &[]).await
}

/// [`serve`] with extra flags for `switchboard serve`.
async fn serve_with(
    db: &Path,
    api_key: Option<&str>,
    flags: &[&str],
) -> (Child, String, Vec<String>) {
    let mut cmd = serve_command(db, api_key, flags);
    cmd.stderr(Stdio::inherit());
    start(cmd).await
}

/// The command line of [`serve_with`], logging at `warn`.
pub(crate) fn serve_command(db: &Path, api_key: Option<&str>, flags: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(db)
        .args(flags);
    cmd.env("RUST_LOG", "warn")
        .env_remove("SWITCHBOARD_API_KEY");
    if let Some(k) = api_key {
        cmd.env("SWITCHBOARD_API_KEY", k);
    }
    cmd
}

/// The lines `child` writes to its piped stderr, read to the end whether a test looks or
/// not, so that the child never blocks on a full pipe.
pub(crate) fn log_lines(child: &mut Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Spawns `cmd` and waits for its listening line: the child, its URL and the stdout lines
/// printed before that line.
pub(crate) async fn start(mut cmd: Command) -> (Child, String, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut before = Vec::new();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix("listening on ") {
                return url.to_owned();
            }
            before.push(line);
        }
        panic!("server exited before listening");
    })
    .await
    .expect("server did not start within 60 s");
    (child, url, before)
}

#[tokio::test]
async fn first_start_prints_one_key_that_works() {
    let storage = TestDb::new().await;
    let db = storage.path.clone();
    let (mut child, url, lines) = serve(&db, None).await;
    let key = lines
        .iter()
        .find_map(|l| l.split("keep it): ").nth(1))
        .unwrap_or_else(|| panic!("no key printed: {lines:?}"))
        .to_owned();
    assert!(key.starts_with("xkeysib-"));
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let health = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let r = http
        .get(format!("{url}/v3/conversations/messages/x"))
        .header("api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    child.kill().await.unwrap();
    // Second start: the key is not printed again.
    let (mut child, _, lines) = serve(&db, None).await;
    assert!(lines.iter().all(|l| !l.contains("xkeysib-")), "{lines:?}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn cli_manages_accounts_keys_agents_and_groups() {
    let storage = TestDb::new().await;
    let db = storage.path.clone();
    let group = cli(&db, &["groups", "add", "Sales"]);
    let gid = group["id"].as_str().unwrap().to_owned();
    let agent = cli(
        &db,
        &[
            "agents",
            "add",
            "--name",
            "Julia",
            "--email",
            "julia@x.com",
            "--userpic",
            "https://p/j.png",
            "--group",
            &gid,
        ],
    );
    assert_eq!(agent["groups"], json!([gid]));
    assert_eq!(agent["userpic"], "https://p/j.png");
    let agents = cli(&db, &["agents", "list"]);
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(cli(&db, &["groups", "list"])[0]["name"], "Sales");
    let key = cli(&db, &["keys", "create", "--name", "ci"]);
    let secret = key["apiKey"].as_str().unwrap().to_owned();
    let keys = cli(&db, &["keys", "list"]);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("apiKey").is_none()),
        "keys list never shows keys"
    );
    let account = cli(&db, &["accounts", "create", "Acme"]);
    assert!(account["apiKey"].as_str().unwrap().starts_with("xkeysib-"));
    assert_eq!(cli(&db, &["accounts", "list"]).as_array().unwrap().len(), 2);

    // The server accepts the CLI's key and sees the CLI's agent; the other account does not.
    let (mut child, url, _) = serve(&db, None).await;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let send = |key: String| {
        http.post(format!("{url}/v3/conversations/pushedMessages"))
            .header("api-key", key)
            .json(&json!({"visitorId": "v", "text": "t", "groupId": gid}))
            .send()
    };
    let r = send(secret.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["agentId"], agent["id"]);
    assert_eq!(
        send(account["apiKey"].as_str().unwrap().to_owned())
            .await
            .unwrap()
            .status(),
        400
    );

    // Errors exit non-zero with a message.
    let out = std::process::Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["groups", "add", "Sales"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    cli(&db, &["keys", "revoke", key["id"].as_str().unwrap()]);
    cli(&db, &["agents", "remove", agent["id"].as_str().unwrap()]);
    cli(&db, &["groups", "remove", &gid]);
    assert_eq!(cli(&db, &["agents", "list"]), json!([]));
    child.kill().await.unwrap();
}

/// Sends SIGTERM to the server; it must exit with success within 30 s.
pub(crate) async fn sigterm_and_wait(child: &mut Child) {
    signal(child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// SIGTERM ends the server with success, on the selected backend; an SQLite file is left
/// checkpointed, which is checked on SQLite whatever the backend.
#[tokio::test]
async fn sigterm_stops_cleanly() {
    let selected = TestDb::new().await;
    let sqlite = selected.is_postgres().then(TestDb::sqlite);
    for storage in std::iter::once(&selected).chain(sqlite.as_ref()) {
        sigterm_stops_cleanly_on(storage).await;
    }
}

async fn sigterm_stops_cleanly_on(storage: &TestDb) {
    let db = &storage.path;
    let (mut child, url, _) = serve(db, Some("k")).await;
    let r = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client")
        .post(format!("{url}/v3/conversations/messages"))
        .header("api-key", "k")
        .json(&json!({"visitorId": "v", "text": "t", "agentEmail": "a@x.com", "agentName": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sigterm_and_wait(&mut child).await;
    // A clean close checkpoints the WAL away.
    if let Some(dir) = storage.dir() {
        let wal = dir.join("s.db-wal");
        assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
    }
}

/// At `RUST_LOG=info` (the default) every answered request is logged with its method,
/// path and status; at `warn` none is.
#[tokio::test]
async fn requests_are_logged_at_info_and_not_at_warn() {
    let storage = TestDb::new().await;
    let info = logged_lines(&storage.path, "info").await;
    let answered: Vec<&String> = info
        .iter()
        .filter(|l| l.contains("tower_http::trace::on_response"))
        .collect();
    for (method, path, status) in [
        ("GET", "/health", 200),
        ("POST", "/v3/conversations/messages", 200),
        ("POST", "/v3/conversations/messages", 401),
    ] {
        let line: Value = answered
            .iter()
            .map(|l| serde_json::from_str(l).expect("a JSON log line"))
            .find(|l: &Value| {
                l["span"]["method"] == method
                    && l["span"]["path"] == path
                    && l["fields"]["status"] == status
            })
            .unwrap_or_else(|| panic!("no log line for {method} {path} {status} in {info:#?}"));
        assert_eq!(line["level"], "INFO", "{line}");
    }
    let warn = logged_lines(&storage.path, "warn").await;
    assert!(warn.iter().all(|l| !l.contains("on_response")), "{warn:#?}");
}

/// Runs `switchboard serve` with `RUST_LOG=level` and JSON logs, sends `GET /health`, a
/// POST with the right key and one with a wrong key, stops it; what it logged, line by line.
async fn logged_lines(db: &Path, level: &str) -> Vec<String> {
    let mut cmd = serve_command(db, Some("k"), &[]);
    cmd.env("RUST_LOG", level)
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .stderr(Stdio::piped());
    let (mut child, url, _) = start(cmd).await;
    // Read as it comes, so that a full pipe never holds the server up.
    let mut stderr = child.stderr.take().expect("stderr");
    let logged = tokio::spawn(async move {
        let mut logged = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut logged)
            .await
            .map(|_| logged)
    });
    let http = reqwest::Client::new();
    let health = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    for (key, status) in [("k", 200), ("wrong", 401)] {
        let r = http
            .post(format!("{url}/v3/conversations/messages"))
            .header("api-key", key)
            .json(
                &json!({"visitorId": "v", "text": "t", "agentEmail": "a@x.com", "agentName": "A"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }
    sigterm_and_wait(&mut child).await;
    let logged = logged.await.unwrap().expect("read stderr");
    logged.lines().map(str::to_owned).collect()
}

/// Every message that got a 200 is there after SIGKILL and a restart.
#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    acknowledged_writes_survive(Stop::Kill).await;
}

/// SIGTERM under load: requests in flight get their answer (never a 5xx), the server
/// exits with success, and every message that got a 200 is there after a restart.
#[tokio::test]
async fn acknowledged_writes_survive_sigterm_under_load() {
    acknowledged_writes_survive(Stop::Term).await;
}

/// How [`acknowledged_writes_survive`] stops the server.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Kill,
    Term,
}

/// Sixteen writers POST until the server is stopped after 400 acknowledged writes; then
/// every acknowledged message must survive a restart.
async fn acknowledged_writes_survive(stop: Stop) {
    let storage = TestDb::new().await;
    let db = storage.path.clone();
    let (mut child, url, _) = serve(&db, Some("k")).await;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut writers = Vec::new();
    for w in 0..16 {
        let (http, url, tx) = (http.clone(), url.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..5_000 {
                let text = format!("writer {w} message {i}");
                let res = http
                    .post(format!("{url}/v3/conversations/messages"))
                    .header("api-key", "k")
                    .json(&json!({"visitorId": format!("visitor-{w}"), "text": text, "agentEmail": "a@x.com", "agentName": "A"}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                        Ok(m) => {
                            let _ = tx.send((m["id"].as_str().unwrap_or_default().to_owned(), text));
                        }
                        Err(_) => return,
                    },
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return,
                }
            }
        }));
    }
    drop(tx);
    let mut acked = Vec::new();
    while acked.len() < 400 {
        match rx.recv().await {
            Some(a) => acked.push(a),
            None => break,
        }
    }
    match stop {
        Stop::Kill => child.kill().await.expect("SIGKILL"),
        Stop::Term => sigterm_and_wait(&mut child).await,
    }
    while let Some(a) = rx.recv().await {
        acked.push(a);
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        acked.len() >= 400,
        "only {} writes were acknowledged",
        acked.len()
    );

    let (mut child, url, _) = serve(&db, Some("k")).await;
    let missing = missing_messages(&http, &url, &acked).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost: {missing:?}",
        missing.len(),
        acked.len()
    );
    child.kill().await.unwrap();
}

/// The ids of `messages` (id, text) that the server at `url` (key `k`) does not have; the
/// ones it has must carry their text.
pub(crate) async fn missing_messages(
    http: &reqwest::Client,
    url: &str,
    messages: &[(String, String)],
) -> Vec<String> {
    let mut missing = Vec::new();
    for (id, text) in messages {
        let r = http
            .get(format!("{url}/v3/conversations/messages/{id}"))
            .header("api-key", "k")
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            missing.push(id.clone());
            continue;
        }
        assert_eq!(r.json::<Value>().await.unwrap()["text"], text.as_str());
    }
    missing
}

/// One request that reached the test's webhook receiver.
#[derive(Debug, Clone)]
struct Hit {
    /// The `webhook-id` header (empty when missing).
    id: String,
    body: axum::body::Bytes,
    arrived: std::time::Instant,
    /// When the receiver returned its 200 (`None`: the request was dropped before that).
    answered: Option<std::time::Instant>,
}

/// A webhook receiver that records every request in arrival order and answers 200 after
/// 50 to 100 ms, so that deliveries are in flight most of the time.
#[derive(Default)]
struct SlowReceiver {
    hits: std::sync::Mutex<Vec<Hit>>,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl SlowReceiver {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    async fn hook(
        axum::extract::State(r): axum::extract::State<std::sync::Arc<SlowReceiver>>,
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::http::StatusCode {
        use std::sync::atomic::Ordering;
        /// Counts the request out even when hyper drops it (the sender died).
        struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        r.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&r.in_flight);
        let index = {
            let mut hits = r.hits.lock().expect("hits");
            hits.push(Hit {
                id,
                body,
                arrived: std::time::Instant::now(),
                answered: None,
            });
            hits.len() - 1
        };
        let slow = 50 + (index as u64 * 37) % 51;
        tokio::time::sleep(Duration::from_millis(slow)).await;
        r.hits.lock().expect("hits")[index].answered = Some(std::time::Instant::now());
        axum::http::StatusCode::OK
    }
}

/// Events in the outbox, read straight from the database: (id, seq, conversation).
async fn webhook_events(db: &Path) -> Vec<(String, i64, String)> {
    let mut conn = Conn::open(db).await;
    let rows = conn
        .rows("SELECT id, seq, conversation_id FROM webhook_events ORDER BY seq")
        .await;
    conn.close().await;
    rows
}

/// Deliveries by status, read straight from the database.
async fn delivery_statuses(db: &Path) -> Vec<(String, String)> {
    let mut conn = Conn::open(db).await;
    let rows = conn
        .rows("SELECT event_id, status FROM webhook_deliveries")
        .await;
    conn.close().await;
    rows
}

/// Webhook deliveries survive SIGKILL: every event in the outbox is answered 200 by the
/// receiver (to a server that was alive to hear it), duplicates are the same bytes under
/// the same `webhook-id`, and each conversation's events first arrive in outbox order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_deliveries_survive_sigkill() {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    const VISITORS: usize = 12;
    const MESSAGES_PER_VISITOR: usize = 60;
    const FLAGS: &[&str] = &[
        "--fragment-delay",
        "0",
        "--webhook-retry-first",
        "0.05",
        "--session-rate",
        "0",
        "--visitor-rate",
        "0",
    ];

    let storage = TestDb::new().await;
    let db = storage.path.clone();

    let receiver = Arc::new(SlowReceiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(SlowReceiver::hook))
        .with_state(receiver.clone());
    let receiver_task = tokio::spawn(async move { axum::serve(listener, app).await });

    let webhook = cli(&db, &["webhooks", "add", "--url", &hook_url]);
    assert!(webhook["id"].is_string(), "{webhook}");
    let widget = cli(&db, &["accounts", "widget"])["widgetId"]
        .as_str()
        .expect("widgetId")
        .to_owned();

    let (mut child, url, _) = serve_with(&db, Some("k"), FLAGS).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client");

    // Visitors: (token, conversation id).
    let mut visitors = Vec::new();
    for _ in 0..VISITORS {
        let r = http
            .post(format!("{url}/widget/v1/{widget}/session"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let s: Value = r.json().await.unwrap();
        visitors.push((
            s["token"].as_str().expect("token").to_owned(),
            s["conversationId"]
                .as_str()
                .expect("conversationId")
                .to_owned(),
        ));
    }
    let send = {
        let (http, widget) = (http.clone(), widget.clone());
        move |url: String, token: String, text: String| {
            let (http, widget) = (http.clone(), widget.clone());
            async move {
                let r = http
                    .post(format!("{url}/widget/v1/{widget}/messages"))
                    .bearer_auth(token)
                    .json(&json!({ "text": text }))
                    .send()
                    .await
                    .ok()?;
                assert!(r.status() == 200, "visitor message answered {}", r.status());
                let m: Value = r.json().await.ok()?;
                Some(m["id"].as_str().expect("message id").to_owned())
            }
        }
    };

    // Each visitor writes messages a little apart, so that most become their own fragment;
    // writers stop at the first error (the server is gone).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut writers = Vec::new();
    for (v, (token, conversation)) in visitors.iter().cloned().enumerate() {
        let (tx, url, send) = (tx.clone(), url.clone(), send.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..MESSAGES_PER_VISITOR {
                let Some(id) = send(url.clone(), token.clone(), format!("visitor {v} #{i}")).await
                else {
                    return;
                };
                let _ = tx.send((conversation.clone(), id));
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    drop(tx);

    // SIGKILL while several deliveries are in flight at the receiver.
    tokio::time::timeout(Duration::from_secs(60), async {
        while receiver.hits.lock().expect("hits").len() < 40
            || receiver.in_flight.load(Ordering::SeqCst) < 3
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("40 webhook requests, 3 of them in flight at once, within 60 s");
    child.kill().await.expect("SIGKILL");
    let killed_at = Instant::now();
    let mut acked: Vec<(String, String)> = Vec::new();
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("writers stop")
            .unwrap();
    }
    while let Some(a) = rx.recv().await {
        acked.push(a);
    }
    let before_kill = receiver.hits();
    let cut: Vec<&Hit> = before_kill
        .iter()
        .filter(|h| h.answered.is_none_or(|a| a >= killed_at))
        .collect();
    assert!(
        !cut.is_empty(),
        "no delivery was in flight at the receiver when the server was killed"
    );

    // Restart on the same database; each visitor writes a little more after the restart.
    let (mut child, url, _) = serve_with(&db, Some("k"), FLAGS).await;
    for (v, (token, conversation)) in visitors.iter().enumerate() {
        for i in 0..3 {
            let id = send(
                url.clone(),
                token.clone(),
                format!("visitor {v} after #{i}"),
            )
            .await
            .expect("a visitor message after the restart");
            acked.push((conversation.clone(), id));
        }
    }

    // A request counts as answered only if the server that sent it was alive to hear the 200:
    // one that arrived before the kill and was answered after it was cut off.
    let answered = |h: &Hit| match h.answered {
        Some(a) => h.arrived >= killed_at || a < killed_at,
        None => false,
    };
    // Fragment event id -> message ids it carries (from every request received).
    let fragments = |hits: &[Hit]| {
        let mut carried: HashMap<String, HashSet<String>> = HashMap::new();
        for h in hits {
            let Ok(p) = serde_json::from_slice::<Value>(&h.body) else {
                continue;
            };
            if p["eventName"] != "conversationFragment" {
                continue;
            }
            let ids = p["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["id"].as_str().map(str::to_owned));
            carried.entry(h.id.clone()).or_default().extend(ids);
        }
        carried
    };

    // Wait (bounded) until the receiver has answered every event of the outbox, every
    // acknowledged message went out in a fragment and no delivery is pending.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hits = receiver.hits();
        let done_ids: HashSet<&str> = hits
            .iter()
            .filter(|h| answered(h))
            .map(|h| h.id.as_str())
            .collect();
        let events = webhook_events(&db).await;
        let all_answered = events
            .iter()
            .all(|(id, _, _)| done_ids.contains(id.as_str()));
        let in_fragments: HashSet<String> = fragments(&hits).into_values().flatten().collect();
        let all_sent = acked.iter().all(|(_, m)| in_fragments.contains(m));
        let settled = delivery_statuses(&db)
            .await
            .iter()
            .all(|(_, s)| s == "delivered");
        if (all_answered && all_sent && settled) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.unwrap();
    receiver_task.abort();

    let hits = receiver.hits();
    let events = webhook_events(&db).await;
    let statuses = delivery_statuses(&db).await;
    let seq_of: HashMap<&str, (i64, &str)> = events
        .iter()
        .map(|(id, seq, c)| (id.as_str(), (*seq, c.as_str())))
        .collect();
    eprintln!(
        "webhook crash test: {} messages acknowledged, {} events, {} requests received \
         ({} before the kill, {} cut by it), {} deliveries",
        acked.len(),
        events.len(),
        hits.len(),
        before_kill.len(),
        cut.len(),
        statuses.len()
    );

    // Every request is a known event under its webhook-id.
    for h in &hits {
        assert!(
            seq_of.contains_key(h.id.as_str()),
            "a request with webhook-id {:?} that is not an event of the outbox",
            h.id
        );
    }
    // Nothing lost: each event was answered 200 to a live server, and is marked delivered.
    let lost: Vec<String> = events
        .iter()
        .filter(|(id, _, _)| !hits.iter().any(|h| h.id == *id && answered(h)))
        .map(|(id, seq, _)| {
            let status = statuses
                .iter()
                .find(|(e, _)| e == id)
                .map_or("no delivery row", |(_, s)| s.as_str());
            let arrivals = hits.iter().filter(|h| h.id == *id).count();
            format!("{id} (seq {seq}, {arrivals} requests, all cut by the kill or none; status {status})")
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} events never answered by the receiver: {lost:?}",
        lost.len(),
        events.len()
    );
    let unsettled: Vec<&(String, String)> =
        statuses.iter().filter(|(_, s)| s != "delivered").collect();
    assert!(
        unsettled.is_empty(),
        "deliveries not delivered: {unsettled:?}"
    );
    assert_eq!(statuses.len(), events.len(), "one delivery per event");

    // Duplicates are the same bytes, and each body is its event's conversation.
    let mut first_body: HashMap<&str, &axum::body::Bytes> = HashMap::new();
    for h in &hits {
        let first = *first_body.entry(h.id.as_str()).or_insert(&h.body);
        assert!(
            *first == h.body,
            "{} was sent twice with different bodies:\n{}\n{}",
            h.id,
            String::from_utf8_lossy(first),
            String::from_utf8_lossy(&h.body)
        );
        let p: Value = serde_json::from_slice(&h.body).expect("a JSON body");
        assert_eq!(
            p["conversationId"].as_str(),
            Some(seq_of[h.id.as_str()].1),
            "{}: conversationId of the body",
            h.id
        );
    }
    let duplicates = hits.len() - first_body.len();
    eprintln!("webhook crash test: {duplicates} duplicate requests");

    // Order: within a conversation, first arrivals follow the outbox's seq.
    let mut seen: HashSet<&str> = HashSet::new();
    let mut last_seq: HashMap<&str, (i64, &str)> = HashMap::new();
    for h in &hits {
        if !seen.insert(h.id.as_str()) {
            continue;
        }
        let (seq, conversation) = seq_of[h.id.as_str()];
        if let Some((prev, prev_id)) = last_seq.insert(conversation, (seq, h.id.as_str())) {
            assert!(
                prev < seq,
                "conversation {conversation}: {} (seq {seq}) first arrived after {prev_id} \
                 (seq {prev})",
                h.id
            );
        }
    }

    // Every acknowledged message went out in exactly one fragment of its conversation.
    let carried = fragments(&hits);
    for (conversation, message) in &acked {
        let holders: Vec<&String> = carried
            .iter()
            .filter(|(_, ids)| ids.contains(message))
            .map(|(event, _)| event)
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "message {message} of conversation {conversation} is in fragments {holders:?}"
        );
        assert_eq!(seq_of[holders[0].as_str()].1, conversation.as_str());
    }
    // And each conversation's chat start was announced.
    for (_, conversation) in &visitors {
        assert!(
            hits.iter().any(|h| {
                serde_json::from_slice::<Value>(&h.body).is_ok_and(|p| {
                    p["eventName"] == "conversationStarted" && p["conversationId"] == **conversation
                })
            }),
            "no conversationStarted for {conversation}"
        );
    }
}

/// `switchboard` run for its human output (no `--json`).
fn cli_text(db: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("SWITCHBOARD_API_KEY")
        .output()
        .expect("run switchboard");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An endpoint that keeps failing is shown as failing by the CLI, with the reason, and its
/// log shows each attempt; replay and removal work from the CLI too.
#[tokio::test]
async fn the_cli_shows_a_failing_webhook_and_its_log() {
    let storage = TestDb::new().await;
    let db = storage.path.clone();
    // A port with nobody listening: every attempt is refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cli(&db, &["accounts", "list"]);
    let hook = cli(
        &db,
        &[
            "webhooks",
            "add",
            "--url",
            &format!("http://127.0.0.1:{dead}/hook"),
            "--event",
            "conversationStarted",
            "--description",
            "crm",
        ],
    );
    let id = hook["id"].as_str().unwrap().to_owned();
    assert!(hook["secret"].as_str().unwrap().starts_with("whsec_"));
    let widget = cli(&db, &["accounts", "widget"])["widgetId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut child, url, _) = serve_with(
        &db,
        Some("k"),
        &["--webhook-retry-first", "0.02", "--session-rate", "0"],
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let session: Value = http
        .post(format!("{url}/widget/v1/{widget}/session"))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let r = http
        .post(format!("{url}/widget/v1/{widget}/messages"))
        .bearer_auth(token)
        .json(&json!({"text": "hello?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let list = cli(&db, &["webhooks", "list"]);
        if list[0]["status"] == "failing" {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never failing: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(listed[0]["consecutiveFailures"].as_i64().unwrap() >= 5);
    let human = cli_text(&db, &["webhooks", "list"]);
    assert!(human.contains("FAILING since"), "{human}");
    assert!(human.contains("could not connect"), "{human}");
    let log = cli(&db, &["webhooks", "log", &id]);
    let event = log[0]["eventId"].as_str().unwrap().to_owned();
    assert_eq!(log[0]["status"], "pending");
    let attempts = cli(&db, &["webhooks", "log", &id, "--event", &event]);
    assert!(attempts[0]["attemptLog"].as_array().unwrap().len() >= 5);
    let human = cli_text(&db, &["webhooks", "log", &id, "--event", &event]);
    assert!(human.contains("#1 "), "{human}");
    assert!(human.contains("next attempt"), "{human}");
    assert_eq!(
        cli(&db, &["webhooks", "replay", &id, &event])["replayed"],
        true
    );
    assert_eq!(cli(&db, &["webhooks", "remove", &id])["removed"], true);
    assert_eq!(cli(&db, &["webhooks", "list"]), json!([]));
    let _ = child.kill().await;
}

/// Runs `switchboard ARGS` in `dir`, which must fail within 120 s; returns its stderr.
pub(crate) async fn fails(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("SWITCHBOARD_API_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .unwrap_or_else(|_| panic!("{args:?} still running after 120 s"))
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    err
}

/// `--db` takes a path or `sqlite://PATH` (an SQLite file, whatever backend the suite runs
/// on); a PostgreSQL server that cannot be reached, or another URL scheme, makes `serve` and
/// the CLI exit non-zero with a clear message (password hidden), and no file is made.
#[tokio::test]
async fn db_urls_are_understood_or_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("by-url.db");
    let url = format!("sqlite://{}", file.display());
    let account = cli(Path::new(&url), &["accounts", "create", "acme"]);
    assert!(file.exists(), "sqlite:// names the file");
    let listed = cli(&file, &["accounts", "list"]);
    assert_eq!(listed[0]["id"], account["id"], "the same database by path");

    // Port 1: nothing listens there, so connecting is refused at once.
    for (db, expect) in [
        (
            "postgres://nobody:secret@127.0.0.1:1/x",
            [
                "cannot connect to PostgreSQL",
                "postgres://nobody:***@127.0.0.1:1/x",
            ],
        ),
        (
            "mysql://app:secret@localhost/chat",
            [
                "unsupported database URL scheme",
                "mysql://app:***@localhost/chat",
            ],
        ),
    ] {
        let serve = ["serve", "--listen", "127.0.0.1:0", "--db", db];
        let list = ["--db", db, "accounts", "list"];
        for args in [&serve[..], &list[..]] {
            let err = fails(dir.path(), args).await;
            for e in expect {
                assert!(err.contains(e), "{args:?}: {e:?} not in: {err}");
            }
            assert!(!err.contains("secret"), "{args:?}: password shown: {err}");
        }
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("by-url.db")),
        "no stray files: {names:?}"
    );
}

/// A `--cors-origins` value that is not a list of origins stops `serve` before it opens
/// anything, saying what is wrong and how to write it; a good one is taken, also from the
/// environment.
#[tokio::test]
async fn cors_origins_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cors.db");
    let db = db.to_str().unwrap();
    let err = fails(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db,
            "--cors-origins",
            "https://shop.example/",
        ],
    )
    .await;
    assert!(err.contains("--cors-origins"), "{err}");
    assert!(err.contains("no path"), "{err}");
    assert!(err.contains("https://shop.example or"), "{err}");
    assert!(!dir.path().join("cors.db").exists(), "nothing opened");

    let mut cmd = serve_command(Path::new(db), Some("k"), &[]);
    cmd.env("SWITCHBOARD_CORS_ORIGINS", "https://shop.example");
    let (mut child, url, _) = start(cmd).await;
    let http = reqwest::Client::new();
    let answer = |origin: &'static str| {
        http.get(format!("{url}/health"))
            .header("origin", origin)
            .send()
    };
    let shop = answer("https://shop.example").await.unwrap();
    assert_eq!(
        shop.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let other = answer("https://other.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    child.kill().await.unwrap();
}

/// `serve --tls-cert --tls-key` serves HTTPS and says so; TLS files that cannot be used stop
/// it before it opens the database, naming the file and what is wrong with it.
#[tokio::test]
async fn serve_takes_tls_files_or_says_what_is_wrong_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tls.db");
    let made = |name: &str| {
        let pair = self_signed();
        let (c, k) = write_pair(dir.path(), name, &pair);
        let path = |p: PathBuf| p.to_str().unwrap().to_owned();
        (path(c), path(k), pair.0)
    };
    let (cert, key, pem) = made("a");
    let (_, other_key, _) = made("b");
    let missing = dir.path().join("missing.crt").to_str().unwrap().to_owned();
    let serve = |flags: &[&str]| {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for (flags, expect) in [
        (vec!["--tls-cert", &cert], "--tls-key"),
        (
            vec!["--tls-cert", &missing, "--tls-key", &key],
            "missing.crt",
        ),
        (
            vec!["--tls-cert", &key, "--tls-key", &key],
            "no certificate in",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &cert],
            "needs a PEM private key",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            "does not belong to the certificate",
        ),
    ] {
        let args = serve(&flags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = fails(dir.path(), &args).await;
        assert!(err.contains(expect), "{flags:?}: {expect:?} not in: {err}");
        assert!(!db.exists(), "{flags:?}: the database was opened");
    }

    let cmd = serve_command(&db, Some("k"), &["--tls-cert", &cert, "--tls-key", &key]);
    let (mut child, url, _) = start(cmd).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    child.kill().await.unwrap();
}

/// Webhooks reach an HTTPS receiver whose certificate the machine trusts though no public CA
/// issued it (a company CA; here through `SSL_CERT_FILE`, which the system's trust store
/// honours too); without that trust the attempt is logged with the reason.
#[tokio::test]
async fn webhooks_trust_the_machines_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = write_pair(dir.path(), "receiver", &self_signed());
    let (crt, key) = (crt.to_str().unwrap(), key.to_str().unwrap());
    // The receiver: another switchboard over HTTPS, which answers 404 on /hook. An HTTP
    // status in the log means the TLS connection was made.
    let cmd = serve_command(
        &dir.path().join("receiver.db"),
        Some("r"),
        &["--tls-cert", crt, "--tls-key", key],
    );
    let (mut receiver, hook, _) = start(cmd).await;
    let hook = format!("{hook}/hook");
    let http = reqwest::Client::new();
    for trusted in [true, false] {
        let db = dir.path().join(format!("sender-{trusted}.db"));
        let endpoint = cli(&db, &["webhooks", "add", "--url", &hook]);
        let id = endpoint["id"].as_str().unwrap().to_owned();
        let mut cmd = serve_command(&db, Some("s"), &[]);
        if trusted {
            cmd.env("SSL_CERT_FILE", crt);
        } else {
            cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        }
        let (mut sender, url, _) = start(cmd).await;
        let r = http
            .post(format!("{url}/v3/conversations/messages"))
            .header("api-key", "s")
            .json(&serde_json::json!({"visitorId": "v", "text": "hi", "agentEmail": "j@x.io", "agentName": "J"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut tries = 0;
        let attempt = loop {
            let log = cli(&db, &["webhooks", "log", &id]);
            if log[0]["attempts"].as_i64().unwrap_or(0) >= 1 {
                break log[0].clone();
            }
            tries += 1;
            assert!(tries < 400, "no delivery attempt within 20 s: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if trusted {
            assert_eq!(attempt["lastStatus"], 404, "{attempt}");
        } else {
            let why = attempt["lastError"].as_str().unwrap();
            assert!(why.contains("UnknownIssuer"), "{attempt}");
        }
        sender.kill().await.unwrap();
    }
    receiver.kill().await.unwrap();
}

/// A second `serve` on an SQLite file another server has is refused, naming that server's
/// process; the first goes on serving, the CLI still runs beside it, and once it has stopped
/// the file can be served again, also after a SIGKILL.
#[tokio::test]
async fn a_second_server_on_one_sqlite_file_is_refused() {
    let storage = TestDb::sqlite();
    let db = storage.path.clone();
    let (mut first, url, _) = serve(&db, Some("k")).await;
    let http = reqwest::Client::new();
    let send = |url: String, text: &'static str| {
        let http = http.clone();
        async move {
            let r = http
                .post(format!("{url}/v3/conversations/messages"))
                .header("api-key", "k")
                .json(&json!({"visitorId": "v", "text": text, "agentEmail": "a@x.com", "agentName": "A"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let id = send(url.clone(), "to the first").await;

    // Three ways of naming the same file.
    let url_form = format!("sqlite://{}", db.display());
    let link = storage.dir().unwrap().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    let pid = first.id().unwrap();
    for spelling in [
        db.display().to_string(),
        url_form,
        link.display().to_string(),
    ] {
        let args = ["serve", "--listen", "127.0.0.1:0", "--db", &spelling];
        let stderr = fails(storage.dir().unwrap(), &args).await;
        assert!(
            stderr.contains("served by another switchboard process")
                && stderr.contains(&format!("(pid {pid})")),
            "{stderr}"
        );
    }
    send(url.clone(), "the first still serves").await;
    assert_eq!(cli(&db, &["agents", "list"])[0]["name"], "A");

    sigterm_and_wait(&mut first).await;
    let (mut again, url, _) = serve(&db, Some("k")).await;
    let r = http
        .get(format!("{url}/v3/conversations/messages/{id}"))
        .header("api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    again.kill().await.unwrap();
    let (mut after_kill, url, _) = serve(&db, Some("k")).await;
    send(url, "after a SIGKILL").await;
    after_kill.kill().await.unwrap();
}

/// A database a newer switchboard has migrated (a downgrade) is refused by `serve` and the
/// CLI, saying so, on the selected backend.
#[tokio::test]
async fn a_database_from_a_newer_version_is_refused_clearly() {
    let storage = TestDb::new().await;
    let db = storage.path.clone();
    cli(&db, &["accounts", "list"]);
    let checksum = if storage.is_postgres() {
        "decode('00', 'hex')"
    } else {
        "X'00'"
    };
    let mut conn = Conn::open_writable(&db).await;
    conn.execute(&format!(
        "INSERT INTO _sqlx_migrations \
         (version, description, installed_on, success, checksum, execution_time) \
         VALUES (999999, 'from a newer switchboard', CURRENT_TIMESTAMP, TRUE, {checksum}, 0)"
    ))
    .await;
    conn.close().await;
    let db_arg = db.to_string_lossy().into_owned();
    let serve = ["serve", "--listen", "127.0.0.1:0", "--db", &db_arg];
    let list = ["--db", &db_arg, "accounts", "list"];
    let cwd = std::env::current_dir().unwrap();
    for args in [&serve[..], &list[..]] {
        let err = fails(&cwd, args).await;
        assert!(
            err.contains("migration 999999") && err.contains("a newer version"),
            "{args:?}: {err}"
        );
    }
}

/// A client that sent half a request does not hold a stop up: after `--shutdown-timeout`
/// the server leaves the connections still open behind and exits with success (the header
/// deadline, which would cut that client off too, is set far beyond the test's bound).
#[tokio::test]
async fn a_half_sent_request_does_not_hold_a_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let storage = TestDb::new().await;
    let flags = ["--shutdown-timeout", "1", "--header-timeout", "60"];
    let (mut child, url, _) = serve_with(&storage.path, Some("k"), &flags).await;
    let addr = url.strip_prefix("http://").unwrap();
    // The first request of a connection, whose headers never end.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST /v3/conversations/messages HTTP/1.1\r\nhost: x\r\napi-key: k\r\n")
        .await
        .unwrap();
    // A whole request on a second connection: the server takes connections in the order
    // they came, so once this one is answered the first is being served too.
    let mut whole = tokio::net::TcpStream::connect(addr).await.unwrap();
    whole
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    whole.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let started = std::time::Instant::now();
    sigterm_and_wait(&mut child).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stop took {:?}",
        started.elapsed()
    );
    drop((stalled, whole));
}

/// A client that opens a connection and sends half a request head is cut off after
/// `--header-timeout`, instead of holding the connection for good (slowloris); the server
/// goes on answering others.
#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let storage = TestDb::new().await;
    let (mut child, url, _) =
        serve_with(&storage.path, Some("k"), &["--header-timeout", "1"]).await;
    let addr = url.strip_prefix("http://").unwrap();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is still open after 20 s");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
    let health = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    sigterm_and_wait(&mut child).await;
}

/// `serve` raises its soft open-files limit to the hard one, so that a soft limit far below
/// (systemd's default is 1,024) does not cap the connections it can hold.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_open_files_limit_is_raised_to_the_hard_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CONNECTIONS: usize = 200;
    let storage = TestDb::new().await;
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=64:4096")
        .arg(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&storage.path)
        .env("RUST_LOG", "warn")
        .env("SWITCHBOARD_API_KEY", "k")
        .stderr(Stdio::inherit());
    let (mut child, url, _) = start(cmd).await;
    let pid = child.id().expect("pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("the open-files line")
        .split_whitespace()
        .collect();
    assert_eq!(open_files[3..5], ["4096", "4096"], "{limits}");
    // More connections than the soft limit the server was started with, all open at once,
    // and every one answered.
    let addr = url.strip_prefix("http://").unwrap();
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("send");
        held.push(c);
    }
    for c in &mut held {
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut head))
            .await
            .expect("answered within 5 s while all connections are open")
            .expect("read");
        assert_eq!(&head, b"HTTP/1.1 200");
    }
    drop(held);
    sigterm_and_wait(&mut child).await;
}

/// Sends `signal` (e.g. `-HUP`) to `child`.
fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits (at most 10 s) for a log line containing `text`.
async fn log_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>, text: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.recv().await {
            if line.contains(text) {
                return;
            }
        }
        panic!("the server exited before logging {text:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {text:?} within 10 s"));
}

/// SIGHUP (`systemctl reload`, a renewal tool's deploy hook) reads the TLS files again at
/// once, even files replaced with their old modification times, which the periodic check
/// cannot see; and it stops nothing, with TLS or without.
#[tokio::test]
async fn sighup_reloads_the_certificate_and_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let old = self_signed();
    let (cert, key) = write_pair(dir.path(), "server", &old);
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut cmd = serve_command(
        &dir.path().join("tls.db"),
        Some("k"),
        &["--tls-cert", cert_arg, "--tls-key", key_arg],
    );
    cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    let (mut child, url, _) = start(cmd).await;
    let mut lines = log_lines(&mut child);
    let health = format!("{url}/health");
    assert_eq!(
        trusting(&old.0).get(&health).send().await.unwrap().status(),
        200
    );

    // The new pair goes in by rename, with the old files' times: at no moment do the files
    // the periodic check looks at show a change.
    let new = self_signed();
    let (staged_cert, staged_key) = write_pair(dir.path(), "staged", &new);
    for (staged, live) in [(&staged_cert, &cert), (&staged_key, &key)] {
        let time = std::fs::metadata(live).unwrap().modified().unwrap();
        let file = std::fs::File::options().write(true).open(staged).unwrap();
        file.set_modified(time).unwrap();
        std::fs::rename(staged, live).unwrap();
    }
    assert!(
        trusting(&new.0).get(&health).send().await.is_err(),
        "the new certificate was in use before SIGHUP"
    );
    signal(&child, "-HUP");
    log_line(&mut lines, "TLS certificate reloaded").await;
    assert_eq!(
        trusting(&new.0).get(&health).send().await.unwrap().status(),
        200
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the server"
    );
    sigterm_and_wait(&mut child).await;

    let mut cmd = serve_command(&dir.path().join("plain.db"), Some("k"), &[]);
    cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    let (mut child, url, _) = start(cmd).await;
    let mut lines = log_lines(&mut child);
    signal(&child, "-HUP");
    log_line(&mut lines, "SIGHUP: nothing to reload").await;
    let r = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the server"
    );
    sigterm_and_wait(&mut child).await;
}

/// Prometheus text: `name{labels} value` by series, every name declared with `# TYPE`.
fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut series = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("series and value");
        let base = name.split('{').next().unwrap();
        assert!(
            typed.iter().any(|t| base == *t
                || base.strip_suffix("_bucket").is_some_and(|b| b == *t)
                || base.strip_suffix("_sum").is_some_and(|b| b == *t)
                || base.strip_suffix("_count").is_some_and(|b| b == *t)),
            "{name} has no # TYPE"
        );
        series.insert(name.to_owned(), value.parse::<f64>().expect("a number"));
    }
    series
}

/// `--metrics-listen` serves Prometheus metrics on a port of its own (the API's has none):
/// group commits with their writes and durations, connections, live streams, webhook
/// deliveries by status, and the process's memory and files.
#[tokio::test]
async fn metrics_are_served_on_a_port_of_their_own() {
    let storage = TestDb::new().await;
    let cmd = serve_command(
        &storage.path,
        Some("k"),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let (mut child, url, before) = start(cmd).await;
    let metrics = before
        .iter()
        .find_map(|l| l.strip_prefix("metrics on "))
        .unwrap_or_else(|| panic!("no metrics address in {before:?}"))
        .to_owned();
    let scrape = || async {
        let r = reqwest::get(&metrics).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        parse_metrics(&r.text().await.unwrap())
    };
    let start_counts = scrape().await;
    let http = reqwest::Client::new();
    let hook = http
        .post(format!("{url}/v3/conversations/webhooks"))
        .header("api-key", "k")
        .json(&json!({"url": "http://127.0.0.1:9/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(hook.status(), 201);
    for i in 0..5 {
        let r = http
            .post(format!("{url}/v3/conversations/messages"))
            .header("api-key", "k")
            .json(&json!({"visitorId": "v", "text": format!("m{i}"), "agentEmail": "a@x.com", "agentName": "A"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let events = http
        .get(format!("{url}/v3/conversations/events"))
        .header("api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);

    // The stream subscribes before its answer's head is sent.
    let m = scrape().await;
    let grew = |name: &str| m[name] - start_counts[name];
    assert!(grew("switchboard_commit_writes_total") >= 6.0, "{m:?}");
    assert!(grew("switchboard_commits_total") >= 1.0, "{m:?}");
    let commits = m["switchboard_commits_total"];
    assert_eq!(m["switchboard_commit_duration_seconds_count"], commits);
    assert_eq!(
        m["switchboard_commit_duration_seconds_bucket{le=\"+Inf\"}"],
        commits
    );
    assert!(m["switchboard_commit_duration_seconds_sum"] > 0.0);
    assert!(m["switchboard_connections_total"] >= 1.0, "{m:?}");
    assert!(m["switchboard_connections_open"] >= 1.0, "{m:?}");
    assert_eq!(m["switchboard_live_streams"], 1.0);
    assert!(
        m.iter()
            .filter(|(k, _)| k.starts_with("switchboard_webhook_deliveries{"))
            .map(|(_, v)| v)
            .sum::<f64>()
            >= 1.0,
        "{m:?}"
    );
    assert!(m["process_resident_memory_bytes"] > 1e6);
    assert!(m["process_open_fds"] > 3.0);
    assert!(m.contains_key("process_cpu_seconds_total"));
    drop(events);

    let r = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "the API's port serves no metrics");
    // Closed connections are counted out.
    drop(http);
    let mut open = f64::MAX;
    for _ in 0..100 {
        open = scrape().await["switchboard_connections_open"];
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open, 0.0, "connections closed but still counted open");
    sigterm_and_wait(&mut child).await;
}

//! Several `switchboard serve` processes on one PostgreSQL database: live streams fed across
//! instances, presence seen by all, webhooks delivered exactly once and in order whoever
//! claims them, one transcript per chat whatever the number of instances, and nothing
//! acknowledged lost when an instance dies with SIGKILL.
//!
//! Runs only with `SWITCHBOARD_TEST_POSTGRES` set to the URL of a database whose user may
//! create databases (e.g. `postgres://postgres@127.0.0.1:5432/test`); each test makes its
//! own `sb_t_<hex>` database and drops it when done (also on panic).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::harness::{Ws, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const KEY: &str = "xkeysib-cluster-test-key-0123456789";
/// Bound on anything the cluster as a whole must get done (all chats ended, all deliveries
/// made): generous, for a busy machine.
const SETTLE: Duration = Duration::from_secs(90);
const AGENT_EMAIL: &str = "julia@example.com";

/// The admin URL, or `None` (after saying so) when the test is to be skipped.
fn admin_url(test: &str) -> Option<String> {
    match std::env::var("SWITCHBOARD_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipping cluster::{test}: SWITCHBOARD_TEST_POSTGRES is not set (the URL of a \
                 PostgreSQL database whose user may create databases)"
            );
            None
        }
    }
}

/// A PostgreSQL database of one test, dropped (sessions and all) with this value.
struct Database {
    _db: crate::db::PgDatabase,
    url: String,
}

impl Database {
    async fn create(admin: &str) -> Self {
        let db = crate::db::PgDatabase::create(admin).await;
        Self {
            url: db.url.clone(),
            _db: db,
        }
    }

    /// Rows of a query whose columns are all text (cast them: `x::text`).
    async fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        use sqlx::Row;
        let mut conn = connect(&self.url).await;
        let rows = tokio::time::timeout(WAIT, sqlx::query(sql).fetch_all(&mut conn))
            .await
            .expect("query within the wait")
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        r.try_get::<Option<String>, _>(i)
                            .unwrap()
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect()
    }

    /// `SELECT count(*) FROM <from_where>`.
    async fn count(&self, from_where: &str) -> i64 {
        let r = self
            .rows(&format!("SELECT count(*)::text FROM {from_where}"))
            .await;
        r[0][0].parse().unwrap()
    }
}

async fn connect(url: &str) -> sqlx::PgConnection {
    tokio::time::timeout(WAIT, sqlx::PgConnection::connect(url))
        .await
        .expect("connect to PostgreSQL within the wait")
        .unwrap_or_else(|e| panic!("connect to PostgreSQL: {e}"))
}

/// One `switchboard serve` process; killed (SIGKILL) when dropped.
struct Node {
    name: &'static str,
    url: String,
    child: Child,
    /// Its stderr lines (also echoed to the test's stderr, prefixed with the name).
    log: Arc<Mutex<Vec<String>>>,
    /// The task reading stderr into `log`, done once the process has exited.
    log_reader: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(name: &'static str, db: &str, flags: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--db", db])
            .args(flags)
            .env("RUST_LOG", "warn")
            .env("SWITCHBOARD_API_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn switchboard");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut errors = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = log.clone();
        let log_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                eprintln!("[{name}] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("{name} exited before listening");
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not start within 60 s"));
        // Keep reading, so that the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            name,
            url,
            child,
            log,
            log_reader,
        }
    }

    /// SIGKILL, and everything it wrote to stderr.
    async fn kill_and_read_log(mut self) -> Vec<String> {
        self.kill().await;
        tokio::time::timeout(WAIT, self.log_reader)
            .await
            .expect("stderr ends with the process")
            .expect("log reader");
        let log = self.log.lock().unwrap().clone();
        log
    }

    /// SIGKILL, and waits until it is gone.
    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("killed process exits")
            .expect("wait");
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Three instances A, B, C on a fresh database, with one API key ([`KEY`]).
struct Cluster {
    /// Dropped before the database: the processes are killed first.
    nodes: Vec<Node>,
    db: Database,
    http: reqwest::Client,
    widget: String,
}

impl Cluster {
    /// `None` when PostgreSQL is not configured (the test is skipped).
    async fn start(test: &str, flags: &[&str]) -> Option<Self> {
        let admin = admin_url(test)?;
        let db = Database::create(&admin).await;
        // A first: it makes the schema and the default account; then B and C together.
        let a = Node::start("A", &db.url, flags).await;
        let (b, c) = tokio::join!(
            Node::start("B", &db.url, flags),
            Node::start("C", &db.url, flags)
        );
        let out = tokio::time::timeout(
            WAIT,
            Command::new(BIN)
                .args(["--db", &db.url, "--json", "accounts", "widget"])
                .env_remove("SWITCHBOARD_API_KEY")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("accounts widget within the wait")
        .expect("run switchboard accounts widget");
        assert!(
            out.status.success(),
            "accounts widget: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let w: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let widget = w["widgetId"].as_str().expect("widgetId").to_owned();
        Some(Self {
            nodes: vec![a, b, c],
            db,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            widget,
        })
    }

    fn url(&self, node: usize) -> &str {
        &self.nodes[node].url
    }

    /// A `/v3` call with the API key: (status, JSON body or `Null`).
    async fn api(
        &self,
        node: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url(node)))
            .header("api-key", KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(if text.is_empty() {
                Value::Null
            } else {
                Value::String(text)
            }),
        )
    }

    /// A new visitor session through `node`: (visitor id, conversation id, token).
    async fn session(&self, node: usize) -> (String, String, String) {
        let r = self
            .http
            .post(format!(
                "{}/widget/v1/{}/session",
                self.url(node),
                self.widget
            ))
            .json(&json!({}))
            .send()
            .await
            .expect("session");
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.expect("session body");
        let s = |k: &str| b[k].as_str().expect(k).to_owned();
        (s("visitorId"), s("conversationId"), s("token"))
    }

    /// The visitor's message through `node`; the message.
    async fn visitor_says(&self, node: usize, token: &str, text: &str) -> Value {
        let r = self
            .http
            .post(format!(
                "{}/widget/v1/{}/messages",
                self.url(node),
                self.widget
            ))
            .bearer_auth(token)
            .json(&json!({ "text": text }))
            .send()
            .await
            .expect("visitor message");
        assert_eq!(r.status(), 200, "visitor message through {node}");
        r.json().await.expect("message")
    }

    /// An agent's message to the visitor through the API on `node`; the message.
    async fn agent_says(&self, node: usize, visitor: &str, text: &str) -> Value {
        let (status, body) = self
            .api(
                node,
                reqwest::Method::POST,
                "/v3/conversations/messages",
                Some(agent_message(visitor, text)),
            )
            .await;
        assert_eq!(status, 200, "agent message through {node}: {body}");
        body
    }

    /// The visitor socket on `node`, read up to its `ready` frame; and that frame's cursor.
    async fn ws(&self, node: usize, token: &str) -> (Ws, i64) {
        let url = format!(
            "{}/widget/v1/{}/ws?token={token}",
            self.url(node).replacen("http://", "ws://", 1),
            self.widget
        );
        let (inner, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect within the wait")
            .expect("websocket handshake");
        let mut ws = Ws { inner };
        let (before, ready) = ws.until_ready().await;
        assert!(before.is_empty(), "nothing to replay: {before:?}");
        let cursor = ready["cursor"].as_i64().expect("ready cursor");
        (ws, cursor)
    }

    /// The account's event stream on `node`, resumed after `cursor`.
    async fn sse(&self, node: usize, cursor: i64) -> Sse {
        let res = self
            .http
            .get(format!("{}/v3/conversations/events", self.url(node)))
            .header("api-key", KEY)
            .header("last-event-id", cursor.to_string())
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .expect("events");
        assert_eq!(res.status(), 200);
        Sse {
            body: res.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// Registers a webhook endpoint (all events) through `node`.
    async fn webhook(&self, node: usize, url: &str) {
        let (status, body) = self
            .api(
                node,
                reqwest::Method::POST,
                "/v3/conversations/webhooks",
                Some(json!({ "url": url })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Waits (bounded) until every chat has ended and every webhook delivery is made.
    async fn settle(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let open = self.db.count("chats WHERE ended_at IS NULL").await;
            let pending = self
                .db
                .count("webhook_deliveries WHERE status <> 'delivered'")
                .await;
            if open == 0 && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {SETTLE:?}: {open} chats still open, {pending} webhook deliveries not \
                 delivered: {:?}",
                self.db
                    .rows(
                        "SELECT event_id, status, attempts::text, coalesce(last_error, ''), \
                         coalesce(last_status::text, '') FROM webhook_deliveries \
                         WHERE status <> 'delivered' ORDER BY event_seq LIMIT 20"
                    )
                    .await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// No instance panicked.
    fn assert_no_panic(&self) {
        for n in &self.nodes {
            let log = n.log.lock().unwrap();
            let bad: Vec<&String> = log.iter().filter(|l| l.contains("panicked")).collect();
            assert!(bad.is_empty(), "{} panicked: {bad:?}", n.name);
        }
    }
}

fn agent_message(visitor: &str, text: &str) -> Value {
    json!({"visitorId": visitor, "text": text, "agentEmail": AGENT_EMAIL, "agentName": "Julia"})
}

/// An SSE reader over a streaming response.
struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    /// The next event's data (comments skipped), within the wait.
    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return serde_json::from_str(&data).expect("JSON data");
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("an event within the wait")
                .expect("stream open")
                .expect("chunk");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads events until `event` about the message `id`; returns it.
    async fn until(&mut self, event: &str, id: &str) -> Value {
        loop {
            let e = self.next().await;
            if e["event"] == event && e["message"]["id"] == id {
                return e;
            }
        }
    }
}

/// Reads visitor-socket frames until `event` about message `id`; only message frames
/// may come before it.
async fn ws_until(ws: &mut Ws, event: &str, id: &str) -> Value {
    loop {
        let f = ws.next_json().await;
        let name = f["event"].as_str().unwrap_or_default().to_owned();
        assert!(
            ["messageCreated", "messageUpdated", "messageDeleted"].contains(&name.as_str()),
            "unexpected frame {f}"
        );
        if name == event && f["message"]["id"] == id {
            return f;
        }
    }
}

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
struct Hit {
    /// `webhook-id`.
    id: String,
    raw: String,
    /// The sender's TCP port (to tell which instance sent it).
    port: u16,
    arrived: Instant,
    state: HitState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HitState {
    /// The receiver has not answered yet.
    InFlight,
    /// Answered 200.
    Answered,
    /// The connection went away before the answer (the sender died).
    Dropped,
}

/// A local webhook receiver: records every request in arrival order and answers 200 after
/// `delay_ms`.
#[derive(Default)]
struct Hooks {
    hits: Mutex<Vec<Hit>>,
    delay_ms: AtomicU64,
}

impl Hooks {
    /// Starts it; (receiver, URL to register).
    async fn start() -> (Arc<Self>, String) {
        let hooks = Arc::new(Self::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(Self::hook))
            .with_state(hooks.clone());
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
        });
        (hooks, url)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    async fn hook(
        axum::extract::State(hooks): axum::extract::State<Arc<Self>>,
        axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
        headers: axum::http::HeaderMap,
        body: String,
    ) -> axum::http::StatusCode {
        /// Marks the request dropped unless it was answered.
        struct Guard(Arc<Hooks>, usize);
        impl Drop for Guard {
            fn drop(&mut self) {
                let mut hits = self.0.hits.lock().unwrap();
                if hits[self.1].state == HitState::InFlight {
                    hits[self.1].state = HitState::Dropped;
                }
            }
        }
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let index = {
            let mut hits = hooks.hits.lock().unwrap();
            hits.push(Hit {
                id,
                raw: body,
                port: peer.port(),
                arrived: Instant::now(),
                state: HitState::InFlight,
            });
            hits.len() - 1
        };
        let guard = Guard(hooks.clone(), index);
        let delay = hooks.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        hooks.hits.lock().unwrap()[index].state = HitState::Answered;
        drop(guard);
        axum::http::StatusCode::OK
    }
}

/// The webhook events in the database: id -> (seq, conversation, kind, chat).
/// No chat has more than one transcript event in the outbox.
async fn assert_one_transcript_per_chat(db: &Database) {
    let doubled = db
        .rows(
            "SELECT chat_id, count(*)::text FROM webhook_events \
             WHERE kind = 'conversationTranscript' GROUP BY chat_id HAVING count(*) <> 1",
        )
        .await;
    assert!(
        doubled.is_empty(),
        "chats with several transcripts: {doubled:?}"
    );
}

async fn outbox(db: &Database) -> HashMap<String, (i64, String, String, String)> {
    db.rows("SELECT id, seq::text, conversation_id, kind, chat_id FROM webhook_events")
        .await
        .into_iter()
        .map(|r| {
            (
                r[0].clone(),
                (
                    r[1].parse().unwrap(),
                    r[2].clone(),
                    r[3].clone(),
                    r[4].clone(),
                ),
            )
        })
        .collect()
}

/// The message ids of a fragment or transcript payload, in order.
fn message_ids(payload: &Value) -> Vec<String> {
    payload["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {payload}"))
        .iter()
        .map(|m| m["id"].as_str().expect("message id").to_owned())
        .collect()
}

/// What each chat received, in first-arrival order: chat -> [(kind, payload)].
type ChatEvents = BTreeMap<String, Vec<(String, Value)>>;

/// Checks what the receiver got against the outbox, for every chat: each event arrived
/// (at least once, the same bytes every time), each conversation's events first arrived in
/// outbox order, every chat has one `conversationStarted` first and one
/// `conversationTranscript` last, its fragments carry its messages once each, in order,
/// and the transcript all of them. Returns the chats' events and, per conversation, the
/// messages of its transcripts in order.
fn check_deliveries(
    hits: &[Hit],
    outbox: &HashMap<String, (i64, String, String, String)>,
) -> (ChatEvents, HashMap<String, Vec<String>>) {
    let mut first: HashMap<&str, &Hit> = HashMap::new();
    let mut arrivals = Vec::new();
    for h in hits {
        let (_, conversation, _, _) = outbox
            .get(&h.id)
            .unwrap_or_else(|| panic!("a request for {:?}, not in webhook_events", h.id));
        match first.get(h.id.as_str()) {
            None => {
                first.insert(&h.id, h);
                arrivals.push(h);
            }
            Some(f) => assert_eq!(f.raw, h.raw, "{} sent twice with different bodies", h.id),
        }
        let p: Value = serde_json::from_str(&h.raw).expect("JSON body");
        assert_eq!(p["conversationId"], conversation.as_str(), "{}", h.id);
    }
    let missing: Vec<&String> = outbox
        .keys()
        .filter(|id| {
            !hits
                .iter()
                .any(|h| &h.id == *id && h.state == HitState::Answered)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events never delivered (answered 200): {missing:?}",
        missing.len(),
        outbox.len()
    );

    let mut last: HashMap<&str, (i64, &str)> = HashMap::new();
    // Per conversation, the messages of its transcripts in the order they arrived.
    let mut transcripts: HashMap<String, Vec<String>> = HashMap::new();
    let mut chats: ChatEvents = BTreeMap::new();
    for h in &arrivals {
        let (seq, conversation, kind, chat) = &outbox[&h.id];
        if let Some((prev, prev_id)) = last.insert(conversation, (*seq, &h.id)) {
            assert!(
                prev < *seq,
                "conversation {conversation}: {} (seq {seq}) first arrived after {prev_id} \
                 (seq {prev})",
                h.id
            );
        }
        let p: Value = serde_json::from_str(&h.raw).unwrap();
        assert_eq!(p["eventName"], kind.as_str(), "{}", h.id);
        if kind == "conversationTranscript" {
            transcripts
                .entry(conversation.clone())
                .or_default()
                .extend(message_ids(&p));
        }
        chats
            .entry(chat.clone())
            .or_default()
            .push((kind.clone(), p));
    }

    for (chat, events) in &chats {
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds.first(),
            Some(&"conversationStarted"),
            "chat {chat}: {kinds:?}"
        );
        assert_eq!(
            kinds.last(),
            Some(&"conversationTranscript"),
            "chat {chat}: {kinds:?}"
        );
        for k in ["conversationStarted", "conversationTranscript"] {
            assert_eq!(
                kinds.iter().filter(|x| **x == k).count(),
                1,
                "chat {chat}: {kinds:?}"
            );
        }
        let fragments: Vec<String> = events
            .iter()
            .filter(|(k, _)| k == "conversationFragment")
            .flat_map(|(_, p)| message_ids(p))
            .collect();
        let transcript = &events.last().unwrap().1;
        let all = message_ids(transcript);
        assert_eq!(
            fragments, all,
            "chat {chat}: fragments against the transcript"
        );
        assert_eq!(
            events[0].1["message"]["id"].as_str(),
            all.first().map(String::as_str),
            "chat {chat}: conversationStarted names the chat's first message"
        );
    }
    (chats, transcripts)
}

/// An API write on one instance reaches a visitor socket on another and the agent stream
/// on a third; a visitor's message through one reaches its other socket and the stream;
/// an agentOnlinePing on one instance is seen by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_streams_and_presence_span_instances() {
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    let Some(cl) = Cluster::start(
        "live_streams_and_presence_span_instances",
        &["--session-rate", "0", "--visitor-rate", "0"],
    )
    .await
    else {
        return;
    };
    let (visitor, conversation, token) = cl.session(B).await;
    let (mut on_b, cursor) = cl.ws(B, &token).await;
    let mut stream = cl.sse(C, cursor).await;

    // An agent's message through A: to the visitor's socket on B and the stream on C.
    let m1 = cl.agent_says(A, &visitor, "hello from A").await;
    let m1_id = m1["id"].as_str().unwrap();
    let f = ws_until(&mut on_b, "messageCreated", m1_id).await;
    assert_eq!(f["message"], m1);
    let e = stream.until("messageCreated", m1_id).await;
    assert_eq!(e["message"], m1);
    assert_eq!(e["conversationId"], conversation.as_str());
    assert_eq!(e["visitorId"], visitor.as_str());

    // A second socket of the same visitor on A; the visitor writes through B.
    let (mut on_a, _) = cl.ws(A, &token).await;
    let m2 = cl.visitor_says(B, &token, "hello from B").await;
    assert_eq!(m2["type"], "visitor");
    assert_eq!(m2["isMissed"], true, "no agent is online yet: {m2}");
    let m2_id = m2["id"].as_str().unwrap();
    assert_eq!(
        ws_until(&mut on_a, "messageCreated", m2_id).await["message"],
        m2
    );
    assert_eq!(
        ws_until(&mut on_b, "messageCreated", m2_id).await["message"],
        m2
    );
    assert_eq!(stream.until("messageCreated", m2_id).await["message"], m2);

    // An edit through C reaches both sockets.
    let (status, edited) = cl
        .api(
            C,
            reqwest::Method::PUT,
            &format!("/v3/conversations/messages/{m1_id}"),
            Some(json!({"text": "edited on C"})),
        )
        .await;
    assert_eq!(status, 200, "{edited}");
    for ws in [&mut on_a, &mut on_b] {
        let f = ws_until(ws, "messageUpdated", m1_id).await;
        assert_eq!(f["message"]["text"], "edited on C");
    }
    assert_eq!(
        stream.until("messageUpdated", m1_id).await["message"]["text"],
        "edited on C"
    );

    // Presence: B has just answered "nobody online"; a ping on A changes that for B at once.
    let (status, body) = cl
        .api(
            A,
            reqwest::Method::POST,
            "/v3/conversations/agentOnlinePing",
            Some(json!({"agentEmail": AGENT_EMAIL})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let m3 = cl.visitor_says(B, &token, "anyone there?").await;
    assert_eq!(
        m3["isMissed"], false,
        "a visitor message through B after agentOnlinePing on A was answered (B had just \
         found nobody online, for the message before): {m3}"
    );
    let m4 = cl.visitor_says(C, &token, "and through C?").await;
    assert_eq!(m4["isMissed"], false, "through C: {m4}");
    for m in [&m3, &m4] {
        let id = m["id"].as_str().unwrap();
        assert_eq!(
            ws_until(&mut on_a, "messageCreated", id).await["message"],
            *m
        );
        assert_eq!(
            ws_until(&mut on_b, "messageCreated", id).await["message"],
            *m
        );
        assert_eq!(stream.until("messageCreated", id).await["message"], *m);
    }
    on_a.assert_nothing_pending().await;
    on_b.assert_nothing_pending().await;
    cl.assert_no_panic();
}

/// Messages of several visitors written round-robin through three instances: every webhook
/// event is delivered exactly once, each conversation's in order, and each chat (ended by
/// the timers, which run on every instance) has exactly one transcript with all its
/// messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_delivered_once_in_order_across_instances() {
    const VISITORS: usize = 8;
    const MESSAGES: usize = 12;
    let Some(cl) = Cluster::start(
        "webhooks_are_delivered_once_in_order_across_instances",
        &[
            "--fragment-delay",
            "0",
            "--chat-timeout",
            "0.03",
            "--session-rate",
            "0",
            "--visitor-rate",
            "0",
        ],
    )
    .await
    else {
        return;
    };
    let cl = Arc::new(cl);
    let (hooks, hook_url) = Hooks::start().await;
    cl.webhook(0, &hook_url).await;

    let mut writers = Vec::new();
    for v in 0..VISITORS {
        let cl = cl.clone();
        writers.push(tokio::spawn(async move {
            let (visitor, conversation, token) = cl.session(v % 3).await;
            let mut sent = Vec::new();
            for i in 0..MESSAGES {
                let node = (v + i) % 3;
                let text = format!("visitor {v} message {i}");
                let m = if i % 2 == 0 {
                    cl.visitor_says(node, &token, &text).await
                } else {
                    cl.agent_says(node, &visitor, &text).await
                };
                sent.push(m["id"].as_str().unwrap().to_owned());
            }
            (conversation, sent)
        }));
    }
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for w in writers {
        let (conversation, ids) = w.await.expect("writer");
        sent.insert(conversation, ids);
    }

    cl.settle().await;
    let events = outbox(&cl.db).await;
    let deadline = Instant::now() + WAIT;
    while hooks.hits().len() < events.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No second request can still come: every delivery is made, no queue is left to claim,
    // and each event has exactly one recorded attempt.
    assert_eq!(
        cl.db.count("webhook_queues").await,
        0,
        "queues left to claim"
    );
    let resent = cl
        .db
        .rows(
            "SELECT event_id, count(*)::text FROM webhook_attempts GROUP BY event_id \
             HAVING count(*) <> 1",
        )
        .await;
    assert!(
        resent.is_empty(),
        "events attempted more than once: {resent:?}"
    );
    let hits = hooks.hits();

    let mut times: HashMap<&str, usize> = HashMap::new();
    for h in &hits {
        *times.entry(&h.id).or_default() += 1;
    }
    let twice: Vec<(&&str, &usize)> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events delivered more than once (no instance died): {twice:?}"
    );
    let (chats, transcripts) = check_deliveries(&hits, &events);

    // Every message is in exactly one transcript, in the order written.
    for (conversation, ids) in &sent {
        assert_eq!(
            transcripts.get(conversation),
            Some(ids),
            "conversation {conversation}: transcripts against the messages written"
        );
    }
    assert_eq!(transcripts.len(), VISITORS);
    // One transcript per chat ended, as the database has it.
    let ended = cl.db.count("chats WHERE ended_at IS NOT NULL").await;
    assert_eq!(
        usize::try_from(ended).unwrap(),
        chats.len(),
        "chats ended against chats with webhook events"
    );
    assert_one_transcript_per_chat(&cl.db).await;
    let ended_events = cl.db.count("events WHERE kind = 'conversationEnded'").await;
    assert_eq!(ended_events, ended, "one conversationEnded per chat");
    eprintln!(
        "webhooks across instances: {} events, {} chats, {} requests",
        events.len(),
        chats.len(),
        hits.len()
    );
    cl.assert_no_panic();
}

/// The local ports of a process's TCP connections to `remote_port` (Linux: /proc), to tell
/// its requests apart.
fn tcp_ports_of(pid: u32, remote_port: u16) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let port = |c: &str| {
                c.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if cols.len() > 9 && inodes.contains(cols[9]) && port(cols[2]) == Some(remote_port) {
                if let Some(p) = port(cols[1]) {
                    ports.insert(p);
                }
            }
        }
    }
    ports
}

/// Writers on all three instances; B is killed with SIGKILL mid-load while it has a webhook
/// delivery in flight to a slow receiver. Every acknowledged message (through any instance,
/// before or after the kill) is there; every webhook event is delivered, B's claimed ones by
/// A or C once its lease runs out; each chat still gets exactly one transcript.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_one_instance_loses_nothing() {
    const WRITERS: usize = 12;
    /// Writes acknowledged before the kill, and after it.
    const BEFORE: usize = 120;
    const AFTER: usize = 120;
    /// A bound on each writer's messages (it stops when told to).
    const MESSAGES: usize = 400;
    const B: usize = 1;
    let Some(mut cl) = Cluster::start(
        "sigkill_of_one_instance_loses_nothing",
        &[
            "--fragment-delay",
            "0",
            "--chat-timeout",
            "0.05",
            "--webhook-timeout",
            "1",
            "--webhook-lease",
            "2",
            "--webhook-retry-first",
            "0.05",
            "--session-rate",
            "0",
            "--visitor-rate",
            "0",
        ],
    )
    .await
    else {
        return;
    };
    let (hooks, hook_url) = Hooks::start().await;
    let hooks_port = url::Url::parse(&hook_url).unwrap().port().unwrap();
    // Slow: a delivery stays in flight for a while, so B has some when it dies.
    hooks.delay_ms.store(400, Ordering::SeqCst);
    cl.webhook(0, &hook_url).await;
    let b_pid = cl.nodes[B].pid().expect("B's pid");

    let urls: Vec<String> = cl.nodes.iter().map(|n| n.url.clone()).collect();
    let widget = cl.widget.clone();
    let http = cl.http.clone();
    let b_dead = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // (conversation, message id, text, instance) of every write answered 200.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, String, usize)>();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (http, urls, widget, tx, b_dead, stop) = (
            http.clone(),
            urls.clone(),
            widget.clone(),
            tx.clone(),
            b_dead.clone(),
            stop.clone(),
        );
        writers.push(tokio::spawn(async move {
            let session: Value = http
                .post(format!(
                    "{}/widget/v1/{widget}/session",
                    urls[if w % 2 == 0 { 0 } else { 2 }]
                ))
                .json(&json!({}))
                .send()
                .await
                .expect("session")
                .json()
                .await
                .expect("session body");
            let visitor = session["visitorId"].as_str().unwrap().to_owned();
            let conversation = session["conversationId"].as_str().unwrap().to_owned();
            let token = session["token"].as_str().unwrap().to_owned();
            // Failures of the living instances (B's are expected once it is killed).
            let mut failures = Vec::new();
            for i in 0..MESSAGES {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let node = (w + i) % 3;
                let text = format!("writer {w} message {i}");
                let req = if i % 2 == 0 {
                    http.post(format!("{}/widget/v1/{widget}/messages", urls[node]))
                        .bearer_auth(&token)
                        .json(&json!({ "text": text }))
                } else {
                    http.post(format!("{}/v3/conversations/messages", urls[node]))
                        .header("api-key", KEY)
                        .json(&agent_message(&visitor, &text))
                };
                match req.send().await {
                    Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                        Ok(m) => {
                            let id = m["id"].as_str().unwrap_or_default().to_owned();
                            let _ = tx.send((conversation.clone(), id, text, node));
                        }
                        Err(e) if node == B => {
                            eprintln!("writer {w}: B's answer lost: {e}");
                        }
                        Err(e) => failures.push(format!("{node}: reading the answer: {e}")),
                    },
                    Ok(r) => failures.push(format!("{node}: status {}", r.status())),
                    Err(e) if node == B => {
                        // Cut off by the kill, or refused once B is gone.
                        assert!(
                            b_dead.load(Ordering::SeqCst),
                            "writer {w}: B failed before the kill: {e}"
                        );
                    }
                    Err(e) => failures.push(format!("{node}: {e}")),
                }
            }
            failures
        }));
    }
    drop(tx);

    // Mid-load, once B has a delivery in flight (arrived recently, so it is still in
    // flight at the kill): SIGKILL.
    let mut acked = Vec::new();
    let deadline = Instant::now() + SETTLE;
    let in_flight_at_kill: Vec<Hit> = loop {
        while let Ok(a) = rx.try_recv() {
            acked.push(a);
        }
        if acked.len() >= BEFORE {
            let ports = tcp_ports_of(b_pid, hooks_port);
            let of_b: Vec<Hit> = hooks
                .hits()
                .into_iter()
                .filter(|h| h.state == HitState::InFlight && ports.contains(&h.port))
                .collect();
            if of_b
                .iter()
                .any(|h| h.arrived.elapsed() < Duration::from_millis(150))
            {
                b_dead.store(true, Ordering::SeqCst);
                cl.nodes[B].kill().await;
                break of_b;
            }
        }
        assert!(
            Instant::now() < deadline,
            "B never had a webhook delivery in flight ({} writes acknowledged)",
            acked.len()
        );
        assert!(
            !rx.is_closed() || !rx.is_empty(),
            "the writers finished before B had a delivery in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let acked_at_kill = acked.len();
    eprintln!(
        "killed B after {acked_at_kill} acknowledged writes, with {} deliveries in flight: {:?}",
        in_flight_at_kill.len(),
        in_flight_at_kill.iter().map(|h| &h.id).collect::<Vec<_>>()
    );
    // The load goes on through A and C for a while, then stops.
    while let Some(a) = rx.recv().await {
        acked.push(a);
        if acked.len() >= acked_at_kill + AFTER {
            stop.store(true, Ordering::SeqCst);
        }
    }
    let mut failures = Vec::new();
    for w in writers {
        failures.extend(w.await.expect("writer"));
    }
    assert!(failures.is_empty(), "writes failed on A or C: {failures:?}");
    assert!(
        acked.len() > acked_at_kill,
        "writes went on after the kill ({} acknowledged)",
        acked.len()
    );
    // The receiver is quick again; B's claims are taken over when their lease ends.
    hooks.delay_ms.store(0, Ordering::SeqCst);

    // Every acknowledged message is there, through A.
    let mut lost = Vec::new();
    for (_, id, text, node) in &acked {
        let (status, m) = cl
            .api(
                0,
                reqwest::Method::GET,
                &format!("/v3/conversations/messages/{id}"),
                None,
            )
            .await;
        if status != 200 || m["text"] != text.as_str() {
            lost.push(format!("{id} (acknowledged by {node}): {status} {m}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );

    cl.settle().await;
    let events = outbox(&cl.db).await;
    let hits = hooks.hits();
    // B's deliveries cut off by the kill were made again, by A or C.
    let mut cut_off = 0;
    for h in &in_flight_at_kill {
        let index = hits
            .iter()
            .position(|x| x.port == h.port && x.id == h.id && x.arrived == h.arrived)
            .unwrap();
        eprintln!(
            "in flight from B at the kill: {} then {:?}",
            h.id, hits[index].state
        );
        if hits[index].state != HitState::Dropped {
            // Answered as B died: B may or may not have recorded it.
            continue;
        }
        cut_off += 1;
        assert!(
            hits[index + 1..]
                .iter()
                .any(|x| x.id == h.id && x.state == HitState::Answered),
            "{} (in flight from B at the kill, then {:?}) was never delivered again",
            h.id,
            hits[index].state
        );
    }
    assert!(
        cut_off > 0,
        "none of B's deliveries in flight at the kill was cut off: {in_flight_at_kill:?}"
    );
    let (chats, transcripts) = check_deliveries(&hits, &events);

    // Every acknowledged message went out in exactly one transcript (and, checked above,
    // in exactly one fragment of the same chat).
    let mut in_transcripts: HashMap<&str, usize> = HashMap::new();
    for ids in transcripts.values() {
        for id in ids {
            *in_transcripts.entry(id).or_default() += 1;
        }
    }
    for (conversation, id, _, node) in &acked {
        assert_eq!(
            in_transcripts.get(id.as_str()),
            Some(&1),
            "message {id} of {conversation} (acknowledged by {node}) in transcripts"
        );
    }
    assert_one_transcript_per_chat(&cl.db).await;
    let ended = cl.db.count("chats WHERE ended_at IS NOT NULL").await;
    assert_eq!(usize::try_from(ended).unwrap(), chats.len());
    let distinct: HashSet<&str> = hits.iter().map(|h| h.id.as_str()).collect();
    // Why events were sent more than once: B's cut-off requests, and attempts that failed
    // (e.g. timed out on a busy machine), as the attempt log has them.
    let mut seen = HashSet::new();
    for h in &hits {
        if !seen.insert(h.id.as_str()) {
            let log = cl
                .db
                .rows(&format!(
                    "SELECT attempt::text, coalesce(status_code::text, '-'), \
                     latency_ms::text, coalesce(error, '') FROM webhook_attempts \
                     WHERE event_id = '{}' ORDER BY id",
                    h.id
                ))
                .await;
            let from_b = in_flight_at_kill.iter().any(|x| x.id == h.id);
            eprintln!(
                "sent again: {} (in flight from B at the kill: {from_b}); attempts: {log:?}",
                h.id
            );
        }
    }
    eprintln!(
        "sigkill: {} writes acknowledged ({acked_at_kill} before the kill), {} events, {} \
         requests ({} duplicates), {} chats",
        acked.len(),
        events.len(),
        hits.len(),
        hits.len() - distinct.len(),
        chats.len()
    );
    cl.assert_no_panic();
}

/// A PostgreSQL server that runs no autovacuum (so no `ANALYZE` either) is named in the
/// log at start-up; one that runs it is not. The test servers of this project have it off.
#[tokio::test]
async fn postgresql_without_autovacuum_is_named_in_the_log() {
    let Some(admin) = admin_url("postgresql_without_autovacuum_is_named_in_the_log") else {
        return;
    };
    let db = Database::create(&admin).await;
    let off = db
        .rows(
            "SELECT (current_setting('autovacuum') <> 'on' \
             OR current_setting('track_counts') <> 'on')::text",
        )
        .await;
    let off = off[0][0] == "true";
    let log = Node::start("A", &db.url, &[])
        .await
        .kill_and_read_log()
        .await;
    let warned = log.iter().any(|l| l.contains("runs no autovacuum"));
    assert_eq!(warned, off, "autovacuum off: {off}; log: {log:#?}");
}

/// PostgreSQL ending every connection of an instance (a restart, a failover, an
/// administrator's `pg_terminate_backend`) fails none of the reads that follow (a message,
/// a visitor's messages): the connections kept for them are found dead, replaced, and the
/// read made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_survive_postgresql_ending_the_connections() {
    let Some(admin) = admin_url("reads_survive_postgresql_ending_the_connections") else {
        return;
    };
    let db = Database::create(&admin).await;
    let node = Node::start("A", &db.url, &[]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client");
    let r = http
        .post(format!("{}/v3/conversations/messages", node.url))
        .header("api-key", KEY)
        .json(&json!({"visitorId": "v1", "text": "hello", "agentEmail": AGENT_EMAIL, "agentName": "Julia"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // A message by id, and the visitor's messages (two reads: the visitor, then the page).
    let urls = [
        format!("{}/v3/conversations/messages/{id}", node.url),
        format!("{}/v3/conversations/visitors/v1/messages", node.url),
    ];
    // Sixteen reads at once, so that several read connections are open and then idle.
    let read_all = || async {
        let (http, urls, id) = (&http, &urls, &id);
        let reads = (0..16).map(|i| async move {
            let r = http
                .get(&urls[i % 2])
                .header("api-key", KEY)
                .send()
                .await
                .expect("GET");
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if status == 200 {
                assert!(body.contains(id.as_str()), "{body}");
            }
            (status, body)
        });
        futures::future::join_all(reads).await
    };
    for (status, body) in read_all().await {
        assert_eq!(status, 200, "{body}");
    }
    let ended = db
        .rows(
            "SELECT pg_terminate_backend(pid)::text FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name = 'switchboard'",
        )
        .await;
    assert!(
        ended.iter().filter(|r| r[0] == "true").count() >= 2,
        "{ended:?}"
    );
    for round in 0..3 {
        for (status, body) in read_all().await {
            assert_eq!(status, 200, "round {round}: {body}");
        }
    }
    drop(node);
}

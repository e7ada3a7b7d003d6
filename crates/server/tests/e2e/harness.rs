//! A real switchboard on an ephemeral port with its own temporary database (SQLite, or
//! PostgreSQL with `SWITCHBOARD_TEST_BACKEND=postgres`: see [`crate::db`]).

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard_server::domain::{Clock, Domain, DomainConfig};
use switchboard_server::store::sqlite::SqliteOptions;
use switchboard_server::ServeOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::db::{Conn, TestDb};

pub const KEY: &str = "xkeysib-test-key-0123456789";

pub struct TestServer {
    pub url: String,
    pub domain: Arc<Domain>,
    /// The default account, owner of [`KEY`].
    pub account: String,
    /// The database, as `switchboard_server::open` takes it: a file path or a PostgreSQL URL.
    pub db: PathBuf,
    http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    storage: Option<TestDb>,
}

/// A response: status, headers and the parsed JSON body (`Null` when empty).
pub struct Res {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub raw: String,
}

impl Res {
    /// Asserts Brevo's error body with this status and code; returns the message.
    pub fn expect_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.raw);
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "error content type"
        );
        assert_eq!(self.body["code"], code, "body: {}", self.raw);
        let msg = self.body["message"].as_str().expect("message is a string");
        assert!(!msg.is_empty());
        assert_eq!(
            self.body.as_object().map(|o| o.len()),
            Some(2),
            "only code and message"
        );
        msg.to_owned()
    }

    pub fn ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.raw);
        &self.body
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(DomainConfig::default(), Clock::System).await
    }

    pub async fn start_with(config: DomainConfig, clock: Clock) -> Self {
        Self::start_full(config, clock, ServeOptions::default()).await
    }

    pub async fn start_full(config: DomainConfig, clock: Clock, options: ServeOptions) -> Self {
        let storage = TestDb::new().await;
        let mut s = Self::start_on_with(storage.path.clone(), config, clock, options).await;
        s.storage = Some(storage);
        s
    }

    /// Starts on an existing (or new) database: [`TestServer::db`] of a stopped server.
    pub async fn start_on(db: PathBuf, config: DomainConfig, clock: Clock) -> Self {
        Self::start_on_with(db, config, clock, ServeOptions::default()).await
    }

    pub async fn start_on_with(
        db: PathBuf,
        config: DomainConfig,
        clock: Clock,
        options: ServeOptions,
    ) -> Self {
        let domain = switchboard_server::open(&db, SqliteOptions::default(), config, clock)
            .await
            .expect("open database");
        let boot = domain.bootstrap(Some(KEY)).await.expect("bootstrap");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(switchboard_server::serve_with(
            domain.clone(),
            listener,
            options,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            url,
            domain,
            account: boot.account.id,
            db,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .expect("http client"),
            shutdown: Some(tx),
            handle: Some(handle),
            storage: None,
        }
    }

    /// Stops gracefully and returns its database, which lives as long as the value does (to
    /// restart on it).
    pub async fn stop(mut self) -> Option<TestDb> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server result");
        }
        self.storage.take()
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Res {
        self.call_with(method, path, body, &[("api-key", KEY)])
            .await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Res {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        Self::res(req.send().await.expect("request")).await
    }

    pub async fn raw(&self, req: reqwest::RequestBuilder) -> Res {
        Self::res(req.send().await.expect("request")).await
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url))
    }

    async fn res(r: reqwest::Response) -> Res {
        let status = r.status();
        let headers = r.headers().clone();
        let raw = r.text().await.expect("body");
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap_or(Value::String(raw.clone()))
        };
        Res {
            status,
            headers,
            body,
            raw,
        }
    }

    /// POSTs `body` exactly as given (malformed or oddly written JSON), with the key and a
    /// JSON content type.
    pub async fn post_text(&self, path: &str, body: impl Into<reqwest::Body>) -> Res {
        self.raw(
            self.request(Method::POST, path)
                .header("api-key", KEY)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Res {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Res {
        self.call(Method::GET, path, None).await
    }

    /// Adds an agent to the default account; returns its id.
    pub async fn agent(
        &self,
        name: &str,
        email: Option<&str>,
        userpic: Option<&str>,
        groups: &[String],
    ) -> String {
        self.domain
            .add_agent(&self.account, name, email, userpic, groups)
            .await
            .expect("add agent")
            .0
            .id
    }

    pub async fn group(&self, name: &str) -> String {
        self.domain
            .add_group(&self.account, name)
            .await
            .expect("add group")
            .id
    }

    /// Rows of a table matching a condition, read straight from the database.
    pub async fn count(&self, sql_where: &str) -> i64 {
        let mut conn = Conn::open(&self.db).await;
        let n = conn.count(sql_where).await;
        conn.close().await;
        n
    }
}

/// Bounded wait for anything a test expects to arrive.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A visitor WebSocket, as a browser widget would hold it.
pub struct Ws {
    pub inner: WsStream,
}

impl Ws {
    /// The next JSON frame (pings and pongs skipped); panics on close or timeout.
    pub async fn next_json(&mut self) -> Value {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("frame");
            match msg {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Frames up to `ready`, and the `ready` frame.
    pub async fn until_ready(&mut self) -> (Vec<Value>, Value) {
        let mut before = Vec::new();
        loop {
            let f = self.next_json().await;
            if f["event"] == "ready" {
                return (before, f);
            }
            before.push(f);
        }
    }

    /// Reads until the server closes; the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("close within the wait");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before close: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures::SinkExt;
        self.inner
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
    }

    /// Asserts nothing is waiting: a ping is answered by the very next frame, a pong.
    pub async fn assert_nothing_pending(&mut self) {
        self.send_text(r#"{"type":"ping"}"#).await;
        let f = self.next_json().await;
        assert_eq!(f["event"], "pong", "unexpected frame {f}");
    }
}

impl TestServer {
    /// The default account's widget id.
    pub async fn widget_id(&self) -> String {
        self.domain
            .widget_of(&self.account)
            .await
            .expect("widget")
            .widget_id
    }

    pub async fn identity_key(&self) -> String {
        self.domain
            .widget_of(&self.account)
            .await
            .expect("widget")
            .identity_key
    }

    /// `POST /widget/v1/{widget}/session`.
    pub async fn session_on(&self, widget: &str, body: Value) -> Res {
        self.call_with(
            Method::POST,
            &format!("/widget/v1/{widget}/session"),
            Some(body),
            &[],
        )
        .await
    }

    /// A new visitor of the default account: (visitor id, token).
    pub async fn new_visitor(&self) -> (String, String) {
        let w = self.widget_id().await;
        let r = self.session_on(&w, serde_json::json!({})).await;
        let b = r.ok();
        (
            b["visitorId"].as_str().expect("visitorId").to_owned(),
            b["token"].as_str().expect("token").to_owned(),
        )
    }

    /// A widget call with a visitor token.
    pub async fn widget_call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Res {
        let w = self.widget_id().await;
        let auth = format!("Bearer {token}");
        self.call_with(
            method,
            &format!("/widget/v1/{w}{path}"),
            body,
            &[("authorization", &auth)],
        )
        .await
    }

    /// The visitor holding `token` sends `text` through the widget API.
    pub async fn visitor_says(&self, token: &str, text: &str) -> Res {
        let body = json!({ "text": text });
        self.widget_call(Method::POST, "/messages", token, Some(body))
            .await
    }

    /// Opens the visitor socket with this query (e.g. `token=...&after=...`).
    pub async fn ws(&self, query: &str) -> Ws {
        let w = self.widget_id().await;
        let url = format!(
            "{}/widget/v1/{w}/ws?{query}",
            self.url.replacen("http://", "ws://", 1)
        );
        let (inner, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect within the wait")
            .expect("websocket handshake");
        Ws { inner }
    }

    /// An agent message to a visitor through the Brevo API; its id.
    pub async fn agent_says(&self, agent: &str, visitor: &str, text: &str) -> String {
        let r = self
            .post(
                "/v3/conversations/messages",
                serde_json::json!({"visitorId": visitor, "agentId": agent, "text": text}),
            )
            .await;
        r.ok()["id"].as_str().expect("id").to_owned()
    }
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub headers: axum::http::HeaderMap,
    pub raw: String,
    pub body: Value,
}

/// A real local HTTP receiver for webhooks: records every POST, answers with the status
/// (and after the delay, with the body size) it is told.
pub struct Receiver {
    pub url: String,
    pub port: u16,
    pub status: Arc<std::sync::atomic::AtomicU16>,
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    pub answer_bytes: Arc<std::sync::atomic::AtomicUsize>,
    hits_tx: tokio::sync::mpsc::UnboundedSender<Hit>,
    pub hits: tokio::sync::mpsc::UnboundedReceiver<Hit>,
    stop: Option<oneshot::Sender<()>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let (hits_tx, hits) = tokio::sync::mpsc::unbounded_channel();
        let mut r = Self {
            url: String::new(),
            port: 0,
            status: Arc::new(std::sync::atomic::AtomicU16::new(200)),
            delay_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            answer_bytes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            hits_tx,
            hits,
            stop: None,
        };
        r.up().await;
        r
    }

    /// Starts serving (again, on the same port once it has one).
    pub async fn up(&mut self) {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind receiver");
        self.port = listener.local_addr().unwrap().port();
        self.url = format!("http://127.0.0.1:{}/hook", self.port);
        let (status, delay, size, tx) = (
            self.status.clone(),
            self.delay_ms.clone(),
            self.answer_bytes.clone(),
            self.hits_tx.clone(),
        );
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (status, delay, size, tx) =
                    (status.clone(), delay.clone(), size.clone(), tx.clone());
                async move {
                    let _ = tx.send(Hit {
                        body: serde_json::from_str(&body).unwrap_or(Value::Null),
                        raw: body,
                        headers,
                    });
                    let wait = delay.load(Ordering::SeqCst);
                    if wait > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    }
                    (
                        axum::http::StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap(),
                        "x".repeat(size.load(Ordering::SeqCst)),
                    )
                }
            }),
        );
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        self.stop = Some(stop_tx);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
    }

    /// Stops serving: connections are refused until [`Receiver::up`].
    pub async fn down(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // The listener closes when the server task sees the signal; wait until it has.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("receiver did not stop");
    }

    /// The next request, within the wait.
    pub async fn next(&mut self) -> Hit {
        tokio::time::timeout(WAIT, self.hits.recv())
            .await
            .expect("a webhook within the wait")
            .expect("receiver open")
    }
}

impl TestServer {
    /// Registers a webhook endpoint through the API; (id, secret).
    pub async fn webhook(&self, url: &str, events: &[&str]) -> (String, String) {
        let mut body = serde_json::json!({ "url": url });
        if !events.is_empty() {
            body["events"] = serde_json::json!(events);
        }
        let r = self.post("/v3/conversations/webhooks", body).await;
        assert_eq!(r.status, 201, "{}", r.raw);
        (
            r.body["id"].as_str().unwrap().to_owned(),
            r.body["secret"].as_str().unwrap().to_owned(),
        )
    }
}

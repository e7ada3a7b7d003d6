//! A real switchboard on an ephemeral port with its own temporary database.

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use switchboard_server::domain::{Clock, Domain, DomainConfig};
use switchboard_server::store::sqlite::SqliteOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const KEY: &str = "xkeysib-test-key-0123456789";

pub struct TestServer {
    pub url: String,
    pub domain: Arc<Domain>,
    /// The default account, owner of [`KEY`].
    pub account: String,
    pub db: PathBuf,
    http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: Option<tempfile::TempDir>,
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
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("switchboard.db");
        let mut s = Self::start_on(db, config, clock).await;
        s.dir = Some(dir);
        s
    }

    /// Starts on an existing (or new) database file.
    pub async fn start_on(db: PathBuf, config: DomainConfig, clock: Clock) -> Self {
        let domain = switchboard_server::open(&db, SqliteOptions::default(), config, clock)
            .await
            .expect("open database");
        let boot = domain.bootstrap(Some(KEY)).await.expect("bootstrap");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(switchboard_server::serve(domain.clone(), listener, async {
            let _ = rx.await;
        }));
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
            dir: None,
        }
    }

    /// Stops gracefully and returns the temporary directory (to restart on it).
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server result");
        }
        self.dir.take()
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

    /// Rows of a table matching a condition, read straight from the database file.
    pub async fn count(&self, sql_where: &str) -> i64 {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", self.db.display()))
            .await
            .expect("open db");
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {sql_where}"))
            .fetch_one(&mut conn)
            .await
            .expect("count");
        n
    }
}

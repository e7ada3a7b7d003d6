//! A recording HTTP stub on 127.0.0.1:0 with scripted answers.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Router;
use tokio::net::TcpListener;

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Raw path (and query, if any), exactly as sent.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers.get_all(name).iter().count()
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Option<Duration>,
}

impl Reply {
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.into(),
            delay: None,
        }
    }

    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: vec![],
            body: String::new(),
            delay: None,
        }
    }

    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Self::json(
            status,
            serde_json::json!({ "code": code, "message": message }).to_string(),
        )
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

#[derive(Default)]
struct Shared {
    recorded: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
}

pub struct Stub {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Stub {
    pub async fn start(script: Vec<Reply>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Stub::serve(listener, script)
    }

    pub fn serve(listener: TcpListener, script: Vec<Reply>) -> Stub {
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            recorded: Mutex::new(Vec::new()),
            script: Mutex::new(script.into()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Stub { addr, shared }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v3", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.recorded.lock().unwrap().clone()
    }

    pub fn remaining_replies(&self) -> usize {
        self.shared.script.lock().unwrap().len()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    shared.recorded.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    });
    let reply = shared.script.lock().unwrap().pop_front();
    let Some(reply) = reply else {
        return Response::builder()
            .status(StatusCode::IM_A_TEAPOT)
            .body(Body::from("unscripted request"))
            .unwrap();
    };
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(*name, value);
    }
    response.body(Body::from(reply.body)).unwrap()
}

pub const MESSAGE: &str = r#"{"id":"eYBEm3gq3zc5ayE2g","type":"agent","text":"Hi","html":"Hi","visitorId":"v1","agentId":"a1","agentName":"Anna","createdAt":1700000000000,"isPushed":false,"isMissed":false,"isMissedByVisitor":false,"isTrigger":false,"receivedFrom":"crm"}"#;

pub const PUSHED: &str = r#"{"id":"pYBEm3gq3zc5ayE2g","type":"agent","text":"Shipped","html":"Shipped","visitorId":"v1","agentId":"a1","createdAt":5,"isPushed":true,"isMissed":false,"isMissedByVisitor":false,"isTrigger":false}"#;

//! `GET /health/ready`: 200 while the database answers reads and the writer takes jobs; 503
//! (Brevo's error body, `Retry-After`) while the writer cannot get on, and 200 again after.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::db::Conn;
use crate::harness::TestServer;

#[tokio::test]
async fn ready_answers_503_while_the_writer_cannot_get_on() {
    let s = TestServer::start().await;
    let ready = || async {
        let r = s
            .request(Method::GET, "/health/ready")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, retry, r.json::<Value>().await.unwrap())
    };
    let (status, _, body) = ready().await;
    assert_eq!((status, body), (200, serde_json::json!({"status": "ok"})));

    // Another connection holds what the writer's next transaction needs: SQLite's write
    // lock, PostgreSQL's feed head row.
    let mut conn = Conn::open_writable(&s.db).await;
    let hold = match conn {
        Conn::Postgres(_) => "BEGIN; SELECT seq FROM feed_head FOR UPDATE",
        Conn::Sqlite(_) => "BEGIN IMMEDIATE",
    };
    conn.execute(hold).await;
    let asked = Instant::now();
    let (status, retry, body) = ready().await;
    let waited = asked.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["code"], "bad_request");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("not ready:") && message.contains("within 2 s"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "answered after {waited:?}"
    );
    // Liveness is another question: the process is up.
    assert_eq!(s.get("/health").await.status, 200);

    conn.execute("ROLLBACK").await;
    conn.close().await;
    let (status, _, body) = ready().await;
    assert_eq!(status, 200, "{body}");
    s.stop().await;
}

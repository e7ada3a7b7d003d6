//! HTTP/1.1 connections over time: a kept-alive connection stays open between requests for
//! the idle timeout, which is longer than the deadline for a request's head; a head begun
//! on such a connection still has that deadline.

use std::time::{Duration, Instant};

use switchboard_server::domain::{Clock, DomainConfig};
use switchboard_server::ServeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{TestServer, WAIT};

async fn server(header: Duration, idle: Duration) -> (TestServer, String) {
    let options = ServeOptions {
        header_timeout: header,
        idle_timeout: idle,
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(DomainConfig::default(), Clock::System, options).await;
    let addr = s.url.strip_prefix("http://").unwrap().to_owned();
    (s, addr)
}

/// Sends `GET /health` on `c` and reads the whole answer; returns its head.
async fn health(c: &mut TcpStream) -> String {
    c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send");
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(WAIT, c.read(&mut chunk))
            .await
            .expect("an answer within the wait")
            .expect("read");
        assert!(n > 0, "the connection closed instead of answering");
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("content-length")
                .trim()
                .parse()
                .unwrap();
            if got.len() >= end + 4 + length {
                assert_eq!(got.len(), end + 4 + length, "more than one answer");
                return head;
            }
        }
    }
}

/// Waits for the server to close `c`; returns how long that took.
async fn closed(c: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
        .await
        .expect("the connection is still open after the wait")
        .expect("read to the end");
    assert!(
        rest.is_empty(),
        "got {:?} instead of a close",
        String::from_utf8_lossy(&rest)
    );
    started.elapsed()
}

#[tokio::test]
async fn an_idle_connection_outlives_the_header_timeout_until_the_idle_timeout() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_millis(1500));
    let (_s, addr) = server(header, idle).await;
    let mut c = TcpStream::connect(&addr).await.unwrap();
    let head = health(&mut c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("\r\nkeep-alive: timeout=1\r\n"), "{head}");
    // Idle for more than the head deadline: the connection is still there.
    tokio::time::sleep(header * 2).await;
    let head = health(&mut c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Then it is closed, quietly, once idle for the idle timeout.
    let after = closed(&mut c).await;
    assert!(
        after >= idle - Duration::from_millis(100) && after < idle * 3,
        "closed {after:?} after the answer, with an idle timeout of {idle:?}"
    );
}

#[tokio::test]
async fn a_request_head_begun_on_a_kept_alive_connection_must_end_in_time() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_secs(10));
    let (_s, addr) = server(header, idle).await;
    let mut c = TcpStream::connect(&addr).await.unwrap();
    health(&mut c).await;
    // Past the head deadline, but idle: then half a head, and nothing more.
    tokio::time::sleep(header * 2).await;
    c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let after = closed(&mut c).await;
    assert!(
        after >= header - Duration::from_millis(50) && after < idle / 2,
        "closed {after:?} after half a head, with a head deadline of {header:?}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_has_the_header_timeout() {
    let (header, idle) = (Duration::from_millis(300), Duration::from_secs(10));
    let (_s, addr) = server(header, idle).await;
    let mut c = TcpStream::connect(&addr).await.unwrap();
    let after = closed(&mut c).await;
    assert!(
        after >= header - Duration::from_millis(50) && after < idle / 2,
        "closed after {after:?}, with a head deadline of {header:?}"
    );
}

/// An answer promises a keep-alive time only when its connection stays open: not to a
/// request that said `Connection: close`, nor to HTTP/1.0 without `Connection: keep-alive`.
#[tokio::test]
async fn only_answers_that_keep_the_connection_say_for_how_long() {
    let (_s, addr) = server(Duration::from_secs(10), Duration::from_secs(60)).await;
    for (request, kept) in [
        (
            "GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            false,
        ),
        ("GET /health HTTP/1.0\r\nhost: x\r\n\r\n", false),
        (
            "GET /health HTTP/1.0\r\nhost: x\r\nconnection: keep-alive\r\n\r\n",
            true,
        ),
        ("GET /health HTTP/1.1\r\nhost: x\r\n\r\n", true),
    ] {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        // Until the whole answer is there (its body ends in `}`), or the server closes.
        while !got.ends_with(b"}") {
            let n = tokio::time::timeout(WAIT, c.read(&mut chunk))
                .await
                .expect("an answer within the wait")
                .expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        let answer = String::from_utf8(got).unwrap().to_ascii_lowercase();
        assert!(answer.contains(" 200 ok\r\n"), "{request:?}: {answer}");
        assert_eq!(
            answer.contains("\r\nkeep-alive: timeout=60\r\n"),
            kept,
            "{request:?}: {answer}"
        );
        if !kept {
            closed(&mut c).await;
        }
    }
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn raw(addr: &str, request: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut got))
        .await
        .expect("closed within the wait")
        .expect("read");
    String::from_utf8(got).expect("UTF-8")
}

/// Requests hyper cannot parse, which it answers itself without calling switchboard, get
/// Brevo's error body like every other error, and the connection is closed.
#[tokio::test]
async fn requests_that_are_not_valid_http_get_an_error_body() {
    let (s, addr) = server(Duration::from_secs(10), Duration::from_secs(60)).await;
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases = [
        (
            "a malformed header",
            "GET /health HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n".to_owned(),
            "400 Bad Request",
            "bad_request",
        ),
        (
            "a malformed request line",
            "GE T /health HTTP/1.1\r\nhost: x\r\n\r\n".to_owned(),
            "400 Bad Request",
            "bad_request",
        ),
        (
            "too many headers",
            format!("GET /health HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n"),
            "431 Request Header Fields Too Large",
            "out_of_range",
        ),
        (
            "a URI too long",
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)),
            "414 URI Too Long",
            "out_of_range",
        ),
    ];
    for (what, request, status, code) in cases {
        let answer = raw(&addr, request.as_bytes()).await;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: {answer:?}"));
        let head = head.to_ascii_lowercase();
        assert!(
            head.starts_with(&format!("http/1.1 {}", status.to_ascii_lowercase())),
            "{what}: {head}"
        );
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{what}: {head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{what}: {head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{what}: {head}"
        );
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:?}"));
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.len() > 20),
            "{what}: {body}"
        );
    }
    // The server goes on.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    assert!(health(&mut c).await.starts_with("http/1.1 200"));
    drop(s);
}

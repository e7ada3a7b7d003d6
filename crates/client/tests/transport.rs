//! Transport failures: connection refused (never reached the server) and connections
//! closed after the request was sent.

mod stub;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stub::MESSAGE;
use switchboard_client::{Client, Error, RetryPolicy, SendMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

#[tokio::test]
async fn connection_refused_until_attempts_run_out_is_a_connect_error() {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let client = Client::builder()
        .api_key("k")
        .base_url(format!("http://{addr}/v3"))
        .retry(
            RetryPolicy::default()
                .max_attempts(2)
                .initial_backoff(Duration::from_millis(5)),
        )
        .build()
        .unwrap();
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(std::error::Error::source(&e).is_some());
    drop(socket);
}

/// A raw HTTP/1.1 server that reads each request, drops the first `drop_first`
/// connections without answering, and answers the others with `200 MESSAGE`.
async fn flaky_server(drop_first: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            // Read the head and the body (Content-Length) of the request.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(read) = conn.read(&mut chunk).await {
                if read == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..read]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            if n <= drop_first {
                drop(conn); // the server saw the request, but never answers
                continue;
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                MESSAGE.len(),
                MESSAGE
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    (format!("http://{addr}/v3"), seen)
}

#[tokio::test]
async fn connection_closed_after_sending_is_retried_only_when_safe() {
    let fast = RetryPolicy::default()
        .initial_backoff(Duration::from_millis(5))
        .jitter(false);

    // GET: idempotent, retried.
    let (base, seen) = flaky_server(1).await;
    let client = Client::builder()
        .api_key("k")
        .base_url(&base)
        .retry(fast.clone())
        .build()
        .unwrap();
    client.conversations().get_message("m1").await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);

    // POST against switchboard: the Idempotency-Key makes the retry safe.
    let (base, seen) = flaky_server(1).await;
    let client = Client::builder()
        .api_key("k")
        .base_url(&base)
        .retry(fast.clone())
        .build()
        .unwrap();
    client
        .conversations()
        .send_message(SendMessage::new("v", "t"))
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);

    // POST in Brevo mode: the server may have created the message, so no retry.
    let (base, seen) = flaky_server(1).await;
    let client = Client::builder()
        .api_key("k")
        .base_url(&base)
        .retry(fast)
        .idempotent_posts(false)
        .build()
        .unwrap();
    let e = client
        .conversations()
        .send_message(SendMessage::new("v", "t"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

//! Transport failures: connection refused (never reached the server) and connections
//! closed after the request was sent.

mod stub;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stub::{Reply, Stub, MESSAGE};
use switchboard_client::{Client, Error, RetryPolicy, SendMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Signals every `retrying` event of the client, so a test can change the world between
/// two attempts without guessing at timing.
struct OnRetry(mpsc::UnboundedSender<()>);

struct Message(Option<String>);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: Subscriber> Layer<S> for OnRetry {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some("retrying") {
            let _ = self.0.send(());
        }
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(200))
        .jitter(false)
}

#[tokio::test] // current-thread runtime: the thread-local subscriber sees the client's events
async fn post_is_retried_after_connection_refused_even_in_brevo_mode() {
    let (tx, mut retries) = mpsc::unbounded_channel();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(OnRetry(tx)));

    // A bound socket that does not listen yet: connecting to it is refused, and the port
    // stays ours until we start listening on it.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let client = Client::builder()
        .api_key("k")
        .base_url(format!("http://{addr}/v3"))
        .idempotent_posts(false)
        .retry(policy())
        .build()
        .unwrap();
    assert!(!client.idempotent_posts());

    let call = tokio::spawn(async move {
        client
            .conversations()
            .send_message(SendMessage::new("v1", "Hi"))
            .await
    });
    // The first attempt was refused; the client now waits 200 ms before the next one.
    retries
        .recv()
        .await
        .expect("a retry after the refused connection");
    let stub = Stub::serve(socket.listen(16).unwrap(), vec![Reply::json(200, MESSAGE)]);

    let msg = call.await.unwrap().expect("second attempt succeeds");
    assert_eq!(msg.id, "eYBEm3gq3zc5ayE2g");
    let r = stub.requests();
    assert_eq!(r.len(), 1, "the refused attempt never reached the server");
    assert_eq!(r[0].path, "/v3/conversations/messages");
    assert!(r[0].header("idempotency-key").is_some());
    assert!(retries.try_recv().is_err(), "exactly one retry");
}

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

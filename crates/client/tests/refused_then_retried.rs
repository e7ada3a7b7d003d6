//! A POST whose first connection is refused is retried even in Brevo mode (the request
//! never reached the server).
//!
//! Alone in its test binary on purpose: it learns of the client's retry from a tracing
//! subscriber, and tracing caches per-callsite interest process-wide, so another test
//! thread hitting the same callsite without a subscriber could hide the event from it.

mod stub;

use std::time::Duration;

use stub::{Reply, Stub, MESSAGE};
use switchboard_client::{Client, RetryPolicy, SendMessage};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Bound on each wait: a broken client fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(30);

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

#[tokio::test]
async fn post_is_retried_after_connection_refused_even_in_brevo_mode() {
    let (tx, mut retries) = mpsc::unbounded_channel();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(OnRetry(tx)))
        .expect("the only subscriber of this test binary");

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
    tokio::time::timeout(LIMIT, retries.recv())
        .await
        .expect("the client retries within 30 s")
        .expect("a retry after the refused connection");
    let stub = Stub::serve(socket.listen(16).unwrap(), vec![Reply::json(200, MESSAGE)]);

    let msg = tokio::time::timeout(LIMIT, call)
        .await
        .expect("the call ends within 30 s")
        .unwrap()
        .expect("second attempt succeeds");
    assert_eq!(msg.id, "eYBEm3gq3zc5ayE2g");
    let r = stub.requests();
    assert_eq!(r.len(), 1, "the refused attempt never reached the server");
    assert_eq!(r[0].path, "/v3/conversations/messages");
    assert!(r[0].header("idempotency-key").is_some());
    assert!(retries.try_recv().is_err(), "exactly one retry");
}

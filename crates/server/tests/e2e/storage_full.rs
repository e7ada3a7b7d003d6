//! A full disk under the embedded SQLite store: writes are refused with a retryable 503 and
//! leave nothing behind, reads go on, and writing resumes by itself once there is room.
//!
//! The server gets a small tmpfs of its own: `unshare` runs it in a private mount namespace
//! (inside a user namespace, so that no privilege is needed) in which the test's temporary
//! directory is a tmpfs. The test reaches that tmpfs through `/proc/<pid>/root`, which
//! resolves paths in the server's namespace, to fill it up and to make room again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::process::{log_lines, sigterm_and_wait, start};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// The API key of the servers these tests start.
pub(crate) const KEY: &str = "k";
/// The room left for the writers of the first test once the tmpfs is full of filler.
const ROOM: u64 = 1024 * 1024;

/// Starts `switchboard serve` on an 8 MiB tmpfs mounted at `dir` in a mount namespace of
/// its own, logging at `warn`; returns the child, its URL and its log lines.
async fn serve_on_tmpfs(dir: &Path) -> (Child, String, mpsc::UnboundedReceiver<String>) {
    let probe = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .output()
        .expect("run unshare (util-linux)");
    assert!(
        probe.status.success(),
        "this test needs `unshare --user --map-root-user --mount` (a user and mount namespace \
         for a tmpfs of its own): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(
            r#"mount -t tmpfs -o size=8m switchboard-test "$1" && exec "$0" serve --listen 127.0.0.1:0 --db "$1/s.db""#,
        )
        .arg(BIN)
        .arg(dir)
        .env("RUST_LOG", "warn")
        .env("SWITCHBOARD_API_KEY", KEY)
        .stderr(Stdio::piped());
    let (mut child, url, _) = start(cmd).await;
    let log = log_lines(&mut child);
    (child, url, log)
}

/// `dir` as the server sees it: inside its mount namespace, where the tmpfs is.
fn inside(child: &Child, dir: &Path) -> PathBuf {
    let pid = child.id().expect("the server runs");
    Path::new(&format!("/proc/{pid}/root")).join(dir.strip_prefix("/").unwrap())
}

/// Fills the file system of `dir` with a file `filler`, then gives back `room` bytes.
fn fill(dir: &Path, room: u64) {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    // An 8 MiB tmpfs takes at most 128 chunks; the bound only keeps the loop finite.
    for _ in 0..1_000 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    assert!(written > room, "the tmpfs took only {written} bytes");
    f.set_len(written - room).expect("give room back");
}

/// An answer to [`post`].
pub(crate) struct Post {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) retry_after: Option<String>,
}

/// POSTs an agent message (agent `a@x.com`) with the key `k`, and an `Idempotency-Key`
/// when given.
pub(crate) async fn post(
    http: &reqwest::Client,
    url: &str,
    visitor: &str,
    text: &str,
    key: Option<&str>,
) -> Post {
    let mut req = http
        .post(format!("{url}/v3/conversations/messages"))
        .header("api-key", KEY)
        .json(
            &json!({"visitorId": visitor, "text": text, "agentEmail": "a@x.com", "agentName": "A"}),
        );
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let r = req.send().await.expect("the server answers");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.json().await.expect("a JSON body");
    Post {
        status,
        body,
        retry_after,
    }
}

/// A refusal for want of room: 503, `Retry-After`, Brevo's error body saying nothing was
/// applied.
fn assert_refused(p: &Post) {
    assert_eq!(p.status, 503, "{}", p.body);
    assert!(p.retry_after.is_some(), "503 without Retry-After");
    assert_eq!(p.body["code"], "bad_request", "{}", p.body);
    let msg = p.body["message"].as_str().unwrap_or_default();
    assert!(msg.contains("not applied"), "{msg}");
}

/// Every message of `visitor`, oldest first, as (id, text), read page by page.
async fn listed(http: &reqwest::Client, url: &str, visitor: &str) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..100 {
        let query = match &before {
            Some(id) => format!("?limit=100&before={id}"),
            None => "?limit=100".to_owned(),
        };
        let r = http
            .get(format!(
                "{url}/v3/conversations/visitors/{visitor}/messages{query}"
            ))
            .header("api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        let msgs = page["messages"].as_array().unwrap();
        let mut ids: Vec<(String, String)> = msgs
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        before = ids.first().map(|(id, _)| id.clone());
        ids.extend(all);
        all = ids;
        if page["hasMore"] != true {
            return all;
        }
    }
    panic!("more than 100 pages of messages for {visitor}");
}

#[tokio::test]
async fn a_full_disk_refuses_writes_loses_nothing_and_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, url, _log) = serve_on_tmpfs(dir.path()).await;
    let tmpfs = inside(&child, dir.path());
    assert!(tmpfs.join("s.db").exists(), "the database is on the tmpfs");
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let first = post(&http, &url, "visitor-0", "before the disk filled", None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first = (
        first.body["id"].as_str().unwrap().to_owned(),
        "before the disk filled".to_owned(),
    );

    fill(&tmpfs, ROOM);
    // Eight writers of 2 KB messages until each has been refused three times: the 1 MiB
    // left fill within a few hundred.
    let mut writers = Vec::new();
    for w in 0..8 {
        let (http, url) = (http.clone(), url.clone());
        writers.push(tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), Vec::new());
            for i in 0..400 {
                let text = format!("writer {w} message {i} {}", "x".repeat(2_000));
                let p = post(&http, &url, &format!("visitor-{w}"), &text, None).await;
                if p.status == 200 {
                    acked.push((p.body["id"].as_str().unwrap().to_owned(), text));
                } else {
                    assert_refused(&p);
                    refused.push(text);
                    if refused.len() == 3 {
                        break;
                    }
                }
            }
            (acked, refused)
        }));
    }
    let mut acked: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut refused = BTreeSet::new();
    for (w, h) in writers.into_iter().enumerate() {
        let (a, r) = h.await.unwrap();
        acked.insert(format!("visitor-{w}"), a);
        refused.extend(r);
    }
    assert_eq!(refused.len(), 8 * 3, "every writer met a full disk");

    acked.get_mut("visitor-0").unwrap().insert(0, first.clone());

    // Still full: a write with an idempotency key is refused and its key not kept; reads go on.
    let keyed = "with a key, refused first";
    assert_refused(&post(&http, &url, "visitor-9", keyed, Some("key-1")).await);
    let r = http
        .get(format!("{url}/v3/conversations/messages/{}", first.0))
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(listed(&http, &url, "visitor-0").await, acked["visitor-0"]);

    // Room again: writing resumes without a restart.
    std::fs::remove_file(tmpfs.join("filler")).expect("remove the filler");
    let again = post(&http, &url, "visitor-9", keyed, Some("key-1")).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let replayed = post(&http, &url, "visitor-9", keyed, Some("key-1")).await;
    assert_eq!(replayed.body, again.body, "the key was kept once written");
    let mut after = vec![(
        again.body["id"].as_str().unwrap().to_owned(),
        keyed.to_owned(),
    )];
    for i in 0..20 {
        let text = format!("after the disk was freed {i}");
        let p = post(&http, &url, "visitor-9", &text, None).await;
        assert_eq!(p.status, 200, "{}", p.body);
        after.push((p.body["id"].as_str().unwrap().to_owned(), text));
    }
    acked.insert("visitor-9".to_owned(), after);

    // Every acknowledged message is there, in order, and no refused one is.
    for (visitor, expected) in &acked {
        let got = listed(&http, &url, visitor).await;
        for (_, text) in &got {
            assert!(
                !refused.contains(text),
                "a refused write is in {visitor}'s messages"
            );
        }
        assert_eq!(&got, expected, "{visitor}'s messages");
    }
    sigterm_and_wait(&mut child).await;
}

/// A webhook receiver that holds its first request until released, then answers every
/// request 200, recording each request's `webhook-id`.
struct HeldReceiver {
    hits: std::sync::Mutex<Vec<String>>,
    arrived: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: watch::Receiver<bool>,
}

async fn held_receiver_hit(
    axum::extract::State(r): axum::extract::State<std::sync::Arc<HeldReceiver>>,
    headers: axum::http::HeaderMap,
) -> &'static str {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    r.hits.lock().unwrap().push(id);
    let first = r.arrived.lock().unwrap().take();
    if let Some(arrived) = first {
        let _ = arrived.send(());
        let _ = r.release.clone().wait_for(|go| *go).await;
    }
    "ok"
}

/// A receiver got an event and answered 200, but the store cannot record it (the disk is
/// full): the delivery is recorded later, once there is room, and not sent again meanwhile.
#[tokio::test]
async fn a_delivery_the_store_cannot_record_is_not_sent_again() {
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
    let (release, release_rx) = watch::channel(false);
    let receiver = std::sync::Arc::new(HeldReceiver {
        hits: Default::default(),
        arrived: std::sync::Mutex::new(Some(arrived_tx)),
        release: release_rx,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(held_receiver_hit))
        .with_state(receiver.clone());
    let receiver_task = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, url, mut log) = serve_on_tmpfs(dir.path()).await;
    let tmpfs = inside(&child, dir.path());
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/v3/conversations/webhooks"))
        .header("api-key", KEY)
        .json(&json!({"url": hook_url, "events": ["conversationStarted"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "registering the webhook");
    let webhook = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let p = post(&http, &url, "visitor-1", "a chat starts", None).await;
    assert_eq!(p.status, 200, "{}", p.body);

    let wait = std::time::Duration::from_secs(30);
    tokio::time::timeout(wait, arrived)
        .await
        .expect("the event is delivered")
        .unwrap();
    let event = receiver.hits.lock().unwrap()[0].clone();
    fill(&tmpfs, 0);
    release.send(true).unwrap();
    // Two failed tries to record the answer: before the fix, each came after a delivery
    // of its own.
    tokio::time::timeout(wait, async {
        let mut failed = 0;
        while failed < 2 {
            let line = log.recv().await.expect("the server logs");
            if line.contains("recording a webhook attempt") {
                failed += 1;
            }
        }
    })
    .await
    .expect("the server tries to record the attempt");
    let sent = |hits: &[String]| hits.iter().filter(|h| **h == event).count();
    assert_eq!(
        sent(&receiver.hits.lock().unwrap()),
        1,
        "sent again while the store could not record it"
    );

    std::fs::remove_file(tmpfs.join("filler")).expect("remove the filler");
    let deadline = tokio::time::Instant::now() + wait;
    let delivery = loop {
        let d: Value = http
            .get(format!(
                "{url}/v3/conversations/webhooks/{webhook}/deliveries/{event}"
            ))
            .header("api-key", KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["status"] == "delivered" {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "not recorded: {d}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(delivery["attempts"], 1, "{delivery}");
    assert_eq!(delivery["attemptLog"][0]["status"], 200, "{delivery}");
    assert_eq!(sent(&receiver.hits.lock().unwrap()), 1);
    sigterm_and_wait(&mut child).await;
    receiver_task.abort();
}

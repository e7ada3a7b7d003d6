//! A disk that fails to flush a commit, under the embedded SQLite store.
//!
//! When `fsync` of the WAL fails, SQLite gives the commit up, but its frames are already in
//! the WAL file, and a restart's recovery would apply them: a 503 "not applied" would then
//! be false, and an SDK's retry would write the message twice. The server must make sure
//! the failed commit can never come back before it says so, or else say the outcome is
//! unknown.
//!
//! The faults come from `tests/support/fault_fsync.c`, built here with the C compiler and
//! loaded into the server with `LD_PRELOAD`: it fails the WAL's flushes (leaving the data
//! in the page cache, as a real EIO does) as many times as a control file says.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::process::{log_lines, serve_command, start};
use crate::storage_full::{post, Post, KEY};

/// The writer's error line for a failed single-statement batch.
const FAST: &str = "inserting messages failed";
/// The writer's error line for a failed transaction.
const SLOW: &str = "commit failed; the batch is rolled back";

/// Builds the fault library into `dir` with `$CC` (default `cc`).
fn build_fault_library(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fault_fsync.c");
    let lib = dir.join("libfault_fsync.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .output()
        .unwrap_or_else(|e| panic!("this test needs a C compiler ({cc}): {e}"));
    assert!(
        out.status.success(),
        "building {}: {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// The fault control file: how many more WAL flushes are to fail.
struct Faults(PathBuf);

impl Faults {
    fn set(&self, n: u32) {
        std::fs::write(&self.0, format!("{n}\n")).expect("write the fault count");
    }

    fn left(&self) -> u32 {
        let s = std::fs::read_to_string(&self.0).expect("read the fault count");
        s.trim()
            .parse()
            .unwrap_or_else(|e| panic!("fault count {s:?}: {e}"))
    }
}

/// Starts `switchboard serve` on `db` (with the fault library when given); returns the
/// child, its URL and its log lines.
async fn serve(
    db: &Path,
    faults: Option<(&Path, &Faults)>,
) -> (Child, String, mpsc::UnboundedReceiver<String>) {
    // No timer may commit while a fault waits for the request under test, and no
    // checkpointer thread may empty the WAL (see the cases' warm-up).
    let flags = [
        "--fragment-delay",
        "3600",
        "--chat-timeout",
        "600",
        "--checkpoint-interval",
        "0",
    ];
    let mut cmd = serve_command(db, Some(KEY), &flags);
    cmd.stderr(Stdio::piped());
    if let Some((lib, control)) = faults {
        cmd.env("LD_PRELOAD", lib)
            .env("FAULT_FSYNC_FILE", &control.0);
    }
    let (mut child, url, _) = start(cmd).await;
    let log = log_lines(&mut child);
    (child, url, log)
}

/// Waits (at most 10 s) for a log line containing one of `what`; returns which.
async fn logged(log: &mut mpsc::UnboundedReceiver<String>, what: &[&'static str]) -> &'static str {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = log.recv().await {
            if let Some(found) = what.iter().find(|w| line.contains(**w)) {
                return *found;
            }
        }
        panic!("the server's log ended without any of {what:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with any of {what:?} within 10 s"))
}

/// The texts of `visitor`'s messages, oldest first; `None` for a visitor the server does
/// not know.
async fn texts(http: &reqwest::Client, url: &str, visitor: &str) -> Option<Vec<String>> {
    let r = http
        .get(format!(
            "{url}/v3/conversations/visitors/{visitor}/messages?limit=100"
        ))
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    Some(
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect(),
    )
}

/// Each case: the server is started with the faults, a message is posted while its commit's
/// flush fails, the answer is checked and the server is killed with SIGKILL at once, before
/// any other commit could overwrite the failed one's frames. Then a server without faults
/// must hold exactly what was answered 200.
#[tokio::test]
async fn a_commit_the_disk_failed_to_flush_is_not_applied_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lib = build_fault_library(dir.path());
    let faults = Faults(dir.path().join("faults"));
    faults.set(0);
    let db = dir.path().join("s.db");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    struct Case {
        what: &'static str,
        visitor: &'static str,
        key: Option<&'static str>,
        /// The first message goes to the visitor itself, so that the one under test takes
        /// the writer's single-statement path (a known conversation, an open chat); else to
        /// another visitor.
        warm: bool,
        /// The writer's log line for the failed batch, which tells the path it took.
        path: &'static str,
        /// How many flushes fail: 1 the commit's, 2 also the fence's after it.
        failures: u32,
        status: u16,
    }
    let cases = [
        Case {
            what: "a single-statement batch",
            visitor: "fast",
            key: None,
            warm: true,
            path: FAST,
            failures: 1,
            status: 503,
        },
        Case {
            what: "a transaction (the visitor's first message starts a chat)",
            visitor: "slow",
            key: None,
            warm: false,
            path: SLOW,
            failures: 1,
            status: 503,
        },
        Case {
            what: "a keyed message",
            visitor: "keyed",
            key: Some("key-1"),
            warm: true,
            path: SLOW,
            failures: 1,
            status: 503,
        },
        Case {
            what: "a batch whose fence fails too",
            visitor: "unknown",
            key: None,
            warm: true,
            path: FAST,
            failures: 2,
            status: 500,
        },
    ];
    // How many times each case ran: a batch that the server's own start-up work (its chat
    // timers, the purge of idempotency keys) happened to join takes the transaction path
    // whatever it holds, so a case that wants the single-statement path runs again then.
    let mut runs = Vec::new();
    for case in &cases {
        let mut run = 0;
        loop {
            run += 1;
            let (mut child, url, mut log) = serve(&db, Some((&lib, &faults))).await;
            // A commit first: the commit under test must not be the one that starts the
            // WAL over, which flushes the new WAL header before writing any frame; a
            // failure there leaves nothing to recover and would hide what this test is
            // after.
            let warm_up = if case.warm { case.visitor } else { "warm-up" };
            let p = post(&http, &url, warm_up, "before", None).await;
            assert_eq!(p.status, 200, "{}: {}", case.what, p.body);
            faults.set(case.failures);
            let Post { status, body, .. } = post(&http, &url, case.visitor, "lost", case.key).await;
            assert_eq!(faults.left(), 0, "{}: not every fault was met", case.what);
            assert_eq!(status, case.status, "{}: {body}", case.what);
            assert_eq!(body["code"], "bad_request", "{}: {body}", case.what);
            let message = body["message"].as_str().unwrap_or_default();
            if status == 503 {
                assert!(message.contains("not applied"), "{}: {message}", case.what);
            } else {
                assert!(
                    message.contains("may have been applied"),
                    "{}: {message}",
                    case.what
                );
            }
            // The path the batch took, from the writer's error line.
            let took = logged(&mut log, &[FAST, SLOW]).await;
            child.kill().await.expect("SIGKILL the server");
            if took == case.path {
                break;
            }
            assert!(run < 5, "{}: took {took:?} {run} times", case.what);
        }
        runs.push(run);
    }

    let (mut child, url, _log) = serve(&db, None).await;
    for (case, &run) in cases.iter().zip(&runs).filter(|(c, _)| c.status == 503) {
        let expected = case.warm.then(|| vec!["before".to_owned(); run]);
        assert_eq!(
            texts(&http, &url, case.visitor).await,
            expected,
            "{}: a message answered 503 was applied after the restart",
            case.what
        );
    }
    // "Safe to retry": the keyed retry is written, once.
    let first = post(&http, &url, "keyed", "lost", Some("key-1")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = post(&http, &url, "keyed", "lost", Some("key-1")).await;
    assert_eq!((again.status, &again.body), (200, &first.body));
    assert_eq!(
        texts(&http, &url, "keyed").await,
        Some(vec!["before".to_owned(), "lost".to_owned()])
    );
    child.kill().await.expect("stop the server");
}

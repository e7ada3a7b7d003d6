//! `switchboard backup` and `switchboard restore`: SQLite databases copied while the server
//! writes, and put back only while it is stopped. On PostgreSQL both point to its tools.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::db::TestDb;
use crate::process::{cli, fails, missing_messages, serve, sigterm_and_wait};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Runs `switchboard --db DB --json ARGS` without blocking the runtime (the test's writers
/// keep going meanwhile); it must succeed within 120 s.
async fn cli_while_serving(db: &Path, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(BIN)
        .arg("--db")
        .arg(db)
        .arg("--json")
        .args(args)
        .env_remove("SWITCHBOARD_API_KEY")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .unwrap_or_else(|_| panic!("{args:?} still running after 120 s"))
        .expect("run switchboard");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// POSTs an agent message; returns its id.
async fn post(http: &reqwest::Client, url: &str, text: &str) -> String {
    let res = http
        .post(format!("{url}/v3/conversations/messages"))
        .header("api-key", "k")
        .json(&json!({"visitorId": "v1", "text": text, "agentEmail": "a@x.com", "agentName": "A"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 200);
    let m: Value = res.json().await.expect("message");
    m["id"].as_str().expect("id").to_owned()
}

async fn status_of(http: &reqwest::Client, url: &str, id: &str) -> u16 {
    http.get(format!("{url}/v3/conversations/messages/{id}"))
        .header("api-key", "k")
        .send()
        .await
        .expect("GET")
        .status()
        .as_u16()
}

/// On PostgreSQL both verbs refuse, naming the tool to use.
async fn postgres_refuses(url: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let url = url.to_str().unwrap();
    let file = dir.path().join("b.db");
    let file = file.to_str().unwrap();
    let err = fails(dir.path(), &["--db", url, "backup", file]).await;
    assert!(err.contains("pg_dump"), "{err}");
    let err = fails(dir.path(), &["--db", url, "restore", file, "--replace"]).await;
    assert!(err.contains("pg_restore"), "{err}");
}

/// A backup taken while eight writers POST holds every message acknowledged before it
/// started, passes SQLite's check, and is a database a server can run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_holds_every_message_acknowledged_before_it() {
    let storage = TestDb::new().await;
    if storage.is_postgres() {
        return postgres_refuses(&storage.path).await;
    }
    let db = storage.path.clone();
    let dir = storage.dir().expect("sqlite dir").to_path_buf();
    let (mut child, url, _) = serve(&db, Some("k")).await;
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (http, url, tx, stop) = (http.clone(), url.clone(), tx.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let text = format!("writer {w} message {i}");
                let res = http
                    .post(format!("{url}/v3/conversations/messages"))
                    .header("api-key", "k")
                    .json(&json!({"visitorId": format!("visitor-{w}"), "text": text, "agentEmail": "a@x.com", "agentName": "A"}))
                    .send()
                    .await
                    .expect("POST");
                assert_eq!(res.status(), 200, "a write failed during the backup");
                let m: Value = res.json().await.expect("message");
                let _ = tx.send((m["id"].as_str().expect("id").to_owned(), text));
            }
        }));
    }
    drop(tx);
    let mut before = Vec::new();
    while before.len() < 300 {
        before.push(rx.recv().await.expect("writers running"));
    }
    // Everything received by now was acknowledged before the backup starts.
    while let Ok(a) = rx.try_recv() {
        before.push(a);
    }
    let backup = dir.join("copy.db");
    let out = cli_while_serving(&db, &["backup", backup.to_str().unwrap()]).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let mut all = before.len();
    while rx.recv().await.is_some() {
        all += 1;
    }
    sigterm_and_wait(&mut child).await;

    let messages = out["messages"].as_u64().expect("messages") as usize;
    assert!(
        messages >= before.len() && messages <= all,
        "the backup holds {messages} messages; {} were acknowledged before it, {all} in all",
        before.len()
    );
    assert_eq!(out["file"], backup.to_str().unwrap());
    assert_eq!(out["accounts"], 1);
    assert_eq!(
        out["bytes"].as_u64(),
        Some(std::fs::metadata(&backup).unwrap().len())
    );
    for leftover in ["copy.db.partial", "copy.db-wal", "copy.db-journal"] {
        assert!(!dir.join(leftover).exists(), "{leftover} left behind");
    }
    // Never over an existing file.
    let err = fails(
        &dir,
        &[
            "--db",
            db.to_str().unwrap(),
            "backup",
            backup.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        err.contains("exists") && err.contains("never overwrites"),
        "{err}"
    );

    let (mut child, url, _) = serve(&backup, Some("k")).await;
    let missing = missing_messages(&http, &url, &before).await;
    assert!(
        missing.is_empty(),
        "{} of {} messages acknowledged before the backup are not in it: {missing:?}",
        missing.len(),
        before.len()
    );
    sigterm_and_wait(&mut child).await;
}

/// A restore replaces the database of a stopped server (here one killed with its last
/// commit still in the WAL) with the backup, only when told to, and new positions start
/// above the ones the replaced database handed out, so a stream resuming from one of them
/// misses nothing.
#[tokio::test]
async fn restore_replaces_a_stopped_database_and_numbers_on_above_it() {
    let storage = TestDb::new().await;
    if storage.is_postgres() {
        return; // the refusal is checked by the backup test
    }
    let db = storage.path.clone();
    let db_arg = db.to_str().unwrap().to_owned();
    let dir = storage.dir().expect("sqlite dir").to_path_buf();
    let backup = dir.join("b.db");
    let backup_arg = backup.to_str().unwrap().to_owned();
    let http = reqwest::Client::new();

    let (mut child, url, _) = serve(&db, Some("k")).await;
    let kept = post(&http, &url, "in the backup").await;
    cli(&db, &["backup", &backup_arg]);
    let mut later = Vec::new();
    for i in 0..5 {
        later.push(post(&http, &url, &format!("after the backup {i}")).await);
    }
    let err = fails(
        &dir,
        &["--db", &db_arg, "restore", &backup_arg, "--replace"],
    )
    .await;
    assert!(
        err.contains("restoring needs the server stopped")
            && err.contains("served by another switchboard process"),
        "{err}"
    );
    child.kill().await.expect("SIGKILL");
    child.wait().await.expect("exit");

    // Read-only, so that nothing checkpoints the killed server's WAL before the restore:
    // its commits are still in `s.db-wal`, which a file copied over `s.db` would get.
    let wal = std::fs::metadata(dir.join("s.db-wal")).map(|m| m.len());
    assert!(matches!(wal, Ok(n) if n > 0), "no WAL left: {wal:?}");
    let old_head: i64 =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open")
            .query_row("SELECT max(seq) FROM messages", [], |r| r.get(0))
            .expect("head");
    let err = fails(&dir, &["--db", &db_arg, "restore", &backup_arg]).await;
    assert!(
        err.contains("exists (1 accounts, 6 messages)") && err.contains("--replace"),
        "{err}"
    );
    let out = cli(&db, &["restore", &backup_arg, "--replace"]);
    assert_eq!(out["messages"], 1, "{out}");
    assert_eq!(out["file"], db_arg.as_str());
    assert!(!dir.join("s.db.restoring").exists(), "staging file left");

    let (mut child, url, _) = serve(&db, Some("k")).await;
    assert_eq!(status_of(&http, &url, &kept).await, 200);
    for id in &later {
        assert_eq!(status_of(&http, &url, id).await, 404, "{id} came back");
    }
    // A client that had read up to the replaced database's last position resumes there.
    let res = http
        .get(format!("{url}/v3/conversations/events"))
        .header("api-key", "k")
        .header("last-event-id", old_head.to_string())
        .send()
        .await
        .expect("events");
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let new = post(&http, &url, "after the restore").await;
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(&new) {
            let chunk = body.next().await.expect("stream open").expect("chunk");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the new message never reached the resumed stream: {seen}"));
    sigterm_and_wait(&mut child).await;
}

/// Restoring into a fresh path needs no `--replace`; files that are not switchboard backups
/// are refused before anything is written.
#[tokio::test]
async fn restore_checks_what_it_is_given() {
    let storage = TestDb::sqlite();
    let dir = storage.dir().unwrap().to_path_buf();
    let db = storage.path.clone();
    cli(&db, &["agents", "add", "--name", "Ada"]);
    let backup = dir.join("b.db");
    let out = cli(&db, &["backup", backup.to_str().unwrap()]);
    assert_eq!(out["accounts"], 1, "{out}");

    let fresh = dir.join("fresh.db");
    let out = cli(&fresh, &["restore", backup.to_str().unwrap()]);
    assert_eq!(out["accounts"], 1, "{out}");
    let agents = cli(&fresh, &["agents", "list"]);
    assert_eq!(agents[0]["name"], "Ada", "{agents}");

    let fresh_arg = dir.join("other.db");
    let fresh_arg = fresh_arg.to_str().unwrap();
    let not_sqlite = dir.join("notes.txt");
    std::fs::write(&not_sqlite, "x".repeat(4096)).unwrap();
    let plain = dir.join("plain.db");
    rusqlite_create(&plain);
    let cases: [(&Path, &str); 3] = [
        (&dir.join("missing.db"), "no backup at"),
        (&not_sqlite, "is not an SQLite database"),
        (&plain, "is not a switchboard database"),
    ];
    for (file, expected) in cases {
        let err = fails(
            &dir,
            &["--db", fresh_arg, "restore", file.to_str().unwrap()],
        )
        .await;
        assert!(err.contains(expected), "{file:?}: {err}");
    }
    assert!(
        !dir.join("other.db").exists(),
        "a refused restore made a file"
    );
    // Replacing a database whose positions cannot be read works, and says what that means.
    let out = cli(&plain, &["restore", backup.to_str().unwrap(), "--replace"]);
    assert_eq!(out["accounts"], 1, "{out}");
    let warning = out["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("could not be read") && warning.contains("without a cursor"),
        "{out}"
    );
    // One that is not a database at all is left alone, with what to do.
    let err = fails(
        &dir,
        &[
            "--db",
            not_sqlite.to_str().unwrap(),
            "restore",
            backup.to_str().unwrap(),
            "--replace",
        ],
    )
    .await;
    assert!(
        err.contains("move it and its -wal and -shm files away"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&not_sqlite).unwrap(),
        "x".repeat(4096).as_bytes()
    );
    let err = fails(
        &dir,
        &[
            "--db",
            dir.join("missing.db").to_str().unwrap(),
            "backup",
            dir.join("c.db").to_str().unwrap(),
        ],
    )
    .await;
    assert!(err.contains("no database at"), "{err}");
    assert!(!dir.join("missing.db").exists(), "a backup made a database");
}

/// An SQLite database that is not switchboard's.
fn rusqlite_create(path: &Path) {
    let c = rusqlite::Connection::open(path).expect("create");
    c.execute_batch("CREATE TABLE t (x INTEGER)")
        .expect("table");
}

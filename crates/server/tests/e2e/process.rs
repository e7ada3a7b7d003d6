//! The `switchboard` binary as a user runs it: CLI verbs, start-up, SIGTERM and SIGKILL.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn cli(db: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(BIN)
        .arg("--db")
        .arg(db)
        .arg("--json")
        .args(args)
        .env_remove("SWITCHBOARD_API_KEY")
        .output()
        .expect("run switchboard");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Starts `switchboard serve` on port 0; returns the child, its URL and the stdout lines
/// printed before the listening line.
async fn serve(db: &Path, api_key: Option<&str>) -> (Child, String, Vec<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--db")
        .arg(db);
    cmd.env("RUST_LOG", "warn")
        .env_remove("SWITCHBOARD_API_KEY");
    if let Some(k) = api_key {
        cmd.env("SWITCHBOARD_API_KEY", k);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut before = Vec::new();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix("listening on ") {
                return url.to_owned();
            }
            before.push(line);
        }
        panic!("server exited before listening");
    })
    .await
    .expect("server did not start within 60 s");
    (child, url, before)
}

#[tokio::test]
async fn first_start_prints_one_key_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let (mut child, url, lines) = serve(&db, None).await;
    let key = lines
        .iter()
        .find_map(|l| l.split("keep it): ").nth(1))
        .unwrap_or_else(|| panic!("no key printed: {lines:?}"))
        .to_owned();
    assert!(key.starts_with("xkeysib-"));
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let health = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let r = http
        .get(format!("{url}/v3/conversations/messages/x"))
        .header("api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    child.kill().await.unwrap();
    // Second start: the key is not printed again.
    let (mut child, _, lines) = serve(&db, None).await;
    assert!(lines.iter().all(|l| !l.contains("xkeysib-")), "{lines:?}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn cli_manages_accounts_keys_agents_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let group = cli(&db, &["groups", "add", "Sales"]);
    let gid = group["id"].as_str().unwrap().to_owned();
    let agent = cli(
        &db,
        &[
            "agents",
            "add",
            "--name",
            "Julia",
            "--email",
            "julia@x.com",
            "--userpic",
            "https://p/j.png",
            "--group",
            &gid,
        ],
    );
    assert_eq!(agent["groups"], json!([gid]));
    assert_eq!(agent["userpic"], "https://p/j.png");
    let agents = cli(&db, &["agents", "list"]);
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(cli(&db, &["groups", "list"])[0]["name"], "Sales");
    let key = cli(&db, &["keys", "create", "--name", "ci"]);
    let secret = key["apiKey"].as_str().unwrap().to_owned();
    let keys = cli(&db, &["keys", "list"]);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("apiKey").is_none()),
        "keys list never shows keys"
    );
    let account = cli(&db, &["accounts", "create", "Acme"]);
    assert!(account["apiKey"].as_str().unwrap().starts_with("xkeysib-"));
    assert_eq!(cli(&db, &["accounts", "list"]).as_array().unwrap().len(), 2);

    // The server accepts the CLI's key and sees the CLI's agent; the other account does not.
    let (mut child, url, _) = serve(&db, None).await;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let send = |key: String| {
        http.post(format!("{url}/v3/conversations/pushedMessages"))
            .header("api-key", key)
            .json(&json!({"visitorId": "v", "text": "t", "groupId": gid}))
            .send()
    };
    let r = send(secret.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["agentId"], agent["id"]);
    assert_eq!(
        send(account["apiKey"].as_str().unwrap().to_owned())
            .await
            .unwrap()
            .status(),
        400
    );

    // Errors exit non-zero with a message.
    let out = std::process::Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["groups", "add", "Sales"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    cli(&db, &["keys", "revoke", key["id"].as_str().unwrap()]);
    cli(&db, &["agents", "remove", agent["id"].as_str().unwrap()]);
    cli(&db, &["groups", "remove", &gid]);
    assert_eq!(cli(&db, &["agents", "list"]), json!([]));
    child.kill().await.unwrap();
}

#[tokio::test]
async fn sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let (mut child, url, _) = serve(&db, Some("k")).await;
    let r = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client")
        .post(format!("{url}/v3/conversations/messages"))
        .header("api-key", "k")
        .json(&json!({"visitorId": "v", "text": "t", "agentEmail": "a@x.com", "agentName": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // A clean close checkpoints the WAL away.
    assert!(
        !dir.path().join("s.db-wal").exists()
            || std::fs::metadata(dir.path().join("s.db-wal"))
                .unwrap()
                .len()
                == 0
    );
}

/// Every message that got a 200 is there after SIGKILL and a restart.
#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let (mut child, url, _) = serve(&db, Some("k")).await;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut writers = Vec::new();
    for w in 0..16 {
        let (http, url, tx) = (http.clone(), url.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..5_000 {
                let text = format!("writer {w} message {i}");
                let res = http
                    .post(format!("{url}/v3/conversations/messages"))
                    .header("api-key", "k")
                    .json(&json!({"visitorId": format!("visitor-{w}"), "text": text, "agentEmail": "a@x.com", "agentName": "A"}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                        Ok(m) => {
                            let _ = tx.send((m["id"].as_str().unwrap_or_default().to_owned(), text));
                        }
                        Err(_) => return,
                    },
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return,
                }
            }
        }));
    }
    drop(tx);
    let mut acked = Vec::new();
    while acked.len() < 400 {
        match rx.recv().await {
            Some(a) => acked.push(a),
            None => break,
        }
    }
    child.kill().await.expect("SIGKILL");
    while let Some(a) = rx.recv().await {
        acked.push(a);
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        acked.len() >= 400,
        "only {} writes were acknowledged",
        acked.len()
    );

    let (mut child, url, _) = serve(&db, Some("k")).await;
    let mut missing = Vec::new();
    for (id, text) in &acked {
        let r = http
            .get(format!("{url}/v3/conversations/messages/{id}"))
            .header("api-key", "k")
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            missing.push(id.clone());
            continue;
        }
        assert_eq!(r.json::<Value>().await.unwrap()["text"], text.as_str());
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost: {missing:?}",
        missing.len(),
        acked.len()
    );
    child.kill().await.unwrap();
}

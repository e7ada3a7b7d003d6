//! The API verbs of the `switchboard` binary (`msg`, `push`, `ping`, `visitor-group`)
//! against a real `switchboard serve` process on `127.0.0.1:0`, on the backend the
//! environment selects (see `support/db.rs`).

#[path = "support/db.rs"]
#[allow(dead_code)]
mod db;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const KEY: &str = "xkeysib-cli-test-key-0123456789";
const LIMIT: Duration = Duration::from_secs(60);

struct Served {
    /// `http://127.0.0.1:PORT`, as printed by the server.
    url: String,
    db: PathBuf,
    _child: Child,
    _db: db::TestDb,
}

/// Starts `switchboard serve` on port 0 with [`KEY`] and waits for its listening line.
async fn serve() -> Served {
    let storage = db::TestDb::new().await;
    let db = storage.path.clone();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .env("SWITCHBOARD_API_KEY", KEY)
        .env("RUST_LOG", "warn")
        .env_remove("SWITCHBOARD_PARTNER_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchboard serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let url = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix("listening on ") {
                return url.to_owned();
            }
        }
        panic!("switchboard serve exited before listening");
    })
    .await
    .expect("switchboard serve did not listen within 60 s");
    Served {
        url,
        db,
        _child: child,
        _db: storage,
    }
}

/// What a run of the binary printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "stderr: {}", self.stderr);
        assert_eq!(self.stderr, "", "no diagnostics on success");
        &self.stdout
    }

    #[track_caller]
    fn json(&self) -> Value {
        let out = self.ok();
        assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
        serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Asserts exit status 1, nothing on stdout, and exactly `stderr`.
    #[track_caller]
    fn fails_with(&self, stderr: &str) {
        assert_eq!(self.code, Some(1), "stdout: {}", self.stdout);
        assert_eq!(self.stdout, "");
        assert_eq!(self.stderr, format!("{stderr}\n"));
    }
}

/// Runs `switchboard ARGS` with the API URL and key in the environment.
async fn run_env(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SWITCHBOARD_URL")
        .env_remove("SWITCHBOARD_API_KEY")
        .env_remove("SWITCHBOARD_PARTNER_KEY")
        .env_remove("SWITCHBOARD_DB")
        .env_remove("SWITCHBOARD_ACCOUNT")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("switchboard {args:?} did not finish within 60 s"))
        .expect("run switchboard");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

impl Served {
    /// `switchboard ARGS` with `SWITCHBOARD_URL=<url>/v3` and `SWITCHBOARD_API_KEY`.
    async fn run(&self, args: &[&str]) -> Run {
        let base = format!("{}/v3", self.url);
        run_env(
            &[("SWITCHBOARD_URL", &base), ("SWITCHBOARD_API_KEY", KEY)],
            args,
        )
        .await
    }

    /// An admin verb on the server's database, with `--json`.
    async fn admin(&self, args: &[&str]) -> Value {
        let db = path_str(&self.db);
        let mut all = vec!["--db", db, "--json"];
        all.extend_from_slice(args);
        run_env(&[], &all).await.json()
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 database path")
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn msg_verbs_send_get_edit_delete() {
    let s = serve().await;
    let group = id_of(&s.admin(&["groups", "add", "Sales"]).await);
    let liz = id_of(
        &s.admin(&[
            "agents",
            "add",
            "--name",
            "Liz",
            "--email",
            "liz@example.com",
            "--group",
            &group,
        ])
        .await,
    );

    // --json: the API's object.
    let sent = s
        .run(&[
            "--json",
            "msg",
            "send",
            "--visitor",
            "v1",
            "--text",
            "Hello",
            "--agent-id",
            &liz,
            "--received-from",
            "ops-shell",
        ])
        .await
        .json();
    let id = id_of(&sent);
    assert_eq!(id.len(), 17, "{id}");
    let created_at = sent["createdAt"].as_i64().expect("createdAt");
    assert_eq!(
        sent,
        json!({
            "id": id, "type": "agent", "text": "Hello", "html": "Hello", "visitorId": "v1",
            "agentId": liz, "agentName": "Liz", "createdAt": created_at, "isPushed": false,
            "isMissed": false, "isMissedByVisitor": false, "isTrigger": false,
            "receivedFrom": "ops-shell",
        })
    );

    // Human output, --json after the verb, and a base URL without /v3.
    assert_eq!(
        s.run(&["msg", "get", &id]).await.ok(),
        format!("message {id} (agent Liz → visitor v1): Hello\n")
    );
    assert_eq!(s.run(&["msg", "get", &id, "--json"]).await.json(), sent);
    assert_eq!(
        run_env(
            &[("SWITCHBOARD_API_KEY", KEY)],
            &["msg", "get", &id, "--base-url", &s.url],
        )
        .await
        .ok(),
        format!("message {id} (agent Liz → visitor v1): Hello\n")
    );
    assert_eq!(
        run_env(
            &[],
            &[
                "msg",
                "get",
                &id,
                "--base-url",
                &format!("{}/v3/", s.url),
                "--api-key",
                KEY
            ],
        )
        .await
        .ok(),
        format!("message {id} (agent Liz → visitor v1): Hello\n")
    );

    // Send by email, human output.
    let out = s
        .run(&[
            "msg",
            "send",
            "--visitor",
            "v1",
            "--text",
            "Hi there",
            "--agent-email",
            "liz@example.com",
        ])
        .await;
    let line = out.ok().to_owned();
    let id2 = line
        .strip_prefix("message ")
        .and_then(|rest| rest.split_once(' '))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("unexpected output: {line}"));
    assert_eq!(
        line,
        format!("message {id2} (agent Liz → visitor v1): Hi there\n")
    );
    // A new agent by email and name.
    let anna = s
        .run(&[
            "msg",
            "send",
            "--visitor",
            "v2",
            "--text",
            "Hi",
            "--agent-email",
            "anna@example.com",
            "--agent-name",
            "Anna",
            "--json",
        ])
        .await
        .json();
    assert_eq!(anna["agentName"], "Anna");
    assert_ne!(anna["agentId"], json!(liz));

    // Edit.
    let edited = s
        .run(&["msg", "edit", &id, "--text", "Edited", "--json"])
        .await
        .json();
    assert_eq!(
        edited,
        json!({
            "id": id, "type": "agent", "text": "Edited", "html": "Edited", "visitorId": "v1",
            "agentId": liz, "agentName": "Liz", "createdAt": created_at, "isPushed": false,
            "isMissed": false, "isMissedByVisitor": false, "isTrigger": false,
            "receivedFrom": "ops-shell",
        })
    );
    assert_eq!(
        s.run(&["msg", "edit", &id2, "--text", "Edited too"])
            .await
            .ok(),
        format!("message {id2} (agent Liz → visitor v1): Edited too\n")
    );

    // Delete.
    assert_eq!(
        s.run(&["msg", "delete", &id, "--json"]).await.json(),
        json!({ "deleted": id })
    );
    assert_eq!(
        s.run(&["msg", "delete", &id2]).await.ok(),
        format!("deleted message {id2}\n")
    );
    s.run(&["msg", "get", &id]).await.fails_with(&format!(
        "error: document_not_found: Message {id} does not exist (HTTP 404)"
    ));
    s.run(&["msg", "delete", &id2, "--json"])
        .await
        .fails_with(&format!(
            "error: document_not_found: Message {id2} does not exist (HTTP 404)"
        ));

    // The same idempotency key and flags: one message; other flags: refused.
    let args = |text: &'static str| {
        vec![
            "msg".to_owned(),
            "send".into(),
            "--visitor".into(),
            "v1".into(),
            "--text".into(),
            text.into(),
            "--agent-id".into(),
            liz.clone(),
            "--idempotency-key".into(),
            "ops-1".into(),
            "--json".into(),
        ]
    };
    let a = args("once");
    let first = s.run(&strs(&a)).await.json();
    let second = s.run(&strs(&a)).await.json();
    assert_eq!(first, second);
    s.run(&strs(&args("twice"))).await.fails_with(
        "error: duplicate_request: this Idempotency-Key was already used with a different request; use a new key for a new request (HTTP 400)",
    );
}

#[tokio::test]
async fn push_ping_and_visitor_group_verbs() {
    let s = serve().await;
    let group = id_of(&s.admin(&["groups", "add", "Sales"]).await);
    let liz = id_of(
        &s.admin(&["agents", "add", "--name", "Liz", "--group", &group])
            .await,
    );

    // push send / get / edit / delete
    let pushed = s
        .run(&[
            "push",
            "send",
            "--visitor",
            "v1",
            "--text",
            "Shipped",
            "--group-id",
            &group,
            "--json",
        ])
        .await
        .json();
    let pid = id_of(&pushed);
    assert_eq!(pushed["isPushed"], true);
    assert_eq!(pushed["agentId"], json!(liz));
    assert_eq!(pushed["text"], "Shipped");
    assert_eq!(pushed["visitorId"], "v1");
    assert_eq!(
        s.run(&["push", "get", &pid]).await.ok(),
        format!("pushed message {pid} (agent Liz → visitor v1): Shipped\n")
    );
    assert_eq!(s.run(&["--json", "push", "get", &pid]).await.json(), pushed);
    let by_agent = s
        .run(&[
            "push",
            "send",
            "--visitor",
            "v1",
            "--text",
            "From Liz",
            "--agent-id",
            &liz,
        ])
        .await;
    assert!(
        by_agent.ok().starts_with("pushed message ")
            && by_agent
                .ok()
                .ends_with(" (agent Liz → visitor v1): From Liz\n"),
        "{}",
        by_agent.stdout
    );
    let edited = s
        .run(&["push", "edit", &pid, "--text", "Delivered", "--json"])
        .await
        .json();
    assert_eq!(edited["text"], "Delivered");
    assert_eq!(edited["id"], json!(pid));
    assert_eq!(edited["createdAt"], pushed["createdAt"]);
    assert_eq!(
        s.run(&["push", "edit", &pid, "--text", "Delivered!"])
            .await
            .ok(),
        format!("pushed message {pid} (agent Liz → visitor v1): Delivered!\n")
    );
    // A pushed message is not under /messages.
    s.run(&["msg", "get", &pid]).await.fails_with(&format!(
        "error: document_not_found: Message {pid} does not exist (HTTP 404)"
    ));
    assert_eq!(
        s.run(&["push", "delete", &pid]).await.ok(),
        format!("deleted pushed message {pid}\n")
    );
    s.run(&["push", "get", &pid]).await.fails_with(&format!(
        "error: document_not_found: Pushed message {pid} does not exist (HTTP 404)"
    ));
    s.run(&["push", "delete", &pid, "--json"])
        .await
        .fails_with(&format!(
            "error: document_not_found: Pushed message {pid} does not exist (HTTP 404)"
        ));
    let p2 = id_of(
        &s.run(&["push", "send", "--visitor", "v1", "--text", "x", "--json"])
            .await
            .json(),
    );
    assert_eq!(
        s.run(&["push", "delete", &p2, "--json"]).await.json(),
        json!({ "deleted": p2 })
    );

    // ping: the admin CLI sees the agent online afterwards.
    assert_eq!(s.admin(&["agents", "list"]).await[0]["online"], false);
    assert_eq!(
        s.run(&["ping", "--agent-id", &liz]).await.ok(),
        format!("agent {liz} is online\n")
    );
    assert_eq!(s.admin(&["agents", "list"]).await[0]["online"], true);
    assert_eq!(
        s.run(&["ping", "--agent-id", &liz, "--json"]).await.json(),
        json!({ "online": true })
    );
    assert_eq!(
        s.run(&[
            "ping",
            "--agent-email",
            "new@example.com",
            "--agent-name",
            "New"
        ])
        .await
        .ok(),
        "agent new@example.com is online\n"
    );
    let agents = s.admin(&["agents", "list"]).await;
    let new = agents
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["email"] == "new@example.com")
        .unwrap_or_else(|| panic!("no new agent: {agents}"));
    assert_eq!(
        (&new["name"], &new["online"]),
        (&json!("New"), &json!(true))
    );
    s.run(&["ping", "--agent-id", "nobody"]).await.fails_with(
        "error: invalid_parameter: agentId nobody does not match any agent of this account (HTTP 400)",
    );
    s.run(&["ping"]).await.fails_with(
        "error: missing_parameter: agentId or agentEmail is required: name the agent by agentId, or by agentEmail (with agentName to create an agent that does not exist yet) (HTTP 400)",
    );

    // visitor-group
    assert_eq!(
        s.run(&[
            "visitor-group",
            "--visitor",
            "v1",
            "--group",
            &group,
            "--json"
        ])
        .await
        .json(),
        json!({ "visitorId": "v1", "groupId": group })
    );
    assert_eq!(
        s.run(&["visitor-group", "--visitor", "v1", "--group", &group])
            .await
            .ok(),
        format!("visitor v1 is in group {group}\n")
    );
    assert_eq!(
        s.run(&["visitor-group", "--visitor", "v1", "--remove"])
            .await
            .ok(),
        "visitor v1 is in no group\n"
    );
    assert_eq!(
        s.run(&["visitor-group", "--visitor", "v1", "--remove", "--json"])
            .await
            .json(),
        json!({ "visitorId": "v1" })
    );
    s.run(&["visitor-group", "--visitor", "nobody", "--remove"])
        .await
        .fails_with(
            "error: document_not_found: visitor nobody does not exist (a visitor exists once a message was sent to or by it) (HTTP 404)",
        );
    s.run(&["visitor-group", "--visitor", "v1", "--group", "nogroup"])
        .await
        .fails_with(
            "error: invalid_parameter: groupId nogroup does not match any group of this account (HTTP 400)",
        );
}

#[tokio::test]
async fn errors_print_code_and_message_and_exit_non_zero() {
    let s = serve().await;
    let liz = id_of(&s.admin(&["agents", "add", "--name", "Liz"]).await);

    s.run(&["msg", "get", "nosuchmessage"])
        .await
        .fails_with("error: document_not_found: Message nosuchmessage does not exist (HTTP 404)");
    s.run(&["msg", "get", "a/b c", "--json"])
        .await
        .fails_with("error: document_not_found: Message a/b c does not exist (HTTP 404)");
    s.run(&["push", "edit", "nosuchmessage", "--text", "x"])
        .await
        .fails_with(
            "error: document_not_found: Pushed message nosuchmessage does not exist (HTTP 404)",
        );
    s.run(&["msg", "send", "--visitor", "v1", "--agent-id", &liz])
        .await
        .fails_with("error: missing_parameter: text is required (HTTP 400)");
    s.run(&["push", "send", "--visitor", "v1"])
        .await
        .fails_with("error: missing_parameter: text is required (HTTP 400)");
    s.run(&["msg", "send", "--text", "x", "--agent-id", &liz])
        .await
        .fails_with("error: missing_parameter: visitorId is required (HTTP 400)");
    let id = id_of(
        &s.run(&[
            "msg",
            "send",
            "--visitor",
            "v1",
            "--text",
            "x",
            "--agent-id",
            &liz,
            "--json",
        ])
        .await
        .json(),
    );
    s.run(&["msg", "edit", &id]).await.fails_with(
        "error: missing_parameter: text must not be empty or only whitespace (HTTP 400)",
    );
    let long = "x".repeat(100_001);
    s.run(&["msg", "edit", &id, "--text", &long])
        .await
        .fails_with(
            "error: out_of_range: text is 100001 characters long; the maximum is 100000 (HTTP 400)",
        );

    // Wrong, missing key.
    let base = format!("{}/v3", s.url);
    run_env(
        &[("SWITCHBOARD_URL", &base)],
        &["msg", "get", &id, "--api-key", "xkeysib-wrong"],
    )
    .await
    .fails_with(
        "error: unauthorized: Key not found: the api-key does not match any active key (HTTP 401)",
    );
    run_env(
        &[
            ("SWITCHBOARD_URL", &base),
            ("SWITCHBOARD_API_KEY", "xkeysib-wrong"),
        ],
        &["ping", "--agent-id", &liz],
    )
    .await
    .fails_with(
        "error: unauthorized: Key not found: the api-key does not match any active key (HTTP 401)",
    );
    run_env(&[("SWITCHBOARD_URL", &base)], &["msg", "get", &id])
        .await
        .fails_with("error: an API key is required: pass --api-key or set SWITCHBOARD_API_KEY");

    // Nothing listening: a network error, exit 1. (A bound socket that does not listen
    // refuses connections and keeps the port ours.)
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let refused = format!("http://{}/v3", socket.local_addr().expect("addr"));
    let out = run_env(
        &[("SWITCHBOARD_API_KEY", KEY)],
        &["msg", "get", &id, "--base-url", &refused],
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.starts_with("error: could not connect: ") && out.stderr.ends_with('\n'),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);

    // An invalid base URL is a configuration error.
    run_env(
        &[("SWITCHBOARD_API_KEY", KEY)],
        &["msg", "get", &id, "--base-url", "ftp://example.com/v3"],
    )
    .await
    .fails_with(
        "error: invalid client configuration: the base URL must be http or https, not \"ftp\"",
    );

    // Usage errors are clap's: exit 2.
    let out = s.run(&["visitor-group", "--visitor", "v1"]).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--group"), "{}", out.stderr);
    let out = s
        .run(&[
            "msg",
            "send",
            "--agent-id",
            "a",
            "--agent-email",
            "b@example.com",
        ])
        .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}

#[tokio::test]
async fn msg_list_pages_a_visitors_messages() {
    let s = serve().await;
    let liz = id_of(&s.admin(&["agents", "add", "--name", "Liz"]).await);
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        let sent = s
            .run(&[
                "--json",
                "msg",
                "send",
                "--visitor",
                "v1",
                "--text",
                text,
                "--agent-id",
                &liz,
            ])
            .await
            .json();
        ids.push(id_of(&sent));
    }
    let page = s
        .run(&["--json", "msg", "list", "--visitor", "v1", "--limit", "2"])
        .await
        .json();
    let got: Vec<String> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(got, ids[1..]);
    assert_eq!(page["hasMore"], true);
    assert_eq!(
        s.run(&["msg", "list", "--visitor", "v1", "--before", &ids[1]])
            .await
            .ok(),
        format!("message {} (agent Liz → visitor v1): one\n", ids[0])
    );
    let missing = s.run(&["msg", "list", "--visitor", "nobody"]).await;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("document_not_found"),
        "{}",
        missing.stderr
    );
}

//! The SDK against a real switchboard: every operation and every error the server produces,
//! driven only through `switchboard_client`, on `127.0.0.1:0` with a temporary database:
//! an SQLite file, or with `SWITCHBOARD_TEST_BACKEND=postgres` a fresh database on the
//! PostgreSQL server of `SWITCHBOARD_TEST_POSTGRES`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_client::wire::{
    AgentOnlinePingRequest, PushMessageRequest, SendMessageRequest, VisitorGroupRequest,
    VisitorGroupResponse,
};
use switchboard_client::{
    AgentPing, Client, ConversationsMessage, Error, ListMessages, MessageType, PushMessage,
    RetryPolicy, SendMessage,
};
use switchboard_server::domain::{Clock, Domain, DomainConfig, Text, VisitorId};
use switchboard_server::store::sqlite::SqliteOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const KEY: &str = "xkeysib-sdk-test-key-0123456789";

/// A test's own database: a file in a temporary directory, or a PostgreSQL database that is
/// dropped with this value.
enum Storage {
    Sqlite { _dir: tempfile::TempDir },
    Postgres(switchboard_bench::pgdb::TempDatabase),
}

impl Storage {
    /// The backend `SWITCHBOARD_TEST_BACKEND` selects (SQLite when unset); the database as
    /// `switchboard_server::open` takes it.
    async fn new() -> (Self, PathBuf) {
        match std::env::var("SWITCHBOARD_TEST_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("sqlite") => {
                let dir = tempfile::tempdir().expect("temp dir");
                let db = dir.path().join("switchboard.db");
                (Self::Sqlite { _dir: dir }, db)
            }
            Ok("postgres") => {
                let admin = std::env::var("SWITCHBOARD_TEST_POSTGRES").unwrap_or_default();
                assert!(
                    !admin.is_empty(),
                    "SWITCHBOARD_TEST_BACKEND=postgres needs SWITCHBOARD_TEST_POSTGRES, the URL \
                     of a database whose user may create databases \
                     (e.g. postgres://postgres@127.0.0.1:5432/test)"
                );
                let pg = switchboard_bench::pgdb::TempDatabase::create(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("a test database on {admin}: {e:#}"));
                let db = PathBuf::from(pg.url());
                (Self::Postgres(pg), db)
            }
            Ok(other) => panic!("SWITCHBOARD_TEST_BACKEND={other:?}: expected sqlite or postgres"),
        }
    }
}

/// A switchboard serving on an ephemeral port, with its own database.
struct Server {
    /// `http://127.0.0.1:PORT/v3`
    base_url: String,
    domain: Arc<Domain>,
    /// The default account, owner of [`KEY`].
    account: String,
    db: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    storage: Storage,
}

impl Server {
    async fn start() -> Self {
        let (storage, db) = Storage::new().await;
        let domain = switchboard_server::open(
            &db,
            SqliteOptions::default(),
            DomainConfig::default(),
            Clock::System,
        )
        .await
        .expect("open database");
        let boot = domain.bootstrap(Some(KEY)).await.expect("bootstrap");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let serve = switchboard_server::serve(domain.clone(), listener, async {
            let _ = rx.await;
        });
        let task = tokio::spawn(async move { serve.await.expect("server stopped with an error") });
        Self {
            base_url: format!("http://{addr}/v3"),
            domain,
            account: boot.account.id,
            db,
            shutdown: Some(tx),
            task: Some(task),
            storage,
        }
    }

    /// A client with `key`, as an application would build one.
    fn client_with(&self, key: &str) -> Client {
        Client::builder()
            .api_key(key)
            .base_url(&self.base_url)
            .timeout(Duration::from_secs(20))
            .retry(
                RetryPolicy::default()
                    .max_attempts(3)
                    .initial_backoff(Duration::from_millis(50)),
            )
            .build()
            .expect("client")
    }

    fn client(&self) -> Client {
        self.client_with(KEY)
    }

    async fn agent(&self, name: &str, email: Option<&str>, groups: &[String]) -> String {
        self.domain
            .add_agent(&self.account, name, email, None, groups)
            .await
            .expect("add agent")
            .0
            .id
    }

    async fn group(&self, name: &str) -> String {
        self.domain
            .add_group(&self.account, name)
            .await
            .expect("add group")
            .id
    }

    /// Rows of `messages` (live and deleted) in the database.
    async fn message_rows(&self) -> i64 {
        use sqlx::Connection;
        const SQL: &str = "SELECT count(*) FROM messages";
        match &self.storage {
            Storage::Sqlite { .. } => {
                let url = format!("sqlite://{}", self.db.display());
                let mut conn = sqlx::SqliteConnection::connect(&url)
                    .await
                    .expect("open db");
                let n: i64 = sqlx::query_scalar(SQL)
                    .fetch_one(&mut conn)
                    .await
                    .expect("count");
                conn.close().await.expect("close db");
                n
            }
            Storage::Postgres(pg) => {
                let mut conn = sqlx::PgConnection::connect(pg.url())
                    .await
                    .expect("open db");
                let n: i64 = sqlx::query_scalar(SQL)
                    .fetch_one(&mut conn)
                    .await
                    .expect("count");
                conn.close().await.expect("close db");
                n
            }
        }
    }

    /// Shuts down gracefully and checks that the server stopped without an error.
    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

/// Asserts a 400 with this code and message.
#[track_caller]
fn assert_bad_request(result: Result<impl std::fmt::Debug, Error>, code: &str, message: &str) {
    match result {
        Err(Error::BadRequest {
            code: c,
            message: m,
            body,
        }) => {
            assert_eq!((c.as_str(), m.as_str()), (code, message));
            let parsed: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
            assert_eq!(
                parsed,
                serde_json::json!({"code": code, "message": message})
            );
        }
        other => panic!("expected 400 {code}, got {other:?}"),
    }
}

/// Asserts a 404 `document_not_found` with this message.
#[track_caller]
fn assert_not_found(result: Result<impl std::fmt::Debug, Error>, message: &str) {
    match result {
        Err(e @ Error::NotFound { .. }) => {
            assert_eq!(e.status(), Some(404));
            assert_eq!(e.code(), Some("document_not_found"));
            assert!(e.is_not_found());
            assert!(!e.is_transient());
            assert_eq!(
                e.to_string(),
                format!("not found (document_not_found): {message}")
            );
        }
        other => panic!("expected 404 ({message}), got {other:?}"),
    }
}

#[tokio::test]
async fn messages_send_get_edit_delete() {
    let s = Server::start().await;
    let liz = s.agent("Liz", Some("liz@example.com"), &[]).await;
    let c = s.client();
    let conv = c.conversations();

    let before = now_ms();
    let sent = conv
        .send_message(
            SendMessage::new("visitor-1", "Hello <b>\"you\"</b> & co\nbye")
                .agent_id(&liz)
                .received_from("my-integration"),
        )
        .await
        .expect("send");
    let after = now_ms();
    assert_eq!(sent.id.len(), 17, "{}", sent.id);
    assert!(sent.id.chars().all(|c| c.is_ascii_alphanumeric()));
    assert!(
        (before..=after).contains(&sent.created_at),
        "{before} <= {} <= {after}",
        sent.created_at
    );
    assert_eq!(
        sent,
        ConversationsMessage {
            id: sent.id.clone(),
            kind: MessageType::Agent,
            text: "Hello <b>\"you\"</b> & co\nbye".into(),
            html: "Hello &lt;b&gt;&quot;you&quot;&lt;/b&gt; &amp; co<br>bye".into(),
            visitor_id: "visitor-1".into(),
            agent_id: Some(liz.clone()),
            agent_name: Some("Liz".into()),
            agent_userpic: None,
            created_at: sent.created_at,
            is_pushed: false,
            is_missed: false,
            is_missed_by_visitor: false,
            is_trigger: false,
            received_from: Some("my-integration".into()),
        }
    );

    assert_eq!(conv.get_message(&sent.id).await.expect("get"), sent);

    let edited = conv
        .update_message(&sent.id, "Hello again")
        .await
        .expect("edit");
    assert_eq!(
        edited,
        ConversationsMessage {
            text: "Hello again".into(),
            html: "Hello again".into(),
            ..sent.clone()
        }
    );
    assert_eq!(conv.get_message(&sent.id).await.expect("get"), edited);

    conv.delete_message(&sent.id).await.expect("delete");
    let gone = format!("Message {} does not exist", sent.id);
    assert_not_found(conv.get_message(&sent.id).await, &gone);
    assert_not_found(conv.update_message(&sent.id, "again").await, &gone);
    assert_not_found(conv.delete_message(&sent.id).await, &gone);

    // By email: an unknown email with a name creates the agent; the email alone finds it.
    let anna = conv
        .send_message(
            SendMessage::new("visitor-2", "Hi from Anna")
                .agent_email("anna@example.com")
                .agent_name("Anna"),
        )
        .await
        .expect("send as a new agent");
    assert_eq!(anna.agent_name.as_deref(), Some("Anna"));
    let anna_id = anna.agent_id.clone().expect("agent id");
    assert_ne!(anna_id, liz);
    let again = conv
        .send_message(SendMessage::new("visitor-2", "Me again").agent_email("anna@example.com"))
        .await
        .expect("send by email");
    assert_eq!(again.agent_id.as_deref(), Some(anna_id.as_str()));
    assert_eq!(again.agent_name.as_deref(), Some("Anna"));
    assert_ne!(again.id, anna.id);
    // The known email of an existing agent works without a name.
    let by_liz_email = conv
        .send_message(SendMessage::new("visitor-2", "Liz here").agent_email("liz@example.com"))
        .await
        .expect("send by Liz's email");
    assert_eq!(by_liz_email.agent_id.as_deref(), Some(liz.as_str()));
    assert_eq!(s.message_rows().await, 4);
    s.stop().await;
}

#[tokio::test]
async fn pushed_messages_push_get_edit_delete() {
    let s = Server::start().await;
    let sales = s.group("Sales").await;
    let bob = s.agent("Bob", None, std::slice::from_ref(&sales)).await;
    let other = s.agent("Other", None, &[]).await;
    let c = s.client();
    let conv = c.conversations();

    let pushed = conv
        .push_message(PushMessage::new("visitor-1", "Your order has shipped").group_id(&sales))
        .await
        .expect("push to a group");
    assert_eq!(pushed.id.len(), 17);
    assert_eq!(
        pushed,
        ConversationsMessage {
            id: pushed.id.clone(),
            kind: MessageType::Agent,
            text: "Your order has shipped".into(),
            html: "Your order has shipped".into(),
            visitor_id: "visitor-1".into(),
            agent_id: Some(bob.clone()),
            agent_name: Some("Bob".into()),
            agent_userpic: None,
            created_at: pushed.created_at,
            is_pushed: true,
            is_missed: false,
            is_missed_by_visitor: false,
            is_trigger: false,
            received_from: None,
        }
    );
    let as_other = conv
        .push_message(PushMessage::new("visitor-1", "From Other").agent_id(&other))
        .await
        .expect("push as an agent");
    assert_eq!(as_other.agent_id.as_deref(), Some(other.as_str()));
    assert_eq!(as_other.agent_name.as_deref(), Some("Other"));
    assert!(as_other.is_pushed);

    assert_eq!(
        conv.get_pushed_message(&pushed.id).await.expect("get"),
        pushed
    );
    // A pushed message lives under /pushedMessages only.
    let not_a_message = format!("Message {} does not exist", pushed.id);
    assert_not_found(conv.get_message(&pushed.id).await, &not_a_message);
    assert_not_found(conv.update_message(&pushed.id, "x").await, &not_a_message);
    assert_not_found(conv.delete_message(&pushed.id).await, &not_a_message);

    let edited = conv
        .update_pushed_message(&pushed.id, "Delivered")
        .await
        .expect("edit");
    assert_eq!(
        edited,
        ConversationsMessage {
            text: "Delivered".into(),
            html: "Delivered".into(),
            ..pushed.clone()
        }
    );
    assert_eq!(
        conv.get_pushed_message(&pushed.id).await.expect("get"),
        edited
    );

    conv.delete_pushed_message(&pushed.id)
        .await
        .expect("delete");
    let gone = format!("Pushed message {} does not exist", pushed.id);
    assert_not_found(conv.get_pushed_message(&pushed.id).await, &gone);
    assert_not_found(conv.update_pushed_message(&pushed.id, "x").await, &gone);
    assert_not_found(conv.delete_pushed_message(&pushed.id).await, &gone);

    // And an agent's message is not a pushed message.
    let msg = conv
        .send_message(SendMessage::new("visitor-1", "Hi").agent_id(&bob))
        .await
        .expect("send");
    let not_pushed = format!("Pushed message {} does not exist", msg.id);
    assert_not_found(conv.get_pushed_message(&msg.id).await, &not_pushed);
    assert_not_found(conv.update_pushed_message(&msg.id, "x").await, &not_pushed);
    assert_not_found(conv.delete_pushed_message(&msg.id).await, &not_pushed);
    assert_eq!(conv.get_message(&msg.id).await.expect("still there"), msg);

    // Push errors: an unknown group or agent, a group without agents.
    let empty = s.group("Empty").await;
    assert_bad_request(
        conv.push_message(PushMessage::new("v", "x").group_id("nogroup"))
            .await,
        "invalid_parameter",
        "groupId nogroup does not match any group of this account",
    );
    assert_bad_request(
        conv.push_message(PushMessage::new("v", "x").agent_id("noagent"))
            .await,
        "invalid_parameter",
        "agentId noagent does not match any agent of this account",
    );
    assert_bad_request(
        conv.push_message(PushMessage::new("v", "x").group_id(&empty))
            .await,
        "invalid_parameter",
        &format!(
            "group {empty} has no agents to send this pushed message as; add an agent to the group or pass agentId"
        ),
    );
    s.stop().await;
}

#[tokio::test]
async fn agent_online_ping_marks_the_agent_online() {
    let s = Server::start().await;
    let liz = s.agent("Liz", Some("liz@example.com"), &[]).await;
    let c = s.client();
    let conv = c.conversations();
    let online = |agents: Vec<(switchboard_server::store::AgentRow, Vec<String>)>| {
        agents
            .iter()
            .filter(|(a, _)| s.domain.is_online(a))
            .map(|(a, _)| a.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        online(s.domain.list_agents(&s.account).await.unwrap()),
        Vec::<String>::new()
    );

    conv.agent_online_ping(AgentPing::agent_id(&liz))
        .await
        .expect("ping by id");
    assert_eq!(
        online(s.domain.list_agents(&s.account).await.unwrap()),
        ["Liz"]
    );

    // An unknown email with a name creates the agent, online.
    conv.agent_online_ping(AgentPing::agent_email("anna@example.com").agent_name("Anna"))
        .await
        .expect("ping by a new email");
    let mut names = online(s.domain.list_agents(&s.account).await.unwrap());
    names.sort();
    assert_eq!(names, ["Anna", "Liz"]);
    conv.agent_online_ping(AgentPing::agent_email("liz@example.com"))
        .await
        .expect("ping by a known email");

    assert_bad_request(
        conv.agent_online_ping(AgentPing::agent_id("nobody")).await,
        "invalid_parameter",
        "agentId nobody does not match any agent of this account",
    );
    assert_bad_request(
        conv.agent_online_ping(AgentPing::agent_email("new@example.com"))
            .await,
        "missing_parameter",
        "agentName is required: no agent has the email new@example.com yet, and switchboard needs a name to create it",
    );
    assert_bad_request(
        conv.agent_online_ping(AgentPing::agent_email("not-an-email"))
            .await,
        "invalid_parameter",
        "agentEmail \"not-an-email\" is not a valid email address",
    );
    assert_bad_request(
        conv.agent_online_ping(AgentOnlinePingRequest::default())
            .await,
        "missing_parameter",
        "agentId or agentEmail is required: name the agent by agentId, or by agentEmail (with agentName to create an agent that does not exist yet)",
    );
    s.stop().await;
}

#[tokio::test]
async fn visitor_group_assign_and_remove() {
    let s = Server::start().await;
    let sales = s.group("Sales").await;
    let liz = s.agent("Liz", None, &[]).await;
    let c = s.client();
    let conv = c.conversations();
    // A visitor exists once a message was written to it.
    conv.send_message(SendMessage::new("visitor-1", "Hi").agent_id(&liz))
        .await
        .expect("send");

    let assigned = conv
        .set_visitor_group(VisitorGroupRequest::assign("visitor-1", &sales))
        .await
        .expect("assign");
    assert_eq!(
        assigned,
        VisitorGroupResponse {
            visitor_id: "visitor-1".into(),
            group_id: Some(sales.clone()),
        }
    );
    // Idempotent: assigning again answers the same.
    assert_eq!(
        conv.set_visitor_group(VisitorGroupRequest::assign("visitor-1", &sales))
            .await
            .expect("assign again"),
        assigned
    );
    let removed = conv
        .set_visitor_group(VisitorGroupRequest::remove("visitor-1"))
        .await
        .expect("remove");
    assert_eq!(
        removed,
        VisitorGroupResponse {
            visitor_id: "visitor-1".into(),
            group_id: None,
        }
    );
    assert_eq!(
        conv.set_visitor_group(VisitorGroupRequest::remove("visitor-1"))
            .await
            .expect("remove again"),
        removed
    );

    assert_not_found(
        conv.set_visitor_group(VisitorGroupRequest::assign("nobody", &sales))
            .await,
        "visitor nobody does not exist (a visitor exists once a message was sent to or by it)",
    );
    assert_bad_request(
        conv.set_visitor_group(VisitorGroupRequest::assign("visitor-1", "nogroup"))
            .await,
        "invalid_parameter",
        "groupId nogroup does not match any group of this account",
    );
    assert_bad_request(
        conv.set_visitor_group(VisitorGroupRequest {
            visitor_id: None,
            group_id: Some(Some(sales.clone())),
        })
        .await,
        "missing_parameter",
        "visitorId is required: pass it in the body or as the visitorId query parameter",
    );
    assert_bad_request(
        conv.set_visitor_group(VisitorGroupRequest {
            visitor_id: Some("visitor-1".into()),
            group_id: None,
        })
        .await,
        "missing_parameter",
        "groupId is required: a group id, or null to remove the visitor from its group",
    );
    s.stop().await;
}

#[tokio::test]
async fn invalid_input_maps_to_bad_request_codes() {
    let s = Server::start().await;
    let liz = s.agent("Liz", None, &[]).await;
    let c = s.client();
    let conv = c.conversations();
    let send =
        |visitor: Option<&str>, text: Option<&str>, agent: Option<&str>| SendMessageRequest {
            visitor_id: visitor.map(Into::into),
            text: text.map(Into::into),
            agent_id: agent.map(Into::into),
            ..SendMessageRequest::default()
        };

    // missing_parameter
    assert_bad_request(
        conv.send_message(send(Some("v"), None, Some(&liz))).await,
        "missing_parameter",
        "text is required",
    );
    assert_bad_request(
        conv.send_message(send(Some("v"), Some("  \n"), Some(&liz)))
            .await,
        "missing_parameter",
        "text must not be empty or only whitespace",
    );
    assert_bad_request(
        conv.send_message(send(None, Some("x"), Some(&liz))).await,
        "missing_parameter",
        "visitorId is required",
    );
    assert_bad_request(
        conv.send_message(send(Some("v"), Some("x"), None)).await,
        "missing_parameter",
        "agentId or agentEmail is required: name the agent by agentId, or by agentEmail (with agentName to create an agent that does not exist yet)",
    );
    assert_bad_request(
        conv.push_message(PushMessageRequest {
            visitor_id: Some("v".into()),
            ..PushMessageRequest::default()
        })
        .await,
        "missing_parameter",
        "text is required",
    );
    let msg = conv
        .send_message(send(Some("v"), Some("x"), Some(&liz)))
        .await
        .expect("send");
    assert_bad_request(
        conv.update_message(&msg.id, " ").await,
        "missing_parameter",
        "text must not be empty or only whitespace",
    );

    // invalid_parameter
    assert_bad_request(
        conv.send_message(send(Some("v"), Some("x"), Some("nobody")))
            .await,
        "invalid_parameter",
        "agentId nobody does not match any agent of this account",
    );
    assert_bad_request(
        conv.send_message(send(Some("v\u{7}"), Some("x"), Some(&liz)))
            .await,
        "invalid_parameter",
        "visitorId must not contain control characters",
    );

    // out_of_range
    let long_text = "é".repeat(100_001);
    assert_bad_request(
        conv.send_message(send(Some("v"), Some(&long_text), Some(&liz)))
            .await,
        "out_of_range",
        "text is 100001 characters long; the maximum is 100000",
    );
    assert_bad_request(
        conv.update_message(&msg.id, long_text.as_str()).await,
        "out_of_range",
        "text is 100001 characters long; the maximum is 100000",
    );
    assert_bad_request(
        conv.send_message(send(Some(&"v".repeat(257)), Some("x"), Some(&liz)))
            .await,
        "out_of_range",
        "visitorId is 257 characters long; the maximum is 256",
    );
    // Exactly at the limits is fine.
    let max = conv
        .send_message(send(
            Some(&"v".repeat(256)),
            Some(&"é".repeat(100_000)),
            Some(&liz),
        ))
        .await
        .expect("limits are inclusive");
    assert_eq!(max.text.chars().count(), 100_000);

    // permission_denied: a visitor's message cannot be edited or deleted by the API.
    let from_visitor = s
        .domain
        .send_visitor_message(
            &s.account,
            &VisitorId::parse(Some("v".into())).unwrap(),
            Text::parse(Some("hello from the visitor".into())).unwrap(),
        )
        .await
        .expect("visitor message");
    let got = conv.get_message(&from_visitor.id).await.expect("get");
    assert_eq!(
        got,
        ConversationsMessage {
            id: from_visitor.id.clone(),
            kind: MessageType::Visitor,
            text: "hello from the visitor".into(),
            html: "hello from the visitor".into(),
            visitor_id: "v".into(),
            agent_id: None,
            agent_name: None,
            agent_userpic: None,
            created_at: from_visitor.created_at,
            is_pushed: false,
            is_missed: true, // nobody was online
            is_missed_by_visitor: false,
            is_trigger: false,
            received_from: None,
        }
    );
    assert_bad_request(
        conv.update_message(&from_visitor.id, "rewritten").await,
        "permission_denied",
        &format!(
            "only agents' messages can be edited; message {} was sent by the visitor",
            from_visitor.id
        ),
    );
    assert_bad_request(
        conv.delete_message(&from_visitor.id).await,
        "permission_denied",
        &format!(
            "only agents' messages can be deleted; message {} was sent by the visitor",
            from_visitor.id
        ),
    );
    assert_eq!(
        conv.get_message(&from_visitor.id).await.expect("unchanged"),
        got
    );
    s.stop().await;
}

#[tokio::test]
async fn wrong_key_is_unauthorized_and_accounts_are_isolated() {
    let s = Server::start().await;
    let liz = s.agent("Liz", None, &[]).await;
    let msg = s
        .client()
        .conversations()
        .send_message(SendMessage::new("v", "secret").agent_id(&liz))
        .await
        .expect("send");

    let wrong = s.client_with("xkeysib-wrong");
    let conv = wrong.conversations();
    let unauthorized = |r: Result<(), Error>| match r {
        Err(e @ Error::Unauthorized { .. }) => {
            assert_eq!(e.status(), Some(401));
            assert_eq!(e.code(), Some("unauthorized"));
            assert_eq!(
                e.to_string(),
                "unauthorized (unauthorized): Key not found: the api-key does not match any active key"
            );
        }
        other => panic!("expected 401, got {other:?}"),
    };
    unauthorized(conv.get_message(&msg.id).await.map(drop));
    unauthorized(conv.update_message(&msg.id, "x").await.map(drop));
    unauthorized(conv.delete_message(&msg.id).await);
    unauthorized(
        conv.send_message(SendMessage::new("v", "x").agent_id(&liz))
            .await
            .map(drop),
    );
    unauthorized(
        conv.push_message(PushMessage::new("v", "x"))
            .await
            .map(drop),
    );
    unauthorized(conv.get_pushed_message(&msg.id).await.map(drop));
    unauthorized(conv.agent_online_ping(AgentPing::agent_id(&liz)).await);
    unauthorized(
        conv.set_visitor_group(VisitorGroupRequest::remove("v"))
            .await
            .map(drop),
    );
    // Nothing was written by the refused calls, and the message is untouched.
    assert_eq!(s.message_rows().await, 1);
    assert_eq!(
        s.client()
            .conversations()
            .get_message(&msg.id)
            .await
            .expect("get")
            .text,
        "secret"
    );

    // A second account's key works, but sees none of the first account's messages.
    let (_, created) = s.domain.create_account("two").await.expect("account");
    let two = s.client_with(&created.key);
    let conv2 = two.conversations();
    let gone = format!("Message {} does not exist", msg.id);
    assert_not_found(conv2.get_message(&msg.id).await, &gone);
    assert_not_found(conv2.update_message(&msg.id, "mine").await, &gone);
    assert_not_found(conv2.delete_message(&msg.id).await, &gone);
    assert_bad_request(
        conv2
            .send_message(SendMessage::new("v", "x").agent_id(&liz))
            .await,
        "invalid_parameter",
        &format!("agentId {liz} does not match any agent of this account"),
    );
    assert_eq!(
        s.client()
            .conversations()
            .get_message(&msg.id)
            .await
            .expect("still there")
            .text,
        "secret"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_message() {
    let s = Server::start().await;
    let liz = s.agent("Liz", None, &[]).await;
    let c = s.client();
    let conv = c.conversations();

    let send = || {
        SendMessage::new("visitor-1", "only once")
            .agent_id(&liz)
            .idempotency_key("order-42-confirmation")
    };
    let first = conv.send_message(send()).await.expect("first");
    let second = conv.send_message(send()).await.expect("repeat");
    assert_eq!(second, first);
    assert_eq!(s.message_rows().await, 1);

    // The same key with another body is refused, and writes nothing.
    assert_bad_request(
        conv.send_message(
            SendMessage::new("visitor-1", "something else")
                .agent_id(&liz)
                .idempotency_key("order-42-confirmation"),
        )
        .await,
        "duplicate_request",
        "this Idempotency-Key was already used with a different request; use a new key for a new request",
    );
    assert_eq!(s.message_rows().await, 1);

    // Pushed messages too.
    let push = || PushMessage::new("visitor-1", "shipped").idempotency_key("push-1");
    let p1 = conv.push_message(push()).await.expect("push");
    let p2 = conv.push_message(push()).await.expect("push again");
    assert_eq!(p2, p1);
    assert_eq!(p1.agent_id.as_deref(), Some(liz.as_str()));
    assert_eq!(s.message_rows().await, 2);
    assert_bad_request(
        conv.push_message(PushMessage::new("visitor-1", "other").idempotency_key("push-1"))
            .await,
        "duplicate_request",
        "this Idempotency-Key was already used with a different request; use a new key for a new request",
    );

    // Without a caller-chosen key every call has its own key: two calls, two messages.
    let a = conv
        .send_message(SendMessage::new("visitor-1", "twice").agent_id(&liz))
        .await
        .expect("a");
    let b = conv
        .send_message(SendMessage::new("visitor-1", "twice").agent_id(&liz))
        .await
        .expect("b");
    assert_ne!(a.id, b.id);
    assert_eq!(s.message_rows().await, 4);

    // A replay answers the first response as it was, and neither writes nor undoes an edit.
    conv.update_message(&first.id, "edited")
        .await
        .expect("edit");
    assert_eq!(conv.send_message(send()).await.expect("replay"), first);
    assert_eq!(
        conv.get_message(&first.id).await.expect("get").text,
        "edited"
    );
    assert_eq!(s.message_rows().await, 4);
    s.stop().await;
}

#[tokio::test]
async fn odd_ids_are_one_path_segment_and_not_found() {
    let s = Server::start().await;
    let liz = s.agent("Liz", None, &[]).await;
    let c = s.client();
    let conv = c.conversations();
    let real = conv
        .send_message(SendMessage::new("v", "x").agent_id(&liz))
        .await
        .expect("send");

    let ids = [
        "a/b".to_owned(),
        format!("{}/x", real.id),
        format!("x/../{}", real.id),
        "../messages".to_owned(),
        "a b".to_owned(),
        " ".to_owned(),
        "héllo wörld ✓ 文字 🚀".to_owned(),
        "a?b#c".to_owned(),
        "100%".to_owned(),
        "%2F".to_owned(),
        "a%20b".to_owned(),
        "...".to_owned(),
        "a;b=c&d".to_owned(),
        "x".repeat(1000),
    ];
    for id in &ids {
        let shown: String = if id.chars().count() > 64 {
            format!("{}…", id.chars().take(64).collect::<String>())
        } else {
            id.clone()
        };
        let msg = format!("Message {shown} does not exist");
        let pushed = format!("Pushed message {shown} does not exist");
        assert_not_found(conv.get_message(id).await, &msg);
        assert_not_found(conv.update_message(id, "x").await, &msg);
        assert_not_found(conv.delete_message(id).await, &msg);
        assert_not_found(conv.get_pushed_message(id).await, &pushed);
        assert_not_found(conv.update_pushed_message(id, "x").await, &pushed);
        assert_not_found(conv.delete_pushed_message(id).await, &pushed);
    }
    // Ids that cannot be a path segment are refused before anything is sent.
    for id in ["", ".", ".."] {
        assert!(
            matches!(
                conv.get_message(id).await,
                Err(Error::InvalidArgument { .. })
            ),
            "{id:?}"
        );
        assert!(matches!(
            conv.delete_pushed_message(id).await,
            Err(Error::InvalidArgument { .. })
        ));
    }
    // None of it touched the real message.
    assert_eq!(conv.get_message(&real.id).await.expect("get"), real);
    assert_eq!(s.message_rows().await, 1);
    s.stop().await;
}

#[tokio::test]
async fn list_visitor_messages_pages_through_a_conversation() {
    let s = Server::start().await;
    let liz = s.agent("Liz", None, &[]).await;
    let c = s.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        let m = c
            .conversations()
            .send_message(SendMessage::new("visitor/1", format!("m{i}")).agent_id(&liz))
            .await
            .expect("send");
        ids.push(m.id);
    }
    let ext = c.extensions();
    let all = ext
        .list_visitor_messages("visitor/1", ListMessages::new())
        .await
        .expect("list");
    assert_eq!(
        all.messages
            .iter()
            .map(|m| m.id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    assert!(!all.has_more);
    assert_eq!(all.messages[4].text, "m4");

    let newest = ext
        .list_visitor_messages("visitor/1", ListMessages::new().limit(2))
        .await
        .expect("newest");
    assert_eq!(
        newest
            .messages
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        [ids[3].as_str(), ids[4].as_str()]
    );
    assert!(newest.has_more);
    let older = ext
        .list_visitor_messages("visitor/1", ListMessages::new().limit(2).before(&ids[3]))
        .await
        .expect("older");
    assert_eq!(
        older
            .messages
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        [ids[1].as_str(), ids[2].as_str()]
    );
    let after = ext
        .list_visitor_messages("visitor/1", ListMessages::new().after(&ids[3]))
        .await
        .expect("after");
    assert_eq!(
        after
            .messages
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        [ids[4].as_str()]
    );
    assert!(!after.has_more);

    assert_not_found(
        ext.list_visitor_messages("nobody", ListMessages::new())
            .await,
        "visitor nobody does not exist (a visitor exists once a message was sent to or by it)",
    );
    let err = ext
        .list_visitor_messages("visitor/1", ListMessages::new().limit(500))
        .await
        .expect_err("limit too large");
    assert_eq!(err.code(), Some("out_of_range"));
}

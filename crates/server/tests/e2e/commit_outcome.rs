//! A PostgreSQL connection that breaks while a commit is under way: the server finds out
//! whether the commit happened before it answers. A commit that happened is answered as a
//! success (a retryable 503 would make an SDK's retry write the message twice); one that did
//! not can never happen afterwards, and a batch of new messages is then written again on a
//! new connection (other writes get a 503). A connection PostgreSQL ended while it was idle
//! costs no write at all.
//!
//! The server reaches PostgreSQL through a TCP proxy in the test, which watches what the
//! server sends and, at the chosen moment on the writer's connection, either lets a request
//! through and drops the database's answers (the commit happens, the server never hears of
//! it) or holds the request back (nothing happens), then cuts the server's side of the
//! connection; a held request can be delivered afterwards, as a late packet would be.
//!
//! Runs in the PostgreSQL pass only (`SWITCHBOARD_TEST_BACKEND=postgres`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::harness::{TestServer, WAIT};
use switchboard_server::domain::{Clock, DomainConfig};
use switchboard_server::ServeOptions;

/// What the proxy does with the request that fires it.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Passes it on and drops every answer from then on.
    Swallow,
    /// Keeps it until [`Fired::deliver`].
    Hold,
}

/// The proxy's one armed trigger: on the first connection that sends `needle`, fire at the
/// first request (that one or a later one) containing `then` (or at the needle itself).
struct Arm {
    needle: Vec<u8>,
    then: Option<Vec<u8>>,
    mode: Mode,
    fired: oneshot::Sender<Fired>,
}

/// The connection a trigger fired on.
struct Fired {
    cut: Option<oneshot::Sender<()>>,
    deliver: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl Fired {
    /// Closes the server's side of the connection (the database's side stays open while a
    /// held request waits to be delivered).
    fn cut(&mut self) {
        let _ = self.cut.take().expect("cut once").send(());
    }

    /// Sends the held request, if any, to the database and returns once it has answered (or
    /// closed the connection).
    async fn deliver(&mut self) {
        let (tx, rx) = oneshot::channel();
        let _ = self.deliver.take().expect("deliver once").send(tx);
        tokio::time::timeout(WAIT, rx)
            .await
            .expect("the held request delivered within the wait")
            .expect("the proxy connection delivered");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A TCP proxy to the database, on an ephemeral loopback port.
struct Proxy {
    addr: SocketAddr,
    arm: Arc<Mutex<Option<Arm>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let arm: Arc<Mutex<Option<Arm>>> = Arc::default();
        let armed = arm.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, armed.clone()));
            }
        });
        Self { addr, arm, task }
    }

    /// Arms the trigger; the answer comes when it fires.
    fn arm(&self, needle: &str, then: Option<&str>, mode: Mode) -> oneshot::Receiver<Fired> {
        let (tx, rx) = oneshot::channel();
        *self.arm.lock().unwrap() = Some(Arm {
            needle: needle.as_bytes().to_vec(),
            then: then.map(|t| t.as_bytes().to_vec()),
            mode,
            fired: tx,
        });
        rx
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One proxied connection.
async fn pump(mut client: TcpStream, mut server: TcpStream, arm: Arc<Mutex<Option<Arm>>>) {
    let (mut cbuf, mut sbuf) = (vec![0u8; 65536], vec![0u8; 65536]);
    let mut tainted = false;
    let mut swallow = false;
    let mut held: Option<Vec<u8>> = None;
    let mut cut: Option<oneshot::Receiver<()>> = None;
    let mut deliver: Option<oneshot::Receiver<oneshot::Sender<()>>> = None;
    loop {
        let cut_now = async {
            match cut.as_mut() {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = client.read(&mut cbuf) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                let chunk = &cbuf[..n];
                let mut fire = None;
                {
                    let mut slot = arm.lock().unwrap();
                    if let Some(a) = slot.as_ref() {
                        tainted |= contains(chunk, &a.needle);
                        let now = tainted
                            && a.then.as_ref().is_none_or(|t| contains(chunk, t));
                        if now {
                            fire = slot.take();
                        }
                    }
                }
                match fire {
                    Some(a) => {
                        let (cut_tx, cut_rx) = oneshot::channel();
                        let (deliver_tx, deliver_rx) = oneshot::channel();
                        cut = Some(cut_rx);
                        deliver = Some(deliver_rx);
                        if a.mode == Mode::Hold {
                            held = Some(chunk.to_vec());
                        } else {
                            swallow = true;
                            if server.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                        let _ = a.fired.send(Fired {
                            cut: Some(cut_tx),
                            deliver: Some(deliver_tx),
                        });
                    }
                    None => {
                        if server.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                }
            }
            n = server.read(&mut sbuf) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if !swallow && client.write_all(&sbuf[..n]).await.is_err() {
                    return;
                }
            }
            _ = cut_now => break,
        }
    }
    drop(client);
    // Until the test delivers (or drops its end): the database's side stays open meanwhile.
    let Some(deliver) = deliver else {
        return;
    };
    let Ok(done) = deliver.await else {
        return;
    };
    if let Some(request) = held {
        // The database may have closed this connection meanwhile (a terminated backend):
        // then the write or the read fails, and that is its answer.
        if server.write_all(&request).await.is_ok() {
            let _ = server.read(&mut sbuf).await;
        }
    }
    let _ = done.send(());
}

impl Proxy {
    /// Arms the trigger on `needle` (and `then`), POSTs `body` with `key`, and returns once
    /// the trigger fired: its connection, and the POST's answer to come.
    async fn post_until_fired(
        &self,
        s: &TestServer,
        body: Value,
        needle: &str,
        key: Option<&str>,
        then: Option<&str>,
        mode: Mode,
    ) -> (Fired, tokio::task::JoinHandle<(u16, Value)>) {
        let fired = self.arm(needle, then, mode);
        let answer = post_later(s, body, key);
        let conn = tokio::time::timeout(WAIT, fired)
            .await
            .unwrap_or_else(|_| {
                panic!("the writer sent {needle:?} (then {then:?}) within the wait")
            })
            .expect("fired");
        (conn, answer)
    }
}

/// Cuts the connection a trigger fired on, expects the POST answered 200 all the same
/// (written again on a new connection), delivers what was held back if anything was, and
/// checks that the database holds the message once: the acknowledged one, whose id it
/// returns.
async fn written_once(
    db: &crate::db::PgDatabase,
    text: &str,
    mut conn: Fired,
    answer: tokio::task::JoinHandle<(u16, Value)>,
) -> String {
    conn.cut();
    let (status, body) = answer.await.expect("POST task");
    assert_eq!(
        status, 200,
        "{text:?} written on the new connection: {body}"
    );
    let id = body["id"].as_str().expect("id").to_owned();
    conn.deliver().await;
    assert_eq!(
        ids_with_text(db, text).await,
        std::slice::from_ref(&id),
        "{text:?} stored once: a late copy must not apply"
    );
    id
}

/// The database of the test: its own, dropped at the end, and a direct connection to it.
async fn database() -> Option<(crate::db::PgDatabase, SocketAddr)> {
    let admin = crate::db::postgres_admin_url()?;
    let db = crate::db::PgDatabase::create(&admin).await;
    let url = url::Url::parse(&db.url).expect("database URL");
    let host = url.host_str().expect("database host");
    let port = url.port().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host, port))
        .await
        .expect("resolve the database host")
        .next()
        .expect("an address for the database host");
    Some((db, upstream))
}

/// Messages in the database with this text, by id.
async fn ids_with_text(db: &crate::db::PgDatabase, text: &str) -> Vec<String> {
    let mut conn = sqlx::PgConnection::connect(&db.url)
        .await
        .expect("connect to the test database");
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM messages WHERE text = $1")
        .bind(text)
        .fetch_all(&mut conn)
        .await
        .expect("query messages");
    let _ = conn.close().await;
    ids
}

/// Waits until the database holds a message with this text (committed by a statement whose
/// answer the proxy dropped) and returns its id.
async fn committed(db: &crate::db::PgDatabase, text: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let [id] = ids_with_text(db, text).await.as_slice() {
            return id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message {text:?} was not committed within the wait"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn message(agent: &str, visitor: &str, text: &str) -> Value {
    json!({"visitorId": visitor, "agentId": agent, "text": text})
}

/// Posts a message in a task of its own (its answer comes once the proxy is done with it).
fn post_later(
    s: &TestServer,
    body: Value,
    idempotency_key: Option<&str>,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let mut req = s
        .request(Method::POST, "/v3/conversations/messages")
        .header("api-key", super::harness::KEY)
        .json(&body);
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    tokio::spawn(async move {
        let res = req.send().await.expect("POST answered");
        let status = res.status().as_u16();
        (status, res.json().await.expect("JSON body"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_found_out_before_answering() {
    let Some((db, upstream)) = database().await else {
        eprintln!(
            "skipping commit_outcome: it runs in the PostgreSQL pass \
             (SWITCHBOARD_TEST_BACKEND=postgres)"
        );
        return;
    };
    let proxy = Proxy::start(upstream).await;
    let mut via_proxy = url::Url::parse(&db.url).expect("database URL");
    via_proxy.set_host(Some("127.0.0.1")).expect("host");
    via_proxy.set_port(Some(proxy.addr.port())).expect("port");
    // In the clear, for the proxy to see what goes by.
    via_proxy
        .query_pairs_mut()
        .append_pair("sslmode", "disable");
    let s = TestServer::start_on_with(
        PathBuf::from(via_proxy.as_str()),
        DomainConfig::default(),
        Clock::System,
        ServeOptions::default(),
    )
    .await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let visitor = "visitor-commit-outcome";
    let mut acknowledged = Vec::new();
    let post = |text: &'static str| {
        let (s, agent) = (&s, agent.clone());
        async move {
            let r = s
                .post("/v3/conversations/messages", message(&agent, visitor, text))
                .await;
            r.ok()["id"].as_str().expect("id").to_owned()
        }
    };
    // The first message starts the chat; a plain one after it takes the writer's
    // single-statement path (the row inserted and the head moved in one autocommitted
    // statement), one with an idempotency key the general path (a transaction ended by
    // COMMIT).
    acknowledged.push(post("first").await);
    acknowledged.push(post("warm").await);

    let fire = |text: &'static str, key: Option<&'static str>, then, mode| {
        proxy.post_until_fired(&s, message(&agent, visitor, text), text, key, then, mode)
    };

    // 1. Single statement, committed, answer lost.
    let (mut conn, answer) = fire("fast committed", None, None, Mode::Swallow).await;
    let id = committed(&db, "fast committed").await;
    conn.cut();
    let (status, body) = answer.await.expect("POST task");
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some(id.as_str())),
        "a committed message is answered as such: {body}"
    );
    acknowledged.push(id);

    // 2. Transaction, COMMIT applied, answer lost; the key replays the message.
    let key = Some("key-general-committed");
    let (mut conn, answer) = fire("general committed", key, Some("COMMIT"), Mode::Swallow).await;
    let id = committed(&db, "general committed").await;
    conn.cut();
    let (status, first) = answer.await.expect("POST task");
    assert_eq!(
        (status, first["id"].as_str()),
        (200, Some(id.as_str())),
        "a committed transaction is answered as such: {first}"
    );
    let again = message(&agent, visitor, "general committed");
    let (status, again) = post_later(&s, again, key).await.expect("POST task");
    assert_eq!(
        (status, &again),
        (200, &first),
        "the key replays the message"
    );
    acknowledged.push(id);

    // 3. Single statement held back: not applied, so the writer writes the batch again on
    // its new connection; the held copy, delivered late, must not add a second one.
    acknowledged.push(post("warm again").await);
    let (conn, answer) = fire("fast held", None, None, Mode::Hold).await;
    acknowledged.push(written_once(&db, "fast held", conn, answer).await);

    // 4. Transaction whose COMMIT is held back: the writer ends the backend that holds the
    // transaction open, learns that it did not commit, and writes the message again on its
    // new connection; the late COMMIT applies nothing.
    let key = Some("key-general-held");
    let (conn, answer) = fire("general held", key, Some("COMMIT"), Mode::Hold).await;
    acknowledged.push(written_once(&db, "general held", conn, answer).await);

    // 5. The connection breaks in the middle of a transaction: nothing of it committed,
    // and the batch is written again on the new connection.
    let key = Some("key-general-broken");
    let (conn, answer) = fire("general broken", key, None, Mode::Swallow).await;
    acknowledged.push(written_once(&db, "general broken", conn, answer).await);

    // The writer goes on, and the visitor's conversation holds exactly what was
    // acknowledged, in order.
    acknowledged.push(post("after").await);
    let listed = s
        .get(&format!(
            "/v3/conversations/visitors/{visitor}/messages?limit=100"
        ))
        .await;
    let listed: Vec<&str> = listed.ok()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, acknowledged);
    s.stop().await;
    drop(proxy);
    drop(db);
}

/// Ends this database's switchboard connections and waits until they are gone.
async fn end_connections(db: &crate::db::PgDatabase) -> usize {
    let mut conn = sqlx::PgConnection::connect(&db.url)
        .await
        .expect("connect to the test database");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'switchboard'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("end the connections");
    let _ = conn.close().await;
    assert!(
        ended.iter().all(|e| *e),
        "every connection ended: {ended:?}"
    );
    ended.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_after_postgresql_ends_the_idle_connections() {
    let Some((db, _)) = database().await else {
        eprintln!(
            "skipping commit_outcome: it runs in the PostgreSQL pass \
             (SWITCHBOARD_TEST_BACKEND=postgres)"
        );
        return;
    };
    let s = TestServer::start_on_with(
        PathBuf::from(&db.url),
        DomainConfig::default(),
        Clock::System,
        ServeOptions::default(),
    )
    .await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let visitor = "visitor-idle-connections";
    s.post(
        "/v3/conversations/messages",
        message(&agent, visitor, "first"),
    )
    .await
    .ok();
    // A plain message takes the single-statement path, one with a key a transaction; a
    // restart of PostgreSQL (here: its connections ended) is found out by either, and
    // neither may cost the caller its write.
    for (text, key) in [
        ("plain", None),
        ("with a key", Some("key-idle")),
        ("plain again", None),
    ] {
        assert!(
            end_connections(&db).await >= 1,
            "the writer's connection ended"
        );
        let (status, body) = post_later(&s, message(&agent, visitor, text), key)
            .await
            .expect("POST task");
        assert_eq!(status, 200, "{text}: {body}");
        assert_eq!(
            ids_with_text(&db, text).await,
            [body["id"].as_str().expect("id").to_owned()]
        );
    }
    s.stop().await;
    drop(db);
}

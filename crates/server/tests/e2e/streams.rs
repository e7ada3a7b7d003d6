//! Live delivery: the visitor WebSocket, the account's event stream, and the chat lifecycle.

use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard_server::domain::{Clock, DomainConfig};
use switchboard_server::http::streams::StreamConfig;
use switchboard_server::ServeOptions;

use crate::harness::{TestServer, KEY, WAIT};

#[tokio::test]
async fn an_agent_message_reaches_the_visitor_socket_with_edits_and_deletes() {
    let s = TestServer::start().await;
    let agent = s
        .agent("Julia", None, Some("https://pics.example/j.png"), &[])
        .await;
    let (visitor, token) = s.new_visitor().await;
    let (other, other_token) = s.new_visitor().await;
    let mut ws = s.ws(&format!("token={token}")).await;
    let (replayed, ready) = ws.until_ready().await;
    assert!(replayed.is_empty());
    assert!(ready["cursor"].is_i64());
    let mut other_ws = s.ws(&format!("token={other_token}")).await;
    other_ws.until_ready().await;

    let id = s.agent_says(&agent, &visitor, "Hi <there>").await;
    let f = ws.next_json().await;
    assert_eq!(f["event"], "messageCreated");
    assert_eq!(f["message"]["id"], id.as_str());
    assert_eq!(f["message"]["text"], "Hi <there>");
    assert_eq!(f["message"]["html"], "Hi &lt;there&gt;");
    assert_eq!(f["message"]["agentUserpic"], "https://pics.example/j.png");
    assert!(f["cursor"].as_i64().unwrap() > ready["cursor"].as_i64().unwrap());
    assert!(
        f.get("visitorId").is_none(),
        "account fields stay off the visitor socket"
    );

    s.call(
        Method::PUT,
        &format!("/v3/conversations/messages/{id}"),
        Some(json!({"text": "Hi there"})),
    )
    .await
    .ok();
    let f = ws.next_json().await;
    assert_eq!(f["event"], "messageUpdated");
    assert_eq!(f["message"]["text"], "Hi there");

    let push = s
        .post(
            "/v3/conversations/pushedMessages",
            json!({"visitorId": visitor, "text": "Your order shipped"}),
        )
        .await;
    let f = ws.next_json().await;
    assert_eq!(f["message"]["id"], push.ok()["id"]);
    assert_eq!(f["message"]["isPushed"], true);

    let del = s
        .call(
            Method::DELETE,
            &format!("/v3/conversations/messages/{id}"),
            None,
        )
        .await;
    assert_eq!(del.status, 204);
    let f = ws.next_json().await;
    assert_eq!(f["event"], "messageDeleted");
    assert_eq!(f["messageId"], id.as_str());
    assert!(f.get("message").is_none());

    // The visitor's own message comes back on its socket too (other tabs see it).
    let mine = s.visitor_says(&token, "thanks").await;
    let f = ws.next_json().await;
    assert_eq!(f["message"]["id"], mine.ok()["id"]);

    // The other visitor saw none of it.
    other_ws.assert_nothing_pending().await;
    ws.assert_nothing_pending().await;
    assert_ne!(other, visitor);
}

#[tokio::test]
async fn reconnecting_replays_exactly_what_was_missed() {
    let s = TestServer::start().await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let (visitor, token) = s.new_visitor().await;
    let (other, _) = s.new_visitor().await;

    let mut ws = s.ws(&format!("token={token}")).await;
    ws.until_ready().await;
    let first = s.agent_says(&agent, &visitor, "one").await;
    let seen = ws.next_json().await;
    assert_eq!(seen["message"]["id"], first.as_str());
    let seen_cursor = seen["cursor"].as_i64().unwrap();
    drop(ws);

    // While away: two new messages, an edit of the first, a message created then
    // deleted, and traffic of another visitor.
    let two = s.agent_says(&agent, &visitor, "two").await;
    s.agent_says(&agent, &other, "not yours").await;
    s.call(
        Method::PUT,
        &format!("/v3/conversations/messages/{first}"),
        Some(json!({"text": "one (edited)"})),
    )
    .await
    .ok();
    let gone = s.agent_says(&agent, &visitor, "oops").await;
    s.call(
        Method::DELETE,
        &format!("/v3/conversations/messages/{gone}"),
        None,
    )
    .await;
    let three = s.visitor_says(&token, "three").await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let expect = |frames: &[Value]| {
        let got: Vec<(String, String)> = frames
            .iter()
            .map(|f| {
                let id = f["message"]["id"]
                    .as_str()
                    .or(f["messageId"].as_str())
                    .unwrap()
                    .to_owned();
                (f["event"].as_str().unwrap().to_owned(), id)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("messageCreated".to_owned(), two.clone()),
                ("messageUpdated".to_owned(), first.clone()),
                ("messageDeleted".to_owned(), gone.clone()),
                ("messageCreated".to_owned(), three.clone()),
            ]
        );
        let cursors: Vec<i64> = frames
            .iter()
            .map(|f| f["cursor"].as_i64().unwrap())
            .collect();
        assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    };

    // By the last message seen ...
    let mut ws = s.ws(&format!("token={token}&after={first}")).await;
    let (frames, ready) = ws.until_ready().await;
    expect(&frames);
    assert_eq!(ready["cursor"], frames.last().unwrap()["cursor"]);
    assert_eq!(frames[1]["message"]["text"], "one (edited)");
    // ... then live, with nothing repeated.
    let four = s.agent_says(&agent, &visitor, "four").await;
    let f = ws.next_json().await;
    assert_eq!(f["message"]["id"], four.as_str());
    ws.assert_nothing_pending().await;
    drop(ws);

    // By cursor: the same.
    let mut ws = s.ws(&format!("token={token}&cursor={seen_cursor}")).await;
    let (frames, _) = ws.until_ready().await;
    expect(&frames[..4]);
    assert_eq!(frames.len(), 5, "and four");

    // A resume point from another visitor is refused before the upgrade.
    let other_msg = s.agent_says(&agent, &other, "x").await;
    let w = s.widget_id().await;
    let r = s
        .raw(s.request(
            Method::GET,
            &format!("/widget/v1/{w}/ws?token={token}&after={other_msg}"),
        ))
        .await;
    r.expect_error(400, "invalid_parameter");
}

#[tokio::test]
async fn bad_sockets_are_refused_or_closed_with_a_reason() {
    let s = TestServer::start().await;
    let w = s.widget_id().await;
    let (_, token) = s.new_visitor().await;

    // Without a token, or with a bad one: 401 before any upgrade.
    let r = s
        .raw(s.request(Method::GET, &format!("/widget/v1/{w}/ws")))
        .await;
    r.expect_error(401, "unauthorized");
    let url = format!(
        "{}/widget/v1/{w}/ws?token=v1.00.00",
        s.url.replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 401)
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // A plain GET with a good token is told it needs an upgrade.
    let r = s
        .raw(s.request(Method::GET, &format!("/widget/v1/{w}/ws?token={token}")))
        .await;
    r.expect_error(426, "bad_request");

    for (frame, code) in [
        ("not json", 1007),
        (r#"{"type":"dance"}"#, 1003),
        (r#"[1,2]"#, 1007),
    ] {
        let mut ws = s.ws(&format!("token={token}")).await;
        ws.until_ready().await;
        ws.send_text(frame).await;
        let (got, reason) = ws.expect_close().await;
        assert_eq!(got, code, "{frame}: {reason}");
        assert!(!reason.is_empty());
    }
    let mut ws = s.ws(&format!("token={token}")).await;
    ws.until_ready().await;
    {
        use futures::SinkExt;
        ws.inner
            .send(tokio_tungstenite::tungstenite::Message::binary(vec![
                1, 2, 3,
            ]))
            .await
            .unwrap();
    }
    assert_eq!(ws.expect_close().await.0, 1003);

    // The server is fine afterwards.
    let mut ws = s.ws(&format!("token={token}")).await;
    ws.until_ready().await;
    ws.assert_nothing_pending().await;
}

#[tokio::test]
async fn a_slow_visitor_is_disconnected_without_slowing_the_others() {
    let options = ServeOptions {
        stream_buffer: 4,
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(DomainConfig::default(), Clock::System, options).await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let (slow_v, slow_t) = s.new_visitor().await;
    let (fast_v, fast_t) = s.new_visitor().await;
    let mut slow = s.ws(&format!("token={slow_t}")).await;
    slow.until_ready().await;
    let mut fast = s.ws(&format!("token={fast_t}")).await;
    fast.until_ready().await;

    // Big messages fill the socket buffers of the client that does not read; then its
    // 4-frame buffer fills and the hub lets it go.
    let big = "x".repeat(100_000);
    let mut last = String::new();
    for _ in 0..120 {
        last = s.agent_says(&agent, &slow_v, &big).await;
        let f = s.agent_says(&agent, &fast_v, "still here").await;
        assert_eq!(fast.next_json().await["message"]["id"], f.as_str());
    }
    let (code, reason) = slow.expect_close().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("slow consumer"), "{reason}");
    // It can come back with its cursor and lose nothing: the last message is replayed.
    let mut again = s.ws(&format!("token={slow_t}&cursor=0")).await;
    let (frames, _) = again.until_ready().await;
    assert_eq!(frames.last().unwrap()["message"]["id"], last.as_str());
    fast.assert_nothing_pending().await;
}

#[tokio::test]
async fn an_idle_socket_is_closed() {
    let options = ServeOptions {
        streams: StreamConfig {
            ping_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            ..StreamConfig::default()
        },
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(DomainConfig::default(), Clock::System, options).await;
    let (_, token) = s.new_visitor().await;
    let mut ws = s.ws(&format!("token={token}")).await;
    ws.until_ready().await;
    // Not reading means not answering pings: the server gives up after the idle timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
}

/// An SSE reader over a streaming response.
struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    async fn open(s: &TestServer, headers: &[(&str, &str)]) -> Self {
        let mut req = s
            .request(Method::GET, "/v3/conversations/events")
            .header("api-key", KEY);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.expect("events");
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            body: res.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event: (id, event name, data as JSON); comments are skipped.
    async fn next(&mut self) -> (String, String, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut name, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        name = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if name.is_empty() && data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return (id, name, data);
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("an event within the wait")
                .expect("stream open")
                .expect("chunk");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn the_account_stream_carries_visitor_messages_and_resumes_by_last_event_id() {
    let s = TestServer::start().await;
    let agent = s.agent("Julia", Some("julia@example.com"), None, &[]).await;
    let (visitor, token) = s.new_visitor().await;
    let mut sse = Sse::open(&s, &[]).await;

    let m = s.visitor_says(&token, "I need help").await;
    let created = sse.next().await;
    let (id1, name, data) = &created;
    assert_eq!(name, "messageCreated");
    assert_eq!(data["message"]["id"], m.ok()["id"]);
    assert_eq!(data["message"]["type"], "visitor");
    assert_eq!(data["visitorId"], visitor.as_str());
    assert_eq!(&data["cursor"].as_i64().unwrap().to_string(), id1);
    let started = sse.next().await;
    let (_, name, data) = &started;
    assert_eq!(name, "conversationStarted");
    assert_eq!(data["isNoAvailableAgent"], true);
    assert_eq!(data["message"]["id"], m.ok()["id"]);
    assert!(data["conversationId"].is_string());
    assert!(data["chatId"].is_string());

    let reply = s.agent_says(&agent, &visitor, "On it").await;
    let (id2, name, data) = sse.next().await;
    assert_eq!(name, "messageCreated");
    assert_eq!(data["message"]["id"], reply.as_str());
    drop(sse);

    // Missed while disconnected, then resumed by Last-Event-ID.
    let edit = s
        .call(
            Method::PUT,
            &format!("/v3/conversations/messages/{reply}"),
            Some(json!({"text": "On it!"})),
        )
        .await;
    edit.ok();
    let later = s.agent_says(&agent, &visitor, "Done").await;
    let mut sse = Sse::open(&s, &[("last-event-id", &id2)]).await;
    let (_, name, data) = sse.next().await;
    assert_eq!(
        (name.as_str(), data["message"]["text"].as_str()),
        ("messageUpdated", Some("On it!"))
    );
    let (_, name, data) = sse.next().await;
    assert_eq!(
        (name.as_str(), data["message"]["id"].as_str()),
        ("messageCreated", Some(later.as_str()))
    );
    // Then live.
    let live = s.agent_says(&agent, &visitor, "live").await;
    let (_, _, data) = sse.next().await;
    assert_eq!(data["message"]["id"], live.as_str());

    // Replayed from the start, the first events (read back from the database, the chat's
    // with it) are what the live stream carried.
    let mut sse = Sse::open(&s, &[("last-event-id", "0")]).await;
    assert_eq!(sse.next().await, created);
    assert_eq!(sse.next().await, started);

    // Another account's stream sees none of this; a bad key is refused.
    let r = s
        .raw(
            s.request(Method::GET, "/v3/conversations/events")
                .header("api-key", "xkeysib-wrong"),
        )
        .await;
    r.expect_error(401, "unauthorized");
    let r = s
        .raw(
            s.request(Method::GET, "/v3/conversations/events")
                .header("api-key", KEY)
                .header("last-event-id", "yesterday"),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
}

#[tokio::test]
async fn chats_start_and_end_on_inactivity_and_flag_unread_agent_messages() {
    let clock = Clock::manual(1_700_000_000_000);
    let config = DomainConfig {
        chat_timeout: Duration::from_secs(60),
        ..DomainConfig::default()
    };
    let options = ServeOptions {
        lifecycle_tick: None,
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(config, clock.clone(), options).await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let (visitor, token) = s.new_visitor().await;
    let (reader, reader_token) = s.new_visitor().await;
    let mut sse = Sse::open(&s, &[]).await;

    // A pushed message does not start a chat.
    s.post(
        "/v3/conversations/pushedMessages",
        json!({"visitorId": visitor, "text": "Sale today"}),
    )
    .await
    .ok();
    let (_, name, _) = sse.next().await;
    assert_eq!(name, "messageCreated");

    // The agent's first message does; the visitor never reads it.
    let unread = s.agent_says(&agent, &visitor, "Can I help?").await;
    let (_, name, _) = sse.next().await;
    assert_eq!(name, "messageCreated");
    let (_, name, started) = sse.next().await;
    assert_eq!(name, "conversationStarted");
    assert_eq!(started["message"]["id"], unread.as_str());
    assert_eq!(started["isNoAvailableAgent"], false);
    let chat = started["chatId"].as_str().unwrap().to_owned();

    // The other visitor reads its agent message.
    let read = s.agent_says(&agent, &reader, "Hello reader").await;
    sse.next().await;
    sse.next().await;
    let r = s
        .widget_call(
            Method::POST,
            "/read",
            &reader_token,
            Some(json!({"messageId": read})),
        )
        .await;
    assert_eq!(r.status, 204);

    // Activity keeps a chat open; inactivity past the timeout ends it.
    clock.advance(Duration::from_secs(45));
    assert_eq!(s.domain.end_idle_chats().await.unwrap(), 0);
    s.visitor_says(&token, "yes").await.ok();
    sse.next().await;
    clock.advance(Duration::from_secs(45));
    // The reader's chat (idle 90 s) ends; the visitor's (idle 45 s) does not.
    assert_eq!(s.domain.end_idle_chats().await.unwrap(), 1);
    let (_, name, ended) = sse.next().await;
    assert_eq!(name, "conversationEnded");
    assert_eq!(ended["visitorId"], reader.as_str());
    let got = s.get(&format!("/v3/conversations/messages/{read}")).await;
    assert_eq!(got.ok()["isMissedByVisitor"], false, "it was read");

    clock.advance(Duration::from_secs(30));
    assert_eq!(s.domain.end_idle_chats().await.unwrap(), 1);
    let (_, name, ended) = sse.next().await;
    assert_eq!(name, "conversationEnded");
    assert_eq!(ended["chatId"], chat.as_str());
    let got = s.get(&format!("/v3/conversations/messages/{unread}")).await;
    assert_eq!(
        got.ok()["isMissedByVisitor"],
        true,
        "never read: {}",
        got.raw
    );
    assert_eq!(s.domain.end_idle_chats().await.unwrap(), 0, "ended once");

    // The next message starts a new chat in the same conversation.
    let again = s.visitor_says(&token, "back").await;
    sse.next().await;
    let (_, name, started2) = sse.next().await;
    assert_eq!(name, "conversationStarted");
    assert_ne!(started2["chatId"], chat.as_str());
    assert_eq!(started2["conversationId"], started["conversationId"]);
    assert_eq!(started2["message"]["id"], again.ok()["id"]);
    assert_eq!(started2["isNoAvailableAgent"], true);

    // Durable: after a restart the open chat is still open and still ends once.
    let db = s.db.clone();
    let dir = s.stop().await;
    let s = TestServer::start_on_with(
        db,
        DomainConfig {
            chat_timeout: Duration::from_secs(60),
            ..DomainConfig::default()
        },
        clock.clone(),
        ServeOptions {
            lifecycle_tick: None,
            ..ServeOptions::default()
        },
    )
    .await;
    assert_eq!(s.domain.end_idle_chats().await.unwrap(), 0);
    clock.advance(Duration::from_secs(61));
    assert_eq!(s.domain.end_idle_chats().await.unwrap(), 1);
    assert_eq!(s.count("chats WHERE ended_at IS NOT NULL").await, 3);
    assert_eq!(s.count("events WHERE kind = 'conversationEnded'").await, 3);
    drop(dir);
}

/// Event streams and WebSockets have keep-alives of their own: the HTTP idle timeout, which
/// closes kept-alive connections between requests, does not cut them.
#[tokio::test]
async fn streams_outlive_the_http_idle_timeout() {
    let options = ServeOptions {
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(DomainConfig::default(), Clock::System, options).await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let (visitor, token) = s.new_visitor().await;
    let mut ws = s.ws(&format!("token={token}")).await;
    ws.until_ready().await;
    let mut sse = Sse::open(&s, &[]).await;
    // Both quiet for five idle timeouts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = s.agent_says(&agent, &visitor, "still there?").await;
    assert_eq!(ws.next_json().await["message"]["id"], id.as_str());
    let (_, name, data) = sse.next().await;
    assert_eq!(name, "messageCreated");
    assert_eq!(data["message"]["id"], id.as_str());
}

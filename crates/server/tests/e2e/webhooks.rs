//! Webhooks against a real local receiver: events, payloads, signatures, retries, order,
//! failing endpoints, the delivery log, replay and the SSRF guard.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use hmac::Mac;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard_server::domain::{Clock, DomainConfig};
use switchboard_server::webhooks::DispatcherConfig;
use switchboard_server::ServeOptions;

use crate::harness::{Hit, Receiver, TestServer, WAIT};

fn verify(secret: &str, hit: &Hit) {
    let h = |n: &str| hit.headers[n].to_str().unwrap().to_owned();
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).as_bytes());
    mac.update(hit.raw.as_bytes());
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    assert_eq!(h("webhook-signature"), expected);
    assert!(h("webhook-id").starts_with("evt_"));
    assert_eq!(h("content-type"), "application/json");
}

fn fast_retries() -> DispatcherConfig {
    DispatcherConfig {
        retry_first: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
        timeout: Duration::from_millis(1500),
        ..DispatcherConfig::default()
    }
}

#[tokio::test]
async fn every_event_carries_brevo_fields_signed_and_in_order() {
    let clock = Clock::manual(1_700_000_000_000);
    let config = DomainConfig {
        fragment_delay: Duration::from_secs(5),
        chat_timeout: Duration::from_secs(60),
        ..DomainConfig::default()
    };
    let options = ServeOptions {
        lifecycle_tick: None,
        webhooks: Some(fast_retries()),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(config, clock.clone(), options).await;
    let mut rx = Receiver::start().await;
    let (_, secret) = s.webhook(&rx.url, &[]).await;
    let agent = s
        .agent(
            "Julia",
            Some("julia@example.com"),
            Some("https://pics.example/j.png"),
            &[],
        )
        .await;
    let w = s.widget_id().await;
    let session = s
        .session_on(
            &w,
            json!({"name": "Ada", "email": "ada@example.com", "browserLanguage": "en-GB",
                   "pageUrl": "https://shop.example/jeans", "pageTitle": "Jeans",
                   "attributes": {"plan": "pro"}}),
        )
        .await;
    let visitor = session.ok()["visitorId"].as_str().unwrap().to_owned();
    let conversation = session.ok()["conversationId"].as_str().unwrap().to_owned();
    let token = session.ok()["token"].as_str().unwrap().to_owned();

    // A pushed message starts nothing.
    s.post(
        "/v3/conversations/pushedMessages",
        json!({"visitorId": visitor, "text": "Sale!", "agentId": agent}),
    )
    .await
    .ok();
    // The visitor writes while nobody is online: the chat starts.
    let first = s.visitor_says(&token, "Do you ship to Oslo?").await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = rx.next().await;
    verify(&secret, &started);
    let b = &started.body;
    assert_eq!(b["eventName"], "conversationStarted");
    assert_eq!(b["conversationId"], conversation.as_str());
    assert_eq!(b["isNoAvailableAgent"], true);
    assert_eq!(
        b["conversationStartPage"],
        json!({"link": "https://shop.example/jeans", "title": "Jeans"})
    );
    assert_eq!(b["message"]["id"], first.as_str());
    assert_eq!(b["message"]["type"], "visitor");
    assert_eq!(b["message"]["isMissed"], true);
    assert!(b.get("agent").is_none());
    let v = &b["visitor"];
    assert_eq!(v["id"], visitor.as_str());
    assert_eq!(v["threadId"], conversation.as_str());
    assert_eq!(v["source"], "widget");
    assert_eq!(v["displayedName"], "Ada");
    assert_eq!(v["browserLanguage"], "en-GB");
    assert_eq!(v["attributes"]["EMAIL"], "ada@example.com");
    assert_eq!(v["name"], "Ada");
    assert_eq!(v["email"], "ada@example.com");
    assert_eq!(
        v["lastVisit"]["viewedPages"],
        json!([{"link": "https://shop.example/jeans", "title": "Jeans"}])
    );
    assert!(v.get("groupId").is_none());
    assert_eq!(v["integrationAttributes"], json!({"plan": "pro"}));

    // The visitor is routed to a group; an integration answers, marking its message; the
    // chat then goes quiet.
    let group = s.group("Sales").await;
    s.call(
        Method::PUT,
        "/v3/conversations/visitorGroup",
        Some(json!({"visitorId": visitor, "groupId": group})),
    )
    .await
    .ok();
    let reply = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": visitor, "agentId": agent, "text": "Yes!", "receivedFrom": "my-crm"}),
        )
        .await
        .ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    clock.advance(Duration::from_secs(4));
    assert_eq!(
        s.domain.run_timers().await.unwrap().webhook_events,
        0,
        "not quiet long enough"
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(s.domain.run_timers().await.unwrap().webhook_events, 1);
    let fragment = rx.next().await;
    verify(&secret, &fragment);
    let b = &fragment.body;
    assert_eq!(b["eventName"], "conversationFragment");
    let ids: Vec<&str> = b["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str(), reply.as_str()]);
    assert_eq!(b["messages"][1]["receivedFrom"], "my-crm");
    assert_eq!(
        b["agents"],
        json!([{"id": agent, "name": "Julia", "email": "julia@example.com", "userpic": "https://pics.example/j.png"}])
    );
    assert!(b.get("conversationStartPage").is_none());
    assert_eq!(b["visitor"]["groupId"], group.as_str());

    // More, then the chat times out: a last fragment, then the transcript.
    let last = s.visitor_says(&token, "Great, thanks").await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    clock.advance(Duration::from_secs(61));
    let outcome = s.domain.run_timers().await.unwrap();
    assert_eq!((outcome.ended, outcome.webhook_events), (1, 2));
    let fragment2 = rx.next().await;
    assert_eq!(fragment2.body["eventName"], "conversationFragment");
    assert_eq!(fragment2.body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(fragment2.body["messages"][0]["id"], last.as_str());
    let transcript = rx.next().await;
    verify(&secret, &transcript);
    let b = &transcript.body;
    assert_eq!(b["eventName"], "conversationTranscript");
    let ids: Vec<&str> = b["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str(), reply.as_str(), last.as_str()]);
    assert_eq!(
        b["missedMessagesCount"], 2,
        "both visitor messages were missed"
    );
    assert_eq!(
        b["conversationStartPage"]["link"],
        "https://shop.example/jeans"
    );
    assert_eq!(b["messages"][1]["isMissedByVisitor"], true);

    // Each event once, each with its own id.
    let ids: HashSet<String> = [&started, &fragment, &fragment2, &transcript]
        .iter()
        .map(|h| h.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.hits.recv())
            .await
            .is_err(),
        "nothing else was sent"
    );
}

/// Waits until the receiver has seen every event id in the outbox; returns first arrivals
/// in order.
async fn collect_all(s: &TestServer, rx: &mut Receiver) -> (Vec<Hit>, usize) {
    let mut seen: HashMap<String, Hit> = HashMap::new();
    let mut order = Vec::new();
    let mut duplicates = 0;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    loop {
        let expected = s.count("webhook_events").await as usize;
        if expected > 0 && seen.len() == expected {
            return (order, duplicates);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {expected} events arrived",
            seen.len()
        );
        if let Ok(Some(hit)) =
            tokio::time::timeout(Duration::from_millis(200), rx.hits.recv()).await
        {
            let id = hit.headers["webhook-id"].to_str().unwrap().to_owned();
            if let Some(prev) = seen.get(&id) {
                assert_eq!(prev.raw, hit.raw, "a repeat must be the same bytes");
                duplicates += 1;
            } else {
                seen.insert(id, hit.clone());
                order.push(hit);
            }
        }
    }
}

/// Asserts each conversation's events came in order and its messages arrived once each, in
/// the order they were sent (each visitor sent "m0", "m1", ... in turn).
fn assert_in_order(hits: &[Hit], messages_per_visitor: usize) {
    let mut by_conversation: HashMap<String, Vec<&Value>> = HashMap::new();
    for h in hits {
        by_conversation
            .entry(h.body["conversationId"].as_str().unwrap().to_owned())
            .or_default()
            .push(&h.body);
    }
    for (conversation, events) in by_conversation {
        assert_eq!(
            events[0]["eventName"], "conversationStarted",
            "{conversation}"
        );
        let mut texts: Vec<String> = Vec::new();
        let mut message_ids: Vec<String> = Vec::new();
        for e in &events[1..] {
            assert_eq!(e["eventName"], "conversationFragment");
            for m in e["messages"].as_array().unwrap() {
                texts.push(m["text"].as_str().unwrap().to_owned());
                message_ids.push(m["id"].as_str().unwrap().to_owned());
            }
        }
        let sent: Vec<String> = (0..messages_per_visitor).map(|i| format!("m{i}")).collect();
        assert_eq!(
            texts, sent,
            "fragments in order, each message once: {conversation}"
        );
        message_ids.sort();
        message_ids.dedup();
        assert_eq!(message_ids.len(), messages_per_visitor, "{conversation}");
    }
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_everything_in_order_once_it_is_back() {
    let config = DomainConfig {
        fragment_delay: Duration::ZERO,
        ..DomainConfig::default()
    };
    let options = ServeOptions {
        webhooks: Some(fast_retries()),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(config, Clock::System, options).await;
    let mut rx = Receiver::start().await;
    s.webhook(&rx.url, &["conversationStarted", "conversationFragment"])
        .await;
    rx.down().await;

    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(s.new_visitor().await.1);
    }
    for round in 0..4 {
        for t in &tokens {
            s.visitor_says(t, &format!("m{round}")).await.ok();
        }
    }
    // Deliveries fail while the receiver is down...
    let deadline = tokio::time::Instant::now() + WAIT;
    while s.count("webhook_attempts WHERE error IS NOT NULL").await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed attempts recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.count("webhook_deliveries WHERE status = 'delivered'")
            .await,
        0
    );
    // ... and all arrive once it is back.
    rx.up().await;
    let (hits, _) = collect_all(&s, &mut rx).await;
    assert_in_order(&hits, 4);
    let deadline = tokio::time::Instant::now() + WAIT;
    while s
        .count("webhook_deliveries WHERE status != 'delivered'")
        .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries not marked delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failing_endpoint_does_not_hold_up_a_healthy_one() {
    let config = DomainConfig {
        fragment_delay: Duration::ZERO,
        ..DomainConfig::default()
    };
    let options = ServeOptions {
        webhooks: Some(DispatcherConfig {
            timeout: Duration::from_millis(300),
            failing_after: 3,
            ..fast_retries()
        }),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(config, Clock::System, options).await;
    let mut good = Receiver::start().await;
    let slow = Receiver::start().await;
    let broken = Receiver::start().await;
    slow.delay_ms
        .store(5_000, std::sync::atomic::Ordering::SeqCst);
    broken
        .status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let (_, _) = s.webhook(&good.url, &[]).await;
    let (slow_id, _) = s.webhook(&slow.url, &[]).await;
    let (broken_id, _) = s.webhook(&broken.url, &[]).await;

    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(s.new_visitor().await.1);
    }
    for t in &tokens {
        for i in 0..3 {
            s.visitor_says(t, &format!("m{i}")).await.ok();
        }
    }
    let (hits, _) = collect_all(&s, &mut good).await;
    assert_in_order(&hits, 3);

    // The others are retried and marked failing, visibly in the API.
    for id in [&slow_id, &broken_id] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let w = s.get(&format!("/v3/conversations/webhooks/{id}")).await;
            if w.ok()["status"] == "failing" {
                assert!(w.ok()["consecutiveFailures"].as_i64().unwrap() >= 3);
                assert!(w.ok()["lastError"].is_string());
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never marked failing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The log shows the attempted deliveries (the oldest of each conversation) with why
    // they failed and when they are tried again; the later ones wait their turn.
    let tried = |log: &Value| -> Vec<Value> {
        log.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["attempts"].as_i64().unwrap() > 0)
            .cloned()
            .collect()
    };
    let log = s
        .get(&format!("/v3/conversations/webhooks/{slow_id}/deliveries"))
        .await;
    let attempted = tried(log.ok());
    assert!(!attempted.is_empty());
    for d in &attempted {
        assert_eq!(d["status"], "pending");
        assert!(
            d["lastError"].as_str().unwrap().contains("timed out"),
            "{d}"
        );
        assert!(d["nextAttemptAt"].is_i64());
        assert_eq!(
            d["eventName"], "conversationStarted",
            "order: the start goes first"
        );
    }
    let log = s
        .get(&format!(
            "/v3/conversations/webhooks/{broken_id}/deliveries"
        ))
        .await;
    for d in tried(log.ok()) {
        assert_eq!(d["lastStatus"], 500);
    }
    drop(slow);
    drop(broken);
}

#[tokio::test]
async fn the_webhook_api_validates_logs_and_replays() {
    let config = DomainConfig {
        fragment_delay: Duration::ZERO,
        ..DomainConfig::default()
    };
    let options = ServeOptions {
        webhooks: Some(fast_retries()),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(config, Clock::System, options).await;
    let mut rx = Receiver::start().await;
    rx.answer_bytes
        .store(8 * 1024 * 1024, std::sync::atomic::Ordering::SeqCst);

    for (body, code) in [
        (json!({}), "missing_parameter"),
        (json!({"url": "ftp://example.com/x"}), "invalid_parameter"),
        (json!({"url": "not a url"}), "invalid_parameter"),
        (
            json!({"url": rx.url, "events": ["conversationEnded"]}),
            "invalid_parameter",
        ),
        (json!({"url": rx.url, "events": []}), "missing_parameter"),
        (json!({"url": 5}), "invalid_parameter"),
    ] {
        s.post("/v3/conversations/webhooks", body.clone())
            .await
            .expect_error(400, code);
    }
    let (id, secret) = s.webhook(&rx.url, &["conversationStarted"]).await;
    let list = s.get("/v3/conversations/webhooks").await;
    assert_eq!(list.ok()[0]["id"], id.as_str());
    assert!(
        list.ok()[0].get("secret").is_none(),
        "listing hides secrets"
    );
    assert_eq!(list.ok()[0]["events"], json!(["conversationStarted"]));
    let one = s.get(&format!("/v3/conversations/webhooks/{id}")).await;
    assert_eq!(one.ok()["secret"], secret.as_str());

    let (_, token) = s.new_visitor().await;
    s.visitor_says(&token, "hi").await.ok();
    let hit = rx.next().await;
    verify(&secret, &hit);
    let event = hit.headers["webhook-id"].to_str().unwrap().to_owned();
    // The answer (8 MiB) is not read past the cap, and the delivery is recorded.
    let deadline = tokio::time::Instant::now() + WAIT;
    let delivery = loop {
        let d = s
            .get(&format!(
                "/v3/conversations/webhooks/{id}/deliveries/{event}"
            ))
            .await;
        if d.ok()["status"] == "delivered" {
            break d.ok().clone();
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(delivery["eventName"], "conversationStarted");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["attemptLog"][0]["status"], 200);
    assert!(delivery["attemptLog"][0]["latencyMs"].is_i64());

    // Replay: the same id and the same bytes again.
    let r = s
        .call(
            Method::POST,
            &format!("/v3/conversations/webhooks/{id}/deliveries/{event}/replay"),
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.raw);
    let again = rx.next().await;
    assert_eq!(again.headers["webhook-id"].to_str().unwrap(), event);
    assert_eq!(again.raw, hit.raw);
    s.call(
        Method::POST,
        &format!("/v3/conversations/webhooks/{id}/deliveries/evt_nope/replay"),
        None,
    )
    .await
    .expect_error(404, "document_not_found");

    // Disabled: new events are not delivered to it.
    let put = s
        .call(
            Method::PUT,
            &format!("/v3/conversations/webhooks/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(put.ok()["enabled"], false);
    let (_, token2) = s.new_visitor().await;
    s.visitor_says(&token2, "hello?").await.ok();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.hits.recv())
            .await
            .is_err()
    );

    // Another account sees none of it.
    let (_, key) = s.domain.create_account("other").await.unwrap();
    s.call_with(
        Method::GET,
        &format!("/v3/conversations/webhooks/{id}"),
        None,
        &[("api-key", &key.key)],
    )
    .await
    .expect_error(404, "document_not_found");
    let r = s
        .call(
            Method::DELETE,
            &format!("/v3/conversations/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    s.get(&format!("/v3/conversations/webhooks/{id}"))
        .await
        .expect_error(404, "document_not_found");
}

#[tokio::test]
async fn the_ssrf_guard_refuses_internal_addresses() {
    let config = DomainConfig {
        fragment_delay: Duration::ZERO,
        webhook_block_private: true,
        ..DomainConfig::default()
    };
    let options = ServeOptions {
        webhooks: Some(DispatcherConfig {
            block_private: true,
            ..fast_retries()
        }),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(config, Clock::System, options).await;
    let mut rx = Receiver::start().await;
    for url in [
        rx.url.clone(),
        "http://10.0.0.1/x".into(),
        "http://169.254.169.254/latest".into(),
        "http://[::1]:8080/x".into(),
    ] {
        let m = s
            .post("/v3/conversations/webhooks", json!({"url": url}))
            .await
            .expect_error(400, "invalid_parameter");
        assert!(m.contains("private"), "{m}");
    }
    // A host name is checked when connecting: localhost resolves to loopback only.
    let by_name = format!("http://localhost:{}/hook", rx.port);
    let (id, _) = s.webhook(&by_name, &[]).await;
    let (_, token) = s.new_visitor().await;
    s.visitor_says(&token, "hi").await.ok();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = s
            .get(&format!("/v3/conversations/webhooks/{id}/deliveries"))
            .await;
        let errors: Vec<String> = log
            .ok()
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["lastError"].as_str().map(str::to_owned))
            .collect();
        if let Some(e) = errors.first() {
            assert!(e.contains("private"), "{e}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempt recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rx.hits.try_recv().is_err(), "nothing reached the receiver");
}

/// A delivery cut off by a stop is sent again after the restart with the same id and the
/// same bytes, even though the visitor changed in between (the payload is stored before the
/// first attempt, not rendered again).
#[tokio::test]
async fn an_event_resent_after_a_restart_has_the_same_bytes() {
    let options = || ServeOptions {
        webhooks: Some(fast_retries()),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(DomainConfig::default(), Clock::System, options()).await;
    let mut rx = Receiver::start().await;
    rx.delay_ms
        .store(3_000, std::sync::atomic::Ordering::SeqCst);
    s.webhook(&rx.url, &["conversationStarted"]).await;
    let w = s.widget_id().await;
    let (_, token) = s.new_visitor().await;
    s.visitor_says(&token, "hi").await.ok();
    let first = rx.next().await;
    assert!(first.body["visitor"].get("name").is_none());

    // Stopped while the receiver still holds the request: the attempt is never recorded.
    let db = s.db.clone();
    let dir = s.stop().await;
    rx.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    // The visitor gives its name meanwhile (written while the server is down, so that it is
    // surely there before the delivery is retried).
    let mut conn = crate::db::Conn::open_writable(&db).await;
    conn.execute("UPDATE visitors SET name = 'Ada'").await;
    conn.close().await;
    let s = TestServer::start_on_with(db, DomainConfig::default(), Clock::System, options()).await;
    let now = s.session_on(&w, json!({"token": token})).await;
    assert_eq!(
        s.domain
            .visitor(&s.account, now.ok()["visitorId"].as_str().unwrap())
            .await
            .unwrap()
            .name
            .as_deref(),
        Some("Ada")
    );
    let again = rx.next().await;
    assert_eq!(again.headers["webhook-id"], first.headers["webhook-id"]);
    assert_eq!(again.raw, first.raw, "the same bytes, not a new rendering");
    drop(dir);
}

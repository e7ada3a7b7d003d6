//! The visitor API: sessions, tokens, identity binding, visitor messages, reads, limits.

use std::time::Duration;

use hmac::Mac;
use reqwest::Method;
use serde_json::json;
use switchboard_server::domain::{Clock, DomainConfig};

use crate::harness::TestServer;

pub(crate) fn identity_hash(key: &str, visitor: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(visitor.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn a_new_session_makes_a_visitor_and_a_token_resumes_it() {
    let s = TestServer::start().await;
    let w = s.widget_id().await;
    assert_eq!(w.len(), 24);
    let r = s
        .session_on(
            &w,
            json!({"name": "Ada", "email": "ada@example.com", "browserLanguage": "en-GB",
                   "pageUrl": "https://shop.example/jeans", "pageTitle": "Jeans",
                   "attributes": {"plan": "pro", "seats": 3}}),
        )
        .await;
    let b = r.ok().clone();
    let visitor = b["visitorId"].as_str().unwrap().to_owned();
    assert_eq!(visitor.len(), 32);
    assert!(visitor.chars().all(|c| c.is_ascii_alphanumeric()));
    let conversation = b["conversationId"].as_str().unwrap().to_owned();
    let token = b["token"].as_str().unwrap().to_owned();

    // Resuming keeps the visitor and conversation, and merges new attributes.
    let again = s
        .session_on(
            &w,
            json!({"token": token, "pageUrl": "https://shop.example/cart", "attributes": {"seats": 4}}),
        )
        .await;
    assert_eq!(again.ok()["visitorId"], visitor.as_str());
    assert_eq!(again.ok()["conversationId"], conversation.as_str());

    let v = s.domain.visitor(&s.account, &visitor).await.unwrap();
    assert_eq!(v.name.as_deref(), Some("Ada"));
    assert_eq!(v.email.as_deref(), Some("ada@example.com"));
    assert_eq!(v.browser_language.as_deref(), Some("en-GB"));
    assert_eq!(
        v.start_page_url.as_deref(),
        Some("https://shop.example/jeans")
    );
    assert_eq!(v.page_url.as_deref(), Some("https://shop.example/cart"));
    let attrs: serde_json::Value = serde_json::from_str(&v.attributes).unwrap();
    assert_eq!(attrs, json!({"plan": "pro", "seats": 4}));

    // Two new sessions are two visitors.
    let (other, _) = s.new_visitor().await;
    assert_ne!(other, visitor);
}

#[tokio::test]
async fn binding_a_site_user_id_needs_its_identity_hash() {
    let s = TestServer::start().await;
    let w = s.widget_id().await;
    let key = s.identity_key().await;

    let msg = s
        .session_on(&w, json!({"visitorId": "user-42"}))
        .await
        .expect_error(401, "unauthorized");
    assert!(msg.contains("visitorHash"), "{msg}");
    s.session_on(
        &w,
        json!({"visitorId": "user-42", "visitorHash": identity_hash(&key, "user-43")}),
    )
    .await
    .expect_error(401, "unauthorized");
    s.session_on(
        &w,
        json!({"visitorId": "user-42", "visitorHash": identity_hash("not-the-key", "user-42")}),
    )
    .await
    .expect_error(401, "unauthorized");

    let ok = s
        .session_on(
            &w,
            json!({"visitorId": "user-42", "visitorHash": identity_hash(&key, "user-42")}),
        )
        .await;
    assert_eq!(ok.ok()["visitorId"], "user-42");
    let token = ok.ok()["token"].as_str().unwrap().to_owned();

    // An agent message to the bound id is in the bound visitor's history.
    let agent = s.agent("Julia", None, None, &[]).await;
    let id = s.agent_says(&agent, "user-42", "Welcome back").await;
    let page = s.widget_call(Method::GET, "/messages", &token, None).await;
    assert_eq!(page.ok()["messages"][0]["id"], id.as_str());

    // A token of one visitor cannot claim another id.
    let (_, other_token) = s.new_visitor().await;
    s.session_on(
        &w,
        json!({"token": other_token, "visitorId": "user-42", "visitorHash": identity_hash(&key, "user-42")}),
    )
    .await
    .expect_error(401, "unauthorized");

    // Rotating the identity key signs everybody out.
    s.domain.rotate_identity_key(&s.account).await.unwrap();
    s.widget_call(Method::GET, "/messages", &token, None)
        .await
        .expect_error(401, "unauthorized");
}

#[tokio::test]
async fn tokens_are_checked_per_widget_and_account() {
    let s = TestServer::start().await;
    let w = s.widget_id().await;
    let (_, token) = s.new_visitor().await;

    // Unknown widget.
    s.session_on("ffffffffffffffffffffffff", json!({}))
        .await
        .expect_error(404, "document_not_found");
    // Missing, garbage and tampered tokens.
    s.call_with(Method::GET, &format!("/widget/v1/{w}/messages"), None, &[])
        .await
        .expect_error(401, "unauthorized");
    s.widget_call(Method::GET, "/messages", "v1.zz.zz", None)
        .await
        .expect_error(401, "unauthorized");
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    s.widget_call(Method::GET, "/messages", &tampered, None)
        .await
        .expect_error(401, "unauthorized");
    // The api-key is not a visitor credential.
    let key_auth = format!("Bearer {}", crate::harness::KEY);
    s.call_with(
        Method::GET,
        &format!("/widget/v1/{w}/messages"),
        None,
        &[
            ("authorization", &key_auth),
            ("api-key", crate::harness::KEY),
        ],
    )
    .await
    .expect_error(401, "unauthorized");

    // A token of another account's widget is refused on this widget, and the reverse.
    let (other, _) = s.domain.create_account("other").await.unwrap();
    let other_widget = s.domain.widget_of(&other.id).await.unwrap().widget_id;
    let other_session = s.session_on(&other_widget, json!({})).await;
    let other_token = other_session.ok()["token"].as_str().unwrap().to_owned();
    s.widget_call(Method::GET, "/messages", &other_token, None)
        .await
        .expect_error(401, "unauthorized");
    s.call_with(
        Method::GET,
        &format!("/widget/v1/{other_widget}/messages"),
        None,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect_error(401, "unauthorized");
}

#[tokio::test]
async fn visitor_messages_are_missed_without_an_online_agent_and_reach_the_api() {
    let s = TestServer::start().await;
    let agent = s.agent("Julia", Some("julia@example.com"), None, &[]).await;
    let (visitor, token) = s.new_visitor().await;

    let m = s.visitor_says(&token, "Hello?").await;
    let m = m.ok().clone();
    assert_eq!(m["type"], "visitor");
    assert_eq!(m["visitorId"], visitor.as_str());
    assert_eq!(m["isMissed"], true, "no agent online: {m}");
    assert!(m.get("agentId").is_none());

    s.post(
        "/v3/conversations/agentOnlinePing",
        json!({"agentId": agent}),
    )
    .await;
    let m2 = s.visitor_says(&token, "Anyone?").await;
    assert_eq!(m2.ok()["isMissed"], false);

    // The Brevo API serves visitor messages by id, and refuses to edit them.
    let id = m["id"].as_str().unwrap();
    let got = s.get(&format!("/v3/conversations/messages/{id}")).await;
    assert_eq!(got.ok()["text"], "Hello?");
    s.call(
        Method::PUT,
        &format!("/v3/conversations/messages/{id}"),
        Some(json!({"text": "changed"})),
    )
    .await
    .expect_error(400, "permission_denied");

    // The visitor's history: both messages, oldest first.
    let page = s.widget_call(Method::GET, "/messages", &token, None).await;
    let texts: Vec<_> = page.ok()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["Hello?", "Anyone?"]);

    // Bad bodies.
    s.widget_call(Method::POST, "/messages", &token, Some(json!({})))
        .await
        .expect_error(400, "missing_parameter");
    s.widget_call(Method::POST, "/messages", &token, Some(json!({"text": 5})))
        .await
        .expect_error(400, "invalid_parameter");
}

#[tokio::test]
async fn visitors_never_see_each_others_messages() {
    let s = TestServer::start().await;
    let agent = s.agent("Julia", None, None, &[]).await;
    let (a, token_a) = s.new_visitor().await;
    let (_b, token_b) = s.new_visitor().await;
    let to_a = s.agent_says(&agent, &a, "for A only").await;
    s.visitor_says(&token_b, "B here").await.ok();

    let page_b = s
        .widget_call(Method::GET, "/messages", &token_b, None)
        .await;
    let b_msgs = page_b.ok()["messages"].as_array().unwrap().clone();
    assert_eq!(b_msgs.len(), 1);
    assert_eq!(b_msgs[0]["text"], "B here");
    // A cursor from another visitor's conversation is refused, not used.
    s.widget_call(
        Method::GET,
        &format!("/messages?after={to_a}"),
        &token_b,
        None,
    )
    .await
    .expect_error(400, "invalid_parameter");
    // Marking another visitor's message read is a 404.
    s.widget_call(
        Method::POST,
        "/read",
        &token_b,
        Some(json!({"messageId": to_a})),
    )
    .await
    .expect_error(404, "document_not_found");
    let ok = s
        .widget_call(
            Method::POST,
            "/read",
            &token_a,
            Some(json!({"messageId": to_a})),
        )
        .await;
    assert_eq!(ok.status, 204, "{}", ok.raw);
}

#[tokio::test]
async fn visitors_are_rate_limited_with_retry_after() {
    let clock = Clock::manual(1_700_000_000_000);
    let config = DomainConfig {
        visitor_messages_per_minute: 60,
        visitor_burst: 2,
        visitor_max_text: 20,
        ..DomainConfig::default()
    };
    let s = TestServer::start_with(config, clock.clone()).await;
    let (_, token) = s.new_visitor().await;
    let (_, other) = s.new_visitor().await;
    let say = |t: &str| json!({ "text": t });
    for i in 0..2 {
        s.widget_call(
            Method::POST,
            "/messages",
            &token,
            Some(say(&format!("m{i}"))),
        )
        .await
        .ok();
    }
    let limited = s
        .widget_call(Method::POST, "/messages", &token, Some(say("m2")))
        .await;
    limited.expect_error(429, "too_many_requests");
    assert_eq!(
        limited
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    // Another visitor is not affected.
    s.widget_call(Method::POST, "/messages", &other, Some(say("hi")))
        .await
        .ok();
    // A second later there is room for one more.
    clock.advance(Duration::from_secs(1));
    s.widget_call(Method::POST, "/messages", &token, Some(say("m3")))
        .await
        .ok();
    // Size limit for visitor messages.
    clock.advance(Duration::from_secs(10));
    let msg = s
        .widget_call(
            Method::POST,
            "/messages",
            &token,
            Some(say(&"x".repeat(21))),
        )
        .await
        .expect_error(400, "out_of_range");
    assert!(msg.contains("20"), "{msg}");
}

#[tokio::test]
async fn new_sessions_are_limited_per_client_address() {
    use switchboard_server::ServeOptions;
    let config = DomainConfig {
        sessions_per_minute: 2,
        ..DomainConfig::default()
    };
    for trust_proxy in [false, true] {
        let options = ServeOptions {
            trust_proxy,
            ..ServeOptions::default()
        };
        let s =
            TestServer::start_full(config.clone(), Clock::manual(1_700_000_000_000), options).await;
        let w = s.widget_id().await;
        let new_session = |from: &'static str| {
            let s = &s;
            let w = w.clone();
            async move {
                s.call_with(
                    Method::POST,
                    &format!("/widget/v1/{w}/session"),
                    Some(json!({})),
                    &[("x-forwarded-for", from)],
                )
                .await
            }
        };
        let first = new_session("203.0.113.1").await;
        let token = first.ok()["token"].as_str().unwrap().to_owned();
        new_session("203.0.113.1").await.ok();
        let third = new_session("203.0.113.2").await;
        if trust_proxy {
            // Another client behind the same proxy has its own allowance ...
            third.ok();
            // ... and the first one is now over its own.
            let r = new_session("198.51.100.7, 203.0.113.1").await;
            r.expect_error(429, "too_many_requests");
            assert!(r.headers.get("retry-after").is_some());
        } else {
            // Without trusting the proxy, all three come from the same peer.
            third.expect_error(429, "too_many_requests");
        }
        // Resuming a session is never limited.
        let resumed = s
            .call_with(
                Method::POST,
                &format!("/widget/v1/{w}/session"),
                Some(json!({ "token": token })),
                &[("x-forwarded-for", "203.0.113.1")],
            )
            .await;
        assert_eq!(resumed.ok()["visitorId"], first.ok()["visitorId"]);
    }
}

//! Wire tests: real HTTP against a recording stub on 127.0.0.1:0.

mod stub;

use std::time::Duration;

use stub::{Reply, Stub, MESSAGE, PUSHED};
use switchboard_client::{
    AgentPing, Client, Error, MessageType, PushMessage, RetryPolicy, SendMessage,
    SendMessageRequest, VisitorGroupRequest,
};

fn fast_retries() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(40))
        .jitter(false)
}

fn client(stub: &Stub) -> Client {
    Client::builder()
        .api_key("xkeysib-test")
        .base_url(stub.base_url())
        .retry(fast_retries())
        .build()
        .expect("client")
}

fn brevo_mode(stub: &Stub) -> Client {
    Client::builder()
        .api_key("xkeysib-test")
        .base_url(stub.base_url())
        .retry(fast_retries())
        .idempotent_posts(false)
        .build()
        .expect("client")
}

#[tokio::test]
async fn every_operation_uses_exact_method_path_and_status() {
    let stub = Stub::start(vec![
        Reply::json(200, MESSAGE),
        Reply::json(200, MESSAGE),
        Reply::json(200, MESSAGE),
        Reply::empty(204),
        Reply::json(200, PUSHED),
        Reply::json(200, PUSHED),
        Reply::json(200, PUSHED),
        Reply::empty(204),
        Reply::empty(201),
        Reply::json(200, r#"{"visitorId":"v1","groupId":"g1"}"#),
        Reply::json(200, r#"{"visitorId":"v1"}"#),
    ])
    .await;
    let client = client(&stub);
    let c = client.conversations();

    let sent = c
        .send_message(SendMessage::new("v1", "Hi").agent_id("a1"))
        .await
        .unwrap();
    assert_eq!(sent.id, "eYBEm3gq3zc5ayE2g");
    assert_eq!(sent.kind, MessageType::Agent);
    assert_eq!(sent.received_from.as_deref(), Some("crm"));
    assert_eq!(c.get_message("m1").await.unwrap().text, "Hi");
    assert_eq!(
        c.update_message("m1", "Hello").await.unwrap().created_at,
        1700000000000
    );
    c.delete_message("m1").await.unwrap();
    let pushed = c
        .push_message(PushMessage::new("v1", "Shipped").group_id("g1"))
        .await
        .unwrap();
    assert!(pushed.is_pushed);
    assert_eq!(
        c.get_pushed_message("p1").await.unwrap().id,
        "pYBEm3gq3zc5ayE2g"
    );
    assert_eq!(
        c.update_pushed_message("p1", "Delivered")
            .await
            .unwrap()
            .text,
        "Shipped"
    );
    c.delete_pushed_message("p1").await.unwrap();
    c.agent_online_ping(AgentPing::agent_id("a1"))
        .await
        .unwrap();
    let g = c
        .set_visitor_group(VisitorGroupRequest::assign("v1", "g1"))
        .await
        .unwrap();
    assert_eq!(
        (g.visitor_id.as_str(), g.group_id.as_deref()),
        ("v1", Some("g1"))
    );
    let g = c
        .set_visitor_group(VisitorGroupRequest::remove("v1"))
        .await
        .unwrap();
    assert_eq!(g.group_id, None);

    let seen: Vec<(String, String, String)> = stub
        .requests()
        .into_iter()
        .map(|r| (r.method.clone(), r.path.clone(), r.body_str().to_owned()))
        .collect();
    let expected = [
        (
            "POST",
            "/v3/conversations/messages",
            r#"{"visitorId":"v1","text":"Hi","agentId":"a1"}"#,
        ),
        ("GET", "/v3/conversations/messages/m1", ""),
        (
            "PUT",
            "/v3/conversations/messages/m1",
            r#"{"text":"Hello"}"#,
        ),
        ("DELETE", "/v3/conversations/messages/m1", ""),
        (
            "POST",
            "/v3/conversations/pushedMessages",
            r#"{"visitorId":"v1","text":"Shipped","groupId":"g1"}"#,
        ),
        ("GET", "/v3/conversations/pushedMessages/p1", ""),
        (
            "PUT",
            "/v3/conversations/pushedMessages/p1",
            r#"{"text":"Delivered"}"#,
        ),
        ("DELETE", "/v3/conversations/pushedMessages/p1", ""),
        (
            "POST",
            "/v3/conversations/agentOnlinePing",
            r#"{"agentId":"a1"}"#,
        ),
        (
            "PUT",
            "/v3/conversations/visitorGroup",
            r#"{"visitorId":"v1","groupId":"g1"}"#,
        ),
        (
            "PUT",
            "/v3/conversations/visitorGroup",
            r#"{"visitorId":"v1","groupId":null}"#,
        ),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(m, p, b)| (m.to_string(), p.to_string(), b.to_string()))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn ids_are_percent_encoded_as_one_path_segment() {
    let ids = ["a/b", "a b", "é", "a?b#c", "100%", "x.y~z_-"];
    let mut script = Vec::new();
    for _ in ids {
        script.extend([
            Reply::json(200, MESSAGE),
            Reply::json(200, PUSHED),
            Reply::empty(204),
        ]);
    }
    let stub = Stub::start(script).await;
    let client = client(&stub);
    let c = client.conversations();
    for id in ids {
        c.get_message(id).await.unwrap();
        c.update_pushed_message(id, "t").await.unwrap();
        c.delete_pushed_message(id).await.unwrap();
    }
    let paths: Vec<String> = stub.requests().into_iter().map(|r| r.path).collect();
    let encoded = ["a%2Fb", "a%20b", "%C3%A9", "a%3Fb%23c", "100%25", "x.y~z_-"];
    let mut expected = Vec::new();
    for e in encoded {
        expected.push(format!("/v3/conversations/messages/{e}"));
        expected.push(format!("/v3/conversations/pushedMessages/{e}"));
        expected.push(format!("/v3/conversations/pushedMessages/{e}"));
    }
    assert_eq!(paths, expected);

    // Ids that cannot be one segment are refused before anything is sent.
    for bad in ["", ".", ".."] {
        let err = c.get_message(bad).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{bad:?}: {err:?}"
        );
    }
    assert_eq!(stub.requests().len(), ids.len() * 3);
}

#[tokio::test]
async fn sends_auth_accept_content_type_and_user_agent_headers() {
    let stub = Stub::start(vec![
        Reply::json(200, MESSAGE),
        Reply::json(200, MESSAGE),
        Reply::empty(204),
        Reply::json(200, MESSAGE),
    ])
    .await;
    let custom = Client::builder()
        .api_key("xkeysib-abc")
        .partner_key("xkeysib-partner")
        .base_url(format!("{}/", stub.base_url())) // trailing slash is ignored
        .user_agent("my-app/2.0")
        .build()
        .unwrap();
    custom
        .conversations()
        .send_message(SendMessage::new("v1", "Hi"))
        .await
        .unwrap();
    custom.conversations().get_message("m1").await.unwrap();
    custom.conversations().delete_message("m1").await.unwrap();
    client(&stub)
        .conversations()
        .get_message("m2")
        .await
        .unwrap();

    let r = stub.requests();
    assert_eq!(r.len(), 4);
    for req in &r[..3] {
        assert_eq!(req.header("api-key"), Some("xkeysib-abc"));
        assert_eq!(req.header("partner-key"), Some("xkeysib-partner"));
        assert_eq!(req.header("accept"), Some("application/json"));
        assert_eq!(req.header_count("accept"), 1);
        assert_eq!(req.header("user-agent"), Some("my-app/2.0"));
        assert_eq!(req.header("authorization"), None);
    }
    assert_eq!(r[0].path, "/v3/conversations/messages");
    assert_eq!(r[0].header("content-type"), Some("application/json"));
    assert!(r[0].header("idempotency-key").is_some());
    assert_eq!(
        r[1].header("content-type"),
        None,
        "no content type without a body"
    );
    assert_eq!(
        r[1].header("idempotency-key"),
        None,
        "only POSTs carry a key"
    );
    assert_eq!(r[2].method, "DELETE");
    assert_eq!(r[2].header("content-type"), None);
    assert!(r[2].body.is_empty());

    // Defaults: no partner key, the crate's user agent.
    assert_eq!(r[3].header("api-key"), Some("xkeysib-test"));
    assert_eq!(r[3].header("partner-key"), None);
    assert_eq!(
        r[3].header("user-agent"),
        Some(concat!("switchboard-client/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        switchboard_client::DEFAULT_USER_AGENT,
        r[3].header("user-agent").unwrap()
    );
}

#[tokio::test]
async fn json_bodies_omit_unset_fields() {
    let stub = Stub::start(vec![
        Reply::json(200, MESSAGE),
        Reply::json(200, MESSAGE),
        Reply::json(200, PUSHED),
        Reply::empty(201),
        Reply::empty(201),
    ])
    .await;
    let client = client(&stub);
    let c = client.conversations();
    c.send_message(SendMessage::new("v1", "Hi")).await.unwrap();
    c.send_message(
        SendMessage::new("v1", "Hi")
            .agent_email("anna@example.com")
            .agent_name("Anna")
            .received_from("crm"),
    )
    .await
    .unwrap();
    c.push_message(PushMessage::new("v1", "t")).await.unwrap();
    c.agent_online_ping(AgentPing::agent_email("anna@example.com"))
        .await
        .unwrap();
    c.agent_online_ping(
        AgentPing::agent_id("a1")
            .agent_name("Anna")
            .received_from("crm"),
    )
    .await
    .unwrap();
    let bodies: Vec<String> = stub
        .requests()
        .iter()
        .map(|r| r.body_str().to_owned())
        .collect();
    assert_eq!(
        bodies,
        [
            r#"{"visitorId":"v1","text":"Hi"}"#,
            r#"{"visitorId":"v1","text":"Hi","agentEmail":"anna@example.com","agentName":"Anna","receivedFrom":"crm"}"#,
            r#"{"visitorId":"v1","text":"t"}"#,
            r#"{"agentEmail":"anna@example.com"}"#,
            r#"{"agentId":"a1","agentName":"Anna","receivedFrom":"crm"}"#,
        ]
    );
}

#[tokio::test]
async fn plain_wire_requests_are_accepted_too() {
    let stub = Stub::start(vec![Reply::json(200, MESSAGE)]).await;
    let client = client(&stub);
    let request = SendMessageRequest {
        visitor_id: Some("v9".into()),
        text: Some("raw".into()),
        ..Default::default()
    };
    client.conversations().send_message(request).await.unwrap();
    assert_eq!(
        stub.requests()[0].body_str(),
        r#"{"visitorId":"v9","text":"raw"}"#
    );
}

#[tokio::test]
async fn maps_api_errors_to_typed_variants() {
    let stub = Stub::start(vec![
        Reply::error(400, "missing_parameter", "text is required"),
        Reply::error(401, "unauthorized", "Key not found"),
        Reply::error(404, "document_not_found", "Message not found"),
        Reply::error(500, "internal_error", "boom"),
        Reply::error(403, "permission_denied", "nope"),
        Reply::json(405, r#"{"code":"method_not_allowed","message":"no"}"#),
    ])
    .await;
    let client = client(&stub);
    let c = client.conversations();

    let e = c.update_message("m1", "").await.unwrap_err();
    match &e {
        Error::BadRequest {
            code,
            message,
            body,
        } => {
            assert_eq!(code, "missing_parameter");
            assert_eq!(message, "text is required");
            assert_eq!(
                body,
                r#"{"code":"missing_parameter","message":"text is required"}"#
            );
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert_eq!(e.status(), Some(400));
    assert!(!e.is_transient());

    let e = c.get_message("m1").await.unwrap_err();
    assert!(
        matches!(&e, Error::Unauthorized { code, message, .. } if code == "unauthorized" && message == "Key not found"),
        "{e:?}"
    );
    let e = c.get_message("m1").await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { code, .. } if code == "document_not_found"),
        "{e:?}"
    );
    assert!(e.is_not_found());
    // 500 is not retried (only 502/503/504 are).
    let e = c.get_message("m1").await.unwrap_err();
    assert!(
        matches!(&e, Error::Server { status: 500, code, message, .. } if code == "internal_error" && message == "boom"),
        "{e:?}"
    );
    let e = c.delete_message("m1").await.unwrap_err();
    assert!(
        matches!(&e, Error::Api { status: 403, code, .. } if code == "permission_denied"),
        "{e:?}"
    );
    let e = c.delete_message("m1").await.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(405), Some("method_not_allowed"))
    );

    assert_eq!(
        stub.requests().len(),
        6,
        "none of these statuses is retried"
    );
}

#[tokio::test]
async fn non_json_error_body_keeps_the_raw_body() {
    let stub = Stub::start(vec![
        Reply {
            status: 502,
            headers: vec![("content-type", "text/html".into())],
            body: "<html>Bad Gateway</html>".into(),
            delay: None,
        },
        Reply::json(400, "[1,2]"),
    ])
    .await;
    let client = Client::builder()
        .api_key("k")
        .base_url(stub.base_url())
        .retry(RetryPolicy::disabled())
        .build()
        .unwrap();
    let e = client.conversations().get_message("m1").await.unwrap_err();
    match &e {
        Error::Server {
            status,
            code,
            message,
            body,
        } => {
            assert_eq!(*status, 502);
            assert_eq!(code, "");
            assert!(message.contains("502"), "{message}");
            assert_eq!(body, "<html>Bad Gateway</html>");
        }
        other => panic!("expected Server, got {other:?}"),
    }
    assert_eq!(e.code(), None);
    assert_eq!(e.body(), Some("<html>Bad Gateway</html>"));
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert!(
        matches!(&e, Error::BadRequest { code, body, .. } if code.is_empty() && body == "[1,2]"),
        "{e:?}"
    );
}

#[tokio::test]
async fn malformed_success_body_is_a_decode_error_with_the_raw_body() {
    let stub = Stub::start(vec![
        Reply::json(200, r#"{"id":"x","type":"robot"}"#),
        Reply::json(200, "not json"),
        Reply::empty(200),
    ])
    .await;
    let client = client(&stub);
    let c = client.conversations();
    let e = c.get_message("m1").await.unwrap_err();
    match &e {
        Error::Decode { status, body, .. } => {
            assert_eq!(*status, 200);
            assert_eq!(body, r#"{"id":"x","type":"robot"}"#);
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    let e = c
        .send_message(SendMessage::new("v", "t"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Decode { body, .. } if body == "not json"),
        "{e:?}"
    );
    let e = c
        .set_visitor_group(VisitorGroupRequest::remove("v"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Decode { body, .. } if body.is_empty()),
        "{e:?}"
    );
    assert_eq!(stub.requests().len(), 3, "decode errors are not retried");
}

#[tokio::test]
async fn rate_limited_after_retries_are_exhausted() {
    let limited = || Reply::error(429, "too_many_requests", "slow down").header("retry-after", "0");
    let stub = Stub::start(vec![limited(), limited(), limited(), limited()]).await;
    let client = client(&stub);
    let e = client.conversations().get_message("m1").await.unwrap_err();
    match &e {
        Error::RateLimited {
            retry_after,
            code,
            message,
            ..
        } => {
            assert_eq!(*retry_after, Some(Duration::ZERO));
            assert_eq!(code, "too_many_requests");
            assert_eq!(message, "slow down");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(stub.requests().len(), 3, "max_attempts = 3");
    assert_eq!(stub.remaining_replies(), 1);
}

#[tokio::test]
async fn retry_after_is_honoured_then_the_call_succeeds() {
    let stub = Stub::start(vec![
        Reply::error(429, "too_many_requests", "wait").header("retry-after", "1"),
        Reply::json(200, MESSAGE),
    ])
    .await;
    let client = client(&stub); // exponential backoff would be 10 ms
    let started = std::time::Instant::now();
    let msg = client
        .conversations()
        .send_message(SendMessage::new("v1", "Hi"))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(msg.id, "eYBEm3gq3zc5ayE2g");
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "waited {elapsed:?}");
    let r = stub.requests();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0].header("idempotency-key"),
        r[1].header("idempotency-key")
    );
    assert_eq!(r[0].body, r[1].body);
}

#[tokio::test]
async fn retry_after_beyond_the_limit_fails_at_once() {
    let stub = Stub::start(vec![
        Reply::error(429, "too_many_requests", "later").header("retry-after", "120"),
        // Brevo sends no Retry-After, but x-sib-ratelimit-reset (seconds).
        Reply::error(429, "too_many_requests", "later").header("x-sib-ratelimit-reset", "3600"),
        Reply::json(200, MESSAGE),
    ])
    .await;
    let client = client(&stub); // max_retry_after = 30 s
    let started = std::time::Instant::now();
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(120)));
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert!(
        matches!(e, Error::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(3600))
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(stub.requests().len(), 2);
}

#[tokio::test]
async fn post_is_retried_on_503_with_the_same_idempotency_key() {
    let stub = Stub::start(vec![
        Reply::error(503, "unavailable", "try again"),
        Reply::json(503, "{}"),
        Reply::json(200, MESSAGE),
        Reply::json(200, MESSAGE),
    ])
    .await;
    let client = client(&stub);
    assert!(client.idempotent_posts(), "default for a non-Brevo host");
    let msg = client
        .conversations()
        .send_message(SendMessage::new("v1", "Hi").agent_id("a1"))
        .await
        .unwrap();
    assert_eq!(msg.id, "eYBEm3gq3zc5ayE2g");
    let r = stub.requests();
    assert_eq!(r.len(), 3);
    let key = r[0].header("idempotency-key").expect("key").to_owned();
    assert_eq!(key.len(), 36, "{key}");
    for req in &r {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v3/conversations/messages");
        assert_eq!(req.header("idempotency-key"), Some(key.as_str()));
        assert_eq!(req.header_count("idempotency-key"), 1);
        assert_eq!(
            req.body_str(),
            r#"{"visitorId":"v1","text":"Hi","agentId":"a1"}"#
        );
    }

    // The next logical call gets a fresh key.
    client
        .conversations()
        .push_message(PushMessage::new("v1", "t"))
        .await
        .unwrap();
    let r = stub.requests();
    assert_eq!(r.len(), 4);
    assert_ne!(r[3].header("idempotency-key"), Some(key.as_str()));
}

#[tokio::test]
async fn caller_chosen_idempotency_key_is_sent() {
    let stub = Stub::start(vec![Reply::json(200, MESSAGE), Reply::json(200, PUSHED)]).await;
    let client = client(&stub);
    client
        .conversations()
        .send_message(SendMessage::new("v1", "Hi").idempotency_key("order-42-msg"))
        .await
        .unwrap();
    client
        .conversations()
        .push_message(PushMessage::new("v1", "t").idempotency_key("order-42-push"))
        .await
        .unwrap();
    let r = stub.requests();
    assert_eq!(r[0].header("idempotency-key"), Some("order-42-msg"));
    assert_eq!(r[1].header("idempotency-key"), Some("order-42-push"));
}

#[tokio::test]
async fn idempotent_calls_are_retried_on_502_503_504() {
    let stub = Stub::start(vec![
        Reply::empty(502),
        Reply::empty(504),
        Reply::json(200, MESSAGE),
        Reply::empty(503),
        Reply::empty(204),
    ])
    .await;
    let client = client(&stub);
    client.conversations().get_message("m1").await.unwrap();
    client.conversations().delete_message("m1").await.unwrap();
    let methods: Vec<String> = stub.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["GET", "GET", "GET", "DELETE", "DELETE"]);
}

#[tokio::test]
async fn brevo_mode_does_not_retry_a_post_the_server_saw() {
    let stub = Stub::start(vec![
        Reply::error(503, "unavailable", "busy"),
        Reply::json(200, MESSAGE),
        Reply::error(429, "too_many_requests", "slow").header("retry-after", "0"),
        Reply::json(200, PUSHED),
        // Idempotent calls are still retried in Brevo mode.
        Reply::empty(503),
        Reply::json(200, MESSAGE),
        Reply::empty(503),
        Reply::empty(201),
    ])
    .await;
    let client = brevo_mode(&stub);
    assert!(!client.idempotent_posts());
    let e = client
        .conversations()
        .send_message(SendMessage::new("v1", "Hi"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Server { status: 503, message, .. } if message == "busy"),
        "{e:?}"
    );
    assert_eq!(stub.requests().len(), 1);

    // Consume the 200 left for the message so the script stays aligned.
    client.conversations().get_message("m1").await.unwrap();

    let e = client
        .conversations()
        .push_message(PushMessage::new("v1", "t"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RateLimited { .. }), "{e:?}");
    assert_eq!(stub.requests().len(), 3);
    client
        .conversations()
        .get_pushed_message("p1")
        .await
        .unwrap();

    client.conversations().get_message("m1").await.unwrap();
    client
        .conversations()
        .agent_online_ping(AgentPing::agent_id("a1"))
        .await
        .unwrap();
    let r = stub.requests();
    let seen: Vec<(&str, &str)> = r
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", "/v3/conversations/messages"),
            ("GET", "/v3/conversations/messages/m1"),
            ("POST", "/v3/conversations/pushedMessages"),
            ("GET", "/v3/conversations/pushedMessages/p1"),
            ("GET", "/v3/conversations/messages/m1"),
            ("GET", "/v3/conversations/messages/m1"),
            ("POST", "/v3/conversations/agentOnlinePing"),
            ("POST", "/v3/conversations/agentOnlinePing"),
        ]
    );
}

#[tokio::test]
async fn brevo_host_defaults_to_brevo_mode() {
    let client = Client::builder().api_key("k").build().unwrap();
    assert_eq!(client.base_url(), "https://api.brevo.com/v3");
    assert!(!client.idempotent_posts());
}

#[tokio::test]
async fn retries_can_be_switched_off() {
    let stub = Stub::start(vec![
        Reply::empty(503),
        Reply::json(200, MESSAGE),
        Reply::error(429, "too_many_requests", "x").header("retry-after", "0"),
    ])
    .await;
    let client = Client::builder()
        .api_key("k")
        .base_url(stub.base_url())
        .retry(RetryPolicy::disabled())
        .build()
        .unwrap();
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert!(matches!(e, Error::Server { status: 503, .. }), "{e:?}");
    assert_eq!(stub.requests().len(), 1);
    client.conversations().get_message("m1").await.unwrap();
    let e = client
        .conversations()
        .send_message(SendMessage::new("v", "t"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RateLimited { retry_after: Some(d), .. } if d.is_zero()));
    assert_eq!(stub.requests().len(), 3);
}

#[tokio::test]
async fn total_retry_time_is_bounded() {
    let stub = Stub::start(vec![
        Reply::empty(503),
        Reply::empty(503),
        Reply::json(200, MESSAGE),
    ])
    .await;
    let client = Client::builder()
        .api_key("k")
        .base_url(stub.base_url())
        .retry(
            RetryPolicy::default()
                .max_attempts(10)
                .initial_backoff(Duration::from_millis(300))
                .jitter(false)
                .max_elapsed(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert!(matches!(e, Error::Server { status: 503, .. }), "{e:?}");
    assert_eq!(
        stub.requests().len(),
        1,
        "the first wait already exceeds max_elapsed"
    );
}

#[tokio::test]
async fn slow_answer_is_a_timeout_and_is_not_retried() {
    let stub = Stub::start(vec![
        Reply::json(200, MESSAGE).delayed(Duration::from_secs(5)),
        Reply::json(200, MESSAGE),
    ])
    .await;
    let client = Client::builder()
        .api_key("k")
        .base_url(stub.base_url())
        .timeout(Duration::from_millis(200))
        .retry(fast_retries())
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let e = client.conversations().get_message("m1").await.unwrap_err();
    assert!(
        matches!(e, Error::Timeout { timeout } if timeout == Duration::from_millis(200)),
        "{e:?}"
    );
    assert!(e.is_transient());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(stub.requests().len(), 1);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let stub = Stub::start(vec![
        Reply::empty(307).header("location", "/v3/conversations/messages/other")
    ])
    .await;
    let client = client(&stub);
    let e = client
        .conversations()
        .send_message(SendMessage::new("v", "t"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Api { status: 307, .. }), "{e:?}");
    assert_eq!(stub.requests().len(), 1);
}

#[tokio::test]
async fn invalid_idempotency_key_is_refused_before_sending() {
    let stub = Stub::start(vec![Reply::json(200, MESSAGE)]).await;
    let client = client(&stub);
    let e = client
        .conversations()
        .send_message(SendMessage::new("v", "t").idempotency_key("bad\nkey"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    assert!(stub.requests().is_empty());
}

#[test]
fn futures_are_send_and_client_is_send_sync() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Client>();
    assert_send_sync::<RetryPolicy>();
    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<Error>();
    let client = Client::new("k").unwrap();
    let c = client.conversations();
    assert_send(&c.send_message(SendMessage::new("v", "t")));
    assert_send(&c.get_message("m"));
    assert_send(&c.update_message("m", "t"));
    assert_send(&c.delete_message("m"));
    assert_send(&c.push_message(PushMessage::new("v", "t")));
    assert_send(&c.agent_online_ping(AgentPing::agent_id("a")));
    assert_send(&c.set_visitor_group(VisitorGroupRequest::remove("v")));
}

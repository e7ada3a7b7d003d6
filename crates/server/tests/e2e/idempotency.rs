use reqwest::Method;
use serde_json::json;

use crate::harness::{TestServer, KEY};

#[tokio::test]
async fn same_key_and_body_returns_the_first_response_once() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let send = |body: String| {
        s.raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .header("idempotency-key", "order-42")
                .body(body),
        )
    };
    let first = send(format!(
        "{{\"visitorId\":\"v\",\"text\":\"hi\",\"agentId\":\"{a}\"}}"
    ))
    .await;
    first.ok();
    // Same object, other key order and spacing.
    let again = send(format!(
        "{{ \"agentId\": \"{a}\", \"text\": \"hi\", \"visitorId\": \"v\" }}"
    ))
    .await;
    assert_eq!(again.ok(), &first.body);
    assert_eq!(again.raw, first.raw, "byte-identical replay");
    assert_eq!(s.count("messages").await, 1);
    // The replay is the first answer even after an edit.
    let id = first.body["id"].as_str().unwrap();
    // Its id was fixed before the message was numbered, and is found all the same.
    let got = s
        .call(
            Method::GET,
            &format!("/v3/conversations/messages/{id}"),
            None,
        )
        .await;
    assert_eq!(got.ok()["id"], id);
    s.call(
        Method::PUT,
        &format!("/v3/conversations/messages/{id}"),
        Some(json!({"text": "edited"})),
    )
    .await
    .ok();
    let again = send(format!(
        "{{\"visitorId\":\"v\",\"text\":\"hi\",\"agentId\":\"{a}\"}}"
    ))
    .await;
    assert_eq!(again.body["text"], "hi");
    // Other body, same key: refused, nothing written.
    let other = send(format!(
        "{{\"visitorId\":\"v\",\"text\":\"other\",\"agentId\":\"{a}\"}}"
    ))
    .await;
    assert!(other
        .expect_error(400, "duplicate_request")
        .contains("Idempotency-Key"));
    assert_eq!(s.count("messages").await, 1);
    // A new key is a new message.
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .header("idempotency-key", "order-43")
                .body(format!(
                    "{{\"visitorId\":\"v\",\"text\":\"hi\",\"agentId\":\"{a}\"}}"
                )),
        )
        .await;
    assert_ne!(r.ok()["id"], first.body["id"]);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_create_one_message() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let body = json!({"visitorId": "v", "text": "once", "agentId": a});
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let req = s
            .request(Method::POST, "/v3/conversations/pushedMessages")
            .header("api-key", KEY)
            .header("idempotency-key", "same")
            .json(&body);
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(s.count("messages").await, 1);
}

#[tokio::test]
async fn keys_are_scoped_per_account_and_apply_to_pings() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let (_, key2) = s.domain.create_account("two").await.unwrap();
    let a2 = s
        .domain
        .add_agent(
            &s.domain.list_accounts().await.unwrap()[1].id,
            "B",
            None,
            None,
            &[],
        )
        .await
        .unwrap()
        .0
        .id;
    for (key, agent) in [(KEY, &a), (key2.key.as_str(), &a2)] {
        let r = s
            .raw(
                s.request(Method::POST, "/v3/conversations/messages")
                    .header("api-key", key)
                    .header("idempotency-key", "shared-key")
                    .json(&json!({"visitorId": "v", "text": "t", "agentId": agent})),
            )
            .await;
        r.ok();
    }
    assert_eq!(s.count("messages").await, 2);
    let ping = |body: serde_json::Value| {
        s.raw(
            s.request(Method::POST, "/v3/conversations/agentOnlinePing")
                .header("api-key", KEY)
                .header("idempotency-key", "ping-1")
                .json(&body),
        )
    };
    assert_eq!(ping(json!({"agentId": a})).await.status, 201);
    let again = ping(json!({"agentId": a})).await;
    assert_eq!(again.status, 201);
    assert!(again.raw.is_empty());
    ping(json!({"agentId": a2}))
        .await
        .expect_error(400, "invalid_parameter");
    // A key used on one endpoint cannot be replayed on another.
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/pushedMessages")
                .header("api-key", KEY)
                .header("idempotency-key", "ping-1")
                .json(&json!({"visitorId": "v", "text": "t", "agentId": a})),
        )
        .await;
    r.expect_error(400, "duplicate_request");
}

#[tokio::test]
async fn invalid_idempotency_keys_are_refused() {
    let s = TestServer::start().await;
    let long = "k".repeat(300);
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .header("idempotency-key", long)
                .json(&json!({})),
        )
        .await;
    assert!(r
        .expect_error(400, "invalid_parameter")
        .contains("Idempotency-Key"));
}

/// Two keys on one request are refused, whatever their order: neither is the one the
/// request is a retry of. Nothing is written.
#[tokio::test]
async fn a_request_with_two_idempotency_keys_is_refused() {
    let s = TestServer::start().await;
    let agent = s.agent("Julia", None, None, &[]).await;
    for (first, second) in [("k1", "k2"), ("k2", "k1"), ("k1", "k1")] {
        let r = s
            .raw(
                s.request(Method::POST, "/v3/conversations/messages")
                    .header("api-key", KEY)
                    .header("idempotency-key", first)
                    .header("idempotency-key", second)
                    .json(&json!({"visitorId": "v", "text": "t", "agentId": agent})),
            )
            .await;
        assert!(r
            .expect_error(400, "duplicate_parameter")
            .contains("Idempotency-Key"));
    }
    assert_eq!(
        s.count("messages").await,
        0,
        "a refused request wrote a message"
    );
    // One key alone works.
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .header("idempotency-key", "k1")
                .json(&json!({"visitorId": "v", "text": "t", "agentId": agent})),
        )
        .await;
    r.ok();
}

#[tokio::test]
async fn failed_requests_are_not_remembered() {
    let s = TestServer::start().await;
    let send = |body: serde_json::Value| {
        s.raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .header("idempotency-key", "k1")
                .json(&body),
        )
    };
    send(json!({"visitorId": "v", "text": "t", "agentId": "ghost"}))
        .await
        .expect_error(400, "invalid_parameter");
    let a = s.agent("A", None, None, &[]).await;
    // After fixing the request, the same key is free to use.
    send(json!({"visitorId": "v", "text": "t", "agentId": a}))
        .await
        .ok();
    assert_eq!(s.count("idempotency_keys").await, 1);
}

use reqwest::Method;
use serde_json::json;
use switchboard_server::domain::{Clock, DomainConfig};

use crate::harness::{TestServer, KEY};

#[tokio::test]
async fn missing_or_unknown_api_key_is_401() {
    let s = TestServer::start().await;
    let r = s
        .call_with(Method::GET, "/v3/conversations/messages/x", None, &[])
        .await;
    assert!(r.expect_error(401, "unauthorized").contains("api-key"));
    let r = s
        .call_with(
            Method::GET,
            "/v3/conversations/messages/x",
            None,
            &[("api-key", "xkeysib-wrong")],
        )
        .await;
    assert!(r
        .expect_error(401, "unauthorized")
        .contains("Key not found"));
    let r = s
        .call_with(
            Method::POST,
            "/v3/conversations/messages",
            Some(json!({})),
            &[("api-key", "")],
        )
        .await;
    r.expect_error(401, "unauthorized");
    // Header names are case-insensitive; Authorization is ignored.
    let r = s
        .call_with(
            Method::GET,
            "/v3/conversations/messages/x",
            None,
            &[("API-KEY", KEY), ("authorization", "Bearer nonsense")],
        )
        .await;
    r.expect_error(404, "document_not_found");
    // Health and the OpenAPI document need no key.
    assert_eq!(
        s.call_with(Method::GET, "/health", None, &[]).await.status,
        200
    );
    assert_eq!(
        s.call_with(Method::GET, "/v3/openapi.json", None, &[])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn accounts_are_isolated() {
    let s = TestServer::start().await;
    let a1 = s.agent("One", Some("one@x.com"), None, &[]).await;
    let g1 = s.group("G").await;
    let (acct2, key2) = s.domain.create_account("second").await.unwrap();
    let k2 = key2.key.as_str();
    let m = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": "secret", "agentId": a1}),
        )
        .await
        .ok()
        .clone();
    let id = m["id"].as_str().unwrap();
    let h = [("api-key", k2)];

    // Account 2 sees none of account 1's messages, agents, groups or visitors.
    s.call_with(
        Method::GET,
        &format!("/v3/conversations/messages/{id}"),
        None,
        &h,
    )
    .await
    .expect_error(404, "document_not_found");
    s.call_with(
        Method::PUT,
        &format!("/v3/conversations/messages/{id}"),
        Some(json!({"text": "x"})),
        &h,
    )
    .await
    .expect_error(404, "document_not_found");
    s.call_with(
        Method::DELETE,
        &format!("/v3/conversations/messages/{id}"),
        None,
        &h,
    )
    .await
    .expect_error(404, "document_not_found");
    s.call_with(
        Method::POST,
        "/v3/conversations/messages",
        Some(json!({"visitorId": "v", "text": "t", "agentId": a1})),
        &h,
    )
    .await
    .expect_error(400, "invalid_parameter");
    s.call_with(
        Method::POST,
        "/v3/conversations/agentOnlinePing",
        Some(json!({"agentId": a1})),
        &h,
    )
    .await
    .expect_error(400, "invalid_parameter");
    s.call_with(
        Method::POST,
        "/v3/conversations/pushedMessages",
        Some(json!({"visitorId": "v", "text": "t"})),
        &h,
    )
    .await
    .expect_error(400, "invalid_parameter");
    s.call_with(
        Method::PUT,
        "/v3/conversations/visitorGroup",
        Some(json!({"visitorId": "v", "groupId": null})),
        &h,
    )
    .await
    .expect_error(404, "document_not_found");

    // The same email in account 2 is a different (new) agent.
    let r = s
        .call_with(
            Method::POST,
            "/v3/conversations/messages",
            Some(json!({"visitorId": "v", "text": "t", "agentEmail": "one@x.com", "agentName": "Other"})),
            &h,
        )
        .await;
    assert_ne!(r.ok()["agentId"], a1.as_str());
    s.call_with(
        Method::PUT,
        "/v3/conversations/visitorGroup",
        Some(json!({"visitorId": "v", "groupId": g1})),
        &h,
    )
    .await
    .expect_error(400, "invalid_parameter");
    // And account 1 still has its message untouched.
    assert_eq!(
        s.get(&format!("/v3/conversations/messages/{id}"))
            .await
            .ok()["text"],
        "secret"
    );
    assert_eq!(s.domain.list_agents(&acct2.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn revoked_keys_stop_working() {
    let s = TestServer::start().await;
    let created = s.domain.create_key(&s.account, "temp").await.unwrap();
    let h = [("api-key", created.key.as_str())];
    s.call_with(Method::GET, "/v3/conversations/messages/x", None, &h)
        .await
        .expect_error(404, "document_not_found");
    s.domain
        .revoke_key(&s.account, &created.record.id)
        .await
        .unwrap();
    s.call_with(Method::GET, "/v3/conversations/messages/x", None, &h)
        .await
        .expect_error(401, "unauthorized");
    // Keys are stored hashed: the key text is nowhere in the database.
    assert_eq!(
        s.count(&format!(
            "api_keys WHERE key_hash = '{}' OR prefix = '{}'",
            created.key, created.key
        ))
        .await,
        0
    );
}

#[tokio::test]
async fn partner_key_is_checked_only_when_configured() {
    let s = TestServer::start().await;
    s.call_with(
        Method::GET,
        "/v3/conversations/messages/x",
        None,
        &[("api-key", KEY), ("partner-key", "anything")],
    )
    .await
    .expect_error(404, "document_not_found");
    let config = DomainConfig {
        partner_key: Some("xkeysib-partner".into()),
        ..DomainConfig::default()
    };
    let s = TestServer::start_with(config, Clock::System).await;
    s.call_with(
        Method::GET,
        "/v3/conversations/messages/x",
        None,
        &[("api-key", KEY)],
    )
    .await
    .expect_error(401, "unauthorized");
    s.call_with(
        Method::GET,
        "/v3/conversations/messages/x",
        None,
        &[("api-key", KEY), ("partner-key", "wrong")],
    )
    .await
    .expect_error(401, "unauthorized");
    s.call_with(
        Method::GET,
        "/v3/conversations/messages/x",
        None,
        &[("api-key", KEY), ("partner-key", "xkeysib-partner")],
    )
    .await
    .expect_error(404, "document_not_found");
}

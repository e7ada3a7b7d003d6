use reqwest::Method;
use serde_json::json;

use crate::harness::TestServer;

async fn visitor(s: &TestServer, id: &str) {
    let a = s.agent(&format!("agent-{id}"), None, None, &[]).await;
    s.post(
        "/v3/conversations/messages",
        json!({"visitorId": id, "text": "hello", "agentId": a}),
    )
    .await
    .ok();
}

#[tokio::test]
async fn assign_and_remove() {
    let s = TestServer::start().await;
    visitor(&s, "v1").await;
    let g = s.group("Sales").await;
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"visitorId": "v1", "groupId": g})),
        )
        .await;
    assert_eq!(r.ok(), &json!({"visitorId": "v1", "groupId": g}));
    assert_eq!(
        s.count(&format!("visitors WHERE id = 'v1' AND group_id = '{g}'"))
            .await,
        1
    );

    // The current SDKs send only groupId: the visitor comes from the query string.
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup?visitorId=v1",
            Some(json!({"groupId": null})),
        )
        .await;
    assert_eq!(r.ok(), &json!({"visitorId": "v1"}));
    assert_eq!(
        s.count("visitors WHERE id = 'v1' AND group_id IS NULL")
            .await,
        1
    );

    s.call(
        Method::PUT,
        "/v3/conversations/visitorGroup?visitorId=v1",
        Some(json!({"groupId": g})),
    )
    .await
    .ok();
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"visitorId": "v1", "groupId": ""})),
        )
        .await;
    assert_eq!(r.ok(), &json!({"visitorId": "v1"}));
    assert_eq!(
        s.count("visitors WHERE id = 'v1' AND group_id IS NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn visitor_group_errors() {
    let s = TestServer::start().await;
    visitor(&s, "v1").await;
    let g = s.group("Sales").await;
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"groupId": g})),
        )
        .await;
    let msg = r.expect_error(400, "missing_parameter");
    assert!(msg.contains("visitorId") && msg.contains("query"), "{msg}");
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"visitorId": "v1"})),
        )
        .await;
    assert!(r.expect_error(400, "missing_parameter").contains("groupId"));
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"visitorId": "nobody", "groupId": g})),
        )
        .await;
    assert!(r.expect_error(404, "document_not_found").contains("nobody"));
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"visitorId": "v1", "groupId": "nope"})),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
    let r = s
        .call(
            Method::PUT,
            "/v3/conversations/visitorGroup",
            Some(json!({"visitorId": "v1", "groupId": 7})),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
}

use reqwest::Method;

use crate::harness::TestServer;

/// Every documented operation is served (not the unknown-route 404, not a 405), and every
/// Brevo operation is documented.
#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let s = TestServer::start().await;
    let doc = s.get("/v3/openapi.json").await.ok().clone();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_some() {
                operations.push(format!("{} {path}", method.to_uppercase()));
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let concrete = path
                    .replace("{id}", "some-id")
                    .replace("{visitorId}", "some-visitor")
                    .replace("{widgetId}", "some-widget")
                    .replace("{eventId}", "some-event");
                let r = if path.ends_with("/events") {
                    // Authenticated, this is an endless stream: probe it unauthenticated.
                    s.call_with(m, &concrete, None, &[]).await
                } else {
                    s.call(m, &concrete, Some(serde_json::json!({}))).await
                };
                assert_ne!(r.status, 405, "{method} {path}");
                if r.status == 404 {
                    assert!(
                        !r.raw.contains("no such endpoint"),
                        "{method} {path} is documented but not routed"
                    );
                }
            }
        }
    }
    operations.sort();
    let expected = [
        "DELETE /v3/conversations/messages/{id}",
        "DELETE /v3/conversations/pushedMessages/{id}",
        "GET /v3/conversations/events",
        "GET /v3/conversations/messages/{id}",
        "GET /v3/conversations/pushedMessages/{id}",
        "GET /v3/conversations/visitors/{visitorId}/messages",
        "POST /v3/conversations/agentOnlinePing",
        "POST /v3/conversations/messages",
        "POST /v3/conversations/pushedMessages",
        "PUT /v3/conversations/messages/{id}",
        "PUT /v3/conversations/pushedMessages/{id}",
        "PUT /v3/conversations/visitorGroup",
        "GET /widget/v1/{widgetId}/messages",
        "GET /widget/v1/{widgetId}/ws",
        "POST /widget/v1/{widgetId}/messages",
        "POST /widget/v1/{widgetId}/read",
        "POST /widget/v1/{widgetId}/session",
        "GET /v3/conversations/webhooks",
        "POST /v3/conversations/webhooks",
        "GET /v3/conversations/webhooks/{id}",
        "PUT /v3/conversations/webhooks/{id}",
        "DELETE /v3/conversations/webhooks/{id}",
        "GET /v3/conversations/webhooks/{id}/deliveries",
        "GET /v3/conversations/webhooks/{id}/deliveries/{eventId}",
        "POST /v3/conversations/webhooks/{id}/deliveries/{eventId}/replay",
        "GET /health",
        "GET /health/ready",
    ];
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(operations, expected);
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "ConversationsMessage",
        "ErrorBody",
        "SendMessageRequest",
        "SessionRequest",
        "StreamEvent",
    ] {
        assert!(schemas.contains_key(name), "{name}");
    }
    assert!(doc["components"]["securitySchemes"]["api-key"].is_object());
    assert!(doc["components"]["securitySchemes"]["visitor-token"].is_object());
}

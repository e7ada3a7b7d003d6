use reqwest::Method;
use serde_json::{json, Value};
use switchboard_server::domain::{Text, VisitorId};

use crate::harness::{TestServer, KEY};

/// Writes `n` messages to `visitor` (agent, pushed and visitor messages mixed); returns ids.
async fn conversation(s: &TestServer, visitor: &str, n: usize) -> Vec<String> {
    let agent = s.agent(&format!("agent-{visitor}"), None, None, &[]).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = match i % 3 {
            0 => s
                .post(
                    "/v3/conversations/messages",
                    json!({"visitorId": visitor, "text": format!("m{i}"), "agentId": agent}),
                )
                .await
                .ok()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
            1 => s
                .post(
                    "/v3/conversations/pushedMessages",
                    json!({"visitorId": visitor, "text": format!("m{i}"), "agentId": agent}),
                )
                .await
                .ok()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
            _ => s
                .domain
                .send_visitor_message(
                    &s.account,
                    &VisitorId::parse(Some(visitor.into())).unwrap(),
                    Text::parse(Some(format!("m{i}"))).unwrap(),
                )
                .await
                .unwrap()
                .id
                .clone(),
        };
        ids.push(id);
    }
    ids
}

fn page_ids(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn path(visitor: &str, query: &str) -> String {
    format!("/v3/conversations/visitors/{visitor}/messages{query}")
}

#[tokio::test]
async fn pages_backwards_and_forwards_in_order() {
    let s = TestServer::start().await;
    let ids = conversation(&s, "v1", 7).await;
    conversation(&s, "v2", 2).await;

    let all = s.get(&path("v1", "")).await;
    assert_eq!(
        page_ids(all.ok()),
        ids,
        "all of v1, oldest first, nothing of v2"
    );
    assert_eq!(all.body["hasMore"], false);
    let kinds: Vec<_> = all.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["type"].clone(), m["isPushed"].clone()))
        .collect();
    assert_eq!(kinds[0], (json!("agent"), json!(false)));
    assert_eq!(kinds[1], (json!("agent"), json!(true)));
    assert_eq!(kinds[2], (json!("visitor"), json!(false)));
    assert_eq!(all.body["messages"][0]["text"], "m0");

    let newest = s.get(&path("v1", "?limit=3")).await;
    assert_eq!(page_ids(newest.ok()), ids[4..7]);
    assert_eq!(newest.body["hasMore"], true);
    let older = s
        .get(&path("v1", &format!("?limit=3&before={}", ids[4])))
        .await;
    assert_eq!(page_ids(older.ok()), ids[1..4]);
    assert_eq!(older.body["hasMore"], true);
    let oldest = s
        .get(&path("v1", &format!("?limit=3&before={}", ids[1])))
        .await;
    assert_eq!(page_ids(oldest.ok()), ids[0..1]);
    assert_eq!(oldest.body["hasMore"], false);

    let next = s
        .get(&path("v1", &format!("?limit=2&after={}", ids[2])))
        .await;
    assert_eq!(page_ids(next.ok()), ids[3..5]);
    assert_eq!(next.body["hasMore"], true);
    let tail = s.get(&path("v1", &format!("?after={}", ids[6]))).await;
    assert_eq!(page_ids(tail.ok()), Vec::<String>::new());
    assert_eq!(tail.body["hasMore"], false);
}

#[tokio::test]
async fn deleted_messages_are_left_out_but_still_mark_a_position() {
    let s = TestServer::start().await;
    let ids = conversation(&s, "v1", 4).await;
    let d = s
        .call(
            Method::DELETE,
            &format!("/v3/conversations/messages/{}", ids[3]),
            None,
        )
        .await;
    assert_eq!(d.status, 204);
    let all = s.get(&path("v1", "")).await;
    assert_eq!(page_ids(all.ok()), ids[0..3]);
    let before = s.get(&path("v1", &format!("?before={}", ids[3]))).await;
    assert_eq!(page_ids(before.ok()), ids[0..3]);
    // An edit shows in the listing.
    s.call(
        Method::PUT,
        &format!("/v3/conversations/messages/{}", ids[0]),
        Some(json!({"text": "edited"})),
    )
    .await
    .ok();
    assert_eq!(
        s.get(&path("v1", "?limit=100")).await.ok()["messages"][0]["text"],
        "edited"
    );
}

#[tokio::test]
async fn listing_errors_and_isolation() {
    let s = TestServer::start().await;
    let v1 = conversation(&s, "v1", 2).await;
    let v2 = conversation(&s, "v/2 é", 1).await;
    // Odd visitor ids work once percent-encoded.
    assert_eq!(page_ids(s.get(&path("v%2F2%20%C3%A9", "")).await.ok()), v2);

    s.get(&path("nobody", ""))
        .await
        .expect_error(404, "document_not_found");
    let (_, key2) = s.domain.create_account("two").await.unwrap();
    s.call_with(
        Method::GET,
        &path("v1", ""),
        None,
        &[("api-key", key2.key.as_str())],
    )
    .await
    .expect_error(404, "document_not_found");
    s.call_with(Method::GET, &path("v1", ""), None, &[])
        .await
        .expect_error(401, "unauthorized");

    for (q, code) in [
        ("?limit=0", "out_of_range"),
        ("?limit=101", "out_of_range"),
        ("?limit=abc", "invalid_parameter"),
        ("?limit=-1", "invalid_parameter"),
    ] {
        s.get(&path("v1", q)).await.expect_error(400, code);
    }
    let both = s
        .get(&path("v1", &format!("?before={}&after={}", v1[0], v1[1])))
        .await;
    assert!(both
        .expect_error(400, "invalid_parameter")
        .contains("not both"));
    // A cursor from another visitor's conversation, or no message at all.
    let foreign = s.get(&path("v1", &format!("?before={}", v2[0]))).await;
    assert!(foreign
        .expect_error(400, "invalid_parameter")
        .contains("before"));
    s.get(&path("v1", "?after=nothing"))
        .await
        .expect_error(400, "invalid_parameter");
    assert_eq!(
        s.raw(
            s.request(Method::POST, &path("v1", ""))
                .header("api-key", KEY)
        )
        .await
        .status,
        405
    );
}

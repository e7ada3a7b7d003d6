use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use switchboard_server::domain::{Clock, DomainConfig};

use crate::harness::TestServer;

async fn push(s: &TestServer, body: serde_json::Value) -> serde_json::Value {
    s.post("/v3/conversations/pushedMessages", body)
        .await
        .ok()
        .clone()
}

#[tokio::test]
async fn pushed_message_with_agent_id() {
    let s = TestServer::start().await;
    let a = s.agent("Alice", None, Some("https://p/a.png"), &[]).await;
    let m = push(
        &s,
        json!({"visitorId": "v", "text": "Your order shipped", "agentId": a}),
    )
    .await;
    assert_eq!(m["isPushed"], true);
    assert_eq!(m["type"], "agent");
    assert_eq!(m["agentId"], a.as_str());
    assert_eq!(m["agentName"], "Alice");
    assert_eq!(m["agentUserpic"], "https://p/a.png");
    assert!(m.get("receivedFrom").is_none());
}

#[tokio::test]
async fn pushed_and_plain_messages_live_in_separate_id_spaces() {
    let s = TestServer::start().await;
    let a = s.agent("Alice", None, None, &[]).await;
    let p = push(&s, json!({"visitorId": "v", "text": "p", "agentId": a})).await;
    let m = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": "m", "agentId": a}),
        )
        .await
        .ok()
        .clone();
    let (pid, mid) = (p["id"].as_str().unwrap(), m["id"].as_str().unwrap());
    s.get(&format!("/v3/conversations/messages/{pid}"))
        .await
        .expect_error(404, "document_not_found");
    s.get(&format!("/v3/conversations/pushedMessages/{mid}"))
        .await
        .expect_error(404, "document_not_found");
    s.call(
        Method::PUT,
        &format!("/v3/conversations/pushedMessages/{mid}"),
        Some(json!({"text": "x"})),
    )
    .await
    .expect_error(404, "document_not_found");
    s.call(
        Method::DELETE,
        &format!("/v3/conversations/messages/{pid}"),
        None,
    )
    .await
    .expect_error(404, "document_not_found");

    // The pushed id works on its own path: get, edit (keeps id/createdAt), delete.
    let path = format!("/v3/conversations/pushedMessages/{pid}");
    assert_eq!(s.get(&path).await.ok()["text"], "p");
    let e = s
        .call(Method::PUT, &path, Some(json!({"text": "p2"})))
        .await;
    assert_eq!(e.ok()["text"], "p2");
    assert_eq!(e.body["createdAt"], p["createdAt"]);
    assert_eq!(e.body["isPushed"], true);
    assert_eq!(s.call(Method::DELETE, &path, None).await.status, 204);
    s.get(&path).await.expect_error(404, "document_not_found");
}

#[tokio::test]
async fn pushed_message_without_any_agent_is_a_400() {
    let s = TestServer::start().await;
    let r = s
        .post(
            "/v3/conversations/pushedMessages",
            json!({"visitorId": "v", "text": "t"}),
        )
        .await;
    let msg = r.expect_error(400, "invalid_parameter");
    assert!(msg.contains("no agents"), "{msg}");
    let g = s.group("Empty").await;
    let r = s
        .post(
            "/v3/conversations/pushedMessages",
            json!({"visitorId": "v", "text": "t", "groupId": g}),
        )
        .await;
    let msg = r.expect_error(400, "invalid_parameter");
    assert!(msg.contains("no agents"), "{msg}");
    let r = s
        .post(
            "/v3/conversations/pushedMessages",
            json!({"visitorId": "v", "text": "t", "groupId": "missing"}),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
    assert_eq!(s.count("messages").await, 0);
}

/// Online agents are preferred, by group and account-wide; presence ends after the window.
#[tokio::test]
async fn pushed_messages_prefer_online_agents_and_presence_expires() {
    let clock = Clock::manual(1_700_000_000_000);
    let config = DomainConfig {
        presence_window: Duration::from_secs(150),
        ..DomainConfig::default()
    };
    let s = TestServer::start_with(config, clock.clone()).await;
    let sales = s.group("Sales").await;
    let support = s.group("Support").await;
    let a = s
        .agent("A", Some("a@x.com"), None, std::slice::from_ref(&sales))
        .await;
    let b = s.agent("B", None, None, std::slice::from_ref(&sales)).await;
    let c = s
        .agent("C", None, None, std::slice::from_ref(&support))
        .await;

    // Ping B by id and C by email-less id; A stays offline.
    let r = s
        .post("/v3/conversations/agentOnlinePing", json!({"agentId": b}))
        .await;
    assert_eq!(r.status, 201);
    assert!(r.raw.is_empty());
    assert_eq!(
        r.headers.get("content-length").map(|v| v.to_str().unwrap()),
        Some("0")
    );

    for _ in 0..8 {
        let m = push(&s, json!({"visitorId": "v", "text": "t", "groupId": sales})).await;
        assert_eq!(m["agentId"], b.as_str(), "the online member of the group");
        let m = push(&s, json!({"visitorId": "v", "text": "t"})).await;
        assert_eq!(
            m["agentId"],
            b.as_str(),
            "the only online agent of the account"
        );
        let m = push(
            &s,
            json!({"visitorId": "v", "text": "t", "groupId": support}),
        )
        .await;
        assert_eq!(m["agentId"], c.as_str(), "offline, but the only member");
    }

    // 149 s later B is still online; at 151 s it is not, and A (pinged by email) takes over.
    clock.advance(Duration::from_secs(149));
    let m = push(&s, json!({"visitorId": "v", "text": "t", "groupId": sales})).await;
    assert_eq!(m["agentId"], b.as_str());
    clock.advance(Duration::from_secs(2));
    let r = s
        .post(
            "/v3/conversations/agentOnlinePing",
            json!({"agentEmail": "A@x.com"}),
        )
        .await;
    assert_eq!(r.status, 201);
    for _ in 0..8 {
        let m = push(&s, json!({"visitorId": "v", "text": "t", "groupId": sales})).await;
        assert_eq!(m["agentId"], a.as_str());
    }
    let agents = s.domain.list_agents(&s.account).await.unwrap();
    let online: Vec<_> = agents
        .iter()
        .filter(|(ag, _)| s.domain.is_online(ag))
        .map(|(ag, _)| ag.id.clone())
        .collect();
    assert_eq!(online, vec![a]);
}

#[tokio::test]
async fn ping_errors() {
    let s = TestServer::start().await;
    let r = s.post("/v3/conversations/agentOnlinePing", json!({})).await;
    let msg = r.expect_error(400, "missing_parameter");
    assert!(
        msg.contains("agentId") && msg.contains("agentEmail"),
        "{msg}"
    );
    let r = s
        .post(
            "/v3/conversations/agentOnlinePing",
            json!({"agentId": "ghost"}),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
    // The Brevo "standalone system" form creates the agent and marks it online.
    let r = s
        .post(
            "/v3/conversations/agentOnlinePing",
            json!({"agentEmail": "liz@getwear.com", "agentName": "Liz", "receivedFrom": "SuperAwesomeHelpdesk"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.raw);
    let agents = s.domain.list_agents(&s.account).await.unwrap();
    assert_eq!(agents.len(), 1);
    assert!(s.domain.is_online(&agents[0].0));
}

use reqwest::Method;
use serde_json::json;
use switchboard_server::domain::{Text, VisitorId};

use crate::harness::{TestServer, KEY};

const ALPHABET: &str = "23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn send_message_by_agent_id_returns_brevo_message() {
    let s = TestServer::start().await;
    let agent = s
        .agent(
            "Julia",
            Some("julia@getwear.com"),
            Some("https://pic.example/j.png"),
            &[],
        )
        .await;
    let before = now_ms();
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg", "text": "Hello <b>you</b> & \"co\"\nline 2", "agentId": agent, "receivedFrom": "SuperAwesomeHelpdesk"}),
        )
        .await;
    let m = r.ok();
    assert_eq!(r.headers["content-type"], "application/json");
    let id = m["id"].as_str().unwrap();
    assert_eq!(id.len(), 17);
    assert!(id.chars().all(|c| ALPHABET.contains(c)), "{id}");
    assert_eq!(m["type"], "agent");
    assert_eq!(m["text"], "Hello <b>you</b> & \"co\"\nline 2");
    assert_eq!(
        m["html"],
        "Hello &lt;b&gt;you&lt;/b&gt; &amp; &quot;co&quot;<br>line 2"
    );
    assert_eq!(m["visitorId"], "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg");
    assert_eq!(m["agentId"], agent.as_str());
    assert_eq!(m["agentName"], "Julia");
    assert_eq!(m["agentUserpic"], "https://pic.example/j.png");
    assert_eq!(m["receivedFrom"], "SuperAwesomeHelpdesk");
    let created = m["createdAt"].as_i64().expect("createdAt is an integer");
    assert!(created >= before && created <= now_ms(), "{created}");
    for flag in ["isPushed", "isMissed", "isMissedByVisitor", "isTrigger"] {
        assert_eq!(m[flag], false, "{flag}");
    }
    assert!(m.as_object().unwrap().values().all(|v| !v.is_null()));

    // GET returns the same message.
    let g = s.get(&format!("/v3/conversations/messages/{id}")).await;
    assert_eq!(g.ok(), m);
}

#[tokio::test]
async fn absent_optional_fields_are_omitted_not_null() {
    let s = TestServer::start().await;
    let agent = s.agent("Bob", None, None, &[]).await;
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": "t", "agentId": agent}),
        )
        .await;
    let obj = r.ok().as_object().unwrap().clone();
    assert!(!obj.contains_key("agentUserpic"));
    assert!(!obj.contains_key("receivedFrom"));
    assert!(obj.values().all(|v| !v.is_null()), "{obj:?}");
}

#[tokio::test]
async fn unknown_agent_email_with_name_creates_a_dummy_agent_once() {
    let s = TestServer::start().await;
    let body = json!({"visitorId": "v1", "text": "Hi", "agentEmail": "liz@getwear.com", "agentName": "Liz", "receivedFrom": "Helpdesk"});
    let first = s
        .post("/v3/conversations/messages", body.clone())
        .await
        .ok()
        .clone();
    let second = s
        .post("/v3/conversations/messages", body)
        .await
        .ok()
        .clone();
    assert_eq!(first["agentName"], "Liz");
    assert_eq!(
        first["agentId"], second["agentId"],
        "the same agent is reused"
    );
    let agents = s.domain.list_agents(&s.account).await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].0.email.as_deref(), Some("liz@getwear.com"));
    assert!(agents[0].0.is_dummy);

    // Known email (any case) needs no name.
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v1", "text": "Hi", "agentEmail": "LIZ@getwear.com"}),
        )
        .await;
    assert_eq!(r.ok()["agentId"], first["agentId"]);
}

#[tokio::test]
async fn unknown_agent_email_without_name_is_a_400_naming_agent_name() {
    let s = TestServer::start().await;
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v1", "text": "Hi", "agentEmail": "new@x.com"}),
        )
        .await;
    let msg = r.expect_error(400, "missing_parameter");
    assert!(msg.contains("agentName"), "{msg}");
    assert_eq!(s.count("agents").await, 0);
    assert_eq!(s.count("messages").await, 0);
}

#[tokio::test]
async fn message_without_agent_names_both_fields() {
    let s = TestServer::start().await;
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v1", "text": "Hi"}),
        )
        .await;
    let msg = r.expect_error(400, "missing_parameter");
    assert!(
        msg.contains("agentId") && msg.contains("agentEmail"),
        "{msg}"
    );
}

#[tokio::test]
async fn agent_id_of_nothing_is_invalid() {
    let s = TestServer::start().await;
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v1", "text": "Hi", "agentId": "nope"}),
        )
        .await;
    let msg = r.expect_error(400, "invalid_parameter");
    assert!(msg.contains("nope"), "{msg}");
    assert_eq!(s.count("messages").await, 0);
    assert_eq!(s.count("visitors").await, 0, "nothing half-written");
}

#[tokio::test]
async fn first_message_creates_visitor_and_one_conversation() {
    let s = TestServer::start().await;
    let agent = s.agent("A", None, None, &[]).await;
    for _ in 0..3 {
        s.post(
            "/v3/conversations/messages",
            json!({"visitorId": "visitor-1", "text": "x", "agentId": agent}),
        )
        .await
        .ok();
    }
    s.post(
        "/v3/conversations/messages",
        json!({"visitorId": "visitor-2", "text": "x", "agentId": agent}),
    )
    .await
    .ok();
    assert_eq!(s.count("visitors").await, 2);
    assert_eq!(s.count("conversations").await, 2);
    assert_eq!(s.count("messages WHERE visitor_id = 'visitor-1'").await, 3);
    assert_eq!(
        s.count(
            "(SELECT DISTINCT conversation_id FROM messages WHERE visitor_id = 'visitor-1') AS c"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn edit_keeps_id_and_created_at() {
    let s = TestServer::start().await;
    let agent = s.agent("A", None, None, &[]).await;
    let m = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": "old", "agentId": agent}),
        )
        .await
        .ok()
        .clone();
    let id = m["id"].as_str().unwrap();
    let e = s
        .call(
            Method::PUT,
            &format!("/v3/conversations/messages/{id}"),
            Some(json!({"text": "new\ntext"})),
        )
        .await;
    let e = e.ok();
    assert_eq!(e["id"], m["id"]);
    assert_eq!(e["createdAt"], m["createdAt"]);
    assert_eq!(e["text"], "new\ntext");
    assert_eq!(e["html"], "new<br>text");
    let g = s.get(&format!("/v3/conversations/messages/{id}")).await;
    assert_eq!(g.ok()["text"], "new\ntext");
}

#[tokio::test]
async fn delete_is_204_then_gone_everywhere() {
    let s = TestServer::start().await;
    let agent = s.agent("A", None, None, &[]).await;
    let m = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": "bye", "agentId": agent}),
        )
        .await
        .ok()
        .clone();
    let path = format!("/v3/conversations/messages/{}", m["id"].as_str().unwrap());
    let d = s.call(Method::DELETE, &path, None).await;
    assert_eq!(d.status, 204);
    assert!(d.raw.is_empty());
    s.get(&path).await.expect_error(404, "document_not_found");
    s.call(Method::PUT, &path, Some(json!({"text": "x"})))
        .await
        .expect_error(404, "document_not_found");
    s.call(Method::DELETE, &path, None)
        .await
        .expect_error(404, "document_not_found");
}

#[tokio::test]
async fn visitor_messages_cannot_be_edited_or_deleted() {
    let s = TestServer::start().await;
    let m = s
        .domain
        .send_visitor_message(
            &s.account,
            &VisitorId::parse(Some("v".into())).unwrap(),
            Text::parse(Some("from the visitor".into())).unwrap(),
        )
        .await
        .unwrap();
    let path = format!("/v3/conversations/messages/{}", m.id);
    let g = s.get(&path).await;
    assert_eq!(g.ok()["type"], "visitor");
    assert_eq!(g.body["isMissed"], true, "no agent online");
    assert!(g.body.get("agentId").is_none());

    let e = s.call(Method::PUT, &path, Some(json!({"text": "x"}))).await;
    let msg = e.expect_error(400, "permission_denied");
    assert!(msg.contains("agents' messages"), "{msg}");
    let d = s.call(Method::DELETE, &path, None).await;
    d.expect_error(400, "permission_denied");
    assert_eq!(
        s.get(&path).await.ok()["text"],
        "from the visitor",
        "unchanged"
    );
}

#[tokio::test]
async fn data_survives_a_restart() {
    let s = TestServer::start().await;
    let agent = s.agent("A", None, None, &[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let m = s
            .post(
                "/v3/conversations/messages",
                json!({"visitorId": "v", "text": format!("m{i}"), "agentId": agent}),
            )
            .await;
        ids.push(m.ok()["id"].as_str().unwrap().to_owned());
    }
    let db = s.db.clone();
    let dir = s.stop().await;
    let s2 = TestServer::start_on(db, Default::default(), Default::default()).await;
    for (i, id) in ids.iter().enumerate() {
        let g = s2.get(&format!("/v3/conversations/messages/{id}")).await;
        assert_eq!(g.ok()["text"], format!("m{i}"));
    }
    s2.stop().await;
    drop(dir);
}

#[tokio::test]
async fn sdk_quirks_are_accepted() {
    let s = TestServer::start().await;
    let agent = s.agent("A", None, None, &[]).await;
    // Python SDK: ", " separators, \u escapes with surrogate pairs, unknown keys, nulls.
    let body = "{\"visitorId\": \"v\", \"text\": \"smile \\ud83d\\ude00 caf\\u00e9\", \"agentId\": \"AGENT\", \"unknownKey\": [1, {\"x\": null}], \"receivedFrom\": null}".replace("AGENT", &agent);
    let r = s.post_text("/v3/conversations/messages", body).await;
    assert_eq!(r.ok()["text"], "smile 😀 café");
    assert!(r.body.get("receivedFrom").is_none());
    let id = r.body["id"].as_str().unwrap().to_owned();

    // GET and DELETE that declare a JSON content type without a body; Authorization ignored.
    let g = s
        .raw(
            s.request(Method::GET, &format!("/v3/conversations/messages/{id}"))
                .header("api-key", KEY)
                .header("content-type", "application/json")
                .header("authorization", "Basic Og==")
                .header("cookie", ""),
        )
        .await;
    g.ok();
    // A base URL with a trailing slash gives `//`.
    let g = s.get(&format!("//v3//conversations/messages/{id}")).await;
    g.ok();
    let d = s
        .raw(
            s.request(Method::DELETE, &format!("/v3/conversations/messages/{id}"))
                .header("api-key", KEY)
                .header("content-type", "application/json")
                .header("content-length", "0"),
        )
        .await;
    assert_eq!(d.status, 204);
}

/// Sixteen clients at once send, edit, delete and read messages, each on messages of its
/// own, so that group commits mix every kind of write, some sends under an
/// Idempotency-Key and retried: afterwards every message reads back as its last
/// acknowledged state, and the database holds exactly the acknowledged messages.
#[tokio::test]
async fn concurrent_sends_edits_and_deletes_end_as_acknowledged() {
    use rand::{Rng, SeedableRng};
    let s = TestServer::start().await;
    let agent = s.agent("A", Some("liz@getwear.com"), None, &[]).await;
    let client = |c: u64| {
        let (s, agent) = (&s, &agent);
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c);
            // Each message with its last acknowledged text, or None once deleted.
            let mut mine: Vec<(String, Option<String>)> = Vec::new();
            for i in 0..40 {
                let live: Vec<usize> = (0..mine.len()).filter(|&k| mine[k].1.is_some()).collect();
                let op = if live.is_empty() {
                    0
                } else {
                    rng.random_range(0..10)
                };
                let pick = |rng: &mut rand::rngs::StdRng| live[rng.random_range(0..live.len())];
                match op {
                    0..=3 => {
                        let text = format!("client {c} says {i}");
                        let body = json!({
                            "visitorId": format!("visitor-{}", c % 4),
                            "text": text,
                            "agentId": agent,
                        });
                        let key = format!("c{c}-{i}");
                        let headers: &[(&str, &str)] = if i % 3 == 0 {
                            &[("api-key", KEY), ("Idempotency-Key", &key)]
                        } else {
                            &[("api-key", KEY)]
                        };
                        let r = s
                            .call_with(
                                Method::POST,
                                "/v3/conversations/messages",
                                Some(body.clone()),
                                headers,
                            )
                            .await;
                        let id = r.ok()["id"].as_str().unwrap().to_owned();
                        if headers.len() == 2 {
                            let again = s
                                .call_with(
                                    Method::POST,
                                    "/v3/conversations/messages",
                                    Some(body),
                                    headers,
                                )
                                .await;
                            assert_eq!(
                                again.ok()["id"],
                                id.as_str(),
                                "a retry is the same message"
                            );
                        }
                        mine.push((id, Some(text)));
                    }
                    4..=6 => {
                        let k = pick(&mut rng);
                        let text = format!("client {c} edits {i}");
                        let r = s
                            .call(
                                Method::PUT,
                                &format!("/v3/conversations/messages/{}", mine[k].0),
                                Some(json!({ "text": text })),
                            )
                            .await;
                        assert_eq!(r.ok()["text"], text.as_str());
                        mine[k].1 = Some(text);
                    }
                    7 | 8 => {
                        let k = pick(&mut rng);
                        let path = format!("/v3/conversations/messages/{}", mine[k].0);
                        let r = s.call(Method::DELETE, &path, None).await;
                        assert_eq!(r.status, 204, "{}", r.raw);
                        mine[k].1 = None;
                    }
                    _ => {
                        let k = pick(&mut rng);
                        let r = s
                            .get(&format!("/v3/conversations/messages/{}", mine[k].0))
                            .await;
                        assert_eq!(r.ok()["text"], mine[k].1.as_deref().unwrap());
                    }
                }
            }
            mine
        }
    };
    let all: Vec<(String, Option<String>)> = futures::future::join_all((0..16).map(client))
        .await
        .into_iter()
        .flatten()
        .collect();
    let live = all.iter().filter(|(_, text)| text.is_some()).count();
    assert!(live > 50 && all.len() > live, "{live} of {}", all.len());
    for (id, text) in &all {
        let r = s.get(&format!("/v3/conversations/messages/{id}")).await;
        match text {
            Some(text) => assert_eq!(r.ok()["text"], text.as_str(), "{id}"),
            None => {
                r.expect_error(404, "document_not_found");
            }
        }
    }
    assert_eq!(
        s.count("messages WHERE deleted_at IS NULL").await,
        live as i64
    );
    assert_eq!(s.count("messages").await, all.len() as i64);
}

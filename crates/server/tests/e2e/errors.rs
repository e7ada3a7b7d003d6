use reqwest::Method;
use serde_json::json;

use crate::db::Conn;
use crate::harness::{TestServer, KEY};

#[tokio::test]
async fn missing_and_empty_fields_are_named() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let cases = [
        (json!({}), "missing_parameter", "visitorId"),
        (json!({"visitorId": "v"}), "missing_parameter", "text"),
        (
            json!({"visitorId": "", "text": "t", "agentId": a}),
            "missing_parameter",
            "visitorId",
        ),
        (
            json!({"visitorId": "v", "text": "", "agentId": a}),
            "missing_parameter",
            "text",
        ),
        (
            json!({"visitorId": "v", "text": "   ", "agentId": a}),
            "missing_parameter",
            "text",
        ),
        (
            json!({"visitorId": "v", "text": null, "agentId": a}),
            "missing_parameter",
            "text",
        ),
        (
            json!({"visitorId": 12, "text": "t", "agentId": a}),
            "invalid_parameter",
            "visitorId",
        ),
        (
            json!({"visitorId": "v", "text": ["t"], "agentId": a}),
            "invalid_parameter",
            "text",
        ),
        (
            json!({"visitorId": "v", "text": "t", "agentId": true}),
            "invalid_parameter",
            "agentId",
        ),
        (
            json!({"visitorId": "v", "text": "t", "agentEmail": "not-an-email", "agentName": "X"}),
            "invalid_parameter",
            "agentEmail",
        ),
    ];
    for (body, code, field) in cases {
        let r = s.post("/v3/conversations/messages", body.clone()).await;
        let msg = r.expect_error(400, code);
        assert!(msg.contains(field), "{body}: {msg}");
    }
    for path in [
        "/v3/conversations/pushedMessages",
        "/v3/conversations/messages",
    ] {
        let r = s.post(path, json!({"text": "t"})).await;
        assert!(r
            .expect_error(400, "missing_parameter")
            .contains("visitorId"));
    }
    assert_eq!(s.count("messages").await, 0);
}

#[tokio::test]
async fn text_length_limit_is_out_of_range() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let ok = "é".repeat(100_000);
    s.post(
        "/v3/conversations/messages",
        json!({"visitorId": "v", "text": ok, "agentId": a}),
    )
    .await
    .ok();
    let long = "a".repeat(100_001);
    let r = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": long, "agentId": a}),
        )
        .await;
    let msg = r.expect_error(400, "out_of_range");
    assert!(msg.contains("100000"), "{msg}");
    assert_eq!(s.count("messages").await, 1);
}

#[tokio::test]
async fn malformed_and_non_object_json() {
    let s = TestServer::start().await;
    for (body, code) in [
        ("{\"visitorId\": ", "bad_request"),
        ("{'visitorId': 'v'}", "bad_request"),
        ("{} trailing", "bad_request"),
        ("[1, 2]", "invalid_parameter"),
        ("\"text\"", "invalid_parameter"),
    ] {
        let r = s.post_text("/v3/conversations/messages", body).await;
        r.expect_error(400, code);
    }
}

#[tokio::test]
async fn a_field_sent_twice_is_a_duplicate_parameter() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let body = format!(r#"{{"visitorId": "v", "text": "one", "text": "two", "agentId": "{a}"}}"#);
    let r = s.post_text("/v3/conversations/messages", body).await;
    let msg = r.expect_error(400, "duplicate_parameter");
    assert!(msg.starts_with("text appears more than once"), "{msg}");
    assert_eq!(s.count("messages").await, 0);
}

#[tokio::test]
async fn empty_bodies_give_a_normal_400() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let m = s
        .post(
            "/v3/conversations/messages",
            json!({"visitorId": "v", "text": "t", "agentId": a}),
        )
        .await
        .ok()
        .clone();
    // Python SDK: PUT without body, Content-Length 0 with a JSON content type.
    let r = s
        .raw(
            s.request(
                Method::PUT,
                &format!("/v3/conversations/messages/{}", m["id"].as_str().unwrap()),
            )
            .header("api-key", KEY)
            .header("content-type", "application/json")
            .header("content-length", "0"),
        )
        .await;
    assert!(r.expect_error(400, "missing_parameter").contains("text"));
    // POST with no body and no content type at all.
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY),
        )
        .await;
    assert!(r
        .expect_error(400, "missing_parameter")
        .contains("visitorId"));
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/agentOnlinePing")
                .header("api-key", KEY),
        )
        .await;
    r.expect_error(400, "missing_parameter");
}

#[tokio::test]
async fn body_over_one_mib_is_413() {
    let s = TestServer::start().await;
    let big = format!(
        "{{\"visitorId\":\"v\",\"text\":\"{}\"}}",
        "a".repeat(1024 * 1024)
    );
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .body(big.clone()),
        )
        .await;
    r.expect_error(413, "out_of_range");
    // Chunked, so no Content-Length announces it.
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("api-key", KEY)
                .body(reqwest::Body::wrap_stream(stream)),
        )
        .await;
    r.expect_error(413, "out_of_range");
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let s = TestServer::start().await;
    let r = s.get("/v3/conversations/nothing").await;
    r.expect_error(404, "document_not_found");
    let r = s.get("/").await;
    r.expect_error(404, "document_not_found");
    // `undefined` from an SDK that lost the id is just an unknown id.
    s.get("/v3/conversations/messages/undefined")
        .await
        .expect_error(404, "document_not_found");
    let r = s
        .call(Method::PATCH, "/v3/conversations/messages/abc", None)
        .await;
    let msg = r.expect_error(405, "method_not_allowed");
    assert!(msg.contains("PATCH"), "{msg}");
    let allow = r.headers["allow"].to_str().unwrap().to_owned();
    for m in ["GET", "PUT", "DELETE"] {
        assert!(allow.contains(m), "{allow}");
    }
    let r = s
        .call(Method::GET, "/v3/conversations/messages", None)
        .await;
    r.expect_error(405, "method_not_allowed");
    let r = s
        .call(
            Method::POST,
            "/v3/conversations/visitorGroup",
            Some(json!({})),
        )
        .await;
    r.expect_error(405, "method_not_allowed");
}

#[tokio::test]
async fn ids_that_are_not_path_safe_stay_in_one_segment() {
    let s = TestServer::start().await;
    for id in ["a%2Fb", "a%20b", "%C3%A9t%C3%A9", "..%2F..%2Fetc", "%FF%FE"] {
        let r = s.get(&format!("/v3/conversations/messages/{id}")).await;
        r.expect_error(404, "document_not_found");
    }
}

#[tokio::test]
async fn never_a_redirect() {
    let s = TestServer::start().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    for path in [
        "/v3/conversations/messages/",
        "/v3/conversations/messages//x",
        "/v3/",
    ] {
        let r = client
            .get(format!("{}{path}", s.url))
            .header("api-key", KEY)
            .send()
            .await
            .unwrap();
        assert!(!r.status().is_redirection(), "{path}: {}", r.status());
    }
}

/// PostgreSQL cannot store or compare a string holding NUL: the server refuses it in every
/// input, on both backends, with a 400 that says so, instead of failing on the database.
#[tokio::test]
async fn the_nul_character_is_refused_in_bodies_paths_and_queries() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    let sent = s.agent_says(&a, "v1", "hello").await;

    for (path, body) in [
        (
            "/v3/conversations/messages",
            format!(r#"{{"visitorId": "v1", "text": "a\u0000b", "agentId": "{a}"}}"#),
        ),
        (
            "/v3/conversations/pushedMessages",
            r#"{"visitorId": "v1", "text": "t", "groupId": "g\u0000"}"#.to_owned(),
        ),
        (
            "/v3/conversations/agentOnlinePing",
            r#"{"agentId": "a\u0000"}"#.to_owned(),
        ),
    ] {
        let msg = s
            .post_text(path, body)
            .await
            .expect_error(400, "invalid_parameter");
        assert!(msg.contains("NUL"), "{path}: {msg}");
    }
    let r = s
        .raw(
            s.request(Method::PUT, "/v3/conversations/visitorGroup")
                .header("api-key", KEY)
                .header("content-type", "application/json")
                .body(r#"{"visitorId": "v1", "groupId": "g\u0000"}"#),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
    // The letters \u0000 after an escaped backslash are no NUL.
    s.post_text(
        "/v3/conversations/messages",
        format!(r#"{{"visitorId": "v1", "text": "a\\u0000", "agentId": "{a}"}}"#),
    )
    .await
    .ok();

    for path in [
        "/v3/conversations/messages/a%00b".to_owned(),
        "/v3/conversations/pushedMessages/a%00b".to_owned(),
        format!("/v3/conversations/visitors/v1/messages?before={sent}%00"),
        "/widget/v1/w%00/messages".to_owned(),
    ] {
        let msg = s.get(&path).await.expect_error(400, "invalid_parameter");
        assert!(msg.contains("%00"), "{path}: {msg}");
    }
    let r = s
        .raw(
            s.request(Method::DELETE, "/v3/conversations/messages/a%00b")
                .header("api-key", KEY),
        )
        .await;
    r.expect_error(400, "invalid_parameter");
    // Only the message with the escaped backslash was written after the first.
    assert_eq!(s.count("messages").await, 2);
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body) from `tcp`: the status
/// and the head's lines in lower case. Fails if the server closes the connection first.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + length {
                    let status = head[9..12].parse().unwrap();
                    return (status, head);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.expect("reading a response");
            assert!(
                n > 0,
                "the server closed the connection instead of answering"
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("no response within 10 s")
}

/// A request refused before its body was needed (unknown route, wrong method, no API key,
/// `%00` in the URL) leaves its connection open for the next request, even when the body
/// arrives after the head. (hyper keeps a connection only if the body was read to its end;
/// before, it closed this one without a `Connection: close`, so the client's next request
/// failed.) A body declared over the limit is not read, and its answer says so.
#[tokio::test]
async fn a_refused_request_keeps_its_connection_even_when_its_body_comes_late() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start().await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    for (request_line, extra, status) in [
        ("POST /nope", String::new(), 404),
        ("POST /v3/conversations/messages", String::new(), 401),
        (
            "POST /v3/conversations/messages?x=%00",
            format!("api-key: {KEY}\r\n"),
            400,
        ),
        ("POST /v3/openapi.json", String::new(), 405),
        (
            "PUT /v3/conversations/messages/%ff",
            format!("api-key: {KEY}\r\n"),
            404,
        ),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "{request_line} HTTP/1.1\r\nhost: x\r\n{extra}content-type: application/json\r\n\
             content-length: 2\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        // A slow client: the body follows in a later packet, after the server could
        // already have answered from the head alone.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tcp.write_all(b"{}").await.unwrap();
        let (got, head) = read_response(&mut tcp).await;
        assert_eq!(got, status, "{request_line}: {head}");
        assert!(
            !head.contains("connection: close"),
            "{request_line}: {head}"
        );
        tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (got, _) = read_response(&mut tcp).await;
        assert_eq!(
            got, 200,
            "{request_line}: the next request on the connection"
        );
    }

    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v3/conversations/messages HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n\
         content-type: application/json\r\ncontent-length: 2000000\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (got, head) = read_response(&mut tcp).await;
    assert_eq!(got, 413, "{head}");
    assert!(head.contains("connection: close"), "{head}");
}

/// A request sent with `Expect: 100-continue` and refused before its body was needed gets
/// its answer at once, without a `100 Continue`, so its client never uploads the body; the
/// answer says `Connection: close` and the connection closes. A request whose body is needed
/// gets the `100 Continue`, then its answer, and keeps its connection.
#[tokio::test]
async fn expect_100_continue_asks_only_for_a_body_that_is_needed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    for (request_line, extra, status) in [
        ("POST /v3/conversations/messages", String::new(), 401),
        ("POST /nope", format!("api-key: {KEY}\r\n"), 404),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "{request_line} HTTP/1.1\r\nhost: x\r\n{extra}content-type: application/json\r\n\
             content-length: 500000\r\nexpect: 100-continue\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let (got, head) = read_response(&mut tcp).await;
        assert_eq!(got, status, "{request_line}: {head}");
        assert!(head.contains("connection: close"), "{request_line}: {head}");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut rest),
        )
        .await
        .expect("the connection closes after the answer");
        assert!(
            closed.is_ok() && rest.is_empty(),
            "{request_line}: {rest:?}"
        );
    }

    let body = br#"{"visitorId":"v100","text":"t","agentEmail":"a@x.com","agentName":"A"}"#;
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v3/conversations/messages HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (got, head) = read_response(&mut tcp).await;
    assert_eq!(got, 100, "{head}");
    tcp.write_all(body).await.unwrap();
    let (got, head) = read_response(&mut tcp).await;
    assert_eq!(got, 200, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut tcp).await.0, 200);
}

/// An id that is not UTF-8 once percent-decoded names nothing: every route with ids in its
/// path answers Brevo's 404, never axum's plain-text 400 (before, the two routes with two
/// ids, a webhook's delivery and its replay, did).
#[tokio::test]
async fn an_undecodable_id_in_any_path_is_a_brevo_404() {
    let s = TestServer::start().await;
    for (method, path) in [
        (Method::GET, "/v3/conversations/messages/%ff"),
        (Method::PUT, "/v3/conversations/messages/%ff"),
        (Method::DELETE, "/v3/conversations/pushedMessages/%ff"),
        (Method::GET, "/v3/conversations/visitors/%ff/messages"),
        (Method::GET, "/v3/conversations/webhooks/%ff"),
        (Method::GET, "/v3/conversations/webhooks/%ff/deliveries"),
        (Method::GET, "/v3/conversations/webhooks/x/deliveries/%ff"),
        (Method::GET, "/v3/conversations/webhooks/%ff/deliveries/x"),
        (
            Method::POST,
            "/v3/conversations/webhooks/x/deliveries/%ff/replay",
        ),
    ] {
        let r = s.call(method.clone(), path, None).await;
        let msg = r.expect_error(404, "document_not_found");
        assert!(msg.contains("UTF-8"), "{method} {path}: {msg}");
    }
}

/// Every error code older official SDKs accept.
const BREVO_CODES: [&str; 11] = [
    "invalid_parameter",
    "missing_parameter",
    "out_of_range",
    "document_not_found",
    "permission_denied",
    "duplicate_parameter",
    "duplicate_request",
    "method_not_allowed",
    "unauthorized",
    "not_acceptable",
    "bad_request",
];

/// Random requests (methods, paths, ids, queries, headers and bodies, valid and not) over
/// keep-alive connections: none gets a 5xx, and every error is Brevo's JSON body with a
/// code from Brevo's list. The RNG is seeded, so a failure names the request that caused
/// it and happens again.
#[tokio::test]
async fn random_requests_get_brevo_errors_and_never_a_5xx() {
    use rand::{Rng, SeedableRng};
    let s = TestServer::start().await;
    let a = s.agent("A", Some("liz@getwear.com"), None, &[]).await;
    let sent = s
        .agent_says(&a, "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg", "hello")
        .await;
    let widget = s.widget_id().await;
    let (_, token) = s.new_visitor().await;
    let (hook, _) = s
        .webhook("http://127.0.0.1:1/hook", &["conversationFragment"])
        .await;
    // SWITCHBOARD_FUZZ_SEED and SWITCHBOARD_FUZZ_REQUESTS explore further by hand.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seed = env("SWITCHBOARD_FUZZ_SEED", 20261201);
    let requests = env("SWITCHBOARD_FUZZ_REQUESTS", 1500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let strings = [
        String::new(),
        " ".into(),
        "x".repeat(100_001),
        "é中😀\u{202e}<>&\"'\\/\t\n".into(),
        "a\u{0}b".into(),
        "\u{1}\u{1f}".into(),
        "liz@getwear.com".into(),
        "not-an-email".into(),
        "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg".into(),
        "http://127.0.0.1:1/hook".into(),
        sent.clone(),
        a.clone(),
    ];
    let ids = [
        "x",
        "%ff",
        "%2F",
        "%C3%A9",
        "a%20b",
        "%ED%A0%80",
        &sent,
        &a,
        "..",
        "%00",
        &widget,
        &hook,
    ];
    // Each path with the methods its route serves, tried most of the time.
    let paths: [(&str, &[Method]); 18] = [
        ("/v3/conversations/agentOnlinePing", &[Method::POST]),
        ("/v3/conversations/messages", &[Method::POST]),
        (
            "/v3/conversations/messages/{id}",
            &[Method::GET, Method::PUT, Method::DELETE],
        ),
        ("/v3/conversations/pushedMessages", &[Method::POST]),
        (
            "/v3/conversations/pushedMessages/{id}",
            &[Method::GET, Method::PUT, Method::DELETE],
        ),
        ("/v3/conversations/visitorGroup", &[Method::PUT]),
        ("/v3/conversations/visitors/{id}/messages", &[Method::GET]),
        ("/v3/conversations/events", &[Method::GET]),
        ("/v3/conversations/webhooks", &[Method::GET, Method::POST]),
        (
            "/v3/conversations/webhooks/{id}",
            &[Method::GET, Method::PUT, Method::DELETE],
        ),
        ("/v3/conversations/webhooks/{id}/deliveries", &[Method::GET]),
        (
            "/v3/conversations/webhooks/{id}/deliveries/{id}",
            &[Method::GET],
        ),
        (
            "/v3/conversations/webhooks/{id}/deliveries/{id}/replay",
            &[Method::POST],
        ),
        ("/widget/v1/{widget}/session", &[Method::POST]),
        ("/widget/v1/{widget}/messages", &[Method::GET, Method::POST]),
        ("/widget/v1/{widget}/read", &[Method::POST]),
        ("/v3//conversations//messages", &[Method::POST]),
        ("/nope", &[Method::GET]),
    ];
    let fields = [
        "visitorId",
        "text",
        "agentId",
        "agentEmail",
        "agentName",
        "receivedFrom",
        "groupId",
        "url",
        "events",
        "enabled",
        "description",
        "token",
        "visitorHash",
        "name",
        "email",
        "pageUrl",
        "pageTitle",
        "messageId",
    ];
    let methods = [
        Method::GET,
        Method::POST,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];
    let content_types = [
        "application/json",
        "application/json",
        "text/plain",
        "multipart/form-data",
    ];
    // (widget path, status) -> count: the requests must reach past the extractors.
    let mut answered = std::collections::BTreeMap::<(bool, u16), u32>::new();
    for i in 0..requests {
        let (template, served) = paths[rng.random_range(0..paths.len())];
        let mut path = template.to_owned();
        if path.contains("{widget}") {
            let w = if rng.random_bool(0.8) {
                widget.as_str()
            } else {
                ids[rng.random_range(0..ids.len())]
            };
            path = path.replace("{widget}", w);
        }
        while path.contains("{id}") {
            path = path.replacen("{id}", ids[rng.random_range(0..ids.len())], 1);
        }
        if rng.random_bool(0.4) {
            let key = ["visitorId", "limit", "before", "after", "x"][rng.random_range(0..5)];
            let value = ["", "1", "-1", "99999999999999999999", "abc", "%ff", "1.5"]
                [rng.random_range(0..7)];
            path = format!("{path}?{key}={value}");
        }
        let method = if rng.random_bool(0.8) {
            served[rng.random_range(0..served.len())].clone()
        } else {
            methods[rng.random_range(0..methods.len())].clone()
        };
        let value = |rng: &mut rand::rngs::StdRng| -> serde_json::Value {
            match rng.random_range(0..7) {
                0 => serde_json::Value::Null,
                1 => json!(rng.random_bool(0.5)),
                2 => json!([0i64, -1, 1 << 53, i64::MAX][rng.random_range(0..4)]),
                3 => json!(1e308),
                4 => json!([strings[rng.random_range(0..strings.len())].clone()]),
                _ => json!(strings[rng.random_range(0..strings.len())].clone()),
            }
        };
        let body: Vec<u8> = match rng.random_range(0..8) {
            0 => Vec::new(),
            1 => b"{".to_vec(),
            2 => [b"[".repeat(300), b"]".repeat(300)].concat(),
            3 => vec![0xff, 0xfe, b'{'],
            _ => {
                let mut o = serde_json::Map::new();
                for _ in 0..rng.random_range(0..6) {
                    let f = fields[rng.random_range(0..fields.len())];
                    o.insert(f.to_owned(), value(&mut rng));
                }
                if rng.random_bool(0.5) {
                    o.entry("visitorId")
                        .or_insert(json!("kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg"));
                    o.entry("text").or_insert(json!("hi"));
                    o.entry("agentId").or_insert(json!(a));
                }
                serde_json::to_vec(&o).unwrap()
            }
        };
        let mut req = s.request(method.clone(), &path);
        if rng.random_bool(0.85) {
            req = req.header("api-key", KEY);
        }
        if rng.random_bool(0.8) {
            req = req.header(
                "content-type",
                content_types[rng.random_range(0..content_types.len())],
            );
        }
        if rng.random_bool(if path.starts_with("/widget") {
            0.8
        } else {
            0.2
        }) {
            let bearer = [token.as_str(), token.as_str(), "x", ""][rng.random_range(0..4)];
            req = req.header("authorization", format!("Bearer {bearer}"));
        }
        if rng.random_bool(0.1) {
            req = req.header("Idempotency-Key", ["k1", "k2", ""][rng.random_range(0..3)]);
        }
        if method != Method::GET || rng.random_bool(0.1) {
            req = req.body(body.clone());
        }
        let what = format!(
            "seed {seed}, request {i}: {method} {path} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        let r = req.send().await.expect(&what);
        let status = r.status().as_u16();
        assert!(status < 500, "{what}: {status}");
        *answered
            .entry((path.starts_with("/widget"), status))
            .or_insert(0) += 1;
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if content_type == "text/event-stream" {
            continue; // a live stream: its answer never ends
        }
        let raw = r.text().await.expect(&what);
        if status >= 400 {
            assert_eq!(content_type, "application/json", "{what}: {raw}");
            let e: serde_json::Value = serde_json::from_str(&raw).expect(&what);
            let code = e["code"].as_str().unwrap_or_default();
            assert!(BREVO_CODES.contains(&code), "{what}: {raw}");
            assert!(e["message"].is_string(), "{what}: {raw}");
            assert_eq!(e.as_object().map(|o| o.len()), Some(2), "{what}: {raw}");
        }
    }
    eprintln!("answers by (widget path, status): {answered:?}");
    for widget_path in [false, true] {
        let ok: u32 = answered
            .iter()
            .filter(|((w, status), _)| *w == widget_path && (200..300).contains(status))
            .map(|(_, n)| n)
            .sum();
        assert!(
            ok >= 10,
            "widget path {widget_path}: {ok} successes: {answered:?}"
        );
    }
}

/// A storage failure (here a trigger that makes every insert of a message fail) answers 503
/// with `Retry-After` and Brevo's body, on the one-statement path (a known conversation)
/// and on the general one (a new visitor), leaves nothing half-written, and the same
/// request succeeds once the cause is gone.
#[tokio::test]
async fn a_storage_failure_is_a_retryable_503_that_wrote_nothing() {
    let s = TestServer::start().await;
    let a = s.agent("A", None, None, &[]).await;
    s.agent_says(&a, "known", "first").await;
    let mut conn = Conn::open_writable(&s.db).await;
    let (install, remove) = match conn {
        Conn::Sqlite(_) => (
            "CREATE TRIGGER fail_inserts BEFORE INSERT ON messages \
             BEGIN SELECT RAISE(ABORT, 'the disk is on fire'); END",
            "DROP TRIGGER fail_inserts",
        ),
        Conn::Postgres(_) => (
            "CREATE FUNCTION fail_inserts() RETURNS trigger AS $$ \
             BEGIN RAISE EXCEPTION 'the disk is on fire'; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER fail_inserts BEFORE INSERT ON messages \
             FOR EACH ROW EXECUTE FUNCTION fail_inserts()",
            "DROP TRIGGER fail_inserts ON messages; DROP FUNCTION fail_inserts()",
        ),
    };
    conn.execute(install).await;
    for visitor in ["known", "new"] {
        let body = json!({"visitorId": visitor, "text": "hello", "agentId": a});
        let r = s.post("/v3/conversations/messages", body).await;
        let msg = r.expect_error(503, "bad_request");
        assert!(msg.contains("safe to retry"), "{msg}");
        assert_eq!(r.headers["retry-after"], "1", "{visitor}");
    }
    assert_eq!(s.count("messages").await, 1);
    assert_eq!(
        s.count("conversations").await,
        1,
        "no conversation for the new visitor"
    );
    assert_eq!(s.count("visitors").await, 1, "no new visitor");

    conn.execute(remove).await;
    conn.close().await;
    for visitor in ["known", "new"] {
        let body = json!({"visitorId": visitor, "text": "hello", "agentId": a});
        s.post("/v3/conversations/messages", body).await.ok();
    }
    assert_eq!(s.count("messages").await, 3);
    // The new visitor's conversation exists now, and its message names it.
    assert_eq!(s.count("visitors").await, 2);
    assert_eq!(
        s.count("messages m JOIN conversations c ON c.id = m.conversation_id")
            .await,
        3
    );
}

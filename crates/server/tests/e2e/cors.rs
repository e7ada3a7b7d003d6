//! Browsers on other origins: the preflight a browser sends before a call with `api-key` or
//! a JSON body, and the `Access-Control-Allow-Origin` that lets its code read the answer
//! (errors included), for the REST API and the widget API alike; `--cors-origins` narrows
//! or turns it off.

use reqwest::Method;
use serde_json::json;
use switchboard_server::domain::{Clock, DomainConfig};
use switchboard_server::http::cors::CorsOrigins;
use switchboard_server::ServeOptions;

use crate::harness::{Res, TestServer, KEY};

const SHOP: &str = "https://shop.example";

async fn server(cors: &str) -> TestServer {
    let options = ServeOptions {
        cors: cors.parse::<CorsOrigins>().unwrap(),
        ..ServeOptions::default()
    };
    TestServer::start_full(DomainConfig::default(), Clock::System, options).await
}

fn header<'r>(r: &'r Res, name: &str) -> Option<&'r str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

/// The preflight of a browser's `method` call on `path` from `origin` with `headers`.
async fn preflight(s: &TestServer, path: &str, origin: &str, method: &str, headers: &str) -> Res {
    s.raw(
        s.request(Method::OPTIONS, path)
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers),
    )
    .await
}

#[tokio::test]
async fn a_browser_on_any_origin_may_call_the_api_and_read_its_answers() {
    let s = server("*").await;
    let agent = s.agent("Julia", Some("julia@example.com"), None, &[]).await;
    // What a browser asks before POSTing JSON with an api-key (and an SDK's own headers).
    let asked = "api-key,content-type,idempotency-key,x-fern-language";
    let r = preflight(&s, "/v3/conversations/messages", SHOP, "POST", asked).await;
    assert_eq!(r.status, 204, "{}", r.raw);
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    let methods = header(&r, "access-control-allow-methods").unwrap();
    for m in ["GET", "POST", "PUT", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    assert_eq!(header(&r, "access-control-allow-headers"), Some(asked));
    assert_eq!(header(&r, "access-control-max-age"), Some("7200"));
    assert_eq!(header(&r, "access-control-allow-credentials"), None);
    assert_eq!(
        header(&r, "vary"),
        None,
        "the answer is the same for every origin"
    );

    // The call itself: its answer is readable from that origin, and nothing else changes.
    let r = s
        .raw(
            s.request(Method::POST, "/v3/conversations/messages")
                .header("origin", SHOP)
                .header("api-key", KEY)
                .json(&json!({"visitorId": "v1", "text": "hi", "agentId": agent})),
        )
        .await;
    assert_eq!(r.ok()["text"], "hi");
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    let exposed = header(&r, "access-control-expose-headers").unwrap();
    assert!(exposed.contains("Retry-After"), "{exposed}");
    let id = r.body["id"].as_str().unwrap().to_owned();

    // Errors too, so that browser code can show Brevo's message: no key, an unknown route,
    // a wrong method.
    let no_key = s
        .raw(
            s.request(Method::GET, &format!("/v3/conversations/messages/{id}"))
                .header("origin", SHOP),
        )
        .await;
    no_key.expect_error(401, "unauthorized");
    assert_eq!(header(&no_key, "access-control-allow-origin"), Some("*"));
    let unknown = s
        .raw(s.request(Method::GET, "/v3/nowhere").header("origin", SHOP))
        .await;
    unknown.expect_error(404, "document_not_found");
    assert_eq!(header(&unknown, "access-control-allow-origin"), Some("*"));

    // A request without Origin (a server, an SDK, curl) gets no CORS headers at all.
    let plain = s
        .call(
            Method::GET,
            &format!("/v3/conversations/messages/{id}"),
            None,
        )
        .await;
    plain.ok();
    for h in plain.headers.keys() {
        assert!(!h.as_str().starts_with("access-control-"), "{h}");
    }
    // OPTIONS that is not a preflight is still a wrong method.
    let options = s
        .raw(
            s.request(Method::OPTIONS, "/v3/conversations/messages")
                .header("api-key", KEY),
        )
        .await;
    options.expect_error(405, "method_not_allowed");
}

#[tokio::test]
async fn a_chat_widget_on_the_customers_site_may_call_the_widget_api() {
    let s = server("*").await;
    let widget = s.widget_id().await;
    let path = format!("/widget/v1/{widget}/session");
    let r = preflight(&s, &path, SHOP, "POST", "content-type").await;
    assert_eq!(r.status, 204, "{}", r.raw);
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        header(&r, "access-control-allow-headers"),
        Some("content-type")
    );
    let r = s
        .raw(
            s.request(Method::POST, &path)
                .header("origin", SHOP)
                .json(&json!({"name": "Ada"})),
        )
        .await;
    let token = r.ok()["token"].as_str().unwrap().to_owned();
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    let r = s
        .raw(
            s.request(Method::GET, &format!("/widget/v1/{widget}/messages"))
                .header("origin", SHOP)
                .header("authorization", format!("Bearer {token}")),
        )
        .await;
    assert_eq!(r.ok()["messages"], json!([]));
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn a_list_of_origins_lets_only_those_in() {
    let s = server("https://shop.example, http://localhost:3000").await;
    for origin in [SHOP, "http://localhost:3000"] {
        let r = preflight(&s, "/v3/conversations/messages", origin, "POST", "api-key").await;
        assert_eq!(r.status, 204, "{}", r.raw);
        assert_eq!(header(&r, "access-control-allow-origin"), Some(origin));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        let r = s
            .raw(s.request(Method::GET, "/health").header("origin", origin))
            .await;
        assert_eq!(r.ok()["status"], "ok");
        assert_eq!(header(&r, "access-control-allow-origin"), Some(origin));
        assert_eq!(header(&r, "vary"), Some("Origin"));
    }
    // Another origin gets no CORS headers, so its browser refuses; the server itself
    // answers as it would anyone (its preflight is then just an OPTIONS).
    let evil = "https://evil.example";
    let r = preflight(&s, "/v3/conversations/messages", evil, "POST", "api-key").await;
    r.expect_error(405, "method_not_allowed");
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    let r = s
        .raw(s.request(Method::GET, "/health").header("origin", evil))
        .await;
    r.ok();
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    // Same host, other port or scheme: another origin.
    for other in ["http://shop.example", "https://shop.example:8443"] {
        let r = s
            .raw(s.request(Method::GET, "/health").header("origin", other))
            .await;
        assert_eq!(header(&r, "access-control-allow-origin"), None, "{other}");
    }
}

#[tokio::test]
async fn cors_can_be_turned_off() {
    let s = server("none").await;
    let r = preflight(&s, "/v3/conversations/messages", SHOP, "POST", "api-key").await;
    r.expect_error(405, "method_not_allowed");
    let r = s
        .raw(s.request(Method::GET, "/health").header("origin", SHOP))
        .await;
    r.ok();
    for h in r.headers.keys() {
        assert!(!h.as_str().starts_with("access-control-"), "{h}");
    }
}

//! Cross-origin requests from browsers (CORS): a chat widget runs on the customer's site,
//! not on switchboard's origin, and Brevo's API answers any origin
//! (`Access-Control-Allow-Origin: *`), so browser code written against Brevo expects to
//! read switchboard's answers too.
//!
//! Nothing is sent back to a request without `Origin` (SDKs on servers, curl): they cost one
//! header lookup. No credentials are allowed: the API is authenticated by headers and
//! tokens, never by cookies.

use std::fmt;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// Which browser origins may call switchboard (`--cors-origins`).
#[derive(Clone, PartialEq, Eq, Default)]
pub enum CorsOrigins {
    /// Any origin (`*`), as Brevo's API allows.
    #[default]
    Any,
    /// Only these origins (`scheme://host[:port]`, as browsers send them).
    Only(Arc<[HeaderValue]>),
    /// No cross-origin calls: browsers get no CORS headers and refuse to read the answers.
    Off,
}

impl fmt::Debug for CorsOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Off => f.write_str("none"),
            Self::Only(list) => {
                let names: Vec<&str> = list.iter().filter_map(|v| v.to_str().ok()).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

impl std::str::FromStr for CorsOrigins {
    type Err = String;

    /// `*`, `none` (or nothing), or a comma-separated list of origins such as
    /// `https://shop.example,http://localhost:3000`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::Any);
        }
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(Self::Off);
        }
        let mut list = Vec::new();
        for origin in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            list.push(parse_origin(origin)?);
        }
        Ok(Self::Only(list.into()))
    }
}

/// One origin of a list: `http` or `https`, a host, an optional port, nothing after.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let bad = |why: &str| {
        format!(
            "{origin:?} is not an origin ({why}); write it as a browser sends it, e.g. \
             https://shop.example or http://localhost:3000, or give * for any origin"
        )
    };
    if origin == "*" {
        return Err(bad("* stands alone, not in a list"));
    }
    let lower = origin.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or_else(|| bad("it must start with http:// or https://"))?;
    if rest.is_empty() {
        return Err(bad("it has no host"));
    }
    if rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
        return Err(bad("only a scheme, a host and a port; no path, not even /"));
    }
    // Browsers send scheme and host in lower case.
    HeaderValue::from_str(&lower).map_err(|_| bad("it holds characters a header cannot"))
}

/// The methods switchboard serves, for preflight answers.
const METHODS: HeaderValue = HeaderValue::from_static("GET, POST, PUT, DELETE");
/// Response headers browser code may read besides the safelisted ones: how long to wait
/// before retrying (429, 503) and the methods a path has (405).
const EXPOSED: HeaderValue = HeaderValue::from_static("Retry-After, Allow");
/// How long a browser may reuse a preflight answer (Chromium keeps one at most 2 hours).
const MAX_AGE: HeaderValue = HeaderValue::from_static("7200");
const ANY: HeaderValue = HeaderValue::from_static("*");

impl CorsOrigins {
    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match self {
            Self::Any => Some(ANY),
            Self::Only(list) => list.iter().find(|o| *o == origin).cloned(),
            Self::Off => None,
        }
    }
}

/// Answers CORS preflights and marks the answers to allowed origins (see the module).
#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    origins: CorsOrigins,
}

impl<S> Cors<S> {
    /// `inner` with CORS for `origins`.
    pub fn new(inner: S, origins: CorsOrigins) -> Self {
        Self { inner, origins }
    }
}

impl<S> tower::Service<Request> for Cors<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Either<
            std::future::Ready<Result<Response, Self::Error>>,
            Marked<S::Future>,
        >,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures::future::Either::{Left, Right};
        // No Origin (not a browser), or one not allowed: the answer as it is.
        let Some(allow) = req
            .headers()
            .get(ORIGIN)
            .and_then(|o| self.origins.allow(o))
        else {
            return Left(self.inner.call(req));
        };
        let echoed = allow != ANY;
        if req.method() == Method::OPTIONS
            && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Right(Left(std::future::ready(Ok(preflight(&req, allow, echoed)))));
        }
        Right(Right(Marked {
            answer: self.inner.call(req),
            allow: Some(allow),
            echoed,
        }))
    }
}

/// The answer to a preflight: any path, so that the actual request's answer, an error
/// included, reaches the browser code.
fn preflight(req: &Request, allow: HeaderValue, echoed: bool) -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(ACCESS_CONTROL_ALLOW_METHODS, METHODS);
    // Whatever headers the request will carry (api-key, content-type, Idempotency-Key, an
    // SDK's own): none of them is a credential the browser adds by itself.
    if let Some(asked) = req.headers().get(ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(ACCESS_CONTROL_MAX_AGE, MAX_AGE);
    if echoed {
        h.append(VARY, HeaderValue::from_static("Origin"));
    }
    res
}

/// The application's answer, with `Access-Control-Allow-Origin` added.
pub struct Marked<F> {
    answer: F,
    allow: Option<HeaderValue>,
    echoed: bool,
}

impl<F> std::future::Future for Marked<F>
where
    F: std::future::Future<Output = Result<Response, std::convert::Infallible>> + Unpin,
{
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        let Ok(mut res) = std::task::ready!(std::pin::Pin::new(&mut this.answer).poll(cx));
        let h = res.headers_mut();
        if let Some(allow) = this.allow.take() {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        }
        h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED);
        if this.echoed {
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
        std::task::Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_parsed_or_refused_with_a_reason() {
        assert_eq!("*".parse::<CorsOrigins>(), Ok(CorsOrigins::Any));
        assert_eq!(" none ".parse::<CorsOrigins>(), Ok(CorsOrigins::Off));
        assert_eq!("".parse::<CorsOrigins>(), Ok(CorsOrigins::Off));
        let list: CorsOrigins = "https://shop.example, http://localhost:3000"
            .parse()
            .unwrap();
        assert_eq!(
            format!("{list:?}"),
            "https://shop.example,http://localhost:3000"
        );
        for (bad, why) in [
            ("shop.example", "http:// or https://"),
            ("https://shop.example/", "no path"),
            ("https://shop.example/chat", "no path"),
            ("ftp://shop.example", "http:// or https://"),
            ("https://", "no host"),
            ("https://a.example,*", "stands alone"),
        ] {
            let e = bad.parse::<CorsOrigins>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_listed_origin_is_echoed_and_others_get_nothing() {
        let list: CorsOrigins = "https://shop.example".parse().unwrap();
        let shop = HeaderValue::from_static("https://shop.example");
        assert_eq!(list.allow(&shop), Some(shop.clone()));
        assert_eq!(
            list.allow(&HeaderValue::from_static("https://evil.example")),
            None
        );
        assert_eq!(CorsOrigins::Any.allow(&shop), Some(ANY));
        assert_eq!(CorsOrigins::Off.allow(&shop), None);
    }
}

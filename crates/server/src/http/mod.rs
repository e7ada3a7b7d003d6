//! HTTP: the axum router, the extractors, and the one place that maps errors to responses.
//!
//! Every response that is not a success carries Brevo's error body
//! `{"code": "...", "message": "..."}` with `Content-Type: application/json`, including
//! the ones axum would produce itself (unknown route, wrong method, bad path, bad JSON,
//! oversized body).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use switchboard_wire::{ErrorBody, ErrorCode};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::domain::{Domain, DomainError};
use crate::store::StoreError;

mod hooks;
pub mod listen;
pub use hooks::{delivery_wire, webhook_wire};
pub mod cors;
pub mod openapi;
pub mod streams;
pub mod tls;
mod v3;
pub use v3::to_wire;
mod widget;

/// `Retry-After` of an answer to a storage failure, in seconds.
const STORAGE_RETRY_AFTER_SECS: u64 = 1;

/// Largest request body accepted (1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// The domain service.
    pub domain: Arc<Domain>,
    /// Fan-out of committed changes to live streams.
    pub hub: Arc<crate::realtime::Hub>,
    /// Turns true when the server stops: live streams close.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Settings of the live streams.
    pub streams: streams::StreamConfig,
    /// Take the client address from `X-Forwarded-For` (behind a reverse proxy).
    pub trust_proxy: bool,
}

/// The whole HTTP application: Brevo's `/v3` API, the OpenAPI document and `/health`.
///
/// Requests are traced (a span per request, a line per response) only when the installed
/// subscriber would record either at the time the router is built.
pub fn router(state: AppState) -> Router {
    let app = Router::new()
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/v3/openapi.json", get(openapi::serve))
        .merge(v3::routes())
        .merge(widget::routes())
        .merge(hooks::routes())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed);
    // Left out when nothing would be recorded (`RUST_LOG=warn`): it still reads the clock
    // and wraps every response body, about 5% of a POST's instructions on the workers.
    // Its other output, an error line for a 5xx, repeats the one a storage failure (the
    // only 5xx) logs with its cause.
    let app = if traces_requests() {
        app.layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span)
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
    } else {
        app
    };
    app.with_state(state)
}

/// Whether the current subscriber records the request span or the response line.
fn traces_requests() -> bool {
    tracing::enabled!(Level::INFO)
        || tracing::enabled!(target: "tower_http::trace::on_response", Level::INFO)
}

/// Collapses repeated slashes (`/v3//conversations`), which SDKs produce when their base
/// URL ends with `/`. Applied before routing; never answers with a redirect.
pub fn collapse_slashes(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.contains("//") {
        let mut collapsed = String::with_capacity(path.len());
        for c in path.chars() {
            if !(c == '/' && collapsed.ends_with('/')) {
                collapsed.push(c);
            }
        }
        let pq = match req.uri().query() {
            Some(q) => format!("{collapsed}?{q}"),
            None => collapsed,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

/// The request span: method and path only, because query strings may carry visitor tokens.
fn make_span(req: &Request) -> tracing::Span {
    tracing::info_span!("request", method = %req.method(), path = %req.uri().path())
}

/// Liveness: answers as soon as the server accepts requests.
#[utoipa::path(
    get,
    path = "/health",
    tag = "Extensions",
    summary = "Liveness",
    description = "Answers {\"status\": \"ok\"} once the server accepts requests (after its migrations); no api-key needed. It checks nothing else: for the database, use /health/ready.",
    responses((status = 200, description = "The server is up")),
)]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// How long `/health/ready` waits for the database and the writer.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness for a load balancer or a monitor: 200 only when the database answers a read
/// and the writer a job within [`READY_WITHIN`], else 503 saying which failed.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "Extensions",
    summary = "Readiness",
    description = "Answers {\"status\": \"ok\"} when the database answers a read and the writer takes a job (an empty transaction, which writes nothing) within 2 s; else 503 with Retry-After: 1 and a message saying what failed (the database's error, or that it did not answer in time). For load balancer health checks and monitors; no api-key needed.",
    responses(
        (status = 200, description = "Ready to serve reads and writes"),
        (status = 503, description = "The database or its writer failed or did not answer within 2 s", body = ErrorBody),
    ),
)]
pub(crate) async fn ready(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> ApiResult<Json<serde_json::Value>> {
    let not_ready = |why: String| {
        tracing::warn!(%why, "readiness check failed");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::BadRequest,
            format!("not ready: {why}"),
        );
        e.retry_after = Some(STORAGE_RETRY_AFTER_SECS);
        e
    };
    match tokio::time::timeout(READY_WITHIN, state.domain.store().ready()).await {
        Ok(Ok(())) => Ok(Json(serde_json::json!({ "status": "ok" }))),
        Ok(Err(e)) => Err(not_ready(format!("the database failed: {e}"))),
        Err(_) => Err(not_ready(format!(
            "the database and its writer did not answer within {} s",
            READY_WITHIN.as_secs()
        ))),
    }
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::DocumentNotFound,
        format!(
            "no such endpoint: {method} {}; the API is described at /v3/openapi.json",
            uri.path()
        ),
    )
}

/// A known path with a method it does not serve: Brevo's error body (axum adds `Allow`).
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!("{method} method is not allowed on {}", uri.path()),
    )
}

/// An error answer: status, Brevo code and a message a developer can act on.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        use ErrorCode as C;
        let (status, code) = match &e {
            DomainError::Missing(_) => (StatusCode::BAD_REQUEST, C::MissingParameter),
            DomainError::Invalid(_) => (StatusCode::BAD_REQUEST, C::InvalidParameter),
            DomainError::OutOfRange(_) => (StatusCode::BAD_REQUEST, C::OutOfRange),
            DomainError::NotFound(_) => (StatusCode::NOT_FOUND, C::DocumentNotFound),
            DomainError::PermissionDenied(_) => (StatusCode::BAD_REQUEST, C::PermissionDenied),
            DomainError::Duplicate(_) => (StatusCode::BAD_REQUEST, C::DuplicateParameter),
            DomainError::KeyReused(_) => (StatusCode::BAD_REQUEST, C::DuplicateRequest),
            DomainError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, C::Unauthorized),
            DomainError::RateLimited { retry_after, .. } => {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    C::TooManyRequests,
                    format!("{e}; retry in {retry_after} s"),
                );
                e.retry_after = Some(*retry_after);
                return e;
            }
            DomainError::Store(inner @ StoreError::CommitUnknown(_)) => {
                // The one case where switchboard cannot say whether it wrote: the database
                // went away mid-commit and stayed away, or the disk failed to flush the
                // commit and then the next one. No status is right; this one says so.
                tracing::error!(error = %inner, "storage failure during a commit");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    C::BadRequest,
                    "the database connection broke or the disk failed while this request was \
                     being committed, and whether the commit happened could not be found out: \
                     it may have been applied. Check before retrying (a retry with the same \
                     Idempotency-Key is always safe)",
                );
            }
            DomainError::Store(inner) => {
                // Nothing was committed (the store answers only after a commit), so a
                // retryable status is safe. 503 with Retry-After: the older official SDKs
                // retry GET, PUT and DELETE only on that; the current ones on any 5xx.
                tracing::error!(error = %inner, source = ?std::error::Error::source(inner), "storage failure");
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    C::BadRequest,
                    "storage unavailable: the request was not applied; it is safe to retry",
                );
                e.retry_after = Some(STORAGE_RETRY_AFTER_SECS);
                return e;
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// The caller's account, from the `api-key` (and `partner-key`) header.
pub struct Auth(pub String);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let account = state
            .domain
            .authenticate(header("api-key"), header("partner-key"))
            .await?;
        Ok(Auth(account))
    }
}

/// The ids of a path (`{id}`, or a tuple for several), percent-decoded. An undecodable id
/// cannot exist: 404, as Brevo's error body rather than axum's plain-text rejection.
pub struct IdPath<T = String>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for IdPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(ids)) => Ok(IdPath(ids)),
            Err(_) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::DocumentNotFound,
                "an id in the path is not valid UTF-8 once percent-decoded, so nothing by that id exists",
            )),
        }
    }
}

/// A JSON object body, with Brevo errors for every way it can be wrong. An empty body
/// counts as `{}`, so that the missing fields are named.
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// The raw bytes, for idempotency fingerprints.
    pub raw: Bytes,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(body_too_large());
        }
        let raw = match axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(e) => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(s) = source {
                    if s.is::<http_body_util::LengthLimitError>() {
                        return Err(body_too_large());
                    }
                    source = s.source();
                }
                return Err(ApiError::bad_request(
                    ErrorCode::BadRequest,
                    format!("could not read the request body: {e}"),
                ));
            }
        };
        let value = parse_json(&raw)?;
        Ok(JsonBody { value, raw })
    }
}

/// Parses a JSON object, naming the offending field on a type error.
pub fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    let value = parse_json_object(raw)?;
    if holds_nul(raw) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidParameter,
            "a string of the request body holds the NUL character (\\u0000), which no field \
             may contain; remove it",
        ));
    }
    Ok(value)
}

/// Whether a valid JSON text holds a NUL character in a string. PostgreSQL cannot store
/// one, so no field may hold it on either backend. In JSON it can only be written
/// `\u0000`, and a backslash appears only in strings: the escape is real when an odd
/// number of backslashes leads to its `u`.
fn holds_nul(raw: &[u8]) -> bool {
    if !raw.contains(&b'\\') {
        return false;
    }
    raw.windows(5).enumerate().any(|(at, w)| {
        w == b"u0000" && raw[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
    })
}

/// The 413 for a body over [`MAX_BODY_BYTES`].
fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::OutOfRange,
        format!("request body is larger than {MAX_BODY_BYTES} bytes (1 MiB)"),
    )
}

/// Reads what the application left unread of a request body (up to [`MAX_BODY_BYTES`])
/// before its answer goes out.
///
/// hyper keeps a connection open after a response only when the request's body was read to
/// its end. A request refused before its body was needed (no API key, an unknown route or
/// method, a bad path or query) would otherwise close its connection, without a
/// `Connection: close` header, at times after the client had already sent its next request
/// on it. A body that cannot be read to its end (declared or found over the limit, or not
/// there within [`DRAIN_WAIT`]) is left alone and the answer says `Connection: close`.
/// So is the body of a request that sent `Expect: 100-continue`: its client waits for a
/// `100 Continue` before sending the body, and reading it would ask for an upload whose
/// answer is already known. Bodies the application reads, as every successful request
/// does, cost only the watch.
#[derive(Clone)]
pub struct DrainUnread<S>(pub S);

/// How long a refused request's remaining body is waited for.
pub const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl<S> tower::Service<Request> for DrainUnread<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<S::Future, Drained<S::Future>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use http_body::Body as _;
        if req.body().is_end_stream() {
            return futures::future::Either::Left(self.0.call(req));
        }
        // Not read, not drained: hyper then skips the `100 Continue` and closes.
        let leave_unread = req.body().size_hint().lower() > MAX_BODY_BYTES as u64
            || req
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let left = Arc::new(std::sync::Mutex::new(None));
        let req = req.map(|body| {
            axum::body::Body::new(Watched {
                body: Some(body),
                left: left.clone(),
            })
        });
        futures::future::Either::Right(Drained {
            answer: self.0.call(req),
            left,
            leave_unread,
            draining: None,
        })
    }
}

/// The answer of [`DrainUnread`]: the application's, once what it left unread of the
/// body is read.
pub struct Drained<F> {
    answer: F,
    left: Arc<std::sync::Mutex<Option<axum::body::Body>>>,
    /// What the application left of the body is not to be read (see [`DrainUnread`]).
    leave_unread: bool,
    /// Set once the answer is there and part of the body was left unread.
    draining: Option<futures::future::BoxFuture<'static, Response>>,
}

impl<F> std::future::Future for Drained<F>
where
    F: std::future::Future<Output = Result<Response, std::convert::Infallible>> + Unpin,
{
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(drain) = this.draining.as_mut() {
            return drain.as_mut().poll(cx).map(Ok);
        }
        let Poll::Ready(Ok(mut res)) = std::pin::Pin::new(&mut this.answer).poll(cx) else {
            return Poll::Pending;
        };
        let unread = this.left.lock().ok().and_then(|mut slot| slot.take());
        let Some(body) = unread else {
            return Poll::Ready(Ok(res));
        };
        if this.leave_unread {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Poll::Ready(Ok(res));
        }
        let mut drain: futures::future::BoxFuture<'static, Response> = Box::pin(async move {
            let read = tokio::time::timeout(
                DRAIN_WAIT,
                http_body_util::BodyExt::collect(http_body_util::Limited::new(
                    body,
                    MAX_BODY_BYTES,
                )),
            )
            .await;
            if !read.is_ok_and(|r| r.is_ok()) {
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            res
        });
        let poll = drain.as_mut().poll(cx);
        if poll.is_pending() {
            this.draining = Some(drain);
        }
        poll.map(Ok)
    }
}

/// A request body that, dropped before its end, hands what is left to [`DrainUnread`].
struct Watched {
    body: Option<axum::body::Body>,
    left: Arc<std::sync::Mutex<Option<axum::body::Body>>>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        match self.body.as_mut() {
            Some(body) => std::pin::Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        use http_body::Body as _;
        if let Some(body) = self.body.take().filter(|b| !b.is_end_stream()) {
            if let Ok(mut slot) = self.left.lock() {
                *slot = Some(body);
            }
        }
    }
}

/// Answers a request whose path or query holds `%00` (the NUL character) with a 400 before
/// routing: PostgreSQL cannot store or compare such a string, so no id, token or parameter
/// may hold one, on either backend.
#[derive(Clone)]
pub struct RejectNul<S>(pub S);

impl<S> tower::Service<Request> for RejectNul<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future =
        futures::future::Either<std::future::Ready<Result<Response, Self::Error>>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let uri = req.uri();
        if uri.path().contains("%00") || uri.query().is_some_and(|q| q.contains("%00")) {
            let e = ApiError::bad_request(
                ErrorCode::InvalidParameter,
                "the URL holds %00 (the NUL character), which no id, token or parameter may \
                 contain",
            );
            return futures::future::Either::Left(std::future::ready(Ok(e.into_response())));
        }
        futures::future::Either::Right(self.0.call(req))
    }
}

/// [`parse_json`] without the check for NUL characters.
fn parse_json_object<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if raw.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        raw
    };
    // serde's derived structs would also read an array positionally: refuse it up front.
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidParameter,
            "request body must be a JSON object",
        ));
    }
    // A valid body is parsed once, without tracking the path; only a failing one is parsed
    // again, with serde_path_to_error, to name the field in the error.
    if let Ok(value) = serde_json::from_slice(text) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if let Some(field) = duplicate_field(&inner) {
            return ApiError::bad_request(
                ErrorCode::DuplicateParameter,
                format!("{field} appears more than once in the request body; send it once"),
            );
        }
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => ApiError::bad_request(
                ErrorCode::InvalidParameter,
                format!("invalid value for {path}: {inner}"),
            ),
            serde_json::error::Category::Data => ApiError::bad_request(
                ErrorCode::InvalidParameter,
                format!("request body must be a JSON object: {inner}"),
            ),
            _ => ApiError::bad_request(
                ErrorCode::BadRequest,
                format!("request body is not valid JSON: {inner}"),
            ),
        }
    })?;
    de.end().map_err(|e| {
        ApiError::bad_request(
            ErrorCode::BadRequest,
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    Ok(value)
}

/// The field a body names twice (`{"text": "a", "text": "b"}`), from serde's error for it
/// (the derived structs refuse duplicates rather than keep either value).
fn duplicate_field(e: &serde_json::Error) -> Option<String> {
    let message = e.to_string();
    let rest = message.strip_prefix("duplicate field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// The optional `Idempotency-Key` header (switchboard extension).
pub struct IdempotencyKeyHeader(pub Option<String>);

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        idempotency_key(&parts.headers).map(IdempotencyKeyHeader)
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    // Two keys leave it unsaid which request this is a retry of.
    if headers.get_all("idempotency-key").iter().nth(1).is_some() {
        return Err(ApiError::bad_request(
            ErrorCode::DuplicateParameter,
            "Idempotency-Key is given more than once; send it once",
        ));
    }
    let invalid = || {
        ApiError::bad_request(
            ErrorCode::InvalidParameter,
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ),
        )
    };
    let key = value.to_str().map_err(|_| invalid())?.trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(invalid());
    }
    Ok(Some(key.to_owned()))
}

/// A JSON response from bytes already serialised (idempotent replays).
pub fn raw_json(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if body.is_empty() {
        return status.into_response();
    }
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Canonical JSON of a body (keys sorted at every level), so that a retry that
/// re-serialises the same object in another key order or spacing matches.
pub fn canonical_json(raw: &[u8]) -> String {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(v) => sort(v).to_string(),
        Err(_) => String::from_utf8_lossy(raw).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapses_double_slashes_and_keeps_query() {
        let req = Request::builder()
            .uri("/v3//conversations///messages?x=1")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(
            collapse_slashes(req).uri().to_string(),
            "/v3/conversations/messages?x=1"
        );
    }

    #[test]
    fn canonical_json_ignores_order_and_spacing() {
        assert_eq!(
            canonical_json(br#"{"b": 1, "a": {"d": 2, "c": 3}}"#),
            canonical_json(br#"{"a":{"c":3,"d":2},"b":1}"#)
        );
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct B {
            text: Option<String>,
        }
        let e = parse_json::<B>(br#"{"text": 5}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter);
        assert!(e.message.contains("text"), "{}", e.message);
        let e = parse_json::<B>(b"{\"text\": ").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse_json::<B>(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        assert!(parse_json::<B>(b"  ").is_ok());
    }

    #[test]
    fn a_nul_escape_is_found_only_where_it_is_one() {
        assert!(holds_nul(br#"{"text": "a\u0000b"}"#));
        assert!(
            holds_nul(br#"{"text": "a\\\u0000"}"#),
            "backslash, then NUL"
        );
        assert!(
            !holds_nul(br#"{"text": "a\\u0000b"}"#),
            "backslash, then the letters u0000"
        );
        assert!(!holds_nul(br#"{"text": "u0000", "n": "\n"}"#));
        assert!(!holds_nul(br#"{"text": "plain"}"#));
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct B {
            text: Option<String>,
        }
        let e = parse_json::<B>(br#"{"text": "a\u0000b"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter);
        assert!(e.message.contains("NUL"), "{}", e.message);
        // A malformed body is named as such first.
        let e = parse_json::<B>(br#"{"text": "\u0000"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }
}

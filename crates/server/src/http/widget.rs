//! The visitor API for a chat widget (switchboard extension): `/widget/v1/{widgetId}/...`,
//! authenticated by the widget id plus a visitor token, never by an `api-key`.

use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use switchboard_wire::{
    ConversationsMessage, ErrorBody, ErrorCode, MessagePage, ReadRequest, SessionRequest,
    SessionResponse, VisitorMessageRequest,
};

use super::v3::{query_error, to_wire, PageQuery};
use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::domain::{PageRequest, SessionStart, Text, VisitorAuth, VisitorId};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/widget/v1/{widget_id}/session", post(start_session))
        .route(
            "/widget/v1/{widget_id}/messages",
            get(list_messages).post(send_message),
        )
        .route("/widget/v1/{widget_id}/read", post(mark_read))
        .route("/widget/v1/{widget_id}/ws", get(socket))
}

/// The widget id of the path.
pub(super) struct WidgetPath(String);

impl<S: Send + Sync> FromRequestParts<S> for WidgetPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(WidgetPath(id)),
            Err(_) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::DocumentNotFound,
                "Widget does not exist: check the widget id",
            )),
        }
    }
}

/// The visitor of a `Authorization: Bearer <token>` header (or, for WebSockets, which
/// browsers cannot give headers, a `token` query parameter).
pub(super) struct Visitor(VisitorAuth);

impl FromRequestParts<AppState> for Visitor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let WidgetPath(widget) = WidgetPath::from_request_parts(parts, state).await?;
        let header_token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::to_owned);
        let token = header_token.or_else(|| {
            Query::<TokenQuery>::try_from_uri(&parts.uri)
                .ok()
                .and_then(|q| q.0.token)
        });
        let who = state
            .domain
            .authenticate_visitor(&widget, token.as_deref())
            .await?;
        Ok(Visitor(who))
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The client's address, for limits on new sessions: the peer, or behind a trusted proxy
/// the address it appended last to `X-Forwarded-For`.
fn client_addr(
    extensions: &axum::http::Extensions,
    headers: &axum::http::HeaderMap,
    trust_proxy: bool,
) -> String {
    if trust_proxy {
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| !v.is_empty());
        if let Some(addr) = forwarded {
            return addr.to_owned();
        }
    }
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Starts or resumes a visitor session (switchboard visitor API).
#[utoipa::path(
    post,
    path = "/widget/v1/{widgetId}/session",
    tag = "Widget",
    summary = "Start or resume a visitor session",
    description = "With no token and no visitorId, makes a new visitor with a random 32-character id. With token, resumes that visitor. With visitorId, binds a site's own user id, which needs visitorHash: the lowercase hex HMAC-SHA256 of the visitorId keyed by the account's identity key (switchboard accounts widget). Stores the visitor attributes given.",
    params(("widgetId" = String, Path, description = "The account's public widget id")),
    request_body = SessionRequest,
    responses(
        (status = 200, description = "The session", body = SessionResponse),
        (status = 401, description = "Bad token or identity hash", body = ErrorBody),
        (status = 404, description = "Unknown widget", body = ErrorBody),
        (status = 429, description = "Too many new sessions from this address", body = ErrorBody),
    )
)]
pub(super) async fn start_session(
    State(state): State<AppState>,
    WidgetPath(widget): WidgetPath,
    extensions: axum::http::Extensions,
    headers: axum::http::HeaderMap,
    body: JsonBody<SessionRequest>,
) -> ApiResult<Json<SessionResponse>> {
    let b = body.value;
    let start = SessionStart {
        token: b.token,
        visitor_id: b.visitor_id,
        visitor_hash: b.visitor_hash,
        name: b.name,
        email: b.email,
        browser_language: b.browser_language,
        page_url: b.page_url,
        page_title: b.page_title,
        attributes: b.attributes,
    };
    let session = state
        .domain
        .start_session(
            &widget,
            start,
            &client_addr(&extensions, &headers, state.trust_proxy),
        )
        .await?;
    Ok(Json(SessionResponse {
        visitor_id: session.visitor.id,
        conversation_id: session.visitor.conversation_id,
        token: session.token,
    }))
}

/// The visitor's messages, a page at a time.
#[utoipa::path(
    get,
    path = "/widget/v1/{widgetId}/messages",
    tag = "Widget",
    summary = "Read the visitor's messages",
    params(("widgetId" = String, Path, description = "The account's public widget id"), PageQuery),
    responses(
        (status = 200, description = "A page of messages, oldest first", body = MessagePage),
        (status = 401, description = "Missing or bad visitor token", body = ErrorBody),
    ),
    security(("visitor-token" = []))
)]
pub(super) async fn list_messages(
    State(state): State<AppState>,
    Visitor(who): Visitor,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<MessagePage>> {
    let Query(q) = query.map_err(query_error)?;
    let page = PageRequest::parse(q.before, q.after, q.limit)?;
    let visitor = VisitorId::parse(Some(who.visitor_id.clone()))?;
    let (rows, has_more) = state
        .domain
        .list_visitor_messages(&who.account_id, &visitor, page)
        .await?;
    Ok(Json(MessagePage {
        messages: rows.iter().map(to_wire).collect(),
        has_more,
    }))
}

/// Sends a message as the visitor.
#[utoipa::path(
    post,
    path = "/widget/v1/{widgetId}/messages",
    tag = "Widget",
    summary = "Send a message as the visitor",
    description = "The message is isMissed when no agent of the account is online. Rate limited per visitor (429 with Retry-After).",
    params(("widgetId" = String, Path, description = "The account's public widget id")),
    request_body = VisitorMessageRequest,
    responses(
        (status = 200, description = "The new message", body = ConversationsMessage),
        (status = 400, description = "Missing or too long text", body = ErrorBody),
        (status = 401, description = "Missing or bad visitor token", body = ErrorBody),
        (status = 429, description = "Too many messages; see Retry-After", body = ErrorBody),
    ),
    security(("visitor-token" = []))
)]
pub(super) async fn send_message(
    State(state): State<AppState>,
    Visitor(who): Visitor,
    body: JsonBody<VisitorMessageRequest>,
) -> ApiResult<Json<ConversationsMessage>> {
    let b = body.value;
    let text = Text::parse(b.text)?;
    let m = state
        .domain
        .visitor_message(&who, text, b.page_url, b.page_title)
        .await?;
    Ok(Json(to_wire(&m)))
}

/// Marks the agent messages up to one as read.
#[utoipa::path(
    post,
    path = "/widget/v1/{widgetId}/read",
    tag = "Widget",
    summary = "Mark agent messages read",
    description = "Every agent message up to and including messageId is read. Agent messages never read in a chat that ends become isMissedByVisitor.",
    params(("widgetId" = String, Path, description = "The account's public widget id")),
    request_body = ReadRequest,
    responses(
        (status = 204, description = "Recorded"),
        (status = 401, description = "Missing or bad visitor token", body = ErrorBody),
        (status = 404, description = "No such message in this conversation", body = ErrorBody),
    ),
    security(("visitor-token" = []))
)]
pub(super) async fn mark_read(
    State(state): State<AppState>,
    Visitor(who): Visitor,
    body: JsonBody<ReadRequest>,
) -> ApiResult<StatusCode> {
    state
        .domain
        .visitor_read(&who, body.value.message_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resume point of a socket.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SocketQuery {
    /// The visitor token (browsers cannot set headers on a WebSocket).
    #[allow(dead_code)]
    token: Option<String>,
    /// Replay what happened after this message (the last one the client saw).
    after: Option<String>,
    /// Replay what happened after this cursor (of the last frame the client saw).
    cursor: Option<i64>,
}

/// The visitor's live stream.
#[utoipa::path(
    get,
    path = "/widget/v1/{widgetId}/ws",
    tag = "Widget",
    summary = "The visitor's live stream (WebSocket)",
    description = "Frames are JSON StreamEvents: messageCreated, messageUpdated, messageDeleted, then ready once the replay (after= or cursor=) is done, and pong. The client may send {\"type\":\"ping\"}. A client too slow to read is closed with 1008.",
    params(("widgetId" = String, Path, description = "The account's public widget id"), SocketQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 401, description = "Missing or bad visitor token", body = ErrorBody),
        (status = 426, description = "Not a WebSocket request", body = ErrorBody),
    )
)]
pub(super) async fn socket(
    State(state): State<AppState>,
    Visitor(who): Visitor,
    query: Result<Query<SocketQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(query_error)?;
    let resume = match (q.after.filter(|a| !a.is_empty()), q.cursor) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidParameter,
                "give after or cursor, not both",
            ))
        }
        (Some(id), None) => Some(
            state
                .domain
                .cursor_of_message(&who.account_id, &who.visitor_id, &id)
                .await?,
        ),
        (None, Some(c)) if c < 0 => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidParameter,
                "cursor must not be negative",
            ))
        }
        (None, c) => c,
    };
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadRequest,
            format!("this endpoint is a WebSocket: {}", e.body_text()),
        )
    })?;
    Ok(upgrade
        .max_message_size(64 * 1024)
        // tungstenite zero-fills its whole read buffer up front; axum's default (128 KiB)
        // made an idle socket cost ~130 KiB. 4 KiB still grows for a larger frame.
        .read_buffer_size(4 * 1024)
        .on_upgrade(move |ws| super::streams::visitor_socket(ws, state, who, resume))
        .into_response())
}

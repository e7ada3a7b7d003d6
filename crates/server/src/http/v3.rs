//! Brevo's Conversations API under `/v3`: paths, methods and statuses exactly as Brevo has them.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use serde::Deserialize;
use switchboard_wire::{
    AgentOnlinePingRequest, ConversationsMessage, ErrorBody, ErrorCode, MessagePage, MessageType,
    PushMessageRequest, SendMessageRequest, UpdateMessageRequest, VisitorGroupRequest,
    VisitorGroupResponse,
};

use super::{
    canonical_json, raw_json, ApiResult, AppState, Auth, IdPath, IdempotencyKeyHeader, JsonBody,
};
use crate::domain::{
    html_of, parse_mark, AgentMessage, AgentRef, Idem, IdempotencyKey, Outcome, PageRequest,
    PushedMessage, Text, VisitorId,
};
use crate::ids;
use crate::store::{MessageRow, StoredResponse};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v3/conversations/agentOnlinePing", post(agent_online_ping))
        .route("/v3/conversations/messages", post(send_message))
        .route(
            "/v3/conversations/messages/{id}",
            axum::routing::get(get_message)
                .put(edit_message)
                .delete(delete_message),
        )
        .route("/v3/conversations/pushedMessages", post(push_message))
        .route(
            "/v3/conversations/pushedMessages/{id}",
            axum::routing::get(get_pushed)
                .put(edit_pushed)
                .delete(delete_pushed),
        )
        .route("/v3/conversations/visitorGroup", put(visitor_group))
        .route(
            "/v3/conversations/visitors/{visitorId}/messages",
            axum::routing::get(list_visitor_messages),
        )
        .route("/v3/conversations/events", axum::routing::get(events))
}

/// A stored message's `type` (the table's CHECK allows only these two).
fn message_type(m: &MessageRow) -> MessageType {
    if m.kind == "visitor" {
        MessageType::Visitor
    } else {
        MessageType::Agent
    }
}

/// The wire form of a stored message.
pub fn to_wire(m: &MessageRow) -> ConversationsMessage {
    ConversationsMessage {
        id: m.id.clone(),
        kind: message_type(m),
        html: html_of(&m.text).into_owned(),
        text: m.text.clone(),
        visitor_id: m.visitor_id.clone(),
        agent_id: m.agent_id.clone(),
        agent_name: m.agent_name.clone(),
        agent_userpic: m.agent_userpic.clone(),
        created_at: m.created_at,
        is_pushed: m.is_pushed,
        is_missed: m.is_missed,
        is_missed_by_visitor: m.is_missed_by_visitor,
        is_trigger: m.is_trigger,
        received_from: m.received_from.clone(),
    }
}

/// A message's JSON: the bytes `serde_json` writes for [`ConversationsMessage`] (a test
/// holds them equal), written directly. Every POST and GET answers one, and through serde
/// every field name went through the string escaper too: measured with callgrind, this
/// takes about 40% of the instructions.
fn message_bytes(m: &MessageRow) -> Vec<u8> {
    let html = html_of(&m.text);
    // Field names and fixed values take about 250 bytes.
    let mut out = Vec::with_capacity(
        256 + m.id.len()
            + m.text.len()
            + html.len()
            + m.visitor_id.len()
            + m.agent_id.as_ref().map_or(0, String::len)
            + m.agent_name.as_ref().map_or(0, String::len)
            + m.agent_userpic.as_ref().map_or(0, String::len)
            + m.received_from.as_ref().map_or(0, String::len),
    );
    out.extend_from_slice(b"{\"id\":");
    json_str(&mut out, &m.id);
    out.extend_from_slice(match message_type(m) {
        MessageType::Agent => b",\"type\":\"agent\",\"text\":".as_slice(),
        MessageType::Visitor => b",\"type\":\"visitor\",\"text\":".as_slice(),
    });
    json_str(&mut out, &m.text);
    out.extend_from_slice(b",\"html\":");
    json_str(&mut out, &html);
    out.extend_from_slice(b",\"visitorId\":");
    json_str(&mut out, &m.visitor_id);
    for (name, value) in [
        (b",\"agentId\":".as_slice(), &m.agent_id),
        (b",\"agentName\":".as_slice(), &m.agent_name),
        (b",\"agentUserpic\":".as_slice(), &m.agent_userpic),
    ] {
        if let Some(v) = value {
            out.extend_from_slice(name);
            json_str(&mut out, v);
        }
    }
    out.extend_from_slice(b",\"createdAt\":");
    out.extend_from_slice(itoa::Buffer::new().format(m.created_at).as_bytes());
    for (name, value) in [
        (b",\"isPushed\":".as_slice(), m.is_pushed),
        (b",\"isMissed\":".as_slice(), m.is_missed),
        (
            b",\"isMissedByVisitor\":".as_slice(),
            m.is_missed_by_visitor,
        ),
        (b",\"isTrigger\":".as_slice(), m.is_trigger),
    ] {
        out.extend_from_slice(name);
        out.extend_from_slice(if value { b"true" } else { b"false" });
    }
    if let Some(v) = &m.received_from {
        out.extend_from_slice(b",\"receivedFrom\":");
        json_str(&mut out, v);
    }
    out.push(b'}');
    out
}

/// A JSON string as `serde_json` writes it: copied as it is when nothing in it needs an
/// escape (ids, names and most texts), else through `serde_json`'s escaper.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // A fold rather than `all`: without the early exit the compiler vectorises the check
    // (SSE compares of 16 bytes), and strings that need an escape are rare.
    let plain = !s.bytes().fold(false, |esc, b| {
        esc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// A message as the response body: `200` with [`ConversationsMessage`]'s JSON.
pub(super) struct MessageJson<M = MessageRow>(M);

impl<M: std::borrow::Borrow<MessageRow>> IntoResponse for MessageJson<M> {
    fn into_response(self) -> Response {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            message_bytes(self.0.borrow()),
        )
            .into_response()
    }
}

fn render(m: &MessageRow) -> StoredResponse {
    StoredResponse {
        status: 200,
        body: String::from_utf8(message_bytes(m)).unwrap_or_default(),
    }
}

fn fingerprint(method: &str, path: &str, raw: &[u8]) -> String {
    let mut material = format!("{method} {path}\n").into_bytes();
    material.extend_from_slice(canonical_json(raw).as_bytes());
    ids::sha256_hex(&material)
}

fn message_response(outcome: Outcome<std::sync::Arc<MessageRow>>) -> Response {
    match outcome {
        Outcome::Fresh(m) => MessageJson(m).into_response(),
        Outcome::Replayed(r) => raw_json(r.status, r.body),
    }
}

const IDEMPOTENCY_DOC: &str = "switchboard extension: a retry with the same key and body within 24 hours returns the first response and writes nothing; the same key with another body is refused with 400 duplicate_request, and two keys on one request with 400 duplicate_parameter.";

/// Sets an agent's status to online for the presence window (150 s by default).
#[utoipa::path(
    post,
    path = "/v3/conversations/agentOnlinePing",
    tag = "Conversations",
    summary = "Sets agent's status to online for 2-3 minutes",
    description = "Marks the agent online for the presence window (default 150 s). Ping every minute while the agent is to be considered online. The agent is named by agentId, or by agentEmail (with agentName to create an agent that does not exist yet). Pushed messages prefer online agents.",
    request_body = AgentOnlinePingRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC)),
    responses(
        (status = 201, description = "The agent is online. The body is empty."),
        (status = 400, description = "Missing or invalid agent", body = ErrorBody),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn agent_online_ping(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    body: JsonBody<AgentOnlinePingRequest>,
) -> ApiResult<Response> {
    let b = body.value;
    let agent = AgentRef::parse(b.agent_id, b.agent_email, b.agent_name)?;
    let idem = key.map(|key| IdempotencyKey {
        fingerprint: fingerprint("POST", "agentOnlinePing", &body.raw),
        key,
    });
    match state
        .domain
        .agent_online_ping(&account, &agent, idem)
        .await?
    {
        Outcome::Fresh(()) => Ok(StatusCode::CREATED.into_response()),
        Outcome::Replayed(r) => Ok(raw_json(r.status, r.body)),
    }
}

/// Sends a message to a visitor on behalf of an agent.
#[utoipa::path(
    post,
    path = "/v3/conversations/messages",
    tag = "Conversations",
    summary = "Send a message as an agent",
    description = "Writes a message from an agent to a visitor. The visitor and its conversation come into being with the first message. Name the agent by agentId, or by agentEmail; an unknown agentEmail with agentName creates that agent (Brevo's dummy agent). receivedFrom marks the message so a two-way integration can recognise its own echoes.",
    request_body = SendMessageRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC)),
    responses(
        (status = 200, description = "The new message", body = ConversationsMessage),
        (status = 400, description = "Missing or invalid field", body = ErrorBody),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn send_message(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    body: JsonBody<SendMessageRequest>,
) -> ApiResult<Response> {
    let b = body.value;
    let input = AgentMessage {
        visitor_id: VisitorId::parse(b.visitor_id)?,
        text: Text::parse(b.text)?,
        agent: AgentRef::parse(b.agent_id, b.agent_email, b.agent_name)?,
        received_from: parse_mark("receivedFrom", b.received_from)?,
    };
    let idem = key.map(|key| Idem {
        key: IdempotencyKey {
            fingerprint: fingerprint("POST", "messages", &body.raw),
            key,
        },
        render: &render,
    });
    let outcome = state
        .domain
        .send_agent_message(&account, input, idem)
        .await?;
    Ok(message_response(outcome))
}

/// Sends an automated message to a visitor.
#[utoipa::path(
    post,
    path = "/v3/conversations/pushedMessages",
    tag = "Conversations",
    summary = "Send an automated message to a visitor",
    description = "Writes a pushed message (isPushed: true). The sender is agentId when given; else an agent of groupId, an online one first; else any agent of the account, an online one first. Pushed messages do not start a chat.",
    request_body = PushMessageRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC)),
    responses(
        (status = 200, description = "The new message", body = ConversationsMessage),
        (status = 400, description = "Missing or invalid field, or no agent to send as", body = ErrorBody),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn push_message(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    body: JsonBody<PushMessageRequest>,
) -> ApiResult<Response> {
    let b = body.value;
    let input = PushedMessage {
        visitor_id: VisitorId::parse(b.visitor_id)?,
        text: Text::parse(b.text)?,
        agent_id: b.agent_id.filter(|s| !s.trim().is_empty()),
        group_id: b.group_id.filter(|s| !s.trim().is_empty()),
    };
    let idem = key.map(|key| Idem {
        key: IdempotencyKey {
            fingerprint: fingerprint("POST", "pushedMessages", &body.raw),
            key,
        },
        render: &render,
    });
    let outcome = state.domain.push_message(&account, input, idem).await?;
    Ok(message_response(outcome))
}

/// Gets a message (not a pushed one).
#[utoipa::path(
    get,
    path = "/v3/conversations/messages/{id}",
    tag = "Conversations",
    summary = "Get a message",
    params(("id" = String, Path, description = "ID of the message")),
    responses(
        (status = 200, description = "The message", body = ConversationsMessage),
        (status = 404, description = "No such message in this account (pushed messages live under /pushedMessages)", body = ErrorBody),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn get_message(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(id): IdPath,
) -> ApiResult<MessageJson> {
    let m = state.domain.get_message(&account, &id, false).await?;
    Ok(MessageJson(m))
}

/// Edits an agent's message.
#[utoipa::path(
    put,
    path = "/v3/conversations/messages/{id}",
    tag = "Conversations",
    summary = "Update a message sent by an agent",
    description = "Only agents' messages can be edited; a visitor's message gives 400 permission_denied. id and createdAt stay.",
    params(("id" = String, Path, description = "ID of the message")),
    request_body = UpdateMessageRequest,
    responses(
        (status = 200, description = "The edited message", body = ConversationsMessage),
        (status = 400, description = "Missing text, or a visitor's message", body = ErrorBody),
        (status = 404, description = "No such message", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn edit_message(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(id): IdPath,
    body: JsonBody<UpdateMessageRequest>,
) -> ApiResult<MessageJson> {
    edit(state, account, id, false, body.value).await
}

/// Deletes an agent's message.
#[utoipa::path(
    delete,
    path = "/v3/conversations/messages/{id}",
    tag = "Conversations",
    summary = "Delete a message sent by an agent",
    description = "Only agents' messages can be deleted; a visitor's message gives 400 permission_denied. A deleted message is gone for every later call.",
    params(("id" = String, Path, description = "ID of the message")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A visitor's message", body = ErrorBody),
        (status = 404, description = "No such message", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn delete_message(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(id): IdPath,
) -> ApiResult<StatusCode> {
    state.domain.delete_message(&account, &id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Gets a pushed message.
#[utoipa::path(
    get,
    path = "/v3/conversations/pushedMessages/{id}",
    tag = "Conversations",
    summary = "Get an automated message",
    params(("id" = String, Path, description = "ID of the message sent previously")),
    responses(
        (status = 200, description = "The message", body = ConversationsMessage),
        (status = 404, description = "No such pushed message in this account", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn get_pushed(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(id): IdPath,
) -> ApiResult<MessageJson> {
    let m = state.domain.get_message(&account, &id, true).await?;
    Ok(MessageJson(m))
}

/// Edits a pushed message.
#[utoipa::path(
    put,
    path = "/v3/conversations/pushedMessages/{id}",
    tag = "Conversations",
    summary = "Update an automated message",
    params(("id" = String, Path, description = "ID of the message")),
    request_body = UpdateMessageRequest,
    responses(
        (status = 200, description = "The edited message", body = ConversationsMessage),
        (status = 400, description = "Missing text", body = ErrorBody),
        (status = 404, description = "No such pushed message", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn edit_pushed(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(id): IdPath,
    body: JsonBody<UpdateMessageRequest>,
) -> ApiResult<MessageJson> {
    edit(state, account, id, true, body.value).await
}

/// Deletes a pushed message.
#[utoipa::path(
    delete,
    path = "/v3/conversations/pushedMessages/{id}",
    tag = "Conversations",
    summary = "Delete an automated message",
    params(("id" = String, Path, description = "ID of the message")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such pushed message", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn delete_pushed(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(id): IdPath,
) -> ApiResult<StatusCode> {
    state.domain.delete_message(&account, &id, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn edit(
    state: AppState,
    account: String,
    id: String,
    pushed: bool,
    body: UpdateMessageRequest,
) -> ApiResult<MessageJson> {
    let text = Text::parse(body.text)?;
    let m = state
        .domain
        .edit_message(&account, &id, pushed, text)
        .await?;
    Ok(MessageJson(m))
}

/// Query string of `PUT /visitorGroup`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub(super) struct VisitorGroupQuery {
    /// The visitor, when the body does not name it (Brevo's spec and SDKs send only groupId).
    visitor_id: Option<String>,
}

/// Assigns a visitor to a group, or removes it from its group.
#[utoipa::path(
    put,
    path = "/v3/conversations/visitorGroup",
    tag = "Conversations",
    summary = "Set visitor group assignment",
    description = "groupId assigns the visitor to that group; null or \"\" removes it from its group. Brevo's spec omits the visitor: switchboard takes visitorId from the body or from the visitorId query parameter (the body wins).",
    params(VisitorGroupQuery),
    request_body = VisitorGroupRequest,
    responses(
        (status = 200, description = "The assignment", body = VisitorGroupResponse),
        (status = 400, description = "visitorId or groupId missing, or an unknown group", body = ErrorBody),
        (status = 404, description = "The visitor is not found", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn visitor_group(
    State(state): State<AppState>,
    Auth(account): Auth,
    query: Result<Query<VisitorGroupQuery>, axum::extract::rejection::QueryRejection>,
    body: JsonBody<VisitorGroupRequest>,
) -> ApiResult<Json<VisitorGroupResponse>> {
    let Query(q) = query.map_err(query_error)?;
    let from_query = q.visitor_id;
    let b = body.value;
    let visitor = b
        .visitor_id
        .filter(|v| !v.trim().is_empty())
        .or(from_query.filter(|v| !v.trim().is_empty()));
    let Some(visitor) = visitor else {
        return Err(crate::domain::DomainError::Missing(
            "visitorId is required: pass it in the body or as the visitorId query parameter".into(),
        )
        .into());
    };
    let visitor = VisitorId::parse(Some(visitor))?;
    let group = match b.group_id {
        None => {
            return Err(crate::domain::DomainError::Missing(
                "groupId is required: a group id, or null to remove the visitor from its group"
                    .into(),
            )
            .into())
        }
        Some(g) => g.filter(|g| !g.trim().is_empty()),
    };
    state
        .domain
        .set_visitor_group(&account, &visitor, group.as_deref())
        .await?;
    Ok(Json(VisitorGroupResponse {
        visitor_id: visitor.as_str().to_owned(),
        group_id: group,
    }))
}

/// Query string of the visitor message listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// How many messages, 1 to 100 (default 50).
    pub(crate) limit: Option<u32>,
    /// Only messages written before the message with this id (to page backwards).
    pub(crate) before: Option<String>,
    /// Only messages written after the message with this id (to page forwards or catch up).
    pub(crate) after: Option<String>,
}

/// Lists a visitor's messages, a page at a time (switchboard extension).
#[utoipa::path(
    get,
    path = "/v3/conversations/visitors/{visitorId}/messages",
    tag = "Extensions",
    summary = "List a visitor's messages",
    description = "switchboard extension (Brevo has no such call). The visitor's live messages, agents' (pushed ones included) and the visitor's own, oldest first. Without a cursor: the newest `limit` messages. `before=<message id>` pages backwards, `after=<message id>` forwards; hasMore tells whether more lie in that direction. A deleted message's id still works as a cursor.",
    params(("visitorId" = String, Path, description = "The visitor"), PageQuery),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 404, description = "No such visitor in this account", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn list_visitor_messages(
    State(state): State<AppState>,
    Auth(account): Auth,
    IdPath(visitor): IdPath,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<MessagePage>> {
    let Query(q) = query.map_err(query_error)?;
    let visitor = VisitorId::parse(Some(visitor))?;
    let page = PageRequest::parse(q.before, q.after, q.limit)?;
    let (rows, has_more) = state
        .domain
        .list_visitor_messages(&account, &visitor, page)
        .await?;
    Ok(Json(MessagePage {
        messages: rows.iter().map(to_wire).collect(),
        has_more,
    }))
}

/// A query string that does not parse: 400 in Brevo's body, naming the problem.
pub(crate) fn query_error(e: axum::extract::rejection::QueryRejection) -> super::ApiError {
    super::ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidParameter,
        format!("invalid query string: {}", e.body_text()),
    )
}

/// Resume point of the event stream.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// Replay the events after this cursor (same as the `Last-Event-ID` header).
    after: Option<i64>,
}

/// The account's events, live (switchboard extension, Server-Sent Events).
#[utoipa::path(
    get,
    path = "/v3/conversations/events",
    tag = "Extensions",
    summary = "Stream the account's events (switchboard extension)",
    description = "Server-Sent Events: messageCreated, messageUpdated, messageDeleted, conversationStarted, conversationEnded. Each event's id is its cursor; reconnect with Last-Event-ID (or ?after=) to get what was missed, without gaps or repeats. The data is a StreamEvent.",
    params(EventsQuery, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this cursor")),
    responses(
        (status = 200, description = "text/event-stream of StreamEvent", body = switchboard_wire::StreamEvent, content_type = "text/event-stream"),
        (status = 401, description = "Missing or unknown api-key", body = ErrorBody),
    ),
    security(("api-key" = []))
)]
pub(super) async fn events(
    State(state): State<AppState>,
    Auth(account): Auth,
    headers: axum::http::HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(query_error)?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|c| *c >= 0)
                .ok_or_else(|| {
                    super::ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidParameter,
                        "Last-Event-ID must be a cursor (a non-negative integer) from this stream",
                    )
                })?,
        ),
        None => None,
    };
    if q.after.is_some_and(|a| a < 0) {
        return Err(super::ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidParameter,
            "after must be a non-negative cursor",
        ));
    }
    let resume = last_event_id.or(q.after);
    let sse = super::streams::account_events(state, account, resume).await?;
    Ok(sse.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> MessageRow {
        MessageRow {
            seq: 7,
            id: "eYBEm3gq3zc5ayE2g".into(),
            account_id: "acc".into(),
            conversation_id: "conv".into(),
            visitor_id: "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg".into(),
            kind: "agent".into(),
            text: "Hi <b>\"there\"</b>\nnew line, é ✓".into(),
            agent_id: Some("d9nKoegKSjmCtyK78".into()),
            agent_name: Some("Liz".into()),
            agent_userpic: Some("https://example.com/liz.png".into()),
            is_pushed: true,
            is_missed: false,
            is_missed_by_visitor: true,
            is_trigger: false,
            received_from: Some("crm".into()),
            created_at: 1_482_512_803_740,
            updated_at: 1_482_512_803_741,
            deleted_at: None,
        }
    }

    /// The borrowed form writes the very bytes of the owned wire type, with and without
    /// the optional fields.
    #[test]
    fn borrowed_message_json_is_the_wire_types_json() {
        let full = row();
        let bare = MessageRow {
            kind: "visitor".into(),
            agent_id: None,
            agent_name: None,
            agent_userpic: None,
            received_from: None,
            ..row()
        };
        let mut rows = vec![full, bare];
        // Every kind of character serde_json escapes, and some it does not.
        for text in [
            "",
            "plain",
            "quote \" backslash \\ slash / tab \t nul \u{0} bell \u{7} del \u{7f}",
            "\r\n and \n and \r, é ✓ 😀 </script>",
            "\u{1f}\u{20}",
        ] {
            rows.push(MessageRow {
                text: text.into(),
                agent_name: Some(text.into()),
                received_from: Some(format!("{text}!")),
                visitor_id: format!("v{text}"),
                created_at: -1,
                ..row()
            });
        }
        for m in rows {
            let owned = serde_json::to_vec(&to_wire(&m)).unwrap();
            assert_eq!(
                String::from_utf8(message_bytes(&m)).unwrap(),
                String::from_utf8(owned).unwrap()
            );
        }
    }
}

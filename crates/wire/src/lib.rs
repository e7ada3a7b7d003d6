//! Wire types of the Brevo Conversations API as switchboard speaks it.
//!
//! Both the server and the Rust SDK use these types, so the two cannot disagree about the
//! JSON. Field names are camelCase as in Brevo's spec; optional fields that have no value are
//! left out of the JSON (never `null`), because the strictest official SDKs reject nulls.
//!
//! Request bodies are permissive on input (every field is optional at the type level) so the
//! server can answer a missing field with a Brevo error body that names it, instead of a
//! generic deserialisation failure.
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// Written by an agent (or on an agent's behalf by an integration).
    Agent,
    /// Written by the website visitor.
    Visitor,
}

impl MessageType {
    /// The JSON spelling, `agent` or `visitor`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Agent => "agent",
            MessageType::Visitor => "visitor",
        }
    }
}

/// A Conversations message, as `GET /v3/conversations/messages/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConversationsMessage {
    /// Message id: 17 characters from an unambiguous alphabet, e.g. `eYBEm3gq3zc5ayE2g`.
    pub id: String,
    /// `agent` for agents' messages, `visitor` for visitors' messages.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// Message text.
    #[serde(default)]
    pub text: String,
    /// The text, HTML-escaped, with newlines as `<br>`.
    #[serde(default)]
    pub html: String,
    /// The visitor this message was written to or by.
    #[serde(default)]
    pub visitor_id: String,
    /// The agent on whose behalf the message was sent (agents' messages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The agent's name as displayed to the visitor (agents' messages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    /// The agent's picture URL, only when the agent has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_userpic: Option<String>,
    /// Creation time in milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_at: i64,
    /// `true` for pushed (automated) messages.
    #[serde(default)]
    pub is_pushed: bool,
    /// `true` for visitor messages sent while no agent was online.
    #[serde(default)]
    pub is_missed: bool,
    /// `true` for agents' messages the visitor never read in a finished chat.
    #[serde(default)]
    pub is_missed_by_visitor: bool,
    /// `true` for automatic (trigger) messages.
    #[serde(default)]
    pub is_trigger: bool,
    /// The mark an integration gave the message, to recognise its own echoes in webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_from: Option<String>,
}

/// Body of `POST /v3/conversations/messages`: send a message as an agent.
///
/// Name the agent with `agent_id`, or with `agent_email` (plus `agent_name` when the
/// email is new: switchboard then creates that agent, as Brevo creates a "dummy agent").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SendMessageRequest {
    /// The visitor to write to (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_id: Option<String>,
    /// The message text (required, 1 to 100,000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The agent sending the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The agent's email, instead of `agentId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_email: Option<String>,
    /// The agent's display name (creates the agent when `agentEmail` is unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    /// A mark for the message, echoed in responses and webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_from: Option<String>,
}

/// Body of `PUT /v3/conversations/messages/{id}` and `PUT .../pushedMessages/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UpdateMessageRequest {
    /// The new text (required, 1 to 100,000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Body of `POST /v3/conversations/pushedMessages`: an automated message to a visitor.
///
/// The sender is `agent_id` when given; otherwise an agent of `group_id` (an online one
/// first); otherwise any agent of the account (an online one first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PushMessageRequest {
    /// The visitor to write to (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_id: Option<String>,
    /// The message text (required, 1 to 100,000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Send on behalf of this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Send on behalf of an agent of this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

/// Body of `POST /v3/conversations/agentOnlinePing`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentOnlinePingRequest {
    /// The agent to mark online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The agent's email, instead of `agentId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_email: Option<String>,
    /// The agent's display name (creates the agent when `agentEmail` is unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    /// A mark of the calling integration (accepted for Brevo compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_from: Option<String>,
}

/// Body of `PUT /v3/conversations/visitorGroup`.
///
/// Brevo's spec names only `groupId`; switchboard also takes `visitorId` here (or from the
/// `visitorId` query parameter). `groupId: null` or `""` removes the visitor from its group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct VisitorGroupRequest {
    /// The visitor to (re)assign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_id: Option<String>,
    /// Absent: not given. `Some(None)`: an explicit `null`, which removes the visitor from
    /// its group. `Some(Some(id))`: assign to that group.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub group_id: Option<Option<String>>,
}

impl VisitorGroupRequest {
    /// Assign `visitor_id` to `group_id`.
    pub fn assign(visitor_id: impl Into<String>, group_id: impl Into<String>) -> Self {
        Self {
            visitor_id: Some(visitor_id.into()),
            group_id: Some(Some(group_id.into())),
        }
    }

    /// Remove `visitor_id` from its group (sends `groupId: null`).
    pub fn remove(visitor_id: impl Into<String>) -> Self {
        Self {
            visitor_id: Some(visitor_id.into()),
            group_id: Some(None),
        }
    }
}

/// Answer of `PUT /v3/conversations/visitorGroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct VisitorGroupResponse {
    /// The visitor.
    pub visitor_id: String,
    /// The group the visitor now belongs to; absent when it belongs to none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

/// The error codes switchboard answers with: the subset of Brevo's list that every
/// official SDK accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field has a wrong type or value.
    InvalidParameter,
    /// A required field is missing or empty.
    MissingParameter,
    /// A value is too large (or too small).
    OutOfRange,
    /// The object does not exist (or belongs to another account).
    DocumentNotFound,
    /// The operation is not allowed on this object.
    PermissionDenied,
    /// A value that must be unique is already taken.
    DuplicateParameter,
    /// An `Idempotency-Key` was reused with another request.
    DuplicateRequest,
    /// The HTTP method is not allowed on this path.
    MethodNotAllowed,
    /// The `api-key` is missing or unknown.
    Unauthorized,
    /// The request cannot be answered in an acceptable form.
    NotAcceptable,
    /// The request is malformed.
    BadRequest,
    /// Too many requests: wait for `Retry-After` seconds (visitor API only; `/v3` is
    /// not rate limited).
    TooManyRequests,
}

impl ErrorCode {
    /// The JSON spelling of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::MissingParameter => "missing_parameter",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::DocumentNotFound => "document_not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::DuplicateParameter => "duplicate_parameter",
            ErrorCode::DuplicateRequest => "duplicate_request",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotAcceptable => "not_acceptable",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooManyRequests => "too_many_requests",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Brevo's error body: `{"code": "...", "message": "..."}`.
///
/// `code` is a string rather than [`ErrorCode`] so that a client can read any code Brevo
/// itself may send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    /// Machine-readable error code, e.g. `document_not_found`.
    #[serde(default)]
    pub code: String,
    /// What went wrong, in words a developer can act on.
    #[serde(default)]
    pub message: String,
}

impl ErrorBody {
    /// An error body with one of switchboard's codes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_owned(),
            message: message.into(),
        }
    }
}

/// One page of a visitor's messages (switchboard extension:
/// `GET /v3/conversations/visitors/{visitorId}/messages`).
///
/// `messages` are in the order they were written, oldest first. Page backwards with
/// `before=<id of the first message>`, forwards with `after=<id of the last message>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    /// The messages of this page, oldest first.
    pub messages: Vec<ConversationsMessage>,
    /// Whether more messages lie beyond this page in the direction asked (older without
    /// `after`, newer with it).
    pub has_more: bool,
}

/// An agent (switchboard extension; Brevo manages agents only in its dashboard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    /// Agent id (17 characters).
    pub id: String,
    /// Display name shown to visitors.
    pub name: String,
    /// Email address, unique within the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Picture URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userpic: Option<String>,
    /// Ids of the groups the agent belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Whether the agent pinged `agentOnlinePing` within the presence window.
    #[serde(default)]
    pub online: bool,
}

/// An agent group (switchboard extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// Group id (17 characters).
    pub id: String,
    /// Group name.
    pub name: String,
}

/// `serde(with)` helpers for `Option<Option<T>>`: absent, explicit `null`, or a value.
pub mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serialises `Some(None)` as `null` (use with `skip_serializing_if = "Option::is_none"`).
    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(serializer),
            None => serializer.serialize_none(),
        }
    }

    /// A present field becomes `Some(..)`, so `null` becomes `Some(None)`; use with
    /// `#[serde(default)]` so an absent field stays `None`.
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_omits_absent_optional_fields() {
        let m = ConversationsMessage {
            id: "eYBEm3gq3zc5ayE2g".into(),
            kind: MessageType::Agent,
            text: "Hi".into(),
            html: "Hi".into(),
            visitor_id: "v1".into(),
            agent_id: None,
            agent_name: None,
            agent_userpic: None,
            created_at: 1,
            is_pushed: false,
            is_missed: false,
            is_missed_by_visitor: false,
            is_trigger: false,
            received_from: None,
        };
        let v = serde_json::to_value(&m).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj["type"], "agent");
        assert_eq!(obj["visitorId"], "v1");
        for absent in ["agentId", "agentName", "agentUserpic", "receivedFrom"] {
            assert!(!obj.contains_key(absent), "{absent} must be omitted");
        }
        assert!(obj.values().all(|v| !v.is_null()));
    }

    #[test]
    fn visitor_group_distinguishes_null_from_absent() {
        let absent: VisitorGroupRequest = serde_json::from_str(r#"{"visitorId":"v"}"#).unwrap();
        assert_eq!(absent.group_id, None);
        let null: VisitorGroupRequest = serde_json::from_str(r#"{"groupId":null}"#).unwrap();
        assert_eq!(null.group_id, Some(None));
        let set: VisitorGroupRequest = serde_json::from_str(r#"{"groupId":"g"}"#).unwrap();
        assert_eq!(set.group_id, Some(Some("g".into())));
        assert_eq!(
            serde_json::to_string(&VisitorGroupRequest::remove("v")).unwrap(),
            r#"{"visitorId":"v","groupId":null}"#
        );
    }

    #[test]
    fn requests_serialize_without_nulls() {
        let r = SendMessageRequest {
            visitor_id: Some("v".into()),
            text: Some("t".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"visitorId":"v","text":"t"}"#
        );
    }

    #[test]
    fn error_code_spelling_matches_serde() {
        for code in [
            ErrorCode::InvalidParameter,
            ErrorCode::DocumentNotFound,
            ErrorCode::DuplicateRequest,
            ErrorCode::BadRequest,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::String(code.as_str().into())
            );
        }
    }
}

/// Body of `POST /widget/v1/{widgetId}/session` (switchboard visitor API): every field is
/// optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionRequest {
    /// Resume the session of this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Bind a visitor id of the site's own (an existing user); needs `visitorHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_id: Option<String>,
    /// Lowercase hex HMAC-SHA256 of `visitorId`, keyed by the account's identity key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_hash: Option<String>,
    /// Visitor's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Visitor's email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Browser language, e.g. `en-GB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_language: Option<String>,
    /// Page the visitor is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_url: Option<String>,
    /// Title of that page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_title: Option<String>,
    /// Attributes merged into the visitor's (like `updateIntegrationData`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Answer of `POST /widget/v1/{widgetId}/session`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionResponse {
    /// The visitor.
    pub visitor_id: String,
    /// The visitor's continuous conversation.
    pub conversation_id: String,
    /// The visitor token: `Authorization: Bearer <token>` on the other widget calls.
    pub token: String,
}

/// Body of `POST /widget/v1/{widgetId}/messages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct VisitorMessageRequest {
    /// The message.
    #[serde(default)]
    pub text: Option<String>,
    /// Page the visitor is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_url: Option<String>,
    /// Title of that page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_title: Option<String>,
}

/// Body of `POST /widget/v1/{widgetId}/read`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ReadRequest {
    /// The newest agent message the visitor has read.
    #[serde(default)]
    pub message_id: Option<String>,
}

/// A page's link and title.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct StartPage {
    /// URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// One event on a visitor WebSocket or the account's event stream (switchboard extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StreamEvent {
    /// `messageCreated`, `messageUpdated`, `messageDeleted`, `conversationStarted`,
    /// `conversationEnded`; on the visitor socket also `ready` and `pong`.
    pub event: String,
    /// Position in the feed: resume after it (absent on `pong`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
    /// The conversation (account stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// The visitor (account stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_id: Option<String>,
    /// The message as it is now (created, updated; the first one of a started chat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ConversationsMessage>,
    /// The deleted message's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The chat that started or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<String>,
    /// Whether no agent was online when the chat started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_no_available_agent: Option<bool>,
    /// The page the visitor was on when the chat started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_start_page: Option<StartPage>,
}

/// A webhook endpoint (switchboard extension: `/v3/conversations/webhooks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Endpoint id.
    pub id: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Events delivered: `conversationStarted`, `conversationFragment`,
    /// `conversationTranscript`.
    pub events: Vec<String>,
    /// Operator's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether events are delivered (a disabled endpoint gets no new events and its
    /// pending deliveries wait).
    pub enabled: bool,
    /// Signing secret (`whsec_...`); given when the endpoint is created or read alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// `ok` or `failing`.
    pub status: String,
    /// Since when it has been failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<i64>,
    /// Failed attempts in a row.
    pub consecutive_failures: i64,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
}

/// Body of `POST /v3/conversations/webhooks` and `PUT /v3/conversations/webhooks/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WebhookRequest {
    /// http or https URL (required to create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Events wanted (default: all three).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// Operator's note (empty clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Enabled (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// One event's delivery to one endpoint, as the delivery log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    /// The event id (the `webhook-id` header; the same on every attempt and replay).
    pub event_id: String,
    /// Event name.
    pub event_name: String,
    /// Conversation.
    pub conversation_id: String,
    /// Position of the event (order within a conversation).
    pub seq: i64,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<i64>,
    /// When the event was created.
    pub created_at: i64,
    /// Last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<i64>,
    /// HTTP status of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<i64>,
    /// Error of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Latency of the last attempt (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_latency_ms: Option<i64>,
    /// When it was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
    /// Every attempt (when one delivery is read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_log: Option<Vec<WebhookAttempt>>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttempt {
    /// 1 for the first.
    pub attempt: i64,
    /// When (ms).
    pub at: i64,
    /// HTTP status, if the receiver answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    /// Time to the answer or the failure (ms).
    pub latency_ms: i64,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

//! Brevo's Conversations operations and their request builders.

use reqwest::Method;

use crate::client::{Call, Client, Replay};
use crate::path::with_id;
use crate::wire::{
    AgentOnlinePingRequest, ConversationsMessage, PushMessageRequest, SendMessageRequest,
    UpdateMessageRequest, VisitorGroupRequest, VisitorGroupResponse,
};
use crate::Result;

const MESSAGES: &str = "/conversations/messages";
const PUSHED_MESSAGES: &str = "/conversations/pushedMessages";
const AGENT_ONLINE_PING: &str = "/conversations/agentOnlinePing";
const VISITOR_GROUP: &str = "/conversations/visitorGroup";

/// The operations of Brevo's Conversations API; obtained from [`Client::conversations`].
///
/// Every method sends one logical call (retried as the client's
/// [`RetryPolicy`](crate::RetryPolicy) allows) and maps a non-2xx answer to
/// [`Error`](crate::Error).
#[derive(Debug, Clone, Copy)]
pub struct Conversations<'a> {
    client: &'a Client,
}

impl<'a> Conversations<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Self { client }
    }

    /// Sends a message to a visitor as an agent: `POST /conversations/messages` → 200.
    ///
    /// Takes a [`SendMessage`] builder or a plain [`SendMessageRequest`].
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// use switchboard_client::SendMessage;
    ///
    /// let msg = client
    ///     .conversations()
    ///     .send_message(
    ///         SendMessage::new("visitor-1", "Hello, how can I help?")
    ///             .agent_email("anna@example.com")
    ///             .agent_name("Anna")
    ///             .received_from("my-integration"),
    ///     )
    ///     .await?;
    /// assert_eq!(msg.text, "Hello, how can I help?");
    /// # Ok(()) }
    /// ```
    pub async fn send_message(
        &self,
        message: impl Into<SendMessage>,
    ) -> Result<ConversationsMessage> {
        let SendMessage {
            body,
            idempotency_key,
        } = message.into();
        self.post_json("send_message", MESSAGES, &body, idempotency_key)
            .await
    }

    /// Gets a message: `GET /conversations/messages/{id}` → 200.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// use switchboard_client::Error;
    ///
    /// match client.conversations().get_message("eYBEm3gq3zc5ayE2g").await {
    ///     Ok(msg) => println!("{}: {}", msg.visitor_id, msg.text),
    ///     Err(Error::NotFound { .. }) => println!("no such message"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get_message(&self, id: impl AsRef<str>) -> Result<ConversationsMessage> {
        let path = with_id(MESSAGES, id.as_ref())?;
        self.call_json("get_message", Method::GET, path, None).await
    }

    /// Edits the text of an agent's message: `PUT /conversations/messages/{id}` → 200.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// let msg = client
    ///     .conversations()
    ///     .update_message("eYBEm3gq3zc5ayE2g", "Hello again")
    ///     .await?;
    /// assert_eq!(msg.text, "Hello again");
    /// # Ok(()) }
    /// ```
    pub async fn update_message(
        &self,
        id: impl AsRef<str>,
        text: impl Into<String>,
    ) -> Result<ConversationsMessage> {
        let path = with_id(MESSAGES, id.as_ref())?;
        let body = Client::serialize(&UpdateMessageRequest {
            text: Some(text.into()),
        })?;
        self.call_json("update_message", Method::PUT, path, Some(body))
            .await
    }

    /// Deletes an agent's message: `DELETE /conversations/messages/{id}` → 204.
    ///
    /// A retried DELETE whose first attempt took effect answers 404, so treat
    /// [`Error::NotFound`](crate::Error::NotFound) as "already gone" where that matters.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// client.conversations().delete_message("eYBEm3gq3zc5ayE2g").await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_message(&self, id: impl AsRef<str>) -> Result<()> {
        let path = with_id(MESSAGES, id.as_ref())?;
        self.call("delete_message", Method::DELETE, path, None, Replay::Safe)
            .await
            .map(drop)
    }

    /// Sends an automated ("pushed") message to a visitor:
    /// `POST /conversations/pushedMessages` → 200.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// use switchboard_client::PushMessage;
    ///
    /// let msg = client
    ///     .conversations()
    ///     .push_message(PushMessage::new("visitor-1", "Your order has shipped").group_id("PjRBMhWGen6aRHjif"))
    ///     .await?;
    /// assert!(msg.is_pushed);
    /// # Ok(()) }
    /// ```
    pub async fn push_message(
        &self,
        message: impl Into<PushMessage>,
    ) -> Result<ConversationsMessage> {
        let PushMessage {
            body,
            idempotency_key,
        } = message.into();
        self.post_json("push_message", PUSHED_MESSAGES, &body, idempotency_key)
            .await
    }

    /// Gets an automated message: `GET /conversations/pushedMessages/{id}` → 200.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// let msg = client.conversations().get_pushed_message("eYBEm3gq3zc5ayE2g").await?;
    /// println!("{}", msg.text);
    /// # Ok(()) }
    /// ```
    pub async fn get_pushed_message(&self, id: impl AsRef<str>) -> Result<ConversationsMessage> {
        let path = with_id(PUSHED_MESSAGES, id.as_ref())?;
        self.call_json("get_pushed_message", Method::GET, path, None)
            .await
    }

    /// Edits an automated message: `PUT /conversations/pushedMessages/{id}` → 200.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// client
    ///     .conversations()
    ///     .update_pushed_message("eYBEm3gq3zc5ayE2g", "Your order has been delivered")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn update_pushed_message(
        &self,
        id: impl AsRef<str>,
        text: impl Into<String>,
    ) -> Result<ConversationsMessage> {
        let path = with_id(PUSHED_MESSAGES, id.as_ref())?;
        let body = Client::serialize(&UpdateMessageRequest {
            text: Some(text.into()),
        })?;
        self.call_json("update_pushed_message", Method::PUT, path, Some(body))
            .await
    }

    /// Deletes an automated message: `DELETE /conversations/pushedMessages/{id}` → 204.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// client.conversations().delete_pushed_message("eYBEm3gq3zc5ayE2g").await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_pushed_message(&self, id: impl AsRef<str>) -> Result<()> {
        let path = with_id(PUSHED_MESSAGES, id.as_ref())?;
        self.call(
            "delete_pushed_message",
            Method::DELETE,
            path,
            None,
            Replay::Safe,
        )
        .await
        .map(drop)
    }

    /// Marks an agent online for 2–3 minutes: `POST /conversations/agentOnlinePing` → 201.
    /// Brevo recommends pinging every minute while the agent is available.
    ///
    /// The ping is idempotent, so it is retried like a GET even against Brevo.
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// use switchboard_client::AgentPing;
    ///
    /// client.conversations().agent_online_ping(AgentPing::agent_id("d9nKoegKSjmCtyK78")).await?;
    /// client
    ///     .conversations()
    ///     .agent_online_ping(AgentPing::agent_email("anna@example.com").agent_name("Anna"))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn agent_online_ping(&self, agent: impl Into<AgentPing>) -> Result<()> {
        let body = Client::serialize(&agent.into().body)?;
        self.call(
            "agent_online_ping",
            Method::POST,
            AGENT_ONLINE_PING.to_owned(),
            Some(body),
            Replay::Safe,
        )
        .await
        .map(drop)
    }

    /// Assigns a visitor to an agent group, or removes it from its group:
    /// `PUT /conversations/visitorGroup` → 200 `{visitorId, groupId?}`.
    ///
    /// Build the request with [`VisitorGroupRequest::assign`] or
    /// [`VisitorGroupRequest::remove`] (which sends `"groupId": null`).
    ///
    /// ```no_run
    /// # async fn run(client: switchboard_client::Client) -> switchboard_client::Result<()> {
    /// use switchboard_client::VisitorGroupRequest;
    ///
    /// let r = client
    ///     .conversations()
    ///     .set_visitor_group(VisitorGroupRequest::assign("AXCR3k9bpSY7bpuh7", "PjRBMhWGen6aRHjif"))
    ///     .await?;
    /// assert_eq!(r.group_id.as_deref(), Some("PjRBMhWGen6aRHjif"));
    /// let r = client
    ///     .conversations()
    ///     .set_visitor_group(VisitorGroupRequest::remove("AXCR3k9bpSY7bpuh7"))
    ///     .await?;
    /// assert_eq!(r.group_id, None);
    /// # Ok(()) }
    /// ```
    pub async fn set_visitor_group(
        &self,
        request: impl Into<VisitorGroupRequest>,
    ) -> Result<VisitorGroupResponse> {
        let body = Client::serialize(&request.into())?;
        self.call_json(
            "set_visitor_group",
            Method::PUT,
            VISITOR_GROUP.to_owned(),
            Some(body),
        )
        .await
    }

    async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        body: &B,
        idempotency_key: Option<String>,
    ) -> Result<T> {
        let body = Client::serialize(body)?;
        self.client
            .execute(Call {
                op,
                method: Method::POST,
                path: path.to_owned(),
                body: Some(body),
                replay: Replay::Post,
                idempotency_key,
            })
            .await?
            .json()
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        self.call(op, method, path, body, Replay::Safe)
            .await?
            .json()
    }

    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
        replay: Replay,
    ) -> Result<crate::client::Reply> {
        self.client
            .execute(Call {
                op,
                method,
                path,
                body,
                replay,
                idempotency_key: None,
            })
            .await
    }
}

/// A message to send as an agent ([`Conversations::send_message`]).
///
/// ```
/// use switchboard_client::SendMessage;
///
/// let m = SendMessage::new("visitor-1", "Hi").agent_id("d9nKoegKSjmCtyK78");
/// assert_eq!(
///     serde_json::to_string(m.as_request()).unwrap(),
///     r#"{"visitorId":"visitor-1","text":"Hi","agentId":"d9nKoegKSjmCtyK78"}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendMessage {
    body: SendMessageRequest,
    idempotency_key: Option<String>,
}

impl SendMessage {
    /// A message with `text` to `visitor_id`. Name the agent with
    /// [`agent_id`](Self::agent_id) or [`agent_email`](Self::agent_email).
    pub fn new(visitor_id: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            body: SendMessageRequest {
                visitor_id: Some(visitor_id.into()),
                text: Some(text.into()),
                ..SendMessageRequest::default()
            },
            idempotency_key: None,
        }
    }

    /// The agent sending the message.
    pub fn agent_id(mut self, agent_id: impl Into<String>) -> Self {
        self.body.agent_id = Some(agent_id.into());
        self
    }

    /// The sending agent's email, instead of [`agent_id`](Self::agent_id).
    pub fn agent_email(mut self, email: impl Into<String>) -> Self {
        self.body.agent_email = Some(email.into());
        self
    }

    /// The agent's display name (creates the agent when the email is unknown).
    pub fn agent_name(mut self, name: impl Into<String>) -> Self {
        self.body.agent_name = Some(name.into());
        self
    }

    /// A mark for the message, echoed in responses and webhooks so an integration can
    /// recognise its own messages.
    pub fn received_from(mut self, mark: impl Into<String>) -> Self {
        self.body.received_from = Some(mark.into());
        self
    }

    /// Uses this `Idempotency-Key` instead of a generated one, e.g. to make a send that is
    /// repeated after a crash of the caller return the first message (switchboard only).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The JSON body that will be sent.
    pub fn as_request(&self) -> &SendMessageRequest {
        &self.body
    }

    /// The JSON body that will be sent.
    pub fn into_request(self) -> SendMessageRequest {
        self.body
    }
}

impl From<SendMessageRequest> for SendMessage {
    fn from(body: SendMessageRequest) -> Self {
        Self {
            body,
            idempotency_key: None,
        }
    }
}

/// An automated message to a visitor ([`Conversations::push_message`]).
///
/// ```
/// use switchboard_client::PushMessage;
///
/// let m = PushMessage::new("visitor-1", "Shipped").group_id("PjRBMhWGen6aRHjif");
/// assert_eq!(m.as_request().group_id.as_deref(), Some("PjRBMhWGen6aRHjif"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushMessage {
    body: PushMessageRequest,
    idempotency_key: Option<String>,
}

impl PushMessage {
    /// An automated message with `text` to `visitor_id`.
    pub fn new(visitor_id: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            body: PushMessageRequest {
                visitor_id: Some(visitor_id.into()),
                text: Some(text.into()),
                ..PushMessageRequest::default()
            },
            idempotency_key: None,
        }
    }

    /// Send on behalf of this agent.
    pub fn agent_id(mut self, agent_id: impl Into<String>) -> Self {
        self.body.agent_id = Some(agent_id.into());
        self
    }

    /// Send on behalf of an agent of this group.
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.body.group_id = Some(group_id.into());
        self
    }

    /// Uses this `Idempotency-Key` instead of a generated one (switchboard only).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The JSON body that will be sent.
    pub fn as_request(&self) -> &PushMessageRequest {
        &self.body
    }

    /// The JSON body that will be sent.
    pub fn into_request(self) -> PushMessageRequest {
        self.body
    }
}

impl From<PushMessageRequest> for PushMessage {
    fn from(body: PushMessageRequest) -> Self {
        Self {
            body,
            idempotency_key: None,
        }
    }
}

/// The agent to mark online ([`Conversations::agent_online_ping`]).
///
/// ```
/// use switchboard_client::AgentPing;
///
/// let p = AgentPing::agent_email("anna@example.com").agent_name("Anna");
/// assert_eq!(
///     serde_json::to_string(p.as_request()).unwrap(),
///     r#"{"agentEmail":"anna@example.com","agentName":"Anna"}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPing {
    body: AgentOnlinePingRequest,
}

impl AgentPing {
    /// Ping for the agent with this id.
    pub fn agent_id(agent_id: impl Into<String>) -> Self {
        Self {
            body: AgentOnlinePingRequest {
                agent_id: Some(agent_id.into()),
                ..AgentOnlinePingRequest::default()
            },
        }
    }

    /// Ping for the agent with this email.
    pub fn agent_email(email: impl Into<String>) -> Self {
        Self {
            body: AgentOnlinePingRequest {
                agent_email: Some(email.into()),
                ..AgentOnlinePingRequest::default()
            },
        }
    }

    /// The agent's display name (creates the agent when the email is unknown).
    pub fn agent_name(mut self, name: impl Into<String>) -> Self {
        self.body.agent_name = Some(name.into());
        self
    }

    /// A mark of the calling integration.
    pub fn received_from(mut self, mark: impl Into<String>) -> Self {
        self.body.received_from = Some(mark.into());
        self
    }

    /// The JSON body that will be sent.
    pub fn as_request(&self) -> &AgentOnlinePingRequest {
        &self.body
    }
}

impl From<AgentOnlinePingRequest> for AgentPing {
    fn from(body: AgentOnlinePingRequest) -> Self {
        Self { body }
    }
}

//! A small, typed, async SDK for the [Brevo Conversations API], usable against Brevo
//! itself (`https://api.brevo.com/v3`) and against a self-hosted switchboard server.
//!
//! ```no_run
//! use switchboard_client::{Client, Error, SendMessage};
//!
//! # async fn run() -> Result<(), Error> {
//! let client = Client::builder()
//!     .api_key(std::env::var("BREVO_API_KEY").unwrap_or_default())
//!     .base_url("http://127.0.0.1:8080/v3") // leave out to talk to Brevo
//!     .build()?;
//!
//! let conversations = client.conversations();
//! let sent = conversations
//!     .send_message(SendMessage::new("visitor-1", "Hello!").agent_id("d9nKoegKSjmCtyK78"))
//!     .await?;
//! match conversations.get_message(&sent.id).await {
//!     Ok(msg) => println!("{} at {}", msg.text, msg.created_at),
//!     Err(Error::NotFound { .. }) => println!("deleted meanwhile"),
//!     Err(Error::RateLimited { retry_after, .. }) => println!("slow down: {retry_after:?}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```
//!
//! * [`Client`] / [`ClientBuilder`]: keys, base URL, timeouts, [`RetryPolicy`], user agent.
//! * [`Conversations`]: one method per operation of Brevo's API.
//! * [`Extensions`]: switchboard-only operations, kept apart from the Brevo surface.
//! * [`Error`]: one error enum whose variants say what to do.
//! * [`wire`]: the JSON types shared with the switchboard server.
//!
//! Retries: 429, 502, 503, 504 and connection failures are retried with exponential
//! backoff and jitter, honouring `Retry-After`. Every POST carries an `Idempotency-Key`
//! that stays the same across the retries of one call; see
//! [`ClientBuilder::idempotent_posts`] for when a POST is retried.
//!
//! Every call runs in a `tracing` span `switchboard_client` (fields `op`, `method`, `path`,
//! `attempts`, `status`) with one child span `attempt` per attempt.
//!
//! [Brevo Conversations API]: https://developers.brevo.com/reference/conversations
#![warn(missing_docs)]

mod client;
mod conversations;
mod error;
mod extensions;
mod path;
mod retry;

pub use switchboard_wire as wire;
pub use wire::{
    AgentOnlinePingRequest, ConversationsMessage, MessagePage, MessageType, PushMessageRequest,
    SendMessageRequest, UpdateMessageRequest, VisitorGroupRequest, VisitorGroupResponse,
};

pub use client::{
    Client, ClientBuilder, DEFAULT_BASE_URL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
    DEFAULT_USER_AGENT, IDEMPOTENCY_KEY_HEADER,
};
pub use conversations::{AgentPing, Conversations, PushMessage, SendMessage};
pub use error::{BoxError, Error, Result};
pub use extensions::{Extensions, ListMessages};
pub use retry::RetryPolicy;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! API verbs of the `switchboard` binary: `msg`, `push`, `ping` and `visitor-group` call the
//! Brevo Conversations API (of a switchboard server, or of Brevo itself) through
//! `switchboard-client`, for operators and for poking at the API from a shell.
//!
//! Output is a one-line human summary, or with `--json` the API's JSON object. An API error
//! prints `error: <code>: <message> (HTTP <status>)` and exits with status 1.

use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;
use switchboard_client::wire::{PushMessageRequest, SendMessageRequest};
use switchboard_client::{
    AgentOnlinePingRequest, Client, ConversationsMessage, Error, ListMessages, MessageType,
    PushMessage, SendMessage, VisitorGroupRequest,
};

/// Where the API is and how to authenticate; flattened into every API verb.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// API root: a switchboard's `http://HOST:PORT/v3`, or `https://api.brevo.com/v3`.
    /// `/v3` is appended when the URL has no path.
    #[arg(
        long,
        env = "SWITCHBOARD_URL",
        default_value = "http://127.0.0.1:8080/v3"
    )]
    base_url: String,
    /// API key, sent as the `api-key` header.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Partner key, sent as the `partner-key` header when given.
    #[arg(long, env = "SWITCHBOARD_PARTNER_KEY", hide_env_values = true)]
    partner_key: Option<String>,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let key = self
            .api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("an API key is required: pass --api-key or set SWITCHBOARD_API_KEY")
            })?;
        let mut builder = Client::builder()
            .api_key(key)
            .base_url(base_url(&self.base_url))
            .user_agent(concat!("switchboard-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(p) = self.partner_key.as_deref().filter(|p| !p.is_empty()) {
            builder = builder.partner_key(p);
        }
        builder.build().map_err(api_error)
    }
}

/// `http://host:port` (as `switchboard serve` prints it) becomes `http://host:port/v3`;
/// a URL with a path is used as given.
fn base_url(raw: &str) -> String {
    match url_path(raw) {
        Some("" | "/") => format!("{}/v3", raw.trim_end_matches('/')),
        _ => raw.to_owned(),
    }
}

/// The path of an absolute `scheme://authority/path` URL, `None` when `raw` is not one.
fn url_path(raw: &str) -> Option<&str> {
    let (_, rest) = raw.split_once("://")?;
    Some(rest.find('/').map_or("", |i| &rest[i..]))
}

/// `switchboard msg`: agents' messages.
#[derive(Debug, Subcommand)]
pub enum MsgCmd {
    /// Send a message to a visitor as an agent (POST /conversations/messages).
    Send {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        msg: SendArgs,
    },
    /// Show a message (GET /conversations/messages/{id}).
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        id: String,
    },
    /// Edit an agent's message (PUT /conversations/messages/{id}).
    Edit {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        id: String,
        /// The new text.
        #[arg(long)]
        text: Option<String>,
    },
    /// Delete an agent's message (DELETE /conversations/messages/{id}).
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        id: String,
    },
    /// List a visitor's messages, oldest first (switchboard extension:
    /// GET /conversations/visitors/{visitorId}/messages).
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// The visitor.
        #[arg(long)]
        visitor: String,
        /// How many (1 to 100; the server's default is 50).
        #[arg(long)]
        limit: Option<u32>,
        /// Only messages written before this message id.
        #[arg(long, conflicts_with = "after")]
        before: Option<String>,
        /// Only messages written after this message id.
        #[arg(long)]
        after: Option<String>,
    },
}

/// Flags of `msg send`. Required fields are checked by the API, so that its error (e.g.
/// `missing_parameter`) is what the caller sees.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The visitor to write to.
    #[arg(long)]
    visitor: Option<String>,
    /// The message text.
    #[arg(long)]
    text: Option<String>,
    /// The sending agent, by id.
    #[arg(long, conflicts_with = "agent_email")]
    agent_id: Option<String>,
    /// The sending agent, by email.
    #[arg(long)]
    agent_email: Option<String>,
    /// The agent's display name (creates the agent when the email is unknown).
    #[arg(long, requires = "agent_email")]
    agent_name: Option<String>,
    /// A mark for the message, echoed in responses and webhooks.
    #[arg(long)]
    received_from: Option<String>,
    /// Idempotency-Key of the POST (default: a new random key); repeating a send with the
    /// same key and flags returns the first message (switchboard only).
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// `switchboard push`: automated ("pushed") messages.
#[derive(Debug, Subcommand)]
pub enum PushCmd {
    /// Send an automated message to a visitor (POST /conversations/pushedMessages).
    Send {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        msg: PushArgs,
    },
    /// Show an automated message (GET /conversations/pushedMessages/{id}).
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        id: String,
    },
    /// Edit an automated message (PUT /conversations/pushedMessages/{id}).
    Edit {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        id: String,
        /// The new text.
        #[arg(long)]
        text: Option<String>,
    },
    /// Delete an automated message (DELETE /conversations/pushedMessages/{id}).
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        id: String,
    },
}

/// Flags of `push send`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The visitor to write to.
    #[arg(long)]
    visitor: Option<String>,
    /// The message text.
    #[arg(long)]
    text: Option<String>,
    /// Send as this agent.
    #[arg(long)]
    agent_id: Option<String>,
    /// Send as an agent of this group.
    #[arg(long)]
    group_id: Option<String>,
    /// Idempotency-Key of the POST (default: a new random key).
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// `switchboard ping`: mark an agent online (POST /conversations/agentOnlinePing).
#[derive(Debug, Args)]
pub struct PingArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The agent, by id.
    #[arg(long, conflicts_with = "agent_email")]
    agent_id: Option<String>,
    /// The agent, by email.
    #[arg(long)]
    agent_email: Option<String>,
    /// The agent's display name (creates the agent when the email is unknown).
    #[arg(long, requires = "agent_email")]
    agent_name: Option<String>,
}

/// `switchboard visitor-group`: assign a visitor to a group, or remove it from its group
/// (PUT /conversations/visitorGroup).
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("assignment").required(true).args(["group", "remove"])))]
pub struct VisitorGroupArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The visitor.
    #[arg(long)]
    visitor: String,
    /// Assign the visitor to this group.
    #[arg(long)]
    group: Option<String>,
    /// Remove the visitor from its group.
    #[arg(long)]
    remove: bool,
}

/// Runs a `msg` verb.
pub async fn msg(cmd: MsgCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        MsgCmd::Send { api, msg } => {
            let mut req = SendMessage::from(SendMessageRequest {
                visitor_id: msg.visitor,
                text: msg.text,
                agent_id: msg.agent_id,
                agent_email: msg.agent_email,
                agent_name: msg.agent_name,
                received_from: msg.received_from,
            });
            if let Some(key) = msg.idempotency_key {
                req = req.idempotency_key(key);
            }
            let m = api
                .client()?
                .conversations()
                .send_message(req)
                .await
                .map_err(api_error)?;
            print_message(json, &m)
        }
        MsgCmd::Get { api, id } => {
            let m = api
                .client()?
                .conversations()
                .get_message(&id)
                .await
                .map_err(api_error)?;
            print_message(json, &m)
        }
        MsgCmd::Edit { api, id, text } => {
            let m = api
                .client()?
                .conversations()
                .update_message(&id, text.unwrap_or_default())
                .await
                .map_err(api_error)?;
            print_message(json, &m)
        }
        MsgCmd::Delete { api, id } => {
            api.client()?
                .conversations()
                .delete_message(&id)
                .await
                .map_err(api_error)?;
            print_deleted(json, "message", &id);
            Ok(())
        }
        MsgCmd::List {
            api,
            visitor,
            limit,
            before,
            after,
        } => {
            let mut page = ListMessages::new();
            if let Some(limit) = limit {
                page = page.limit(limit);
            }
            if let Some(id) = before {
                page = page.before(id);
            }
            if let Some(id) = after {
                page = page.after(id);
            }
            let client = api.client()?;
            let result = client
                .extensions()
                .list_visitor_messages(&visitor, page)
                .await
                .map_err(api_error)?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                for m in &result.messages {
                    println!("{}", summary(m));
                }
                if result.has_more {
                    println!("(more: --before or --after the first or last id above)");
                }
            }
            Ok(())
        }
    }
}

/// Runs a `push` verb.
pub async fn push(cmd: PushCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        PushCmd::Send { api, msg } => {
            let mut req = PushMessage::from(PushMessageRequest {
                visitor_id: msg.visitor,
                text: msg.text,
                agent_id: msg.agent_id,
                group_id: msg.group_id,
            });
            if let Some(key) = msg.idempotency_key {
                req = req.idempotency_key(key);
            }
            let m = api
                .client()?
                .conversations()
                .push_message(req)
                .await
                .map_err(api_error)?;
            print_message(json, &m)
        }
        PushCmd::Get { api, id } => {
            let m = api
                .client()?
                .conversations()
                .get_pushed_message(&id)
                .await
                .map_err(api_error)?;
            print_message(json, &m)
        }
        PushCmd::Edit { api, id, text } => {
            let m = api
                .client()?
                .conversations()
                .update_pushed_message(&id, text.unwrap_or_default())
                .await
                .map_err(api_error)?;
            print_message(json, &m)
        }
        PushCmd::Delete { api, id } => {
            api.client()?
                .conversations()
                .delete_pushed_message(&id)
                .await
                .map_err(api_error)?;
            print_deleted(json, "pushed message", &id);
            Ok(())
        }
    }
}

/// Runs `ping`.
pub async fn ping(args: PingArgs, json: bool) -> anyhow::Result<()> {
    let who = args
        .agent_id
        .clone()
        .or_else(|| args.agent_email.clone())
        .unwrap_or_default();
    let req = AgentOnlinePingRequest {
        agent_id: args.agent_id,
        agent_email: args.agent_email,
        agent_name: args.agent_name,
        received_from: None,
    };
    args.api
        .client()?
        .conversations()
        .agent_online_ping(req)
        .await
        .map_err(api_error)?;
    if json {
        println!("{}", json!({ "online": true }));
    } else {
        println!("agent {who} is online");
    }
    Ok(())
}

/// Runs `visitor-group`.
pub async fn visitor_group(args: VisitorGroupArgs, json: bool) -> anyhow::Result<()> {
    let req = match &args.group {
        Some(g) if !args.remove => VisitorGroupRequest::assign(&args.visitor, g),
        _ => VisitorGroupRequest::remove(&args.visitor),
    };
    let r = args
        .api
        .client()?
        .conversations()
        .set_visitor_group(req)
        .await
        .map_err(api_error)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        match &r.group_id {
            Some(g) => println!("visitor {} is in group {g}", r.visitor_id),
            None => println!("visitor {} is in no group", r.visitor_id),
        }
    }
    Ok(())
}

fn print_message(json: bool, m: &ConversationsMessage) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(m)?);
    } else {
        println!("{}", summary(m));
    }
    Ok(())
}

/// `message ID (agent NAME → visitor V): TEXT`, or `pushed message …`, or
/// `message ID (visitor V): TEXT` for a visitor's message.
fn summary(m: &ConversationsMessage) -> String {
    let what = if m.is_pushed {
        "pushed message"
    } else {
        "message"
    };
    match m.kind {
        MessageType::Agent => {
            let agent = m
                .agent_name
                .as_deref()
                .or(m.agent_id.as_deref())
                .unwrap_or("?");
            format!(
                "{what} {} (agent {agent} → visitor {}): {}",
                m.id, m.visitor_id, m.text
            )
        }
        MessageType::Visitor => {
            format!("{what} {} (visitor {}): {}", m.id, m.visitor_id, m.text)
        }
    }
}

fn print_deleted(json: bool, what: &str, id: &str) {
    if json {
        println!("{}", json!({ "deleted": id }));
    } else {
        println!("deleted {what} {id}");
    }
}

/// One line for any SDK error: `<code>: <message> (HTTP <status>)` for API errors, the
/// error and its causes otherwise. (Not chained, so `main`'s `{e:#}` prints it once.)
fn api_error(e: Error) -> anyhow::Error {
    if let Some(status) = e.api_status() {
        let (code, message) = e.code_and_message();
        return match code {
            Some(code) => anyhow::anyhow!("{code}: {message} (HTTP {status})"),
            None => anyhow::anyhow!("{message} (HTTP {status})"),
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    anyhow::anyhow!(text)
}

/// Helpers over the SDK's error for [`api_error`].
trait ErrorParts {
    /// The status of an answer with an error status (not of a decode error).
    fn api_status(&self) -> Option<u16>;
    /// The Brevo code (if any) and message of an API error.
    fn code_and_message(&self) -> (Option<&str>, &str);
}

impl ErrorParts for Error {
    fn api_status(&self) -> Option<u16> {
        match self {
            Error::Decode { .. } => None,
            e => e.status(),
        }
    }

    fn code_and_message(&self) -> (Option<&str>, &str) {
        match self {
            Error::BadRequest { message, .. }
            | Error::Unauthorized { message, .. }
            | Error::NotFound { message, .. }
            | Error::RateLimited { message, .. }
            | Error::Server { message, .. }
            | Error::Api { message, .. } => (self.code(), message),
            _ => (None, ""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_gets_v3_only_without_a_path() {
        assert_eq!(
            base_url("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/v3"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080/v3"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080/v3"),
            "http://127.0.0.1:8080/v3"
        );
        assert_eq!(
            base_url("https://chat.example.com/api/v3/"),
            "https://chat.example.com/api/v3/"
        );
        assert_eq!(base_url("not a url"), "not a url");
    }

    #[test]
    fn api_errors_are_one_line_with_code_message_and_status() {
        let e = api_error(Error::NotFound {
            code: "document_not_found".into(),
            message: "Message x does not exist".into(),
            body: String::new(),
        });
        assert_eq!(
            format!("{e:#}"),
            "document_not_found: Message x does not exist (HTTP 404)"
        );
        let e = api_error(Error::Server {
            status: 502,
            code: String::new(),
            message: "HTTP 502 Bad Gateway".into(),
            body: "<html>".into(),
        });
        assert_eq!(format!("{e:#}"), "HTTP 502 Bad Gateway (HTTP 502)");
    }
}

//! Brevo-shaped webhook payloads, rendered from the outbox event and the database.

use serde::Serialize;
use switchboard_wire::{ConversationsMessage, StartPage};

use std::collections::HashMap;
use std::sync::Mutex;

use crate::domain::{Domain, DomainError, DomainResult};
use crate::store::{ChatInfo, MessageRow, OutboxEvent};

/// An agent as webhooks show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAgent {
    /// Agent id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Picture URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userpic: Option<String>,
}

/// A visitor as webhooks show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookVisitor {
    /// Visitor id.
    pub id: String,
    /// The continuous conversation (Brevo's `threadId`).
    pub thread_id: String,
    /// Channel: always `widget`.
    pub source: &'static str,
    /// Group the visitor is routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Name shown to agents.
    pub displayed_name: String,
    /// Name the widget gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Email the widget gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Pages seen: the first one, and the current one when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_visit: Option<LastVisit>,
    /// Browser language.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser_language: Option<String>,
    /// Contact attributes, Brevo style (`EMAIL`, `FIRSTNAME`).
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// What the site sent (`attributes` of the widget session).
    pub integration_attributes: serde_json::Value,
}

/// The visitor's pages, Brevo style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastVisit {
    /// Pages, the first one first.
    pub viewed_pages: Vec<StartPage>,
}

/// The body of a webhook delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// `conversationStarted`, `conversationFragment` or `conversationTranscript`.
    pub event_name: String,
    /// The continuous conversation with the visitor.
    pub conversation_id: String,
    /// The page the chat started on (started, transcript).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_start_page: Option<StartPage>,
    /// The first message (started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ConversationsMessage>,
    /// The messages (fragment: since the last fragment; transcript: the whole chat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ConversationsMessage>>,
    /// The agent of the first message (started, when an agent wrote it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<WebhookAgent>,
    /// The agents of the messages (fragment, transcript).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<WebhookAgent>>,
    /// The visitor.
    pub visitor: WebhookVisitor,
    /// Whether no agent was online when the chat started (started, fragment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_no_available_agent: Option<bool>,
    /// Visitor messages of the chat sent while no agent was online (transcript).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed_messages_count: Option<usize>,
}

/// Chat start facts read for payloads. They never change once a chat exists, and a busy
/// conversation has one fragment after another, each asking for the same chat. (Visitors
/// are read every time: a change, such as a new group, must show in the next event.)
#[derive(Default)]
pub struct RenderCache {
    chats: Mutex<HashMap<String, ChatInfo>>,
}

const RENDER_CACHE_MAX: usize = 10_000;

impl RenderCache {
    async fn chat(
        &self,
        domain: &Domain,
        account: &str,
        id: &str,
    ) -> DomainResult<Option<ChatInfo>> {
        if let Some(c) = lock(&self.chats).get(id) {
            return Ok(Some(c.clone()));
        }
        let c = domain.store().chat(account, id).await?;
        if let Some(c) = &c {
            let mut map = lock(&self.chats);
            if map.len() >= RENDER_CACHE_MAX {
                map.clear();
            }
            map.insert(id.to_owned(), c.clone());
        }
        Ok(c)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Renders the payload of an outbox event as JSON.
pub async fn render(
    domain: &Domain,
    cache: &RenderCache,
    ev: &OutboxEvent,
) -> DomainResult<String> {
    let store = domain.store();
    let messages = store
        .messages_between(&ev.account_id, &ev.visitor_id, ev.from_seq, ev.to_seq)
        .await?;
    let visitor = domain.visitor(&ev.account_id, &ev.visitor_id).await?;
    let chat = cache.chat(domain, &ev.account_id, &ev.chat_id).await?;
    let mut agents: Vec<WebhookAgent> = Vec::new();
    for m in &messages {
        let Some(id) = &m.agent_id else { continue };
        if agents.iter().any(|a| &a.id == id) {
            continue;
        }
        agents.push(agent_of(domain, &ev.account_id, m, id).await?);
    }
    let start_page = chat.as_ref().and_then(|c| {
        (c.start_page_url.is_some() || c.start_page_title.is_some()).then(|| StartPage {
            link: c.start_page_url.clone(),
            title: c.start_page_title.clone(),
        })
    });
    let no_agent = chat.as_ref().map(|c| c.no_agent_online);
    let mut attributes = serde_json::Map::new();
    if let Some(email) = &visitor.email {
        attributes.insert("EMAIL".into(), email.clone().into());
    }
    if let Some(name) = &visitor.name {
        attributes.insert("FIRSTNAME".into(), name.clone().into());
    }
    let displayed_name = visitor.name.clone().unwrap_or_else(|| {
        format!(
            "Visitor #{}",
            visitor.id.chars().take(6).collect::<String>()
        )
    });
    let w = WebhookVisitor {
        id: visitor.id.clone(),
        thread_id: visitor.conversation_id.clone(),
        source: "widget",
        group_id: visitor.group_id.clone(),
        displayed_name,
        name: visitor.name.clone(),
        email: visitor.email.clone(),
        last_visit: last_visit(&visitor),
        browser_language: visitor.browser_language.clone(),
        attributes,
        integration_attributes: serde_json::from_str(&visitor.attributes)
            .unwrap_or_else(|_| serde_json::json!({})),
    };
    let wire: Vec<ConversationsMessage> = messages.iter().map(crate::http::to_wire).collect();
    let mut p = WebhookPayload {
        event_name: ev.kind.clone(),
        conversation_id: ev.conversation_id.clone(),
        conversation_start_page: None,
        message: None,
        messages: None,
        agent: None,
        agents: None,
        visitor: w,
        is_no_available_agent: None,
        missed_messages_count: None,
    };
    match ev.kind.as_str() {
        "conversationStarted" => {
            p.conversation_start_page = start_page;
            p.message = wire.into_iter().next();
            p.agent = agents.into_iter().next();
            p.is_no_available_agent = no_agent;
        }
        "conversationFragment" => {
            p.messages = Some(wire);
            p.agents = Some(agents);
            p.is_no_available_agent = no_agent;
        }
        "conversationTranscript" => {
            p.conversation_start_page = start_page;
            p.missed_messages_count = Some(
                messages
                    .iter()
                    .filter(|m| m.kind == "visitor" && m.is_missed)
                    .count(),
            );
            p.messages = Some(wire);
            p.agents = Some(agents);
        }
        other => {
            return Err(DomainError::Invalid(format!(
                "unknown webhook event {other}"
            )))
        }
    }
    serde_json::to_string(&p).map_err(|e| DomainError::Invalid(e.to_string()))
}

/// The agent of a message: as it is now, or as the message remembers it if it was removed.
async fn agent_of(
    domain: &Domain,
    account_id: &str,
    m: &MessageRow,
    id: &str,
) -> DomainResult<WebhookAgent> {
    Ok(match domain.store().agent(account_id, id).await? {
        Some(a) => WebhookAgent {
            id: a.id.clone(),
            name: a.name.clone(),
            email: a.email.clone(),
            userpic: a.userpic.clone(),
        },
        None => WebhookAgent {
            id: id.to_owned(),
            name: m.agent_name.clone().unwrap_or_default(),
            email: None,
            userpic: m.agent_userpic.clone(),
        },
    })
}

fn last_visit(v: &crate::store::VisitorRow) -> Option<LastVisit> {
    let page = |link: &Option<String>, title: &Option<String>| {
        (link.is_some() || title.is_some()).then(|| StartPage {
            link: link.clone(),
            title: title.clone(),
        })
    };
    let mut pages: Vec<StartPage> = Vec::new();
    if let Some(first) = page(&v.start_page_url, &v.start_page_title) {
        pages.push(first);
    }
    if let Some(now) = page(&v.page_url, &v.page_title) {
        if pages.first() != Some(&now) {
            pages.push(now);
        }
    }
    (!pages.is_empty()).then_some(LastVisit {
        viewed_pages: pages,
    })
}

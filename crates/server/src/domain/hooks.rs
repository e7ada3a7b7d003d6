//! Webhook endpoints (their rules; delivery is in `crate::webhooks`) and the chat timers
//! that write webhook events.

use super::*;
use crate::store::{AttemptRow, DeliveryRow, TimerOutcome, WebhookPatch, WebhookRow};

/// The webhook events an endpoint can ask for (Brevo's Conversations webhooks).
pub const WEBHOOK_EVENTS: [&str; 3] = [
    "conversationStarted",
    "conversationFragment",
    "conversationTranscript",
];

/// Longest webhook URL.
const MAX_WEBHOOK_URL: usize = 2048;

/// A new endpoint as asked for.
#[derive(Debug, Clone, Default)]
pub struct NewWebhook {
    /// Where to deliver.
    pub url: Option<String>,
    /// Events wanted (none: all).
    pub events: Option<Vec<String>>,
    /// Operator's note.
    pub description: Option<String>,
    /// Enabled (default true).
    pub enabled: Option<bool>,
}

impl Domain {
    /// Now on the domain clock (ms).
    pub fn now_ms(&self) -> i64 {
        self.now()
    }

    /// Runs the chat timers now: fragments after the fragment delay, chat ends (with
    /// transcripts) after the chat timeout.
    pub async fn run_timers(&self) -> DomainResult<TimerOutcome> {
        let now = self.now();
        Ok(self
            .store
            .run_timers(
                now,
                now - duration_ms(self.config.fragment_delay),
                now - duration_ms(self.config.chat_timeout),
            )
            .await?)
    }

    /// Runs the chat timers; how many chats ended.
    pub async fn end_idle_chats(&self) -> DomainResult<usize> {
        Ok(self.run_timers().await?.ended)
    }

    /// The delay after the last message before a fragment is sent.
    pub fn fragment_delay(&self) -> Duration {
        self.config.fragment_delay
    }

    /// Adds a webhook endpoint; its secret is in the answer.
    pub async fn add_webhook(&self, account_id: &str, new: NewWebhook) -> DomainResult<WebhookRow> {
        let url = self.parse_webhook_url(new.url)?;
        let events = parse_events(new.events)?.unwrap_or_else(|| WEBHOOK_EVENTS.join(","));
        let description = new
            .description
            .filter(|d| !d.trim().is_empty())
            .map(|d| parse_label("description", &d, MAX_LABEL_CHARS))
            .transpose()?;
        let row = WebhookRow {
            id: ids::new_id(),
            account_id: account_id.to_owned(),
            url,
            events,
            description,
            enabled: new.enabled.unwrap_or(true),
            secret: ids::new_webhook_secret(),
            created_at: self.now(),
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
        };
        self.store.create_webhook(&row).await?;
        Ok(row)
    }

    /// The endpoints of an account.
    pub async fn list_webhooks(&self, account_id: &str) -> DomainResult<Vec<WebhookRow>> {
        Ok(self.store.list_webhooks(account_id).await?)
    }

    /// One endpoint.
    pub async fn webhook(&self, account_id: &str, id: &str) -> DomainResult<WebhookRow> {
        self.store
            .webhook(account_id, id)
            .await?
            .ok_or_else(|| webhook_not_found(id))
    }

    /// Changes an endpoint.
    pub async fn update_webhook(
        &self,
        account_id: &str,
        id: &str,
        change: NewWebhook,
    ) -> DomainResult<WebhookRow> {
        let patch = WebhookPatch {
            url: match change.url {
                Some(u) => Some(self.parse_webhook_url(Some(u))?),
                None => None,
            },
            events: parse_events(change.events)?,
            description: change.description.map(|d| {
                let d = d.trim().to_owned();
                (!d.is_empty()).then_some(d)
            }),
            enabled: change.enabled,
        };
        self.store
            .update_webhook(account_id, id, patch)
            .await?
            .ok_or_else(|| webhook_not_found(id))
    }

    /// Removes an endpoint and its delivery log.
    pub async fn remove_webhook(&self, account_id: &str, id: &str) -> DomainResult<()> {
        if self.store.remove_webhook(account_id, id).await? {
            Ok(())
        } else {
            Err(webhook_not_found(id))
        }
    }

    /// An endpoint's deliveries, newest first.
    pub async fn webhook_deliveries(
        &self,
        account_id: &str,
        id: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> DomainResult<Vec<DeliveryRow>> {
        self.webhook(account_id, id).await?;
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(DomainError::OutOfRange(format!(
                "limit must be between 1 and {MAX_PAGE}, not {limit}"
            )));
        }
        Ok(self
            .store
            .list_deliveries(account_id, id, before_seq, limit)
            .await?)
    }

    /// One delivery of an endpoint.
    pub async fn webhook_delivery(
        &self,
        account_id: &str,
        id: &str,
        event_id: &str,
    ) -> DomainResult<DeliveryRow> {
        self.webhook(account_id, id).await?;
        self.store
            .delivery(account_id, id, event_id)
            .await?
            .ok_or_else(|| never_delivered(id, event_id))
    }

    /// The attempts of one delivery.
    pub async fn webhook_attempts(
        &self,
        account_id: &str,
        id: &str,
        event_id: &str,
    ) -> DomainResult<Vec<AttemptRow>> {
        self.webhook(account_id, id).await?;
        Ok(self.store.list_attempts(account_id, id, event_id).await?)
    }

    /// Sends an event to an endpoint again (same event id, so receivers can de-duplicate).
    pub async fn replay_webhook(
        &self,
        account_id: &str,
        id: &str,
        event_id: &str,
    ) -> DomainResult<()> {
        self.webhook(account_id, id).await?;
        if self
            .store
            .replay_delivery(account_id, id, event_id, self.now())
            .await?
        {
            Ok(())
        } else {
            Err(never_delivered(id, event_id))
        }
    }

    fn parse_webhook_url(&self, url: Option<String>) -> DomainResult<String> {
        let url = url
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| DomainError::Missing("url is required".into()))?;
        let url = url.trim().to_owned();
        if url.chars().count() > MAX_WEBHOOK_URL {
            return Err(DomainError::OutOfRange(format!(
                "url is longer than {MAX_WEBHOOK_URL} characters"
            )));
        }
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| DomainError::Invalid(format!("url is not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(DomainError::Invalid(format!(
                "url must be http or https, not {}",
                parsed.scheme()
            )));
        }
        let Some(host) = parsed.host() else {
            return Err(DomainError::Invalid("url has no host".into()));
        };
        if self.config.webhook_block_private {
            let ip = match host {
                url::Host::Ipv4(ip) => Some(std::net::IpAddr::V4(ip)),
                url::Host::Ipv6(ip) => Some(std::net::IpAddr::V6(ip)),
                url::Host::Domain(_) => None,
            };
            if ip.is_some_and(crate::webhooks::is_blocked_ip) {
                return Err(DomainError::Invalid(
                    "url points to a private, loopback or link-local address, which this server \
                     does not deliver to (--webhook-block-private)"
                        .into(),
                ));
            }
        }
        Ok(url)
    }
}

fn parse_events(events: Option<Vec<String>>) -> DomainResult<Option<String>> {
    let Some(events) = events else {
        return Ok(None);
    };
    if events.is_empty() {
        return Err(DomainError::Missing(format!(
            "events must name at least one of {}",
            WEBHOOK_EVENTS.join(", ")
        )));
    }
    let mut out: Vec<&str> = Vec::new();
    for e in &events {
        let Some(known) = WEBHOOK_EVENTS.iter().find(|k| **k == e.trim()) else {
            return Err(DomainError::Invalid(format!(
                "unknown event {e}; events are {}",
                WEBHOOK_EVENTS.join(", ")
            )));
        };
        if !out.contains(known) {
            out.push(known);
        }
    }
    Ok(Some(out.join(",")))
}

fn webhook_not_found(id: &str) -> DomainError {
    DomainError::NotFound(format!("Webhook {} does not exist", shown(id)))
}

fn never_delivered(webhook_id: &str, event_id: &str) -> DomainError {
    DomainError::NotFound(format!(
        "event {} was never delivered to webhook {webhook_id}",
        shown(event_id)
    ))
}

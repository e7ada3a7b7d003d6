//! The visitor side: widget sessions and tokens, visitor messages and reads, the feed
//! replay behind the live streams, and the chat lifecycle timer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::*;
use crate::store::{FeedEvent, VisitorProfile, VisitorRow, WidgetAccount};

/// A visitor authenticated by its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitorAuth {
    /// The account of the widget.
    pub account_id: String,
    /// The visitor.
    pub visitor_id: String,
}

/// What a widget sends to start or resume a session (already parsed from the wire).
#[derive(Debug, Clone, Default)]
pub struct SessionStart {
    /// Resume this token's session.
    pub token: Option<String>,
    /// Bind this visitor id (needs `visitor_hash`).
    pub visitor_id: Option<String>,
    /// HMAC of `visitor_id` with the identity key.
    pub visitor_hash: Option<String>,
    /// Name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Browser language.
    pub browser_language: Option<String>,
    /// Current page.
    pub page_url: Option<String>,
    /// Its title.
    pub page_title: Option<String>,
    /// Attributes to merge (a JSON object).
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A started or resumed session.
#[derive(Debug, Clone)]
pub struct VisitorSession {
    /// The visitor as stored.
    pub visitor: VisitorRow,
    /// The token to use on the other calls.
    pub token: String,
}

/// Longest URL a widget may send.
const MAX_URL_CHARS: usize = 2048;

/// A token bucket per key, on the domain clock (so tests can drive it).
pub(super) struct RateLimiter {
    per_minute: u32,
    burst: u32,
    buckets: Mutex<HashMap<String, (f64, i64)>>,
}

const LIMITER_MAX_KEYS: usize = 100_000;

impl RateLimiter {
    pub(super) fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key` at `now` (ms), or says in how many seconds one is there.
    pub(super) fn take(&self, key: &str, now: i64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate_per_ms = f64::from(self.per_minute) / 60_000.0;
        let burst = f64::from(self.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= LIMITER_MAX_KEYS && !buckets.contains_key(key) {
            // Forget full buckets: a visitor idle long enough to be full loses nothing.
            buckets.retain(|_, (tokens, at)| {
                *tokens + (now - *at).max(0) as f64 * rate_per_ms < burst
            });
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((burst, now));
        let refilled = (*tokens + (now - *at).max(0) as f64 * rate_per_ms).min(burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            let wait_ms = (1.0 - refilled) / rate_per_ms;
            Err(((wait_ms / 1000.0).ceil() as u64).max(1))
        }
    }
}

/// Widget ids looked up recently: (account, when).
pub(super) type WidgetCache = Mutex<HashMap<String, (WidgetAccount, Instant)>>;

impl Domain {
    /// The account behind a widget id.
    pub async fn widget(&self, widget_id: &str) -> DomainResult<WidgetAccount> {
        {
            let cache = self.widgets.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((w, at)) = cache.get(widget_id) {
                if at.elapsed() < self.config.key_cache_ttl {
                    return Ok(w.clone());
                }
            }
        }
        let found = if widget_id.len() <= 64 {
            self.store.widget_account(widget_id).await?
        } else {
            None
        };
        let w = found.ok_or_else(|| {
            DomainError::NotFound("Widget does not exist: check the widget id".into())
        })?;
        let mut cache = self.widgets.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= KEY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(widget_id.to_owned(), (w.clone(), Instant::now()));
        Ok(w)
    }

    /// The widget identity of an account (for the CLI).
    pub async fn widget_of(&self, account_id: &str) -> DomainResult<WidgetAccount> {
        self.store
            .widget_of(account_id)
            .await?
            .ok_or_else(|| DomainError::NotFound(format!("account {account_id} does not exist")))
    }

    /// Gives an account a new identity key, which revokes every visitor token.
    pub async fn rotate_identity_key(&self, account_id: &str) -> DomainResult<WidgetAccount> {
        if !self
            .store
            .set_identity_key(account_id, &ids::new_identity_key())
            .await?
        {
            return Err(DomainError::NotFound(format!(
                "account {account_id} does not exist"
            )));
        }
        self.widgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.widget_of(account_id).await
    }

    /// Starts or resumes a visitor session on a widget.
    pub async fn start_session(
        &self,
        widget_id: &str,
        req: SessionStart,
        client: &str,
    ) -> DomainResult<VisitorSession> {
        let w = self.widget(widget_id).await?;
        let from_token = match req.token.as_deref() {
            Some(t) => Some(
                ids::verify_visitor_token(&w.identity_key, &w.account_id, t)
                    .ok_or_else(bad_token)?,
            ),
            None => None,
        };
        let bound = match req.visitor_id {
            Some(id) => {
                let id = VisitorId::parse(Some(id))?;
                let hash = req.visitor_hash.as_deref().unwrap_or_default();
                if !ids::verify_identity_hash(&w.identity_key, id.as_str(), hash) {
                    return Err(DomainError::Unauthorized(
                        "visitorId binding needs visitorHash: the lowercase hex HMAC-SHA256 of \
                         the visitorId keyed by the account's identity key (switchboard \
                         accounts widget); it is missing or wrong"
                            .into(),
                    ));
                }
                Some(id.as_str().to_owned())
            }
            None => None,
        };
        let visitor_id = match (from_token, bound) {
            (Some(a), Some(b)) if a != b => {
                return Err(DomainError::Unauthorized(
                    "token and visitorId name different visitors".into(),
                ))
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => {
                // Only brand-new visitors are limited: they are what a flood would create.
                if let Err(retry_after) = self.session_limiter.take(client, self.now()) {
                    return Err(DomainError::RateLimited {
                        message: "too many new visitor sessions from this address".into(),
                        retry_after,
                    });
                }
                ids::new_visitor_id()
            }
        };
        let attributes = match req.attributes {
            Some(map) => {
                let json = serde_json::Value::Object(map).to_string();
                if json.len() > 16 * 1024 {
                    return Err(DomainError::OutOfRange(
                        "attributes are larger than 16 KiB".into(),
                    ));
                }
                Some(json)
            }
            None => None,
        };
        let profile = VisitorProfile {
            id: visitor_id,
            name: optional_label("name", req.name, MAX_LABEL_CHARS)?,
            email: optional_label("email", req.email, MAX_LABEL_CHARS)?,
            browser_language: optional_label("browserLanguage", req.browser_language, 64)?,
            page_url: optional_label("pageUrl", req.page_url, MAX_URL_CHARS)?,
            page_title: optional_label("pageTitle", req.page_title, MAX_LABEL_CHARS)?,
            attributes,
        };
        let visitor = self
            .store
            .upsert_visitor(&w.account_id, profile, self.now())
            .await?;
        let token = ids::visitor_token(&w.identity_key, &w.account_id, &visitor.id);
        Ok(VisitorSession { visitor, token })
    }

    /// The visitor a token belongs to, on this widget.
    pub async fn authenticate_visitor(
        &self,
        widget_id: &str,
        token: Option<&str>,
    ) -> DomainResult<VisitorAuth> {
        let w = self.widget(widget_id).await?;
        let token = token.filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            DomainError::Unauthorized(
                "visitor token is missing: send Authorization: Bearer <token> from POST /widget/v1/{widgetId}/session".into(),
            )
        })?;
        let visitor_id = ids::verify_visitor_token(&w.identity_key, &w.account_id, token)
            .ok_or_else(bad_token)?;
        Ok(VisitorAuth {
            account_id: w.account_id,
            visitor_id,
        })
    }

    /// A message from the visitor; `isMissed` when no agent of the account is online.
    pub async fn visitor_message(
        &self,
        who: &VisitorAuth,
        text: Text,
        page_url: Option<String>,
        page_title: Option<String>,
    ) -> DomainResult<std::sync::Arc<MessageRow>> {
        let chars = text.as_str().chars().count();
        if chars > self.config.visitor_max_text {
            return Err(DomainError::OutOfRange(format!(
                "text is {chars} characters long; a visitor message may have at most {}",
                self.config.visitor_max_text
            )));
        }
        let key = format!("{}\u{0}{}", who.account_id, who.visitor_id);
        if let Err(retry_after) = self.visitor_limiter.take(&key, self.now()) {
            return Err(DomainError::RateLimited {
                message: format!(
                    "this visitor sends messages too fast (at most {} per minute)",
                    self.config.visitor_messages_per_minute
                ),
                retry_after,
            });
        }
        let page_url = optional_label("pageUrl", page_url, MAX_URL_CHARS)?;
        let page_title = optional_label("pageTitle", page_title, MAX_LABEL_CHARS)?;
        if page_url.is_some() || page_title.is_some() {
            let profile = VisitorProfile {
                id: who.visitor_id.clone(),
                page_url,
                page_title,
                ..VisitorProfile::default()
            };
            self.store
                .upsert_visitor(&who.account_id, profile, self.now())
                .await?;
        }
        let visitor = VisitorId::parse(Some(who.visitor_id.clone()))?;
        self.send_visitor_message(&who.account_id, &visitor, text)
            .await
    }

    /// The visitor has read the agent messages up to and including `message_id`.
    pub async fn visitor_read(
        &self,
        who: &VisitorAuth,
        message_id: Option<String>,
    ) -> DomainResult<()> {
        let id = message_id
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| DomainError::Missing("messageId is required".into()))?;
        let seq = self
            .position_in(&who.account_id, &who.visitor_id, &id)
            .await?
            .ok_or_else(|| {
                DomainError::NotFound(format!(
                    "Message {} does not exist in this conversation",
                    shown(&id)
                ))
            })?;
        Ok(self
            .store
            .mark_read(&who.account_id, &who.visitor_id, seq)
            .await?)
    }

    /// The visitor, as stored.
    pub async fn visitor(&self, account_id: &str, visitor_id: &str) -> DomainResult<VisitorRow> {
        self.store
            .visitor(account_id, visitor_id)
            .await?
            .ok_or_else(|| DomainError::NotFound(format!("visitor {visitor_id} does not exist")))
    }

    /// The feed position of a message of this visitor (a resume point).
    pub async fn cursor_of_message(
        &self,
        account_id: &str,
        visitor_id: &str,
        message_id: &str,
    ) -> DomainResult<i64> {
        self.position_in(account_id, visitor_id, message_id)
            .await?
            .ok_or_else(|| {
                DomainError::Invalid(format!(
                    "after: {} is not a message of this visitor",
                    shown(message_id)
                ))
            })
    }

    /// The newest committed feed position.
    pub async fn feed_head(&self) -> DomainResult<i64> {
        Ok(self.store.feed_head().await?)
    }

    /// Feed entries after `after` for a replay, oldest first, and the position reached
    /// (entries filtered out still move it). Creations and edits of messages deleted since
    /// are left out: their deletion follows.
    pub async fn replay(
        &self,
        account_id: &str,
        visitor_id: Option<&str>,
        after: i64,
        limit: u32,
    ) -> DomainResult<(Vec<FeedEvent>, i64)> {
        let page = self
            .store
            .feed(account_id, visitor_id, after, limit)
            .await?;
        let reached = page.last().map_or(after, |e| e.seq);
        let events = page
            .into_iter()
            .filter(|e| visitor_id.is_none() || e.kind.for_visitor())
            .filter(|e| {
                !matches!(
                    e.kind,
                    EventKind::MessageCreated | EventKind::MessageUpdated
                ) || e.message.as_ref().is_some_and(|m| m.deleted_at.is_none())
            })
            .collect();
        Ok((events, reached))
    }
}

fn bad_token() -> DomainError {
    DomainError::Unauthorized(
        "visitor token is not valid for this widget: start a new session".into(),
    )
}

fn optional_label(field: &str, value: Option<String>, max: usize) -> DomainResult<Option<String>> {
    match value {
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => parse_label(field, &v, max).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let l = RateLimiter::new(60, 3);
        for _ in 0..3 {
            assert!(l.take("v", 0).is_ok());
        }
        assert_eq!(l.take("v", 0), Err(1));
        assert!(l.take("other", 0).is_ok(), "keys are independent");
        assert!(l.take("v", 1_000).is_ok(), "one per second refills");
        assert!(l.take("v", 1_000).is_err());
        let off = RateLimiter::new(0, 1);
        for _ in 0..100 {
            assert!(off.take("v", 0).is_ok());
        }
    }
}

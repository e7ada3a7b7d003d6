//! What both backends' writers share: the open-chat state they keep in memory, the row
//! types read back from either database, and the column lists (the same SQL on both).

use std::sync::LazyLock;

use super::{ChatInfo, DueDelivery, MessageRow, OutboxEvent, StoreError, WebhookRow, Window};

/// An open chat as the writer tracks it.
#[derive(Debug, Clone)]
pub(super) struct OpenChat {
    pub(super) info: ChatInfo,
    pub(super) account_id: String,
    pub(super) visitor_id: String,
    /// Time of the newest not-pushed message.
    pub(super) last_activity: i64,
    /// Time of the newest message, pushed ones included.
    pub(super) last_message_at: i64,
    /// Seq of the newest message.
    pub(super) last_seq: i64,
    /// Messages up to this seq were sent in a fragment.
    pub(super) fragment_seq: i64,
}

impl OpenChat {
    /// Notes a new message of the chat's conversation.
    pub(super) fn note(&mut self, m: &MessageRow) {
        if !m.is_pushed {
            self.last_activity = self.last_activity.max(m.created_at);
        }
        self.last_message_at = self.last_message_at.max(m.created_at);
        self.last_seq = self.last_seq.max(m.seq);
    }

    /// Messages of the chat not yet sent in a fragment: seq in (from, last_seq].
    pub(super) fn unfragmented_from(&self) -> Option<i64> {
        let from = self.fragment_seq.max(self.info.start_seq - 1);
        (self.last_seq > from).then_some(from)
    }
}

pub(super) enum ChatUndo {
    Opened(String),
    Closed(String, OpenChat),
    Fragmented(String, i64),
}

/// How far the current transaction had got, to undo a failed job's part of it.
pub(super) struct Mark {
    pub(super) events: usize,
    pub(super) chat_undo: usize,
    pub(super) added: usize,
}

pub(super) const MESSAGE_COLUMNS: &str =
    "seq, id, account_id, conversation_id, visitor_id, type, text, \
     agent_id, agent_name, agent_userpic, is_pushed, is_missed, is_missed_by_visitor, \
     is_trigger, received_from, created_at, updated_at, deleted_at";

/// The SQL of a page of a visitor's live messages in `window`, and the window's seq. The
/// same on both backends: `$1` the account, `$2` the visitor, then that seq if there is
/// one, then how many rows. Read one row more than the page: [`finish_page`] tells from it
/// whether there are more.
pub(super) fn page_of_messages(window: Window) -> (&'static str, Option<i64>) {
    static SQL: LazyLock<[String; 3]> = LazyLock::new(|| {
        let base = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE account_id = $1 AND visitor_id = $2 \
             AND deleted_at IS NULL"
        );
        [
            format!("{base} ORDER BY seq DESC LIMIT $3"),
            format!("{base} AND seq < $3 ORDER BY seq DESC LIMIT $4"),
            format!("{base} AND seq > $3 ORDER BY seq ASC LIMIT $4"),
        ]
    });
    match window {
        Window::Latest => (&SQL[0], None),
        Window::Before(seq) => (&SQL[1], Some(seq)),
        Window::After(seq) => (&SQL[2], Some(seq)),
    }
}

/// A page of `limit` messages, oldest first, from the rows [`page_of_messages`] read, and
/// whether there are more in the window's direction.
pub(super) fn finish_page(
    mut rows: Vec<MessageRow>,
    window: Window,
    limit: u32,
) -> (Vec<MessageRow>, bool) {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    if !matches!(window, Window::After(_)) {
        rows.reverse();
    }
    (rows, has_more)
}

/// [`MESSAGE_COLUMNS`] of the table aliased `m`, for joins (all NULL when nothing joined).
pub(super) const MESSAGE_COLUMNS_M: &str =
    "m.seq, m.id, m.account_id, m.conversation_id, m.visitor_id, \
     m.type, m.text, m.agent_id, m.agent_name, m.agent_userpic, m.is_pushed, m.is_missed, \
     m.is_missed_by_visitor, m.is_trigger, m.received_from, m.created_at, m.updated_at, \
     m.deleted_at";

/// Columns of [`VisitorRow`] from `visitors v JOIN conversations c`.
pub(super) const VISITOR_COLUMNS: &str = "v.id, v.account_id, v.group_id, v.name, v.email, \
     v.browser_language, v.start_page_url, v.start_page_title, v.page_url, v.page_title, \
     v.attributes, c.id AS conversation_id, v.created_at";

#[derive(sqlx::FromRow)]
pub(super) struct ChatRow {
    pub(super) id: String,
    pub(super) start_seq: i64,
    pub(super) started_at: i64,
    pub(super) ended_at: Option<i64>,
    pub(super) no_agent_online: bool,
    pub(super) start_page_url: Option<String>,
    pub(super) start_page_title: Option<String>,
}

impl From<ChatRow> for ChatInfo {
    fn from(c: ChatRow) -> Self {
        ChatInfo {
            id: c.id,
            start_seq: c.start_seq,
            started_at: c.started_at,
            ended_at: c.ended_at,
            no_agent_online: c.no_agent_online,
            start_page_url: c.start_page_url,
            start_page_title: c.start_page_title,
        }
    }
}

/// Columns of [`ChatRow`].
pub(super) const CHAT_COLUMNS: &str =
    "id, start_seq, started_at, ended_at, no_agent_online, start_page_url, start_page_title";

/// Columns of [`DeliveryRow`] from `webhook_deliveries d JOIN webhook_events e`.
pub(super) const DELIVERY_COLUMNS: &str = "d.webhook_id, d.event_id, e.kind, d.conversation_id, \
     d.event_seq, d.status, d.attempts, d.next_attempt_at, d.created_at, d.last_attempt_at, \
     d.last_status, d.last_error, d.last_latency_ms, d.delivered_at";

pub(super) const WEBHOOK_COLUMNS: &str =
    "id, account_id, url, events, description, enabled, secret, \
     created_at, consecutive_failures, failing_since, last_error";

/// A due delivery as read: the event's and the endpoint's columns, prefixed.
#[derive(sqlx::FromRow)]
pub(super) struct DueRow {
    pub(super) attempts: i64,
    pub(super) e_id: String,
    pub(super) e_seq: i64,
    pub(super) e_account_id: String,
    pub(super) e_conversation_id: String,
    pub(super) e_visitor_id: String,
    pub(super) e_kind: String,
    pub(super) e_chat_id: String,
    pub(super) e_from_seq: i64,
    pub(super) e_to_seq: i64,
    pub(super) e_payload: Option<String>,
    pub(super) e_created_at: i64,
    pub(super) w_id: String,
    pub(super) w_account_id: String,
    pub(super) w_url: String,
    pub(super) w_events: String,
    pub(super) w_description: Option<String>,
    pub(super) w_enabled: bool,
    pub(super) w_secret: String,
    pub(super) w_created_at: i64,
    pub(super) w_consecutive_failures: i64,
    pub(super) w_failing_since: Option<i64>,
    pub(super) w_last_error: Option<String>,
}

impl DueRow {
    pub(super) fn into_due(self) -> DueDelivery {
        DueDelivery {
            attempts: self.attempts,
            event: OutboxEvent {
                id: self.e_id,
                seq: self.e_seq,
                account_id: self.e_account_id,
                conversation_id: self.e_conversation_id,
                visitor_id: self.e_visitor_id,
                kind: self.e_kind,
                chat_id: self.e_chat_id,
                from_seq: self.e_from_seq,
                to_seq: self.e_to_seq,
                payload: self.e_payload,
                created_at: self.e_created_at,
            },
            webhook: WebhookRow {
                id: self.w_id,
                account_id: self.w_account_id,
                url: self.w_url,
                events: self.w_events,
                description: self.w_description,
                enabled: self.w_enabled,
                secret: self.w_secret,
                created_at: self.w_created_at,
                consecutive_failures: self.w_consecutive_failures,
                failing_since: self.w_failing_since,
                last_error: self.w_last_error,
            },
        }
    }
}

pub(super) const AGENT_COLUMNS: &str =
    "id, account_id, name, email, userpic, is_dummy, online_until, created_at";

/// [`AGENT_COLUMNS`] of the table aliased `a`, for joins.
pub(super) const AGENT_COLUMNS_A: &str =
    "a.id, a.account_id, a.name, a.email, a.userpic, a.is_dummy, a.online_until, a.created_at";

#[derive(sqlx::FromRow)]
pub(super) struct OpenChatRow {
    pub(super) id: String,
    pub(super) account_id: String,
    pub(super) conversation_id: String,
    pub(super) visitor_id: String,
    pub(super) start_seq: i64,
    pub(super) started_at: i64,
    pub(super) no_agent_online: bool,
    pub(super) start_page_url: Option<String>,
    pub(super) start_page_title: Option<String>,
    pub(super) last_activity: i64,
    pub(super) last_message_at: i64,
    pub(super) last_seq: i64,
    pub(super) fragment_seq: i64,
}

pub(super) const WEBHOOK_STARTED: &str = "conversationStarted";
pub(super) const WEBHOOK_FRAGMENT: &str = "conversationFragment";
pub(super) const WEBHOOK_TRANSCRIPT: &str = "conversationTranscript";

/// A unique violation as [`StoreError::Conflict`] naming `what`; any other error as it is.
pub(super) fn conflict_on_unique(e: sqlx::Error, what: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(what.to_owned())
        }
        _ => StoreError::Database(e),
    }
}

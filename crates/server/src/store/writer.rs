//! What the two backends' writers keep in memory and do alike, written once: the
//! conversation cache, the feed counter, the open chats with their undo log, the changes of
//! the current transaction, savepoints, idempotency records, and the chat life cycle
//! (start, fragments, end).
//!
//! Each backend's `WriterCtx` holds a [`WriterCore`] and implements [`Writer`], giving
//! its connection and the three statements whose SQL differs between the databases. The
//! SQL here numbers its parameters (`$1`), which sqlx's SQLite driver binds by number just
//! as PostgreSQL does.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{Database, Decode, Encode, Executor, FromRow, IntoArguments, Type};
use tokio::sync::oneshot;

use super::shared::*;
use super::*;

/// The writer's maps keyed by ids, with a faster hash than the standard SipHash (they are
/// looked up for every message of every group commit), still seeded per map.
pub(super) type WriterMap<V> = HashMap<String, V, foldhash::quality::RandomState>;

/// Entries past which the conversation cache starts over.
const CONVERSATION_CACHE_MAX: usize = 200_000;

/// The key of [`WriterCore::conversations`]: the account id's length, then both ids
/// (unambiguous whatever the ids hold), written into a reused buffer.
fn visitor_key(out: &mut String, account_id: &str, visitor_id: &str) {
    out.clear();
    out.push_str(itoa::Buffer::new().format(account_id.len()));
    out.push(':');
    out.push_str(account_id);
    out.push_str(visitor_id);
}

/// What a job leaves for the writer: whether it succeeded (else its savepoint is rolled
/// back) and how to answer its caller once the commit outcome is known.
pub(super) struct JobDone {
    pub(super) ok: bool,
    pub(super) answer: Answer,
}

/// Answers a job's caller, given why the commit failed if it did.
pub(super) type Answer = Box<dyn FnOnce(Option<&CommitFailure>) + Send>;

/// Why a batch's transaction did not take effect, or may not have.
#[derive(Debug, Clone)]
pub(super) enum CommitFailure {
    /// It was rolled back: nothing of it was written.
    RolledBack(String),
    /// The connection broke while it committed (PostgreSQL), or its flush failed and so did
    /// the commit after it (SQLite), and whether it took effect could not be found out.
    Unknown(String),
}

impl CommitFailure {
    /// The error its callers get.
    pub(super) fn error(&self) -> StoreError {
        match self {
            Self::RolledBack(e) => StoreError::Commit(e.clone()),
            Self::Unknown(e) => StoreError::CommitUnknown(e.clone()),
        }
    }
}

/// Work for the writer `W`, run inside its next transaction.
pub(super) type Job<W> = Box<dyn for<'c> FnOnce(&'c mut W) -> BoxFuture<'c, JobDone> + Send>;

/// Wraps `f` as a [`Job`], with the receiver of its result: `f`'s own once the
/// transaction commits, the commit's error if it does not.
pub(super) fn job<W, T, F>(f: F) -> (Job<W>, oneshot::Receiver<StoreResult<T>>)
where
    W: Send + 'static,
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut W) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
{
    let (tx, rx) = oneshot::channel::<StoreResult<T>>();
    let job: Job<W> = Box::new(move |ctx| {
        Box::pin(async move {
            let result = f(ctx).await;
            JobDone {
                ok: result.is_ok(),
                answer: Box::new(move |failure| {
                    let _ = tx.send(match failure {
                        None => result,
                        Some(f) => Err(f.error()),
                    });
                }),
            }
        })
    });
    (job, rx)
}

/// The writer's memory, the same for both backends.
#[derive(Default)]
pub(super) struct WriterCore {
    /// (account, visitor) -> conversation id, for visitors known to exist. A visitor's
    /// conversation never changes, so this cannot go stale. Keyed by [`visitor_key`], so
    /// that a lookup allocates nothing.
    pub(super) conversations: WriterMap<String>,
    /// Entries added in the current transaction, forgotten again if it fails.
    pub(super) added: Vec<String>,
    /// Reused to build [`visitor_key`]s.
    pub(super) key_buf: String,
    /// The next feed position. Messages and events take theirs from this one counter, so
    /// the union of both tables is one ordered log.
    pub(super) next_seq: i64,
    /// Open chats by conversation id.
    pub(super) open_chats: WriterMap<OpenChat>,
    /// Changes to `open_chats` in the current transaction, undone if it fails.
    pub(super) chat_undo: Vec<ChatUndo>,
    /// Changes of the current transaction, published once it commits.
    pub(super) events: Vec<Arc<FeedEvent>>,
    /// Whether the current transaction added or rescheduled webhook deliveries.
    pub(super) outbox_touched: bool,
    /// Whether an account has endpoints for an event, asked once per batch (endpoints are
    /// changed by other processes too, so this is not kept longer).
    pub(super) wanted: HashMap<(String, &'static str), bool>,
    /// Why the current transaction must not commit: a job failed and its writes could not
    /// be undone alone (its savepoint could not be set or rolled back to).
    pub(super) poisoned: Option<String>,
}

impl WriterCore {
    /// The next feed position, taken.
    pub(super) fn take_seq(&mut self) -> i64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// How far the current transaction has got.
    pub(super) fn mark(&self) -> Mark {
        Mark {
            events: self.events.len(),
            chat_undo: self.chat_undo.len(),
            added: self.added.len(),
        }
    }

    /// Forgets what the failed part of a transaction did to the writer's memory.
    pub(super) fn undo_to(&mut self, mark: Mark) {
        self.events.truncate(mark.events);
        // A conversation the undone part found or created may be gone from the database:
        // forget it, or the next message to that visitor would name a conversation that
        // does not exist (the writer's connection checks no foreign keys).
        if self.added.len() > mark.added {
            for key in self.added.drain(mark.added..) {
                self.conversations.remove(&key);
            }
        }
        while self.chat_undo.len() > mark.chat_undo {
            match self.chat_undo.pop() {
                Some(ChatUndo::Opened(conversation)) => {
                    self.open_chats.remove(&conversation);
                }
                Some(ChatUndo::Closed(conversation, chat)) => {
                    self.open_chats.insert(conversation, chat);
                }
                Some(ChatUndo::Fragmented(conversation, before)) => {
                    if let Some(chat) = self.open_chats.get_mut(&conversation) {
                        chat.fragment_seq = before;
                    }
                }
                None => break,
            }
        }
    }

    /// Records a new message's event; the row is shared by the event and the caller's
    /// answer (copying it cost the writer ten allocations per message).
    pub(super) fn message_created(&mut self, m: MessageRow) -> Arc<MessageRow> {
        let m = Arc::new(m);
        self.events.push(Arc::new(FeedEvent {
            seq: m.seq,
            kind: EventKind::MessageCreated,
            account_id: m.account_id.clone(),
            visitor_id: m.visitor_id.clone(),
            conversation_id: m.conversation_id.clone(),
            message: Some(m.clone()),
            chat: None,
        }));
        m
    }

    /// The conversation of a visitor known to exist. The key is built in `key_buf`, so a
    /// lookup allocates nothing.
    fn known_conversation(&mut self, account_id: &str, visitor_id: &str) -> Option<&String> {
        visitor_key(&mut self.key_buf, account_id, visitor_id);
        self.conversations.get(self.key_buf.as_str())
    }

    /// The conversation of a new message that needs nothing written but itself: its
    /// visitor's conversation is known, and it is pushed or its chat is open already.
    pub(super) fn plain_conversation(
        &mut self,
        account_id: &str,
        visitor_id: &str,
        is_pushed: bool,
    ) -> Option<&String> {
        visitor_key(&mut self.key_buf, account_id, visitor_id);
        let conversation = self.conversations.get(self.key_buf.as_str())?;
        (is_pushed || self.open_chats.contains_key(conversation)).then_some(conversation)
    }

    /// After a commit: the transaction's changes stay.
    pub(super) fn committed(&mut self) {
        self.added.clear();
        self.chat_undo.clear();
    }

    /// Whether the current transaction may commit; if not, why (taken: the next
    /// transaction starts clean).
    pub(super) fn may_commit(&mut self) -> Result<(), String> {
        self.poisoned.take().map_or(Ok(()), Err)
    }

    /// After a failed commit: the writer's memory as before the transaction.
    pub(super) fn rolled_back(&mut self) {
        self.undo_to(Mark {
            events: 0,
            chat_undo: 0,
            added: 0,
        });
    }
}

/// A new message for the writer, answered once its batch has committed.
pub(super) struct InsertJob {
    pub(super) row: MessageRow,
    pub(super) idem: Option<IdempotencyRecord>,
    pub(super) reply: oneshot::Sender<StoreResult<Guarded<Arc<MessageRow>>>>,
}

/// Rows per multi-row INSERT: on SQLite 17 parameters each (it allows 32,766 per
/// statement); PostgreSQL binds one array per column, so its statement does not grow.
pub(super) const INSERT_CHUNK: usize = 256;

/// What [`Writer::insert_plain`] owes each caller.
pub(super) type InsertAnswer = (
    oneshot::Sender<StoreResult<Guarded<Arc<MessageRow>>>>,
    StoreResult<Guarded<Arc<MessageRow>>>,
);

/// A backend's writer: its connection, its [`WriterCore`], and what differs between the
/// databases: three statements (events, webhook events, delivery queues) and the three
/// steps of inserting a message (preparing it, inserting rows, inserting one alone). The
/// provided methods are the rest of the writer's work on plain inserts, chats, savepoints,
/// idempotency records and replayed deliveries, the same on both.
///
/// The bounds are what sqlx needs to run these statements on the backend's database;
/// sqlx's SQLite and PostgreSQL drivers meet them all.
pub(super) trait Writer: Send + Sized
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> String: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> Option<String>: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> i64: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> bool: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'r> String: Decode<'r, Self::Db>,
    usize: sqlx::ColumnIndex<<Self::Db as Database>::Row>,
    for<'r> (Option<String>, Option<String>): FromRow<'r, <Self::Db as Database>::Row>,
    for<'r> (String, i64, String, i64): FromRow<'r, <Self::Db as Database>::Row>,
    for<'r> MessageRow: FromRow<'r, <Self::Db as Database>::Row>,
{
    /// The database behind the writer's connection.
    type Db: Database;

    /// The writer's connection and memory, borrowed together.
    fn parts(&mut self) -> (&mut <Self::Db as Database>::Connection, &mut WriterCore);

    /// The writer's memory.
    fn core(&mut self) -> &mut WriterCore {
        self.parts().1
    }

    /// Records a feed event (anything but a message's creation, which the message row is).
    fn insert_event<'a>(
        &'a mut self,
        seq: i64,
        kind: EventKind,
        m: &'a MessageRow,
        chat_id: Option<&'a str>,
        now: i64,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Writes a webhook event and its deliveries, if some enabled endpoint of the account
    /// wants it; part of the caller's transaction. True if it did.
    fn emit_webhook<'a>(
        &'a mut self,
        kind: &'static str,
        chat: &'a OpenChat,
        conversation_id: &'a str,
        from_seq: i64,
        to_seq: i64,
        now: i64,
    ) -> BoxFuture<'a, StoreResult<bool>>;

    /// Points the queue of (endpoint, conversation) at its oldest pending delivery, or
    /// removes it when none is left.
    fn advance_queue<'a>(
        &'a mut self,
        webhook_id: &'a str,
        conversation_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Gives a new message its conversation (creating visitor and conversation on first
    /// contact), its seq (and id, where the backend derives ids from it), and notes it in
    /// its chat (starting one if it is the first of a chat).
    fn prepare_insert(&mut self, row: MessageRow) -> BoxFuture<'_, StoreResult<MessageRow>>;

    /// Inserts messages whose conversation and seq are set, in one statement.
    fn insert_rows<'a>(&'a mut self, rows: &'a [MessageRow]) -> BoxFuture<'a, StoreResult<()>>;

    /// Inserts one message from scratch (prepared here), under its idempotency key if it
    /// has one; meant to run in a savepoint.
    fn insert_guarded(
        &mut self,
        row: MessageRow,
        idem: Option<IdempotencyRecord>,
    ) -> BoxFuture<'_, StoreResult<Guarded<Arc<MessageRow>>>>;

    /// The plain inserts of a batch. Per chunk, every job's preparation and one multi-row
    /// INSERT run in one savepoint (which on PostgreSQL also keeps a failed statement from
    /// aborting the whole transaction). If anything in a chunk fails, the savepoint is
    /// rolled back and its jobs run one by one, each in a savepoint of its own, so that one
    /// bad job fails alone and leaves nothing behind (no visitor or conversation without
    /// the message that made them).
    async fn insert_plain(&mut self, jobs: Vec<InsertJob>) -> Vec<InsertAnswer> {
        let mut out = Vec::with_capacity(jobs.len());
        let mut rest = jobs.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<InsertJob> = rest.by_ref().take(INSERT_CHUNK).collect();
            let rows: Vec<MessageRow> = chunk.iter().map(|j| j.row.clone()).collect();
            let attempt = self
                .in_savepoint_result(move |ctx| {
                    Box::pin(async move {
                        let mut ready = Vec::with_capacity(rows.len());
                        for row in rows {
                            ready.push(ctx.prepare_insert(row).await?);
                        }
                        ctx.insert_rows(&ready).await?;
                        Ok(ready)
                    })
                })
                .await;
            match attempt {
                Ok(ready) => {
                    for (job, row) in chunk.into_iter().zip(ready) {
                        let row = self.core().message_created(row);
                        out.push((job.reply, Ok(Guarded::Applied(row))));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = chunk.len(), "a chunk of inserts failed; inserting one by one");
                    for InsertJob { row, reply, .. } in chunk {
                        let result = self
                            .in_savepoint_result(move |ctx| ctx.insert_guarded(row, None))
                            .await;
                        out.push((reply, result));
                    }
                }
            }
        }
        out
    }

    /// Runs one statement without parameters.
    async fn exec(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        self.parts().0.execute(sql).await.map(|_| ())
    }

    /// Notes a new message's effect on its conversation's chat: a not-pushed message with
    /// no open chat starts one (recorded with an event in this transaction).
    async fn track_chat(&mut self, m: &MessageRow) -> StoreResult<()> {
        if let Some(chat) = self.core().open_chats.get_mut(&m.conversation_id) {
            chat.note(m);
            return Ok(());
        }
        if m.is_pushed {
            return Ok(());
        }
        let chat_id = crate::ids::new_id();
        let no_agent = m.kind == "visitor" && m.is_missed;
        let page: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "INSERT INTO chats (id, account_id, conversation_id, visitor_id, start_seq, \
             started_at, no_agent_online, start_page_url, start_page_title) \
             SELECT $1, $2, $3, $4, $5, $6, $7, page_url, page_title FROM visitors \
             WHERE account_id = $8 AND id = $9 RETURNING start_page_url, start_page_title",
        )
        .bind(&chat_id)
        .bind(&m.account_id)
        .bind(&m.conversation_id)
        .bind(&m.visitor_id)
        .bind(m.seq)
        .bind(m.created_at)
        .bind(no_agent)
        .bind(&m.account_id)
        .bind(&m.visitor_id)
        .fetch_optional(&mut *self.parts().0)
        .await?;
        let (start_page_url, start_page_title) = page.unwrap_or_default();
        let info = ChatInfo {
            id: chat_id,
            start_seq: m.seq,
            started_at: m.created_at,
            ended_at: None,
            no_agent_online: no_agent,
            start_page_url,
            start_page_title,
        };
        let seq = self.core().take_seq();
        self.insert_event(
            seq,
            EventKind::ConversationStarted,
            m,
            Some(&info.id),
            m.created_at,
        )
        .await?;
        self.core().events.push(Arc::new(FeedEvent {
            seq,
            kind: EventKind::ConversationStarted,
            account_id: m.account_id.clone(),
            visitor_id: m.visitor_id.clone(),
            conversation_id: m.conversation_id.clone(),
            message: Some(Arc::new(m.clone())),
            chat: Some(info.clone()),
        }));
        let chat = OpenChat {
            info,
            account_id: m.account_id.clone(),
            visitor_id: m.visitor_id.clone(),
            last_activity: m.created_at,
            last_message_at: m.created_at,
            last_seq: m.seq,
            fragment_seq: 0,
        };
        self.emit_webhook(
            WEBHOOK_STARTED,
            &chat,
            &m.conversation_id,
            m.seq - 1,
            m.seq,
            m.created_at,
        )
        .await?;
        let core = self.core();
        core.open_chats.insert(m.conversation_id.clone(), chat);
        core.chat_undo
            .push(ChatUndo::Opened(m.conversation_id.clone()));
        Ok(())
    }

    /// The conversation of a visitor, creating visitor and conversation on first contact.
    async fn conversation_for(
        &mut self,
        account_id: &str,
        visitor_id: &str,
        now: i64,
    ) -> Result<String, sqlx::Error> {
        if let Some(id) = self.core().known_conversation(account_id, visitor_id) {
            return Ok(id.clone());
        }
        let key = self.core().key_buf.clone();
        let conn = self.parts().0;
        sqlx::query(
            "INSERT INTO visitors (account_id, id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, id) DO NOTHING",
        )
        .bind(account_id)
        .bind(visitor_id)
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO conversations (id, account_id, visitor_id, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, visitor_id) DO NOTHING",
        )
        .bind(crate::ids::new_id())
        .bind(account_id)
        .bind(visitor_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let id: String = sqlx::query_scalar(
            "SELECT id FROM conversations WHERE account_id = $1 AND visitor_id = $2",
        )
        .bind(account_id)
        .bind(visitor_id)
        .fetch_one(&mut *conn)
        .await?;
        let core = self.core();
        if core.conversations.len() >= CONVERSATION_CACHE_MAX {
            core.conversations.clear();
        }
        core.conversations.insert(key.clone(), id.clone());
        core.added.push(key);
        Ok(id)
    }

    /// Runs the chat timers (see [`Store::run_timers`]); returns what it did and the agent
    /// messages that became missed by the visitor (for the cache).
    async fn run_timers_in(
        &mut self,
        now: i64,
        fragment_before: i64,
        idle_before: i64,
    ) -> StoreResult<(TimerOutcome, Vec<MessageRow>)> {
        let mut due: Vec<(String, i64)> = self
            .core()
            .open_chats
            .iter()
            .filter(|(_, c)| {
                c.last_activity < idle_before
                    || (c.unfragmented_from().is_some() && c.last_message_at <= fragment_before)
            })
            .map(|(k, c)| (k.clone(), c.last_activity))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        let mut outcome = TimerOutcome::default();
        let mut flagged = Vec::new();
        for (conversation_id, _) in due {
            let Some(chat) = self.core().open_chats.get(&conversation_id).cloned() else {
                continue;
            };
            // The fragment first: a transcript always follows the last fragment.
            if let Some(from) = chat.unfragmented_from() {
                if self
                    .emit_webhook(
                        WEBHOOK_FRAGMENT,
                        &chat,
                        &conversation_id,
                        from,
                        chat.last_seq,
                        now,
                    )
                    .await?
                {
                    outcome.webhook_events += 1;
                }
                sqlx::query("UPDATE chats SET fragment_seq = $1 WHERE id = $2")
                    .bind(chat.last_seq)
                    .bind(&chat.info.id)
                    .execute(&mut *self.parts().0)
                    .await?;
                let core = self.core();
                if let Some(c) = core.open_chats.get_mut(&conversation_id) {
                    c.fragment_seq = chat.last_seq;
                }
                core.chat_undo.push(ChatUndo::Fragmented(
                    conversation_id.clone(),
                    chat.fragment_seq,
                ));
            }
            if chat.last_activity < idle_before {
                flagged.extend(self.end_chat(&conversation_id, &chat, now).await?);
                outcome.ended += 1;
                if self
                    .emit_webhook(
                        WEBHOOK_TRANSCRIPT,
                        &chat,
                        &conversation_id,
                        chat.info.start_seq - 1,
                        chat.last_seq,
                        now,
                    )
                    .await?
                {
                    outcome.webhook_events += 1;
                }
            }
        }
        let fragment_delay = now - fragment_before;
        let idle_timeout = now - idle_before;
        outcome.next_deadline = self
            .core()
            .open_chats
            .values()
            .map(|c| {
                let end = c.last_activity + idle_timeout;
                match c.unfragmented_from() {
                    Some(_) => end.min(c.last_message_at + fragment_delay),
                    None => end,
                }
            })
            .min();
        Ok((outcome, flagged))
    }

    /// Ends one chat: flags the agent messages the visitor never read and records the end.
    async fn end_chat(
        &mut self,
        conversation_id: &str,
        chat: &OpenChat,
        now: i64,
    ) -> StoreResult<Vec<MessageRow>> {
        let seq = self.core().take_seq();
        let conn = self.parts().0;
        sqlx::query("UPDATE chats SET ended_at = $1, end_seq = $2 WHERE id = $3")
            .bind(now)
            .bind(seq)
            .bind(&chat.info.id)
            .execute(&mut *conn)
            .await?;
        let missed: Vec<MessageRow> = sqlx::query_as(&format!(
            "UPDATE messages SET is_missed_by_visitor = TRUE \
             WHERE account_id = $1 AND visitor_id = $2 AND seq >= $3 AND seq < $4 \
             AND type = 'agent' AND deleted_at IS NULL AND NOT is_missed_by_visitor \
             AND seq > (SELECT visitor_read_seq FROM conversations WHERE id = $5) \
             RETURNING {MESSAGE_COLUMNS}"
        ))
        .bind(&chat.account_id)
        .bind(&chat.visitor_id)
        .bind(chat.info.start_seq)
        .bind(seq)
        .bind(conversation_id)
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO events (seq, account_id, conversation_id, visitor_id, kind, chat_id, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(seq)
        .bind(&chat.account_id)
        .bind(conversation_id)
        .bind(&chat.visitor_id)
        .bind(EventKind::ConversationEnded.as_str())
        .bind(&chat.info.id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let mut info = chat.info.clone();
        info.ended_at = Some(now);
        let core = self.core();
        core.events.push(Arc::new(FeedEvent {
            seq,
            kind: EventKind::ConversationEnded,
            account_id: chat.account_id.clone(),
            visitor_id: chat.visitor_id.clone(),
            conversation_id: conversation_id.to_owned(),
            message: None,
            chat: Some(info),
        }));
        core.open_chats.remove(conversation_id);
        core.chat_undo
            .push(ChatUndo::Closed(conversation_id.to_owned(), chat.clone()));
        Ok(missed)
    }

    /// Runs `f` between SAVEPOINT and RELEASE, rolling back to the savepoint (and the
    /// writer's memory to where it was) if `ok` says it failed. A failed job whose writes
    /// cannot be undone that way poisons the transaction: the batch is rolled back whole
    /// rather than committed with them.
    async fn in_savepoint<R, F>(&mut self, f: F, ok: fn(&R) -> bool) -> R
    where
        F: for<'c> FnOnce(&'c mut Self) -> BoxFuture<'c, R> + Send,
        R: Send,
    {
        let savepoint = self.exec("SAVEPOINT job").await;
        if let Err(e) = &savepoint {
            tracing::error!(error = %e, "savepoint");
        }
        let mark = self.core().mark();
        let result = f(self).await;
        if !ok(&result) {
            let undone = match savepoint {
                Ok(()) => self.exec("ROLLBACK TO job").await,
                Err(e) => Err(e),
            };
            if let Err(e) = undone {
                tracing::error!(error = %e, "a failed job could not be rolled back alone");
                self.core().poisoned = Some(format!("a failed job could not be undone: {e}"));
            }
            self.core().undo_to(mark);
        }
        if let Err(e) = self.exec("RELEASE job").await {
            tracing::error!(error = %e, "releasing savepoint");
        }
        result
    }

    /// [`Writer::in_savepoint`] for a job whose error is its failure.
    async fn in_savepoint_result<T, F>(&mut self, f: F) -> StoreResult<T>
    where
        F: for<'c> FnOnce(&'c mut Self) -> BoxFuture<'c, StoreResult<T>> + Send,
        T: Send,
    {
        self.in_savepoint(f, Result::is_ok).await
    }

    /// Looks up an idempotency key inside the writer's transaction.
    async fn idem_check<T>(
        &mut self,
        account_id: &str,
        rec: &IdempotencyRecord,
    ) -> StoreResult<Option<Guarded<T>>> {
        let row: Option<(String, i64, String, i64)> = sqlx::query_as(
            "SELECT fingerprint, status, body, created_at FROM idempotency_keys \
             WHERE account_id = $1 AND key = $2",
        )
        .bind(account_id)
        .bind(&rec.key)
        .fetch_optional(&mut *self.parts().0)
        .await?;
        Ok(match row {
            Some((fp, status, body, created)) if created >= rec.now - rec.retention_ms => {
                if fp == rec.fingerprint {
                    Some(Guarded::Replayed(StoredResponse {
                        status: u16::try_from(status).unwrap_or(200),
                        body,
                    }))
                } else {
                    Some(Guarded::KeyReused)
                }
            }
            _ => None,
        })
    }

    /// Stores the answer given under an idempotency key.
    async fn idem_save(&mut self, account_id: &str, rec: &IdempotencyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, body, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account_id, key) \
             DO UPDATE SET fingerprint = excluded.fingerprint, status = excluded.status, \
             body = excluded.body, created_at = excluded.created_at",
        )
        .bind(account_id)
        .bind(&rec.key)
        .bind(&rec.fingerprint)
        .bind(i64::from(rec.response.status))
        .bind(&rec.response.body)
        .bind(rec.now)
        .execute(&mut *self.parts().0)
        .await?;
        Ok(())
    }

    /// Puts a delivery back in its queue for another attempt now (see
    /// [`Store::replay_delivery`]); false if the account has no such delivery.
    async fn replay_delivery_in(
        &mut self,
        account_id: &str,
        webhook_id: &str,
        event_id: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let conversation: Option<String> = sqlx::query_scalar(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, \
             created_at = $2 WHERE account_id = $3 AND webhook_id = $4 AND event_id = $5 \
             RETURNING conversation_id",
        )
        .bind(now)
        .bind(now)
        .bind(account_id)
        .bind(webhook_id)
        .bind(event_id)
        .fetch_optional(&mut *self.parts().0)
        .await?;
        let Some(conversation) = conversation else {
            return Ok(false);
        };
        self.advance_queue(webhook_id, &conversation).await?;
        self.core().outbox_touched = true;
        Ok(true)
    }
}

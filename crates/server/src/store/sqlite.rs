//! The embedded SQLite backend.
//!
//! Reads go through a small pool; every write goes through one writer task that commits all
//! writes queued at that moment in a single transaction (group commit), then answers each
//! waiting caller. With WAL and `synchronous=FULL` the commit is fsynced before anyone is
//! answered, so an acknowledged write survives SIGKILL and power loss, and the fsync cost is
//! shared by the whole batch.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use rusqlite::{params, OptionalExtension};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Sqlite};
use tokio::sync::{mpsc, oneshot};

use crate::ids::SeqIds;

use super::cache::{email_key, AgentCache, MessageCache};
use super::inline_reads::{message_at, message_from_row, InlineReads};
use super::reads::ReadConnections;
use super::shared::*;
use super::writer::{
    self, Answer, CommitFailure, InsertJob, Writer, WriterCore, WriterMap, INSERT_CHUNK,
};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The newest migration this build applies to an SQLite database.
pub fn latest_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// How long opening a read connection may take (a file; it waits only on locks, as long
/// as the busy timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tuning of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// fsync every commit (`FULL`, the default) or leave it to the OS (`NORMAL`: survives a
    /// process crash, not a power cut).
    pub synchronous_full: bool,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// Connections for reads.
    pub read_connections: u32,
    /// Recent messages kept in memory for reads (0 disables the cache).
    pub message_cache: usize,
    /// How long an agent looked up by id or email is trusted (changes made by another
    /// process, such as the CLI, are seen after at most this long).
    pub agent_cache_ttl: Duration,
    /// How often a thread of its own copies the WAL back into the database file
    /// (a passive checkpoint), so that the writer never stops to do it. `None` leaves it
    /// to SQLite's own checkpoint at commit, which the writer then runs only past
    /// [`WRITER_AUTOCHECKPOINT`] pages.
    pub checkpoint_every: Option<Duration>,
}

/// WAL pages past which a committing connection checkpoints by itself (SQLite's default
/// is 1,000). The checkpointer thread normally acts long before; this bounds the WAL if it
/// cannot (a reader holding an old snapshot, say).
pub const WRITER_AUTOCHECKPOINT: u32 = 10_000;

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous_full: true,
            max_batch: 512,
            read_connections: 4,
            message_cache: 10_000,
            agent_cache_ttl: Duration::from_secs(2),
            checkpoint_every: Some(Duration::from_millis(100)),
        }
    }
}

type Job = writer::Job<WriterCtx>;

// Moved once through a channel or a Vec: boxing would add an allocation per message.
#[allow(clippy::large_enum_variant)]
enum WriterMsg {
    Job(Job),
    Atomic(Job),
    Insert(InsertJob),
    /// From now on, send committed changes here.
    Feed(mpsc::UnboundedSender<Vec<Arc<FeedEvent>>>),
    Stop(oneshot::Sender<()>),
}

// Moved once through a channel or a Vec: boxing would add an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Job(Job),
    /// A job that is atomic by itself (one statement, or its own savepoint).
    Atomic(Job),
    Insert(InsertJob),
}

/// State owned by the writer task.
struct WriterCtx {
    conn: SqliteConnection,
    /// A second connection to the same file, driven synchronously on the writer's thread,
    /// for the hot path (a batch of only new messages). sqlx hands every statement to a
    /// worker thread and back; this saves that hand-off on each group commit. Both
    /// connections are used by this one thread, one after the other, so they never
    /// contend for SQLite's write lock.
    fast: rusqlite::Connection,
    /// What both backends' writers keep in memory (see [`WriterCore`]).
    core: WriterCore,
    /// The newest committed feed position, readable by everyone.
    head: Arc<AtomicI64>,
    /// Where committed changes go (the real-time fan-out), once someone asked.
    feed: Option<mpsc::UnboundedSender<Vec<Arc<FeedEvent>>>>,
    signals: Signals,
    /// Numbers new message ids (see [`crate::ids::SeqIds`]).
    ids: SeqIds,
}

/// SQLite implementation of [`Store`].
pub struct SqliteStore {
    /// The reads made often (a message, a visitor's page, a stream's replay), on the
    /// caller's thread.
    inline: InlineReads,
    /// Every other read (agents, groups, visitors, webhooks, deliveries).
    reads: ReadConnections<Sqlite>,
    writer: mpsc::Sender<WriterMsg>,
    /// The checkpointer thread, stopped and waited for by `close`.
    checkpointer: std::sync::Mutex<Option<Checkpointer>>,
    messages: MessageCache,
    agents: AgentCache,
    head: Arc<AtomicI64>,
    feed_taken: std::sync::atomic::AtomicBool,
    signals: Signals,
    presence: super::cache::PresenceCache,
    /// Message ids that carry their seq (see [`crate::ids::SeqIds`]).
    ids: SeqIds,
}

/// Picks the message whose id is bound second and third, the first bound value being the
/// seq that id carries (or NULL): by primary key, or through `message_ids` for the ids
/// that carry none. The whole id is compared, so an id that merely decodes matches nothing.
const BY_ID: &str = "seq IN (?, (SELECT seq FROM message_ids WHERE id = ?)) AND id = ?";

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, runs the migrations and
    /// starts the writer task.
    pub async fn open(path: &Path, options: SqliteOptions) -> StoreResult<Self> {
        let connect = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            .pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT.to_string())
            .log_statements(tracing::log::LevelFilter::Trace);
        let connect = match wal_vfs(options.synchronous_full) {
            Some(name) => connect.vfs(name),
            None => connect,
        };

        let mut conn = connect.connect().await?;
        MIGRATOR.run(&mut conn).await?;
        let key: i64 = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'message_id_key'")
            .fetch_one(&mut conn)
            .await?;
        let ids = SeqIds::new(key);

        let reads = ReadConnections::<Sqlite>::new(
            connect,
            options.read_connections.max(1),
            CONNECT_TIMEOUT,
        );

        let (tx, rx) = mpsc::channel(8192);
        // Webhook events take their positions from the same counter (so that deliveries
        // keep the order of what they report) but are not in the feed: the head is the
        // newest feed position, the counter goes on after the newest of all three.
        let (feed_max, webhook_max): (i64, i64) = sqlx::query_as(
            "SELECT max(coalesce((SELECT max(seq) FROM messages), 0), \
                        coalesce((SELECT max(seq) FROM events), 0)), \
                    coalesce((SELECT max(seq) FROM webhook_events), 0)",
        )
        .fetch_one(&mut conn)
        .await?;
        // A restored backup starts numbering above every position the database it replaced
        // handed out (`switchboard restore` records it): a stream client resuming from one
        // of those must not skip what is written after the restore.
        let floor: i64 =
            sqlx::query_scalar("SELECT coalesce(max(value), 0) FROM meta WHERE key = 'seq_floor'")
                .fetch_one(&mut conn)
                .await?;
        let next_seq = feed_max.max(webhook_max).max(floor);
        let head = Arc::new(AtomicI64::new(feed_max));
        let open_chats = load_open_chats(&mut conn).await?;
        let fast = open_fast(path, options.synchronous_full)?;
        // The hot path writes only messages whose account (the caller's) and conversation
        // (from `conversations`, read back from the database) exist, and neither accounts
        // nor conversations are ever deleted: the two parent lookups per message that the
        // foreign keys would cost cannot fail there. Every other write keeps them checked.
        fast.pragma_update(None, "foreign_keys", "OFF")
            .map_err(|e| StoreError::Commit(format!("opening the writer's connection: {e}")))?;
        let signals = Signals::default();
        let ctx = WriterCtx {
            conn,
            fast,
            core: WriterCore {
                next_seq: next_seq + 1,
                open_chats,
                ..WriterCore::default()
            },
            head: head.clone(),
            feed: None,
            signals: signals.clone(),
            ids,
        };
        // The writer gets a thread and runtime of its own: on the shared workers it waited
        // behind every HTTP task at each step of a group commit, which made the commit cycle
        // (and so the write throughput) depend on the request load.
        let max_batch = options.max_batch.max(1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Commit(format!("starting the writer: {e}")))?;
        std::thread::Builder::new()
            .name("switchboard-writer".into())
            .spawn(move || runtime.block_on(writer_loop(ctx, rx, max_batch)))
            .map_err(|e| StoreError::Commit(format!("starting the writer: {e}")))?;
        let checkpointer = match options.checkpoint_every {
            Some(every) => {
                let conn = open_fast(path, options.synchronous_full)?;
                let (stop, stopped) = std::sync::mpsc::sync_channel(1);
                let thread = std::thread::Builder::new()
                    .name("switchboard-checkpoint".into())
                    .spawn(move || checkpoint_loop(conn, every, &stopped))
                    .map_err(|e| StoreError::Commit(format!("starting the checkpointer: {e}")))?;
                Some(Checkpointer { stop, thread })
            }
            None => None,
        };
        Ok(Self {
            inline: InlineReads::new(path, options.read_connections as usize),
            reads,
            writer: tx,
            checkpointer: std::sync::Mutex::new(checkpointer),
            messages: MessageCache::new(options.message_cache),
            agents: AgentCache::new(options.agent_cache_ttl),
            head,
            feed_taken: std::sync::atomic::AtomicBool::new(false),
            signals,
            presence: super::cache::PresenceCache::new(options.agent_cache_ttl),
            ids,
        })
    }

    /// Runs `f` inside the writer's next transaction and returns its result once committed.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriterCtx) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        self.write_with(false, f).await
    }

    /// [`Self::write`] for work that needs no savepoint: a single statement, or statements
    /// whose partial effect is harmless if a later one fails (it saves the savepoint's two
    /// round trips to the database).
    async fn write_atomic<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriterCtx) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        self.write_with(true, f).await
    }

    async fn write_with<T, F>(&self, atomic: bool, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriterCtx) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        let (job, rx) = writer::job(f);
        let msg = if atomic {
            WriterMsg::Atomic(job)
        } else {
            WriterMsg::Job(job)
        };
        self.writer
            .send(msg)
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::Aborted)?
    }
}

async fn writer_loop(mut ctx: WriterCtx, mut rx: mpsc::Receiver<WriterMsg>, max_batch: usize) {
    let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
    let mut stop: Option<oneshot::Sender<()>> = None;
    while stop.is_none() {
        match rx.recv().await {
            Some(WriterMsg::Job(job)) => batch.push(Pending::Job(job)),
            Some(WriterMsg::Atomic(job)) => batch.push(Pending::Atomic(job)),
            Some(WriterMsg::Insert(job)) => batch.push(Pending::Insert(job)),
            Some(WriterMsg::Feed(tx)) => ctx.feed = Some(tx),
            Some(WriterMsg::Stop(done)) => stop = Some(done),
            None => break,
        }
        while batch.len() < max_batch && stop.is_none() {
            match rx.try_recv() {
                Ok(WriterMsg::Job(job)) => batch.push(Pending::Job(job)),
                Ok(WriterMsg::Atomic(job)) => batch.push(Pending::Atomic(job)),
                Ok(WriterMsg::Insert(job)) => batch.push(Pending::Insert(job)),
                Ok(WriterMsg::Feed(tx)) => ctx.feed = Some(tx),
                Ok(WriterMsg::Stop(done)) => stop = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            run_batch(&mut ctx, &mut batch).await;
        }
    }
    // Answer anything still queued with an error rather than leaving callers hanging.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let WriterMsg::Stop(done) = msg {
            let _ = done.send(());
        }
    }
    let close: BoxFuture<'_, Result<(), sqlx::Error>> = Box::pin(ctx.conn.close());
    if let Err(e) = close.await {
        tracing::warn!(error = %e, "closing the writer connection");
    }
    // Closed before the stop is acknowledged: the store's `close` returns with none open.
    drop(ctx.fast);
    if let Some(done) = stop {
        let _ = done.send(());
    }
}

fn run_batch<'a>(ctx: &'a mut WriterCtx, batch: &'a mut Vec<Pending>) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let (writes, started) = (batch.len(), std::time::Instant::now());
        run_batch_inner(ctx, batch).await;
        crate::metrics::counters().commit(writes, started.elapsed());
    })
}

/// An answer owed to a caller once the commit outcome is known.
// Moved once through a channel or a Vec: boxing would add an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Owed {
    Job(Answer),
    Insert(
        oneshot::Sender<StoreResult<Guarded<Arc<MessageRow>>>>,
        StoreResult<Guarded<Arc<MessageRow>>>,
    ),
}

async fn run_batch_inner(ctx: &mut WriterCtx, batch: &mut Vec<Pending>) {
    let started = std::time::Instant::now();
    ctx.core.wanted.clear();
    let size = batch.len();
    if let Some(jobs) = ctx.fast_path_rows(batch) {
        // Only new messages for known conversations, none starting a chat: one
        // transaction on the writer's own synchronous connection, and nothing else.
        let result = insert_rows_now(&ctx.fast, jobs.iter().map(|j| &j.row));
        tracing::debug!(
            size,
            total_us = started.elapsed().as_micros() as u64,
            "group commit (single statement)"
        );
        match result {
            Ok(()) => {
                let answers: Vec<_> = jobs
                    .into_iter()
                    .map(|job| (job.reply, ctx.core.message_created(job.row)))
                    .collect();
                ctx.publish();
                for (reply, row) in answers {
                    let _ = reply.send(Ok(Guarded::Applied(row)));
                }
            }
            Err(e) => {
                ctx.core.events.clear();
                let flush_failed = is_flush_failure(&e);
                let e = format!("inserting messages: {e}");
                tracing::error!(error = %e, rows = jobs.len(), "inserting messages failed");
                let failure = if flush_failed {
                    fence_off(&ctx.fast, e)
                } else {
                    CommitFailure::RolledBack(e)
                };
                for job in jobs {
                    let _ = job.reply.send(Err(failure.error()));
                }
            }
        }
        return;
    }
    if let Err(e) = ctx.exec("BEGIN IMMEDIATE").await {
        tracing::error!(error = %e, jobs = batch.len(), "could not start a write transaction");
        // Dropping the jobs answers their callers with an error; nothing was written.
        batch.clear();
        return;
    }
    let mut owed: Vec<Owed> = Vec::with_capacity(batch.len());
    let mut plain: Vec<InsertJob> = Vec::new();
    for pending in batch.drain(..) {
        match pending {
            Pending::Job(job) => {
                // One failing job must not leave half its writes behind, nor undo the others'.
                let done = ctx.in_savepoint(|ctx| job(ctx), |d| d.ok).await;
                owed.push(Owed::Job(done.answer));
            }
            Pending::Atomic(job) => {
                let mark = ctx.core.mark();
                let done = job(ctx).await;
                if !done.ok {
                    ctx.core.undo_to(mark);
                }
                owed.push(Owed::Job(done.answer));
            }
            Pending::Insert(job) if job.idem.is_some() => {
                let InsertJob { row, idem, reply } = job;
                let result = ctx
                    .in_savepoint_result(move |ctx| Box::pin(insert_guarded(ctx, row, idem)))
                    .await;
                owed.push(Owed::Insert(reply, result));
            }
            Pending::Insert(job) => plain.push(job),
        }
    }
    if !plain.is_empty() {
        for (reply, result) in ctx.insert_plain(plain).await {
            owed.push(Owed::Insert(reply, result));
        }
    }
    let before_commit = started.elapsed();
    let commit = match ctx.core.may_commit() {
        Ok(()) => ctx.exec("COMMIT").await.map_err(|e| {
            let flush_failed = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|code| code == FLUSH_FAILED_CODE);
            (e.to_string(), flush_failed)
        }),
        Err(why) => Err((why, false)),
    };
    tracing::debug!(
        size,
        work_us = before_commit.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "group commit"
    );
    let commit_error = match commit {
        Ok(()) => {
            ctx.core.committed();
            ctx.publish();
            None
        }
        Err((e, flush_failed)) => {
            tracing::error!(error = %e, "commit failed; the batch is rolled back");
            let _ = ctx.exec("ROLLBACK").await;
            ctx.core.rolled_back();
            Some(if flush_failed {
                fence_off(&ctx.fast, e)
            } else {
                CommitFailure::RolledBack(e)
            })
        }
    };
    for o in owed {
        match o {
            Owed::Job(answer) => answer(commit_error.as_ref()),
            Owed::Insert(reply, result) => {
                let _ = reply.send(match &commit_error {
                    None => result,
                    Some(f) => Err(f.error()),
                });
            }
        }
    }
}

/// SQLite's extended result code for a failed flush (`SQLITE_IOERR_FSYNC`), as sqlx words it.
const FLUSH_FAILED_CODE: &str = "1034";

/// Whether a statement failed because flushing the WAL failed: the one failure after which
/// the transaction's frames, commit frame included, are all in the WAL file.
fn is_flush_failure(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_IOERR_FSYNC)
}

/// Settles a commit whose WAL flush failed, so that its callers can be told it did not
/// happen; returns the failure to answer them with.
///
/// SQLite gives up such a commit: the WAL index, and so every reader, never sees its
/// frames. But the frames are in the WAL file, in the page cache and perhaps on the disk,
/// and a restart's WAL recovery reads the file: it would find the commit whole and apply
/// it, after its callers were told it failed and an SDK's retry had written it again. Any
/// later commit writes its frames from where the failed one's begin, which breaks their
/// checksum chain, and recovery stops at the first frame that does not chain. So this
/// commits one at once (page 1 rewritten as it is) and flushes it. If that flush fails
/// too, the disk is failing and nothing can be promised: the outcome is unknown.
fn fence_off(conn: &rusqlite::Connection, e: String) -> CommitFailure {
    let fence = conn
        .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
        .and_then(|v| conn.pragma_update(None, "user_version", v));
    match fence {
        Ok(()) => {
            tracing::error!(
                "the disk failed to flush a commit; a commit after it was flushed, so the \
                 failed one can never be applied and its callers are told it was not"
            );
            CommitFailure::RolledBack(e)
        }
        Err(fence) => {
            tracing::error!(
                error = %fence,
                "the disk failed to flush a commit, and the commit meant to fence it off failed \
                 too: a restart may yet apply it; its callers are told the outcome is unknown"
            );
            CommitFailure::Unknown(format!("{e}; the disk failed to flush the commit"))
        }
    }
}

/// An insert guarded by an idempotency key: replay, refuse, or insert and remember.
async fn insert_guarded(
    ctx: &mut WriterCtx,
    mut m: MessageRow,
    idem: Option<IdempotencyRecord>,
) -> StoreResult<Guarded<Arc<MessageRow>>> {
    if let Some(rec) = &idem {
        if let Some(g) = ctx.idem_check(&m.account_id, rec).await? {
            return Ok(g);
        }
    }
    m.conversation_id = ctx
        .conversation_for(&m.account_id, &m.visitor_id, m.created_at)
        .await?;
    // A row numbered already (by `insert_plain`) has its id; an idempotent insert keeps the
    // id its stored answer holds, listed in `message_ids` since it carries no seq.
    let alias = m.seq == 0 && idem.is_some() && !m.id.is_empty();
    if m.seq == 0 {
        m.seq = ctx.core.take_seq();
        if !alias {
            m.id = ctx.ids.encode(m.seq);
        }
    }
    ctx.track_chat(&m).await?;
    insert_rows(&mut ctx.conn, std::slice::from_ref(&m)).await?;
    if alias {
        sqlx::query("INSERT INTO message_ids (id, seq) VALUES (?, ?)")
            .bind(&m.id)
            .bind(m.seq)
            .execute(&mut ctx.conn)
            .await?;
    }
    let m = ctx.core.message_created(m);
    if let Some(rec) = &idem {
        ctx.idem_save(&m.account_id, rec).await?;
    }
    Ok(Guarded::Applied(m))
}

/// Gives a new message its conversation (creating visitor and conversation on first
/// contact), seq and id, and notes it in its chat (starting one if it is the first of a
/// chat).
async fn prepare_insert(ctx: &mut WriterCtx, mut row: MessageRow) -> StoreResult<MessageRow> {
    row.conversation_id = ctx
        .conversation_for(&row.account_id, &row.visitor_id, row.created_at)
        .await?;
    row.seq = ctx.core.take_seq();
    row.id = ctx.ids.encode(row.seq);
    ctx.track_chat(&row).await?;
    Ok(row)
}

/// The VFS of a store's connections. With `synchronous = FULL` SQLite syncs the WAL at
/// every commit before any other connection can see the commit, which is what
/// [`switchboard_walvfs`] needs to hand a commit's WAL frames to the kernel in one write
/// instead of two per page; otherwise (or if it cannot be registered) SQLite's default.
/// Registration happens once per process; later calls only read its outcome.
fn wal_vfs(synchronous_full: bool) -> Option<&'static str> {
    if !synchronous_full {
        return None;
    }
    match switchboard_walvfs::register() {
        Ok(()) => Some(switchboard_walvfs::NAME),
        Err(e) => {
            tracing::warn!(error = %e, "writing WAL frames with SQLite's default VFS");
            None
        }
    }
}

/// Opens a synchronous connection (the writer's [`WriterCtx::fast`], the checkpointer's) with the same
/// settings (and VFS) as the sqlx ones; the migrations have already run and set WAL mode.
fn open_fast(path: &Path, synchronous_full: bool) -> StoreResult<rusqlite::Connection> {
    let open = || -> rusqlite::Result<(rusqlite::Connection, String)> {
        let conn = match wal_vfs(synchronous_full) {
            Some(vfs) => rusqlite::Connection::open_with_flags_and_vfs(
                path,
                rusqlite::OpenFlags::default(),
                vfs,
            )?,
            None => rusqlite::Connection::open(path)?,
        };
        conn.busy_timeout(Duration::from_secs(10))?;
        // Durability rests on this: FULL fsyncs the WAL at every commit.
        conn.pragma_update(
            None,
            "synchronous",
            if synchronous_full { "FULL" } else { "NORMAL" },
        )?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)?;
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        Ok((conn, mode))
    };
    let (conn, mode) =
        open().map_err(|e| StoreError::Commit(format!("opening the writer's connection: {e}")))?;
    // Reads run beside the writer only in WAL mode, which the migrations set.
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Commit(format!(
            "the database is in journal mode {mode}, not wal"
        )));
    }
    Ok(conn)
}

/// Copies committed WAL pages back into the database file every `every`, off the writer's
/// thread: run by the writer at commit (SQLite's default), a checkpoint stalled every
/// writer's caller for its copy and two fsyncs, about every 80 group commits under load.
/// A passive checkpoint never blocks the writer; once it has copied everything, the
/// writer's next transaction starts the WAL over from its beginning. Ends when `stop`
/// receives or its sender is dropped.
fn checkpoint_loop(
    conn: rusqlite::Connection,
    every: Duration,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        match checkpoint(&conn) {
            Ok((log, copied)) => tracing::trace!(log, copied, "checkpoint"),
            Err(e) => tracing::warn!(error = %e, "checkpointing the WAL"),
        }
    }
}

/// The checkpointer thread of a [`SqliteStore`], stopped and waited for by `close`.
struct Checkpointer {
    /// Dropped to stop the thread.
    stop: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// One passive checkpoint: (pages in the WAL, pages of it now in the database file).
/// Nothing to do, and no fsync, when nothing was committed since the last one.
fn checkpoint(conn: &rusqlite::Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// The columns a new message is written with, in the order both inserts bind them.
macro_rules! insert_message_into {
    () => {
        "INSERT INTO messages (seq, id, account_id, conversation_id, visitor_id, type, text, \
         agent_id, agent_name, agent_userpic, is_pushed, is_missed, is_missed_by_visitor, \
         is_trigger, received_from, created_at, updated_at) "
    };
}

const INSERT_MESSAGE: &str = concat!(
    insert_message_into!(),
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
);

/// Inserts messages whose conversation and seq are set, in one transaction of their own on
/// the writer's synchronous connection: all of them or, on any error, none.
fn insert_rows_now<'a, I>(conn: &rusqlite::Connection, rows: I) -> rusqlite::Result<()>
where
    I: IntoIterator<Item = &'a MessageRow>,
    I::IntoIter: ExactSizeIterator,
{
    let rows = rows.into_iter();
    let single = rows.len() == 1;
    let insert_all = || -> rusqlite::Result<()> {
        let mut stmt = conn.prepare_cached(INSERT_MESSAGE)?;
        for m in rows {
            stmt.execute(rusqlite::params![
                m.seq,
                m.id,
                m.account_id,
                m.conversation_id,
                m.visitor_id,
                m.kind,
                m.text,
                m.agent_id,
                m.agent_name,
                m.agent_userpic,
                m.is_pushed,
                m.is_missed,
                m.is_missed_by_visitor,
                m.is_trigger,
                m.received_from,
                m.created_at,
                m.updated_at,
            ])?;
        }
        Ok(())
    };
    if single {
        // One statement in autocommit mode is its own transaction.
        return insert_all();
    }
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let result = insert_all().and_then(|()| conn.prepare_cached("COMMIT")?.execute([]).map(|_| ()));
    if result.is_err() && !conn.is_autocommit() {
        // Nothing of a failed batch may stay, nor the transaction stay open.
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "rolling back a failed insert");
        }
    }
    result
}

/// Inserts messages whose conversation and seq are set.
fn insert_rows<'a>(
    conn: &'a mut SqliteConnection,
    rows: &'a [MessageRow],
) -> BoxFuture<'a, StoreResult<()>> {
    Box::pin(async move {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(insert_message_into!());
        qb.push_values(rows, |mut b, m| {
            b.push_bind(m.seq)
                .push_bind(&m.id)
                .push_bind(&m.account_id)
                .push_bind(&m.conversation_id)
                .push_bind(&m.visitor_id)
                .push_bind(&m.kind)
                .push_bind(&m.text)
                .push_bind(&m.agent_id)
                .push_bind(&m.agent_name)
                .push_bind(&m.agent_userpic)
                .push_bind(m.is_pushed)
                .push_bind(m.is_missed)
                .push_bind(m.is_missed_by_visitor)
                .push_bind(m.is_trigger)
                .push_bind(&m.received_from)
                .push_bind(m.created_at)
                .push_bind(m.updated_at);
        });
        qb.build().execute(conn).await?;
        Ok(())
    })
}

impl WriterCtx {
    /// The rows of a batch that can be written by one statement: only plain inserts
    /// (no idempotency key), all to visitors whose conversation is known, none starting a
    /// chat, at most one chunk. Their seqs are taken and their chats' activity noted.
    /// The batch is taken (emptied) only when it qualifies; the rows come with their
    /// callers, in order.
    fn fast_path_rows(&mut self, batch: &mut Vec<Pending>) -> Option<Vec<InsertJob>> {
        if batch.len() > INSERT_CHUNK {
            return None;
        }
        // The conversation is written into the row as it is found: a batch that does not
        // qualify takes the slow path, which sets every row's conversation again.
        let qualifies = batch.iter_mut().all(|pending| {
            let Pending::Insert(job) = pending else {
                return false;
            };
            if job.idem.is_some() {
                return false;
            }
            let row = &mut job.row;
            match self
                .core
                .plain_conversation(&row.account_id, &row.visitor_id, row.is_pushed)
            {
                Some(conversation) => {
                    row.conversation_id.clone_from(conversation);
                    true
                }
                None => false,
            }
        });
        if !qualifies {
            return None;
        }
        let mut jobs = Vec::with_capacity(batch.len());
        for pending in batch.drain(..) {
            let Pending::Insert(mut job) = pending else {
                unreachable!("checked above: only inserts")
            };
            job.row.seq = self.core.take_seq();
            job.row.id = self.ids.encode(job.row.seq);
            if let Some(chat) = self.core.open_chats.get_mut(&job.row.conversation_id) {
                chat.note(&job.row);
            }
            jobs.push(job);
        }
        Some(jobs)
    }

    /// After a commit: moves the head and hands the transaction's changes to the feed.
    fn publish(&mut self) {
        if std::mem::take(&mut self.core.outbox_touched) {
            self.signals.outbox.notify_one();
        }
        let mut events = std::mem::take(&mut self.core.events);
        let Some(last) = events.iter().map(|e| e.seq).max() else {
            return;
        };
        if events.iter().any(|e| e.kind == EventKind::MessageCreated) {
            self.signals.activity.notify_one();
        }
        self.head.fetch_max(last, Ordering::SeqCst);
        events.sort_by_key(|e| e.seq);
        if let Some(feed) = &self.feed {
            if feed.send(events).is_err() {
                self.feed = None;
            }
        }
    }
}

impl Writer for WriterCtx {
    type Db = sqlx::Sqlite;

    fn parts(&mut self) -> (&mut SqliteConnection, &mut WriterCore) {
        (&mut self.conn, &mut self.core)
    }

    fn prepare_insert(&mut self, row: MessageRow) -> BoxFuture<'_, StoreResult<MessageRow>> {
        Box::pin(prepare_insert(self, row))
    }

    fn insert_rows<'a>(&'a mut self, rows: &'a [MessageRow]) -> BoxFuture<'a, StoreResult<()>> {
        insert_rows(&mut self.conn, rows)
    }

    fn insert_guarded(
        &mut self,
        row: MessageRow,
        idem: Option<IdempotencyRecord>,
    ) -> BoxFuture<'_, StoreResult<Guarded<Arc<MessageRow>>>> {
        Box::pin(insert_guarded(self, row, idem))
    }

    fn insert_event<'a>(
        &'a mut self,
        seq: i64,
        kind: EventKind,
        m: &'a MessageRow,
        chat_id: Option<&'a str>,
        now: i64,
    ) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO events (seq, account_id, conversation_id, visitor_id, kind, \
                 message_id, message_seq, chat_id, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(seq)
            .bind(&m.account_id)
            .bind(&m.conversation_id)
            .bind(&m.visitor_id)
            .bind(kind.as_str())
            .bind(&m.id)
            .bind(m.seq)
            .bind(chat_id)
            .bind(now)
            .execute(&mut self.conn)
            .await?;
            Ok(())
        })
    }

    fn emit_webhook<'a>(
        &'a mut self,
        kind: &'static str,
        chat: &'a OpenChat,
        conversation_id: &'a str,
        from_seq: i64,
        to_seq: i64,
        now: i64,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let key = (chat.account_id.clone(), kind);
            let wanted = match self.core.wanted.get(&key) {
                Some(w) => *w,
                None => {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM webhooks WHERE account_id = ? AND enabled = 1 \
                         AND instr(',' || events || ',', ',' || ? || ',') > 0",
                    )
                    .bind(&chat.account_id)
                    .bind(kind)
                    .fetch_one(&mut self.conn)
                    .await?;
                    self.core.wanted.insert(key, n > 0);
                    n > 0
                }
            };
            if !wanted {
                return Ok(false);
            }
            let seq = self.core.take_seq();
            let id = format!("evt_{}", crate::ids::new_id());
            // One round trip: the event, a delivery per endpoint that wants it, and a queue
            // head for each endpoint that has none for this conversation yet (an existing head
            // keeps its place: this event waits its turn behind it).
            sqlx::query(
                "INSERT INTO webhook_events (id, seq, account_id, conversation_id, visitor_id, \
                   kind, chat_id, from_seq, to_seq, created_at) \
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?); \
                 INSERT INTO webhook_deliveries (webhook_id, event_id, account_id, \
                   conversation_id, event_seq, next_attempt_at, created_at) \
                   SELECT w.id, ?, ?, ?, ?, ?, ? FROM webhooks w WHERE w.account_id = ? \
                   AND w.enabled = 1 AND instr(',' || w.events || ',', ',' || ? || ',') > 0; \
                 INSERT INTO webhook_queues (webhook_id, conversation_id, head_seq, \
                   next_attempt_at) \
                   SELECT w.id, ?, ?, ? FROM webhooks w WHERE w.account_id = ? AND w.enabled = 1 \
                   AND instr(',' || w.events || ',', ',' || ? || ',') > 0 \
                   ON CONFLICT (webhook_id, conversation_id) DO NOTHING",
            )
            .bind(&id)
            .bind(seq)
            .bind(&chat.account_id)
            .bind(conversation_id)
            .bind(&chat.visitor_id)
            .bind(kind)
            .bind(&chat.info.id)
            .bind(from_seq)
            .bind(to_seq)
            .bind(now)
            .bind(&id)
            .bind(&chat.account_id)
            .bind(conversation_id)
            .bind(seq)
            .bind(now)
            .bind(now)
            .bind(&chat.account_id)
            .bind(kind)
            .bind(conversation_id)
            .bind(seq)
            .bind(now)
            .bind(&chat.account_id)
            .bind(kind)
            .execute(&mut self.conn)
            .await?;
            self.core.outbox_touched = true;
            Ok(true)
        })
    }

    fn advance_queue<'a>(
        &'a mut self,
        webhook_id: &'a str,
        conversation_id: &'a str,
    ) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            bind_advance_queue(sqlx::query(ADVANCE_QUEUE_SQL), webhook_id, conversation_id)
                .execute(&mut self.conn)
                .await?;
            Ok(())
        })
    }
}

/// The open chats at start-up, with their last activity recomputed from the messages.
async fn load_open_chats(conn: &mut SqliteConnection) -> StoreResult<WriterMap<OpenChat>> {
    let rows: Vec<OpenChatRow> = sqlx::query_as(
        "SELECT c.id, c.account_id, c.conversation_id, c.visitor_id, c.start_seq, c.started_at, \
         c.no_agent_online, c.start_page_url, c.start_page_title, \
         coalesce((SELECT max(m.created_at) FROM messages m WHERE m.account_id = c.account_id \
                   AND m.visitor_id = c.visitor_id AND m.seq >= c.start_seq AND m.is_pushed = 0), \
                  c.started_at) AS last_activity, \
         coalesce((SELECT max(m.created_at) FROM messages m WHERE m.account_id = c.account_id \
                   AND m.visitor_id = c.visitor_id AND m.seq >= c.start_seq), \
                  c.started_at) AS last_message_at, \
         coalesce((SELECT max(m.seq) FROM messages m WHERE m.account_id = c.account_id \
                   AND m.visitor_id = c.visitor_id AND m.seq >= c.start_seq), \
                  c.start_seq) AS last_seq, \
         c.fragment_seq \
         FROM chats c WHERE c.ended_at IS NULL",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.conversation_id,
                OpenChat {
                    info: ChatInfo {
                        id: r.id,
                        start_seq: r.start_seq,
                        started_at: r.started_at,
                        ended_at: None,
                        no_agent_online: r.no_agent_online,
                        start_page_url: r.start_page_url,
                        start_page_title: r.start_page_title,
                    },
                    account_id: r.account_id,
                    visitor_id: r.visitor_id,
                    last_activity: r.last_activity,
                    last_message_at: r.last_message_at,
                    last_seq: r.last_seq,
                    fragment_seq: r.fragment_seq,
                },
            )
        })
        .collect())
}

/// Points the queue of (endpoint, conversation) at its oldest pending delivery, or removes
/// it when none is left (6 parameters: see [`bind_advance_queue`]).
const ADVANCE_QUEUE_SQL: &str = "\
    INSERT INTO webhook_queues (webhook_id, conversation_id, head_seq, next_attempt_at) \
      SELECT webhook_id, conversation_id, event_seq, next_attempt_at \
      FROM webhook_deliveries WHERE webhook_id = ? AND conversation_id = ? \
      AND status = 'pending' ORDER BY event_seq LIMIT 1 \
      ON CONFLICT (webhook_id, conversation_id) DO UPDATE SET \
      head_seq = excluded.head_seq, next_attempt_at = excluded.next_attempt_at; \
    DELETE FROM webhook_queues WHERE webhook_id = ? AND conversation_id = ? \
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries WHERE webhook_id = ? \
      AND conversation_id = ? AND status = 'pending'); ";

fn bind_advance_queue<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    webhook_id: &str,
    conversation_id: &str,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let mut q = q;
    for _ in 0..3 {
        q = q
            .bind(webhook_id.to_owned())
            .bind(conversation_id.to_owned());
    }
    q
}

/// The statements that record one attempt (16 parameters), followed by
/// [`ADVANCE_QUEUE_SQL`]: the delivery's new state and the attempt log.
const RECORD_ATTEMPT_SQL: &str = "\
    UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?, \
      next_attempt_at = coalesce(?, next_attempt_at), last_attempt_at = ?, \
      last_status = ?, last_error = ?, last_latency_ms = ?, \
      delivered_at = CASE WHEN ? THEN ? ELSE delivered_at END \
      WHERE webhook_id = ? AND event_id = ?; \
    INSERT INTO webhook_attempts (webhook_id, event_id, attempt, at, status_code, \
      latency_ms, error) \
      SELECT webhook_id, event_id, attempts, ?, ?, ?, ? FROM webhook_deliveries \
      WHERE webhook_id = ? AND event_id = ?; ";

/// Records attempts: all of their delivery, log and queue changes go to SQLite in one round
/// trip inside a savepoint of their own; endpoint health is then updated where it changes.
async fn record_attempts_in(
    ctx: &mut WriterCtx,
    outcomes: Vec<AttemptOutcome>,
) -> StoreResult<Vec<EndpointHealth>> {
    let mut sql = String::with_capacity(
        outcomes.len() * (RECORD_ATTEMPT_SQL.len() + ADVANCE_QUEUE_SQL.len()),
    );
    for _ in &outcomes {
        sql.push_str(RECORD_ATTEMPT_SQL);
        sql.push_str(ADVANCE_QUEUE_SQL);
    }
    let mut q = sqlx::query(&sql);
    for o in &outcomes {
        let delivered = o.error.is_none();
        let status = match (delivered, o.retry_at) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        let status_code = o.status_code.map(i64::from);
        q = q
            .bind(status)
            .bind(o.retry_at)
            .bind(o.at)
            .bind(status_code)
            .bind(o.error.clone())
            .bind(o.latency_ms)
            .bind(delivered)
            .bind(o.at)
            .bind(o.webhook_id.clone())
            .bind(o.event_id.clone())
            .bind(o.at)
            .bind(status_code)
            .bind(o.latency_ms)
            .bind(o.error.clone())
            .bind(o.webhook_id.clone())
            .bind(o.event_id.clone());
        q = bind_advance_queue(q, &o.webhook_id, &o.conversation_id);
    }
    q.execute(&mut ctx.conn).await?;
    ctx.core.outbox_touched = true;
    let mut health = Vec::with_capacity(outcomes.len());
    for o in &outcomes {
        health.push(super::portable::update_health::<sqlx::Sqlite>(&mut ctx.conn, o).await?);
    }
    Ok(health)
}

/// One row of the feed union: the event and, when it concerns one, its message.
struct FeedRow {
    fseq: i64,
    fkind: String,
    fconversation: String,
    fvisitor: String,
    fchat: Option<String>,
    message: Option<MessageRow>,
}

impl FeedRow {
    /// The feed SQL's row: five columns of the event, then [`MESSAGE_COLUMNS_M`] (null when
    /// the event concerns no message).
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        const MESSAGE: usize = 5;
        let id: Option<String> = r.get(MESSAGE + 1)?;
        Ok(FeedRow {
            fseq: r.get(0)?,
            fkind: r.get(1)?,
            fconversation: r.get(2)?,
            fvisitor: r.get(3)?,
            fchat: r.get(4)?,
            message: id.map(|_| message_at(r, MESSAGE)).transpose()?,
        })
    }
}

/// A chat from a row of [`CHAT_COLUMNS`], by position.
fn chat_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChatRow> {
    Ok(ChatRow {
        id: r.get(0)?,
        start_seq: r.get(1)?,
        started_at: r.get(2)?,
        ended_at: r.get(3)?,
        no_agent_online: r.get(4)?,
        start_page_url: r.get(5)?,
        start_page_title: r.get(6)?,
    })
}

static CHAT_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?"));

/// The feed's SQL for an account (`[0]`) or for one visitor of it (`[1]`).
static FEED_SQL: LazyLock<[String; 2]> = LazyLock::new(|| {
    [false, true].map(|one_visitor| {
        let (visitor_m, visitor_e) = if one_visitor {
            ("AND m.visitor_id = ?", "AND e.visitor_id = ?")
        } else {
            ("", "")
        };
        let cols = MESSAGE_COLUMNS_M;
        // Each branch is cut at `limit` first, so the union never sorts more than twice that.
        format!(
            "SELECT * FROM (SELECT m.seq AS fseq, 'messageCreated' AS fkind, \
               m.conversation_id AS fconversation, m.visitor_id AS fvisitor, NULL AS fchat, {cols} \
               FROM messages m WHERE m.account_id = ? {visitor_m} AND m.seq > ? \
               ORDER BY m.seq LIMIT ?) \
             UNION ALL \
             SELECT * FROM (SELECT e.seq AS fseq, e.kind AS fkind, e.conversation_id, e.visitor_id, \
               e.chat_id, {cols} \
               FROM events e LEFT JOIN messages m ON m.seq = e.message_seq \
               WHERE e.account_id = ? {visitor_e} AND e.seq > ? ORDER BY e.seq LIMIT ?) \
             ORDER BY fseq LIMIT ?"
        )
    })
});

async fn insert_agent(
    conn: &mut SqliteConnection,
    account_id: &str,
    a: &NewAgent,
) -> StoreResult<AgentRow> {
    let email_key = a.email.as_deref().map(|e| email_key(e).into_owned());
    sqlx::query(
        "INSERT INTO agents (id, account_id, name, email, email_key, userpic, is_dummy, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&a.id)
    .bind(account_id)
    .bind(&a.name)
    .bind(&a.email)
    .bind(&email_key)
    .bind(&a.userpic)
    .bind(a.is_dummy)
    .bind(a.created_at)
    .execute(&mut *conn)
    .await
    .map_err(|e| conflict_on_unique(e, "an agent with this email"))?;
    for group in &a.groups {
        sqlx::query("INSERT INTO group_members (group_id, agent_id, account_id) VALUES (?, ?, ?)")
            .bind(group)
            .bind(&a.id)
            .bind(account_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(AgentRow {
        id: a.id.clone(),
        account_id: account_id.to_owned(),
        name: a.name.clone(),
        email: a.email.clone(),
        userpic: a.userpic.clone(),
        is_dummy: a.is_dummy,
        online_until: 0,
        created_at: a.created_at,
    })
}

impl super::portable::SqlBackend for SqliteStore {
    type Db = sqlx::Sqlite;

    type Reader<'a> = &'a ReadConnections<Sqlite>;

    fn reader(&self) -> &ReadConnections<Sqlite> {
        &self.reads
    }

    fn agents(&self) -> &AgentCache {
        &self.agents
    }

    fn write_sql<T, F>(&self, f: F) -> impl std::future::Future<Output = StoreResult<T>> + Send
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        self.write(move |ctx: &mut WriterCtx| f(&mut ctx.conn))
    }

    fn rows_affected(r: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        r.rows_affected()
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ensure_default_account(&self, name: &str, now: i64) -> StoreResult<(Account, bool)> {
        let name = name.to_owned();
        self.write(move |ctx| {
            Box::pin(async move {
                let existing: Option<Account> = sqlx::query_as(
                    "SELECT id, name, is_default, created_at FROM accounts WHERE is_default = 1",
                )
                .fetch_optional(&mut ctx.conn)
                .await?;
                if let Some(a) = existing {
                    return Ok((a, false));
                }
                let account = Account {
                    id: crate::ids::new_id(),
                    name,
                    is_default: true,
                    created_at: now,
                };
                sqlx::query(
                    "INSERT INTO accounts (id, name, is_default, created_at, widget_id, \
                     identity_key) VALUES (?, ?, 1, ?, ?, ?)",
                )
                .bind(&account.id)
                .bind(&account.name)
                .bind(now)
                .bind(crate::ids::new_widget_id())
                .bind(crate::ids::new_identity_key())
                .execute(&mut ctx.conn)
                .await?;
                Ok((account, true))
            })
        })
        .await
    }

    async fn create_account(&self, id: &str, name: &str, now: i64) -> StoreResult<Account> {
        let account = Account {
            id: id.to_owned(),
            name: name.to_owned(),
            is_default: false,
            created_at: now,
        };
        self.write(move |ctx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO accounts (id, name, is_default, created_at, widget_id, \
                     identity_key) VALUES (?, ?, 0, ?, ?, ?)",
                )
                .bind(&account.id)
                .bind(&account.name)
                .bind(now)
                .bind(crate::ids::new_widget_id())
                .bind(crate::ids::new_identity_key())
                .execute(&mut ctx.conn)
                .await?;
                Ok(account)
            })
        })
        .await
    }

    async fn create_agent(&self, account_id: &str, agent: &NewAgent) -> StoreResult<AgentRow> {
        let (account_id, agent) = (account_id.to_owned(), agent.clone());
        self.write(move |ctx| {
            Box::pin(async move { insert_agent(&mut ctx.conn, &account_id, &agent).await })
        })
        .await
        .inspect(|_| {
            self.agents.clear();
            self.presence.clear();
        })
    }

    async fn agent_by_email_or_create(
        &self,
        account_id: &str,
        agent: &NewAgent,
    ) -> StoreResult<AgentRow> {
        let (account_id, agent) = (account_id.to_owned(), agent.clone());
        self.write(move |ctx| {
            Box::pin(async move {
                let email_key = agent.email.as_deref().map(|e| email_key(e).into_owned());
                let existing: Option<AgentRow> = sqlx::query_as(&format!(
                    "SELECT {AGENT_COLUMNS} FROM agents WHERE account_id = ? AND email_key = ?"
                ))
                .bind(&account_id)
                .bind(&email_key)
                .fetch_optional(&mut ctx.conn)
                .await?;
                match existing {
                    Some(a) => Ok(a),
                    None => insert_agent(&mut ctx.conn, &account_id, &agent).await,
                }
            })
        })
        .await
        .inspect(|_| {
            self.agents.clear();
            self.presence.clear();
        })
    }

    async fn remove_agent(&self, account_id: &str, id: &str) -> StoreResult<bool> {
        super::portable::delete_owned(self, "agents", account_id, id)
            .await
            .inspect(|_| {
                self.agents.clear();
                self.presence.clear();
            })
    }

    async fn set_agent_online_until(
        &self,
        account_id: &str,
        agent_id: &str,
        until: i64,
        idem: Option<IdempotencyRecord>,
    ) -> StoreResult<Guarded<bool>> {
        let (account_id, agent_id) = (account_id.to_owned(), agent_id.to_owned());
        let account = account_id.clone();
        let result = self
            .write(move |ctx| {
                Box::pin(async move {
                    if let Some(rec) = &idem {
                        if let Some(g) = ctx.idem_check(&account_id, rec).await? {
                            return Ok(g);
                        }
                    }
                    let r = sqlx::query(
                        "UPDATE agents SET online_until = max(online_until, ?) \
                     WHERE account_id = ? AND id = ?",
                    )
                    .bind(until)
                    .bind(&account_id)
                    .bind(&agent_id)
                    .execute(&mut ctx.conn)
                    .await?;
                    let found = r.rows_affected() > 0;
                    if let (true, Some(rec)) = (found, &idem) {
                        ctx.idem_save(&account_id, rec).await?;
                    }
                    Ok(Guarded::Applied(found))
                })
            })
            .await;
        if let Ok(Guarded::Applied(true)) = &result {
            self.presence.extend(&account, until);
        }
        result
    }

    async fn insert_message(
        &self,
        m: MessageRow,
        idem: Option<IdempotencyRecord>,
    ) -> StoreResult<Guarded<Arc<MessageRow>>> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Insert(InsertJob {
                row: m,
                idem,
                reply,
            }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        // Not cached here: the cache fills on reads, and a new id cannot be in it yet
        // (misses are never cached), so writing it would cost every POST for nothing.
        rx.await.map_err(|_| StoreError::Aborted)?
    }

    async fn message(&self, account_id: &str, id: &str) -> StoreResult<Option<MessageRow>> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages \
                 WHERE {BY_ID} AND account_id = ? AND deleted_at IS NULL"
            )
        });
        let generation = match self.messages.get(account_id, id) {
            Ok(hit) => return Ok(hit.map(|m| (*m).clone())),
            Err(generation) => generation,
        };
        let row = self.inline.read(|c| {
            c.prepare_cached(&SQL)?
                .query_row(
                    params![self.ids.decode(id), id, id, account_id],
                    message_from_row,
                )
                .optional()
        })?;
        if let Some(r) = &row {
            self.messages.fill(generation, r);
        }
        Ok(row)
    }

    async fn update_message_text(
        &self,
        account_id: &str,
        id: &str,
        pushed: bool,
        text: &str,
        now: i64,
    ) -> StoreResult<MessageChange> {
        self.change_message(account_id, id, pushed, Change::Text(text.to_owned()), now)
            .await
    }

    async fn delete_message(
        &self,
        account_id: &str,
        id: &str,
        pushed: bool,
        now: i64,
    ) -> StoreResult<MessageChange> {
        self.change_message(account_id, id, pushed, Change::Delete, now)
            .await
    }

    async fn list_messages(
        &self,
        account_id: &str,
        visitor_id: &str,
        window: Window,
        limit: u32,
    ) -> StoreResult<(Vec<MessageRow>, bool)> {
        let (sql, seq) = page_of_messages(window);
        let rows = self.inline.read(|c| {
            let mut statement = c.prepare_cached(sql)?;
            let fetch = i64::from(limit) + 1;
            let rows = match seq {
                Some(seq) => statement.query_map(
                    params![account_id, visitor_id, seq, fetch],
                    message_from_row,
                )?,
                None => {
                    statement.query_map(params![account_id, visitor_id, fetch], message_from_row)?
                }
            };
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(finish_page(rows, window, limit))
    }

    async fn visitor_exists(&self, account_id: &str, visitor_id: &str) -> StoreResult<bool> {
        self.inline.read(|c| {
            c.prepare_cached("SELECT 1 FROM visitors WHERE account_id = ? AND id = ?")?
                .exists(params![account_id, visitor_id])
        })
    }

    async fn message_position(
        &self,
        account_id: &str,
        id: &str,
    ) -> StoreResult<Option<(i64, String)>> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!("SELECT seq, visitor_id FROM messages WHERE {BY_ID} AND account_id = ?")
        });
        self.inline.read(|c| {
            c.prepare_cached(&SQL)?
                .query_row(params![self.ids.decode(id), id, id, account_id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
        })
    }

    async fn purge_idempotency_keys(&self, before: i64) -> StoreResult<u64> {
        self.write(move |ctx| {
            Box::pin(async move {
                let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
                    .bind(before)
                    .execute(&mut ctx.conn)
                    .await?;
                Ok(r.rows_affected())
            })
        })
        .await
    }

    async fn upsert_visitor(
        &self,
        account_id: &str,
        p: VisitorProfile,
        now: i64,
    ) -> StoreResult<VisitorRow> {
        let account_id = account_id.to_owned();
        self.write(move |ctx| {
            Box::pin(async move {
                ctx.conversation_for(&account_id, &p.id, now).await?;
                sqlx::query(
                    "UPDATE visitors SET name = coalesce(?, name), email = coalesce(?, email), \
                     browser_language = coalesce(?, browser_language), \
                     page_url = coalesce(?, page_url), page_title = coalesce(?, page_title), \
                     start_page_url = coalesce(start_page_url, ?), \
                     start_page_title = coalesce(start_page_title, ?), \
                     attributes = CASE WHEN ? IS NULL THEN attributes \
                                  ELSE json_patch(attributes, ?) END, \
                     updated_at = ? WHERE account_id = ? AND id = ?",
                )
                .bind(&p.name)
                .bind(&p.email)
                .bind(&p.browser_language)
                .bind(&p.page_url)
                .bind(&p.page_title)
                .bind(&p.page_url)
                .bind(&p.page_title)
                .bind(&p.attributes)
                .bind(&p.attributes)
                .bind(now)
                .bind(&account_id)
                .bind(&p.id)
                .execute(&mut ctx.conn)
                .await?;
                let row: VisitorRow = sqlx::query_as(&format!(
                    "SELECT {VISITOR_COLUMNS} FROM visitors v JOIN conversations c \
                     ON c.account_id = v.account_id AND c.visitor_id = v.id \
                     WHERE v.account_id = ? AND v.id = ?"
                ))
                .bind(&account_id)
                .bind(&p.id)
                .fetch_one(&mut ctx.conn)
                .await?;
                Ok(row)
            })
        })
        .await
    }

    async fn mark_read(&self, account_id: &str, visitor_id: &str, seq: i64) -> StoreResult<()> {
        let (a, v) = (account_id.to_owned(), visitor_id.to_owned());
        self.write(move |ctx| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE conversations SET visitor_read_seq = max(visitor_read_seq, ?) \
                     WHERE account_id = ? AND visitor_id = ?",
                )
                .bind(seq)
                .bind(&a)
                .bind(&v)
                .execute(&mut ctx.conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn any_agent_online(&self, account_id: &str, now: i64) -> StoreResult<bool> {
        // Every visitor message asks this; the newest online_until of the account answers
        // it for any `now`, so it is kept briefly (pings through this server update it).
        if let Some(until) = self.presence.get(account_id) {
            return Ok(until > now);
        }
        let until: Option<i64> =
            sqlx::query_scalar("SELECT max(online_until) FROM agents WHERE account_id = ?")
                .bind(account_id)
                .fetch_one(&self.reads)
                .await?;
        let until = until.unwrap_or(0);
        self.presence.put(account_id, until);
        Ok(until > now)
    }

    async fn feed(
        &self,
        account_id: &str,
        visitor_id: Option<&str>,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<FeedEvent>> {
        let limit = i64::from(limit);
        let (rows, chats) = self.inline.read(|c| {
            let mut statement = c.prepare_cached(&FEED_SQL[usize::from(visitor_id.is_some())])?;
            let rows = match visitor_id {
                None => statement.query_map(
                    params![account_id, after, limit, account_id, after, limit, limit],
                    FeedRow::from_row,
                )?,
                Some(v) => statement.query_map(
                    params![account_id, v, after, limit, account_id, v, after, limit, limit],
                    FeedRow::from_row,
                )?,
            }
            .collect::<rusqlite::Result<Vec<FeedRow>>>()?;
            // The chats that events of the page name, each read once.
            let mut chats: HashMap<String, ChatInfo> = HashMap::new();
            let mut by_id = c.prepare_cached(&CHAT_BY_ID)?;
            for id in rows.iter().filter_map(|r| r.fchat.as_deref()) {
                if !chats.contains_key(id) {
                    if let Some(chat) = by_id.query_row([id], chat_from_row).optional()? {
                        chats.insert(chat.id.clone(), chat.into());
                    }
                }
            }
            Ok((rows, chats))
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let kind = EventKind::parse(&r.fkind)?;
                let chat = r.fchat.as_ref().and_then(|c| chats.get(c).cloned());
                Some(FeedEvent {
                    seq: r.fseq,
                    kind,
                    account_id: account_id.to_owned(),
                    visitor_id: r.fvisitor,
                    conversation_id: r.fconversation,
                    message: r.message.map(Arc::new),
                    chat,
                })
            })
            .collect())
    }

    async fn feed_head(&self) -> StoreResult<i64> {
        Ok(self.head.load(Ordering::SeqCst))
    }

    fn take_feed(&self) -> Option<FeedReceiver> {
        if self.feed_taken.swap(true, Ordering::SeqCst) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.writer.try_send(WriterMsg::Feed(tx)).ok()?;
        Some(rx)
    }

    async fn run_timers(
        &self,
        now: i64,
        fragment_before: i64,
        idle_before: i64,
    ) -> StoreResult<TimerOutcome> {
        let (outcome, flagged) = self
            .write(move |ctx| Box::pin(ctx.run_timers_in(now, fragment_before, idle_before)))
            .await?;
        if !flagged.is_empty() {
            self.messages.committed(flagged.iter());
        }
        Ok(outcome)
    }

    fn signals(&self) -> Signals {
        self.signals.clone()
    }

    async fn due_deliveries(
        &self,
        now: i64,
        limit: u32,
        busy: &[(String, String)],
    ) -> StoreResult<Vec<DueDelivery>> {
        // Only the head of each (endpoint, conversation) queue may go: that is what keeps a
        // conversation's events in order at the receiver. Heads in flight are left out in
        // SQL, so a busy dispatcher does not read them again and again.
        let busy_json = serde_json::Value::Array(
            busy.iter()
                .map(|(w, c)| serde_json::Value::String(format!("{w}|{c}")))
                .collect(),
        )
        .to_string();
        let rows: Vec<DueRow> = sqlx::query_as(
            "SELECT d.attempts, \
             e.id AS e_id, e.seq AS e_seq, e.account_id AS e_account_id, \
             e.conversation_id AS e_conversation_id, e.visitor_id AS e_visitor_id, \
             e.kind AS e_kind, e.chat_id AS e_chat_id, e.from_seq AS e_from_seq, \
             e.to_seq AS e_to_seq, e.payload AS e_payload, e.created_at AS e_created_at, \
             w.id AS w_id, w.account_id AS w_account_id, w.url AS w_url, w.events AS w_events, \
             w.description AS w_description, w.enabled AS w_enabled, w.secret AS w_secret, \
             w.created_at AS w_created_at, w.consecutive_failures AS w_consecutive_failures, \
             w.failing_since AS w_failing_since, w.last_error AS w_last_error \
             FROM webhook_queues q \
             JOIN webhook_deliveries d ON d.webhook_id = q.webhook_id AND d.event_seq = q.head_seq \
             JOIN webhook_events e ON e.id = d.event_id \
             JOIN webhooks w ON w.id = q.webhook_id \
             WHERE q.next_attempt_at <= ? AND w.enabled = 1 AND d.status = 'pending' \
             AND q.webhook_id || '|' || q.conversation_id \
                 NOT IN (SELECT value FROM json_each(?)) \
             ORDER BY q.next_attempt_at LIMIT ?",
        )
        .bind(now)
        .bind(busy_json)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        Ok(rows.into_iter().map(DueRow::into_due).collect())
    }

    async fn freeze_payloads(
        &self,
        payloads: Vec<(String, String)>,
    ) -> StoreResult<HashMap<String, String>> {
        if payloads.is_empty() {
            return Ok(HashMap::new());
        }
        self.write_atomic(move |ctx| {
            Box::pin(async move {
                // One round trip; each statement keeps a payload stored before (by an earlier
                // attempt) and answers with the one that is now stored.
                let mut sql = String::new();
                for _ in &payloads {
                    sql.push_str(
                        "UPDATE webhook_events SET payload = coalesce(payload, ?) WHERE id = ? \
                         RETURNING id, payload; ",
                    );
                }
                let mut q = sqlx::query_as::<_, (String, Option<String>)>(&sql);
                for (id, payload) in &payloads {
                    q = q.bind(payload.clone()).bind(id.clone());
                }
                let rows = q.fetch_all(&mut ctx.conn).await?;
                let mut stored: HashMap<String, String> = rows
                    .into_iter()
                    .filter_map(|(id, p)| p.map(|p| (id, p)))
                    .collect();
                for (id, payload) in payloads {
                    stored.entry(id).or_insert(payload);
                }
                Ok(stored)
            })
        })
        .await
    }

    async fn next_delivery_at(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(q.next_attempt_at) FROM webhook_queues q \
             JOIN webhooks w ON w.id = q.webhook_id WHERE w.enabled = 1",
        )
        .fetch_one(&self.reads)
        .await?)
    }

    async fn record_attempts(
        &self,
        outcomes: Vec<AttemptOutcome>,
    ) -> StoreResult<Vec<EndpointHealth>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        // Several statements: the writer's savepoint undoes them all if one fails.
        self.write(move |ctx| Box::pin(record_attempts_in(ctx, outcomes)))
            .await
    }

    async fn list_deliveries(
        &self,
        account_id: &str,
        webhook_id: &str,
        before_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} \
             FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
             WHERE d.account_id = ? AND d.webhook_id = ? AND d.event_seq < ? \
             ORDER BY d.event_seq DESC LIMIT ?"
        ))
        .bind(account_id)
        .bind(webhook_id)
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.reads)
        .await?)
    }

    async fn replay_delivery(
        &self,
        account_id: &str,
        webhook_id: &str,
        event_id: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let (a, w, e) = (
            account_id.to_owned(),
            webhook_id.to_owned(),
            event_id.to_owned(),
        );
        self.write(move |ctx| {
            Box::pin(async move { ctx.replay_delivery_in(&a, &w, &e, now).await })
        })
        .await
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriterMsg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(Checkpointer { stop, thread }) = checkpointer {
            // Its loop ends once the sender is gone, and its connection closes with the
            // thread: wait, so that `close` leaves no connection of this store open (at
            // most one checkpoint's time).
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.inline.close();
        self.reads.close().await;
    }
}

/// What an edit or delete does to a live agent message.
enum Change {
    Text(String),
    Delete,
}

impl SqliteStore {
    /// Applies `change` to a live agent message of the account whose pushed flag is
    /// `pushed`, then refreshes the message cache.
    async fn change_message(
        &self,
        account_id: &str,
        id: &str,
        pushed: bool,
        change: Change,
        now: i64,
    ) -> StoreResult<MessageChange> {
        let (account_id, id) = (account_id.to_owned(), id.to_owned());
        let result = self
            .write(move |ctx| {
                Box::pin(async move {
                    let (set, value) = match change {
                        Change::Text(text) => ("text = ?", Some(text)),
                        Change::Delete => ("deleted_at = ?", None),
                    };
                    let sql = format!(
                        "UPDATE messages SET {set}, updated_at = ? WHERE {BY_ID} AND account_id = ? \
                         AND is_pushed = ? AND deleted_at IS NULL AND type = 'agent' \
                         RETURNING {MESSAGE_COLUMNS}"
                    );
                    let kind = if value.is_some() {
                        EventKind::MessageUpdated
                    } else {
                        EventKind::MessageDeleted
                    };
                    let query = sqlx::query_as::<_, MessageRow>(&sql);
                    let query = match value {
                        Some(text) => query.bind(text),
                        None => query.bind(now),
                    };
                    let seq = ctx.ids.decode(&id);
                    let row = query
                        .bind(now)
                        .bind(seq)
                        .bind(&id)
                        .bind(&id)
                        .bind(&account_id)
                        .bind(pushed)
                        .fetch_optional(&mut ctx.conn)
                        .await?;
                    if let Some(row) = &row {
                        let seq = ctx.core.take_seq();
                        ctx.insert_event(seq, kind, row, None, now).await?;
                        ctx.core.events.push(Arc::new(FeedEvent {
                            seq,
                            kind,
                            account_id: row.account_id.clone(),
                            visitor_id: row.visitor_id.clone(),
                            conversation_id: row.conversation_id.clone(),
                            message: Some(Arc::new(row.clone())),
                            chat: None,
                        }));
                    }
                    classify_change(&mut ctx.conn, row, &account_id, (seq, &id), pushed).await
                })
            })
            .await?;
        if let MessageChange::Done(row) = &result {
            self.messages.committed([row.as_ref()]);
        }
        Ok(result)
    }
}

/// Tells "no such message" from "a visitor's message" after a guarded UPDATE matched nothing.
async fn classify_change(
    conn: &mut SqliteConnection,
    row: Option<MessageRow>,
    account_id: &str,
    (seq, id): (Option<i64>, &str),
    pushed: bool,
) -> StoreResult<MessageChange> {
    if let Some(row) = row {
        return Ok(MessageChange::Done(Box::new(row)));
    }
    let kind: Option<String> = sqlx::query_scalar(&format!(
        "SELECT type FROM messages WHERE {BY_ID} AND account_id = ? AND is_pushed = ? \
         AND deleted_at IS NULL"
    ))
    .bind(seq)
    .bind(id)
    .bind(id)
    .bind(account_id)
    .bind(pushed)
    .fetch_optional(conn)
    .await?;
    Ok(match kind.as_deref() {
        Some("visitor") => MessageChange::NotAgentMessage,
        _ => MessageChange::NotFound,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::Connection;

    use super::*;
    use crate::store::test_rows::{failing_jobs_in_one_batch, message, waiting_job, BusyWriter};

    /// `SELECT count(*)`-style queries on the store's read connections, answered as one
    /// number.
    fn counter(store: Arc<SqliteStore>) -> impl Fn(&'static str) -> BoxFuture<'static, i64> {
        move |sql| {
            let store = store.clone();
            Box::pin(async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&store.reads)
                    .await
                    .unwrap()
            })
        }
    }

    /// Jobs that fail inside a group commit leave nothing behind and take nothing of the
    /// other jobs with them.
    #[tokio::test]
    async fn a_failing_job_in_a_batch_is_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(
            SqliteStore::open(&path, SqliteOptions::default())
                .await
                .unwrap(),
        );
        let busy = busy_writer(&store);
        let count = counter(store.clone());
        failing_jobs_in_one_batch(store, busy, count).await;
    }

    /// A job that fails after its savepoint is gone cannot be undone alone: the writer
    /// rolls the whole batch back and answers every caller with an error, rather than
    /// commit the failed job's writes with the others'.
    #[tokio::test]
    async fn a_failed_job_that_cannot_be_undone_fails_its_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(
            SqliteStore::open(&path, SqliteOptions::default())
                .await
                .unwrap(),
        );
        let (account, _) = store.ensure_default_account("a", 1).await.unwrap();
        // Both writes below queue up while the writer is busy, and go in one batch.
        let busy = busy_writer(&store).await;
        let (s, acc) = (store.clone(), account.id.clone());
        let insert = tokio::spawn(async move {
            s.insert_message(message(&acc, "m0", "v"), None)
                .await
                .map(|_| ())
        });
        let (s, acc) = (store.clone(), account.id.clone());
        let broken = tokio::spawn(async move {
            s.write_with(false, move |ctx| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO agents (id, account_id, name, created_at) \
                         VALUES ('half', ?, 'Half', 1)",
                    )
                    .bind(&acc)
                    .execute(&mut ctx.conn)
                    .await?;
                    // The job's savepoint, released from under it.
                    ctx.exec("RELEASE job").await?;
                    Err::<(), _>(StoreError::Conflict(
                        "a job that fails after its write".into(),
                    ))
                })
            })
            .await
        });
        busy.release_when_queued(2).await;

        assert!(
            insert.await.unwrap().is_err(),
            "its batch was committed with a failed job in it"
        );
        assert!(broken.await.unwrap().is_err());
        let count = counter(store.clone());
        assert_eq!(
            count("SELECT count(*) FROM agents WHERE id = 'half'").await,
            0,
            "half-written job committed"
        );
        assert_eq!(count("SELECT count(*) FROM messages").await, 0);
        // The writer goes on: the next batch commits.
        store
            .insert_message(message(&account.id, "m1", "v"), None)
            .await
            .unwrap();
        assert_eq!(count("SELECT count(*) FROM messages").await, 1);
        store.close().await;
    }

    /// Occupies the store's writer (see [`BusyWriter`]).
    fn busy_writer(store: &Arc<SqliteStore>) -> impl std::future::Future<Output = BusyWriter> {
        let (s, writer) = (store.clone(), store.writer.clone());
        BusyWriter::start(
            move |started, wait| Box::pin(async move { s.write(waiting_job(started, wait)).await }),
            move || writer.max_capacity() - writer.capacity(),
        )
    }

    /// A store on `path` with one message (returned), and a hot-path connection to it.
    async fn store_with_fast_connection(
        path: &Path,
    ) -> (SqliteStore, MessageRow, rusqlite::Connection) {
        let store = SqliteStore::open(path, SqliteOptions::default())
            .await
            .unwrap();
        let (account, _) = store.ensure_default_account("a", 1).await.unwrap();
        let first = match store
            .insert_message(message(&account.id, "m0", "v"), None)
            .await
            .unwrap()
        {
            Guarded::Applied(m) => Arc::unwrap_or_clone(m),
            _ => panic!("not applied"),
        };
        let fast = open_fast(path, true).unwrap();
        (store, first, fast)
    }

    /// The hot path's own transaction: a batch with one bad row writes nothing, leaves no
    /// transaction open, and the connection goes on working.
    #[tokio::test]
    async fn a_failing_fast_insert_writes_none_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, first, fast) = store_with_fast_connection(&dir.path().join("t.db")).await;
        let row = |id: &str, seq: i64| MessageRow {
            conversation_id: first.conversation_id.clone(),
            seq,
            ..message(&first.account_id, id, "v")
        };
        let count = || -> i64 {
            fast.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
                .unwrap()
        };

        // The second row reuses m0's seq (the primary key): the first must not stay either.
        let err = insert_rows_now(&fast, &[row("m1", 1001), row("m2", first.seq)]);
        assert!(err.is_err());
        assert!(fast.is_autocommit(), "transaction left open");
        assert_eq!(count(), 1);
        assert!(insert_rows_now(&fast, &[row("m3", first.seq)]).is_err());
        assert_eq!(count(), 1);

        insert_rows_now(&fast, &[row("m1", 1001), row("m2", 1002)]).unwrap();
        insert_rows_now(&fast, &[row("m3", 1003)]).unwrap();
        assert_eq!(count(), 4);
        drop(fast);
        store.close().await;
    }

    /// A batch on the hot path is written row for row, every value in its column; one bad
    /// row at its end undoes the rows before it.
    #[tokio::test]
    async fn a_fast_batch_is_written_row_for_row() {
        let dir = tempfile::tempdir().unwrap();
        let (store, first, fast) = store_with_fast_connection(&dir.path().join("t.db")).await;
        let rows: Vec<MessageRow> = (1..=23)
            .map(|i: i64| MessageRow {
                conversation_id: first.conversation_id.clone(),
                seq: 1000 + i,
                kind: if i % 2 == 0 { "agent" } else { "visitor" }.into(),
                agent_id: (i % 3 == 0).then(|| format!("agent{i}")),
                agent_name: Some(format!("name {i}")),
                agent_userpic: (i % 5 == 0).then(|| format!("https://pic/{i}")),
                is_pushed: i % 2 == 1,
                is_missed: i % 3 == 1,
                is_missed_by_visitor: i % 4 == 1,
                is_trigger: i % 5 == 1,
                received_from: (i % 2 == 0).then(|| format!("from {i}")),
                created_at: 10 * i,
                updated_at: 10 * i + 1,
                ..message(&first.account_id, &format!("id{i}"), &format!("v{}", i % 4))
            })
            .collect();
        let mut bad = rows.clone();
        bad[22].seq = first.seq;
        assert!(insert_rows_now(&fast, &bad).is_err());
        assert!(fast.is_autocommit(), "transaction left open");
        let count: i64 = fast
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 1, "rows of a failed batch stayed");

        insert_rows_now(&fast, &rows).unwrap();
        let mut stmt = fast
            .prepare(
                "SELECT seq, id, account_id, conversation_id, visitor_id, type, text, agent_id, \
                 agent_name, agent_userpic, is_pushed, is_missed, is_missed_by_visitor, \
                 is_trigger, received_from, created_at, updated_at FROM messages \
                 WHERE seq > 1000 ORDER BY seq",
            )
            .unwrap();
        let stored: Vec<MessageRow> = stmt
            .query_map([], |r| {
                Ok(MessageRow {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    account_id: r.get(2)?,
                    conversation_id: r.get(3)?,
                    visitor_id: r.get(4)?,
                    kind: r.get(5)?,
                    text: r.get(6)?,
                    agent_id: r.get(7)?,
                    agent_name: r.get(8)?,
                    agent_userpic: r.get(9)?,
                    is_pushed: r.get(10)?,
                    is_missed: r.get(11)?,
                    is_missed_by_visitor: r.get(12)?,
                    is_trigger: r.get(13)?,
                    received_from: r.get(14)?,
                    created_at: r.get(15)?,
                    updated_at: r.get(16)?,
                    ..MessageRow::default()
                })
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored, rows);
        drop(stmt);
        drop(fast);
        store.close().await;
    }

    /// A store on `path` with its default account and one message in it; the message's id.
    async fn store_with_a_message(
        path: &Path,
        options: SqliteOptions,
    ) -> (SqliteStore, String, String) {
        let store = SqliteStore::open(path, options).await.unwrap();
        let (account, _) = store.ensure_default_account("a", 1).await.unwrap();
        let id = insert(&store, message(&account.id, "m0", "v")).await;
        (store, account.id, id)
    }

    /// Inserts without an idempotency key: the id the store gave the message.
    async fn insert(store: &SqliteStore, m: MessageRow) -> String {
        match store.insert_message(m, None).await.unwrap() {
            Guarded::Applied(m) => m.id.clone(),
            _ => panic!("not applied"),
        }
    }

    /// The inline reads decode every column of a message as sqlx does, set or unset, and
    /// serve the reads of messages: by id, their positions, a visitor's pages.
    #[tokio::test]
    async fn inline_reads_decode_messages_as_sqlx_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, account, plain) = store_with_a_message(&path, SqliteOptions::default()).await;
        let full = MessageRow {
            agent_id: Some("ag".into()),
            agent_name: Some("Ann".into()),
            agent_userpic: Some("https://example.com/ann.png".into()),
            is_pushed: true,
            is_missed: true,
            is_missed_by_visitor: true,
            is_trigger: true,
            received_from: Some("crm".into()),
            created_at: 7,
            updated_at: 8,
            ..message(&account, "m1", "v")
        };
        let full = insert(&store, full).await;
        let deleted = insert(&store, message(&account, "m2", "v")).await;
        let gone = store.delete_message(&account, &deleted, false, 9).await;
        assert!(matches!(gone.unwrap(), MessageChange::Done(_)));

        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages ORDER BY seq");
        let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let by_sqlx: Vec<MessageRow> = sqlx::query_as(&sql).fetch_all(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        let inline = store
            .inline
            .read(|c| {
                c.prepare(&sql)?
                    .query_map([], message_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap();
        assert_eq!(inline, by_sqlx);
        assert_eq!(inline.len(), 3);
        assert_eq!(inline[1].id, full);
        assert_eq!(
            inline[1].agent_userpic.as_deref(),
            Some("https://example.com/ann.png")
        );
        assert!(inline[1].is_trigger && inline[1].is_missed_by_visitor);
        assert_eq!(inline[2].deleted_at, Some(9));

        let read = store.message(&account, &full).await.unwrap();
        assert_eq!(read.as_ref(), Some(&inline[1]));
        assert_eq!(store.message(&account, &deleted).await.unwrap(), None);
        assert_eq!(store.message("other", &full).await.unwrap(), None);
        let position = store.message_position(&account, &deleted).await.unwrap();
        assert_eq!(position, Some((inline[2].seq, "v".to_owned())));
        let (page, more) = store
            .list_messages(&account, "v", Window::Latest, 1)
            .await
            .unwrap();
        assert_eq!((page, more), (vec![inline[1].clone()], true));
        let (page, more) = store
            .list_messages(&account, "v", Window::Before(inline[1].seq), 5)
            .await
            .unwrap();
        assert_eq!(page.iter().map(|m| &m.id).collect::<Vec<_>>(), [&plain]);
        assert!(!more);
        let (page, _) = store
            .list_messages(&account, "v", Window::After(inline[0].seq), 5)
            .await
            .unwrap();
        assert_eq!(page, [inline[1].clone()], "the deleted message is left out");
        assert!(store.visitor_exists(&account, "v").await.unwrap());
        assert!(!store.visitor_exists(&account, "w").await.unwrap());
        assert!(!store.visitor_exists("other", "v").await.unwrap());
        store.close().await;
    }

    /// The WAL shim holds frames until SQLite syncs them, which only `synchronous=FULL`
    /// does at every commit: `--sync=normal` opens on SQLite's default VFS, and what it
    /// writes is there for a store on the shim that opens the file next.
    #[tokio::test]
    async fn normal_sync_writes_without_the_wal_shim() {
        assert_eq!(wal_vfs(true), Some(switchboard_walvfs::NAME));
        assert_eq!(wal_vfs(false), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let normal = SqliteOptions {
            synchronous_full: false,
            ..SqliteOptions::default()
        };
        let (store, account, first) = store_with_a_message(&path, normal).await;
        let mut ids = vec![first];
        for i in 1..=20 {
            ids.push(insert(&store, message(&account, &format!("m{i}"), "v")).await);
        }
        store.close().await;
        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        for id in ids {
            let row = store.message(&account, &id).await.unwrap();
            assert_eq!(row.map(|r| r.id), Some(id));
        }
        store.close().await;
    }

    /// `close` closes every connection of the store, the checkpointer's and the writer's
    /// included: the last one out copies the WAL back and removes it.
    #[tokio::test]
    async fn close_leaves_no_connection_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let (store, account, id) = store_with_a_message(&path, SqliteOptions::default()).await;
        // A read by id opens an inline connection (the message cache fills on reads).
        assert!(store.message(&account, &id).await.unwrap().is_some());
        assert_eq!(store.inline.idle_count(), 1);
        assert!(wal.exists(), "no WAL while the store is open");
        store.close().await;
        assert!(!wal.exists(), "a connection was still open after close");
    }

    /// The writer never stops to checkpoint: its commits leave the database file as it
    /// is (SQLite's own default would have copied the WAL back after 1,000 pages), and a
    /// checkpoint on another connection copies all of it.
    #[tokio::test]
    async fn the_writer_leaves_checkpoints_to_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let options = SqliteOptions {
            checkpoint_every: None,
            ..SqliteOptions::default()
        };
        let (store, account, _) = store_with_a_message(&path, options).await;
        let other = open_fast(&path, true).unwrap();
        checkpoint(&other).unwrap();
        let file_len = || std::fs::metadata(&path).unwrap().len();
        let before = file_len();

        // One commit each: well past 1,000 WAL pages.
        for i in 1..=600 {
            let m = message(&account, &format!("m{i}"), "v");
            store.insert_message(m, None).await.unwrap();
        }
        assert_eq!(file_len(), before, "the writer checkpointed by itself");

        let (log, copied) = checkpoint(&other).unwrap();
        assert!(log > 1_000, "only {log} WAL pages for 600 commits");
        assert_eq!(
            copied, log,
            "a passive checkpoint with no reader copies it all"
        );
        assert!(
            file_len() > before,
            "the checkpoint did not grow the database file"
        );

        // The loop ends when its store lets go of it.
        let (stop, stopped) = std::sync::mpsc::sync_channel(1);
        let looping =
            std::thread::spawn(move || checkpoint_loop(other, Duration::from_millis(1), &stopped));
        drop(stop);
        looping.join().unwrap();
        store.close().await;
    }

    /// A restart goes on after the newest position of all, a webhook event's included:
    /// reusing one broke the webhook event's unique position, and put a newer event
    /// before an older one in its endpoint's queue.
    #[tokio::test]
    async fn positions_are_not_reused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, account, _) = store_with_a_message(&path, SqliteOptions::default()).await;
        let head = store.feed_head().await.unwrap();
        store.close().await;
        // The last position went to a webhook event (as a chat's end reports it).
        let conn = open_fast(&path, true).unwrap();
        conn.execute(
            "INSERT INTO webhook_events (id, seq, account_id, conversation_id, visitor_id, \
             kind, chat_id, from_seq, to_seq, created_at) \
             VALUES ('evt_1', ?1, ?2, 'c', 'v', 'conversationFragment', 'chat', 0, ?3, 2)",
            rusqlite::params![head + 5, account, head],
        )
        .unwrap();
        drop(conn);

        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        assert_eq!(
            store.feed_head().await.unwrap(),
            head,
            "the feed head moved"
        );
        let m = store
            .insert_message(message(&account, "m1", "v"), None)
            .await
            .unwrap();
        let Guarded::Applied(m) = m else {
            panic!("not applied")
        };
        assert_eq!(m.seq, head + 6, "a position was reused");
        store.close().await;
    }

    /// A database written before ids carried their seq (schema v4) keeps every message
    /// reachable by its old id after the upgrade: read, edited, in the feed with its events.
    /// New messages get ids that carry their seq and no entry in `message_ids`.
    #[tokio::test]
    async fn messages_written_before_v5_keep_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let mut conn = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .connect()
                .await
                .unwrap();
            let v4 = sqlx::migrate::Migrator {
                migrations: std::borrow::Cow::Owned(MIGRATOR.migrations[..4].to_vec()),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            v4.run(&mut conn).await.unwrap();
            sqlx::raw_sql(
                "INSERT INTO accounts (id, name, is_default, created_at) VALUES ('acc', 'a', 1, 1);
                 INSERT INTO visitors (account_id, id, created_at, updated_at) VALUES ('acc', 'v', 1, 1);
                 INSERT INTO conversations (id, account_id, visitor_id, created_at) VALUES ('conv', 'acc', 'v', 1);
                 INSERT INTO messages (seq, id, account_id, conversation_id, visitor_id, type, text, created_at, updated_at)
                   VALUES (1, 'OLDoldOLDoldOLD01', 'acc', 'conv', 'v', 'agent', 'one', 1, 1),
                          (2, 'OLDoldOLDoldOLD02', 'acc', 'conv', 'v', 'agent', 'two', 1, 1);
                 INSERT INTO events (seq, account_id, conversation_id, visitor_id, kind, message_id, created_at)
                   VALUES (3, 'acc', 'conv', 'v', 'messageUpdated', 'OLDoldOLDoldOLD01', 2);",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
        let store = SqliteStore::open(&path, SqliteOptions::default())
            .await
            .unwrap();
        let old = "OLDoldOLDoldOLD01";
        assert_eq!(
            store.message("acc", old).await.unwrap().unwrap().text,
            "one"
        );
        assert!(
            store.message("other", old).await.unwrap().is_none(),
            "another account's"
        );
        assert_eq!(
            store
                .message_position("acc", "OLDoldOLDoldOLD02")
                .await
                .unwrap(),
            Some((2, "v".to_owned()))
        );
        let edited = store
            .update_message_text("acc", "OLDoldOLDoldOLD02", false, "two, edited", 5)
            .await
            .unwrap();
        assert!(matches!(edited, MessageChange::Done(_)));

        let feed = store.feed("acc", None, 0, 10).await.unwrap();
        let named: Vec<(i64, Option<&str>)> = feed
            .iter()
            .map(|e| (e.seq, e.message.as_ref().map(|m| m.id.as_str())))
            .collect();
        // 1 and 2 created, 3 the old event, then the edit's event: each with its message.
        assert_eq!(
            named[..3],
            [
                (1, Some(old)),
                (2, Some("OLDoldOLDoldOLD02")),
                (3, Some(old))
            ]
        );
        assert_eq!(named[3].1, Some("OLDoldOLDoldOLD02"));
        assert_eq!(feed[3].message.as_ref().unwrap().text, "two, edited");

        let new = insert(&store, message("acc", "ignored", "v")).await;
        assert_ne!(new, "ignored", "the store numbers ids itself");
        let seq = store
            .message_position("acc", &new)
            .await
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(store.ids.decode(&new), Some(seq));
        let pool = &store.reads;
        let aliases: i64 = sqlx::query_scalar("SELECT count(*) FROM message_ids")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(aliases, 2, "only the old messages' ids are listed");
        let unique: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pragma_index_list('messages') WHERE \"unique\"",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(unique, 0, "an index on message ids is left");
        let broken: Vec<(String,)> =
            sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
                .fetch_all(pool)
                .await
                .unwrap();
        assert!(broken.is_empty(), "{broken:?}");
        store.close().await;
    }
}

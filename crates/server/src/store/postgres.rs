//! The PostgreSQL backend: several switchboard instances on one database.
//!
//! Writes work as in the SQLite backend: one writer task per instance commits everything
//! queued at that moment in one transaction (group commit) and answers the callers after
//! the commit. Every write transaction locks the single `feed_head` row first, so
//! transactions of all instances commit in seq order: a reader that sees seq n sees
//! everything below it, and the feed can be read from the tables by position.
//!
//! Each instance keeps the open chats in memory, as the SQLite writer does. The head row
//! names the instance that wrote last; a writer that finds another instance's writes since
//! its own reloads the chats those writes touched before it goes on, so chat timers and
//! transcripts stay exactly-once with any number of instances.
//!
//! Committed changes reach every instance's live streams through a feed reader that reads
//! the tables from the last position it saw, woken by the local writer, by `LISTEN
//! switchboard_feed` (other instances), and by a slow poll (a dropped LISTEN connection
//! then costs latency, never an event).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, Postgres};
use tokio::sync::{mpsc, oneshot};

use super::cache::{email_key, AgentCache};
use super::reads::{connection_lost, ReadConnections};
use super::shared::*;
use super::writer::{
    self, Answer, CommitFailure, InsertJob, Writer, WriterCore, WriterMap, INSERT_CHUNK,
};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel on which instances announce commits (the payload is the new head).
const FEED_CHANNEL: &str = "switchboard_feed";
/// The channel on which instances announce agent changes (the payload is the account id).
const AGENTS_CHANNEL: &str = "switchboard_agents";

/// Tuning of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// Connections for reads and webhook claims (the writer and the listener have their
    /// own): a quarter (at least one) are sqlx's pool, for webhook claims, the feed reader
    /// and the writes made outside the writer; the rest serve reads, without sqlx's pings
    /// (see `ReadConnections`).
    pub read_connections: u32,
    /// How long to wait for a connection at start-up and from the pool.
    pub connect_timeout: Duration,
    /// Longest time one statement may run (`statement_timeout`); 0 leaves the server's.
    pub statement_timeout: Duration,
    /// How long a dispatcher owns the deliveries it claimed; after that (the instance died
    /// or hangs) another instance takes them. Longer than a delivery attempt can take.
    pub webhook_lease: Duration,
    /// How often the feed is read even without a notification.
    pub feed_poll: Duration,
    /// How long an agent looked up by id or email is trusted (other instances' changes
    /// also clear it at once through a notification).
    pub agent_cache_ttl: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_batch: 512,
            read_connections: 16,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            webhook_lease: Duration::from_secs(15),
            feed_poll: Duration::from_secs(1),
            agent_cache_ttl: Duration::from_secs(2),
        }
    }
}

type Job = writer::Job<WriterCtx>;

// Moved once through a channel or a Vec: boxing would add an allocation per message.
#[allow(clippy::large_enum_variant)]
enum WriterMsg {
    Job(Job),
    Insert(InsertJob),
    Stop(oneshot::Sender<()>),
}

// Moved once through a channel or a Vec: boxing would add an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Job(Job),
    Insert(InsertJob),
}

/// State owned by the writer task.
struct WriterCtx {
    conn: PgConnection,
    /// To connect again after the connection broke.
    connect: PgConnectOptions,
    /// This writer's name in `feed_head.writer` (a new one after a single-statement commit
    /// whose outcome had to be looked up: see [`statement_outcome`]).
    instance: String,
    /// How long connecting again may take.
    connect_timeout: Duration,
    /// The backend serving `conn`.
    backend: Backend,
    /// How many times the writer connected again (a batch tells by it whether it lost its
    /// connection).
    reconnects: u64,
    /// The id of the current transaction (from `begin`), to ask PostgreSQL whether it
    /// committed when the connection breaks during its COMMIT.
    xid: i64,
    /// The head this writer committed last; if the head row shows anything else, another
    /// instance wrote since and `open_chats` must catch up.
    committed: i64,
    /// What both backends' writers keep in memory (see [`WriterCore`]). Its `next_seq` is
    /// valid while the head row is locked, its open chats as of `committed`; its events
    /// go to this instance's feed reader with the commit (other instances' changes it
    /// reads back from the tables).
    core: WriterCore,
    signals: Signals,
    /// The head locked by the current transaction (its changes follow it).
    locked: i64,
    /// Committed changes, handed to this instance's feed reader.
    local: mpsc::UnboundedSender<LocalCommit>,
}

/// One commit of this instance's writer: its changes, which follow position `after` and
/// end at `head`.
struct LocalCommit {
    after: i64,
    head: i64,
    events: Vec<Arc<FeedEvent>>,
}

/// PostgreSQL implementation of [`Store`].
pub struct PostgresStore {
    /// For webhook claims, the feed reader, the listener and the few writes made outside
    /// the writer.
    pool: PgPool,
    /// For reads.
    reads: ReadConnections<Postgres>,
    writer: mpsc::Sender<WriterMsg>,
    agents: Arc<AgentCache>,
    head: Arc<AtomicI64>,
    feed: std::sync::Mutex<Option<FeedReceiver>>,
    /// Whether someone took the feed (until then the reader drops what it reads).
    feed_taken: Arc<std::sync::atomic::AtomicBool>,
    signals: Signals,
    options: PostgresOptions,
    /// This instance's name (the writer's in `feed_head`, the dispatcher's on its claims).
    instance: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Says so in the log when the server does not run autovacuum: without its `ANALYZE`, the
/// planner has no statistics of the tables and, once they are large, may pick plans that
/// read every row (a visitor's latest messages by a bitmap scan of all of them and a sort:
/// 78 ms at 237,000 messages, 0.03 ms once analyzed).
async fn warn_without_autovacuum(conn: &mut PgConnection) {
    let settings: Result<(String, String), _> =
        sqlx::query_as("SELECT current_setting('autovacuum'), current_setting('track_counts')")
            .fetch_one(conn)
            .await;
    if let Ok((autovacuum, track_counts)) = settings {
        if autovacuum != "on" || track_counts != "on" {
            tracing::warn!(
                autovacuum,
                track_counts,
                "PostgreSQL runs no autovacuum here: run VACUUM ANALYZE regularly, or reads \
                 slow down as the tables grow (docs/postgres.md)"
            );
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, runs the migrations and starts the writer, the
    /// feed reader and the listener.
    pub async fn open(url: &str, options: PostgresOptions) -> StoreResult<Self> {
        let mut connect = PgConnectOptions::from_str(url)?
            .application_name("switchboard")
            .log_statements(tracing::log::LevelFilter::Trace)
            // Every statement is planned for its parameters. With PostgreSQL's default a
            // prepared statement switches to a generic plan after five runs, and one made
            // while a table was nearly empty (a new database) is a sequential scan that
            // stays cached as the table grows, until autovacuum next analyzes it: GET by
            // id fell from 20,000/s to 60/s after 100,000 messages in the benchmark.
            .options([("plan_cache_mode", "force_custom_plan")]);
        if !options.statement_timeout.is_zero() {
            connect = connect.options([(
                "statement_timeout",
                format!("{}ms", options.statement_timeout.as_millis()),
            )]);
        }
        let mut conn = tokio::time::timeout(options.connect_timeout, connect.connect())
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolTimedOut))??;
        // Several instances may start at once: the migrator takes an advisory lock.
        MIGRATOR.run(&mut conn).await?;
        warn_without_autovacuum(&mut conn).await;
        let connections = options.read_connections.max(2);
        let reads = ReadConnections::<Postgres>::new(
            connect.clone(),
            connections - (connections / 4).max(1),
            options.connect_timeout,
        );
        let pool = PgPoolOptions::new()
            .max_connections(connections - reads.size())
            .min_connections(1)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect.clone())
            .await?;

        let (tx, rx) = mpsc::channel(8192);
        let head_now: i64 = sqlx::query_scalar("SELECT seq FROM feed_head")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        let head = Arc::new(AtomicI64::new(head_now));
        let signals = Signals::default();
        let instance = instance_name();
        let (local_tx, local_rx) = mpsc::unbounded_channel();

        // The writer gets a thread and runtime of its own (its connection is made there): on
        // the shared workers it waited behind every HTTP task at each step of a group commit.
        let max_batch = options.max_batch.max(1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Commit(format!("starting the writer: {e}")))?;
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), sqlx::Error>>();
        let (writer_connect, writer_instance, writer_signals) =
            (connect.clone(), instance.clone(), signals.clone());
        let connect_timeout = options.connect_timeout;
        std::thread::Builder::new()
            .name("switchboard-writer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let (conn, backend) =
                        match connect_writer(&writer_connect, connect_timeout).await {
                            Ok(c) => {
                                let _ = ready_tx.send(Ok(()));
                                c
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                    let ctx = WriterCtx {
                        conn,
                        connect: writer_connect,
                        instance: writer_instance,
                        connect_timeout,
                        backend,
                        reconnects: 0,
                        xid: 0,
                        // Nothing matches: the first transaction loads the open chats.
                        committed: -1,
                        locked: 0,
                        core: WriterCore::default(),
                        signals: writer_signals,
                        local: local_tx,
                    };
                    writer_loop(ctx, rx, max_batch).await;
                })
            })
            .map_err(|e| StoreError::Commit(format!("starting the writer: {e}")))?;
        ready_rx.await.map_err(|_| StoreError::WriterGone)??;
        let mut tasks = Vec::new();

        let agents = Arc::new(AgentCache::new(options.agent_cache_ttl));
        let (feed_tx, feed_rx) = mpsc::unbounded_channel();
        let feed_taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (remote, remote_rx) = tokio::sync::watch::channel(head_now);
        tasks.push(tokio::spawn(listen(pool.clone(), remote, agents.clone())));
        tasks.push(tokio::spawn(
            FeedReader {
                pool: pool.clone(),
                after: head_now,
                head: head.clone(),
                out: feed_tx,
                taken: feed_taken.clone(),
                signals: signals.clone(),
            }
            .run(local_rx, remote_rx, options.feed_poll),
        ));
        Ok(Self {
            pool,
            reads,
            writer: tx,
            agents,
            head,
            feed: std::sync::Mutex::new(Some(feed_rx)),
            feed_taken,
            signals,
            options,
            instance,
            tasks,
        })
    }

    /// Runs `f` inside the writer's next transaction, in a savepoint of its own (a failed
    /// statement aborts a whole PostgreSQL transaction, so even a job of one statement needs
    /// one to fail alone), and returns its result once committed.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriterCtx) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        let (job, rx) = writer::job(f);
        self.writer
            .send(WriterMsg::Job(job))
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
            Some(WriterMsg::Insert(job)) => batch.push(Pending::Insert(job)),
            Some(WriterMsg::Stop(done)) => stop = Some(done),
            None => break,
        }
        while batch.len() < max_batch && stop.is_none() {
            match rx.try_recv() {
                Ok(WriterMsg::Job(job)) => batch.push(Pending::Job(job)),
                Ok(WriterMsg::Insert(job)) => batch.push(Pending::Insert(job)),
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
    if let Some(done) = stop {
        let _ = done.send(());
    }
}

/// Starts a write transaction: locks the head row, which orders this transaction after
/// every other instance's, and brings the open chats up to date if another instance wrote
/// since this writer's last commit.
async fn begin(ctx: &mut WriterCtx) -> StoreResult<()> {
    let mut again = true;
    let (head, writer, xid) = loop {
        match lock_head(ctx).await {
            Ok(row) => break row,
            // A connection PostgreSQL ended while it was idle (a restart, a failover, an
            // idle timeout) is found out here, and nothing of the batch has run: connect
            // again and start over, once.
            Err(e) if again && connection_lost(&e) => {
                tracing::info!(error = %e, "the writer's connection was ended; connecting again");
                again = false;
                reconnect(ctx).await;
            }
            Err(e) => {
                if connection_lost(&e) {
                    reconnect(ctx).await;
                } else {
                    let _ = ctx.exec("ROLLBACK").await;
                }
                return Err(e.into());
            }
        }
    };
    if head != ctx.committed || writer != ctx.instance {
        if let Err(e) = catch_up(ctx, head).await {
            let _ = ctx.exec("ROLLBACK").await;
            return Err(e);
        }
    }
    ctx.core.next_seq = head + 1;
    ctx.locked = head;
    ctx.xid = xid;
    Ok(())
}

/// Starts a transaction and locks the head row: the head, the writer that moved it last and
/// this transaction's id (assigned here rather than at its first write, to be known).
async fn lock_head(ctx: &mut WriterCtx) -> Result<(i64, String, i64), sqlx::Error> {
    ctx.exec("BEGIN").await?;
    sqlx::query_as("SELECT seq, writer, txid_current() FROM feed_head FOR UPDATE")
        .fetch_one(&mut ctx.conn)
        .await
}

/// Replaces the writer's connection after a failure that may have broken it (the failed
/// batch is answered with an error; the next one uses the new connection).
async fn reconnect(ctx: &mut WriterCtx) {
    ctx.committed = -1;
    match connect_writer(&ctx.connect, ctx.connect_timeout).await {
        Ok((conn, backend)) => {
            let old = std::mem::replace(&mut ctx.conn, conn);
            let old_backend = std::mem::replace(&mut ctx.backend, backend);
            ctx.reconnects += 1;
            // Ends the old backend if it still listens (and so any transaction it holds).
            let close: BoxFuture<'_, Result<(), sqlx::Error>> = Box::pin(old.close());
            let _ = tokio::time::timeout(ctx.connect_timeout, close).await;
            // It may not hear (a connection broken on the way): a transaction it holds open
            // would keep the head row locked, every instance's writes waiting behind it.
            if let Err(e) = end_backend(ctx, &old_backend).await {
                tracing::warn!(error = %e, pid = old_backend.pid, "could not end the writer's old backend");
            }
            tracing::info!("the writer reconnected to PostgreSQL");
        }
        Err(e) => tracing::error!(error = %e, "the writer cannot reconnect to PostgreSQL"),
    }
}

/// A backend process, told apart from a later one given the same pid by its start time.
struct Backend {
    pid: i32,
    started: String,
}

/// Opens the writer's connection; returns it with its backend.
async fn connect_writer(
    options: &PgConnectOptions,
    limit: Duration,
) -> Result<(PgConnection, Backend), sqlx::Error> {
    let connected = tokio::time::timeout(limit, async {
        let mut conn = options.connect().await?;
        let (pid, started): (i32, String) = sqlx::query_as(
            "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await?;
        Ok((conn, Backend { pid, started }))
    });
    connected.await.map_err(|_| sqlx::Error::PoolTimedOut)?
}

/// Ends `backend` if it still runs, through the writer's connection.
async fn end_backend(ctx: &mut WriterCtx, backend: &Backend) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid = $1 AND backend_start::text = $2",
    )
    .bind(backend.pid)
    .bind(&backend.started)
    .execute(&mut ctx.conn)
    .await
    .map(|_| ())
}

/// A new name for a writer in `feed_head.writer`.
fn instance_name() -> String {
    format!("{}-{}", std::process::id(), crate::ids::new_id())
}

/// What became of a commit whose answer was lost with the connection.
enum Outcome {
    Committed,
    RolledBack,
    /// PostgreSQL could not be asked (why) within [`OUTCOME_DEADLINE`].
    Unknown(String),
}

/// How long the writer tries to find out what became of a commit whose connection broke
/// (every other write waits meanwhile, as it would for the database anyway).
const OUTCOME_DEADLINE: Duration = Duration::from_secs(60);

/// Asks again and again, on a new connection each time the last one failed, until `ask`
/// has an answer or [`OUTCOME_DEADLINE`] passes.
async fn find_out<F>(ctx: &mut WriterCtx, mut ask: F) -> Outcome
where
    F: for<'c> FnMut(&'c mut WriterCtx) -> BoxFuture<'c, Result<Option<Outcome>, String>>,
{
    let deadline = tokio::time::Instant::now() + OUTCOME_DEADLINE;
    let mut pause = Duration::from_millis(10);
    reconnect(ctx).await;
    loop {
        let why = match ask(ctx).await {
            Ok(Some(outcome)) => return outcome,
            Ok(None) => "the transaction is still in progress".to_owned(),
            Err(e) => {
                reconnect(ctx).await;
                e
            }
        };
        if tokio::time::Instant::now() + pause > deadline {
            return Outcome::Unknown(why);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Finds out whether the current transaction, whose COMMIT failed, committed all the same
/// (its answer lost with the connection), from PostgreSQL's record of transactions. The old
/// backend, which may still hold it open waiting for a COMMIT yet to arrive, is ended when
/// the writer connects again, which settles it.
async fn transaction_outcome(ctx: &mut WriterCtx) -> Outcome {
    let xid = ctx.xid;
    find_out(ctx, move |ctx| {
        Box::pin(async move {
            let status: Option<String> = sqlx::query_scalar("SELECT txid_status($1)")
                .bind(xid)
                .fetch_one(&mut ctx.conn)
                .await
                .map_err(|e| e.to_string())?;
            match status.as_deref() {
                Some("committed") => Ok(Some(Outcome::Committed)),
                Some("aborted") => Ok(Some(Outcome::RolledBack)),
                // Its backend, ended, has yet to finish with it.
                Some(_) => Ok(None),
                None => Ok(Some(Outcome::Unknown(format!(
                    "PostgreSQL no longer knows transaction {xid}"
                )))),
            }
        })
    })
    .await
}

/// Finds out whether a single-statement batch whose answer was lost with the connection was
/// applied. Its statement moves the head only while the head row names this writer, so the
/// writer takes a new name first; then, holding the head row (the statement, if it is still
/// running, finishes first), it looks for the batch's first row, and if that is not there,
/// writes the new name into the head row: the statement, should it still arrive, matches
/// nothing.
async fn statement_outcome(ctx: &mut WriterCtx, first_id: &str) -> Outcome {
    ctx.instance = instance_name();
    let first_id = first_id.to_owned();
    find_out(ctx, move |ctx| {
        let first_id = first_id.clone();
        Box::pin(async move {
            let found = fence(ctx, &first_id).await;
            if found.is_err() {
                let _ = ctx.exec("ROLLBACK").await;
            }
            found
                .map(|found| {
                    Some(if found {
                        Outcome::Committed
                    } else {
                        Outcome::RolledBack
                    })
                })
                .map_err(|e| e.to_string())
        })
    })
    .await
}

/// See [`statement_outcome`]: whether the message `first_id` is there; if not, the head row
/// now names this writer by its new name.
async fn fence(ctx: &mut WriterCtx, first_id: &str) -> Result<bool, sqlx::Error> {
    ctx.exec("BEGIN").await?;
    sqlx::query("SELECT seq FROM feed_head FOR UPDATE")
        .execute(&mut ctx.conn)
        .await?;
    let found: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM messages WHERE id = $1)")
        .bind(first_id)
        .fetch_one(&mut ctx.conn)
        .await?;
    if !found {
        sqlx::query("UPDATE feed_head SET writer = $1")
            .bind(&ctx.instance)
            .execute(&mut ctx.conn)
            .await?;
    }
    ctx.exec("COMMIT").await?;
    Ok(found)
}

/// Reloads the open chats that other instances' writes since `ctx.committed` touched (all
/// of them on the first transaction).
async fn catch_up(ctx: &mut WriterCtx, head: i64) -> StoreResult<()> {
    if ctx.committed < 0 {
        ctx.core.open_chats = load_open_chats(&mut ctx.conn, None).await?;
    } else {
        let touched: Vec<String> = sqlx::query_scalar(
            "SELECT conversation_id FROM messages WHERE seq > $1 AND seq <= $2 \
             UNION SELECT conversation_id FROM events WHERE seq > $1 AND seq <= $2 \
             UNION SELECT conversation_id FROM webhook_events WHERE seq > $1 AND seq <= $2",
        )
        .bind(ctx.committed)
        .bind(head)
        .fetch_all(&mut ctx.conn)
        .await?;
        if !touched.is_empty() {
            for c in &touched {
                ctx.core.open_chats.remove(c);
            }
            let fresh = load_open_chats(&mut ctx.conn, Some(&touched)).await?;
            ctx.core.open_chats.extend(fresh);
        }
    }
    ctx.committed = head;
    Ok(())
}

/// Why [`commit`] failed.
enum CommitError {
    /// Before COMMIT was sent: the transaction cannot commit.
    Before(sqlx::Error),
    /// COMMIT was sent and failed: it may have committed all the same.
    During(sqlx::Error),
}

/// Ends a write transaction: records the new head and this writer as its author, commits.
async fn commit(ctx: &mut WriterCtx) -> Result<i64, CommitError> {
    let head = ctx.core.next_seq - 1;
    let notify = if head > ctx.committed {
        format!(", n AS (SELECT pg_notify('{FEED_CHANNEL}', $1::text)) SELECT 1 FROM n")
    } else {
        " SELECT 1".to_owned()
    };
    sqlx::query(&format!(
        "WITH u AS (UPDATE feed_head SET seq = $1, writer = $2 RETURNING 1){notify}"
    ))
    .bind(head)
    .bind(&ctx.instance)
    .execute(&mut ctx.conn)
    .await
    .map_err(CommitError::Before)?;
    ctx.exec("COMMIT").await.map_err(CommitError::During)?;
    Ok(head)
}

fn run_batch<'a>(ctx: &'a mut WriterCtx, batch: &'a mut Vec<Pending>) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let (writes, started) = (batch.len(), std::time::Instant::now());
        if let Some(mut again) = run_batch_inner(ctx, batch, true).await {
            tracing::info!(
                size = again.len(),
                "writing the batch again on the new connection"
            );
            run_batch_inner(ctx, &mut again, false).await;
        }
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

/// The new messages of a batch, to write them again: those with an idempotency key, then
/// the others (the order of their answers).
type Resend = (
    Vec<(MessageRow, Option<IdempotencyRecord>)>,
    Vec<MessageRow>,
);

/// Runs one batch. Returns the batch to run again when it was only new messages and its
/// connection broke before it committed, and `may_retry` (jobs cannot be run again: running
/// uses them up).
async fn run_batch_inner(
    ctx: &mut WriterCtx,
    batch: &mut Vec<Pending>,
    may_retry: bool,
) -> Option<Vec<Pending>> {
    let started = std::time::Instant::now();
    ctx.core.wanted.clear();
    let size = batch.len();
    if let Some(rows) = ctx.fast_path_rows(batch) {
        // Only new messages for known conversations, and nobody else wrote since this
        // writer's last commit: one statement moves the head and inserts them, atomic and
        // durable on its own, so the batch costs one round trip.
        let first = ctx.committed + 1;
        let rows: Vec<MessageRow> = rows
            .into_iter()
            .zip(first..)
            .map(|(mut r, seq)| {
                r.seq = seq;
                r
            })
            .collect();
        let applied = match insert_rows_at_head(ctx, &rows).await {
            Ok(applied) => Ok(applied),
            Err(e) => {
                tracing::warn!(error = %e, "a single-statement commit failed; looking up whether it was applied");
                match statement_outcome(ctx, &rows[0].id).await {
                    Outcome::Committed => Ok(true),
                    // Nothing written, and the statement can no longer apply: the general
                    // path writes the batch on the new connection.
                    Outcome::RolledBack => Ok(false),
                    Outcome::Unknown(why) => Err(CommitFailure::Unknown(format!("{e}; {why}"))),
                }
            }
        };
        match applied {
            Ok(true) => {
                for row in &rows {
                    if let Some(chat) = ctx.core.open_chats.get_mut(&row.conversation_id) {
                        chat.note(row);
                    }
                }
                let after = first - 1;
                ctx.committed = first + rows.len() as i64 - 1;
                tracing::debug!(
                    size,
                    total_us = started.elapsed().as_micros() as u64,
                    "group commit (single statement)"
                );
                let rows: Vec<Arc<MessageRow>> = rows
                    .into_iter()
                    .map(|r| ctx.core.message_created(r))
                    .collect();
                let head = ctx.committed;
                ctx.publish(after, head);
                answer_fast_path(batch, rows);
                return None;
            }
            // Another instance wrote since (or the statement was not applied): take the
            // general path, which catches up.
            Ok(false) => {}
            Err(failure) => {
                fail_fast_path(batch, &failure);
                return None;
            }
        }
    }
    if let Err(e) = begin(ctx).await {
        tracing::error!(error = %e, jobs = batch.len(), "could not start a write transaction");
        ctx.committed = -1;
        // Dropping the jobs answers their callers with an error; nothing was written.
        batch.clear();
        return None;
    }
    let connection = ctx.reconnects;
    // The messages of a batch of new messages only, in the order of their answers in
    // `owed` (keyed ones first, then plain ones), to write them again if need be.
    let mut again: Option<Resend> = (may_retry
        && batch.iter().all(|p| matches!(p, Pending::Insert(_))))
    .then(|| (Vec::new(), Vec::new()));
    let mut owed: Vec<Owed> = Vec::with_capacity(batch.len());
    let mut plain: Vec<InsertJob> = Vec::new();
    for pending in batch.drain(..) {
        if let (Some((keyed, plain)), Pending::Insert(job)) = (again.as_mut(), &pending) {
            match &job.idem {
                Some(_) => keyed.push((job.row.clone(), job.idem.clone())),
                None => plain.push(job.row.clone()),
            }
        }
        match pending {
            Pending::Job(job) => {
                // One failing job must not leave half its writes behind, nor undo the others'.
                let done = ctx.in_savepoint(|ctx| job(ctx), |d| d.ok).await;
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
        Ok(()) => match commit(ctx).await {
            Ok(head) => Ok(head),
            Err(CommitError::Before(e)) => Err(CommitFailure::RolledBack(e.to_string())),
            Err(CommitError::During(e)) => {
                tracing::warn!(error = %e, "COMMIT failed; looking up whether it was applied");
                match transaction_outcome(ctx).await {
                    Outcome::Committed => Ok(ctx.core.next_seq - 1),
                    Outcome::RolledBack => Err(CommitFailure::RolledBack(e.to_string())),
                    Outcome::Unknown(why) => Err(CommitFailure::Unknown(format!("{e}; {why}"))),
                }
            }
        },
        Err(why) => Err(CommitFailure::RolledBack(why)),
    };
    tracing::debug!(
        size,
        work_us = before_commit.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "group commit"
    );
    let commit_error = match commit {
        Ok(head) => {
            ctx.committed = head;
            ctx.core.committed();
            let after = ctx.locked;
            ctx.publish(after, head);
            None
        }
        Err(failure) => {
            tracing::error!(?failure, "commit failed; the batch is rolled back");
            if ctx.exec("ROLLBACK").await.is_err() {
                reconnect(ctx).await;
            }
            // The chats in memory may be ahead of the database now: reload them all.
            ctx.committed = -1;
            ctx.core.rolled_back();
            Some(failure)
        }
    };
    // Nothing of it was written, and the connection it was on is gone (so the failure was
    // most likely the connection's, not the batch's): write it again on the new one.
    if let (Some((keyed, plain)), Some(CommitFailure::RolledBack(_))) = (again, &commit_error) {
        if ctx.reconnects != connection {
            let rows = keyed
                .into_iter()
                .chain(plain.into_iter().map(|row| (row, None)));
            let retry: Vec<Pending> = owed
                .into_iter()
                .zip(rows)
                .filter_map(|(o, (row, idem))| match o {
                    Owed::Insert(reply, _) => Some(Pending::Insert(InsertJob { row, idem, reply })),
                    Owed::Job(_) => None,
                })
                .collect();
            return Some(retry);
        }
    }
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
    None
}

/// Answers the callers of a committed single-statement batch, each with its row.
fn answer_fast_path(batch: &mut Vec<Pending>, rows: Vec<Arc<MessageRow>>) {
    for (pending, row) in batch.drain(..).zip(rows) {
        if let Pending::Insert(job) = pending {
            let _ = job.reply.send(Ok(Guarded::Applied(row)));
        }
    }
}

/// Answers the callers of a single-statement batch that failed (or may have).
fn fail_fast_path(batch: &mut Vec<Pending>, failure: &CommitFailure) {
    tracing::error!(?failure, rows = batch.len(), "inserting messages failed");
    for pending in batch.drain(..) {
        if let Pending::Insert(job) = pending {
            let _ = job.reply.send(Err(failure.error()));
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
    if m.seq == 0 {
        m.seq = ctx.core.take_seq();
    }
    ctx.track_chat(&m).await?;
    insert_rows(&mut ctx.conn, std::slice::from_ref(&m)).await?;
    let m = ctx.core.message_created(m);
    if let Some(rec) = &idem {
        ctx.idem_save(&m.account_id, rec).await?;
    }
    Ok(Guarded::Applied(m))
}

/// Gives a new message its conversation (creating visitor and conversation on first contact)
/// and seq, and notes it in its chat (starting one if it is the first of a chat).
async fn prepare_insert(ctx: &mut WriterCtx, mut row: MessageRow) -> StoreResult<MessageRow> {
    row.conversation_id = ctx
        .conversation_for(&row.account_id, &row.visitor_id, row.created_at)
        .await?;
    row.seq = ctx.core.take_seq();
    ctx.track_chat(&row).await?;
    Ok(row)
}

/// The INSERT of messages whose conversation and seq are set, as one statement with one
/// array per column (so it is prepared once, whatever the number of rows).
const INSERT_MESSAGES_SQL: &str = "\
    INSERT INTO messages (seq, id, account_id, conversation_id, visitor_id, type, text, \
      agent_id, agent_name, agent_userpic, is_pushed, is_missed, is_missed_by_visitor, \
      is_trigger, received_from, created_at, updated_at) \
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
      $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bool[], $12::bool[], \
      $13::bool[], $14::bool[], $15::text[], $16::bigint[], $17::bigint[])";

/// Binds the columns of `rows` to [`INSERT_MESSAGES_SQL`]-shaped statements.
fn bind_rows<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    rows: &[MessageRow],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn col<T>(rows: &[MessageRow], f: impl Fn(&MessageRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    q.bind(col(rows, |m| m.seq))
        .bind(col(rows, |m| m.id.clone()))
        .bind(col(rows, |m| m.account_id.clone()))
        .bind(col(rows, |m| m.conversation_id.clone()))
        .bind(col(rows, |m| m.visitor_id.clone()))
        .bind(col(rows, |m| m.kind.clone()))
        .bind(col(rows, |m| m.text.clone()))
        .bind(col(rows, |m| m.agent_id.clone()))
        .bind(col(rows, |m| m.agent_name.clone()))
        .bind(col(rows, |m| m.agent_userpic.clone()))
        .bind(col(rows, |m| m.is_pushed))
        .bind(col(rows, |m| m.is_missed))
        .bind(col(rows, |m| m.is_missed_by_visitor))
        .bind(col(rows, |m| m.is_trigger))
        .bind(col(rows, |m| m.received_from.clone()))
        .bind(col(rows, |m| m.created_at))
        .bind(col(rows, |m| m.updated_at))
}

/// Inserts messages whose conversation and seq are set (inside the writer's transaction).
fn insert_rows<'a>(
    conn: &'a mut PgConnection,
    rows: &'a [MessageRow],
) -> BoxFuture<'a, StoreResult<()>> {
    Box::pin(async move {
        bind_rows(sqlx::query(INSERT_MESSAGES_SQL), rows)
            .execute(conn)
            .await?;
        Ok(())
    })
}

/// Inserts messages numbered from `committed + 1` in one autocommit statement that also
/// moves the head, provided the head is still this writer's last commit; false (nothing
/// written) if another instance wrote since.
async fn insert_rows_at_head(ctx: &mut WriterCtx, rows: &[MessageRow]) -> StoreResult<bool> {
    // The NOTIFY is part of the statement's transaction: other instances hear of the rows
    // when they are committed, never before.
    let sql = format!(
        "WITH h AS (UPDATE feed_head SET seq = seq + $18 WHERE seq = $19 AND writer = $20 \
         RETURNING seq), i AS ({INSERT_MESSAGES_SQL} WHERE EXISTS (SELECT 1 FROM h)) \
         SELECT pg_notify('{FEED_CHANNEL}', seq::text) FROM h"
    );
    let r = bind_rows(sqlx::query(&sql), rows)
        .bind(rows.len() as i64)
        .bind(ctx.committed)
        .bind(&ctx.instance)
        .execute(&mut ctx.conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

impl WriterCtx {
    /// The rows of a batch that can be written by one statement: only plain inserts
    /// (no idempotency key), all to visitors whose conversation is known, none starting a
    /// chat, at most one chunk, and only while this writer's memory is current.
    fn fast_path_rows(&mut self, batch: &[Pending]) -> Option<Vec<MessageRow>> {
        if batch.len() > INSERT_CHUNK || self.committed < 0 {
            return None;
        }
        let mut rows = Vec::with_capacity(batch.len());
        for pending in batch {
            let Pending::Insert(job) = pending else {
                return None;
            };
            if job.idem.is_some() {
                return None;
            }
            let conversation = self.core.plain_conversation(
                &job.row.account_id,
                &job.row.visitor_id,
                job.row.is_pushed,
            )?;
            let mut row = job.row.clone();
            row.conversation_id = conversation.clone();
            rows.push(row);
        }
        Some(rows)
    }

    /// After a commit of the positions (after, head]: hands its changes to the feed reader
    /// and wakes the outbox dispatcher.
    fn publish(&mut self, after: i64, head: i64) {
        if std::mem::take(&mut self.core.outbox_touched) {
            self.signals.outbox.notify_one();
        }
        let mut events = std::mem::take(&mut self.core.events);
        if head <= after {
            return;
        }
        if events.iter().any(|e| e.kind == EventKind::MessageCreated) {
            self.signals.activity.notify_one();
        }
        events.sort_by_key(|e| e.seq);
        let _ = self.local.send(LocalCommit {
            after,
            head,
            events,
        });
    }
}

impl Writer for WriterCtx {
    type Db = sqlx::Postgres;

    fn parts(&mut self) -> (&mut PgConnection, &mut WriterCore) {
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
                 message_id, chat_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(seq)
            .bind(&m.account_id)
            .bind(&m.conversation_id)
            .bind(&m.visitor_id)
            .bind(kind.as_str())
            .bind(&m.id)
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
                        "SELECT count(*) FROM webhooks WHERE account_id = $1 AND enabled \
                         AND $2 = ANY(string_to_array(events, ','))",
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
                "WITH e AS (INSERT INTO webhook_events (id, seq, account_id, conversation_id, \
                   visitor_id, kind, chat_id, from_seq, to_seq, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)), \
                 w AS (SELECT id FROM webhooks WHERE account_id = $3 AND enabled \
                   AND $6 = ANY(string_to_array(events, ','))), \
                 d AS (INSERT INTO webhook_deliveries (webhook_id, event_id, account_id, \
                   conversation_id, event_seq, next_attempt_at, created_at) \
                   SELECT w.id, $1, $3, $4, $2, $10, $10 FROM w) \
                 INSERT INTO webhook_queues (webhook_id, conversation_id, head_seq, \
                   next_attempt_at) \
                   SELECT w.id, $4, $2, $10 FROM w \
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
            sqlx::query(ADVANCE_QUEUE_SQL)
                .bind(vec![webhook_id.to_owned()])
                .bind(vec![conversation_id.to_owned()])
                .execute(&mut self.conn)
                .await?;
            Ok(())
        })
    }
}

/// The open chats (of the `only` conversations if given), with their last activity
/// recomputed from the messages: each from the newest message by position (an index probe,
/// however long the conversation), as the writer notes them.
async fn load_open_chats(
    conn: &mut PgConnection,
    only: Option<&[String]>,
) -> StoreResult<WriterMap<OpenChat>> {
    let rows: Vec<OpenChatRow> = sqlx::query_as(
        "SELECT c.id, c.account_id, c.conversation_id, c.visitor_id, c.start_seq, c.started_at, \
         c.no_agent_online, c.start_page_url, c.start_page_title, \
         coalesce((SELECT m.created_at FROM messages m WHERE m.account_id = c.account_id \
                   AND m.visitor_id = c.visitor_id AND m.seq >= c.start_seq AND NOT m.is_pushed \
                   ORDER BY m.seq DESC LIMIT 1), c.started_at) AS last_activity, \
         coalesce((SELECT m.created_at FROM messages m WHERE m.account_id = c.account_id \
                   AND m.visitor_id = c.visitor_id AND m.seq >= c.start_seq \
                   ORDER BY m.seq DESC LIMIT 1), c.started_at) AS last_message_at, \
         coalesce((SELECT m.seq FROM messages m WHERE m.account_id = c.account_id \
                   AND m.visitor_id = c.visitor_id AND m.seq >= c.start_seq \
                   ORDER BY m.seq DESC LIMIT 1), c.start_seq) AS last_seq, \
         c.fragment_seq \
         FROM chats c WHERE c.ended_at IS NULL \
         AND ($1::text[] IS NULL OR c.conversation_id = ANY($1))",
    )
    .bind(only)
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

/// Points each queue ($1 endpoints, $2 conversations, as parallel arrays) at its oldest
/// pending delivery, releasing any claim, and removes the queues with none left.
const ADVANCE_QUEUE_SQL: &str = "\
    WITH k AS (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS k(w, c)), \
    heads AS (SELECT k.w, k.c, h.event_seq, h.next_attempt_at FROM k \
      LEFT JOIN LATERAL (SELECT event_seq, next_attempt_at FROM webhook_deliveries \
        WHERE webhook_id = k.w AND conversation_id = k.c AND status = 'pending' \
        ORDER BY event_seq LIMIT 1) h ON true), \
    gone AS (DELETE FROM webhook_queues q USING heads \
      WHERE heads.event_seq IS NULL AND q.webhook_id = heads.w AND q.conversation_id = heads.c) \
    INSERT INTO webhook_queues (webhook_id, conversation_id, head_seq, next_attempt_at) \
      SELECT w, c, event_seq, next_attempt_at FROM heads WHERE event_seq IS NOT NULL \
      ON CONFLICT (webhook_id, conversation_id) DO UPDATE SET \
      head_seq = excluded.head_seq, next_attempt_at = excluded.next_attempt_at, \
      claimed_until = 0, claimed_by = NULL";

/// Records attempts given as parallel arrays: each delivery's new state and its log entry.
const RECORD_ATTEMPTS_SQL: &str = "\
    WITH o AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], \
        $5::bigint[], $6::bigint[], $7::text[], $8::bigint[]) \
        AS o(w, e, status, retry_at, at, code, error, latency)), \
    u AS (UPDATE webhook_deliveries d SET attempts = d.attempts + 1, status = o.status, \
        next_attempt_at = coalesce(o.retry_at, d.next_attempt_at), last_attempt_at = o.at, \
        last_status = o.code, last_error = o.error, last_latency_ms = o.latency, \
        delivered_at = CASE WHEN o.status = 'delivered' THEN o.at ELSE d.delivered_at END \
        FROM o WHERE d.webhook_id = o.w AND d.event_id = o.e \
        RETURNING d.webhook_id, d.event_id, d.attempts, o.at, o.code, o.latency, o.error) \
    INSERT INTO webhook_attempts (webhook_id, event_id, attempt, at, status_code, \
      latency_ms, error) SELECT * FROM u";

/// Records attempts: their delivery and log changes in one statement, their queues moved on
/// in a second; endpoint health is then updated where it changes.
async fn record_attempts_in(
    ctx: &mut WriterCtx,
    outcomes: Vec<AttemptOutcome>,
) -> StoreResult<Vec<EndpointHealth>> {
    let status: Vec<&str> = outcomes
        .iter()
        .map(|o| match (o.error.is_none(), o.retry_at) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        })
        .collect();
    let hooks: Vec<String> = outcomes.iter().map(|o| o.webhook_id.clone()).collect();
    let conversations: Vec<String> = outcomes.iter().map(|o| o.conversation_id.clone()).collect();
    sqlx::query(RECORD_ATTEMPTS_SQL)
        .bind(&hooks)
        .bind(
            outcomes
                .iter()
                .map(|o| o.event_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(status)
        .bind(outcomes.iter().map(|o| o.retry_at).collect::<Vec<_>>())
        .bind(outcomes.iter().map(|o| o.at).collect::<Vec<_>>())
        .bind(
            outcomes
                .iter()
                .map(|o| o.status_code.map(i64::from))
                .collect::<Vec<_>>(),
        )
        .bind(outcomes.iter().map(|o| o.error.clone()).collect::<Vec<_>>())
        .bind(outcomes.iter().map(|o| o.latency_ms).collect::<Vec<_>>())
        .execute(&mut ctx.conn)
        .await?;
    sqlx::query(ADVANCE_QUEUE_SQL)
        .bind(&hooks)
        .bind(&conversations)
        .execute(&mut ctx.conn)
        .await?;
    ctx.core.outbox_touched = true;
    let mut health = Vec::with_capacity(outcomes.len());
    for o in &outcomes {
        health.push(super::portable::update_health::<sqlx::Postgres>(&mut ctx.conn, o).await?);
    }
    Ok(health)
}

/// One row of the feed union: the event and, when it concerns one, its message.
struct FeedRow {
    fseq: i64,
    fkind: String,
    faccount: String,
    fconversation: String,
    fvisitor: String,
    fchat: Option<String>,
    message: Option<MessageRow>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for FeedRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let id: Option<String> = row.try_get("id")?;
        let message = match id {
            Some(_) => Some(MessageRow::from_row(row)?),
            None => None,
        };
        Ok(FeedRow {
            fseq: row.try_get("fseq")?,
            fkind: row.try_get("fkind")?,
            faccount: row.try_get("faccount")?,
            fconversation: row.try_get("fconversation")?,
            fvisitor: row.try_get("fvisitor")?,
            fchat: row.try_get("fchat")?,
            message,
        })
    }
}

async fn insert_agent(
    conn: &mut PgConnection,
    account_id: &str,
    a: &NewAgent,
) -> StoreResult<AgentRow> {
    let email_key = a.email.as_deref().map(|e| email_key(e).into_owned());
    sqlx::query(
        "INSERT INTO agents (id, account_id, name, email, email_key, userpic, is_dummy, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
        sqlx::query(
            "INSERT INTO group_members (group_id, agent_id, account_id) VALUES ($1, $2, $3)",
        )
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

/// Up to `limit` feed entries after `after`, oldest first: of one account (and visitor) if
/// given, else of every account (the feed reader's view, on the pool).
async fn read_feed<'e>(
    on: impl Executor<'e, Database = Postgres> + Copy,
    account_id: Option<&str>,
    visitor_id: Option<&str>,
    after: i64,
    limit: i64,
) -> StoreResult<Vec<FeedEvent>> {
    let cols = MESSAGE_COLUMNS_M;
    // Each branch is cut at `limit` first, so the union never sorts more than twice that.
    let sql = format!(
        "SELECT * FROM (SELECT m.seq AS fseq, 'messageCreated' AS fkind, \
           m.account_id AS faccount, m.conversation_id AS fconversation, \
           m.visitor_id AS fvisitor, NULL::text AS fchat, {cols} \
           FROM messages m WHERE ($1::text IS NULL OR m.account_id = $1) \
           AND ($2::text IS NULL OR m.visitor_id = $2) AND m.seq > $3 \
           ORDER BY m.seq LIMIT $4) a \
         UNION ALL \
         SELECT * FROM (SELECT e.seq AS fseq, e.kind AS fkind, e.account_id, e.conversation_id, \
           e.visitor_id, e.chat_id, {cols} \
           FROM events e LEFT JOIN messages m ON m.id = e.message_id \
           WHERE ($1::text IS NULL OR e.account_id = $1) \
           AND ($2::text IS NULL OR e.visitor_id = $2) AND e.seq > $3 \
           ORDER BY e.seq LIMIT $4) b \
         ORDER BY fseq LIMIT $4"
    );
    let rows: Vec<FeedRow> = sqlx::query_as(&sql)
        .bind(account_id)
        .bind(visitor_id)
        .bind(after)
        .bind(limit)
        .fetch_all(on)
        .await?;
    let chat_ids: Vec<String> = rows.iter().filter_map(|r| r.fchat.clone()).collect();
    let mut chats: HashMap<String, ChatInfo> = HashMap::new();
    if !chat_ids.is_empty() {
        let found: Vec<ChatRow> = sqlx::query_as(&format!(
            "SELECT {CHAT_COLUMNS} FROM chats WHERE id = ANY($1)"
        ))
        .bind(&chat_ids)
        .fetch_all(on)
        .await?;
        for c in found {
            chats.insert(c.id.clone(), c.into());
        }
    }
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let kind = EventKind::parse(&r.fkind)?;
            let chat = r.fchat.as_ref().and_then(|c| chats.get(c).cloned());
            Some(FeedEvent {
                seq: r.fseq,
                kind,
                account_id: r.faccount,
                visitor_id: r.fvisitor,
                conversation_id: r.fconversation,
                message: r.message.map(Arc::new),
                chat,
            })
        })
        .collect())
}

/// Reads committed changes of every account in order and hands them to the real-time
/// fan-out: after each local commit, on a notification from another instance, and every
/// `poll` regardless.
struct FeedReader {
    pool: PgPool,
    after: i64,
    head: Arc<AtomicI64>,
    out: mpsc::UnboundedSender<Vec<Arc<FeedEvent>>>,
    taken: Arc<std::sync::atomic::AtomicBool>,
    signals: Signals,
}

impl FeedReader {
    const PAGE: i64 = 2000;

    async fn run(
        mut self,
        mut local: mpsc::UnboundedReceiver<LocalCommit>,
        mut remote: tokio::sync::watch::Receiver<i64>,
        poll: Duration,
    ) {
        loop {
            let read = tokio::select! {
                commit = local.recv() => match commit {
                    // This instance's commit right after what was read: its changes are
                    // forwarded as they are, without reading them back.
                    Some(c) if c.after == self.after => {
                        self.forward(c.head, c.events);
                        false
                    }
                    Some(c) => c.head > self.after,
                    None => return,
                },
                // A head announced by some instance (this one's own commits included, which
                // are mostly forwarded already).
                changed = remote.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let announced = *remote.borrow_and_update();
                    announced > self.after
                }
                _ = tokio::time::sleep(poll) => true,
            };
            if read {
                if let Err(e) = self.read_all().await {
                    tracing::warn!(error = %e, "reading the feed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Hands changes up to `head` on to the fan-out.
    fn forward(&mut self, head: i64, events: Vec<Arc<FeedEvent>>) {
        if events.iter().any(|e| e.kind == EventKind::MessageCreated) {
            // Another instance's messages move this instance's chat timers too.
            self.signals.activity.notify_one();
        }
        self.after = head;
        self.head.fetch_max(head, Ordering::SeqCst);
        if !events.is_empty() && self.taken.load(Ordering::SeqCst) {
            let _ = self.out.send(events);
        }
    }

    /// Reads and forwards everything after `self.after`.
    async fn read_all(&mut self) -> StoreResult<()> {
        loop {
            let page = read_feed(&self.pool, None, None, self.after, Self::PAGE).await?;
            let Some(last) = page.last().map(|e| e.seq) else {
                return Ok(());
            };
            let full = page.len() as i64 >= Self::PAGE;
            self.forward(last, page.into_iter().map(Arc::new).collect());
            if !full {
                return Ok(());
            }
        }
    }
}

/// Listens for commits (their new head goes to `remote`) and agent changes; reconnects when
/// the connection drops (and then has the feed read at once, for what it missed).
async fn listen(pool: PgPool, remote: tokio::sync::watch::Sender<i64>, agents: Arc<AgentCache>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen_all([FEED_CHANNEL, AGENTS_CHANNEL]).await {
            tracing::warn!(error = %e, "LISTEN; trying again");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything committed while not listening is read now.
        remote.send_replace(i64::MAX);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == AGENTS_CHANNEL => agents.clear(),
                Ok(Some(n)) => {
                    remote.send_replace(n.payload().parse().unwrap_or(i64::MAX));
                }
                Ok(None) => {
                    tracing::warn!("LISTEN connection lost; reconnecting");
                    remote.send_replace(i64::MAX);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl super::portable::SqlBackend for PostgresStore {
    type Db = sqlx::Postgres;

    type Reader<'a> = &'a ReadConnections<Postgres>;

    fn reader(&self) -> &ReadConnections<Postgres> {
        &self.reads
    }

    fn agents(&self) -> &AgentCache {
        &self.agents
    }

    fn write_sql<T, F>(&self, f: F) -> impl std::future::Future<Output = StoreResult<T>> + Send
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        self.write(move |ctx: &mut WriterCtx| f(&mut ctx.conn))
    }

    fn rows_affected(r: &sqlx::postgres::PgQueryResult) -> u64 {
        r.rows_affected()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ensure_default_account(&self, name: &str, now: i64) -> StoreResult<(Account, bool)> {
        let name = name.to_owned();
        self.write(move |ctx| {
            Box::pin(async move {
                let existing: Option<Account> = sqlx::query_as(
                    "SELECT id, name, is_default, created_at FROM accounts WHERE is_default",
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
                     identity_key) VALUES ($1, $2, true, $3, $4, $5)",
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
                     identity_key) VALUES ($1, $2, false, $3, $4, $5)",
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
        let account = account_id;
        let (account_id, agent) = (account_id.to_owned(), agent.clone());
        let result = self
            .write(move |ctx| {
                Box::pin(async move { insert_agent(&mut ctx.conn, &account_id, &agent).await })
            })
            .await;
        if result.is_ok() {
            self.agents_changed(account).await;
        }
        result
    }

    async fn agent_by_email_or_create(
        &self,
        account_id: &str,
        agent: &NewAgent,
    ) -> StoreResult<AgentRow> {
        let account = account_id;
        let (account_id, agent) = (account_id.to_owned(), agent.clone());
        let result = self
            .write(move |ctx| {
                Box::pin(async move {
                    let email_key = agent.email.as_deref().map(|e| email_key(e).into_owned());
                    let existing: Option<AgentRow> = sqlx::query_as(&format!(
                    "SELECT {AGENT_COLUMNS} FROM agents WHERE account_id = $1 AND email_key = $2"
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
            .await;
        if result.is_ok() {
            self.agents_changed(account).await;
        }
        result
    }

    async fn remove_agent(&self, account_id: &str, id: &str) -> StoreResult<bool> {
        let result = super::portable::delete_owned(self, "agents", account_id, id).await;
        if result.is_ok() {
            self.agents_changed(account_id).await;
        }
        result
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
                        "UPDATE agents SET online_until = greatest(online_until, $1) \
                     WHERE account_id = $2 AND id = $3",
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
            self.agents_changed(&account).await;
        }
        result
    }

    async fn insert_message(
        &self,
        mut m: MessageRow,
        idem: Option<IdempotencyRecord>,
    ) -> StoreResult<Guarded<Arc<MessageRow>>> {
        if m.id.is_empty() {
            m.id = crate::ids::new_id();
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Insert(InsertJob {
                row: m,
                idem,
                reply,
            }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::Aborted)?
    }

    async fn message(&self, account_id: &str, id: &str) -> StoreResult<Option<MessageRow>> {
        // No cache: another instance may change the message at any time.
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages \
                 WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL"
            )
        });
        Ok(sqlx::query_as(SQL.as_str())
            .bind(id)
            .bind(account_id)
            .fetch_optional(&self.reads)
            .await?)
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
        let mut query = sqlx::query_as(sql).bind(account_id).bind(visitor_id);
        if let Some(seq) = seq {
            query = query.bind(seq);
        }
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.reads)
            .await?;
        Ok(finish_page(rows, window, limit))
    }

    async fn visitor_exists(&self, account_id: &str, visitor_id: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1::bigint FROM visitors WHERE account_id = $1 AND id = $2")
                .bind(account_id)
                .bind(visitor_id)
                .fetch_optional(&self.reads)
                .await?;
        Ok(found.is_some())
    }

    async fn message_position(
        &self,
        account_id: &str,
        id: &str,
    ) -> StoreResult<Option<(i64, String)>> {
        Ok(
            sqlx::query_as(
                "SELECT seq, visitor_id FROM messages WHERE id = $1 AND account_id = $2",
            )
            .bind(id)
            .bind(account_id)
            .fetch_optional(&self.reads)
            .await?,
        )
    }

    async fn purge_idempotency_keys(&self, before: i64) -> StoreResult<u64> {
        self.write(move |ctx| {
            Box::pin(async move {
                let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
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
                    "UPDATE visitors SET name = coalesce($1, name), email = coalesce($2, email), \
                     browser_language = coalesce($3, browser_language), \
                     page_url = coalesce($4, page_url), page_title = coalesce($5, page_title), \
                     start_page_url = coalesce(start_page_url, $6), \
                     start_page_title = coalesce(start_page_title, $7), \
                     attributes = CASE WHEN $8 IS NULL THEN attributes \
                                  ELSE sb_merge_patch(attributes::jsonb, $9::jsonb)::text END, \
                     updated_at = $10 WHERE account_id = $11 AND id = $12",
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
                     WHERE v.account_id = $1 AND v.id = $2"
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
                    "UPDATE conversations SET visitor_read_seq = greatest(visitor_read_seq, $1) \
                     WHERE account_id = $2 AND visitor_id = $3",
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
        // Not cached: an agentOnlinePing on another instance must count at once.
        let until: Option<i64> =
            sqlx::query_scalar("SELECT max(online_until) FROM agents WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(&self.reads)
                .await?;
        Ok(until.unwrap_or(0) > now)
    }

    async fn feed(
        &self,
        account_id: &str,
        visitor_id: Option<&str>,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<FeedEvent>> {
        read_feed(
            &self.reads,
            Some(account_id),
            visitor_id,
            after,
            i64::from(limit),
        )
        .await
    }

    async fn feed_head(&self) -> StoreResult<i64> {
        Ok(self.head.load(Ordering::SeqCst))
    }

    fn take_feed(&self) -> Option<FeedReceiver> {
        let taken = self.feed.lock().ok()?.take();
        if taken.is_some() {
            self.feed_taken.store(true, Ordering::SeqCst);
        }
        taken
    }

    async fn run_timers(
        &self,
        now: i64,
        fragment_before: i64,
        idle_before: i64,
    ) -> StoreResult<TimerOutcome> {
        let (outcome, _flagged) = self
            .write(move |ctx| Box::pin(ctx.run_timers_in(now, fragment_before, idle_before)))
            .await?;
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
        // conversation's events in order at the receiver. A head is claimed for a lease, so
        // no other instance sends it meanwhile; an instance that dies loses its claims when
        // the lease runs out. Row locks are skipped, never waited for.
        let busy: Vec<String> = busy.iter().map(|(w, c)| format!("{w}|{c}")).collect();
        let lease = i64::try_from(self.options.webhook_lease.as_millis()).unwrap_or(60_000);
        let rows: Vec<DueRow> = sqlx::query_as(
            "WITH c AS (SELECT q.webhook_id, q.conversation_id FROM webhook_queues q \
               JOIN webhooks w ON w.id = q.webhook_id \
               WHERE q.next_attempt_at <= $1 AND q.claimed_until <= $1 AND w.enabled \
               AND NOT (q.webhook_id || '|' || q.conversation_id = ANY($2)) \
               ORDER BY q.next_attempt_at LIMIT $3 FOR UPDATE OF q SKIP LOCKED), \
             cl AS (UPDATE webhook_queues q SET claimed_until = $4, claimed_by = $5 FROM c \
               WHERE q.webhook_id = c.webhook_id AND q.conversation_id = c.conversation_id \
               RETURNING q.webhook_id, q.head_seq, q.next_attempt_at) \
             SELECT d.attempts, \
             e.id AS e_id, e.seq AS e_seq, e.account_id AS e_account_id, \
             e.conversation_id AS e_conversation_id, e.visitor_id AS e_visitor_id, \
             e.kind AS e_kind, e.chat_id AS e_chat_id, e.from_seq AS e_from_seq, \
             e.to_seq AS e_to_seq, e.payload AS e_payload, e.created_at AS e_created_at, \
             w.id AS w_id, w.account_id AS w_account_id, w.url AS w_url, w.events AS w_events, \
             w.description AS w_description, w.enabled AS w_enabled, w.secret AS w_secret, \
             w.created_at AS w_created_at, w.consecutive_failures AS w_consecutive_failures, \
             w.failing_since AS w_failing_since, w.last_error AS w_last_error \
             FROM cl \
             JOIN webhook_deliveries d ON d.webhook_id = cl.webhook_id AND d.event_seq = cl.head_seq \
             JOIN webhook_events e ON e.id = d.event_id \
             JOIN webhooks w ON w.id = cl.webhook_id \
             WHERE d.status = 'pending' ORDER BY cl.next_attempt_at",
        )
        .bind(now)
        .bind(&busy)
        .bind(i64::from(limit))
        .bind(now.saturating_add(lease))
        .bind(&self.instance)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(DueRow::into_due).collect())
    }

    async fn release_deliveries(&self, keys: Vec<(String, String)>) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let (hooks, conversations): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
        sqlx::query(
            "UPDATE webhook_queues q SET claimed_until = 0, claimed_by = NULL \
             FROM unnest($1::text[], $2::text[]) AS k(w, c) \
             WHERE q.webhook_id = k.w AND q.conversation_id = k.c AND q.claimed_by = $3",
        )
        .bind(hooks)
        .bind(conversations)
        .bind(&self.instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn freeze_payloads(
        &self,
        payloads: Vec<(String, String)>,
    ) -> StoreResult<HashMap<String, String>> {
        if payloads.is_empty() {
            return Ok(HashMap::new());
        }
        // Not through the writer: no seq is taken. A payload stored before (by an earlier
        // attempt, maybe on another instance) is kept and returned.
        let (ids, bodies): (Vec<String>, Vec<String>) = payloads.iter().cloned().unzip();
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "UPDATE webhook_events e SET payload = coalesce(e.payload, p.payload) \
             FROM unnest($1::text[], $2::text[]) AS p(id, payload) WHERE e.id = p.id \
             RETURNING e.id, e.payload",
        )
        .bind(ids)
        .bind(bodies)
        .fetch_all(&self.pool)
        .await?;
        let mut stored: HashMap<String, String> = rows
            .into_iter()
            .filter_map(|(id, p)| p.map(|p| (id, p)))
            .collect();
        for (id, payload) in payloads {
            stored.entry(id).or_insert(payload);
        }
        Ok(stored)
    }

    async fn next_delivery_at(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(greatest(q.next_attempt_at, q.claimed_until)) FROM webhook_queues q \
             JOIN webhooks w ON w.id = q.webhook_id WHERE w.enabled",
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
             WHERE d.account_id = $1 AND d.webhook_id = $2 AND d.event_seq < $3 \
             ORDER BY d.event_seq DESC LIMIT $4"
        ))
        .bind(account_id)
        .bind(webhook_id)
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
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
        self.reads.close().await;
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriterMsg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        for task in &self.tasks {
            task.abort();
        }
        // Deliveries this instance claimed and did not finish (its dispatcher has stopped)
        // go to the other instances, or to the next start, at once instead of after the lease.
        if let Err(e) = sqlx::query(
            "UPDATE webhook_queues SET claimed_until = 0, claimed_by = NULL WHERE claimed_by = $1",
        )
        .bind(&self.instance)
        .execute(&self.pool)
        .await
        {
            tracing::warn!(error = %e, "releasing webhook claims");
        }
        self.pool.close().await;
    }
}

impl PostgresStore {
    /// After a committed change to an account's agents (presence included: cached agents
    /// carry it): forgets what this instance cached and tells the other instances to do
    /// the same.
    async fn agents_changed(&self, account_id: &str) {
        self.agents.clear();
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(AGENTS_CHANNEL)
            .bind(account_id)
            .execute(&self.pool)
            .await
        {
            // The other instances' caches expire on their own soon after.
            tracing::warn!(error = %e, "announcing an agent change");
        }
    }
}

/// What an edit or delete does to a live agent message.
enum Change {
    Text(String),
    Delete,
}

impl PostgresStore {
    /// Applies `change` to a live agent message of the account whose pushed flag is
    /// `pushed`.
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
                        Change::Text(text) => ("text = $1::text", Some(text)),
                        Change::Delete => ("deleted_at = $1::bigint", None),
                    };
                    let sql = format!(
                        "UPDATE messages SET {set}, updated_at = $2 WHERE id = $3 AND account_id = $4 \
                         AND is_pushed = $5 AND deleted_at IS NULL AND type = 'agent' \
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
                    let row = query
                        .bind(now)
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
                    classify_change(&mut ctx.conn, row, &account_id, &id, pushed).await
                })
            })
            .await?;
        Ok(result)
    }
}

/// Tells "no such message" from "a visitor's message" after a guarded UPDATE matched nothing.
async fn classify_change(
    conn: &mut PgConnection,
    row: Option<MessageRow>,
    account_id: &str,
    id: &str,
    pushed: bool,
) -> StoreResult<MessageChange> {
    if let Some(row) = row {
        return Ok(MessageChange::Done(Box::new(row)));
    }
    let kind: Option<String> = sqlx::query_scalar(
        "SELECT type FROM messages WHERE id = $1 AND account_id = $2 AND is_pushed = $3 \
         AND deleted_at IS NULL",
    )
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

    /// `SELECT count(*)`-style queries on `pool`, answered as one number.
    fn counter(pool: PgPool) -> impl Fn(&'static str) -> BoxFuture<'static, i64> {
        move |sql| {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            })
        }
    }

    /// A database of its own for one test, on the server `SWITCHBOARD_TEST_POSTGRES` names
    /// (these tests run only when it is set); dropped at the end.
    struct TempDb {
        admin: String,
        name: String,
        url: String,
    }

    impl TempDb {
        async fn create() -> Option<Self> {
            let admin = std::env::var("SWITCHBOARD_TEST_POSTGRES").ok()?;
            let name = format!("sb_unit_{}", crate::ids::new_id().to_lowercase());
            let mut conn = PgConnection::connect(&admin).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
            let mut url = url::Url::parse(&admin).unwrap();
            url.set_path(&name);
            Some(Self {
                admin,
                name,
                url: url.to_string(),
            })
        }

        /// Drops the database now (a failing test's is dropped by `Drop`).
        async fn drop_now(self) {
            drop_database(&self.admin, &self.name).await;
        }
    }

    async fn drop_database(admin: &str, name: &str) {
        let mut conn = PgConnection::connect(admin).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    impl Drop for TempDb {
        /// On a thread with a runtime of its own: this runs while a failed test unwinds.
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(drop_database(&admin, &name)))
            })
            .join();
        }
    }

    /// Reads through the read connections as an `Executor`: rows and arguments as on any
    /// connection, a read made again after PostgreSQL ended the idle connections, and a
    /// failing statement answered (not tried again) with its connection closed.
    #[tokio::test]
    async fn reads_run_again_on_a_new_connection_when_the_idle_ones_were_ended() {
        let Some(db) = TempDb::create().await else {
            return;
        };
        let connect = PgConnectOptions::from_str(&db.url)
            .unwrap()
            .application_name("read-connections-test");
        let reads = ReadConnections::<Postgres>::new(connect, 2, Duration::from_secs(10));
        let squares = || {
            sqlx::query_scalar::<_, i64>("SELECT n * n FROM generate_series(1, $1::bigint) n")
                .bind(5_i64)
                .fetch_all(&reads)
        };
        assert_eq!(squares().await.unwrap(), [1, 4, 9, 16, 25]);
        // Both connections open, then idle.
        let (first, second) = (
            reads.acquire().await.unwrap(),
            reads.acquire().await.unwrap(),
        );
        first.release();
        second.release();
        assert_eq!(reads.idle_count(), 2);

        let mut admin = PgConnection::connect(&db.url).await.unwrap();
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'read-connections-test'",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(ended, [true, true]);
        // Both idle connections are dead: the read fails on them, then runs on a new one.
        let one: Option<i64> = sqlx::query_scalar("SELECT $1::bigint")
            .bind(7_i64)
            .fetch_optional(&reads)
            .await
            .unwrap();
        assert_eq!(one, Some(7));
        assert_eq!(reads.idle_count(), 1, "only the new connection is kept");

        let failed = sqlx::query_scalar::<_, i64>("SELECT 1 / 0")
            .fetch_one(&reads)
            .await
            .unwrap_err();
        assert!(!connection_lost(&failed), "{failed}");
        assert_eq!(
            reads.idle_count(),
            0,
            "a failed read's connection is closed"
        );
        assert_eq!(squares().await.unwrap().len(), 5);
        reads.close().await;
        let _ = admin.close().await;
        db.drop_now().await;
    }

    /// Jobs that fail inside a group commit leave nothing behind and take nothing of the
    /// other jobs with them.
    #[tokio::test]
    async fn a_failing_job_in_a_batch_is_rolled_back_alone() {
        let Some(db) = TempDb::create().await else {
            return;
        };
        let store = Arc::new(
            PostgresStore::open(&db.url, PostgresOptions::default())
                .await
                .unwrap(),
        );
        // The jobs queue up while the writer is busy, and go in one batch.
        let (s, writer) = (store.clone(), store.writer.clone());
        let busy = BusyWriter::start(
            move |started, wait| Box::pin(async move { s.write(waiting_job(started, wait)).await }),
            move || writer.max_capacity() - writer.capacity(),
        );
        let count = counter(store.pool.clone());
        failing_jobs_in_one_batch(store, busy, count).await;
        db.drop_now().await;
    }

    /// Statements are planned for their parameters: a generic plan cached while a table
    /// was empty would stay a sequential scan as the table grows (see `open`).
    #[tokio::test]
    async fn statements_get_plans_for_their_parameters() {
        let Some(db) = TempDb::create().await else {
            return;
        };
        let store = PostgresStore::open(&db.url, PostgresOptions::default())
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "force_custom_plan");
        store.close().await;
        db.drop_now().await;
    }

    /// Two instances writing to one conversation in turn: the second catches up with the
    /// first's chat (no second chat starts), and of the two instances' timers exactly one
    /// ends the chat.
    #[tokio::test]
    async fn instances_share_chats_and_end_each_once() {
        let Some(db) = TempDb::create().await else {
            return;
        };
        let a = PostgresStore::open(&db.url, PostgresOptions::default())
            .await
            .unwrap();
        let b = PostgresStore::open(&db.url, PostgresOptions::default())
            .await
            .unwrap();
        let (account, _) = a.ensure_default_account("a", 1).await.unwrap();
        let acc = account.id.clone();
        let visitor = |id: &str, at: i64| MessageRow {
            kind: "visitor".into(),
            created_at: at,
            updated_at: at,
            ..message(&acc, id, "v1")
        };
        // Both instances know the conversation and its chat before the other writes again.
        a.insert_message(visitor("m1", 1_000), None).await.unwrap();
        b.insert_message(visitor("m2", 2_000), None).await.unwrap();
        a.insert_message(visitor("m3", 3_000), None).await.unwrap();
        b.insert_message(visitor("m4", 4_000), None).await.unwrap();

        let count = counter(a.pool.clone());
        assert_eq!(count("SELECT count(*) FROM chats").await, 1, "one chat");
        assert_eq!(
            count("SELECT count(*) FROM messages").await,
            4,
            "every message"
        );
        assert_eq!(
            count("SELECT count(DISTINCT seq) FROM messages").await,
            4,
            "distinct positions"
        );

        // Idle before 3.5 s: A's own last message (3 s) is older, but B's (4 s) is not, and
        // A must have caught up with it. Then both run at 100 s.
        let early = a.run_timers(5_000, 5_000, 3_500).await.unwrap();
        assert_eq!(early.ended, 0, "ended on stale activity");
        let (ra, rb) = tokio::join!(
            a.run_timers(100_000, 100_000, 90_000),
            b.run_timers(100_000, 100_000, 90_000)
        );
        assert_eq!(
            ra.unwrap().ended + rb.unwrap().ended,
            1,
            "ended exactly once"
        );
        assert_eq!(
            count("SELECT count(*) FROM events WHERE kind = 'conversationEnded'").await,
            1
        );
        // A new message after the end starts a new chat, on whichever instance.
        b.insert_message(visitor("m5", 200_000), None)
            .await
            .unwrap();
        a.insert_message(visitor("m6", 201_000), None)
            .await
            .unwrap();
        assert_eq!(
            count("SELECT count(*) FROM chats").await,
            2,
            "a second chat"
        );
        assert_eq!(
            count("SELECT count(*) FROM chats WHERE ended_at IS NULL").await,
            1
        );
        a.close().await;
        b.close().await;
        db.drop_now().await;
    }
}

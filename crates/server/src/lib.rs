//! switchboard: a self-hosted live-chat server that speaks the Brevo Conversations API.
//!
//! Layout (dependencies point down only):
//! - [`http`]: axum routers, extractors, and the one mapping of errors to responses;
//! - [`domain`]: the rules (messages, agents, presence, accounts), plain Rust;
//! - [`store`]: the [`store::Store`] trait and its SQLite backend (group commit).
//!
//! [`serve`] runs the whole server on a listener until a shutdown future completes.

pub mod backup;
pub mod config;
pub mod domain;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod realtime;
pub mod store;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tower::Layer;

use crate::domain::{Clock, Domain, DomainConfig};
use crate::store::postgres::{PostgresOptions, PostgresStore};
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::Store;

/// Settings of both backends; the one the database names is used.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// For an SQLite file.
    pub sqlite: SqliteOptions,
    /// For a PostgreSQL URL.
    pub postgres: PostgresOptions,
}

impl From<SqliteOptions> for StoreOptions {
    fn from(sqlite: SqliteOptions) -> Self {
        Self {
            sqlite,
            ..Self::default()
        }
    }
}

/// The database a `--db` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (a path, or `sqlite://PATH`).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL server (`postgres://` or `postgresql://` URL).
    Postgres(String),
}

impl Database {
    /// Reads a `--db` value. Unknown URL schemes are refused with a clear message instead of
    /// becoming oddly named files.
    pub fn parse(db: &std::path::Path) -> anyhow::Result<Self> {
        let Some(text) = db.to_str() else {
            return Ok(Self::Sqlite(db.to_path_buf()));
        };
        if let Some(rest) = text.strip_prefix("sqlite://") {
            if rest.is_empty() {
                anyhow::bail!("--db sqlite:// needs a file path, e.g. sqlite://./switchboard.db");
            }
            return Ok(Self::Sqlite(std::path::PathBuf::from(rest)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_owned()));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            anyhow::bail!(
                "--db {}: unsupported database URL scheme {scheme:?}; use a file path, \
                 sqlite://PATH or postgres://USER@HOST/DATABASE",
                store::postgres::redact(text)
            );
        }
        Ok(Self::Sqlite(db.to_path_buf()))
    }
}

/// One serving process per SQLite file: held by `switchboard serve` for as long as it runs.
///
/// A second server on the same file would keep its own copy of the writer's state (the next
/// message number, the open chats) and clash with the first, failing writes or worse. The
/// CLI's short commands do not take it: they may run beside the server. PostgreSQL needs no
/// such lock (its instances coordinate through the database).
///
/// It is an advisory lock (`flock`) on a file beside the database, `<db>-lock`, which holds
/// the owner's process id; the kernel releases it when the process ends, however it ends,
/// so a file left behind by a killed server is no obstacle.
#[derive(Debug)]
pub struct ServeLock {
    _file: std::fs::File,
}

impl ServeLock {
    /// Takes the lock of the database `db` names; `None` for PostgreSQL. Fails, naming the
    /// process that holds it, when another server has the file.
    pub fn acquire(db: &std::path::Path) -> anyhow::Result<Option<Self>> {
        use std::io::{Read, Seek, Write};
        let Database::Sqlite(path) = Database::parse(db)? else {
            return Ok(None);
        };
        if path.is_dir() {
            anyhow::bail!(
                "--db {} is a directory: give the database's file, e.g. {}",
                path.display(),
                path.join("switchboard.db").display()
            );
        }
        // The file itself when it exists, so that a symbolic link to it shares its lock.
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let mut lock_path = path.clone().into_os_string();
        lock_path.push("-lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "opening database {}: creating its lock file {}: {e}",
                    path.display(),
                    lock_path.display()
                )
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                anyhow::bail!(
                    "{} is served by another switchboard process{holder}: an SQLite database \
                     takes one server at a time (the CLI may run beside it); for several \
                     instances, use PostgreSQL (--db postgres://...)",
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("locking {}: {e}", lock_path.display())
            }
        }
        // Who holds it, for the message above; the lock, not this text, is what counts.
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| anyhow::anyhow!("writing the lock file {}: {e}", lock_path.display()))?;
        Ok(Some(Self { _file: file }))
    }
}

/// Opens the database `db` names (a path, `sqlite://PATH` or `postgres://...`), runs its
/// migrations and builds the domain service over it.
pub async fn open(
    db: &std::path::Path,
    options: impl Into<StoreOptions>,
    config: DomainConfig,
    clock: Clock,
) -> anyhow::Result<Arc<Domain>> {
    let options = options.into();
    let store: Arc<dyn Store> = match Database::parse(db)? {
        Database::Sqlite(path) => Arc::new(
            SqliteStore::open(&path, options.sqlite)
                .await
                .map_err(|e| anyhow::anyhow!("opening database {}: {e}", path.display()))?,
        ),
        Database::Postgres(url) => Arc::new(
            PostgresStore::open(&url, options.postgres)
                .await
                .map_err(|e| postgres_open_error(&url, e))?,
        ),
    };
    Ok(Arc::new(Domain::new(store, config, clock)))
}

/// What to tell the operator when PostgreSQL cannot be opened.
fn postgres_open_error(url: &str, e: store::StoreError) -> anyhow::Error {
    let shown = store::postgres::redact(url);
    match &e {
        store::StoreError::Database(
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_),
        ) => anyhow::anyhow!("cannot connect to PostgreSQL at {shown}: {e}"),
        store::StoreError::Database(sqlx::Error::Configuration(_)) => {
            anyhow::anyhow!("--db {shown} is not a valid PostgreSQL URL: {e}")
        }
        store::StoreError::Migrate(_) => {
            anyhow::anyhow!("migrating the PostgreSQL database at {shown}: {e}")
        }
        _ => anyhow::anyhow!("cannot connect to PostgreSQL at {shown}: {e}"),
    }
}

/// Serves the API on `listener` until `shutdown` completes, then lets in-flight requests
/// finish and flushes the store.
pub async fn serve(
    domain: Arc<Domain>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(domain, listener, ServeOptions::default(), shutdown).await
}

/// Settings of [`serve_with`] beyond the domain's.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Live stream settings.
    pub streams: http::streams::StreamConfig,
    /// Changes a live subscriber may have waiting before it counts as too slow.
    pub stream_buffer: usize,
    /// Longest sleep of the chat timer task (`None`: no timer task; tests call
    /// [`Domain::run_timers`] themselves).
    pub lifecycle_tick: Option<Duration>,
    /// Webhook delivery (`None`: no dispatcher).
    pub webhooks: Option<webhooks::DispatcherConfig>,
    /// Take client addresses from `X-Forwarded-For` (set only behind a reverse proxy that
    /// sets it).
    pub trust_proxy: bool,
    /// How long a stop waits for the connections still open (requests in flight, and
    /// clients that started a request without finishing it) before closing them.
    pub shutdown_grace: Duration,
    /// How long a client has to send a request's headers, from the moment its connection
    /// opens (first request) or the request's first byte arrives (later ones).
    pub header_timeout: Duration,
    /// How long a kept-alive connection may stay idle, from the end of an answer to the
    /// first byte of the next request.
    pub idle_timeout: Duration,
    /// Browser origins allowed to call the server (CORS).
    pub cors: http::cors::CorsOrigins,
    /// Serve HTTPS with this certificate (else plain HTTP).
    pub tls: Option<http::tls::Tls>,
    /// Serve `GET /metrics` on this listener of its own (else no metrics).
    pub metrics: Option<MetricsListener>,
}

/// A bound listener for [`ServeOptions::metrics`].
#[derive(Debug, Clone)]
pub struct MetricsListener(Arc<std::net::TcpListener>);

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port).
    pub fn bind(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("listening for metrics on {addr}: {e}"))?;
        listener.set_nonblocking(true)?;
        Ok(Self(Arc::new(listener)))
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            streams: http::streams::StreamConfig::default(),
            stream_buffer: realtime::DEFAULT_BUFFER,
            lifecycle_tick: Some(Duration::from_secs(1)),
            webhooks: Some(webhooks::DispatcherConfig::default()),
            trust_proxy: false,
            shutdown_grace: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            cors: http::cors::CorsOrigins::Any,
            tls: None,
            metrics: None,
        }
    }
}

/// [`serve`] with explicit settings.
pub async fn serve_with(
    domain: Arc<Domain>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let hub = realtime::Hub::new(options.stream_buffer);
    let feed = domain
        .store()
        .take_feed()
        .ok_or_else(|| anyhow::anyhow!("the store's feed is already taken"))?;
    let fanout = hub.spawn(feed);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx_for_hooks = stop_rx.clone();
    let stop_rx_for_deadline = stop_rx.clone();
    let app = http::router(http::AppState {
        domain: domain.clone(),
        hub: hub.clone(),
        shutdown: stop_rx,
        streams: options.streams.clone(),
        trust_proxy: options.trust_proxy,
    });
    let app = http::cors::Cors::new(
        http::DrainUnread(http::RejectNul(
            tower::util::MapRequestLayer::new(http::collapse_slashes).layer(app),
        )),
        options.cors.clone(),
    );
    let metrics = match &options.metrics {
        Some(MetricsListener(listener)) => {
            let listener = TcpListener::from_std(listener.try_clone()?)?;
            let app = metrics::router(domain.clone(), hub.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            }))
        }
        None => None,
    };
    let purge = tokio::spawn(purge_idempotency_keys(domain.clone()));
    let lifecycle = options
        .lifecycle_tick
        .map(|every| tokio::spawn(chat_timers(domain.clone(), every)));
    let dispatcher = options
        .webhooks
        .clone()
        .map(|config| tokio::spawn(webhooks::run(domain.clone(), config, stop_rx_for_hooks)));
    let mut stopping = stop_rx_for_deadline;
    let deadlines = http::listen::Deadlines {
        header: options.header_timeout,
        idle: options.idle_timeout,
    };
    let tls_watch = options.tls.clone().map(|tls| tokio::spawn(tls.watch()));
    let acceptor = options.tls.as_ref().map(http::tls::Tls::acceptor);
    let serving = http::listen::serve(listener, app, deadlines, acceptor, async move {
        shutdown.await;
        // Live streams never end by themselves: tell them to close so the server can.
        let _ = stop_tx.send(true);
    });
    // A graceful stop waits for every connection, and a client that sent half a request
    // (its headers, say) would hold it up until its header deadline: after the grace
    // period, stop serving them. Their tasks end with the process; a request among them
    // that reaches the store gets a 503 once it is closed.
    let grace = options.shutdown_grace;
    let deadline = async move {
        // The guard `wait_for` returns must not live across the sleep (it is not Send).
        let stopped = stopping.wait_for(|stop| *stop).await.is_ok();
        if stopped {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = serving => {}
        () = deadline => {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "stopping: connections still open after the grace period are left behind"
            );
        }
    }
    purge.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(t) = tls_watch {
        t.abort();
    }
    if let Some(l) = lifecycle {
        l.abort();
    }
    if let Some(d) = dispatcher {
        // In-flight deliveries are abandoned: they were not recorded as delivered, so they
        // are sent again (same event id) after the restart.
        d.abort();
    }
    domain.store().close().await;
    fanout.abort();
    Ok(())
}

/// Runs the chat timers when they are due: at the next deadline the store reports, sooner
/// when new messages arrive (a fragment is due `fragment_delay` after them), and at least
/// every `tick`. Runs are at least 5 ms apart, so a busy server batches them.
async fn chat_timers(domain: Arc<Domain>, tick: Duration) {
    const MIN_GAP_MS: i64 = 5;
    let activity = domain.store().signals().activity;
    let delay = i64::try_from(domain.fragment_delay().as_millis()).unwrap_or(i64::MAX);
    let tick_ms = i64::try_from(tick.as_millis()).unwrap_or(1000).max(1);
    let mut wake_at = domain.now_ms();
    let mut last_run = i64::MIN / 2;
    loop {
        let now = domain.now_ms();
        if now >= wake_at {
            last_run = now;
            wake_at = match domain.run_timers().await {
                Ok(o) => {
                    if o.ended > 0 || o.webhook_events > 0 {
                        tracing::debug!(
                            ended = o.ended,
                            webhook_events = o.webhook_events,
                            "chat timers"
                        );
                    }
                    o.next_deadline.unwrap_or(i64::MAX)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "running chat timers");
                    now + 1000
                }
            };
        }
        wake_at = wake_at.max(last_run + MIN_GAP_MS);
        let sleep_ms = (wake_at - domain.now_ms()).clamp(1, tick_ms);
        tokio::select! {
            _ = activity.notified() => {
                wake_at = wake_at.min(domain.now_ms().saturating_add(delay));
            }
            _ = tokio::time::sleep(Duration::from_millis(u64::try_from(sleep_ms).unwrap_or(1))) => {}
        }
    }
}

/// Forgets expired idempotency keys once an hour.
async fn purge_idempotency_keys(domain: Arc<Domain>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match domain.purge_expired_idempotency_keys().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "purging idempotency keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ServeLock;

    #[test]
    fn the_serve_lock_is_held_until_dropped_and_only_for_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let held = ServeLock::acquire(&db)
            .unwrap()
            .expect("an SQLite file is locked");
        let pid = std::process::id().to_string();
        let text = std::fs::read_to_string(dir.path().join("s.db-lock")).unwrap();
        assert_eq!(text.trim(), pid);
        let refused = ServeLock::acquire(&db).unwrap_err().to_string();
        assert!(refused.contains(&format!("(pid {pid})")), "{refused}");
        drop(held);
        ServeLock::acquire(&db)
            .unwrap()
            .expect("free again once dropped");
        assert!(
            ServeLock::acquire(std::path::Path::new("postgres://u@127.0.0.1/db"))
                .unwrap()
                .is_none()
        );
        let refused = ServeLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("is a directory"), "{refused}");
    }
}

//! switchboard: a self-hosted live-chat server that speaks the Brevo Conversations API.
//!
//! Layout (dependencies point down only):
//! - [`http`]: axum routers, extractors, and the one mapping of errors to responses;
//! - [`domain`]: the rules (messages, agents, presence, accounts), plain Rust;
//! - [`store`]: the [`store::Store`] trait and its SQLite backend (group commit).
//!
//! [`serve`] runs the whole server on a listener until a shutdown future completes.

pub mod config;
pub mod domain;
pub mod http;
pub mod ids;
pub mod realtime;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tower::Layer;

use crate::domain::{Clock, Domain, DomainConfig};
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::Store;

/// Opens the database at `path` and builds the domain service over it.
pub async fn open(
    path: &std::path::Path,
    sqlite: SqliteOptions,
    config: DomainConfig,
    clock: Clock,
) -> anyhow::Result<Arc<Domain>> {
    let store = SqliteStore::open(path, sqlite)
        .await
        .map_err(|e| anyhow::anyhow!("opening database {}: {e}", path.display()))?;
    let store: Arc<dyn Store> = Arc::new(store);
    Ok(Arc::new(Domain::new(store, config, clock)))
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
    /// How often idle chats are looked for (`None`: never; tests call
    /// [`Domain::end_idle_chats`] themselves).
    pub lifecycle_tick: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            streams: http::streams::StreamConfig::default(),
            stream_buffer: realtime::DEFAULT_BUFFER,
            lifecycle_tick: Some(Duration::from_secs(1)),
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
    let app = http::router(http::AppState {
        domain: domain.clone(),
        hub: hub.clone(),
        shutdown: stop_rx,
        streams: options.streams.clone(),
    });
    let app = tower::util::MapRequestLayer::new(http::collapse_slashes).layer(app);
    let purge = tokio::spawn(purge_idempotency_keys(domain.clone()));
    let lifecycle = options
        .lifecycle_tick
        .map(|every| tokio::spawn(end_idle_chats(domain.clone(), every)));
    let result = axum::serve(
        listener,
        axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
            std::net::SocketAddr,
        >(app),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        // Live streams never end by themselves: tell them to close so the server can.
        let _ = stop_tx.send(true);
    })
    .await;
    purge.abort();
    if let Some(l) = lifecycle {
        l.abort();
    }
    domain.store().close().await;
    fanout.abort();
    result.map_err(Into::into)
}

/// Ends idle chats every `every`.
async fn end_idle_chats(domain: Arc<Domain>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match domain.end_idle_chats().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(ended = n, "chats ended after inactivity"),
            Err(e) => tracing::warn!(error = %e, "ending idle chats"),
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

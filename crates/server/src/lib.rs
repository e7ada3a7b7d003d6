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
    let app = http::router(http::AppState {
        domain: domain.clone(),
    });
    let app = tower::util::MapRequestLayer::new(http::collapse_slashes).layer(app);
    let purge = tokio::spawn(purge_idempotency_keys(domain.clone()));
    let result = axum::serve(listener, axum::ServiceExt::into_make_service(app))
        .with_graceful_shutdown(shutdown)
        .await;
    purge.abort();
    domain.store().close().await;
    result.map_err(Into::into)
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

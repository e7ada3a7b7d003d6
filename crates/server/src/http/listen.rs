//! The accept loop: what `axum::serve` with graceful shutdown does, plus a deadline for a
//! request's headers.
//!
//! `axum::serve` gives hyper no timer, and without one hyper's header read timeout is
//! inert: a client that opens a connection and sends half a request head (or nothing) keeps
//! it, and a task, for good; enough of them exhaust the process's file descriptors
//! (slowloris). hyper starts that deadline when a connection opens (its first request) or
//! when the first byte of a later request arrives, so idle keep-alive connections are not
//! affected.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

/// Serves `app` on `listener` over HTTP/1.1 (with upgrades, for WebSockets) until
/// `shutdown` completes; then stops accepting, lets each connection finish the request it
/// is in, and returns once every connection has closed. Requests carry the peer's address
/// as [`ConnectInfo<SocketAddr>`](ConnectInfo), and accepted sockets are set to
/// `TCP_NODELAY`.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    // Connections watch `stopping`: it closes when the shutdown future completes.
    let (stopping, stop_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(stop_rx);
    });
    // Every connection task holds a receiver; the loop waits for them all to drop.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = stopping.closed() => break,
        };
        // Writes go out at once. With Nagle's algorithm the second of two frames pushed to
        // an idle visitor's socket waits for the ACK of the first, which clients may delay
        // by tens of milliseconds.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = app
            .clone()
            .map_request(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(remote));
                req
            });
        let (stopping, open) = (stopping.clone(), open_rx.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service))
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let mut stop = std::pin::pin!(stopping.closed());
            let mut asked = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, peer = %remote, "connection ended");
                        }
                        break;
                    }
                    () = &mut stop, if !asked => {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    drop(listener);
    open_tx.closed().await;
}

/// What to do when `accept` fails: nothing for a connection the peer gave up on; otherwise
/// (most likely out of file descriptors) say so and wait a second for some to be freed.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; trying again in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

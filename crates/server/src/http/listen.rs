//! The accept loop: what `axum::serve` with graceful shutdown does, plus two deadlines per
//! connection, one for a request's headers and one for a kept-alive connection's idle time.
//!
//! `axum::serve` gives hyper no timer, so a client that opens a connection and sends half a
//! request head (or nothing) keeps it, and a task, for good; enough of them exhaust the
//! process's file descriptors (slowloris). hyper's own header read timeout does not fit
//! either: it starts whenever hyper waits for a request head, so it also closes every idle
//! keep-alive connection after that time, which a 10 s head deadline makes far too short
//! for pooled SDK clients (a request sent as the server closes fails, and SDKs do not retry
//! a POST on that). So the deadlines are kept here, by the connection's I/O (`Timed`):
//! the head deadline runs from the connection's start or from the first byte of a later
//! request, the idle one from the last byte of an answer. The same wrapper gives hyper's own
//! answers to requests it cannot parse (which have no body) Brevo's error body.
//!
//! With TLS, a connection's handshake comes first, with the head deadline of its own; the
//! wrapper then sits on the decrypted stream, so that all of the above works the same.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::header::{CONNECTION, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::{Service, ServiceExt};

/// How long a connection may take over a request head, and stay idle between requests.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From a connection's start, or from the first byte of a later request, to the end of
    /// the request's head.
    pub header: Duration,
    /// From the end of an answer to the first byte of the next request.
    pub idle: Duration,
}

/// Serves `app` on `listener` over HTTP/1.1 (with upgrades, for WebSockets) until
/// `shutdown` completes; then stops accepting, lets each connection finish the request it
/// is in, and returns once every connection has closed. Requests carry the peer's address
/// as [`ConnectInfo<SocketAddr>`](ConnectInfo), accepted sockets are set to `TCP_NODELAY`,
/// and answers that leave the connection open say for how long (`Keep-Alive: timeout=N`).
/// With `tls`, connections are TLS (see the module).
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    deadlines: Deadlines,
    tls: Option<tokio_rustls::TlsAcceptor>,
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
    let keep_alive = HeaderValue::from_str(&format!("timeout={}", deadlines.idle.as_secs()))
        .expect("digits are a valid header value");
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
        let counted = crate::metrics::counters().connection();
        let phase = Arc::new(AtomicU8::new(HEAD));
        let (at_request, at_answer) = (phase.clone(), phase.clone());
        // Whether the request being served ends its connection (hyper then closes it after
        // the answer), so that its answer does not promise a keep-alive time.
        let closing = Arc::new(AtomicBool::new(false));
        let closing_seen = closing.clone();
        let keep_alive = keep_alive.clone();
        let service = app
            .clone()
            .map_request(move |req: hyper::Request<Incoming>| {
                at_request.store(BUSY, Ordering::Relaxed);
                closing.store(ends_connection(&req), Ordering::Relaxed);
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(remote));
                req
            })
            .map_response(move |mut res: Response| {
                if is_open_ended(&res) {
                    at_answer.store(FREE, Ordering::Relaxed);
                } else if !closing_seen.load(Ordering::Relaxed)
                    && !res.headers().contains_key(CONNECTION)
                {
                    res.headers_mut().insert(KEEP_ALIVE, keep_alive.clone());
                }
                res
            });
        let (stopping, open, tls) = (stopping.clone(), open_rx.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => {
                    let io = Timed::new(tcp, phase, deadlines);
                    serve_connection(io, service, &stopping, remote).await;
                }
                // The handshake has the head deadline too, so that a client that opens a
                // connection and never finishes it holds nothing for long.
                Some(tls) => tokio::select! {
                    done = tokio::time::timeout(deadlines.header, tls.accept(tcp)) => match done {
                        Ok(Ok(stream)) => {
                            let io = Timed::new(stream, phase, deadlines);
                            serve_connection(io, service, &stopping, remote).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, peer = %remote, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(peer = %remote, "TLS handshake not done in time"),
                    },
                    () = stopping.closed() => {}
                },
            }
            drop(open);
            drop(counted);
        });
    }
    drop(open_rx);
    drop(listener);
    open_tx.closed().await;
}

/// Serves one connection's requests until it closes; once `stopping` closes, the request
/// in progress is finished and the connection closed.
async fn serve_connection<IO, S>(
    io: Timed<IO>,
    service: S,
    stopping: &watch::Sender<()>,
    remote: std::net::SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
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

/// `Keep-Alive`, the header that tells a client how long an idle connection is kept.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

// What a connection is doing, for its deadlines (see [`Timed`]).
/// Waiting for a request head or reading one: the head deadline runs.
const HEAD: u8 = 0;
/// A request is being served: no deadline (its body has one of its own, in the handlers).
const BUSY: u8 = 1;
/// An answer went out and the next request has not begun: the idle deadline runs.
const IDLE: u8 = 2;
/// Upgraded (a WebSocket) or streaming (Server-Sent Events): no deadline ever again.
const FREE: u8 = 3;

/// Whether an answer keeps its connection for as long as it lasts: a WebSocket upgrade or
/// an event stream, which have keep-alives of their own.
fn is_open_ended(res: &Response) -> bool {
    res.status() == StatusCode::SWITCHING_PROTOCOLS
        || res
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Whether hyper closes the connection after answering `req`: it says `Connection: close`,
/// or it is HTTP/1.0 without `Connection: keep-alive`.
fn ends_connection<B>(req: &hyper::Request<B>) -> bool {
    let has = |token: &str| {
        req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if req.version() == axum::http::Version::HTTP_10 {
        !has("keep-alive")
    } else {
        has("close")
    }
}

/// hyper's answer `head` to a request it could not parse (an empty 400, 414 or 431) with
/// Brevo's error body in JSON; `None` if `head` is not one.
fn with_error_body(head: &[u8]) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(head).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?;
    let (code, message) = match status {
        "400" => (
            "bad_request",
            "the request is not valid HTTP/1.1: its request line or one of its headers is \
             malformed",
        ),
        "414" => ("out_of_range", "the request's URI is too long"),
        "431" => (
            "out_of_range",
            "the request's headers are too large, or more than 100",
        ),
        _ => return None,
    };
    // The whole answer, and nothing after its head.
    let lines = head.strip_suffix("\r\n\r\n")?;
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut out = String::with_capacity(head.len() + body.len() + 64);
    for line in lines.split("\r\n") {
        if line.is_empty() {
            return None;
        }
        if !line
            .get(..15)
            .is_some_and(|l| l.eq_ignore_ascii_case("content-length:"))
        {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    out.push_str(&body);
    Some(out.into_bytes())
}

/// A connection's socket, which ends the connection when a deadline passes: the head
/// deadline (an error, as hyper's own timeout did) or the idle one (an end of stream, which
/// hyper takes for the client closing an idle connection, and closes quietly).
///
/// The phase is shared with the connection's service, which marks a request's start
/// ([`BUSY`]) and open-ended answers ([`FREE`]); the socket marks the rest, from what it
/// sees: a write is an answer going out ([`IDLE`]), and bytes read while idle are a new
/// request ([`HEAD`]). The deadlines are only checked while hyper waits to read, which it
/// does whenever the connection is idle or inside a request head.
struct Timed<IO> {
    /// The connection's stream: TCP, or TLS over TCP.
    io: IO,
    phase: Arc<AtomicU8>,
    deadlines: Deadlines,
    /// When the current phase's deadline passes (in [`HEAD`] and [`IDLE`]).
    deadline: Instant,
    /// Armed at or before `deadline`; it is moved only when the deadline comes nearer, so
    /// that a busy connection, whose idle deadline moves at every answer, does not touch
    /// the timer wheel per request: an early wake-up just arms it again.
    timer: Pin<Box<Sleep>>,
    /// hyper's own answer to a request it could not parse, rewritten with an error body
    /// (see [`Timed::poll_rewrite`]), and how much of it is written.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Timed<IO> {
    fn new(io: IO, phase: Arc<AtomicU8>, deadlines: Deadlines) -> Self {
        let deadline = Instant::now() + deadlines.header;
        Self {
            io,
            phase,
            deadlines,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            rewrite: None,
        }
    }

    /// Writes hyper's own answer to a request it could not parse (a malformed request line
    /// or header, too many or too large headers, a URI too long) with Brevo's error body,
    /// in place of the empty one hyper gives it; `None` for every other write.
    ///
    /// A write while the phase is still [`HEAD`] is such an answer: no service ran, since a
    /// request marks its start. hyper closes the connection after it. `head` is the first
    /// buffer hyper writes, `total` the length of all it writes, reported as written once
    /// the rewritten answer is.
    fn poll_rewrite(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
        total: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.rewrite.is_none() {
            if self.phase.load(Ordering::Relaxed) != HEAD {
                return None;
            }
            self.rewrite = Some((with_error_body(head)?, 0));
        }
        let (answer, done) = self.rewrite.as_mut()?;
        while *done < answer.len() {
            match Pin::new(&mut self.io).poll_write(cx, &answer[*done..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => *done += n,
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        Some(Poll::Ready(Ok(total)))
    }

    /// After a write: the answer is going out, and idle time counts from its last byte.
    fn wrote(&mut self) {
        if self.phase.load(Ordering::Relaxed) != FREE {
            self.phase.store(IDLE, Ordering::Relaxed);
            self.deadline = Instant::now() + self.deadlines.idle;
        }
    }

    /// While a read waits: ends the connection once the phase's deadline has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let phase = self.phase.load(Ordering::Relaxed);
        if phase != HEAD && phase != IDLE {
            return Poll::Pending;
        }
        if self.timer.deadline() > self.deadline {
            self.timer.as_mut().reset(self.deadline);
        }
        // Twice at most: a timer that went off before the deadline is armed at it.
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if self.timer.deadline() >= self.deadline {
                return Poll::Ready(if phase == HEAD {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the request head did not arrive in time",
                    ))
                } else {
                    Ok(())
                });
            }
            self.timer.as_mut().reset(self.deadline);
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Timed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.phase.load(Ordering::Relaxed) == IDLE {
                    this.phase.store(HEAD, Ordering::Relaxed);
                    this.deadline = Instant::now() + this.deadlines.header;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Timed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(rewritten) = this.poll_rewrite(cx, buf, buf.len()) {
            return rewritten;
        }
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.wrote();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let head = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        let total = bufs.iter().map(|b| b.len()).sum();
        if let Some(rewritten) = this.poll_rewrite(cx, head, total) {
            return rewritten;
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        this.wrote();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_end_their_connection_are_told_apart() {
        use axum::http::Version;
        let req = |version, connection: &[&str]| {
            let mut b = hyper::Request::builder().version(version);
            for c in connection {
                b = b.header(CONNECTION, *c);
            }
            b.body(()).unwrap()
        };
        assert!(!ends_connection(&req(Version::HTTP_11, &[])));
        assert!(!ends_connection(&req(Version::HTTP_11, &["keep-alive"])));
        assert!(ends_connection(&req(Version::HTTP_11, &["close"])));
        assert!(ends_connection(&req(Version::HTTP_11, &["TE, Close"])));
        assert!(ends_connection(&req(Version::HTTP_11, &["te", "close"])));
        assert!(ends_connection(&req(Version::HTTP_10, &[])));
        assert!(!ends_connection(&req(Version::HTTP_10, &["Keep-Alive"])));
    }

    #[test]
    fn hypers_bare_error_answers_get_an_error_body() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                     content-length: 0\r\ndate: Wed, 02 Dec 2026 11:52:48 GMT\r\n\r\n";
        let out = String::from_utf8(with_error_body(bare).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                 date: Wed, 02 Dec 2026 11:52:48 GMT\r\ncontent-type: application/json\r\n\
                 content-length: {}",
                body.len()
            )
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "out_of_range");
    }

    #[test]
    fn other_writes_are_left_alone() {
        // Another status, an answer with a body, a part of a head.
        for bytes in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n",
            b"",
        ] {
            assert_eq!(
                with_error_body(bytes),
                None,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

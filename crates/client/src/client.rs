//! The client, its builder, and the request loop (headers, retries, error mapping).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use reqwest::Method;
use tokio::time::Instant;
use tracing::{field, Instrument, Span};

use crate::retry::{parse_retry_after, RetryPolicy};
use crate::{Conversations, Error, Extensions, Result};

/// Brevo's API root; the default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.brevo.com/v3";

/// The default `User-Agent`: `switchboard-client/<version>`.
pub const DEFAULT_USER_AGENT: &str = concat!("switchboard-client/", env!("CARGO_PKG_VERSION"));

/// The default per-attempt timeout (connect, send, and read the whole answer): 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The default connect timeout: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle connection is kept for the next call.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The header that makes a POST safe to repeat against switchboard.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// A client for the Brevo Conversations API, against Brevo itself or a switchboard server.
///
/// Cheap to clone (the connection pool and settings are shared); build one and reuse it.
///
/// ```no_run
/// # async fn run() -> switchboard_client::Result<()> {
/// use switchboard_client::{Client, SendMessage};
///
/// let client = Client::builder()
///     .api_key("xkeysib-...")
///     .base_url("http://127.0.0.1:8080/v3") // omit for Brevo
///     .build()?;
/// let msg = client
///     .conversations()
///     .send_message(SendMessage::new("visitor-1", "Hello!").agent_id("d9nKoegKSjmCtyK78"))
///     .await?;
/// println!("sent {}", msg.id);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base_url: String,
    api_key: HeaderValue,
    partner_key: Option<HeaderValue>,
    user_agent: HeaderValue,
    retry: RetryPolicy,
    idempotent_posts: bool,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base_url)
            .field("api_key", &"<redacted>")
            .field(
                "partner_key",
                &self.inner.partner_key.as_ref().map(|_| "<redacted>"),
            )
            .field("user_agent", &self.inner.user_agent)
            .field("retry", &self.inner.retry)
            .field("idempotent_posts", &self.inner.idempotent_posts)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

impl Client {
    /// Starts configuring a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// A client for Brevo (`https://api.brevo.com/v3`) with the given key and default settings.
    ///
    /// ```
    /// let client = switchboard_client::Client::new("xkeysib-...")?;
    /// assert_eq!(client.base_url(), "https://api.brevo.com/v3");
    /// assert!(!client.idempotent_posts());
    /// # Ok::<(), switchboard_client::Error>(())
    /// ```
    pub fn new(api_key: impl Into<String>) -> Result<Self> {
        Self::builder().api_key(api_key).build()
    }

    /// The operations of Brevo's Conversations API.
    pub fn conversations(&self) -> Conversations<'_> {
        Conversations::new(self)
    }

    /// Switchboard-only operations, which Brevo does not have. Kept apart from
    /// [`conversations`](Self::conversations) so that code written against it stays portable.
    pub fn extensions(&self) -> Extensions<'_> {
        Extensions::new(self)
    }

    /// The base URL, without a trailing slash, e.g. `https://api.brevo.com/v3`.
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// Whether POSTs are retried after the server may have seen them (see
    /// [`ClientBuilder::idempotent_posts`]).
    pub fn idempotent_posts(&self) -> bool {
        self.inner.idempotent_posts
    }

    /// The retry policy in use.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }
}

/// Configures a [`Client`]; obtained from [`Client::builder`].
///
/// ```
/// use std::time::Duration;
/// use switchboard_client::{Client, RetryPolicy};
///
/// let client = Client::builder()
///     .api_key("xkeysib-...")
///     .partner_key("xkeysib-partner-...")
///     .base_url("https://chat.example.com/v3")
///     .timeout(Duration::from_secs(10))
///     .retry(RetryPolicy::default().max_attempts(4))
///     .user_agent("my-app/1.0")
///     .build()?;
/// assert!(client.idempotent_posts()); // not api.brevo.com
/// # Ok::<(), switchboard_client::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct ClientBuilder {
    api_key: Option<String>,
    partner_key: Option<String>,
    base_url: Option<String>,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    user_agent: Option<String>,
    idempotent_posts: Option<bool>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field(
                "partner_key",
                &self.partner_key.as_ref().map(|_| "<redacted>"),
            )
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry", &self.retry)
            .field("user_agent", &self.user_agent)
            .field("idempotent_posts", &self.idempotent_posts)
            .finish()
    }
}

impl ClientBuilder {
    /// The API key, sent as the `api-key` header (required).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// A partner key, sent as the `partner-key` header (optional).
    pub fn partner_key(mut self, key: impl Into<String>) -> Self {
        self.partner_key = Some(key.into());
        self
    }

    /// The API root, including the `/v3` prefix, e.g. `http://127.0.0.1:8080/v3`.
    /// Default [`DEFAULT_BASE_URL`]. A trailing slash is ignored.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// Time limit for one attempt: connecting, sending, and reading the whole answer.
    /// Default [`DEFAULT_TIMEOUT`]. A timed-out attempt ends the call with
    /// [`Error::Timeout`]; it is not retried, because the server may have acted on it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Time limit for establishing a connection. Default [`DEFAULT_CONNECT_TIMEOUT`].
    /// A connect timeout is a connection failure, so it is retried.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// The retry policy. Default [`RetryPolicy::default`]; [`RetryPolicy::disabled`] turns
    /// retries off.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// The `User-Agent` header. Default [`DEFAULT_USER_AGENT`].
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// Whether the server deduplicates POSTs by their `Idempotency-Key`, so that a POST may
    /// be retried after the server saw it (on 429, 502, 503, 504 or a broken connection).
    ///
    /// Every POST carries an `Idempotency-Key` header, generated once per call and sent
    /// unchanged on each of its attempts. Switchboard answers a repeated key (with the same
    /// body, within 24 h) with the first response, so retrying can never create a second
    /// message. Brevo ignores the header; there a retried POST could send a message twice,
    /// so with `false` a POST is retried only when the connection could not be
    /// established. (The agent ping is idempotent by nature and is always retried.)
    ///
    /// Default: `false` when the base URL's host is `api.brevo.com` (or another
    /// `brevo.com` / `sendinblue.com` host), `true` otherwise.
    pub fn idempotent_posts(mut self, enabled: bool) -> Self {
        self.idempotent_posts = Some(enabled);
        self
    }

    /// Checks the settings and builds the client.
    ///
    /// Fails with [`Error::Config`] when the API key is missing or is not a valid header
    /// value, when the base URL is not an absolute `http`/`https` URL without query or
    /// fragment, or when the TLS stack cannot be initialised.
    pub fn build(self) -> Result<Client> {
        let api_key = self
            .api_key
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Error::config("an API key is required (ClientBuilder::api_key)"))?;
        let mut api_key = HeaderValue::from_str(&api_key).map_err(|_| {
            Error::config("the API key contains characters not allowed in a header")
        })?;
        api_key.set_sensitive(true);
        let partner_key = match self.partner_key {
            Some(k) => {
                let mut v = HeaderValue::from_str(&k).map_err(|_| {
                    Error::config("the partner key contains characters not allowed in a header")
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let user_agent =
            HeaderValue::from_str(self.user_agent.as_deref().unwrap_or(DEFAULT_USER_AGENT))
                .map_err(|_| {
                    Error::config("the user agent contains characters not allowed in a header")
                })?;

        let raw_base = self.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let parsed = url::Url::parse(raw_base)
            .map_err(|e| Error::config(format!("invalid base URL {raw_base:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::config(format!(
                "the base URL must be http or https, not {:?}",
                parsed.scheme()
            )));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| Error::config("the base URL has no host"))?
            .to_ascii_lowercase();
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(Error::config(
                "the base URL must not have a query or a fragment",
            ));
        }
        let base_url = parsed.as_str().trim_end_matches('/').to_owned();
        let idempotent_posts = self.idempotent_posts.unwrap_or(!is_brevo_host(&host));

        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT))
            // The API never redirects; following one could turn a POST into a GET.
            .redirect(reqwest::redirect::Policy::none())
            // Below switchboard's idle timeout (60 s by default), so that this side, not
            // the server, ends an idle connection: a request sent just as the server
            // closes one fails, and a POST cannot be retried safely without a key.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))?;

        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base_url,
                api_key,
                partner_key,
                user_agent,
                retry: self.retry.unwrap_or_default(),
                idempotent_posts,
                timeout,
            }),
        })
    }
}

fn is_brevo_host(host: &str) -> bool {
    ["brevo.com", "sendinblue.com"]
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")))
}

/// When a call may be sent again after the server may have seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Idempotent: retry on every retryable failure.
    Safe,
    /// A POST: retry after the server may have seen it only with `idempotent_posts`.
    Post,
}

/// One logical call, possibly sent several times.
pub(crate) struct Call {
    pub(crate) op: &'static str,
    pub(crate) method: Method,
    /// Starts with `/`, ids already encoded.
    pub(crate) path: String,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) replay: Replay,
    /// Caller-chosen `Idempotency-Key` for a POST; one is generated when `None`.
    pub(crate) idempotency_key: Option<String>,
}

/// A successful answer.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|source| Error::Decode {
            status: self.status,
            body: String::from_utf8_lossy(&self.body).into_owned(),
            source,
        })
    }
}

/// How an attempt failed, which decides whether it may be repeated.
enum Failure {
    /// The request never reached the server: always safe to repeat.
    NotSent(Error),
    /// The server may have seen the request.
    MaybeSent(Error),
    /// A retryable status (429, 502, 503, 504), with the wait the server asked for.
    Status(Error, Option<Duration>),
    /// Not retryable.
    Final(Error),
}

pub(crate) fn new_idempotency_key() -> String {
    let v: u128 = rand::random();
    // A random (version 4) UUID.
    let v = (v & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Client {
    pub(crate) fn serialize<T: serde::Serialize>(body: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(body)
            .map_err(|e| Error::invalid_argument(format!("cannot serialise the body: {e}")))
    }

    /// Sends `call`, retrying as the policy and the call's [`Replay`] allow.
    pub(crate) async fn execute(&self, mut call: Call) -> Result<Reply> {
        if call.method == Method::POST && call.idempotency_key.is_none() {
            call.idempotency_key = Some(new_idempotency_key());
        }
        let span = tracing::debug_span!(
            "switchboard_client",
            op = call.op,
            method = %call.method,
            path = %call.path,
            attempts = field::Empty,
            status = field::Empty,
        );
        self.run(call).instrument(span).await
    }

    async fn run(&self, call: Call) -> Result<Reply> {
        let url = format!("{}{}", self.inner.base_url, call.path);
        let policy = &self.inner.retry;
        let started = Instant::now();
        let may_replay = call.replay == Replay::Safe || self.inner.idempotent_posts;
        let call_span = Span::current();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            call_span.record("attempts", attempt);
            let attempt_span = tracing::debug_span!("attempt", attempt, status = field::Empty);
            let failure = match self
                .attempt(&call, &url, &call_span)
                .instrument(attempt_span)
                .await
            {
                Ok(reply) => {
                    tracing::debug!(status = reply.status, attempt, "call succeeded");
                    return Ok(reply);
                }
                Err(f) => f,
            };
            let (error, wait_hint) = match failure {
                Failure::NotSent(e) => (e, None),
                Failure::MaybeSent(e) if may_replay => (e, None),
                Failure::Status(e, hint) if may_replay => (e, hint),
                Failure::MaybeSent(e) | Failure::Status(e, _) | Failure::Final(e) => {
                    tracing::debug!(attempt, error = %e, "call failed");
                    return Err(e);
                }
            };
            if attempt >= policy.max_attempts {
                tracing::debug!(attempt, error = %error, "call failed, no attempts left");
                return Err(error);
            }
            let wait = match wait_hint {
                Some(hint) if hint > policy.max_retry_after => {
                    tracing::debug!(
                        attempt,
                        retry_after_ms = hint.as_millis() as u64,
                        "server asked to wait longer than max_retry_after; giving up"
                    );
                    return Err(error);
                }
                Some(hint) => hint,
                None => policy.backoff(attempt),
            };
            if started.elapsed() + wait > policy.max_elapsed {
                tracing::debug!(attempt, error = %error, "call failed, retry budget spent");
                return Err(error);
            }
            tracing::info!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                error = %error,
                "retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        call: &Call,
        url: &str,
        call_span: &Span,
    ) -> std::result::Result<Reply, Failure> {
        let inner = &self.inner;
        let mut request = inner
            .http
            .request(call.method.clone(), url)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, inner.user_agent.clone())
            .header("api-key", inner.api_key.clone());
        if let Some(partner_key) = &inner.partner_key {
            request = request.header("partner-key", partner_key.clone());
        }
        if let Some(key) = &call.idempotency_key {
            request = request.header(IDEMPOTENCY_KEY_HEADER, key.as_str());
        }
        if let Some(body) = &call.body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = request.send().await.map_err(|e| self.classify(e))?;
        let status = response.status().as_u16();
        Span::current().record("status", status);
        call_span.record("status", status);
        let wait_hint = retry_after(response.headers(), status);
        let body = response
            .bytes()
            .await
            .map_err(|e| self.classify(e))?
            .to_vec();
        tracing::debug!(status, bytes = body.len(), "answer received");
        if (200..300).contains(&status) {
            return Ok(Reply { status, body });
        }
        let error = Error::from_status(status, wait_hint, &body);
        Err(if matches!(status, 429 | 502 | 503 | 504) {
            Failure::Status(error, wait_hint)
        } else {
            Failure::Final(error)
        })
    }

    fn classify(&self, e: reqwest::Error) -> Failure {
        if e.is_connect() {
            Failure::NotSent(Error::Connect {
                source: Box::new(e),
            })
        } else if e.is_timeout() {
            Failure::Final(Error::Timeout {
                timeout: self.inner.timeout,
            })
        } else if e.is_builder() {
            Failure::Final(Error::invalid_argument(e.to_string()))
        } else {
            Failure::MaybeSent(Error::Transport {
                source: Box::new(e),
            })
        }
    }
}

/// The wait the server asked for: `Retry-After`, or on a 429 Brevo's
/// `x-sib-ratelimit-reset` (seconds until the limit resets).
fn retry_after(headers: &HeaderMap, status: u16) -> Option<Duration> {
    let parse = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    };
    parse(RETRY_AFTER.as_str()).or_else(|| {
        if status == 429 {
            parse("x-sib-ratelimit-reset")
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_uuid_v4() {
        let a = new_idempotency_key();
        let b = new_idempotency_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn brevo_hosts_default_to_non_idempotent_posts() {
        assert!(is_brevo_host("api.brevo.com"));
        assert!(is_brevo_host("api.sendinblue.com"));
        assert!(!is_brevo_host("notbrevo.com"));
        assert!(!is_brevo_host("127.0.0.1"));
        let c = Client::builder()
            .api_key("k")
            .base_url("https://API.BREVO.COM/v3/")
            .build()
            .unwrap();
        assert!(!c.idempotent_posts());
        assert_eq!(c.base_url(), "https://api.brevo.com/v3");
        let c = Client::builder()
            .api_key("k")
            .base_url("https://api.brevo.com/v3")
            .idempotent_posts(true)
            .build()
            .unwrap();
        assert!(c.idempotent_posts());
    }

    #[test]
    fn rejects_bad_configuration() {
        for b in [
            Client::builder(),
            Client::builder().api_key(""),
            Client::builder().api_key("a\nb"),
            Client::builder().api_key("k").base_url("not a url"),
            Client::builder().api_key("k").base_url("ftp://x/v3"),
            Client::builder().api_key("k").base_url("http://x/v3?a=b"),
            Client::builder().api_key("k").user_agent("\u{0}"),
        ] {
            assert!(matches!(b.build(), Err(Error::Config { .. })));
        }
    }

    #[test]
    fn debug_redacts_keys() {
        let c = Client::builder()
            .api_key("secret-key")
            .partner_key("secret-partner")
            .build()
            .unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("secret"), "{s}");
        let s = format!("{:?}", Client::builder().api_key("secret-key"));
        assert!(!s.contains("secret"), "{s}");
    }
}

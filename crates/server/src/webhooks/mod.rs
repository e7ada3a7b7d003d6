//! Webhook delivery: the dispatcher that takes due deliveries from the outbox, signs and
//! POSTs them, and records each attempt with its next retry.
//!
//! Order: only the oldest pending delivery of an (endpoint, conversation) is ever due, so a
//! conversation's events reach each endpoint in order, while other conversations and other
//! endpoints go on. A failing or slow endpoint holds at most `per_endpoint` requests and
//! only its own queue.

pub mod payload;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::Mac;
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::Domain;
use crate::store::{AttemptOutcome, DueDelivery};

/// Settings of webhook delivery.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Time allowed for a receiver to answer.
    pub timeout: Duration,
    /// Wait before the first retry; each retry waits twice as long (with jitter) ...
    pub retry_first: Duration,
    /// ... up to this much.
    pub retry_max: Duration,
    /// Retries stop this long after the event was created; the delivery is then failed.
    pub retry_period: Duration,
    /// Failures in a row after which an endpoint counts as failing.
    pub failing_after: i64,
    /// Requests in flight at once, in all.
    pub max_in_flight: usize,
    /// Requests in flight at once to one endpoint.
    pub per_endpoint: usize,
    /// Refuse to connect to private, loopback and link-local addresses (SSRF guard).
    pub block_private: bool,
    /// Most bytes of a receiver's answer read (the rest is not read).
    pub max_response_bytes: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retry_first: Duration::from_secs(5),
            retry_max: Duration::from_secs(3600),
            retry_period: Duration::from_secs(24 * 3600),
            failing_after: 5,
            max_in_flight: 256,
            per_endpoint: 64,
            block_private: false,
            max_response_bytes: 64 * 1024,
        }
    }
}

/// Whether an address is one the SSRF guard refuses: loopback, private, link-local,
/// unspecified, multicast, shared (CGNAT), documentation, or IPv6 unique-local.
pub fn is_blocked_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_blocked_ip(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// A DNS resolver that drops blocked addresses, so a host name cannot lead the dispatcher
/// into the private network (checked at connect time: no window for DNS rebinding).
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_blocked_ip(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves only to private, loopback or link-local addresses, \
                     which this server does not deliver to"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The Standard Webhooks signature of a delivery: `v1,<base64 HMAC-SHA256>` over
/// `{id}.{timestamp}.{body}` with the secret's key (the base64 after `whsec_`).
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", b64.encode(mac.finalize().into_bytes()))
}

/// When to try again after `attempts` failed attempts, or `None` to give up.
fn next_retry(config: &DispatcherConfig, attempts: i64, created_at: i64, now: i64) -> Option<i64> {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(30);
    let base = config
        .retry_first
        .saturating_mul(2u32.saturating_pow(exp))
        .min(config.retry_max);
    let jitter = rand::rng().random_range(0.8..1.2);
    let wait = i64::try_from(base.mul_f64(jitter).as_millis()).unwrap_or(i64::MAX);
    let at = now.saturating_add(wait.max(1));
    let deadline = created_at
        .saturating_add(i64::try_from(config.retry_period.as_millis()).unwrap_or(i64::MAX));
    (at <= deadline).then_some(at)
}

/// Requests made at about the same time, gathered into one store call: under load, many
/// deliveries share one database round trip instead of paying one each.
struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<(I, oneshot::Sender<Result<O, String>>)>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    fn spawn<F, Fut>(f: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Vec<O>, String>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(I, oneshot::Sender<Result<O, String>>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut items = vec![first];
                while items.len() < 256 {
                    match rx.try_recv() {
                        Ok(next) => items.push(next),
                        Err(_) => break,
                    }
                }
                let (inputs, replies): (Vec<I>, Vec<_>) = items.into_iter().unzip();
                match f(inputs).await {
                    Ok(outputs) => {
                        for (reply, out) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(out));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    async fn call(&self, item: I) -> Result<O, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((item, tx))
            .map_err(|_| "the dispatcher is stopping".to_owned())?;
        rx.await
            .map_err(|_| "the dispatcher is stopping".to_owned())?
    }
}

/// The store calls a delivery makes, batched across deliveries.
struct Batchers {
    freeze: Batcher<(String, String), String>,
    record: Batcher<AttemptOutcome, crate::store::EndpointHealth>,
}

impl Batchers {
    fn spawn(domain: &Arc<Domain>) -> Self {
        let (d1, d2) = (domain.clone(), domain.clone());
        Self {
            freeze: Batcher::spawn(move |items: Vec<(String, String)>| {
                let d = d1.clone();
                async move {
                    let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
                    let stored = d
                        .store()
                        .freeze_payloads(items)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(ids
                        .into_iter()
                        .map(|id| stored.get(&id).cloned().unwrap_or_default())
                        .collect())
                }
            }),
            record: Batcher::spawn(move |items: Vec<AttemptOutcome>| {
                let d = d2.clone();
                async move {
                    d.store()
                        .record_attempts(items)
                        .await
                        .map_err(|e| e.to_string())
                }
            }),
        }
    }
}

/// Most deliveries claimed per query: more would mostly be held back by the per-endpoint
/// cap and read again next time.
const CLAIM_BATCH: usize = 64;

/// The first and the longest pause before a delivery's write (its payload, its attempt)
/// is tried again after the store refused it (a full disk, a database taking no writes).
const STORE_RETRY_FIRST: Duration = Duration::from_millis(250);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Delivers webhooks until `shutdown` turns true.
pub async fn run(
    domain: Arc<Domain>,
    config: DispatcherConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("switchboard-webhooks/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(config.per_endpoint);
    if config.block_private {
        builder = builder.dns_resolver(Arc::new(GuardedResolver));
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook dispatcher: cannot build its HTTP client");
            return;
        }
    };
    let signals = domain.store().signals();
    let cache = Arc::new(payload::RenderCache::default());
    let batchers = Arc::new(Batchers::spawn(&domain));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, String)>();
    // (endpoint, conversation) in flight, and the count per endpoint.
    let mut in_flight: Vec<(String, String)> = Vec::new();
    let mut per_endpoint: HashMap<String, usize> = HashMap::new();
    loop {
        let room = config.max_in_flight.saturating_sub(in_flight.len());
        let mut claimed = 0;
        // Due work held back only by the in-flight caps: wait for a finish, not a timer.
        let mut capped = room == 0;
        if room > 0 {
            match domain
                .store()
                .due_deliveries(domain.now_ms(), room.min(CLAIM_BATCH) as u32, &in_flight)
                .await
            {
                Ok(due) => {
                    let mut skipped = Vec::new();
                    for d in due {
                        let count = per_endpoint.entry(d.webhook.id.clone()).or_default();
                        if *count >= config.per_endpoint {
                            capped = true;
                            skipped.push((d.webhook.id, d.event.conversation_id));
                            continue;
                        }
                        *count += 1;
                        claimed += 1;
                        let key = (d.webhook.id.clone(), d.event.conversation_id.clone());
                        in_flight.push(key.clone());
                        let (domain, client, config, done, cache, batchers, stop) = (
                            domain.clone(),
                            client.clone(),
                            config.clone(),
                            done_tx.clone(),
                            cache.clone(),
                            batchers.clone(),
                            shutdown.clone(),
                        );
                        tokio::spawn(async move {
                            deliver(&domain, &client, &config, &cache, &batchers, stop, d).await;
                            let _ = done.send(key);
                        });
                    }
                    if let Err(e) = domain.store().release_deliveries(skipped).await {
                        tracing::warn!(error = %e, "webhook dispatcher: releasing deliveries");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "webhook dispatcher: reading due deliveries"),
            }
        }
        if claimed > 0 {
            continue;
        }
        let wait = if capped {
            Duration::from_secs(1)
        } else {
            match domain.store().next_delivery_at().await {
                Ok(Some(at)) => Duration::from_millis(
                    u64::try_from((at - domain.now_ms()).clamp(1, 1000)).unwrap_or(1000),
                ),
                _ => Duration::from_secs(1),
            }
        };
        tokio::select! {
            _ = signals.outbox.notified() => {}
            Some(key) = done_rx.recv() => {
                release(&mut in_flight, &mut per_endpoint, &key);
                while let Ok(key) = done_rx.try_recv() {
                    release(&mut in_flight, &mut per_endpoint, &key);
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn release(
    in_flight: &mut Vec<(String, String)>,
    per_endpoint: &mut HashMap<String, usize>,
    key: &(String, String),
) {
    if let Some(i) = in_flight.iter().position(|k| k == key) {
        in_flight.swap_remove(i);
    }
    if let Some(c) = per_endpoint.get_mut(&key.0) {
        *c = c.saturating_sub(1);
    }
}

/// Makes one attempt and records it.
async fn deliver(
    domain: &Domain,
    client: &reqwest::Client,
    config: &DispatcherConfig,
    cache: &payload::RenderCache,
    batchers: &Batchers,
    mut stop: watch::Receiver<bool>,
    d: DueDelivery,
) {
    let DueDelivery {
        event,
        webhook,
        attempts,
    } = d;
    let at = domain.now_ms();
    let body = match &event.payload {
        Some(p) => p.clone(),
        // Rendered once and stored before the first attempt: a retry after a crash, a
        // restart or a replay sends the same bytes, even if the visitor changed meanwhile.
        None => match payload::render(domain, cache, &event).await {
            Ok(p) => {
                let store = || batchers.freeze.call((event.id.clone(), p.clone()));
                match until_stored(&mut stop, "storing a webhook payload", &event.id, store).await {
                    Some(stored) => stored,
                    None => return,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, event = %event.id, "rendering a webhook payload");
                // Try again later; nothing was sent.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        },
    };
    let timestamp = at / 1000;
    let signature = sign(&webhook.secret, &event.id, timestamp, &body);
    let started = Instant::now();
    let sent = client
        .post(&webhook.url)
        .header("content-type", "application/json")
        .header("webhook-id", &event.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let (status_code, error) = match sent {
        Ok(mut res) => {
            let status = res.status();
            // Read a bounded part of the answer so the connection can be reused; never more.
            let mut read = 0usize;
            while read < config.max_response_bytes {
                match res.chunk().await {
                    Ok(Some(c)) => read += c.len(),
                    _ => break,
                }
            }
            let error = (!status.is_success()).then(|| format!("HTTP {}", status.as_u16()));
            (Some(status.as_u16()), error)
        }
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {} ms", config.timeout.as_millis())
            } else if e.is_connect() {
                format!("could not connect: {}", source_chain(&e))
            } else {
                source_chain(&e)
            };
            (None, Some(what))
        }
    };
    let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let retry_at = match &error {
        None => None,
        Some(_) => next_retry(config, attempts + 1, event.created_at, domain.now_ms()),
    };
    if let (Some(e), None) = (&error, retry_at) {
        tracing::warn!(webhook = %webhook.id, event = %event.id, error = %e, "webhook delivery failed for good: the retry period is over");
    }
    let outcome = AttemptOutcome {
        webhook_id: webhook.id.clone(),
        event_id: event.id.clone(),
        conversation_id: event.conversation_id.clone(),
        at,
        status_code,
        latency_ms,
        error,
        retry_at,
        failing_after: config.failing_after,
        endpoint_was_unhealthy: webhook.consecutive_failures > 0 || webhook.failing_since.is_some(),
    };
    // An attempt the store refuses to record is recorded again later, the delivery staying
    // in flight meanwhile: let go, it would fall due at once and be sent again and again
    // (to a receiver that already has it) for as long as the store refuses writes.
    let record = || batchers.record.call(outcome.clone());
    let Some(health) =
        until_stored(&mut stop, "recording a webhook attempt", &event.id, record).await
    else {
        return;
    };
    if health.became_failing {
        tracing::warn!(
            webhook = %webhook.id, url = %webhook.url,
            "webhook endpoint is failing: {} attempts in a row failed; its deliveries are retried, other endpoints are not affected",
            config.failing_after
        );
    } else if health.recovered {
        tracing::info!(webhook = %webhook.id, url = %webhook.url, "webhook endpoint recovered");
    }
}

/// Runs a store call until the store takes it (it refuses while it takes no writes, e.g. on
/// a full disk), pausing [`STORE_RETRY_FIRST`], then twice as long each time up to
/// [`STORE_RETRY_MAX`]. `None` when the dispatcher stops first: the delivery is abandoned,
/// to be made again after the restart.
async fn until_stored<T, F, Fut>(
    stop: &mut watch::Receiver<bool>,
    what: &str,
    event: &str,
    mut call: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut pause = STORE_RETRY_FIRST;
    loop {
        match call().await {
            Ok(v) => return Some(v),
            Err(e) => {
                let retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(error = %e, event, retry_in_ms, "{what}");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|stopping| *stopping) => return None,
                }
                pause = (pause * 2).min(STORE_RETRY_MAX);
            }
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_private_ranges_only() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_blocked_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_blocked_ip(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // From the Standard Webhooks specification's test vectors.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retries_back_off_and_stop_after_the_period() {
        let c = DispatcherConfig {
            retry_first: Duration::from_secs(10),
            retry_max: Duration::from_secs(60),
            retry_period: Duration::from_secs(3600),
            ..DispatcherConfig::default()
        };
        let first = next_retry(&c, 1, 0, 0).unwrap();
        assert!((8_000..=12_000).contains(&first), "{first}");
        let third = next_retry(&c, 3, 0, 0).unwrap();
        assert!((32_000..=48_000).contains(&third), "{third}");
        let capped = next_retry(&c, 20, 0, 0).unwrap();
        assert!(capped <= 72_000, "{capped}");
        assert_eq!(next_retry(&c, 2, 0, 3_599_000), None);
    }
}

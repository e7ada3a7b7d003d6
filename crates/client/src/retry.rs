//! Retry policy: how often, and how long, a failed call is tried again.

use std::time::Duration;

use rand::Rng;

/// When and how a call is retried.
///
/// A call is retried on **429**, **502**, **503**, **504**, on connection failures, and on
/// connections that broke before an answer arrived; never on other statuses and never on
/// timeouts. Which calls may be retried after the server *saw* them depends on the method:
///
/// * GET, PUT, DELETE, the agent ping and `visitorGroup` are idempotent and are retried on
///   every retryable failure.
/// * Sending a message (`POST messages` / `pushedMessages`) is retried on those failures only
///   when the client sends posts *idempotently* (see
///   [`ClientBuilder::idempotent_posts`](crate::ClientBuilder::idempotent_posts)): every POST
///   carries an `Idempotency-Key` that is the same on every attempt, and switchboard answers
///   a repeated key with the first response instead of creating a second message. Without
///   that (Brevo), a POST is retried only when the connection could not be established, so
///   the request never reached the server.
///
/// The wait before retry *n* is `initial_backoff * 2^(n-1)`, capped at `max_backoff`, with
/// "equal jitter" (a random value between half and all of it) unless `jitter` is off. When
/// the answer carries `Retry-After: <seconds>` (or an HTTP date, or Brevo's
/// `x-sib-ratelimit-reset`), the client waits exactly that long instead; if that is longer
/// than `max_retry_after` it gives up at once and returns the error with `retry_after` set.
/// A retry is also abandoned when it would start later than `max_elapsed` after the call
/// began.
///
/// ```
/// use std::time::Duration;
/// use switchboard_client::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(5)
///     .initial_backoff(Duration::from_millis(100))
///     .max_elapsed(Duration::from_secs(10));
/// assert_eq!(policy.max_attempts, 5);
/// assert!(!RetryPolicy::disabled().is_enabled());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, the first one included; `1` disables retries. Default 3.
    pub max_attempts: u32,
    /// Wait before the first retry (before jitter). Default 250 ms.
    pub initial_backoff: Duration,
    /// Upper bound of the exponential wait. Default 5 s.
    pub max_backoff: Duration,
    /// No retry starts later than this after the call began. Default 30 s.
    pub max_elapsed: Duration,
    /// The longest `Retry-After` the client is willing to wait; a longer one ends the
    /// retries at once. Default 30 s.
    pub max_retry_after: Duration,
    /// Randomise the exponential wait (not `Retry-After`). Default on.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The default policy: 3 attempts, 250 ms doubling up to 5 s, within 30 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// No retries: every call is attempted exactly once.
    pub fn disabled() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Whether this policy retries at all.
    pub fn is_enabled(&self) -> bool {
        self.max_attempts > 1
    }

    /// Sets the total number of attempts (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the wait before the first retry.
    pub fn initial_backoff(mut self, wait: Duration) -> Self {
        self.initial_backoff = wait;
        self
    }

    /// Sets the upper bound of the exponential wait.
    pub fn max_backoff(mut self, wait: Duration) -> Self {
        self.max_backoff = wait;
        self
    }

    /// Sets the time after which no new attempt starts.
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = limit;
        self
    }

    /// Sets the longest `Retry-After` the client will honour by waiting.
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// Turns jitter on or off (off makes waits deterministic, e.g. in tests).
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The wait before retry number `retry` (1 for the first retry).
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(31);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        if !self.jitter || base.is_zero() {
            return base;
        }
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Duration::from_nanos(rand::rng().random_range(half..=nanos))
    }
}

/// Parses `Retry-After` (delta-seconds, possibly fractional, or an HTTP date).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_backoff_is_capped() {
        let p = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(350))
            .jitter(false);
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(350));
        assert_eq!(p.backoff(40), Duration::from_millis(350));
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let p = RetryPolicy::default().initial_backoff(Duration::from_millis(100));
        for _ in 0..200 {
            let d = p.backoff(2);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }

    #[test]
    fn parses_retry_after() {
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert!(RetryPolicy::default().max_attempts(0).max_attempts == 1);
    }
}

//! The one error type of the SDK.

use std::time::Duration;

/// A boxed error from the HTTP stack, kept as the [`std::error::Error::source`] of
/// [`Error::Connect`] and [`Error::Transport`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result<T, switchboard_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a call, grouped by what the caller should do about it.
///
/// | variant | meaning | what to do |
/// |---|---|---|
/// | [`BadRequest`](Error::BadRequest) | 400: the request is invalid (`code` says why) | fix the input; do not retry |
/// | [`Unauthorized`](Error::Unauthorized) | 401: the `api-key` is missing, wrong or revoked | fix the key |
/// | [`NotFound`](Error::NotFound) | 404: no such message (or visitor) | treat as gone |
/// | [`RateLimited`](Error::RateLimited) | 429, still limited after the retries | wait `retry_after`, then try again |
/// | [`Server`](Error::Server) | 5xx after the retries | try later; report if persistent |
/// | [`Api`](Error::Api) | any other non-2xx status (402, 403, 405, 409, 3xx …) | see `status`/`code` |
/// | [`Timeout`](Error::Timeout) | no complete answer within the configured timeout | the call may or may not have taken effect |
/// | [`Connect`](Error::Connect) | could not connect (refused, DNS, TLS): the request never reached the server | check the base URL / network; safe to retry |
/// | [`Transport`](Error::Transport) | the connection broke after the request was (maybe) sent | the call may or may not have taken effect |
/// | [`Decode`](Error::Decode) | a 2xx answer whose body is not what the API promises | report it; `body` holds the raw answer |
/// | [`Config`](Error::Config) | [`ClientBuilder::build`](crate::ClientBuilder::build) got an invalid setting | fix the configuration |
/// | [`InvalidArgument`](Error::InvalidArgument) | an argument cannot be sent (e.g. an empty id) | fix the argument |
///
/// API variants keep Brevo's error body: `code` (e.g. `document_not_found`; empty when the
/// body was not a `{"code","message"}` object), `message` (the server's message, or a
/// description of the status when there was none) and `body`, the raw response body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// 400 Bad Request: the server rejected the input.
    #[error("bad request ({code}): {message}")]
    BadRequest {
        /// Brevo error code, e.g. `missing_parameter`.
        code: String,
        /// The server's explanation.
        message: String,
        /// The raw response body.
        body: String,
    },
    /// 401 Unauthorized: the `api-key` (or `partner-key`) was refused.
    #[error("unauthorized ({code}): {message}")]
    Unauthorized {
        /// Brevo error code, usually `unauthorized`.
        code: String,
        /// The server's explanation.
        message: String,
        /// The raw response body.
        body: String,
    },
    /// 404 Not Found: the message (or visitor) does not exist.
    #[error("not found ({code}): {message}")]
    NotFound {
        /// Brevo error code, usually `document_not_found`.
        code: String,
        /// The server's explanation.
        message: String,
        /// The raw response body.
        body: String,
    },
    /// 429 Too Many Requests, still returned after the retries the policy allowed.
    #[error("rate limited{}: {message}", fmt_retry_after(*retry_after))]
    RateLimited {
        /// How long the server asked to wait (`Retry-After`, or Brevo's
        /// `x-sib-ratelimit-reset`), when it said.
        retry_after: Option<Duration>,
        /// Brevo error code, if the body had one.
        code: String,
        /// The server's explanation.
        message: String,
        /// The raw response body.
        body: String,
    },
    /// A 5xx status, still returned after the retries the policy allowed.
    #[error("server error {status}: {message}")]
    Server {
        /// The HTTP status (500–599).
        status: u16,
        /// Brevo error code, if the body had one.
        code: String,
        /// The server's explanation.
        message: String,
        /// The raw response body.
        body: String,
    },
    /// Any other non-2xx status (e.g. 402, 403, 405, 409, or a 3xx: redirects are not followed).
    #[error("HTTP {status} ({code}): {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// Brevo error code, if the body had one.
        code: String,
        /// The server's explanation.
        message: String,
        /// The raw response body.
        body: String,
    },
    /// No complete answer arrived within the per-attempt timeout. The server may have
    /// processed the request; timeouts are not retried automatically.
    #[error("request timed out after {timeout:?}")]
    Timeout {
        /// The configured per-attempt timeout.
        timeout: Duration,
    },
    /// The connection could not be established (refused, DNS failure, TLS handshake,
    /// connect timeout): the request never reached the server.
    #[error("could not connect: {source}")]
    Connect {
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The connection failed after it was established (reset, closed mid-answer): the
    /// server may have seen the request.
    #[error("transport error: {source}")]
    Transport {
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// A success status whose body could not be decoded as the expected type.
    #[error("could not decode the HTTP {status} response: {source}")]
    Decode {
        /// The HTTP status of the answer.
        status: u16,
        /// The raw response body (lossily converted to UTF-8).
        body: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The client configuration is invalid.
    #[error("invalid client configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// An argument cannot be sent, e.g. an empty message id.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong.
        message: String,
    },
}

fn fmt_retry_after(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (retry after {}s)", d.as_secs_f64()),
        None => String::new(),
    }
}

impl Error {
    /// The HTTP status of an API error or a decode error, `None` when no answer arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::BadRequest { .. } => Some(400),
            Error::Unauthorized { .. } => Some(401),
            Error::NotFound { .. } => Some(404),
            Error::RateLimited { .. } => Some(429),
            Error::Server { status, .. } | Error::Api { status, .. } => Some(*status),
            Error::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The Brevo error code (`invalid_parameter`, `document_not_found`, …) of an API error,
    /// `None` when there is none.
    pub fn code(&self) -> Option<&str> {
        let code = match self {
            Error::BadRequest { code, .. }
            | Error::Unauthorized { code, .. }
            | Error::NotFound { code, .. }
            | Error::RateLimited { code, .. }
            | Error::Server { code, .. }
            | Error::Api { code, .. } => code,
            _ => return None,
        };
        (!code.is_empty()).then_some(code.as_str())
    }

    /// The raw response body of an API or decode error.
    pub fn body(&self) -> Option<&str> {
        match self {
            Error::BadRequest { body, .. }
            | Error::Unauthorized { body, .. }
            | Error::NotFound { body, .. }
            | Error::RateLimited { body, .. }
            | Error::Server { body, .. }
            | Error::Api { body, .. }
            | Error::Decode { body, .. } => Some(body),
            _ => None,
        }
    }

    /// How long the server asked to wait before trying again (429 only).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying the same call again later may succeed: rate limits, 502/503/504,
    /// connection failures. Timeouts and broken connections count too, but a repeated
    /// POST is only safe against a server that honours `Idempotency-Key` (switchboard).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::RateLimited { .. }
            | Error::Connect { .. }
            | Error::Transport { .. }
            | Error::Timeout { .. } => true,
            Error::Server { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }

    /// `true` for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            message: message.into(),
        }
    }

    /// Builds the API error for a non-2xx answer.
    pub(crate) fn from_status(status: u16, retry_after: Option<Duration>, raw: &[u8]) -> Self {
        let body = String::from_utf8_lossy(raw).into_owned();
        let (code, message) = match serde_json::from_slice::<switchboard_wire::ErrorBody>(raw) {
            Ok(e) if !(e.code.is_empty() && e.message.is_empty()) => (e.code, e.message),
            _ => (String::new(), describe_status(status)),
        };
        match status {
            400 => Error::BadRequest {
                code,
                message,
                body,
            },
            401 => Error::Unauthorized {
                code,
                message,
                body,
            },
            404 => Error::NotFound {
                code,
                message,
                body,
            },
            429 => Error::RateLimited {
                retry_after,
                code,
                message,
                body,
            },
            500..=599 => Error::Server {
                status,
                code,
                message,
                body,
            },
            _ => Error::Api {
                status,
                code,
                message,
                body,
            },
        }
    }
}

fn describe_status(status: u16) -> String {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("unknown status");
    format!("HTTP {status} {reason} (the body is not a Brevo error object)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses_and_bodies() {
        let e = Error::from_status(
            400,
            None,
            br#"{"code":"missing_parameter","message":"text is required"}"#,
        );
        assert!(
            matches!(&e, Error::BadRequest { code, message, .. } if code == "missing_parameter" && message == "text is required")
        );
        assert_eq!(e.code(), Some("missing_parameter"));
        assert_eq!(e.status(), Some(400));
        assert_eq!(
            e.to_string(),
            "bad request (missing_parameter): text is required"
        );

        let e = Error::from_status(502, None, b"<html>bad gateway</html>");
        assert!(
            matches!(&e, Error::Server { status: 502, code, body, .. } if code.is_empty() && body == "<html>bad gateway</html>")
        );
        assert_eq!(e.code(), None);
        assert!(e.is_transient());

        let e = Error::from_status(429, Some(Duration::from_secs(3)), b"{}");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(
            e.to_string(),
            "rate limited (retry after 3s): HTTP 429 Too Many Requests (the body is not a Brevo error object)"
        );
        let e = Error::from_status(403, None, br#"{"code":"permission_denied","message":"no"}"#);
        assert!(matches!(e, Error::Api { status: 403, .. }));
    }
}

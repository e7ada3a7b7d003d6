//! Configuration of `switchboard serve`: every flag is also a `SWITCHBOARD_*` variable, and
//! the defaults make `switchboard serve` work on a fresh machine.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::domain::DomainConfig;
use crate::store::postgres::PostgresOptions;
use crate::store::sqlite::SqliteOptions;

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// fsync every (group) commit: an answered write survives power loss.
    Full,
    /// Leave flushing to the OS: survives a crash of switchboard, not of the machine.
    Normal,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `switchboard serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Register this API key for the default account (instead of printing a new one).
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Require this `partner-key` header on every API call.
    #[arg(long, env = "SWITCHBOARD_PARTNER_KEY", hide_env_values = true)]
    pub partner_key: Option<String>,
    /// Seconds an agent stays online after agentOnlinePing.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_WINDOW", default_value_t = 150)]
    pub presence_window: u64,
    /// Durability of commits.
    #[arg(long, env = "SWITCHBOARD_SYNC", value_enum, default_value = "full")]
    pub sync: SyncMode,
    /// Most writes committed together in one transaction.
    #[arg(long, env = "SWITCHBOARD_GROUP_COMMIT_MAX", default_value_t = 512)]
    pub group_commit_max: usize,
    /// Milliseconds between checkpoints that copy SQLite's WAL back into the database file,
    /// on a thread of their own (0: the writer does it at commit, past 10,000 WAL pages).
    #[arg(long, env = "SWITCHBOARD_CHECKPOINT_INTERVAL", default_value_t = 100)]
    pub checkpoint_interval: u64,
    /// Recent messages kept in memory for reads (0 disables the cache).
    #[arg(long, env = "SWITCHBOARD_MESSAGE_CACHE", default_value_t = 10_000)]
    pub message_cache: usize,
    /// Minutes without a (not pushed) message after which a chat ends (fractions allowed).
    #[arg(long, env = "SWITCHBOARD_CHAT_TIMEOUT", default_value_t = 30.0)]
    pub chat_timeout: f64,
    /// Messages a visitor may send per minute (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_VISITOR_RATE", default_value_t = 30)]
    pub visitor_rate: u32,
    /// Longest visitor message, in characters.
    #[arg(long, env = "SWITCHBOARD_VISITOR_MAX_TEXT", default_value_t = 10_000)]
    pub visitor_max_text: usize,
    /// New visitor sessions per minute from one client address (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_SESSION_RATE", default_value_t = 60)]
    pub session_rate: u32,
    /// Seconds between pings on a visitor WebSocket; a socket silent for three times this
    /// long is closed.
    #[arg(long, env = "SWITCHBOARD_WS_PING", default_value_t = 30)]
    pub ws_ping: u64,
    /// Seconds a stop (SIGTERM, Ctrl-C) waits for open connections to finish their requests
    /// before it closes them and the database.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_TIMEOUT", default_value_t = 10.0)]
    pub shutdown_timeout: f64,
    /// Seconds a client has to send a request's headers once its connection is open (or,
    /// on a kept-alive connection, once the request's first byte arrived); then the
    /// connection is closed.
    #[arg(long, env = "SWITCHBOARD_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a kept-alive connection may stay idle after an answer before it is closed
    /// (answers say so: `Keep-Alive: timeout=N`). Event streams and WebSockets are exempt.
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT", default_value_t = 60.0)]
    pub idle_timeout: f64,
    /// Changes a live stream may have waiting before it is closed as too slow.
    #[arg(long, env = "SWITCHBOARD_STREAM_BUFFER", default_value_t = 256)]
    pub stream_buffer: usize,
    /// Seconds a chat must be quiet before its new messages go out in a
    /// conversationFragment webhook (0: right after each message).
    #[arg(long, env = "SWITCHBOARD_FRAGMENT_DELAY", default_value_t = 10.0)]
    pub fragment_delay: f64,
    /// Seconds a webhook receiver has to answer.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_TIMEOUT", default_value_t = 10.0)]
    pub webhook_timeout: f64,
    /// Seconds before the first retry of a failed delivery (each next one waits twice as
    /// long, up to an hour, with ±20% jitter).
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_RETRY_FIRST", default_value_t = 5.0)]
    pub webhook_retry_first: f64,
    /// Hours after which a delivery that keeps failing is given up.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_RETRY_HOURS", default_value_t = 24.0)]
    pub webhook_retry_hours: f64,
    /// Seconds a webhook delivery claimed by one instance stays its own (PostgreSQL): when
    /// an instance dies, the others deliver its claimed events after this long. Raised to
    /// the webhook timeout plus 5 s if lower.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_LEASE", default_value_t = 15.0)]
    pub webhook_lease: f64,
    /// Connections to PostgreSQL for reads and webhook claims: a quarter (at least one) for
    /// webhook claims and the feed, the rest for reads (the writer and the listener have one
    /// each besides).
    #[arg(long, env = "SWITCHBOARD_PG_CONNECTIONS", default_value_t = 16)]
    pub pg_connections: u32,
    /// Seconds a PostgreSQL statement may run before the server cancels it (0: no limit).
    #[arg(long, env = "SWITCHBOARD_PG_STATEMENT_TIMEOUT", default_value_t = 30.0)]
    pub pg_statement_timeout: f64,
    /// Refuse webhook URLs and hosts that are private, loopback or link-local (SSRF guard).
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_BLOCK_PRIVATE")]
    pub webhook_block_private: bool,
    /// Behind a reverse proxy: take the client address (for --session-rate) from the last
    /// entry of X-Forwarded-For. Only set it when the proxy sets that header.
    #[arg(long, env = "SWITCHBOARD_TRUST_PROXY")]
    pub trust_proxy: bool,
    /// Browser origins allowed to call the API and the widget API (CORS): `*` for any, as
    /// Brevo allows; a comma-separated list such as
    /// `https://shop.example,http://localhost:3000`; or `none`.
    #[arg(long, env = "SWITCHBOARD_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: crate::http::cors::CorsOrigins,
    /// Serve HTTPS with this certificate chain (PEM; the server's certificate first). Read
    /// again whenever it or the key changes, so a renewal needs no restart.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM: PKCS#8, RSA or EC).
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at `GET /metrics` on this address, a listener of its own
    /// (e.g. 127.0.0.1:9100; port 0 picks a free port). Off by default.
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(
        long,
        env = "SWITCHBOARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// The domain settings these flags ask for.
    pub fn domain_config(&self) -> DomainConfig {
        DomainConfig {
            presence_window: Duration::from_secs(self.presence_window),
            partner_key: self.partner_key.clone().filter(|k| !k.is_empty()),
            chat_timeout: secs(self.chat_timeout * 60.0).max(Duration::from_millis(100)),
            visitor_messages_per_minute: self.visitor_rate,
            visitor_max_text: self.visitor_max_text.max(1),
            sessions_per_minute: self.session_rate,
            fragment_delay: secs(self.fragment_delay),
            webhook_block_private: self.webhook_block_private,
            ..DomainConfig::default()
        }
    }

    /// The TLS files these flags name, loaded and checked (`None` without `--tls-cert`).
    pub fn tls(&self) -> anyhow::Result<Option<crate::http::tls::Tls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        crate::http::tls::Tls::load(crate::http::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            check_every: Duration::from_secs(10),
        })
        .map(Some)
    }

    /// The server settings these flags ask for (without TLS: see [`ServeArgs::tls`]).
    pub fn serve_options(&self) -> crate::ServeOptions {
        let ping = Duration::from_secs(self.ws_ping.max(1));
        crate::ServeOptions {
            streams: crate::http::streams::StreamConfig {
                ping_interval: ping,
                idle_timeout: ping * 3,
                ..crate::http::streams::StreamConfig::default()
            },
            stream_buffer: self.stream_buffer.max(1),
            trust_proxy: self.trust_proxy,
            shutdown_grace: secs(self.shutdown_timeout),
            header_timeout: secs(self.header_timeout).max(Duration::from_millis(100)),
            idle_timeout: secs(self.idle_timeout).max(Duration::from_millis(100)),
            cors: self.cors_origins.clone(),
            webhooks: Some(crate::webhooks::DispatcherConfig {
                timeout: secs(self.webhook_timeout).max(Duration::from_millis(100)),
                retry_first: secs(self.webhook_retry_first).max(Duration::from_millis(10)),
                retry_period: secs(self.webhook_retry_hours * 3600.0),
                block_private: self.webhook_block_private,
                ..crate::webhooks::DispatcherConfig::default()
            }),
            ..crate::ServeOptions::default()
        }
    }

    /// The storage settings these flags ask for (both backends; the database decides).
    pub fn store_options(&self) -> crate::StoreOptions {
        crate::StoreOptions {
            sqlite: SqliteOptions {
                synchronous_full: self.sync == SyncMode::Full,
                max_batch: self.group_commit_max,
                message_cache: self.message_cache,
                checkpoint_every: (self.checkpoint_interval > 0)
                    .then(|| Duration::from_millis(self.checkpoint_interval)),
                ..SqliteOptions::default()
            },
            postgres: PostgresOptions {
                max_batch: self.group_commit_max,
                read_connections: self.pg_connections.max(2),
                statement_timeout: secs(self.pg_statement_timeout),
                webhook_lease: secs(self.webhook_lease)
                    .max(secs(self.webhook_timeout) + Duration::from_secs(5)),
                ..PostgresOptions::default()
            },
        }
    }
}

/// A duration from seconds given on the command line (negative or not a number: zero).
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn store_options(flags: &[&str]) -> crate::StoreOptions {
        let argv = std::iter::once("serve").chain(flags.iter().copied());
        Serve::try_parse_from(argv).unwrap().args.store_options()
    }

    #[test]
    fn checkpoint_interval_reaches_the_sqlite_store() {
        let every = |flags: &[&str]| store_options(flags).sqlite.checkpoint_every;
        assert_eq!(every(&[]), Some(Duration::from_millis(100)));
        assert_eq!(
            every(&["--checkpoint-interval", "250"]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(every(&["--checkpoint-interval", "0"]), None);
    }
}

//! Operational metrics in Prometheus's text format, served on a listener of their own
//! (`--metrics-listen`), never on the API's port.
//!
//! Counted as they happen, per process: group commits (how many, of how many writes, how
//! long) and connections. Read when scraped: live streams, webhook deliveries by status,
//! the process's memory, CPU time and open files. Nothing is counted per request: the
//! request path stays as it is (request counts and latencies are in the `info` log and in
//! any proxy's).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::domain::Domain;
use crate::realtime::Hub;

/// Upper bounds of the commit-duration histogram, in microseconds.
const COMMIT_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// What this process counts as it goes.
#[derive(Debug, Default)]
pub struct Counters {
    commits: AtomicU64,
    committed_writes: AtomicU64,
    commit_us_sum: AtomicU64,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS_US.len()],
    connections_open: AtomicI64,
    connections_total: AtomicU64,
}

static COUNTERS: Counters = Counters {
    commits: AtomicU64::new(0),
    committed_writes: AtomicU64::new(0),
    commit_us_sum: AtomicU64::new(0),
    commit_buckets: [const { AtomicU64::new(0) }; COMMIT_BUCKETS_US.len()],
    connections_open: AtomicI64::new(0),
    connections_total: AtomicU64::new(0),
};

/// The process's counters (one set per process, like its log).
pub fn counters() -> &'static Counters {
    &COUNTERS
}

impl Counters {
    /// A group commit of `writes` jobs that took `took` (committed or not).
    pub fn commit(&self, writes: usize, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.committed_writes
            .fetch_add(writes as u64, Ordering::Relaxed);
        self.commit_us_sum.fetch_add(us, Ordering::Relaxed);
        if let Some(i) = COMMIT_BUCKETS_US.iter().position(|&b| us <= b) {
            self.commit_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection was accepted; the guard counts it out when dropped.
    pub fn connection(&'static self) -> ConnectionGuard {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self)
    }
}

/// An open connection, counted out when dropped.
#[derive(Debug)]
pub struct ConnectionGuard(&'static Counters);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the metrics listener needs to read at a scrape.
#[derive(Clone)]
struct Sources {
    domain: Arc<Domain>,
    hub: Arc<Hub>,
}

/// The metrics listener's application: `GET /metrics`.
pub fn router(domain: Arc<Domain>, hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(Sources { domain, hub })
}

async fn scrape(State(src): State<Sources>) -> Response {
    let mut out = String::with_capacity(4096);
    let c = counters();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

    metric(&mut out, "switchboard_commits_total", "counter",
        "Group commits of the writer (all writes of a moment in one transaction), committed or rolled back.");
    let _ = writeln!(out, "switchboard_commits_total {}", load(&c.commits));
    metric(
        &mut out,
        "switchboard_commit_writes_total",
        "counter",
        "Writes (messages and other changes) in those group commits.",
    );
    let _ = writeln!(
        out,
        "switchboard_commit_writes_total {}",
        load(&c.committed_writes)
    );
    metric(
        &mut out,
        "switchboard_commit_duration_seconds",
        "histogram",
        "From the start of a group commit to its end (the flush to disk included).",
    );
    let mut cumulative = 0;
    for (bound, count) in COMMIT_BUCKETS_US.iter().zip(&c.commit_buckets) {
        cumulative += load(count);
        let _ = writeln!(
            out,
            "switchboard_commit_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    let commits = load(&c.commits);
    let _ = writeln!(
        out,
        "switchboard_commit_duration_seconds_bucket{{le=\"+Inf\"}} {commits}"
    );
    let _ = writeln!(
        out,
        "switchboard_commit_duration_seconds_sum {}",
        load(&c.commit_us_sum) as f64 / 1e6
    );
    let _ = writeln!(out, "switchboard_commit_duration_seconds_count {commits}");

    metric(
        &mut out,
        "switchboard_connections_open",
        "gauge",
        "HTTP connections open now (WebSockets and event streams included).",
    );
    let _ = writeln!(
        out,
        "switchboard_connections_open {}",
        c.connections_open.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "switchboard_connections_total",
        "counter",
        "HTTP connections accepted.",
    );
    let _ = writeln!(
        out,
        "switchboard_connections_total {}",
        load(&c.connections_total)
    );
    metric(
        &mut out,
        "switchboard_live_streams",
        "gauge",
        "Visitor WebSockets and account event streams subscribed now.",
    );
    let _ = writeln!(out, "switchboard_live_streams {}", src.hub.subscribers());

    match src.domain.store().webhook_delivery_counts().await {
        Ok(counts) => {
            metric(
                &mut out,
                "switchboard_webhook_deliveries",
                "gauge",
                "Webhook deliveries in the outbox, by status.",
            );
            for (status, n) in counts {
                let _ = writeln!(
                    out,
                    "switchboard_webhook_deliveries{{status=\"{status}\"}} {n}"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: reading the webhook outbox failed"),
    }

    process(&mut out);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The process's resident memory, CPU time and open files, from `/proc` (Linux only).
fn process(out: &mut String) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    if let Some(kib) = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        metric(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {}", kib * 1024);
    }
    // utime and stime are the 14th and 15th fields, counted after the command's `)`.
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
    {
        // Linux reports these in USER_HZ, 100 per second on every architecture it runs on.
        metric(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {}", ticks as f64 / 100.0);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
}

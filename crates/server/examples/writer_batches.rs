//! The writer's work per message at a chosen group-commit size, without HTTP.
//!
//! `scripts/callgrind-post.py` counts a whole server, but under valgrind the threads run one
//! at a time and group commits shrink to a few messages, far from the 20 to 40 of a real
//! run at 64 connections. This submits BATCH agent messages at once through the domain,
//! waits for all of them, and repeats ROUNDS times on a fresh SQLite file (durable, as
//! `serve` runs it), so that each group commit holds BATCH messages. At the end it prints
//! the writer thread's own user and system time per message. No HTTP and no load generator
//! share the machine with it, so its times are steadier than the benchmark's.
//!
//! ```sh
//! cargo build --release -p switchboard-server --example writer_batches
//! target/release/examples/writer_batches 20 4000
//! scripts/callgrind-post.py --batch 20 --switchboard A --against B   # instructions per message
//! ```
//!
//! With `RUST_LOG=switchboard_server::store=debug` the store logs each group commit's size.

use switchboard_server::domain::{AgentMessage, AgentRef, Clock, DomainConfig, Text, VisitorId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut args = std::env::args().skip(1);
    let usage = "usage: writer_batches BATCH ROUNDS";
    let batch: usize = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let rounds: usize = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let dir = tempfile::tempdir()?;
    let domain = switchboard_server::open(
        &dir.path().join("writer.db"),
        switchboard_server::StoreOptions::default(),
        DomainConfig::default(),
        Clock::System,
    )
    .await?;
    let account = domain.bootstrap(None).await?.account.id;
    let message = || AgentMessage {
        visitor_id: VisitorId::parse(Some("kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg".into())).unwrap(),
        text: Text::parse(Some("Hello! How can I help you?".into())).unwrap(),
        agent: AgentRef::parse(None, Some("liz@getwear.com".into()), Some("Liz".into())).unwrap(),
        received_from: Some("bench".into()),
    };
    // The first message creates the agent, the visitor and the conversation.
    domain.send_agent_message(&account, message(), None).await?;
    let before = writer_cpu();
    for _ in 0..rounds {
        let sends = (0..batch).map(|_| domain.send_agent_message(&account, message(), None));
        for result in futures::future::join_all(sends).await {
            result?;
        }
    }
    if let (Some((user0, sys0)), Some((user1, sys1))) = (before, writer_cpu()) {
        // The process's own times would count this thread too, which the runtime wakes
        // for every answer: the writer thread's are what a server's writer spends.
        let per = |ticks: u64| ticks as f64 * 10_000.0 / (rounds * batch) as f64;
        println!(
            "writer thread, per message: {:.2} µs user, {:.2} µs system ({} messages in commits of {batch})",
            per(user1 - user0),
            per(sys1 - sys0),
            rounds * batch,
        );
    }
    domain.store().close().await;
    Ok(())
}

/// User and system time of the store's writer thread so far, in clock ticks (1/100 s,
/// as `/proc` counts them), from `/proc/self/task/*/stat`.
fn writer_cpu() -> Option<(u64, u64)> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("switchboard-wri") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the command name, which ends with the last ')': state is the
        // first of them, utime the 12th and stime the 13th.
        let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ').skip(11);
        let user = fields.next()?.parse().ok()?;
        let sys = fields.next()?.parse().ok()?;
        return Some((user, sys));
    }
    None
}

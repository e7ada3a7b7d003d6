//! The `switchboard` binary: the server and its administration verbs.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use switchboard_server::config::{LogFormat, ServeArgs};
use switchboard_server::domain::{Clock, Domain, DomainConfig};
use switchboard_server::store::sqlite::SqliteOptions;
use switchboard_server::store::{AgentRow, ApiKey, GroupRow};
use tokio::net::TcpListener;

// mimalloc: measured faster than glibc malloc on the request path (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod main_api;

/// switchboard: a self-hosted live-chat server that speaks the Brevo Conversations API.
// The doc comments are the CLI's help text: `[:PASSWORD]` there is a URL's optional part,
// not a rustdoc link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Database: a file path or sqlite://PATH (embedded SQLite, created when missing), or
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (several instances may share it).
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_DB",
        default_value = "./switchboard.db"
    )]
    db: PathBuf,
    /// Print machine-readable JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage accounts.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage agents.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Manage agent groups.
    #[command(subcommand)]
    Groups(GroupsCmd),
    /// Manage webhook endpoints and read their delivery logs.
    #[command(subcommand)]
    Webhooks(WebhooksCmd),
    /// Agents' messages through the API: send, get, edit, delete.
    #[command(subcommand)]
    Msg(main_api::MsgCmd),
    /// Automated (pushed) messages through the API: send, get, edit, delete.
    #[command(subcommand)]
    Push(main_api::PushCmd),
    /// Mark an agent online through the API (agentOnlinePing).
    Ping(main_api::PingArgs),
    /// Assign a visitor to a group, or remove it from its group, through the API.
    VisitorGroup(main_api::VisitorGroupArgs),
    /// Copy the SQLite database to a new file, while the server runs (a consistent snapshot).
    Backup {
        /// The backup file to write (must not exist).
        file: PathBuf,
    },
    /// Replace the SQLite database with a backup (the server must be stopped).
    Restore {
        /// A file written by `switchboard backup`.
        file: PathBuf,
        /// Replace an existing database (everything in it is lost).
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AccountsCmd {
    /// Create an account and print its first API key (shown once).
    Create { name: String },
    /// List accounts.
    List,
    /// Print an account's widget id and identity key (for the visitor API).
    Widget {
        #[command(flatten)]
        account: AccountArg,
        /// Make a new identity key first (signs out every visitor of the account).
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, clap::Args)]
struct AccountArg {
    /// Account id (default: the default account).
    #[arg(long, env = "SWITCHBOARD_ACCOUNT")]
    account: Option<String>,
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create an API key (shown once).
    Create {
        #[command(flatten)]
        account: AccountArg,
        /// A label for the key.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List keys (never the keys themselves).
    List {
        #[command(flatten)]
        account: AccountArg,
    },
    /// Revoke a key by its id.
    Revoke {
        #[command(flatten)]
        account: AccountArg,
        /// Key id, from `keys list`.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentsCmd {
    /// Add an agent.
    Add {
        #[command(flatten)]
        account: AccountArg,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Email (unique in the account).
        #[arg(long)]
        email: Option<String>,
        /// Picture URL.
        #[arg(long)]
        userpic: Option<String>,
        /// Group id to join (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List agents.
    List {
        #[command(flatten)]
        account: AccountArg,
    },
    /// Remove an agent.
    Remove {
        #[command(flatten)]
        account: AccountArg,
        /// Agent id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCmd {
    /// Add an endpoint; prints its signing secret.
    Add {
        #[command(flatten)]
        account: AccountArg,
        /// http or https URL to POST events to.
        #[arg(long)]
        url: String,
        /// An event to deliver (repeatable; default: all of conversationStarted,
        /// conversationFragment, conversationTranscript).
        #[arg(long = "event")]
        events: Vec<String>,
        /// A note for operators.
        #[arg(long)]
        description: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List endpoints with their health (ok, or failing since when and why).
    List {
        #[command(flatten)]
        account: AccountArg,
    },
    /// Enable or disable an endpoint.
    Enable {
        #[command(flatten)]
        account: AccountArg,
        /// Endpoint id.
        id: String,
        /// Disable instead.
        #[arg(long)]
        off: bool,
    },
    /// Remove an endpoint and its delivery log.
    Remove {
        #[command(flatten)]
        account: AccountArg,
        /// Endpoint id.
        id: String,
    },
    /// The delivery log of an endpoint, newest first; with --event, that delivery's attempts.
    Log {
        #[command(flatten)]
        account: AccountArg,
        /// Endpoint id.
        id: String,
        /// Show the attempts of this event.
        #[arg(long)]
        event: Option<String>,
        /// How many deliveries (1 to 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Send an event to an endpoint again (same event id).
    Replay {
        #[command(flatten)]
        account: AccountArg,
        /// Endpoint id.
        id: String,
        /// Event id.
        event: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsCmd {
    /// Add a group.
    Add {
        #[command(flatten)]
        account: AccountArg,
        /// Group name (unique in the account).
        name: String,
    },
    /// List groups.
    List {
        #[command(flatten)]
        account: AccountArg,
    },
    /// Remove a group.
    Remove {
        #[command(flatten)]
        account: AccountArg,
        /// Group id.
        id: String,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(&cli.db, args).await,
        Command::Msg(cmd) => main_api::msg(cmd, cli.json).await,
        Command::Push(cmd) => main_api::push(cmd, cli.json).await,
        Command::Ping(args) => main_api::ping(args, cli.json).await,
        Command::VisitorGroup(args) => main_api::visitor_group(args, cli.json).await,
        Command::Backup { file } => {
            let db = cli.db.clone();
            let summary =
                tokio::task::spawn_blocking(move || switchboard_server::backup::backup(&db, &file))
                    .await??;
            print_copy(cli.json, "backed up", &cli.db, &summary);
            Ok(())
        }
        Command::Restore { file, replace } => {
            let (db, from) = (cli.db.clone(), file.clone());
            let summary = tokio::task::spawn_blocking(move || {
                switchboard_server::backup::restore(&db, &from, replace)
            })
            .await??;
            print_copy(cli.json, "restored", &file, &summary);
            Ok(())
        }
        other => {
            let domain = switchboard_server::open(
                &cli.db,
                SqliteOptions {
                    read_connections: 1,
                    // A short-lived command: SQLite checkpoints as it closes.
                    checkpoint_every: None,
                    ..SqliteOptions::default()
                },
                DomainConfig::default(),
                Clock::System,
            )
            .await?;
            let result = admin(&domain, other, cli.json).await;
            domain.store().close().await;
            result
        }
    }
}

async fn serve(db: &std::path::Path, args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    #[cfg(unix)]
    raise_open_files_limit();
    // Before anything is opened: a bad certificate stops the server at once.
    let tls = args.tls()?;
    // Before the listening line: from then on a SIGHUP must find its handler.
    #[cfg(unix)]
    reload_on_sighup(tls.clone())?;
    // Held until the store is closed, at the end of this function.
    let _lock = switchboard_server::ServeLock::acquire(db)?;
    let domain = switchboard_server::open(
        db,
        args.store_options(),
        args.domain_config(),
        Clock::System,
    )
    .await?;
    let boot = domain
        .bootstrap(args.api_key.as_deref())
        .await
        .context("preparing the default account")?;
    if let Some(key) = &boot.new_key {
        println!(
            "created the default account {} with API key (shown once, keep it): {key}",
            boot.account.id
        );
    }
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = switchboard_server::MetricsListener::bind(addr)?;
            println!("metrics on http://{}/metrics", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("listening on {scheme}://{addr}");
    tracing::info!(%addr, db = %db.display(), "switchboard is ready");
    let options = switchboard_server::ServeOptions {
        tls,
        metrics,
        ..args.serve_options()
    };
    switchboard_server::serve_with(domain, listener, options, shutdown_signal()).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Raises the soft limit on open files to the hard one. Every connection and WebSocket holds
/// a descriptor, and the usual soft default of 1,024 (systemd's, for one) would turn
/// visitors away long before the machine runs short of anything.
#[cfg(unix)]
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited: nothing to raise.
    let Some(current) = limit.current else {
        return;
    };
    // Without a hard limit the kernel still has one (Linux's fs.nr_open: 1,048,576 unless
    // changed).
    let target = limit.maximum.unwrap_or(1 << 20);
    if target <= current {
        return;
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(from = current, to = target, "raised the open-files limit"),
        Err(e) => tracing::warn!(
            limit = current,
            error = %e,
            "could not raise the open-files limit; connections beyond it will wait"
        ),
    }
}

/// SIGHUP reads the TLS files again at once (`systemctl reload`, a renewal tool's deploy
/// hook) instead of ending the process, which is what it would do unhandled.
#[cfg(unix)]
fn reload_on_sighup(tls: Option<switchboard_server::http::tls::Tls>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &tls {
                Some(tls) => {
                    tracing::info!("SIGHUP: reading the TLS certificate and key again");
                    tls.reload_now();
                }
                None => tracing::info!("SIGHUP: nothing to reload (no --tls-cert)"),
            }
        }
    });
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn agent_json(a: &AgentRow, groups: &[String], online: bool) -> serde_json::Value {
    serde_json::to_value(switchboard_wire::Agent {
        id: a.id.clone(),
        name: a.name.clone(),
        email: a.email.clone(),
        userpic: a.userpic.clone(),
        groups: groups.to_vec(),
        online,
    })
    .unwrap_or_default()
}

fn group_json(g: &GroupRow) -> serde_json::Value {
    json!({ "id": g.id, "name": g.name })
}

fn key_json(k: &ApiKey) -> serde_json::Value {
    json!({
        "id": k.id, "accountId": k.account_id, "name": k.name, "prefix": k.prefix,
        "createdAt": k.created_at, "revokedAt": k.revoked_at,
    })
}

fn print(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json_out {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

/// Reports a backup (`from` is the database) or a restore (`from` is the backup).
fn print_copy(
    json_out: bool,
    done: &str,
    from: &std::path::Path,
    s: &switchboard_server::backup::Summary,
) {
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    let value = json!({
        "file": s.path, "bytes": s.bytes, "accounts": s.accounts, "messages": s.messages,
        "schemaVersion": s.schema_version, "seconds": s.elapsed.as_secs_f64(),
        "warnings": s.warnings,
    });
    print(json_out, value, || {
        format!(
            "{done} {} to {}: {} accounts, {} messages, {} bytes (schema {}) in {:.2} s",
            from.display(),
            s.path.display(),
            s.accounts,
            s.messages,
            s.bytes,
            s.schema_version,
            s.elapsed.as_secs_f64()
        )
    });
}

async fn admin(domain: &Arc<Domain>, cmd: Command, j: bool) -> anyhow::Result<()> {
    match cmd {
        Command::Serve(_)
        | Command::Msg(_)
        | Command::Push(_)
        | Command::Ping(_)
        | Command::VisitorGroup(_)
        | Command::Backup { .. }
        | Command::Restore { .. } => unreachable!("handled by run"),
        Command::Accounts(AccountsCmd::Create { name }) => {
            let (account, key) = domain.create_account(&name).await?;
            print(
                j,
                json!({"id": account.id, "name": account.name, "apiKey": key.key}),
                || {
                    format!(
                        "account {} ({})\nAPI key (shown once, keep it): {}",
                        account.id, account.name, key.key
                    )
                },
            );
        }
        Command::Accounts(AccountsCmd::List) => {
            let accounts = domain.list_accounts().await?;
            let v: Vec<_> = accounts
                .iter()
                .map(|a| json!({"id": a.id, "name": a.name, "isDefault": a.is_default, "createdAt": a.created_at}))
                .collect();
            print(j, json!(v), || {
                accounts
                    .iter()
                    .map(|a| {
                        format!(
                            "{}  {}{}",
                            a.id,
                            a.name,
                            if a.is_default { "  (default)" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Accounts(AccountsCmd::Widget { account, rotate }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let w = if rotate {
                domain.rotate_identity_key(&account.id).await?
            } else {
                domain.widget_of(&account.id).await?
            };
            print(
                j,
                json!({"accountId": w.account_id, "widgetId": w.widget_id, "identityKey": w.identity_key}),
                || {
                    format!(
                        "widget id:    {}\nidentity key: {} (secret: sign visitorId binding with \
                         HMAC-SHA256; keep it on your servers)",
                        w.widget_id, w.identity_key
                    )
                },
            );
        }
        Command::Keys(KeysCmd::Create { account, name }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let key = domain.create_key(&account.id, &name).await?;
            let mut v = key_json(&key.record);
            v["apiKey"] = json!(key.key);
            print(j, v, || {
                format!(
                    "key {} for account {}\nAPI key (shown once, keep it): {}",
                    key.record.id, account.id, key.key
                )
            });
        }
        Command::Keys(KeysCmd::List { account }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let keys = domain.list_keys(&account.id).await?;
            print(
                j,
                json!(keys.iter().map(key_json).collect::<Vec<_>>()),
                || {
                    keys.iter()
                        .map(|k| {
                            format!(
                                "{}  {}…  {}{}",
                                k.id,
                                k.prefix,
                                k.name,
                                if k.revoked_at.is_some() {
                                    "  (revoked)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Keys(KeysCmd::Revoke { account, id }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            domain.revoke_key(&account.id, &id).await?;
            print(j, json!({"id": id, "revoked": true}), || {
                format!("revoked key {id} (running servers stop accepting it within 5 seconds)")
            });
        }
        Command::Agents(AgentsCmd::Add {
            account,
            name,
            email,
            userpic,
            groups,
        }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let (agent, groups) = domain
                .add_agent(
                    &account.id,
                    &name,
                    email.as_deref(),
                    userpic.as_deref(),
                    &groups,
                )
                .await?;
            print(j, agent_json(&agent, &groups, false), || {
                format!("agent {} ({})", agent.id, agent.name)
            });
        }
        Command::Agents(AgentsCmd::List { account }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let agents = domain.list_agents(&account.id).await?;
            let v: Vec<_> = agents
                .iter()
                .map(|(a, g)| agent_json(a, g, domain.is_online(a)))
                .collect();
            print(j, json!(v), || {
                agents
                    .iter()
                    .map(|(a, g)| {
                        format!(
                            "{}  {}  {}  groups: [{}]{}",
                            a.id,
                            a.name,
                            a.email.as_deref().unwrap_or("-"),
                            g.join(", "),
                            if domain.is_online(a) {
                                "  (online)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Agents(AgentsCmd::Remove { account, id }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            domain.remove_agent(&account.id, &id).await?;
            print(j, json!({"id": id, "removed": true}), || {
                format!("removed agent {id}")
            });
        }
        Command::Groups(GroupsCmd::Add { account, name }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let group = domain.add_group(&account.id, &name).await?;
            print(j, group_json(&group), || {
                format!("group {} ({})", group.id, group.name)
            });
        }
        Command::Groups(GroupsCmd::List { account }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let groups = domain.list_groups(&account.id).await?;
            print(
                j,
                json!(groups.iter().map(group_json).collect::<Vec<_>>()),
                || {
                    groups
                        .iter()
                        .map(|g| format!("{}  {}", g.id, g.name))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Groups(GroupsCmd::Remove { account, id }) => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            domain.remove_group(&account.id, &id).await?;
            print(j, json!({"id": id, "removed": true}), || {
                format!("removed group {id}")
            });
        }
        Command::Webhooks(cmd) => webhooks_cmd(domain, cmd, j).await?,
    }
    Ok(())
}

fn webhook_line(w: &switchboard_wire::Webhook) -> String {
    let health = match (w.failing_since, &w.last_error) {
        (Some(since), Some(e)) => format!(
            "FAILING since {} ({} failures in a row; last: {e})",
            ms_to_rfc3339(since),
            w.consecutive_failures
        ),
        (Some(since), None) => format!("FAILING since {}", ms_to_rfc3339(since)),
        (None, _) => "ok".into(),
    };
    format!(
        "{}  {}  [{}]{}  {}",
        w.id,
        w.url,
        w.events.join(","),
        if w.enabled { "" } else { "  (disabled)" },
        health
    )
}

fn ms_to_rfc3339(ms: i64) -> String {
    // Seconds are enough for an operator; no date crate needed for UTC.
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

async fn webhooks_cmd(domain: &Arc<Domain>, cmd: WebhooksCmd, j: bool) -> anyhow::Result<()> {
    use switchboard_server::http::{delivery_wire, webhook_wire};
    match cmd {
        WebhooksCmd::Add {
            account,
            url,
            events,
            description,
            disabled,
        } => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let w = domain
                .add_webhook(
                    &account.id,
                    switchboard_server::domain::NewWebhook {
                        url: Some(url),
                        events: (!events.is_empty()).then_some(events),
                        description,
                        enabled: Some(!disabled),
                    },
                )
                .await?;
            let w = webhook_wire(w, true);
            let secret = w.secret.clone().unwrap_or_default();
            print(j, serde_json::to_value(&w)?, || {
                format!(
                    "{}\nsigning secret (verify the webhook-signature header with it): {secret}",
                    webhook_line(&w)
                )
            });
        }
        WebhooksCmd::List { account } => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let hooks: Vec<_> = domain
                .list_webhooks(&account.id)
                .await?
                .into_iter()
                .map(|w| webhook_wire(w, false))
                .collect();
            print(j, serde_json::to_value(&hooks)?, || {
                if hooks.is_empty() {
                    "no webhook endpoints".into()
                } else {
                    hooks
                        .iter()
                        .map(webhook_line)
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            });
        }
        WebhooksCmd::Enable { account, id, off } => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let w = domain
                .update_webhook(
                    &account.id,
                    &id,
                    switchboard_server::domain::NewWebhook {
                        enabled: Some(!off),
                        ..Default::default()
                    },
                )
                .await?;
            let w = webhook_wire(w, false);
            print(j, serde_json::to_value(&w)?, || webhook_line(&w));
        }
        WebhooksCmd::Remove { account, id } => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            domain.remove_webhook(&account.id, &id).await?;
            print(j, json!({"id": id, "removed": true}), || {
                format!("removed webhook {id}")
            });
        }
        WebhooksCmd::Log {
            account,
            id,
            event,
            limit,
        } => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            let deliveries = match &event {
                Some(e) => {
                    let d = domain.webhook_delivery(&account.id, &id, e).await?;
                    let attempts = domain.webhook_attempts(&account.id, &id, e).await?;
                    vec![delivery_wire(d, Some(attempts))]
                }
                None => domain
                    .webhook_deliveries(&account.id, &id, None, limit)
                    .await?
                    .into_iter()
                    .map(|d| delivery_wire(d, None))
                    .collect(),
            };
            print(j, serde_json::to_value(&deliveries)?, || {
                let mut lines = Vec::new();
                for d in &deliveries {
                    let next = d
                        .next_attempt_at
                        .map(|t| format!("  next attempt {}", ms_to_rfc3339(t)))
                        .unwrap_or_default();
                    let last = match (d.last_status, &d.last_error) {
                        (Some(s), _) => format!("  last HTTP {s}"),
                        (None, Some(e)) => format!("  last error: {e}"),
                        _ => String::new(),
                    };
                    lines.push(format!(
                        "{}  {}  {}  {}  attempts {}{}{}{}",
                        d.event_id,
                        d.event_name,
                        d.conversation_id,
                        d.status,
                        d.attempts,
                        d.last_latency_ms
                            .map(|l| format!("  {l} ms"))
                            .unwrap_or_default(),
                        last,
                        next
                    ));
                    for a in d.attempt_log.iter().flatten() {
                        lines.push(format!(
                            "    #{} {}  {}  {} ms",
                            a.attempt,
                            ms_to_rfc3339(a.at),
                            a.status
                                .map(|s| format!("HTTP {s}"))
                                .or(a.error.clone())
                                .unwrap_or_default(),
                            a.latency_ms
                        ));
                    }
                }
                if lines.is_empty() {
                    "no deliveries yet".into()
                } else {
                    lines.join("\n")
                }
            });
        }
        WebhooksCmd::Replay { account, id, event } => {
            let account = domain.resolve_account(account.account.as_deref()).await?;
            domain.replay_webhook(&account.id, &id, &event).await?;
            print(
                j,
                json!({"id": id, "eventId": event, "replayed": true}),
                || format!("event {event} queued again for webhook {id}"),
            );
        }
    }
    Ok(())
}

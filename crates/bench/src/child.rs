//! What every benchmark binary does with the servers it measures: start one as a child
//! process, find the address it prints, read its memory, stop it; and run `switchboard`
//! admin verbs.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A server running as a child process.
pub struct Server {
    child: Child,
    /// `host:port` it listens on (always 127.0.0.1), prefixed with `tls://` when it
    /// serves HTTPS.
    pub addr: String,
}

impl Server {
    /// Starts `cmd` and waits (60 s at most) for its `listening on http[s]://ADDR` line.
    pub async fn start(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting server")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("listening on http://") {
                    return Ok(url.to_owned());
                }
                if let Some(url) = line.strip_prefix("listening on https://") {
                    return Ok(format!("tls://{url}"));
                }
            }
            bail!("server exited before listening")
        })
        .await
        .context("server did not start within 60 s")??;
        if !addr.trim_start_matches("tls://").starts_with("127.0.0.1:") {
            bail!("server listens on {addr}; the benchmarks only connect to 127.0.0.1");
        }
        // Keep reading the child's stdout so that a later line can never block it or fail.
        tokio::spawn(async move {
            let mut err = tokio::io::stderr();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = err.write_all(format!("[server] {line}\n").as_bytes()).await;
            }
        });
        Ok(Self { child, addr })
    }

    /// SIGTERM by pid, then wait: a graceful stop, like an operator's.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        let _ = self.child.kill().await;
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The server's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("server has exited")?;
        rss_kib(&format!("/proc/{pid}/status"))
    }
}

/// VmRSS from a `/proc/<pid>/status` file, in KiB.
pub fn rss_kib(status_path: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(status_path).with_context(|| status_path.to_owned())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {status_path}"))
}

/// Runs a `switchboard` admin verb with `--json` (60 s at most) and returns its output.
pub async fn admin(exe: &Path, db: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(exe)
            .arg("--db")
            .arg(db)
            .arg("--json")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .with_context(|| format!("`switchboard {}` did not finish in 60 s", args.join(" ")))?
    .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "`switchboard {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| {
        format!(
            "`switchboard {}` did not print JSON: {}",
            args.join(" "),
            text.trim()
        )
    })
}

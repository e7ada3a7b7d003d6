//! HTTPS without a proxy (`--tls-cert`, `--tls-key`): a chat widget on an `https://` site
//! may only call an `https://` server (browsers block mixed content), and SDKs pointed at
//! Brevo use `https://` too.
//!
//! The certificate chain and key are PEM files, read at start (a bad pair stops the server
//! with the reason) and read again whenever either file changes, so that a renewal
//! (certbot, an ACME client) takes effect without a restart. A pair that does not load,
//! such as a key written before its certificate, leaves the current one in use, and is
//! tried again at every check until it loads: a file rewritten in place may be read between
//! its truncation and its contents with both bearing the same modification time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Where the certificate and its key are, and how often to look for a new pair.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then the intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files' modification times are looked at.
    pub check_every: Duration,
}

/// A loaded TLS setup: what accepts connections, and what a reload updates.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
    reloads: Arc<tokio::sync::watch::Sender<Reloads>>,
    /// Asks [`Tls::watch`] to read the pair now (SIGHUP).
    nudge: Arc<tokio::sync::Notify>,
}

/// How the reloads of a [`Tls`] went so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloads {
    /// Pairs read again and put in use.
    pub loaded: u64,
    /// Attempts whose pair did not load (the current one stayed in use).
    pub failed: u64,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// The certificate handed to every handshake, replaced by a reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the pair: at least one certificate, a key, and the key belonging to
/// the first certificate.
fn load(files: &TlsFiles) -> anyhow::Result<CertifiedKey> {
    let (cert, key) = (files.cert.display(), files.key.display());
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the TLS certificate {cert} (PEM)"))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {cert}: it needs a PEM `BEGIN CERTIFICATE` block");
    }
    let der = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!("reading the TLS key {key}: it needs a PEM private key (PKCS#8, RSA or EC)")
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .with_context(|| format!("the TLS key in {key} is of a kind rustls cannot use"))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match()
        .with_context(|| format!("the TLS key {key} does not belong to the certificate {cert}"))?;
    Ok(pair)
}

/// When each file was last changed (`None` for a file that cannot be read just now).
fn stamps(files: &TlsFiles) -> [Option<SystemTime>; 2] {
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    [stamp(&files.cert), stamp(&files.key)]
}

impl Tls {
    /// Loads the pair; the error says which file is wrong and why.
    pub fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let current = Arc::new(Current(RwLock::new(Arc::new(load(&files)?))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // HTTP/1 only; a client that offers nothing else (h2 alone) is refused in the
        // handshake. One that offers no ALPN at all is served too.
        config.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        Ok(Self {
            files,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            reloads: Arc::new(tokio::sync::watch::Sender::new(Reloads::default())),
            nudge: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Has [`Tls::watch`] read the pair again now, changed or not (what SIGHUP does): for a
    /// renewal tool that reloads the service after writing the files, and for files
    /// rewritten with their old modification times.
    pub fn reload_now(&self) {
        self.nudge.notify_one();
    }

    /// The reloads so far, and every one after (to wait for one).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<Reloads> {
        self.reloads.subscribe()
    }

    /// What accepts TLS connections with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads the pair again whenever a file changes (and again at every check while the
    /// changed pair does not load), and whenever [`Tls::reload_now`] asks; runs until the
    /// task is aborted.
    pub async fn watch(self) {
        // The files' times when the pair in use was read, and when a pair last failed.
        let mut loaded = stamps(&self.files);
        let mut failed = None;
        let mut every = tokio::time::interval(self.files.check_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let asked = tokio::select! {
                _ = every.tick() => false,
                () = self.nudge.notified() => true,
            };
            let now = stamps(&self.files);
            if now == loaded && !asked {
                continue;
            }
            if asked {
                // Said every time: the operator asked and wants to see the outcome.
                failed = None;
            }
            match load(&self.files) {
                Ok(pair) => {
                    *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
                    loaded = now;
                    failed = None;
                    self.reloads.send_modify(|r| r.loaded += 1);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    // Said once per change of the files, tried at every check.
                    if failed != Some(now) {
                        failed = Some(now);
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "the TLS files changed but do not load; the current certificate \
                             stays in use"
                        );
                    }
                    self.reloads.send_modify(|r| r.failed += 1);
                }
            }
        }
    }
}

//! HTTPS without a proxy: the API, the widget's WebSocket and the head deadline over TLS; a
//! renewed certificate taken up without a restart, a broken one left unused; `serve` with
//! bad TLS files refused before it opens anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard_server::domain::{Clock, DomainConfig};
use switchboard_server::http::tls::{Reloads, Tls, TlsFiles};
use switchboard_server::ServeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

use crate::harness::{TestServer, KEY, WAIT};
use crate::widget::identity_hash;

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM).
pub(crate) fn self_signed() -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    (made.cert.pem(), made.key_pair.serialize_pem())
}

/// Writes `pair` to `NAME.crt` and `NAME.key` in `dir`; returns their paths.
pub(crate) fn write_pair(
    dir: &Path,
    name: &str,
    (cert, key): &(String, String),
) -> (PathBuf, PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// A client that trusts only `cert`, with no connection pool. A new one has no TLS session
/// to resume either, so its handshake sees the certificate the server has now.
pub(crate) fn trusting(cert: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .unwrap()
}

const CHECK_EVERY: Duration = Duration::from_millis(50);

/// A server over HTTPS with `pair` in `dir` (`server.crt`, `server.key`): the server, its
/// `https://` URL and its TLS setup (to follow its reloads).
async fn https_server(dir: &Path, pair: &(String, String)) -> (TestServer, String, Tls) {
    let (cert, key) = write_pair(dir, "server", pair);
    let tls = Tls::load(TlsFiles {
        cert,
        key,
        check_every: CHECK_EVERY,
    })
    .expect("load the pair");
    let options = ServeOptions {
        tls: Some(tls.clone()),
        header_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    let s = TestServer::start_full(DomainConfig::default(), Clock::System, options).await;
    let url = s.url.replace("http://", "https://");
    (s, url, tls)
}

/// Waits (within [`WAIT`]) until the reloads satisfy `done`.
async fn reloads_until(tls: &Tls, done: impl FnMut(&Reloads) -> bool) -> Reloads {
    let mut reloads = tls.reloads();
    let seen = tokio::time::timeout(WAIT, reloads.wait_for(done))
        .await
        .expect("the reload within the wait")
        .expect("the watcher runs");
    *seen
}

async fn health(client: &reqwest::Client, url: &str) -> Result<Value, reqwest::Error> {
    client
        .get(format!("{url}/health"))
        .send()
        .await?
        .json()
        .await
}

#[tokio::test]
async fn the_api_is_served_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let pair = self_signed();
    let (s, url, _) = https_server(dir.path(), &pair).await;
    let client = trusting(&pair.0);
    assert_eq!(health(&client, &url).await.unwrap()["status"], "ok");
    let agent = s.agent("Julia", Some("julia@example.com"), None, &[]).await;
    let r = client
        .request(Method::POST, format!("{url}/v3/conversations/messages"))
        .header("api-key", KEY)
        .json(&json!({"visitorId": "v1", "text": "over TLS", "agentId": agent}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let message: Value = r.json().await.unwrap();
    assert_eq!(message["text"], "over TLS");
    // Plain HTTP on the TLS port gets no answer: its bytes are not a TLS handshake.
    assert!(reqwest::get(format!("{}/health", s.url)).await.is_err());
    // A client that does not trust the certificate refuses the server.
    assert!(health(&trusting(&self_signed().0), &url).await.is_err());

    // The visitor's WebSocket over TLS: the replay of the agent's message, then ready.
    let widget = s.widget_id().await;
    let session: Value = client
        .post(format!("{url}/widget/v1/{widget}/session"))
        .json(&json!({"visitorId": "v1", "visitorHash": identity_hash(&s.identity_key().await, "v1")}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["token"].as_str().expect("token");
    let addr = s.url.strip_prefix("http://").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(first_der(&pair.0)))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let ws_url = format!("wss://{addr}/widget/v1/{widget}/ws?cursor=0&token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async(ws_url, stream)
        .await
        .expect("WebSocket upgrade over TLS");
    let mut events = Vec::new();
    while events.last().map(String::as_str) != Some("ready") {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait")
            .expect("the socket is open")
            .expect("a frame");
        let frame: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        events.push(frame["event"].as_str().unwrap().to_owned());
        if events.len() == 1 {
            assert_eq!(frame["message"]["id"], message["id"]);
        }
    }
    assert_eq!(events, ["messageCreated", "ready"]);
}

/// The DER bytes of the first PEM block of `pem`.
fn first_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_renewed_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = self_signed();
    let (_s, url, tls) = https_server(dir.path(), &first).await;
    assert!(health(&trusting(&first.0), &url).await.is_ok());

    // A renewal: new files in place. The first pair that loads after it is the new one (the
    // certificate alone, beside the old key, does not), and new connections get it.
    let renewed = self_signed();
    let (cert, key) = write_pair(dir.path(), "server", &renewed);
    let before = reloads_until(&tls, |r| r.loaded >= 1).await;
    assert!(health(&trusting(&renewed.0), &url).await.is_ok());
    assert!(health(&trusting(&first.0), &url).await.is_err());

    // A certificate whose key is not (yet) the one beside it is not taken up: once it has
    // been tried, the renewed pair is still in use.
    let other = self_signed();
    std::fs::write(&cert, &other.0).unwrap();
    let tried = reloads_until(&tls, |r| r.failed > before.failed).await;
    assert_eq!(tried.loaded, before.loaded);
    assert!(health(&trusting(&renewed.0), &url).await.is_ok());
    assert!(health(&trusting(&other.0), &url).await.is_err());
    // Once its key arrives too, the pair is taken up, also when the write does not show in
    // the key file's time (a rewrite in place within one tick of the file system's clock):
    // a pair that failed is tried again at every check.
    let unchanged = std::fs::metadata(&key).unwrap().modified().unwrap();
    std::fs::write(&key, &other.1).unwrap();
    let file = std::fs::File::options().write(true).open(&key).unwrap();
    file.set_modified(unchanged).unwrap();
    reloads_until(&tls, |r| r.loaded > before.loaded).await;
    assert!(health(&trusting(&other.0), &url).await.is_ok());
    assert!(health(&trusting(&renewed.0), &url).await.is_err());
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_handshake_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _url, _) = https_server(dir.path(), &self_signed()).await;
    let addr = s.url.strip_prefix("http://").unwrap();
    for sent in [&b""[..], b"\x16\x03\x01\x00\xc8\x01"] {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(sent).await.unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
            .await
            .expect("closed within the wait")
            .ok();
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(400) && after < Duration::from_secs(5),
            "closed after {after:?} with a head deadline of 500 ms ({} bytes sent)",
            sent.len()
        );
    }
}

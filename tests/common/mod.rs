//! Shared harness for the in-process integration tests: the real gateway (built through
//! `server::build`, exactly as `main` does) on a free loopback port, in front of wiremock fakes
//! of the OP and the homeserver, with a clock the test can move forward.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use matrix_oidc_gateway::clock::OffsetClock;
use matrix_oidc_gateway::{config, server};
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

mod ports;
pub use ports::free_port;

struct Stop(tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for Stop {
    async fn recv(&self) -> ShutdownSignal {
        if let Some(rx) = self.0.lock().await.take() {
            let _ = rx.await;
        }
        ShutdownSignal::FastShutdown
    }
}

/// A running gateway.
pub struct TestGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin: SocketAddr,
    /// Its clock.
    pub clock: OffsetClock,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl TestGateway {
    /// `http://127.0.0.1:<port>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The admin listener's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one series (`name{labels}` exactly as exposed), if exposed.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    }

    /// Stops the gateway and returns once its server has shut down (listeners closed, services
    /// and store dropped): what a restart in a test waits for.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            tokio::time::timeout(Duration::from_secs(30), stopped)
                .await
                .expect("the gateway did not shut down within 30 s")
                .expect("the gateway's server thread ended without reporting");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The OP and homeserver fakes plus the settings the gateway needs to use them.
pub struct Fakes {
    /// Fake OP (introspection at `/introspect`, discovery at the well-known path).
    pub op: MockServer,
    /// Fake homeserver that echoes what it received.
    pub hs: MockServer,
    /// Where the gateway keeps its state.
    pub state: tempfile::TempDir,
}

impl Fakes {
    /// Starts both fakes; the homeserver echoes every request.
    pub async fn start() -> Self {
        let op = MockServer::start().await;
        let hs = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(Echo)
            .mount(&hs)
            .await;
        Self {
            op,
            hs,
            state: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A configuration pointing at the fakes; `extra` is appended verbatim (TOML).
    pub fn config(&self, extra: &str) -> String {
        self.config_hs("", extra)
    }

    /// Like [`Fakes::config`], with `hs_extra` added to the `[homeserver]` table.
    pub fn config_hs(&self, hs_extra: &str, extra: &str) -> String {
        format!(
            r#"
[listen]
public = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"

[homeserver]
url = "{hs}"
server_name = "example.org"
{hs_extra}

[store]
path = "{state}/state.sqlite3"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"

[[issuers]]
issuer = "{op}/"
introspection_endpoint = "{op}/introspect"
client_id = "gateway"
client_secret = "gateway-secret"
timeout = "2s"
{extra}
"#,
            port = free_port(),
            admin = free_port(),
            hs = self.hs.uri(),
            op = self.op.uri(),
            state = self.state.path().display(),
        )
    }

    /// Answers introspection of `token` with `answer`, expecting exactly `times` calls.
    pub async fn introspection(&self, token: &str, answer: Value, times: u64) {
        Mock::given(method("POST"))
            .and(path("/introspect"))
            .and(wiremock::matchers::body_string_contains(format!(
                "token={token}&"
            )))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .expect(times)
            .mount(&self.op)
            .await;
    }
}

/// An active introspection answer for `username` with `scope`, valid for an hour.
pub fn active(username: &str, scope: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "active": true,
        "sub": format!("sub-{username}"),
        "username": username,
        "scope": scope,
        "token_type": "access_token",
        "client_id": "client",
        "exp": now + 3600,
        "iat": now,
    })
}

/// The full-API scope with a device.
/// A key file of `tests/fixtures/keys/`.
pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

pub fn full_scope(device: &str) -> String {
    format!("urn:matrix:client:api:* urn:matrix:client:device:{device}")
}

/// Echoes method, URL and headers as JSON.
pub struct Echo;

impl Respond for Echo {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let mut headers = serde_json::Map::new();
        for (name, value) in req.headers.iter() {
            let entry = headers
                .entry(name.as_str().to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(v) = entry {
                v.push(Value::String(
                    value.to_str().unwrap_or("<binary>").to_owned(),
                ));
            }
        }
        ResponseTemplate::new(200).set_body_json(json!({
            "echo": true,
            "method": req.method.as_str(),
            "path": req.url.path(),
            "query": req.url.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(&req.body),
        }))
    }
}

/// Starts the gateway with `toml` on a fresh clock.
pub async fn spawn(toml: &str) -> TestGateway {
    let loaded = config::load_str(toml).expect("test config is valid");
    let addr = loaded.config.listen.public;
    let admin = loaded.config.listen.admin;
    let clock = OffsetClock::new();
    let srv = server::build(loaded.config, Arc::new(clock.clone())).expect("server builds");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        srv.run(RunArgs {
            shutdown_signal: Box::new(Stop(tokio::sync::Mutex::new(Some(rx)))),
        });
        let _ = stopped_tx.send(());
    });
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return TestGateway {
                addr,
                admin,
                clock,
                stop: Some(tx),
                stopped: Some(stopped),
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway did not start listening on {addr}");
}

/// A client that never follows redirects and never pools across tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Sends raw bytes on one connection and returns everything read until the peer stops sending
/// for a moment (enough for one or several complete responses).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends each request on one connection after the previous answer arrived; returns the answers.
pub async fn raw_sequence(addr: SocketAddr, requests: &[&[u8]]) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut answers = Vec::new();
    for req in requests {
        if s.write_all(req).await.is_err() {
            break;
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let head_only = req.starts_with(b"HEAD ");
        while !response_complete(&out, head_only) {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            }
        }
        if out.is_empty() {
            break;
        }
        answers.push(String::from_utf8_lossy(&out).into_owned());
    }
    answers
}

/// Whether `out` holds a whole response with a `Content-Length` body.
fn response_complete(out: &[u8], head_only: bool) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    if head_only {
        return true;
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}

/// How many introspection requests the fake OP received.
pub async fn introspections(op: &MockServer) -> usize {
    op.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == "/introspect")
        .count()
}

/// Asserts a Matrix JSON error and returns the response headers.
pub async fn assert_matrix_error(
    resp: reqwest::Response,
    status: u16,
    errcode: &str,
) -> (reqwest::header::HeaderMap, Value) {
    assert_eq!(resp.status().as_u16(), status, "status");
    let headers = resp.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let body: Value = resp.json().await.expect("JSON body");
    assert_eq!(body["errcode"], errcode, "body {body}");
    assert!(
        body["error"].as_str().unwrap().contains("(gateway)"),
        "body {body}"
    );
    (headers, body)
}

/// `cfg` on fresh listener ports (a restarted gateway next to the stopped one).
pub fn on_fresh_ports(cfg: &str) -> String {
    cfg.lines()
        .map(|l| {
            if l.starts_with("public = ") {
                format!("public = \"127.0.0.1:{}\"", free_port())
            } else if l.starts_with("admin = ") {
                format!("admin = \"127.0.0.1:{}\"", free_port())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The OP's discovery document on `op` (authorization, token, introspection and JWKS
/// endpoints under its URI).
pub async fn mount_op_discovery(op: &MockServer) {
    let uri = op.uri();
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{uri}/"),
            "authorization_endpoint": format!("{uri}/authorize"),
            "token_endpoint": format!("{uri}/token"),
            "introspection_endpoint": format!("{uri}/introspect"),
            "jwks_uri": format!("{uri}/jwks"),
        })))
        .mount(op)
        .await;
}

/// The homeserver registers alice and logs her device ALICEDEV01 in with token `alice-upstream`.
pub async fn mount_alice_provisioning(hs: &MockServer) {
    for (p, answer) in [
        ("/_matrix/client/v3/register", json!({})),
        (
            "/_matrix/client/v3/login",
            json!({"access_token": "alice-upstream", "device_id": "ALICEDEV01"}),
        ),
    ] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .with_priority(1)
            .mount(hs)
            .await;
    }
}

/// Collects what the gateway logs (a writer for `logging::init_with_writer`).
#[derive(Clone, Default)]
pub struct LogSink(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

//! Real peers for the end-to-end suites: the `oidc-provider` OP (Node) from `tests/e2e/op`, and
//! the built gateway binary. A missing peer is a test **failure** with the command that installs
//! it, never a skip.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

pub mod homeserver;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The gateway binary under test: this build's, or `E2E_GATEWAY_BIN` (to replay a suite against
/// another build, e.g. the one before a security fix, and watch the attack tests fail there).
pub fn gateway_bin() -> PathBuf {
    std::env::var_os("E2E_GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_matrix-oidc-gateway")))
}

// The same file as `common`'s: suites that use both helpers load it twice, harmlessly.
#[allow(clippy::duplicate_mod)]
#[path = "../common/ports.rs"]
mod ports;
pub use ports::free_port;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn op_dir() -> PathBuf {
    repo().join("tests/e2e/op")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {port} within 30 s");
}

/// A running oidc-provider.
pub struct Op {
    /// The issuer URL (no trailing slash).
    pub issuer: String,
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Tokens minted by the OP.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The access token.
    pub access_token: String,
    /// The refresh token.
    pub refresh_token: Option<String>,
    /// The granted scope.
    pub scope: String,
}

impl Op {
    /// Starts the OP on a free port.
    pub fn start() -> Op {
        Self::start_with(&[])
    }

    /// Starts the OP with extra arguments (e.g. `--bcl-uri URL`).
    pub fn start_with(extra: &[&str]) -> Op {
        let dir = op_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed in {}: run scripts/test.sh (or `npm ci` there)",
            dir.display()
        );
        // Node 20 sometimes never gets to listening when several OPs start at once (seen about
        // once in 12 concurrent starts: the process sleeps on a futex, prints nothing); such
        // a start is abandoned after 15 s and the OP started again, at most three times.
        let mut attempt = 0;
        let (child, read, mut reader) = loop {
            attempt += 1;
            let port = free_port();
            let mut child = Command::new("node")
                .arg("op.mjs")
                .args(["--port", &port.to_string()])
                .args(extra)
                .current_dir(&dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("`node` must be installed (Node 20+) for the end-to-end tests");
            let stdout = child.stdout.take().expect("stdout");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                let read = reader.read_line(&mut line).map(|_| line);
                let _ = tx.send((read, reader));
            });
            match rx.recv_timeout(std::time::Duration::from_secs(15)) {
                Ok((read, reader)) => break (child, read, reader),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        attempt < 3,
                        "the OP did not print READY within 15 s, three times (node op.mjs {extra:?})"
                    );
                    eprintln!("the OP did not start within 15 s; starting it again");
                }
            }
        };
        let line = read.expect("OP output");
        assert!(line.starts_with("READY "), "the OP did not start: {line:?}");
        // Keep draining (a closed pipe would kill the OP on its next write), and keep the lines.
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink_lines = lines.clone();
        std::thread::spawn(move || {
            let mut l = String::new();
            while reader.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
                sink_lines.lock().unwrap().push(l.trim_end().to_owned());
                l.clear();
            }
        });
        Op {
            issuer: line.trim_start_matches("READY ").trim().to_owned(),
            child,
            lines,
        }
    }

    /// Ends every grant of `account` at the OP without telling anyone (no back-channel
    /// logout); the number ended.
    pub async fn end_grants(&self, account: &str) -> u64 {
        let r = reqwest::Client::new()
            .post(format!("{}/test/end-grants?account={account}", self.issuer))
            .send()
            .await
            .expect("OP");
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.expect("JSON");
        v["ended"].as_u64().expect("ended")
    }

    /// Mints tokens through the real authorization-code + PKCE flow.
    pub fn mint_with(&self, user: &str, scope: &str, resource: &str, client: &str) -> Minted {
        let out = Command::new("node")
            .arg("mint.mjs")
            .args(["--issuer", &self.issuer, "--user", user, "--scope", scope])
            .args(["--resource", resource, "--client", client])
            .current_dir(op_dir())
            .output()
            .expect("node");
        assert!(
            out.status.success(),
            "minting failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("mint output");
        Minted {
            access_token: v["access_token"].as_str().expect("access_token").to_owned(),
            refresh_token: v["refresh_token"].as_str().map(str::to_owned),
            scope: v["scope"].as_str().unwrap_or_default().to_owned(),
        }
    }

    /// Returns once every line the OP printed before this call has been read: it sends the OP
    /// a request of its own (an unauthenticated revocation, which the OP refuses but logs) and
    /// waits for that line. The OP's output is ordered, so counting `INTROSPECTION` lines is
    /// then exact.
    pub async fn settle(&self) {
        let revocations = || {
            self.output()
                .iter()
                .filter(|l| l.starts_with("REVOCATION "))
                .count()
        };
        let before = revocations();
        let _ = reqwest::Client::new()
            .post(format!("{}/token/revocation", self.issuer))
            .form(&[("token", "settle-marker")])
            .send()
            .await
            .expect("the OP answers");
        let deadline = Instant::now() + Duration::from_secs(10);
        while revocations() == before {
            assert!(Instant::now() < deadline, "the OP's output stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the OP printed after `READY` (e.g. `REVOCATION {...}` lines).
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Mints an opaque token and saves the browser session to `jar` (for [`Op::logout`]).
    pub fn mint_in_session(&self, user: &str, scope: &str, jar: &Path) -> Minted {
        let out = Command::new("node")
            .arg("mint.mjs")
            .args(["--issuer", &self.issuer, "--user", user, "--scope", scope])
            .arg("--jar")
            .arg(jar)
            .current_dir(op_dir())
            .output()
            .expect("node");
        assert!(
            out.status.success(),
            "minting failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("mint output");
        Minted {
            access_token: v["access_token"].as_str().expect("access_token").to_owned(),
            refresh_token: v["refresh_token"].as_str().map(str::to_owned),
            scope: v["scope"].as_str().unwrap_or_default().to_owned(),
        }
    }

    /// RP-initiated logout in the browser session saved in `jar`; returns once the OP answered
    /// (it posts the back-channel logout tokens before it does).
    pub fn logout(&self, jar: &Path) {
        let out = Command::new("node")
            .arg("logout.mjs")
            .args(["--issuer", &self.issuer])
            .arg("--jar")
            .arg(jar)
            .current_dir(op_dir())
            .output()
            .expect("node");
        assert!(
            out.status.success(),
            "logout failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Mints an opaque token for the default client.
    pub fn mint(&self, user: &str, scope: &str) -> Minted {
        self.mint_with(user, scope, "urn:matrix:homeserver", "e2e-client")
    }

    /// Revokes a token at the OP (RFC 7009), as the client would.
    pub async fn revoke(&self, token: &str, hint: &str) {
        let resp = reqwest::Client::new()
            .post(format!("{}/token/revocation", self.issuer))
            .form(&[
                ("token", token),
                ("token_type_hint", hint),
                ("client_id", "e2e-client"),
            ])
            .send()
            .await
            .expect("revocation request");
        assert_eq!(resp.status(), 200, "revocation: {:?}", resp.text().await);
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The built gateway binary running with a config file.
pub struct GatewayProcess {
    /// Its public address.
    pub base: String,
    /// Its admin listener.
    pub admin: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Writes `toml` (with `{port}` replaced) and starts the binary.
    pub fn start(toml_template: &str) -> GatewayProcess {
        Self::start_on(free_port(), toml_template)
    }

    /// Like [`GatewayProcess::start`] on a chosen public port.
    pub fn start_on(port: u16, toml_template: &str) -> GatewayProcess {
        Self::start_with_env(port, toml_template, &[])
    }

    /// Like [`GatewayProcess::start_on`] with extra environment variables.
    pub fn start_with_env(port: u16, toml_template: &str, env: &[(&str, &str)]) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("gateway.toml");
        let admin_port = free_port();
        let text = toml_template
            .replace("{port}", &port.to_string())
            .replace("{admin_port}", &admin_port.to_string())
            .replace("{state_dir}", &dir.path().display().to_string());
        std::fs::write(&cfg, text).expect("write config");
        let log = dir.path().join("gateway.log");
        let mut child = Command::new(gateway_bin())
            .arg("--config")
            .arg(&cfg)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("gateway binary");
        wait_for_port(port, "the gateway", &mut child);
        GatewayProcess {
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            child,
            log,
            _dir: dir,
        }
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the gateway logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("gateway.toml")
    }

    /// The directory `{state_dir}` stands for in the config template.
    pub fn state_dir(&self) -> &Path {
        self._dir.path()
    }

    /// The gateway's state database (`{state_dir}/state.sqlite3` in the config template).
    pub fn state_db(&self) -> PathBuf {
        self._dir.path().join("state.sqlite3")
    }

    /// Rewrites the configuration file (takes effect at the next [`GatewayProcess::restart`]).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let cfg = self._dir.path().join("gateway.toml");
        let text = std::fs::read_to_string(&cfg).expect("config");
        std::fs::write(&cfg, edit(text)).expect("config");
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends the process a signal (`kill -<signal> <pid>`, e.g. `"TERM"`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `cap` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, cap: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + cap;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (state on disk is kept for a restart with [`GatewayProcess::restart`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the binary again with the same configuration, state directory and port.
    pub fn restart(&mut self) {
        self.stop();
        let port: u16 = self
            .base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let cfg = self._dir.path().join("gateway.toml");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut child = Command::new(gateway_bin())
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("gateway binary");
        wait_for_port(port, "the gateway", &mut child);
        self.child = child;
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(40).collect();
            eprintln!("--- gateway log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Redis server (Debian's `redis-server`) on loopback.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    // Its working directory: replication snapshots land here, not in the checkout.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a replica of the server on `master_port`.
    pub fn start_replica_of(master_port: u16) -> RedisServer {
        Self::start_with(&["--replicaof", "127.0.0.1", &master_port.to_string()])
    }

    fn start_with(extra: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.restart();
        r
    }

    /// Runs `redis-cli` against it; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (no persistence: its data is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (scripts/setup.sh installs Debian's redis-server)",
            );
        wait_for_port(self.port, "redis-server", &mut child);
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p <port> --raw <args>` (Debian's redis-tools, installed with redis-server).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw"])
        .args(args)
        .output()
        .expect("redis-cli (Debian's redis-tools, installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A real Redis Sentinel (`redis-server --sentinel`, the binary Debian's redis-sentinel package
/// runs) watching one master with a quorum of one and a one-second down-after time.
pub struct Sentinel {
    /// Its port.
    pub port: u16,
    /// The monitored master's name.
    pub service: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts one watching the master on `master_port` as `service`.
    pub fn start(master_port: u16, service: &str) -> Sentinel {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {service} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 1\n",
                dir = dir.path().display()
            ),
        )
        .expect("sentinel.conf");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server runs as a sentinel too)");
        wait_for_port(port, "redis sentinel", &mut child);
        Sentinel {
            port,
            service: service.to_owned(),
            child,
            _dir: dir,
        }
    }

    /// `redis+sentinel`-style URL of this sentinel (`redis://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port of the master the sentinel currently names.
    pub fn master_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", &self.service],
        );
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `STEP` lines of an SDK client's output, or a panic with everything it printed.
pub fn steps(
    which: &str,
    out: &std::process::Output,
    gw: &GatewayProcess,
) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "OK"),
        "{which} flow failed ({}):\n{stdout}\n{stderr}\ngateway log:\n{}",
        out.status,
        gw.logs()
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("STEP "))
        .map(|l| {
            let (name, json) = l.split_once(' ').expect("STEP name json");
            let mut v: serde_json::Value = serde_json::from_str(json).expect("step json");
            v["step"] = name.into();
            v
        })
        .collect()
}

/// The step called `name` (a panic naming the steps when there is none).
pub fn step<'a>(steps: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no `{name}` step in {steps:?}"))
}

//! Real homeservers for the end-to-end suites, on loopback with sqlite: Synapse (PyPI, in the
//! venv `scripts/peers/install-synapse.sh` caches) and Dendrite (built from the Go module proxy
//! by `scripts/peers/install-dendrite.sh`). Each registers the gateway as an application service
//! with an exclusive namespace over every local user.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{free_port, wait_for_port};

/// The AS token the homeservers accept from the gateway.
pub const AS_TOKEN: &str = "e2e-as-token-not-a-secret-0123456789";

/// Which homeserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsKind {
    /// Synapse.
    Synapse,
    /// Dendrite.
    Dendrite,
}

impl HsKind {
    /// The `homeserver.kind` config value.
    pub fn config_name(self) -> &'static str {
        match self {
            HsKind::Synapse => "synapse",
            HsKind::Dendrite => "dendrite",
        }
    }
}

/// A running homeserver.
pub struct Homeserver {
    /// Which one.
    pub kind: HsKind,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn peer_cache() -> PathBuf {
    std::env::var_os("PEER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/matrix-oidc-gateway"))
}

fn appservice_yaml() -> String {
    format!(
        "id: matrix-oidc-gateway\nurl: null\nas_token: {AS_TOKEN}\nhs_token: e2e-hs-token-unused\n\
         sender_localpart: oidc-gateway\nrate_limited: false\nnamespaces:\n  users:\n    - exclusive: true\n      \
         regex: '@.*:localhost'\n  aliases: []\n  rooms: []\n"
    )
}

impl Homeserver {
    /// Starts a fresh homeserver of `kind`.
    pub fn start(kind: HsKind) -> Homeserver {
        match kind {
            HsKind::Synapse => Self::synapse(),
            HsKind::Dendrite => Self::dendrite(),
        }
    }

    fn synapse() -> Homeserver {
        let python = peer_cache().join("synapse-venv/bin/python");
        assert!(
            python.exists(),
            "Synapse is not installed at {}: run scripts/peers/install-synapse.sh (scripts/test.sh does)",
            python.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let port = free_port();
        let log = d.join("homeserver.log");
        std::fs::write(d.join("appservice.yaml"), appservice_yaml()).unwrap();
        std::fs::write(
            d.join("log.yaml"),
            format!(
                "version: 1\nformatters:\n  precise:\n    format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'\n\
                 handlers:\n  file:\n    class: logging.FileHandler\n    filename: {}\n    formatter: precise\n\
                 root:\n  level: INFO\n  handlers: [file]\ndisable_existing_loggers: false\n",
                log.display()
            ),
        )
        .unwrap();
        let limits = "{per_second: 10000, burst_count: 10000}";
        let config = format!(
            r#"server_name: localhost
pid_file: {d}/homeserver.pid
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: true
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
media_store_path: {d}/media
signing_key_path: {d}/signing.key
log_config: {d}/log.yaml
report_stats: false
enable_registration: false
password_config:
  enabled: false
trusted_key_servers: []
suppress_key_server_warning: true
macaroon_secret_key: e2e-macaroon-secret
form_secret: e2e-form-secret
app_service_config_files: [{d}/appservice.yaml]
rc_message: {limits}
rc_registration: {limits}
rc_login:
  address: {limits}
  account: {limits}
  failed_attempts: {limits}
rc_joins:
  local: {limits}
  remote: {limits}
rc_invites:
  per_room: {limits}
  per_user: {limits}
  per_issuer: {limits}
rc_key_requests: {limits}
rc_3pid_validation: {limits}
rc_admin_redaction: {limits}
rc_room_creation: {limits}
rc_presence:
  per_user: {limits}
"#,
            d = d.display()
        );
        let cfg = d.join("homeserver.yaml");
        std::fs::write(&cfg, config).unwrap();
        let keys = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&cfg)
            .arg("--generate-keys")
            .output()
            .expect("synapse --generate-keys");
        assert!(
            keys.status.success(),
            "synapse --generate-keys: {}",
            String::from_utf8_lossy(&keys.stderr)
        );
        let mut child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .expect("start synapse");
        wait_for_port(port, "Synapse", &mut child);
        Homeserver {
            kind: HsKind::Synapse,
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
            _dir: dir,
        }
    }

    fn dendrite() -> Homeserver {
        let bin = peer_cache().join("dendrite-v0.13.8/bin");
        assert!(
            bin.join("dendrite").exists(),
            "Dendrite is not built at {}: run scripts/peers/install-dendrite.sh (scripts/test.sh does)",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let port = free_port();
        let log = d.join("dendrite.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peers/dendrite-config.sh");
        let generated = Command::new("bash")
            .arg(script)
            .arg(d)
            .arg(AS_TOKEN)
            .output()
            .expect("dendrite-config.sh");
        assert!(
            generated.status.success(),
            "dendrite-config.sh: {}",
            String::from_utf8_lossy(&generated.stderr)
        );
        let mut child = Command::new(bin.join("dendrite"))
            .arg("-config")
            .arg(d.join("dendrite.yaml"))
            .args(["-http-bind-address", &format!("127.0.0.1:{port}")])
            .current_dir(d)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dendrite");
        wait_for_port(port, "Dendrite", &mut child);
        Homeserver {
            kind: HsKind::Dendrite,
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
            _dir: dir,
        }
    }

    /// The device IDs the homeserver lists for `user`, sorted (asked directly, with the AS
    /// token).
    pub async fn device_ids(&self, user: &str) -> Vec<String> {
        let user: String = form_urlencoded::byte_serialize(user.as_bytes()).collect();
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!(
                "{}/_matrix/client/v3/devices?user_id={user}",
                self.url
            ))
            .bearer_auth(AS_TOKEN)
            .send()
            .await
            .expect("the homeserver")
            .json()
            .await
            .unwrap_or_default();
        let mut ids: Vec<String> = v["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["device_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }

    /// Asserts that `stored`, a device token as the gateway keeps it, is sealed and is refused
    /// by the homeserver as a credential.
    pub async fn assert_sealed_token_is_no_credential(&self, stored: &str) {
        assert!(
            stored.starts_with("mog1:"),
            "a device token is stored in the clear"
        );
        let r = reqwest::Client::new()
            .get(format!("{}/_matrix/client/v3/account/whoami", self.url))
            .bearer_auth(stored)
            .send()
            .await
            .expect("the homeserver");
        assert_eq!(
            r.status(),
            401,
            "the stored form works as a homeserver token"
        );
    }

    /// Who uploaded `media_id`, as the homeserver recorded it (read from its sqlite database).
    pub fn media_owner(&self, media_id: &str) -> Option<String> {
        let (db, sql) = match self.kind {
            HsKind::Synapse => (
                "homeserver.db",
                "SELECT user_id FROM local_media_repository WHERE media_id = ?1",
            ),
            HsKind::Dendrite => (
                "dendrite_mediaapi.db",
                "SELECT user_id FROM mediaapi_media_repository WHERE media_id = ?1",
            ),
        };
        let conn = rusqlite::Connection::open_with_flags(
            self._dir.path().join(db),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("the homeserver's database");
        conn.query_row(sql, [media_id], |r| r.get(0)).ok()
    }

    /// An access token of a fresh homeserver admin account, for the gateway's
    /// `homeserver.admin_token`. Dendrite only: created with its shared-secret registration
    /// (`/_synapse/admin/v1/register`, HMAC-SHA1 over nonce, user, password and "admin"), the
    /// secret `dendrite-config.sh` wrote.
    pub async fn admin_token(&self) -> String {
        assert_eq!(self.kind, HsKind::Dendrite, "admin_token: Dendrite only");
        let secret = std::fs::read(self._dir.path().join("registration_shared_secret"))
            .expect("dendrite-config.sh wrote the shared secret");
        let http = reqwest::Client::new();
        let url = format!("{}/_synapse/admin/v1/register", self.url);
        let nonce: serde_json::Value = http
            .get(&url)
            .send()
            .await
            .expect("the homeserver")
            .json()
            .await
            .expect("a nonce");
        let nonce = nonce["nonce"].as_str().expect("a nonce").to_owned();
        let (user, password) = ("gateway-admin", "e2e-admin-password-0123456789");
        let key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &secret);
        let mac = aws_lc_rs::hmac::sign(
            &key,
            format!("{nonce}\0{user}\0{password}\0admin").as_bytes(),
        );
        let r = http
            .post(&url)
            .json(&serde_json::json!({
                "nonce": nonce, "username": user, "password": password, "admin": true,
                "mac": hex::encode(mac.as_ref()),
            }))
            .send()
            .await
            .expect("the homeserver");
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "shared-secret registration: {status} {body}"
        );
        body["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned()
    }

    /// `user`'s cross-signing master key at the homeserver (asked directly with the AS token),
    /// the unpadded base64 of its first key.
    pub async fn master_key(&self, user: &str) -> Option<String> {
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/_matrix/client/v3/keys/query", self.url))
            .bearer_auth(AS_TOKEN)
            .json(&serde_json::json!({"device_keys": {user: []}}))
            .send()
            .await
            .expect("the homeserver")
            .json()
            .await
            .ok()?;
        let keys = v["master_keys"][user]["keys"].as_object()?;
        keys.values().next()?.as_str().map(str::to_owned)
    }

    /// The homeserver's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `method path` requests the homeserver processed (from its request log);
    /// `path` is matched as a prefix of the logged target.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        let log = self.log();
        match self.kind {
            HsKind::Synapse => log.matches(&format!("\"{method} {path}")).count(),
            HsKind::Dendrite => {
                let mut ids = std::collections::BTreeSet::new();
                for line in log.lines() {
                    if line.contains(&format!("req.method={method} "))
                        && line.contains(&format!("req.path={path}"))
                    {
                        if let Some(id) = line
                            .split("req.id=")
                            .nth(1)
                            .and_then(|s| s.split_whitespace().next())
                        {
                            ids.insert(id.to_owned());
                        }
                    }
                }
                ids.len()
            }
        }
    }
}

impl Drop for Homeserver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.log();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            eprintln!("--- {:?} log (last 30 lines) ---", self.kind);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

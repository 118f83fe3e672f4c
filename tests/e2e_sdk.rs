//! The flagship clients' own SDKs sign in through the gateway, against real homeservers.
//!
//! matrix-js-sdk (the SDK behind Element Web, npm, `tests/e2e/sdk-js/flow.mjs`): server
//! discovery from the server name, the OAuth 2.0 metadata, dynamic client registration at the
//! real `oidc-provider`, the authorization-code grant with PKCE, whoami on the scoped device,
//! two users messaging, an expired access token refreshed by the SDK, and Element Web's
//! sign-out (both tokens revoked at the advertised endpoint), after which the old token is
//! refused and the homeserver no longer has the device.
//!
//! matrix-rust-sdk (Element X's SDK, crates.io `matrix-sdk` 0.19, the client in
//! `tests/e2e/sdk-rust`, built once by `scripts/peers/install-sdk-client.sh`): the same sign-in,
//! then end-to-end encryption (device and one-time keys, a message the other user's SDK
//! decrypts), cross-signing (the SDK's bootstrap, then Element X's identity reset, refused
//! until approved through the gateway's `m.oauth` stage, after which the SDK's retry lands at
//! the homeserver; on Dendrite the gateway answers its password stage with an admin token),
//! refresh, and the SDK's own logout (`OAuth::logout()`, which insists on an https revocation
//! endpoint: the suite's gateway has an HTTPS listener and names it as the base URL).
//!
//! Both run against Dendrite and Synapse, each in its default binding mode.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::path::PathBuf;
use std::process::Command;

use sha2::{Digest, Sha256};

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{free_port, step, steps, GatewayProcess, Op};

const STORE_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// Access tokens of dynamically registered clients live this long at the test OP.
const ACCESS_TTL_SECS: u32 = 4;
const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

fn sdk_js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/sdk-js")
}

/// The OP, a homeserver of `kind` in its default binding, and the gateway, whose discovery
/// documents name the gateway itself as the homeserver's base URL.
/// The gateway's HTTPS listener: its port and a self-signed certificate for 127.0.0.1, which
/// the SDK clients trust as a root.
struct Tls {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tls {
    fn new() -> Tls {
        let dir = tempfile::tempdir().expect("tempdir");
        let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .expect("a certificate");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, issued.cert.pem()).unwrap();
        std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
        Tls {
            port: free_port(),
            cert,
            key,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// The gateway has an HTTPS listener, and its discovery documents name it as the homeserver's
/// base URL: matrix-rust-sdk's own logout insists on an https revocation endpoint. On
/// Dendrite, with an admin token: the gateway answers Dendrite's password stage of
/// cross-signing uploads.
async fn stack(kind: HsKind) -> (Op, Homeserver, GatewayProcess, Tls) {
    let tls = Tls::new();
    let op = Op::start_with(&[
        "--dcr-access-ttl",
        &ACCESS_TTL_SECS.to_string(),
        "--tls-cert",
        &tls.cert.display().to_string(),
        "--tls-key",
        &tls.key.display().to_string(),
    ]);
    let hs = Homeserver::start(kind);
    let admin_token = match kind {
        HsKind::Dendrite => format!("admin_token = \"{}\"", hs.admin_token().await),
        HsKind::Synapse => String::new(),
    };
    let port = free_port();
    // The gateway trusts the suite's certificate for the OP through rustls' SSL_CERT_FILE.
    let cert = tls.cert.display().to_string();
    let gw = GatewayProcess::start_with_env(
        port,
        &format!(
            r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"
public_tls = "127.0.0.1:{tls_port}"
tls_cert_file = "{tls_cert}"
tls_key_file = "{tls_key}"

[homeserver]
url = "{hs}"
server_name = "localhost"
kind = "{kind}"
as_token = "{AS_TOKEN}"
{admin_token}

[store]
path = "{{state_dir}}/state.sqlite3"
encryption_key = "{STORE_KEY}"

[discovery]
public_base_url = "{tls_base}"
# The OP's account page (the e2e OP has none of its own): where a cross-signing reset is approved.
account_management_uri = "{issuer}/account"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[admin]
token = "{ADMIN_TOKEN}"

[log]
level = "info"
"#,
            hs = hs.url,
            tls_port = tls.port,
            tls_cert = tls.cert.display(),
            tls_key = tls.key.display(),
            tls_base = tls.url(""),
            kind = kind.config_name(),
            issuer = op.issuer,
        ),
        &[("SSL_CERT_FILE", cert.as_str())],
    );
    (op, hs, gw, tls)
}

/// Runs the matrix-js-sdk flow; its `STEP` lines.
fn js_flow(gw: &GatewayProcess, tls: &Tls) -> Vec<serde_json::Value> {
    let dir = sdk_js_dir();
    assert!(
        dir.join("node_modules/matrix-js-sdk").is_dir(),
        "matrix-js-sdk is not installed in {}: run scripts/setup.sh (scripts/test.sh does)",
        dir.display()
    );
    let out = Command::new("node")
        .arg("flow.mjs")
        .args(["--server-name", "localhost", "--gateway", &gw.url("")])
        .args(["--users", "alice,bob"])
        .args(["--expires-in", &ACCESS_TTL_SECS.to_string()])
        .env("NODE_EXTRA_CA_CERTS", &tls.cert)
        .current_dir(&dir)
        .output()
        .expect("`node` must be installed (Node 20+) for the end-to-end tests");
    steps("matrix-js-sdk", &out, gw)
}

/// The matrix-rust-sdk client built by `scripts/peers/install-sdk-client.sh` for the current
/// sources (the same hash the script computes).
fn sdk_rust_bin() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/sdk-rust");
    let mut h = Sha256::new();
    for f in ["Cargo.toml", "Cargo.lock", "src/main.rs"] {
        h.update(std::fs::read(dir.join(f)).expect("the SDK client's sources"));
    }
    let hash = hex::encode(h.finalize());
    let cache = std::env::var_os("PEER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/matrix-oidc-gateway"));
    let bin = cache
        .join(format!("sdk-client-{}", &hash[..16]))
        .join("gateway-e2e-sdk-client");
    assert!(
        bin.is_file(),
        "the matrix-rust-sdk client is not built for these sources ({}): run scripts/peers/install-sdk-client.sh (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs the matrix-rust-sdk flow (with cross-signing when `cross_signing`); its `STEP` lines.
fn rust_flow(gw: &GatewayProcess, tls: &Tls, cross_signing: bool) -> Vec<serde_json::Value> {
    let server_name = gw.url("").trim_start_matches("http://").to_owned();
    let out = Command::new(sdk_rust_bin())
        .args(["--server-name", &server_name, "--users", "alice,bob"])
        .args(["--admin", &gw.admin, "--admin-token", ADMIN_TOKEN])
        .args(["--expires-in", &ACCESS_TTL_SECS.to_string()])
        .args(["--cross-signing", if cross_signing { "1" } else { "0" }])
        .arg("--ca-cert")
        .arg(&tls.cert)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the matrix-rust-sdk client");
    steps("matrix-rust-sdk", &out, gw)
}

async fn js_sdk_signs_in_messages_refreshes_and_signs_out(kind: HsKind) {
    let (_op, hs, gw, tls) = stack(kind).await;
    let steps = tokio::task::block_in_place(|| js_flow(&gw, &tls));
    let alice = step(&steps, "signed_in");
    assert_eq!(alice["user_id"], "@alice:localhost");
    assert!(alice["registration_endpoint"].as_str().is_some(), "{alice}");
    assert_eq!(
        alice["revocation_endpoint"],
        tls.url("/_matrix-oidc-gateway/oauth2/revoke"),
        "the SDK must revoke through the gateway"
    );
    assert_eq!(step(&steps, "message")["read_by"], "@bob:localhost");
    refreshed_and_signed_out(&steps, &hs).await;
}

/// The SDK refreshed an expired access token, and after its sign-out the old token is refused
/// and the homeserver itself (asked directly, not through the gateway) no longer has the device.
async fn refreshed_and_signed_out(steps: &[serde_json::Value], hs: &Homeserver) {
    assert!(step(steps, "refreshed")["refreshes"].as_u64().unwrap_or(0) >= 1);
    let out = step(steps, "signed_out");
    assert_eq!(out["old_token_status"], 401);
    let gone = out["device_id"].as_str().expect("device_id").to_owned();
    let upstream = hs.device_ids("@alice:localhost").await;
    assert!(
        !upstream.contains(&gone),
        "{gone} is still a device of alice at the homeserver: {upstream:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_js_sdk_on_dendrite() {
    js_sdk_signs_in_messages_refreshes_and_signs_out(HsKind::Dendrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_js_sdk_on_synapse() {
    js_sdk_signs_in_messages_refreshes_and_signs_out(HsKind::Synapse).await;
}

async fn rust_sdk_signs_in_encrypts_refreshes_and_signs_out(kind: HsKind) {
    let (_op, hs, gw, tls) = stack(kind).await;
    let steps = tokio::task::block_in_place(|| rust_flow(&gw, &tls, true));
    let alice = step(&steps, "signed_in");
    assert_eq!(alice["user_id"], "@alice:localhost");
    let message = step(&steps, "encrypted_message");
    assert_eq!(message["decrypted_by"], "@bob:localhost");
    // Cross-signing: the first upload, then the approved reset, each landed at the homeserver
    // (asked directly): its master key for alice is the SDK's, and changed with the reset.
    let first = step(&steps, "cross_signing")["master_key"].clone();
    let reset = step(&steps, "cross_signing_reset");
    assert!(
        reset["approval_url"]
            .as_str()
            .is_some_and(|u| u.contains("action=org.matrix.cross_signing_reset")),
        "{reset}"
    );
    assert!(
        first.is_string() && first != reset["master_key"],
        "{first} {reset}"
    );
    assert_eq!(
        hs.master_key("@alice:localhost").await,
        reset["master_key"].as_str().map(str::to_owned),
        "the homeserver has the reset identity"
    );
    // The SDK's own logout, at the gateway's revocation endpoint on its HTTPS listener.
    assert_eq!(
        step(&steps, "signed_out")["revocation_endpoint"],
        tls.url("/_matrix-oidc-gateway/oauth2/revoke")
    );
    refreshed_and_signed_out(&steps, &hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_rust_sdk_on_dendrite() {
    rust_sdk_signs_in_encrypts_refreshes_and_signs_out(HsKind::Dendrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_rust_sdk_on_synapse() {
    rust_sdk_signs_in_encrypts_refreshes_and_signs_out(HsKind::Synapse).await;
}

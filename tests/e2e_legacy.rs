//! Legacy clients and bots through the compatibility layer (docs/compat.md, issue #15), against
//! real homeservers and the real OP (`oidc-provider`, its `gateway` client allowed the
//! authorization-code grant with the gateway's callback, and back-channel logout to the
//! gateway).
//!
//! - matrix-js-sdk's legacy path (npm, `tests/e2e/sdk-js/legacy.mjs`): `loginFlows`, the SDK's
//!   single sign-on URL in a headless browser, `m.login.token`, two users messaging, sync,
//!   `/logout`; a reused login token is refused.
//! - a matrix-nio bot (PyPI, `tests/e2e/legacy/nio_bot.py`) with a login token from a browser
//!   sign-in: the flows, `m.login.token`, whoami, a room, a message read back in its sync,
//!   `/logout`.
//! - a matrix-nio bot signing in with a password (`m.login.password`, checked at the OP's
//!   password grant, which the test OP allows the gateway): a wrong password refused with
//!   `M_FORBIDDEN` first, then the same bot run as above.
//! - `/logout/all` ending two compat sessions of one user.
//! - the OP grant: a password session's grant refreshed at the OP in the background while the
//!   session is used, then ended at the OP without a back-channel logout: the session ends
//!   at the next check and the device is gone upstream.
//! - the attack cases on the same stack: a `redirectUrl` not on the allow-list, a forged
//!   state, an expired login token, `/refresh` with an OAuth refresh token, and a compat token
//!   after the OP's back-channel logout of its session.
//!
//! Each runs against Dendrite and Synapse, each in its default binding mode. After every
//! sign-out the homeserver itself (asked directly) no longer has the device.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{free_port, step, steps, GatewayProcess, Op};

const STORE_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// The legacy clients' own URL, on the gateway's redirect allow-list.
const CLIENT_URL: &str = "http://127.0.0.1/legacy-client";
/// Every account's password at the test OP (its password grant).
const OP_PASSWORD: &str = "e2e-bot-password";
/// Compat sessions' OP grants are checked this often here (cached identities live 1 s, so a
/// used session finds its check due).
const GRANT_CHECK_SECS: u64 = 2;
/// Login tokens live this long here (the expired-token case waits it out).
const LOGIN_TOKEN_TTL_SECS: u64 = 3;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The OP (with the gateway as a sign-in client), a homeserver of `kind` in its default
/// binding, and the gateway with the compatibility layer on.
async fn stack(kind: HsKind) -> (Op, Homeserver, GatewayProcess) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let op = Op::start_with(&[
        "--compat-callback",
        &format!("{base}/_matrix/gateway/compat/callback"),
        "--bcl-uri",
        &format!("{base}/_matrix-oidc-gateway/oidc/backchannel-logout"),
        "--password-grant",
        OP_PASSWORD,
    ]);
    let hs = Homeserver::start(kind);
    let gw = GatewayProcess::start_on(
        port,
        &format!(
            r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"

[homeserver]
url = "{hs}"
server_name = "localhost"
kind = "{kind}"
as_token = "{AS_TOKEN}"

[store]
path = "{{state_dir}}/state.sqlite3"
encryption_key = "{STORE_KEY}"

[discovery]
public_base_url = "{base}"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[compat]
enabled = true
redirect_allowlist = ["{CLIENT_URL}"]
login_token_ttl = "{LOGIN_TOKEN_TTL_SECS}s"
password_login = true
grant_check_interval = "{GRANT_CHECK_SECS}s"

[cache]
max_ttl = "1s"
negative_ttl = "1s"

[log]
level = "info"
"#,
            hs = hs.url,
            kind = kind.config_name(),
            issuer = op.issuer,
        ),
    );
    (op, hs, gw)
}

/// A user's browser through the gateway's single sign-on to `redirect` (`tests/e2e/op/sso.mjs`):
/// `REDIRECT <url>` or `PAGE <status> <json text>`. With `jar`, the OP session's cookies are
/// saved there.
fn browser_sso(gw: &GatewayProcess, user: &str, redirect: &str, jar: Option<&PathBuf>) -> String {
    let url = format!(
        "{}?redirectUrl={}",
        gw.url("/_matrix/client/v3/login/sso/redirect"),
        form_urlencoded::byte_serialize(redirect.as_bytes()).collect::<String>()
    );
    let mut cmd = Command::new("node");
    cmd.arg("sso.mjs")
        .args(["--url", &url, "--user", user, "--redirect", redirect])
        .current_dir(repo("tests/e2e/op"));
    if let Some(jar) = jar {
        cmd.arg("--jar").arg(jar);
    }
    let out = cmd.output().expect("`node` for the browser");
    assert!(
        out.status.success(),
        "the browser sign-in failed: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A login token for `user`, from a browser sign-in that lands on the client's URL.
fn login_token(gw: &GatewayProcess, user: &str, jar: Option<&PathBuf>) -> String {
    let landed = browser_sso(gw, user, CLIENT_URL, jar);
    let url = landed
        .strip_prefix("REDIRECT ")
        .unwrap_or_else(|| panic!("no redirect to the client: {landed}"));
    url::Url::parse(url)
        .expect("a URL")
        .query_pairs()
        .find(|(k, _)| k == "loginToken")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no loginToken in {url}"))
}

async fn post(gw: &GatewayProcess, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(gw.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn whoami(gw: &GatewayProcess, token: &str) -> u16 {
    reqwest::Client::new()
        .get(gw.url("/_matrix/client/v3/account/whoami"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn assert_no_device(hs: &Homeserver, user: &str, device: &str) {
    let upstream = hs.device_ids(user).await;
    assert!(
        !upstream.iter().any(|d| d == device),
        "{device} is still a device of {user} at the homeserver: {upstream:?}"
    );
}

/// matrix-js-sdk's legacy sign-in, messaging and `/logout`.
async fn js_sdk_legacy(gw: &GatewayProcess, hs: &Homeserver) {
    let dir = repo("tests/e2e/sdk-js");
    assert!(
        dir.join("node_modules/matrix-js-sdk").is_dir(),
        "matrix-js-sdk is not installed in {}: run scripts/setup.sh (scripts/test.sh does)",
        dir.display()
    );
    let out = tokio::task::block_in_place(|| {
        Command::new("node")
            .arg("legacy.mjs")
            .args(["--gateway", &gw.url(""), "--users", "carol,dave"])
            .args(["--redirect", CLIENT_URL])
            .current_dir(&dir)
            .output()
            .expect("`node` must be installed (Node 20+) for the end-to-end tests")
    });
    let steps = steps("matrix-js-sdk (legacy)", &out, gw);
    let flows = step(&steps, "flows");
    assert_eq!(
        flows["types"],
        json!(["m.login.sso", "m.login.token", "m.login.password"])
    );
    let carol = step(&steps, "signed_in");
    assert_eq!(carol["user_id"], "@carol:localhost");
    assert_eq!(carol["compat_token"], true, "a gateway-issued compat token");
    assert_eq!(step(&steps, "login_token_reused")["status"], 403);
    assert_eq!(step(&steps, "message")["read_by"], "@dave:localhost");
    let gone = step(&steps, "signed_in")["device_id"]
        .as_str()
        .expect("device")
        .to_owned();
    let logged_out = step(&steps, "logged_out");
    assert_eq!(logged_out["old_status"], 401);
    assert_no_device(hs, "@carol:localhost", &gone).await;
}

/// How the nio bot signs in.
enum BotLogin {
    /// With a login token from a browser sign-in of this user.
    Token(&'static str),
    /// With this user's password (`m.login.password`).
    Password(&'static str),
}

/// The matrix-nio bot, signing in as `how` says.
async fn nio_bot(gw: &GatewayProcess, hs: &Homeserver, how: BotLogin) {
    let python = std::env::var_os("PEER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/matrix-oidc-gateway"))
        .join("tools-venv/bin/python");
    assert!(
        python.is_file(),
        "the tools venv with matrix-nio is missing ({}): run scripts/peers/install-tools.sh (scripts/test.sh does)",
        python.display()
    );
    let (user, args) = match how {
        BotLogin::Token(user) => {
            let token = tokio::task::block_in_place(|| login_token(gw, user, None));
            (user, vec!["--login-token".to_owned(), token])
        }
        BotLogin::Password(user) => (
            user,
            ["--user", user, "--password", OP_PASSWORD]
                .map(str::to_owned)
                .to_vec(),
        ),
    };
    let out = tokio::task::block_in_place(|| {
        Command::new(&python)
            .arg(repo("tests/e2e/legacy/nio_bot.py"))
            .args(["--gateway", &gw.url("")])
            .args(&args)
            .output()
            .expect("python")
    });
    let steps = steps("matrix-nio", &out, gw);
    assert_eq!(
        step(&steps, "flows")["types"],
        json!(["m.login.sso", "m.login.token", "m.login.password"])
    );
    if let BotLogin::Password(_) = how {
        assert_eq!(step(&steps, "wrong_password")["errcode"], "M_FORBIDDEN");
    }
    let signed_in = step(&steps, "signed_in");
    let user_id = format!("@{user}:localhost");
    assert_eq!(signed_in["user_id"], user_id.as_str());
    let access = signed_in["access_token"].as_str().expect("token");
    assert!(access.starts_with("mgc_"), "a gateway-issued compat token");
    step(&steps, "message");
    assert_eq!(
        whoami(gw, access).await,
        401,
        "the bot's token after /logout"
    );
    let device = signed_in["device_id"].as_str().expect("device");
    assert_no_device(hs, &user_id, device).await;
}

/// The attack cases, on the real OP and homeserver.
async fn attacks(op: &Op, gw: &GatewayProcess, hs: &Homeserver) {
    // A redirectUrl not on the allow-list: no redirect carries the login token there; the
    // gateway's confirmation page names the whole destination instead.
    let evil = "https://evil.example/steal";
    let landed = tokio::task::block_in_place(|| browser_sso(gw, "frank", evil, None));
    assert!(landed.starts_with("PAGE 200 "), "{landed}");
    assert!(landed.contains("https://evil.example/steal"), "{landed}");

    // A forged state at the callback: refused, and no login token anywhere.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(gw.url("/_matrix/gateway/compat/callback?state=forged-state&code=stolen-code"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("location").is_none());
    assert!(!r.text().await.unwrap().contains("loginToken"));

    // An expired login token.
    let token = tokio::task::block_in_place(|| login_token(gw, "frank", None));
    tokio::time::sleep(Duration::from_secs(LOGIN_TOKEN_TTL_SECS) + Duration::from_millis(700))
        .await;
    let (status, body) = post(
        gw,
        "/_matrix/client/v3/login",
        json!({"type": "m.login.token", "token": token}),
    )
    .await;
    assert_eq!(
        (status, body["errcode"].clone()),
        (403, json!("M_FORBIDDEN"))
    );

    // /refresh with an OAuth refresh token: still the OP's business, and the session goes on.
    let oauth = op.mint(
        "frank",
        "urn:matrix:client:api:* urn:matrix:client:device:FRANKOAUTH",
    );
    let refresh = oauth.refresh_token.clone().expect("a refresh token");
    let (status, body) = post(
        gw,
        "/_matrix/client/v3/refresh",
        json!({"refresh_token": refresh}),
    )
    .await;
    assert_eq!(
        (status, body["errcode"].clone()),
        (404, json!("M_UNRECOGNIZED"))
    );
    assert_eq!(whoami(gw, &oauth.access_token).await, 200);

    // The OP's back-channel logout of the OP session a compat session came from ends it.
    let jar = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let jar_path = jar.to_path_buf();
    let token = tokio::task::block_in_place(|| login_token(gw, "gina", Some(&jar_path)));
    let (status, login) = post(
        gw,
        "/_matrix/client/v3/login",
        json!({"type": "m.login.token", "token": token}),
    )
    .await;
    assert_eq!(status, 200, "{login}");
    let access = login["access_token"].as_str().expect("token").to_owned();
    let device = login["device_id"].as_str().expect("device").to_owned();
    assert_eq!(whoami(gw, &access).await, 200);
    tokio::task::block_in_place(|| op.logout(&jar_path));
    let mut refused = false;
    for _ in 0..100 {
        if whoami(gw, &access).await == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the compat token outlived the OP's back-channel logout\ngateway log:\n{}",
        gw.logs()
    );
    assert_no_device(hs, "@gina:localhost", &device).await;
}

/// `/logout/all` (with MAS's `io.element.only_compat_is_fine`) ends both of a user's compat
/// sessions, and the homeserver no longer has either device.
async fn logout_all(gw: &GatewayProcess, hs: &Homeserver) {
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let token = tokio::task::block_in_place(|| login_token(gw, "hank", None));
        let (status, login) = post(
            gw,
            "/_matrix/client/v3/login",
            json!({"type": "m.login.token", "token": token}),
        )
        .await;
        assert_eq!(status, 200, "{login}");
        sessions.push((
            login["access_token"].as_str().expect("token").to_owned(),
            login["device_id"].as_str().expect("device").to_owned(),
        ));
    }
    let r = reqwest::Client::new()
        .post(gw.url("/_matrix/client/v3/logout/all"))
        .bearer_auth(&sessions[0].0)
        .json(&json!({"io.element.only_compat_is_fine": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.logs());
    for (token, device) in &sessions {
        assert_eq!(whoami(gw, token).await, 401);
        assert_no_device(hs, "@hank:localhost", device).await;
    }
}

/// A password session's OP grant: checked at the OP while the session is used (the session
/// goes on), then ended at the OP with no back-channel logout: the next check ends the session
/// and signs its device out upstream.
async fn op_grant(op: &Op, gw: &GatewayProcess, hs: &Homeserver) {
    let (status, body) = post(
        gw,
        "/_matrix/client/v3/login",
        json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "grace"},
            "password": OP_PASSWORD,
            "device_id": "GRACEDEV01",
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().expect("token").to_owned();
    let renewed = || async {
        let text = reqwest::get(format!("{}/metrics", gw.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics");
        text.lines().any(|l| {
            l.starts_with("matrix_oidc_gateway_compat_grant_checks_total{result=\"renewed\"}")
        })
    };
    let started = std::time::Instant::now();
    while !renewed().await {
        assert_eq!(
            whoami(gw, &access).await,
            200,
            "the session while its grant is fresh"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no grant check renewed at the OP"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(whoami(gw, &access).await, 200);
    assert!(op.end_grants("grace").await >= 1);
    let ended = std::time::Instant::now();
    loop {
        match whoami(gw, &access).await {
            200 => {}
            401 => break,
            other => panic!("whoami answered {other} while the grant ended"),
        }
        assert!(
            ended.elapsed() < Duration::from_secs(20),
            "the session outlived its OP grant"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_no_device(hs, "@grace:localhost", "GRACEDEV01").await;
}

async fn legacy_clients(kind: HsKind) {
    let (op, hs, gw) = stack(kind).await;
    js_sdk_legacy(&gw, &hs).await;
    nio_bot(&gw, &hs, BotLogin::Token("erin")).await;
    nio_bot(&gw, &hs, BotLogin::Password("pwbot")).await;
    logout_all(&gw, &hs).await;
    op_grant(&op, &gw, &hs).await;
    attacks(&op, &gw, &hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_clients_on_dendrite() {
    legacy_clients(HsKind::Dendrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_clients_on_synapse() {
    legacy_clients(HsKind::Synapse).await;
}

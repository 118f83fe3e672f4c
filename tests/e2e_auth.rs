//! End to end: real tokens from the real `oidc-provider` (authorization code + PKCE, driven
//! headlessly), through the built gateway binary, to an upstream that echoes what it received.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

#[path = "common/mod.rs"]
mod common;
mod e2e_support;

use std::time::Duration;

use common::Echo;
use e2e_support::{GatewayProcess, Op};
use serde_json::{json, Value};
use wiremock::{Mock, MockServer};

const SYNC: &str = "/_matrix/client/v3/sync";

async fn echo_upstream() -> MockServer {
    let hs = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(Echo)
        .mount(&hs)
        .await;
    hs
}

fn gateway_config(op: &Op, hs: &MockServer, extra: &str) -> String {
    format!(
        r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"

[homeserver]
url = "{hs}"
server_name = "localhost"

[store]
path = "{{state_dir}}/state.sqlite3"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[log]
level = "debug"
format = "json"
{extra}
"#,
        hs = hs.uri(),
        issuer = op.issuer,
    )
}

async fn get(gw: &GatewayProcess, path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(gw.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request through the gateway")
}

async fn errcode(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("JSON");
    (
        status,
        body["errcode"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn real_op_tokens_through_the_gateway_binary() {
    let op = Op::start();
    let hs = echo_upstream().await;
    let gw = GatewayProcess::start(&gateway_config(&op, &hs, ""));

    // A valid token with a device scope: identity headers reach the upstream.
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let resp = get(&gw, SYNC, &alice.access_token).await;
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@alice:localhost"])
    );
    assert_eq!(echo["headers"]["x-matrix-device-id"], json!(["ALICEDEV01"]));
    assert_eq!(echo["headers"]["x-oidc-subject"], json!(["alice"]));
    assert!(echo["headers"].get("authorization").is_none());

    // The unstable spellings work the same.
    let bob = op.mint(
        "bob",
        "urn:matrix:org.matrix.msc2967.client:api:* urn:matrix:org.matrix.msc2967.client:device:BOBDEV0001",
    );
    let echo: Value = get(&gw, SYNC, &bob.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@bob:localhost"])
    );
    assert_eq!(echo["headers"]["x-matrix-device-id"], json!(["BOBDEV0001"]));

    // The deprecated query parameter is accepted and never forwarded.
    let q = reqwest::get(gw.url(&format!(
        "{SYNC}?timeout=0&access_token={}",
        alice.access_token
    )))
    .await
    .unwrap();
    assert_eq!(q.status(), 200);
    let echo: Value = q.json().await.unwrap();
    assert_eq!(echo["query"], "timeout=0");

    // A guest token may sync but not create rooms.
    let guest = op.mint(
        "guest1",
        "urn:matrix:client:api:guest urn:matrix:client:device:GUESTDEV01",
    );
    let echo: Value = get(&gw, SYNC, &guest.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-matrix-guest"], json!(["true"]));
    let r = reqwest::Client::new()
        .post(gw.url("/_matrix/client/v3/createRoom"))
        .bearer_auth(&guest.access_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(errcode(r).await, (403, "M_GUEST_ACCESS_FORBIDDEN".into()));

    // No Matrix API scope at all.
    let plain = op.mint("carol", "offline_access");
    assert!(
        plain.scope.is_empty() || !plain.scope.contains("api"),
        "{}",
        plain.scope
    );
    assert_eq!(
        errcode(get(&gw, SYNC, &plain.access_token).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );

    // Two device scopes in one token (the OP grants them; the gateway must refuse).
    let two = op.mint(
        "dave",
        "urn:matrix:client:api:* urn:matrix:client:device:DEVAAAAAAA urn:matrix:client:device:DEVBBBBBBB",
    );
    assert!(two.scope.contains("DEVAAAAAAA") && two.scope.contains("DEVBBBBBBB"));
    assert_eq!(
        errcode(get(&gw, SYNC, &two.access_token).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );

    // A token the OP never issued.
    assert_eq!(
        errcode(get(&gw, SYNC, "not-a-real-token").await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );

    // The refresh token is not an access token.
    let refresh = alice.refresh_token.clone().expect("refresh token");
    assert_eq!(
        errcode(get(&gw, SYNC, &refresh).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );

    // No raw token in anything the binary logged.
    let logs = gw.logs();
    assert!(
        logs.contains("\"target\":\"access\""),
        "no access log in {}",
        gw.log_path().display()
    );
    for t in [
        &alice.access_token,
        &bob.access_token,
        &guest.access_token,
        &refresh,
        &two.access_token,
    ] {
        assert!(
            !logs.contains(t.as_str()),
            "a token leaked into the gateway log"
        );
    }
    assert!(!logs.contains("gateway-secret"));
}

#[tokio::test]
async fn revoked_token_is_refused_once_its_cache_entry_ends() {
    let op = Op::start();
    let hs = echo_upstream().await;
    let gw = GatewayProcess::start(&gateway_config(
        &op,
        &hs,
        "[cache]\nmax_ttl = \"1s\"\nnegative_ttl = \"1s\"",
    ));
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV02",
    );
    assert_eq!(get(&gw, SYNC, &alice.access_token).await.status(), 200);
    op.revoke(&alice.access_token, "access_token").await;
    // Order, not speed: once the 1 s reuse window has passed, the gateway asks the OP again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answer = errcode(get(&gw, SYNC, &alice.access_token).await).await;
    assert_eq!(answer, (401, "M_UNKNOWN_TOKEN".into()), "{}", gw.logs());
}

#[tokio::test]
async fn expired_token_is_refused_although_still_cached() {
    let op = Op::start();
    let hs = echo_upstream().await;
    // Default 120 s cache: only the token's own expiry can end it.
    let gw = GatewayProcess::start(&gateway_config(&op, &hs, ""));
    let short = op.mint_with(
        "erin",
        "urn:matrix:client:api:* urn:matrix:client:device:ERINDEV001",
        "urn:matrix:homeserver",
        "e2e-short",
    );
    assert_eq!(get(&gw, SYNC, &short.access_token).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(3500)).await; // the OP issued it for 3 s
    assert_eq!(
        errcode(get(&gw, SYNC, &short.access_token).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );
}

#[tokio::test]
async fn real_op_jwt_access_tokens_through_the_gateway_binary() {
    let op = Op::start();
    let hs = echo_upstream().await;
    // `auto`: JWTs are validated locally against the OP's JWKS, opaque tokens introspected.
    let gw = GatewayProcess::start(&gateway_config(
        &op,
        &hs,
        "",
    ).replace(
        "client_secret = \"gateway-secret\"",
        "client_secret = \"gateway-secret\"\nmode = \"auto\"\naudiences = [\"urn:matrix:homeserver:jwt\"]",
    ));
    let jwt = |user: &str, scope: &str| {
        op.mint_with(user, scope, "urn:matrix:homeserver:jwt", "e2e-client")
    };

    let alice = jwt(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEJWT01",
    );
    assert_eq!(
        alice.access_token.split('.').count(),
        3,
        "the OP did not issue a JWT"
    );
    let echo: Value = get(&gw, SYNC, &alice.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@alice:localhost"])
    );
    assert_eq!(echo["headers"]["x-matrix-device-id"], json!(["ALICEJWT01"]));

    let guest = jwt(
        "guest2",
        "urn:matrix:client:api:guest urn:matrix:client:device:GUESTJWT01",
    );
    let echo: Value = get(&gw, SYNC, &guest.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-matrix-guest"], json!(["true"]));
    let r = reqwest::Client::new()
        .post(gw.url("/_matrix/client/v3/createRoom"))
        .bearer_auth(&guest.access_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(errcode(r).await, (403, "M_GUEST_ACCESS_FORBIDDEN".into()));

    let none = jwt("carol", "offline_access");
    assert_eq!(
        errcode(get(&gw, SYNC, &none.access_token).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );
    let two = jwt(
        "dave",
        "urn:matrix:client:api:* urn:matrix:client:device:JWTDEVAAAA urn:matrix:client:device:JWTDEVBBBB",
    );
    assert_eq!(
        errcode(get(&gw, SYNC, &two.access_token).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );

    // A tampered JWT: same header and signature, another user in the payload.
    let mut parts: Vec<String> = alice.access_token.split('.').map(str::to_owned).collect();
    let mut claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &parts[1])
            .unwrap(),
    )
    .unwrap();
    claims["username"] = json!("mallory");
    parts[1] = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        serde_json::to_vec(&claims).unwrap(),
    );
    assert_eq!(
        errcode(get(&gw, SYNC, &parts.join(".")).await).await,
        (401, "M_UNKNOWN_TOKEN".into())
    );

    // Opaque tokens still go to introspection in `auto` mode.
    let opaque = op.mint(
        "erin",
        "urn:matrix:client:api:* urn:matrix:client:device:ERINOPAQUE",
    );
    let echo: Value = get(&gw, SYNC, &opaque.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@erin:localhost"])
    );
}

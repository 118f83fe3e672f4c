//! End to end sign-out with real peers: the real `oidc-provider` with back-channel logout, real
//! Synapse behind the gateway binary. RP-initiated logout at the OP, the admin API (revoke,
//! deactivate), and revocation through the gateway's advertised endpoint. Elapsed times are
//! reported, not asserted; the order is asserted.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{free_port, GatewayProcess, Op};
use serde_json::{json, Value};

const ADMIN: &str = "e2e-admin-token-0123456789";
const BCL: &str = "/_matrix-oidc-gateway/oidc/backchannel-logout";

struct Stack {
    op: Op,
    hs: Homeserver,
    gw: GatewayProcess,
    _jars: tempfile::TempDir,
}

fn start() -> Stack {
    let port = free_port();
    let op = Op::start_with(&["--bcl-uri", &format!("http://127.0.0.1:{port}{BCL}")]);
    let hs = Homeserver::start(HsKind::Synapse);
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
kind = "synapse"
as_token = "{AS_TOKEN}"

[store]
path = "{{state_dir}}/state.sqlite3"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"

[discovery]
public_base_url = "http://127.0.0.1:{port}"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"
logout_audiences = ["e2e-client"]

[cache]
max_ttl = "120s"

[admin]
token = "{ADMIN}"

[log]
level = "info"
format = "json"
"#,
            hs = hs.url,
            issuer = op.issuer,
        ),
    );
    Stack {
        op,
        hs,
        gw,
        _jars: tempfile::tempdir().unwrap(),
    }
}

async fn whoami(gw: &GatewayProcess, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(gw.url("/_matrix/client/v3/account/whoami"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// The device IDs Synapse holds for a user (asked directly, with the AS token).
async fn devices_at_homeserver(hs: &Homeserver, user: &str) -> Vec<String> {
    let r = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v3/devices?user_id={}",
            hs.url,
            user.replace('@', "%40").replace(':', "%3A")
        ))
        .bearer_auth(AS_TOKEN)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["device_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn admin(
    gw: &GatewayProcess,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let r = reqwest::Client::new()
        .request(method, format!("{}{path}", gw.admin))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn rp_initiated_logout_at_the_op_signs_alice_out_everywhere() {
    let s = start();
    let jar = s._jars.path().join("alice.json");
    let alice = s.op.mint_in_session(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
        &jar,
    );
    let bob = s.op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0001",
    );
    assert_eq!(whoami(&s.gw, &alice.access_token).await.0, 200);
    assert_eq!(whoami(&s.gw, &bob.access_token).await.0, 200);
    assert!(devices_at_homeserver(&s.hs, "@alice:localhost")
        .await
        .contains(&"ALICEDEV01".to_owned()));

    // alice signs out at the OP; the OP posts the logout token to the gateway before it answers.
    s.op.logout(&jar);
    let answered = Instant::now();
    let (status, body) = whoami(&s.gw, &alice.access_token).await;
    let elapsed = answered.elapsed();
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN")),
        "{body}"
    );
    eprintln!("REPORT back-channel logout: next request refused {elapsed:?} after the OP answered (cache max_ttl 120 s)");
    assert!(
        !devices_at_homeserver(&s.hs, "@alice:localhost")
            .await
            .contains(&"ALICEDEV01".to_owned()),
        "alice's device is still on Synapse"
    );
    // bob is untouched.
    assert_eq!(whoami(&s.gw, &bob.access_token).await.0, 200);
    assert!(devices_at_homeserver(&s.hs, "@bob:localhost")
        .await
        .contains(&"BOBDEV0001".to_owned()));
}

#[tokio::test]
async fn admin_revoke_and_deactivate() {
    let s = start();
    let alice = s.op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV02",
    );
    let bob = s.op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0002",
    );
    assert_eq!(whoami(&s.gw, &alice.access_token).await.0, 200);
    assert_eq!(whoami(&s.gw, &bob.access_token).await.0, 200);

    let started = Instant::now();
    let (st, body) = admin(
        &s.gw,
        reqwest::Method::POST,
        "/admin/v1/sessions/revoke",
        json!({"user_id": "@alice:localhost", "device_id": "ALICEDEV02"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(whoami(&s.gw, &alice.access_token).await.0, 401);
    eprintln!(
        "REPORT admin revoke: refused {:?} after the call started",
        started.elapsed()
    );
    assert!(!devices_at_homeserver(&s.hs, "@alice:localhost")
        .await
        .contains(&"ALICEDEV02".to_owned()));
    assert_eq!(whoami(&s.gw, &bob.access_token).await.0, 200);

    // alice signs in again, then is deactivated: she cannot come back with a fresh OP token.
    let again = s.op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV03",
    );
    assert_eq!(whoami(&s.gw, &again.access_token).await.0, 200);
    let (st, body) = admin(
        &s.gw,
        reqwest::Method::POST,
        "/admin/v1/users/@alice:localhost/deactivate",
        json!({"erase": false}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["mechanism"], "appservice_deactivate");
    let (st, body) = whoami(&s.gw, &again.access_token).await;
    assert_eq!(
        (st, body["errcode"].as_str()),
        (403, Some("M_USER_DEACTIVATED"))
    );
    let fresh = s.op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV04",
    );
    let (st, body) = whoami(&s.gw, &fresh.access_token).await;
    assert_eq!(
        (st, body["errcode"].as_str()),
        (403, Some("M_USER_DEACTIVATED"))
    );
    // Synapse deactivated her too: not even the appservice can log her in any more.
    let r = reqwest::Client::new()
        .post(format!("{}/_matrix/client/v3/login", s.hs.url))
        .bearer_auth(AS_TOKEN)
        .json(&json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": "alice"}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_USER_DEACTIVATED")),
        "{body}"
    );
    assert_eq!(whoami(&s.gw, &bob.access_token).await.0, 200);
}

#[tokio::test]
async fn revocation_through_the_advertised_endpoint() {
    let s = start();
    let carol = s.op.mint(
        "carol",
        "urn:matrix:client:api:* urn:matrix:client:device:CAROLDEV02",
    );
    assert_eq!(whoami(&s.gw, &carol.access_token).await.0, 200);
    let meta: Value = reqwest::get(s.gw.url("/_matrix/client/v1/auth_metadata"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let endpoint = meta["revocation_endpoint"]
        .as_str()
        .expect("revocation_endpoint")
        .to_owned();
    assert!(
        endpoint.starts_with(&s.gw.base),
        "the gateway does not advertise itself: {endpoint}"
    );

    // Revoke the access token: the very next request is refused (and, the Matrix spec having
    // the OP end the whole session, the device is signed out too).
    let sent = [
        ("token", carol.access_token.as_str()),
        ("token_type_hint", "access_token"),
        ("client_id", "e2e-client"),
    ];
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(&endpoint)
        .form(&sent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, _) = whoami(&s.gw, &carol.access_token).await;
    assert_eq!(st, 401);
    eprintln!(
        "REPORT revocation (access token): refused {:?} after the request started",
        started.elapsed()
    );

    assert!(!devices_at_homeserver(&s.hs, "@carol:localhost")
        .await
        .contains(&"CAROLDEV02".to_owned()));

    // Revoke only the refresh token of another session: once answered, its device is gone.
    let dave = s.op.mint(
        "dave",
        "urn:matrix:client:api:* urn:matrix:client:device:DAVEDEV002",
    );
    assert_eq!(whoami(&s.gw, &dave.access_token).await.0, 200);
    assert!(devices_at_homeserver(&s.hs, "@dave:localhost")
        .await
        .contains(&"DAVEDEV002".to_owned()));
    let refresh = dave.refresh_token.clone().expect("refresh token");
    let sent2 = [
        ("token", refresh.as_str()),
        ("token_type_hint", "refresh_token"),
        ("client_id", "e2e-client"),
    ];
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(&endpoint)
        .form(&sent2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !devices_at_homeserver(&s.hs, "@dave:localhost")
            .await
            .contains(&"DAVEDEV002".to_owned()),
        "dave's device is still on Synapse"
    );
    assert_eq!(whoami(&s.gw, &dave.access_token).await.0, 401);
    eprintln!(
        "REPORT revocation (refresh token): device gone {:?} after the request started",
        started.elapsed()
    );

    // The OP saw each revocation exactly as the client sent it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen: Vec<Value> =
        s.op.output()
            .iter()
            .filter_map(|l| l.strip_prefix("REVOCATION "))
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
    let as_map = |pairs: &[(&str, &str)]| -> Value {
        Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        )
    };
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["params"], as_map(&sent));
    assert_eq!(seen[1]["params"], as_map(&sent2));
}

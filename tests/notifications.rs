//! Sign-out and deactivation in-process: back-channel logout (every §2.6 step refused on its
//! own, and the purge complete before the 200), the admin API, and the revocation proxy, with
//! the real gateway against wiremock fakes of the OP and the homeserver.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use wiremock::matchers::{body_string, header, method, path, query_param};
use wiremock::{Mock, ResponseTemplate};

const SYNC: &str = "/_matrix/client/v3/sync";
const BCL: &str = "/_matrix-oidc-gateway/oidc/backchannel-logout";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An OP with discovery + JWKS, alice (sid-1) and bob (sid-2) introspectable.
async fn setup(extra_cfg: &str, hs_extra: &str) -> (Fakes, TestGateway, String) {
    let f = Fakes::start().await;
    let issuer = format!("{}/", f.op.uri());
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": issuer,
            "jwks_uri": format!("{}/jwks", f.op.uri()),
            "introspection_endpoint": format!("{}/introspect", f.op.uri()),
            "revocation_endpoint": format!("{}/revoke", f.op.uri()),
            "authorization_endpoint": format!("{}/auth", f.op.uri()),
            "token_endpoint": format!("{}/token", f.op.uri()),
        })))
        .mount(&f.op)
        .await;
    let jwk: Value = serde_json::from_str(&fixture("rsa1.jwk.json")).unwrap();
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [jwk]})))
        .mount(&f.op)
        .await;
    let mut alice = active("alice", &full_scope("ALICEDEV01"));
    alice["sid"] = json!("sid-1");
    let mut bob = active("bob", &full_scope("BOBDEV0001"));
    bob["sid"] = json!("sid-2");
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains(
            "token=alice-token&",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(alice))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains("token=bob-token&"))
        .respond_with(ResponseTemplate::new(200).set_body_json(bob))
        .mount(&f.op)
        .await;
    let cfg = f.config_hs(
        hs_extra,
        &format!(
            "logout_audiences = [\"matrix-client\"]\n{extra_cfg}\n\n[admin]\ntoken = \"{ADMIN_TOKEN}\""
        ),
    );
    let gw = spawn(&cfg).await;
    (f, gw, issuer)
}

fn logout_claims(issuer: &str) -> Value {
    json!({
        "iss": issuer,
        "aud": "matrix-client",
        "iat": now(),
        "exp": now() + 120,
        "jti": format!("jti-{}", rand_suffix()),
        "sub": "sub-alice",
        "sid": "sid-1",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    })
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn sign_with(key: &str, typ: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    h.typ = typ.map(str::to_owned);
    encode(
        &h,
        claims,
        &EncodingKey::from_rsa_pem(fixture(&format!("{key}.pem")).as_bytes()).unwrap(),
    )
    .unwrap()
}

fn logout_token(claims: &Value) -> String {
    sign_with("rsa1", Some("logout+jwt"), claims)
}

async fn post_logout(gw: &TestGateway, token: &str) -> (u16, Value) {
    let r = client()
        .post(gw.url(BCL))
        .form(&[("logout_token", token)])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn status(gw: &TestGateway, token: &str) -> u16 {
    client()
        .get(gw.url(SYNC))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn backchannel_logout_attack_suite_and_effect() {
    let (_f, gw, issuer) = setup("", "").await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    assert_eq!(status(&gw, "bob-token").await, 200);
    let base = logout_claims(&issuer);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        v["jti"] = json!(format!("jti-{}", rand_suffix()));
        f(&mut v);
        v
    };
    let b64 = |v: &Value| {
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(v).unwrap(),
        )
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature (a key the OP never published)",
            sign_with("attacker", Some("logout+jwt"), &with(&|_| {})),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "logout+jwt"})),
                b64(&with(&|_| {}))
            ),
        ),
        (
            "wrong iss",
            logout_token(&with(&|v| v["iss"] = json!("https://evil.example/"))),
        ),
        (
            "wrong aud",
            logout_token(&with(&|v| v["aud"] = json!("someone-else"))),
        ),
        (
            "expired",
            logout_token(&with(&|v| {
                v["iat"] = json!(now() - 600);
                v["exp"] = json!(now() - 300);
            })),
        ),
        (
            "iat in the future",
            logout_token(&with(&|v| v["iat"] = json!(now() + 600))),
        ),
        (
            "missing sub and sid",
            logout_token(&with(&|v| {
                let o = v.as_object_mut().unwrap();
                o.remove("sub");
                o.remove("sid");
            })),
        ),
        (
            "missing events",
            logout_token(&with(&|v| {
                v.as_object_mut().unwrap().remove("events");
            })),
        ),
        (
            "wrong event",
            logout_token(&with(&|v| {
                v["events"] = json!({"http://example/other": {}})
            })),
        ),
        (
            "with nonce",
            logout_token(&with(&|v| v["nonce"] = json!("n"))),
        ),
        (
            "no jti",
            logout_token(&with(&|v| {
                v.as_object_mut().unwrap().remove("jti");
            })),
        ),
        (
            "an access token",
            sign_with(
                "rsa1",
                Some("at+jwt"),
                &with(&|v| {
                    v.as_object_mut().unwrap().remove("events");
                    v["scope"] = json!("openid");
                }),
            ),
        ),
        (
            "an ID token",
            sign_with(
                "rsa1",
                Some("JWT"),
                &with(&|v| {
                    v.as_object_mut().unwrap().remove("events");
                    v["nonce"] = json!("n");
                }),
            ),
        ),
        ("garbage", "not-a-jwt".to_owned()),
    ];
    for (name, token) in &cases {
        let (code, body) = post_logout(&gw, token).await;
        assert_eq!(code, 400, "{name}: {body}");
        assert_eq!(body["error"], "invalid_request", "{name}");
        assert_eq!(status(&gw, "alice-token").await, 200, "{name} purged alice");
    }
    // Missing form field.
    let r = client()
        .post(gw.url(BCL))
        .form(&[("x", "y")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A valid logout token: once the 200 is back, alice's very next request is refused,
    // although her identity was cached for two minutes; bob is untouched.
    let valid = logout_token(&base);
    let (code, body) = post_logout(&gw, &valid).await;
    assert_eq!(code, 200, "{body}");
    let r = client()
        .get(gw.url(SYNC))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 401, "M_UNKNOWN_TOKEN").await;
    assert_eq!(status(&gw, "bob-token").await, 200);

    // The same token again: a replay.
    let (code, body) = post_logout(&gw, &valid).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn sub_only_logout_signs_out_every_session_of_the_subject() {
    let (_f, gw, issuer) = setup("", "").await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    let mut claims = logout_claims(&issuer);
    claims.as_object_mut().unwrap().remove("sid");
    let (code, _) = post_logout(&gw, &logout_token(&claims)).await;
    assert_eq!(code, 200);
    assert_eq!(status(&gw, "alice-token").await, 401);
    assert_eq!(status(&gw, "bob-token").await, 200);
}

/// The homeserver expects exactly one sign-out of alice's bound device (the upstream token
/// `mount_alice_provisioning` hands out), checked when the mock server drops.
async fn expect_alice_upstream_logout(hs: &wiremock::MockServer, priority: u8) {
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/logout"))
        .and(header("authorization", "Bearer alice-upstream"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .with_priority(priority)
        .expect(1)
        .mount(hs)
        .await;
}

#[tokio::test]
async fn logout_signs_the_bound_device_out_upstream() {
    let hs = "kind = \"dendrite\"\nas_token = \"as-token\"";
    let (f, gw, issuer) = setup("", hs).await;
    mount_alice_provisioning(&f.hs).await;
    expect_alice_upstream_logout(&f.hs, 1).await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    let (code, _) = post_logout(&gw, &logout_token(&logout_claims(&issuer))).await;
    assert_eq!(code, 200);
    // `.expect(1)`: the upstream logout happened before the 200.
    let devices: Value = admin(
        &gw,
        reqwest::Method::GET,
        "/admin/v1/users/@alice:example.org/devices",
        None,
    )
    .await
    .1;
    assert_eq!(devices["devices"], json!([]), "the binding was not dropped");
    // The appservice's own user is not the admin API's to sign out.
    let p = "/admin/v1/users/@oidc-gateway:example.org/logout";
    let (code, body) = admin(&gw, reqwest::Method::POST, p, None).await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test]
async fn a_failed_upstream_sign_out_is_a_503_and_the_retry_completes_it() {
    let hs = "kind = \"dendrite\"\nas_token = \"as-token\"";
    let (f, gw, issuer) = setup("", hs).await;
    mount_alice_provisioning(&f.hs).await;
    // The homeserver fails the upstream logout once, then recovers.
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/logout"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"errcode": "M_UNKNOWN"})))
        .with_priority(1)
        .up_to_n_times(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    expect_alice_upstream_logout(&f.hs, 2).await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    let token = logout_token(&logout_claims(&issuer));
    let (code, body) = post_logout(&gw, &token).await;
    assert_eq!(
        code, 503,
        "a sign-out that did not happen must not be a 200: {body}"
    );
    // The session's tokens are refused already; the device is still bound, to be signed out.
    assert_eq!(status(&gw, "alice-token").await, 401);
    let p = "/admin/v1/users/@alice:example.org/devices";
    assert_eq!(admin_devices(&gw, p).await, json!(["ALICEDEV01"]));
    // The OP retries the same logout token: accepted (not a replay), and completed.
    let (code, body) = post_logout(&gw, &token).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(admin_devices(&gw, p).await, json!([]));
    // A replay of a logout that succeeded is still refused.
    assert_eq!(post_logout(&gw, &token).await.0, 400);
}

#[tokio::test]
async fn a_store_failure_while_finding_a_sessions_devices_is_a_503_and_the_retry_completes_it() {
    // The device behind an OP session is found in the state store when no cached identity
    // names it (a restart, an eviction, another replica served the user). If that lookup
    // fails, nothing was signed out: the OP must hear a 5xx and retry, never a 200 that leaves
    // the device signed in upstream. By `sid` (the sessions index) and by `sub` alone (the
    // subject's user).
    store_failure_during_logout(true, &["sessions"], true).await;
    store_failure_during_logout(false, &["users"], true).await;
    // The other way round: only the cached identity names the device (its session record
    // was lost). It is signed out even though the lookup failed: a retry could not find it.
    store_failure_during_logout(true, &["sessions"], false).await;
    // Even with the subject pins out of reach too: that the device is alice's is known from
    // what her own requests established.
    store_failure_during_logout(true, &["sessions", "users"], false).await;
}

async fn store_failure_during_logout(with_sid: bool, tables: &[&str], restart: bool) {
    let hs = "kind = \"dendrite\"\nas_token = \"as-token\"";
    let (f, gw, issuer) = setup("", hs).await;
    mount_alice_provisioning(&f.hs).await;
    expect_alice_upstream_logout(&f.hs, 1).await;
    let db = f.state.path().join("state.sqlite3");
    let sql = |q: &str| {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(q)
            .unwrap()
    };
    let p = "/admin/v1/users/@alice:example.org/devices";
    assert_eq!(status(&gw, "alice-token").await, 200);
    let gw = if restart {
        // No cached identity is left to name the device.
        gw.stop().await;
        let cfg = f.config_hs(
            hs,
            &format!(
                "logout_audiences = [\"matrix-client\"]\n\n[admin]\ntoken = \"{ADMIN_TOKEN}\""
            ),
        );
        spawn(&cfg).await
    } else {
        sql("DELETE FROM sessions");
        gw
    };
    assert_eq!(admin_devices(&gw, p).await, json!(["ALICEDEV01"]));
    let mut claims = logout_claims(&issuer);
    if !with_sid {
        claims.as_object_mut().unwrap().remove("sid");
    }
    let token = logout_token(&claims);
    let table = tables.join("+");
    for t in tables {
        sql(&format!("ALTER TABLE {t} RENAME TO {t}_gone"));
    }
    let (code, body) = post_logout(&gw, &token).await;
    for t in tables {
        sql(&format!("ALTER TABLE {t}_gone RENAME TO {t}"));
    }
    assert_eq!(
        code, 503,
        "{table}: a sign-out the store could not resolve must not be a 200: {body}"
    );
    // A device the store could not name stays bound for the retry; one only the cache named
    // is signed out at once (the revocation's fan-out may purge the cache before a retry).
    let left = if restart {
        json!(["ALICEDEV01"])
    } else {
        json!([])
    };
    assert_eq!(admin_devices(&gw, p).await, left, "{table}");
    // The store is back; the OP retries the same logout token, and it completes.
    let (code, body) = post_logout(&gw, &token).await;
    assert_eq!(code, 200, "{table}: {body}");
    assert_eq!(admin_devices(&gw, p).await, json!([]), "{table}");
}

#[tokio::test]
async fn logout_all_that_cannot_reach_the_homeserver_is_a_503_not_a_200() {
    // Dendrite: signing a user out ends with the appservice `logout/all`, which also reaches
    // the devices the gateway never bound. carol has none bound, so that call is all there is:
    // when the homeserver cannot be reached, nothing was signed out, and the operator (or the
    // OP) must hear so and retry.
    let f = Fakes::start().await;
    let dead = free_port();
    let cfg = f
        .config_hs(
            "kind = \"dendrite\"\nas_token = \"as-token\"",
            &format!("\n[admin]\ntoken = \"{ADMIN_TOKEN}\""),
        )
        .replace(&f.hs.uri(), &format!("http://127.0.0.1:{dead}"));
    let gw = spawn(&cfg).await;
    let p = "/admin/v1/users/@carol:example.org/logout";
    let (code, body) = admin(&gw, reqwest::Method::POST, p, None).await;
    assert_eq!(code, 503, "{body}");
    let (code, _) = admin(
        &gw,
        reqwest::Method::POST,
        "/admin/v1/users/@carol:example.org/deactivate",
        None,
    )
    .await;
    assert_eq!(
        code, 503,
        "a deactivation that reached no homeserver is not done"
    );
    // A homeserver that answers, even with an error, was reached: the bound devices (none
    // here) are what the gateway vouches for, so that stays a 200.
    let gw2 = spawn(&f.config_hs(
        "kind = \"dendrite\"\nas_token = \"as-token\"",
        &format!("\n[admin]\ntoken = \"{ADMIN_TOKEN}\""),
    ))
    .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/logout/all"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"errcode": "M_UNKNOWN"})))
        .with_priority(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    let (code, body) = admin(&gw2, reqwest::Method::POST, p, None).await;
    assert_eq!(code, 200, "{body}");
}

async fn admin_devices(gw: &TestGateway, p: &str) -> Value {
    admin(gw, reqwest::Method::GET, p, None).await.1["devices"].clone()
}

async fn admin(gw: &TestGateway, m: reqwest::Method, p: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = client()
        .request(m, gw.admin_url(p))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn admin_api_requires_its_token() {
    let (_f, gw, _) = setup("", "").await;
    let p = gw.admin_url("/admin/v1/users/@alice:example.org/devices");
    let r = client().get(&p).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(&p)
        .bearer_auth("wrong-token-xxxxxxxxxxxx")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    let r = client()
        .get(&p)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The admin API is never on the public listener.
    let r = client()
        .get(gw.url("/admin/v1/users/@alice:example.org/devices"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_ne!(
        r.status(),
        200,
        "the public listener treats it as a Matrix route, not the admin API"
    );
}

#[tokio::test]
async fn admin_api_without_a_token_configured_is_off() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let r = client()
        .get(gw.admin_url("/admin/v1/users/@a:example.org/devices"))
        .bearer_auth("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn admin_revoke_logout_purge_and_validation() {
    let (_f, gw, _) = setup("", "").await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    let (s, b) = admin(
        &gw,
        reqwest::Method::POST,
        "/admin/v1/sessions/revoke",
        Some(json!({"user_id": "@alice:example.org", "device_id": "ALICEDEV01"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["purged"], 1);
    assert_eq!(status(&gw, "alice-token").await, 401);
    assert_eq!(status(&gw, "bob-token").await, 200);
    let (s, _) = admin(
        &gw,
        reqwest::Method::POST,
        "/admin/v1/cache/purge",
        Some(json!({"token": "bob-token"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(status(&gw, "bob-token").await, 401);
    for (body, why) in [
        (json!({}), "nothing to purge"),
        (json!({"token": "a", "sub": "b"}), "two selectors"),
        (json!({"user_id": "@x:elsewhere.org"}), "foreign user"),
        (json!({"user_id": 5}), "wrong type"),
        // `null` is not "absent": a second selector set to null is still a second selector,
        // and a null issuer does not mean the primary one.
        (
            json!({"user_id": "@alice:example.org", "token": null}),
            "null selector",
        ),
        (json!({"sub": "sub-alice", "issuer": null}), "null issuer"),
    ] {
        let (s, b) = admin(
            &gw,
            reqwest::Method::POST,
            "/admin/v1/cache/purge",
            Some(body),
        )
        .await;
        assert_eq!(s, 400, "{why}: {b}");
    }
    let (s, b) = admin(
        &gw,
        reqwest::Method::PUT,
        "/admin/v1/users/@alice:example.org/subject",
        Some(json!({"sub": "sub-other", "issuer": null})),
    )
    .await;
    assert_eq!(s, 400, "a re-pin with a null issuer must be refused: {b}");
    let (s, _) = admin(&gw, reqwest::Method::POST, "/admin/v1/nope", None).await;
    assert_eq!(s, 404);
    let r = client()
        .post(gw.admin_url("/admin/v1/cache/purge"))
        .bearer_auth(ADMIN_TOKEN)
        .body("[1,2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn deactivation_tombstones_the_user() {
    let (f, gw, _) = setup("", "").await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    let (s, b) = admin(
        &gw,
        reqwest::Method::POST,
        "/admin/v1/users/@alice:example.org/deactivate",
        Some(json!({"erase": false})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["deactivated"], true);
    // The old token, and a fresh one from the OP, are both refused as deactivated.
    let r = client()
        .get(gw.url(SYNC))
        .bearer_auth("alice-token")
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 403, "M_USER_DEACTIVATED").await;
    let mut fresh = active("alice", &full_scope("ALICEDEV02"));
    fresh["sid"] = json!("sid-9");
    f.introspection("alice-fresh", fresh, 1).await;
    let r = client()
        .get(gw.url(SYNC))
        .bearer_auth("alice-fresh")
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 403, "M_USER_DEACTIVATED").await;
    // Lifting the tombstone lets a new sign-in through.
    let (s, b) = admin(
        &gw,
        reqwest::Method::DELETE,
        "/admin/v1/users/@alice:example.org/tombstone",
        None,
    )
    .await;
    assert_eq!((s, b["lifted"].as_bool()), (200, Some(true)));
    let mut newer = active("alice", &full_scope("ALICEDEV03"));
    newer["iat"] = json!(now() + 5);
    f.introspection("alice-newer", newer, 1).await;
    assert_eq!(status(&gw, "alice-newer").await, 200);
}

#[tokio::test]
async fn repin_moves_a_user_id_to_another_subject() {
    let (f, gw, _) = setup("", "").await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    let mut other = active("alice", &full_scope("NEWDEV0001"));
    other["sub"] = json!("new-sub");
    f.introspection("alice-new-sub", other, 1).await;
    let r = client()
        .get(gw.url(SYNC))
        .bearer_auth("alice-new-sub")
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    let (s, _) = admin(
        &gw,
        reqwest::Method::PUT,
        "/admin/v1/users/@alice:example.org/subject",
        Some(json!({"sub": "new-sub"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(status(&gw, "alice-new-sub").await, 200);
}

#[tokio::test]
async fn cross_signing_reset_approval_is_single_use() {
    let hs = "kind = \"synapse\"\nbinding = \"appservice_masquerade\"\nas_token = \"as-token\"";
    let (f, gw, _) = setup("", hs).await;
    for (m, p, body) in [
        ("POST", "/_matrix/client/v3/register", json!({})),
        ("PUT", "/_matrix/client/v3/devices/ALICEDEV01", json!({})),
        (
            "POST",
            "/_matrix/client/v3/keys/query",
            json!({"master_keys": {"@alice:example.org": {}}}),
        ),
    ] {
        Mock::given(method(m))
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .with_priority(1)
            .mount(&f.hs)
            .await;
    }
    let upload = || async {
        client()
            .post(gw.url("/_matrix/client/v3/keys/device_signing/upload"))
            .bearer_auth("alice-token")
            .json(&json!({"master_key": {}}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(upload().await, 401);
    let (s, b) = admin(
        &gw,
        reqwest::Method::POST,
        "/admin/v1/users/@alice:example.org/cross_signing_reset",
        Some(json!({"valid_for_secs": 120})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(upload().await, 200);
    assert_eq!(upload().await, 401, "an approval is used once");
}

#[tokio::test]
async fn revocation_proxy_forwards_unchanged_and_refuses_the_token() {
    let (f, gw, _) = setup("", "").await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .and(body_string(
            "token=alice-token&token_type_hint=access_token&client_id=matrix-client",
        ))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&f.op)
        .await;
    // The gateway advertises itself as the revocation endpoint.
    let meta: Value = client()
        .get(gw.url("/_matrix/client/v1/auth_metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let advertised = meta["revocation_endpoint"].as_str().unwrap().to_owned();
    assert!(
        advertised.ends_with("/_matrix-oidc-gateway/oauth2/revoke"),
        "{advertised}"
    );
    let r = client()
        .post(gw.url("/_matrix-oidc-gateway/oauth2/revoke"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=alice-token&token_type_hint=access_token&client_id=matrix-client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status(&gw, "alice-token").await, 401);
    assert_eq!(status(&gw, "bob-token").await, 200);
}

#[tokio::test]
async fn revoking_a_refresh_token_signs_the_device_out_upstream() {
    let hs = "kind = \"synapse\"\nbinding = \"appservice_masquerade\"\nas_token = \"as-token\"";
    let (f, gw, _) = setup("", hs).await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("PUT"))
        .and(path("/_matrix/client/v3/devices/ALICEDEV01"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({})))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/_matrix/client/v3/devices/ALICEDEV01"))
        .and(query_param("user_id", "@alice:example.org"))
        .and(header("authorization", "Bearer as-token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .with_priority(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    // The refresh token introspects as active, without an access-token type.
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains(
            "token=alice-refresh&",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "active": true, "sub": "sub-alice", "scope": full_scope("ALICEDEV01"), "sid": "sid-1"
        })))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&f.op)
        .await;
    let r = client()
        .post(gw.url("/_matrix-oidc-gateway/oauth2/revoke"))
        .form(&[
            ("token", "alice-refresh"),
            ("token_type_hint", "refresh_token"),
            ("client_id", "matrix-client"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // `.expect(1)` on the DELETE proves the device was signed out before the answer.
    assert_eq!(
        status(&gw, "alice-token").await,
        401,
        "the device's tokens are revoked too"
    );
}

/// How many revocations the gateway holds (its `revocations` gauge).
async fn revocations_held(gw: &TestGateway) -> u64 {
    gw.metric("matrix_oidc_gateway_revocations")
        .await
        .map(|v| v as u64)
        .expect("revocations gauge")
}

async fn revoke_through_proxy(gw: &TestGateway, form: &[(&str, &str)]) -> reqwest::Response {
    client()
        .post(gw.url("/_matrix-oidc-gateway/oauth2/revoke"))
        .form(form)
        .send()
        .await
        .unwrap()
}

/// Anyone can call the revocation proxy, and an OP acknowledges any token (RFC 7009 §2.2).
/// Made-up tokens must cost the OP at most one introspection each (none without client
/// authentication) and must not grow the revocation list: only what the gateway can attribute
/// to a session is recorded.
#[tokio::test]
async fn the_revocation_proxy_records_only_what_it_can_attribute() {
    let (f, gw, _) = setup("", "").await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"active": false})))
        .with_priority(10)
        .mount(&f.op)
        .await;
    let before = introspections(&f.op).await;
    for i in 0..20 {
        let token = format!("made-up-{i}");
        let r = revoke_through_proxy(
            &gw,
            &[("token", token.as_str()), ("client_id", "matrix-client")],
        )
        .await;
        assert_eq!(r.status(), 200);
        // Without any client authentication the OP refuses the request anyway: not even one
        // introspection is spent on it.
        let r = revoke_through_proxy(&gw, &[("token", token.as_str())]).await;
        assert_eq!(r.status(), 200, "the OP's answer is relayed");
    }
    assert!(
        introspections(&f.op).await - before <= 20,
        "{} introspections for 20 made-up tokens revoked with client authentication",
        introspections(&f.op).await - before
    );
    assert_eq!(
        revocations_held(&gw).await,
        0,
        "made-up tokens were recorded as revocations"
    );
    // A real session's token is recorded and refused.
    assert_eq!(status(&gw, "alice-token").await, 200);
    let r = revoke_through_proxy(
        &gw,
        &[("token", "alice-token"), ("client_id", "matrix-client")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(revocations_held(&gw).await >= 1);
    assert_eq!(status(&gw, "alice-token").await, 401);
}

/// The revocation proxy's lookups of tokens the gateway has not cached are charged to the
/// caller's new-token budget like a request's: past it, 429 with `Retry-After`, nothing
/// forwarded to the OP and no introspection; a cached token's revocation is not charged.
#[tokio::test]
async fn revocation_lookups_past_the_address_budget_get_429_and_nothing_is_forwarded() {
    let (f, gw, _) = setup(
        "[auth]\nnew_tokens_per_address = 1\nnew_tokens_burst = 2",
        "",
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"active": false})))
        .with_priority(10)
        .mount(&f.op)
        .await;
    // alice's token is cached by her own request (one unit of the burst of two).
    assert_eq!(status(&gw, "alice-token").await, 200);
    let revokes = || async {
        f.op.received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path() == "/revoke")
            .count()
    };
    let mut limited = None;
    for i in 0..10 {
        let token = format!("made-up-{i}");
        let r = revoke_through_proxy(
            &gw,
            &[("token", token.as_str()), ("client_id", "matrix-client")],
        )
        .await;
        if r.status() == 429 {
            limited = Some((i, r));
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let (i, r) = limited.expect("the budget ran out within ten made-up tokens");
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");
    let (introspected, forwarded) = (introspections(&f.op).await, revokes().await);
    assert_eq!(
        forwarded, i,
        "the refused revocation was forwarded to the OP"
    );
    assert_eq!(introspected, 1 + i, "the refused lookup reached the OP");
    // A cached token's revocation costs no budget: it is carried out.
    let r = revoke_through_proxy(
        &gw,
        &[("token", "alice-token"), ("client_id", "matrix-client")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        revokes().await,
        i + 1,
        "the cached token's revocation was forwarded"
    );
    // Refused from now on (401 once judged; while this address is over its budget the purged
    // token is new to the cache, so it may be a 429 first: never a 200).
    assert_ne!(status(&gw, "alice-token").await, 200);
}

/// The revocation list is bounded (`notifications.max_revocations`). When it is full, a
/// revocation the gateway could not record is not carried out at the OP either: 503, and the
/// client retries later. Nothing is acknowledged that the gateway does not enforce.
#[tokio::test]
async fn a_full_revocation_list_refuses_with_503_before_asking_the_op() {
    let (f, gw, _) = setup("[notifications]\nmax_revocations = 2", "").await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .and(wiremock::matchers::body_string_contains(
            "token=alice-token",
        ))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .and(wiremock::matchers::body_string_contains("token=bob-token"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&f.op)
        .await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    assert_eq!(status(&gw, "bob-token").await, 200);
    let r = revoke_through_proxy(
        &gw,
        &[("token", "alice-token"), ("client_id", "matrix-client")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&gw, "alice-token").await, 401);
    let r = revoke_through_proxy(
        &gw,
        &[("token", "bob-token"), ("client_id", "matrix-client")],
    )
    .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");
    assert_eq!(
        status(&gw, "bob-token").await,
        200,
        "bob was not revoked anywhere"
    );
}

/// A token whose subject does not own the user ID it maps to (a reassigned username, another
/// issuer's equal name) is refused on every request, but the gateway still caches what the OP
/// said of it. Revoking that token through the proxy must not sign out the real owner's device.
#[tokio::test]
async fn revoking_an_impostors_cached_token_does_not_sign_out_the_owner() {
    let (f, gw, _) = setup("", "").await;
    let mut impostor = active("alice", &full_scope("ALICEDEV01"));
    impostor["sub"] = json!("sub-mallory");
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains(
            "token=mallory-token&",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(impostor))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&f.op)
        .await;
    assert_eq!(
        status(&gw, "alice-token").await,
        200,
        "alice pins her user ID"
    );
    assert_eq!(
        status(&gw, "mallory-token").await,
        403,
        "the impostor is refused"
    );
    let r = revoke_through_proxy(
        &gw,
        &[("token", "mallory-token"), ("client_id", "matrix-client")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        status(&gw, "alice-token").await,
        200,
        "the impostor's revocation signed alice's device out"
    );
}

/// A verdict past its reuse window vouches for nobody at the revocation proxy: its token may
/// have been revoked at the OP since, and whoever presents it must not get to sign its former
/// owner's device out on the strength of the old verdict. Found by a hostile read of the
/// identity cache, which keeps valid verdicts a while past their window.
#[tokio::test]
async fn a_stale_cached_identity_does_not_attribute_a_revocation() {
    let (f, gw, _) = setup("", "").await;
    let was_alice = active("alice", &full_scope("ALICEDEV01"));
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains(
            "token=gone-token&",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(was_alice))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&f.op)
        .await;
    // Revoked at the OP since: inactive from then on.
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains(
            "token=gone-token&",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"active": false})))
        .with_priority(2)
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/revoke"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&f.op)
        .await;
    assert_eq!(status(&gw, "alice-token").await, 200);
    assert_eq!(status(&gw, "gone-token").await, 200, "cached as alice's");
    // Past the reuse window (cache.max_ttl, 120 s), inside the time an ended verdict is kept.
    gw.clock.advance(std::time::Duration::from_secs(150));
    let r = revoke_through_proxy(
        &gw,
        &[("token", "gone-token"), ("client_id", "matrix-client")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        status(&gw, "alice-token").await,
        200,
        "a stale cached verdict signed alice's device out"
    );
}

#[tokio::test]
async fn a_logout_of_an_impostor_signs_out_none_of_the_owners_devices() {
    // mallory's token maps to alice's user ID (a reassigned username at the OP) and names
    // alice's device (device IDs are public through keys/query). The gateway refuses it at the
    // subject pin, but its verified identity is cached; a logout of mallory's session or
    // subject must not sign alice's device out through it.
    for by_sid in [true, false] {
        let hs = "kind = \"dendrite\"\nas_token = \"as-token\"";
        let (f, gw, issuer) = setup("", hs).await;
        mount_alice_provisioning(&f.hs).await;
        Mock::given(method("POST"))
            .and(path("/_matrix/client/v3/logout"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
            .with_priority(1)
            .expect(0)
            .mount(&f.hs)
            .await;
        assert_eq!(status(&gw, "alice-token").await, 200);
        let mut mallory = active("alice", &full_scope("ALICEDEV01"));
        mallory["sub"] = json!("sub-mallory");
        mallory["sid"] = json!("sid-mallory");
        f.introspection("mallory-token", mallory, 1).await;
        assert_eq!(status(&gw, "mallory-token").await, 403);
        let mut claims = logout_claims(&issuer);
        claims["sub"] = json!("sub-mallory");
        claims["sid"] = json!("sid-mallory");
        if !by_sid {
            claims.as_object_mut().unwrap().remove("sid");
        }
        let (code, body) = post_logout(&gw, &logout_token(&claims)).await;
        assert_eq!(code, 200, "{body}");
        let logouts =
            f.hs.received_requests()
                .await
                .unwrap_or_default()
                .iter()
                .filter(|r| r.url.path().starts_with("/_matrix/client/v3/logout"))
                .count();
        assert_eq!(
            logouts, 0,
            "by sid: {by_sid}: mallory's logout signed alice's device out"
        );
        let p = "/admin/v1/users/@alice:example.org/devices";
        assert_eq!(
            admin_devices(&gw, p).await,
            json!(["ALICEDEV01"]),
            "by sid: {by_sid}: alice's binding was dropped"
        );
        assert_eq!(status(&gw, "alice-token").await, 200, "by sid: {by_sid}");
    }
}

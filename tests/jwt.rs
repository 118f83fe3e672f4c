//! JWT access tokens (RFC 9068) in-process: the real gateway against a wiremock OP publishing
//! discovery and a JWKS, with tokens signed by the test-only keys in `tests/fixtures/keys`.
//! The attack suite follows RFC 8725; every case must be a 401 `M_UNKNOWN_TOKEN` that never
//! reaches the homeserver.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

const AUD: &str = "urn:matrix:homeserver";
const SYNC: &str = "/_matrix/client/v3/sync";

fn jwk(name: &str) -> Value {
    serde_json::from_str(&fixture(&format!("{name}.jwk.json"))).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct Op {
    fakes: Fakes,
    issuer: String,
}

impl Op {
    async fn start(keys: &[&str]) -> Op {
        let fakes = Fakes::start().await;
        let issuer = format!("{}/", fakes.op.uri());
        Mock::given(method("GET"))
            .and(path("/.well-known/openid-configuration"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "issuer": issuer,
                "jwks_uri": format!("{}/jwks", fakes.op.uri()),
                "introspection_endpoint": format!("{}/introspect", fakes.op.uri()),
            })))
            .mount(&fakes.op)
            .await;
        let op = Op { fakes, issuer };
        op.publish(keys, 3600).await;
        op
    }

    /// Replaces what the OP publishes: discovery again, and `keys` as the only key set.
    async fn republish(&self, keys: &[&str], max_age: u64) {
        self.fakes.op.reset().await;
        Mock::given(method("GET"))
            .and(path("/.well-known/openid-configuration"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "issuer": self.issuer,
                "jwks_uri": format!("{}/jwks", self.fakes.op.uri()),
            })))
            .mount(&self.fakes.op)
            .await;
        self.publish(keys, max_age).await;
    }

    /// Adds a JWKS answer (callers `reset()` the fake first to replace an earlier one).
    async fn publish(&self, keys: &[&str], max_age: u64) {
        let set: Vec<Value> = keys.iter().map(|k| jwk(k)).collect();
        Mock::given(method("GET"))
            .and(path("/jwks"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header(
                        "Cache-Control",
                        format!("public, max-age={max_age}").as_str(),
                    )
                    .set_body_json(json!({"keys": set})),
            )
            .mount(&self.fakes.op)
            .await;
    }

    fn claims(&self, user: &str, scope: &str) -> Value {
        json!({
            "iss": self.issuer,
            "aud": AUD,
            "sub": format!("sub-{user}"),
            "username": user,
            "client_id": "client",
            "scope": scope,
            "iat": now(),
            "exp": now() + 300,
            "jti": format!("jti-{user}-{}", now()),
        })
    }

    async fn jwks_fetches(&self) -> usize {
        self.fakes
            .op
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.url.path() == "/jwks")
            .count()
    }
}

fn sign(alg: Algorithm, key: &str, kid: Option<&str>, typ: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    h.typ = typ.map(str::to_owned);
    let pem = fixture(&format!("{key}.pem"));
    let ek = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    encode(&h, claims, &ek).unwrap()
}

fn rs256(claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        "rsa1",
        Some("rsa-1"),
        Some("at+jwt"),
        claims,
    )
}

fn jwt_config(f: &Fakes, extra: &str) -> String {
    f.config(&format!("mode = \"jwt\"\naudiences = [\"{AUD}\"]\n{extra}"))
}

async fn get(gw: &TestGateway, token: &str) -> reqwest::Response {
    client()
        .get(gw.url(SYNC))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn valid_jwts_reach_the_homeserver_with_identity() {
    let op = Op::start(&["rsa1", "ec256", "ed25519"]).await;
    let gw = spawn(&jwt_config(&op.fakes, "")).await;
    let c = op.claims("alice", &full_scope("ALICEDEV01"));
    for token in [
        rs256(&c),
        sign(Algorithm::ES256, "ec256", Some("ec-1"), Some("at+jwt"), &c),
        sign(
            Algorithm::EdDSA,
            "ed25519",
            Some("ed-1"),
            Some("application/at+jwt"),
            &c,
        ),
    ] {
        let resp = get(&gw, &token).await;
        assert_eq!(resp.status(), 200);
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(
            echo["headers"]["x-matrix-user-id"],
            json!(["@alice:example.org"])
        );
        assert_eq!(echo["headers"]["x-matrix-device-id"], json!(["ALICEDEV01"]));
    }
    // `scp` as an array works like `scope`, guests are guests.
    let mut g = op.claims("guest1", "");
    g.as_object_mut().unwrap().remove("scope");
    g["scp"] = json!([
        "urn:matrix:client:api:guest",
        "urn:matrix:client:device:GDEV"
    ]);
    let guest = rs256(&g);
    let echo: Value = get(&gw, &guest).await.json().await.unwrap();
    assert_eq!(echo["headers"]["x-matrix-guest"], json!(["true"]));
    let r = client()
        .post(gw.url("/_matrix/client/v3/createRoom"))
        .bearer_auth(&guest)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 403, "M_GUEST_ACCESS_FORBIDDEN").await;
    // No introspection happened for any of them.
    assert_eq!(introspections(&op.fakes.op).await, 0);
}

#[tokio::test]
async fn attack_suite() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(&op.fakes, "")).await;
    let c = op.claims("alice", &full_scope("D1"));
    let good = rs256(&c);
    let (h, p, s) = {
        let mut it = good.split('.');
        (
            it.next().unwrap().to_owned(),
            it.next().unwrap().to_owned(),
            it.next().unwrap().to_owned(),
        )
    };
    let payload = |v: &Value| b64(&serde_json::to_vec(v).unwrap());
    let header = |v: Value| b64(&serde_json::to_vec(&v).unwrap());
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = c.clone();
        f(&mut v);
        v
    };
    // The RSA public key (PEM), as an attacker would use it for an HMAC "signature".
    let rsa_public_pem = fixture("rsa1.pub.pem");
    let hs256_with_public_key = {
        let mut hdr = Header::new(Algorithm::HS256);
        hdr.kid = Some("rsa-1".into());
        hdr.typ = Some("at+jwt".into());
        encode(
            &hdr,
            &c,
            &EncodingKey::from_secret(rsa_public_pem.as_bytes()),
        )
        .unwrap()
    };
    let attacker_jwk = jwk("attacker");
    let mut cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!("{}.{}.", header(json!({"alg": "none", "typ": "at+jwt"})), p),
        ),
        (
            "alg None",
            format!("{}.{}.", header(json!({"alg": "None", "typ": "at+jwt"})), p),
        ),
        ("HS256 with the RSA public key", hs256_with_public_key),
        (
            "tampered payload",
            format!(
                "{h}.{}.{s}",
                payload(&with(&|v| v["username"] = json!("bob")))
            ),
        ),
        ("expired", rs256(&with(&|v| v["exp"] = json!(now() - 60)))),
        (
            "no exp",
            rs256(&with(&|v| {
                v.as_object_mut().unwrap().remove("exp");
            })),
        ),
        (
            "nbf in the future",
            rs256(&with(&|v| v["nbf"] = json!(now() + 600))),
        ),
        (
            "iat in the future",
            rs256(&with(&|v| v["iat"] = json!(now() + 600))),
        ),
        (
            "wrong iss",
            rs256(&with(&|v| v["iss"] = json!("https://evil.example/"))),
        ),
        (
            "wrong aud",
            rs256(&with(&|v| v["aud"] = json!("urn:other"))),
        ),
        (
            "no aud",
            rs256(&with(&|v| {
                v.as_object_mut().unwrap().remove("aud");
            })),
        ),
        (
            "wrong typ",
            sign(Algorithm::RS256, "rsa1", Some("rsa-1"), Some("JWT"), &c),
        ),
        (
            "missing typ",
            sign(Algorithm::RS256, "rsa1", Some("rsa-1"), None, &c),
        ),
        (
            "ID token",
            sign(
                Algorithm::RS256,
                "rsa1",
                Some("rsa-1"),
                Some("at+jwt"),
                &with(&|v| {
                    v["nonce"] = json!("n");
                    v["at_hash"] = json!("x");
                }),
            ),
        ),
        (
            "logout token",
            sign(
                Algorithm::RS256,
                "rsa1",
                Some("rsa-1"),
                Some("at+jwt"),
                &with(&|v| {
                    v["events"] = json!({"http://schemas.openid.net/event/backchannel-logout": {}});
                }),
            ),
        ),
        (
            "logout typ",
            sign(
                Algorithm::RS256,
                "rsa1",
                Some("rsa-1"),
                Some("logout+jwt"),
                &c,
            ),
        ),
        ("embedded jwk header (attacker key, our kid)", {
            let mut hdr = Header::new(Algorithm::RS256);
            hdr.kid = Some("rsa-1".into());
            hdr.typ = Some("at+jwt".into());
            hdr.jwk = Some(serde_json::from_value(attacker_jwk.clone()).unwrap());
            hdr.jku = Some("https://evil.example/jwks".into());
            hdr.x5u = Some("https://evil.example/cert".into());
            let pem = fixture("attacker.pem");
            encode(
                &hdr,
                &c,
                &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            )
            .unwrap()
        }),
        ("payload not base64url", format!("{h}.~~~~.{s}")),
        (
            "payload not JSON",
            format!("{h}.{}.{s}", b64(b"not json at all")),
        ),
        ("truncated", format!("{h}.{p}")),
        ("truncated signature", format!("{h}.{p}.{}", &s[..10])),
        ("empty signature", format!("{h}.{p}.")),
        ("oversized", format!("{h}.{}.{s}", "A".repeat(5000))),
    ];
    cases.push((
        "garbage json header",
        format!("{}.{p}.{s}", b64(b"{not json")),
    ));
    for (name, token) in &cases {
        let r = get(&gw, token).await;
        let (_, body) = assert_matrix_error(r, 401, "M_UNKNOWN_TOKEN").await;
        assert_eq!(body["soft_logout"], false, "{name}");
    }
    assert!(f_hs_empty(&op).await, "an attack reached the homeserver");
    // The genuine token still works (the suite refused the attacks, not everything).
    assert_eq!(get(&gw, &good).await.status(), 200);
}

async fn f_hs_empty(op: &Op) -> bool {
    op.fakes.hs.received_requests().await.unwrap().is_empty()
}

#[tokio::test]
async fn unknown_kid_refetches_at_most_once_per_interval() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(&op.fakes, "jwks_refetch_interval = \"1h\"")).await;
    let c = op.claims("alice", &full_scope("D1"));
    assert_eq!(get(&gw, &rs256(&c)).await.status(), 200);
    let before = op.jwks_fetches().await;
    for i in 0..20 {
        let mut v = c.clone();
        v["jti"] = json!(format!("garbage-{i}"));
        let t = sign(
            Algorithm::RS256,
            "rsa1",
            Some(&format!("unknown-{i}")),
            Some("at+jwt"),
            &v,
        );
        // The first unknown kid is looked up at the OP: definitely unknown. The others come
        // while the refetch budget is spent: the gateway cannot tell, so 503, never 401.
        let (status, errcode) = if i == 0 {
            (401, "M_UNKNOWN_TOKEN")
        } else {
            (503, "M_UNKNOWN")
        };
        assert_matrix_error(get(&gw, &t).await, status, errcode).await;
    }
    let after = op.jwks_fetches().await;
    assert_eq!(
        after - before,
        1,
        "unknown kids must cause at most one refetch per interval"
    );
}

/// Junk JWTs with made-up `kid`s spend the refetch budget; a real token signed with a key the
/// OP has just rotated in then arrives. It must not get a 401 (a client logs out on that), and
/// once the budget allows a refetch it is accepted.
#[tokio::test]
async fn junk_kids_cannot_get_a_freshly_rotated_key_refused() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(&op.fakes, "jwks_refetch_interval = \"2s\"")).await;
    let c = op.claims("alice", &full_scope("D1"));
    assert_eq!(get(&gw, &rs256(&c)).await.status(), 200);
    let mut junk = c.clone();
    junk["jti"] = json!("junk");
    let junk = sign(
        Algorithm::RS256,
        "rsa1",
        Some("made-up"),
        Some("at+jwt"),
        &junk,
    );
    assert_matrix_error(get(&gw, &junk).await, 401, "M_UNKNOWN_TOKEN").await;

    // The OP rotates a key in right after the junk spent the budget.
    op.republish(&["rsa1", "rsa2"], 3600).await;
    let mut fresh = op.claims("bob", &full_scope("D2"));
    fresh["jti"] = json!("fresh");
    let fresh = sign(
        Algorithm::RS256,
        "rsa2",
        Some("rsa-2"),
        Some("at+jwt"),
        &fresh,
    );
    let (h, _) = assert_matrix_error(get(&gw, &fresh).await, 503, "M_UNKNOWN").await;
    assert!(h.contains_key("retry-after"));
    let mut accepted = false;
    for _ in 0..60 {
        if get(&gw, &fresh).await.status() == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the rotated key was never fetched");
}

#[tokio::test]
async fn key_rotation() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(
        &op.fakes,
        "jwks_refetch_interval = \"1s\"\njwks_refresh_min = \"1s\"\njwks_refresh_max = \"1s\"",
    ))
    .await;
    let c = op.claims("alice", &full_scope("D1"));
    assert_eq!(get(&gw, &rs256(&c)).await.status(), 200);

    // The OP publishes a new key and signs with it: accepted after one refetch.
    op.republish(&["rsa1", "rsa2"], 1).await;
    let mut c2 = c.clone();
    c2["jti"] = json!("rotated-1");
    let new_key = sign(Algorithm::RS256, "rsa2", Some("rsa-2"), Some("at+jwt"), &c2);
    assert_eq!(get(&gw, &new_key).await.status(), 200);

    // The old key is withdrawn: once a scheduled refresh has happened, fresh tokens signed
    // with it are refused.
    op.fakes.op.reset().await;
    op.publish(&["rsa2"], 1).await;
    // Wait for the gateway to have swapped its key set (its key-count gauge, set after the
    // swap), not for the OP to have seen the request: between the two, the old key still
    // validates.
    let keys = format!("matrix_oidc_gateway_jwks_keys{{issuer=\"{}\"}}", op.issuer);
    let mut swapped = false;
    for _ in 0..100 {
        if op.jwks_fetches().await >= 1 && gw.metric(&keys).await == Some(1.0) {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(swapped, "no scheduled JWKS refresh swapped the key set in");
    // A token signed with the withdrawn key is never accepted again. It is refused (401) once
    // the gateway may look the `kid` up again; until then it cannot tell a withdrawn key from
    // one rotated in since its last fetch, and answers 503.
    let mut c3 = c.clone();
    c3["jti"] = json!("old-key-after-rotation");
    let old_key = rs256(&c3);
    let mut refused = false;
    for _ in 0..60 {
        match get(&gw, &old_key).await.status().as_u16() {
            401 => {
                refused = true;
                break;
            }
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("a token of a withdrawn key got {other}"),
        }
    }
    assert!(refused, "a token of a withdrawn key was never refused");
    let mut c4 = c.clone();
    c4["jti"] = json!("rotated-2");
    let still = sign(Algorithm::RS256, "rsa2", Some("rsa-2"), Some("at+jwt"), &c4);
    assert_eq!(get(&gw, &still).await.status(), 200);
}

#[tokio::test]
async fn repeated_jwts_are_served_from_the_cache() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(&op.fakes, "")).await;
    let t = rs256(&op.claims("alice", &full_scope("D1")));
    for _ in 0..5 {
        assert_eq!(get(&gw, &t).await.status(), 200);
    }
    // Expiry still applies to the cached identity.
    gw.clock.advance(Duration::from_secs(301 + 30));
    assert_matrix_error(get(&gw, &t).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn typ_jwt_for_keycloak_style_tokens_still_refuses_id_tokens() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(
        &op.fakes,
        "token_types = [\"at+jwt\", \"JWT\"]",
    ))
    .await;
    let c = op.claims("alice", &full_scope("D1"));
    let access = sign(Algorithm::RS256, "rsa1", Some("rsa-1"), Some("JWT"), &c);
    assert_eq!(get(&gw, &access).await.status(), 200);
    let mut id = c.clone();
    id["nonce"] = json!("n-1");
    id["aud"] = json!("client");
    let id_token = sign(Algorithm::RS256, "rsa1", Some("rsa-1"), Some("JWT"), &id);
    assert_matrix_error(get(&gw, &id_token).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn a_missing_typ_is_only_accepted_when_configured() {
    let op = Op::start(&["rsa1"]).await;
    let c = op.claims("alice", &full_scope("D1"));
    let untyped = sign(Algorithm::RS256, "rsa1", Some("rsa-1"), None, &c);
    let strict = spawn(&jwt_config(&op.fakes, "")).await;
    assert_matrix_error(get(&strict, &untyped).await, 401, "M_UNKNOWN_TOKEN").await;
    let okta = spawn(&jwt_config(&op.fakes, "token_types = [\"at+jwt\", \"\"]")).await;
    assert_eq!(get(&okta, &untyped).await.status(), 200);
}

#[tokio::test]
async fn hmac_only_with_a_configured_secret() {
    let op = Op::start(&["rsa1"]).await;
    let secret = "a-long-shared-hmac-secret-for-tests-0123456789";
    let gw = spawn(&jwt_config(
        &op.fakes,
        &format!("algorithms = [\"HS256\", \"RS256\"]\nhmac_secret = \"{secret}\""),
    ))
    .await;
    let c = op.claims("alice", &full_scope("D1"));
    let mut hdr = Header::new(Algorithm::HS256);
    hdr.typ = Some("at+jwt".into());
    let good = encode(&hdr, &c, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
    assert_eq!(get(&gw, &good).await.status(), 200);
    let mut c2 = c.clone();
    c2["jti"] = json!("other");
    let bad = encode(&hdr, &c2, &EncodingKey::from_secret(b"wrong secret")).unwrap();
    assert_matrix_error(get(&gw, &bad).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn auto_mode_introspects_opaque_tokens_and_can_introspect_jwts_too() {
    let op = Op::start(&["rsa1"]).await;
    op.fakes
        .introspection("opaque-1", active("bob", &full_scope("BOBDEV")), 1)
        .await;
    let c = op.claims("alice", &full_scope("D1"));
    let token = rs256(&c);
    // The OP says the JWT was revoked.
    op.fakes
        .introspection(&token, json!({"active": false}), 1)
        .await;
    let gw = spawn(
        &jwt_config(&op.fakes, "introspect_jwts = true")
            .replace("mode = \"jwt\"", "mode = \"auto\""),
    )
    .await;
    let echo: Value = get(&gw, "opaque-1").await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@bob:example.org"])
    );
    assert_matrix_error(get(&gw, &token).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn jwt_only_issuers_refuse_opaque_tokens_without_asking_anyone() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(&op.fakes, "")).await;
    assert_matrix_error(get(&gw, "opaque-token").await, 401, "M_UNKNOWN_TOKEN").await;
    assert_eq!(introspections(&op.fakes.op).await, 0);
}

#[tokio::test]
async fn jwks_unavailable_is_503_not_401() {
    let fakes = Fakes::start().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&fakes.op)
        .await;
    let issuer = format!("{}/", fakes.op.uri());
    let gw = spawn(&jwt_config(&fakes, "")).await;
    let claims = json!({"iss": issuer, "aud": AUD, "sub": "s", "username": "a", "scope": full_scope("D"), "exp": now() + 60});
    let (h, _) = assert_matrix_error(get(&gw, &rs256(&claims)).await, 503, "M_UNKNOWN").await;
    assert!(h.contains_key("retry-after"));
}

#[tokio::test]
async fn readiness_waits_for_the_keys() {
    let fakes = Fakes::start().await;
    let issuer = format!("{}/", fakes.op.uri());
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": issuer,
            "jwks_uri": format!("{}/jwks", fakes.op.uri()),
        })))
        .mount(&fakes.op)
        .await;
    // The JWKS is not there yet.
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1_000_000)
        .mount(&fakes.op)
        .await;
    let gw = spawn(&jwt_config(&fakes, "jwks_refresh_min = \"1s\"")).await;
    let not_ready = client().get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503);
    let body: Value = not_ready.json().await.unwrap();
    assert_eq!(body["checks"]["jwks"], false);
    assert_eq!(
        client()
            .get(gw.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The OP publishes keys: readiness follows once the refresher has loaded them.
    fakes.op.reset().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{}/", fakes.op.uri()),
            "jwks_uri": format!("{}/jwks", fakes.op.uri()),
        })))
        .mount(&fakes.op)
        .await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [jwk("rsa1")]})))
        .mount(&fakes.op)
        .await;
    let mut ready = false;
    for _ in 0..100 {
        let r = client().get(gw.admin_url("/readyz")).send().await.unwrap();
        if r.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "the gateway never became ready after the keys appeared"
    );
}

#[tokio::test]
async fn a_failed_jwks_refresh_keeps_the_last_good_keys() {
    let op = Op::start(&["rsa1"]).await;
    let gw = spawn(&jwt_config(
        &op.fakes,
        "jwks_refresh_min = \"1s\"\njwks_refresh_max = \"1s\"",
    ))
    .await;
    let c = op.claims("alice", &full_scope("D1"));
    assert_eq!(get(&gw, &rs256(&c)).await.status(), 200);
    // The JWKS endpoint breaks; scheduled refreshes fail.
    op.fakes.op.reset().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&op.fakes.op)
        .await;
    for _ in 0..100 {
        if op.jwks_fetches().await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(op.jwks_fetches().await >= 1, "no refresh was attempted");
    let mut fresh = c.clone();
    fresh["jti"] = json!("after-a-failed-refresh");
    assert_eq!(get(&gw, &rs256(&fresh)).await.status(), 200);
}

#[tokio::test]
async fn jwts_are_routed_to_their_issuer_by_iss_before_any_key_is_used() {
    let a = Op::start(&["rsa1"]).await;
    let b = Op::start(&["ec256"]).await;
    let cfg = format!(
        "{}\n[[issuers]]\nissuer = \"{}\"\nmode = \"jwt\"\naudiences = [\"{AUD}\"]\n",
        jwt_config(&a.fakes, ""),
        b.issuer
    );
    let gw = spawn(&cfg).await;
    let from_a = rs256(&a.claims("alice", &full_scope("D1")));
    let from_b = sign(
        Algorithm::ES256,
        "ec256",
        Some("ec-1"),
        Some("at+jwt"),
        &b.claims("bob", &full_scope("D2")),
    );
    assert_eq!(get(&gw, &from_a).await.status(), 200);
    let echo: Value = get(&gw, &from_b).await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@bob:example.org"])
    );
    // Claiming issuer A with issuer B's key: A's keys are the only ones consulted.
    let forged = sign(
        Algorithm::ES256,
        "ec256",
        Some("ec-1"),
        Some("at+jwt"),
        &a.claims("mallory", &full_scope("D3")),
    );
    assert_matrix_error(get(&gw, &forged).await, 401, "M_UNKNOWN_TOKEN").await;
}

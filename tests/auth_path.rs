//! The authenticated path end to end in-process: the real gateway in front of wiremock fakes of
//! the OP (RFC 7662 introspection) and the homeserver (an echo). Every client-visible answer of
//! `shared/decisions.md` that the authenticated path produces is asserted with its exact body.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

const SYNC: &str = "/_matrix/client/v3/sync";

async fn get(gw: &TestGateway, p: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = client().get(gw.url(p));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.expect("request")
}

#[tokio::test]
async fn valid_token_reaches_the_homeserver_with_identity_headers() {
    let f = Fakes::start().await;
    f.introspection("tok-alice", active("alice", &full_scope("ALICEDEV01")), 1)
        .await;
    let gw = spawn(&f.config("")).await;

    let resp = get(&gw, SYNC, Some("tok-alice")).await;
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    let h = &echo["headers"];
    assert_eq!(h["x-matrix-user-id"], json!(["@alice:example.org"]));
    assert_eq!(h["x-matrix-device-id"], json!(["ALICEDEV01"]));
    assert_eq!(h["x-matrix-guest"], json!(["false"]));
    assert_eq!(h["x-oidc-subject"], json!(["sub-alice"]));
    assert_eq!(h["x-matrix-scope"], json!([full_scope("ALICEDEV01")]));
    assert!(
        h.get("authorization").is_none(),
        "client token forwarded: {h}"
    );
    assert!(h.get("x-matrix-identity-signature").is_none());
}

#[tokio::test]
async fn introspection_request_has_the_required_shape() {
    let f = Fakes::start().await;
    // client_secret_basic: base64("gateway:gateway-secret")
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(header(
            "authorization",
            "Basic Z2F0ZXdheTpnYXRld2F5LXNlY3JldA==",
        ))
        .and(header("x-mas-supports-device-id", "1"))
        .and(header("accept", "application/json"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(wiremock::matchers::body_string(
            "token=tok&token_type_hint=access_token",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(active("a", &full_scope("D1"))))
        .expect(1)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("tok")).await.status(), 200);
}

#[tokio::test]
async fn client_secret_post_and_bearer_client_auth() {
    for (auth, matcher_header, body) in [
        (
            "client_secret_post",
            None,
            "token=tok&token_type_hint=access_token&client_id=gateway&client_secret=gateway-secret",
        ),
        (
            "bearer",
            Some("Bearer gateway-secret"),
            "token=tok&token_type_hint=access_token",
        ),
    ] {
        let f = Fakes::start().await;
        let mut m = Mock::given(method("POST"))
            .and(path("/introspect"))
            .and(wiremock::matchers::body_string(body));
        if let Some(h) = matcher_header {
            m = m.and(header("authorization", h));
        }
        m.respond_with(ResponseTemplate::new(200).set_body_json(active("a", &full_scope("D1"))))
            .expect(1)
            .mount(&f.op)
            .await;
        let gw = spawn(&f.config(&format!("client_auth = \"{auth}\""))).await;
        assert_eq!(get(&gw, SYNC, Some("tok")).await.status(), 200, "{auth}");
    }
}

#[tokio::test]
async fn introspection_endpoint_comes_from_discovery() {
    let f = Fakes::start().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{}/", f.op.uri()),
            "introspection_endpoint": format!("{}/oauth2/introspect", f.op.uri()),
        })))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/oauth2/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(active("a", &full_scope("D1"))))
        .expect(1)
        .mount(&f.op)
        .await;
    let cfg = f.config("").replace(
        &format!("introspection_endpoint = \"{}/introspect\"\n", f.op.uri()),
        "",
    );
    let gw = spawn(&cfg).await;
    assert_eq!(get(&gw, SYNC, Some("tok")).await.status(), 200);
}

#[tokio::test]
async fn discovery_naming_another_issuer_is_an_op_failure() {
    let f = Fakes::start().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": "https://evil.example/",
            "introspection_endpoint": format!("{}/introspect", f.op.uri()),
        })))
        .mount(&f.op)
        .await;
    f.introspection("tok", active("a", &full_scope("D1")), 0)
        .await;
    let cfg = f.config("").replace(
        &format!("introspection_endpoint = \"{}/introspect\"\n", f.op.uri()),
        "",
    );
    let gw = spawn(&cfg).await;
    let (h, _) = assert_matrix_error(get(&gw, SYNC, Some("tok")).await, 503, "M_UNKNOWN").await;
    assert!(h.contains_key("retry-after"));
}

#[tokio::test]
async fn missing_and_malformed_tokens() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;

    let (_, body) = assert_matrix_error(get(&gw, SYNC, None).await, 401, "M_MISSING_TOKEN").await;
    assert_eq!(
        body,
        json!({"errcode": "M_MISSING_TOKEN", "error": "Missing access token (gateway)"})
    );

    for bad in ["Basic abc", "Bearer", "Bearer a b", "Token x"] {
        let r = client()
            .get(gw.url(SYNC))
            .header("Authorization", bad)
            .send()
            .await
            .unwrap();
        assert_matrix_error(r, 401, "M_MISSING_TOKEN").await;
    }
    let both = client()
        .get(gw.url(&format!("{SYNC}?access_token=a")))
        .bearer_auth("b")
        .send()
        .await
        .unwrap();
    let (_, body) = assert_matrix_error(both, 401, "M_MISSING_TOKEN").await;
    assert_eq!(body["error"], "Access token given more than once (gateway)");
    assert_eq!(introspections(&f.op).await, 0, "OP was asked");
}

#[tokio::test]
async fn query_token_is_accepted_and_never_forwarded() {
    let f = Fakes::start().await;
    f.introspection("qtok", active("alice", &full_scope("D1")), 1)
        .await;
    let gw = spawn(&f.config("")).await;
    let resp = get(
        &gw,
        &format!("{SYNC}?since=s1&access_token=qtok&timeout=0"),
        None,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["query"], "since=s1&timeout=0");
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@alice:example.org"])
    );
}

#[tokio::test]
async fn query_token_can_be_switched_off() {
    let f = Fakes::start().await;
    f.introspection("qtok", active("alice", &full_scope("D1")), 0)
        .await;
    let cfg = f.config("").replace(
        "[[issuers]]",
        "[auth]\nallow_query_token = false\n\n[[issuers]]",
    );
    let gw = spawn(&cfg).await;
    let resp = get(&gw, &format!("{SYNC}?access_token=qtok"), None).await;
    assert_matrix_error(resp, 401, "M_MISSING_TOKEN").await;
    // On a public route the refused parameter is still stripped before forwarding.
    let resp = get(&gw, "/_matrix/client/versions?access_token=qtok&x=1", None).await;
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["query"], "x=1");
}

#[tokio::test]
async fn refused_tokens_get_unknown_token_with_soft_logout_false() {
    let f = Fakes::start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut refresh = active("a", &full_scope("D1"));
    refresh["token_type"] = json!("refresh_token");
    let mut untyped = active("a", &full_scope("D1"));
    untyped.as_object_mut().unwrap().remove("token_type");
    let mut othertype = active("a", &full_scope("D1"));
    othertype["token_type"] = json!("urn:ietf:params:oauth:token-type:id_token");
    let mut expired = active("a", &full_scope("D1"));
    expired["exp"] = json!(now - 10);
    let cases = [
        ("inactive", json!({"active": false})),
        ("refresh", refresh),
        ("untyped", untyped),
        ("othertype", othertype),
        ("expired", expired),
        ("noscope", active("a", "openid urn:matrix:client:device:D1")),
        (
            "twodevices",
            active(
                "a",
                "urn:matrix:client:api:* urn:matrix:client:device:AAAA urn:matrix:org.matrix.msc2967.client:device:BBBB",
            ),
        ),
        ("baddevice", active("a", "urn:matrix:client:api:* urn:matrix:client:device:")),
    ];
    for (tok, answer) in &cases {
        f.introspection(tok, answer.clone(), 1).await;
    }
    let gw = spawn(&f.config("")).await;
    for (tok, _) in &cases {
        let (_, body) =
            assert_matrix_error(get(&gw, SYNC, Some(tok)).await, 401, "M_UNKNOWN_TOKEN").await;
        assert_eq!(
            body,
            json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token (gateway)", "soft_logout": false}),
            "{tok}"
        );
    }
    assert!(
        f.hs.received_requests().await.unwrap().is_empty(),
        "a refused request reached the homeserver"
    );
}

#[tokio::test]
async fn untyped_answers_can_be_accepted_for_ops_that_omit_token_type() {
    let f = Fakes::start().await;
    let mut untyped = active("a", &full_scope("D1"));
    untyped.as_object_mut().unwrap().remove("token_type");
    f.introspection("u", untyped, 1).await;
    let gw = spawn(&f.config("require_token_type = false")).await;
    assert_eq!(get(&gw, SYNC, Some("u")).await.status(), 200);
}

#[tokio::test]
async fn unstable_scopes_are_accepted() {
    let f = Fakes::start().await;
    f.introspection(
        "u",
        active(
            "bob",
            "urn:matrix:org.matrix.msc2967.client:api:* urn:matrix:org.matrix.msc2967.client:device:BOBDEV",
        ),
        1,
    )
    .await;
    let gw = spawn(&f.config("")).await;
    let echo: Value = get(&gw, SYNC, Some("u")).await.json().await.unwrap();
    assert_eq!(echo["headers"]["x-matrix-device-id"], json!(["BOBDEV"]));
}

#[tokio::test]
async fn explicit_device_id_wins() {
    let f = Fakes::start().await;
    let mut a = active("bob", &full_scope("SCOPEDEV"));
    a["device_id"] = json!("EXPLICIT");
    f.introspection("t", a, 1).await;
    let gw = spawn(&f.config("")).await;
    let echo: Value = get(&gw, SYNC, Some("t")).await.json().await.unwrap();
    assert_eq!(echo["headers"]["x-matrix-device-id"], json!(["EXPLICIT"]));
}

#[tokio::test]
async fn guest_tokens_only_reach_the_guest_list() {
    let f = Fakes::start().await;
    f.introspection("g", active("guest1", "urn:matrix:client:api:guest"), 1)
        .await;
    let gw = spawn(&f.config("")).await;

    let ok = get(&gw, SYNC, Some("g")).await;
    assert_eq!(ok.status(), 200);
    let echo: Value = ok.json().await.unwrap();
    assert_eq!(echo["headers"]["x-matrix-guest"], json!(["true"]));

    let r = client()
        .post(gw.url("/_matrix/client/v3/createRoom"))
        .bearer_auth("g")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (h, body) = assert_matrix_error(r, 403, "M_GUEST_ACCESS_FORBIDDEN").await;
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer error=\"insufficient_scope\""));
    assert!(body.get("soft_logout").is_none());
    // capabilities is only on Synapse's wider list
    let r = get(&gw, "/_matrix/client/v3/capabilities", Some("g")).await;
    assert_matrix_error(r, 403, "M_GUEST_ACCESS_FORBIDDEN").await;
    // The `headers` binding tells the homeserver that the caller is a guest, so its own
    // guest rules decide a join.
    let r = client()
        .post(gw.url("/_matrix/client/v3/rooms/!r:example.org/join"))
        .bearer_auth("g")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-matrix-guest"], json!(["true"]));
}

#[tokio::test]
async fn synapse_guest_list_is_an_option() {
    let f = Fakes::start().await;
    f.introspection(
        "g",
        active("guest1", "urn:matrix:org.matrix.msc2967.client:api:guest"),
        1,
    )
    .await;
    let cfg = f.config("").replace(
        "[[issuers]]",
        "[auth]\nguest_endpoints = \"synapse\"\n\n[[issuers]]",
    );
    let gw = spawn(&cfg).await;
    assert_eq!(
        get(&gw, "/_matrix/client/v3/capabilities", Some("g"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn unusable_user_claim_is_a_server_error() {
    let f = Fakes::start().await;
    f.introspection("bad", active("Not A Localpart", &full_scope("D1")), 1)
        .await;
    let mut no_claims = json!({"active": true, "scope": full_scope("D1"), "token_type": "Bearer"});
    no_claims["sub"] = json!("UPPER");
    f.introspection("none", no_claims, 1).await;
    let gw = spawn(&f.config("")).await;
    let (_, body) = assert_matrix_error(get(&gw, SYNC, Some("bad")).await, 500, "M_UNKNOWN").await;
    assert!(body.get("soft_logout").is_none());
    assert_matrix_error(get(&gw, SYNC, Some("none")).await, 500, "M_UNKNOWN").await;
}

#[tokio::test]
async fn oversized_token_is_refused_without_asking_the_op() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let long = "a".repeat(4097);
    assert_matrix_error(get(&gw, SYNC, Some(&long)).await, 401, "M_UNKNOWN_TOKEN").await;
    assert_eq!(introspections(&f.op).await, 0);
}

#[tokio::test]
async fn cache_hit_skips_the_op() {
    let f = Fakes::start().await;
    f.introspection("c", active("alice", &full_scope("D1")), 1)
        .await;
    let gw = spawn(&f.config("")).await;
    for _ in 0..5 {
        assert_eq!(get(&gw, SYNC, Some("c")).await.status(), 200);
    }
    // `.expect(1)` is verified when the fakes drop
}

#[tokio::test]
async fn negative_verdicts_are_cached_for_the_negative_ttl() {
    let f = Fakes::start().await;
    f.introspection("n", json!({"active": false}), 2).await;
    let gw = spawn(&f.config("")).await;
    for _ in 0..3 {
        assert_matrix_error(get(&gw, SYNC, Some("n")).await, 401, "M_UNKNOWN_TOKEN").await;
    }
    gw.clock.advance(Duration::from_secs(11)); // negative_ttl = 10s
    assert_matrix_error(get(&gw, SYNC, Some("n")).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn cached_token_expires_at_its_exp_without_a_new_introspection() {
    let f = Fakes::start().await;
    let mut a = active("alice", &full_scope("D1"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    a["exp"] = json!(now + 60);
    f.introspection("e", a, 1).await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("e")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(30));
    assert_eq!(get(&gw, SYNC, Some("e")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(31));
    assert_matrix_error(get(&gw, SYNC, Some("e")).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn expires_in_bounds_the_cache_too() {
    let f = Fakes::start().await;
    let mut a = active("alice", &full_scope("D1"));
    a.as_object_mut().unwrap().remove("exp");
    a["expires_in"] = json!(20);
    f.introspection("ei", a, 1).await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("ei")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(21));
    assert_matrix_error(get(&gw, SYNC, Some("ei")).await, 401, "M_UNKNOWN_TOKEN").await;
}

#[tokio::test]
async fn extreme_times_from_the_op_neither_overflow_nor_pass_when_past() {
    let f = Fakes::start().await;
    let with = |fields: Value| {
        let mut a = active("alice", &full_scope("D1"));
        for (k, v) in fields.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    // "max-exp" is asked twice: once now, once after max_ttl (a far-future `exp` does not
    // extend the cache past it).
    for (token, fields, times) in [
        ("max-exp", json!({"exp": i64::MAX}), 2),
        ("max-expires-in", json!({"expires_in": i64::MAX}), 1),
        ("neg-iat", json!({"iat": i64::MIN}), 1),
        ("skewed-iat", json!({"iat": now_secs() + 10}), 1),
    ] {
        f.introspection(token, with(fields), times).await;
    }
    f.introspection("min-exp", with(json!({"exp": i64::MIN})), 1)
        .await;
    f.introspection("neg-expires-in", with(json!({"expires_in": -5})), 1)
        .await;
    // An `iat` in the future would put the token out of reach of every revocation (they
    // cover what was issued before them) until then. Past the leeway (30 s) the OP's answer
    // contradicts the gateway's clock: an OP-side fault, 503 (never a 401 that signs the
    // client out), not cached.
    f.introspection("max-iat", with(json!({"iat": i64::MAX})), 1)
        .await;
    f.introspection("ahead-iat", with(json!({"iat": now_secs() + 3600})), 1)
        .await;
    // A token known valid whose re-check comes back with an `iat` far ahead (the OP's clock
    // stepped) keeps working, with the issue time it had.
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains("token=stepped&"))
        .respond_with(ResponseTemplate::new(200).set_body_json(with(json!({}))))
        .with_priority(1)
        .up_to_n_times(1)
        .expect(1)
        .mount(&f.op)
        .await;
    f.introspection("stepped", with(json!({"iat": now_secs() + 3600})), 1)
        .await;
    let gw = spawn(&f.config("")).await;
    for token in [
        "max-exp",
        "max-expires-in",
        "neg-iat",
        "skewed-iat",
        "stepped",
    ] {
        assert_eq!(get(&gw, SYNC, Some(token)).await.status(), 200, "{token}");
    }
    for token in ["min-exp", "neg-expires-in"] {
        assert_matrix_error(get(&gw, SYNC, Some(token)).await, 401, "M_UNKNOWN_TOKEN").await;
    }
    for token in ["max-iat", "ahead-iat"] {
        assert_matrix_error(get(&gw, SYNC, Some(token)).await, 503, "M_UNKNOWN").await;
    }
    gw.clock.advance(Duration::from_secs(121));
    assert_eq!(get(&gw, SYNC, Some("max-exp")).await.status(), 200);
    assert_eq!(get(&gw, SYNC, Some("stepped")).await.status(), 200);
}

#[tokio::test]
async fn active_entries_are_reintrospected_after_max_ttl() {
    let f = Fakes::start().await;
    f.introspection("m", active("alice", &full_scope("D1")), 2)
        .await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("m")).await.status(), 200);
    // Before the last quarter of the window (which would start a background re-check).
    gw.clock.advance(Duration::from_secs(80));
    assert_eq!(get(&gw, SYNC, Some("m")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(41)); // past max_ttl = 120s
    assert_eq!(get(&gw, SYNC, Some("m")).await.status(), 200);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_introspection() {
    let f = Fakes::start().await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(active("alice", &full_scope("D1")))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("")).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let url = gw.url(SYNC);
        tasks.push(tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth("shared-new-token")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test]
async fn op_failures_are_503_and_never_cached() {
    let f = Fakes::start().await;
    // Four failures in a row (500, garbage, wrong type, not an object), then success.
    for (i, resp) in [
        ResponseTemplate::new(500),
        ResponseTemplate::new(200).set_body_string("<html>oops</html>"),
        ResponseTemplate::new(200).set_body_json(json!({"active": "yes"})),
        ResponseTemplate::new(200).set_body_json(json!([true])),
    ]
    .into_iter()
    .enumerate()
    {
        Mock::given(method("POST"))
            .and(path("/introspect"))
            .respond_with(resp)
            .up_to_n_times(1)
            .with_priority(1 + i as u8)
            .expect(1)
            .mount(&f.op)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(active("alice", &full_scope("D1"))))
        .with_priority(10)
        .expect(1)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("")).await;
    for _ in 0..4 {
        let (h, body) =
            assert_matrix_error(get(&gw, SYNC, Some("t")).await, 503, "M_UNKNOWN").await;
        assert_eq!(h["retry-after"], "5");
        assert_eq!(
            body["error"],
            "Unable to introspect the access token (gateway)"
        );
    }
    assert_eq!(get(&gw, SYNC, Some("t")).await.status(), 200);
}

#[tokio::test]
async fn op_timeout_and_oversized_answers_are_503() {
    let f = Fakes::start().await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains("token=slow&"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(active("a", &full_scope("D")))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&f.op)
        .await;
    let mut big = active("a", &full_scope("D"));
    big["padding"] = json!("x".repeat(2 * 1024 * 1024));
    f.introspection("big", big, 1).await;
    let gw = spawn(&f.config("")).await; // timeout = 2s
    assert_matrix_error(get(&gw, SYNC, Some("slow")).await, 503, "M_UNKNOWN").await;
    assert_matrix_error(get(&gw, SYNC, Some("big")).await, 503, "M_UNKNOWN").await;
}

#[tokio::test]
async fn op_unreachable_is_503() {
    let f = Fakes::start().await;
    let cfg = f.config("").replace(
        &format!("introspection_endpoint = \"{}/introspect\"", f.op.uri()),
        &format!(
            "introspection_endpoint = \"http://127.0.0.1:{}/introspect\"",
            free_port()
        ),
    );
    let gw = spawn(&cfg).await;
    assert_matrix_error(get(&gw, SYNC, Some("t")).await, 503, "M_UNKNOWN").await;
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_homeserver() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    let gw = spawn(&f.config("")).await;
    for (p, token) in [
        (SYNC, Some("t")),
        ("/_matrix/client/versions", None),
        ("/_matrix/federation/v1/version", None),
    ] {
        let mut r = client()
            .get(gw.url(p))
            .header("X-Matrix-User-Id", "@mallory:example.org")
            .header("x-matrix-user-id", "@mallory2:example.org")
            .header("X-MATRIX-DEVICE-ID", "EVIL")
            .header("X-Matrix-Scope", "urn:matrix:client:api:*")
            .header("X-Matrix-Guest", "false")
            .header("X-OIDC-Subject", "mallory")
            .header("X-Matrix-Identity-Signature", "t=1,v1=00")
            // Spellings that CGI/WSGI and nginx's underscores_in_headers merge with the above.
            .header("X_Matrix_User_Id", "@mallory3:example.org")
            .header("x-matrix_device-id", "EVIL")
            .header("X_OIDC_SUBJECT", "mallory");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let echo: Value = r.send().await.unwrap().json().await.unwrap();
        let h = echo["headers"].as_object().unwrap();
        let users = h.get("x-matrix-user-id").cloned().unwrap_or(json!([]));
        assert!(!users.to_string().contains("mallory"), "{p}: {users}");
        assert!(!h
            .get("x-matrix-device-id")
            .map(|v| v.to_string())
            .unwrap_or_default()
            .contains("EVIL"));
        assert!(!h
            .get("x-oidc-subject")
            .map(|v| v.to_string())
            .unwrap_or_default()
            .contains("mallory"));
        assert!(h.get("x-matrix-identity-signature").is_none(), "{p}");
        let underscored: Vec<&String> = h.keys().filter(|k| k.contains('_')).collect();
        assert!(
            underscored.is_empty(),
            "{p}: {underscored:?} reached the homeserver"
        );
        if token.is_none() {
            assert!(h.get("x-matrix-user-id").is_none(), "{p}");
            assert!(h.get("x-matrix-scope").is_none(), "{p}");
        }
    }
}

#[tokio::test]
async fn identity_signature_is_added_with_a_secret() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    let secret = "0123456789abcdef0123456789abcdef";
    let gw = spawn(&f.config(&format!(
        "\n[identity_headers]\nsigning_secret = \"{secret}\""
    )))
    .await;
    let echo: Value = get(&gw, SYNC, Some("t")).await.json().await.unwrap();
    let sig = echo["headers"]["x-matrix-identity-signature"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let ts: u64 = sig
        .split(',')
        .next()
        .unwrap()
        .trim_start_matches("t=")
        .parse()
        .unwrap();
    let identity: matrix_oidc_gateway::auth::Identity = matrix_oidc_gateway::auth::IdentityParts {
        user_id: "@alice:example.org".into(),
        device_id: Some("D1".into()),
        scope: full_scope("D1"),
        access: matrix_oidc_gateway::auth::Access::Full,
        issuer: "https://op.example.org/".into(),
        subject: "sub-alice".into(),
        session_id: None,
        expires_at_ms: None,
        token_id: None,
        issued_at_ms: 0,
    }
    .into();
    let expected = matrix_oidc_gateway::gateway::headers::signature(
        secret.as_bytes(),
        ts,
        "GET",
        SYNC,
        &identity,
    );
    assert_eq!(sig, expected);
}

#[tokio::test]
async fn public_routes_pass_without_a_token_but_verify_one_that_is_present() {
    let f = Fakes::start().await;
    f.introspection("good", active("alice", &full_scope("D1")), 1)
        .await;
    f.introspection("bad", json!({"active": false}), 1).await;
    let gw = spawn(&f.config("")).await;
    for p in [
        "/_matrix/client/versions",
        "/.well-known/matrix/server",
        "/_matrix/media/v3/download/example.org/abc",
        "/_matrix/client/r0/publicRooms",
        "/_matrix/client/v3/profile/@alice:example.org",
    ] {
        assert_eq!(get(&gw, p, None).await.status(), 200, "{p}");
    }
    let echo: Value = get(&gw, "/_matrix/client/versions", Some("good"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@alice:example.org"])
    );
    assert_matrix_error(
        get(&gw, "/_matrix/client/versions", Some("bad")).await,
        401,
        "M_UNKNOWN_TOKEN",
    )
    .await;
}

#[tokio::test]
async fn federation_passes_through_untouched() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let auth =
        "X-Matrix origin=\"other.org\",destination=\"example.org\",key=\"ed25519:1\",sig=\"abc\"";
    let r = client()
        .put(gw.url("/_matrix/federation/v1/send/txn1"))
        .header("Authorization", auth)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["authorization"], json!([auth]));
    assert_eq!(introspections(&f.op).await, 0);
}

#[tokio::test]
async fn preflight_is_answered_without_a_token() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let r = client()
        .request(reqwest::Method::OPTIONS, gw.url(SYNC))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(f.hs.received_requests().await.unwrap().is_empty());
}

/// A gateway whose homeserver address has nothing listening; token `t` is alice's.
async fn gateway_with_homeserver_down(f: &Fakes) -> TestGateway {
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    let cfg = f
        .config("")
        .replace(&f.hs.uri(), &format!("http://127.0.0.1:{}", free_port()));
    spawn(&cfg).await
}

#[tokio::test]
async fn homeserver_down_is_a_502_json() {
    let f = Fakes::start().await;
    let gw = gateway_with_homeserver_down(&f).await;
    let (_, body) = assert_matrix_error(get(&gw, SYNC, Some("t")).await, 502, "M_UNKNOWN").await;
    assert_eq!(body["error"], "The homeserver is unreachable (gateway)");
}

#[tokio::test]
async fn a_502_either_keeps_the_connection_or_says_it_closes_it() {
    // Found by bench/soak.sh: while the homeserver was down, every second request on a
    // keep-alive connection was dropped without an answer. Pingora closes the client connection
    // after an upstream failure; the 502 said nothing, so clients wrote their next request into
    // a closing connection.
    let f = Fakes::start().await;
    let gw = gateway_with_homeserver_down(&f).await;
    let req = format!("GET {SYNC} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\r\n\r\n");
    let answers = raw_sequence(gw.addr, &[req.as_bytes(), req.as_bytes()]).await;
    assert!(answers[0].starts_with("HTTP/1.1 502"), "{}", answers[0]);
    let says_close = answers[0]
        .to_ascii_lowercase()
        .contains("\r\nconnection: close\r\n");
    assert!(
        says_close || answers.len() == 2,
        "the connection was dropped after a 502 that did not say `Connection: close`: {answers:?}"
    );
}

#[tokio::test]
async fn errors_keep_the_connection_alive() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    // Two requests, one after the other, on one connection: both answered, none closes it.
    let one =
        "POST /_matrix/client/v3/createRoom HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
    let out = raw_sequence(gw.addr, &[one.as_bytes(), one.as_bytes()]).await;
    assert_eq!(out.len(), 2, "{out:?}");
    for o in &out {
        assert!(o.starts_with("HTTP/1.1 401"), "{o}");
        assert!(!o.to_ascii_lowercase().contains("connection: close"), "{o}");
    }
}

#[tokio::test]
async fn absolute_form_targets_are_refused() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let out = raw_exchange(
        gw.addr,
        b"POST http://evil/_matrix/client/v3/register HTTP/1.1\r\nHost: evil\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("M_UNRECOGNIZED"), "{out}");
    assert!(f.hs.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_and_travel_both_ways() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    let gw = spawn(&f.config("")).await;
    let r = client()
        .get(gw.url(SYNC))
        .bearer_auth("t")
        .header("X-Request-Id", "trace-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-123");
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-request-id"], json!(["trace-123"]));
    // none, or a malformed one: a fresh ID, also on gateway-written answers
    for given in [None, Some("bad id with spaces")] {
        let mut req = client().get(gw.url(SYNC));
        if let Some(g) = given {
            req = req.header("X-Request-Id", g);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 24, "{id}");
    }
}

/// A flood of distinct tokens (each a first sighting, so each would cost an OP call) meets a
/// bound: at most `max_concurrent_introspections` calls in flight and `introspection_queue`
/// waiting; the rest are shed with 503 and `Retry-After` at once (never 401), and a user whose
/// identity is cached keeps getting through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_new_tokens_is_bounded_and_shed_with_503() {
    let f = Fakes::start().await;
    f.introspection("cached", active("alice", &full_scope("D1")), 1)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"active": false}))
                .set_delay(Duration::from_millis(1500)),
        )
        .with_priority(10)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("max_concurrent_introspections = 2\nintrospection_queue = 1")).await;
    assert_eq!(get(&gw, SYNC, Some("cached")).await.status(), 200);

    let mut flood = Vec::new();
    for i in 0..20 {
        let url = gw.url(SYNC);
        flood.push(tokio::spawn(async move {
            let r = client()
                .get(url)
                .bearer_auth(format!("garbage-{i}"))
                .send()
                .await
                .unwrap();
            let retry = r.headers().get("retry-after").is_some();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, retry, body)
        }));
    }
    // While the flood waits on the OP, the cached user is answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(&gw, SYNC, Some("cached")).await.status(), 200);

    let mut shed = 0;
    let mut refused = 0;
    for t in flood {
        match t.await.unwrap() {
            (503, true, body) => {
                assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
                shed += 1;
            }
            (401, _, _) => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(
        introspections(&f.op).await - 1,
        refused,
        "every token the OP judged got its verdict"
    );
    assert!(
        refused <= 3,
        "{refused} flood tokens reached the OP: more than 2 in flight + 1 queued"
    );
    assert_eq!(shed + refused, 20);
}

/// A flood that fills the introspection queue must not sign known users out: when a cached
/// user's reuse window ends during the flood, the re-check waits for a slot (the OP's bound
/// holds) instead of being shed with 503 like the flood's new tokens. Found by the flood
/// benchmark, whose cached user got 503s once its window ended mid-run.
#[tokio::test]
async fn a_known_users_recheck_is_not_shed_by_a_full_queue() {
    let f = Fakes::start().await;
    f.introspection("cached", active("alice", &full_scope("D1")), 2)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"active": false}))
                .set_delay(Duration::from_millis(400)),
        )
        .with_priority(10)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("max_concurrent_introspections = 1\nintrospection_queue = 1")).await;
    assert_eq!(get(&gw, SYNC, Some("cached")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(121)); // past max_ttl: the next request re-checks
                                                // One new token holds the only slot, a second waits in the one queue place.
    let mut flood = Vec::new();
    for i in 0..2 {
        let url = gw.url(SYNC);
        flood.push(tokio::spawn(async move {
            client()
                .get(url)
                .bearer_auth(format!("new-{i}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The queue is full: a third new token is shed at once...
    assert_eq!(get(&gw, SYNC, Some("new-2")).await.status(), 503);
    // ...but the known user's re-check waits its turn and passes.
    assert_eq!(get(&gw, SYNC, Some("cached")).await.status(), 200);
    for t in flood {
        assert_eq!(t.await.unwrap(), 401);
    }
}

/// A busy known user never waits for its own re-check: in the last quarter of its reuse
/// window the cached identity still answers at once, and one re-check runs in the background.
/// Found by the flood benchmark: at the end of the window every request of the cached user
/// waited for the re-check, which queued behind the flood's introspections (a 125-260 ms
/// stall). What the re-check brings back applies from the next request (here the OP has
/// revoked the token: 401 before the window ends).
#[tokio::test]
async fn a_known_users_recheck_runs_ahead_in_the_background_and_its_refusal_applies() {
    let f = Fakes::start().await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(active("alice", &full_scope("D1"))))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&f.op)
        .await;
    // The re-check: slow, and the token has been revoked at the OP meanwhile.
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"active": false}))
                .set_delay(Duration::from_millis(1500)),
        )
        .with_priority(2)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(100)); // max_ttl = 120 s: in the last quarter
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the requests waited for the re-check: {:?}",
        started.elapsed()
    );
    // One re-check, in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while introspections(&f.op).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no re-check started before the window's end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its answer (after the OP's 1.5 s; the OP timeout is 2 s) applies to the next request, inside the old window.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = get(&gw, SYNC, Some("busy")).await.status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            std::time::Instant::now() < deadline,
            "the re-check's refusal never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(introspections(&f.op).await, 2, "one re-check per token");
}

/// A background re-check never stretches a reuse window: when it fails (the OP is down), the
/// cached identity still ends at the window's end, and the next request waits for the OP and
/// gets its 503, as any re-check would.
#[tokio::test]
async fn a_failed_background_recheck_does_not_stretch_the_window() {
    let f = Fakes::start().await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(active("alice", &full_scope("D1"))))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(500))
        .with_priority(2)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(100));
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while introspections(&f.op).await < 2 {
        assert!(std::time::Instant::now() < deadline, "no re-check started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Still inside the window: the cached identity answers, and a failed re-check is not
    // tried again at once (a sixteenth of the window later: 7.5 s here).
    for _ in 0..5 {
        assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        introspections(&f.op).await,
        2,
        "a failed re-check backs off"
    );
    gw.clock.advance(Duration::from_secs(8));
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while introspections(&f.op).await < 3 {
        assert!(std::time::Instant::now() < deadline, "no second re-check");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.clock.advance(Duration::from_secs(13)); // past the window's end
    assert_matrix_error(get(&gw, SYNC, Some("busy")).await, 503, "M_UNKNOWN").await;
}

/// A late background re-check never overwrites a newer decision: here its OP answer
/// ("active", from before the OP revoked the token) arrives after a request at the window's
/// end was refused by the OP. The refusal stays.
#[tokio::test]
async fn a_late_background_recheck_never_overwrites_a_newer_refusal() {
    let f = Fakes::start().await;
    for (i, delay_ms) in [(1u8, 0u64), (2, 1_000)] {
        Mock::given(method("POST"))
            .and(path("/introspect"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(active("alice", &full_scope("D1")))
                    .set_delay(Duration::from_millis(delay_ms)),
            )
            .up_to_n_times(1)
            .with_priority(i)
            .mount(&f.op)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"active": false})))
        .with_priority(3)
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    gw.clock.advance(Duration::from_secs(119));
    // Starts the background re-check (its answer takes a second).
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while introspections(&f.op).await < 2 {
        assert!(std::time::Instant::now() < deadline, "no re-check");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.clock.advance(Duration::from_secs(2)); // the window has ended
    assert_matrix_error(get(&gw, SYNC, Some("busy")).await, 401, "M_UNKNOWN_TOKEN").await;
    // The background answer lands, finds a newer verdict...
    wait_for_rechecks(&gw, "superseded", 1).await;
    // ...and the refusal stays.
    assert_matrix_error(get(&gw, SYNC, Some("busy")).await, 401, "M_UNKNOWN_TOKEN").await;
}

/// A renewed verdict lives by its own window, in real time too: the cache's memory bound
/// (moka, on the real clock) must not drop it at the old window's end, or the busy user
/// waits for the OP after all (and pays for it from its address's budget).
#[tokio::test]
async fn a_renewed_verdict_outlives_the_old_window_in_real_time() {
    let f = Fakes::start().await;
    f.introspection("busy", active("alice", &full_scope("D1")), 2)
        .await;
    let gw = spawn(&f.config("\n[cache]\nmax_ttl = \"10s\"\nnegative_ttl = \"1s\"")).await;
    let started = std::time::Instant::now();
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(8_000)).await; // the last quarter (from 7.5 s)
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while introspections(&f.op).await < 2 {
        assert!(std::time::Instant::now() < deadline, "no re-check");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the old window's end plus the cache's second of slack (11 s), before the new
    // window's last quarter (about 15.5 s).
    tokio::time::sleep(Duration::from_millis(12_000).saturating_sub(started.elapsed())).await;
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    assert_eq!(
        introspections(&f.op).await,
        2,
        "the renewed verdict was dropped"
    );
}

/// Waits until the gateway's metrics count at least `n` background re-checks with `result`.
async fn wait_for_rechecks(gw: &TestGateway, result: &str, n: u64) {
    let series = format!("matrix_oidc_gateway_auth_cache_rechecks_total{{result=\"{result}\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = gw.metric(&series).await.unwrap_or(0.0);
        if seen >= n as f64 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{result} re-checks: {seen}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A purge during a background re-check wins for its own token only: the purged token's
/// re-check puts nothing back (its next request asks the OP again), while a busy token whose
/// re-check overlapped a purge of another token keeps its renewed verdict (no extra OP call).
#[tokio::test]
async fn a_purge_during_a_background_recheck_wins_for_its_own_token_only() {
    let f = Fakes::start().await;
    for token in ["busy", "gone"] {
        Mock::given(method("POST"))
            .and(path("/introspect"))
            .and(wiremock::matchers::body_string_contains(format!(
                "token={token}&"
            )))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(active("alice", &full_scope("D1"))),
            )
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&f.op)
            .await;
        Mock::given(method("POST"))
            .and(path("/introspect"))
            .and(wiremock::matchers::body_string_contains(format!(
                "token={token}&"
            )))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(active("alice", &full_scope("D1")))
                    .set_delay(Duration::from_millis(800)),
            )
            .with_priority(2)
            .mount(&f.op)
            .await;
    }
    f.introspection("other", active("bob", &full_scope("D2")), 1)
        .await;
    let gw = spawn(&f.config("\n[admin]\ntoken = \"admin-token-0123456789abcdef\"")).await;
    for token in ["busy", "gone", "other"] {
        assert_eq!(get(&gw, SYNC, Some(token)).await.status(), 200);
    }
    gw.clock.advance(Duration::from_secs(100));
    for token in ["busy", "gone"] {
        assert_eq!(get(&gw, SYNC, Some(token)).await.status(), 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while introspections(&f.op).await < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-checks did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While both re-checks wait for the OP: an unrelated purge, and a purge of `gone`.
    for token in ["other", "gone"] {
        let r = client()
            .post(gw.admin_url("/admin/v1/cache/purge"))
            .bearer_auth("admin-token-0123456789abcdef")
            .json(&json!({ "token": token }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    wait_for_rechecks(&gw, "renewed", 1).await;
    wait_for_rechecks(&gw, "superseded", 1).await;
    assert_eq!(get(&gw, SYNC, Some("busy")).await.status(), 200);
    assert_eq!(
        introspections(&f.op).await,
        5,
        "busy kept its renewed verdict"
    );
    // The admin purge also revokes `gone` (401 whatever the cache says); that its re-check put
    // nothing back shows as the OP being asked about it again.
    assert_matrix_error(get(&gw, SYNC, Some("gone")).await, 401, "M_UNKNOWN_TOKEN").await;
    assert_eq!(
        introspections(&f.op).await,
        6,
        "the purged token's re-check put its verdict back"
    );
}

/// The per-address budget of new tokens (`auth.new_tokens_per_address`): once one address has
/// presented more tokens the gateway had not cached than its burst allows, the next new token
/// gets 429 `M_LIMIT_EXCEEDED` (with `retry_after_ms` and `Retry-After`) and never reaches the
/// OP, while tokens already cached, a refused token already judged, and other addresses are
/// answered as before. Behind a trusted proxy the address is the last `X-Forwarded-For` hop;
/// without that trust a client's own `X-Forwarded-For` does not buy it a fresh budget.
#[tokio::test]
async fn new_tokens_past_an_addresss_budget_get_429_without_an_op_call() {
    let f = Fakes::start().await;
    f.introspection("cached", active("alice", &full_scope("D1")), 1)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"active": false})))
        .with_priority(10)
        .mount(&f.op)
        .await;
    let budget = "\n[auth]\nnew_tokens_per_address = 1\nnew_tokens_burst = 3\n";
    let gw = spawn(&f.config(budget)).await;
    let forwarded = |r: reqwest::RequestBuilder, from: &str| r.header("X-Forwarded-For", from);
    let send = |token: String, from: Option<&'static str>| {
        let url = gw.url(SYNC);
        async move {
            let r = client().get(url).bearer_auth(token);
            let r = match from {
                Some(a) => forwarded(r, a),
                None => r,
            };
            r.send().await.unwrap()
        }
    };
    // The cached user's first request spends one unit of the burst.
    assert_eq!(send("cached".into(), None).await.status(), 200);
    let mut judged = 0;
    let mut limited = None;
    const FORGED: [&str; 10] = [
        "203.0.113.0",
        "203.0.113.1",
        "203.0.113.2",
        "203.0.113.3",
        "203.0.113.4",
        "203.0.113.5",
        "203.0.113.6",
        "203.0.113.7",
        "203.0.113.8",
        "203.0.113.9",
    ];
    for (i, forged) in FORGED.into_iter().enumerate() {
        // Without `trust_forwarded_headers` a new address in the client's own header each
        // time changes nothing.
        let r = send(format!("garbage-{i}"), Some(forged)).await;
        match r.status().as_u16() {
            401 => judged += 1,
            429 => {
                limited = Some(r);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let limited = limited.expect("the address ran out of budget within ten new tokens");
    assert!(
        judged >= 2,
        "the burst of 3 admitted only {judged} + 1 tokens"
    );
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
    assert!(body["retry_after_ms"].as_u64().unwrap() >= 1, "{body}");
    assert_eq!(
        introspections(&f.op).await,
        1 + judged,
        "the token refused for the budget was not sent to the OP"
    );
    // Known tokens are not charged: the cached user, and a refusal already judged.
    assert_eq!(send("cached".into(), None).await.status(), 200);
    assert_eq!(send("garbage-0".into(), None).await.status(), 401);
    assert_eq!(introspections(&f.op).await, 1 + judged);

    // Behind a trusted proxy the last hop (the proxy's entry) is charged, whatever the client
    // put before it, and each such address has its own budget.
    let trusted = f.config(budget).replacen(
        "[listen]\n",
        "[listen]\ntrust_forwarded_headers = true\n",
        1,
    );
    let gw = spawn(&trusted).await;
    let proxied = |token: String, lines: [&'static str; 2]| {
        let url = gw.url(SYNC);
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .header("X-Forwarded-For", lines[0])
                .header("X-Forwarded-For", lines[1])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let mut statuses = Vec::new();
    for (j, forged) in FORGED.into_iter().enumerate() {
        statuses.push(proxied(format!("proxied-a-{j}"), [forged, "198.51.100.1"]).await);
        if statuses.last() == Some(&429) {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(statuses.len() >= 4, "{statuses:?}");
    // Another client address behind the same proxy still has its budget.
    assert_eq!(
        proxied("proxied-b-0".into(), ["203.0.113.0", "198.51.100.2"]).await,
        401
    );
}

/// A new token the gateway sheds itself (full queue) still spends its sender's budget: under a
/// flood the address runs out and gets cheap 429s instead of costing a queue place each time.
#[tokio::test]
async fn new_tokens_shed_for_a_full_queue_still_spend_the_budget() {
    let f = Fakes::start().await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"active": false}))
                .set_delay(Duration::from_millis(500)),
        )
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config(
        "max_concurrent_introspections = 1\nintrospection_queue = 1\n\n[auth]\nnew_tokens_per_address = 1\nnew_tokens_burst = 3\n",
    ))
    .await;
    let mut flood = Vec::new();
    for i in 0..6 {
        let url = gw.url(SYNC);
        flood.push(tokio::spawn(async move {
            client()
                .get(url)
                .bearer_auth(format!("new-{i}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in flood {
        statuses.push(t.await.unwrap());
    }
    statuses.sort_unstable();
    // One holds the slot, one waits in the queue (both judged: 401), one is shed (503); the
    // burst of three is spent, so the other three are over budget.
    assert_eq!(statuses, vec![401, 401, 429, 429, 429, 503], "{statuses:?}");
}

/// An OP that fails does not spend the budget: a client with new tokens during an OP outage
/// keeps getting 503 (retry, do not sign out), never 429, however many it presents.
#[tokio::test]
async fn new_tokens_during_an_op_outage_stay_503_past_the_budget() {
    let f = Fakes::start().await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config("\n[auth]\nnew_tokens_per_address = 1\nnew_tokens_burst = 2\n")).await;
    for i in 0..6 {
        let r = get(&gw, SYNC, Some(&format!("new-{i}"))).await;
        assert_eq!(r.status(), 503, "new token {i} while the OP fails");
    }
    assert_eq!(introspections(&f.op).await, 6);
}

/// The HTTPS listener (`listen.public_tls`) is the same gateway: a token is verified and bound
/// as on the plain listener, a refusal is the same Matrix JSON, and the homeserver hears
/// `X-Forwarded-Proto: https` there (`http` on the plain listener).
#[tokio::test]
async fn the_https_listener_serves_the_same_gateway() {
    let f = Fakes::start().await;
    f.introspection("tok-alice", active("alice", &full_scope("ALICEDEV01")), 1)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let tls_port = free_port();
    let toml = f.config("").replacen(
        "[listen]\n",
        &format!(
            "[listen]\npublic_tls = \"127.0.0.1:{tls_port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    let gw = spawn(&toml).await;
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(issued.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{tls_port}{SYNC}");
    let mut answer = None;
    for _ in 0..100 {
        match https.get(&url).bearer_auth("tok-alice").send().await {
            Ok(r) => {
                answer = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let r = answer.expect("the HTTPS listener answers");
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@alice:example.org"])
    );
    assert_eq!(echo["headers"]["x-forwarded-proto"], json!(["https"]));
    let plain: Value = get(&gw, SYNC, Some("tok-alice"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(plain["headers"]["x-forwarded-proto"], json!(["http"]));
    let refused = https.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errcode"], "M_MISSING_TOKEN");
}

#[tokio::test]
async fn an_op_connection_closed_under_an_introspection_is_retried_not_a_503() {
    // Found by the e2e suite (matrix-js-sdk on Dendrite): oidc-provider, like any Node server,
    // closes a kept-alive connection after 5 idle seconds, and an introspection that took that
    // connection at that moment failed as "OP unreachable", a 503 for the user. This OP answers
    // the first request of each connection and closes the connection under the second one.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let op_addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in 0.. {
                    // One whole request: the head, then Content-Length bytes.
                    let (end, len) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: ").map(str::to_owned))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            if buf.len() >= end + 4 + len {
                                break (end, len);
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    buf.drain(..end + 4 + len);
                    if answered == 1 {
                        return; // closes the connection without an answer
                    }
                    let user = if body.contains("token=tok-one") {
                        "one"
                    } else {
                        "two"
                    };
                    let answer = active(user, &full_scope("D1")).to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let f = Fakes::start().await;
    let cfg = f.config("").replace(
        &format!("{}/introspect", f.op.uri()),
        &format!("http://{op_addr}/introspect"),
    );
    let gw = spawn(&cfg).await;
    for (token, user) in [
        ("tok-one", "@one:example.org"),
        ("tok-two", "@two:example.org"),
    ] {
        let resp = get(&gw, SYNC, Some(token)).await;
        assert_eq!(resp.status(), 200, "{token}");
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["headers"]["x-matrix-user-id"], json!([user]));
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2);
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

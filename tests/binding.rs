//! Homeserver binding in-process: the real gateway against wiremock fakes of the OP and of a
//! homeserver's appservice API. Proves the provisioning calls, their single-flight, the
//! credentials sent upstream, lost-binding recovery, subject pins, the cross-signing guard and
//! the answers the gateway owns. (Real Synapse and Dendrite: `tests/e2e_homeserver.rs`.)

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, header, method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const AS: &str = "test-as-token";
const SYNC: &str = "/_matrix/client/v3/sync";

fn hs_cfg(kind: &str, binding: &str) -> String {
    format!("kind = \"{kind}\"\nbinding = \"{binding}\"\nas_token = \"{AS}\"")
}

async fn mount_register(hs: &MockServer, times: u64) {
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .and(header("authorization", format!("Bearer {AS}").as_str()))
        .and(body_partial_json(
            json!({"type": "m.login.application_service", "inhibit_login": true}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"user_id": "@x:example.org"})),
        )
        .with_priority(1)
        .expect(times)
        .mount(hs)
        .await;
}

async fn mount_login(hs: &MockServer, device: &str, upstream_token: &str, times: u64) {
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/login"))
        .and(header("authorization", format!("Bearer {AS}").as_str()))
        .and(body_partial_json(
            json!({"type": "m.login.application_service", "device_id": device}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": upstream_token, "device_id": device}))
                .set_delay(Duration::from_millis(100)),
        )
        .with_priority(1)
        .expect(times)
        .mount(hs)
        .await;
}

async fn get(gw: &TestGateway, p: &str, token: &str) -> reqwest::Response {
    client()
        .get(gw.url(p))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn appservice_login_provisions_once_and_sends_the_device_token() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("ALICEDEV01")), 1)
        .await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "ALICEDEV01", "upstream-device-token", 1).await;
    let gw = spawn(&f.config_hs(&hs_cfg("dendrite", "appservice_login"), "")).await;

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = gw.url(&format!("{SYNC}?user_id=%40bob%3Aexample.org&ts=1"));
        tasks.push(tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth("t")
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let echo = t.await.unwrap();
        assert_eq!(
            echo["headers"]["authorization"],
            json!(["Bearer upstream-device-token"])
        );
        assert_eq!(
            echo["query"],
            Value::Null,
            "client appservice parameters forwarded: {echo}"
        );
    }
}

#[tokio::test]
async fn conduit_registrations_carry_a_password_and_user_in_use_is_fine() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .and(wiremock::matchers::body_string_contains("\"password\""))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"errcode": "M_USER_IN_USE", "error": "taken"})),
        )
        .with_priority(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    mount_login(&f.hs, "D1", "tok-d1", 1).await;
    let gw = spawn(&f.config_hs(&hs_cfg("conduit", "appservice_login"), "")).await;
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(echo["headers"]["authorization"], json!(["Bearer tok-d1"]));
}

#[tokio::test]
async fn appservice_masquerade_creates_the_device_and_asserts_identity() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("ALICEDEV01")), 1)
        .await;
    mount_register(&f.hs, 1).await;
    Mock::given(method("PUT"))
        .and(path("/_matrix/client/v3/devices/ALICEDEV01"))
        .and(query_param("user_id", "@alice:example.org"))
        .and(header("authorization", format!("Bearer {AS}").as_str()))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({})))
        .with_priority(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    let gw = spawn(&f.config_hs(&hs_cfg("synapse", "appservice_masquerade"), "")).await;
    for _ in 0..3 {
        let r = get(
            &gw,
            &format!("{SYNC}?since=s1&user_id=%40bob%3Aexample.org&device_id=EVIL"),
            "t",
        )
        .await;
        let echo: Value = r.json().await.unwrap();
        assert_eq!(
            echo["headers"]["authorization"],
            json!([format!("Bearer {AS}")])
        );
        // The gateway's own assertion comes first and is the only one.
        assert_eq!(
            echo["query"],
            "user_id=%40alice%3Aexample.org&device_id=ALICEDEV01&since=s1"
        );
    }
}

#[tokio::test]
async fn provisioning_failures_are_503_and_retried() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .respond_with(ResponseTemplate::new(500))
        .with_priority(1)
        .up_to_n_times(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "D1", "tok", 1).await;
    let gw = spawn(&f.config_hs(&hs_cfg("dendrite", "appservice_login"), "")).await;
    let (h, _) = assert_matrix_error(get(&gw, SYNC, "t").await, 503, "M_UNKNOWN").await;
    assert_eq!(h["retry-after"], "5");
    assert_eq!(get(&gw, SYNC, "t").await.status(), 200);
}

#[tokio::test]
async fn lost_binding_is_a_503_then_provisioned_again() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    mount_register(&f.hs, 1).await;
    // First login hands out a token the homeserver later forgets; the second a good one.
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/login"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "dead-token", "device_id": "D1"})),
        )
        .with_priority(1)
        .up_to_n_times(1)
        .expect(1)
        .mount(&f.hs)
        .await;
    mount_login(&f.hs, "D1", "fresh-token", 1).await;
    Mock::given(header("authorization", "Bearer dead-token"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"errcode": "M_UNKNOWN_TOKEN", "error": "gone"})),
        )
        .with_priority(1)
        .mount(&f.hs)
        .await;
    let gw = spawn(&f.config_hs(&hs_cfg("dendrite", "appservice_login"), "")).await;
    let (h, body) = assert_matrix_error(get(&gw, SYNC, "t").await, 503, "M_UNKNOWN").await;
    assert!(h.contains_key("retry-after"));
    assert!(body.get("soft_logout").is_none());
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["authorization"],
        json!(["Bearer fresh-token"])
    );
}

#[tokio::test]
async fn user_interactive_401s_pass_through() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "D1", "good", 1).await;
    let uia = json!({"session": "s", "flows": [{"stages": ["m.login.password"]}], "params": {}});
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/keys/signatures/upload"))
        .respond_with(ResponseTemplate::new(401).set_body_json(uia.clone()))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    let gw = spawn(&f.config_hs(&hs_cfg("dendrite", "appservice_login"), "")).await;
    let r = client()
        .post(gw.url("/_matrix/client/v3/keys/signatures/upload"))
        .bearer_auth("t")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap(), uia);
    // the binding survived: no second login (`.expect(1)` above)
    assert_eq!(get(&gw, SYNC, "t").await.status(), 200);
}

#[tokio::test]
async fn a_reassigned_username_cannot_take_over_the_account() {
    let f = Fakes::start().await;
    f.introspection("first", active("alice", &full_scope("D1")), 1)
        .await;
    let mut other = active("alice", &full_scope("D2"));
    other["sub"] = json!("a-different-person");
    f.introspection("second", other, 1).await;
    let gw = spawn(&f.config("")).await;
    assert_eq!(get(&gw, SYNC, "first").await.status(), 200);
    let (_, body) = assert_matrix_error(get(&gw, SYNC, "second").await, 403, "M_FORBIDDEN").await;
    assert!(body["error"].as_str().unwrap().contains("another account"));
    // and the rightful owner still gets in
    assert_eq!(get(&gw, SYNC, "first").await.status(), 200);
}

#[tokio::test]
async fn no_token_acts_as_a_reserved_user() {
    // The registration's `sender_localpart`: a token mapped to it would bind to the
    // appservice's own account (on Dendrite, log in over the device that holds the AS token).
    for (sender_cfg, user) in [
        ("", "oidc-gateway"),
        ("appservice_sender = \"bridge\"", "bridge"),
    ] {
        let f = Fakes::start().await;
        f.introspection("bot", active(user, &full_scope("D1")), 1)
            .await;
        mount_register(&f.hs, 0).await;
        mount_login(&f.hs, "D1", "never-sent", 0).await;
        let hs = format!("{}\n{sender_cfg}", hs_cfg("dendrite", "appservice_login"));
        let gw = spawn(&f.config_hs(&hs, "")).await;
        assert_matrix_error(get(&gw, SYNC, "bot").await, 403, "M_FORBIDDEN").await;
    }
    // With the `headers` binding there is no appservice: the name is an ordinary user's. The
    // homeserver's own accounts the operator lists are refused with any binding.
    let f = Fakes::start().await;
    f.introspection("user", active("oidc-gateway", &full_scope("D1")), 1)
        .await;
    f.introspection("notices", active("notices", &full_scope("D2")), 1)
        .await;
    let gw = spawn(&f.config_hs("reserved_localparts = [\"notices\"]", "")).await;
    let echo: Value = get(&gw, SYNC, "user").await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-matrix-user-id"],
        json!(["@oidc-gateway:example.org"])
    );
    let r = get(&gw, SYNC, "notices").await;
    let (_, body) = assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    assert!(
        body["error"].as_str().unwrap().contains("reserved"),
        "{body}"
    );
}

#[tokio::test]
async fn guests_join_no_room_through_an_appservice_binding() {
    // The homeserver sees the guest's upstream account as an ordinary user: it cannot apply a
    // room's `m.room.guest_access`, so the gateway refuses every membership change but leaving.
    let f = Fakes::start().await;
    let scope = "urn:matrix:client:api:guest urn:matrix:client:device:G1";
    f.introspection("g", active("guest1", scope), 1).await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "G1", "guest-upstream", 1).await;
    // Synapse's wider guest list, which also has `join/*`, invites, kicks and bans.
    let gw = spawn(&f.config_hs(
        &hs_cfg("dendrite", "appservice_login"),
        "\n[auth]\nguest_endpoints = \"synapse\"",
    ))
    .await;
    let echo: Value = get(&gw, SYNC, "g").await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["authorization"],
        json!(["Bearer guest-upstream"])
    );
    let send = |m: reqwest::Method, p: &str| {
        client()
            .request(m, gw.url(p))
            .bearer_auth("g")
            .json(&json!({"membership": "join"}))
            .send()
    };
    for (m, p) in [
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/rooms/!r:example.org/join",
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/r0/join/%23public:example.org",
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/rooms/!r:example.org/invite",
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/rooms/!r:example.org/ban",
        ),
        (
            reqwest::Method::PUT,
            "/_matrix/client/v3/rooms/!r:example.org/state/m.room.member/@guest1:example.org",
        ),
    ] {
        let r = send(m.clone(), p).await.unwrap();
        assert_matrix_error(r, 403, "M_GUEST_ACCESS_FORBIDDEN").await;
    }
    let r = send(
        reqwest::Method::POST,
        "/_matrix/client/v3/rooms/!r:example.org/leave",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "leaving stays open to guests");
}

#[tokio::test]
async fn bindings_and_pins_survive_a_restart() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 2)
        .await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "D1", "kept-token", 1).await;
    let cfg = f.config_hs(&hs_cfg("dendrite", "appservice_login"), "");
    let gw = spawn(&cfg).await;
    assert_eq!(get(&gw, SYNC, "t").await.status(), 200);
    gw.stop().await;
    let gw = spawn(&on_fresh_ports(&cfg)).await;
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["authorization"],
        json!(["Bearer kept-token"])
    );
}

#[tokio::test]
async fn replacing_cross_signing_keys_needs_approval_at_the_op() {
    let f = Fakes::start().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{}/", f.op.uri()),
            "account_management_uri": "https://op.example/account",
        })))
        .mount(&f.op)
        .await;
    f.introspection("has", active("alice", &full_scope("D1")), 1)
        .await;
    f.introspection("new", active("bob", &full_scope("D2")), 1)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/keys/query"))
        .and(wiremock::matchers::body_string_contains(
            "@alice:example.org",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "device_keys": {}, "master_keys": {"@alice:example.org": {"keys": {}}}
        })))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/keys/query"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"device_keys": {}, "master_keys": {}})),
        )
        .with_priority(2)
        .mount(&f.hs)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("PUT"))
        .and(path_regex("^/_matrix/client/v3/devices/"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({})))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    let gw = spawn(&f.config_hs(&hs_cfg("synapse", "appservice_masquerade"), "")).await;
    let upload = |tok: &'static str| {
        client()
            .post(gw.url("/_matrix/client/v3/keys/device_signing/upload"))
            .bearer_auth(tok)
            .json(&json!({"master_key": {}}))
            .send()
    };
    let r = upload("has").await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["flows"],
        json!([{"stages": ["m.oauth"]}, {"stages": ["org.matrix.cross_signing_reset"]}])
    );
    assert_eq!(
        body["params"]["m.oauth"]["url"],
        "https://op.example/account?action=org.matrix.cross_signing_reset"
    );
    // A first-time upload passes to the homeserver.
    let r = upload("new").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["echo"], true);
}

/// With per-device tokens, an approved cross-signing replacement goes upstream as the
/// application service on Synapse (which lets an appservice replace keys without asking the
/// user for a password, MSC4190), carrying the gateway's own `user_id` / `device_id` and none a
/// client added; on Dendrite it keeps the device's own token. An unapproved one never leaves.
#[tokio::test]
async fn an_approved_cross_signing_reset_is_sent_as_the_appservice_on_synapse() {
    for (kind, as_appservice) in [("synapse", true), ("dendrite", false)] {
        let f = Fakes::start().await;
        f.introspection("alice", active("alice", &full_scope("ADEV")), 1)
            .await;
        mount_register(&f.hs, 1).await;
        mount_login(&f.hs, "ADEV", "alice-device-token", 1).await;
        Mock::given(method("POST"))
            .and(path("/_matrix/client/v3/keys/query"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "device_keys": {}, "master_keys": {"@alice:example.org": {"keys": {}}}
            })))
            .with_priority(1)
            .mount(&f.hs)
            .await;
        let gw = spawn(&f.config_hs(
            &hs_cfg(kind, "appservice_login"),
            &format!("\n[admin]\ntoken = \"{ADMIN}\""),
        ))
        .await;
        let upload = || {
            client()
                .post(gw.url(
                    "/_matrix/client/v3/keys/device_signing/upload?user_id=@victim:example.org&org.matrix.msc3202.device_id=X",
                ))
                .bearer_auth("alice")
                .json(&json!({"master_key": {}}))
                .send()
        };
        assert_eq!(
            upload().await.unwrap().status(),
            401,
            "{kind}: not approved yet"
        );
        approve(&gw).await;
        let r = upload().await.unwrap();
        assert_eq!(r.status(), 200, "{kind}");
        let echo: Value = r.json().await.unwrap();
        let (auth, query) = if as_appservice {
            (
                format!("Bearer {AS}"),
                json!("user_id=%40alice%3Aexample.org&device_id=ADEV"),
            )
        } else {
            ("Bearer alice-device-token".to_owned(), Value::Null)
        };
        assert_eq!(echo["headers"]["authorization"], json!([auth]), "{kind}");
        assert_eq!(echo["query"], query, "{kind}: the forwarded query");
        // The approval was single-use: the next replacement needs another.
        assert_eq!(
            upload().await.unwrap().status(),
            401,
            "{kind}: approval reused"
        );
        // Other requests of the session keep the device's own token.
        let echo: Value = get(&gw, SYNC, "alice").await.json().await.unwrap();
        assert_eq!(
            echo["headers"]["authorization"],
            json!(["Bearer alice-device-token"]),
            "{kind}"
        );
    }
}

const HS_ADMIN: &str = "dendrite-admin-token";
const RESET_PATH: &str = "/_dendrite/admin/resetPassword/%40alice%3Aexample.org";
const UPLOAD_PATH: &str = "/_matrix/client/v3/keys/device_signing/upload";

/// A Dendrite fake for alice's device ADEV: keys/query answers `master` as alice's master
/// keys (`null`: none), and the admin API's password reset answers `reset_status`.
async fn dendrite_fake(master: Value, reset_status: u16) -> Fakes {
    let f = Fakes::start().await;
    f.introspection("alice", active("alice", &full_scope("ADEV")), 1)
        .await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "ADEV", "alice-device-token", 1).await;
    let keys = if master.is_null() {
        json!({"device_keys": {}})
    } else {
        json!({"device_keys": {}, "master_keys": {"@alice:example.org": master}})
    };
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/keys/query"))
        .respond_with(ResponseTemplate::new(200).set_body_json(keys))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("POST"))
        .and(path(RESET_PATH))
        .and(header(
            "authorization",
            format!("Bearer {HS_ADMIN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(reset_status).set_body_json(json!({})))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    f
}

async fn dendrite_gateway(f: &Fakes, admin_token: bool) -> TestGateway {
    let token = if admin_token {
        format!("\nadmin_token = \"{HS_ADMIN}\"")
    } else {
        String::new()
    };
    spawn(&f.config_hs(
        &format!("{}{token}", hs_cfg("dendrite", "appservice_login")),
        &format!("\n[admin]\ntoken = \"{ADMIN}\""),
    ))
    .await
}

const ADMIN: &str = "gateway-admin-token-0123456789";

fn keys_upload() -> Value {
    json!({
        "master_key": {"user_id": "@alice:example.org", "usage": ["master"], "keys": {"ed25519:K": "K"}},
        "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "@victim:example.org"}, "password": "guess"},
    })
}

async fn upload(gw: &TestGateway, body: Vec<u8>) -> reqwest::Response {
    client()
        .post(gw.url(UPLOAD_PATH))
        .bearer_auth("alice")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The password-reset requests the fake received, their bodies.
async fn resets(f: &Fakes) -> Vec<Value> {
    f.hs.received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == RESET_PATH)
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

/// What the homeserver received as the upload's body, from the echo.
async fn sent_upload(r: reqwest::Response) -> Value {
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    serde_json::from_str(echo["body"].as_str().unwrap()).unwrap()
}

async fn approve(gw: &TestGateway) {
    let approved = client()
        .post(gw.admin_url("/admin/v1/users/@alice:example.org/cross_signing_reset"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
}

/// Dendrite asks every cross-signing upload for the user's password. With an admin token, the
/// gateway answers that stage for the uploads it admits: a fresh random password set through
/// Dendrite's admin API just before, in place of whatever `auth` the client sent. Without the
/// token the body passes untouched.
#[tokio::test]
async fn dendrite_cross_signing_uploads_carry_a_fresh_gateway_set_password() {
    let keys = keys_upload();
    // Without an admin token: untouched, no password set.
    let f = dendrite_fake(Value::Null, 200).await;
    let gw = dendrite_gateway(&f, false).await;
    let sent = sent_upload(upload(&gw, serde_json::to_vec(&keys).unwrap()).await).await;
    assert_eq!(sent, keys, "without an admin token the body is untouched");
    assert!(resets(&f).await.is_empty());

    let f = dendrite_fake(Value::Null, 200).await;
    let gw = dendrite_gateway(&f, true).await;
    let mut passwords = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // The first upload landed: the next one replaces the key and needs an approval,
            // although this Dendrite's keys/query still leaves alice out (what it does when
            // its own lookup fails).
            let r = upload(&gw, serde_json::to_vec(&keys).unwrap()).await;
            assert_eq!(r.status(), 401, "a replacement passed as a first upload");
            assert_eq!(
                resets(&f).await.len(),
                1,
                "a password was set for a refused upload"
            );
            approve(&gw).await;
        }
        let sent = sent_upload(upload(&gw, serde_json::to_vec(&keys).unwrap()).await).await;
        assert_eq!(
            sent["master_key"], keys["master_key"],
            "the keys go up unchanged"
        );
        let set = resets(&f)
            .await
            .pop()
            .expect("a password was set before the upload");
        assert_eq!(
            set["logout_devices"], false,
            "the user's devices stay signed in"
        );
        let password = set["password"].as_str().unwrap().to_owned();
        assert!(password.len() >= 32, "a strong password");
        assert_eq!(
            sent["auth"],
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "@alice:example.org"}, "password": password}),
            "the client's auth is replaced by the gateway's"
        );
        passwords.push(password);
    }
    assert_ne!(
        passwords[0], passwords[1],
        "every upload gets its own password"
    );
    assert_eq!(resets(&f).await.len(), 2);
}

/// A user with a master key at Dendrite: a replacement without approval is refused before any
/// password is set; with one, one password is set and the approval is used up.
#[tokio::test]
async fn dendrite_key_replacement_needs_an_approval_before_any_password_is_set() {
    let f = dendrite_fake(json!({"keys": {"ed25519:OLD": "OLD"}}), 200).await;
    let gw = dendrite_gateway(&f, true).await;
    let keys = serde_json::to_vec(&keys_upload()).unwrap();
    assert_eq!(upload(&gw, keys.clone()).await.status(), 401);
    assert!(resets(&f).await.is_empty());
    approve(&gw).await;
    sent_upload(upload(&gw, keys.clone()).await).await;
    assert_eq!(resets(&f).await.len(), 1);
    assert_eq!(upload(&gw, keys).await.status(), 401, "approval reused");
    assert_eq!(resets(&f).await.len(), 1);
}

/// Refused before any password is set: a body that is not a JSON object, or uploads no key, or
/// is too large. A first upload that does not land (the password reset fails: 503, the upload
/// never leaves) gives its claim back: the next upload is a first upload again.
#[tokio::test]
async fn dendrite_uploads_fail_closed_and_a_failed_first_upload_is_not_counted() {
    let f = dendrite_fake(Value::Null, 403).await;
    let gw = dendrite_gateway(&f, true).await;
    for (body, status, errcode) in [
        (b"not json".to_vec(), 400, "M_NOT_JSON"),
        (b"[1, 2]".to_vec(), 400, "M_NOT_JSON"),
        (Vec::new(), 400, "M_NOT_JSON"),
        (b"{}".to_vec(), 400, "M_NOT_JSON"),
        (br#"{"master_key": "x"}"#.to_vec(), 400, "M_NOT_JSON"),
        (
            serde_json::to_vec(&json!({"master_key": {"pad": "x".repeat(70 * 1024)}})).unwrap(),
            413,
            "M_TOO_LARGE",
        ),
    ] {
        let r = upload(&gw, body).await;
        assert_eq!(r.status(), status);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["errcode"], errcode);
    }
    assert!(
        resets(&f).await.is_empty(),
        "a password set for a refused upload"
    );
    // Dendrite refuses the reset: 503, nothing forwarded, twice (no approval asked the
    // second time: the failed first upload was not counted).
    for n in 1..=2 {
        let r = upload(&gw, serde_json::to_vec(&keys_upload()).unwrap()).await;
        assert_eq!(r.status(), 503);
        assert_eq!(resets(&f).await.len(), n);
    }
    let sent = f.hs.received_requests().await.unwrap();
    assert!(
        !sent.iter().any(|r| r.url.path() == UPLOAD_PATH),
        "the upload was forwarded without its password"
    );
}

/// The replaced body is framed by Content-Length whatever the client's framing: a chunked
/// upload with `Expect: 100-continue` gets its `100 Continue`, and the homeserver sees neither
/// `Transfer-Encoding` nor `Expect`.
#[tokio::test]
async fn a_chunked_expecting_upload_is_reframed_for_dendrite() {
    let f = dendrite_fake(Value::Null, 200).await;
    let gw = dendrite_gateway(&f, true).await;
    let body = serde_json::to_vec(&keys_upload()).unwrap();
    let (a, b) = body.split_at(body.len() / 2);
    let mut raw = format!(
        "POST {UPLOAD_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for part in [a, b] {
        raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        raw.extend_from_slice(part);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(gw.addr, &raw).await;
    assert!(answer.starts_with("HTTP/1.1 100 Continue"), "{answer}");
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    let upstream =
        f.hs.received_requests()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.url.path() == UPLOAD_PATH)
            .expect("the upload reached the homeserver");
    assert!(upstream.headers.get("transfer-encoding").is_none());
    assert!(upstream.headers.get("expect").is_none());
    assert_eq!(
        upstream
            .headers
            .get("content-length")
            .unwrap()
            .to_str()
            .unwrap(),
        upstream.body.len().to_string()
    );
    let sent: Value = serde_json::from_slice(&upstream.body).unwrap();
    assert_eq!(sent["auth"]["type"], "m.login.password");
    assert_eq!(sent["master_key"], keys_upload()["master_key"]);
}

#[tokio::test]
async fn versions_and_capabilities_are_rewritten() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 1)
        .await;
    Mock::given(method("GET"))
        .and(path("/_matrix/client/versions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"versions": ["v1.11"], "unstable_features": {"x": true}})),
        )
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("GET"))
        .and(path("/_matrix/client/v3/capabilities"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"capabilities": {"m.room_versions": {"default": "10", "available": {}}}}),
        ))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    let gw = spawn(&f.config("")).await;
    let v: Value = client()
        .get(gw.url("/_matrix/client/versions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["versions"], json!(["v1.11"]));
    assert_eq!(v["unstable_features"]["x"], true);
    assert_eq!(v["unstable_features"]["org.matrix.msc3861"], true);
    let c: Value = get(&gw, "/_matrix/client/v3/capabilities", "t")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["capabilities"]["m.room_versions"]["default"], "10");
    for k in ["m.change_password", "m.3pid_changes", "m.get_login_token"] {
        assert_eq!(c["capabilities"][k], json!({"enabled": false}));
    }
}

#[tokio::test]
async fn the_gateway_answers_what_the_op_owns() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let r = client()
        .post(gw.url("/_matrix/client/r0/login"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (_, body) = assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
    assert_eq!(
        body,
        json!({"errcode": "M_UNRECOGNIZED", "error": "This endpoint is handled by the OpenID Provider, not the homeserver (gateway)"})
    );
    let r = client()
        .post(gw.url("/_matrix/client/v3/register?kind=guest"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (_, body) = assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    assert_eq!(
        body["error"],
        "Registration is handled by the OpenID Provider (gateway)"
    );
    let r = client()
        .post(gw.url("/_matrix/client/v1/appservice/x/ping"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    let r = client()
        .get(gw.url("/_synapse/admin/v1/server_version"))
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
    // The unstable spellings homeservers still route: login tokens (MSC3882), refresh (MSC2918).
    for p in [
        "/_matrix/client/unstable/org.matrix.msc3882/login/token",
        "/_matrix/client/unstable/org.matrix.msc3882/login/get_token",
        "/_matrix/client/unstable/org.matrix.msc2918/refresh",
    ] {
        let r = client()
            .post(gw.url(p))
            .bearer_auth("any-token")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
    }
    assert!(f.hs.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn discovery_documents() {
    let f = Fakes::start().await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{}/", f.op.uri()),
            "authorization_endpoint": "https://op.example/auth",
            "token_endpoint": "https://op.example/token",
            "revocation_endpoint": "https://op.example/revoke",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
        })))
        .mount(&f.op)
        .await;
    let gw = spawn(&f.config(
        "\n[discovery]\npublic_base_url = \"https://matrix.example.org\"\nregistration_endpoint = \"https://op.example/register\"\naccount_management_uri = \"https://op.example/account\"",
    ))
    .await;
    let issuer = format!("{}/", f.op.uri());
    for p in [
        "/_matrix/client/v1/auth_metadata",
        "/_matrix/client/unstable/org.matrix.msc2965/auth_metadata",
    ] {
        let r = client().get(gw.url(p)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
        assert!(r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age"));
        let m: Value = r.json().await.unwrap();
        assert_eq!(m["issuer"], issuer.as_str());
        assert_eq!(m["registration_endpoint"], "https://op.example/register");
        assert_eq!(m["account_management_uri"], "https://op.example/account");
        assert_eq!(m["code_challenge_methods_supported"], json!(["S256"]));
    }
    let i: Value = client()
        .get(gw.url("/_matrix/client/unstable/org.matrix.msc2965/auth_issuer"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(i, json!({"issuer": issuer}));
    let w: Value = client()
        .get(gw.url("/.well-known/matrix/client"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        w,
        json!({
            "m.homeserver": {"base_url": "https://matrix.example.org"},
            "org.matrix.msc2965.authentication": {"issuer": issuer, "account": "https://op.example/account"}
        })
    );
}

/// Every byte the gateway keeps on disk (database, WAL and shared-memory files).
fn state_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_file() {
            all.extend(std::fs::read(e.path()).unwrap_or_default());
        }
    }
    all
}

#[tokio::test]
async fn device_tokens_are_sealed_at_rest_and_rotate_without_a_new_login() {
    const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const NEW: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 3)
        .await;
    mount_register(&f.hs, 1).await;
    // One login for the whole test: neither a restart nor a key rotation logs the device in again.
    mount_login(&f.hs, "D1", "the-upstream-device-token", 1).await;
    let cfg = f.config_hs(&hs_cfg("dendrite", "appservice_login"), "");
    assert!(cfg.contains(KEY), "the harness seals with KEY");
    let auth_of = |echo: Value| echo["headers"]["authorization"].clone();
    let gw = spawn(&cfg).await;
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(auth_of(echo), json!(["Bearer the-upstream-device-token"]));
    gw.stop().await;
    let on_disk = state_bytes(f.state.path());
    assert!(!on_disk.is_empty());
    assert!(
        !on_disk
            .windows(b"the-upstream-device-token".len())
            .any(|w| w == b"the-upstream-device-token"),
        "the upstream device token is stored in the clear"
    );

    // A copied store under another key: the gateway refuses to start and says why.
    let wrong = on_fresh_ports(&cfg.replace(KEY, NEW));
    let loaded = matrix_oidc_gateway::config::load_str(&wrong).unwrap();
    let clock = matrix_oidc_gateway::clock::OffsetClock::new();
    let err = match matrix_oidc_gateway::server::build(loaded.config, std::sync::Arc::new(clock)) {
        Ok(_) => panic!("a gateway with the wrong store key started"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with("store.encryption_key:") && err.contains("sealed with key"),
        "{err}"
    );

    // Rotation: the new key seals, the old one still opens; the device keeps its token.
    let rotating = on_fresh_ports(&cfg.replace(
        &format!("encryption_key = \"{KEY}\""),
        &format!("encryption_key = \"{NEW}\"\nprevious_encryption_key = \"{KEY}\""),
    ));
    let gw = spawn(&rotating).await;
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(auth_of(echo), json!(["Bearer the-upstream-device-token"]));
    gw.stop().await;
    // The old key retired: everything was sealed again at the rotating start-up.
    let gw = spawn(&wrong).await;
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(auth_of(echo), json!(["Bearer the-upstream-device-token"]));
}

#[tokio::test]
async fn an_unsealed_token_planted_in_the_store_is_never_sent() {
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 2)
        .await;
    mount_register(&f.hs, 1).await;
    mount_login(&f.hs, "D1", "fresh-token", 2).await;
    let cfg = f.config_hs(&hs_cfg("dendrite", "appservice_login"), "");
    let gw = spawn(&cfg).await;
    assert_eq!(get(&gw, SYNC, "t").await.status(), 200);
    gw.stop().await;
    // Someone with write access to the store swaps in a token of their choosing, in the clear.
    rusqlite::Connection::open(f.state.path().join("state.sqlite3"))
        .unwrap()
        .execute(
            "UPDATE devices SET upstream_token = 'planted-token' WHERE device_id = 'D1'",
            [],
        )
        .unwrap();
    let gw = spawn(&on_fresh_ports(&cfg)).await;
    let echo: Value = get(&gw, SYNC, "t").await.json().await.unwrap();
    assert_eq!(
        echo["headers"]["authorization"],
        json!(["Bearer fresh-token"]),
        "the planted token was used (or no new login happened)"
    );
}

#[tokio::test]
async fn pins_from_before_issuer_scoping_are_upgraded_only_with_a_single_issuer() {
    use matrix_oidc_gateway::store::{sqlite::SqliteStore, Store};
    let f = Fakes::start().await;
    f.introspection("t", active("alice", &full_scope("D1")), 2)
        .await;
    // A store written by a version that pinned the bare `sub`.
    SqliteStore::open(&f.state.path().join("state.sqlite3"))
        .unwrap()
        .pin_subject("@alice:example.org", "sub-alice")
        .await
        .unwrap();
    // With a second issuer configured, the bare pin cannot be attributed: refused.
    let two = format!(
        "{}\n[[issuers]]\nissuer = \"https://second-op.example/\"\nmode = \"jwt\"\naudiences = [\"x\"]\n",
        f.config("")
    );
    let gw = spawn(&two).await;
    let r = get(&gw, SYNC, "t").await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errcode"], "M_FORBIDDEN");
    gw.stop().await;
    // With the single issuer it was written by, it is that issuer's and is upgraded in place.
    let gw = spawn(&on_fresh_ports(&f.config(""))).await;
    assert_eq!(get(&gw, SYNC, "t").await.status(), 200);
    let pinned: String = rusqlite::Connection::open(f.state.path().join("state.sqlite3"))
        .unwrap()
        .query_row(
            "SELECT subject FROM users WHERE user_id = '@alice:example.org'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        pinned.ends_with("\u{1f}sub-alice") && pinned.len() > "\u{1f}sub-alice".len(),
        "{pinned:?}"
    );
}

#[tokio::test]
async fn the_cross_signing_guard_fails_closed() {
    // The gateway's error lines, to check that the store failure below is logged (the only
    // test in this binary that installs a subscriber).
    let sink = LogSink::default();
    let writer = sink.clone();
    matrix_oidc_gateway::logging::init_with_writer(
        &matrix_oidc_gateway::config::LogSettings {
            format: matrix_oidc_gateway::config::LogFormat::Json,
            level: "error".into(),
        },
        move || writer.clone(),
    );
    let f = Fakes::start().await;
    let answers = [
        (
            "malformed",
            ResponseTemplate::new(200).set_body_string("<html>ok</html>"),
        ),
        ("array", ResponseTemplate::new(200).set_body_json(json!([]))),
        (
            "wrongtype",
            ResponseTemplate::new(200)
                .set_body_json(json!({"device_keys": {}, "master_keys": "x"})),
        ),
        (
            "storefail",
            ResponseTemplate::new(200).set_body_json(json!({
                "device_keys": {}, "master_keys": {"@storefail:example.org": {"keys": {}}}
            })),
        ),
    ];
    for (user, answer) in answers {
        f.introspection(user, active(user, &full_scope("D1")), 1)
            .await;
        Mock::given(method("POST"))
            .and(path("/_matrix/client/v3/keys/query"))
            .and(wiremock::matchers::body_string_contains(
                format!("@{user}:example.org").as_str(),
            ))
            .respond_with(answer)
            .with_priority(1)
            .mount(&f.hs)
            .await;
    }
    for p in [
        "/_matrix/client/v3/register",
        "/_matrix/client/v3/devices/D1",
    ] {
        Mock::given(wiremock::matchers::any())
            .and(path(p))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
            .with_priority(1)
            .mount(&f.hs)
            .await;
    }
    let gw = spawn(&f.config_hs(&hs_cfg("synapse", "appservice_masquerade"), "")).await;
    let upload = |tok: &'static str| {
        client()
            .post(gw.url("/_matrix/client/v3/keys/device_signing/upload"))
            .bearer_auth(tok)
            .json(&json!({"master_key": {}}))
            .send()
    };
    // A keys/query answer that is not one must not read as "no master key yet".
    for tok in ["malformed", "array", "wrongtype"] {
        let r = upload(tok).await.unwrap();
        assert_eq!(r.status(), 503, "{tok}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errcode"], "M_UNKNOWN", "{tok}: {body}");
    }
    // The state store fails while the guard looks for an approval: a 503, never a 401.
    rusqlite::Connection::open(f.state.path().join("state.sqlite3"))
        .unwrap()
        .execute_batch("DROP TABLE cross_signing_resets")
        .unwrap();
    let r = upload("storefail").await.unwrap();
    assert_eq!(r.status(), 503);
    let logged = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("state store failed during the cross-signing guard"),
        "the store failure must be an error log line: {logged}"
    );
    // None of these reached the homeserver's upload endpoint.
    let uploads =
        f.hs.received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path().ends_with("device_signing/upload"))
            .count();
    assert_eq!(uploads, 0);
}

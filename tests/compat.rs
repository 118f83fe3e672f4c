//! Legacy login (`[compat]`, MSC3824) in-process: the real gateway, a wiremock OP (discovery,
//! authorization, token endpoint, introspection) and an echoing homeserver. The browser is this
//! test: it follows the redirects by hand. Each attack case of issue #15 the in-process set-up
//! can show is here: a reused and an expired login token, a `redirectUrl` off the list, a state
//! used from another browser, and `/refresh` with a token the gateway did not issue.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, ResponseTemplate};

const SYNC: &str = "/_matrix/client/v3/sync";

/// `url` with `pairs` appended as its query.
fn with_query(url: String, pairs: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(&url).unwrap();
    u.query_pairs_mut().extend_pairs(pairs);
    u.to_string()
}

const ADMIN_TOKEN: &str = "compat-admin-token-0123456789";

/// The fakes and a gateway with `[compat]` on (`extra` goes into `[compat]`).
async fn setup(extra: &str) -> (Fakes, TestGateway) {
    let (f, toml) = setup_config(extra).await;
    let gw = spawn(&toml).await;
    (f, gw)
}

/// The fakes (their OP's discovery and keys mounted) and the configuration [`setup`] starts.
async fn setup_config(extra: &str) -> (Fakes, String) {
    setup_config_hs("", extra).await
}

/// [`setup_config`] with `hs` added to `[homeserver]`.
async fn setup_config_hs(hs: &str, extra: &str) -> (Fakes, String) {
    let f = Fakes::start().await;
    mount_op_discovery(&f.op).await;
    let jwk: Value = serde_json::from_str(&fixture("rsa1.jwk.json")).unwrap();
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [jwk]})))
        .mount(&f.op)
        .await;
    let toml = f.config_hs(hs, &format!(
        "logout_audiences = [\"gateway\"]\n\n[discovery]\npublic_base_url = \"https://matrix.example.org\"\n\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n[compat]\nenabled = true\nredirect_allowlist = [\"https://client.example/app\"]\n{extra}\n"
    ));
    (f, toml)
}

/// What a started sign-in gave the browser.
struct Started {
    state: String,
    nonce: String,
    device: String,
    cookie: String,
}

async fn start(gw: &TestGateway, redirect_url: &str) -> Started {
    let r = client()
        .get(with_query(
            gw.url("/_matrix/client/v3/login/sso/redirect"),
            &[("redirectUrl", redirect_url), ("action", "login")],
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.path().ends_with("/authorize"), "{location}");
    let q: HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "gateway");
    assert_eq!(
        q["redirect_uri"],
        "https://matrix.example.org/_matrix/gateway/compat/callback"
    );
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    let scopes: Vec<&str> = q["scope"].split(' ').collect();
    assert!(scopes.contains(&"openid") && scopes.contains(&"urn:matrix:client:api:*"));
    let device = scopes
        .iter()
        .find_map(|s| s.strip_prefix("urn:matrix:client:device:"))
        .expect("a device scope")
        .to_owned();
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in [
        "HttpOnly",
        "SameSite=Lax",
        "Secure",
        "Path=/_matrix/gateway/compat/",
    ] {
        assert!(set_cookie.contains(attr), "{attr} missing: {set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    Started {
        state: q["state"].clone(),
        nonce: q["nonce"].clone(),
        device,
        cookie,
    }
}

/// The OP's token endpoint for `code` and its introspection of the access token it issues.
async fn op_grants(f: &Fakes, s: &Started, code: &str, access_token: &str) {
    op_grants_as(f, s, code, access_token, "alice").await;
}

/// [`op_grants`] for another user.
async fn op_grants_as(f: &Fakes, s: &Started, code: &str, access_token: &str, user: &str) {
    let claims = json!({
        "iss": format!("{}/", f.op.uri()),
        "aud": "gateway",
        "nonce": s.nonce,
        "sub": format!("sub-{user}"),
        // Alice's OP session is the one the back-channel logout test ends.
        "sid": if user == "alice" { "op-session-1".to_owned() } else { format!("op-session-{user}") },
    });
    op_grants_with(f, s, code, access_token, claims, &s.device, user).await;
}

/// [`op_grants`] with the ID token's claims and the granted device given.
async fn op_grants_with(
    f: &Fakes,
    s: &Started,
    code: &str,
    access_token: &str,
    claims: Value,
    device: &str,
    user: &str,
) {
    let _ = s;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(format!("code={code}")))
        .and(body_string_contains("grant_type=authorization_code"))
        .and(body_string_contains("code_verifier="))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"),
        })))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(body_string_contains(format!("token={access_token}&")))
        .respond_with(ResponseTemplate::new(200).set_body_json(active(user, &full_scope(device))))
        .mount(&f.op)
        .await;
}

async fn callback(
    gw: &TestGateway,
    s: &Started,
    code: &str,
    cookie: Option<&str>,
) -> reqwest::Response {
    let mut r = client().get(with_query(
        gw.url("/_matrix/gateway/compat/callback"),
        &[("state", s.state.as_str()), ("code", code)],
    ));
    if let Some(c) = cookie {
        r = r.header("Cookie", c);
    }
    r.send().await.unwrap()
}

/// A whole browser sign-in to the allow-listed client: the login token it brings back.
async fn login_token_for(f: &Fakes, gw: &TestGateway, code: &str, op_token: &str) -> String {
    login_token_as(f, gw, code, op_token, "alice").await
}

/// [`login_token_for`] another user.
async fn login_token_as(
    f: &Fakes,
    gw: &TestGateway,
    code: &str,
    op_token: &str,
    user: &str,
) -> String {
    let s = start(gw, "https://client.example/app").await;
    op_grants_as(f, &s, code, op_token, user).await;
    let r = callback(gw, &s, code, Some(&s.cookie)).await;
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    back.query_pairs()
        .find(|(k, _)| k == "loginToken")
        .expect("a login token")
        .1
        .into_owned()
}

async fn login(gw: &TestGateway, body: Value) -> reqwest::Response {
    client()
        .post(gw.url("/_matrix/client/v3/login"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn sync(gw: &TestGateway, token: &str) -> reqwest::Response {
    client()
        .get(gw.url(SYNC))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// The whole flow of a legacy client: flows, SSO redirect, the OP, the callback back to an
/// allow-listed client with a login token, `m.login.token`, requests with the compat token
/// (verified locally: the OP never sees it), and `/logout`.
#[tokio::test]
async fn a_legacy_client_signs_in_with_sso_and_a_login_token_and_logs_out() {
    let (f, gw) = setup("").await;
    let flows: Value = client()
        .get(gw.url("/_matrix/client/v3/login"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(flows["flows"][0]["type"], "m.login.sso");
    assert_eq!(flows["flows"][0]["oauth_aware_preferred"], true);
    assert_eq!(
        flows["flows"][0]["org.matrix.msc3824.delegated_oidc_compatibility"],
        true
    );
    assert_eq!(flows["flows"][1]["type"], "m.login.token");
    assert_eq!(flows["flows"].as_array().unwrap().len(), 2, "{flows}");

    let s = start(&gw, "https://client.example/app/sso?x=1").await;
    op_grants(&f, &s, "code-1", "op-access-1").await;
    let r = callback(&gw, &s, "code-1", Some(&s.cookie)).await;
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(back.host_str(), Some("client.example"));
    assert_eq!(back.path(), "/app/sso");
    let q: HashMap<String, String> = back.query_pairs().into_owned().collect();
    assert_eq!(q["x"], "1", "the client's own query is kept");
    let login_token = q["loginToken"].clone();
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));

    let r = login(&gw, json!({"type": "m.login.token", "token": login_token})).await;
    assert_eq!(r.status(), 200);
    let session: Value = r.json().await.unwrap();
    assert_eq!(session["user_id"], "@alice:example.org");
    assert_eq!(session["device_id"], s.device.as_str());
    assert_eq!(session["home_server"], "example.org");
    assert!(session.get("refresh_token").is_none());
    let access = session["access_token"].as_str().unwrap().to_owned();
    assert!(access.starts_with("mgc_"));

    let introspected = introspections(&f.op).await;
    let r = sync(&gw, &access).await;
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(
        echoed["headers"]["x-matrix-user-id"],
        json!(["@alice:example.org"])
    );
    assert_eq!(echoed["headers"]["x-matrix-device-id"], json!([s.device]));
    assert_eq!(
        introspections(&f.op).await,
        introspected,
        "the compat token was sent to the OP"
    );

    // The login token was single-use.
    let r = login(&gw, json!({"type": "m.login.token", "token": login_token})).await;
    let body = assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    drop(body);

    let r = logout(&gw, &access).await;
    assert_eq!(r.status(), 200);
    let r = sync(&gw, &access).await;
    assert_matrix_error(r, 401, "M_UNKNOWN_TOKEN").await;
}

/// A client that asks for a refresh token gets an expiring access token; `/refresh` rotates
/// both (the old ones stop working at once); an OAuth refresh token at `/refresh` stays the
/// OP's business (404).
#[tokio::test]
async fn compat_refresh_rotates_and_oauth_refresh_tokens_are_still_refused() {
    let (f, gw) = setup("access_token_ttl = \"60s\"").await;
    let token = login_token_for(&f, &gw, "code-r", "op-access-r").await;
    let session: Value = login(
        &gw,
        json!({"type": "m.login.token", "token": token, "refresh_token": true}),
    )
    .await
    .json()
    .await
    .unwrap();
    let expires = session["expires_in_ms"].as_u64().unwrap();
    assert!(expires > 0 && expires <= 60_000, "{session}");
    let (access, refresh) = (
        session["access_token"].as_str().unwrap().to_owned(),
        session["refresh_token"].as_str().unwrap().to_owned(),
    );
    assert!(refresh.starts_with("mgr_"));
    assert_eq!(sync(&gw, &access).await.status(), 200);

    let refresh_with = |t: String| {
        let url = gw.url("/_matrix/client/v3/refresh");
        async move {
            client()
                .post(url)
                .json(&json!({"refresh_token": t}))
                .send()
                .await
                .unwrap()
        }
    };
    let r = refresh_with(refresh.clone()).await;
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let new_access = rotated["access_token"].as_str().unwrap().to_owned();
    assert_ne!(new_access, access);
    assert!(rotated["refresh_token"].as_str().unwrap() != refresh);
    assert_eq!(sync(&gw, &new_access).await.status(), 200);
    assert_matrix_error(sync(&gw, &access).await, 401, "M_UNKNOWN_TOKEN").await;
    assert_matrix_error(refresh_with(refresh).await, 401, "M_UNKNOWN_TOKEN").await;
    // Once the access token has expired, /logout still ends the session: its refresh token
    // is dead afterwards.
    let new_refresh = rotated["refresh_token"].as_str().unwrap().to_owned();
    gw.clock.advance(Duration::from_secs(61));
    assert_matrix_error(sync(&gw, &new_access).await, 401, "M_UNKNOWN_TOKEN").await;
    let r = client()
        .post(gw.url("/_matrix/client/v3/logout"))
        .bearer_auth(&new_access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_matrix_error(refresh_with(new_refresh).await, 401, "M_UNKNOWN_TOKEN").await;
    // An OAuth refresh token: not the gateway's to refresh.
    assert_matrix_error(
        refresh_with("op-refresh-token".into()).await,
        404,
        "M_UNRECOGNIZED",
    )
    .await;
    // The OAuth access token cannot log out at /logout either: that is the OP's.
    let r = client()
        .post(gw.url("/_matrix/client/v3/logout"))
        .bearer_auth("op-access-r")
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
}

/// A `redirectUrl` off the allow-list never receives the login token by redirect: the user
/// gets a page that names where it would go, which cannot be framed.
#[tokio::test]
async fn a_redirect_url_off_the_list_gets_a_confirmation_page_not_a_redirect() {
    let (f, gw) = setup("").await;
    for off_list in [
        "https://evil.example/app",
        "https://client.example/application",
        "https://client.example:8443/app",
        "http://client.example/app",
    ] {
        let s = start(&gw, off_list).await;
        let code = format!("code-{}", s.device);
        op_grants(&f, &s, &code, &format!("op-{}", s.device)).await;
        let r = callback(&gw, &s, &code, Some(&s.cookie)).await;
        assert_eq!(r.status(), 200, "{off_list} was redirected to");
        assert!(r.headers().get("location").is_none());
        assert_eq!(r.headers()["x-frame-options"], "DENY");
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"));
        let page = r.text().await.unwrap();
        // The whole destination is named (scheme, host, port, path), not only the host.
        assert!(page.contains(&format!("Continue to {off_list}?")), "{page}");
        assert!(page.contains("loginToken=mgl_"), "{page}");
    }
}

/// The state is bound to the browser that started the sign-in: the callback without its
/// cookie (or with another's) is refused, and that uses the state up. An unknown state, an
/// expired login token and an OP error are refused too.
#[tokio::test]
async fn state_login_token_and_op_errors_fail_closed() {
    let (f, gw) = setup("login_token_ttl = \"30s\"").await;
    let s = start(&gw, "https://client.example/app").await;
    op_grants(&f, &s, "code-s", "op-access-s").await;
    let other = start(&gw, "https://client.example/app").await;
    let r = callback(&gw, &s, "code-s", Some(&other.cookie)).await;
    assert_eq!(r.status(), 403, "another browser's cookie was accepted");
    assert!(r.text().await.unwrap().contains("another browser"));
    // The state is used up: the right cookie now finds nothing.
    let r = callback(&gw, &s, "code-s", Some(&s.cookie)).await;
    assert_eq!(r.status(), 400);
    assert!(
        !f.op
            .received_requests()
            .await
            .unwrap()
            .iter()
            .any(|r| r.url.path() == "/token"),
        "a code was exchanged for a refused callback"
    );
    // No cookie at all.
    let s = start(&gw, "https://client.example/app").await;
    assert_eq!(callback(&gw, &s, "code-x", None).await.status(), 403);
    // The OP says no.
    let s = start(&gw, "https://client.example/app").await;
    let r = client()
        .get(with_query(
            gw.url("/_matrix/gateway/compat/callback"),
            &[("state", s.state.as_str()), ("error", "access_denied")],
        ))
        .header("Cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // An expired login token.
    let token = login_token_for(&f, &gw, "code-e", "op-access-e").await;
    gw.clock.advance(Duration::from_secs(31));
    let r = login(&gw, json!({"type": "m.login.token", "token": token})).await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    // Other login types and garbage.
    let r = login(&gw, json!({"type": "m.login.password", "password": "x"})).await;
    assert_matrix_error(r, 400, "M_UNKNOWN").await;
    let r = client()
        .post(gw.url("/_matrix/client/v3/login"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_matrix_error(r, 400, "M_UNKNOWN").await;
}

/// A compat token sent to the gateway's RFC 7009 revocation endpoint ends its session there:
/// 200, the token refused from then on, and nothing sent to the OP (which never issued it).
#[tokio::test]
async fn revoking_a_compat_token_ends_its_session_without_asking_the_op() {
    let (f, gw) = setup("").await;
    let access = compat_session(&f, &gw, 1, "alice").await;
    assert_eq!(sync(&gw, &access).await.status(), 200);
    let before = f.op.received_requests().await.unwrap().len();
    let r = client()
        .post(gw.url("/_matrix-oidc-gateway/oauth2/revoke"))
        .form(&[("token", access.as_str()), ("client_id", "legacy-client")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        f.op.received_requests().await.unwrap().len(),
        before,
        "the compat token went to the OP"
    );
    assert_matrix_error(sync(&gw, &access).await, 401, "M_UNKNOWN_TOKEN").await;
}

/// A user signed out between the callback and `m.login.token` (here by the admin API; the
/// OP's back-channel logout of the session records the same kind of revocation) gets no
/// session: 403, and the login token is used up.
#[tokio::test]
async fn a_login_token_of_a_user_signed_out_since_gets_no_session() {
    let (f, gw) = setup("").await;
    let token = login_token_for(&f, &gw, "code-o", "op-access-o").await;
    let r = client()
        .post(gw.admin_url("/admin/v1/users/@alice:example.org/logout"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let r = login(&gw, json!({"type": "m.login.token", "token": token})).await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
}

/// The OP's back-channel logout of the OP session a compat session came from ends it: the
/// session's `sid` comes from the ID token (the introspection answer here has none).
#[tokio::test]
async fn the_ops_backchannel_logout_of_the_session_ends_the_compat_session() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let (f, gw) = setup("").await;
    let access = compat_session(&f, &gw, 1, "alice").await;
    assert_eq!(sync(&gw, &access).await.status(), 200);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": format!("{}/", f.op.uri()),
        "aud": "gateway",
        "iat": now,
        "exp": now + 120,
        "jti": "compat-bcl-1",
        "sid": "op-session-1",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    });
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    h.typ = Some("logout+jwt".into());
    let key = EncodingKey::from_rsa_pem(fixture("rsa1.pem").as_bytes()).unwrap();
    let logout_token = encode(&h, &claims, &key).unwrap();
    let r = client()
        .post(gw.url("/_matrix-oidc-gateway/oidc/backchannel-logout"))
        .form(&[("logout_token", logout_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_matrix_error(sync(&gw, &access).await, 401, "M_UNKNOWN_TOKEN").await;
    // Ended in the store too (not only refused while the revocation is remembered), in this
    // binding mode that records no OP sessions of its own.
    assert!(admin_sessions(&gw, "@alice:example.org").await.is_empty());
}

/// The OP's answer is bound to this sign-in: an ID token with another nonce, issuer or
/// audience, or an access token for another device than the one asked for, is refused (403
/// page, no login token).
#[tokio::test]
async fn an_op_answer_for_another_sign_in_is_refused() {
    let (f, gw) = setup("").await;
    let iss = format!("{}/", f.op.uri());
    let cases = [
        (
            "nonce",
            json!({"iss": iss, "aud": "gateway", "nonce": "someone-elses"}),
            None,
        ),
        (
            "issuer",
            json!({"iss": "https://other.example/", "aud": "gateway"}),
            None,
        ),
        (
            "audience",
            json!({"iss": iss, "aud": ["another-client"]}),
            None,
        ),
        (
            "device",
            json!({"iss": iss, "aud": "gateway"}),
            Some("OTHERDEV01"),
        ),
    ];
    for (i, (what, mut claims, device)) in cases.into_iter().enumerate() {
        let s = start(&gw, "https://client.example/app").await;
        if claims.get("nonce").is_none() {
            claims["nonce"] = json!(s.nonce);
        }
        let code = format!("code-bad-{i}");
        let device = device
            .map(str::to_owned)
            .unwrap_or_else(|| s.device.clone());
        op_grants_with(
            &f,
            &s,
            &code,
            &format!("op-bad-{i}"),
            claims,
            &device,
            "alice",
        )
        .await;
        let r = callback(&gw, &s, &code, Some(&s.cookie)).await;
        assert_eq!(r.status(), 403, "a wrong {what} was accepted");
        assert!(r.headers().get("location").is_none());
    }
}

/// With `[compat]` off (the default) every legacy endpoint stays refused as before.
/// A compat session of `user` (signed in through the browser flow): its access token.
async fn compat_session(f: &Fakes, gw: &TestGateway, n: u32, user: &str) -> String {
    let token = login_token_as(
        f,
        gw,
        &format!("code-all-{n}"),
        &format!("op-all-{n}"),
        user,
    )
    .await;
    let r = login(gw, json!({"type": "m.login.token", "token": token})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// `POST /logout` with `token` and an empty JSON body.
async fn logout(gw: &TestGateway, token: &str) -> reqwest::Response {
    client()
        .post(gw.url("/_matrix/client/v3/logout"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
}

async fn logout_all(gw: &TestGateway, token: &str, body: Option<Value>) -> reqwest::Response {
    let mut r = client()
        .post(gw.url("/_matrix/client/v3/logout/all"))
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap()
}

/// `/logout/all` with a compat token ends every compat session of its user and no one
/// else's, once the client says that only compat sessions ending is fine (MAS's
/// `io.element.only_compat_is_fine`). Without that, or with an OAuth token, it stays 404:
/// signing out everywhere is the OP's.
#[tokio::test]
async fn logout_all_ends_every_compat_session_of_the_user_only() {
    let (f, gw) = setup("").await;
    let alice = [
        compat_session(&f, &gw, 1, "alice").await,
        compat_session(&f, &gw, 2, "alice").await,
    ];
    let bob = compat_session(&f, &gw, 3, "bob").await;
    f.introspection("oauth-alice", active("alice", &full_scope("OAUTHDEV")), 1)
        .await;
    assert_eq!(sync(&gw, "oauth-alice").await.status(), 200);

    for body in [
        None,
        Some(json!({})),
        Some(json!({"io.element.only_compat_is_fine": false})),
    ] {
        let r = logout_all(&gw, &alice[0], body).await;
        assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
    }
    let r = logout_all(
        &gw,
        "oauth-alice",
        Some(json!({"io.element.only_compat_is_fine": true})),
    )
    .await;
    assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
    for t in alice.iter().chain([&bob]) {
        assert_eq!(sync(&gw, t).await.status(), 200, "nothing ended yet");
    }

    let r = logout_all(
        &gw,
        &alice[1],
        Some(json!({"io.element.only_compat_is_fine": true})),
    )
    .await;
    assert_eq!(r.status(), 200);
    for t in &alice {
        assert_matrix_error(sync(&gw, t).await, 401, "M_UNKNOWN_TOKEN").await;
    }
    assert_eq!(
        sync(&gw, &bob).await.status(),
        200,
        "another user's session"
    );
    assert_eq!(
        sync(&gw, "oauth-alice").await.status(),
        200,
        "the OP's session"
    );
    // The ended session cannot do it again.
    let r = logout_all(
        &gw,
        &alice[0],
        Some(json!({"io.element.only_compat_is_fine": true})),
    )
    .await;
    assert_matrix_error(r, 401, "M_UNKNOWN_TOKEN").await;
    // Requests are counted by the kind of token they carried.
    let metrics = gw.metrics().await;
    for kind in ["compat", "oauth"] {
        let series = format!(
            "matrix_oidc_gateway_requests_total{{outcome=\"2xx\",route=\"authenticated\",token_kind=\"{kind}\"}}"
        );
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
}

/// After a user name moved to a new OP subject (an operator re-pinned it), an old subject's
/// compat session cannot use `/logout/all` to end the new owner's sessions: 403, and the new
/// owner's session lives on.
#[tokio::test]
async fn logout_all_from_an_old_subjects_session_ends_nothing_of_the_new_owner() {
    let (f, gw) = setup("").await;
    let old = compat_session(&f, &gw, 1, "alice").await;
    let r = client()
        .put(gw.admin_url("/admin/v1/users/@alice:example.org/subject"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"sub": "sub-alice-new"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The new owner signs in: the OP vouches for subject sub-alice-new as alice.
    let s = start(&gw, "https://client.example/app").await;
    let claims = json!({
        "iss": format!("{}/", f.op.uri()),
        "aud": "gateway",
        "nonce": s.nonce,
        "sub": "sub-alice-new",
        "sid": "op-session-new",
    });
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("code=code-new"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "op-new",
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"),
        })))
        .mount(&f.op)
        .await;
    let mut answer = active("alice", &full_scope(&s.device));
    answer["sub"] = json!("sub-alice-new");
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(body_string_contains("token=op-new&"))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(&f.op)
        .await;
    let r = callback(&gw, &s, "code-new", Some(&s.cookie)).await;
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let token = back
        .query_pairs()
        .find(|(k, _)| k == "loginToken")
        .unwrap()
        .1
        .into_owned();
    let r = login(&gw, json!({"type": "m.login.token", "token": token})).await;
    assert_eq!(r.status(), 200);
    let new: Value = r.json().await.unwrap();
    let new = new["access_token"].as_str().unwrap().to_owned();
    assert_eq!(sync(&gw, &new).await.status(), 200);

    let r = logout_all(
        &gw,
        &old,
        Some(json!({"io.element.only_compat_is_fine": true})),
    )
    .await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    assert_eq!(
        sync(&gw, &new).await.status(),
        200,
        "the new owner's session"
    );
}

/// `/logout/all` ends the caller's own session even when the per-user index does not list it
/// (a session opened before the index existed).
#[tokio::test]
async fn logout_all_ends_the_callers_own_session_even_unindexed() {
    let (f, gw) = setup("").await;
    let own = compat_session(&f, &gw, 1, "alice").await;
    let db = rusqlite::Connection::open(f.state.path().join("state.sqlite3")).unwrap();
    let n = db
        .execute("DELETE FROM expiring WHERE space = 'cus'", [])
        .unwrap();
    assert_eq!(n, 1, "the session's index entry");
    let r = logout_all(
        &gw,
        &own,
        Some(json!({"io.element.only_compat_is_fine": true})),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_matrix_error(sync(&gw, &own).await, 401, "M_UNKNOWN_TOKEN").await;
}

/// The admin API lists a user's compat sessions (devices, subject, OP session, end, whether
/// refreshable; never a token) and none once they ended.
#[tokio::test]
async fn the_admin_api_lists_a_users_compat_sessions() {
    let (f, gw) = setup("").await;
    let list = |gw_admin: String| async move {
        let r = client()
            .get(gw_admin)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    let url = gw.admin_url("/admin/v1/users/@alice:example.org/compat_sessions");
    assert_eq!(list(url.clone()).await["sessions"], json!([]));
    let a = compat_session(&f, &gw, 1, "alice").await;
    let _b = compat_session(&f, &gw, 2, "alice").await;
    let _c = compat_session(&f, &gw, 3, "bob").await;
    let listed = list(url.clone()).await;
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{listed}");
    for s in sessions {
        assert_eq!(s["subject"], "sub-alice");
        assert_eq!(s["op_session"], "op-session-1");
        assert_eq!(s["refreshable"], false);
        assert_eq!(s["op_grant"], false, "the OP issued no refresh token");
        assert!(s["device_id"].as_str().is_some_and(|d| d.len() == 10));
        assert!(s["ends_at_ms"].as_u64().unwrap() > 0);
    }
    assert!(
        !listed.to_string().contains("mgc_"),
        "no token in the listing"
    );
    let r = logout(&gw, &a).await;
    assert_eq!(r.status(), 200);
    assert_eq!(list(url).await["sessions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn without_compat_the_legacy_endpoints_stay_refused() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    for (m, p) in [
        ("GET", "/_matrix/client/v3/login"),
        (
            "GET",
            "/_matrix/client/v3/login/sso/redirect?redirectUrl=https://x",
        ),
        ("POST", "/_matrix/client/v3/refresh"),
    ] {
        let r = client()
            .request(m.parse().unwrap(), gw.url(p))
            .send()
            .await
            .unwrap();
        assert_matrix_error(r, 404, "M_UNRECOGNIZED").await;
    }
    let r = client()
        .get(gw.url("/_matrix/gateway/compat/callback?state=x"))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
}

/// The OP's password grant for `user` with `password` (any other: `invalid_grant`); the access
/// token it issues names the device the grant asked for, and is introspected as `as_user`.
async fn op_password(f: &Fakes, user: &str, password: &str, as_user: &'static str) {
    let form = move |req: &wiremock::Request| -> HashMap<String, String> {
        form_urlencoded::parse(&req.body).into_owned().collect()
    };
    let (user, password) = (user.to_owned(), password.to_owned());
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=password"))
        .respond_with(move |req: &wiremock::Request| {
            let q = form(req);
            if q.get("username") != Some(&user) || q.get("password") != Some(&password) {
                return ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"}));
            }
            let device = q["scope"]
                .split(' ')
                .find_map(|s| s.strip_prefix("urn:matrix:client:device:"))
                .unwrap()
                .to_owned();
            ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("op-pw-{device}"),
                "token_type": "Bearer",
                "expires_in": 300,
                "refresh_token": format!("op-pw-rt-{device}"),
            }))
        })
        .mount(&f.op)
        .await;
    // Its grants refresh (the same access token again).
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("refresh_token=op-pw-rt-"))
        .respond_with(move |req: &wiremock::Request| {
            let q = form(req);
            let device = q["refresh_token"]
                .strip_prefix("op-pw-rt-")
                .unwrap()
                .to_owned();
            ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("op-pw-{device}"),
                "token_type": "Bearer",
            }))
        })
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(body_string_contains("token=op-pw-"))
        .respond_with(move |req: &wiremock::Request| {
            let q = form(req);
            let device = q["token"].strip_prefix("op-pw-").unwrap();
            ResponseTemplate::new(200).set_body_json(active(as_user, &full_scope(device)))
        })
        .mount(&f.op)
        .await;
}

/// The password grants the OP received.
async fn password_grants(f: &Fakes) -> Vec<wiremock::Request> {
    f.op.received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            r.url.path() == "/token"
                && String::from_utf8_lossy(&r.body).contains("grant_type=password")
        })
        .collect()
}

fn password_body(user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    })
}

/// `m.login.password` (when offered) goes to the OP's password grant for the user and a device,
/// as the gateway's confidential client; the result is a compat session like any other. A
/// localpart or a full user ID of this server (in any case, in `identifier` or the deprecated
/// `user`) name the user; a wrong password, another server's user ID or an OP that signs in
/// another Matrix user is 403 `M_FORBIDDEN`; a login body the gateway cannot read, 400.
#[tokio::test]
async fn a_password_login_is_checked_at_the_op_and_opens_a_compat_session() {
    let (f, gw) = setup("password_login = true").await;
    op_password(&f, "alice", "correct horse", "alice").await;
    let flows: Value = client()
        .get(gw.url("/_matrix/client/v3/login"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["m.login.sso", "m.login.token", "m.login.password"],
        "{flows}"
    );

    let mut body = password_body("alice", "correct horse");
    body["device_id"] = json!("BOTDEVICE");
    body["refresh_token"] = json!(true);
    let r = login(&gw, body).await;
    assert_eq!(r.status(), 200);
    let session: Value = r.json().await.unwrap();
    assert_eq!(session["user_id"], "@alice:example.org");
    assert_eq!(session["device_id"], "BOTDEVICE");
    assert!(session["refresh_token"]
        .as_str()
        .unwrap()
        .starts_with("mgr_"));
    let access = session["access_token"].as_str().unwrap().to_owned();
    assert!(access.starts_with("mgc_"));
    let grants = password_grants(&f).await;
    assert_eq!(grants.len(), 1);
    let q: HashMap<String, String> = form_urlencoded::parse(&grants[0].body)
        .into_owned()
        .collect();
    assert_eq!(q["username"], "alice");
    assert_eq!(
        q["scope"],
        "openid urn:matrix:client:api:* urn:matrix:client:device:BOTDEVICE"
    );
    assert!(
        grants[0].headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Basic "),
        "the gateway authenticates as its confidential client"
    );
    let r = sync(&gw, &access).await;
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(
        echoed["headers"]["x-matrix-user-id"],
        json!(["@alice:example.org"])
    );
    assert_eq!(
        echoed["headers"]["x-matrix-device-id"],
        json!(["BOTDEVICE"])
    );

    // A full user ID, in another case, in the deprecated `user` field; no device: a new one.
    let r = login(
        &gw,
        json!({"type": "m.login.password", "user": "@Alice:example.org", "password": "correct horse"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let session: Value = r.json().await.unwrap();
    assert_eq!(session["user_id"], "@alice:example.org");
    let device = session["device_id"].as_str().unwrap();
    assert_eq!(device.len(), 10, "{device}");
    assert_ne!(device, "BOTDEVICE");

    let r = login(&gw, password_body("alice", "wrong horse")).await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    let asked = password_grants(&f).await.len();
    let r = login(&gw, password_body("@alice:elsewhere.org", "correct horse")).await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    for body in [
        json!({"type": "m.login.password", "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "a@example.org"}, "password": "x"}),
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}}),
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "x", "device_id": "bad device"}),
    ] {
        let r = login(&gw, body.clone()).await;
        assert_matrix_error(r, 400, "M_UNKNOWN").await;
    }
    assert_eq!(
        password_grants(&f).await.len(),
        asked,
        "a user of another server or an unreadable login reached the OP"
    );
}

/// A password the OP accepts for a user who maps to another Matrix ID signs nobody in: the
/// client asked for one user and must not get another's session. (The grant also asks for the
/// configured `extra_scopes`.)
#[tokio::test]
async fn a_password_the_op_accepts_for_another_matrix_user_is_refused() {
    let (f, gw) = setup("password_login = true\nextra_scopes = [\"offline_access\"]").await;
    op_password(&f, "alice", "pw", "mallory").await;
    let r = login(&gw, password_body("alice", "pw")).await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    let grants = password_grants(&f).await;
    assert_eq!(grants.len(), 1);
    let q: HashMap<String, String> = form_urlencoded::parse(&grants[0].body)
        .into_owned()
        .collect();
    assert!(q["scope"].ends_with(" offline_access"), "{}", q["scope"]);
}

/// Password attempts are budgeted per user and per client address (429 with `retry_after_ms`,
/// whatever the password). An attempt the OP may have seen counts even when its answer was
/// garbage (503): an OP answering guesses with errors must not make them free.
#[tokio::test]
async fn password_attempts_are_limited_per_user_and_per_address() {
    let (f, gw) = setup(
        "password_login = true\npassword_attempts_per_user = 2\npassword_attempts_per_address = 4",
    )
    .await;
    // The OP answers carol's first attempt with a 500: it counts all the same.
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("username=carol"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&f.op)
        .await;
    op_password(&f, "alice", "pw", "alice").await;
    for _ in 0..2 {
        let r = login(&gw, password_body("alice", "guess")).await;
        assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    }
    let r = login(&gw, password_body("alice", "pw")).await;
    let (_, body) = assert_matrix_error(r, 429, "M_LIMIT_EXCEEDED").await;
    assert!(body["retry_after_ms"].as_u64().unwrap() >= 1000, "{body}");
    assert_eq!(
        password_grants(&f).await.len(),
        2,
        "the third guess reached the OP"
    );

    let r = login(&gw, password_body("carol", "pw")).await;
    assert_eq!(r.status(), 503);
    // Three attempts of this address spent (alice's two, carol's): one left.
    let r = login(&gw, password_body("dave", "guess")).await;
    assert_matrix_error(r, 403, "M_FORBIDDEN").await;
    let r = login(&gw, password_body("erin", "guess")).await;
    assert_matrix_error(r, 429, "M_LIMIT_EXCEEDED").await;
}

/// Without `password_login` a password login is not a login this server offers.
#[tokio::test]
async fn password_login_is_refused_unless_configured() {
    let (f, gw) = setup("").await;
    op_password(&f, "alice", "pw", "alice").await;
    let r = login(&gw, password_body("alice", "pw")).await;
    assert_matrix_error(r, 400, "M_UNKNOWN").await;
    assert!(password_grants(&f).await.is_empty());
}

/// The refresh grants the OP received with `refresh_token`.
async fn op_refreshes(f: &Fakes, refresh_token: &str) -> usize {
    let needle = format!("refresh_token={refresh_token}");
    f.op.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| {
            let body = String::from_utf8_lossy(&r.body);
            r.url.path() == "/token"
                && body.contains("grant_type=refresh_token")
                && body.split('&').any(|p| p == needle)
        })
        .count()
}

/// A browser sign-in where the OP's code exchange also brings `refresh_token`: the compat
/// session's access token and device.
async fn session_with_op_grant(
    f: &Fakes,
    gw: &TestGateway,
    n: u32,
    refresh_token: &str,
) -> (String, String) {
    let code = format!("code-grant-{n}");
    let s = start(gw, "https://client.example/app").await;
    op_grants(f, &s, &code, &format!("op-grant-{n}")).await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(format!("code={code}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": format!("op-grant-{n}"),
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": refresh_token,
        })))
        .with_priority(1)
        .mount(&f.op)
        .await;
    let r = callback(gw, &s, &code, Some(&s.cookie)).await;
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let token = back
        .query_pairs()
        .find(|(k, _)| k == "loginToken")
        .unwrap()
        .1
        .into_owned();
    let r = login(gw, json!({"type": "m.login.token", "token": token})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    (v["access_token"].as_str().unwrap().to_owned(), s.device)
}

/// The OP's introspection of the access tokens its refreshes issue (starting with `prefix`):
/// `user` with the full API on `device`.
async fn op_introspects_renewed(f: &Fakes, prefix: &str, user: &'static str, device: &str) {
    let device = device.to_owned();
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(body_string_contains(format!("token={prefix}")))
        .respond_with(move |_: &wiremock::Request| {
            ResponseTemplate::new(200).set_body_json(active(user, &full_scope(&device)))
        })
        .mount(&f.op)
        .await;
}

async fn admin_sessions(gw: &TestGateway, user: &str) -> Vec<Value> {
    let r = client()
        .get(gw.admin_url(&format!("/admin/v1/users/{user}/compat_sessions")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["sessions"].as_array().unwrap().clone()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Syncs with `token` every 200 ms until `done` holds of the last status (or 15 s pass); the
/// statuses seen. (Metrics are the process's, shared by the tests running in parallel: a
/// test waits on what its own gateway and OP show.)
async fn sync_until<F, Fut>(gw: &TestGateway, token: &str, mut done: F) -> Vec<u16>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut seen = Vec::new();
    for _ in 0..75 {
        let status = sync(gw, token).await.status().as_u16();
        seen.push(status);
        if done(status).await {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not done after 15 s; statuses {seen:?}");
}

/// A sign-in whose OP issued a refresh token ties the compat session to the OP grant: it may
/// live `session_lifetime` (beyond `revocation_retention`), the gateway refreshes the grant at
/// the OP in the background while the session is used (the session is served meanwhile, and a
/// rotated refresh token is kept), and when the OP refuses the grant the session ends: its
/// token gets 401 and it is gone from the admin API. A sign-in without a refresh token gets a
/// session capped at the retention.
#[tokio::test]
async fn a_compat_sessions_op_grant_is_checked_while_used_and_its_end_ends_the_session() {
    let (f, gw) = setup(
        "grant_check_interval = \"1s\"\nsession_lifetime = \"48h\"\n\n[cache]\nmax_ttl = \"1s\"\nnegative_ttl = \"1s\"",
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("refresh_token=op-rt-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "op-grant-renewed",
            "token_type": "Bearer",
            "refresh_token": "op-rt-2",
        })))
        .mount(&f.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("refresh_token=op-rt-2"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"})))
        .mount(&f.op)
        .await;
    let opened = now_ms();
    let (access, device) = session_with_op_grant(&f, &gw, 1, "op-rt-1").await;
    op_introspects_renewed(&f, "op-grant-renewed", "alice", &device).await;
    let listed = admin_sessions(&gw, "@alice:example.org").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["op_grant"], true);
    let ends = listed[0]["ends_at_ms"].as_u64().unwrap();
    assert!(
        ends >= opened + 47 * 3_600_000,
        "a session with an OP grant lives session_lifetime: {ends}"
    );

    // Used past the interval: the OP refreshes the grant (rotating the refresh token) while
    // the session goes on.
    let seen = sync_until(&gw, &access, |_| async {
        op_refreshes(&f, "op-rt-1").await >= 1
    })
    .await;
    assert!(seen.iter().all(|s| *s == 200), "{seen:?}");
    // The next check uses the rotated token; the OP says the grant is gone: the session ends.
    let seen = sync_until(&gw, &access, |status| async move { status == 401 }).await;
    let (last, served) = seen.split_last().unwrap();
    assert!(served.iter().all(|s| *s == 200), "{seen:?}");
    assert_eq!(*last, 401);
    assert_eq!(
        op_refreshes(&f, "op-rt-1").await,
        1,
        "a refresh token reused"
    );
    assert_eq!(op_refreshes(&f, "op-rt-2").await, 1);
    for result in ["renewed", "ended"] {
        let series =
            format!("matrix_oidc_gateway_compat_grant_checks_total{{result=\"{result}\"}}");
        assert!(gw.metric(&series).await.unwrap_or(0.0) >= 1.0, "{series}");
    }
    let r = sync(&gw, &access).await;
    assert_matrix_error(r, 401, "M_UNKNOWN_TOKEN").await;
    assert!(admin_sessions(&gw, "@alice:example.org").await.is_empty());

    // Without a refresh token: no grant, and at most the retention (24 h).
    let _plain = compat_session(&f, &gw, 9, "bob").await;
    let listed = admin_sessions(&gw, "@bob:example.org").await;
    assert_eq!(listed[0]["op_grant"], false);
    let ends = listed[0]["ends_at_ms"].as_u64().unwrap();
    assert!(
        ends <= now_ms() + 24 * 3_600_000,
        "a session without an OP grant outlives the retention: {ends}"
    );
}

/// An OP that cannot confirm a session's grant never signs the session out: the session is
/// served while the check fails, and once the grant has not been confirmed for as long as a
/// sign-out is remembered (the retention less the cache's window) each request checks it first
/// and gets 503 while the OP is down (never a 401 that would log the client out). When the OP
/// is back, the session goes on.
#[tokio::test]
async fn a_grant_the_op_cannot_confirm_is_a_503_not_a_sign_out() {
    let (f, gw) = setup(
        "grant_check_interval = \"1s\"\n\n[cache]\nmax_ttl = \"1s\"\nnegative_ttl = \"1s\"\n\n[notifications]\nrevocation_retention = \"5s\"",
    )
    .await;
    // The OP's token endpoint answers refreshes 503 until `down` is cleared. (A switch, not a
    // scoped mock: wiremock reorders mocks by priority, and a scoped mock's guard can then
    // remove another.)
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let switch = down.clone();
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(move |_: &wiremock::Request| {
            if switch.load(std::sync::atomic::Ordering::SeqCst) {
                ResponseTemplate::new(503)
            } else {
                ResponseTemplate::new(200).set_body_json(json!({
                    "access_token": "op-back-1", "token_type": "Bearer",
                }))
            }
        })
        .mount(&f.op)
        .await;
    let opened = std::time::Instant::now();
    let (access, device) = session_with_op_grant(&f, &gw, 2, "op-rt-down").await;
    let seen = sync_until(&gw, &access, |status| async move { status == 503 }).await;
    // Horizon: 5 s less the cache's 1 s.
    assert!(
        opened.elapsed() >= Duration::from_secs(4),
        "{:?}",
        opened.elapsed()
    );
    let (last, served) = seen.split_last().unwrap();
    assert!(served.iter().all(|s| *s == 200), "{seen:?}");
    assert_eq!(*last, 503);
    assert!(
        op_refreshes(&f, "op-rt-down").await >= 2,
        "the check was not retried"
    );
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    op_introspects_renewed(&f, "op-back-", "alice", &device).await;
    let seen = sync_until(&gw, &access, |status| async move { status == 200 }).await;
    assert!(seen.iter().all(|s| *s == 503 || *s == 200), "{seen:?}");
    assert_eq!(admin_sessions(&gw, "@alice:example.org").await.len(), 1);
}

/// The grant's refreshed access token must still be this session's: an OP whose grant now
/// gives another user (or drops the device or the full API) ends the session.
#[tokio::test]
async fn a_grant_that_now_gives_another_user_ends_the_session() {
    let (f, gw) =
        setup("grant_check_interval = \"1s\"\n\n[cache]\nmax_ttl = \"1s\"\nnegative_ttl = \"1s\"")
            .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("refresh_token=op-rt-remap"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "op-remapped-1", "token_type": "Bearer",
        })))
        .mount(&f.op)
        .await;
    let (access, device) = session_with_op_grant(&f, &gw, 3, "op-rt-remap").await;
    op_introspects_renewed(&f, "op-remapped-", "mallory", &device).await;
    let seen = sync_until(&gw, &access, |status| async move { status == 401 }).await;
    assert!(seen[..seen.len() - 1].iter().all(|s| *s == 200), "{seen:?}");
    assert!(admin_sessions(&gw, "@alice:example.org").await.is_empty());
}

/// A sign-out recorded at the gateway ends the compat sessions it covers in the store at once
/// (not only refuses them while it is remembered): the admin API's user logout leaves none.
#[tokio::test]
async fn a_recorded_sign_out_ends_the_compat_sessions_it_covers() {
    let (f, gw) = setup("").await;
    let a = compat_session(&f, &gw, 11, "alice").await;
    let _b = compat_session(&f, &gw, 12, "alice").await;
    let c = compat_session(&f, &gw, 13, "bob").await;
    assert_eq!(admin_sessions(&gw, "@alice:example.org").await.len(), 2);
    let r = client()
        .post(gw.admin_url("/admin/v1/users/@alice:example.org/logout"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(admin_sessions(&gw, "@alice:example.org").await.is_empty());
    assert_eq!(admin_sessions(&gw, "@bob:example.org").await.len(), 1);
    assert_matrix_error(sync(&gw, &a).await, 401, "M_UNKNOWN_TOKEN").await;
    // An admin purge of one compat token ends its session as well.
    let r = client()
        .post(gw.admin_url("/admin/v1/cache/purge"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"token": c}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(admin_sessions(&gw, "@bob:example.org").await.is_empty());
}

/// A password login naming a device takes it over: the user's earlier compat session on it
/// ends, and its token can no longer sign the device out under the new session.
#[tokio::test]
async fn a_password_login_on_a_named_device_ends_the_old_session_there() {
    let (f, gw) = setup("password_login = true").await;
    op_password(&f, "alice", "pw", "alice").await;
    let on_device = || {
        let mut b = password_body("alice", "pw");
        b["device_id"] = json!("BOTDEVICE");
        b
    };
    let first: Value = login(&gw, on_device()).await.json().await.unwrap();
    let old = first["access_token"].as_str().unwrap().to_owned();
    let second: Value = login(&gw, on_device()).await.json().await.unwrap();
    let new = second["access_token"].as_str().unwrap().to_owned();
    assert_matrix_error(sync(&gw, &old).await, 401, "M_UNKNOWN_TOKEN").await;
    let r = logout(&gw, &old).await;
    assert_eq!(r.status(), 401, "the old session's /logout");
    assert_eq!(sync(&gw, &new).await.status(), 200);
    assert_eq!(admin_sessions(&gw, "@alice:example.org").await.len(), 1);
}

/// Compat sessions are the store's, not the process's: after a restart the access token still
/// works and `/refresh` still rotates.
#[tokio::test]
async fn a_compat_session_survives_a_gateway_restart() {
    let (f, toml) = setup_config("password_login = true").await;
    op_password(&f, "alice", "pw", "alice").await;
    let gw = spawn(&toml).await;
    let mut body = password_body("alice", "pw");
    body["refresh_token"] = json!(true);
    let r = login(&gw, body).await;
    assert_eq!(r.status(), 200);
    let session: Value = r.json().await.unwrap();
    let access = session["access_token"].as_str().unwrap().to_owned();
    let refresh = session["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(sync(&gw, &access).await.status(), 200);
    gw.stop().await;

    let gw = spawn(&on_fresh_ports(&toml)).await;
    let r = sync(&gw, &access).await;
    assert_eq!(r.status(), 200, "the compat token after a restart");
    let echoed: Value = r.json().await.unwrap();
    assert_eq!(
        echoed["headers"]["x-matrix-user-id"],
        json!(["@alice:example.org"])
    );
    let r = client()
        .post(gw.url("/_matrix/client/v3/refresh"))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let renewed: Value = r.json().await.unwrap();
    let access2 = renewed["access_token"].as_str().unwrap();
    assert_eq!(sync(&gw, access2).await.status(), 200);
    assert_matrix_error(sync(&gw, &access).await, 401, "M_UNKNOWN_TOKEN").await;
}

/// One grant check at a time for a session, across replicas: while one replica's refresh is at
/// a slow OP, the other replica's requests find the check due too, but do not refresh with the
/// same refresh token (an OP takes a refresh token used twice for a stolen one and revokes the
/// grant). Each rotated refresh token is used once.
#[tokio::test]
async fn one_grant_check_runs_at_a_time_across_replicas() {
    let (f, toml) = setup_config(
        "grant_check_interval = \"1s\"\n\n[cache]\nmax_ttl = \"1s\"\nnegative_ttl = \"1s\"",
    )
    .await;
    // Refreshing op-rt-N gives op-rt-(N+1), after 1.5 s.
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("grant_type=refresh_token"))
        .respond_with(|req: &wiremock::Request| {
            let q: HashMap<String, String> =
                form_urlencoded::parse(&req.body).into_owned().collect();
            let n: u32 = q["refresh_token"]
                .strip_prefix("op-rt-")
                .and_then(|n| n.parse().ok())
                .unwrap();
            ResponseTemplate::new(200)
                .set_body_json(json!({
                    "access_token": format!("op-renewed-{n}"),
                    "token_type": "Bearer",
                    "refresh_token": format!("op-rt-{}", n + 1),
                }))
                .set_delay(Duration::from_millis(1500))
        })
        .mount(&f.op)
        .await;
    // Two replicas sharing one store.
    let gws = [spawn(&toml).await, spawn(&on_fresh_ports(&toml)).await];
    let (access, device) = session_with_op_grant(&f, &gws[0], 1, "op-rt-1").await;
    op_introspects_renewed(&f, "op-renewed-", "alice", &device).await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(5500) {
        for gw in &gws {
            assert_eq!(sync(gw, &access).await.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used: Vec<usize> = futures_util::future::join_all((1..=4).map(|n| {
        let f = &f;
        async move { op_refreshes(f, &format!("op-rt-{n}")).await }
    }))
    .await;
    assert!(
        used[0] == 1 && used.iter().all(|u| *u <= 1),
        "refresh tokens used: {used:?}"
    );
}

/// A `/logout` whose upstream sign-out fails is a 503 and leaves the session for the retry
/// (with the same token) to finish; so does `/logout/all`, whose caller's own session ends
/// last, after every other device is signed out.
#[tokio::test]
async fn a_failed_upstream_sign_out_leaves_the_session_for_the_retry() {
    let (f, toml) = alice_with_a_password_on_dendrite("").await;
    // The homeserver fails the first upstream logout, then recovers.
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/logout"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"errcode": "M_UNKNOWN"})))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&f.hs)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/logout"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .with_priority(2)
        .mount(&f.hs)
        .await;
    let gw = spawn(&toml).await;
    let access = alice_on_device(&gw).await;
    assert_eq!(logout(&gw, &access).await.status(), 503);
    assert_eq!(
        admin_sessions(&gw, "@alice:example.org").await.len(),
        1,
        "the session went before its device was signed out"
    );
    assert_eq!(logout(&gw, &access).await.status(), 200, "the retry");
    assert!(admin_sessions(&gw, "@alice:example.org").await.is_empty());
}

/// A sign-out whose upstream step keeps failing still ends the session for good: its token is
/// refused at once, and stays refused after the revocation is forgotten, although the session
/// has an OP grant the OP keeps confirming (its record stays for the retry of the sign-out).
#[tokio::test]
async fn a_sign_out_that_fails_upstream_never_lets_the_session_back() {
    let (f, toml) = alice_with_a_password_on_dendrite(
        "grant_check_interval = \"1s\"\n\n[cache]\nmax_ttl = \"1s\"\nnegative_ttl = \"1s\"\n\n[notifications]\nrevocation_retention = \"3s\"",
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/logout"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"errcode": "M_UNKNOWN"})))
        .with_priority(1)
        .mount(&f.hs)
        .await;
    let gw = spawn(&toml).await;
    let access = alice_on_device(&gw).await;
    assert_eq!(sync(&gw, &access).await.status(), 200);
    assert_eq!(
        admin_sessions(&gw, "@alice:example.org").await[0]["op_grant"],
        true
    );
    let r = logout(&gw, &access).await;
    assert_eq!(r.status(), 503);
    // The client gives up. Past the retention (3 s) the revocation is forgotten.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            sync(&gw, &access).await.status(),
            401,
            "a signed-out session came back after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Password login on (`extra` goes into `[compat]`), a Dendrite binding whose homeserver
/// provisions alice's device ALICEDEV01, and the OP's password grant for alice (password `pw`).
async fn alice_with_a_password_on_dendrite(extra: &str) -> (Fakes, String) {
    let (f, toml) = setup_config_hs(
        "kind = \"dendrite\"\nas_token = \"as-token\"",
        &format!("password_login = true\n{extra}"),
    )
    .await;
    op_password(&f, "alice", "pw", "alice").await;
    mount_alice_provisioning(&f.hs).await;
    (f, toml)
}

/// Alice's password login on device ALICEDEV01: the compat access token.
async fn alice_on_device(gw: &TestGateway) -> String {
    let mut body = password_body("alice", "pw");
    body["device_id"] = json!("ALICEDEV01");
    let session: Value = login(gw, body).await.json().await.unwrap();
    session["access_token"]
        .as_str()
        .expect("a session")
        .to_owned()
}

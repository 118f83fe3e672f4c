//! Loading and validation, end to end through [`super::load_str`] and [`super::load`].

use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
    [homeserver]
    url = "http://127.0.0.1:8080"
    server_name = "example.org"
    [[issuers]]
    issuer = "https://op.example.org/"
    client_id = "gw"
    client_secret = "s3cret"
"#;

#[test]
fn the_runtime_dir_must_be_absolute_and_the_stop_timings_parse() {
    let text = format!("[listen]\nruntime_dir = \"run\"\nshutdown_delay = \"soon\"\n{MINIMAL}");
    let Err(problems) = load_str(&text) else {
        panic!("a relative runtime_dir was accepted")
    };
    let problems = problems.to_string();
    assert!(problems.contains("listen.runtime_dir"), "{problems}");
    assert!(problems.contains("listen.shutdown_delay"), "{problems}");
    let c = load_str(MINIMAL).expect("valid").config;
    assert_eq!(c.listen.runtime_dir, None);
    assert_eq!(c.listen.shutdown_delay, Duration::ZERO);
}

#[test]
fn the_new_token_budget_defaults_on_and_its_burst_must_admit_one() {
    let c = load_str(MINIMAL).expect("valid").config;
    assert_eq!(
        (c.auth.new_tokens_per_address, c.auth.new_tokens_burst),
        (100, 1000)
    );
    let problems = |auth: &str| match load_str(&format!("{MINIMAL}\n[auth]\n{auth}\n")) {
        Err(p) => p.to_string(),
        Ok(_) => String::new(),
    };
    let p = problems("new_tokens_per_address = 10\nnew_tokens_burst = 0");
    assert!(p.contains("auth.new_tokens_burst"), "{p}");
    let p = problems("new_tokens_per_address = 2000000");
    assert!(p.contains("auth.new_tokens_per_address"), "{p}");
    assert_eq!(
        problems("new_tokens_per_address = 0\nnew_tokens_burst = 0"),
        ""
    );
}

#[test]
fn the_https_listener_needs_its_address_certificate_and_key() {
    let problems = |listen: &str| match load_str(&format!("[listen]\n{listen}\n{MINIMAL}")) {
        Err(p) => p.to_string(),
        Ok(_) => String::new(),
    };
    let p = problems("public_tls = \"8448\"");
    assert!(p.contains("listen.public_tls"), "{p}");
    assert!(p.contains("listen.tls_cert_file: required"), "{p}");
    assert!(p.contains("listen.tls_key_file: required"), "{p}");
    let p = problems(
        "public_tls = \"0.0.0.0:8008\"\ntls_cert_file = \"/nonexistent/cert.pem\"\ntls_key_file = \"/nonexistent/key.pem\"",
    );
    assert!(p.contains("must differ from listen.public"), "{p}");
    assert!(p.contains("/nonexistent/cert.pem"), "{p}");
    assert!(p.contains("/nonexistent/key.pem"), "{p}");
    let p = problems("tls_cert_file = \"/x.pem\"");
    assert!(
        p.contains("listen.tls_cert_file: only used with listen.public_tls"),
        "{p}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, "pem").unwrap();
    std::fs::write(&key, "pem").unwrap();
    let text = format!(
        "[listen]\npublic_tls = \"127.0.0.1:8448\"\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n{MINIMAL}"
    );
    let tls = load_str(&text)
        .expect("valid")
        .config
        .listen
        .tls
        .expect("tls");
    assert_eq!(tls.addr.port(), 8448);
    assert_eq!(tls.cert, cert);
    assert!(load_str(MINIMAL).unwrap().config.listen.tls.is_none());
}

#[test]
fn minimal_config_loads_with_defaults() {
    let c = load_str(MINIMAL).expect("valid").config;
    assert_eq!(c.cache.max_ttl, Duration::from_secs(120));
    assert_eq!(c.auth.max_token_length, 4096);
    assert_eq!(c.auth.user_id_claims, vec!["username", "sub"]);
    assert_eq!(
        c.issuers[0].discovery_url.as_str(),
        "https://op.example.org/.well-known/openid-configuration"
    );
    assert_eq!(c.homeserver.port, 8080);
    assert!(!c.homeserver.tls);
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let text = r#"
        [listen]
        public = "nope"
        [homeserver]
        url = "ftp://x"
        [[issuers]]
        issuer = "https://op/"
        client_auth = "magic"
        client_secret = "a"
        client_secret_file = "/nonexistent"
        [cache]
        max_ttl = "10 parsecs"
    "#;
    let err = load_str(text).expect_err("invalid");
    let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "listen.public",
        "homeserver.url",
        "homeserver.server_name",
        "issuers[0].client_auth",
        "issuers[0].client_secret",
        "cache.max_ttl",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
}

#[test]
fn redis_cluster_is_refused_and_sentinel_needs_its_service() {
    let with = |redis: &str| format!("{MINIMAL}\n[store]\nbackend = \"redis\"\n[redis]\n{redis}\n");
    let err = load_str(&with("mode = \"cluster\"")).expect_err("cluster");
    assert_eq!(err.0[0].key, "redis.mode");
    assert!(
        err.0[0].message.contains("not supported"),
        "{}",
        err.0[0].message
    );
    let err = load_str(&with("mode = \"sentinel\"")).expect_err("no service");
    assert_eq!(err.0[0].key, "redis.sentinel_service");
    let ok = load_str(&with(
        "mode = \"sentinel\"\nsentinel_service = \"m\"\nurls = [\"redis://s1:26379\"]",
    ))
    .expect("sentinel");
    assert_eq!(
        ok.config.store.redis.map(|r| r.mode),
        Some(RedisMode::Sentinel)
    );
}

#[test]
fn unreadable_secret_file_names_the_file_key() {
    let text = MINIMAL.replace(
        "client_secret = \"s3cret\"",
        "client_secret_file = \"/nonexistent/op\"",
    );
    let err = load_str(&text).expect_err("invalid");
    assert_eq!(err.0[0].key, "issuers[0].client_secret_file");
    assert!(err.0[0].message.contains("/nonexistent/op"));
}

#[test]
fn secret_file_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "  abc\n").unwrap();
    let text = MINIMAL.replace(
        "client_secret = \"s3cret\"",
        &format!("client_secret_file = {:?}", path.display().to_string()),
    );
    let c = load_str(&text).expect("valid").config;
    assert_eq!(c.issuers[0].client_secret.as_ref().unwrap().expose(), "abc");
    assert!(!format!("{:?}", c.issuers[0]).contains("abc"));
}

#[test]
fn environment_overrides_every_kind_of_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let env = vec![
        (
            "MATRIX_OIDC_GATEWAY__CACHE__MAX_TTL".to_owned(),
            "30s".to_owned(),
        ),
        (
            "MATRIX_OIDC_GATEWAY__AUTH__ALLOW_QUERY_TOKEN".to_owned(),
            "false".to_owned(),
        ),
        (
            "MATRIX_OIDC_GATEWAY__ISSUERS__0__CLIENT_SECRET".to_owned(),
            "from-env".to_owned(),
        ),
        (
            "MATRIX_OIDC_GATEWAY__AUTH__USER_ID_CLAIMS".to_owned(),
            "[\"preferred_username\"]".to_owned(),
        ),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let c = load(Some(&path), env).expect("valid").config;
    assert_eq!(c.cache.max_ttl, Duration::from_secs(30));
    assert!(!c.auth.allow_query_token);
    assert_eq!(
        c.issuers[0].client_secret.as_ref().unwrap().expose(),
        "from-env"
    );
    assert_eq!(c.auth.user_id_claims, vec!["preferred_username"]);
}

#[test]
fn environment_alone_can_configure_the_gateway() {
    let env = [
        ("HOMESERVER__URL", "http://127.0.0.1:8080"),
        ("HOMESERVER__SERVER_NAME", "example.org"),
        ("ISSUERS__0__ISSUER", "https://op.example.org/"),
        ("ISSUERS__0__CLIENT_AUTH", "bearer"),
        ("ISSUERS__0__CLIENT_SECRET", "shared"),
    ]
    .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_owned()));
    let c = load(None, env).expect("valid").config;
    assert_eq!(c.issuers[0].client_auth, ClientAuthMethod::Bearer);
}

#[test]
fn plain_http_to_remote_host_warns_but_loads() {
    let text = MINIMAL.replace("http://127.0.0.1:8080", "http://matrix.internal:8008");
    let l = load_str(&text).expect("valid");
    assert!(l.warnings.iter().any(|w| w.starts_with("homeserver.url")));
}

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn with_homeserver(extra: &str, store: &str) -> String {
    let text = MINIMAL.replace(
        "server_name = \"example.org\"",
        &format!("server_name = \"example.org\"\n{extra}"),
    );
    format!("{text}\n[store]\n{store}\n")
}

#[test]
fn every_stock_homeserver_defaults_to_per_device_credentials() {
    let with = |kind: &str| {
        let text = with_homeserver(
            &format!("kind = \"{kind}\"\nas_token = \"t\""),
            &format!("encryption_key = \"{KEY}\""),
        );
        load_str(&text).expect("valid").config.homeserver.binding
    };
    assert_eq!(with("dendrite"), BindingMode::AppserviceLogin);
    assert_eq!(with("conduit"), BindingMode::AppserviceLogin);
    assert_eq!(with("synapse"), BindingMode::AppserviceLogin);
    assert_eq!(with("tuwunel"), BindingMode::AppserviceLogin);
    assert_eq!(with("generic"), BindingMode::Headers);
}

#[test]
fn masquerade_is_opt_in_and_warned_about() {
    let text = with_homeserver(
        "kind = \"synapse\"\nbinding = \"appservice_masquerade\"\nas_token = \"t\"",
        "",
    );
    let l = load_str(&text).expect("valid: masquerade stores no tokens, so needs no key");
    assert_eq!(
        l.config.homeserver.binding,
        BindingMode::AppserviceMasquerade
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.starts_with("homeserver.binding") && w.contains("appservice token")),
        "{:?}",
        l.warnings
    );
    let quiet = with_homeserver(
        "kind = \"synapse\"\nas_token = \"t\"",
        &format!("encryption_key = \"{KEY}\""),
    );
    assert!(load_str(&quiet)
        .expect("valid")
        .warnings
        .iter()
        .all(|w| !w.starts_with("homeserver.binding")));
}

#[test]
fn per_device_credentials_need_a_valid_store_key() {
    let keys_of = |store: &str| -> Vec<String> {
        let text = with_homeserver("kind = \"synapse\"\nas_token = \"t\"", store);
        match load_str(&text) {
            Ok(_) => Vec::new(),
            Err(e) => {
                e.0.into_iter()
                    .map(|p| format!("{}: {}", p.key, p.message))
                    .collect()
            }
        }
    };
    let missing = keys_of("");
    assert!(
        missing.len() == 1 && missing[0].starts_with("store.encryption_key: required"),
        "{missing:?}"
    );
    let short = keys_of("encryption_key = \"abcd\"");
    assert!(
        short[0].starts_with("store.encryption_key: must be 32 random bytes"),
        "{short:?}"
    );
    let same = keys_of(&format!(
        "encryption_key = \"{KEY}\"\nprevious_encryption_key = \"{KEY}\""
    ));
    assert!(
        same[0].starts_with("store.previous_encryption_key"),
        "{same:?}"
    );
    let both = keys_of(&format!(
        "encryption_key = \"{KEY}\"\nencryption_key_file = \"/x\""
    ));
    assert!(
        both[0].starts_with("store.encryption_key: set either"),
        "{both:?}"
    );
    assert!(keys_of(&format!("encryption_key = \"{KEY}\"")).is_empty());
    let b64 = "Dx4tPEtaaXiHlqW0w9Lh8A8eLTxLWml4h5altMPS4fA=";
    assert!(keys_of(&format!("encryption_key = \"{b64}\"")).is_empty());
}

#[test]
fn appservice_bindings_need_an_as_token_and_a_capable_homeserver() {
    let text = MINIMAL.replace(
        "server_name = \"example.org\"",
        "server_name = \"example.org\"\nkind = \"dendrite\"\nbinding = \"appservice_masquerade\"",
    );
    let err = load_str(&text).expect_err("invalid");
    let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"homeserver.binding"), "{keys:?}");
    assert!(keys.contains(&"homeserver.as_token"), "{keys:?}");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    assert!(parse_duration("7d").is_err());
    assert!(parse_duration("").is_err());
}

#[test]
fn compat_is_off_by_default_and_defaults_to_the_issuers_client() {
    assert!(load_str(MINIMAL).unwrap().config.compat.is_none());
    let c = load_str(&format!(
        "{MINIMAL}\n[compat]\nenabled = true\nredirect_allowlist = [\"https://app.example.org/\", \"io.element.app:/callback\"]\n"
    ))
    .expect("valid")
    .config
    .compat
    .expect("on");
    assert_eq!(c.client_id, "gw");
    assert_eq!(c.client_secret.expose(), "s3cret");
    assert_eq!(c.redirect_allowlist.len(), 2);
    assert_eq!(c.login_token_ttl, Duration::from_secs(120));
    let problems = |compat: &str| match load_str(&format!("{MINIMAL}\n[compat]\n{compat}\n")) {
        Err(p) => p.to_string(),
        Ok(_) => String::new(),
    };
    let p = problems(
        "enabled = true\nredirect_allowlist = [\"https://\", \"https://a.example/?x=1\", \"nope\"]\nlogin_token_ttl = \"0s\"\naccess_token_ttl = \"25h\"",
    );
    for key in [
        "compat.redirect_allowlist[0]",
        "compat.redirect_allowlist[1]",
        "compat.redirect_allowlist[2]",
        "compat.login_token_ttl",
        "compat.access_token_ttl",
    ] {
        assert!(p.contains(key), "{key} missing in {p}");
    }
    let p = problems("enabled = true\nclient_id = \"legacy\"\nclient_secret = \"x\"\nclient_secret_file = \"/f\"");
    assert!(p.contains("compat.client_secret"), "{p}");
    // Two grant checks must fit in the time a sign-out is remembered (24 h less the cache's
    // 120 s): a session whose grant was not confirmed for that long ends.
    let p = problems("enabled = true\ngrant_check_interval = \"12h\"");
    assert!(
        p.contains("compat.grant_check_interval: must be at most half of notifications.revocation_retention"),
        "{p}"
    );
    assert_eq!(
        problems("enabled = true\ngrant_check_interval = \"11h\""),
        ""
    );
    // Longer sessions are fine: they end with their OP grant.
    assert_eq!(problems("enabled = true\nsession_lifetime = \"720h\""), "");
    let p = problems("enabled = true\npassword_login = true\npassword_attempts_per_user = 0");
    assert!(
        p.contains("compat.password_attempts_per_user: must be at least 1"),
        "{p}"
    );
    let c = load_str(&format!(
        "{MINIMAL}\n[compat]\nenabled = true\npassword_login = true\n"
    ))
    .expect("valid")
    .config
    .compat
    .expect("on");
    assert_eq!(
        c.password,
        Some(crate::config::PasswordLogin {
            per_user_per_minute: 5,
            per_address_per_minute: 20
        })
    );
    assert_eq!(c.grant_check_interval, Duration::from_secs(300));
    let p = problems("enabled = true\nextra_scopes = [\"offline_access\", \"two words\", \"urn:matrix:client:api:guest\"]");
    assert!(!p.contains("extra_scopes[0]"), "{p}");
    assert!(p.contains("compat.extra_scopes[1]"), "{p}");
    assert!(p.contains("compat.extra_scopes[2]"), "{p}");
}

//! No raw token ever reaches a log line: drive traffic through every path that logs (success,
//! refusal, OP failure, homeserver down, query-string tokens) with tracing at TRACE level and
//! Pingora's own `log` output bridged in, then search everything that was written.

mod common;

use common::*;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

#[tokio::test]
async fn raw_tokens_never_appear_in_logs() {
    let sink = LogSink::default();
    let writer = sink.clone();
    // The operator asks for everything; the gateway's own init must still keep tokens out.
    matrix_oidc_gateway::logging::init_with_writer(
        &matrix_oidc_gateway::config::LogSettings {
            format: matrix_oidc_gateway::config::LogFormat::Json,
            level: "trace".into(),
        },
        move || writer.clone(),
    );

    let f = Fakes::start().await;
    f.introspection("VALIDTOKEN1secret", active("alice", &full_scope("D1")), 1)
        .await;
    f.introspection("INACTIVETOKEN2secret", json!({"active": false}), 1)
        .await;
    f.introspection("QUERYTOKEN3secret", active("bob", &full_scope("D2")), 1)
        .await;
    Mock::given(method("POST"))
        .and(path("/introspect"))
        .and(wiremock::matchers::body_string_contains(
            "token=FAILTOKEN4secret&",
        ))
        .respond_with(ResponseTemplate::new(500))
        .mount(&f.op)
        .await;
    let gw = spawn(
        &f.config("[identity_headers]\nsigning_secret = \"SIGNINGSECRET5-0123456789abcdef0123\""),
    )
    .await;
    let c = client();
    let sync = gw.url("/_matrix/client/v3/sync");
    assert_eq!(
        c.get(&sync)
            .bearer_auth("VALIDTOKEN1secret")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(&sync)
            .bearer_auth("INACTIVETOKEN2secret")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let q = gw.url("/_matrix/client/v3/sync?access_token=QUERYTOKEN3secret");
    assert_eq!(c.get(&q).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(&sync)
            .bearer_auth("FAILTOKEN4secret")
            .send()
            .await
            .unwrap()
            .status(),
        503
    );

    // Homeserver down: Pingora logs its own error with our request summary.
    let f2 = Fakes::start().await;
    f2.introspection("DOWNTOKEN6secret", active("carol", &full_scope("D3")), 1)
        .await;
    let cfg = f2
        .config("")
        .replace(&f2.hs.uri(), &format!("http://127.0.0.1:{}", free_port()));
    let gw2 = spawn(&cfg).await;
    let q = gw2.url("/_matrix/client/v3/sync?access_token=DOWNTOKEN6secret");
    assert_eq!(c.get(&q).send().await.unwrap().status(), 502);
    // Password logins (`[compat] password_login`): a right, a wrong and an OP failure.
    let f3 = Fakes::start().await;
    mount_op_discovery(&f3.op).await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(wiremock::matchers::body_string_contains(
            "password=RIGHTPASSWORD7secret",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "PWOPTOKEN8secret", "token_type": "Bearer",
        })))
        .mount(&f3.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(wiremock::matchers::body_string_contains(
            "password=FAILPASSWORD9secret",
        ))
        .respond_with(ResponseTemplate::new(502))
        .mount(&f3.op)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"})))
        .with_priority(10)
        .mount(&f3.op)
        .await;
    f3.introspection("PWOPTOKEN8secret", active("dave", &full_scope("PWDEV")), 1)
        .await;
    let gw3 = spawn(&f3.config(
        "[compat]\nenabled = true\npassword_login = true\npassword_attempts_per_user = 100\n",
    ))
    .await;
    let login = gw3.url("/_matrix/client/v3/login");
    let mut issued = Vec::new();
    for (password, status) in [
        ("RIGHTPASSWORD7secret", 200),
        ("WRONGPASSWORD10secret", 403),
        ("FAILPASSWORD9secret", 503),
    ] {
        let r = c
            .post(&login)
            .json(&json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "dave"},
                "password": password,
                "device_id": "PWDEV",
                "refresh_token": true,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{password}");
        if status == 200 {
            let body: serde_json::Value = r.json().await.unwrap();
            for key in ["access_token", "refresh_token"] {
                issued.push(body[key].as_str().unwrap().to_owned());
            }
        }
    }

    // Every log line of these requests is written by the time the servers have shut down.
    gw.stop().await;
    gw2.stop().await;
    gw3.stop().await;

    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    assert!(logs.contains("request"), "access log missing:\n{logs}");
    assert!(
        logs.contains("compat: session opened") && logs.contains("refused the password"),
        "the password logins' lines missing:\n{logs}"
    );
    for secret in [
        "VALIDTOKEN1secret",
        "INACTIVETOKEN2secret",
        "QUERYTOKEN3secret",
        "FAILTOKEN4secret",
        "SIGNINGSECRET5",
        "DOWNTOKEN6secret",
        "gateway-secret",
        "RIGHTPASSWORD7secret",
        "PWOPTOKEN8secret",
        "FAILPASSWORD9secret",
        "WRONGPASSWORD10secret",
    ]
    .into_iter()
    .chain(issued.iter().map(String::as_str))
    {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the logs:\n{logs}"
        );
    }
}

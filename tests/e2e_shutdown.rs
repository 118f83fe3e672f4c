//! Stopping without dropping work: on SIGTERM the built gateway stops accepting new
//! connections but finishes the requests in flight, `/sync` long-polls included, for up to
//! `listen.shutdown_grace`, and exits as soon as they are done. (Real OP; the homeserver is a wiremock fake that holds
//! the long-poll open longer than Pingora's former fixed 5 s.)

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::{GatewayProcess, Op};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The gateway in front of `hs` (the `headers` binding), with `listen_extra` in `[listen]`.
fn gateway_config(hs: &MockServer, op: &Op, listen_extra: &str) -> String {
    format!(
        r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"
{listen_extra}

[homeserver]
url = "{hs}"
server_name = "localhost"
kind = "generic"
binding = "headers"

[store]
path = "{{state_dir}}/state.sqlite3"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"
"#,
        hs = hs.uri(),
        issuer = op.issuer,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_sync_long_poll_before_exiting() {
    let op = Op::start();
    let hs = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_matrix/client/v3/sync"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"next_batch": "s2"}))
                .set_delay(Duration::from_secs(8)),
        )
        .mount(&hs)
        .await;
    let mut gw = GatewayProcess::start(&gateway_config(&hs, &op, "shutdown_grace = \"120s\""));
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let url = gw.url("/_matrix/client/v3/sync?timeout=30000");
    let token = alice.access_token.clone();
    let long_poll = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let body = r.text().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, body))
    });
    // The long-poll has reached the homeserver: now the gateway is told to stop.
    let started = Instant::now();
    while hs.received_requests().await.unwrap_or_default().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the long-poll never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.signal("TERM");
    let (status, body) = long_poll
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight long-poll was cut off by the shutdown: {e}"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("s2"), "{body}");
    let exited = tokio::task::spawn_blocking(move || {
        let status = gw.wait_exit(Duration::from_secs(30));
        (status, gw)
    })
    .await
    .unwrap();
    // It exits once drained, not at the end of the grace period.
    let status = exited
        .0
        .expect("the gateway still ran 30 s after draining (it waits out the 120 s grace)");
    assert!(status.success(), "{status}");
    assert!(
        exited.1.logs().contains("drained; exiting"),
        "{}",
        exited.1.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_accepting_for_the_shutdown_delay_and_closes_each_connection() {
    let op = Op::start();
    let hs = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_matrix/client/versions"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"versions": ["v1.15"]})),
        )
        .mount(&hs)
        .await;
    let mut gw = GatewayProcess::start(&gateway_config(&hs, &op, "shutdown_delay = \"3s\""));
    let url = gw.url("/_matrix/client/versions");
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let r = fresh().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );

    let term = Instant::now();
    gw.signal("TERM");
    // Still accepting, but every answer closes its connection.
    let closing = loop {
        let r = fresh().get(&url).send().await.unwrap_or_else(|e| {
            panic!(
                "refused {:?} after SIGTERM, inside the 3 s shutdown_delay: {e}",
                term.elapsed()
            )
        });
        assert_eq!(r.status(), 200);
        if r.headers().get("connection").map(|v| v.as_bytes()) == Some(&b"close"[..]) {
            break term.elapsed();
        }
        assert!(
            term.elapsed() < Duration::from_secs(2),
            "no Connection: close after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Then the listener closes and the process exits.
    let refused = loop {
        if fresh().get(&url).send().await.is_err() {
            break term.elapsed();
        }
        assert!(
            term.elapsed() < Duration::from_secs(15),
            "still accepting 15 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        refused >= Duration::from_millis(2_500),
        "the listener closed {refused:?} after SIGTERM, before the 3 s delay"
    );
    eprintln!(
        "REPORT shutdown_delay: Connection: close after {closing:?}, refused after {refused:?}"
    );
    let status = tokio::task::spawn_blocking(move || gw.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap()
        .expect("still running 15 s after the delay");
    assert!(status.success(), "{status}");
}

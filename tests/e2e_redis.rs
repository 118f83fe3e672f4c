//! Several replicas, one truth: three gateway replicas on loopback share a real Redis in front
//! of one real homeserver (Dendrite, where a second appservice login for a device would revoke
//! the first replica's token). First requests are decided once, provisioning happens once,
//! a sign-out through one replica is refused by all, Redis may die and come back.

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{GatewayProcess, Op, RedisServer};
use serde_json::{json, Value};

const ADMIN: &str = "redis-admin-token-0123456789";

fn replica(op: &Op, hs: &Homeserver, redis: &RedisServer) -> GatewayProcess {
    GatewayProcess::start(&format!(
        r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"

[homeserver]
url = "{hs}"
server_name = "localhost"
kind = "dendrite"
as_token = "{AS_TOKEN}"

[store]
backend = "redis"
encryption_key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"

[redis]
urls = ["{redis}"]
timeout = "300ms"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[cache]
max_ttl = "120s"

[admin]
token = "{ADMIN}"

[log]
level = "info"
format = "json"
"#,
        hs = hs.url,
        redis = redis.url(),
        issuer = op.issuer,
    ))
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

fn introspections(op: &Op) -> usize {
    op.output().iter().filter(|l| *l == "INTROSPECTION").count()
}

/// Polls until `token` is refused through `gw`; returns how long that took.
async fn refused_within(gw: &GatewayProcess, token: &str, cap: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < cap {
        if whoami(gw, token).await.0 == 401 {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_truth() {
    let op = Op::start();
    let hs = Homeserver::start(HsKind::Dendrite);
    let mut redis = RedisServer::start();
    let mut gws = vec![
        replica(&op, &hs, &redis),
        replica(&op, &hs, &redis),
        replica(&op, &hs, &redis),
    ];

    // 1. 30 concurrent first requests of one new token spread over the replicas:
    //    one introspection and one registration + login in total.
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let before = introspections(&op);
    let (reg0, login0) = (
        hs.requests("POST", "/_matrix/client/v3/register"),
        hs.requests("POST", "/_matrix/client/v3/login"),
    );
    let mut tasks = Vec::new();
    for i in 0..30 {
        let url = gws[i % 3].url("/_matrix/client/v3/account/whoami");
        let token = alice.access_token.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["device_id"], "ALICEDEV01");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        introspections(&op) - before,
        1,
        "introspections for one token over three replicas"
    );
    assert_eq!(
        hs.requests("POST", "/_matrix/client/v3/register") - reg0,
        1,
        "registrations"
    );
    assert_eq!(
        hs.requests("POST", "/_matrix/client/v3/login") - login0,
        1,
        "appservice logins"
    );
    // What Redis holds of that device is sealed: a dump hands out no homeserver session.
    let sealed = device_tokens_in_redis(&redis);
    assert!(!sealed.is_empty(), "no device token in Redis");
    for v in &sealed {
        hs.assert_sealed_token_is_no_credential(v).await;
    }

    // 2. alice is signed out through replica 0: all three refuse her token.
    let bob = op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0001",
    );
    for gw in &gws {
        assert_eq!(whoami(gw, &bob.access_token).await.0, 200);
    }
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{}/admin/v1/sessions/revoke", gws[0].admin))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": "@alice:localhost", "device_id": "ALICEDEV01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answered = started.elapsed();
    assert_eq!(whoami(&gws[0], &alice.access_token).await.0, 401);
    for (i, gw) in gws.iter().enumerate().skip(1) {
        let took = refused_within(gw, &alice.access_token, Duration::from_secs(2)).await;
        let took = took.unwrap_or_else(|| panic!("replica {i} still accepts alice's token"));
        eprintln!("REPORT fan-out: replica {i} refused alice {:?} after the sign-out answered ({answered:?} to answer)", took);
    }
    for gw in &gws {
        assert_eq!(
            whoami(gw, &bob.access_token).await.0,
            200,
            "bob was signed out too"
        );
    }

    // 3. Redis dies mid-run: cached identities keep working everywhere; a new device cannot be
    //    provisioned (503 with Retry-After, never 401); nothing else fails.
    redis.kill();
    for gw in &gws {
        assert_eq!(
            whoami(gw, &bob.access_token).await.0,
            200,
            "a cached identity failed while Redis was down"
        );
    }
    let carol = op.mint(
        "carol",
        "urn:matrix:client:api:* urn:matrix:client:device:CAROLDEV01",
    );
    let (status, body) = whoami(&gws[1], &carol.access_token).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (503, Some("M_UNKNOWN")),
        "{body}"
    );
    let ready: Value = reqwest::get(format!("{}/readyz", gws[1].admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["redis"], false, "{ready}");

    // Redis returns (empty: no persistence): the replicas recover by themselves.
    redis.restart();
    let mut recovered = false;
    for _ in 0..100 {
        if whoami(&gws[1], &carol.access_token).await.0 == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the replica did not recover after Redis came back"
    );
    // Fan-out works again: carol signed out through replica 1 is refused by replica 2.
    assert_eq!(whoami(&gws[2], &carol.access_token).await.0, 200);
    // (wait for replica 2's subscriber to be back)
    let mut resubscribed = false;
    for _ in 0..50 {
        let ready: Value = reqwest::get(format!("{}/readyz", gws[2].admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["checks"]["redis"] == true {
            resubscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resubscribed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = reqwest::Client::new()
        .post(format!("{}/admin/v1/sessions/revoke", gws[1].admin))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": "@carol:localhost", "device_id": "CAROLDEV01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let took = refused_within(&gws[2], &carol.access_token, Duration::from_secs(2)).await;
    assert!(took.is_some(), "fan-out did not work after Redis came back");

    // 4. A restarted replica reuses the shared bindings: no new login for dave.
    let dave = op.mint(
        "dave",
        "urn:matrix:client:api:* urn:matrix:client:device:DAVEDEV001",
    );
    assert_eq!(whoami(&gws[0], &dave.access_token).await.0, 200);
    let logins = hs.requests("POST", "/_matrix/client/v3/login");
    gws[2].restart();
    let (status, body) = whoami(&gws[2], &dave.access_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["device_id"], "DAVEDEV001");
    assert_eq!(
        hs.requests("POST", "/_matrix/client/v3/login"),
        logins,
        "the restarted replica logged in again"
    );
    drop(gws.pop());
}

/// Every device-token value the replicas stored in Redis (read with Debian's `redis-cli`).
fn device_tokens_in_redis(redis: &RedisServer) -> Vec<String> {
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "--raw"])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools, installed with redis-server)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["--scan", "--pattern", "matrix-oidc-gateway:dev:*"])
        .lines()
        .filter(|k| !k.is_empty())
        .flat_map(|k| {
            cli(&["HVALS", k])
                .lines()
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

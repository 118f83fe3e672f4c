//! Several replicas, one truth: three gateway replicas on loopback share a real Redis in front
//! of one real homeserver (Dendrite, where a second appservice login for a device would revoke
//! the first replica's token). First requests are decided once, provisioning happens once,
//! a sign-out through one replica is refused by all, Redis may die and come back.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{GatewayProcess, Op, RedisServer, Sentinel};
use serde_json::{json, Value};

const ADMIN: &str = "redis-admin-token-0123456789";

fn replica(op: &Op, hs: &Homeserver, redis: &RedisServer) -> GatewayProcess {
    replica_on(op, &hs.url, &format!("urls = [\"{}\"]", redis.url()))
}

/// A replica whose `[redis]` section holds `redis` (plus a short command timeout).
fn replica_on(op: &Op, hs: &str, redis: &str) -> GatewayProcess {
    replica_reusing(op, hs, redis, "120s")
}

/// Like [`replica_on`], reusing a valid verdict for `max_ttl`.
fn replica_reusing(op: &Op, hs: &str, redis: &str, max_ttl: &str) -> GatewayProcess {
    replica_with(op, hs, redis, max_ttl, "")
}

/// Like [`replica_reusing`], with `extra` tables at the end of the configuration.
fn replica_with(op: &Op, hs: &str, redis: &str, max_ttl: &str, extra: &str) -> GatewayProcess {
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
{redis}
timeout = "300ms"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[cache]
max_ttl = "{max_ttl}"
negative_ttl = "1s"

[admin]
token = "{ADMIN}"

[log]
level = "info"
format = "json"

{extra}
"#,
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
    op.settle().await;
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
    // (wait for replica 2's subscriber to be back: it logs once it resubscribed and reloaded)
    assert!(
        eventually(Duration::from_secs(10), || gws[2]
            .logs()
            .contains("shared state back: resynchronised"))
        .await,
        "replica 2 never resubscribed"
    );
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
    let cli = |args: &[&str]| redis.cli(args);
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

async fn revoke_device(gw: &GatewayProcess, user: &str, device: &str) {
    let r = reqwest::Client::new()
        .post(format!("{}/admin/v1/sessions/revoke", gw.admin))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": user, "device_id": device}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

/// Polls `cond` (every 50 ms) until it holds or `cap` passes.
async fn eventually(cap: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < cap {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A replica that missed revocations while cut off from Redis must load them when it is back,
/// and keep trying until that load succeeds: a failed reload is not "resynchronised".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_reload_after_an_outage_is_retried_until_it_succeeds() {
    let op = Op::start();
    let hs = Homeserver::start(HsKind::Dendrite);
    let redis = RedisServer::start();
    let (a, r) = (replica(&op, &hs, &redis), replica(&op, &hs, &redis));
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    assert_eq!(whoami(&a, &alice.access_token).await.0, 200);
    assert_eq!(whoami(&r, &alice.access_token).await.0, 200);

    // Cut both replicas' subscriptions off (they cannot subscribe again), then sign alice out
    // through replica a: replica r misses the event.
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "default", "-subscribe"]),
        "OK"
    );
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(
        eventually(Duration::from_secs(10), || r
            .logs()
            .contains("revocation fan-out lost"))
        .await,
        "replica r never noticed the lost subscription"
    );
    revoke_device(&a, "@alice:localhost", "ALICEDEV01").await;
    assert_eq!(whoami(&a, &alice.access_token).await.0, 401);

    // Subscribing works again, but reading the revocations does not: r's first reload fails.
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "default", "+subscribe", "-hgetall"]),
        "OK"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let logs = r.logs();
            logs.contains("resynchronised") || logs.contains("resynchronisation failed")
        })
        .await,
        "replica r never tried to resynchronise"
    );
    // The store heals; r must now load the revocation it missed and refuse alice.
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "+hgetall"]), "OK");
    let took = refused_within(&r, &alice.access_token, Duration::from_secs(15)).await;
    assert!(
        took.is_some(),
        "replica r still accepts a token revoked while it was cut off: its failed reload was never retried"
    );
}

/// Redis Sentinel for real: one master, one replica, one sentinel. Fan-out reaches the other
/// replica (the subscription is on the master, not on the sentinel), and after the master is
/// killed and the sentinel promotes the replica, writes and fan-out follow the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_keeps_writes_and_fan_out() {
    let op = Op::start();
    let hs = Homeserver::start(HsKind::Dendrite);
    let mut master = RedisServer::start();
    let standby = RedisServer::start_replica_of(master.port);
    let sentinel = Sentinel::start(master.port, "gatewaymaster");
    assert!(
        eventually(Duration::from_secs(10), || standby
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up"))
        .await,
        "the replica never synchronised"
    );
    let section = format!(
        "mode = \"sentinel\"\nurls = [\"{}\"]\nsentinel_service = \"{}\"",
        sentinel.url(),
        sentinel.service
    );
    let (a, b) = (
        replica_on(&op, &hs.url, &section),
        replica_on(&op, &hs.url, &section),
    );

    // Before the failover: a sign-out through a reaches b.
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    assert_eq!(whoami(&a, &alice.access_token).await.0, 200);
    assert_eq!(whoami(&b, &alice.access_token).await.0, 200);
    assert!(
        !master
            .cli(&["HKEYS", "matrix-oidc-gateway:dev:@alice:localhost"])
            .is_empty(),
        "the binding was not written to the master"
    );
    revoke_device(&a, "@alice:localhost", "ALICEDEV01").await;
    assert!(
        refused_within(&b, &alice.access_token, Duration::from_secs(3))
            .await
            .is_some(),
        "replica b never heard of the sign-out made through replica a (fan-out under Sentinel)"
    );

    // The master dies; the sentinel promotes the replica.
    master.kill();
    assert!(
        eventually(Duration::from_secs(30), || sentinel.master_port()
            == Some(standby.port))
        .await,
        "the sentinel did not fail over"
    );

    // After: a new device is provisioned (written to the new master) and its sign-out through
    // a reaches b.
    let bob = op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0001",
    );
    let mut provisioned = false;
    for _ in 0..100 {
        if whoami(&a, &bob.access_token).await.0 == 200 {
            provisioned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(provisioned, "no provisioning after the failover");
    assert!(
        !standby
            .cli(&["HKEYS", "matrix-oidc-gateway:dev:@bob:localhost"])
            .is_empty(),
        "bob's binding is not on the promoted master"
    );
    assert_eq!(whoami(&b, &bob.access_token).await.0, 200);
    // (b hears it by fan-out, or by reloading the revocations when its subscription to the
    // dead master is re-established on the new one)
    revoke_device(&a, "@bob:localhost", "BOBDEV0001").await;
    assert!(
        refused_within(&b, &bob.access_token, Duration::from_secs(15))
            .await
            .is_some(),
        "replica b never heard of a sign-out made after the failover"
    );
}

/// Echoes the `Authorization` header it received: which upstream token a replica used.
struct EchoAuthorization;

impl wiremock::Respond for EchoAuthorization {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        let auth = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        wiremock::ResponseTemplate::new(200).set_body_json(json!({ "authorization": auth }))
    }
}

/// The provisioning lock can vanish while its holder still works (a Sentinel failover loses
/// unreplicated keys; an eviction; a pause longer than its expiry). Another replica then
/// provisions the same device; the first holder's late write must not replace the token the
/// new holder stored, and no replica may keep using a token the store does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provisioning_that_lost_its_lock_does_not_overwrite_the_new_holder() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let op = Op::start();
    let redis = RedisServer::start();
    let hs = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/register"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"user_id": "@alice:localhost"})),
        )
        .mount(&hs)
        .await;
    // The first login is slow (replica a's); the next one (replica b's) is not.
    let login = |token: &str| {
        ResponseTemplate::new(200)
            .set_body_json(json!({"access_token": token, "device_id": "ALICEDEV01"}))
    };
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/login"))
        .respond_with(login("token-of-a").set_delay(Duration::from_secs(3)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&hs)
        .await;
    Mock::given(method("POST"))
        .and(path("/_matrix/client/v3/login"))
        .respond_with(login("token-of-b"))
        .with_priority(2)
        .mount(&hs)
        .await;
    Mock::given(wiremock::matchers::any())
        .respond_with(EchoAuthorization)
        .with_priority(10)
        .mount(&hs)
        .await;
    let fake = hs.uri();
    let section = format!("urls = [\"{}\"]", redis.url());
    let (a, b) = (
        replica_on(&op, &fake, &section),
        replica_on(&op, &fake, &section),
    );
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let upstream = |gw: &GatewayProcess| {
        let url = gw.url("/_matrix/client/v3/account/whoami");
        let token = alice.access_token.clone();
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let first = tokio::spawn(upstream(&a));
    // a holds the lock and waits for its login; the lock vanishes.
    let lock_key = || {
        redis.cli(&[
            "--scan",
            "--pattern",
            "matrix-oidc-gateway:lock:provision:*",
        ])
    };
    assert!(
        eventually(Duration::from_secs(10), || !lock_key().is_empty()).await,
        "replica a never took the provisioning lock"
    );
    redis.cli(&["DEL", &lock_key()]);
    // b provisions the device meanwhile, and uses its own token.
    let (status, body) = upstream(&b).await;
    assert_eq!(
        (status, body["authorization"].as_str()),
        (200, Some("Bearer token-of-b")),
        "{body}"
    );
    // a's login comes back late: its token must not be used nor stored.
    let (status, body) = first.await.unwrap();
    assert_ne!(
        body["authorization"].as_str(),
        Some("Bearer token-of-a"),
        "replica a used a token it obtained after losing the lock ({status})"
    );
    // Every replica, a fresh one included, now uses the one token the store holds: b's.
    let c = replica_on(&op, &fake, &section);
    for (name, gw) in [("a", &a), ("b", &b), ("c", &c)] {
        let (status, body) = upstream(gw).await;
        assert_eq!(
            (status, body["authorization"].as_str()),
            (200, Some("Bearer token-of-b")),
            "replica {name}: {body}"
        );
    }
}

/// The cross-signing claim on Redis is atomic and shared: of many concurrent claims (two
/// replicas' first uploads) exactly one wins, and a released claim can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cross_signing_claim_on_redis_is_won_once() {
    use matrix_oidc_gateway::store::Store;
    let redis = RedisServer::start();
    let stores = two_stores(&redis);
    let claims = futures_util::future::join_all(
        (0..16).map(|i| stores[i % 2].claim_cross_signing("@alice:localhost")),
    )
    .await;
    let won = claims.iter().filter(|c| *c.as_ref().unwrap()).count();
    assert_eq!(won, 1, "{claims:?}");
    stores[1]
        .release_cross_signing("@alice:localhost")
        .await
        .unwrap();
    assert!(stores[0]
        .claim_cross_signing("@alice:localhost")
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repinned_user_is_no_longer_found_by_its_old_subject_on_redis() {
    // A back-channel logout by `sub` signs out the devices of `user_of_subject(sub)`. After an
    // operator moves a user ID to another subject, the old subject must find nobody, on every
    // replica, or a logout by the old owner signs the new owner out (SQLite: the same, in
    // `notifications::repin_...`).
    use matrix_oidc_gateway::store::Store;
    let redis = RedisServer::start();
    let stores = two_stores(&redis);
    let alice = "@alice:example.org";
    stores[0].pin_subject(alice, "iss|old-sub").await.unwrap();
    assert_eq!(
        stores[1]
            .user_of_subject("iss|old-sub")
            .await
            .unwrap()
            .as_deref(),
        Some(alice)
    );
    stores[0].repin_subject(alice, "iss|new-sub").await.unwrap();
    for store in &stores {
        assert_eq!(store.user_of_subject("iss|old-sub").await.unwrap(), None);
        assert_eq!(
            store
                .user_of_subject("iss|new-sub")
                .await
                .unwrap()
                .as_deref(),
            Some(alice)
        );
    }
    // A reverse entry left by an earlier version (which kept it on a re-pin) is stale: the
    // pin decides.
    let mut c = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("mog-test:sub")
        .arg("iss|older-sub")
        .arg(alice)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        stores[1].user_of_subject("iss|older-sub").await.unwrap(),
        None
    );
}

/// Short-lived values on Redis: shared by replicas, single-use when taken (of many concurrent
/// takes across two replicas exactly one gets a login token), and gone at their expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiring_values_on_redis_are_shared_and_taken_once() {
    use matrix_oidc_gateway::store::{Space, Store};
    let redis = RedisServer::start();
    let stores = two_stores(&redis);
    // Redis expires by its own clock: give it the real time.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    stores[0]
        .put_expiring(Space::LoginToken, "t1", "grant", now + 60_000)
        .await
        .unwrap();
    stores[0]
        .put_expiring(Space::CompatAccess, "t1", "session", now + 60_000)
        .await
        .unwrap();
    assert_eq!(
        stores[1]
            .get_expiring(Space::CompatAccess, "t1", now)
            .await
            .unwrap()
            .as_deref(),
        Some("session")
    );
    // Set members (a user's compat sessions): shared, expiring one by one, removable.
    let sp = Space::CompatUserSessions;
    stores[0]
        .add_member(sp, "@a:x", "s1", now + 60_000)
        .await
        .unwrap();
    stores[1]
        .add_member(sp, "@a:x", "s2", now + 300)
        .await
        .unwrap();
    stores[1]
        .add_member(sp, "@a:xy", "s3", now + 60_000)
        .await
        .unwrap();
    let mut m = stores[1].members(sp, "@a:x", now).await.unwrap();
    m.sort();
    assert_eq!(m, ["s1", "s2"]);
    assert_eq!(
        stores[0].members(sp, "@a:x", now + 300).await.unwrap(),
        ["s1"],
        "s2 expired"
    );
    stores[0].remove_member(sp, "@a:x", "s1").await.unwrap();
    assert!(stores[1]
        .members(sp, "@a:x", now + 300)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(stores[1].members(sp, "@a:xy", now).await.unwrap(), ["s3"]);
    // The set itself expires with its last member.
    let ttl: i64 = redis
        .cli(&["PTTL", "mog-test:m:cus:@a:xy"])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");

    // A claim (the lease of a compat session's grant check): one replica of many gets it.
    let claims = futures_util::future::join_all((0..16).map(|i| {
        stores[i % 2].claim_expiring(Space::CompatGrantLease, "sess", "held", now + 60_000, now)
    }))
    .await;
    assert_eq!(
        claims.into_iter().filter(|c| *c.as_ref().unwrap()).count(),
        1,
        "a lease claimed twice"
    );
    assert!(stores[0]
        .claim_expiring(Space::CompatGrantLease, "sess2", "held", now + 60_000, now)
        .await
        .unwrap());
    // Let go only by its holder.
    let sp = Space::CompatGrantLease;
    stores[1]
        .delete_expiring_if(sp, "sess2", "other")
        .await
        .unwrap();
    assert!(!stores[1]
        .claim_expiring(sp, "sess2", "x", now + 60_000, now)
        .await
        .unwrap());
    stores[1]
        .delete_expiring_if(sp, "sess2", "held")
        .await
        .unwrap();
    assert!(stores[1]
        .claim_expiring(sp, "sess2", "x", now + 60_000, now)
        .await
        .unwrap());

    let takes = futures_util::future::join_all(
        (0..16).map(|i| stores[i % 2].take_expiring(Space::LoginToken, "t1", now)),
    )
    .await;
    let got: Vec<_> = takes.into_iter().filter_map(|t| t.unwrap()).collect();
    assert_eq!(got, vec!["grant".to_owned()]);
    // Another space kept its value; a delete removes it.
    stores[1]
        .delete_expiring(Space::CompatAccess, "t1")
        .await
        .unwrap();
    assert_eq!(
        stores[0]
            .get_expiring(Space::CompatAccess, "t1", now)
            .await
            .unwrap(),
        None
    );
    // A value past its expiry is gone.
    stores[0]
        .put_expiring(Space::SsoState, "s", "v", now.saturating_sub(1))
        .await
        .unwrap();
    assert_eq!(
        stores[1]
            .get_expiring(Space::SsoState, "s", now)
            .await
            .unwrap(),
        None
    );
}

/// A replica's count of identity-cache lookups that had to decide a token (`miss`, `refresh`).
async fn decided_lookups(gw: &GatewayProcess) -> u64 {
    let text = reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("matrix_oidc_gateway_auth_cache_lookups_total{result=\"miss\"}")
                || l.starts_with("matrix_oidc_gateway_auth_cache_lookups_total{result=\"refresh\"}")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Two replicas re-check a busy token ahead of its window's end once between them: one asks
/// the OP and replaces the shared verdict (compare-and-set), the other takes it from Redis.
/// Neither drops the renewed verdict at the old window's end (no lookup there decides the
/// token again, on either replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_recheck_a_busy_token_once_between_them() {
    let op = Op::start();
    let hs = Homeserver::start(HsKind::Dendrite);
    let redis = RedisServer::start();
    let conf = format!("urls = [\"{}\"]", redis.url());
    let gws = [
        replica_reusing(&op, &hs.url, &conf, "8s"),
        replica_reusing(&op, &hs.url, &conf, "8s"),
    ];
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let before = introspections(&op);
    let started = Instant::now();
    for gw in &gws {
        assert_eq!(whoami(gw, &alice.access_token).await.0, 200);
    }
    op.settle().await;
    assert_eq!(introspections(&op) - before, 1);
    // In the last quarter of the 8 s window (from 6 s): both replicas answer from their caches
    // and start their re-checks; one asks the OP.
    tokio::time::sleep(Duration::from_millis(6_600).saturating_sub(started.elapsed())).await;
    for _ in 0..3 {
        for gw in &gws {
            assert_eq!(whoami(gw, &alice.access_token).await.0, 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the old window's end and the cache's second of slack (9 s), before the new
    // window's last quarter (about 12.6 s): both replicas answer from their renewed verdicts.
    tokio::time::sleep(Duration::from_millis(10_000).saturating_sub(started.elapsed())).await;
    let decided = [
        decided_lookups(&gws[0]).await,
        decided_lookups(&gws[1]).await,
    ];
    for gw in &gws {
        assert_eq!(whoami(gw, &alice.access_token).await.0, 200);
    }
    let after = [
        decided_lookups(&gws[0]).await,
        decided_lookups(&gws[1]).await,
    ];
    assert_eq!(decided, after, "a replica dropped its renewed verdict");
    op.settle().await;
    assert_eq!(
        introspections(&op) - before,
        2,
        "one re-check between two replicas"
    );
}

/// Compat sessions (legacy login, `[compat]`) live in Redis: a session opened on one replica
/// works on the others, and on the replica after its restart; its OP grant is checked once
/// between them (a lease); `/logout` on one replica ends it on all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compat_sessions_are_shared_by_replicas_and_survive_a_restart() {
    let op = Op::start_with(&["--password-grant", "pw-e2e"]);
    let hs = Homeserver::start(HsKind::Dendrite);
    let redis = RedisServer::start();
    let conf = format!("urls = [\"{}\"]", redis.url());
    let compat = "[compat]\nenabled = true\npassword_login = true\ngrant_check_interval = \"2s\"";
    let mut gws = [
        replica_with(&op, &hs.url, &conf, "1s", compat),
        replica_with(&op, &hs.url, &conf, "1s", compat),
    ];
    let r = reqwest::Client::new()
        .post(gws[0].url("/_matrix/client/v3/login"))
        .json(&json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "heidi"},
            "password": "pw-e2e",
            "device_id": "HEIDIDEV01",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let opened = std::time::Instant::now();
    let body: Value = r.json().await.unwrap();
    let access = body["access_token"].as_str().unwrap().to_owned();
    let (s, who) = whoami(&gws[1], &access).await;
    assert_eq!(s, 200, "{who}");
    assert_eq!(who["device_id"], "HEIDIDEV01");
    gws[0].restart();
    // Both replicas keep serving it for a while: its grant is checked at the OP meanwhile.
    for _ in 0..24 {
        for gw in &gws {
            assert_eq!(whoami(gw, &access).await.0, 200);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    op.settle().await;
    let refreshes: Vec<String> = op
        .output()
        .into_iter()
        .filter(|l| l.starts_with("TOKEN refresh_token"))
        .collect();
    // At most one check per interval over both replicas (a second one with the same refresh
    // token would be refused, and the OP would revoke the grant: the session would end).
    let most = opened.elapsed().as_secs() / 2 + 1;
    assert!(
        !refreshes.is_empty() && refreshes.len() as u64 <= most,
        "{refreshes:?}: more than {most} grant refreshes at a 2 s interval over two replicas"
    );
    assert!(
        refreshes.iter().all(|l| l.ends_with(" 200")),
        "{refreshes:?}"
    );
    let r = reqwest::Client::new()
        .post(gws[1].url("/_matrix/client/v3/logout"))
        .bearer_auth(&access)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = std::time::Instant::now();
    while whoami(&gws[0], &access).await.0 != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the other replica still serves a logged-out compat session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two store clients on `redis` (two replicas' view of the shared state).
fn two_stores(redis: &RedisServer) -> Vec<matrix_oidc_gateway::store::redis::RedisStore> {
    use matrix_oidc_gateway::config::{RedisMode, RedisSettings};
    use matrix_oidc_gateway::store::redis::{Redis, RedisStore};
    let settings = RedisSettings {
        mode: RedisMode::Standalone,
        urls: vec![redis.url()],
        sentinel_service: None,
        password: None,
        key_prefix: "mog-test:".into(),
        timeout: Duration::from_secs(2),
    };
    (0..2)
        .map(|_| RedisStore::new(Redis::new(&settings).expect("redis client")))
        .collect()
}

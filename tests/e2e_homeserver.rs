//! End to end with real homeservers: the real `oidc-provider` mints tokens, the built gateway
//! binary binds them to real Synapse (both appservice modes) and real Dendrite
//! (`appservice_login`, the mode Dendrite and Conduit need), and two OIDC users talk to each
//! other through it.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::time::Duration;

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{GatewayProcess, Op};
use serde_json::{json, Value};

const STORE_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

struct Stack {
    op: Op,
    hs: Homeserver,
    gw: GatewayProcess,
}

fn start(kind: HsKind, binding: &str) -> Stack {
    let op = Op::start();
    let hs = Homeserver::start(kind);
    let gw = GatewayProcess::start(&format!(
        r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"

[homeserver]
url = "{hs}"
server_name = "localhost"
kind = "{kind}"
binding = "{binding}"
as_token = "{AS_TOKEN}"

[store]
path = "{{state_dir}}/state.sqlite3"
encryption_key = "{STORE_KEY}"

[discovery]
public_base_url = "https://matrix.localhost"

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[log]
level = "info"
format = "json"
"#,
        hs = hs.url,
        kind = kind.config_name(),
        issuer = op.issuer,
    ));
    Stack { op, hs, gw }
}

/// A Matrix client talking through the gateway.
struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    fn new(stack: &Stack, token: &str) -> Client {
        Client {
            base: stack.gw.base.clone(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request through the gateway");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn whoami(c: &Client) -> Value {
    let (status, body) = c.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!(status, 200, "whoami: {body}");
    body
}

async fn scenario(kind: HsKind, binding: &str) {
    let mut s = start(kind, binding);
    let alice_tok = s.op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let bob_tok = s.op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0001",
    );
    let alice = Client::new(&s, &alice_tok.access_token);
    let bob = Client::new(&s, &bob_tok.access_token);

    // whoami shows the user and the device from the scope.
    let me = whoami(&alice).await;
    assert_eq!(me["user_id"], "@alice:localhost");
    assert_eq!(me["device_id"], "ALICEDEV01");
    assert_eq!(me["is_guest"], false);
    let me = whoami(&bob).await;
    assert_eq!(me["user_id"], "@bob:localhost");
    assert_eq!(me["device_id"], "BOBDEV0001");

    // A client-supplied user_id cannot make alice act as bob.
    let (status, me) = alice
        .get("/_matrix/client/v3/account/whoami?user_id=%40bob%3Alocalhost")
        .await;
    assert_eq!(status, 200);
    assert_eq!(me["user_id"], "@alice:localhost");
    let (_, me) = alice
        .get("/_matrix/client/v3/account/whoami?device_id=BOBDEV0001")
        .await;
    assert_eq!(me["device_id"], "ALICEDEV01");

    // alice creates a room and invites bob; bob joins; alice's message reaches bob's /sync.
    let (status, room) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat", "invite": ["@bob:localhost"]}),
        )
        .await;
    assert_eq!(status, 200, "createRoom: {room}");
    let room_id = room["room_id"].as_str().expect("room_id").to_owned();
    let (status, joined) = bob
        .post(
            &format!("/_matrix/client/v3/join/{}", enc(&room_id)),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "join: {joined}");
    let (status, sent) = alice
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/txn-1",
                enc(&room_id)
            ),
            json!({"msgtype": "m.text", "body": "hello bob, from an OIDC session"}),
        )
        .await;
    assert_eq!(status, 200, "send: {sent}");
    let mut seen = false;
    for _ in 0..20 {
        let (status, sync) = bob.get("/_matrix/client/v3/sync?timeout=1000").await;
        assert_eq!(status, 200, "sync: {sync}");
        let events = &sync["rooms"]["join"][&room_id]["timeline"]["events"];
        if events.as_array().is_some_and(|evs| {
            evs.iter()
                .any(|e| e["content"]["body"] == "hello bob, from an OIDC session")
        }) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen, "bob's /sync never showed alice's message");

    // alice uploads device keys; bob's keys/query returns her device under the scope's device ID.
    upload_alice_device_keys(&alice).await;
    let (status, q) = bob
        .post(
            "/_matrix/client/v3/keys/query",
            json!({"device_keys": {"@alice:localhost": []}}),
        )
        .await;
    assert_eq!(status, 200, "keys/query: {q}");
    assert!(
        q["device_keys"]["@alice:localhost"]
            .get("ALICEDEV01")
            .is_some(),
        "alice's device missing from keys/query: {q}"
    );

    // A guest token may sync but not create rooms.
    let guest_tok = s.op.mint(
        "visitor",
        "urn:matrix:client:api:guest urn:matrix:client:device:GUESTDEV01",
    );
    let guest = Client::new(&s, &guest_tok.access_token);
    let (status, _) = guest.get("/_matrix/client/v3/sync?timeout=0").await;
    assert_eq!(status, 200);
    let (status, body) = guest.post("/_matrix/client/v3/createRoom", json!({})).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_GUEST_ACCESS_FORBIDDEN"))
    );

    // Through an appservice binding the homeserver sees the guest as an ordinary user, so it
    // cannot apply a room's `m.room.guest_access`: the gateway keeps guests out of joins.
    // A public room without guest access (the `public_chat` preset grants none).
    let (status, public) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "public_chat"}),
        )
        .await;
    assert_eq!(status, 200, "createRoom: {public}");
    let public_id = public["room_id"].as_str().expect("room_id").to_owned();
    for join in [
        format!("/_matrix/client/v3/rooms/{}/join", enc(&public_id)),
        format!("/_matrix/client/v3/join/{}", enc(&public_id)),
        format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(&public_id),
            enc("@visitor:localhost")
        ),
    ] {
        let (status, body) = if join.contains("/state/") {
            guest.put(&join, json!({"membership": "join"})).await
        } else {
            guest.post(&join, json!({})).await
        };
        assert_eq!(
            (status, body["errcode"].as_str()),
            (403, Some("M_GUEST_ACCESS_FORBIDDEN")),
            "a guest joined a room without guest access through {join}: {body}"
        );
    }
    let (status, members) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/joined_members",
            enc(&public_id)
        ))
        .await;
    assert_eq!(status, 200, "{members}");
    assert!(
        members["joined"].get("@visitor:localhost").is_none(),
        "the guest is in the room: {members}"
    );

    // No token may act as the application service's own user (`sender_localpart`).
    let bot_tok = s.op.mint(
        "oidc-gateway",
        "urn:matrix:client:api:* urn:matrix:client:device:BOTDEV0001",
    );
    let (status, body) = Client::new(&s, &bot_tok.access_token)
        .get("/_matrix/client/v3/account/whoami")
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "a token acted as the appservice's user: {body}"
    );

    // The gateway answers the endpoints the OP owns, under every prefix; none reaches the homeserver.
    assert_refused_endpoints(&s, &alice).await;

    // Capabilities, discovery and versions as MSC3861 clients expect them.
    let (status, caps) = alice.get("/_matrix/client/v3/capabilities").await;
    assert_eq!(status, 200, "{caps}");
    for k in ["m.change_password", "m.3pid_changes", "m.get_login_token"] {
        assert_eq!(caps["capabilities"][k]["enabled"], false, "{k}: {caps}");
    }
    assert!(
        caps["capabilities"]["m.room_versions"].is_object(),
        "upstream capabilities lost: {caps}"
    );
    let anon = reqwest::Client::new();
    let meta: Value = anon
        .get(s.gw.url("/_matrix/client/v1/auth_metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], s.op.issuer.as_str());
    for field in [
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "response_types_supported",
        "grant_types_supported",
        "response_modes_supported",
        "code_challenge_methods_supported",
    ] {
        assert!(
            meta.get(field).is_some(),
            "auth_metadata lacks {field}: {meta}"
        );
    }
    let unstable: Value = anon
        .get(s.gw.url("/_matrix/client/unstable/org.matrix.msc2965/auth_metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(unstable, meta);
    let issuer: Value = anon
        .get(s.gw.url("/_matrix/client/unstable/org.matrix.msc2965/auth_issuer"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(issuer, json!({"issuer": s.op.issuer}));
    let wk: Value = anon
        .get(s.gw.url("/.well-known/matrix/client"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wk["m.homeserver"]["base_url"], "https://matrix.localhost");
    assert_eq!(
        wk["org.matrix.msc2965.authentication"]["issuer"],
        s.op.issuer.as_str()
    );
    let versions: Value = anon
        .get(s.gw.url("/_matrix/client/versions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for f in [
        "org.matrix.msc3861",
        "org.matrix.msc2965",
        "org.matrix.msc2967",
    ] {
        assert_eq!(versions["unstable_features"][f], true, "{versions}");
    }
    let direct: Value = reqwest::get(format!("{}/_matrix/client/versions", s.hs.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        versions["versions"], direct["versions"],
        "versions must not be inflated"
    );

    // 20 concurrent first requests of a new device: one registration, one login (or device creation).
    let carol_tok = s.op.mint(
        "carol",
        "urn:matrix:client:api:* urn:matrix:client:device:CAROLDEV01",
    );
    let (reg0, login0, put0) = counts(&s.hs);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = s.gw.url("/_matrix/client/v3/account/whoami");
        let tok = carol_tok.access_token.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(url)
                .bearer_auth(tok)
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
        assert_eq!(body["device_id"], "CAROLDEV01");
    }
    let (reg1, login1, put1) = counts(&s.hs);
    assert_eq!(reg1 - reg0, 1, "registrations for carol");
    if binding == "appservice_login" {
        assert_eq!(
            (login1 - login0, put1 - put0),
            (1, 0),
            "logins / device creations for carol"
        );
    } else {
        assert_eq!(
            (login1 - login0, put1 - put0),
            (0, 1),
            "logins / device creations for carol"
        );
    }

    // After a gateway restart alice's binding is reused: no new login, same device list.
    let (_, devices_before) = alice.get("/_matrix/client/v3/devices").await;
    let (_, logins_before, puts_before) = counts(&s.hs);
    s.gw.restart();
    // A new connection: the old one died with the old process.
    let alice = Client::new(&s, &alice_tok.access_token);
    let me = whoami(&alice).await;
    assert_eq!(me["device_id"], "ALICEDEV01");
    let (_, devices_after) = alice.get("/_matrix/client/v3/devices").await;
    let (_, logins_after, puts_after) = counts(&s.hs);
    assert_eq!(
        (logins_after, puts_after),
        (logins_before, puts_before),
        "the restart provisioned again"
    );
    let ids = |v: &Value| {
        let mut ids: Vec<String> = v["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["device_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    };
    assert_eq!(ids(&devices_before), ids(&devices_after));
    assert!(
        ids(&devices_after).contains(&"ALICEDEV01".to_owned()),
        "{devices_after}"
    );

    // The device is signed out behind the gateway's back: the next request gets 503 (never a
    // 401 that would log alice out), and the one after works on a freshly provisioned device.
    match binding {
        "appservice_login" => {
            let upstream_token = stored_device_token(&s, "@alice:localhost", "ALICEDEV01").await;
            let r = reqwest::Client::new()
                .post(format!("{}/_matrix/client/v3/logout", s.hs.url))
                .bearer_auth(&upstream_token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "direct logout at the homeserver");
        }
        _ => {
            let r = reqwest::Client::new()
                .delete(format!(
                    "{}/_matrix/client/v3/devices/ALICEDEV01?user_id=%40alice%3Alocalhost",
                    s.hs.url
                ))
                .bearer_auth(AS_TOKEN)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "direct device deletion: {}",
                r.status()
            );
        }
    }
    let (status, body) = alice.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (503, Some("M_UNKNOWN")),
        "{body}"
    );
    let me = whoami(&alice).await;
    assert_eq!(me["device_id"], "ALICEDEV01");

    // The AS token never appears in anything the gateway logged.
    assert!(
        !s.gw.logs().contains(AS_TOKEN),
        "the AS token leaked into the gateway log"
    );
    assert!(!s.gw.logs().contains(&alice_tok.access_token));
}

/// The upstream token the gateway keeps for (user, device): sealed in its store (checked here:
/// the stored form is no homeserver credential), opened with the configured key.
async fn stored_device_token(s: &Stack, user: &str, device: &str) -> String {
    use matrix_oidc_gateway::store::seal::{device_context, parse_key, Sealer};
    let sealed: String = rusqlite::Connection::open(s.gw.state_db())
        .unwrap()
        .query_row(
            "SELECT upstream_token FROM devices WHERE user_id = ?1 AND device_id = ?2",
            [user, device],
            |r| r.get(0),
        )
        .expect("the binding in the gateway's store");
    s.hs.assert_sealed_token_is_no_credential(&sealed).await;
    let sealer = Sealer::new(&parse_key(STORE_KEY).unwrap(), None).unwrap();
    sealer
        .open(&sealed, &device_context(user, device))
        .expect("opens with store.encryption_key")
        .plaintext
}

/// alice uploads the keys of her device ALICEDEV01.
async fn upload_alice_device_keys(alice: &Client) {
    let device_keys = json!({
        "user_id": "@alice:localhost",
        "device_id": "ALICEDEV01",
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            "curve25519:ALICEDEV01": "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI",
            "ed25519:ALICEDEV01": "lEuiRJBit0IG6nUf5pUzWTUEsRVVe/HJkoKuEww9ULI"
        },
        "signatures": {"@alice:localhost": {"ed25519:ALICEDEV01": "dSO80A01XiigH3uBiDVx/EjzaoycHcjq9lfQX0uWsqxl2giMIiSPR8a4d291W1ihKJL/a+myXS367WT6NAIcBA"}}
    });
    let (status, up) = alice
        .post(
            "/_matrix/client/v3/keys/upload",
            json!({"device_keys": device_keys}),
        )
        .await;
    assert_eq!(status, 200, "keys/upload: {up}");
}

/// (registrations, appservice logins, device creations) the homeserver processed so far.
fn counts(hs: &Homeserver) -> (usize, usize, usize) {
    (
        hs.requests("POST", "/_matrix/client/v3/register"),
        hs.requests("POST", "/_matrix/client/v3/login"),
        hs.requests("PUT", "/_matrix/client/v3/devices/"),
    )
}

/// Every spelling of every OP-owned endpoint that a real homeserver routes (Synapse: `v3`, `r0`,
/// `unstable`, `api/v1` for login/logout; Dendrite: `v3`, `r0`), plus `HEAD`, is answered by the
/// gateway itself (its `error` text says so) and never reaches the homeserver.
async fn assert_refused_endpoints(s: &Stack, alice: &Client) {
    let hs_before = counts(&s.hs);
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "login", 404, "M_UNRECOGNIZED"),
        ("POST", "login", 404, "M_UNRECOGNIZED"),
        ("GET", "login/sso/redirect", 404, "M_UNRECOGNIZED"),
        ("POST", "logout", 404, "M_UNRECOGNIZED"),
        ("POST", "logout/all", 404, "M_UNRECOGNIZED"),
        ("POST", "refresh", 404, "M_UNRECOGNIZED"),
        ("POST", "register", 403, "M_FORBIDDEN"),
        ("GET", "register/available", 404, "M_UNRECOGNIZED"),
        ("POST", "register/email/requestToken", 404, "M_UNRECOGNIZED"),
        ("POST", "account/password", 404, "M_UNRECOGNIZED"),
        (
            "POST",
            "account/password/email/requestToken",
            404,
            "M_UNRECOGNIZED",
        ),
        ("POST", "account/deactivate", 404, "M_UNRECOGNIZED"),
        ("POST", "account/3pid/add", 404, "M_UNRECOGNIZED"),
        ("POST", "account/3pid/delete", 404, "M_UNRECOGNIZED"),
        (
            "POST",
            "account/3pid/email/requestToken",
            404,
            "M_UNRECOGNIZED",
        ),
        ("POST", "delete_devices", 404, "M_UNRECOGNIZED"),
        ("DELETE", "devices/ALICEDEV01", 404, "M_UNRECOGNIZED"),
        (
            "POST",
            "user/@alice:localhost/openid/request_token",
            404,
            "M_UNRECOGNIZED",
        ),
        ("POST", "login/get_token", 404, "M_UNRECOGNIZED"),
    ];
    // Unstable spellings some homeservers still route (Synapse: MSC3882; ruma-based ones serve
    // every spelling an endpoint ever had).
    let unstable: &[(&str, &str, u16, &str)] = &[
        (
            "POST",
            "org.matrix.msc3882/login/token",
            404,
            "M_UNRECOGNIZED",
        ),
        (
            "POST",
            "org.matrix.msc3882/login/get_token",
            404,
            "M_UNRECOGNIZED",
        ),
        ("POST", "org.matrix.msc2918/refresh", 404, "M_UNRECOGNIZED"),
        (
            "GET",
            "org.matrix.msc3231/register/org.matrix.msc3231.login.registration_token/validity",
            404,
            "M_UNRECOGNIZED",
        ),
    ];
    let http = reqwest::Client::new();
    let spellings = ["v3", "r0", "unstable", "api/v1", "v1"]
        .map(|prefix| (prefix, cases))
        .into_iter()
        .chain([("unstable", unstable)]);
    for (prefix, cases) in spellings {
        for (method, endpoint, status, errcode) in cases {
            for m in [*method, "HEAD"] {
                if m == "HEAD" && *method != "GET" {
                    continue;
                }
                let url = s.gw.url(&format!("/_matrix/client/{prefix}/{endpoint}"));
                let resp = http
                    .request(m.parse().unwrap(), &url)
                    .bearer_auth(&alice.token)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), *status, "{m} {url}");
                if m != "HEAD" {
                    let body: Value = resp.json().await.unwrap();
                    assert_eq!(body["errcode"], *errcode, "{m} {url}: {body}");
                    assert!(
                        body["error"].as_str().unwrap_or("").contains("(gateway)"),
                        "{m} {url}: {body}"
                    );
                }
            }
        }
    }
    // The admin API is not on the public listener.
    for url in [
        "/_synapse/admin/v1/server_version",
        "/_dendrite/admin/evacuateUser/@alice:localhost",
    ] {
        let resp = http
            .get(s.gw.url(url))
            .bearer_auth(&alice.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{url}");
    }
    assert_eq!(
        counts(&s.hs),
        hs_before,
        "a refused request reached the homeserver"
    );
}

#[tokio::test]
async fn synapse_appservice_masquerade() {
    scenario(HsKind::Synapse, "appservice_masquerade").await;
}

#[tokio::test]
async fn synapse_appservice_login() {
    scenario(HsKind::Synapse, "appservice_login").await;
}

#[tokio::test]
async fn dendrite_appservice_login() {
    scenario(HsKind::Dendrite, "appservice_login").await;
}

/// An existing masquerade deployment: an explicit `appservice_masquerade` configuration keeps
/// working across an upgrade with the same store; dropping the `binding` line (the new
/// per-device default) moves every device to its own upstream token under the same device ID,
/// keeping its keys, with no new device.
#[tokio::test]
async fn masquerade_store_moves_to_appservice_login() {
    let mut s = start(HsKind::Synapse, "appservice_masquerade");
    let tok = s.op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let alice = Client::new(&s, &tok.access_token);
    assert_eq!(whoami(&alice).await["device_id"], "ALICEDEV01");
    upload_alice_device_keys(&alice).await;
    assert_eq!(
        s.hs.requests("POST", "/_matrix/client/v3/login"),
        0,
        "masquerade logs nothing in"
    );

    // Upgrade with the configuration unchanged: still masquerade, nothing logged in.
    s.gw.restart();
    // (a new client each time: the old one's pooled connections died with the process)
    let alice = Client::new(&s, &tok.access_token);
    assert_eq!(whoami(&alice).await["device_id"], "ALICEDEV01");
    assert_eq!(s.hs.requests("POST", "/_matrix/client/v3/login"), 0);

    // The operator removes the binding line: the default, per-device credentials.
    s.gw.edit_config(|cfg| {
        cfg.lines()
            .filter(|l| !l.starts_with("binding = "))
            .collect::<Vec<_>>()
            .join("\n")
    });
    s.gw.restart();
    let alice = Client::new(&s, &tok.access_token);
    let me = whoami(&alice).await;
    assert_eq!(
        (me["user_id"].as_str(), me["device_id"].as_str()),
        (Some("@alice:localhost"), Some("ALICEDEV01"))
    );
    assert_eq!(
        s.hs.requests("POST", "/_matrix/client/v3/login"),
        1,
        "one appservice login for the existing device"
    );
    let devices = s.hs.device_ids("@alice:localhost").await;
    assert_eq!(devices, vec!["ALICEDEV01".to_owned()], "no new device");
    let (status, q) = alice
        .post(
            "/_matrix/client/v3/keys/query",
            json!({"device_keys": {"@alice:localhost": []}}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        q["device_keys"]["@alice:localhost"]["ALICEDEV01"]["keys"].is_object(),
        "the device's keys survived: {q}"
    );
    // Requests now carry the device's own token, sealed in the store.
    let token = stored_device_token(&s, "@alice:localhost", "ALICEDEV01").await;
    let r = reqwest::Client::new()
        .get(format!("{}/_matrix/client/v3/account/whoami", s.hs.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let direct: Value = r.json().await.unwrap();
    assert_eq!(direct["device_id"], "ALICEDEV01", "{direct}");
}

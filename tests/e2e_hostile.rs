//! The hostile-client suite: an attacker with a full-scope token (mallory) and a guest try to
//! act as another user (alice) or to borrow the appservice's powers, through the built gateway,
//! against real Synapse (every binding mode) and real Dendrite (`appservice_login`, the only
//! mode it supports), with two real OPs whose subjects collide.
//!
//! Every case asserts what the homeserver actually did (whoami's answer, a filter, pusher,
//! event timestamp, media owner or device visible to the victim), never a status code alone.
//! All cases run and are reported together, so one run names every attack class that got
//! through. `E2E_GATEWAY_BIN=<older build>` replays the suite against another build.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::time::Duration;

use e2e_support::homeserver::{Homeserver, HsKind, AS_TOKEN};
use e2e_support::{free_port, GatewayProcess, Op};
use reqwest::Method;
use serde_json::{json, Value};

const BCL: &str = "/_matrix-oidc-gateway/oidc/backchannel-logout";
const VICTIM: &str = "@alice:localhost";
const VICTIM_DEV: &str = "ALICEDEV01";
const ATTACKER: &str = "@mallory:localhost";
const ATTACKER_DEV: &str = "MALLORYDEV";
const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

struct Stack {
    /// The primary issuer (opaque tokens, introspection).
    op: Op,
    /// A second issuer (JWT access tokens) whose subjects collide with the first's.
    op_b: Op,
    hs: Homeserver,
    gw: GatewayProcess,
    jars: tempfile::TempDir,
}

/// `store.encryption_key` (left out when replaying against a build from before it existed).
fn key_line() -> String {
    if std::env::var_os("E2E_NO_STORE_KEY").is_some() {
        String::new()
    } else {
        format!("encryption_key = \"{KEY}\"")
    }
}

fn start(kind: HsKind, binding: &str) -> Stack {
    let port = free_port();
    let op = Op::start();
    let op_b = Op::start_with(&[
        "--bcl-uri",
        &format!("http://127.0.0.1:{port}{BCL}"),
        "--bcl-sub-only",
        "1",
    ]);
    let hs = Homeserver::start(kind);
    let gw = GatewayProcess::start_on(
        port,
        &format!(
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
{key_line}

[discovery]
public_base_url = "http://127.0.0.1:{port}"

[[issuers]]
issuer = "{a}"
client_id = "gateway"
client_secret = "gateway-secret"

[[issuers]]
issuer = "{b}"
mode = "jwt"
audiences = ["urn:matrix:homeserver:jwt"]
logout_audiences = ["e2e-client"]

[cache]
max_ttl = "120s"

[log]
level = "info"
format = "json"
"#,
            hs = hs.url,
            kind = kind.config_name(),
            a = op.issuer,
            b = op_b.issuer,
            key_line = key_line(),
        ),
    );
    Stack {
        op,
        op_b,
        hs,
        gw,
        jars: tempfile::tempdir().unwrap(),
    }
}

/// A client of the gateway.
struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// An answer: status and JSON body (`Null` when not JSON).
type Answer = (u16, Value);

impl Client {
    fn new(s: &Stack, token: &str) -> Client {
        Client {
            base: s.gw.base.clone(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Sends `target` as written (reqwest keeps `;`, `%XX` and empty segments of a query).
    async fn send(
        &self,
        method: Method,
        target: &str,
        ctype: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{target}", self.base))
            .bearer_auth(&self.token);
        if let Some(c) = ctype {
            req = req.header("Content-Type", c);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.expect("request through the gateway");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, target: &str) -> Answer {
        self.send(Method::GET, target, None, None).await
    }

    async fn json(&self, method: Method, target: &str, body: Value) -> Answer {
        self.send(
            method,
            target,
            Some("application/json"),
            Some(body.to_string()),
        )
        .await
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The failures of one run, reported together.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, case: &str, held: bool, detail: impl std::fmt::Display) {
        if held {
            eprintln!("held: {case}");
        } else {
            eprintln!("BROKEN: {case}: {detail}");
            self.0.push(format!("{case}: {detail}"));
        }
    }
}

/// Who whoami says the caller is, as `user|device`.
fn who(a: &Answer) -> String {
    format!(
        "{}|{}",
        a.1["user_id"].as_str().unwrap_or("?"),
        a.1["device_id"].as_str().unwrap_or("?")
    )
}

async fn hostile_suite(kind: HsKind, binding: &str) {
    let s = start(kind, binding);
    let mut f = Findings::default();
    let full = |dev: &str| format!("urn:matrix:client:api:* urn:matrix:client:device:{dev}");
    let alice = Client::new(&s, &s.op.mint("alice", &full(VICTIM_DEV)).access_token);
    let mallory = Client::new(&s, &s.op.mint("mallory", &full(ATTACKER_DEV)).access_token);
    let guest = Client::new(
        &s,
        &s.op
            .mint(
                "visitor",
                "urn:matrix:client:api:guest urn:matrix:client:device:GUESTDEV01",
            )
            .access_token,
    );
    let me = format!("{ATTACKER}|{ATTACKER_DEV}");
    assert_eq!(
        who(&alice.get("/_matrix/client/v3/account/whoami").await),
        format!("{VICTIM}|{VICTIM_DEV}")
    );
    assert_eq!(
        who(&mallory.get("/_matrix/client/v3/account/whoami").await),
        me
    );
    assert_eq!(guest.get("/_matrix/client/v3/sync?timeout=0").await.0, 200);

    // The victim's private room, with a message in it; nobody else is a member.
    let (status, room) = alice
        .json(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat", "name": "alice only"}),
        )
        .await;
    assert_eq!(status, 200, "createRoom: {room}");
    let room_id = room["room_id"].as_str().expect("room_id").to_owned();
    let (status, _) = alice
        .json(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
                enc(&room_id)
            ),
            json!({"msgtype": "m.text", "body": "secret"}),
        )
        .await;
    assert_eq!(status, 200);

    // 1. Query separators, encodings and repeats: whoami must still be mallory on his device.
    let smuggled = [
        ";user_id=@alice:localhost;device_id=ALICEDEV01",
        "x=1;user_id=%40alice%3Alocalhost;device_id=ALICEDEV01",
        "user_id=@alice:localhost&user_id=@alice:localhost",
        "user%5Fid=%40alice%3Alocalhost",
        "%75ser_id=%40alice%3Alocalhost",
        "USER_ID=%40alice%3Alocalhost",
        "device_id=ALICEDEV01",
        "x=1;device_id=ALICEDEV01",
        "org.matrix.msc3202.device_id=ALICEDEV01",
        "x=1;org.matrix.msc3202.device_id=ALICEDEV01",
        "x=1&;user_id=@alice:localhost",
    ];
    for q in smuggled {
        let a = mallory
            .get(&format!("/_matrix/client/v3/account/whoami?{q}"))
            .await;
        f.check(
            &format!("whoami?{q}"),
            a.0 == 200 && who(&a) == me,
            format!("{} {}", a.0, a.1),
        );
    }

    // 2. A guest smuggling the victim's user ID into /sync must not see the victim's room.
    for q in [
        "timeout=0;user_id=@alice:localhost",
        "timeout=0;user_id=@alice:localhost;device_id=ALICEDEV01",
        "timeout=0&user%5Fid=%40alice%3Alocalhost&device%5Fid=ALICEDEV01",
    ] {
        let a = guest.get(&format!("/_matrix/client/v3/sync?{q}")).await;
        let leaked = a.1["rooms"]["join"].get(&room_id).is_some();
        f.check(
            &format!("guest sync?{q}"),
            !leaked,
            format!("{} saw the victim's room", a.0),
        );
    }

    // 3. Form and multipart bodies (Twisted merges form arguments over the query; Synapse
    //    parses the body as JSON whatever its type): no filter or pusher appears for alice.
    let smuggle = "&user_id=@alice:localhost&device_id=ALICEDEV01&";
    let filter_body =
        json!({"room": {"timeline": {"limit": 1}}, "account_data": {"not_types": [smuggle]}})
            .to_string();
    let filter_path = format!("/_matrix/client/v3/user/{}/filter", enc(VICTIM));
    let multipart = "multipart/form-data; boundary=XyZ";
    let multipart_body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\n{VICTIM}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"device_id\"\r\n\r\n{VICTIM_DEV}\r\n--XyZ--\r\n"
    );
    let cases: [(&str, &str, String); 4] = [
        (
            "form filter",
            "application/x-www-form-urlencoded",
            filter_body.clone(),
        ),
        (
            "FORM filter",
            "Application/X-WWW-Form-Urlencoded; charset=utf-8",
            filter_body.clone(),
        ),
        ("multipart filter", multipart, multipart_body.clone()),
        (
            "json filter (control)",
            "application/json",
            filter_body.clone(),
        ),
    ];
    for (case, ctype, body) in cases {
        let a = mallory
            .send(Method::POST, &filter_path, Some(ctype), Some(body))
            .await;
        let created_for_alice = match a.1["filter_id"].as_str() {
            Some(id) => alice.get(&format!("{filter_path}/{}", enc(id))).await.0 == 200,
            None => false,
        };
        f.check(
            case,
            !created_for_alice,
            format!("{} {}: alice now has this filter", a.0, a.1),
        );
    }
    let pusher = json!({
        "pushkey": "mallory-pushkey", "kind": "http", "app_id": "evil.app", "app_display_name": "e",
        "device_display_name": "e", "lang": "en", "append": false,
        "data": {"url": "https://push.example.org/_matrix/push/v1/notify", "x": smuggle},
    })
    .to_string();
    for (case, ctype) in [
        ("form pushers/set", "application/x-www-form-urlencoded"),
        ("multipart pushers/set", multipart),
    ] {
        let body = if ctype == multipart {
            multipart_body.clone()
        } else {
            pusher.clone()
        };
        let count = || async {
            let (_, pushers) = alice.get("/_matrix/client/v3/pushers").await;
            pushers["pushers"].as_array().map_or(0, Vec::len)
        };
        let before = count().await;
        let a = mallory
            .send(
                Method::POST,
                "/_matrix/client/v3/pushers/set",
                Some(ctype),
                Some(body),
            )
            .await;
        let after = count().await;
        f.check(
            case,
            after == before,
            format!("{} {}: alice has {after} pusher(s), had {before}", a.0, a.1),
        );
    }

    // 4. Appservice-only parameters: `ts` (timestamp massaging), `user_id` on media.
    let (_, mroom) = mallory
        .json(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat"}),
        )
        .await;
    let mroom = mroom["room_id"]
        .as_str()
        .expect("mallory's room")
        .to_owned();
    for (i, q) in ["ts=1000", "x=1;ts=1000", "TS=1000", "%74s=1000"]
        .iter()
        .enumerate()
    {
        let (_, sent) = mallory
            .json(
                Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/ts{i}?{q}",
                    enc(&mroom)
                ),
                json!({"msgtype": "m.text", "body": "when?"}),
            )
            .await;
        let ev = sent["event_id"].as_str().unwrap_or_default();
        let (_, event) = mallory
            .get(&format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&mroom),
                enc(ev)
            ))
            .await;
        let ts = event["origin_server_ts"].as_u64().unwrap_or(0);
        f.check(
            &format!("send?{q}"),
            ts > 1_000_000,
            format!("origin_server_ts = {ts}"),
        );
    }
    for q in [
        "user_id=%40alice%3Alocalhost",
        "x=1;user_id=@alice:localhost",
    ] {
        let (status, up) = mallory
            .send(
                Method::POST,
                &format!("/_matrix/media/v3/upload?filename=a.txt&{q}"),
                Some("text/plain"),
                Some("hello".into()),
            )
            .await;
        let owner = match up["content_uri"].as_str() {
            Some(uri) => s.hs.media_owner(uri.rsplit('/').next().unwrap_or_default()),
            None => None,
        };
        f.check(
            &format!("media upload?{q}"),
            status == 200 && owner.as_deref() == Some(ATTACKER),
            format!("{status} {up}: owner {owner:?}"),
        );
    }

    // Media uploads take the body as it is (no JSON parsing), so a form or multipart body is
    // all Twisted needs to replace the query's user_id/device_id.
    let form_body = format!("user_id={}&device_id={VICTIM_DEV}", enc(VICTIM));
    for (case, ctype, body) in [
        (
            "form media upload",
            "application/x-www-form-urlencoded",
            form_body,
        ),
        ("multipart media upload", multipart, multipart_body.clone()),
    ] {
        let (status, up) = mallory
            .send(
                Method::POST,
                "/_matrix/media/v3/upload?filename=b.txt",
                Some(ctype),
                Some(body),
            )
            .await;
        let owner = match up["content_uri"].as_str() {
            Some(uri) => s.hs.media_owner(uri.rsplit('/').next().unwrap_or_default()),
            None => None,
        };
        f.check(
            case,
            owner.as_deref() != Some(VICTIM),
            format!("{status} {up}: the upload is alice's"),
        );
    }

    // 5. Membership-gated reads of a room mallory is not in.
    let a = mallory
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/joined_members",
            enc(&room_id)
        ))
        .await;
    let leaked = a.1["joined"].get(VICTIM).is_some();
    f.check(
        "joined_members of alice's room",
        !leaked,
        format!("{} {}", a.0, a.1),
    );
    let a = mallory
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10",
            enc(&room_id)
        ))
        .await;
    f.check(
        "messages of alice's room",
        !a.1.to_string().contains("secret"),
        format!("{} {}", a.0, a.1),
    );

    // 6. Appservice-only and OP-owned endpoints in other spellings: mallory's own session and
    //    devices survive them, and no appservice power is lent.
    let before = s.hs.device_ids(ATTACKER).await;
    let (_, ping) = mallory
        .json(
            Method::POST,
            "/_matrix/client/v1/appservice/matrix-oidc-gateway/ping",
            json!({}),
        )
        .await;
    f.check(
        "appservice ping",
        ping.get("duration_ms").is_none(),
        format!("{ping}"),
    );
    for target in [
        "/_matrix/client/v3/logout",
        "/_matrix/client/r0/logout",
        "/_matrix/client/unstable/logout",
        "/_matrix/client/api/v1/logout",
        "/_matrix/client/v3/logout?",
        "/_matrix/client/v3/logout?;user_id=@alice:localhost",
        "/_matrix/client/v3/logout/all",
        "/_matrix/client/unstable/logout/all",
        "/_matrix/client/v3/account/deactivate",
        "/_matrix/client/r0/account/deactivate",
        "/_matrix/client/unstable/account/deactivate",
        "/_matrix/client/v3/delete_devices",
        "/_matrix/client/unstable/delete_devices",
    ] {
        let body = json!({"devices": [ATTACKER_DEV], "erase": false}).to_string();
        let a = mallory
            .send(Method::POST, target, Some("application/json"), Some(body))
            .await;
        let (_, me_now) = mallory.get("/_matrix/client/v3/account/whoami").await;
        f.check(
            &format!("POST {target}"),
            me_now["user_id"] == ATTACKER,
            format!("{} {}: mallory's session is gone ({me_now})", a.0, a.1),
        );
    }
    for target in [
        "/_matrix/client/v3/devices/ALICEDEV01",
        "/_matrix/client/r0/devices/MALLORYDEV",
        "/_matrix/client/unstable/devices/MALLORYDEV",
    ] {
        let a = mallory
            .send(
                Method::DELETE,
                target,
                Some("application/json"),
                Some("{}".into()),
            )
            .await;
        f.check(
            &format!("DELETE {target}"),
            a.0 >= 400,
            format!("{} {}", a.0, a.1),
        );
    }
    let after = s.hs.device_ids(ATTACKER).await;
    f.check(
        "mallory's devices unchanged",
        before == after,
        format!("{before:?} -> {after:?}"),
    );
    f.check(
        "alice's device unchanged",
        s.hs.device_ids(VICTIM)
            .await
            .contains(&VICTIM_DEV.to_owned()),
        "alice's device is gone",
    );

    // 7. Two issuers colliding on `sub`: issuer B's "alice" is not issuer A's alice.
    let b_alice = s.op_b.mint_with(
        "alice",
        &full("BALICEDEV1"),
        "urn:matrix:homeserver:jwt",
        "e2e-client",
    );
    let b = Client::new(&s, &b_alice.access_token);
    let a = b.get("/_matrix/client/v3/account/whoami").await;
    f.check(
        "issuer B claims alice's user ID",
        a.0 == 403 && a.1["errcode"] == "M_FORBIDDEN",
        format!("{} {}", a.0, a.1),
    );
    // Issuer B signs its "alice" out (a sub-only logout token): issuer A's alice is untouched.
    let jar = s.jars.path().join("b-alice.json");
    s.op_b.mint_in_session("alice", &full("BALICEDEV2"), &jar);
    s.op_b.logout(&jar);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = alice.get("/_matrix/client/v3/account/whoami").await;
    f.check(
        "issuer B's logout of its alice",
        a.0 == 200
            && s.hs
                .device_ids(VICTIM)
                .await
                .contains(&VICTIM_DEV.to_owned()),
        format!("{} {}: issuer A's alice was signed out", a.0, a.1),
    );

    assert!(
        f.0.is_empty(),
        "{} attack(s) got through with {kind:?} / {binding}:\n{}",
        f.0.len(),
        f.0.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn synapse_appservice_login_withstands_hostile_clients() {
    hostile_suite(HsKind::Synapse, "appservice_login").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn synapse_appservice_masquerade_withstands_hostile_clients() {
    hostile_suite(HsKind::Synapse, "appservice_masquerade").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dendrite_appservice_login_withstands_hostile_clients() {
    hostile_suite(HsKind::Dendrite, "appservice_login").await;
}

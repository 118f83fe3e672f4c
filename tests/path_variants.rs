//! Replays the request spellings of `shared/reference/path-variants.md` (and the Dendrite
//! measurements in docs/routes.md) as raw bytes, with no client normalisation, and checks the
//! gateway classifies each exactly as a homeserver routes it: spellings that reach a public
//! endpoint pass without a token, spellings that reach an OP-owned endpoint are refused by the
//! gateway, everything else needs a token, and the bytes the homeserver receives are the bytes
//! that were classified.

mod common;

use common::*;
use serde_json::Value;

fn request(method: &str, target: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

async fn answer(gw: &TestGateway, method: &str, target: &str) -> (u16, String) {
    let out = raw_sequence(gw.addr, &[&request(method, target)]).await;
    let text = out.into_iter().next().unwrap_or_default();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// `(method, spelling, path the homeserver must receive)` for a public endpoint.
const PUBLIC_SPELLINGS: &[(&str, &str, &str)] = &[
    (
        "GET",
        "/_matrix/client/v3/publicRooms",
        "/_matrix/client/v3/publicRooms",
    ),
    (
        "GET",
        "/_matrix/client/r0/publicRooms",
        "/_matrix/client/r0/publicRooms",
    ),
    (
        "GET",
        "/_matrix/client/unstable/publicRooms",
        "/_matrix/client/unstable/publicRooms",
    ),
    (
        "GET",
        "/_matrix/client/api/v1/publicRooms",
        "/_matrix/client/api/v1/publicRooms",
    ),
    (
        "GET",
        "/_matrix/client/v3/publicRooms?",
        "/_matrix/client/v3/publicRooms",
    ),
    (
        "GET",
        "/_matrix/client/v3/publicRooms??",
        "/_matrix/client/v3/publicRooms",
    ),
    (
        "GET",
        "/_matrix/client/v3/publicRooms?/../sync",
        "/_matrix/client/v3/publicRooms",
    ),
    (
        "HEAD",
        "/_matrix/client/v3/publicRooms",
        "/_matrix/client/v3/publicRooms",
    ),
    // Pingora drops a fragment while parsing; what is classified is what is forwarded.
    (
        "GET",
        "/_matrix/client/v3/publicRooms#/../sync",
        "/_matrix/client/v3/publicRooms",
    ),
];

#[tokio::test]
async fn routed_spellings_of_a_public_endpoint_pass_without_a_token() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    for (method, target, forwarded_path) in PUBLIC_SPELLINGS {
        let (status, body) = answer(&gw, method, target).await;
        assert_eq!(status, 200, "{method} {target}: {body}");
        if *method != "HEAD" {
            let echo: Value = serde_json::from_str(&body).expect("echo");
            assert_eq!(echo["path"], *forwarded_path, "{method} {target}");
        }
    }
}

#[tokio::test]
async fn routed_spellings_of_op_owned_endpoints_are_refused_by_the_gateway() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    for endpoint in [
        "login",
        "logout",
        "logout/all",
        "refresh",
        "account/password",
        "account/deactivate",
        "delete_devices",
    ] {
        for prefix in ["v3", "r0", "unstable", "api/v1"] {
            for suffix in ["", "?", "??", "?/../sync", "#", "#/../sync"] {
                for method in ["POST", "GET", "HEAD"] {
                    let target = format!("/_matrix/client/{prefix}/{endpoint}{suffix}");
                    let (status, body) = answer(&gw, method, &target).await;
                    assert_eq!(status, 404, "{method} {target}: {body}");
                    if method != "HEAD" {
                        assert!(
                            body.contains("M_UNRECOGNIZED") && body.contains("(gateway)"),
                            "{method} {target}: {body}"
                        );
                    }
                }
            }
        }
    }
    for prefix in ["v3", "r0", "unstable", "api/v1"] {
        let (status, body) =
            answer(&gw, "POST", &format!("/_matrix/client/{prefix}/register")).await;
        assert_eq!(status, 403, "{prefix}: {body}");
    }
    assert!(
        f.hs.received_requests().await.unwrap().is_empty(),
        "a refused spelling reached the homeserver"
    );
}

#[tokio::test]
async fn every_other_spelling_needs_a_token() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config("")).await;
    let mut targets = Vec::new();
    for e in ["sync", "createRoom", "account/whoami", "keys/upload"] {
        for v in ["v3", "r0", "unstable", "api/v1", "v1"] {
            targets.push(format!("/_matrix/client/{v}/{e}"));
        }
    }
    // Spellings no homeserver routes to the public `publicRooms`: refused for want of a token.
    for t in [
        "/_matrix/client/v3//publicRooms",
        "/_matrix/client/v3/publicRooms/",
        "/_matrix/client/v3/./publicRooms",
        "/_matrix/client/v3/%2e/publicRooms",
        "/_matrix/client/v3/x/../publicRooms",
        "/_matrix/client/v3/%70ublicRooms",
        "/_matrix/client/v3/publicRooms%2F",
        "/_matrix/client/v3/PUBLICROOMS",
        "/_MATRIX/client/v3/publicRooms",
        "/_matrix/client/v3/publicRooms;x=y",
        "/_matrix/client/v3/publicRooms%20",
        "/_matrix/client\\v3/publicRooms",
        "//_matrix/client/v3/publicRooms",
    ] {
        targets.push(t.to_owned());
    }
    for t in &targets {
        for m in ["GET", "HEAD"] {
            let (status, body) = answer(&gw, m, t).await;
            assert_eq!(status, 401, "{m} {t}: {body}");
            if m != "HEAD" {
                assert!(body.contains("M_MISSING_TOKEN"), "{m} {t}: {body}");
            }
        }
    }
    assert!(f.hs.received_requests().await.unwrap().is_empty());
}

//! Route classification, token extraction, query parsing and the forwarded target, on arbitrary
//! request targets and `Authorization` values. Properties: nothing panics; and in
//! `appservice_masquerade`, where the gateway adds `user_id`/`device_id`, the forwarded target
//! parses, under each supported homeserver's query rules, to exactly the gateway's identity
//! and to no other application-service parameter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_oidc_gateway::gateway::classify::{classify, Options};
use matrix_oidc_gateway::gateway::target::{self, is_appservice_param, Assert};
use matrix_oidc_gateway::gateway::token;
use pingora::http::RequestHeader;

const USER: &str = "@alice:example.org";
const DEVICE: &str = "ALICEDEV01";

/// The pairs a homeserver's parser sees in a query string.
fn homeserver_views(query: &str) -> [(&'static str, Vec<(Vec<u8>, Vec<u8>)>); 3] {
    let decode = |s: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
        form_urlencoded::parse(s.as_bytes())
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    };
    // Synapse (Twisted): `&` and `;` both separate.
    let synapse = decode(&query.replace(';', "&"));
    // Dendrite (Go net/url): `&` separates; a pair containing `;` is dropped.
    let dendrite = query
        .split('&')
        .filter(|p| !p.contains(';'))
        .flat_map(decode)
        .collect();
    // Conduit, tuwunel (serde_html_form): `&` only; `;` is data.
    let conduit = decode(query);
    [("synapse", synapse), ("dendrite", dendrite), ("conduit", conduit)]
}

fuzz_target!(|data: &[u8]| {
    let (head, auth) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Some((&method_byte, raw_target)) = head.split_first() else {
        return;
    };
    let method = match method_byte % 4 {
        0 => http::Method::GET,
        1 => http::Method::POST,
        2 => http::Method::PUT,
        _ => http::Method::DELETE,
    };
    let options = Options {
        expose_admin_api: false,
        backchannel_logout_path: "/_matrix-oidc-gateway/oidc/backchannel-logout",
        revocation_path: Some("/_matrix-oidc-gateway/oauth2/revoke"),
        // Both ways: the legacy-login routes classified as served, and refused.
        compat: method_byte & 4 != 0,
    };
    let _ = classify(&method, raw_target, options);

    if let Ok(mut req) = RequestHeader::build(method.clone(), raw_target, None) {
        if let Some(a) = auth {
            if let Ok(v) = http::HeaderValue::from_bytes(a) {
                let _ = req.insert_header("Authorization", v);
            }
        }
        let _ = token::extract(&req, true);
    }

    let Ok(parsed) = target::parse(raw_target) else {
        return;
    };
    let assert = Assert {
        user_id: USER,
        device_id: Some(DEVICE),
    };
    let forwarded = target::upstream(raw_target, parsed.query.as_ref(), Some(assert))
        .expect("masquerade always rebuilds the target");
    let query = forwarded.split_once('?').map_or("", |(_, q)| q);
    for (homeserver, pairs) in homeserver_views(query) {
        let named = |name: &[u8]| -> Vec<&[u8]> {
            pairs
                .iter()
                .filter(|(k, _)| k.as_slice() == name)
                .map(|(_, v)| v.as_slice())
                .collect()
        };
        assert_eq!(
            named(b"user_id"),
            vec![USER.as_bytes()],
            "{homeserver} sees another user_id in {forwarded:?}"
        );
        assert_eq!(
            named(b"device_id"),
            vec![DEVICE.as_bytes()],
            "{homeserver} sees another device_id in {forwarded:?}"
        );
        for (k, _) in &pairs {
            assert!(
                k == b"user_id" || k == b"device_id" || !is_appservice_param(k),
                "{homeserver} sees the appservice parameter {:?} in {forwarded:?}",
                String::from_utf8_lossy(k)
            );
        }
    }
});

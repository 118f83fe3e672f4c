//! Upstream request headers (upstream_request_filter): strip everything a client could use to
//! spoof an identity, then inject the verified one.
//!
//! Stripped on every route (all case variants, every repeated value): the five identity headers,
//! the signature header and `identity_headers.also_strip`. On client routes the client's
//! `Authorization` is not forwarded (the identity headers replace it); federation keeps its
//! `Authorization: X-Matrix`. With a signing secret, `X-Matrix-Identity-Signature` carries
//! `t=<unix seconds>,v1=<hex HMAC-SHA256>` over the canonical string documented in
//! `docs/identity-headers.md`, so an upstream can check the headers came from the gateway.
//!
//! The edits work on an [`UpstreamHead`]: Pingora's `RequestHeader` on Pingora's path, and on
//! the HTTP/1 driver's path a [`Relayed`] head, the client's parsed head left as it is with the
//! edits beside it, written to the wire once (Pingora's header map parses and copies every
//! inserted name again; bench/README.md). Both run the same functions below; a test checks
//! that they forward the same headers.

use std::net::{IpAddr, SocketAddr};

use bytes::BufMut;
use http::{HeaderName, HeaderValue, Method};

use hmac::{Hmac, Mac};
use pingora::http::RequestHeader;
use pingora::Result;
use sha2::Sha256;

use crate::auth::{Access, Identity};
use crate::binding::Credential;
use crate::config::{IdentityHeaders, Secret};

/// The canonical string the identity signature covers.
pub fn signing_input(timestamp: u64, method: &str, target: &str, identity: &Identity) -> String {
    format!(
        "v1\n{timestamp}\n{method}\n{target}\n{}\n{}\n{}\n{}\n{}",
        identity.user_id(),
        identity.device_id().unwrap_or(""),
        identity.scope(),
        identity.access == Access::Guest,
        identity.subject(),
    )
}

/// `t=<timestamp>,v1=<hex hmac>`.
pub fn signature(
    secret: &[u8],
    timestamp: u64,
    method: &str,
    target: &str,
    identity: &Identity,
) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(signing_input(timestamp, method, target, identity).as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Whether two header names are the same for an upstream framework: ASCII case ignored and
/// `_` read as `-` (CGI/WSGI, and nginx's `underscores_in_headers`, merge `X_Matrix_User_Id`
/// into `X-Matrix-User-Id`). No allocation: this runs for every header of every request.
pub(crate) fn same_folded(a: &str, b: &str) -> bool {
    let fold = |c: u8| {
        if c == b'_' {
            b'-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// Removes every header a client could spoof: each configured name in every spelling an
/// upstream framework could merge with it (any case, `_` for `-`), every repeat.
pub fn strip(req: &mut impl UpstreamHead, names: &IdentityHeaders, client_route: bool) {
    let fixed = [
        &names.user_id,
        &names.device_id,
        &names.scope,
        &names.guest,
        &names.subject,
        &names.signature,
    ];
    let spoofable = |k: &http::HeaderName| {
        fixed
            .into_iter()
            .chain(names.also_strip.iter())
            .any(|n| same_folded(k.as_str(), n.as_str()))
    };
    req.remove_where(&spoofable);
    if client_route {
        req.remove(&http::header::AUTHORIZATION);
    }
}

/// Adds the verified identity (after [`strip`]).
pub fn inject(
    req: &mut impl UpstreamHead,
    names: &IdentityHeaders,
    identity: &Identity,
    now_secs: u64,
) -> Result<()> {
    req.set(&names.user_id, identity.user_id())?;
    if let Some(d) = identity.device_id() {
        req.set(&names.device_id, d)?;
    }
    // Owned: the header value takes the string without copying it again.
    req.set(&names.scope, identity.scope().into_owned())?;
    let guest = if identity.access == Access::Guest {
        "true"
    } else {
        "false"
    };
    req.set(&names.guest, guest)?;
    req.set(&names.subject, identity.subject())?;
    if let Some(secret) = &names.signing_secret {
        let target = String::from_utf8_lossy(req.raw_path()).into_owned();
        let sig = signature(
            secret.expose().as_bytes(),
            now_secs,
            req.method().as_str(),
            &target,
            identity,
        );
        req.set(&names.signature, sig)?;
    }
    Ok(())
}

/// Applies an upstream credential: the device's own token, or the AS token (the `user_id` /
/// `device_id` assertion goes into the target, built by [`super::target`]).
pub fn bind(
    req: &mut impl UpstreamHead,
    credential: &Credential,
    as_token: Option<&Secret>,
) -> Result<()> {
    let token = match credential {
        Credential::DeviceToken(t) => t.as_str(),
        Credential::Masquerade => match as_token {
            Some(t) => t.expose(),
            None => return Ok(()),
        },
        Credential::None => return Ok(()),
    };
    req.set(&http::header::AUTHORIZATION, format!("Bearer {token}"))?;
    Ok(())
}

/// The address a request is charged to (the new-token budget): the peer's; behind a trusted
/// proxy (`trust_incoming`), the last `X-Forwarded-For` hop, the one that proxy appended, when it
/// parses (a bare address, or `address:port` as some proxies write it).
pub fn client_address(
    req: &RequestHeader,
    peer: Option<IpAddr>,
    trust_incoming: bool,
) -> Option<IpAddr> {
    if !trust_incoming {
        return peer;
    }
    // The bytes of the last hop, not the whole header as text: a client's own non-ASCII entry
    // earlier in the list must not make the proxy's entry unreadable.
    let last = req
        .headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .and_then(|hop| std::str::from_utf8(hop).ok())
        .map(str::trim);
    last.and_then(|hop| {
        hop.parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
    })
    .or(peer)
}

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");

/// An address as `X-Forwarded-For` gives it; IPv4 written without the formatting machinery
/// (this runs for every proxied request).
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if octet >= 100 {
                    s.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    s.push(char::from(b'0' + octet / 10 % 10));
                }
                s.push(char::from(b'0' + octet % 10));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// Sets `X-Forwarded-For` / `X-Forwarded-Proto` for the homeserver.
pub fn forwarded(
    req: &mut impl UpstreamHead,
    client_ip: Option<String>,
    tls: bool,
    trust_incoming: bool,
) -> Result<()> {
    // Collected only when a client sent one (most requests have none).
    let sent = req.values(&X_FORWARDED_FOR);
    let incoming = if !sent.is_empty() {
        let joined = sent
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        req.remove(&X_FORWARDED_FOR);
        joined
    } else {
        String::new()
    };
    let value = match (trust_incoming && !incoming.is_empty(), client_ip) {
        (true, Some(ip)) => Some(format!("{incoming}, {ip}")),
        (true, None) => Some(incoming),
        (false, ip) => ip,
    };
    if let Some(v) = value {
        req.set(&X_FORWARDED_FOR, v)?;
    }
    if !trust_incoming {
        req.set(&X_FORWARDED_PROTO, if tls { "https" } else { "http" })?;
    }
    Ok(())
}

/// The request head the homeserver gets, as the edits above see it.
pub trait UpstreamHead {
    fn method(&self) -> &Method;
    fn raw_path(&self) -> &[u8];
    /// Replaces the target.
    fn set_raw_path(&mut self, path: &[u8]) -> Result<()>;
    /// Every value forwarded under `name`, in order.
    fn values(&self, name: &HeaderName) -> Vec<HeaderValue>;
    /// Forwards nothing under `name` (until it is set again).
    fn remove(&mut self, name: &HeaderName);
    /// Forwards nothing under the names `doomed` picks.
    fn remove_where(&mut self, doomed: &dyn Fn(&HeaderName) -> bool);
    /// Forwards `value` as the only value under `name`.
    fn insert(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()>;

    /// [`Self::insert`] of a value still to be checked.
    fn set<V>(&mut self, name: &HeaderName, value: V) -> Result<()>
    where
        HeaderValue: TryFrom<V>,
    {
        let value = HeaderValue::try_from(value).map_err(|_| {
            pingora::Error::explain(
                pingora::ErrorType::InvalidHTTPHeader,
                "invalid header value",
            )
        })?;
        self.insert(name, value)
    }
}

/// Pingora's path: the edits go into its request header.
impl UpstreamHead for RequestHeader {
    fn method(&self) -> &Method {
        &self.method
    }

    fn raw_path(&self) -> &[u8] {
        RequestHeader::raw_path(self)
    }

    fn set_raw_path(&mut self, path: &[u8]) -> Result<()> {
        RequestHeader::set_raw_path(self, path)
    }

    fn values(&self, name: &HeaderName) -> Vec<HeaderValue> {
        self.headers.get_all(name).iter().cloned().collect()
    }

    fn remove(&mut self, name: &HeaderName) {
        while self.remove_header(name).is_some() {}
    }

    fn remove_where(&mut self, doomed: &dyn Fn(&HeaderName) -> bool) {
        // Allocates only when a client did send such a header.
        let names: Vec<HeaderName> = self.headers.keys().filter(|k| doomed(k)).cloned().collect();
        for name in names {
            UpstreamHead::remove(self, &name);
        }
    }

    fn insert(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        self.insert_header(name.clone(), value)
    }
}

/// The HTTP/1 driver's path: the client's head as parsed, and the edits beside it.
#[derive(Debug)]
pub struct Relayed<'a> {
    client: &'a RequestHeader,
    /// The target, when it changed.
    path: Option<Vec<u8>>,
    /// Names under which none of the client's values are forwarded.
    dropped: Vec<HeaderName>,
    /// What the gateway sets, forwarded after the client's headers.
    added: Vec<(HeaderName, HeaderValue)>,
}

impl<'a> Relayed<'a> {
    /// The client's head, unedited.
    pub fn new(client: &'a RequestHeader) -> Self {
        Self {
            client,
            path: None,
            dropped: Vec::new(),
            added: Vec::with_capacity(8),
        }
    }

    /// The head as HTTP/1.1 bytes: request line, headers (names in lower case), empty line.
    pub fn write_h1(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method().as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.raw_path());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let forwarded = self
            .client
            .headers
            .iter()
            .filter(|(k, _)| !self.dropped.contains(k))
            .chain(self.added.iter().map(|(k, v)| (k, v)));
        for (name, value) in forwarded {
            out.put_slice(name.as_str().as_bytes());
            out.put_slice(b": ");
            out.put_slice(value.as_bytes());
            out.put_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

impl UpstreamHead for Relayed<'_> {
    fn method(&self) -> &Method {
        &self.client.method
    }

    fn raw_path(&self) -> &[u8] {
        self.path
            .as_deref()
            .unwrap_or_else(|| self.client.raw_path())
    }

    fn set_raw_path(&mut self, path: &[u8]) -> Result<()> {
        check_target(path)?;
        self.path = Some(path.to_vec());
        Ok(())
    }

    fn values(&self, name: &HeaderName) -> Vec<HeaderValue> {
        let client = (!self.dropped.contains(name))
            .then(|| self.client.headers.get_all(name).iter())
            .into_iter()
            .flatten();
        let added = self.added.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
        client.chain(added).cloned().collect()
    }

    fn remove(&mut self, name: &HeaderName) {
        // Recorded whether or not the client sent it: a comparison per client header when the
        // head is written costs less than hashing the name here.
        if !self.dropped.contains(name) {
            self.dropped.push(name.clone());
        }
        self.added.retain(|(k, _)| k != name);
    }

    fn remove_where(&mut self, doomed: &dyn Fn(&HeaderName) -> bool) {
        for name in self.client.headers.keys() {
            if doomed(name) && !self.dropped.contains(name) {
                self.dropped.push(name.clone());
            }
        }
        self.added.retain(|(k, _)| !doomed(k));
    }

    fn insert(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        UpstreamHead::remove(self, name);
        self.added.push((name.clone(), value));
        Ok(())
    }
}

/// A target written into the driver's request line must be an origin-form target that cannot
/// break it: a leading `/`, no space, no control byte, no fragment (Pingora's `set_raw_path`
/// checks the target on its own path).
fn check_target(path: &[u8]) -> Result<()> {
    if path.first() != Some(&b'/') || path.iter().any(|&b| b <= b' ' || b == 0x7f || b == b'#') {
        return Err(pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "invalid upstream target",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityParts;
    use crate::config::Secret;
    use http::HeaderName;

    fn names() -> IdentityHeaders {
        IdentityHeaders::for_tests(true)
    }

    fn alice() -> Identity {
        alice_parts().into()
    }

    fn alice_parts() -> IdentityParts {
        IdentityParts {
            user_id: "@alice:example.org".into(),
            device_id: Some("DEV".into()),
            scope: "urn:matrix:client:api:*".into(),
            access: Access::Full,
            issuer: "https://op".into(),
            subject: "sub-a".into(),
            session_id: None,
            expires_at_ms: None,
            token_id: None,
            issued_at_ms: 0,
        }
    }

    #[test]
    fn the_driver_writes_a_plain_http1_head_and_refuses_a_target_that_breaks_it() {
        let client = RequestHeader::build("GET", b"/_matrix/client/v3/sync", None).unwrap();
        let mut head = Relayed::new(&client);
        head.set(&HeaderName::from_static("x-a"), "1").unwrap();
        head.set(&HeaderName::from_static("x-a"), "2").unwrap();
        let mut wire = Vec::new();
        head.write_h1(&mut wire);
        assert_eq!(
            wire,
            b"GET /_matrix/client/v3/sync HTTP/1.1\r\nx-a: 2\r\n\r\n"
        );
        for bad in [
            &b""[..],
            b"/a b",
            b"/a\r\nX: y",
            b"/a\n",
            b"/\x00",
            b"/\x7f",
            b"/a#f",
            b"http://h/a",
            b"*",
        ] {
            assert!(head.set_raw_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(head.raw_path(), b"/_matrix/client/v3/sync");
        assert!(head
            .set(&HeaderName::from_static("x-b"), "a\r\nX: y")
            .is_err());
    }

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for octet in 0..=255u8 {
            for at in 0..4 {
                let mut o = [1, 22, 133, 4];
                o[at] = octet;
                let ip = IpAddr::from(o);
                assert_eq!(ip_text(ip), ip.to_string());
            }
        }
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.0.2.9",
            "255.255.255.255",
            "::1",
            "2001:db8::5",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn the_budgeted_address_is_the_peer_or_the_trusted_proxys_last_hop() {
        let peer: Option<IpAddr> = Some("192.0.2.10".parse().unwrap());
        let with = |values: &[&[u8]]| {
            let mut r = RequestHeader::build("GET", b"/_matrix/client/v3/sync", None).unwrap();
            for v in values {
                r.append_header("X-Forwarded-For", http::HeaderValue::from_bytes(v).unwrap())
                    .unwrap();
            }
            r
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let r = with(&[b"198.51.100.1"]);
        assert_eq!(client_address(&r, peer, false), peer, "not trusted");
        assert_eq!(client_address(&r, peer, true), ip("198.51.100.1"));
        let r = with(&[b"203.0.113.5, 198.51.100.2"]);
        assert_eq!(client_address(&r, peer, true), ip("198.51.100.2"));
        // Several header lines: the proxy's is the last; a client's non-ASCII entry before it
        // does not hide it.
        let r = with(&[b"\xff\xfe, 203.0.113.5", b"198.51.100.3"]);
        assert_eq!(client_address(&r, peer, true), ip("198.51.100.3"));
        let r = with(&[b"\xff, 198.51.100.4"]);
        assert_eq!(client_address(&r, peer, true), ip("198.51.100.4"));
        let r = with(&[b"198.51.100.5:4711"]);
        assert_eq!(client_address(&r, peer, true), ip("198.51.100.5"));
        let r = with(&[b"[2001:db8::7]:4711"]);
        assert_eq!(client_address(&r, peer, true), ip("2001:db8::7"));
        let r = with(&[b"unknown"]);
        assert_eq!(client_address(&r, peer, true), peer, "unparsable: the peer");
        assert_eq!(client_address(&with(&[]), peer, true), peer);
    }

    #[test]
    fn strips_all_case_variants_and_repeats_then_injects() {
        let mut r = RequestHeader::build("GET", b"/_matrix/client/v3/sync", None).unwrap();
        r.append_header("X-Matrix-User-Id", "@mallory:x").unwrap();
        r.append_header("x-matrix-user-id", "@mallory2:x").unwrap();
        r.append_header("X-MATRIX-DEVICE-ID", "EVIL").unwrap();
        r.append_header("x-remote-user", "m").unwrap();
        r.append_header("Authorization", "Bearer t").unwrap();
        strip(&mut r, &names(), true);
        assert!(r.headers.get("x-matrix-user-id").is_none());
        assert!(r.headers.get("x-matrix-device-id").is_none());
        assert!(r.headers.get("x-remote-user").is_none());
        assert!(r.headers.get("authorization").is_none());
        inject(&mut r, &names(), &alice(), 1_700_000_000).unwrap();
        assert_eq!(r.headers.get_all("x-matrix-user-id").iter().count(), 1);
        assert_eq!(r.headers["x-matrix-user-id"], "@alice:example.org");
        assert_eq!(r.headers["x-matrix-device-id"], "DEV");
        assert_eq!(r.headers["x-matrix-guest"], "false");
        let sig = r.headers["x-matrix-identity-signature"].to_str().unwrap();
        assert_eq!(
            sig,
            signature(
                &[b'k'; 32],
                1_700_000_000,
                "GET",
                "/_matrix/client/v3/sync",
                &alice()
            )
        );
        assert!(sig.starts_with("t=1700000000,v1="));
    }

    #[test]
    fn underscore_spellings_are_stripped_too() {
        let mut r = RequestHeader::build("GET", b"/_matrix/client/v3/sync", None).unwrap();
        r.append_header("X_Matrix_User_Id", "@mallory:x").unwrap();
        r.append_header("x-matrix_user-id", "@mallory:x").unwrap();
        r.append_header("X_MATRIX_GUEST", "false").unwrap();
        r.append_header("x_remote_user", "m").unwrap();
        r.append_header("x-matrix-user-idx", "kept").unwrap();
        strip(&mut r, &names(), true);
        let left: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-matrix-user-idx"]);
    }

    #[test]
    fn masquerade_sends_the_as_token_and_device_tokens_their_own() {
        let mut r = RequestHeader::build("GET", b"/_matrix/client/v3/sync?since=1", None).unwrap();
        bind(
            &mut r,
            &Credential::Masquerade,
            Some(&Secret::new("as-token")),
        )
        .unwrap();
        assert_eq!(r.headers["authorization"], "Bearer as-token");
        assert_eq!(r.raw_path(), b"/_matrix/client/v3/sync?since=1");
        let device = Credential::DeviceToken("dev-token".into());
        bind(&mut r, &device, Some(&Secret::new("as-token"))).unwrap();
        assert_eq!(r.headers["authorization"], "Bearer dev-token");
    }

    #[test]
    fn federation_keeps_its_authorization() {
        let mut r = RequestHeader::build("GET", b"/_matrix/federation/v1/version", None).unwrap();
        r.append_header("Authorization", "X-Matrix origin=a")
            .unwrap();
        strip(&mut r, &names(), false);
        assert_eq!(r.headers["authorization"], "X-Matrix origin=a");
    }

    /// The vector published in docs/identity-headers.md (computed independently, with Python's
    /// `hmac`), read from the document itself so the two cannot drift apart.
    #[test]
    fn signature_matches_the_documented_known_answer_vector() {
        let doc = include_str!("../../docs/identity-headers.md");
        let field = |name: &str| {
            doc.lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
                .unwrap_or_else(|| panic!("{name} missing from the vector"))
                .to_owned()
        };
        let identity: Identity = IdentityParts {
            user_id: field("user id "),
            device_id: Some(field("device id ")),
            scope: field("scope "),
            access: if field("guest ") == "true" {
                Access::Guest
            } else {
                Access::Full
            },
            subject: field("sub "),
            ..alice_parts()
        }
        .into();
        let t: u64 = field("t ").parse().unwrap();
        let header = signature(
            field("secret ").as_bytes(),
            t,
            &field("method "),
            &field("target "),
            &identity,
        );
        assert_eq!(header, field("header "));
    }

    #[test]
    fn signature_depends_on_every_field() {
        let base = signature(b"key", 1, "GET", "/a", &alice());
        let other = alice().edited(|p| p.device_id = Some("OTHER".into()));
        assert_ne!(base, signature(b"key", 1, "GET", "/a", &other));
        assert_ne!(base, signature(b"key", 1, "GET", "/b", &alice()));
        assert_ne!(base, signature(b"key", 2, "GET", "/a", &alice()));
        assert_ne!(base, signature(b"yek", 1, "GET", "/a", &alice()));
    }
}

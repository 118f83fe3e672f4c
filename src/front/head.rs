//! The request head: parsed once, and judged relayable by the driver or not.
//!
//! The driver relays a request itself only when nothing about its framing needs Pingora's
//! HTTP/1 machinery: HTTP/1.1, `GET`, `HEAD` or `DELETE`, no body (no `Content-Length`, no
//! `Transfer-Encoding`), no `Expect`, `Upgrade`, `TE`, `Trailer`, `Keep-Alive` or
//! `Proxy-Connection`, a `Connection` header that says only `keep-alive` or `close`, at most one
//! `Host`, an origin-form target, and a route the gateway proxies without rewriting its answer
//! (not a preflight, not a served endpoint, not `/versions`, `/capabilities` or the
//! cross-signing upload). Everything else, including a head `httparse` cannot read, goes to
//! Pingora's proxy with the bytes read so far, which answers it as before.

use http::{HeaderName, HeaderValue, Method};
use pingora::http::RequestHeader;

use crate::gateway::classify::{self, RouteClass, Special};

/// The largest head the driver waits for; a longer one goes to Pingora (which has its own,
/// larger limit and answers 400 past it).
pub const MAX_HEAD: usize = 32 * 1024;

/// More headers than this go to Pingora.
const MAX_HEADERS: usize = 100;

/// What the bytes read so far hold.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Incomplete,
    /// A head the driver relays, and its length in bytes.
    Relay(Box<Request>, usize),
    /// Pingora's proxy serves this request.
    Other,
}

/// A request the driver relays.
#[derive(Debug)]
pub struct Request {
    /// The head as Pingora would have parsed it (the `Connection` header removed).
    pub header: RequestHeader,
    /// Its classification (`classify::classify` of the head, done once).
    pub class: RouteClass,
    /// Its extra handling (`Special::None` or `Special::JoinedMembers`).
    pub special: Special,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Parses the head at the start of `buf` and decides who serves it.
pub fn parse(buf: &[u8], options: classify::Options<'_>) -> Parsed {
    // Slots the parser fills, not initialised first (3 KiB a request otherwise).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(_) => return Parsed::Other,
    };
    match relayable(&req, options) {
        Some(request) => Parsed::Relay(Box::new(request), len),
        None => Parsed::Other,
    }
}

fn relayable(req: &httparse::Request<'_, '_>, options: classify::Options<'_>) -> Option<Request> {
    if req.version != Some(1) {
        return None;
    }
    let method = match req.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "DELETE" => Method::DELETE,
        _ => return None,
    };
    let path = req.path?;
    if !path.starts_with('/') {
        return None;
    }
    // Room for what the gateway adds (request ID, identity, forwarding headers), so that the
    // map does not grow while they go in.
    let mut header = RequestHeader::build_no_case(
        method,
        path.as_bytes(),
        Some(req.headers.len() + ADDED_HEADERS),
    )
    .ok()?;
    // What is classified (here and by `admit`) and forwarded is the head's `raw_path`: it must
    // be the client's bytes exactly (a URI parser drops a `#fragment`, for one).
    if header.raw_path() != path.as_bytes() {
        return None;
    }
    let route = classify::classify(&header.method, header.raw_path(), options).ok()?;
    let (class, special) = (route.class, route.special);
    let proxied = matches!(
        class,
        RouteClass::Public
            | RouteClass::Authenticated
            | RouteClass::Federation
            | RouteClass::Refused(_)
    );
    if !proxied || !matches!(special, Special::None | Special::JoinedMembers) {
        return None;
    }
    let mut close = false;
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
            continue;
        }
        if [
            "content-length",
            "transfer-encoding",
            "expect",
            "upgrade",
            "te",
            "trailer",
            "keep-alive",
            "proxy-connection",
        ]
        .into_iter()
        .any(is)
        {
            return None;
        }
        if is("host") {
            hosts += 1;
            if hosts > 1 {
                return None;
            }
        }
        if DROPPED.into_iter().any(is) {
            // Hop-by-hop: Pingora's proxy does not forward them either.
            continue;
        }
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        header.append_header(name, value).ok()?;
    }
    // Pingora's own authority checks (userinfo in `Host`, for one): a head that fails them is
    // Pingora's to refuse.
    pingora::protocols::http::authority::validate_request_authority(&header).ok()?;
    Some(Request {
        class,
        special,
        header,
        close,
    })
}

/// About how many headers the gateway adds to a relayed request.
const ADDED_HEADERS: usize = 10;

/// Request headers that are not forwarded (as on Pingora's path).
const DROPPED: [&str; 3] = [
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> classify::Options<'static> {
        classify::Options {
            backchannel_logout_path: "/_matrix/gateway/backchannel_logout",
            ..Default::default()
        }
    }

    fn relayed(head: &str) -> Option<Request> {
        match parse(head.as_bytes(), options()) {
            Parsed::Relay(r, len) => {
                assert_eq!(len, head.len());
                Some(*r)
            }
            Parsed::Other => None,
            Parsed::Incomplete => panic!("incomplete: {head:?}"),
        }
    }

    const SYNC: &str =
        "GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer t\r\n";

    #[test]
    fn a_plain_authenticated_request_is_relayed_with_every_header() {
        let r = relayed(&format!("{SYNC}X-Custom: 1\r\nx-custom: 2\r\n\r\n")).unwrap();
        assert_eq!(r.header.method, Method::GET);
        assert_eq!(r.header.raw_path(), b"/_matrix/client/v3/sync");
        assert_eq!(r.header.headers.get_all("x-custom").iter().count(), 2);
        assert_eq!(r.header.headers["authorization"], "Bearer t");
        assert!(!r.close);
    }

    #[test]
    fn connection_close_is_taken_and_the_header_dropped() {
        let r = relayed(&format!("{SYNC}Connection: close\r\n\r\n")).unwrap();
        assert!(r.close);
        assert!(r.header.headers.get("connection").is_none());
        let r = relayed(&format!("{SYNC}Connection: Keep-Alive\r\n\r\n")).unwrap();
        assert!(!r.close);
    }

    #[test]
    fn proxy_credentials_are_not_forwarded() {
        let r = relayed(&format!(
            "{SYNC}Proxy-Authorization: Basic eDp5\r\nHTTP2-Settings: AAA\r\nProxy-Authenticate: x\r\n\r\n"
        ))
        .unwrap();
        for h in DROPPED {
            assert!(r.header.headers.get(h).is_none(), "{h}");
        }
    }

    #[test]
    fn anything_with_a_body_or_a_protocol_change_goes_to_pingora() {
        for extra in [
            "Content-Length: 0",
            "Transfer-Encoding: chunked",
            "content-length: 5",
            "Expect: 100-continue",
            "Upgrade: websocket",
            "Connection: upgrade",
            "Connection: keep-alive, x-foo",
            "TE: trailers",
            "Trailer: x",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
            "Host: other",
            "Host: user@hs",
        ] {
            assert!(
                relayed(&format!("{SYNC}{extra}\r\n\r\n")).is_none(),
                "{extra}"
            );
        }
    }

    #[test]
    fn only_bodiless_http11_requests_on_proxied_routes_are_relayed() {
        for head in [
            "POST /_matrix/client/v3/sync HTTP/1.1\r\n\r\n",
            "PUT /_matrix/client/v3/rooms/x/send/m/1 HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/sync HTTP/1.0\r\n\r\n",
            "OPTIONS /_matrix/client/v3/sync HTTP/1.1\r\n\r\n",
            "GET http://hs/_matrix/client/v3/sync HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/versions HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/capabilities HTTP/1.1\r\n\r\n",
            "GET /.well-known/matrix/client HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v1/auth_metadata HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/sync HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /_matrix/client/v3/login#/../sync HTTP/1.1\r\n\r\n",
        ] {
            assert!(relayed(head).is_none(), "{head}");
        }
        for head in [
            "HEAD /_matrix/client/v3/sync HTTP/1.1\r\n\r\n",
            "DELETE /_matrix/client/v3/devices/X HTTP/1.1\r\n\r\n",
            "GET /_matrix/federation/v1/version HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/login HTTP/1.1\r\n\r\n",
            "GET /_synapse/admin/v1/users HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/rooms/!r:hs/joined_members HTTP/1.1\r\n\r\n",
        ] {
            assert!(relayed(head).is_some(), "{head}");
        }
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        assert!(matches!(
            parse(SYNC.as_bytes(), options()),
            Parsed::Incomplete
        ));
    }
}

//! Route classification (request_filter, step 1): which rules apply to a request target.
//!
//! The table below is *the* documented list (mirrored in `docs/routes.md`). Classification
//! works on the exact bytes that are forwarded (the raw path up to the first `?`), never on a
//! decoded or normalised copy, and treats the client API version segment as a wildcard over
//! every prefix a homeserver routes (`r0`, `v1`, `v3`, any `vN`, `unstable`, `api/v1`), so a
//! spelling the homeserver routes to an endpoint is classified as that endpoint.
//! `HEAD` is classified as `GET`. Anything not listed needs a token: the safe default.

use http::Method;

use crate::config::GuestEndpoints;
use crate::error::{GatewayError, Refused};

/// What the gateway does with a request before proxying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// A CORS preflight (`OPTIONS`): answered by the gateway, no token.
    Preflight,
    /// Server-server API (`/_matrix/federation`, `/_matrix/key`): passed through untouched,
    /// including its `Authorization: X-Matrix` header.
    Federation,
    /// A client route that needs no token; a token that is present is still verified.
    Public,
    /// A client route that needs a verified token.
    Authenticated,
    /// An endpoint the gateway refuses (owned by the OP, appservice-only, admin API).
    Refused(Refused),
    /// An endpoint the gateway answers itself (OAuth discovery).
    Served(Served),
}

/// Endpoints the gateway answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A discovery document (MSC2965, `/.well-known/matrix/client`).
    Discovery(Document),
    /// `POST <notifications.backchannel_logout_path>` (OIDC Back-Channel Logout).
    BackchannelLogout,
    /// `POST <notifications.revocation_path>` (RFC 7009, forwarded to the OP).
    Revocation,
    /// Legacy login (`[compat]` on).
    Compat(CompatRoute),
}

/// The legacy-login endpoints (MSC3824 compatibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompatRoute {
    /// `GET /login`: the flows.
    Flows,
    /// `POST /login`: `m.login.token`.
    Login,
    /// `GET /login/sso/redirect[/{idp}]`: starts the sign-in at the OP.
    SsoRedirect,
    /// `GET /_matrix/gateway/compat/callback`: the OP sends the browser back.
    Callback,
    /// `POST /logout`.
    Logout,
    /// `POST /logout/all`: every compat session of the user.
    LogoutAll,
    /// `POST /refresh`.
    Refresh,
}

/// Discovery documents the gateway serves, built from the OP's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// `GET /_matrix/client/v1/auth_metadata` and the unstable `org.matrix.msc2965/auth_metadata`.
    AuthMetadata,
    /// `GET /_matrix/client/unstable/org.matrix.msc2965/auth_issuer`.
    AuthIssuer,
    /// `GET /.well-known/matrix/client`.
    WellKnownClient,
}

/// Proxied endpoints that need extra handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// Nothing special.
    None,
    /// `/versions`: the answer gains the OAuth unstable features.
    Versions,
    /// `/capabilities`: password, 3PID and login-token capabilities are disabled in the answer.
    Capabilities,
    /// `POST keys/device_signing/upload`: replacing a master key needs approval at the OP.
    CrossSigningUpload,
    /// `GET rooms/{room}/joined_members`: Synapse skips its membership check for appservice
    /// requests, so with `appservice_masquerade` the gateway checks membership first.
    JoinedMembers,
}

/// Settings that change classification.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// Let homeserver admin APIs through.
    pub expose_admin_api: bool,
    /// Path of the back-channel logout endpoint (`POST`).
    pub backchannel_logout_path: &'a str,
    /// Path of the revocation proxy (`POST`), when enabled.
    pub revocation_path: Option<&'a str>,
    /// Serve the legacy-login endpoints.
    pub compat: bool,
}

impl<'a> Options<'a> {
    /// The options a configuration asks for.
    pub fn of(config: &'a crate::config::Config) -> Self {
        let n = &config.notifications;
        Options {
            expose_admin_api: config.homeserver.expose_admin_api,
            backchannel_logout_path: &n.backchannel_logout_path,
            revocation_path: n.revocation_proxy.then_some(n.revocation_path.as_str()),
            compat: config.compat.is_some(),
        }
    }
}

impl RouteClass {
    /// Label for logs and metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            RouteClass::Preflight => "preflight",
            RouteClass::Federation => "federation",
            RouteClass::Public => "public",
            RouteClass::Authenticated => "authenticated",
            RouteClass::Refused(_) => "refused",
            RouteClass::Served(_) => "served",
        }
    }
}

/// A classified request target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// The class.
    pub class: RouteClass,
    /// The method as classified (`HEAD` → `GET`).
    pub method: &'a str,
    /// The path: the raw target up to the first `?`.
    pub path: &'a str,
    /// Extra handling of a proxied endpoint.
    pub special: Special,
}

/// Client-server endpoints the gateway refuses, relative to `/_matrix/client/<version>/`:
/// the set Synapse disables under MSC3861 (checklist §3.5) and the sibling routes real
/// homeservers serve the same capabilities on. `*` as the method means every method.
const REFUSED_CLIENT: &[(&str, &str, Refused)] = &[
    ("*", "login", Refused::OwnedByOp),
    ("*", "login/**", Refused::OwnedByOp),
    ("*", "logout", Refused::OwnedByOp),
    ("*", "logout/all", Refused::OwnedByOp),
    ("*", "refresh", Refused::OwnedByOp),
    ("*", "register", Refused::Registration),
    ("*", "register/**", Refused::OwnedByOp),
    ("*", "account/password", Refused::OwnedByOp),
    ("*", "account/password/**", Refused::OwnedByOp),
    ("*", "account/deactivate", Refused::OwnedByOp),
    ("POST", "account/3pid", Refused::OwnedByOp),
    ("*", "account/3pid/add", Refused::OwnedByOp),
    ("*", "account/3pid/delete", Refused::OwnedByOp),
    ("*", "account/3pid/email/requestToken", Refused::OwnedByOp),
    ("*", "account/3pid/msisdn/requestToken", Refused::OwnedByOp),
    ("*", "delete_devices", Refused::OwnedByOp),
    ("DELETE", "devices/*", Refused::OwnedByOp),
    ("*", "user/*/openid/request_token", Refused::OwnedByOp),
    ("*", "appservice/*/ping", Refused::AppserviceOnly),
    (
        "PUT",
        "directory/list/appservice/*/*",
        Refused::AppserviceOnly,
    ),
];

/// Homeserver admin APIs, refused unless `homeserver.expose_admin_api`.
const ADMIN_PREFIXES: &[&str] = &[
    "/_synapse/admin/",
    "/_dendrite/admin/",
    "/_synapse/mas/",
    "/_conduwuit/",
    "/_continuwuity/",
];

/// Client-server endpoints that need no token, relative to `/_matrix/client/<version>/`.
/// `*` is one path segment, `**` one or more.
const PUBLIC_CLIENT: &[(&str, &str)] = &[
    ("GET", "auth/*/fallback/web"),
    ("POST", "auth/*/fallback/web"),
    ("GET", "publicRooms"),
    ("GET", "profile/*"),
    ("GET", "profile/*/*"),
    ("GET", "directory/room/*"),
    ("GET", "room_summary/*"),
    ("GET", "im.nheko.summary/summary/*"),
    ("GET", "im.nheko.summary/rooms/*/summary"),
];

/// The Matrix spec's guest endpoint list (client-server API "Guest access"), relative to
/// `/_matrix/client/<version>/`.
const GUEST_SPEC: &[(&str, &str)] = &[
    ("GET", "rooms/*/state"),
    ("GET", "rooms/*/context/*"),
    ("GET", "rooms/*/event/*"),
    ("GET", "rooms/*/state/*"),
    ("GET", "rooms/*/state/*/*"),
    ("GET", "rooms/*/messages"),
    ("GET", "rooms/*/members"),
    ("GET", "rooms/*/initialSync"),
    ("GET", "sync"),
    ("GET", "events"),
    ("GET", "media/download/*/*"),
    ("GET", "media/download/*/*/*"),
    ("GET", "media/thumbnail/*/*"),
    ("POST", "rooms/*/join"),
    ("POST", "rooms/*/leave"),
    ("PUT", "rooms/*/send/*/*"),
    ("PUT", "rooms/*/state/*"),
    ("PUT", "rooms/*/state/*/*"),
    ("PUT", "sendToDevice/*/*"),
    ("PUT", "profile/*/displayname"),
    ("DELETE", "profile/*/displayname"),
    ("GET", "devices"),
    ("GET", "devices/*"),
    ("PUT", "devices/*"),
    ("GET", "account/whoami"),
    ("POST", "keys/upload"),
    ("POST", "keys/query"),
    ("POST", "keys/claim"),
];

/// What Synapse also lets guests call (`allow_guest=True` in its REST servlets).
const GUEST_SYNAPSE_EXTRA: &[(&str, &str)] = &[
    ("GET", "capabilities"),
    ("GET", "keys/changes"),
    ("POST", "keys/signatures/upload"),
    ("POST", "org.matrix.msc3983/keys/claim"),
    ("GET", "rooms/*/relations/**"),
    ("POST", "join/*"),
    ("GET", "publicRooms"),
    ("POST", "publicRooms"),
    ("GET", "joined_rooms"),
    ("GET", "rooms/*/hierarchy"),
    ("GET", "room_summary/*"),
    ("POST", "rooms/*/send/*"),
    ("POST", "rooms/*/send/*/*"),
    ("POST", "rooms/*/invite"),
    ("POST", "rooms/*/kick"),
    ("POST", "rooms/*/ban"),
    ("POST", "rooms/*/unban"),
    ("POST", "rooms/*/forget"),
    ("POST", "org.matrix.simplified_msc3575/sync"),
    ("GET", "thirdparty/protocols"),
    ("GET", "thirdparty/protocol/*"),
    ("GET", "thirdparty/user"),
    ("GET", "thirdparty/user/*"),
    ("GET", "thirdparty/location"),
    ("GET", "thirdparty/location/*"),
];

/// The method as classified (`HEAD` → `GET`) and the path (the raw target up to the first
/// `?`) of a request, or why its target is refused: not UTF-8, not origin-form, a fragment.
pub fn target_parts<'a>(
    method: &'a Method,
    raw_target: &'a [u8],
) -> Result<(&'a str, &'a str), GatewayError> {
    let target = std::str::from_utf8(raw_target).map_err(|_| GatewayError::BadRequestTarget)?;
    if !target.starts_with('/') || target.contains('#') {
        return Err(GatewayError::BadRequestTarget);
    }
    let path = target.split('?').next().unwrap_or_default();
    let method = match *method {
        Method::HEAD => "GET",
        ref m => m.as_str(),
    };
    Ok((method, path))
}

/// Classifies a request. `raw_target` is the request target exactly as it will be forwarded.
pub fn classify<'a>(
    method: &'a Method,
    raw_target: &'a [u8],
    options: Options<'_>,
) -> Result<Route<'a>, GatewayError> {
    let (method, path) = target_parts(method, raw_target)?;
    let endpoint = client_endpoint(path);
    let mut special = Special::None;
    let class = if path.starts_with("/_matrix/federation/") || path.starts_with("/_matrix/key/") {
        RouteClass::Federation
    } else if !options.expose_admin_api && ADMIN_PREFIXES.iter().any(|p| path.starts_with(p)) {
        RouteClass::Refused(Refused::AdminApi)
    } else if method == "OPTIONS" {
        RouteClass::Preflight
    } else if method == "POST" && path == options.backchannel_logout_path {
        RouteClass::Served(Served::BackchannelLogout)
    } else if method == "POST" && Some(path) == options.revocation_path {
        RouteClass::Served(Served::Revocation)
    } else if let Some(route) = options
        .compat
        .then(|| compat_route(method, path, endpoint))
        .flatten()
    {
        RouteClass::Served(Served::Compat(route))
    } else if let Some(refused) = endpoint.and_then(|e| refused(method, e)) {
        RouteClass::Refused(refused)
    } else if path.starts_with("/_matrix/static/client/login") {
        RouteClass::Refused(Refused::OwnedByOp)
    } else if method == "GET" && path == "/.well-known/matrix/client" {
        RouteClass::Served(Served::Discovery(Document::WellKnownClient))
    } else if let Some(served) = endpoint.and_then(|e| served(method, e)) {
        RouteClass::Served(served)
    } else if path == "/_matrix/client/versions" {
        special = Special::Versions;
        RouteClass::Public
    } else if path.starts_with("/.well-known/matrix/")
        || path.starts_with("/_matrix/static/")
        || is_public_media(method, path)
        || endpoint.is_some_and(|e| listed(PUBLIC_CLIENT, method, e))
    {
        RouteClass::Public
    } else {
        special = match endpoint {
            Some("capabilities") if method == "GET" => Special::Capabilities,
            Some("keys/device_signing/upload") if method == "POST" => Special::CrossSigningUpload,
            Some(e) if method == "GET" && joined_members_room(e).is_some() => {
                Special::JoinedMembers
            }
            _ => Special::None,
        };
        RouteClass::Authenticated
    };
    Ok(Route {
        class,
        method,
        path,
        special,
    })
}

/// Why `endpoint` is refused, if it is: as written, or under an unstable namespace
/// (`org.matrix.msc3882/login/token`, `org.matrix.msc2918/refresh`): homeservers built on
/// ruma serve every spelling an endpoint ever had, and Synapse still serves some of them.
fn refused(method: &str, endpoint: &str) -> Option<Refused> {
    let listed = |endpoint: &str| {
        REFUSED_CLIENT
            .iter()
            .find(|(m, pattern, _)| (*m == "*" || *m == method) && matches(pattern, endpoint))
            .map(|(_, _, r)| *r)
    };
    listed(endpoint).or_else(|| {
        // A namespace is a first segment with a dot: no stable endpoint has one.
        let (namespace, rest) = endpoint.split_once('/')?;
        if !namespace.contains('.') {
            return None;
        }
        listed(rest)
    })
}

fn compat_route(method: &str, path: &str, endpoint: Option<&str>) -> Option<CompatRoute> {
    if path == crate::compat::CALLBACK_PATH {
        return (method == "GET").then_some(CompatRoute::Callback);
    }
    Some(match (method, endpoint?) {
        ("GET", "login") => CompatRoute::Flows,
        ("POST", "login") => CompatRoute::Login,
        ("GET", "login/sso/redirect") => CompatRoute::SsoRedirect,
        ("GET", e)
            if e.strip_prefix("login/sso/redirect/")
                .is_some_and(|idp| !idp.is_empty() && !idp.contains('/')) =>
        {
            CompatRoute::SsoRedirect
        }
        ("POST", "logout") => CompatRoute::Logout,
        ("POST", "logout/all") => CompatRoute::LogoutAll,
        ("POST", "refresh") => CompatRoute::Refresh,
        _ => return None,
    })
}

fn served(method: &str, endpoint: &str) -> Option<Served> {
    match (method, endpoint) {
        ("GET", "auth_metadata" | "org.matrix.msc2965/auth_metadata") => {
            Some(Served::Discovery(Document::AuthMetadata))
        }
        ("GET", "org.matrix.msc2965/auth_issuer") => Some(Served::Discovery(Document::AuthIssuer)),
        _ => None,
    }
}

/// Whether a guest-scoped token may call this route. `upstream_sees_guests`: the homeserver
/// is told that the caller is a guest (the `headers` binding) and applies its own guest
/// rules. Through an appservice binding it sees an ordinary user, so the rules it keeps for
/// guests (a room's `m.room.guest_access`, no invites, kicks or bans) cannot apply: the
/// gateway then keeps guests out of every membership change but leaving.
pub fn guest_allowed(route: &Route<'_>, list: GuestEndpoints, upstream_sees_guests: bool) -> bool {
    if route.class != RouteClass::Authenticated {
        return true;
    }
    let Some(endpoint) = client_endpoint(route.path) else {
        return false;
    };
    let listed = listed(GUEST_SPEC, route.method, endpoint)
        || (list == GuestEndpoints::Synapse && listed(GUEST_SYNAPSE_EXTRA, route.method, endpoint));
    listed && (upstream_sees_guests || !changes_membership(route.method, endpoint))
}

/// Room-membership changes other than leaving: a join (`rooms/*/join`, `join/*`), an invite,
/// kick, ban or unban, or an `m.room.member` state event written directly. An event type the
/// homeserver would percent-decode counts as a membership event (fail closed).
fn changes_membership(method: &str, endpoint: &str) -> bool {
    const MEMBERSHIP_POSTS: &[&str] = &[
        "rooms/*/join",
        "join/*",
        "rooms/*/invite",
        "rooms/*/kick",
        "rooms/*/ban",
        "rooms/*/unban",
    ];
    match method {
        "POST" => MEMBERSHIP_POSTS.iter().any(|p| matches(p, endpoint)),
        "PUT" if matches("rooms/*/state/**", endpoint) => endpoint
            .split('/')
            .nth(3)
            .is_some_and(|kind| kind == "m.room.member" || kind.contains('%')),
        _ => false,
    }
}

/// The endpoint part of a client-server path: `/_matrix/client/<version>/<endpoint>`.
/// The room segment (raw, as forwarded) of a `rooms/{room}/joined_members` endpoint.
pub fn joined_members_room(endpoint: &str) -> Option<&str> {
    let room = endpoint
        .strip_prefix("rooms/")?
        .strip_suffix("/joined_members")?;
    (!room.is_empty() && !room.contains('/')).then_some(room)
}

/// The endpoint of a client-server path, relative to `/_matrix/client/<version>/`.
pub fn client_endpoint(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/_matrix/client/")?;
    if let Some(e) = rest.strip_prefix("api/v1/") {
        return Some(e);
    }
    let (version, endpoint) = rest.split_once('/')?;
    is_version(version).then_some(endpoint)
}

fn is_version(seg: &str) -> bool {
    seg == "r0"
        || seg == "unstable"
        || seg
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Legacy unauthenticated media: `GET /_matrix/media/<version>/{download,thumbnail}/…`.
fn is_public_media(method: &str, path: &str) -> bool {
    if method != "GET" {
        return false;
    }
    let Some(rest) = path.strip_prefix("/_matrix/media/") else {
        return false;
    };
    let Some((version, endpoint)) = rest.split_once('/') else {
        return false;
    };
    is_version(version)
        && (matches("download/*/**", endpoint) || matches("thumbnail/*/*", endpoint))
}

fn listed(table: &[(&str, &str)], method: &str, endpoint: &str) -> bool {
    table
        .iter()
        .any(|(m, pattern)| *m == method && matches(pattern, endpoint))
}

/// Segment-wise match: `*` is exactly one segment (possibly empty), `**` one or more. (On
/// bytes: this runs for every table entry of every request.)
fn matches(pattern: &str, path: &str) -> bool {
    let (mut pat, mut segs) = (pattern.as_bytes(), path.as_bytes());
    loop {
        let (p, pat_rest) = segment(pat);
        let (s, segs_rest) = segment(segs);
        match p {
            b"**" => return true,
            b"*" => {}
            p if p == s => {}
            _ => return false,
        }
        match (pat_rest, segs_rest) {
            (None, None) => return true,
            (Some(p), Some(s)) => (pat, segs) = (p, s),
            _ => return false,
        }
    }
}

/// The first `/`-separated segment of `b`, and what follows its `/` if there is one.
fn segment(b: &[u8]) -> (&[u8], Option<&[u8]>) {
    match b.iter().position(|&c| c == b'/') {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_matching() {
        let yes = [
            ("a/b", "a/b"),
            ("a/*", "a/"),
            ("a/*", "a/x"),
            ("a/**", "a/x/y/z"),
            ("a/**", "a/"),
            ("*/b", "/b"),
            ("*", ""),
            ("", ""),
        ];
        let no = [
            ("a/b", "a/b/"),
            ("a/b", "a"),
            ("a/*", "a"),
            ("a/*", "a/x/y"),
            ("a/**", "a"),
            ("a/b", "a/c"),
            ("a", "ab"),
            ("ab", "a"),
            ("", "/"),
        ];
        for (p, s) in yes {
            assert!(matches(p, s), "{p} ~ {s}");
        }
        for (p, s) in no {
            assert!(!matches(p, s), "{p} !~ {s}");
        }
    }

    fn class(method: Method, target: &str) -> RouteClass {
        classify(&method, target.as_bytes(), Options::default())
            .unwrap()
            .class
    }

    #[test]
    fn version_segment_is_a_wildcard() {
        for v in ["r0", "v1", "v3", "v4", "unstable", "api/v1"] {
            assert_eq!(
                class(Method::POST, &format!("/_matrix/client/{v}/login")),
                RouteClass::Refused(Refused::OwnedByOp)
            );
            assert_eq!(
                class(Method::GET, &format!("/_matrix/client/{v}/publicRooms")),
                RouteClass::Public
            );
            assert_eq!(
                class(Method::GET, &format!("/_matrix/client/{v}/sync")),
                RouteClass::Authenticated
            );
        }
    }

    #[test]
    fn head_is_get() {
        assert_eq!(
            class(Method::HEAD, "/_matrix/client/v3/publicRooms"),
            RouteClass::Public
        );
        let r = classify(
            &Method::HEAD,
            b"/_matrix/client/v3/sync",
            Options::default(),
        )
        .unwrap();
        assert_eq!(r.method, "GET");
    }

    #[test]
    fn path_ends_at_first_question_mark() {
        assert_eq!(
            class(Method::GET, "/_matrix/client/v3/login?/../sync"),
            RouteClass::Refused(Refused::OwnedByOp)
        );
        assert_eq!(
            class(Method::GET, "/_matrix/client/v3/publicRooms?/../sync"),
            RouteClass::Public
        );
        assert_eq!(
            class(Method::GET, "/_matrix/client/v3/sync??x"),
            RouteClass::Authenticated
        );
    }

    #[test]
    fn non_origin_form_and_fragments_are_refused() {
        for t in [
            "http://h/_matrix/client/v3/register",
            "*",
            "_matrix/client/v3/sync",
            "/a#b",
        ] {
            assert_eq!(
                classify(&Method::GET, t.as_bytes(), Options::default()),
                Err(GatewayError::BadRequestTarget),
                "{t}"
            );
        }
        assert_eq!(
            classify(&Method::GET, b"/\xff", Options::default()),
            Err(GatewayError::BadRequestTarget)
        );
    }

    #[test]
    fn public_table() {
        assert_eq!(
            class(Method::GET, "/_matrix/client/versions"),
            RouteClass::Public
        );
        assert_eq!(
            class(Method::GET, "/.well-known/matrix/server"),
            RouteClass::Public
        );
        assert_eq!(
            class(Method::GET, "/_matrix/media/v3/download/s/m"),
            RouteClass::Public
        );
        assert_eq!(
            class(Method::GET, "/_matrix/media/r0/thumbnail/s/m"),
            RouteClass::Public
        );
        assert_eq!(
            class(Method::POST, "/_matrix/media/v3/upload"),
            RouteClass::Authenticated
        );
        assert_eq!(
            class(Method::GET, "/_matrix/media/v3/config"),
            RouteClass::Authenticated
        );
        assert_eq!(
            class(Method::GET, "/_matrix/client/v3/profile/@a:b"),
            RouteClass::Public
        );
        assert_eq!(
            class(Method::PUT, "/_matrix/client/v3/profile/@a:b/displayname"),
            RouteClass::Authenticated
        );
        assert_eq!(
            class(Method::POST, "/_matrix/client/v3/publicRooms"),
            RouteClass::Authenticated
        );
    }

    #[test]
    fn federation_and_preflight() {
        assert_eq!(
            class(Method::PUT, "/_matrix/federation/v1/send/1"),
            RouteClass::Federation
        );
        assert_eq!(
            class(Method::GET, "/_matrix/key/v2/server"),
            RouteClass::Federation
        );
        assert_eq!(
            class(Method::OPTIONS, "/_matrix/client/v3/sync"),
            RouteClass::Preflight
        );
    }

    #[test]
    fn non_canonical_spellings_need_a_token() {
        // Homeservers route none of these; the gateway must not treat them as public either.
        for t in [
            "/_matrix/client/v3/PUBLICROOMS",
            "/_matrix/client/v3//publicRooms",
            "/_matrix/client/v3/publicRooms/",
            "/_matrix/client/v3/%70ublicRooms",
            "/_matrix/client/v3/./publicRooms",
            "/_matrix/client/v3/publicRooms;x=y",
            "/_matrix/client/V3/publicRooms",
            "/",
        ] {
            assert_eq!(class(Method::GET, t), RouteClass::Authenticated, "{t}");
        }
    }

    #[test]
    fn guest_lists() {
        let ok = |m: Method, p: &str, l| {
            guest_allowed(
                &classify(&m, p.as_bytes(), Options::default()).unwrap(),
                l,
                true,
            )
        };
        use GuestEndpoints::*;
        assert!(ok(Method::GET, "/_matrix/client/v3/sync", Spec));
        assert!(ok(Method::HEAD, "/_matrix/client/r0/sync", Spec));
        assert!(ok(
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1",
            Spec
        ));
        assert!(ok(
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:x/state/m.room.name/",
            Spec
        ));
        assert!(ok(
            Method::GET,
            "/_matrix/client/v1/media/download/s/m",
            Spec
        ));
        assert!(ok(Method::GET, "/_matrix/client/v3/account/whoami", Spec));
        assert!(!ok(Method::POST, "/_matrix/client/v3/createRoom", Spec));
        assert!(!ok(Method::POST, "/_matrix/client/v3/createRoom", Synapse));
        assert!(!ok(Method::GET, "/_matrix/client/v3/capabilities", Spec));
        assert!(ok(Method::GET, "/_matrix/client/v3/capabilities", Synapse));
        assert!(ok(
            Method::GET,
            "/_matrix/client/v1/rooms/!r/relations/$e/m.thread",
            Synapse
        ));
        assert!(!ok(
            Method::POST,
            "/_matrix/client/v3/keys/device_signing/upload",
            Synapse
        ));
        // public routes are fine for guests
        assert!(ok(Method::GET, "/_matrix/client/versions", Spec));
    }

    #[test]
    fn unstable_namespaced_spellings_of_refused_endpoints_are_refused() {
        // Login tokens (MSC3882), refresh (MSC2918) and registration-token validity (MSC3231)
        // under their unstable namespaces: Synapse and ruma-based homeservers route them.
        for (m, e) in [
            (Method::POST, "org.matrix.msc3882/login/token"),
            (Method::POST, "org.matrix.msc3882/login/get_token"),
            (Method::POST, "org.matrix.msc2918/refresh"),
            (
                Method::GET,
                "org.matrix.msc3231/register/org.matrix.msc3231.login.registration_token/validity",
            ),
            (Method::POST, "com.example.anything/account/password"),
        ] {
            for version in ["unstable", "v1", "v3"] {
                let p = format!("/_matrix/client/{version}/{e}");
                assert_eq!(
                    class(m.clone(), &p),
                    RouteClass::Refused(Refused::OwnedByOp),
                    "{m} {p}"
                );
            }
        }
        // Namespaced endpoints that are not refused ones stay as they were.
        for (m, p, c) in [
            (
                Method::GET,
                "/_matrix/client/unstable/org.matrix.msc2965/auth_issuer",
                RouteClass::Served(Served::Discovery(Document::AuthIssuer)),
            ),
            (
                Method::POST,
                "/_matrix/client/unstable/org.matrix.msc3983/keys/claim",
                RouteClass::Authenticated,
            ),
            (
                Method::GET,
                "/_matrix/client/unstable/im.nheko.summary/summary/!r:x",
                RouteClass::Public,
            ),
            (
                Method::GET,
                "/_matrix/client/unstable/org.matrix.msc3575/sync",
                RouteClass::Authenticated,
            ),
        ] {
            assert_eq!(class(m.clone(), p), c, "{m} {p}");
        }
    }

    #[test]
    fn guests_change_no_membership_but_leaving_when_the_homeserver_cannot_tell_them_apart() {
        // Through an appservice binding a guest reaches the homeserver as an ordinary user,
        // so its guest rules (a room's `m.room.guest_access`) cannot stop a join.
        let ok = |m: Method, e: &str, l, sees: bool| {
            let p = format!("/_matrix/client/v3/{e}");
            guest_allowed(
                &classify(&m, p.as_bytes(), Options::default()).unwrap(),
                l,
                sees,
            )
        };
        use GuestEndpoints::*;
        for (m, e, l) in [
            (Method::POST, "rooms/!r:x/join", Spec),
            (Method::POST, "join/!r:x", Synapse),
            (Method::POST, "join/%23room:x", Synapse),
            (Method::POST, "rooms/!r:x/invite", Synapse),
            (Method::POST, "rooms/!r:x/kick", Synapse),
            (Method::POST, "rooms/!r:x/ban", Synapse),
            (Method::POST, "rooms/!r:x/unban", Synapse),
            (Method::PUT, "rooms/!r:x/state/m.room.member/@g:x", Spec),
            (Method::PUT, "rooms/!r:x/state/m.room.member", Spec),
            (Method::PUT, "rooms/!r:x/state/m.room.member/", Spec),
            (Method::PUT, "rooms/!r:x/state/m%2Eroom.member/@g:x", Spec),
        ] {
            assert!(ok(m.clone(), e, l, true), "{m} {e}: on the list");
            assert!(!ok(m.clone(), e, l, false), "{m} {e}");
        }
        // What changes no membership stays on the list.
        for (m, e) in [
            (Method::POST, "rooms/!r:x/leave"),
            (Method::POST, "rooms/!r:x/forget"),
            (Method::GET, "rooms/!r:x/state/m.room.member/@g:x"),
            (Method::PUT, "rooms/!r:x/state/m.room.name/"),
            (Method::PUT, "rooms/!r:x/send/m.room.member/t1"),
            (Method::GET, "sync"),
        ] {
            assert!(ok(m.clone(), e, Synapse, false), "{m} {e}");
        }
    }

    #[test]
    fn refused_table() {
        use Refused::*;
        let cases = [
            (Method::GET, "/_matrix/client/v3/login", OwnedByOp),
            (Method::HEAD, "/_matrix/client/r0/login", OwnedByOp),
            (
                Method::GET,
                "/_matrix/client/v3/login/sso/redirect/oidc",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v1/login/get_token",
                OwnedByOp,
            ),
            (Method::POST, "/_matrix/client/unstable/logout", OwnedByOp),
            (Method::POST, "/_matrix/client/api/v1/logout/all", OwnedByOp),
            (Method::POST, "/_matrix/client/v3/refresh", OwnedByOp),
            (Method::POST, "/_matrix/client/v3/register", Registration),
            (
                Method::GET,
                "/_matrix/client/v3/register/available",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v3/register/email/requestToken",
                OwnedByOp,
            ),
            (
                Method::GET,
                "/_matrix/client/v1/register/m.login.registration_token/validity",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v3/account/password",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v3/account/password/email/requestToken",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v3/account/deactivate",
                OwnedByOp,
            ),
            (Method::POST, "/_matrix/client/v3/account/3pid", OwnedByOp),
            (
                Method::POST,
                "/_matrix/client/v3/account/3pid/add",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v3/account/3pid/delete",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v3/account/3pid/msisdn/requestToken",
                OwnedByOp,
            ),
            (Method::POST, "/_matrix/client/v3/delete_devices", OwnedByOp),
            (Method::DELETE, "/_matrix/client/v3/devices/ABC", OwnedByOp),
            (
                Method::POST,
                "/_matrix/client/v3/user/@a:b/openid/request_token",
                OwnedByOp,
            ),
            (
                Method::POST,
                "/_matrix/client/v1/appservice/as1/ping",
                AppserviceOnly,
            ),
            (Method::GET, "/_synapse/admin/v1/users/@a:b", AdminApi),
            (Method::POST, "/_dendrite/admin/evacuateUser/@a:b", AdminApi),
            (Method::GET, "/_matrix/static/client/login/", OwnedByOp),
        ];
        for (m, p, r) in cases {
            assert_eq!(class(m.clone(), p), RouteClass::Refused(r), "{m} {p}");
        }
        // what stays
        assert_eq!(
            class(Method::GET, "/_matrix/client/v3/account/3pid"),
            RouteClass::Authenticated
        );
        assert_eq!(
            class(Method::POST, "/_matrix/client/v3/account/3pid/bind"),
            RouteClass::Authenticated
        );
        assert_eq!(
            class(Method::GET, "/_matrix/client/v3/devices"),
            RouteClass::Authenticated
        );
        assert_eq!(
            class(Method::PUT, "/_matrix/client/v3/devices/ABC"),
            RouteClass::Authenticated
        );
        let admin = Options {
            expose_admin_api: true,
            ..Options::default()
        };
        let r = classify(&Method::GET, b"/_synapse/admin/v1/users/@a:b", admin).unwrap();
        assert_eq!(r.class, RouteClass::Authenticated);
    }

    #[test]
    fn served_and_special() {
        assert_eq!(
            class(Method::GET, "/_matrix/client/v1/auth_metadata"),
            RouteClass::Served(Served::Discovery(Document::AuthMetadata))
        );
        assert_eq!(
            class(
                Method::GET,
                "/_matrix/client/unstable/org.matrix.msc2965/auth_metadata"
            ),
            RouteClass::Served(Served::Discovery(Document::AuthMetadata))
        );
        assert_eq!(
            class(
                Method::GET,
                "/_matrix/client/unstable/org.matrix.msc2965/auth_issuer"
            ),
            RouteClass::Served(Served::Discovery(Document::AuthIssuer))
        );
        assert_eq!(
            class(Method::GET, "/.well-known/matrix/client"),
            RouteClass::Served(Served::Discovery(Document::WellKnownClient))
        );
        let special = |m: Method, p: &str| {
            classify(&m, p.as_bytes(), Options::default())
                .unwrap()
                .special
        };
        assert_eq!(
            special(Method::GET, "/_matrix/client/versions"),
            Special::Versions
        );
        assert_eq!(
            special(Method::GET, "/_matrix/client/r0/capabilities"),
            Special::Capabilities
        );
        assert_eq!(
            special(
                Method::POST,
                "/_matrix/client/v3/keys/device_signing/upload"
            ),
            Special::CrossSigningUpload
        );
        assert_eq!(
            special(
                Method::POST,
                "/_matrix/client/unstable/keys/device_signing/upload"
            ),
            Special::CrossSigningUpload
        );
    }

    #[test]
    fn notification_endpoints() {
        let o = Options {
            backchannel_logout_path: "/_gw/bcl",
            revocation_path: Some("/_gw/revoke"),
            ..Options::default()
        };
        let c = |m: Method, p: &str| classify(&m, p.as_bytes(), o).unwrap().class;
        assert_eq!(
            c(Method::POST, "/_gw/bcl"),
            RouteClass::Served(Served::BackchannelLogout)
        );
        assert_eq!(
            c(Method::POST, "/_gw/revoke?x=1"),
            RouteClass::Served(Served::Revocation)
        );
        assert_eq!(c(Method::GET, "/_gw/bcl"), RouteClass::Authenticated);
        assert_eq!(c(Method::OPTIONS, "/_gw/revoke"), RouteClass::Preflight);
        let off = Options {
            revocation_path: None,
            ..o
        };
        assert_eq!(
            classify(&Method::POST, b"/_gw/revoke", off).unwrap().class,
            RouteClass::Authenticated
        );
    }

    #[test]
    fn pattern_matching() {
        assert!(matches("a/*/c", "a/b/c"));
        assert!(matches("a/*/c", "a//c"));
        assert!(!matches("a/*/c", "a/b/c/d"));
        assert!(matches("a/**", "a/b/c"));
        assert!(!matches("a/**", "a"));
    }
}

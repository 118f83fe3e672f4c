//! The typed per-request context shared by every phase of one request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::classify::{RouteClass, Special};
use super::target::Query;
use crate::auth::cache::CacheOutcome;
use crate::auth::{Identity, TokenHash};
use crate::binding::Bound;
use crate::error::GatewayError;

/// How the response body is changed on its way to the client.
#[derive(Debug, Default)]
pub enum BodyEdit {
    /// Passed through as it streams.
    #[default]
    None,
    /// Collected, then rewritten as JSON (`/versions`, `/capabilities`).
    Rewrite(Special, Vec<u8>),
    /// Replaced by this body (a gateway answer in place of the homeserver's).
    Replace(bytes::Bytes),
}

/// How the request body goes to the homeserver.
#[derive(Default)]
pub enum RequestBody {
    /// Streamed as the client sends it.
    #[default]
    Forwarded,
    /// A cross-signing upload the gateway completes with Dendrite's password stage, once
    /// `admit` has passed (`guard::password_stage`).
    PasswordStage,
    /// Replaced by this body, read whole before proxying.
    Replaced(bytes::Bytes),
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBody::Forwarded => f.write_str("Forwarded"),
            RequestBody::PasswordStage => f.write_str("PasswordStage"),
            // It holds a homeserver password.
            RequestBody::Replaced(b) => write!(f, "Replaced(<{} bytes, redacted>)", b.len()),
        }
    }
}

/// State of one request, created by `new_ctx` and read by later phases and `logging`.
/// Which kind of bearer token a request carried (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// None was verified (public and served routes, or no token).
    None,
    /// An OAuth 2.0 access token of the OP.
    OAuth,
    /// A compat access token the gateway issued (legacy login, `[compat]`).
    Compat,
}

impl TokenKind {
    /// Label for metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            TokenKind::None => "none",
            TokenKind::OAuth => "oauth",
            TokenKind::Compat => "compat",
        }
    }
}

#[derive(Debug)]
pub struct Ctx {
    /// When the request arrived.
    pub started: Instant,
    /// Route class, once classified.
    pub route: Option<RouteClass>,
    /// Extra handling of a proxied endpoint.
    pub special: Special,
    /// The verified caller, if a token was presented and accepted.
    pub identity: Option<Arc<Identity>>,
    /// The caller's upstream binding.
    pub bound: Option<Arc<Bound>>,
    /// This one request goes upstream as the application service (an approved cross-signing
    /// reset, `guard`), whatever the binding's own credential is.
    pub as_appservice: bool,
    /// How the request body is forwarded.
    pub request_body: RequestBody,
    /// `guard` claimed this user's first cross-signing upload (given back unless it lands).
    pub cross_signing_claim: bool,
    /// Why the gateway answered itself, if it did.
    pub rejection: Option<GatewayError>,
    /// How the identity cache took part.
    pub cache: CacheOutcome,
    /// Hash of the presented token (for logs).
    pub token: Option<TokenHash>,
    /// Which kind of token an authenticated request carried (a metric label).
    pub token_kind: TokenKind,
    /// The client's query, parsed once (see `target`); `None` when the target has none or
    /// the route is not a client route.
    pub query: Option<Query>,
    /// When the upstream request started.
    pub upstream_started: Option<Instant>,
    /// Response body handling.
    pub body: BodyEdit,
    /// Counts this request as in flight until the context is dropped.
    _in_flight: Option<InFlightGuard>,
}

/// The process's traffic: how many requests are in flight (a context exists for each; a
/// shutdown waits for none to be left) and whether the process is stopping or handing over
/// (then every response closes its connection, so clients reconnect to whoever serves next).
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Traffic>);

#[derive(Debug, Default)]
struct Traffic {
    count: AtomicUsize,
    draining: AtomicBool,
}

impl InFlight {
    /// How many now.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// From now on, responses close their connections.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::Release);
    }

    /// Whether [`InFlight::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Counts one piece of work (an admin API call) as in flight until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
}

/// Keeps one request counted in [`InFlight`] while it lives.
#[derive(Debug)]
pub struct InFlightGuard(Arc<Traffic>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ctx {
    /// A fresh context.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            route: None,
            special: Special::None,
            identity: None,
            bound: None,
            as_appservice: false,
            request_body: RequestBody::Forwarded,
            cross_signing_claim: false,
            rejection: None,
            cache: CacheOutcome::None,
            token: None,
            token_kind: TokenKind::None,
            query: None,
            upstream_started: None,
            body: BodyEdit::None,
            _in_flight: None,
        }
    }

    /// A fresh context counted in `in_flight` for as long as it lives.
    pub fn counted(in_flight: &InFlight) -> Self {
        Self {
            _in_flight: Some(in_flight.enter()),
            ..Self::new()
        }
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}

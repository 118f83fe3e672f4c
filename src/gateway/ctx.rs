//! The typed per-request context shared by every phase of one request.

use std::sync::Arc;
use std::time::Instant;

use super::classify::RouteClass;
use crate::auth::cache::CacheOutcome;
use crate::auth::{Identity, TokenHash};
use crate::error::GatewayError;

/// State of one request, created by `new_ctx` and read by later phases and `logging`.
#[derive(Debug)]
pub struct Ctx {
    /// When the request arrived.
    pub started: Instant,
    /// Route class, once classified.
    pub route: Option<RouteClass>,
    /// The verified caller, if a token was presented and accepted.
    pub identity: Option<Arc<Identity>>,
    /// Why the gateway answered itself, if it did.
    pub rejection: Option<GatewayError>,
    /// How the identity cache took part.
    pub cache: CacheOutcome,
    /// Hash of the presented token (for logs).
    pub token: Option<TokenHash>,
    /// The forwarded target when the query changed.
    pub rewritten_target: Option<String>,
    /// When the upstream request started.
    pub upstream_started: Option<Instant>,
}

impl Ctx {
    /// A fresh context.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            route: None,
            identity: None,
            rejection: None,
            cache: CacheOutcome::None,
            token: None,
            rewritten_target: None,
            upstream_started: None,
        }
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}

//! request_filter: classify the route, extract and verify the token, enforce the scope.
//!
//! Returns what the gateway must do: answer itself (preflight or an error) or proxy. Writing the
//! answer is left to `respond`.

use pingora::http::RequestHeader;

use super::classify::{self, RouteClass};
use super::ctx::Ctx;
use super::token::{self, Presented};
use crate::auth::{Access, TokenHash, Verifier};
use crate::config::Config;
use crate::error::{GatewayError, MissingTokenReason};

/// The decision of the request_filter phase.
#[derive(Debug)]
pub enum Decision {
    /// Forward to the homeserver.
    Proxy,
    /// Answer a CORS preflight.
    Preflight,
}

/// Runs classification, token extraction, verification and scope checks.
pub async fn authenticate(
    req: &RequestHeader,
    config: &Config,
    verifier: &Verifier,
    ctx: &mut Ctx,
) -> Result<Decision, GatewayError> {
    let route = classify::classify(&req.method, req.raw_path())?;
    ctx.route = Some(route.class);
    match route.class {
        RouteClass::Federation => return Ok(Decision::Proxy),
        RouteClass::Preflight => return Ok(Decision::Preflight),
        RouteClass::Public | RouteClass::Authenticated => {}
    }
    let extracted =
        token::extract(req, config.auth.allow_query_token).map_err(GatewayError::MissingToken)?;
    ctx.rewritten_target = extracted.rewritten_target;
    let token = match extracted.presented {
        Presented::Token(t) => t,
        Presented::None if route.class == RouteClass::Public => return Ok(Decision::Proxy),
        Presented::None => return Err(GatewayError::MissingToken(MissingTokenReason::Absent)),
    };
    ctx.token = Some(TokenHash::of(&token));
    let verified = verifier.verify(&token).await;
    ctx.cache = verified.cache;
    let identity = verified.result?;
    if identity.access == Access::Guest
        && !classify::guest_allowed(&route, config.auth.guest_endpoints)
    {
        ctx.identity = Some(identity);
        return Err(GatewayError::GuestAccessForbidden);
    }
    ctx.identity = Some(identity);
    Ok(Decision::Proxy)
}

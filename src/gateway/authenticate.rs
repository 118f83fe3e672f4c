//! request_filter: classify the route, extract and verify the token, enforce the scope, and bind
//! the identity upstream.
//!
//! Returns what the gateway must do: answer itself (preflight, discovery, or an error) or proxy.
//! Writing the answer is left to `respond`.

use pingora::http::RequestHeader;

use super::classify::{self, RouteClass, Served, Special};
use super::ctx::Ctx;
use super::token::{self, Presented};
use super::Gateway;
use crate::auth::{Access, TokenHash};
use crate::config::BindingMode;
use crate::error::{GatewayError, MissingTokenReason};

/// The decision of the request_filter phase.
#[derive(Debug)]
pub enum Decision {
    /// Forward to the homeserver.
    Proxy,
    /// Answer a CORS preflight.
    Preflight,
    /// Answer with a discovery document.
    Serve(Served),
}

/// Runs classification, token extraction, verification, scope checks and binding.
pub async fn authenticate(
    gw: &Gateway,
    req: &RequestHeader,
    ctx: &mut Ctx,
) -> Result<Decision, GatewayError> {
    let n = &gw.config.notifications;
    let options = classify::Options {
        expose_admin_api: gw.config.homeserver.expose_admin_api,
        backchannel_logout_path: &n.backchannel_logout_path,
        revocation_path: n.revocation_proxy.then_some(n.revocation_path.as_str()),
    };
    let route = classify::classify(&req.method, req.raw_path(), options)?;
    ctx.route = Some(route.class);
    ctx.special = route.special;
    match route.class {
        RouteClass::Federation => return Ok(Decision::Proxy),
        RouteClass::Preflight => return Ok(Decision::Preflight),
        RouteClass::Refused(r) => return Err(GatewayError::Refused(r)),
        RouteClass::Served(s) => return Ok(Decision::Serve(s)),
        RouteClass::Public | RouteClass::Authenticated => {}
    }
    let extracted = token::extract(req, gw.config.auth.allow_query_token)
        .map_err(GatewayError::MissingToken)?;
    ctx.rewritten_target = extracted.rewritten_target;
    let token = match extracted.presented {
        Presented::Token(t) => t,
        Presented::None if route.class == RouteClass::Public => return Ok(Decision::Proxy),
        Presented::None => return Err(GatewayError::MissingToken(MissingTokenReason::Absent)),
    };
    ctx.token = Some(TokenHash::of(&token));
    let verified = gw.verifier.verify(&token).await;
    ctx.cache = verified.cache;
    let identity = verified.result?;
    ctx.identity = Some(identity.clone());
    if identity.access == Access::Guest
        && !classify::guest_allowed(&route, gw.config.auth.guest_endpoints)
    {
        return Err(GatewayError::GuestAccessForbidden);
    }
    if gw.binder.mode() == BindingMode::Headers {
        // Identity headers only: the pin and tombstone checks are all there is to do.
        gw.binder.check_user(&identity).await?;
        return Ok(Decision::Proxy);
    }
    let bound = gw.binder.bind(&identity).await?;
    ctx.bound = Some(bound.clone());
    if route.special == Special::CrossSigningUpload && gw.binder.has_master_key(&bound).await? {
        let approved = gw
            .binder
            .store()
            .take_cross_signing_reset(&identity.user_id, gw.clock.now_ms())
            .await
            .unwrap_or(false);
        if !approved {
            return Err(GatewayError::CrossSigningResetRequired);
        }
        tracing::info!(user = %identity.user_id, "approved cross-signing reset used");
    }
    Ok(Decision::Proxy)
}

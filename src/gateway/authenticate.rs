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
use crate::binding::Credential;
use crate::config::BindingMode;
use crate::error::{BindingFailure, GatewayError, MissingTokenReason};

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

/// Whether any `Content-Type` of the request names a media type that an upstream framework
/// parses into request arguments: `application/x-www-form-urlencoded` or `multipart/form-data`,
/// in any case, with any parameters or surrounding list (matched anywhere in the value).
pub fn has_form_body(req: &RequestHeader) -> bool {
    req.headers
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .any(|v| {
            [&b"x-www-form-urlencoded"[..], b"multipart/form-data"]
                .iter()
                .any(|needle| {
                    v.as_bytes()
                        .windows(needle.len())
                        .any(|w| w.eq_ignore_ascii_case(needle))
                })
        })
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
    ctx.query = extracted.query;
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
    if has_form_body(req) {
        // A credential is about to be attached: a body the homeserver would merge into its
        // arguments must not ride along (Twisted merges form bodies over the query).
        return Err(GatewayError::FormBody);
    }
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
    if route.special == Special::JoinedMembers && bound.credential == Credential::Masquerade {
        let room = classify::client_endpoint(route.path)
            .and_then(classify::joined_members_room)
            .unwrap_or_default();
        if !gw.binder.is_joined(&bound, room).await? {
            return Err(GatewayError::NotJoined);
        }
    }
    if route.special == Special::CrossSigningUpload && gw.binder.has_master_key(&bound).await? {
        let approved = gw
            .binder
            .store()
            .take_cross_signing_reset(&identity.user_id, gw.clock.now_ms())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "state store failed during the cross-signing guard");
                GatewayError::BindingUnavailable(BindingFailure::Store)
            })?;
        if !approved {
            return Err(GatewayError::CrossSigningResetRequired);
        }
        tracing::info!(user = %identity.user_id, "approved cross-signing reset used");
    }
    Ok(Decision::Proxy)
}

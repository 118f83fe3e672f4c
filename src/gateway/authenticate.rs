//! request_filter, steps 2 and 3: extract the token the client presented and verify it (cache,
//! introspection or local JWT checks). Scope rules, binding and guards are later steps.

use std::net::IpAddr;
use std::sync::Arc;

use pingora::http::RequestHeader;

use super::classify::{Route, RouteClass};
use super::ctx::Ctx;
use super::headers;
use super::token::{self, Presented};
use super::Gateway;
use crate::auth::{Identity, TokenHash};
use crate::error::{GatewayError, MissingTokenReason};

/// The verified identity behind the request's token, or `None` for a public route the client
/// called without one (proxied as it is).
pub async fn authenticate(
    gw: &Gateway,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    route: &Route<'_>,
    ctx: &mut Ctx,
) -> Result<Option<Arc<Identity>>, GatewayError> {
    let extracted = token::extract(req, gw.config.auth.allow_query_token)
        .map_err(GatewayError::MissingToken)?;
    ctx.query = extracted.query;
    let token = match extracted.presented {
        Presented::Token(t) => t,
        Presented::None if route.class == RouteClass::Public => return Ok(None),
        Presented::None => return Err(GatewayError::MissingToken(MissingTokenReason::Absent)),
    };
    ctx.token = Some(TokenHash::of(&token));
    ctx.token_kind = if crate::compat::is_compat_access(&token) {
        super::ctx::TokenKind::Compat
    } else {
        super::ctx::TokenKind::OAuth
    };
    let client = headers::client_address(req, peer, gw.config.listen.trust_forwarded_headers);
    let verified = gw.verifier.verify(&token, client).await;
    ctx.cache = verified.cache;
    let identity = verified.result?;
    ctx.identity = Some(identity.clone());
    Ok(Some(identity))
}

//! upstream_response_filter / response_body_filter: the few homeserver answers the gateway
//! changes.
//!
//! - A bound credential the homeserver no longer accepts (device deleted out of band): the
//!   binding is dropped and the client gets 503 `M_UNKNOWN` with `Retry-After` instead of a 401
//!   that would log it out; the next request provisions again. A 401 is only taken for a lost
//!   binding after `whoami` with the same credential fails too (user-interactive-auth endpoints
//!   answer 401 by design).
//! - `/versions` gains the OAuth unstable features; `/capabilities` disables password, 3PID and
//!   login-token changes. Both bodies are small JSON and are collected before rewriting.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::Result;
use serde_json::Value;

use super::classify::Special;
use super::ctx::{BodyEdit, Ctx};
use super::{discovery, respond, Gateway};
use crate::binding::Credential;
use crate::error::{BindingFailure, GatewayError};

/// Asks for an uncompressed body where the gateway rewrites it.
pub fn prepare_request(req: &mut impl super::headers::UpstreamHead, ctx: &Ctx) {
    if matches!(ctx.special, Special::Versions | Special::Capabilities) {
        req.remove(&http::header::ACCEPT_ENCODING);
    }
}

/// Inspects the homeserver's response header.
pub async fn response_header(gw: &Gateway, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
    let status = resp.status.as_u16();
    if let Some(err) = binding_lost(gw, status, ctx).await {
        let (fresh, body) = respond::error_response(&err, &gw.error_settings())?;
        *resp = fresh;
        ctx.body = BodyEdit::Replace(body);
        ctx.rejection = Some(err);
        return Ok(());
    }
    if status == 200 && matches!(ctx.special, Special::Versions | Special::Capabilities) {
        resp.remove_header(&http::header::CONTENT_LENGTH);
        ctx.body = BodyEdit::Rewrite(ctx.special, Vec::new());
    }
    Ok(())
}

/// Whether an answer with `status` says the homeserver no longer accepts the request's bound
/// credential (checked with `whoami`); then the binding is dropped, and the answer to the
/// client is the returned error in place of the homeserver's. Shared with the HTTP/1 driver.
pub async fn binding_lost(gw: &Gateway, status: u16, ctx: &Ctx) -> Option<GatewayError> {
    let bound = ctx.bound.as_ref()?;
    let suspicious = match bound.credential {
        Credential::DeviceToken(_) => status == 401,
        Credential::Masquerade => matches!(status, 400 | 401),
        Credential::None => false,
    };
    if !suspicious || gw.binder.still_valid(bound).await {
        return None;
    }
    tracing::warn!(
        user = %bound.user_id,
        device = bound.device_id.as_deref().unwrap_or(""),
        "the homeserver no longer accepts this binding; it is provisioned again on the next request"
    );
    gw.binder
        .drop_binding(&bound.user_id, bound.device_id.as_deref())
        .await;
    Some(GatewayError::BindingUnavailable(BindingFailure::Lost))
}

/// Applies the body edit decided in [`response_header`].
pub fn response_body(body: &mut Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
    match &mut ctx.body {
        BodyEdit::None => {}
        BodyEdit::Replace(replacement) => {
            *body = end_of_stream.then(|| replacement.clone());
        }
        BodyEdit::Rewrite(special, buf) => {
            if let Some(chunk) = body.take() {
                buf.extend_from_slice(&chunk);
            }
            if end_of_stream {
                let out = match serde_json::from_slice::<Value>(buf) {
                    Ok(mut v) => {
                        match special {
                            Special::Versions => discovery::rewrite_versions(&mut v),
                            Special::Capabilities => discovery::rewrite_capabilities(&mut v),
                            _ => {}
                        }
                        serde_json::to_vec(&v).unwrap_or_else(|_| buf.clone())
                    }
                    Err(_) => std::mem::take(buf),
                };
                *body = Some(Bytes::from(out));
            }
        }
    }
}

//! request_filter for the two notification endpoints on the public listener: OIDC Back-Channel
//! Logout (the OP calls it) and the RFC 7009 revocation proxy (clients call it). Both read a
//! small form body; the answers are OAuth-style, not Matrix JSON (the callers speak OAuth).

use std::net::IpAddr;

use super::respond::{self, Empty, OAuthError};
use crate::error::GatewayError;
use crate::notify::Notifier;
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::Result;

/// Largest form body accepted on these endpoints.
const MAX_BODY: usize = 64 * 1024;

pub(super) async fn read_body(session: &mut Session) -> Result<Option<Bytes>> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

fn invalid_request(description: &'static str) -> OAuthError {
    OAuthError {
        error: "invalid_request",
        error_description: description.into(),
    }
}

fn unavailable(description: &'static str) -> OAuthError {
    OAuthError {
        error: "temporarily_unavailable",
        error_description: description.into(),
    }
}

/// `POST <backchannel_logout_path>`: 200 once every cached identity of the session is purged
/// and its devices are signed out upstream; 400 `invalid_request` for any invalid logout token;
/// 503 `temporarily_unavailable` with `Retry-After` when the gateway could not do the work (keys,
/// store or homeserver unavailable), so the OP retries.
pub async fn backchannel_logout(
    session: &mut Session,
    notifier: &Notifier,
    retry_after: u64,
) -> Result<u16> {
    let Some(body) = read_body(session).await? else {
        session.set_keepalive(None);
        respond::json_response(session, 400, &invalid_request("body too large"), &[]).await?;
        return Ok(400);
    };
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "logout_token")
        .map(|(_, v)| v.into_owned());
    let Some(token) = token else {
        respond::json_response(session, 400, &invalid_request("logout_token missing"), &[]).await?;
        return Ok(400);
    };
    match notifier.backchannel_logout(&token).await {
        Ok(_) => {
            respond::json_response(session, 200, &Empty {}, &[]).await?;
            Ok(200)
        }
        Err(why) if why.is_fault() => {
            // A fault, not a bad token: the OP is to retry (OpenID Back-Channel Logout 1.0 §2.8
            // lets it), and nothing was answered 200 that did not happen.
            let retry = ("Retry-After", retry_after.to_string());
            respond::json_response(session, 503, &unavailable(why.as_label()), &[retry]).await?;
            Ok(503)
        }
        Err(why) => {
            respond::json_response(session, 400, &invalid_request(why.as_label()), &[]).await?;
            Ok(400)
        }
    }
}

/// `POST <revocation_path>`: forwarded unchanged to the OP; its answer is relayed.
pub async fn revocation(
    session: &mut Session,
    notifier: &Notifier,
    client: Option<IpAddr>,
    retry_after: u64,
) -> Result<u16> {
    let content_type = header(session, "content-type");
    let authorization = header(session, "authorization");
    let Some(body) = read_body(session).await? else {
        session.set_keepalive(None);
        respond::json_response(session, 400, &invalid_request("body too large"), &[]).await?;
        return Ok(400);
    };
    match notifier
        .revoke_at_op(
            body,
            content_type.as_deref(),
            authorization.as_deref(),
            client,
        )
        .await
    {
        Ok((status, ct, body)) => {
            respond::raw_response(session, status, ct.as_deref(), body).await?;
            Ok(status)
        }
        Err(GatewayError::RateLimited { retry_after_ms }) => {
            // Nothing was forwarded: the client retries later, as after a 503.
            let retry = ("Retry-After", retry_after_ms.div_ceil(1000).to_string());
            let body = unavailable("too many new tokens from this address");
            respond::json_response(session, 429, &body, &[retry]).await?;
            Ok(429)
        }
        Err(e) => {
            let retry = ("Retry-After", retry_after.to_string());
            respond::json_response(session, 503, &unavailable(e.reason_label()), &[retry]).await?;
            Ok(503)
        }
    }
}

fn header(session: &Session, name: &str) -> Option<String> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

//! The only writer of gateway-made responses: Matrix JSON errors and the few JSON answers the
//! gateway serves itself (CORS preflight).
//!
//! Every response written here has `Content-Type: application/json`, an exact
//! `Content-Length`, the CORS headers the Matrix spec asks of a homeserver, and keeps the
//! connection alive (unlike Pingora's `respond_error_with_body`).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::{json, Value};

use crate::error::GatewayError;

/// CORS headers of every gateway-written response
/// (<https://spec.matrix.org/latest/client-server-api/#web-browser-clients>).
pub const CORS_HEADERS: [(&str, &str); 3] = [
    ("Access-Control-Allow-Origin", "*"),
    (
        "Access-Control-Allow-Methods",
        "GET, POST, PUT, DELETE, OPTIONS",
    ),
    (
        "Access-Control-Allow-Headers",
        "X-Requested-With, Content-Type, Authorization",
    ),
];

/// What error answers need beyond the error itself.
#[derive(Debug, Clone, Default)]
pub struct ErrorSettings {
    /// `Retry-After` seconds on 503.
    pub retry_after_secs: u32,
    /// The OP's account management page (for the cross-signing reset answer).
    pub account_management_uri: Option<String>,
}

/// The JSON body of an error.
pub fn error_body(err: &GatewayError, settings: &ErrorSettings) -> Value {
    if *err == GatewayError::CrossSigningResetRequired {
        // The user-interactive-auth shape Synapse answers under MSC3861 (spec: "m.oauth").
        let url = settings
            .account_management_uri
            .as_deref()
            .map(|u| {
                let sep = if u.contains('?') { '&' } else { '?' };
                format!("{u}{sep}action=org.matrix.cross_signing_reset")
            })
            .unwrap_or_default();
        return json!({
            "session": "gateway",
            "flows": [{"stages": ["m.oauth"]}, {"stages": ["org.matrix.cross_signing_reset"]}],
            "params": {
                "m.oauth": {"url": url},
                "org.matrix.cross_signing_reset": {"url": url},
            },
            "msg": err.client_message(),
        });
    }
    let mut body = json!({
        "errcode": err.errcode().as_str(),
        "error": err.client_message(),
    });
    if let Some(soft) = err.soft_logout() {
        body["soft_logout"] = Value::Bool(soft);
    }
    body
}

/// Writes `err` as a Matrix JSON error.
pub async fn error(
    session: &mut Session,
    err: &GatewayError,
    settings: &ErrorSettings,
) -> Result<()> {
    let mut extra: Vec<(&str, String)> = Vec::new();
    match err {
        GatewayError::OpUnavailable(_) | GatewayError::BindingUnavailable(_) => {
            extra.push(("Retry-After", settings.retry_after_secs.to_string()))
        }
        GatewayError::GuestAccessForbidden => extra.push((
            "WWW-Authenticate",
            "Bearer error=\"insufficient_scope\", scope=\"urn:matrix:client:api:*\"".to_owned(),
        )),
        _ => {}
    }
    json_response(session, err.status(), &error_body(err, settings), &extra).await
}

/// Request bodies up to this size are read and discarded before the gateway answers, so the
/// connection can stay open; a larger body closes the connection instead of being read.
const DRAIN_LIMIT: u64 = 64 * 1024;

async fn drain_small_body(session: &mut Session) {
    if session.is_body_done() {
        return;
    }
    let small = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= DRAIN_LIMIT);
    if small {
        let drained = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            session.drain_request_body(),
        )
        .await;
        if matches!(drained, Ok(Ok(()))) {
            return;
        }
    }
    session.set_keepalive(None);
}

/// Relays a body the gateway did not write (the OP's revocation answer), with CORS headers.
pub async fn raw_response(
    session: &mut Session,
    status: u16,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<()> {
    drain_small_body(session).await;
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header("Content-Type", content_type.unwrap_or("application/json"))?;
    h.insert_header("Content-Length", body.len().to_string())?;
    h.insert_header("Cache-Control", "no-store")?;
    for (k, v) in CORS_HEADERS {
        h.insert_header(k, v)?;
    }
    if let Some(id) = session.req_header().headers.get("x-request-id").cloned() {
        h.insert_header("X-Request-Id", id)?;
    }
    session
        .write_response_header(Box::new(h), body.is_empty())
        .await?;
    if !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Writes a JSON response with the CORS headers and any `extra` headers.
pub async fn json_response(
    session: &mut Session,
    status: u16,
    body: &Value,
    extra: &[(&str, String)],
) -> Result<()> {
    drain_small_body(session).await;
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec()));
    let mut h = ResponseHeader::build(status, Some(6 + extra.len()))?;
    h.insert_header("Content-Type", "application/json")?;
    h.insert_header("Content-Length", bytes.len().to_string())?;
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("cache-control"))
    {
        h.insert_header("Cache-Control", "no-store")?;
    }
    for (k, v) in CORS_HEADERS {
        h.insert_header(k, v)?;
    }
    if let Some(id) = session.req_header().headers.get("x-request-id").cloned() {
        h.insert_header("X-Request-Id", id)?;
    }
    for (k, v) in extra {
        h.insert_header(k.to_string(), v.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(bytes), true).await?;
    }
    Ok(())
}

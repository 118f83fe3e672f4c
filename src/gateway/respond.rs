//! The only writer of gateway-made responses: Matrix JSON errors (also the 503 that replaces a
//! homeserver answer, see `rewrite`), the OAuth errors of the notification endpoints, and the
//! JSON the gateway serves itself (discovery, CORS preflight). Bodies are typed.
//!
//! Every response written here has `Content-Type: application/json`, an exact
//! `Content-Length`, the CORS headers the Matrix spec asks of a homeserver, and keeps the
//! connection alive (unlike Pingora's `respond_error_with_body`).

use std::borrow::Cow;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde::Serialize;

use crate::error::{GatewayError, MatrixError};

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

/// The body of a gateway-made error: the Matrix standard error, or the user-interactive-auth
/// challenge of a cross-signing reset.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ErrorBody {
    /// `{"errcode", "error", "soft_logout"?}`.
    Matrix(MatrixError),
    /// The UIA shape Synapse answers under MSC3861 (spec: the `m.oauth` stage, MSC4312).
    CrossSigningReset(UiaChallenge),
}

/// A user-interactive-auth answer that sends the user to the OP's account page.
#[derive(Debug, Serialize)]
pub struct UiaChallenge {
    session: &'static str,
    flows: [UiaFlow; 2],
    params: UiaParams,
    msg: &'static str,
}

#[derive(Debug, Serialize)]
struct UiaFlow {
    stages: [&'static str; 1],
}

#[derive(Debug, Serialize)]
struct UiaParams {
    #[serde(rename = "m.oauth")]
    oauth: UiaUrl,
    #[serde(rename = "org.matrix.cross_signing_reset")]
    unstable: UiaUrl,
}

#[derive(Debug, Serialize)]
struct UiaUrl {
    url: String,
}

/// An OAuth 2.0 error body (RFC 6749 §5.2), for the endpoints OAuth clients and the OP call.
#[derive(Debug, Serialize)]
pub struct OAuthError {
    /// The OAuth error code (`invalid_request`, `temporarily_unavailable`).
    pub error: &'static str,
    /// What was wrong.
    pub error_description: Cow<'static, str>,
}

/// An empty JSON object (`{}`), the body of a plain success.
#[derive(Debug, Serialize)]
pub struct Empty {}

/// The JSON body of an error.
pub fn error_body(err: &GatewayError, settings: &ErrorSettings) -> ErrorBody {
    if *err != GatewayError::CrossSigningResetRequired {
        return ErrorBody::Matrix(err.matrix_error());
    }
    let url = settings
        .account_management_uri
        .as_deref()
        .map(|u| {
            let sep = if u.contains('?') { '&' } else { '?' };
            format!("{u}{sep}action=org.matrix.cross_signing_reset")
        })
        .unwrap_or_default();
    ErrorBody::CrossSigningReset(UiaChallenge {
        session: "gateway",
        flows: [
            UiaFlow {
                stages: ["m.oauth"],
            },
            UiaFlow {
                stages: ["org.matrix.cross_signing_reset"],
            },
        ],
        params: UiaParams {
            oauth: UiaUrl { url: url.clone() },
            unstable: UiaUrl { url },
        },
        msg: err.client_message(),
    })
}

/// The status, headers and body of `err` as a Matrix JSON error: what [`error`] writes, and
/// what replaces a homeserver answer the gateway overrides.
pub fn error_response(
    err: &GatewayError,
    settings: &ErrorSettings,
) -> Result<(ResponseHeader, Bytes)> {
    match canned(err) {
        Some(answer) => Ok(answer),
        None => render(err, settings),
    }
}

/// The answers to a missing or refused token (what a flood of made-up tokens gets), rendered
/// once per kind and thread, then cloned: the clone shares the header values' and the body's
/// bytes. Their rendering depends on nothing but the error (not on `ErrorSettings`).
fn canned(err: &GatewayError) -> Option<(ResponseHeader, Bytes)> {
    type Canned = Vec<(GatewayError, ResponseHeader, Bytes)>;
    thread_local! {
        // At most one entry per reason of the two variants: a bounded, small list.
        static CANNED: std::cell::RefCell<Canned> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if !matches!(
        err,
        GatewayError::MissingToken(_) | GatewayError::UnknownToken(_)
    ) {
        return None;
    }
    CANNED.with(|canned| {
        if let Some((_, h, b)) = canned.borrow().iter().find(|(e, _, _)| e == err) {
            return Some((h.clone(), b.clone()));
        }
        let (h, b) = render(err, &ErrorSettings::default()).ok()?;
        canned
            .borrow_mut()
            .push((err.clone(), h.clone(), b.clone()));
        Some((h, b))
    })
}

/// `err` for the public listener's HTTP/1 driver (`crate::front`), as wire bytes: the status
/// line and headers of [`error_response`] without the empty line that ends the head (the
/// driver adds the request ID and `Connection` first), and the body. The answers to a missing
/// or refused token are serialised once per kind and thread; `settings` is only asked for
/// the others.
pub fn error_wire(
    err: &GatewayError,
    settings: impl FnOnce() -> ErrorSettings,
) -> Result<(Bytes, Bytes)> {
    thread_local! {
        // As `canned`: at most one entry per reason of its two variants.
        static WIRE: std::cell::RefCell<Vec<(GatewayError, Bytes, Bytes)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    let serialise = |(h, body): (ResponseHeader, Bytes)| {
        let mut head = bytes::BytesMut::with_capacity(320);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(h.status.as_str().as_bytes());
        head.extend_from_slice(b" ");
        head.extend_from_slice(h.status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        h.header_to_h1_wire(&mut head);
        (head.freeze(), body)
    };
    let cached = WIRE.with(|wire| {
        wire.borrow()
            .iter()
            .find(|(e, _, _)| e == err)
            .map(|(_, h, b)| (h.clone(), b.clone()))
    });
    if let Some(answer) = cached {
        return Ok(answer);
    }
    let Some(answer) = canned(err) else {
        return render(err, &settings()).map(serialise);
    };
    let (h, b) = serialise(answer);
    WIRE.with(|wire| wire.borrow_mut().push((err.clone(), h.clone(), b.clone())));
    Ok((h, b))
}

/// Renders `err` (see [`error_response`]).
fn render(err: &GatewayError, settings: &ErrorSettings) -> Result<(ResponseHeader, Bytes)> {
    let mut extra: Vec<(&str, String)> = Vec::new();
    match err {
        GatewayError::OpUnavailable(_) | GatewayError::BindingUnavailable(_) => {
            extra.push(("Retry-After", settings.retry_after_secs.to_string()))
        }
        GatewayError::RateLimited { retry_after_ms } => {
            extra.push(("Retry-After", retry_after_ms.div_ceil(1000).to_string()))
        }
        GatewayError::GuestAccessForbidden => extra.push((
            "WWW-Authenticate",
            "Bearer error=\"insufficient_scope\", scope=\"urn:matrix:client:api:*\"".to_owned(),
        )),
        _ => {}
    }
    let body = to_bytes(&error_body(err, settings));
    Ok((json_header(err.status(), body.len(), &extra)?, body))
}

/// Writes `err` as a Matrix JSON error.
pub async fn error(
    session: &mut Session,
    err: &GatewayError,
    settings: &ErrorSettings,
) -> Result<()> {
    let (header, body) = error_response(err, settings)?;
    write(session, header, body).await
}

fn to_bytes(body: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec()))
}

/// The head of every JSON answer the gateway writes: type, exact length, `no-store` unless
/// `extra` sets a `Cache-Control`, the CORS headers, then `extra`.
fn json_header(status: u16, len: usize, extra: &[(&str, String)]) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6 + extra.len()))?;
    h.insert_header("Content-Type", "application/json")?;
    h.insert_header("Content-Length", len.to_string())?;
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("cache-control"))
    {
        h.insert_header("Cache-Control", "no-store")?;
    }
    for (k, v) in CORS_HEADERS {
        h.insert_header(k, v)?;
    }
    for (k, v) in extra {
        h.insert_header(k.to_string(), v.as_str())?;
    }
    Ok(h)
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
    let mut h = json_header(status, body.len(), &[])?;
    if let Some(ct) = content_type {
        h.insert_header("Content-Type", ct)?;
    }
    write(session, h, body).await
}

/// A redirect (302) for a browser, setting `cookies`; never cached.
pub async fn redirect(session: &mut Session, location: &str, cookies: &[String]) -> Result<()> {
    let mut h = ResponseHeader::build(302, Some(4 + cookies.len()))?;
    h.insert_header("Location", location)?;
    h.insert_header("Content-Length", "0")?;
    h.insert_header("Cache-Control", "no-store")?;
    h.insert_header("Referrer-Policy", "no-referrer")?;
    for c in cookies {
        h.append_header("Set-Cookie", c.as_str())?;
    }
    write(session, h, Bytes::new()).await
}

/// A small HTML page for a browser (the legacy-login confirmation and errors): no scripts,
/// no framing, no referrer, never cached. `paragraphs` are escaped here; `link` is a button
/// to follow.
pub async fn html_page(
    session: &mut Session,
    status: u16,
    title: &str,
    paragraphs: &[&str],
    link: Option<(&str, &str)>,
    cookies: &[String],
) -> Result<()> {
    let mut page = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{}</title></head><body><h1>{}</h1>",
        escape(title),
        escape(title)
    );
    for p in paragraphs {
        page.push_str(&format!("<p>{}</p>", escape(p)));
    }
    if let Some((href, text)) = link {
        page.push_str(&format!(
            "<p><a href=\"{}\">{}</a></p>",
            escape(href),
            escape(text)
        ));
    }
    page.push_str("</body></html>");
    let body = Bytes::from(page);
    let mut h = ResponseHeader::build(status, Some(8 + cookies.len()))?;
    h.insert_header("Content-Type", "text/html; charset=utf-8")?;
    h.insert_header("Content-Length", body.len().to_string())?;
    h.insert_header("Cache-Control", "no-store")?;
    h.insert_header(
        "Content-Security-Policy",
        "default-src 'none'; frame-ancestors 'none'; form-action 'none'",
    )?;
    h.insert_header("X-Frame-Options", "DENY")?;
    h.insert_header("Referrer-Policy", "no-referrer")?;
    h.insert_header("X-Content-Type-Options", "nosniff")?;
    for c in cookies {
        h.append_header("Set-Cookie", c.as_str())?;
    }
    write(session, h, body).await
}

/// HTML-escapes text for an element or a double-quoted attribute.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Writes a JSON response with the CORS headers and any `extra` headers.
pub async fn json_response(
    session: &mut Session,
    status: u16,
    body: &impl Serialize,
    extra: &[(&str, String)],
) -> Result<()> {
    let bytes = to_bytes(body);
    let h = json_header(status, bytes.len(), extra)?;
    write(session, h, bytes).await
}

/// Sends a response the gateway made: the small request body is drained first, the request ID
/// is echoed, and a `HEAD` request gets the head only.
async fn write(session: &mut Session, mut h: ResponseHeader, body: Bytes) -> Result<()> {
    drain_small_body(session).await;
    if let Some(id) = session.req_header().headers.get("x-request-id").cloned() {
        h.insert_header("X-Request-Id", id)?;
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{MissingTokenReason, RejectReason};

    fn parts(answer: &(ResponseHeader, Bytes)) -> (u16, Vec<(String, String)>, Bytes) {
        let (h, b) = answer;
        let headers = h
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        (h.status.as_u16(), headers, b.clone())
    }

    #[test]
    fn a_canned_refusal_is_the_rendered_one_every_time() {
        let errors = [
            GatewayError::MissingToken(MissingTokenReason::Absent),
            GatewayError::MissingToken(MissingTokenReason::Malformed),
            GatewayError::UnknownToken(RejectReason::Inactive),
            GatewayError::UnknownToken(RejectReason::Expired),
            GatewayError::UnknownToken(RejectReason::Revoked),
        ];
        let settings = ErrorSettings {
            retry_after_secs: 7,
            account_management_uri: Some("https://op.example/account".into()),
        };
        for err in &errors {
            let fresh = parts(&render(err, &settings).unwrap());
            for _ in 0..3 {
                assert_eq!(
                    parts(&error_response(err, &settings).unwrap()),
                    fresh,
                    "{err:?}"
                );
            }
        }
        // The driver's wire form says the same.
        for err in &errors {
            let (h, b) = render(err, &settings).unwrap();
            let (head, body) = error_wire(err, || settings.clone()).unwrap();
            let head = String::from_utf8(head.to_vec()).unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {} ", h.status.as_u16())),
                "{head}"
            );
            for (k, v) in h.headers.iter() {
                let line = format!("{}: {}\r\n", k.as_str(), v.to_str().unwrap());
                assert!(
                    head.to_ascii_lowercase()
                        .contains(&line.to_ascii_lowercase()),
                    "{line} in {head}"
                );
            }
            assert_eq!(body, b);
            assert_eq!(
                error_wire(err, || settings.clone()).unwrap().0,
                head.as_bytes()
            );
        }
        // Each kind has its own answer.
        let a = parts(&error_response(&errors[0], &settings).unwrap());
        let b = parts(&error_response(&errors[2], &settings).unwrap());
        assert_ne!(a.2, b.2);
        // Errors that depend on the settings or the moment are never canned.
        assert!(canned(&GatewayError::RateLimited {
            retry_after_ms: 1_500
        })
        .is_none());
    }
}

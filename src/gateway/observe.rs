//! logging: one access-log line per request, from the context (never a token, never a query).

use pingora::proxy::Session;

use super::ctx::Ctx;
use crate::auth::cache::CacheOutcome;
use crate::metrics;

/// The request ID header: taken from the client when well-formed, generated otherwise, sent
/// upstream and returned in the response.
pub const REQUEST_ID: &str = "x-request-id";

/// [`REQUEST_ID`] as a header name, for lookups that do not parse the name each time.
pub static REQUEST_ID_NAME: http::HeaderName = http::HeaderName::from_static(REQUEST_ID);

/// Makes sure the request carries a usable request ID.
pub fn ensure_request_id(req: &mut pingora::http::RequestHeader) {
    let ok = req
        .headers
        .get(&REQUEST_ID_NAME)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        });
    if !ok {
        use rand::RngCore;
        let mut bytes = [0u8; 12];
        rand::rng().fill_bytes(&mut bytes);
        // Lower-case hex, written in place (this runs for most requests).
        let mut id = [0u8; 24];
        for (pair, b) in id.chunks_exact_mut(2).zip(bytes) {
            pair[0] = b"0123456789abcdef"[usize::from(b >> 4)];
            pair[1] = b"0123456789abcdef"[usize::from(b & 15)];
        }
        if let Ok(value) = http::HeaderValue::from_bytes(&id) {
            let _ = req.insert_header(REQUEST_ID, value);
        }
    }
}

/// Emits the access-log line of a request Pingora's proxy served.
pub fn access_log(session: &Session, error: Option<&pingora::Error>, ctx: &Ctx) {
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .unwrap_or(0);
    record(session.req_header(), status, error.is_some(), ctx);
}

/// The metrics and the access-log line of one request (status 0: no response was written;
/// `failed`: proxying failed after admission).
pub fn record(req: &pingora::http::RequestHeader, status: u16, failed: bool, ctx: &Ctx) {
    let outcome = match (&ctx.rejection, failed) {
        (Some(e), _) => e.reason_label(),
        (None, true) => "proxy_error",
        (None, false) => "ok",
    };
    // One clock read for both durations.
    let now = std::time::Instant::now();
    let upstream_secs = ctx
        .upstream_started
        .map(|t| now.saturating_duration_since(t).as_secs_f64());
    let upstream_ms = upstream_secs.map(|s| s * 1000.0);
    let route = ctx.route.map_or("unclassified", |r| r.as_label());
    let metric_outcome = match &ctx.rejection {
        Some(e) => e.errcode().as_str(),
        None => match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "aborted",
        },
    };
    let elapsed = now.saturating_duration_since(ctx.started).as_secs_f64();
    metrics::handles::requests(route, metric_outcome, ctx.token_kind.as_label()).inc();
    metrics::handles::request_duration(route).observe(elapsed);
    if let Some(s) = upstream_secs {
        metrics::UPSTREAM_DURATION.observe(s);
    }
    if ctx.cache != CacheOutcome::None {
        metrics::handles::cache_lookups(ctx.cache.as_label()).inc();
    }
    tracing::info!(
        target: "access",
        method = %req.method,
        path = %req.uri.path(),
        route,
        request_id = req.headers.get(&REQUEST_ID_NAME).and_then(|v| v.to_str().ok()),
        status,
        outcome,
        cache = ctx.cache.as_label(),
        user = ctx.identity.as_ref().map(|i| i.user_id()),
        device = ctx.identity.as_ref().and_then(|i| i.device_id()),
        token = ctx.token.map(|t| t.short()),
        duration_ms = elapsed * 1000.0,
        upstream_ms,
        "request"
    );
}

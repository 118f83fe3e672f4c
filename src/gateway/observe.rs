//! logging: one access-log line per request, from the context (never a token, never a query).

use pingora::proxy::Session;

use super::ctx::Ctx;

/// Emits the access-log line.
pub fn access_log(session: &Session, error: Option<&pingora::Error>, ctx: &Ctx) {
    let req = session.req_header();
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .unwrap_or(0);
    let outcome = match (&ctx.rejection, error) {
        (Some(e), _) => e.reason_label(),
        (None, Some(_)) => "proxy_error",
        (None, None) => "ok",
    };
    let upstream_ms = ctx
        .upstream_started
        .map(|t| t.elapsed().as_secs_f64() * 1000.0);
    tracing::info!(
        target: "access",
        method = %req.method,
        path = %req.uri.path(),
        route = ctx.route.map_or("unclassified", |r| r.as_label()),
        status,
        outcome,
        cache = ctx.cache.as_label(),
        user = ctx.identity.as_ref().map(|i| i.user_id.as_str()),
        device = ctx.identity.as_ref().and_then(|i| i.device_id.as_deref()),
        token = ctx.token.map(|t| t.short()),
        duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
        upstream_ms,
        "request"
    );
}

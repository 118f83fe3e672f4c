//! The Pingora `ProxyHttp` service. Each phase delegates to the module named after it:
//!
//! ```text
//!  client ──► request_filter ──────────────► upstream_peer ──► upstream_request_filter ──► homeserver
//!             │ authenticate:                 upstream         headers: strip, inject,
//!             │  classify → token → verify                      forwarded, query rewrite
//!             │  (cache / introspection) → scope
//!             └─ refusal or preflight ──► respond (Matrix JSON, CORS, keep-alive)
//!  fail_to_proxy ──► respond (502 JSON)         logging ──► observe (access log)
//! ```

pub mod authenticate;
pub mod classify;
pub mod ctx;
pub mod headers;
pub mod observe;
pub mod respond;
pub mod token;
pub mod upstream;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::auth::Verifier;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::error::GatewayError;
use authenticate::Decision;
use classify::RouteClass;
use ctx::Ctx;
use upstream::Upstream;

/// The gateway service.
pub struct Gateway {
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    upstream: Upstream,
    clock: SharedClock,
}

impl Gateway {
    /// Assembles the service.
    pub fn new(
        config: Arc<Config>,
        verifier: Arc<Verifier>,
        upstream: Upstream,
        clock: SharedClock,
    ) -> Self {
        Self {
            config,
            verifier,
            upstream,
            clock,
        }
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        err: GatewayError,
    ) -> Result<bool> {
        respond::error(session, &err, self.config.auth.retry_after_secs).await?;
        ctx.rejection = Some(err);
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let decision =
            authenticate::authenticate(session.req_header(), &self.config, &self.verifier, ctx)
                .await;
        match decision {
            Ok(Decision::Proxy) => Ok(false),
            Ok(Decision::Preflight) => {
                respond::json_response(session, 200, &serde_json::json!({}), &[]).await?;
                Ok(true)
            }
            Err(err) => self.refuse(session, ctx, err).await,
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(self.upstream.peer()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let names = &self.config.identity_headers;
        let client_route = ctx.route != Some(RouteClass::Federation);
        headers::strip(req, names, client_route);
        if let Some(target) = ctx.rewritten_target.take() {
            req.set_raw_path(target.as_bytes())?;
        }
        if let Some(identity) = &ctx.identity {
            headers::inject(req, names, identity, self.clock.now_secs())?;
        }
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        headers::forwarded(req, client_ip, self.config.listen.trust_forwarded_headers)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let err = match (e.esource(), e.etype()) {
            (
                ErrorSource::Downstream,
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ) => None,
            (ErrorSource::Upstream, _) => Some(GatewayError::UpstreamUnavailable),
            (ErrorSource::Downstream, _) => Some(GatewayError::BadRequestTarget),
            _ => Some(GatewayError::Internal),
        };
        let Some(err) = err else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let code = err.status();
        if session.response_written().is_none() {
            if let Err(write_err) =
                respond::error(session, &err, self.config.auth.retry_after_secs).await
            {
                tracing::debug!(error = %write_err, "could not write the error response");
            }
        }
        ctx.rejection = Some(err);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: true,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        observe::access_log(session, e, ctx);
    }

    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        // Pingora prints this in its own error logs: never include the query (tokens live there).
        let req = session.req_header();
        format!(
            "{} {} route={}",
            req.method,
            req.uri.path(),
            ctx.route.map_or("unclassified", |r| r.as_label())
        )
    }
}

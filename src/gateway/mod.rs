//! The Pingora `ProxyHttp` service. Each phase delegates to the module named after it:
//!
//! ```text
//!  client ─► request_filter ──────────────────────► upstream_peer ─► upstream_request_filter ─► homeserver
//!            │ classify (route)                      upstream        headers: strip, bind
//!            │ → authenticate (token → cache / OP)                   (device token or AS
//!            │ → authorise (guest list, form body)                   masquerade), inject,
//!            │ → bind (provision upstream)                           forwarded
//!            │ → guard (cross-signing reset;
//!            │   Dendrite's password stage:     request_body_filter
//!            │   the upload read and completed) replaced body
//!            ├─ refusal ──────────► respond
//!            ├─ preflight ────────► respond
//!            ├─ discovery ────────► discovery + respond
//!            └─ OP notifications ─► notifications
//!  homeserver ─► upstream_response_filter ─► response_body_filter ─► client
//!                rewrite: binding lost → 503,   rewrite: /versions, /capabilities,
//!                /versions, /capabilities       replaced bodies
//!  fail_to_proxy ─► respond (502 JSON)            logging ─► observe (access log)
//! ```

pub mod authenticate;
pub mod authorise;
pub mod bind;
pub mod classify;
pub mod compat;
pub mod ctx;
pub mod discovery;
pub mod guard;
pub mod headers;
pub mod notifications;
pub mod observe;
pub mod respond;
pub mod rewrite;
pub mod target;
pub mod token;
pub mod upstream;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::auth::Verifier;
use crate::binding::{Binder, Credential};
use crate::clock::SharedClock;
use crate::compat::Compat;
use crate::config::{BindingMode, Config};
use crate::error::{GatewayError, Refused};
use crate::notify::Notifier;
use classify::{RouteClass, Served};
use ctx::Ctx;
use respond::ErrorSettings;
use upstream::Upstream;

/// The gateway service. Cloning shares everything (the public listener's HTTP/1 driver and
/// Pingora's proxy each hold one).
#[derive(Clone)]
pub struct Gateway {
    pub(crate) config: Arc<Config>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) binder: Arc<Binder>,
    pub(crate) upstream: Upstream,
    pub(crate) clock: SharedClock,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) in_flight: ctx::InFlight,
    /// Legacy login, when `[compat]` is on.
    pub(crate) compat: Option<Arc<Compat>>,
}

impl Gateway {
    /// Assembles the service.
    pub fn new(
        config: Arc<Config>,
        verifier: Arc<Verifier>,
        binder: Arc<Binder>,
        upstream: Upstream,
        clock: SharedClock,
        notifier: Arc<Notifier>,
        in_flight: ctx::InFlight,
    ) -> Self {
        let hooks = Arc::new(compat::Hooks {
            verifier: verifier.clone(),
            notifier: notifier.clone(),
            clock: clock.clone(),
        });
        let compat = Compat::new(
            &config,
            binder.store().clone(),
            verifier.op().clone(),
            clock.clone(),
            hooks,
        )
        .map(|c| {
            let compat = Arc::new(c);
            verifier.set_compat(compat.clone());
            compat
        });
        Self {
            config,
            verifier,
            binder,
            upstream,
            clock,
            notifier,
            in_flight,
            compat,
        }
    }

    pub(crate) fn error_settings(&self) -> ErrorSettings {
        ErrorSettings {
            retry_after_secs: self.config.auth.retry_after_secs,
            account_management_uri: self
                .verifier
                .op()
                .metadata()
                .and_then(|m| discovery::account_uri(&m, &self.config.discovery)),
        }
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        err: GatewayError,
    ) -> Result<bool> {
        respond::error(session, &err, &self.error_settings()).await?;
        ctx.rejection = Some(err);
        Ok(true)
    }

    async fn serve(&self, session: &mut Session, ctx: &mut Ctx, what: Served) -> Result<bool> {
        let retry_after = u64::from(self.config.auth.retry_after_secs);
        match what {
            Served::BackchannelLogout => {
                notifications::backchannel_logout(session, &self.notifier, retry_after).await?;
            }
            Served::Revocation => {
                let client = headers::client_address(
                    session.req_header(),
                    peer_ip(session),
                    self.config.listen.trust_forwarded_headers,
                );
                notifications::revocation(session, &self.notifier, client, retry_after).await?;
            }
            Served::Compat(route) => {
                let Some(compat) = &self.compat else {
                    // Classified as compat only when it is on.
                    return self
                        .refuse(session, ctx, GatewayError::Refused(Refused::OwnedByOp))
                        .await;
                };
                return compat::serve(self, session, ctx, compat, route).await;
            }
            Served::Discovery(doc) => {
                match discovery::document(self.verifier.op(), &self.config, doc).await {
                    Ok(body) => {
                        let cache = ("Cache-Control", "public, max-age=600".to_owned());
                        respond::json_response(session, 200, &body, &[cache]).await?;
                    }
                    Err(err) => return self.refuse(session, ctx, err).await,
                }
            }
        }
        Ok(true)
    }

    /// request_filter's steps in the order of the phase chart: classify → extract and verify
    /// → authorise → bind → guard. Each step returns early with what the gateway answers
    /// itself, or refuses.
    pub(crate) async fn admit(
        &self,
        req: &RequestHeader,
        peer: Option<IpAddr>,
        ctx: &mut Ctx,
    ) -> Result<Decision, GatewayError> {
        let route = classify::classify(
            &req.method,
            req.raw_path(),
            classify::Options::of(&self.config),
        )?;
        self.admit_route(req, route, peer, ctx).await
    }

    /// `admit` for a request already classified (the HTTP/1 driver classifies before it
    /// decides to relay; `route` must be `classify`'s answer for `req`).
    pub(crate) async fn admit_route(
        &self,
        req: &RequestHeader,
        route: classify::Route<'_>,
        peer: Option<IpAddr>,
        ctx: &mut Ctx,
    ) -> Result<Decision, GatewayError> {
        ctx.route = Some(route.class);
        ctx.special = route.special;
        match route.class {
            RouteClass::Federation => return Ok(Decision::Proxy),
            RouteClass::Preflight => return Ok(Decision::Preflight),
            RouteClass::Refused(r) => return Err(GatewayError::Refused(r)),
            RouteClass::Served(s) => return Ok(Decision::Serve(s)),
            RouteClass::Public | RouteClass::Authenticated => {}
        }
        let Some(identity) = authenticate::authenticate(self, req, peer, &route, ctx).await? else {
            return Ok(Decision::Proxy);
        };
        authorise::authorise(
            req,
            &route,
            &identity,
            self.config.auth.guest_endpoints,
            // Only the `headers` binding tells the homeserver that the caller is a guest.
            self.config.homeserver.binding == BindingMode::Headers,
        )?;
        bind::bind(self, &route, &identity, ctx).await?;
        guard::cross_signing(self, &route, &identity, ctx).await?;
        Ok(Decision::Proxy)
    }

    /// upstream_request_filter's work, shared with the HTTP/1 driver (`crate::front`): strip
    /// what a client could spoof, apply the binding's credential and the upstream target,
    /// inject the identity, set the forwarding headers. Pingora's path edits its request
    /// header; the driver a [`headers::Relayed`] head.
    pub(crate) fn prepare_upstream(
        &self,
        req: &mut impl headers::UpstreamHead,
        ctx: &Ctx,
        peer: Option<IpAddr>,
        tls: bool,
    ) -> Result<()> {
        let settings = UpstreamSettings {
            names: &self.config.identity_headers,
            as_token: self.binder.as_token(),
            now_secs: self.clock.now_secs(),
            trust_forwarded: self.config.listen.trust_forwarded_headers,
        };
        upstream_edits(req, ctx, &settings, peer, tls)
    }
}

/// What [`upstream_edits`] takes from the gateway.
pub(crate) struct UpstreamSettings<'a> {
    pub names: &'a crate::config::IdentityHeaders,
    /// The application service's token (for masquerading requests).
    pub as_token: Option<&'a crate::config::Secret>,
    /// Now, for the identity signature.
    pub now_secs: u64,
    /// `listen.trust_forwarded_headers`.
    pub trust_forwarded: bool,
}

/// [`Gateway::prepare_upstream`]'s edits, on either head type.
pub(crate) fn upstream_edits(
    req: &mut impl headers::UpstreamHead,
    ctx: &Ctx,
    settings: &UpstreamSettings<'_>,
    peer: Option<IpAddr>,
    tls: bool,
) -> Result<()> {
    let names = settings.names;
    let client_route = ctx.route != Some(RouteClass::Federation);
    headers::strip(req, names, client_route);
    // The credential of this request: the binding's own, or the application service's for
    // the one request `guard` admitted as such.
    let credential = ctx.bound.as_deref().map(|b| {
        if ctx.as_appservice {
            &Credential::Masquerade
        } else {
            &b.credential
        }
    });
    let assert = ctx.bound.as_deref().and_then(|b| match credential {
        Some(Credential::Masquerade) => Some(target::Assert {
            user_id: &b.user_id,
            device_id: b.device_id.as_deref(),
        }),
        _ => None,
    });
    if let Some(t) = target::upstream(req.raw_path(), ctx.query.as_ref(), assert) {
        req.set_raw_path(t.as_bytes())?;
    }
    if let Some(credential) = credential {
        headers::bind(req, credential, settings.as_token)?;
    }
    if let Some(identity) = &ctx.identity {
        headers::inject(req, names, identity, settings.now_secs)?;
    }
    if let ctx::RequestBody::Replaced(body) = &ctx.request_body {
        req.remove(&http::header::TRANSFER_ENCODING);
        req.remove(&http::header::EXPECT);
        req.set(&http::header::CONTENT_LENGTH, body.len().to_string())?;
    }
    rewrite::prepare_request(req, ctx);
    let client_ip = peer.map(headers::ip_text);
    headers::forwarded(req, client_ip, tls, settings.trust_forwarded)
}

/// The TCP peer's address (`None` for a Unix-socket peer).
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// What request_filter decided.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Forward to the homeserver.
    Proxy,
    /// Answer a CORS preflight.
    Preflight,
    /// Answer an endpoint the gateway serves itself.
    Serve(Served),
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::counted(&self.in_flight)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        observe::ensure_request_id(session.req_header_mut());
        if self.in_flight.is_draining() {
            // Stopping or handing over: this connection's next request goes to a new one.
            session.set_keepalive(None);
        }
        let peer = peer_ip(session);
        match self.admit(session.req_header(), peer, ctx).await {
            Ok(Decision::Proxy) if matches!(ctx.request_body, ctx::RequestBody::PasswordStage) => {
                match guard::password_stage(self, session, ctx).await {
                    Ok(()) => Ok(false),
                    Err(err) => self.refuse(session, ctx, err).await,
                }
            }
            Ok(Decision::Proxy) => Ok(false),
            Ok(Decision::Preflight) => {
                respond::json_response(session, 200, &respond::Empty {}, &[]).await?;
                Ok(true)
            }
            Ok(Decision::Serve(what)) => self.serve(session, ctx, what).await,
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
        let peer = peer_ip(session);
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        self.prepare_upstream(req, ctx, peer, tls)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let ctx::RequestBody::Replaced(replacement) = &ctx.request_body {
            // The client's body was read whole before proxying (Pingora replays it here at
            // once); what goes upstream is the replacement, once, at the end.
            *body = Some(if end_of_stream {
                replacement.clone()
            } else {
                Bytes::new()
            });
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        rewrite::response_header(self, resp, ctx).await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(id) = session
            .req_header()
            .headers
            .get(observe::REQUEST_ID)
            .cloned()
        {
            resp.insert_header(observe::REQUEST_ID, id)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        rewrite::response_body(body, end_of_stream, ctx);
        Ok(None)
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
            // Pingora does not reuse the client connection after a failed proxy attempt: say
            // so, or a keep-alive client writes its next request into a closing connection
            // (bench/soak.sh lost every second request while the homeserver was down).
            session.set_keepalive(None);
            if let Err(write_err) = respond::error(session, &err, &self.error_settings()).await {
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
        let status = session.response_written().map(|r| r.status.as_u16());
        guard::release_claim(self, ctx, status).await;
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

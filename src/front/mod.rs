//! The public listener's connection driver (a Pingora `ServerApp`), in front of Pingora's proxy.
//!
//! ```text
//!  connection ─► read head ─┬─ relayable (head.rs) ─► Gateway::admit ─► Gateway::prepare_upstream
//!                           │                         (request_filter's     (upstream_request_filter's
//!                           │                          steps)                work)
//!                           │                     ─► relay.rs: pooled homeserver connection,
//!                           │                        answer passed through ─► observe::record
//!                           └─ anything else ─────► Pingora's proxy (Gateway as ProxyHttp), with
//!                                                   the bytes read so far; the connection comes
//!                                                   back here if it stays open
//! ```
//!
//! Why: Pingora's generic proxy costs about 75 allocations, a boxed future per phase, channels
//! and a task per reused upstream connection per request (bench/README.md); this path reads,
//! forwards, reads and writes once per request on one task, as nginx does. It runs the same
//! admission, header and logging code as Pingora's path, so both give the same answers; it only
//! takes requests whose framing is trivial (see `head`), and only towards a plain-HTTP
//! homeserver (a TLS homeserver is served by Pingora's path alone). HTTP/2 goes to Pingora.

mod deadline;
mod head;
pub(crate) mod pool;
mod relay;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::GatewayError;
use crate::gateway::ctx::Ctx;
use crate::gateway::{classify, headers};
use crate::gateway::{observe, Decision, Gateway};

/// How long a connection may stay idle between requests, and the longest a request head may
/// take to arrive (Pingora's keep-alive default).
const KEEPALIVE: Duration = Duration::from_secs(60);

/// The public listener's application.
pub struct Front {
    gateway: Gateway,
    proxy: Arc<HttpProxy<Gateway>>,
    /// The homeserver's connections; `None` for a TLS homeserver (Pingora serves everything).
    pool: Option<Arc<pool::Pool>>,
}

impl Front {
    /// The driver for `gateway`, handing what it does not relay to `proxy` (Pingora's proxy
    /// around a clone of the same gateway).
    pub fn new(gateway: Gateway, proxy: HttpProxy<Gateway>) -> Self {
        let up = &gateway.upstream;
        let pool = (!up.tls()).then(|| {
            Arc::new(pool::Pool::new(
                up.addr(),
                up.connect_timeout(),
                up.read_timeout(),
            ))
        });
        Self {
            gateway,
            proxy: Arc::new(proxy),
            pool,
        }
    }

    /// The homeserver connection pool, for the background sweep.
    pub(crate) fn pool(&self) -> Option<Arc<pool::Pool>> {
        self.pool.clone()
    }

    /// Relays one request and answers it; whether the connection takes another.
    async fn relay(&self, pool: &pool::Pool, conn: &mut Connection, req: head::Request) -> bool {
        let gw = &self.gateway;
        let mut header = req.header;
        let mut ctx = Ctx::counted(&gw.in_flight);
        observe::ensure_request_id(&mut header);
        let request_id = header.headers.get(&observe::REQUEST_ID_NAME).cloned();
        let answer = relay::Answer {
            request_id: request_id.as_ref(),
            head_only: header.method == http::Method::HEAD,
            close: req.close || gw.in_flight.is_draining() || *conn.shutdown.borrow(),
        };
        let admitted = match classify::target_parts(&header.method, header.raw_path()) {
            Ok((method, path)) => {
                let route = classify::Route {
                    class: req.class,
                    method,
                    path,
                    special: req.special,
                };
                gw.admit_route(&header, route, conn.peer, &mut ctx).await
            }
            Err(e) => Err(e),
        };
        let done = match admitted {
            // `head` keeps out the routes whose body or answer the gateway handles (the
            // cross-signing upload, `/versions`, `/capabilities`); checked again here, so that
            // a change there cannot make the driver skip that handling.
            Ok(Decision::Proxy) if !relayable(&ctx) => {
                tracing::error!("a request that needs Pingora's path reached the driver");
                // What the cross-signing guard claimed is given back, as Pingora's `logging`
                // would.
                crate::gateway::guard::release_claim(gw, &ctx, None).await;
                internal(gw, conn, &mut ctx, &answer).await
            }
            Ok(Decision::Proxy) => {
                let mut upstream = headers::Relayed::new(&header);
                match gw.prepare_upstream(&mut upstream, &ctx, conn.peer, conn.tls) {
                    Ok(()) => {
                        relay::exchange(gw, pool, &mut conn.stream, &upstream, &mut ctx, &answer)
                            .await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not prepare the upstream request");
                        internal(gw, conn, &mut ctx, &answer).await
                    }
                }
            }
            // `head` lets through proxied routes only, which `admit` never answers itself.
            Ok(_) => internal(gw, conn, &mut ctx, &answer).await,
            Err(err) => relay::refuse(gw, &mut conn.stream, &mut ctx, err, &answer).await,
        };
        observe::record(&header, done.status, done.failed, &ctx);
        done.keep_alive
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let pool = match &self.pool {
            Some(pool) if !matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) => pool,
            _ => return ServerApp::process_new(&self.proxy, stream, shutdown).await,
        };
        let options = classify::Options::of(&self.gateway.config);
        let mut conn = Connection::new(stream, shutdown.clone());
        let mut reused = false;
        loop {
            match conn.read_head(options, reused).await {
                Head::Closed => return None,
                Head::Relay(req) => {
                    if !self.relay(pool, &mut conn, *req).await {
                        conn.stream.shutdown().await.ok();
                        return None;
                    }
                }
                Head::Other => {
                    let (stream, prefix) = (conn.stream, conn.buf);
                    let mut session = ServerSession::new_http1(stream);
                    session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE.as_secs()));
                    if !prefix.is_empty() {
                        session.set_pipelined_prefix(prefix);
                    }
                    let (stream, _) = self
                        .proxy
                        .process_new_http(session, shutdown)
                        .await?
                        .consume();
                    conn = Connection::new(stream, shutdown.clone());
                }
            }
            reused = true;
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

/// Answers 500 `M_UNKNOWN` for a request the driver cannot serve after all.
async fn internal(
    gw: &Gateway,
    conn: &mut Connection,
    ctx: &mut Ctx,
    answer: &relay::Answer<'_>,
) -> relay::Done {
    relay::refuse(gw, &mut conn.stream, ctx, GatewayError::Internal, answer).await
}

/// Whether what `admit` decided leaves nothing for Pingora's path to do with the body or the
/// answer.
fn relayable(ctx: &Ctx) -> bool {
    matches!(
        ctx.request_body,
        crate::gateway::ctx::RequestBody::Forwarded
    ) && !ctx.cross_signing_claim
        && !ctx.as_appservice
        && matches!(
            ctx.special,
            crate::gateway::classify::Special::None
                | crate::gateway::classify::Special::JoinedMembers
        )
}

/// What came in on a connection.
enum Head {
    /// The client closed it, went idle too long, or the server is stopping.
    Closed,
    /// A request the driver relays.
    Relay(Box<head::Request>),
    /// A request for Pingora's proxy (its bytes so far are in the buffer).
    Other,
}

/// A client connection between requests.
struct Connection {
    stream: Stream,
    /// Bytes read and not yet served (a pipelined request's).
    buf: BytesMut,
    shutdown: ShutdownWatch,
    peer: Option<IpAddr>,
    tls: bool,
}

impl Connection {
    fn new(stream: Stream, shutdown: ShutdownWatch) -> Self {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let tls = stream.get_ssl_digest().is_some();
        Self {
            stream,
            buf: BytesMut::with_capacity(4096),
            shutdown,
            peer,
            tls,
        }
    }

    /// Reads until a whole head is buffered. Between requests of a reused connection, a
    /// stopping server closes it.
    async fn read_head(&mut self, options: classify::Options<'_>, reused: bool) -> Head {
        let deadline = tokio::time::Instant::now() + KEEPALIVE;
        loop {
            if !self.buf.is_empty() {
                match head::parse(&self.buf, options) {
                    head::Parsed::Relay(req, len) => {
                        self.buf.advance(len);
                        return Head::Relay(req);
                    }
                    head::Parsed::Other => return Head::Other,
                    head::Parsed::Incomplete if self.buf.len() >= head::MAX_HEAD => {
                        return Head::Other
                    }
                    head::Parsed::Incomplete => {}
                }
            }
            let idle = reused && self.buf.is_empty();
            if idle && *self.shutdown.borrow() {
                return Head::Closed;
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
            let n = if idle {
                tokio::select! {
                    biased;
                    n = read => n,
                    _ = self.shutdown.changed() => return Head::Closed,
                }
            } else {
                read.await
            };
            match n {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Head::Closed,
            }
        }
    }
}

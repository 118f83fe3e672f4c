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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pingora::http::RequestHeader;

    use crate::auth::{Access, IdentityParts};
    use crate::binding::{Bound, Credential};
    use crate::config::{IdentityHeaders, Secret};
    use crate::gateway::classify::{self, RouteClass};
    use crate::gateway::ctx::Ctx;
    use crate::gateway::{headers, target, upstream_edits, UpstreamSettings};

    use super::head;

    /// A head as Pingora's HTTP/1 server parses it (names in their case, every header kept).
    fn as_pingora_parses(raw: &[u8]) -> RequestHeader {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        req.parse(raw).unwrap();
        let mut header =
            RequestHeader::build(req.method.unwrap(), req.path.unwrap().as_bytes(), None).unwrap();
        for h in req.headers.iter() {
            header
                .append_header(
                    h.name.to_owned(),
                    http::HeaderValue::from_bytes(h.value).unwrap(),
                )
                .unwrap();
        }
        header
    }

    /// What goes on the wire, read back: the target and the headers (lower-case names,
    /// sorted), hop-by-hop headers left out (Pingora's proxy drops them on its own path).
    fn read_back(wire: &[u8]) -> (String, Vec<(String, String)>) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert_eq!(
            req.parse(wire).unwrap(),
            httparse::Status::Complete(wire.len()),
            "{}",
            String::from_utf8_lossy(wire)
        );
        let mut headers: Vec<_> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .filter(|(n, _)| n != "connection")
            .collect();
        headers.sort();
        (req.path.unwrap().to_owned(), headers)
    }

    /// The driver and Pingora's path run the same edits (`upstream_edits`) on their own head
    /// types, each from its own parse of the client's bytes. For spoofed identity headers in
    /// every spelling, repeats, a client `Authorization`, forwarding headers, targets that are
    /// and are not rewritten, every binding and both route kinds, the homeserver gets the same
    /// target and the same headers from both.
    #[test]
    fn the_driver_forwards_exactly_what_pingoras_path_forwards() {
        let spoofs = "Authorization: Bearer client-token\r\n\
                      X-Matrix-User-Id: @mallory:example.org\r\n\
                      x-matrix-user-id: @eve:example.org\r\n\
                      X_Matrix_Device_Id: EVIL\r\n\
                      X-MATRIX-SCOPE: urn:matrix:client:api:*\r\n\
                      x-matrix-guest: false\r\n\
                      X-OIDC-Subject: sub-m\r\n\
                      X-Matrix-Identity-Signature: t=1,v1=00\r\n\
                      X-Remote-User: root\r\n\
                      X-Forwarded-For: 203.0.113.9\r\n\
                      X-Forwarded-For: 198.51.100.7, 192.0.2.1\r\n\
                      X-Forwarded-Proto: https\r\n\
                      Accept-Encoding: gzip\r\n";
        let targets = [
            "/_matrix/client/v3/sync",
            "/_matrix/client/v3/sync?since=s1&timeout=0",
            // Rewritten: the token leaves the query, the separator is normalised.
            "/_matrix/client/v3/sync?access_token=t&since=s1;timeout=0",
            // An application service's parameter a client may not send.
            "/_matrix/client/v3/rooms/!r:example.org/joined_members?user_id=@m:example.org",
            "/_matrix/federation/v1/version",
        ];
        let alice = || {
            Arc::new(
                IdentityParts {
                    user_id: "@alice:example.org".into(),
                    device_id: Some("DEV".into()),
                    scope: "urn:matrix:client:api:* urn:matrix:client:device:DEV".into(),
                    access: Access::Full,
                    issuer: "https://op".into(),
                    subject: "sub-a".into(),
                    session_id: None,
                    expires_at_ms: None,
                    token_id: None,
                    issued_at_ms: 0,
                }
                .into(),
            )
        };
        let bound = |credential| {
            Arc::new(Bound {
                user_id: "@alice:example.org".into(),
                device_id: Some("DEV".into()),
                credential,
            })
        };
        // (bound, acting as the application service)
        let bindings = [
            (None, false),
            (
                Some(bound(Credential::DeviceToken("upstream-token".into()))),
                false,
            ),
            (Some(bound(Credential::Masquerade)), false),
            (Some(bound(Credential::None)), false),
            (
                Some(bound(Credential::DeviceToken("upstream-token".into()))),
                true,
            ),
        ];
        let as_token = Secret::new("as-token");
        let options = classify::Options {
            backchannel_logout_path: "/_matrix/gateway/backchannel_logout",
            ..Default::default()
        };
        let mut cases = 0;
        for target_text in targets {
            for with_spoofs in [false, true] {
                let raw = format!(
                    "GET {target_text} HTTP/1.1\r\nHost: hs.example.org\r\n{}User-Agent: t/1\r\n\r\n",
                    if with_spoofs { spoofs } else { "" }
                );
                let head::Parsed::Relay(driver_req, _) = head::parse(raw.as_bytes(), options)
                else {
                    panic!("the driver does not take {raw:?}");
                };
                let pingora_req = as_pingora_parses(raw.as_bytes());
                for (bound, as_appservice) in &bindings {
                    for identity in [Some(alice()), None] {
                        for signing in [false, true] {
                            for (peer, tls, trust) in [
                                (Some("192.0.2.44".parse().unwrap()), false, false),
                                (Some("2001:db8::7".parse().unwrap()), true, false),
                                (Some("192.0.2.44".parse().unwrap()), false, true),
                                (None, false, false),
                            ] {
                                let mut ctx = Ctx::new();
                                ctx.route = Some(driver_req.class);
                                ctx.special = driver_req.special;
                                ctx.identity = identity.clone();
                                ctx.bound = bound.clone();
                                ctx.as_appservice = *as_appservice;
                                ctx.query = target::parse(target_text.as_bytes()).unwrap().query;
                                let names = IdentityHeaders::for_tests(signing);
                                let settings = UpstreamSettings {
                                    names: &names,
                                    as_token: Some(&as_token),
                                    now_secs: 1_700_000_000,
                                    trust_forwarded: trust,
                                };

                                let mut pingora = pingora_req.clone();
                                upstream_edits(&mut pingora, &ctx, &settings, peer, tls).unwrap();
                                let mut pingora_wire = format!(
                                    "GET {} HTTP/1.1\r\n",
                                    String::from_utf8_lossy(pingora.raw_path())
                                )
                                .into_bytes();
                                pingora.header_to_h1_wire(&mut pingora_wire);
                                pingora_wire.extend_from_slice(b"\r\n");

                                let mut driver = headers::Relayed::new(&driver_req.header);
                                upstream_edits(&mut driver, &ctx, &settings, peer, tls).unwrap();
                                let mut driver_wire = Vec::new();
                                driver.write_h1(&mut driver_wire);

                                let (path, sent) = read_back(&driver_wire);
                                let expected = read_back(&pingora_wire);
                                assert_eq!(
                                    (&path, &sent),
                                    (&expected.0, &expected.1),
                                    "{target_text}, spoofs {with_spoofs}, {bound:?}, \
                                     as {as_appservice}, {peer:?}, tls {tls}, trust {trust}"
                                );
                                if with_spoofs && driver_req.class != RouteClass::Federation {
                                    assert!(!sent.iter().any(|(_, v)| v.contains("mallory")
                                        || v.contains("EVIL")
                                        || v.contains("client-token")
                                        || v == "root"));
                                }
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 5 * 2 * 5 * 2 * 2 * 4);
    }
}

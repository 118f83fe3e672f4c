//! The admin listener (loopback by default): `/healthz` (liveness), `/readyz` (readiness) and
//! the admin API under `/admin/v1/` (bearer token from `admin.token`, compared in constant time;
//! described by `docs/admin-api.openapi.yaml`). Never on the public listener.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::{Deserialize, Serialize};

use crate::auth::identity::valid_localpart;
use crate::auth::Verifier;
use crate::clock::SharedClock;
use crate::config::{BindingMode, Config};
use crate::error::{GatewayError, MatrixError};
use crate::metrics;
use crate::notify::{Notifier, Purge, Source};
use crate::store::redis::Redis;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The admin HTTP application.
pub struct AdminApp {
    config: Arc<Config>,
    verifier: Arc<Verifier>,
    notifier: Arc<Notifier>,
    clock: SharedClock,
    redis: Option<Redis>,
    /// Admin calls count as in flight, so a shutdown does not cut an operator's sign-out off.
    traffic: Option<crate::gateway::ctx::InFlight>,
}

impl AdminApp {
    /// Creates the app.
    pub fn new(
        config: Arc<Config>,
        verifier: Arc<Verifier>,
        notifier: Arc<Notifier>,
        clock: SharedClock,
    ) -> Self {
        Self {
            config,
            verifier,
            notifier,
            clock,
            redis: None,
            traffic: None,
        }
    }

    /// Adds the shared-state check to readiness.
    pub fn with_redis(mut self, redis: Option<Redis>) -> Self {
        self.redis = redis;
        self
    }

    /// Counts admin calls in `traffic` (the drain on shutdown waits for them).
    pub fn with_traffic(mut self, traffic: crate::gateway::ctx::InFlight) -> Self {
        self.traffic = Some(traffic);
        self
    }

    /// Readiness checks: `(name, ok)`.
    pub async fn readiness(&self) -> Vec<(&'static str, bool)> {
        let mut checks = vec![("config", true)];
        let op = self.verifier.op();
        let needs_metadata = op.issuer().introspection_endpoint.is_none();
        checks.push(("op_metadata", !needs_metadata || op.metadata().is_some()));
        let jwks = self.verifier.jwt_issuers().iter().all(|i| i.keys_loaded());
        checks.push(("jwks", jwks));
        let hs = &self.config.homeserver;
        let reachable = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((hs.host.as_str(), hs.port)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        checks.push(("homeserver", reachable));
        if let Some(r) = &self.redis {
            checks.push(("redis", r.ping().await));
        }
        checks
    }
}

fn json_response(status: u16, body: &impl Serialize) -> Response<Vec<u8>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", bytes.len())
        .header("Cache-Control", "no-store")
        .body(bytes)
        .unwrap_or_default()
}

/// An admin API error, rendered as Matrix JSON.
#[derive(Debug)]
struct ApiError {
    status: u16,
    body: MatrixError,
}

impl ApiError {
    fn into_response(self) -> Response<Vec<u8>> {
        json_response(self.status, &self.body)
    }
}

/// A successful admin answer: 200 and its typed body.
type ApiResult = Result<Response<Vec<u8>>, ApiError>;

fn ok(body: &impl Serialize) -> ApiResult {
    Ok(json_response(200, body))
}

fn error(
    status: u16,
    errcode: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ApiError {
    ApiError {
        status,
        body: MatrixError::new(errcode, message),
    }
}

fn gateway_error(e: &GatewayError) -> ApiError {
    ApiError {
        status: e.status(),
        body: e.matrix_error(),
    }
}

fn store_unavailable() -> ApiError {
    error(503, "M_UNKNOWN", "state store unavailable")
}

// Request bodies (docs/admin-api.openapi.yaml). Fields are optional here so that a missing one
// is named in a 400 `M_MISSING_PARAM`; a field of the wrong type is a 400 `M_BAD_JSON`.

#[derive(Debug, Default, Deserialize)]
struct RevokeSession {
    user_id: Option<String>,
    device_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PurgeRequest {
    token: Option<String>,
    sub: Option<String>,
    user_id: Option<String>,
    issuer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Deactivate {
    #[serde(default)]
    erase: bool,
}

#[derive(Debug, Default, Deserialize)]
struct Repin {
    sub: Option<String>,
    issuer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ApproveReset {
    valid_for_secs: Option<u64>,
}

// Answers.

#[derive(Debug, Serialize)]
struct SignedOut {
    purged: usize,
    signed_out: usize,
}

#[derive(Debug, Serialize)]
struct Purged {
    purged: usize,
}

#[derive(Debug, Serialize)]
struct UserDevices<T: Serialize> {
    user_id: String,
    devices: T,
}

/// A user's compat sessions (legacy login).
#[derive(Debug, Serialize)]
struct UserCompatSessions {
    user_id: String,
    sessions: Vec<CompatSessionView>,
}

/// One compat session, as the admin API shows it (never a token or its hash).
#[derive(Debug, Serialize)]
struct CompatSessionView {
    device_id: Option<String>,
    issuer: String,
    subject: String,
    op_session: Option<String>,
    ends_at_ms: u64,
    refreshable: bool,
    op_grant: bool,
}

#[derive(Debug, Serialize)]
struct Deactivated<M: Serialize> {
    user_id: String,
    deactivated: bool,
    mechanism: M,
}

#[derive(Debug, Serialize)]
struct Lifted {
    user_id: String,
    lifted: bool,
}

#[derive(Debug, Serialize)]
struct Repinned<'a> {
    user_id: String,
    sub: &'a str,
    issuer: String,
}

#[derive(Debug, Serialize)]
struct ResetApproved {
    user_id: String,
    valid_until_ms: u64,
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
}

#[derive(Debug, Serialize)]
struct Readiness {
    status: &'static str,
    checks: std::collections::BTreeMap<&'static str, bool>,
}

/// The body of an admin request: small JSON of type `T` (an absent or blank body is `T`'s
/// default).
async fn read_json<T: serde::de::DeserializeOwned + Default>(
    session: &mut ServerSession,
) -> Result<T, ApiError> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > 64 * 1024 {
                    return Err(error(413, "M_TOO_LARGE", "body too large"));
                }
            }
            Ok(None) => break,
            Err(_) => return Err(error(400, "M_BAD_JSON", "cannot read the body")),
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let Ok(object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
    else {
        return Err(error(400, "M_BAD_JSON", "the body must be a JSON object"));
    };
    // `null` is not "absent": `{"sub": "x", "issuer": null}` must not mean the primary issuer.
    if let Some((k, _)) = object.iter().find(|(_, v)| v.is_null()) {
        return Err(error(
            400,
            "M_INVALID_PARAM",
            format!("`{k}` must not be null (leave it out instead)"),
        ));
    }
    serde_json::from_value::<T>(serde_json::Value::Object(object))
        .map_err(|e| error(400, "M_BAD_JSON", format!("the body is not valid: {e}")))
}

/// A required, non-empty string field.
fn required<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, ApiError> {
    value.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
        error(
            400,
            "M_MISSING_PARAM",
            format!("`{name}` (a non-empty string) is required"),
        )
    })
}

impl AdminApp {
    fn authorised(&self, session: &ServerSession) -> Result<(), ApiError> {
        let Some(expected) = &self.config.admin_token else {
            return Err(error(
                404,
                "M_UNRECOGNIZED",
                "the admin API is disabled: set admin.token",
            ));
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| error(401, "M_MISSING_TOKEN", "admin bearer token required"))?;
        // Hash both sides so the comparison takes the same time whatever the lengths.
        let a = Sha256::digest(presented.as_bytes());
        let b = Sha256::digest(expected.expose().as_bytes());
        if bool::from(a.ct_eq(&b)) {
            Ok(())
        } else {
            Err(error(401, "M_UNKNOWN_TOKEN", "wrong admin token"))
        }
    }

    fn user_id(&self, raw: &str) -> Result<String, ApiError> {
        let decoded: String = form_urlencoded::parse(format!("u={raw}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let lp = decoded
            .strip_prefix('@')
            .and_then(|r| r.strip_suffix(&format!(":{}", self.config.homeserver.server_name)));
        let hs = &self.config.homeserver;
        match lp {
            // Signing out or deactivating the appservice's own user would disable the gateway.
            Some(lp) if hs.binding != BindingMode::Headers && lp == hs.appservice_sender => {
                Err(error(
                    400,
                    "M_INVALID_PARAM",
                    "the application service's own user ID (homeserver.appservice_sender)",
                ))
            }
            Some(lp) if valid_localpart(lp) => Ok(decoded),
            _ => Err(error(
                400,
                "M_INVALID_PARAM",
                "not a user ID of this homeserver (@localpart:server_name)",
            )),
        }
    }

    async fn api(
        &self,
        session: &mut ServerSession,
        method: &str,
        path: &str,
    ) -> Response<Vec<u8>> {
        match self.route(session, method, path).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }

    async fn route(&self, session: &mut ServerSession, method: &str, path: &str) -> ApiResult {
        use serde::de::IgnoredAny;
        self.authorised(session)?;
        let segments: Vec<&str> = path.trim_start_matches("/admin/v1/").split('/').collect();
        match (method, segments.as_slice()) {
            ("POST", ["sessions", "revoke"]) => {
                self.revoke_session(read_json(session).await?).await
            }
            ("POST", ["cache", "purge"]) => self.purge(read_json(session).await?).await,
            ("GET", ["users", user, "devices"]) => {
                read_json::<IgnoredAny>(session).await?;
                self.devices(user).await
            }
            ("GET", ["users", user, "compat_sessions"]) => {
                read_json::<IgnoredAny>(session).await?;
                self.compat_sessions(user).await
            }
            ("POST", ["users", user, "logout"]) => {
                read_json::<IgnoredAny>(session).await?;
                self.logout(user).await
            }
            ("POST", ["users", user, "deactivate"]) => {
                self.deactivate(user, read_json(session).await?).await
            }
            ("DELETE", ["users", user, "tombstone"]) => {
                read_json::<IgnoredAny>(session).await?;
                self.lift(user).await
            }
            ("PUT", ["users", user, "subject"]) => {
                self.repin(user, read_json(session).await?).await
            }
            ("POST", ["users", user, "cross_signing_reset"]) => {
                self.approve_reset(user, read_json(session).await?).await
            }
            _ => {
                read_json::<IgnoredAny>(session).await?;
                Err(error(404, "M_UNRECOGNIZED", "unknown admin endpoint"))
            }
        }
    }

    async fn revoke_session(&self, body: RevokeSession) -> ApiResult {
        let user = self.user_id(required(&body.user_id, "user_id")?)?;
        let device = required(&body.device_id, "device_id")?;
        let out = self
            .notifier
            .revoke_device(&user, device, Source::Admin)
            .await
            .map_err(|e| gateway_error(&e))?;
        ok(&SignedOut {
            purged: out.purged,
            signed_out: out.devices.len(),
        })
    }

    async fn purge(&self, body: PurgeRequest) -> ApiResult {
        let what = match (&body.token, &body.sub, &body.user_id, &body.issuer) {
            (Some(_), None, None, None) => Purge::Token(required(&body.token, "token")?.to_owned()),
            (None, Some(_), None, _) => Purge::Subject(
                self.issuer(body.issuer.as_deref())?,
                required(&body.sub, "sub")?.to_owned(),
            ),
            (None, None, Some(_), None) => {
                Purge::User(self.user_id(required(&body.user_id, "user_id")?)?)
            }
            _ => {
                return Err(error(
                    400,
                    "M_INVALID_PARAM",
                    "give exactly one of `token`, `sub`, `user_id` (and `issuer` only with `sub`)",
                ))
            }
        };
        let n = self
            .notifier
            .purge(what)
            .await
            .map_err(|e| gateway_error(&e))?;
        ok(&Purged { purged: n })
    }

    async fn devices(&self, user: &str) -> ApiResult {
        let user = self.user_id(user)?;
        let devices = self
            .notifier
            .binder()
            .store()
            .devices_of(&user)
            .await
            .map_err(|_| store_unavailable())?;
        ok(&UserDevices {
            user_id: user,
            devices,
        })
    }

    async fn compat_sessions(&self, user: &str) -> ApiResult {
        let user = self.user_id(user)?;
        let Some(compat) = self.verifier.compat() else {
            return Err(error(
                404,
                "M_UNRECOGNIZED",
                "the compatibility layer ([compat]) is off",
            ));
        };
        let sessions = compat
            .sessions_of(&user)
            .await
            .map_err(|_| store_unavailable())?;
        ok(&UserCompatSessions {
            user_id: user,
            sessions: sessions
                .iter()
                .map(|l| CompatSessionView {
                    device_id: l.identity().device_id().map(str::to_owned),
                    issuer: l.identity().issuer.to_string(),
                    subject: l.identity().subject().to_owned(),
                    op_session: l.identity().session_id().map(str::to_owned),
                    ends_at_ms: l.ends_at_ms(),
                    refreshable: l.refreshable(),
                    op_grant: l.op_grant(),
                })
                .collect(),
        })
    }

    async fn logout(&self, user: &str) -> ApiResult {
        let user = self.user_id(user)?;
        let out = self
            .notifier
            .logout_user(&user, Source::Admin)
            .await
            .map_err(|e| gateway_error(&e))?;
        ok(&SignedOut {
            purged: out.purged,
            signed_out: out.devices.len(),
        })
    }

    async fn deactivate(&self, user: &str, body: Deactivate) -> ApiResult {
        let user = self.user_id(user)?;
        let mechanism = self
            .notifier
            .deactivate(&user, body.erase)
            .await
            .map_err(|e| gateway_error(&e))?;
        ok(&Deactivated {
            user_id: user,
            deactivated: true,
            mechanism,
        })
    }

    async fn lift(&self, user: &str) -> ApiResult {
        let user = self.user_id(user)?;
        let lifted = self
            .notifier
            .binder()
            .lift_tombstone(&user)
            .await
            .map_err(|e| gateway_error(&e))?;
        ok(&Lifted {
            user_id: user,
            lifted,
        })
    }

    async fn repin(&self, user: &str, body: Repin) -> ApiResult {
        let user = self.user_id(user)?;
        let sub = required(&body.sub, "sub")?;
        let issuer = self.issuer(body.issuer.as_deref())?;
        self.notifier
            .binder()
            .repin(&user, &issuer, sub)
            .await
            .map_err(|e| gateway_error(&e))?;
        ok(&Repinned {
            user_id: user,
            sub,
            issuer,
        })
    }

    /// The optional `issuer` of a body naming a subject: one of the configured issuers,
    /// the primary one when absent (subjects are only unique per issuer).
    fn issuer(&self, given: Option<&str>) -> Result<String, ApiError> {
        match given {
            None => Ok(self.notifier.binder().primary_issuer().to_owned()),
            Some(i) if self.config.issuers.iter().any(|c| c.issuer == i) => Ok(i.to_owned()),
            Some(_) => Err(error(
                400,
                "M_INVALID_PARAM",
                "`issuer` must be one of the configured issuers",
            )),
        }
    }

    async fn approve_reset(&self, user: &str, body: ApproveReset) -> ApiResult {
        let user = self.user_id(user)?;
        let secs = match body.valid_for_secs {
            None => 600,
            Some(s) if (1..=3600).contains(&s) => s,
            Some(_) => {
                return Err(error(
                    400,
                    "M_INVALID_PARAM",
                    "`valid_for_secs` must be 1..=3600",
                ))
            }
        };
        let until_ms = self.clock.now_ms() + secs * 1000;
        self.notifier
            .binder()
            .store()
            .approve_cross_signing_reset(&user, until_ms)
            .await
            .map_err(|_| store_unavailable())?;
        ok(&ResetApproved {
            user_id: user,
            valid_until_ms: until_ms,
        })
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let _counted = self.traffic.as_ref().map(|t| t.enter());
        let path = session.req_header().uri.path().to_owned();
        let method = session.req_header().method.as_str().to_owned();
        if path.starts_with("/admin/v1/") {
            return self.api(session, &method, &path).await;
        }
        match path.as_str() {
            "/metrics" => {
                metrics::CACHE_ENTRIES.set(self.verifier.cached_entries() as i64);
                metrics::REVOCATIONS.set(self.verifier.revocations().len() as i64);
                metrics::BINDINGS.set(self.notifier.binder().bindings_held() as i64);
                if let Some(r) = &self.redis {
                    metrics::REDIS_UP.set(i64::from(r.ping().await));
                }
                let body = metrics::render();
                Response::builder()
                    .status(200)
                    .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    .header("Content-Length", body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            "/healthz" => json_response(200, &Health { status: "ok" }),
            "/readyz" => {
                let checks: std::collections::BTreeMap<_, _> =
                    self.readiness().await.into_iter().collect();
                let ready = checks.values().all(|ok| *ok);
                let body = Readiness {
                    status: if ready { "ready" } else { "not_ready" },
                    checks,
                };
                json_response(if ready { 200 } else { 503 }, &body)
            }
            _ => error(404, "M_UNRECOGNIZED", "Unknown admin endpoint").into_response(),
        }
    }
}

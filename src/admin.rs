//! The admin listener (loopback by default): `/healthz` (liveness), `/readyz` (readiness) and,
//! as the other issues land, `/metrics` and the admin API. Never on the public listener.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::auth::Verifier;
use crate::config::Config;

/// The admin HTTP application.
pub struct AdminApp {
    config: Arc<Config>,
    verifier: Arc<Verifier>,
}

impl AdminApp {
    /// Creates the app.
    pub fn new(config: Arc<Config>, verifier: Arc<Verifier>) -> Self {
        Self { config, verifier }
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
        checks
    }
}

fn json_response(status: u16, body: &Value) -> Response<Vec<u8>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", bytes.len())
        .header("Cache-Control", "no-store")
        .body(bytes)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        match path.as_str() {
            "/healthz" => json_response(200, &json!({"status": "ok"})),
            "/readyz" => {
                let checks = self.readiness().await;
                let ready = checks.iter().all(|(_, ok)| *ok);
                let detail: serde_json::Map<String, Value> = checks
                    .into_iter()
                    .map(|(k, ok)| (k.to_owned(), Value::Bool(ok)))
                    .collect();
                json_response(
                    if ready { 200 } else { 503 },
                    &json!({"status": if ready { "ready" } else { "not_ready" }, "checks": detail}),
                )
            }
            _ => json_response(
                404,
                &json!({"errcode": "M_UNRECOGNIZED", "error": "Unknown admin endpoint"}),
            ),
        }
    }
}

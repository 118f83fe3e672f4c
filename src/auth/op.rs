//! Talking to one OpenID Provider: OIDC discovery (cached, refreshed in the background) and
//! RFC 7662 token introspection with strictly typed answers.
//!
//! Every failure here is an [`OpFailure`] (the request path answers 503); nothing in this module
//! decides whether a token is good.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use url::Url;

use crate::config::{ClientAuthMethod, Issuer};
use crate::error::OpFailure;
use crate::metrics;

/// The parts of the OP's discovery document the gateway uses; the whole document is kept for
/// the discovery endpoints the gateway serves.
#[derive(Debug, Clone)]
pub struct OpMetadata {
    /// `issuer`, checked against the configuration.
    pub issuer: String,
    /// `introspection_endpoint`.
    pub introspection_endpoint: Option<Url>,
    /// `jwks_uri`.
    pub jwks_uri: Option<Url>,
    /// The document as received.
    pub document: Map<String, Value>,
}

/// A token endpoint answer (RFC 6749 §5.1; `id_token` from OIDC Core §3.1.3.3).
#[derive(Clone, Deserialize)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when the OP issued one.
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Seconds until the access token expires.
    #[serde(default)]
    pub expires_in: Option<i64>,
    /// The ID token, when `openid` was granted.
    #[serde(default)]
    pub id_token: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// An RFC 7662 introspection answer. Types are strict: a field of the wrong JSON type makes the
/// whole answer an OP failure. `null` counts as absent (MAS sends `"aud": null`).
#[derive(Debug, Clone, Deserialize)]
pub struct IntrospectionResponse {
    /// RFC 7662 `active`; required.
    pub active: bool,
    /// Granted scope.
    #[serde(default)]
    pub scope: Option<String>,
    /// `access_token` or `refresh_token` (or anything the OP says).
    #[serde(default)]
    pub token_type: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(default)]
    pub exp: Option<i64>,
    /// Seconds until expiry (MAS).
    #[serde(default)]
    pub expires_in: Option<i64>,
    /// Issue time, Unix seconds.
    #[serde(default)]
    pub iat: Option<i64>,
    /// Subject.
    #[serde(default)]
    pub sub: Option<String>,
    /// Matrix localpart (MAS) or the OP's user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Explicit device (MAS with `X-MAS-Supports-Device-Id: 1`).
    #[serde(default)]
    pub device_id: Option<String>,
    /// OP session.
    #[serde(default)]
    pub sid: Option<String>,
    /// Client the token was issued to.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Every member, for the configurable user-ID claims.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A client for one issuer.
pub struct OpClient {
    issuer: Issuer,
    http: reqwest::Client,
    metadata: RwLock<Option<Arc<OpMetadata>>>,
    refreshing: Mutex<()>,
    /// Introspection slots (`max_concurrent_introspections`).
    slots: tokio::sync::Semaphore,
    /// Requests waiting for a slot now.
    waiting: AtomicUsize,
}

/// Gives back the waiting place when a waiter leaves (with a slot, shed, or cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl OpClient {
    /// Creates the client; no network traffic yet.
    pub fn new(issuer: Issuer) -> Result<Self, reqwest::Error> {
        let http = crate::http_client::build(issuer.timeout)?;
        Ok(Self {
            slots: tokio::sync::Semaphore::new(issuer.max_concurrent_introspections),
            waiting: AtomicUsize::new(0),
            issuer,
            http,
            metadata: RwLock::new(None),
            refreshing: Mutex::new(()),
        })
    }

    /// The configured issuer.
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// The last discovery document read, if any.
    pub fn metadata(&self) -> Option<Arc<OpMetadata>> {
        self.metadata.read().ok().and_then(|m| m.clone())
    }

    /// Reads the discovery document now and keeps it on success.
    pub async fn refresh_metadata(&self) -> Result<Arc<OpMetadata>, OpFailure> {
        let _guard = self.refreshing.lock().await;
        let body = self.get_json(self.issuer.discovery_url.clone()).await?;
        let Value::Object(document) = body else {
            return Err(OpFailure::InvalidBody);
        };
        let issuer = document
            .get("issuer")
            .and_then(Value::as_str)
            .ok_or(OpFailure::BadMetadata)?
            .to_owned();
        if issuer != self.issuer.issuer {
            tracing::error!(
                configured = %self.issuer.issuer,
                advertised = %issuer,
                "discovery document names another issuer"
            );
            return Err(OpFailure::BadMetadata);
        }
        let introspection_endpoint = match document.get("introspection_endpoint") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Url::parse(s).map_err(|_| OpFailure::BadMetadata)?),
            Some(_) => return Err(OpFailure::BadMetadata),
        };
        let jwks_uri = match document.get("jwks_uri") {
            Some(Value::String(s)) => Some(Url::parse(s).map_err(|_| OpFailure::BadMetadata)?),
            _ => None,
        };
        let meta = Arc::new(OpMetadata {
            issuer,
            introspection_endpoint,
            jwks_uri,
            document,
        });
        if let Ok(mut slot) = self.metadata.write() {
            *slot = Some(meta.clone());
        }
        Ok(meta)
    }

    /// The discovery document as last fetched, or fetched now if it never was.
    pub async fn known_metadata(&self) -> Result<Arc<OpMetadata>, OpFailure> {
        match self.metadata() {
            Some(m) => Ok(m),
            None => self.refresh_metadata().await,
        }
    }

    /// The OP's RFC 7009 revocation endpoint, from discovery.
    pub async fn revocation_endpoint(&self) -> Result<Url, OpFailure> {
        self.endpoint("revocation_endpoint").await
    }

    /// A URL of the discovery document (`authorization_endpoint`, `token_endpoint`).
    pub async fn endpoint(&self, name: &str) -> Result<Url, OpFailure> {
        self.known_metadata()
            .await?
            .document
            .get(name)
            .and_then(Value::as_str)
            .and_then(|s| Url::parse(s).ok())
            .ok_or(OpFailure::BadMetadata)
    }

    /// How long a grant at the token endpoint may take: the issuer's timeout, and at least 10 s
    /// (an answer lost to a short timeout can be a rotated refresh token lost with it).
    pub fn grant_timeout(&self) -> std::time::Duration {
        self.issuer.timeout.max(std::time::Duration::from_secs(10))
    }

    /// A grant at the token endpoint (RFC 6749 §4.1.3, §6), authenticated with
    /// `client_secret_basic` as `client_id`. `Ok(Err(error))`: the OP refused the grant (its
    /// OAuth `error` code); `Err`: the OP could not be asked or answered nonsense.
    pub async fn token_grant(
        &self,
        client_id: &str,
        client_secret: &str,
        form: &[(&str, &str)],
    ) -> Result<Result<TokenResponse, String>, OpFailure> {
        let endpoint = self.endpoint("token_endpoint").await?;
        let resp = self
            .http
            .post(endpoint)
            .timeout(self.grant_timeout())
            // RFC 6749 §2.3.1: form-urlencode both parts before Basic encoding.
            .basic_auth(form_encode(client_id), Some(form_encode(client_secret)))
            .header("Accept", "application/json")
            .form(form)
            .send()
            .await
            .map_err(classify)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(classify)?;
        if body.len() > self.issuer.max_response_bytes {
            return Err(OpFailure::TooLarge);
        }
        if status.is_success() {
            return serde_json::from_slice::<TokenResponse>(&body)
                .map(Ok)
                .map_err(|_| OpFailure::InvalidBody);
        }
        if status.is_client_error() {
            #[derive(Deserialize)]
            struct Refusal {
                error: String,
            }
            if let Ok(r) = serde_json::from_slice::<Refusal>(&body) {
                return Ok(Err(r.error));
            }
        }
        Err(OpFailure::Status)
    }

    /// Forwards an RFC 7009 request unchanged; returns the OP's status, content type and body.
    pub async fn forward_revocation(
        &self,
        body: bytes::Bytes,
        content_type: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<(u16, Option<String>, bytes::Bytes), OpFailure> {
        let endpoint = self.revocation_endpoint().await?;
        let mut req = self.http.post(endpoint).body(body);
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.map_err(classify)?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.map_err(classify)?;
        if body.len() > self.issuer.max_response_bytes {
            return Err(OpFailure::TooLarge);
        }
        Ok((status, ct, body))
    }

    async fn introspection_endpoint(&self) -> Result<Url, OpFailure> {
        if let Some(u) = &self.issuer.introspection_endpoint {
            return Ok(u.clone());
        }
        self.known_metadata()
            .await?
            .introspection_endpoint
            .clone()
            .ok_or(OpFailure::BadMetadata)
    }

    /// RFC 7662 introspection of an access token.
    pub async fn introspect(&self, token: &str) -> Result<IntrospectionResponse, OpFailure> {
        self.introspect_as(token, "access_token", false).await
    }

    /// RFC 7662 introspection with an explicit `token_type_hint` (measured: count, latency,
    /// OP availability).
    /// `priority`: the re-check of a token known valid. It waits for a slot like any other
    /// (the bound holds) but is never shed because the queue is full.
    pub async fn introspect_as(
        &self,
        token: &str,
        hint: &str,
        priority: bool,
    ) -> Result<IntrospectionResponse, OpFailure> {
        let Ok(_slot) = self.slot(priority).await else {
            // Shed before asking: says nothing of the OP's health or latency.
            metrics::INTROSPECTIONS
                .with_label_values(&["op_overloaded"])
                .inc();
            return Err(OpFailure::Overloaded);
        };
        let started = std::time::Instant::now();
        let result = self.introspect_unmeasured(token, hint).await;
        metrics::INTROSPECTION_DURATION.observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(a) if a.active => "active",
            Ok(_) => "inactive",
            Err(f) => crate::error::GatewayError::OpUnavailable(*f).reason_label(),
        };
        metrics::INTROSPECTIONS.with_label_values(&[label]).inc();
        metrics::OP_UP.set(i64::from(result.is_ok()));
        result
    }

    /// An introspection slot: at once when one is free; else after waiting in a bounded queue
    /// (at most the OP timeout). A full queue, or no slot in time, sheds the request: the OP is
    /// not asked and the client gets 503 with `Retry-After`.
    async fn slot(&self, priority: bool) -> Result<tokio::sync::SemaphorePermit<'_>, OpFailure> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        // A priority call is not counted against the queue: only tokens the gateway vouched
        // for come here.
        let _waiting = if priority {
            None
        } else {
            if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.issuer.introspection_queue {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                return Err(OpFailure::Overloaded);
            }
            Some(Waiting(&self.waiting))
        };
        match tokio::time::timeout(self.issuer.timeout, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(OpFailure::Overloaded),
        }
    }

    async fn introspect_unmeasured(
        &self,
        token: &str,
        hint: &str,
    ) -> Result<IntrospectionResponse, OpFailure> {
        let endpoint = self.introspection_endpoint().await?;
        let mut form: Vec<(&str, &str)> = vec![("token", token), ("token_type_hint", hint)];
        let mut req = self
            .http
            .post(endpoint)
            .header("Accept", "application/json")
            .header("X-MAS-Supports-Device-Id", "1");
        // Validation guarantees a secret wherever introspection is configured.
        let secret = self
            .issuer
            .client_secret
            .as_ref()
            .map(|s| s.expose())
            .ok_or(OpFailure::BadMetadata)?;
        match self.issuer.client_auth {
            ClientAuthMethod::ClientSecretBasic => {
                let id = self.issuer.client_id.as_deref().unwrap_or_default();
                // RFC 6749 §2.3.1: form-urlencode both parts before Basic encoding.
                req = req.basic_auth(form_encode(id), Some(form_encode(secret)));
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push((
                    "client_id",
                    self.issuer.client_id.as_deref().unwrap_or_default(),
                ));
                form.push(("client_secret", secret));
            }
            ClientAuthMethod::Bearer => {
                req = req.bearer_auth(secret);
            }
        }
        let resp = crate::http_client::send_read(req.form(&form))
            .await
            .map_err(classify)?;
        let value = self.read_json(resp).await?;
        serde_json::from_value(value).map_err(|_| OpFailure::InvalidBody)
    }

    async fn get_json(&self, url: Url) -> Result<Value, OpFailure> {
        Ok(self.get_json_cached(url).await?.0)
    }

    /// GETs a JSON document and returns it with its `Cache-Control: max-age`, if any.
    pub async fn get_json_cached(&self, url: Url) -> Result<(Value, Option<Duration>), OpFailure> {
        let resp =
            crate::http_client::send_read(self.http.get(url).header("Accept", "application/json"))
                .await
                .map_err(classify)?;
        let max_age = resp
            .headers()
            .get_all(reqwest::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|d| d.trim().strip_prefix("max-age=")?.parse::<u64>().ok())
            .map(Duration::from_secs);
        Ok((self.read_json(resp).await?, max_age))
    }

    async fn read_json(&self, mut resp: reqwest::Response) -> Result<Value, OpFailure> {
        if !resp.status().is_success() {
            tracing::warn!(
                status = resp.status().as_u16(),
                "OP answered with an error status"
            );
            return Err(OpFailure::Status);
        }
        let limit = self.issuer.max_response_bytes;
        if resp.content_length().is_some_and(|n| n as usize > limit) {
            return Err(OpFailure::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > limit {
                return Err(OpFailure::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|_| OpFailure::InvalidBody)
    }

    /// Runs until `shutdown` fires: refreshes discovery every `metadata_refresh`, retrying
    /// failures with a capped backoff. Only used when no introspection endpoint is configured.
    pub async fn refresh_loop(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.refresh_metadata().await {
                Ok(_) => {
                    backoff = Duration::from_millis(500);
                    self.issuer.metadata_refresh
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.issuer.issuer, reason = ?e, "OP discovery failed");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn classify(e: reqwest::Error) -> OpFailure {
    // The error names the OP URL and the transport cause; never a token (tokens travel in
    // form bodies, which reqwest errors do not print).
    tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "OP request failed");
    if e.is_timeout() {
        OpFailure::Timeout
    } else if e.is_decode() || e.is_body() {
        OpFailure::InvalidBody
    } else {
        OpFailure::Unreachable
    }
}

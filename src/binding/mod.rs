//! Homeserver binding: how a verified OIDC identity becomes a Matrix user and device on a stock
//! homeserver, through the application-service API.
//!
//! - `appservice_login` (Dendrite, Conduit): register the user once, log the device in with
//!   `m.login.application_service` and keep that one upstream token per (user, device).
//! - `appservice_masquerade` (Synapse, tuwunel): register the user once, create the device with
//!   the AS `PUT /devices/{id}?user_id=…`, then send the AS token with `user_id` / `device_id`.
//! - `headers`: nothing to provision.
//!
//! In every mode the first `sub` seen for a user ID owns it ([`Store::pin_subject`]).
//! Provisioning of one (user, device) is single-flight: concurrent first requests cause exactly
//! one registration and one login. Results live in memory in front of the [`Store`], so the hot
//! path never touches SQLite. Failures are 503 (`BindingUnavailable`), never 401.

pub mod registration;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

use crate::auth::identity::{issuer_scoped, ISSUER_SEP};
use crate::auth::Identity;
use crate::config::{BindingMode, Config, HomeserverKind, Secret};
use crate::error::{BindingFailure, GatewayError};
use crate::store::redis::{Event, Redis};
use crate::store::seal::{device_context, is_sealed, put_sealed, SealError, Sealer};
use crate::store::{DeviceRecord, Fence, Pin, Store};

/// How upstream requests of one bound identity authenticate.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The device's own upstream access token (appservice_login).
    DeviceToken(String),
    /// The AS token with `user_id` (and `device_id`) query parameters (appservice_masquerade).
    Masquerade,
    /// Identity headers only.
    None,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::DeviceToken(_) => "DeviceToken(<redacted>)",
            Credential::Masquerade => "Masquerade",
            Credential::None => "None",
        })
    }
}

/// An identity bound upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The Matrix user ID.
    pub user_id: String,
    /// The upstream device, if any.
    pub device_id: Option<String>,
    /// How to authenticate upstream requests.
    pub credential: Credential,
}

/// What the gateway knows of a user ID: who owns it, and whether it is tombstoned.
#[derive(Debug)]
struct UserState {
    owner: Arc<str>,
    tombstoned: bool,
}

/// Counters of provisioning calls (tests and metrics).
#[derive(Debug, Default)]
pub struct ProvisioningCounters {
    /// Registration requests sent.
    pub registrations: AtomicU64,
    /// Appservice logins sent.
    pub logins: AtomicU64,
    /// Appservice device creations sent.
    pub device_creations: AtomicU64,
}

/// Provisions and remembers upstream bindings.
pub struct Binder {
    mode: BindingMode,
    kind: HomeserverKind,
    hs: Url,
    as_token: Option<Secret>,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    bound: Cache<(String, String), Arc<Bound>>,
    users: Cache<String, Arc<UserState>>,
    shared: Option<Redis>,
    sessions_seen: Cache<u64, ()>,
    admin_token: Option<Secret>,
    registered: Cache<String, ()>,
    sealer: Option<Arc<Sealer>>,
    primary_issuer: String,
    /// The issuer that unscoped pins and sessions (written before issuer scoping) belong to:
    /// the only configured issuer; `None` with several, as they cannot be attributed then.
    legacy_issuer: Option<String>,
    /// Provisioning calls made.
    pub counters: ProvisioningCounters,
}

/// Timeout of one call to the homeserver's appservice API.
const HOMESERVER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a provisioning lock lives: longer than the worst provisioning (a registration and a
/// login, each up to [`HOMESERVER_TIMEOUT`], plus store round trips), so that it does not expire
/// under a holder that is merely slow. Should it vanish anyway (a failover, an eviction), the
/// holder's writes are fenced ([`Fence`]).
const PROVISION_LOCK_TTL: Duration = Duration::from_secs(2 * 15 + 15);

impl Binder {
    /// Creates the binder for `config`.
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Result<Self, reqwest::Error> {
        Ok(Self {
            mode: config.homeserver.binding,
            kind: config.homeserver.kind,
            hs: config.homeserver.url.clone(),
            as_token: config.homeserver.as_token.clone(),
            http: crate::http_client::build(HOMESERVER_TIMEOUT)?,
            store,
            bound: Cache::builder().max_capacity(200_000).build(),
            users: Cache::builder().max_capacity(200_000).build(),
            shared: None,
            sessions_seen: Cache::builder().max_capacity(200_000).build(),
            admin_token: config.homeserver.admin_token.clone(),
            registered: Cache::builder().max_capacity(200_000).build(),
            sealer: config.store.sealer.clone(),
            primary_issuer: config
                .issuers
                .first()
                .map(|i| i.issuer.clone())
                .unwrap_or_default(),
            legacy_issuer: match config.issuers.as_slice() {
                [only] => Some(only.issuer.clone()),
                _ => None,
            },
            counters: ProvisioningCounters::default(),
        })
    }

    /// Coordinates provisioning with other replicas through Redis.
    pub fn with_shared(mut self, redis: Redis) -> Self {
        self.shared = Some(redis);
        self
    }

    /// The binding mode.
    pub fn mode(&self) -> BindingMode {
        self.mode
    }

    /// The AS token (appservice modes).
    pub fn as_token(&self) -> Option<&Secret> {
        self.as_token.as_ref()
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Checks the subject pin and the tombstone only (the `headers` binding needs nothing more).
    pub async fn check_user(&self, identity: &Identity) -> Result<(), GatewayError> {
        self.check_pin(identity).await
    }

    /// Checks the subject pin and returns the upstream binding, provisioning it on first use.
    pub async fn bind(&self, identity: &Identity) -> Result<Arc<Bound>, GatewayError> {
        self.check_pin(identity).await?;
        if self.mode == BindingMode::Headers {
            return Ok(Arc::new(Bound {
                user_id: identity.user_id.clone(),
                device_id: identity.device_id.clone(),
                credential: Credential::None,
            }));
        }
        let device = match (&identity.device_id, self.mode) {
            (Some(d), _) => Some(d.clone()),
            // A device is needed to log in; tokens without a device scope share one per subject.
            (None, BindingMode::AppserviceLogin) => Some(derived_device_id(&identity.subject)),
            (None, _) => None,
        };
        self.record_session(identity, device.as_deref()).await;
        let key = (identity.user_id.clone(), device.clone().unwrap_or_default());
        self.bound
            .try_get_with(key, self.provision(&identity.user_id, device))
            .await
            .map_err(|e| (*e).clone())
    }

    /// Forgets a binding (the homeserver stopped accepting it, or the device was signed out).
    pub async fn drop_binding(&self, user_id: &str, device_id: Option<&str>) {
        let device = device_id.unwrap_or_default().to_owned();
        self.bound
            .invalidate(&(user_id.to_owned(), device.clone()))
            .await;
        if !device.is_empty() {
            if let Err(e) = self.store.delete_device(user_id, &device).await {
                tracing::error!(error = %e, "cannot forget a lost binding");
            }
        }
        self.publish(Event::Binding {
            user: user_id.to_owned(),
            device,
        })
        .await;
    }

    /// A request to the homeserver made with `bound`'s credentials; `None` in `headers` mode.
    fn as_bound(
        &self,
        method: reqwest::Method,
        path: &str,
        bound: &Bound,
    ) -> Option<reqwest::RequestBuilder> {
        let mut url = self.endpoint(path);
        let token = match &bound.credential {
            Credential::DeviceToken(t) => t.clone(),
            Credential::Masquerade => {
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("user_id", &bound.user_id);
                    if let Some(d) = &bound.device_id {
                        q.append_pair("device_id", d);
                    }
                }
                self.as_token.as_ref()?.expose().to_owned()
            }
            Credential::None => return None,
        };
        Some(self.http.request(method, url).bearer_auth(token))
    }

    /// Asks the homeserver whether `bound` still works (`whoami`). Unknown answers count as
    /// working: only a clear refusal drops a binding.
    pub async fn still_valid(&self, bound: &Bound) -> bool {
        let Some(req) = self.as_bound(
            reqwest::Method::GET,
            "/_matrix/client/v3/account/whoami",
            bound,
        ) else {
            return true;
        };
        match req.send().await {
            Ok(r) => !matches!(r.status().as_u16(), 400 | 401 | 403),
            Err(_) => true,
        }
    }

    /// Whether the bound user has joined `room` (its raw path segment), asked with the bound
    /// credentials through the room-state API, which checks membership for appservice requests
    /// too. Anything but a clear answer is a 503: the guard fails closed.
    pub async fn is_joined(&self, bound: &Bound, room: &str) -> Result<bool, GatewayError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.member/{}",
            utf8_percent_encode_segment(&bound.user_id)
        );
        let Some(req) = self.as_bound(reqwest::Method::GET, &path, bound) else {
            // Only reached with masquerade credentials; without them nothing can be checked.
            return Err(GatewayError::Internal);
        };
        let resp = req.send().await.map_err(|e| unreachable(&e))?;
        match resp.status().as_u16() {
            200 => {
                let member: Value = resp
                    .json()
                    .await
                    .map_err(|_| GatewayError::BindingUnavailable(BindingFailure::Unreachable))?;
                Ok(member["membership"] == "join")
            }
            403 | 404 => Ok(false),
            status => {
                tracing::error!(status, "membership check failed");
                Err(GatewayError::BindingUnavailable(
                    BindingFailure::Unreachable,
                ))
            }
        }
    }

    /// Whether the user already has a cross-signing master key upstream.
    pub async fn has_master_key(&self, bound: &Bound) -> Result<bool, GatewayError> {
        let Some(req) = self.as_bound(
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/query",
            bound,
        ) else {
            return Ok(false);
        };
        let resp = req
            .json(&json!({"device_keys": {bound.user_id.clone(): []}}))
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        if !resp.status().is_success() {
            return Err(GatewayError::BindingUnavailable(
                BindingFailure::Unreachable,
            ));
        }
        // The guard fails closed: an answer that is not a keys/query answer is no "no key".
        // (Some homeservers leave out empty maps, so only the shape is required.)
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if !answer.is_object() || answer.get("master_keys").is_some_and(|m| !m.is_object()) {
            tracing::error!(
                "the homeserver's keys/query answer is malformed; cross-signing guard refuses"
            );
            return Err(GatewayError::BindingUnavailable(
                BindingFailure::Unreachable,
            ));
        }
        Ok(answer["master_keys"].get(&bound.user_id).is_some())
    }

    async fn check_pin(&self, identity: &Identity) -> Result<(), GatewayError> {
        let state = match self.users.get(&identity.user_id).await {
            Some(state) => state,
            None => {
                let state = self.load_user_state(identity).await?;
                self.users
                    .insert(identity.user_id.clone(), state.clone())
                    .await;
                state
            }
        };
        if state.tombstoned {
            return Err(GatewayError::UserDeactivated);
        }
        if !identity.owns_subject_key(&state.owner) {
            tracing::warn!(
                user = %identity.user_id,
                "a token's subject does not own this user ID (reassigned username at the OP?); refused until an operator re-pins it"
            );
            return Err(GatewayError::SubjectMismatch);
        }
        Ok(())
    }

    async fn load_user_state(&self, identity: &Identity) -> Result<Arc<UserState>, GatewayError> {
        let tombstoned = self
            .store
            .is_tombstoned(&identity.user_id)
            .await
            .map_err(store_failed)?;
        let key = identity.subject_key();
        let owner = match self
            .store
            .pin_subject(&identity.user_id, &key)
            .await
            .map_err(store_failed)?
        {
            Pin::New | Pin::Matches => key,
            // A pin written before pins were issuer-scoped holds a bare `sub`. With one issuer
            // configured it is that issuer's, and the pin is upgraded in place. With several it
            // cannot be attributed: the user is refused until an operator re-pins it with an
            // issuer (admin API).
            Pin::Conflict { owner }
                if !owner.contains(ISSUER_SEP)
                    && owner == identity.subject
                    && self.legacy_issuer.as_deref() == Some(&*identity.issuer) =>
            {
                self.store
                    .repin_subject(&identity.user_id, &key)
                    .await
                    .map_err(store_failed)?;
                key
            }
            Pin::Conflict { owner } if !owner.contains(ISSUER_SEP) => {
                if self.legacy_issuer.is_none() {
                    tracing::warn!(
                        user = %identity.user_id,
                        "this user ID is pinned to a subject from before pins named their issuer; with several issuers configured it is refused until an operator re-pins it with `issuer`"
                    );
                }
                owner
            }
            Pin::Conflict { owner } => owner,
        };
        Ok(Arc::new(UserState {
            owner: Arc::from(owner.as_str()),
            tombstoned,
        }))
    }

    /// The primary issuer (the admin API's default).
    pub fn primary_issuer(&self) -> &str {
        &self.primary_issuer
    }

    /// The user ID `issuer`'s `sub` owns, if any (reading pins written before issuer scoping
    /// as the only issuer's, when only one is configured).
    pub async fn user_of_subject(
        &self,
        issuer: &str,
        sub: &str,
    ) -> Result<Option<String>, crate::store::StoreError> {
        if let Some(u) = self
            .store
            .user_of_subject(&issuer_scoped(issuer, sub))
            .await?
        {
            return Ok(Some(u));
        }
        if self.legacy_issuer.as_deref() == Some(issuer) {
            return self.store.user_of_subject(sub).await;
        }
        Ok(None)
    }

    /// The (user, device) pairs bound to `issuer`'s OP session `sid` (and, with a single issuer
    /// configured, those recorded before sessions were issuer-scoped).
    pub async fn session_devices(
        &self,
        issuer: &str,
        sid: &str,
    ) -> Result<Vec<(String, String)>, crate::store::StoreError> {
        let mut pairs = self
            .store
            .session_devices(&issuer_scoped(issuer, sid))
            .await?;
        if self.legacy_issuer.as_deref() == Some(issuer) {
            pairs.extend(self.store.session_devices(sid).await?);
        }
        Ok(pairs)
    }

    /// Forgets the cached pin and tombstone state of a user (after an operator changes them).
    pub async fn forget_user_state(&self, user_id: &str) {
        self.users.invalidate(user_id).await;
    }

    /// Remembers which OP session a device belongs to (for back-channel logout by `sid`).
    async fn record_session(&self, identity: &Identity, device: Option<&str>) {
        let (Some(sid), Some(device)) = (&identity.session_id, device) else {
            return;
        };
        // Runs on every request: the issuer-scoped key is only built when it must be stored.
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&*identity.issuer, sid, &identity.user_id, device).hash(&mut h);
            h.finish()
        };
        if self.sessions_seen.get(&key).await.is_some() {
            return;
        }
        let sid = issuer_scoped(&identity.issuer, sid);
        match self
            .store
            .record_session(&sid, &identity.user_id, device)
            .await
        {
            Ok(()) => self.sessions_seen.insert(key, ()).await,
            Err(e) => tracing::error!(error = %e, "cannot record the OP session of a device"),
        }
    }

    /// Signs one device out upstream and forgets its binding: `POST /logout` with the device's
    /// token (`appservice_login`) or the AS `DELETE /devices/{id}` (`appservice_masquerade`).
    pub async fn sign_out_device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), GatewayError> {
        let r = self.sign_out_device_unmeasured(user_id, device_id).await;
        if self.mode == BindingMode::Headers {
            return r;
        }
        measured("logout", r)
    }

    async fn sign_out_device_unmeasured(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), GatewayError> {
        match self.mode {
            BindingMode::AppserviceLogin => {
                let record = self
                    .store
                    .device(user_id, device_id)
                    .await
                    .map_err(store_failed)?;
                let stored = record.and_then(|r| r.upstream_token);
                let token = match stored {
                    Some(s) => match self.open_token(user_id, device_id, &s, None).await? {
                        Some(t) => Some(t),
                        // Not trustworthy (unsealed or tampered): a fresh login gives a token
                        // whose logout deletes the device (and every token it had).
                        None => Some(self.login(user_id, device_id).await?),
                    },
                    None => None,
                };
                if let Some(token) = token {
                    let resp = self
                        .http
                        .post(self.endpoint("/_matrix/client/v3/logout"))
                        .bearer_auth(token)
                        .json(&json!({}))
                        .send()
                        .await
                        .map_err(|e| unreachable(&e))?;
                    // 401: the device is already gone.
                    if !resp.status().is_success() && resp.status() != 401 {
                        tracing::error!(user = %user_id, status = resp.status().as_u16(), "upstream logout failed");
                        return Err(GatewayError::BindingUnavailable(
                            BindingFailure::Unreachable,
                        ));
                    }
                }
            }
            BindingMode::AppserviceMasquerade => {
                let mut url = self.endpoint(&format!(
                    "/_matrix/client/v3/devices/{}",
                    utf8_percent_encode_segment(device_id)
                ));
                url.query_pairs_mut().append_pair("user_id", user_id);
                let resp = self
                    .http
                    .delete(url)
                    .bearer_auth(self.as_bearer()?)
                    .json(&json!({}))
                    .send()
                    .await
                    .map_err(|e| unreachable(&e))?;
                if !resp.status().is_success() && resp.status() != 404 {
                    tracing::error!(user = %user_id, status = resp.status().as_u16(), "upstream device deletion failed");
                    return Err(GatewayError::BindingUnavailable(
                        BindingFailure::Unreachable,
                    ));
                }
            }
            BindingMode::Headers => {}
        }
        self.drop_binding(user_id, Some(device_id)).await;
        tracing::info!(user = %user_id, device = %device_id, "device signed out upstream");
        Ok(())
    }

    /// Signs every device of a user out upstream (the ones the gateway bound, and on Dendrite
    /// and Conduit every other one through the AS `POST /logout/all?user_id=`).
    pub async fn sign_out_user(&self, user_id: &str) -> Result<Vec<String>, GatewayError> {
        let devices = self.store.devices_of(user_id).await.map_err(store_failed)?;
        for d in &devices {
            self.sign_out_device(user_id, d).await?;
        }
        if self.mode != BindingMode::Headers
            && matches!(
                self.kind,
                HomeserverKind::Dendrite | HomeserverKind::Conduit
            )
        {
            let mut url = self.endpoint("/_matrix/client/v3/logout/all");
            url.query_pairs_mut().append_pair("user_id", user_id);
            let resp = self
                .http
                .post(url)
                .bearer_auth(self.as_bearer()?)
                .json(&json!({}))
                .send()
                .await
                .map_err(|e| unreachable(&e))?;
            if !resp.status().is_success() {
                tracing::warn!(user = %user_id, status = resp.status().as_u16(), "appservice logout/all failed");
            }
        }
        Ok(devices)
    }

    /// Tombstones the user (never provisioned again), signs out every device, and deactivates
    /// the account upstream with the best mechanism the homeserver has (docs/notifications.md).
    pub async fn deactivate(
        &self,
        user_id: &str,
        erase: bool,
    ) -> Result<&'static str, GatewayError> {
        self.store.tombstone(user_id).await.map_err(store_failed)?;
        self.users.invalidate(user_id).await;
        self.publish(Event::User {
            user: user_id.to_owned(),
        })
        .await;
        self.sign_out_user(user_id).await?;
        let mechanism = match (self.kind, &self.admin_token, self.mode) {
            (_, _, BindingMode::Headers) => "tombstone",
            (HomeserverKind::Synapse | HomeserverKind::Tuwunel, Some(admin), _) => {
                let url = self.endpoint(&format!(
                    "/_synapse/admin/v1/deactivate/{}",
                    utf8_percent_encode_segment(user_id)
                ));
                self.deactivate_call(self.http.post(url).bearer_auth(admin.expose()), erase)
                    .await?;
                "synapse_admin_api"
            }
            (HomeserverKind::Synapse | HomeserverKind::Tuwunel, None, _) => {
                let mut url = self.endpoint("/_matrix/client/v3/account/deactivate");
                url.query_pairs_mut().append_pair("user_id", user_id);
                self.deactivate_call(self.http.post(url).bearer_auth(self.as_bearer()?), erase)
                    .await?;
                "appservice_deactivate"
            }
            _ => "logout_all",
        };
        tracing::info!(user = %user_id, mechanism, "user deactivated");
        Ok(mechanism)
    }

    async fn deactivate_call(
        &self,
        req: reqwest::RequestBuilder,
        erase: bool,
    ) -> Result<(), GatewayError> {
        measured(
            "deactivate",
            self.deactivate_call_unmeasured(req, erase).await,
        )
    }

    async fn deactivate_call_unmeasured(
        &self,
        req: reqwest::RequestBuilder,
        erase: bool,
    ) -> Result<(), GatewayError> {
        let resp = req
            .json(&json!({"erase": erase}))
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        tracing::error!(status, errcode = %answer["errcode"], "upstream deactivation failed");
        Err(GatewayError::BindingUnavailable(
            BindingFailure::Unreachable,
        ))
    }

    /// Lifts a tombstone; `true` when there was one.
    pub async fn lift_tombstone(&self, user_id: &str) -> Result<bool, GatewayError> {
        let lifted = self
            .store
            .lift_tombstone(user_id)
            .await
            .map_err(store_failed)?;
        self.users.invalidate(user_id).await;
        self.publish(Event::User {
            user: user_id.to_owned(),
        })
        .await;
        Ok(lifted)
    }

    /// Moves a user's subject pin to `issuer`'s `sub` (an operator action after a legitimate
    /// `sub` change).
    pub async fn repin(&self, user_id: &str, issuer: &str, sub: &str) -> Result<(), GatewayError> {
        self.store
            .repin_subject(user_id, &issuer_scoped(issuer, sub))
            .await
            .map_err(store_failed)?;
        self.users.invalidate(user_id).await;
        self.publish(Event::User {
            user: user_id.to_owned(),
        })
        .await;
        Ok(())
    }

    /// Provisions under a cross-replica lock when the state is shared, so that one
    /// (user, device) gets exactly one registration and one login whichever replica sees it
    /// first; the holder's work is visible to the others through the store.
    async fn provision(
        &self,
        user_id: &str,
        device: Option<String>,
    ) -> Result<Arc<Bound>, GatewayError> {
        let Some(redis) = &self.shared else {
            return self.provision_here(user_id, device, None).await;
        };
        let name = format!(
            "provision:{user_id}{}{}",
            '\u{1f}',
            device.as_deref().unwrap_or("")
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match redis.lock(&name, PROVISION_LOCK_TTL).await {
                Ok(Some(token)) => {
                    let fence = Fence { lock: name, token };
                    let result = self.provision_here(user_id, device, Some(&fence)).await;
                    let _ = redis.unlock(&fence.lock, &fence.token).await;
                    return result;
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Ok(None) => return Err(GatewayError::BindingUnavailable(BindingFailure::Store)),
                Err(e) => {
                    tracing::warn!(error = %e, "shared state unavailable: cannot provision now");
                    return Err(GatewayError::BindingUnavailable(BindingFailure::Store));
                }
            }
        }
    }

    /// Tells the other replicas (no-op without shared state).
    pub async fn publish(&self, event: Event) {
        if let Some(redis) = &self.shared {
            if let Err(e) = redis.publish(&event).await {
                tracing::warn!(error = %e, "cannot publish to the other replicas");
            }
        }
    }

    /// Applies another replica's news: forget cached state it changed.
    pub async fn apply_remote(&self, event: &Event) {
        match event {
            Event::User { user } => self.users.invalidate(user).await,
            Event::Binding { user, device } => {
                self.bound.invalidate(&(user.clone(), device.clone())).await
            }
            Event::Revoke { .. } => {}
        }
    }

    /// Forgets every cached user state and binding (after missing events).
    pub fn forget_cached(&self) {
        self.users.invalidate_all();
        self.bound.invalidate_all();
    }

    /// Provisions (user, device); under a shared lock, `fence` makes every store write
    /// conditional on still holding it.
    async fn provision_here(
        &self,
        user_id: &str,
        device: Option<String>,
        fence: Option<&Fence>,
    ) -> Result<Arc<Bound>, GatewayError> {
        if let Some(d) = &device {
            if let Some(rec) = self.store.device(user_id, d).await.map_err(store_failed)? {
                match (self.mode, rec.upstream_token) {
                    (BindingMode::AppserviceLogin, Some(stored)) => {
                        // A stored value not to be trusted is replaced by a new login.
                        if let Some(token) = self.open_token(user_id, d, &stored, fence).await? {
                            return Ok(self.bound(user_id, device, Credential::DeviceToken(token)));
                        }
                    }
                    (BindingMode::AppserviceMasquerade, _) => {
                        return Ok(self.bound(user_id, device, Credential::Masquerade));
                    }
                    _ => {}
                }
            }
        }
        self.ensure_registered(user_id).await?;
        match (self.mode, device) {
            (BindingMode::AppserviceLogin, Some(d)) => {
                let token = self.login(user_id, &d).await?;
                // Configuration requires a key with appservice_login, the only mode that
                // stores tokens.
                let sealer = self.sealer.as_deref().ok_or(GatewayError::Internal)?;
                let stored = put_sealed(self.store.as_ref(), sealer, user_id, &d, &token, fence)
                    .await
                    .map_err(store_failed)?;
                if !stored {
                    // The lock expired or vanished while this login ran, and another replica
                    // may have provisioned the device since: its token is the one in the store.
                    // This one is neither stored nor used; the client retries and gets that one.
                    tracing::warn!(user = %user_id, device = %d, "provisioning outlived its lock; its login is discarded");
                    return Err(GatewayError::BindingUnavailable(BindingFailure::Store));
                }
                tracing::info!(user = %user_id, device = %d, "device logged in upstream");
                Ok(self.bound(user_id, Some(d), Credential::DeviceToken(token)))
            }
            (BindingMode::AppserviceMasquerade, Some(d)) => {
                self.create_device(user_id, &d).await?;
                let rec = DeviceRecord {
                    upstream_token: None,
                };
                self.store
                    .put_device(user_id, &d, &rec)
                    .await
                    .map_err(store_failed)?;
                tracing::info!(user = %user_id, device = %d, "device created upstream");
                Ok(self.bound(user_id, Some(d), Credential::Masquerade))
            }
            (_, device) => Ok(self.bound(user_id, device, Credential::Masquerade)),
        }
    }

    /// Opens a stored device token; one sealed under the previous key is sealed again.
    /// `Ok(None)` when the stored value is not to be trusted (unsealed, tampered, or moved from
    /// another row): the caller logs the device in again. A token sealed under a key that is
    /// not configured is a 503 (a misconfigured replica must not churn logins).
    async fn open_token(
        &self,
        user_id: &str,
        device_id: &str,
        stored: &str,
        fence: Option<&Fence>,
    ) -> Result<Option<String>, GatewayError> {
        let Some(sealer) = &self.sealer else {
            tracing::error!(user = %user_id, "a stored device token cannot be opened: no store.encryption_key");
            return Err(GatewayError::BindingUnavailable(BindingFailure::Store));
        };
        if !is_sealed(stored) {
            tracing::warn!(user = %user_id, device = %device_id, "an unsealed device token in the store is not trusted; the device logs in again");
            return Ok(None);
        }
        let context = device_context(user_id, device_id);
        match sealer.open(stored, &context) {
            Ok(opened) => {
                if opened.stale {
                    let store = self.store.as_ref();
                    let plaintext = &opened.plaintext;
                    if let Err(e) =
                        put_sealed(store, sealer, user_id, device_id, plaintext, fence).await
                    {
                        tracing::warn!(error = %e, "cannot seal a device token again; kept as it was");
                    }
                }
                Ok(Some(opened.plaintext))
            }
            Err(e @ SealError::UnknownKey(_)) => {
                tracing::error!(user = %user_id, device = %device_id, error = %e, "a device token is sealed under a key this gateway does not have");
                Err(GatewayError::BindingUnavailable(BindingFailure::Store))
            }
            Err(e) => {
                tracing::error!(user = %user_id, device = %device_id, error = %e, "a stored device token does not authenticate; the device logs in again");
                Ok(None)
            }
        }
    }

    fn bound(
        &self,
        user_id: &str,
        device_id: Option<String>,
        credential: Credential,
    ) -> Arc<Bound> {
        Arc::new(Bound {
            user_id: user_id.to_owned(),
            device_id,
            credential,
        })
    }

    fn endpoint(&self, path: &str) -> Url {
        let mut u = self.hs.clone();
        u.set_path(path);
        u
    }

    fn as_bearer(&self) -> Result<&str, GatewayError> {
        self.as_token
            .as_ref()
            .map(Secret::expose)
            .ok_or(GatewayError::Internal)
    }

    async fn ensure_registered(&self, user_id: &str) -> Result<(), GatewayError> {
        if self.registered.get(user_id).await.is_some() {
            return Ok(());
        }
        let known = self
            .store
            .user_registered(user_id)
            .await
            .map_err(store_failed)?;
        if !known {
            self.register(user_id).await?;
            self.store
                .mark_user_registered(user_id)
                .await
                .map_err(store_failed)?;
        }
        self.registered.insert(user_id.to_owned(), ()).await;
        Ok(())
    }

    async fn register(&self, user_id: &str) -> Result<(), GatewayError> {
        measured("register", self.register_unmeasured(user_id).await)
    }

    async fn register_unmeasured(&self, user_id: &str) -> Result<(), GatewayError> {
        self.counters.registrations.fetch_add(1, Ordering::Relaxed);
        let mut body = json!({
            "type": "m.login.application_service",
            "username": localpart(user_id),
            "inhibit_login": true,
        });
        if self.kind == HomeserverKind::Conduit {
            // Conduit reports password-less appservice users as guests.
            body["password"] = Value::String(random_secret());
        }
        let resp = self
            .http
            .post(self.endpoint("/_matrix/client/v3/register"))
            .bearer_auth(self.as_bearer()?)
            .json(&body)
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        let status = resp.status();
        if status.is_success() {
            tracing::info!(user = %user_id, "user registered upstream");
            return Ok(());
        }
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if answer["errcode"] == "M_USER_IN_USE" {
            return Ok(());
        }
        tracing::error!(user = %user_id, status = status.as_u16(), errcode = %answer["errcode"], "appservice registration failed");
        Err(GatewayError::BindingUnavailable(
            BindingFailure::Registration,
        ))
    }

    async fn login(&self, user_id: &str, device_id: &str) -> Result<String, GatewayError> {
        measured("login", self.login_unmeasured(user_id, device_id).await)
    }

    async fn login_unmeasured(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<String, GatewayError> {
        self.counters.logins.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": localpart(user_id)},
            "device_id": device_id,
            "initial_device_display_name": "OIDC session",
        });
        let resp = self
            .http
            .post(self.endpoint("/_matrix/client/v3/login"))
            .bearer_auth(self.as_bearer()?)
            .json(&body)
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        match answer["access_token"].as_str() {
            Some(t) if status.is_success() => Ok(t.to_owned()),
            _ => {
                tracing::error!(user = %user_id, status = status.as_u16(), errcode = %answer["errcode"], "appservice login failed");
                Err(GatewayError::BindingUnavailable(BindingFailure::Login))
            }
        }
    }

    async fn create_device(&self, user_id: &str, device_id: &str) -> Result<(), GatewayError> {
        measured(
            "device",
            self.create_device_unmeasured(user_id, device_id).await,
        )
    }

    async fn create_device_unmeasured(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), GatewayError> {
        self.counters
            .device_creations
            .fetch_add(1, Ordering::Relaxed);
        let mut url = self.endpoint(&format!(
            "/_matrix/client/v3/devices/{}",
            utf8_percent_encode_segment(device_id)
        ));
        url.query_pairs_mut().append_pair("user_id", user_id);
        let resp = self
            .http
            .put(url)
            .bearer_auth(self.as_bearer()?)
            .json(&json!({"display_name": "OIDC session"}))
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        tracing::error!(user = %user_id, status, errcode = %answer["errcode"], "appservice device creation failed");
        Err(GatewayError::BindingUnavailable(
            BindingFailure::DeviceCreation,
        ))
    }
}

/// A state-store failure, logged, as the 503 the request path answers.
fn store_failed(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "state store failed");
    GatewayError::BindingUnavailable(BindingFailure::Store)
}

/// Counts one provisioning call by kind and outcome, and hands its result back.
fn measured<T>(kind: &str, r: Result<T, GatewayError>) -> Result<T, GatewayError> {
    let result = if r.is_ok() { "ok" } else { "error" };
    crate::metrics::PROVISIONING
        .with_label_values(&[kind, result])
        .inc();
    r
}

impl Binder {
    /// Number of bindings cached in memory (metrics).
    pub fn bindings_held(&self) -> u64 {
        self.bound.entry_count()
    }
}

fn unreachable(e: &reqwest::Error) -> GatewayError {
    tracing::error!(error = %e, "homeserver unreachable during provisioning");
    GatewayError::BindingUnavailable(BindingFailure::Unreachable)
}

/// The localpart of `@localpart:server`.
pub fn localpart(user_id: &str) -> &str {
    let rest = user_id.strip_prefix('@').unwrap_or(user_id);
    rest.split_once(':').map_or(rest, |(lp, _)| lp)
}

/// The device used for tokens without a device scope in `appservice_login` mode: one per
/// subject, stable across restarts.
pub fn derived_device_id(subject: &str) -> String {
    let digest = Sha256::digest(subject.as_bytes());
    format!("OIDC{}", hex::encode_upper(&digest[..5]))
}

/// Percent-encodes one path segment (device IDs may hold `/`, `?`, `#`, `%`).
pub fn utf8_percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(localpart("@alice:example.org"), "alice");
        assert_eq!(localpart("@a.b:example.org:8448"), "a.b");
        let d = derived_device_id("sub-1");
        assert_eq!(d, derived_device_id("sub-1"));
        assert_ne!(d, derived_device_id("sub-2"));
        assert!(d.starts_with("OIDC") && d.len() == 14);
        assert_eq!(utf8_percent_encode_segment("A/b c%"), "A%2Fb%20c%25");
        assert_eq!(random_secret().len(), 48);
    }
}

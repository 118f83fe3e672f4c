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
//!
//! - `homeserver`: the appservice-API client (every call through one `call` helper);
//! - `provision`: pins, tombstones and provisioning under the (shared, fenced) lock;
//! - `lifecycle`: sign-out, deactivation, tombstone lifting and re-pinning;
//! - `registration`: the registration file the homeserver needs.

pub mod homeserver;
mod lifecycle;
mod provision;
pub mod registration;

use std::sync::Arc;

use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::auth::identity::issuer_scoped;
use crate::auth::Identity;
use crate::config::{BindingMode, Config, Secret};
use crate::error::{BindingFailure, GatewayError};
use crate::store::redis::{Event, Redis};
use crate::store::seal::Sealer;
use crate::store::Store;
use homeserver::Homeserver;

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

/// Provisions and remembers upstream bindings.
pub struct Binder {
    mode: BindingMode,
    hs: Homeserver,
    store: Arc<dyn Store>,
    bound: Cache<(String, String), Arc<Bound>>,
    users: Cache<String, Arc<UserState>>,
    shared: Option<Redis>,
    sessions_seen: Cache<u64, ()>,
    registered: Cache<String, ()>,
    sealer: Option<Arc<Sealer>>,
    primary_issuer: String,
    /// User IDs no token may act as: the application service's own (appservice bindings) and
    /// `homeserver.reserved_localparts`.
    reserved: Vec<String>,
    /// The issuer that unscoped pins and sessions (written before issuer scoping) belong to:
    /// the only configured issuer; `None` with several, as they cannot be attributed then.
    legacy_issuer: Option<String>,
}

impl Binder {
    /// Creates the binder for `config`.
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Result<Self, reqwest::Error> {
        Ok(Self {
            mode: config.homeserver.binding,
            hs: Homeserver::new(config)?,
            store,
            bound: Cache::builder().max_capacity(200_000).build(),
            users: Cache::builder().max_capacity(200_000).build(),
            shared: None,
            sessions_seen: Cache::builder().max_capacity(200_000).build(),
            registered: Cache::builder().max_capacity(200_000).build(),
            sealer: config.store.sealer.clone(),
            primary_issuer: config
                .issuers
                .first()
                .map(|i| i.issuer.clone())
                .unwrap_or_default(),
            reserved: reserved_user_ids(&config.homeserver),
            legacy_issuer: match config.issuers.as_slice() {
                [only] => Some(only.issuer.clone()),
                _ => None,
            },
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
        self.hs.as_token()
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Asks the homeserver whether `bound` still works (`whoami`). Unknown answers count as
    /// working: only a clear refusal drops a binding.
    pub async fn still_valid(&self, bound: &Bound) -> bool {
        self.hs.accepts(bound).await
    }

    /// Whether the bound user has joined `room` (see [`Homeserver::is_joined`]).
    pub async fn is_joined(&self, bound: &Bound, room: &str) -> Result<bool, GatewayError> {
        self.hs.is_joined(bound, room).await
    }

    /// Whether the user already has a cross-signing master key upstream (fails closed).
    pub async fn has_master_key(&self, bound: &Bound) -> Result<bool, GatewayError> {
        self.hs.has_master_key(bound).await
    }

    /// Whether cross-signing uploads get a homeserver password from the gateway (Dendrite with
    /// an admin token, see `gateway::guard`).
    pub fn answers_password_stage(&self) -> bool {
        self.hs.answers_password_stage()
    }

    /// Gives `user_id` a fresh random homeserver password for one cross-signing upload and
    /// returns it. Nothing keeps it: the next upload sets another.
    pub async fn one_time_password(&self, user_id: &str) -> Result<String, GatewayError> {
        let password = homeserver::random_secret();
        self.hs.set_password(user_id, &password).await?;
        Ok(password)
    }

    /// The primary issuer (the admin API's default).
    pub fn primary_issuer(&self) -> &str {
        &self.primary_issuer
    }

    /// Whether no token may act as `user_id` (see [`Binder`]'s `reserved`).
    fn is_reserved(&self, user_id: &str) -> bool {
        self.reserved.iter().any(|r| r == user_id)
    }

    /// Whether `identity`'s subject owns its user ID, as the subject pin judges it (never for a
    /// reserved user ID): from the user's state the request path cached, else from the store
    /// (read only). Back-channel logout signs out the devices cached tokens name only for
    /// their owner: a token refused at the pin is cached all the same.
    pub async fn owns(&self, identity: &Identity) -> Result<bool, crate::store::StoreError> {
        if self.is_reserved(identity.user_id()) {
            return Ok(false);
        }
        if let Some(state) = self.users.get(identity.user_id()).await {
            return Ok(identity.owns_subject_key(&state.owner));
        }
        let owner = self
            .user_of_subject(&identity.issuer, identity.subject())
            .await?;
        Ok(owner.as_deref() == Some(identity.user_id()))
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
}

/// The user IDs no token may act as (see [`Binder`]).
fn reserved_user_ids(hs: &crate::config::Homeserver) -> Vec<String> {
    let sender = (hs.binding != BindingMode::Headers).then_some(&hs.appservice_sender);
    sender
        .into_iter()
        .chain(&hs.reserved_localparts)
        .map(|lp| format!("@{lp}:{}", hs.server_name))
        .collect()
}

/// A state-store failure, logged, as the 503 the request path answers.
pub(crate) fn store_failed(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "state store failed");
    GatewayError::BindingUnavailable(BindingFailure::Store)
}

impl Binder {
    /// Number of bindings cached in memory (metrics).
    pub fn bindings_held(&self) -> u64 {
        self.bound.entry_count()
    }
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
    }
}

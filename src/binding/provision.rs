//! Provisioning: from a verified identity to its upstream binding. The subject pin and the
//! tombstone are checked first; then the user is registered once and the device logged in
//! (`appservice_login`) or created (`appservice_masquerade`), exactly once per (user, device)
//! across concurrent requests and, with Redis, across replicas: under a shared lock whose
//! fencing token every store write checks. Stored device tokens are sealed.

use std::sync::Arc;
use std::time::Duration;

use super::{derived_device_id, store_failed, Binder, Bound, Credential, UserState};
use crate::auth::identity::{issuer_scoped, ISSUER_SEP};
use crate::auth::Identity;
use crate::config::BindingMode;
use crate::error::{BindingFailure, GatewayError};
use crate::store::seal::{device_context, is_sealed, put_sealed, SealError};
use crate::store::{DeviceRecord, Fence, Pin};

/// How long a provisioning lock lives: longer than the worst provisioning (a registration and a
/// login, each up to [`super::homeserver::HOMESERVER_TIMEOUT`], plus store round trips), so that
/// it does not expire under a holder that is merely slow. Should it vanish anyway (a failover,
/// an eviction), the holder's writes are fenced ([`Fence`]).
const PROVISION_LOCK_TTL: Duration = Duration::from_secs(2 * 15 + 15);

impl Binder {
    /// Checks the subject pin and the tombstone only (the `headers` binding needs nothing more),
    /// and that the user ID is not a reserved one.
    pub async fn check_user(&self, identity: &Identity) -> Result<(), GatewayError> {
        self.check_pin(identity).await
    }

    /// Checks the subject pin and returns the upstream binding, provisioning it on first use.
    pub async fn bind(&self, identity: &Identity) -> Result<Arc<Bound>, GatewayError> {
        self.check_pin(identity).await?;
        if self.mode == BindingMode::Headers {
            return Ok(Arc::new(Bound {
                user_id: identity.user_id().to_owned(),
                device_id: identity.device_id().map(str::to_owned),
                credential: Credential::None,
            }));
        }
        let device = match (identity.device_id(), self.mode) {
            (Some(d), _) => Some(d.to_owned()),
            // A device is needed to log in; tokens without a device scope share one per subject.
            (None, BindingMode::AppserviceLogin) => Some(derived_device_id(identity.subject())),
            (None, _) => None,
        };
        self.record_session(identity, device.as_deref()).await;
        let key = (
            identity.user_id().to_owned(),
            device.clone().unwrap_or_default(),
        );
        self.bound
            .try_get_with(key, self.provision(identity.user_id(), device))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn check_pin(&self, identity: &Identity) -> Result<(), GatewayError> {
        if self.is_reserved(identity.user_id()) {
            // The appservice's own user: its device tokens and masquerade would carry the
            // appservice's powers (on Dendrite, log in over the device holding the AS token).
            // The others: the homeserver's own accounts, named by the operator.
            tracing::warn!(
                user = %identity.user_id(),
                "a token maps to a reserved user ID (the application service's, or homeserver.reserved_localparts); refused"
            );
            return Err(GatewayError::ReservedUserId);
        }
        let state = match self.users.get(identity.user_id()).await {
            Some(state) => state,
            None => {
                let state = self.load_user_state(identity).await?;
                self.users
                    .insert(identity.user_id().to_owned(), state.clone())
                    .await;
                state
            }
        };
        if state.tombstoned {
            return Err(GatewayError::UserDeactivated);
        }
        if !identity.owns_subject_key(&state.owner) {
            tracing::warn!(
                user = %identity.user_id(),
                "a token's subject does not own this user ID (reassigned username at the OP?); refused until an operator re-pins it"
            );
            return Err(GatewayError::SubjectMismatch);
        }
        Ok(())
    }

    async fn load_user_state(&self, identity: &Identity) -> Result<Arc<UserState>, GatewayError> {
        let tombstoned = self
            .store
            .is_tombstoned(identity.user_id())
            .await
            .map_err(store_failed)?;
        let key = identity.subject_key();
        let owner = match self
            .store
            .pin_subject(identity.user_id(), &key)
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
                    && owner == identity.subject()
                    && self.legacy_issuer.as_deref() == Some(&*identity.issuer) =>
            {
                self.store
                    .repin_subject(identity.user_id(), &key)
                    .await
                    .map_err(store_failed)?;
                key
            }
            Pin::Conflict { owner } if !owner.contains(ISSUER_SEP) => {
                if self.legacy_issuer.is_none() {
                    tracing::warn!(
                        user = %identity.user_id(),
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

    /// Remembers which OP session a device belongs to (for back-channel logout by `sid`).
    async fn record_session(&self, identity: &Identity, device: Option<&str>) {
        let (Some(sid), Some(device)) = (identity.session_id(), device) else {
            return;
        };
        // Runs on every request: the issuer-scoped key is only built when it must be stored.
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&*identity.issuer, sid, identity.user_id(), device).hash(&mut h);
            h.finish()
        };
        if self.sessions_seen.get(&key).await.is_some() {
            return;
        }
        let sid = issuer_scoped(&identity.issuer, sid);
        match self
            .store
            .record_session(&sid, identity.user_id(), device)
            .await
        {
            Ok(()) => self.sessions_seen.insert(key, ()).await,
            Err(e) => tracing::error!(error = %e, "cannot record the OP session of a device"),
        }
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
                let token = self.hs.login(user_id, &d).await?;
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
                self.hs.create_device(user_id, &d).await?;
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
    pub(super) async fn open_token(
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
            self.hs.register(user_id).await?;
            self.store
                .mark_user_registered(user_id)
                .await
                .map_err(store_failed)?;
        }
        self.registered.insert(user_id.to_owned(), ()).await;
        Ok(())
    }
}

//! The account lifecycle upstream: signing devices out, deactivating users, lifting
//! tombstones and moving subject pins, each followed by forgetting what the gateway cached and
//! telling the other replicas.

use super::{store_failed, Binder};
use crate::auth::identity::issuer_scoped;
use crate::config::{BindingMode, HomeserverKind};
use crate::error::GatewayError;
use crate::store::redis::Event;

impl Binder {
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

    /// Signs one device out upstream and forgets its binding: `POST /logout` with the device's
    /// token (`appservice_login`) or the AS `DELETE /devices/{id}` (`appservice_masquerade`).
    pub async fn sign_out_device(
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
                        None => Some(self.hs.login(user_id, device_id).await?),
                    },
                    None => None,
                };
                if let Some(token) = token {
                    self.hs.logout(user_id, &token).await?;
                }
            }
            BindingMode::AppserviceMasquerade => self.hs.delete_device(user_id, device_id).await?,
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
                self.hs.kind,
                HomeserverKind::Dendrite | HomeserverKind::Conduit
            )
        {
            // The devices the gateway bound are signed out already; an answer other than
            // success is logged, an unreachable homeserver fails the sign-out (503, retried).
            if !self.hs.logout_all(user_id).await? {
                tracing::warn!(user = %user_id, "appservice logout/all refused; the devices the gateway bound are signed out");
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
        self.user_changed(user_id).await;
        self.sign_out_user(user_id).await?;
        let mechanism = match self.mode {
            BindingMode::Headers => "tombstone",
            _ => self.hs.deactivate(user_id, erase).await?,
        };
        tracing::info!(user = %user_id, mechanism, "user deactivated");
        Ok(mechanism)
    }

    /// Lifts a tombstone; `true` when there was one.
    pub async fn lift_tombstone(&self, user_id: &str) -> Result<bool, GatewayError> {
        let lifted = self
            .store
            .lift_tombstone(user_id)
            .await
            .map_err(store_failed)?;
        self.user_changed(user_id).await;
        Ok(lifted)
    }

    /// Moves a user's subject pin to `issuer`'s `sub` (an operator action after a legitimate
    /// `sub` change).
    pub async fn repin(&self, user_id: &str, issuer: &str, sub: &str) -> Result<(), GatewayError> {
        self.store
            .repin_subject(user_id, &issuer_scoped(issuer, sub))
            .await
            .map_err(store_failed)?;
        self.user_changed(user_id).await;
        Ok(())
    }

    /// A user's pin or tombstone changed: forget the cached state here and tell the replicas.
    async fn user_changed(&self, user_id: &str) {
        self.users.invalidate(user_id).await;
        self.publish(Event::User {
            user: user_id.to_owned(),
        })
        .await;
    }
}

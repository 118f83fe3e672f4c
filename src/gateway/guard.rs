//! request_filter, step 6: the cross-signing guard (MSC4312). Replacing a user's existing
//! cross-signing master key needs a reset the user approved at the OP's account page; the
//! first upload does not. A store failure here is a 503, never a user-interactive-auth answer.
//!
//! An approved replacement is the gateway's decision, and the homeserver must not ask the user
//! for a password they do not have: on Synapse it is sent as the application service (Synapse
//! lets an appservice replace cross-signing keys without user-interactive auth, its MSC4190
//! support), for that one request only (`Ctx::as_appservice`; the binding itself is untouched),
//! with the gateway's own `user_id` and `device_id` and no client-supplied ones (`target`).
//! Dendrite and Conduit ask every upload for a password, and tuwunel is not verified:
//! docs/clients.md.

use super::classify::{Route, Special};
use super::ctx::Ctx;
use super::Gateway;
use crate::auth::Identity;
use crate::binding::Credential;
use crate::config::HomeserverKind;
use crate::error::{BindingFailure, GatewayError};

/// Refuses a cross-signing key upload that would replace a key without an approved reset.
pub async fn cross_signing(
    gw: &Gateway,
    route: &Route<'_>,
    identity: &Identity,
    ctx: &mut Ctx,
) -> Result<(), GatewayError> {
    let Some(bound) = ctx.bound.clone() else {
        return Ok(());
    };
    if route.special != Special::CrossSigningUpload || !gw.binder.has_master_key(&bound).await? {
        return Ok(());
    }
    let approved = gw
        .binder
        .store()
        .take_cross_signing_reset(&identity.user_id, gw.clock.now_ms())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "state store failed during the cross-signing guard");
            GatewayError::BindingUnavailable(BindingFailure::Store)
        })?;
    if !approved {
        return Err(GatewayError::CrossSigningResetRequired);
    }
    tracing::info!(user = %identity.user_id, "approved cross-signing reset used");
    if gw.config.homeserver.kind == HomeserverKind::Synapse
        && matches!(bound.credential, Credential::DeviceToken(_))
    {
        ctx.as_appservice = true;
        tracing::info!(
            user = %identity.user_id,
            device = bound.device_id.as_deref().unwrap_or(""),
            "approved cross-signing replacement sent as the application service"
        );
    }
    Ok(())
}

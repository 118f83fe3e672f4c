//! request_filter, step 6: the cross-signing guard (MSC4312). Replacing a user's existing
//! cross-signing master key needs a reset the user approved at the OP's account page; the
//! first upload does not. A store failure here is a 503, never a user-interactive-auth answer.
//!
//! An approved replacement is the gateway's decision, and the homeserver must not ask the user
//! for a password they do not have: on Synapse it is sent as the application service (Synapse
//! lets an appservice replace cross-signing keys without user-interactive auth, its MSC4190
//! support), for that one request only (`Ctx::as_appservice`; the binding itself is untouched),
//! with the gateway's own `user_id` and `device_id` and no client-supplied ones (`target`).
//! Dendrite asks every upload, the first one too, for the user's password (its `m.login.password`
//! stage), which users of an OP-fronted server do not have. With `homeserver.admin_token`
//! configured, the gateway answers that stage itself for the uploads it admits: it reads the
//! upload, sets a fresh random password through Dendrite's admin API, and forwards the upload
//! with that password as its `auth` (whatever `auth` the client sent is replaced). The password
//! is never stored or logged; the next upload sets another. Conduit also asks for a password
//! and has no admin API to set one; tuwunel is not verified: docs/clients.md.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde_json::{json, Map, Value};

use super::classify::{Route, Special};
use super::ctx::{Ctx, RequestBody};
use super::Gateway;
use crate::auth::Identity;
use crate::binding::Credential;
use crate::config::HomeserverKind;
use crate::error::{BindingFailure, GatewayError, UploadBodyFault};

/// The largest cross-signing upload the gateway completes (Pingora buffers up to 64 KiB for a
/// request body it forwards after reading it; an upload of three keys is about 2 KiB).
pub const UPLOAD_BODY_LIMIT: usize = 64 * 1024;

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
    if route.special != Special::CrossSigningUpload {
        return Ok(());
    }
    let has_key = gw.binder.has_master_key(&bound).await?;
    let mut replacing = has_key;
    if gw.binder.answers_password_stage() {
        // The homeserver no longer checks anything itself (the gateway answers its password
        // stage), so "first upload" must not rest on keys/query alone: Dendrite leaves a user
        // out of its answer when its own lookup fails. A user counts as having keys once an
        // upload was admitted for them (an atomic claim, so of two concurrent first uploads
        // one is a replacement); a first upload that does not land gives the claim back
        // (`release_claim`, from `logging`).
        ctx.request_body = RequestBody::PasswordStage;
        let claimed = gw
            .binder
            .store()
            .claim_cross_signing(&bound.user_id)
            .await
            .map_err(store_failed)?;
        replacing = has_key || !claimed;
        ctx.cross_signing_claim = claimed && !has_key;
    }
    if !replacing {
        return Ok(());
    }
    let approved = gw
        .binder
        .store()
        .take_cross_signing_reset(identity.user_id(), gw.clock.now_ms())
        .await
        .map_err(store_failed)?;
    if !approved {
        return Err(GatewayError::CrossSigningResetRequired);
    }
    tracing::info!(user = %identity.user_id(), "approved cross-signing reset used");
    if gw.config.homeserver.kind == HomeserverKind::Synapse
        && matches!(bound.credential, Credential::DeviceToken(_))
    {
        ctx.as_appservice = true;
        tracing::info!(
            user = %identity.user_id(),
            device = bound.device_id.as_deref().unwrap_or(""),
            "approved cross-signing replacement sent as the application service"
        );
    }
    Ok(())
}

fn store_failed(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "state store failed during the cross-signing guard");
    GatewayError::BindingUnavailable(BindingFailure::Store)
}

/// After a first upload `cross_signing` claimed: gives the claim back unless the homeserver
/// took the upload (200), so the user's next upload is a first upload again.
pub async fn release_claim(gw: &Gateway, ctx: &Ctx, status: Option<u16>) {
    let (true, Some(bound)) = (ctx.cross_signing_claim, ctx.bound.as_deref()) else {
        return;
    };
    if status == Some(200) {
        return;
    }
    if let Err(e) = gw
        .binder
        .store()
        .release_cross_signing(&bound.user_id)
        .await
    {
        // Fails closed: the user's next first upload needs an approved reset.
        tracing::error!(user = %bound.user_id, error = %e, "could not release a cross-signing claim");
    }
}

/// Completes an admitted cross-signing upload with the password stage Dendrite asks for (see
/// the module header): reads the body, sets a fresh password, and keeps the body to forward in
/// `ctx.request_body`. Runs after `admit`, only when `cross_signing` asked for it.
pub async fn password_stage(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Result<(), GatewayError> {
    let Some(bound) = ctx.bound.clone() else {
        return Err(GatewayError::Internal);
    };
    let body = read_body(session).await?;
    let mut upload: Map<String, Value> = serde_json::from_slice(&body)
        .map_err(|_| GatewayError::UploadBody(UploadBodyFault::NotJsonObject))?;
    // Nothing to upload, nothing to set a password for (each reset costs the homeserver two
    // bcrypt rounds).
    if !["master_key", "self_signing_key", "user_signing_key"]
        .iter()
        .any(|k| upload.get(*k).is_some_and(Value::is_object))
    {
        return Err(GatewayError::UploadBody(UploadBodyFault::NotJsonObject));
    }
    let password = gw.binder.one_time_password(&bound.user_id).await?;
    upload.insert(
        "auth".into(),
        json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": bound.user_id},
            "password": password,
        }),
    );
    let body = serde_json::to_vec(&upload).map_err(|_| GatewayError::Internal)?;
    tracing::info!(
        user = %bound.user_id,
        "cross-signing upload sent with a gateway-set homeserver password"
    );
    ctx.request_body = RequestBody::Replaced(Bytes::from(body));
    Ok(())
}

/// The whole request body, kept by Pingora for forwarding (its retry buffer), at most
/// [`UPLOAD_BODY_LIMIT`] bytes.
async fn read_body(session: &mut Session) -> Result<Bytes, GatewayError> {
    session.enable_retry_buffering();
    if session
        .req_header()
        .headers
        .contains_key(http::header::EXPECT)
    {
        // The client waits for this before sending the body (Pingora does not send it itself).
        session
            .write_continue_response()
            .await
            .map_err(|_| GatewayError::UploadBody(UploadBodyFault::NotJsonObject))?;
    }
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > UPLOAD_BODY_LIMIT {
                    return Err(GatewayError::UploadBody(UploadBodyFault::TooLarge));
                }
                body.extend_from_slice(&chunk);
            }
            // What Pingora replays upstream is its retry buffer: it must hold the whole body.
            Ok(None) if session.get_retry_buffer().is_none() && !body.is_empty() => {
                return Err(GatewayError::UploadBody(UploadBodyFault::TooLarge));
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                tracing::debug!(error = %e, "could not read a cross-signing upload");
                return Err(GatewayError::UploadBody(UploadBodyFault::NotJsonObject));
            }
        }
    }
}

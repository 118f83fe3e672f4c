//! request_filter, step 5: bind the verified identity to the homeserver. In a binding mode with
//! an upstream credential this provisions the user and device (once; later requests find the
//! binding cached); in `headers` mode only the subject pin and tombstone checks run. A
//! masquerading appservice may only read the members of rooms its user has joined.

use std::sync::Arc;

use super::classify::{self, Route, Special};
use super::ctx::Ctx;
use super::Gateway;
use crate::auth::Identity;
use crate::binding::Credential;
use crate::config::BindingMode;
use crate::error::GatewayError;

/// Binds `identity` upstream and records the binding in `ctx`.
pub async fn bind(
    gw: &Gateway,
    route: &Route<'_>,
    identity: &Arc<Identity>,
    ctx: &mut Ctx,
) -> Result<(), GatewayError> {
    if gw.binder.mode() == BindingMode::Headers {
        // Identity headers only: the pin and tombstone checks are all there is to do.
        return gw.binder.check_user(identity).await;
    }
    let bound = gw.binder.bind(identity).await?;
    ctx.bound = Some(bound.clone());
    if route.special == Special::JoinedMembers && bound.credential == Credential::Masquerade {
        let room = classify::client_endpoint(route.path)
            .and_then(classify::joined_members_room)
            .unwrap_or_default();
        if !gw.binder.is_joined(&bound, room).await? {
            return Err(GatewayError::NotJoined);
        }
    }
    Ok(())
}

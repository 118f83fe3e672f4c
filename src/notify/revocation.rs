//! The RFC 7009 revocation proxy: a client's revocation forwarded to the OP, and, once the OP
//! acknowledged it, the token refused here and (for a refresh token) its device signed out.

use std::net::IpAddr;

use bytes::Bytes;

use super::{Notifier, Source};
use crate::auth::identity::{build_identity, parse_scope};
use crate::auth::jwt::{looks_like_jwt, unverified_issuer, JwtOutcome};
use crate::auth::revocations::Selector;
use crate::auth::{Identity, TokenHash};
use crate::error::{BindingFailure, GatewayError, OpFailure};

impl Notifier {
    /// The RFC 7009 revocation proxy: learns what the token belongs to, forwards the request
    /// unchanged to the OP, and once the OP answered 200 refuses the token and (for a refresh
    /// token) signs its device out upstream. Returns the OP's answer to relay.
    ///
    /// Anyone can call it and an OP acknowledges any token (RFC 7009 §2.2), so: a token is
    /// looked up (in the cache, else with one introspection) only when the request carries
    /// client authentication; a revocation is recorded only for a token the gateway can
    /// attribute to a session; and when the list has no room, nothing is forwarded (503).
    pub async fn revoke_at_op(
        &self,
        body: Bytes,
        content_type: Option<&str>,
        authorization: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<(u16, Option<String>, Bytes), GatewayError> {
        let mut token = None;
        let mut hint = None;
        let mut client_id = false;
        for (k, v) in form_urlencoded::parse(&body) {
            match k.as_ref() {
                "token" => token = Some(v.into_owned()),
                "token_type_hint" => hint = Some(v.into_owned()),
                "client_id" => client_id = true,
                _ => {}
            }
        }
        // A token revocation and a device revocation at most.
        if !self.verifier.revocations().has_room(2, self.clock.now_ms()) {
            tracing::error!("revocation proxy: the revocation list is full; answering 503 without asking the OP (raise notifications.max_revocations)");
            return Err(GatewayError::BindingUnavailable(BindingFailure::Store));
        }
        if let Some(t) = &token {
            if let Some(answer) = self.revoke_compat(t).await? {
                return Ok(answer);
            }
        }
        let authenticated = client_id || authorization.is_some();
        // A lookup that failed (OP or keys unavailable, introspection shed, store down) is a
        // 503 before anything is forwarded: forwarding would have the OP revoke a token the
        // gateway could then not refuse.
        let learned = match &token {
            Some(t) if authenticated => self.inspect(t, hint.as_deref(), client).await?,
            _ => None,
        };
        let answer = self
            .verifier
            .op()
            .forward_revocation(body, content_type, authorization)
            .await
            .map_err(GatewayError::OpUnavailable)?;
        if answer.0 == 200 {
            if let Some(t) = &token {
                let hash = TokenHash::of(t);
                // A compat token is never forwarded here (`revoke_compat`): nothing to end.
                let recorded = match learned {
                    Some(_) => self.record(Selector::Token(hash), true).await.map(|_| ()),
                    None => Ok(()),
                };
                // Purged whatever happened to the record.
                self.verifier.purge_token_everywhere(&hash).await;
                recorded?;
            }
            // The Matrix spec has the OP revoke both tokens of a session whichever it is given;
            // `revocation_signs_out = "refresh_token"` keeps the device on access-token revocation.
            if let Some(l) = learned.filter(|l| l.refresh || self.access_revocation_signs_out) {
                if let Some(device) = &l.device {
                    self.revoke_device(&l.user, device, Source::Revocation)
                        .await?;
                }
            }
        }
        Ok(answer)
    }

    /// A compat token (gateway-issued, `[compat]`) is the gateway's to revoke: its session
    /// ends here (device refused and signed out upstream first, then the session's tokens
    /// deleted), and it is never sent to the OP, which does not know it. `None` for any other
    /// token. Like any RFC 7009 revocation, an unknown token is answered 200 too.
    async fn revoke_compat(
        &self,
        token: &str,
    ) -> Result<Option<(u16, Option<String>, Bytes)>, GatewayError> {
        let Some(compat) = self.verifier.compat() else {
            return Ok(None);
        };
        let Some(kind) = crate::compat::TokenKind::of(token) else {
            return Ok(None);
        };
        if let Some(identity) = compat.session_identity(kind, token).await? {
            if let Some(device) = identity.device_id() {
                self.revoke_device(identity.user_id(), device, Source::Revocation)
                    .await?;
            }
            compat.end_session(kind, token).await?;
            self.verifier
                .purge_token_everywhere(&TokenHash::of(token))
                .await;
            tracing::info!(user = %identity.user_id(), device = ?identity.device_id(), "compat: session ended by revocation");
        }
        Ok(Some((
            200,
            Some("application/json".to_owned()),
            Bytes::from_static(b"{}"),
        )))
    }

    /// Who a token belongs to: the identity cached for it, a verified JWT, or what one
    /// introspection at the OP says; `Ok(None)` when none of them attributes it to the user
    /// whose subject owns it. `Err` when that cannot be known now.
    async fn inspect(
        &self,
        token: &str,
        hint: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Option<Learned>, GatewayError> {
        let owned = |issuer: &str, sub: &str, user: &str| {
            let (issuer, sub, user) = (issuer.to_owned(), sub.to_owned(), user.to_owned());
            async move {
                // Only the subject that owns the user ID may sign its devices out: another
                // issuer's equal `sub`, or a reassigned username, may not.
                let owner = self
                    .binder
                    .user_of_subject(&issuer, &sub)
                    .await
                    .map_err(|_| GatewayError::BindingUnavailable(BindingFailure::Store))?;
                Ok::<_, GatewayError>(owner.as_deref() == Some(user.as_str()))
            }
        };
        let cached = self.verifier.cached_identity(&TokenHash::of(token)).await;
        if let Some(id) = cached {
            if !owned(&id.issuer, id.subject(), id.user_id()).await? {
                return Ok(None);
            }
            return Ok(Some(Learned {
                user: id.user_id().to_owned(),
                device: id.device_id().map(str::to_owned),
                refresh: false,
            }));
        }
        // Not cached: this lookup is charged to the caller's new-token budget, like a request's
        // (given back when the OP fails or sheds it).
        let charged = self
            .verifier
            .charge_new_token(client)
            .map_err(|retry_after_ms| GatewayError::RateLimited { retry_after_ms })?;
        let learned = async {
            if looks_like_jwt(token) {
                let Some(issuer) = unverified_issuer(token)
                    .and_then(|iss| self.verifier.jwt_issuers().get(&iss).cloned())
                else {
                    return Ok(None);
                };
                return match issuer.validate(token).await {
                    JwtOutcome::Valid(claims, _) => {
                        let Some(id) = self.map_identity(&claims) else {
                            return Ok(None);
                        };
                        if !owned(&id.issuer, id.subject(), id.user_id()).await? {
                            return Ok(None);
                        }
                        Ok(Some(Learned {
                            user: id.user_id().to_owned(),
                            device: id.device_id().map(str::to_owned),
                            refresh: false,
                        }))
                    }
                    JwtOutcome::Unavailable(f) => Err(GatewayError::OpUnavailable(f)),
                    JwtOutcome::Rejected(_) => Ok(None),
                };
            }
            let op = self.verifier.op();
            // One introspection: the hint only orders the OP's own search (RFC 7662 §2.1).
            let hint = match hint {
                Some("refresh_token") => "refresh_token",
                _ => "access_token",
            };
            let answer = op
                .introspect_as(token, hint, false)
                .await
                .map_err(GatewayError::OpUnavailable)?;
            if !answer.active {
                return Ok(None);
            }
            let access_types = &op.issuer().access_token_types;
            let refresh = match answer.token_type.as_deref() {
                Some(t) if t.eq_ignore_ascii_case("refresh_token") => true,
                Some(t) => !access_types.iter().any(|a| a.eq_ignore_ascii_case(t)),
                None => true,
            };
            let Some(sub) = answer.sub.clone() else {
                return Ok(None);
            };
            let user = self
                .binder
                .user_of_subject(&op.issuer().issuer, &sub)
                .await
                .map_err(|_| GatewayError::BindingUnavailable(BindingFailure::Store))?;
            let Some(user) = user else {
                return Ok(None);
            };
            let device = answer.device_id.clone().or_else(|| {
                parse_scope(answer.scope.as_deref().unwrap_or(""))
                    .devices
                    .into_iter()
                    .next()
            });
            Ok(Some(Learned {
                user,
                device,
                refresh,
            }))
        }
        .await;
        if matches!(learned, Err(GatewayError::OpUnavailable(f)) if f != OpFailure::Overloaded) {
            self.verifier.refund_new_token(charged);
        }
        learned
    }

    fn map_identity(&self, claims: &crate::auth::identity::Claims) -> Option<Identity> {
        build_identity(
            claims,
            self.verifier.user_id_claims(),
            self.verifier.server_name(),
        )
        .ok()
    }
}

/// What a token belongs to.
#[derive(Debug)]
struct Learned {
    user: String,
    device: Option<String>,
    refresh: bool,
}

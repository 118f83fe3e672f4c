//! Sign-out and deactivation: what happens when the OP (back-channel logout), a client (token
//! revocation through the gateway) or an operator (admin API) ends a session.
//!
//! Every path records a revocation (so neither a cached identity nor a still-valid JWT passes
//! again), purges the matching cached identities **before** it answers, and signs the bound
//! devices out upstream through [`Binder`]. The revocation proxy is `revocation`; logout-token
//! validation is `logout_token`.

pub mod logout_token;
mod revocation;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::identity::issuer_scoped;
use crate::auth::revocations::{RevokeError, Selector};
use crate::auth::{Identity, TokenHash, Verifier};
use crate::binding::{store_failed, Binder};
use crate::clock::SharedClock;
use crate::compat::LiveSession;
use crate::error::{BindingFailure, GatewayError};
use crate::store::redis::Event;
use logout_token::{LogoutRejection, LogoutValidator};

/// Where a sign-out came from (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// OIDC Back-Channel Logout.
    BackchannelLogout,
    /// RFC 7009 revocation through the gateway.
    Revocation,
    /// The admin API.
    Admin,
    /// A legacy client's `/logout` (compat session).
    Logout,
    /// A compat session's OP grant ended (the OP refused its refresh, or it was not confirmed
    /// in time).
    OpGrantEnded,
}

impl Source {
    /// Label for logs and metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            Source::BackchannelLogout => "backchannel_logout",
            Source::Revocation => "revocation",
            Source::Admin => "admin",
            Source::Logout => "logout",
            Source::OpGrantEnded => "op_grant_ended",
        }
    }
}

/// What a sign-out did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SignOut {
    /// Cached identities purged.
    pub purged: usize,
    /// `(user, device)` pairs signed out upstream.
    pub devices: Vec<(String, String)>,
}

/// The sign-out service.
pub struct Notifier {
    verifier: Arc<Verifier>,
    binder: Arc<Binder>,
    logout: LogoutValidator,
    clock: SharedClock,
    retention: Duration,
    access_revocation_signs_out: bool,
}

impl Notifier {
    /// Assembles the service.
    pub fn new(
        verifier: Arc<Verifier>,
        binder: Arc<Binder>,
        logout: LogoutValidator,
        clock: SharedClock,
        retention: Duration,
        access_revocation_signs_out: bool,
    ) -> Self {
        Self {
            verifier,
            binder,
            logout,
            clock,
            retention,
            access_revocation_signs_out,
        }
    }

    /// Applies a revocation another replica made: refuse and purge the matching local entries.
    pub async fn apply_remote(&self, event: &Event) {
        match event {
            Event::Revoke { key, at, until } => {
                let Some(selector) = Selector::from_key(key) else {
                    return;
                };
                self.verifier
                    .revocations()
                    .remember(selector.clone(), *at, *until);
                match &selector {
                    Selector::Token(hash) => self.verifier.purge_token(hash).await,
                    _ => {
                        self.verifier
                            .purge_where(|i| crate::auth::revocations::matches(&selector, *at, i))
                            .await;
                    }
                }
            }
            other => self.binder.apply_remote(other).await,
        }
    }

    /// The verifier (the fan-out subscriber resynchronises it).
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// The binder (admin API).
    pub fn binder(&self) -> &Arc<Binder> {
        &self.binder
    }

    /// Records and publishes a revocation (never refused for a full list); the compat
    /// sessions it covers, marked signed out.
    async fn revoke(&self, selector: Selector) -> Result<Vec<LiveSession>, GatewayError> {
        self.record(selector, false).await
    }

    /// Records and publishes a revocation; `capped` ones (the revocation proxy's: anyone can
    /// cause them) are refused when the list is full. The compat sessions it covers are marked
    /// signed out in the store for good (refused, whatever happens to the revocation, which is
    /// forgotten after the retention, while a session tied to an OP grant may live longer);
    /// they are returned, for the caller to end once their devices were signed out upstream
    /// (until then a failed sign-out can be retried with the same session).
    async fn record(
        &self,
        selector: Selector,
        capped: bool,
    ) -> Result<Vec<LiveSession>, GatewayError> {
        let now = self.clock.now_ms();
        let until = now + self.retention.as_millis() as u64;
        let key = selector.key();
        self.verifier
            .revocations()
            .revoke(selector.clone(), now, until, capped)
            .await
            .map_err(|e| {
                match &e {
                    RevokeError::Full(_) => tracing::error!(error = %e, "revocation refused: raise notifications.max_revocations or shorten revocation_retention"),
                    RevokeError::Store(_) => tracing::error!(error = %e, "cannot persist a revocation"),
                }
                GatewayError::BindingUnavailable(BindingFailure::Store)
            })?;
        self.binder
            .publish(Event::Revoke {
                key,
                at: now,
                until,
            })
            .await;
        let covered = self.covered_compat(&selector, now).await?;
        if let Some(compat) = self.verifier.compat() {
            for live in &covered {
                compat.mark_signed_out(live).await?;
            }
        }
        Ok(covered)
    }

    /// The compat sessions a revocation of `selector` made at `at` covers.
    async fn covered_compat(
        &self,
        selector: &Selector,
        at: u64,
    ) -> Result<Vec<LiveSession>, GatewayError> {
        let Some(compat) = self.verifier.compat() else {
            return Ok(Vec::new());
        };
        let split = |key: &str| {
            key.split_once(crate::auth::identity::ISSUER_SEP)
                .map(|(i, v)| (i.to_owned(), v.to_owned()))
        };
        let unavailable = |e: crate::store::StoreError| {
            tracing::error!(error = %e, "cannot find the compat sessions a revocation covers");
            GatewayError::BindingUnavailable(BindingFailure::Store)
        };
        let mut found = Vec::new();
        let users: BTreeSet<String> = match selector {
            Selector::User(u) | Selector::Device(u, _) => BTreeSet::from([u.clone()]),
            Selector::Subject(key) => match split(key) {
                Some((issuer, sub)) => self
                    .binder
                    .user_of_subject(&issuer, &sub)
                    .await
                    .map_err(unavailable)?
                    .into_iter()
                    .collect(),
                None => BTreeSet::new(),
            },
            // The compat layer's own index of OP sessions (whatever the binding mode
            // records), and the users the binding saw in that OP session.
            Selector::Session(key) => {
                found.extend(compat.sessions_of_op_session(key).await?);
                match split(key) {
                    Some((issuer, sid)) => self
                        .binder
                        .session_devices(&issuer, &sid)
                        .await
                        .map_err(unavailable)?
                        .into_iter()
                        .map(|(user, _)| user)
                        .collect(),
                    None => BTreeSet::new(),
                }
            }
            Selector::Token(hash) => {
                found.extend(compat.session_of_token(hash).await?);
                BTreeSet::new()
            }
        };
        for user in users {
            for live in compat.sessions_of(&user).await? {
                if crate::auth::revocations::matches(selector, at, live.identity()) {
                    found.push(live);
                }
            }
        }
        found.sort_by(|a, b| a.id().cmp(b.id()));
        found.dedup_by(|a, b| a.id() == b.id());
        Ok(found)
    }

    /// Ends compat sessions a sign-out covered, once their devices were signed out upstream:
    /// their records are deleted from the store, their tokens purged.
    async fn end_compat(&self, covered: &[LiveSession]) -> Result<(), GatewayError> {
        let Some(compat) = self.verifier.compat() else {
            return Ok(());
        };
        for live in covered {
            compat.end(live).await?;
            self.verifier.purge_token_everywhere(&live.access).await;
            tracing::info!(user = %live.identity().user_id(), device = ?live.identity().device_id(), "compat session ended by a sign-out");
        }
        Ok(())
    }

    /// The (user, device) pairs of compat sessions, to sign out upstream.
    fn compat_pairs(covered: &[LiveSession]) -> impl Iterator<Item = (String, String)> + '_ {
        covered.iter().filter_map(|l| {
            let i = l.identity();
            i.device_id()
                .map(|d| (i.user_id().to_owned(), d.to_owned()))
        })
    }

    /// Signs every pair out upstream (all are tried); an error when any of them failed, so
    /// the caller answers 5xx and the work is retried (the tokens are refused already).
    async fn sign_out(
        &self,
        source: Source,
        pairs: BTreeSet<(String, String)>,
        purged: usize,
    ) -> Result<SignOut, GatewayError> {
        let mut devices = Vec::new();
        let mut failure = None;
        for (user, device) in pairs {
            match self.binder.sign_out_device(&user, &device).await {
                Ok(()) => devices.push((user, device)),
                Err(e) => {
                    tracing::error!(
                        user = %user,
                        device = %device,
                        source = source.as_label(),
                        reason = e.reason_label(),
                        "upstream sign-out failed; the gateway refuses the session's tokens regardless, and the caller is told to retry"
                    );
                    failure = Some(e);
                }
            }
        }
        tracing::info!(
            source = source.as_label(),
            purged,
            devices = devices.len(),
            "signed out"
        );
        crate::metrics::SIGNOUTS
            .with_label_values(&[source.as_label()])
            .inc();
        crate::metrics::PURGED
            .with_label_values(&[source.as_label()])
            .inc_by(purged as u64);
        match failure {
            Some(e) => Err(e),
            None => Ok(SignOut { purged, devices }),
        }
    }

    /// The (user, device) pairs of cached `identities` whose subject owns the user ID. A token
    /// is cached once verified, before the subject pin is checked: one whose claim maps to a
    /// user ID another subject owns (a reassigned username) was refused, and its logout must
    /// not sign the owner's device out.
    async fn owned_pairs(
        &self,
        identities: &[Arc<Identity>],
    ) -> Result<BTreeSet<(String, String)>, crate::store::StoreError> {
        let mut pairs = BTreeSet::new();
        for i in identities {
            let Some(device) = i.device_id() else {
                continue;
            };
            if self.binder.owns(i).await? {
                pairs.insert((i.user_id().to_owned(), device.to_owned()));
            }
        }
        Ok(pairs)
    }

    /// Validates a back-channel logout token and ends the session it names.
    pub async fn backchannel_logout(&self, logout_token: &str) -> Result<SignOut, LogoutRejection> {
        let event = self.logout.validate(logout_token).await.inspect_err(|r| {
            tracing::warn!(reason = r.as_label(), "back-channel logout token refused");
            crate::metrics::LOGOUT_REFUSED
                .with_label_values(&[r.metric_label()])
                .inc();
        })?;
        let done = self
            .end_session(
                &event.issuer,
                event.sid.as_deref(),
                event.sub.as_deref(),
                Source::BackchannelLogout,
            )
            .await;
        match done {
            Ok(out) => Ok(out),
            Err(e) => {
                // Not carried out: the OP is answered 503, and its retry of this very token
                // must be accepted, so the `jti` is forgotten before the answer (the
                // revocation, if it was recorded, stays).
                tracing::error!(
                    reason = e.reason_label(),
                    "back-channel logout not completed; the OP is asked to retry"
                );
                if let Err(e) = self.binder.store().forget_jti(&event.jti_key).await {
                    tracing::error!(error = %e, "cannot forget a logout jti; a retry of it will be refused as a replay");
                }
                Err(LogoutRejection::Unavailable)
            }
        }
    }

    /// Ends an OP session of `issuer`: by `sid` when given, else every session of `sub`.
    /// Sessions and subjects are only unique per issuer: another issuer's are never touched.
    pub async fn end_session(
        &self,
        issuer: &str,
        sid: Option<&str>,
        sub: Option<&str>,
        source: Source,
    ) -> Result<SignOut, GatewayError> {
        let covered;
        // The devices the cache names are taken before the revocation: its fan-out comes back
        // to this replica too and purges them, maybe before the store lookup below returns.
        // Whose they are is settled first too (a cached token may name a device of a user ID
        // its subject does not own: it was refused at the pin), so that a failure there is a
        // 503 with nothing recorded yet. When the store lookup fails (503, the OP retries),
        // the cache's devices are signed out first, so that a retry, which finds the store's
        // only, loses none. The revocation, recorded first, keeps the tokens refused meanwhile.
        let (purged, mut pairs) = if let Some(sid) = sid {
            let key = issuer_scoped(issuer, sid);
            let in_session = |i: &Identity| i.session_key().as_deref() == Some(key.as_str());
            let known = self.verifier.cached_where(in_session);
            let mut pairs = self.owned_pairs(&known).await.map_err(store_failed)?;
            covered = self.revoke(Selector::Session(key.clone())).await?;
            let stored = match self.binder.session_devices(issuer, sid).await {
                Ok(stored) => stored,
                Err(e) => return Err(self.unresolved(source, pairs, e).await),
            };
            let purged = self.verifier.purge_where(in_session).await;
            pairs.extend(self.owned_since(&purged, &known).await);
            pairs.extend(stored);
            (purged.len().max(known.len()), pairs)
        } else if let Some(sub) = sub {
            let key = issuer_scoped(issuer, sub);
            let of_subject = |i: &Identity| i.subject_key() == key;
            let known = self.verifier.cached_where(of_subject);
            let mut pairs = self.owned_pairs(&known).await.map_err(store_failed)?;
            covered = self.revoke(Selector::Subject(key.clone())).await?;
            let stored = match self.subject_devices(issuer, sub).await {
                Ok(stored) => stored,
                Err(e) => return Err(self.unresolved(source, pairs, e).await),
            };
            let purged = self.verifier.purge_where(of_subject).await;
            pairs.extend(self.owned_since(&purged, &known).await);
            pairs.extend(stored);
            (purged.len().max(known.len()), pairs)
        } else {
            return Ok(SignOut::default());
        };
        pairs.extend(Self::compat_pairs(&covered));
        pairs.retain(|(_, d)| !d.is_empty());
        let out = self.sign_out(source, pairs, purged).await?;
        self.end_compat(&covered).await?;
        Ok(out)
    }

    /// [`Self::owned_pairs`] of the identities the revocation purged that were not `known`
    /// before it (cached while it ran). Past the revocation a failure cannot be a clean 503:
    /// such a device is left bound (its tokens are refused already) and logged.
    async fn owned_since(
        &self,
        purged: &[Arc<Identity>],
        known: &[Arc<Identity>],
    ) -> BTreeSet<(String, String)> {
        let new: Vec<Arc<Identity>> = purged
            .iter()
            .filter(|p| !known.iter().any(|k| Arc::ptr_eq(k, p)))
            .cloned()
            .collect();
        self.owned_pairs(&new).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot tell who owns the devices of tokens cached during a sign-out; they stay bound (their tokens are refused)");
            BTreeSet::new()
        })
    }

    /// The (user, device) pairs the store holds for `issuer`'s subject `sub`.
    async fn subject_devices(
        &self,
        issuer: &str,
        sub: &str,
    ) -> Result<Vec<(String, String)>, crate::store::StoreError> {
        let Some(user) = self.binder.user_of_subject(issuer, sub).await? else {
            return Ok(Vec::new());
        };
        let devices = self.binder.store().devices_of(&user).await?;
        Ok(devices.into_iter().map(|d| (user.clone(), d)).collect())
    }

    /// A store failure while finding the devices an OP session or subject covers: the devices
    /// the cache named (`pairs`, their owners confirmed) are signed out now (a retry would not
    /// find them), and the caller (the OP, an operator) is told to retry for the rest.
    async fn unresolved(
        &self,
        source: Source,
        mut pairs: BTreeSet<(String, String)>,
        e: crate::store::StoreError,
    ) -> GatewayError {
        tracing::error!(error = %e, "cannot find the devices to sign out; the caller is told to retry");
        pairs.retain(|(_, d)| !d.is_empty());
        if !pairs.is_empty() {
            // Failures are logged by `sign_out`; the answer is a 503 either way.
            let _ = self.sign_out(source, pairs, 0).await;
        }
        GatewayError::BindingUnavailable(BindingFailure::Store)
    }

    /// Revokes one session (user + device): refuses its tokens, signs the device out.
    pub async fn revoke_device(
        &self,
        user: &str,
        device: &str,
        source: Source,
    ) -> Result<SignOut, GatewayError> {
        let selector = Selector::Device(user.to_owned(), device.to_owned());
        let covered = self.record(selector, source == Source::Revocation).await?;
        let purged = self
            .verifier
            .purge_where(|i| i.user_id() == user && i.device_id() == Some(device))
            .await;
        let pairs = BTreeSet::from([(user.to_owned(), device.to_owned())]);
        let out = self.sign_out(source, pairs, purged.len()).await?;
        self.end_compat(&covered).await?;
        Ok(out)
    }

    /// Signs out every session of a user.
    pub async fn logout_user(&self, user: &str, source: Source) -> Result<SignOut, GatewayError> {
        let covered = self.revoke(Selector::User(user.to_owned())).await?;
        let purged = self.verifier.purge_where(|i| i.user_id() == user).await;
        let devices = self.binder.sign_out_user(user).await?;
        self.end_compat(&covered).await?;
        tracing::info!(source = source.as_label(), user = %user, "all sessions signed out");
        Ok(SignOut {
            purged: purged.len(),
            devices: devices.into_iter().map(|d| (user.to_owned(), d)).collect(),
        })
    }

    /// Deactivates a user: tombstone (every token of the user now gets 403
    /// `M_USER_DEACTIVATED`), purge, upstream sign-out and deactivation.
    pub async fn deactivate(&self, user: &str, erase: bool) -> Result<&'static str, GatewayError> {
        self.verifier.purge_where(|i| i.user_id() == user).await;
        let done = self.binder.deactivate(user, erase).await?;
        // Its compat sessions end for good (a lifted tombstone must not bring them back).
        let covered = self
            .covered_compat(&Selector::User(user.to_owned()), self.clock.now_ms())
            .await?;
        self.end_compat(&covered).await?;
        Ok(done)
    }

    /// Purges cached identities without signing anything out upstream.
    pub async fn purge(&self, what: Purge) -> Result<usize, GatewayError> {
        Ok(match what {
            Purge::Token(token) => {
                let hash = TokenHash::of(&token);
                let covered = self.revoke(Selector::Token(hash)).await?;
                self.verifier.purge_token_everywhere(&hash).await;
                self.end_compat(&covered).await?;
                1
            }
            Purge::Subject(issuer, sub) => {
                let key = issuer_scoped(&issuer, &sub);
                let covered = self.revoke(Selector::Subject(key.clone())).await?;
                let purged = self.verifier.purge_where(|i| i.subject_key() == key).await;
                self.end_compat(&covered).await?;
                purged.len()
            }
            Purge::User(user) => {
                let covered = self.revoke(Selector::User(user.clone())).await?;
                let purged = self.verifier.purge_where(|i| i.user_id() == user).await;
                self.end_compat(&covered).await?;
                purged.len()
            }
        })
    }
}

/// A purge request of the admin API.
#[derive(Debug, Clone)]
pub enum Purge {
    /// One token (raw; hashed at once, never stored).
    Token(String),
    /// Every identity of an OIDC subject of an issuer: `(issuer, sub)`.
    Subject(String, String),
    /// Every identity of a Matrix user.
    User(String),
}

//! Token verification: turns a bearer token into a verified [`Identity`] or a [`GatewayError`].
//!
//! [`Verifier::verify`] consults the [`cache`] first; otherwise a JWT of a configured JWT issuer
//! is validated locally ([`jwt`]) and anything else is introspected at the primary OP ([`op`]).
//! Both paths end in the MSC2967 rules of [`identity`]. Raw tokens are only held for the
//! duration of the call, or of the background re-check a call starts: the cache is keyed by
//! [`TokenHash`].

pub mod budget;
pub mod cache;
pub mod identity;
pub mod jwks;
pub mod jwt;
pub mod op;
pub mod revocations;

use std::net::IpAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::clock::SharedClock;
use crate::config::{Config, VerifyMode};
use crate::error::{GatewayError, OpFailure, RejectReason};
use crate::store::redis::Redis;
use budget::AddressBudget;
use cache::{CacheOutcome, CachedVerdict, IdentityCache, Verdict};
use identity::{build_identity, Claims, IdentityError};
pub use identity::{Access, Identity, IdentityParts};
use jwt::{JwtIssuer, JwtIssuers, JwtOutcome};
use op::{IntrospectionResponse, OpClient};
use revocations::Revocations;

/// SHA-256 of a token: the only form in which a token is stored or logged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes a raw token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// A short hex prefix for log lines.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", self.short())
    }
}

/// The outcome of a verification, with how the cache was involved.
#[derive(Debug)]
pub struct Verified {
    /// The identity or the refusal.
    pub result: Result<Arc<Identity>, GatewayError>,
    /// Cache involvement, for logs and metrics.
    pub cache: CacheOutcome,
}

/// How a token is to be decided: whose budget pays, whether it is the re-check of a token
/// known valid (never shed for a full queue), and the earliest issue time the gateway already
/// knows for it (a re-check keeps it, locally and in the shared cache: a token without `iat`
/// was issued no later than its first verdict).
#[derive(Debug, Clone, Copy)]
struct Ask {
    charge: Option<IpAddr>,
    priority: bool,
    earliest: Option<u64>,
}

/// Why a token could not be decided.
#[derive(Debug, Clone, Copy)]
enum LoadFailure {
    /// The OP failed, or shed the call: 503.
    Op(OpFailure),
    /// The sender's address is over its budget of new tokens: 429, nobody was asked.
    OverBudget { retry_after_ms: u64 },
}

/// A token's background re-check, marked as running until it ends, however it ends (also
/// when its task never runs); then not to be tried again for `backoff_ms` from its end,
/// unless it renewed the verdict (which removes the mark).
struct Recheck {
    verifier: Arc<Verifier>,
    key: TokenHash,
    backoff_ms: u64,
}

impl Recheck {
    /// The verdict was renewed: the next re-check is due in the new window's last quarter.
    fn renewed(&mut self) {
        self.backoff_ms = 0;
    }
}

impl Drop for Recheck {
    fn drop(&mut self) {
        let now = self.verifier.clock.now_ms();
        let mut rechecks = self.verifier.rechecks.lock();
        let Rechecks { marks, running, .. } = &mut *rechecks;
        *running = running.saturating_sub(1);
        if self.backoff_ms == 0 {
            marks.remove(&self.key);
        } else if let Some(v) = marks.get_mut(&self.key) {
            *v = now.saturating_add(self.backoff_ms);
        }
    }
}

/// The background re-checks of one verifier.
#[derive(Default)]
struct Rechecks {
    /// Per token: [`RECHECK_RUNNING`], or not to be tried again before this Unix ms time.
    marks: std::collections::HashMap<TokenHash, u64>,
    /// How many are running.
    running: usize,
    /// When ended marks were last swept out of a full table (at most once a second).
    swept_ms: u64,
}

/// Verifies tokens through the identity cache: JWTs locally at the issuer named by `iss`
/// (modes `jwt`/`auto`), anything else by introspection at the primary issuer.
pub struct Verifier {
    op: Arc<OpClient>,
    /// The primary issuer's identifier, shared by every identity it vouches for.
    primary: Arc<str>,
    primary_introspects: bool,
    jwt: JwtIssuers,
    revocations: Arc<Revocations>,
    shared: Option<Redis>,
    cache: IdentityCache,
    /// Per-client-address budget of tokens not in the cache.
    budget: Option<AddressBudget>,
    /// The compat layer, whose access tokens are looked up in the store (set once at start
    /// when `[compat]` is on).
    compat: std::sync::OnceLock<Arc<crate::compat::Compat>>,
    clock: SharedClock,
    user_id_claims: Vec<String>,
    server_name: String,
    max_token_length: usize,
    negative_ttl_ms: u64,
    max_ttl_ms: u64,
    /// Background re-checks: per token, running ([`RECHECK_RUNNING`]) or not to be tried
    /// again before a Unix ms time (after a re-check that did not renew the verdict).
    rechecks: parking_lot::Mutex<Rechecks>,
    /// Most background re-checks running at once: a quarter of the primary issuer's
    /// introspection bound (at least one), so they never hold every slot.
    max_rechecks: usize,
}

/// A background re-check is running for the token.
const RECHECK_RUNNING: u64 = u64::MAX;
/// Most tokens whose background re-checks are remembered (running or backing off).
const MAX_RECHECK_ENTRIES: usize = 65_536;

impl Verifier {
    /// Builds the verifier: `op` is the primary issuer's client, `jwt` the JWT issuers.
    pub fn new(
        config: &Config,
        op: Arc<OpClient>,
        jwt: JwtIssuers,
        revocations: Arc<Revocations>,
        clock: SharedClock,
    ) -> Self {
        let max_rechecks = (op.issuer().max_concurrent_introspections / 4).max(1);
        Self {
            max_rechecks,
            revocations,
            shared: None,
            primary_introspects: op.issuer().mode != VerifyMode::Jwt,
            primary: Arc::from(op.issuer().issuer.as_str()),
            op,
            jwt,
            cache: IdentityCache::new(config.cache.capacity, clock.clone()),
            budget: AddressBudget::new(
                config.auth.new_tokens_per_address,
                config.auth.new_tokens_burst,
            ),
            compat: std::sync::OnceLock::new(),
            clock,
            user_id_claims: config.auth.user_id_claims.clone(),
            server_name: config.homeserver.server_name.clone(),
            max_token_length: config.auth.max_token_length,
            negative_ttl_ms: config.cache.negative_ttl.as_millis() as u64,
            max_ttl_ms: config.cache.max_ttl.as_millis() as u64,
            rechecks: parking_lot::Mutex::new(Rechecks::default()),
        }
    }

    /// Shares verdicts with other replicas through Redis (second-level cache, distributed
    /// single-flight).
    pub fn with_shared(mut self, redis: Redis) -> Self {
        self.shared = Some(redis);
        self
    }

    /// Drops cached verdicts decided before `before_ms` (after a shared-state outage).
    pub async fn purge_decided_before(&self, before_ms: u64) -> usize {
        self.cache.purge_decided_before(before_ms).await
    }

    /// The primary OP.
    pub fn op(&self) -> &Arc<OpClient> {
        &self.op
    }

    /// The JWT issuers.
    pub fn jwt_issuers(&self) -> &JwtIssuers {
        &self.jwt
    }

    /// The configured user-ID claims.
    pub fn user_id_claims(&self) -> &[String] {
        &self.user_id_claims
    }

    /// The Matrix server name.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The revocation list.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Drops every cached identity `matches` selects; returns them (for upstream sign-out).
    pub async fn purge_where(&self, matches: impl Fn(&Identity) -> bool) -> Vec<Arc<Identity>> {
        self.cache.purge_where(matches).await
    }

    /// The cached active identities `matches` selects, left in place.
    pub fn cached_where(&self, matches: impl Fn(&Identity) -> bool) -> Vec<Arc<Identity>> {
        self.cache.cached_where(matches)
    }

    /// The identity cached for a token, if it is cached as active and still fresh (an entry
    /// past its window, or whose token expired, vouches for nobody).
    pub async fn cached_identity(&self, key: &TokenHash) -> Option<Arc<Identity>> {
        self.cache.get(key).await?.check(self.clock.now_ms())?.ok()
    }

    /// Drops one token's cached verdict.
    pub async fn purge_token(&self, key: &TokenHash) {
        self.cache.purge(key).await;
    }

    /// Frees the cached verdicts whose window has ended.
    pub fn sweep_cache(&self) {
        self.cache.sweep();
    }

    /// Number of cached verdicts (approximate).
    pub fn cached_entries(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Verifies one token; revoked identities are refused whatever the cache or the JWT say.
    /// `client` is the address whose budget a token not in the cache is charged to (`None`:
    /// no budget applies, as for a Unix-socket peer).
    pub async fn verify(self: &Arc<Self>, token: &str, client: Option<IpAddr>) -> Verified {
        let key = TokenHash::of(token);
        let mut verified = self.verify_uncached_revocations(token, key, client).await;
        if let Ok(identity) = &verified.result {
            if self
                .revocations
                .is_revoked(identity, &key, self.clock.now_ms())
            {
                verified.result = Err(GatewayError::UnknownToken(RejectReason::Revoked));
            }
        }
        verified
    }

    async fn verify_uncached_revocations(
        self: &Arc<Self>,
        token: &str,
        key: TokenHash,
        client: Option<IpAddr>,
    ) -> Verified {
        if token.len() > self.max_token_length {
            return Verified {
                result: Err(GatewayError::UnknownToken(RejectReason::TooLong)),
                cache: CacheOutcome::Bypass,
            };
        }
        let now = self.clock.now_ms();
        let mut outcome = CacheOutcome::Miss;
        let mut known_valid = false;
        let mut first_vouched = None;
        if let Some(hit) = self.cache.get(&key).await {
            match hit.check(now) {
                Some(result) => {
                    if hit.refresh_due(now) {
                        self.recheck_ahead(key, token, &hit);
                    }
                    return Verified {
                        result,
                        cache: if matches!(hit.verdict, Verdict::Active(_)) {
                            CacheOutcome::Hit
                        } else {
                            CacheOutcome::NegativeHit
                        },
                    };
                }
                None => {
                    // Our reuse window ended before the token did: ask the OP again.
                    self.cache.drop_ended(key, &hit).await;
                    outcome = CacheOutcome::Refresh;
                    known_valid = matches!(hit.verdict, Verdict::Active(_));
                    first_vouched = hit.issued_at_ms();
                }
            }
        }
        // A token the gateway does not know to be valid is charged to its sender's address
        // when this replica decides it (the re-check of a valid one is not charged: only a
        // valid token gets that far).
        // The re-check of a token known valid is not charged, and is not shed for a full
        // introspection queue: a flood of new tokens must not sign known users out (it still
        // takes one of the bounded slots, so the OP's bound holds).
        let ask = Ask {
            charge: if known_valid { None } else { client },
            priority: known_valid,
            earliest: first_vouched,
        };
        let loaded = self
            .cache
            .get_or_load(
                key,
                async { self.load_shared(key, token, ask).await },
                // An OP that failed is everyone's answer; a budget, a shed call or a clock-skewed
                // new token is only the loading request's own (a known user waiting on it must
                // not inherit it: its own load keeps the issue time it had).
                |f| {
                    matches!(f, LoadFailure::Op(o)
                        if !matches!(o, OpFailure::Overloaded | OpFailure::ClockSkew))
                },
            )
            .await;
        match loaded {
            Ok((entry, fresh)) => Verified {
                result: entry
                    .check(self.clock.now_ms())
                    .unwrap_or_else(|| entry.verdict.to_result()),
                cache: if fresh {
                    outcome
                } else {
                    CacheOutcome::Coalesced
                },
            },
            Err(LoadFailure::OverBudget { retry_after_ms }) => Verified {
                result: Err(GatewayError::RateLimited { retry_after_ms }),
                cache: outcome,
            },
            Err(LoadFailure::Op(failure)) => {
                tracing::warn!(reason = ?failure, token = %key.short(), "introspection failed");
                Verified {
                    result: Err(GatewayError::OpUnavailable(failure)),
                    cache: outcome,
                }
            }
        }
    }

    /// Re-checks a cached valid token in the background, ahead of the end of its reuse window,
    /// so that its requests never wait for the OP while it stays in use (a slow or flooded OP
    /// would otherwise stall every request of a busy user at each window's end).
    ///
    /// What it brings back replaces `seen` only if `seen` is still the cached verdict (the
    /// replacement is serialised per key with purges): a sign-out, or a newer decision (say a
    /// refusal reached by a request at the window's end), always wins over a late re-check.
    /// A re-check that does not renew the verdict changes nothing: the cached verdict still
    /// ends with its window, and then the request waits for the OP as for any re-check. One
    /// re-check per token at a time, none for a sixteenth of `cache.max_ttl` after one that
    /// did not renew, at most a quarter of the issuer's introspection bound running at once;
    /// not charged to any budget and not shed for a full queue (only a token cached as valid
    /// gets here), but each takes one of the bounded introspection slots. The raw token lives
    /// in the task until it ends (at most about twice the OP timeout); it is never logged or
    /// stored.
    fn recheck_ahead(self: &Arc<Self>, key: TokenHash, token: &str, seen: &CachedVerdict) {
        let now = self.clock.now_ms();
        {
            let mut rechecks = self.rechecks.lock();
            let Rechecks {
                marks,
                running,
                swept_ms,
            } = &mut *rechecks;
            if marks.get(&key).is_some_and(|&not_before| now < not_before)
                || *running >= self.max_rechecks
            {
                return;
            }
            if marks.len() >= MAX_RECHECK_ENTRIES {
                if now.saturating_sub(*swept_ms) < 1_000 {
                    return;
                }
                *swept_ms = now;
                marks.retain(|_, v| *v == RECHECK_RUNNING || now < *v);
                if marks.len() >= MAX_RECHECK_ENTRIES {
                    return;
                }
            }
            marks.insert(key, RECHECK_RUNNING);
            *running += 1;
        }
        // Tried again a sixteenth of `cache.max_ttl` (7.5 s of the default 120 s) after a
        // re-check that did not renew the verdict ended: about four times in the last quarter.
        let mut mark = Recheck {
            verifier: Arc::clone(self),
            key,
            backoff_ms: (self.max_ttl_ms / 16).max(1_000),
        };
        let token = token.to_owned();
        let seen = seen.clone();
        tokio::spawn(async move {
            let this = Arc::clone(&mark.verifier);
            let result = match this.recheck(key, &token, &seen).await {
                Ok(Some(verdict)) => {
                    let active = matches!(verdict.verdict, Verdict::Active(_));
                    if !this.cache.replace_if_unchanged(key, &seen, verdict).await {
                        "superseded"
                    } else if active {
                        mark.renewed();
                        "renewed"
                    } else {
                        "refused"
                    }
                }
                Ok(None) => "skipped",
                Err(failure) => {
                    tracing::warn!(reason = ?failure, token = %key.short(), "background re-check failed");
                    "failed"
                }
            };
            crate::metrics::CACHE_RECHECKS
                .with_label_values(&[result])
                .inc();
        });
    }

    /// The decision of a background re-check of `seen`: a new verdict (its issue time no
    /// later than `seen`'s), or `None` when there is nothing to do: the shared cache no longer
    /// holds the verdict this re-check started from (a purge, a rotation, or another replica's
    /// newer decision that this one could not take), or another replica is deciding it and
    /// will share its verdict.
    async fn recheck(
        &self,
        key: TokenHash,
        token: &str,
        seen: &CachedVerdict,
    ) -> Result<Option<CachedVerdict>, LoadFailure> {
        let ask = Ask {
            charge: None,
            priority: true,
            earliest: seen.issued_at_ms(),
        };
        let Some(redis) = &self.shared else {
            return self.decide(token, ask).await.map(Some);
        };
        let id = hex::encode(key.0);
        let newer = |bytes: &[u8]| {
            self.shared_verdict(bytes, ask.earliest)
                .filter(|v| !v.refresh_due(self.clock.now_ms()))
        };
        let shared = match redis.cache_get(&id).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            // Redis trouble never fails a request: decide here, share nothing.
            Err(_) => return self.decide(token, ask).await.map(Some),
        };
        if let Some(v) = newer(&shared) {
            // Another replica re-checked it already.
            return Ok(Some(v));
        }
        let wait = self.op.issuer().timeout + std::time::Duration::from_secs(1);
        let lock = format!("decide:{id}");
        let Ok(Some(fence)) = redis.lock(&lock, wait * 2).await else {
            return Ok(None);
        };
        let outcome = match redis.cache_get(&id).await {
            // Another replica finished between the first read and the lock.
            Ok(Some(bytes)) if bytes != shared => Ok(newer(&bytes)),
            Ok(Some(_)) => self.decide_shared(redis, &id, token, ask, &shared).await,
            Ok(None) => Ok(None),
            Err(_) => self.decide(token, ask).await.map(Some),
        };
        let _ = redis.unlock(&lock, &fence).await;
        outcome
    }

    /// A verdict from the shared cache, if it is still fresh and usable here, its issue time no
    /// later than `earliest`.
    fn shared_verdict(&self, bytes: &[u8], earliest: Option<u64>) -> Option<CachedVerdict> {
        serde_json::from_slice::<CachedVerdict>(bytes)
            .ok()
            .filter(|v| self.clock.now_ms() < v.fresh_until_ms)
            // An identity cached by a version that did not record its issuer cannot be
            // matched against issuer-scoped pins and revocations: decide it again.
            .filter(|v| !matches!(&v.verdict, Verdict::Active(i) if i.issuer.is_empty()))
            .map(|v| v.issued_no_later_than(earliest))
    }

    /// Decides a token for a background re-check and replaces the shared verdict it started
    /// from (`shared`) with the result; `None` when that verdict is no longer there (it was
    /// purged or replaced meanwhile: the result is dropped, here too).
    async fn decide_shared(
        &self,
        redis: &Redis,
        id: &str,
        token: &str,
        ask: Ask,
        shared: &[u8],
    ) -> Result<Option<CachedVerdict>, LoadFailure> {
        let v = self.decide(token, ask).await?;
        let ttl = v.fresh_until_ms.saturating_sub(self.clock.now_ms());
        let Ok(bytes) = serde_json::to_vec(&v) else {
            return Ok(Some(v));
        };
        match redis
            .cache_swap(
                id,
                shared,
                &bytes,
                std::time::Duration::from_millis(ttl.max(1)),
            )
            .await
        {
            Ok(true) => Ok(Some(v)),
            Ok(false) => Ok(None),
            // Redis trouble: this replica keeps what it decided, nothing is shared.
            Err(_) => Ok(Some(v)),
        }
    }

    /// Decides a token this replica has not cached: from the shared cache when another replica
    /// already did, else under a shared lock so that one replica asks the OP. Redis trouble
    /// never fails a request: it falls back to deciding here.
    async fn load_shared(
        &self,
        key: TokenHash,
        token: &str,
        ask: Ask,
    ) -> Result<CachedVerdict, LoadFailure> {
        let Some(redis) = &self.shared else {
            return self.decide(token, ask).await;
        };
        let id = hex::encode(key.0);
        let read = |bytes: Vec<u8>| self.shared_verdict(&bytes, ask.earliest);
        match redis.cache_get(&id).await {
            Ok(Some(bytes)) => {
                if let Some(v) = read(bytes) {
                    return Ok(v);
                }
            }
            Ok(None) => {}
            Err(_) => return self.decide(token, ask).await,
        }
        let wait = self.op.issuer().timeout + std::time::Duration::from_secs(1);
        let lock = format!("decide:{id}");
        match redis.lock(&lock, wait * 2).await {
            Ok(Some(fence)) => {
                // Another replica may have decided and let go of the lock between the read
                // above and this lock: its verdict is taken, not asked for again.
                if let Ok(Some(bytes)) = redis.cache_get(&id).await {
                    if let Some(v) = read(bytes) {
                        let _ = redis.unlock(&lock, &fence).await;
                        return Ok(v);
                    }
                }
                let decided = self.decide(token, ask).await;
                if let Ok(v) = &decided {
                    let ttl = v.fresh_until_ms.saturating_sub(self.clock.now_ms());
                    if ttl > 0 {
                        if let Ok(bytes) = serde_json::to_vec(v) {
                            let _ = redis
                                .cache_set(&id, &bytes, std::time::Duration::from_millis(ttl))
                                .await;
                        }
                    }
                }
                let _ = redis.unlock(&lock, &fence).await;
                decided
            }
            Ok(None) => {
                // Another replica is asking the OP: wait for its verdict.
                let deadline = std::time::Instant::now() + wait;
                while std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(15)).await;
                    match redis.cache_get(&id).await {
                        Ok(Some(bytes)) => {
                            if let Some(v) = read(bytes) {
                                return Ok(v);
                            }
                        }
                        Ok(None) => {
                            if !redis.locked(&lock).await.unwrap_or(false) {
                                // The holder may have stored its verdict and unlocked between
                                // the two reads: look once more before deciding here.
                                if let Ok(Some(bytes)) = redis.cache_get(&id).await {
                                    if let Some(v) = read(bytes) {
                                        return Ok(v);
                                    }
                                }
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                self.decide(token, ask).await
            }
            Err(_) => self.decide(token, ask).await,
        }
    }

    /// The compat layer, when `[compat]` is on.
    pub fn compat(&self) -> Option<&Arc<crate::compat::Compat>> {
        self.compat.get()
    }

    /// Turns on the compat layer's tokens (once, at start).
    pub fn set_compat(&self, compat: Arc<crate::compat::Compat>) {
        let _ = self.compat.set(compat);
    }

    /// Charges one new token to `client`'s budget (when there is a budget and an address);
    /// returns the address charged, for [`Verifier::refund_new_token`]. `Err(ms)`: over budget.
    pub fn charge_new_token(&self, client: Option<IpAddr>) -> Result<Option<IpAddr>, u64> {
        match (&self.budget, client) {
            (Some(budget), Some(ip)) => budget.spend_now(ip).map(|()| Some(ip)),
            _ => Ok(None),
        }
    }

    /// Gives back what [`Verifier::charge_new_token`] took, when the OP failed the call it
    /// paid for.
    pub fn refund_new_token(&self, charged: Option<IpAddr>) {
        if let (Some(budget), Some(ip)) = (&self.budget, charged) {
            budget.refund_now(ip);
        }
    }

    /// Decides a token here (OP or JWT checks), charged to the sender's budget first; the unit
    /// is given back when the OP failed (that answer stays a 503), not when the gateway shed
    /// the call.
    async fn decide(&self, token: &str, ask: Ask) -> Result<CachedVerdict, LoadFailure> {
        let charged = self
            .charge_new_token(ask.charge)
            .map_err(|retry_after_ms| LoadFailure::OverBudget { retry_after_ms })?;
        let decided = self
            .load(token, ask.priority, ask.earliest.is_some())
            .await
            .map(|v| v.issued_no_later_than(ask.earliest));
        // An OP that failed gives the unit back (an outage stays a 503 for everyone); a call
        // the gateway shed itself does not: under a flood the address's budget must run out.
        // A clock-skewed answer cost the OP a call: not given back either.
        if matches!(decided, Err(f) if !matches!(f, OpFailure::Overloaded | OpFailure::ClockSkew)) {
            self.refund_new_token(charged);
        }
        decided.map_err(LoadFailure::Op)
    }

    /// Drops a token from the shared cache too.
    pub async fn purge_token_everywhere(&self, key: &TokenHash) {
        self.cache.purge(key).await;
        if let Some(redis) = &self.shared {
            let _ = redis.cache_del(&hex::encode(key.0)).await;
        }
    }

    /// Decides a token that is not cached: locally for a JWT of a JWT issuer, otherwise by
    /// introspection at the primary issuer.
    /// `known`: the token was valid when last decided (a re-check), so it has an issue time
    /// already.
    async fn load(
        &self,
        token: &str,
        priority: bool,
        known: bool,
    ) -> Result<CachedVerdict, OpFailure> {
        if let Some(compat) = self
            .compat
            .get()
            .filter(|_| crate::compat::is_compat_access(token))
        {
            // A gateway-issued compat token: the store knows it, the OP does not.
            let now = self.clock.now_ms();
            return Ok(match compat.identity_of(token).await? {
                Some(identity) => self.active(identity, now),
                None => self.negative(RejectReason::Inactive, now),
            });
        }
        if jwt::looks_like_jwt(token) {
            if let Some(issuer) = jwt::unverified_issuer(token).and_then(|iss| self.jwt.get(&iss)) {
                return self.load_jwt(issuer, token, priority).await;
            }
        }
        if self.primary_introspects {
            let answer = self
                .op
                .introspect_as(token, "access_token", priority)
                .await?;
            self.judge(&self.op, answer, self.clock.now_ms(), known)
        } else {
            Ok(self.negative(RejectReason::NoVerifier, self.clock.now_ms()))
        }
    }

    async fn load_jwt(
        &self,
        issuer: &JwtIssuer,
        token: &str,
        priority: bool,
    ) -> Result<CachedVerdict, OpFailure> {
        let now = self.clock.now_ms();
        let outcome = issuer.validate(token).await;
        let label = match &outcome {
            JwtOutcome::Valid(..) => "valid",
            JwtOutcome::Rejected(why) => why.as_label(),
            JwtOutcome::Unavailable(_) => "keys_unavailable",
        };
        crate::metrics::JWT_VERIFICATIONS
            .with_label_values(&[label])
            .inc();
        match outcome {
            JwtOutcome::Valid(claims, jti) => {
                let introspect = issuer
                    .op()
                    .issuer()
                    .jwt
                    .as_ref()
                    .is_some_and(|j| j.introspect);
                if introspect {
                    // Revocation gap: the OP must still call the token active.
                    let answer = issuer
                        .op()
                        .introspect_as(token, "access_token", priority)
                        .await?;
                    if !answer.active {
                        return Ok(self.negative(RejectReason::Inactive, now));
                    }
                }
                Ok(self.verdict_from_claims(*claims, jti, now))
            }
            JwtOutcome::Rejected(why) => {
                tracing::info!(issuer = %issuer.issuer(), reason = why.as_label(), "JWT refused");
                Ok(self.negative(why.into(), now))
            }
            JwtOutcome::Unavailable(f) => Err(f),
        }
    }

    /// An active verdict, reused until `cache.max_ttl` from `now` or the token's expiry,
    /// whichever comes first.
    fn active(&self, identity: Identity, now: u64) -> CachedVerdict {
        let until = now + self.max_ttl_ms;
        CachedVerdict {
            fresh_until_ms: identity.expires_at_ms.map_or(until, |e| e.min(until)),
            verdict: Verdict::Active(Arc::new(identity)),
            decided_at_ms: now,
        }
    }

    fn negative(&self, reason: RejectReason, now: u64) -> CachedVerdict {
        CachedVerdict {
            verdict: Verdict::Rejected(reason),
            fresh_until_ms: now + self.negative_ttl_ms,
            decided_at_ms: now,
        }
    }

    /// Turns an introspection answer into a cacheable verdict (pure; `now` in Unix ms).
    /// `known`: see [`Verifier::load`]. An `Err` is an answer the gateway cannot use (503).
    fn judge(
        &self,
        op: &OpClient,
        a: IntrospectionResponse,
        now: u64,
        known: bool,
    ) -> Result<CachedVerdict, OpFailure> {
        let negative = |reason| Ok(self.negative(reason, now));
        if !a.active {
            return negative(RejectReason::Inactive);
        }
        let issuer = op.issuer();
        match a.token_type.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("refresh_token") => {
                return negative(RejectReason::RefreshToken);
            }
            Some(t)
                if !issuer
                    .access_token_types
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(t)) =>
            {
                return negative(RejectReason::NotAccessToken);
            }
            None if issuer.require_token_type => return negative(RejectReason::NotAccessToken),
            _ => {}
        }
        // OP input: saturating arithmetic, so no value overflows (`exp = i64::MAX` is "far
        // future", a negative one long past).
        let secs_to_ms = |s: i64| (s.max(0) as u64).saturating_mul(1000);
        let from_exp = a.exp.map(secs_to_ms);
        let from_expires_in = a.expires_in.map(|s| now.saturating_add(secs_to_ms(s)));
        let expires_at_ms = match (from_exp, from_expires_in) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if expires_at_ms.is_some_and(|e| e <= now) {
            return negative(RejectReason::Expired);
        }
        // Revocations cover what was issued before them: an `iat` in the future would make
        // the token immune to every sign-out until then, so it counts as issued now at the
        // latest. Past the issuer's leeway the OP's answer contradicts the gateway's clock (an
        // OP-side fault, never a 401 that signs the client out): a new token gets a 503 (not
        // cached); a token already known valid keeps the issue time it had (the caller clamps
        // to it), so a clock step at the OP does not refuse users mid-session.
        let leeway = issuer
            .jwt
            .as_ref()
            .map_or(crate::config::DEFAULT_LEEWAY, |j| j.leeway);
        let leeway_ms = u64::try_from(leeway.as_millis()).unwrap_or(u64::MAX);
        let iat = a.iat.map(secs_to_ms);
        if iat.is_some_and(|iat| iat > now.saturating_add(leeway_ms)) && !known {
            tracing::warn!(
                issuer = %issuer.issuer,
                "the OP vouched for a token issued beyond the leeway in the future (clock skew?); answered 503"
            );
            return Err(OpFailure::ClockSkew);
        }
        // Without `iat`, the time the OP vouched for it.
        let issued_at_ms = iat.map_or(now, |iat| iat.min(now));
        let jti = a
            .other
            .get("jti")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let mut all = a.other;
        for (k, v) in [("sub", &a.sub), ("username", &a.username)] {
            if let Some(v) = v {
                all.insert(k.to_owned(), serde_json::Value::String(v.clone()));
            }
        }
        let claims = Claims {
            issuer: self.primary.clone(),
            sub: a.sub,
            scope: a.scope.unwrap_or_default(),
            device_id: a.device_id,
            sid: a.sid,
            expires_at_ms,
            issued_at_ms,
            all,
        };
        Ok(self.verdict_from_claims(claims, jti, now))
    }

    /// Applies the MSC2967 rules to verified claims (either token kind).
    fn verdict_from_claims(&self, claims: Claims, jti: Option<String>, now: u64) -> CachedVerdict {
        let negative = |reason| self.negative(reason, now);
        match build_identity(&claims, &self.user_id_claims, &self.server_name) {
            Ok(identity) => {
                let identity = match jti {
                    Some(jti) => identity.edited(|p| p.token_id = Some(jti)),
                    None => identity,
                };
                self.active(identity, now)
            }
            Err(IdentityError::Reject(r)) => negative(r),
            Err(IdentityError::Mapping(m)) => {
                tracing::error!(
                    reason = ?m,
                    claims = ?self.user_id_claims,
                    "the OP's token carries no usable Matrix localpart (check auth.user_id_claims)"
                );
                CachedVerdict {
                    verdict: Verdict::Misconfigured(m),
                    fresh_until_ms: now + self.negative_ttl_ms,
                    decided_at_ms: now,
                }
            }
        }
    }
}

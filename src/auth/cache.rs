//! The verified-identity cache: a bounded moka cache keyed by [`TokenHash`], with per-entry
//! lifetimes and single-flight loading.
//!
//! An entry is reused until `fresh_until_ms`: `min(now + cache.max_ttl, token expiry)` for an
//! active token, `now + cache.negative_ttl` for a refusal. A cached active identity whose token
//! has expired answers "expired" without a new introspection (Synapse's behaviour). OP failures
//! are never inserted.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use super::{Identity, TokenHash};
use crate::clock::SharedClock;
use crate::error::{GatewayError, MappingFailure, RejectReason};

/// A cached decision about one token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    /// The token is good.
    Active(Arc<Identity>),
    /// The token is refused.
    Rejected(RejectReason),
    /// The OP's claims cannot be mapped to a user.
    Misconfigured(MappingFailure),
}

impl Verdict {
    /// The request-path result of this verdict.
    pub fn to_result(&self) -> Result<Arc<Identity>, GatewayError> {
        match self {
            Verdict::Active(id) => Ok(id.clone()),
            Verdict::Rejected(r) => Err(GatewayError::UnknownToken(*r)),
            Verdict::Misconfigured(m) => Err(GatewayError::UserMapping(*m)),
        }
    }
}

/// A verdict with its reuse window.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CachedVerdict {
    /// The decision.
    pub verdict: Verdict,
    /// Reuse it until this Unix ms time.
    pub fresh_until_ms: u64,
    /// When the verdict was reached (Unix ms).
    #[serde(default)]
    pub decided_at_ms: u64,
}

impl CachedVerdict {
    /// The answer at `now`, or `None` when the entry must be reloaded from the OP.
    pub fn check(&self, now: u64) -> Option<Result<Arc<Identity>, GatewayError>> {
        if let Verdict::Active(id) = &self.verdict {
            if id.expires_at_ms.is_some_and(|e| e <= now) {
                return Some(Err(GatewayError::UnknownToken(RejectReason::Expired)));
            }
        }
        (now < self.fresh_until_ms).then(|| self.verdict.to_result())
    }

    /// Whether a re-check should start in the background at `now`: an active verdict in the
    /// last quarter of its reuse window, whose token outlives the window (else a re-check
    /// could not extend it). The verdict itself still ends at `fresh_until_ms`.
    pub fn refresh_due(&self, now: u64) -> bool {
        let Verdict::Active(id) = &self.verdict else {
            return false;
        };
        if id.expires_at_ms.is_some_and(|e| e <= self.fresh_until_ms) {
            return false;
        }
        let window = self.fresh_until_ms.saturating_sub(self.decided_at_ms);
        now >= self.fresh_until_ms - window / 4
    }
}

/// How the cache took part in one verification (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// An active identity came from the cache.
    Hit,
    /// A refusal came from the cache.
    NegativeHit,
    /// Not cached: this request introspected.
    Miss,
    /// Cached but its reuse window ended: this request introspected again.
    Refresh,
    /// Another request's introspection of the same token was awaited.
    Coalesced,
    /// The cache was not consulted (e.g. oversized token).
    Bypass,
    /// No token on the request.
    None,
}

impl CacheOutcome {
    /// Label for logs and metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::NegativeHit => "negative_hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Refresh => "refresh",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Bypass => "bypass",
            CacheOutcome::None => "none",
        }
    }
}

/// Ends an entry's life in moka when its verdict stops being fresh, by the gateway's clock.
struct FreshnessExpiry {
    clock: SharedClock,
}

impl Expiry<TokenHash, CachedVerdict> for FreshnessExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenHash,
        value: &CachedVerdict,
        _created_at: Instant,
    ) -> Option<Duration> {
        // Memory bound only; correctness comes from `CachedVerdict::check` against the
        // gateway's clock. One second of slack keeps entries readable at their edge.
        let now = self.clock.now_ms();
        let left = value.fresh_until_ms.saturating_sub(now);
        Some(Duration::from_millis(left) + Duration::from_secs(1))
    }
}

/// The cache itself.
pub struct IdentityCache {
    inner: Cache<TokenHash, CachedVerdict>,
}

impl IdentityCache {
    /// A cache holding at most `capacity` verdicts; freshness is judged by `clock`.
    pub fn new(capacity: u64, clock: SharedClock) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(capacity)
                .expire_after(FreshnessExpiry { clock })
                .build(),
        }
    }

    /// The cached verdict, if any.
    pub async fn get(&self, key: &TokenHash) -> Option<CachedVerdict> {
        self.inner.get(key).await
    }

    /// Drops one entry.
    pub async fn invalidate(&self, key: &TokenHash) {
        self.inner.invalidate(key).await;
    }

    /// Returns the cached verdict or runs `load` once for all concurrent callers of the same key.
    /// The flag is `true` for the caller whose `load` ran. Failures are not cached.
    pub async fn get_or_load<E: Copy + Send + Sync + 'static>(
        &self,
        key: TokenHash,
        load: impl Future<Output = Result<CachedVerdict, E>>,
    ) -> Result<(CachedVerdict, bool), E> {
        match self.inner.entry(key).or_try_insert_with(load).await {
            Ok(entry) => {
                let fresh = entry.is_fresh();
                Ok((entry.into_value(), fresh))
            }
            Err(e) => Err(*e),
        }
    }

    /// Drops every entry decided before `before_ms` (after a shared-state outage: those may
    /// have missed revocations).
    pub async fn purge_decided_before(&self, before_ms: u64) -> usize {
        let mut n = 0;
        for (key, entry) in self.inner.iter() {
            if entry.decided_at_ms < before_ms {
                self.inner.invalidate(&*key).await;
                n += 1;
            }
        }
        n
    }

    /// Inserts a verdict decided elsewhere (another replica, through the shared cache).
    pub async fn insert(&self, key: TokenHash, verdict: CachedVerdict) {
        self.inner.insert(key, verdict).await;
    }

    /// Drops every active entry whose identity `matches` selects; returns those identities.
    /// Complete when it returns: the next lookup of any of them misses.
    pub async fn purge_where(&self, matches: impl Fn(&Identity) -> bool) -> Vec<Arc<Identity>> {
        let mut purged = Vec::new();
        for (key, entry) in self.inner.iter() {
            if let Verdict::Active(id) = &entry.verdict {
                if matches(id) {
                    self.inner.invalidate(&*key).await;
                    purged.push(id.clone());
                }
            }
        }
        purged
    }

    /// Approximate entry count.
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::OffsetClock;

    #[test]
    fn moka_expiry_counts_from_the_gateway_clock() {
        // The gateway's clock runs an hour ahead of the system's (as a test's clock does, or
        // a verdict decided by another replica's clock): a verdict fresh for ten more minutes
        // by that clock must leave moka in about ten minutes, not seventy.
        let clock = OffsetClock::new();
        clock.advance(Duration::from_secs(3600));
        let shared: SharedClock = Arc::new(clock.clone());
        let expiry = FreshnessExpiry {
            clock: shared.clone(),
        };
        let verdict = CachedVerdict {
            verdict: Verdict::Rejected(RejectReason::Inactive),
            fresh_until_ms: shared.now_ms() + 600_000,
            decided_at_ms: shared.now_ms(),
        };
        let key = TokenHash::of("t");
        let left = expiry
            .expire_after_create(&key, &verdict, Instant::now())
            .expect("an expiry");
        assert!(
            left <= Duration::from_secs(602) && left >= Duration::from_secs(599),
            "{left:?}"
        );
    }
}

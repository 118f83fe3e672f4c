//! The verified-identity cache: a bounded quick_cache (CLOCK-Pro eviction) keyed by
//! [`TokenHash`], with per-entry lifetimes, single-flight loading and per-key serialised
//! changes.
//!
//! An entry is reused until `fresh_until_ms`: `min(now + cache.max_ttl, token expiry)` for an
//! active token, `now + cache.negative_ttl` for a refusal. A cached active identity whose token
//! has expired answers "expired" without a new introspection (Synapse's behaviour). OP failures
//! are never inserted; a failed load's error is handed to the requests that waited on it, so
//! an OP outage costs one call per token, not one per waiting request.
//!
//! An entry past its window stays readable for [`KEEP_ENDED`]: a cached identity whose token
//! expired keeps answering "expired" without asking the OP, and the re-check of a token known
//! to be valid keeps its priority over new tokens (a flood of new tokens cannot shed a user
//! who paused). [`IdentityCache::sweep`] (every 30 s, a background service) then frees it,
//! unless eviction did first.
//! quick_cache rather than moka: the same bound, policy and single-flight for about 145 bytes
//! of bookkeeping per entry instead of about 370 (bench/README.md, "Memory").

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, EntryAction, EntryResult};

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

    /// The same verdict, its identity's issue time no later than `earliest` (a re-check of a
    /// token already vouched for: a token without `iat` was issued no later than the first
    /// verdict, so revocations recorded since still apply to it).
    pub fn issued_no_later_than(mut self, earliest: Option<u64>) -> Self {
        if let (Verdict::Active(id), Some(earliest)) = (&mut self.verdict, earliest) {
            if earliest < id.issued_at_ms {
                Arc::make_mut(id).issued_at_ms = earliest;
            }
        }
        self
    }

    /// The issue time of an active verdict's identity.
    pub fn issued_at_ms(&self) -> Option<u64> {
        match &self.verdict {
            Verdict::Active(id) => Some(id.issued_at_ms),
            _ => None,
        }
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

/// How long past its window a loaded verdict is still handed to the requests that waited on
/// it (a verdict at its edge is used by them, then dropped by the next request).
const SLACK_MS: u64 = 1_000;

/// How long past its window an entry is kept (see the module header).
pub const KEEP_ENDED: Duration = Duration::from_secs(300);

/// Whether `v` can still serve the requests that waited on its load at `now`.
fn usable(v: &CachedVerdict, now: u64) -> bool {
    now < v.fresh_until_ms.saturating_add(SLACK_MS)
}

/// How long a failed load's error is kept for the requests that waited on it.
const FAILURE_SHARE: Duration = Duration::from_secs(1);
/// Past this many recorded failures the old ones are swept (at most once a second).
const FAILURE_SWEEP_AT: usize = 1_024;
/// At most this many failures are recorded at a time.
const FAILURE_CAP: usize = 16_384;

/// A failed load, for the requests that were waiting on it.
struct Failure {
    /// The failure's place in the order of failures (see `IdentityCache::failure_seq`).
    seq: u64,
    at: Instant,
    error: Box<dyn Any + Send + Sync>,
}

/// What [`IdentityCache::change`] does to an entry.
enum Change {
    Keep,
    Remove,
    Put(CachedVerdict),
}

/// The cache itself.
pub struct IdentityCache {
    inner: Cache<TokenHash, CachedVerdict>,
    clock: SharedClock,
    /// Failed loads by key, so that the requests waiting on a load that failed get its error
    /// rather than each asking the OP in turn.
    failures: parking_lot::Mutex<HashMap<TokenHash, Failure>>,
    /// Counts failures: a request applies a recorded failure only if it was recorded after
    /// the request started waiting.
    failure_seq: AtomicU64,
    /// When `failures` was last swept (Unix ms).
    failures_swept_ms: AtomicU64,
    /// Bumped by every removal that found a load in flight (and by every bulk purge): a load
    /// that sees it changed drops what it just inserted.
    generation: AtomicU64,
}

/// Whether `v` is the verdict `seen` (the same decision: decided at the same time for the same
/// window).
fn same_decision(v: &CachedVerdict, seen: &CachedVerdict) -> bool {
    v.decided_at_ms == seen.decided_at_ms && v.fresh_until_ms == seen.fresh_until_ms
}

impl IdentityCache {
    /// A cache holding at most `capacity` verdicts; freshness is judged by `clock`.
    pub fn new(capacity: u64, clock: SharedClock) -> Self {
        Self {
            inner: Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX).max(1)),
            clock,
            failures: parking_lot::Mutex::new(HashMap::new()),
            failure_seq: AtomicU64::new(0),
            failures_swept_ms: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes one entry by `decide` (given its current verdict), atomically with every other
    /// change of the same key: purges and background replacements never interleave. Never
    /// waits for a load in flight (a load may itself end in a purge of its own token: a
    /// compat session whose OP grant is gone): a change that removes finds the load's
    /// placeholder and bumps `generation` instead, and the load does not keep what it
    /// brings. Returns the verdict removed, if `decide` removed one.
    fn change(
        &self,
        key: TokenHash,
        decide: impl FnOnce(Option<&CachedVerdict>) -> Change,
    ) -> Option<CachedVerdict> {
        let mut decide = Some(decide);
        let result = self.inner.entry(&key, Some(Duration::ZERO), |_, current| {
            let decide = decide.take().expect("called once");
            match decide(Some(current)) {
                Change::Keep => EntryAction::Retain(()),
                Change::Remove => EntryAction::Remove,
                Change::Put(v) => {
                    *current = v;
                    EntryAction::Retain(())
                }
            }
        });
        match result {
            EntryResult::Removed(_, v) => Some(v),
            EntryResult::Timeout => {
                if let Some(Change::Remove) = decide.take().map(|d| d(None)) {
                    self.generation.fetch_add(1, Ordering::SeqCst);
                }
                None
            }
            // Nothing cached (the placeholder this made is dropped with the guard), or kept.
            _ => None,
        }
    }

    /// Drops one entry because it must not be used any more (not merely because its window
    /// ended): a background re-check in flight will not put it back.
    pub async fn purge(&self, key: &TokenHash) {
        self.change(*key, |_| Change::Remove);
    }

    /// Replaces the verdict a background re-check started from (`seen`) with what it brought
    /// back, only if `seen` is still the one cached: not purged, not replaced by a newer
    /// decision in the meantime. Returns whether it did.
    pub async fn replace_if_unchanged(
        &self,
        key: TokenHash,
        seen: &CachedVerdict,
        new: CachedVerdict,
    ) -> bool {
        let mut replaced = false;
        self.change(key, |current| match current {
            Some(v) if same_decision(v, seen) => {
                replaced = true;
                Change::Put(new)
            }
            _ => Change::Keep,
        });
        replaced
    }

    /// Drops `seen` when its window has ended, unless something newer replaced it meanwhile.
    pub async fn drop_ended(&self, key: TokenHash, seen: &CachedVerdict) {
        self.change(key, |current| match current {
            Some(v) if same_decision(v, seen) => Change::Remove,
            _ => Change::Keep,
        });
    }

    /// The cached verdict, if any, fresh or not ([`CachedVerdict::check`] tells).
    pub async fn get(&self, key: &TokenHash) -> Option<CachedVerdict> {
        self.inner.get(key)
    }

    /// Drops every valid verdict more than [`KEEP_ENDED`] past its window, and every other
    /// verdict past its window (the memory of tokens no longer used).
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        let keep = KEEP_ENDED.as_millis() as u64;
        self.inner.retain(|_, v| {
            let kept = match v.verdict {
                Verdict::Active(_) => keep,
                _ => SLACK_MS,
            };
            now < v.fresh_until_ms.saturating_add(kept)
        });
        let mut failures = self.failures.lock();
        failures.retain(|_, f| f.at.elapsed() < FAILURE_SHARE);
    }

    /// The failure of a load of `key` recorded after `ticket`, if any.
    fn failure_since<E: Copy + 'static>(&self, key: &TokenHash, ticket: u64) -> Option<E> {
        let failures = self.failures.lock();
        let f = failures.get(key)?;
        (f.seq > ticket)
            .then(|| f.error.downcast_ref::<E>().copied())
            .flatten()
    }

    /// Records a failed load of `key` for the requests waiting on it (at most [`FAILURE_CAP`]
    /// at a time: past it, waiters load for themselves).
    fn record_failure<E: Copy + Send + Sync + 'static>(&self, key: TokenHash, error: E) {
        let seq = self.failure_seq.fetch_add(1, Ordering::AcqRel) + 1;
        let mut failures = self.failures.lock();
        if failures.len() >= FAILURE_SWEEP_AT {
            // At most once a second: an outage must not make each failure scan them all.
            let now = self.clock.now_ms();
            let swept = self.failures_swept_ms.load(Ordering::Relaxed);
            if now.saturating_sub(swept) >= 1_000 {
                self.failures_swept_ms.store(now, Ordering::Relaxed);
                failures.retain(|_, f| f.at.elapsed() < FAILURE_SHARE);
            }
            if failures.len() >= FAILURE_CAP {
                return;
            }
        }
        failures.insert(
            key,
            Failure {
                seq,
                at: Instant::now(),
                error: Box::new(error),
            },
        );
    }

    /// Returns the cached verdict or runs `load` once for all concurrent callers of the same key.
    /// The flag is `true` for the caller whose `load` ran. Failures are not cached; a failure
    /// `shared` accepts (one that is not about the loading request itself) is handed to the
    /// callers that waited on that load, the others load for themselves.
    pub async fn get_or_load<E: Copy + Send + Sync + 'static>(
        &self,
        key: TokenHash,
        load: impl Future<Output = Result<CachedVerdict, E>>,
        shared: impl Fn(&E) -> bool,
    ) -> Result<(CachedVerdict, bool), E> {
        let ticket = self.failure_seq.load(Ordering::Acquire);
        let guard = loop {
            match self.inner.get_value_or_guard_async(&key).await {
                Ok(v) if usable(&v, self.clock.now_ms()) => return Ok((v, false)),
                Ok(ended) => self.drop_ended(key, &ended).await,
                Err(guard) => break guard,
            }
        };
        // The load this request waited on failed: its answer is this request's too (the
        // guard, dropped, passes to the next waiter, which does the same).
        if let Some(e) = self.failure_since(&key, ticket) {
            return Err(e);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        match load.await {
            Ok(v) => {
                let _ = guard.insert(v.clone());
                // A removal found this load in flight: what it brought does not stay (the
                // requests already waiting on it have it, as they would have had it a moment
                // before the removal).
                if self.generation.load(Ordering::SeqCst) != generation {
                    self.inner.remove_if(&key, |cur| same_decision(cur, &v));
                }
                Ok((v, true))
            }
            Err(e) => {
                if shared(&e) {
                    self.record_failure(key, e);
                }
                drop(guard);
                Err(e)
            }
        }
    }

    /// Drops every entry decided before `before_ms` (after a shared-state outage: those may
    /// have missed revocations).
    pub async fn purge_decided_before(&self, before_ms: u64) -> usize {
        // Loads in flight are not listed: none of them keeps what it brings.
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut n = 0;
        let keys: Vec<TokenHash> = self
            .inner
            .iter()
            .filter(|(_, v)| v.decided_at_ms < before_ms)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let removed = self.change(key, |current| match current {
                Some(v) if v.decided_at_ms < before_ms => Change::Remove,
                _ => Change::Keep,
            });
            n += usize::from(removed.is_some());
        }
        n
    }

    /// Drops every active entry whose identity `matches` selects; returns those identities.
    /// Complete when it returns: the next lookup of any of them misses, and no background
    /// re-check puts one back.
    pub async fn purge_where(&self, matches: impl Fn(&Identity) -> bool) -> Vec<Arc<Identity>> {
        // Loads in flight are not listed: none of them keeps what it brings.
        self.generation.fetch_add(1, Ordering::SeqCst);
        let selected = |v: &CachedVerdict| matches!(&v.verdict, Verdict::Active(id) if matches(id));
        let keys: Vec<TokenHash> = self
            .inner
            .iter()
            .filter(|(_, v)| selected(v))
            .map(|(k, _)| k)
            .collect();
        let mut purged = Vec::new();
        for key in keys {
            let removed = self.change(key, |current| match current {
                Some(v) if selected(v) => Change::Remove,
                _ => Change::Keep,
            });
            if let Some(CachedVerdict {
                verdict: Verdict::Active(id),
                ..
            }) = removed
            {
                purged.push(id);
            }
        }
        purged
    }

    /// The active identities `matches` selects, left in place (a snapshot).
    pub fn cached_where(&self, matches: impl Fn(&Identity) -> bool) -> Vec<Arc<Identity>> {
        self.inner
            .iter()
            .filter_map(|(_, v)| match v.verdict {
                Verdict::Active(id) if matches(&id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Entry count (entries past their window count until swept).
    pub fn entry_count(&self) -> u64 {
        self.inner.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::OffsetClock;

    fn active_until(decided: u64, fresh_until: u64, expires: Option<u64>) -> CachedVerdict {
        CachedVerdict {
            verdict: Verdict::Active(Arc::new(Identity::from(crate::auth::IdentityParts {
                user_id: "@alice:example.org".into(),
                device_id: None,
                scope: String::new(),
                access: super::super::Access::Full,
                issuer: Arc::from("https://op.example/"),
                subject: "alice".into(),
                session_id: None,
                expires_at_ms: expires,
                token_id: None,
                issued_at_ms: decided,
            }))),
            fresh_until_ms: fresh_until,
            decided_at_ms: decided,
        }
    }

    #[test]
    fn a_recheck_is_due_in_the_last_quarter_of_a_window_the_token_outlives() {
        let v = active_until(1_000, 121_000, None);
        assert!(!v.refresh_due(90_999));
        assert!(v.refresh_due(91_000));
        assert!(v.refresh_due(130_000));
        // The token ends with the window: a re-check could not extend it.
        assert!(!active_until(1_000, 121_000, Some(121_000)).refresh_due(100_000));
        assert!(active_until(1_000, 121_000, Some(121_001)).refresh_due(100_000));
        // Refusals are never re-checked ahead.
        let refused = CachedVerdict {
            verdict: Verdict::Rejected(RejectReason::Inactive),
            fresh_until_ms: 121_000,
            decided_at_ms: 1_000,
        };
        assert!(!refused.refresh_due(120_000));
        // A verdict that did not record when it was decided (an older replica's) is due at
        // once.
        assert!(active_until(0, 1_780_000_120_000, None).refresh_due(1_780_000_000_000));
    }

    #[test]
    fn a_recheck_keeps_the_first_issue_time() {
        let mut v = active_until(1_000, 121_000, None);
        if let Verdict::Active(id) = &mut v.verdict {
            Arc::make_mut(id).issued_at_ms = 50_000;
        }
        assert_eq!(
            v.clone().issued_no_later_than(Some(1_000)).issued_at_ms(),
            Some(1_000)
        );
        assert_eq!(
            v.clone().issued_no_later_than(Some(90_000)).issued_at_ms(),
            Some(50_000)
        );
        assert_eq!(v.issued_no_later_than(None).issued_at_ms(), Some(50_000));
    }

    #[tokio::test]
    async fn a_replaced_verdict_lives_by_its_own_window_and_only_replaces_what_was_seen() {
        let clock: SharedClock = Arc::new(OffsetClock::new());
        let cache = IdentityCache::new(10, clock.clone());
        let now = clock.now_ms();
        let key = TokenHash([7; 32]);
        let old = active_until(now, now, None); // memory bound: 1 s of slack
        let (_, loaded) = cache
            .get_or_load::<()>(key, async { Ok(old.clone()) }, |_| true)
            .await
            .unwrap();
        assert!(loaded);
        let new = active_until(now, now + 60_000, None);
        // Not what was seen: nothing changes.
        let other = active_until(now + 1, now, None);
        assert!(!cache.replace_if_unchanged(key, &other, new.clone()).await);
        // Purged since the re-check started: nothing comes back.
        cache.purge(&key).await;
        assert!(!cache.replace_if_unchanged(key, &old, new.clone()).await);
        assert!(cache.get(&key).await.is_none());
        // An unrelated purge changes nothing.
        let (_, _) = cache
            .get_or_load::<()>(key, async { Ok(old.clone()) }, |_| true)
            .await
            .unwrap();
        cache.purge(&TokenHash([8; 32])).await;
        assert!(cache.replace_if_unchanged(key, &old, new).await);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            cache.get(&key).await.map(|v| v.fresh_until_ms),
            Some(now + 60_000),
            "the replaced verdict kept the old expiry"
        );
    }

    #[tokio::test]
    async fn entries_end_by_the_gateway_clock_and_the_sweep_frees_them() {
        // The gateway's clock runs an hour ahead of the system's (as a test's clock does, or
        // a verdict decided by another replica's clock): a verdict fresh for ten more minutes
        // by that clock is fresh for ten minutes, kept five more, then freed by the sweep; a
        // refusal is freed at the end of its window.
        let clock = OffsetClock::new();
        clock.advance(Duration::from_secs(3600));
        let shared: SharedClock = Arc::new(clock.clone());
        let cache = IdentityCache::new(10, shared.clone());
        let now = shared.now_ms();
        let key = TokenHash::of("t");
        let refused = TokenHash::of("refused");
        cache
            .get_or_load::<()>(
                key,
                async { Ok(active_until(now, now + 600_000, None)) },
                |_| true,
            )
            .await
            .unwrap();
        let refusal = CachedVerdict {
            verdict: Verdict::Rejected(RejectReason::Inactive),
            fresh_until_ms: now + 600_000,
            decided_at_ms: now,
        };
        cache
            .get_or_load::<()>(refused, async { Ok(refusal) }, |_| true)
            .await
            .unwrap();
        clock.advance(Duration::from_millis(599_000));
        let v = cache.get(&key).await.expect("cached");
        assert!(v.check(shared.now_ms()).is_some(), "fresh");
        clock.advance(Duration::from_millis(1_000));
        let v = cache.get(&key).await.expect("kept past its window");
        assert!(v.check(shared.now_ms()).is_none(), "fresh past its window");
        cache.sweep();
        assert!(
            cache.get(&refused).await.is_some(),
            "a refusal swept inside the slack"
        );
        clock.advance(Duration::from_millis(1_000));
        cache.sweep();
        assert!(
            cache.get(&refused).await.is_none(),
            "a refusal kept past its window"
        );
        // (The test clock runs with real time: a second of margin either side.)
        clock.advance(KEEP_ENDED - Duration::from_millis(2_000));
        cache.sweep();
        assert_eq!(cache.entry_count(), 1, "swept too early");
        clock.advance(Duration::from_millis(2_000));
        cache.sweep();
        assert_eq!(cache.entry_count(), 0, "not swept");
        // A load finding the ended entry loads again.
        let (_, loaded) = cache
            .get_or_load::<()>(
                key,
                async {
                    Ok(CachedVerdict {
                        verdict: Verdict::Rejected(RejectReason::Inactive),
                        fresh_until_ms: shared.now_ms() + 1_000,
                        decided_at_ms: shared.now_ms(),
                    })
                },
                |_| true,
            )
            .await
            .unwrap();
        assert!(loaded);
    }

    fn refusal_forever() -> CachedVerdict {
        CachedVerdict {
            verdict: Verdict::Rejected(RejectReason::Inactive),
            fresh_until_ms: u64::MAX / 2,
            decided_at_ms: 0,
        }
    }

    /// `n` concurrent requests of `key` in `cache`; the load that runs `i`-th (from 0) takes
    /// `ms` and answers `answer(i)`; failures are shared as `shared` says. Returns what each
    /// request got and how many loads ran.
    async fn concurrent_loads(
        cache: &Arc<IdentityCache>,
        key: TokenHash,
        n: usize,
        ms: u64,
        answer: fn(u64) -> Result<CachedVerdict, u8>,
        shared: fn(&u8) -> bool,
    ) -> (Vec<Result<(), u8>>, u64) {
        let calls = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    let load = async {
                        let i = calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        answer(i)
                    };
                    cache.get_or_load(key, load, shared).await.map(|_| ())
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        (got, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_requests_waiting_on_a_failed_load_share_its_failure() {
        // An OP that fails slowly: a hundred requests of one token must not ask it a hundred
        // times in turn (each waiting the timeout), they all get the one failure.
        let clock: SharedClock = Arc::new(OffsetClock::new());
        let cache = Arc::new(IdentityCache::new(10, clock));
        let key = TokenHash::of("flaky");
        let started = Instant::now();
        let (got, calls) = concurrent_loads(&cache, key, 100, 200, |_| Err(7), |_| true).await;
        assert!(got.iter().all(|r| *r == Err(7)), "{got:?}");
        assert_eq!(calls, 1, "one load for all waiters");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // A request after the failure asks again (failures are not cached).
        let (_, loaded) = cache
            .get_or_load::<u8>(key, async { Ok(refusal_forever()) }, |_| true)
            .await
            .unwrap();
        assert!(loaded);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_during_a_load_in_flight_removes_what_it_brought() {
        let clock: SharedClock = Arc::new(OffsetClock::new());
        let cache = Arc::new(IdentityCache::new(10, clock.clone()));
        let key = TokenHash::of("signed-out");
        let now = clock.now_ms();
        let loading = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load::<()>(
                        key,
                        async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Ok(active_until(now, now + 60_000, None))
                        },
                        |_| true,
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.purge(&key).await;
        assert!(loading.await.unwrap().is_ok());
        assert!(
            cache.get(&key).await.is_none(),
            "the load in flight put the purged verdict back"
        );
    }

    #[tokio::test]
    async fn a_load_that_purges_its_own_token_does_not_wait_for_itself() {
        // A compat session whose OP grant is gone ends inside its own token's load, and that
        // purges the token: the purge must not wait for the load it is part of.
        let clock: SharedClock = Arc::new(OffsetClock::new());
        let cache = IdentityCache::new(10, clock.clone());
        let key = TokenHash::of("grant-gone");
        let now = clock.now_ms();
        let loaded = tokio::time::timeout(
            Duration::from_secs(5),
            cache.get_or_load::<()>(
                key,
                async {
                    cache.purge(&key).await;
                    Ok(active_until(now, now + 60_000, None))
                },
                |_| true,
            ),
        )
        .await
        .expect("the purge waited for the load it runs in");
        assert!(loaded.is_ok());
        assert!(
            cache.get(&key).await.is_none(),
            "the purged token stayed cached"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_about_the_loading_request_alone_is_not_handed_on() {
        // The loader was refused for its own reasons (its address's budget): the requests
        // waiting on it load for themselves.
        let clock: SharedClock = Arc::new(OffsetClock::new());
        let cache = Arc::new(IdentityCache::new(10, clock));
        let key = TokenHash::of("shared-nat");
        let answer = |i| {
            if i == 0 {
                Err(1)
            } else {
                Ok(refusal_forever())
            }
        };
        let (got, calls) = concurrent_loads(&cache, key, 3, 100, answer, |e| *e != 1).await;
        assert_eq!(got.iter().filter(|r| r.is_err()).count(), 1, "{got:?}");
        assert_eq!(calls, 2, "the second load is shared");
    }
}

//! Revocations the gateway learnt of (back-channel logout, the revocation proxy, the admin API):
//! which sessions, subjects, users, devices and tokens must be refused from now on, even when a
//! cached identity or a still-valid JWT says otherwise.
//!
//! A session or token revocation refuses every matching token; a subject, user or device
//! revocation refuses tokens issued before it (a user who signs in again gets through). Entries
//! are kept for `notifications.revocation_retention` and persisted in the [`Store`], so a restart
//! does not resurrect JWTs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::identity::{issuer_scoped, ISSUER_SEP};
use super::{Identity, TokenHash};
use crate::store::{Store, StoreError};

/// What a revocation applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// An OP session: `issuer␟sid` ([`super::identity::issuer_scoped`]).
    Session(String),
    /// An OIDC subject: `issuer␟sub`.
    Subject(String),
    /// A Matrix user.
    User(String),
    /// One Matrix device of a user.
    Device(String, String),
    /// One token, by hash.
    Token(TokenHash),
}

impl Selector {
    /// The persisted form.
    pub fn key(&self) -> String {
        match self {
            Selector::Session(s) => format!("sid:{s}"),
            Selector::Subject(s) => format!("sub:{s}"),
            Selector::User(u) => format!("user:{u}"),
            Selector::Device(u, d) => format!("device:{u}\u{1f}{d}"),
            Selector::Token(h) => format!("token:{}", hex::encode(h.0)),
        }
    }

    /// Parses [`Selector::key`].
    pub fn from_key(key: &str) -> Option<Selector> {
        let (kind, rest) = key.split_once(':')?;
        Some(match kind {
            "sid" => Selector::Session(rest.to_owned()),
            "sub" => Selector::Subject(rest.to_owned()),
            "user" => Selector::User(rest.to_owned()),
            "device" => {
                let (u, d) = rest.split_once('\u{1f}')?;
                Selector::Device(u.to_owned(), d.to_owned())
            }
            "token" => {
                let bytes: [u8; 32] = hex::decode(rest).ok()?.try_into().ok()?;
                Selector::Token(TokenHash(bytes))
            }
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at_ms: u64,
    until_ms: u64,
}

/// Why a revocation was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The store did not persist it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `notifications.max_revocations` are held already.
    #[error("the revocation list is full ({0} entries)")]
    Full(usize),
}

/// Expired entries are dropped at most this often (and whenever the list is full), so a
/// revocation costs O(1) and readers never wait for a sweep of the whole list.
const PRUNE_EVERY_MS: u64 = 60_000;

/// The revocation list. Reads (every request) take a shared lock and a few hash lookups; only
/// revocations take the exclusive lock, for one insertion (plus, at most once a minute or when
/// full and some entry can have ended, a sweep of expired entries). Asking whether a full list
/// has room takes the shared lock only, unless a sweep could free some.
pub struct Revocations {
    entries: RwLock<HashMap<Selector, Entry>>,
    any: AtomicBool,
    max: usize,
    next_prune_ms: AtomicU64,
    /// No entry ends before this (`u64::MAX`: none held): a full list of entries that cannot
    /// have ended yet is refused without a sweep or an exclusive lock.
    earliest_until_ms: AtomicU64,
    store: Arc<dyn Store>,
    /// The configured issuers: a session or subject revocation persisted before revocations
    /// were issuer-scoped cannot be attributed to one of them, so it applies to each (failing
    /// closed: with one issuer, exactly its own).
    legacy_issuers: Vec<String>,
}

impl Revocations {
    /// An empty list backed by `store`; an unscoped session or subject entry persisted by an
    /// earlier version applies to each of `issuers` (the configured ones).
    pub fn new(store: Arc<dyn Store>, issuers: &[String]) -> Self {
        Self::bounded(store, issuers, usize::MAX)
    }

    /// Like [`Revocations::new`], holding at most `max` entries.
    pub fn bounded(store: Arc<dyn Store>, issuers: &[String], max: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            any: AtomicBool::new(false),
            max,
            next_prune_ms: AtomicU64::new(0),
            earliest_until_ms: AtomicU64::new(u64::MAX),
            store,
            legacy_issuers: issuers.to_vec(),
        }
    }

    /// An older, unscoped session or subject selector as one selector per configured issuer;
    /// any other selector as it is.
    fn scope_legacy(&self, selector: Selector) -> Vec<Selector> {
        let each = |v: &str, make: fn(String) -> Selector| {
            self.legacy_issuers
                .iter()
                .map(|i| make(issuer_scoped(i, v)))
                .collect()
        };
        match selector {
            Selector::Session(v) if !v.contains(ISSUER_SEP) => each(&v, Selector::Session),
            Selector::Subject(v) if !v.contains(ISSUER_SEP) => each(&v, Selector::Subject),
            other => vec![other],
        }
    }

    /// Loads the persisted revocations still in force.
    pub async fn load(&self, now_ms: u64) -> Result<usize, StoreError> {
        let store = self.store.clone();
        self.load_from(store.as_ref(), now_ms).await
    }

    /// Loads the revocations in force from `store` (a second handle on the same data).
    pub async fn load_from(&self, store: &dyn Store, now_ms: u64) -> Result<usize, StoreError> {
        let rows = store.revocations(now_ms).await?;
        let mut n = 0;
        let mut parsed = Vec::with_capacity(rows.len());
        for (key, at_ms, until_ms) in rows {
            if let Some(sel) = Selector::from_key(&key) {
                n += 1;
                for sel in self.scope_legacy(sel) {
                    parsed.push((sel, Entry { at_ms, until_ms }));
                }
            }
        }
        // What is new or later than what is held, found under the shared lock: a reload that
        // changes nothing (the hand-over reloads every 250 ms) never blocks a reader.
        let changed: Vec<(Selector, Entry)> = {
            let map = self.entries.read();
            parsed
                .into_iter()
                .filter(|(sel, e)| {
                    map.get(sel)
                        .is_none_or(|held| held.at_ms < e.at_ms || held.until_ms < e.until_ms)
                })
                .collect()
        };
        if !changed.is_empty() {
            let mut map = self.entries.write();
            self.prune_if_due(&mut map, now_ms);
            for (sel, e) in changed {
                // Two processes may have recorded the same selector at different times: the
                // later one refuses more, so it wins (failing closed).
                let held = map.entry(sel).or_insert(e);
                held.at_ms = held.at_ms.max(e.at_ms);
                held.until_ms = held.until_ms.max(e.until_ms);
                self.earliest_until_ms
                    .fetch_min(held.until_ms, Ordering::AcqRel);
            }
            self.any.store(!map.is_empty(), Ordering::Release);
        }
        Ok(n)
    }

    /// Whether `n` more capped revocations fit at `now_ms` (the revocation proxy asks before it
    /// asks the OP, so that it does not start work it could not record).
    pub fn has_room(&self, n: usize, now_ms: u64) -> bool {
        if self.entries.read().len().saturating_add(n) <= self.max {
            return true;
        }
        if !self.may_have_ended(now_ms) {
            return false;
        }
        let mut map = self.entries.write();
        self.prune(&mut map, now_ms);
        map.len().saturating_add(n) <= self.max
    }

    /// Whether some entry can have ended by `now_ms` (a sweep could free room).
    fn may_have_ended(&self, now_ms: u64) -> bool {
        now_ms >= self.earliest_until_ms.load(Ordering::Acquire)
    }

    /// Records a revocation at `now_ms`, remembered until `until_ms`; persisted before return.
    ///
    /// `capped` revocations (those anyone can cause: the revocation proxy's) are refused when
    /// the list holds `max` entries after dropping expired ones. The others (back-channel
    /// logout, the admin API) are always recorded: an OP's or operator's sign-out must never
    /// be blocked by a list someone else filled.
    pub async fn revoke(
        &self,
        selector: Selector,
        now_ms: u64,
        until_ms: u64,
        capped: bool,
    ) -> Result<(), RevokeError> {
        {
            let mut map = self.entries.write();
            self.prune_if_due(&mut map, now_ms);
            if capped && map.len() >= self.max && !map.contains_key(&selector) {
                if self.may_have_ended(now_ms) {
                    self.prune(&mut map, now_ms);
                }
                if map.len() >= self.max {
                    return Err(RevokeError::Full(map.len()));
                }
            }
        }
        self.store
            .put_revocation(&selector.key(), now_ms, until_ms)
            .await?;
        {
            let mut map = self.entries.write();
            map.insert(
                selector,
                Entry {
                    at_ms: now_ms,
                    until_ms,
                },
            );
            self.earliest_until_ms.fetch_min(until_ms, Ordering::AcqRel);
            self.any.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn prune_if_due(&self, map: &mut HashMap<Selector, Entry>, now_ms: u64) {
        if now_ms >= self.next_prune_ms.load(Ordering::Relaxed) {
            self.prune(map, now_ms);
        }
    }

    fn prune(&self, map: &mut HashMap<Selector, Entry>, now_ms: u64) {
        let mut earliest = u64::MAX;
        map.retain(|_, e| {
            let keep = e.until_ms > now_ms;
            if keep {
                earliest = earliest.min(e.until_ms);
            }
            keep
        });
        // Under the exclusive lock: no insertion races this store.
        self.earliest_until_ms.store(earliest, Ordering::Release);
        self.next_prune_ms
            .store(now_ms.saturating_add(PRUNE_EVERY_MS), Ordering::Relaxed);
    }

    /// Applies a revocation made elsewhere (already persisted by its maker).
    pub fn remember(&self, selector: Selector, at_ms: u64, until_ms: u64) {
        {
            let mut map = self.entries.write();
            self.prune_if_due(&mut map, at_ms);
            for selector in self.scope_legacy(selector) {
                map.insert(selector, Entry { at_ms, until_ms });
            }
            self.earliest_until_ms.fetch_min(until_ms, Ordering::AcqRel);
            self.any.store(true, Ordering::Release);
        }
    }

    /// Whether `identity` (presented as the token hashing to `token`) is revoked at `now_ms`.
    pub fn is_revoked(&self, identity: &Identity, token: &TokenHash, now_ms: u64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        // parking_lot's lock does not poison: a panic elsewhere cannot turn this into "not
        // revoked".
        let map = self.entries.read();
        let live = |sel: &Selector| map.get(sel).filter(|e| e.until_ms > now_ms);
        let before = |sel: &Selector| live(sel).is_some_and(|e| identity.issued_at_ms < e.at_ms);
        live(&Selector::Token(*token)).is_some()
            || identity
                .session_key()
                .is_some_and(|s| live(&Selector::Session(s)).is_some())
            || before(&Selector::Subject(identity.subject_key()))
            || before(&Selector::User(identity.user_id().to_owned()))
            || identity.device_id().is_some_and(|d| {
                before(&Selector::Device(
                    identity.user_id().to_owned(),
                    d.to_owned(),
                ))
            })
    }

    /// Number of revocations held.
    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a revocation of `selector` made at `at_ms` covers `identity` (token selectors match
/// by hash, which an identity does not carry: they never match here).
pub fn matches(selector: &Selector, at_ms: u64, identity: &Identity) -> bool {
    let before = identity.issued_at_ms < at_ms;
    match selector {
        Selector::Session(s) => identity.session_key().as_deref() == Some(s.as_str()),
        Selector::Subject(s) => before && identity.subject_key() == *s,
        Selector::User(u) => before && identity.user_id() == *u,
        Selector::Device(u, d) => {
            before && identity.user_id() == *u && identity.device_id() == Some(d.as_str())
        }
        Selector::Token(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::IdentityParts;
    use crate::auth::Access;
    use crate::store::sqlite::SqliteStore;

    fn id(issued_at_ms: u64) -> Identity {
        IdentityParts {
            user_id: "@a:x".into(),
            device_id: Some("D1".into()),
            scope: String::new(),
            access: Access::Full,
            issuer: "https://op-a".into(),
            subject: "sub-a".into(),
            session_id: Some("sid-1".into()),
            expires_at_ms: None,
            token_id: None,
            issued_at_ms,
        }
        .into()
    }

    #[tokio::test]
    async fn selectors_match_as_documented_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let r = Revocations::new(store.clone(), &["https://op-a".to_owned()]);
        let t = TokenHash::of("tok");
        assert!(!r.is_revoked(&id(0), &t, 1_000));
        r.revoke(
            Selector::Device("@a:x".into(), "D1".into()),
            1_000,
            10_000,
            false,
        )
        .await
        .unwrap();
        assert!(
            r.is_revoked(&id(500), &t, 2_000),
            "issued before the revocation"
        );
        assert!(
            !r.is_revoked(&id(1_500), &t, 2_000),
            "issued after: a new sign-in"
        );
        assert!(!r.is_revoked(&id(500), &t, 10_000), "retention over");
        // Another issuer's equal `sid` and `sub` are other people.
        r.revoke(
            Selector::Session(issuer_scoped("https://op-b", "sid-1")),
            3_000,
            10_000,
            false,
        )
        .await
        .unwrap();
        r.revoke(
            Selector::Subject(issuer_scoped("https://op-b", "sub-a")),
            3_000,
            10_000,
            false,
        )
        .await
        .unwrap();
        assert!(
            !r.is_revoked(&id(1_500), &t, 4_000),
            "issuer B's revocations"
        );
        r.revoke(
            Selector::Session(issuer_scoped("https://op-a", "sid-1")),
            3_000,
            10_000,
            false,
        )
        .await
        .unwrap();
        assert!(
            r.is_revoked(&id(5_000), &t, 4_000),
            "a session revocation has no 'after'"
        );
        let again = Revocations::new(store.clone(), &["https://op-a".to_owned()]);
        assert_eq!(again.load(4_000).await.unwrap(), 4);
        assert!(again.is_revoked(&id(5_000), &t, 4_000));
        // An unscoped entry persisted before issuer scoping: the only issuer's, or, with
        // several configured, each one's (it cannot be attributed, so it fails closed).
        store
            .put_revocation("sub:sub-a", 6_000, 10_000)
            .await
            .unwrap();
        let mut other = id(5_500).edited(|p| p.session_id = None);
        let single = Revocations::new(store.clone(), &["https://op-a".to_owned()]);
        single.load(7_000).await.unwrap();
        assert!(single.is_revoked(&other, &t, 7_000));
        other.issuer = "https://op-b".into();
        assert!(!single.is_revoked(&other, &t, 7_000));
        let both = ["https://op-a".to_owned(), "https://op-b".to_owned()];
        let several = Revocations::new(store, &both);
        several.load(7_000).await.unwrap();
        assert!(several.is_revoked(&other, &t, 7_000));
        for sel in [
            Selector::Session("s".into()),
            Selector::Subject("x".into()),
            Selector::User("@u:x".into()),
            Selector::Device("@u:x".into(), "D:1".into()),
            Selector::Token(t),
        ] {
            assert_eq!(Selector::from_key(&sel.key()), Some(sel));
        }
    }

    #[tokio::test]
    async fn the_cap_binds_only_capped_revocations_and_expired_entries_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let r = Revocations::bounded(store, &["https://op-a".to_owned()], 2);
        let token = |n: &str| Selector::Token(TokenHash::of(n));
        r.revoke(token("a"), 1_000, 5_000, true).await.unwrap();
        r.revoke(token("b"), 1_000, 10_000, true).await.unwrap();
        assert!(!r.has_room(1, 2_000));
        assert!(matches!(
            r.revoke(token("c"), 2_000, 10_000, true).await,
            Err(RevokeError::Full(2))
        ));
        // Once "a" expired there is room again.
        r.revoke(token("c"), 6_000, 10_000, true).await.unwrap();
        assert!(!r.has_room(1, 6_000));
        // An OP's or operator's sign-out is recorded even when the list is full.
        r.revoke(Selector::User("@a:x".into()), 7_000, 10_000, false)
            .await
            .unwrap();
        assert!(r.is_revoked(&id(500), &TokenHash::of("x"), 7_500));
        assert_eq!(r.len(), 3);
    }

    #[tokio::test]
    async fn asking_for_room_in_a_full_list_of_live_entries_takes_no_exclusive_lock() {
        // The revocation proxy asks on every call, before any budget or OP call: when nothing
        // in the full list can have expired yet, the answer must not stall readers (every
        // request's `is_revoked`) behind an exclusive lock and a sweep of the whole list.
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let r = Arc::new(Revocations::bounded(store, &["https://op-a".to_owned()], 2));
        let token = |n: &str| Selector::Token(TokenHash::of(n));
        r.revoke(token("a"), 1_000, 5_000, true).await.unwrap();
        r.revoke(token("b"), 1_000, 10_000, true).await.unwrap();
        let reader = r.entries.read();
        let asker = r.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(asker.has_room(1, 2_000)).unwrap());
        let answer = rx.recv_timeout(std::time::Duration::from_secs(2));
        drop(reader);
        assert_eq!(answer, Ok(false), "has_room waited for the exclusive lock");
        // Once the earliest entry can have expired, a sweep makes room.
        assert!(r.has_room(1, 5_000));
        r.revoke(token("c"), 5_000, 10_000, true).await.unwrap();
        assert!(!r.has_room(1, 6_000));
    }

    #[tokio::test]
    async fn a_panic_while_the_list_is_locked_does_not_unrevoke_anything() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let r = Arc::new(Revocations::new(store, &["https://op-a".to_owned()]));
        let t = TokenHash::of("tok");
        r.revoke(Selector::User("@a:x".into()), 1_000, 10_000, false)
            .await
            .unwrap();
        assert!(r.is_revoked(&id(500), &t, 2_000));
        let held = r.clone();
        let crashed = std::thread::spawn(move || {
            let _guard = held.entries.write();
            panic!("a bug while holding the lock");
        })
        .join();
        assert!(crashed.is_err());
        assert!(
            r.is_revoked(&id(500), &t, 2_000),
            "a poisoned lock must not read as 'not revoked'"
        );
    }
}

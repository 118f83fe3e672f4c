//! One issuer's published signing keys (JWKS): loaded from `jwks_uri`, refreshed on the schedule
//! the OP's `Cache-Control` asks for (within bounds), refetched for an unknown `kid` at most once
//! per interval (a `kid` that cannot be looked up now is "unavailable", not "unknown"), and kept
//! when a fetch fails. Used for JWT access tokens and for back-channel
//! logout tokens.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;
use url::Url;

use super::op::OpClient;
use crate::config::Secret;
use crate::error::OpFailure;
use crate::metrics;

struct Key {
    kid: Option<String>,
    alg: Option<KeyAlgorithm>,
    key: DecodingKey,
    family: AlgorithmFamily,
}

struct KeySet {
    keys: Vec<Key>,
    loaded: bool,
}

/// Why no key could be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLookup {
    /// No key set could ever be loaded.
    Unavailable(OpFailure),
    /// The key exists but not for this algorithm (or HMAC without a secret).
    WrongAlgorithm,
    /// No key with that `kid`, even after the allowed refetch.
    Unknown,
}

/// Refresh schedule of a key store.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Lower bound of scheduled refreshes.
    pub refresh_min: Duration,
    /// Upper bound (and default) of scheduled refreshes.
    pub refresh_max: Duration,
    /// Minimum time between unscheduled fetches.
    pub refetch_interval: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            refresh_min: Duration::from_secs(60),
            refresh_max: Duration::from_secs(3600),
            refetch_interval: Duration::from_secs(30),
        }
    }
}

/// One issuer's keys.
pub struct KeyStore {
    op: Arc<OpClient>,
    jwks_uri: Option<Url>,
    schedule: Schedule,
    keys: RwLock<Arc<KeySet>>,
    last_unscheduled_fetch: Mutex<Option<Instant>>,
    fetch_lock: tokio::sync::Mutex<()>,
    fetches: std::sync::atomic::AtomicU64,
}

impl KeyStore {
    /// A key store for the issuer behind `op`; nothing is fetched yet.
    pub fn new(op: Arc<OpClient>, jwks_uri: Option<Url>, schedule: Schedule) -> Self {
        Self {
            op,
            jwks_uri,
            schedule,
            keys: RwLock::new(Arc::new(KeySet {
                keys: Vec::new(),
                loaded: false,
            })),
            last_unscheduled_fetch: Mutex::new(None),
            fetch_lock: tokio::sync::Mutex::new(()),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The issuer identifier.
    pub fn issuer(&self) -> &str {
        &self.op.issuer().issuer
    }

    /// The issuer's OP client.
    pub fn op(&self) -> &Arc<OpClient> {
        &self.op
    }

    /// Whether a key set has been loaded.
    pub fn loaded(&self) -> bool {
        self.keys.read().map(|k| k.loaded).unwrap_or(false)
    }

    /// Number of usable keys.
    pub fn key_count(&self) -> usize {
        self.keys.read().map(|k| k.keys.len()).unwrap_or(0)
    }

    /// JWKS fetches made so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fetches the JWKS now; keeps the previous set on failure. Returns when to refresh next.
    pub async fn refresh(&self) -> Result<Duration, OpFailure> {
        let result = self.refresh_unmeasured().await;
        let issuer = self.issuer().to_owned();
        let label = if result.is_ok() { "success" } else { "failure" };
        metrics::JWKS_REFRESHES
            .with_label_values(&[&issuer, label])
            .inc();
        metrics::JWKS_KEYS
            .with_label_values(&[&issuer])
            .set(self.key_count() as i64);
        if result.is_ok() {
            metrics::JWKS_LAST_SUCCESS
                .with_label_values(&[&issuer])
                .set(crate::clock::unix_secs_f64());
        }
        result
    }

    async fn refresh_unmeasured(&self) -> Result<Duration, OpFailure> {
        let _guard = self.fetch_lock.lock().await;
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let uri = match &self.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let meta = self.op.known_metadata().await?;
                meta.jwks_uri.clone().ok_or(OpFailure::BadMetadata)?
            }
        };
        let (doc, max_age) = self.op.get_json_cached(uri).await?;
        let keys = parse_jwks(&doc).ok_or(OpFailure::InvalidBody)?;
        tracing::info!(issuer = %self.issuer(), keys = keys.len(), "JWKS loaded");
        if let Ok(mut slot) = self.keys.write() {
            *slot = Arc::new(KeySet { keys, loaded: true });
        }
        let s = self.schedule;
        Ok(max_age
            .unwrap_or(s.refresh_max)
            .clamp(s.refresh_min, s.refresh_max))
    }

    /// Runs until `shutdown` fires: scheduled refreshes, failures retried with a capped backoff.
    pub async fn refresh_loop(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.refresh().await {
                Ok(next) => {
                    backoff = Duration::from_millis(500);
                    next
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.issuer(), reason = ?e, "JWKS refresh failed; keeping the last good keys");
                    backoff =
                        (backoff * 2).min(self.schedule.refresh_min.max(Duration::from_secs(1)));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fetches the key set again for a `kid` it lacks, at most once per `refetch_interval`.
    /// `Err` when that cannot be done now (the budget is spent, or the fetch failed): the
    /// `kid` may be a key the OP has just rotated in, so the caller must not call it unknown.
    async fn refetch_for_unknown_kid(&self) -> Result<(), OpFailure> {
        {
            let Ok(mut last) = self.last_unscheduled_fetch.lock() else {
                return Err(OpFailure::Overloaded);
            };
            if last.is_some_and(|t| t.elapsed() < self.schedule.refetch_interval) {
                return Err(OpFailure::Overloaded);
            }
            *last = Some(Instant::now());
        }
        self.refresh().await.map(|_| ())
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Result<DecodingKey, KeyLookup>> {
        let set = self.keys.read().ok()?.clone();
        let family = alg.family();
        let mut matched_kid = false;
        for k in set.keys.iter().filter(|k| match (kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
            (None, _) => true,
        }) {
            matched_kid = true;
            if k.family == family && k.alg.is_none_or(|a| key_alg_matches(a, alg)) {
                return Some(Ok(k.key.clone()));
            }
        }
        matched_kid.then_some(Err(KeyLookup::WrongAlgorithm))
    }

    /// The key to verify a JWS signed with `alg` and `kid`: the HMAC secret for HS*, otherwise
    /// a published key of the algorithm's type (loading the set, and refetching once for an
    /// unknown `kid`, as needed).
    pub async fn key_for(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
        hmac_secret: Option<&Secret>,
    ) -> Result<DecodingKey, KeyLookup> {
        if alg.family() == AlgorithmFamily::Hmac {
            return hmac_secret
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes()))
                .ok_or(KeyLookup::WrongAlgorithm);
        }
        if !self.loaded() {
            if let Err(f) = self.refresh().await {
                return Err(KeyLookup::Unavailable(f));
            }
        }
        if let Some(found) = self.find(kid, alg) {
            return found;
        }
        // Junk tokens with made-up `kid`s spend the refetch budget; a real token signed with a
        // freshly rotated key arriving then gets "unavailable" (503, retried), never "unknown"
        // (a cached 401 that logs its client out).
        if let Err(f) = self.refetch_for_unknown_kid().await {
            return Err(KeyLookup::Unavailable(f));
        }
        self.find(kid, alg).unwrap_or(Err(KeyLookup::Unknown))
    }
}

fn key_alg_matches(key: KeyAlgorithm, alg: Algorithm) -> bool {
    format!("{key:?}") == format!("{alg:?}")
}

fn parse_jwks(doc: &Value) -> Option<Vec<Key>> {
    let items = doc.get("keys")?.as_array()?;
    let mut keys = Vec::new();
    for item in items {
        // Encryption keys and key types jsonwebtoken does not know are skipped, not fatal.
        if item
            .get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(item.clone()) else {
            continue;
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
            // Symmetric keys are never taken from a published key set.
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg: jwk.common.key_algorithm,
            key,
            family,
        });
    }
    Some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_parsing_skips_what_it_cannot_use() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB", "kid": "enc"},
            {"kty": "weird"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"}
        ]});
        let keys = parse_jwks(&doc).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("ed"));
    }
}

//! What only shared state gives several replicas: a second-level identity cache, locks with
//! expiry (and the fencing token the fenced writes check), and the fan-out of events.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{eval, store_err, Redis};
use crate::store::StoreError;

impl Redis {
    /// A value from the shared cache.
    pub async fn cache_get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.q(redis::cmd("GET").arg(self.key(&["id", id]))).await
    }

    /// Stores a value in the shared cache for `ttl`.
    pub async fn cache_set(&self, id: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let ms = ttl.as_millis().max(1) as u64;
        self.q::<()>(
            redis::cmd("SET")
                .arg(self.key(&["id", id]))
                .arg(value)
                .arg("PX")
                .arg(ms),
        )
        .await
    }

    /// Replaces a value in the shared cache only if it still is `expected` (compare-and-set);
    /// returns whether it did.
    pub async fn cache_swap(
        &self,
        id: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let script = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 else return 0 end";
        let ms = ttl.as_millis().max(1).to_string();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(1)
            .arg(self.key(&["id", id]))
            .arg(expected)
            .arg(value)
            .arg(ms);
        self.q::<i64>(&cmd).await.map(|n| n == 1)
    }

    /// Drops a value from the shared cache.
    pub async fn cache_del(&self, id: &str) -> Result<(), StoreError> {
        self.q::<()>(redis::cmd("DEL").arg(self.key(&["id", id])))
            .await
    }

    /// Takes a lock for `ttl` (expiry bounds a crashed holder); returns its fencing token.
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        // A random token, not a counter: a failover can lose a counter's increments and hand
        // the same value to the next holder, whose lock a stale holder would then pass for its own.
        let token = hex::encode(rand::random::<[u8; 16]>());
        let ok: Option<String> = self
            .q(redis::cmd("SET")
                .arg(self.key(&["lock", name]))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64))
            .await?;
        Ok(ok.map(|_| token))
    }

    /// Releases a lock only if `token` still holds it (compare-and-delete).
    pub async fn unlock(&self, name: &str, token: &str) -> Result<(), StoreError> {
        let script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        self.q::<i64>(&eval(script, &[self.key(&["lock", name])], &[token]))
            .await
            .map(|_| ())
    }

    /// Whether a lock is held by anyone.
    pub async fn locked(&self, name: &str) -> Result<bool, StoreError> {
        self.q::<bool>(redis::cmd("EXISTS").arg(self.key(&["lock", name])))
            .await
    }

    /// Publishes a fan-out event.
    pub async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        let payload = serde_json::to_string(event).map_err(store_err)?;
        self.q::<()>(redis::cmd("PUBLISH").arg(self.channel()).arg(payload))
            .await
    }
}

/// What replicas tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A revocation (`auth::revocations::Selector::key`).
    Revoke {
        /// The selector.
        key: String,
        /// When.
        at: u64,
        /// Until when.
        until: u64,
    },
    /// A user's pin or tombstone changed.
    User {
        /// The user.
        user: String,
    },
    /// A binding was dropped.
    Binding {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
}

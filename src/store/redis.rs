//! The shared backend for several replicas: a Redis implementation of [`Store`], plus what only
//! shared state can give ([`Shared`]): a second-level identity cache, distributed single-flight
//! and provisioning locks (with expiry and fencing), and the revocation fan-out channel. One
//! server or Redis Sentinel; Redis Cluster is not supported.
//!
//! Every command has a short timeout (`redis.timeout`): an unavailable Redis answers errors
//! quickly instead of stalling requests, and the callers fall back as docs/scaling.md says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Client, Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisResult, ServerErrorKind,
};
use serde::{Deserialize, Serialize};

use super::{DeviceRecord, Fence, Pin, Store, StoreError};
use crate::config::{RedisMode, RedisSettings};

/// The Redis client side shared by the store, the cache, the locks and the fan-out.
///
/// In Sentinel mode the master is not a fixed address: it is asked of the sentinels when the
/// first command connects, and again whenever a command fails in a way a failover explains (the
/// connection broke, timed out, or the old master now answers `READONLY`), so writes follow the
/// promoted replica. Subscriptions are made on that master too, never on a sentinel.
#[derive(Clone)]
pub struct Redis {
    /// The connection and its generation (bumped by each new one), so that a late failure of
    /// an old connection does not drop its replacement.
    conn: Arc<RwLock<Option<(u64, ConnectionManager)>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    opening: Arc<tokio::sync::Mutex<()>>,
    settings: RedisSettings,
    prefix: String,
    timeout: Duration,
    up: Arc<AtomicBool>,
}

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("redis: {e}"))
}

impl Redis {
    /// Prepares a client for `settings`. Nothing connects yet: the first command connects,
    /// on the runtime that issues it (connections then live as long as that runtime).
    pub fn new(settings: &RedisSettings) -> Result<Redis, StoreError> {
        if Self::infos(settings)?.is_empty() {
            return Err(store_err("no URL"));
        }
        Ok(Redis {
            conn: Arc::new(RwLock::new(None)),
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            opening: Arc::new(tokio::sync::Mutex::new(())),
            settings: settings.clone(),
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            up: Arc::new(AtomicBool::new(true)),
        })
    }

    fn infos(settings: &RedisSettings) -> Result<Vec<redis::ConnectionInfo>, StoreError> {
        let mut infos = Vec::new();
        for u in &settings.urls {
            let mut info = u.as_str().into_connection_info().map_err(store_err)?;
            if let Some(p) = &settings.password {
                let redis_settings = info.redis_settings().clone().set_password(p.expose());
                info = info.set_redis_settings(redis_settings);
            }
            infos.push(info);
        }
        Ok(infos)
    }

    /// A client for the server that takes writes now: the configured one, or the master the
    /// sentinels name at this moment.
    pub async fn data_client(&self) -> Result<Client, StoreError> {
        let infos = Self::infos(&self.settings)?;
        match self.settings.mode {
            RedisMode::Standalone => Client::open(infos[0].clone()).map_err(store_err),
            RedisMode::Sentinel => {
                let service = self.settings.sentinel_service.clone().unwrap_or_default();
                // The master is reached with the same credentials, database and TLS choice as
                // the first sentinel URL.
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(infos[0].redis_settings().clone());
                let mut sentinel =
                    SentinelClient::build(infos, service, Some(node), SentinelServerType::Master)
                        .map_err(store_err)?;
                let resolve = sentinel.async_get_client();
                match tokio::time::timeout(self.timeout * 4, resolve).await {
                    Ok(r) => r.map_err(store_err),
                    Err(_) => Err(store_err("no sentinel named a master in time")),
                }
            }
        }
    }

    async fn open(&self) -> Result<ConnectionManager, StoreError> {
        let settings = &self.settings;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let client = self.data_client().await?;
        ConnectionManager::new_lazy_with_config(client, manager_config).map_err(store_err)
    }

    async fn conn(&self) -> RedisResult<(u64, ConnectionManager)> {
        if let Some(c) = self.conn.read().as_ref() {
            return Ok(c.clone());
        }
        // One caller (re)connects; the others wait at most a few command timeouts, then fail
        // (fast errors, never a queue of callers each waiting for the sentinels in turn).
        let wait = self.timeout * 4;
        let Ok(_opening) = tokio::time::timeout(wait, self.opening.lock()).await else {
            return Err(redis::RedisError::from((
                ErrorKind::Io,
                "connect",
                "another caller is still connecting".to_owned(),
            )));
        };
        if let Some(c) = self.conn.read().as_ref() {
            return Ok(c.clone());
        }
        let opened = self
            .open()
            .await
            .map_err(|e| redis::RedisError::from((ErrorKind::Io, "connect", e.0)))?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.conn.write() = Some((generation, opened.clone()));
        Ok((generation, opened))
    }

    /// After a failure a failover explains, forget the master: the next command asks the
    /// sentinels again. (A standalone server's connection manager reconnects by itself.) Only
    /// the failed connection's generation is forgotten.
    fn after_failure(&self, generation: u64, e: &redis::RedisError) {
        let failover = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
            );
        if self.settings.mode == RedisMode::Sentinel && failover {
            let mut slot = self.conn.write();
            if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
                *slot = None;
            }
        }
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    /// The fan-out channel.
    pub fn channel(&self) -> String {
        self.key(&["events"])
    }

    /// A round trip to Redis (readiness).
    pub async fn ping(&self) -> bool {
        self.query::<String>(&redis::cmd("PING")).await.is_ok()
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        let (generation, mut conn) = match self.conn().await {
            Ok(c) => c,
            Err(e) => {
                self.up.store(false, Ordering::Relaxed);
                return Err(e);
            }
        };
        let result = tokio::time::timeout(self.timeout, cmd.query_async(&mut conn))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    ErrorKind::Io,
                    "redis command timed out",
                )))
            });
        if let Err(e) = &result {
            self.after_failure(generation, e);
        }
        self.up.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    async fn q<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.query(cmd).await.map_err(store_err)
    }

    // === second-level cache, locks, fan-out ===

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

/// `EVAL script` with `keys` and `args`: a Lua script run as one command, so it goes through
/// [`Redis::query`] (command timeout, failover handling) like any other.
fn eval(script: &str, keys: &[String], args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
    cmd
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

// === Store ===

/// [`Store`] on Redis.
pub struct RedisStore {
    redis: Redis,
}

impl RedisStore {
    /// Wraps a connection.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

const SEP: &str = "\u{1f}";

#[async_trait]
impl Store for RedisStore {
    async fn put_device_fenced(
        &self,
        user_id: &str,
        device_id: &str,
        record: &DeviceRecord,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let r = &self.redis;
        // Compare and write in one step: the write lands only while the fence holds the lock.
        let script = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) return 1 else return 0 end";
        let keys = [r.key(&["lock", &fence.lock]), r.key(&["dev", user_id])];
        let value = record.upstream_token.as_deref().unwrap_or_default();
        let cmd = eval(script, &keys, &[&fence.token, device_id, value]);
        Ok(r.q::<i64>(&cmd).await? == 1)
    }

    async fn device_records(&self) -> Result<Vec<(String, String, DeviceRecord)>, StoreError> {
        let r = &self.redis;
        let prefix = r.key(&["dev", ""]);
        // SCAN's MATCH is a glob: the configured prefix is matched literally.
        let literal: String = prefix
            .chars()
            .flat_map(|c| {
                let escape = matches!(c, '*' | '?' | '[' | ']' | '\\');
                escape.then_some('\\').into_iter().chain(std::iter::once(c))
            })
            .collect();
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = r
                .q(redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{literal}*"))
                    .arg("COUNT")
                    .arg(500))
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut out = Vec::new();
        for key in keys {
            let Some(user) = key.strip_prefix(&prefix) else {
                continue;
            };
            let all: Vec<(String, String)> = r.q(redis::cmd("HGETALL").arg(&key)).await?;
            for (device, token) in all {
                out.push((
                    user.to_owned(),
                    device,
                    DeviceRecord {
                        upstream_token: (!token.is_empty()).then_some(token),
                    },
                ));
            }
        }
        Ok(out)
    }

    async fn meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        let r = &self.redis;
        r.q(redis::cmd("HGET").arg(r.key(&["meta"])).arg(name))
            .await
    }

    async fn init_meta(&self, name: &str, value: &str) -> Result<String, StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("HSETNX")
                .arg(r.key(&["meta"]))
                .arg(name)
                .arg(value),
        )
        .await?;
        let current: Option<String> = r
            .q(redis::cmd("HGET").arg(r.key(&["meta"])).arg(name))
            .await?;
        current.ok_or_else(|| StoreError("metadata vanished while being set".into()))
    }

    async fn put_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("HSET")
                .arg(r.key(&["meta"]))
                .arg(name)
                .arg(value),
        )
        .await
    }

    async fn device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let r = &self.redis;
        let v: Option<String> = r
            .q(redis::cmd("HGET")
                .arg(r.key(&["dev", user_id]))
                .arg(device_id))
            .await?;
        Ok(v.map(|s| DeviceRecord {
            upstream_token: (!s.is_empty()).then_some(s),
        }))
    }

    async fn put_device(
        &self,
        user_id: &str,
        device_id: &str,
        record: &DeviceRecord,
    ) -> Result<(), StoreError> {
        let r = &self.redis;
        let v = record.upstream_token.clone().unwrap_or_default();
        r.q::<()>(
            redis::cmd("HSET")
                .arg(r.key(&["dev", user_id]))
                .arg(device_id)
                .arg(v),
        )
        .await
    }

    async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("HDEL")
                .arg(r.key(&["dev", user_id]))
                .arg(device_id),
        )
        .await
    }

    async fn devices_of(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let r = &self.redis;
        let mut v: Vec<String> = r
            .q(redis::cmd("HKEYS").arg(r.key(&["dev", user_id])))
            .await?;
        v.sort();
        Ok(v)
    }

    async fn user_registered(&self, user_id: &str) -> Result<bool, StoreError> {
        let r = &self.redis;
        r.q(redis::cmd("SISMEMBER")
            .arg(r.key(&["registered"]))
            .arg(user_id))
            .await
    }

    async fn mark_user_registered(&self, user_id: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(redis::cmd("SADD").arg(r.key(&["registered"])).arg(user_id))
            .await
    }

    async fn pin_subject(&self, user_id: &str, sub: &str) -> Result<Pin, StoreError> {
        let r = &self.redis;
        let new: bool = r
            .q(redis::cmd("HSETNX")
                .arg(r.key(&["pin"]))
                .arg(user_id)
                .arg(sub))
            .await?;
        if new {
            r.q::<()>(
                redis::cmd("HSET")
                    .arg(r.key(&["sub"]))
                    .arg(sub)
                    .arg(user_id),
            )
            .await?;
            return Ok(Pin::New);
        }
        let owner: Option<String> = r
            .q(redis::cmd("HGET").arg(r.key(&["pin"])).arg(user_id))
            .await?;
        Ok(match owner {
            Some(o) if o == sub => Pin::Matches,
            Some(o) => Pin::Conflict { owner: o },
            None => Pin::New,
        })
    }

    async fn repin_subject(&self, user_id: &str, sub: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        let old: Option<String> = r
            .q(redis::cmd("HGET").arg(r.key(&["pin"])).arg(user_id))
            .await?;
        if let Some(old) = old.filter(|o| o != sub) {
            // The old subject no longer owns the user ID: forget its reverse entry, or a logout
            // by the old subject would sign out the new owner.
            let points_here: Option<String> = r
                .q(redis::cmd("HGET").arg(r.key(&["sub"])).arg(&old))
                .await?;
            if points_here.as_deref() == Some(user_id) {
                r.q::<()>(redis::cmd("HDEL").arg(r.key(&["sub"])).arg(&old))
                    .await?;
            }
        }
        r.q::<()>(
            redis::cmd("HSET")
                .arg(r.key(&["pin"]))
                .arg(user_id)
                .arg(sub),
        )
        .await?;
        r.q::<()>(
            redis::cmd("HSET")
                .arg(r.key(&["sub"]))
                .arg(sub)
                .arg(user_id),
        )
        .await
    }

    async fn approve_cross_signing_reset(
        &self,
        user_id: &str,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("SET")
                .arg(r.key(&["xsr", user_id]))
                .arg(until_ms),
        )
        .await
    }

    async fn take_cross_signing_reset(
        &self,
        user_id: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let r = &self.redis;
        let until: Option<u64> = r
            .q(redis::cmd("GETDEL").arg(r.key(&["xsr", user_id])))
            .await?;
        Ok(until.is_some_and(|u| u > now_ms))
    }

    async fn user_of_subject(&self, sub: &str) -> Result<Option<String>, StoreError> {
        let r = &self.redis;
        let user: Option<String> = r
            .q(redis::cmd("HGET").arg(r.key(&["sub"])).arg(sub))
            .await?;
        let Some(user) = user else {
            return Ok(None);
        };
        // The pin is the truth: a reverse entry whose user is pinned elsewhere is stale.
        let owner: Option<String> = r
            .q(redis::cmd("HGET").arg(r.key(&["pin"])).arg(&user))
            .await?;
        Ok((owner.as_deref() == Some(sub)).then_some(user))
    }

    async fn tombstone(&self, user_id: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(redis::cmd("SADD").arg(r.key(&["tomb"])).arg(user_id))
            .await
    }

    async fn lift_tombstone(&self, user_id: &str) -> Result<bool, StoreError> {
        let r = &self.redis;
        let n: u64 = r
            .q(redis::cmd("SREM").arg(r.key(&["tomb"])).arg(user_id))
            .await?;
        Ok(n > 0)
    }

    async fn is_tombstoned(&self, user_id: &str) -> Result<bool, StoreError> {
        let r = &self.redis;
        r.q(redis::cmd("SISMEMBER").arg(r.key(&["tomb"])).arg(user_id))
            .await
    }

    async fn record_session(
        &self,
        sid: &str,
        user_id: &str,
        device_id: &str,
    ) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("SADD")
                .arg(r.key(&["sid", sid]))
                .arg(format!("{user_id}{SEP}{device_id}")),
        )
        .await
    }

    async fn session_devices(&self, sid: &str) -> Result<Vec<(String, String)>, StoreError> {
        let r = &self.redis;
        let members: Vec<String> = r
            .q(redis::cmd("SMEMBERS").arg(r.key(&["sid", sid])))
            .await?;
        Ok(members
            .into_iter()
            .filter_map(|m| m.split_once(SEP).map(|(u, d)| (u.to_owned(), d.to_owned())))
            .collect())
    }

    async fn put_revocation(&self, key: &str, at_ms: u64, until_ms: u64) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("HSET")
                .arg(r.key(&["rev"]))
                .arg(key)
                .arg(format!("{at_ms}:{until_ms}")),
        )
        .await
    }

    async fn revocations(&self, now_ms: u64) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let r = &self.redis;
        let all: Vec<(String, String)> = r.q(redis::cmd("HGETALL").arg(r.key(&["rev"]))).await?;
        let mut out = Vec::new();
        for (k, v) in all {
            let Some((at, until)) = v.split_once(':') else {
                continue;
            };
            let (Ok(at), Ok(until)) = (at.parse::<u64>(), until.parse::<u64>()) else {
                continue;
            };
            if until > now_ms {
                out.push((k, at, until));
            } else {
                let _ = r
                    .q::<()>(redis::cmd("HDEL").arg(r.key(&["rev"])).arg(&k))
                    .await;
            }
        }
        Ok(out)
    }

    async fn forget_jti(&self, jti: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(redis::cmd("DEL").arg(r.key(&["jti", jti]))).await
    }

    async fn remember_jti(
        &self,
        jti: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let r = &self.redis;
        let ttl = until_ms.saturating_sub(now_ms).max(1);
        let set: Option<String> = r
            .q(redis::cmd("SET")
                .arg(r.key(&["jti", jti]))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl))
            .await?;
        Ok(set.is_some())
    }
}

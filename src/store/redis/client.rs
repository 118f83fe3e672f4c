//! The Redis client side: connections (one server, or the master the sentinels name, found
//! again after a failover), command timeouts, key naming, and the `EVAL` helper every script
//! goes through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Client, Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisResult, ServerErrorKind,
};

use crate::config::{RedisMode, RedisSettings};
use crate::store::StoreError;

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

pub(super) fn store_err(e: impl std::fmt::Display) -> StoreError {
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

    pub(super) fn key(&self, parts: &[&str]) -> String {
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

    pub(super) async fn q<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.query(cmd).await.map_err(store_err)
    }
}

/// `EVAL script` with `keys` and `args`: a Lua script run as one command, so it goes through
/// [`Redis::query`] (command timeout, failover handling) like any other.
pub(super) fn eval(script: &str, keys: &[String], args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
    cmd
}

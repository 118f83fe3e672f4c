//! [`Store`] on Redis: devices, users and their subject pins, tombstones, sessions,
//! revocations and logout `jti`s, as hashes and keys under the configured prefix.

use async_trait::async_trait;

use super::client::{eval, Redis};
use crate::store::{DeviceRecord, Fence, Pin, Space, Store, StoreError};

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

    async fn claim_cross_signing(&self, user_id: &str) -> Result<bool, StoreError> {
        let r = &self.redis;
        let set: Option<String> = r
            .q(redis::cmd("SET")
                .arg(r.key(&["xsc", user_id]))
                .arg(1)
                .arg("NX"))
            .await?;
        Ok(set.is_some())
    }

    async fn release_cross_signing(&self, user_id: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(redis::cmd("DEL").arg(r.key(&["xsc", user_id])))
            .await
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

    async fn put_expiring(
        &self,
        space: Space,
        key: &str,
        value: &str,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let r = &self.redis;
        // Absolute expiry (Redis 6.2+): the value lives exactly as long on every replica.
        r.q::<()>(
            redis::cmd("SET")
                .arg(r.key(&["x", space.name(), key]))
                .arg(value)
                .arg("PXAT")
                .arg(until_ms.max(1)),
        )
        .await
    }

    async fn get_expiring(
        &self,
        space: Space,
        key: &str,
        _now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let r = &self.redis;
        r.q(redis::cmd("GET").arg(r.key(&["x", space.name(), key])))
            .await
    }

    async fn take_expiring(
        &self,
        space: Space,
        key: &str,
        _now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let r = &self.redis;
        // GETDEL is atomic: of two replicas taking one login token, one gets it.
        r.q(redis::cmd("GETDEL").arg(r.key(&["x", space.name(), key])))
            .await
    }

    async fn claim_expiring(
        &self,
        space: Space,
        key: &str,
        value: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let r = &self.redis;
        // NX: only when absent (Redis drops expired keys itself). A relative expiry: a lease
        // must last its length even when this replica's clock and Redis's disagree.
        let set: Option<String> = r
            .q(redis::cmd("SET")
                .arg(r.key(&["x", space.name(), key]))
                .arg(value)
                .arg("NX")
                .arg("PX")
                .arg(until_ms.saturating_sub(now_ms).max(1)))
            .await?;
        Ok(set.is_some())
    }

    async fn delete_expiring_if(
        &self,
        space: Space,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let r = &self.redis;
        // Compare and delete in one step: never another holder's lease.
        let script = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
            return redis.call('DEL', KEYS[1]) else return 0 end";
        r.q::<i64>(&eval(script, &[r.key(&["x", space.name(), key])], &[value]))
            .await
            .map(|_| ())
    }

    async fn delete_expiring(&self, space: Space, key: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(redis::cmd("DEL").arg(r.key(&["x", space.name(), key])))
            .await
    }

    async fn add_member(
        &self,
        space: Space,
        set: &str,
        member: &str,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let r = &self.redis;
        // A sorted set scored by expiry; the set itself lives as long as its last member.
        let script = "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) \
            local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES') \
            redis.call('PEXPIREAT', KEYS[1], top[2]) return 1";
        let until = until_ms.max(1).to_string();
        r.q::<i64>(&eval(
            script,
            &[r.key(&["m", space.name(), set])],
            &[&until, member],
        ))
        .await
        .map(|_| ())
    }

    async fn members(
        &self,
        space: Space,
        set: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let r = &self.redis;
        // Expired members are dropped as the set is read (a user's set does not grow with
        // every login while one session lives on).
        let script = "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) \
            return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')";
        let now = now_ms.to_string();
        r.q(&eval(script, &[r.key(&["m", space.name(), set])], &[&now]))
            .await
    }

    async fn remove_member(&self, space: Space, set: &str, member: &str) -> Result<(), StoreError> {
        let r = &self.redis;
        r.q::<()>(
            redis::cmd("ZREM")
                .arg(r.key(&["m", space.name(), set]))
                .arg(member),
        )
        .await
    }
}

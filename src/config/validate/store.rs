//! `[store]` and `[redis]`: where state lives (SQLite, or Redis for several replicas) and the
//! key that seals upstream device tokens at rest (required with `appservice_login`).

use std::sync::Arc;

use super::Check;
use crate::config::parse::duration;
use crate::config::{file, secret, BindingMode, Problems, RedisMode, RedisSettings, StoreSettings};
use crate::store::seal::Sealer;

/// Validates `[store]` (and `[redis]` when it is the backend); `binding` decides whether a
/// sealing key is required.
pub(super) fn store(
    f: &file::StoreFile,
    redis: &file::RedisFile,
    binding: BindingMode,
    c: &mut Check,
) -> Option<StoreSettings> {
    let p = &mut c.p;
    let redis = match f.backend.as_str() {
        "sqlite" => None,
        "redis" => {
            let r = redis;
            let mode = match r.mode.as_str() {
                "standalone" => RedisMode::Standalone,
                "sentinel" => RedisMode::Sentinel,
                "cluster" => {
                    p.add(
                        "redis.mode",
                        "\"cluster\" is not supported (no failover test proves it): use standalone or sentinel",
                    );
                    RedisMode::Standalone
                }
                other => {
                    p.add(
                        "redis.mode",
                        format!("{other:?} is not one of standalone, sentinel"),
                    );
                    RedisMode::Standalone
                }
            };
            if r.urls.is_empty() {
                p.add("redis.urls", "must list at least one URL");
            }
            for (i, u) in r.urls.iter().enumerate() {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    p.add(
                        &format!("redis.urls[{i}]"),
                        format!("{u:?} must start with redis:// or rediss://"),
                    );
                }
            }
            if mode == RedisMode::Sentinel && r.sentinel_service.is_none() {
                p.add(
                    "redis.sentinel_service",
                    "required with mode = \"sentinel\"",
                );
            }
            if r.key_prefix.is_empty() {
                p.add(
                    "redis.key_prefix",
                    "must not be empty (several gateways may share a Redis)",
                );
            }
            Some(RedisSettings {
                mode,
                urls: r.urls.clone(),
                sentinel_service: r.sentinel_service.clone(),
                password: secret::resolve(
                    p,
                    "redis.password",
                    r.password.as_deref(),
                    r.password_file.as_deref(),
                    false,
                ),
                key_prefix: r.key_prefix.clone(),
                timeout: duration(p, "redis.timeout", &r.timeout),
            })
        }
        other => {
            p.add(
                "store.backend",
                format!("{other:?} is not one of sqlite, redis"),
            );
            None
        }
    };
    if f.path.trim().is_empty() {
        p.add("store.path", "must not be empty");
    }
    let sealer = store_sealer(p, f, binding == BindingMode::AppserviceLogin);

    Some(StoreSettings {
        path: f.path.clone().into(),
        redis,
        sealer,
    })
}

/// `store.encryption_key[_file]` and `store.previous_encryption_key[_file]` as a sealer.
fn store_sealer(p: &mut Problems, store: &file::StoreFile, required: bool) -> Option<Arc<Sealer>> {
    const HOW: &str = "must be 32 random bytes written as 64 hex digits or base64 \
                       (generate one with `openssl rand -hex 32`)";
    let mut key = |name: &str, value: Option<&str>, file: Option<&str>| {
        let s = secret::resolve(p, name, value, file, false)?;
        let parsed = crate::store::seal::parse_key(s.expose());
        if parsed.is_none() {
            p.add(name, HOW);
        }
        parsed
    };
    let current = key(
        "store.encryption_key",
        store.encryption_key.as_deref(),
        store.encryption_key_file.as_deref(),
    );
    let previous = key(
        "store.previous_encryption_key",
        store.previous_encryption_key.as_deref(),
        store.previous_encryption_key_file.as_deref(),
    );
    if required && store.encryption_key.is_none() && store.encryption_key_file.is_none() {
        p.add(
            "store.encryption_key",
            "required with binding = appservice_login (upstream device tokens are encrypted at \
             rest): set `store.encryption_key` or `store.encryption_key_file`; generate one with \
             `openssl rand -hex 32`",
        );
    }
    if previous.is_some() && current.is_none() {
        p.add(
            "store.previous_encryption_key",
            "only meaningful next to store.encryption_key (key rotation)",
        );
    }
    if current.is_some() && current == previous {
        p.add(
            "store.previous_encryption_key",
            "is the same key as store.encryption_key",
        );
    }
    let current = current?;
    match Sealer::new(&current, previous.as_ref()) {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            p.add("store.encryption_key", e.to_string());
            None
        }
    }
}

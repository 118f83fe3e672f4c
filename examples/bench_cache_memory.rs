//! Benchmark helper: resident memory of N cached verdicts (default 1,000,000), one shape per
//! run (a fresh process each, so that RSS says what that shape costs):
//!   cargo run --release --example bench_cache_memory -- 1000000 [identities|refusals|moka-refusals]
//! - `identities`: active verdicts with realistic identities (user, device, subject, OP
//!   session, `jti`, the usual scope) in the gateway's identity cache;
//! - `refusals`: negative verdicts (nothing but the verdict) in the gateway's identity cache:
//!   the cache's own cost per entry;
//! - `moka-refusals`: the same verdicts in a moka cache with per-entry expiry, as the gateway
//!   used before: what the switch saves.
use std::sync::Arc;
use std::time::{Duration, Instant};

// The gateway's allocator (src/main.rs), so that the figure is the gateway's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use matrix_oidc_gateway::auth::cache::{CachedVerdict, IdentityCache, Verdict};
use matrix_oidc_gateway::auth::{Access, IdentityParts, TokenHash};
use matrix_oidc_gateway::error::RejectReason;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn refusal() -> CachedVerdict {
    CachedVerdict {
        verdict: Verdict::Rejected(RejectReason::Inactive),
        fresh_until_ms: u64::MAX / 2,
        decided_at_ms: 0,
    }
}

fn identity(i: u64, issuer: &Arc<str>) -> CachedVerdict {
    let parts = IdentityParts {
        user_id: format!("@user{i}:example.org"),
        device_id: Some(format!("DEV{i:07}")),
        scope: format!("openid urn:matrix:client:api:* urn:matrix:client:device:DEV{i:07}"),
        access: Access::Full,
        issuer: issuer.clone(),
        subject: format!("7b2c9e1a-{i:012}"),
        session_id: Some(format!("sid-{i:016}")),
        expires_at_ms: Some(u64::MAX / 2),
        token_id: Some(format!("jti-{i:016}")),
        issued_at_ms: 0,
    };
    CachedVerdict {
        verdict: Verdict::Active(Arc::new(parts.into())),
        fresh_until_ms: u64::MAX / 2,
        decided_at_ms: 0,
    }
}

/// moka's expiry as the gateway configured it (a lifetime per entry).
struct Life;
impl moka::Expiry<TokenHash, CachedVerdict> for Life {
    fn expire_after_create(
        &self,
        _: &TokenHash,
        _: &CachedVerdict,
        _: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(3_600))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let shape = args.next().unwrap_or_else(|| "identities".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = |i: u64| TokenHash::of(&format!("token-{i}"));
    let before = rss_kib();
    // (entries, RSS in KiB), read while the cache is still alive.
    let (entries, after) = rt.block_on(async {
        match shape.as_str() {
            "moka-refusals" => {
                let cache: moka::future::Cache<TokenHash, CachedVerdict> =
                    moka::future::Cache::builder()
                        .max_capacity(n + 1)
                        .expire_after(Life)
                        .build();
                for i in 0..n {
                    cache.insert(key(i), refusal()).await;
                }
                cache.run_pending_tasks().await;
                (cache.entry_count(), rss_kib())
            }
            "refusals" | "identities" => {
                let cache =
                    IdentityCache::new(n + 1, Arc::new(matrix_oidc_gateway::clock::SystemClock));
                let issuer: Arc<str> = Arc::from("https://auth.example.org/");
                for i in 0..n {
                    let verdict = if shape == "refusals" {
                        refusal()
                    } else {
                        identity(i, &issuer)
                    };
                    let _ = cache
                        .get_or_load::<()>(key(i), async { Ok(verdict) }, |_| true)
                        .await;
                }
                (cache.entry_count(), rss_kib())
            }
            other => panic!("unknown shape {other}: identities, refusals or moka-refusals"),
        }
    });
    println!(
        "cache_memory shape={shape} entries={entries} rss_mib={:.1} per_entry_bytes={:.0}",
        (after.saturating_sub(before)) as f64 / 1024.0,
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
}

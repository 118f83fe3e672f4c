//! Benchmark helper: resident memory of N cached identities (default 1,000,000).
//!   cargo run --release --example bench_cache_memory -- 1000000
use std::sync::Arc;

use matrix_oidc_gateway::auth::cache::{CachedVerdict, IdentityCache, Verdict};
use matrix_oidc_gateway::auth::{Access, Identity, TokenHash};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = rss_kib();
    let cache = IdentityCache::new(
        n + 1,
        std::sync::Arc::new(matrix_oidc_gateway::clock::SystemClock),
    );
    rt.block_on(async {
        let issuer: Arc<str> = Arc::from("https://auth.example.org/");
        for i in 0..n {
            let identity = Identity {
                user_id: format!("@user{i}:example.org"),
                device_id: Some(format!("DEV{i:07}")),
                scope: format!("urn:matrix:client:api:* urn:matrix:client:device:DEV{i:07}"),
                access: Access::Full,
                issuer: issuer.clone(),
                subject: format!("7b2c9e1a-{i:012}"),
                session_id: Some(format!("sid-{i:016}")),
                expires_at_ms: Some(u64::MAX / 2),
                token_id: Some(format!("jti-{i:016}")),
                issued_at_ms: 0,
            };
            let verdict = CachedVerdict {
                verdict: Verdict::Active(Arc::new(identity)),
                fresh_until_ms: u64::MAX / 2,
                decided_at_ms: 0,
            };
            let _ = cache
                .get_or_load::<()>(TokenHash::of(&format!("token-{i}")), async { Ok(verdict) })
                .await;
        }
    });
    let entries = cache.entry_count();
    let after = rss_kib();
    println!(
        "cache_memory entries={} rss_mib={:.1} per_entry_bytes={:.0}",
        entries.max(n),
        (after.saturating_sub(before)) as f64 / 1024.0,
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
}

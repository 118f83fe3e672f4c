//! Benchmark helper: puts N distinct identities into a running gateway's cache, by sending one
//! request each with a fresh HS256 JWT access token (the gateway must run with a `jwt` issuer
//! accepting HS256 with the same secret). Local JWT checks make the fill fast; what is cached
//! is the same verdict an introspected token leaves. Prints how many were answered 200, and
//! the last token sent (cached now: the load of a hit on a full cache).
//!   cargo run --release --example bench_fill -- GATEWAY_URL ISSUER SECRET N [FIRST]
// A client of the gateway: its own HTTP client and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gateway, issuer, secret, n, rest @ ..] = args.as_slice() else {
        eprintln!("usage: bench_fill GATEWAY_URL ISSUER SECRET N [FIRST]");
        std::process::exit(2);
    };
    let n: u64 = n.parse().expect("N");
    let first: u64 = rest.first().map_or(0, |f| f.parse().expect("FIRST"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = Arc::new(AtomicU64::new(0));
    let last = Arc::new(parking_lot::Mutex::new(String::new()));
    let next = Arc::new(AtomicU64::new(first));
    let url = format!("{}/_matrix/client/v3/sync", gateway.trim_end_matches('/'));
    let key = EncodingKey::from_secret(secret.as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("at+jwt".into());
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("client");
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (client, url, key, header) =
                    (client.clone(), url.clone(), key.clone(), header.clone());
                let (ok, next, issuer, last) =
                    (ok.clone(), next.clone(), issuer.clone(), last.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= first + n {
                            return;
                        }
                        let claims = serde_json::json!({
                            "iss": issuer, "aud": "bench", "sub": format!("fill-{i}"),
                            "username": format!("fill{i}"), "jti": format!("fill-jti-{i}"),
                            "scope": format!("urn:matrix:client:api:* urn:matrix:client:device:FILL{i:07}"),
                            "iat": now, "exp": now + 6 * 3600,
                        });
                        let token = encode(&header, &claims, &key).expect("signing");
                        if i + 1 == first + n {
                            *last.lock() = token.clone();
                        }
                        if let Ok(r) = client.get(&url).bearer_auth(token).send().await {
                            if r.status().is_success() {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = r.bytes().await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    println!(
        "fill sent={n} ok={} token={}",
        ok.load(Ordering::Relaxed),
        last.lock()
    );
}

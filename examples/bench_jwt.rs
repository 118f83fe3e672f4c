//! Benchmark helper: first-seen RS256 JWT validations per second on one core, through the
//! gateway's own validator (key lookup, algorithm and type checks, signature, claims).
//!   cargo run --release --example bench_jwt -- 20000

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]
use std::sync::Arc;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use matrix_oidc_gateway::auth::jwks::{KeyStore, Schedule};
use matrix_oidc_gateway::auth::jwt::{JwtIssuer, JwtOutcome};
use matrix_oidc_gateway::auth::op::OpClient;
use matrix_oidc_gateway::clock::SystemClock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let root = env!("CARGO_MANIFEST_DIR");
    let pem = std::fs::read(format!("{root}/tests/fixtures/keys/rsa1.pem")).unwrap();
    let jwk = std::fs::read_to_string(format!("{root}/tests/fixtures/keys/rsa1.jwk.json")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // A JWKS endpoint on loopback.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = format!("{{\"keys\":[{jwk}]}}");
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        let issuer = format!("http://127.0.0.1:{port}/");
        let cfg = matrix_oidc_gateway::config::load_str(&format!(
            "[homeserver]\nurl = \"http://127.0.0.1:1\"\nserver_name = \"example.org\"\n\
             [[issuers]]\nissuer = \"{issuer}\"\nmode = \"jwt\"\naudiences = [\"bench\"]\njwks_uri = \"{issuer}jwks\"\n"
        ))
        .unwrap()
        .config;
        let settings = cfg.issuers[0].jwt.clone().unwrap();
        let op = Arc::new(OpClient::new(cfg.issuers[0].clone()).unwrap());
        let keys = Arc::new(KeyStore::new(op, settings.jwks_uri.clone(), Schedule::default()));
        keys.refresh().await.unwrap();
        let validator = JwtIssuer::new(keys, settings, Arc::new(SystemClock));
        let key = EncodingKey::from_rsa_pem(&pem).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        header.typ = Some("at+jwt".into());
        let tokens: Vec<String> = (0..n)
            .map(|i| {
                let claims = serde_json::json!({
                    "iss": issuer, "aud": "bench", "sub": format!("s{i}"), "username": format!("u{i}"),
                    "scope": "urn:matrix:client:api:*", "iat": now, "exp": now + 3600, "jti": format!("j{i}"),
                });
                encode(&header, &claims, &key).unwrap()
            })
            .collect();
        let started = std::time::Instant::now();
        let mut valid = 0;
        for t in &tokens {
            if matches!(validator.validate(t).await, JwtOutcome::Valid(..)) {
                valid += 1;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(valid, n, "every token must validate");
        println!("jwt_first_seen validations={n} per_second={:.0}", n as f64 / secs);
    });
}

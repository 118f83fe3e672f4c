//! Benchmark helper: prints N RS256 JWT access tokens (RFC 9068 shape, `typ: at+jwt`) signed
//! with the test key `tests/fixtures/keys/rsa1.pem`, one per line, for the JWT scenarios
//! (`bench/op_stub.py` serves the matching key set at `/jwks`).
//!   cargo run --release --example bench_mint_jwt -- ISSUER AUDIENCE N
// A client of the gateway: its own clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(issuer), Some(audience)) = (args.next(), args.next()) else {
        eprintln!("usage: bench_mint_jwt ISSUER AUDIENCE [N]");
        std::process::exit(2);
    };
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let root = env!("CARGO_MANIFEST_DIR");
    let pem = std::fs::read(format!("{root}/tests/fixtures/keys/rsa1.pem")).expect("test key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    header.typ = Some("at+jwt".into());
    for i in 0..n {
        // `email` and `email_verified` for oauth2-proxy, which builds its session from them.
        let claims = serde_json::json!({
            "iss": issuer, "aud": audience, "sub": format!("bench-{i}"), "username": format!("bench{i}"),
            "email": format!("bench{i}@example.org"), "email_verified": true,
            "scope": "openid urn:matrix:client:api:* urn:matrix:client:device:BENCHDEV01",
            "client_id": audience, "iat": now, "exp": now + 6 * 3600, "jti": format!("bench-jti-{i}"),
        });
        println!("{}", encode(&header, &claims, &key).expect("signing"));
    }
}

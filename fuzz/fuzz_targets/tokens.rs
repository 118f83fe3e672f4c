//! The token parsers on arbitrary input: JWT access tokens (the cheap pre-checks and the full
//! validator), back-channel logout tokens, and RFC 7662 introspection answers. The first byte
//! picks the parser. Property: a refusal or a typed error, never a panic. The issuer signs
//! with HS256 only, so nothing here reaches the network.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use matrix_oidc_gateway::auth::jwks::{KeyStore, Schedule};
use matrix_oidc_gateway::auth::jwt::{looks_like_jwt, unverified_issuer, JwtIssuer};
use matrix_oidc_gateway::auth::op::{IntrospectionResponse, OpClient};
use matrix_oidc_gateway::clock::{SharedClock, SystemClock};
use matrix_oidc_gateway::notify::logout_token::{LogoutIssuer, LogoutValidator};
use matrix_oidc_gateway::store::sqlite::SqliteStore;

const CONFIG: &str = r#"
[homeserver]
url = "http://127.0.0.1:9"
server_name = "example.org"
[[issuers]]
issuer = "http://127.0.0.1:9/"
mode = "jwt"
audiences = ["matrix"]
algorithms = ["HS256"]
hmac_secret = "a-fuzzing-secret-of-thirty-two-bytes!!"
"#;

struct Parsers {
    runtime: tokio::runtime::Runtime,
    jwt: JwtIssuer,
    logout: LogoutValidator,
    _dir: tempfile::TempDir,
}

fn parsers() -> &'static Parsers {
    static PARSERS: OnceLock<Parsers> = OnceLock::new();
    PARSERS.get_or_init(|| {
        let config = matrix_oidc_gateway::config::load_str(CONFIG)
            .expect("fuzz config")
            .config;
        let issuer = config.issuers[0].clone();
        let settings = issuer.jwt.clone().expect("jwt settings");
        let clock: SharedClock = Arc::new(SystemClock);
        let op = Arc::new(OpClient::new(issuer).expect("client"));
        let keys = Arc::new(KeyStore::new(op, None, Schedule::default()));
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db")).expect("store"));
        let logout = LogoutValidator::new(
            vec![LogoutIssuer {
                keys: keys.clone(),
                audiences: vec!["matrix".into()],
                algorithms: settings.algorithms.clone(),
                hmac_secret: settings.hmac_secret.clone(),
                leeway: settings.leeway,
            }],
            store,
            clock.clone(),
        );
        Parsers {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            jwt: JwtIssuer::new(keys, settings, clock),
            logout,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let p = parsers();
    match which % 3 {
        0 => {
            let _ = serde_json::from_slice::<IntrospectionResponse>(rest);
        }
        1 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                let _ = looks_like_jwt(token);
                let _ = unverified_issuer(token);
                let _ = p.runtime.block_on(p.jwt.validate(token));
            }
        }
        _ => {
            if let Ok(token) = std::str::from_utf8(rest) {
                let _ = p.runtime.block_on(p.logout.validate(token));
            }
        }
    }
});

//! `[[issuers]]`: each OpenID Provider whose tokens are accepted: discovery, introspection
//! client credentials and limits, and the JWT settings of `jwt`/`auto` mode.

use std::time::Duration;

use url::Url;

use super::Check;
use crate::config::parse::{duration, http_url, normalize_typ};
use crate::config::{file, secret, ClientAuthMethod, Issuer, JwtSettings, Problems, VerifyMode};

/// Validates every `[[issuers]]` entry (at least one; no issuer twice).
pub(super) fn issuers(f: &[file::IssuerFile], c: &mut Check) -> Vec<Issuer> {
    let Check { p, warnings } = c;
    if f.is_empty() {
        p.add("issuers", "at least one [[issuers]] entry is required");
    }
    let mut issuers = Vec::new();
    for (i, iss) in f.iter().enumerate() {
        let k = |name: &str| format!("issuers[{i}].{name}");
        let issuer = match iss.issuer.as_deref() {
            Some(s) => {
                http_url(p, warnings, &k("issuer"), s);
                s.to_owned()
            }
            None => {
                p.add(&k("issuer"), "required");
                String::new()
            }
        };
        let discovery_url = match iss.discovery_url.as_deref() {
            Some(s) => http_url(p, warnings, &k("discovery_url"), s),
            None if !issuer.is_empty() => Url::parse(&format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            ))
            .ok(),
            None => None,
        };
        let introspection_endpoint = iss
            .introspection_endpoint
            .as_deref()
            .and_then(|s| http_url(p, warnings, &k("introspection_endpoint"), s));
        let client_auth = match iss.client_auth.as_str() {
            "client_secret_basic" => ClientAuthMethod::ClientSecretBasic,
            "client_secret_post" => ClientAuthMethod::ClientSecretPost,
            "bearer" => ClientAuthMethod::Bearer,
            other => {
                p.add(
                    &k("client_auth"),
                    format!(
                        "{other:?} is not one of client_secret_basic, client_secret_post, bearer"
                    ),
                );
                ClientAuthMethod::ClientSecretBasic
            }
        };
        let mode = match iss.mode.as_str() {
            "introspection" => VerifyMode::Introspection,
            "jwt" => VerifyMode::Jwt,
            "auto" => VerifyMode::Auto,
            other => {
                p.add(
                    &k("mode"),
                    format!("{other:?} is not one of introspection, jwt, auto"),
                );
                VerifyMode::Introspection
            }
        };
        let introspects = mode != VerifyMode::Jwt || iss.introspect_jwts;
        if introspects && client_auth != ClientAuthMethod::Bearer && iss.client_id.is_none() {
            p.add(
                &k("client_id"),
                format!("required with client_auth = {:?}", iss.client_auth),
            );
        }
        let secret = secret::resolve(
            p,
            &k("client_secret"),
            iss.client_secret.as_deref(),
            iss.client_secret_file.as_deref(),
            introspects,
        );
        let timeout = duration(p, &k("timeout"), &iss.timeout);
        if timeout.is_zero() {
            p.add(&k("timeout"), "must be greater than zero");
        }
        let metadata_refresh = duration(p, &k("metadata_refresh"), &iss.metadata_refresh);
        if metadata_refresh < Duration::from_secs(1) {
            p.add(&k("metadata_refresh"), "must be at least 1s");
        }
        if iss.access_token_types.is_empty() {
            p.add(
                &k("access_token_types"),
                "must list at least one token type",
            );
        }
        if iss
            .access_token_types
            .iter()
            .any(|t| t.eq_ignore_ascii_case("refresh_token"))
        {
            p.add(&k("access_token_types"), "must not accept refresh_token");
        }
        if iss.max_response_bytes < 1024 {
            p.add(&k("max_response_bytes"), "must be at least 1024");
        }
        if iss.max_concurrent_introspections == 0 {
            p.add(&k("max_concurrent_introspections"), "must be at least 1");
        }
        let jwt = (mode != VerifyMode::Introspection).then(|| jwt_settings(p, warnings, &k, iss));
        if let Some(discovery_url) = discovery_url {
            issuers.push(Issuer {
                mode,
                jwt,
                issuer,
                discovery_url,
                introspection_endpoint,
                client_id: iss.client_id.clone(),
                client_auth,
                client_secret: secret,
                timeout,
                max_response_bytes: iss.max_response_bytes,
                max_concurrent_introspections: iss.max_concurrent_introspections,
                introspection_queue: iss.introspection_queue,
                metadata_refresh,
                access_token_types: iss.access_token_types.clone(),
                require_token_type: iss.require_token_type,
                logout_audiences: iss
                    .client_id
                    .iter()
                    .chain(iss.logout_audiences.iter())
                    .cloned()
                    .collect(),
            });
        }
    }
    if issuers.len() > 1 {
        for (i, a) in issuers.iter().enumerate() {
            if issuers[..i].iter().any(|b| b.issuer == a.issuer) {
                p.add(&format!("issuers[{i}].issuer"), "configured twice");
            }
        }
    }

    issuers
}

fn jwt_settings(
    p: &mut Problems,
    warnings: &mut Vec<String>,
    k: &dyn Fn(&str) -> String,
    iss: &file::IssuerFile,
) -> JwtSettings {
    use jsonwebtoken::Algorithm;
    if iss.audiences.is_empty() {
        p.add(
            &k("audiences"),
            "required with mode jwt or auto: the `aud` a JWT must carry",
        );
    }
    let hmac_secret = secret::resolve(
        p,
        &k("hmac_secret"),
        iss.hmac_secret.as_deref(),
        iss.hmac_secret_file.as_deref(),
        false,
    );
    let mut algorithms = Vec::new();
    for (j, name) in iss.algorithms.iter().enumerate() {
        let key = k(&format!("algorithms[{j}]"));
        match name.parse::<Algorithm>() {
            Ok(alg @ (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)) => {
                if hmac_secret.is_none() {
                    p.add(
                        &key,
                        format!("{name} needs `hmac_secret` (HMAC is refused otherwise)"),
                    );
                }
                algorithms.push(alg);
            }
            Ok(alg) => algorithms.push(alg),
            Err(_) => p.add(
                &key,
                format!("{name:?} is not a supported JWS algorithm (\"none\" never is)"),
            ),
        }
    }
    if iss.algorithms.is_empty() {
        p.add(&k("algorithms"), "must list at least one algorithm");
    }
    if iss.token_types.is_empty() {
        p.add(&k("token_types"), "must list at least one `typ`");
    }
    let token_types = iss.token_types.iter().map(|t| normalize_typ(t)).collect();
    let jwks_uri = iss
        .jwks_uri
        .as_deref()
        .and_then(|u| http_url(p, warnings, &k("jwks_uri"), u));
    let refresh_min = duration(p, &k("jwks_refresh_min"), &iss.jwks_refresh_min);
    let refresh_max = duration(p, &k("jwks_refresh_max"), &iss.jwks_refresh_max);
    if refresh_min > refresh_max {
        p.add(&k("jwks_refresh_min"), "must not exceed jwks_refresh_max");
    }
    if refresh_min < Duration::from_secs(1) {
        p.add(&k("jwks_refresh_min"), "must be at least 1s");
    }
    JwtSettings {
        audiences: iss.audiences.clone(),
        algorithms,
        token_types,
        leeway: duration(p, &k("leeway"), &iss.leeway),
        hmac_secret,
        jwks_uri,
        refresh_min,
        refresh_max,
        refetch_interval: duration(p, &k("jwks_refetch_interval"), &iss.jwks_refetch_interval),
        introspect: iss.introspect_jwts,
    }
}

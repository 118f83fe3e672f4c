//! The small sections: `[auth]` (token extraction and user mapping), `[cache]`,
//! `[identity_headers]`, `[admin]` and `[log]`.

use super::Check;
use crate::config::parse::{duration, header_name};
use crate::config::{
    file, secret, AuthPolicy, CachePolicy, GuestEndpoints, IdentityHeaders, LogFormat, LogSettings,
    Secret,
};

/// Validates `[auth]`.
pub(super) fn auth(f: &file::AuthFile, c: &mut Check) -> Option<AuthPolicy> {
    let p = &mut c.p;
    if f.max_token_length < 16 {
        p.add("auth.max_token_length", "must be at least 16");
    }
    if f.new_tokens_per_address > 0 && f.new_tokens_burst == 0 {
        p.add(
            "auth.new_tokens_burst",
            "must be at least 1 while auth.new_tokens_per_address is set",
        );
    }
    if f.new_tokens_per_address > 1_000_000 {
        p.add(
            "auth.new_tokens_per_address",
            "must be at most 1000000 (0 turns the budget off)",
        );
    }
    if f.user_id_claims.is_empty() {
        p.add("auth.user_id_claims", "must name at least one claim");
    }
    let guest_endpoints = match f.guest_endpoints.as_str() {
        "spec" => GuestEndpoints::Spec,
        "synapse" => GuestEndpoints::Synapse,
        other => {
            p.add(
                "auth.guest_endpoints",
                format!("{other:?} is not one of spec, synapse"),
            );
            GuestEndpoints::Spec
        }
    };
    Some(AuthPolicy {
        allow_query_token: f.allow_query_token,
        max_token_length: f.max_token_length,
        user_id_claims: f.user_id_claims.clone(),
        guest_endpoints,
        retry_after_secs: f.retry_after_secs,
        new_tokens_per_address: f.new_tokens_per_address,
        new_tokens_burst: f.new_tokens_burst,
    })
}

/// Validates `[cache]`.
pub(super) fn cache(f: &file::CacheFile, c: &mut Check) -> Option<CachePolicy> {
    let p = &mut c.p;
    let max_ttl = duration(p, "cache.max_ttl", &f.max_ttl);
    let negative_ttl = duration(p, "cache.negative_ttl", &f.negative_ttl);
    if negative_ttl > max_ttl {
        p.add("cache.negative_ttl", "must not exceed cache.max_ttl");
    }
    if f.capacity == 0 {
        p.add("cache.capacity", "must be at least 1");
    }
    Some(CachePolicy {
        max_ttl,
        negative_ttl,
        capacity: f.capacity,
    })
}

/// Headers no identity header may be named after (lower case, `-` for `_`): the request's
/// framing and routing, the upstream credential, and what the gateway sets itself.
const RESERVED_HEADERS: [&str; 15] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "content-type",
];

/// Validates `[identity_headers]`.
pub(super) fn identity_headers(
    h: &file::IdentityHeadersFile,
    c: &mut Check,
) -> Option<IdentityHeaders> {
    let p = &mut c.p;
    let headers = IdentityHeaders {
        user_id: header_name(p, "identity_headers.user_id", &h.user_id),
        device_id: header_name(p, "identity_headers.device_id", &h.device_id),
        scope: header_name(p, "identity_headers.scope", &h.scope),
        guest: header_name(p, "identity_headers.guest", &h.guest),
        subject: header_name(p, "identity_headers.subject", &h.subject),
        signature: header_name(p, "identity_headers.signature", &h.signature),
        signing_secret: secret::resolve(
            p,
            "identity_headers.signing_secret",
            h.signing_secret.as_deref(),
            h.signing_secret_file.as_deref(),
            false,
        ),
        also_strip: h
            .also_strip
            .iter()
            .enumerate()
            .map(|(i, s)| header_name(p, &format!("identity_headers.also_strip[{i}]"), s))
            .collect(),
    };
    // A name the gateway or HTTP's framing owns would be overwritten by an identity value
    // (`Transfer-Encoding: @alice:…` desynchronises the pooled homeserver connection) or
    // stripped from every request (`Host`); the same spellings `strip` folds together.
    let fixed = [
        ("identity_headers.user_id", &headers.user_id),
        ("identity_headers.device_id", &headers.device_id),
        ("identity_headers.scope", &headers.scope),
        ("identity_headers.guest", &headers.guest),
        ("identity_headers.subject", &headers.subject),
        ("identity_headers.signature", &headers.signature),
    ];
    let also = headers
        .also_strip
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("identity_headers.also_strip[{i}]"), n));
    for (key, name) in fixed
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .chain(also)
    {
        if RESERVED_HEADERS
            .iter()
            .any(|r| crate::gateway::headers::same_folded(name.as_str(), r))
        {
            p.add(
                &key,
                format!(
                    "{:?} is a header the gateway or HTTP itself sets; choose another name",
                    name.as_str()
                ),
            );
        }
    }
    if let Some(s) = &headers.signing_secret {
        if s.expose().len() < 32 {
            p.add(
                "identity_headers.signing_secret",
                "must be at least 32 bytes",
            );
        }
    }
    Some(headers)
}

/// Validates `[admin]`: the admin API's token (the API is off without one).
pub(super) fn admin(f: &file::AdminFile, c: &mut Check) -> Option<Secret> {
    let p = &mut c.p;
    let token = secret::resolve(
        p,
        "admin.token",
        f.token.as_deref(),
        f.token_file.as_deref(),
        false,
    );
    if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        p.add("admin.token", "must be at least 16 characters");
    }
    token
}

/// Validates `[log]`.
pub(super) fn log(f: &file::LogFile, c: &mut Check) -> Option<LogSettings> {
    let p = &mut c.p;
    let format = match f.format.as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            p.add(
                "log.format",
                format!("{other:?} is not one of pretty, json"),
            );
            LogFormat::Pretty
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&f.level).is_err() {
        p.add(
            "log.level",
            format!("{:?} is not a tracing filter", f.level),
        );
    }
    Some(LogSettings {
        format,
        level: f.level.clone(),
    })
}

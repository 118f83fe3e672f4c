//! `[compat]`: legacy login (MSC3824 compatibility). The OP client defaults to the primary
//! issuer's; the allow-list takes URL prefixes, custom schemes included (mobile clients come
//! back through `app.scheme:/path`).

use url::Url;

use super::Check;
use crate::config::parse::duration;
use crate::config::{file, secret, Compat, PasswordLogin};

/// Validates `[compat]`; `None` when it is off (or on and invalid, with the problems added).
pub(super) fn compat(
    f: &file::CompatFile,
    primary: Option<&file::IssuerFile>,
    c: &mut Check,
) -> Option<Compat> {
    let p = &mut c.p;
    let login_token_ttl = duration(p, "compat.login_token_ttl", &f.login_token_ttl);
    let sso_timeout = duration(p, "compat.sso_timeout", &f.sso_timeout);
    let session_lifetime = duration(p, "compat.session_lifetime", &f.session_lifetime);
    let access_token_ttl = duration(p, "compat.access_token_ttl", &f.access_token_ttl);
    let grant_check_interval = duration(p, "compat.grant_check_interval", &f.grant_check_interval);
    for (key, d) in [
        ("compat.grant_check_interval", grant_check_interval),
        ("compat.login_token_ttl", login_token_ttl),
        ("compat.sso_timeout", sso_timeout),
        ("compat.access_token_ttl", access_token_ttl),
    ] {
        if d.is_zero() {
            p.add(key, "must be greater than zero");
        }
    }
    if access_token_ttl > session_lifetime {
        p.add(
            "compat.access_token_ttl",
            "must not exceed compat.session_lifetime",
        );
    }
    for (key, n) in [
        (
            "compat.password_attempts_per_user",
            f.password_attempts_per_user,
        ),
        (
            "compat.password_attempts_per_address",
            f.password_attempts_per_address,
        ),
    ] {
        if f.password_login && n == 0 {
            p.add(
                key,
                "must be at least 1 (turn password_login off to refuse every password)",
            );
        }
    }
    for (i, scope) in f.extra_scopes.iter().enumerate() {
        // RFC 6749 §3.3 scope tokens; the Matrix scopes are the gateway's to ask for.
        let token_ok = !scope.is_empty()
            && scope
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b));
        if !token_ok {
            p.add(
                &format!("compat.extra_scopes[{i}]"),
                format!("{scope:?} is not a scope token (RFC 6749 §3.3)"),
            );
        } else if scope.starts_with("urn:matrix:") {
            p.add(
                &format!("compat.extra_scopes[{i}]"),
                "Matrix scopes are the gateway's: it asks for the API and the device itself",
            );
        }
    }
    let password = f.password_login.then_some(PasswordLogin {
        per_user_per_minute: f.password_attempts_per_user,
        per_address_per_minute: f.password_attempts_per_address,
    });
    let mut redirect_allowlist = Vec::new();
    for (i, entry) in f.redirect_allowlist.iter().enumerate() {
        let key = format!("compat.redirect_allowlist[{i}]");
        match Url::parse(entry) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_none() => {
                p.add(&key, format!("{entry:?} has no host"));
            }
            Ok(u) if u.query().is_some() || u.fragment().is_some() => {
                p.add(
                    &key,
                    format!("{entry:?}: a prefix has no query or fragment"),
                );
            }
            Ok(u) => redirect_allowlist.push(u),
            Err(e) => p.add(&key, format!("{entry:?} is not a URL ({e})")),
        }
    }
    let client_id = f
        .client_id
        .clone()
        .or_else(|| primary.and_then(|i| i.client_id.clone()));
    let own_secret = f.client_secret.is_some() || f.client_secret_file.is_some();
    let secret = if own_secret {
        secret::resolve(
            p,
            "compat.client_secret",
            f.client_secret.as_deref(),
            f.client_secret_file.as_deref(),
            f.enabled,
        )
    } else if f.enabled {
        // The issuer's own validation reports its secret's problems: not twice.
        primary.and_then(|i| {
            secret::resolve(
                &mut Default::default(),
                "issuers[0].client_secret",
                i.client_secret.as_deref(),
                i.client_secret_file.as_deref(),
                false,
            )
        })
    } else {
        None
    };
    if !f.enabled {
        return None;
    }
    if client_id.is_none() {
        p.add(
            "compat.client_id",
            "required: the OP client the gateway signs legacy clients in with (no issuer client_id to default to)",
        );
    }
    if secret.is_none() {
        p.add(
            "compat.client_secret",
            "required: the gateway is a confidential client at the OP (no issuer client_secret to default to)",
        );
    }
    Some(Compat {
        client_id: client_id?,
        client_secret: secret?,
        redirect_allowlist,
        login_token_ttl,
        sso_timeout,
        session_lifetime,
        access_token_ttl,
        extra_scopes: f.extra_scopes.clone(),
        grant_check_interval,
        password,
    })
}

//! The verified identity of a request, and the MSC2967 rules that produce it from token claims:
//! API scopes (stable and unstable), the device scope, and the Matrix user-ID mapping.
//!
//! Pure functions only; no I/O. Both token kinds (introspection answers today, JWTs later) go
//! through [`Claims`] → [`build_identity`].

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::error::{MappingFailure, RejectReason};

/// Full client-server API access (stable).
pub const SCOPE_API: &str = "urn:matrix:client:api:*";
/// Full client-server API access (MSC2967 unstable prefix).
pub const SCOPE_API_UNSTABLE: &str = "urn:matrix:org.matrix.msc2967.client:api:*";
/// Guest access (gateway-defined, see `docs/scopes.md`).
pub const SCOPE_GUEST: &str = "urn:matrix:client:api:guest";
/// Guest access, unstable spelling.
pub const SCOPE_GUEST_UNSTABLE: &str = "urn:matrix:org.matrix.msc2967.client:api:guest";
/// Device scope prefix (stable).
pub const DEVICE_PREFIX: &str = "urn:matrix:client:device:";
/// Device scope prefix (unstable).
pub const DEVICE_PREFIX_UNSTABLE: &str = "urn:matrix:org.matrix.msc2967.client:device:";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Access {
    /// `urn:matrix:client:api:*`: the whole client-server API.
    Full,
    /// Only the guest scope: the guest endpoint list.
    Guest,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// `@localpart:server_name`.
    pub user_id: String,
    /// The device from `device_id` or the device scope; `None` when the token names none.
    pub device_id: Option<String>,
    /// The granted scope, as the OP sent it.
    pub scope: String,
    /// Full or guest access.
    pub access: Access,
    /// The issuer that vouched for the token (as configured). Subjects and sessions are only
    /// unique per issuer: see [`Identity::subject_key`].
    #[serde(default)]
    pub issuer: std::sync::Arc<str>,
    /// The OIDC subject.
    pub subject: String,
    /// The OP session (`sid`), when known.
    pub session_id: Option<String>,
    /// When the token stops being valid (Unix ms), when known.
    pub expires_at_ms: Option<u64>,
    /// The token's `jti`, when known (for targeted purges).
    pub token_id: Option<String>,
    /// When the token was issued (Unix ms): `iat`, else when the OP first vouched for it.
    /// Revocations of a subject, user or device apply to tokens issued before them.
    pub issued_at_ms: u64,
}

/// Separates the issuer from the value in an issuer-scoped key (a control character no issuer
/// URL contains).
pub const ISSUER_SEP: char = '\u{1f}';

/// `issuer␟value`: how subjects and OP sessions are keyed in pins, revocations and the
/// session index, so that two issuers' equal `sub` or `sid` never meet.
pub fn issuer_scoped(issuer: &str, value: &str) -> String {
    let mut k = String::with_capacity(issuer.len() + value.len() + 1);
    k.push_str(issuer);
    k.push(ISSUER_SEP);
    k.push_str(value);
    k
}

impl Identity {
    /// The issuer-scoped subject: the identity's owner key for user-ID pins.
    pub fn subject_key(&self) -> String {
        issuer_scoped(&self.issuer, &self.subject)
    }

    /// Whether `key` is this identity's [`Identity::subject_key`] (no allocation: the pin check
    /// runs on every request).
    pub fn owns_subject_key(&self, key: &str) -> bool {
        key.strip_prefix(&*self.issuer)
            .and_then(|rest| rest.strip_prefix(ISSUER_SEP))
            .is_some_and(|sub| sub == self.subject)
    }

    /// The issuer-scoped OP session, when known.
    pub fn session_key(&self) -> Option<String> {
        self.session_id
            .as_deref()
            .map(|sid| issuer_scoped(&self.issuer, sid))
    }
}

/// What the scope string grants.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScopeGrant {
    /// Full API scope present (either spelling).
    pub full: bool,
    /// Guest scope present (either spelling).
    pub guest: bool,
    /// Distinct device IDs named by device scopes (both spellings merged).
    pub devices: BTreeSet<String>,
}

/// Parses a space-separated scope (RFC 6749 §3.3).
pub fn parse_scope(scope: &str) -> ScopeGrant {
    let mut g = ScopeGrant::default();
    for token in scope.split(' ').filter(|t| !t.is_empty()) {
        match token {
            SCOPE_API | SCOPE_API_UNSTABLE => g.full = true,
            SCOPE_GUEST | SCOPE_GUEST_UNSTABLE => g.guest = true,
            _ => {
                if let Some(id) = token
                    .strip_prefix(DEVICE_PREFIX)
                    .or_else(|| token.strip_prefix(DEVICE_PREFIX_UNSTABLE))
                {
                    g.devices.insert(id.to_owned());
                }
            }
        }
    }
    g
}

/// A device ID must be 1..=255 characters from the RFC 6749 scope set
/// (`%x21 / %x23-5B / %x5D-7E`): it has to round-trip through a scope token.
pub fn valid_device_id(id: &str) -> bool {
    (1..=255).contains(&id.len())
        && id
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// The Matrix user-ID localpart grammar: `a-z 0-9 . _ = - / +`, non-empty.
pub fn valid_localpart(lp: &str) -> bool {
    !lp.is_empty()
        && lp
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b))
}

/// The claims of a verified token that identity mapping reads.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// The configured issuer that verified these claims.
    pub issuer: std::sync::Arc<str>,
    /// `sub`.
    pub sub: Option<String>,
    /// `scope` (space-separated).
    pub scope: String,
    /// An explicit `device_id` (MAS); wins over the device scope.
    pub device_id: Option<String>,
    /// `sid`.
    pub sid: Option<String>,
    /// Absolute expiry in Unix ms, from `exp` / `expires_in`.
    pub expires_at_ms: Option<u64>,
    /// Issue time in Unix ms (see [`Identity::issued_at_ms`]).
    pub issued_at_ms: u64,
    /// Every claim by name, for the configurable user-ID claim order.
    pub all: Map<String, Value>,
}

/// Why identity mapping failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// The token is refused (401).
    Reject(RejectReason),
    /// The OP's claims are unusable (500).
    Mapping(MappingFailure),
}

/// Applies the MSC2967 scope, device and user-ID rules to verified claims.
pub fn build_identity(
    claims: &Claims,
    user_id_claims: &[String],
    server_name: &str,
) -> Result<Identity, IdentityError> {
    let grant = parse_scope(&claims.scope);
    let access = if grant.full {
        Access::Full
    } else if grant.guest {
        Access::Guest
    } else {
        return Err(IdentityError::Reject(RejectReason::NoApiScope));
    };
    let device_id = match &claims.device_id {
        Some(explicit) => Some(explicit.clone()),
        None => {
            if grant.devices.len() > 1 {
                return Err(IdentityError::Reject(RejectReason::MultipleDevices));
            }
            grant.devices.into_iter().next()
        }
    };
    if let Some(d) = &device_id {
        if !valid_device_id(d) {
            return Err(IdentityError::Reject(RejectReason::InvalidDevice));
        }
    }
    // A `sub` with control characters (the issuer-scoping separator among them) is no
    // subject the gateway can key on.
    let subject = claims
        .sub
        .clone()
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
        .ok_or(IdentityError::Reject(RejectReason::NoSubject))?;
    let localpart = user_id_claims
        .iter()
        .find_map(|name| claims.all.get(name).and_then(Value::as_str))
        .ok_or(IdentityError::Mapping(MappingFailure::MissingClaim))?;
    if !valid_localpart(localpart) {
        return Err(IdentityError::Mapping(MappingFailure::InvalidLocalpart));
    }
    let user_id = format!("@{localpart}:{server_name}");
    if user_id.len() > 255 {
        return Err(IdentityError::Mapping(MappingFailure::InvalidLocalpart));
    }
    Ok(Identity {
        user_id,
        device_id,
        scope: claims.scope.clone(),
        access,
        issuer: claims.issuer.clone(),
        subject,
        session_id: claims.sid.clone(),
        expires_at_ms: claims.expires_at_ms,
        token_id: None,
        issued_at_ms: claims.issued_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(scope: &str, extra: Value) -> Claims {
        let mut all = Map::new();
        all.insert("sub".into(), json!("sub-1"));
        if let Value::Object(m) = extra {
            all.extend(m);
        }
        Claims {
            sub: all.get("sub").and_then(Value::as_str).map(str::to_owned),
            scope: scope.to_owned(),
            device_id: all
                .get("device_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            all,
            ..Claims::default()
        }
    }

    fn build(c: &Claims) -> Result<Identity, IdentityError> {
        build_identity(c, &["username".into(), "sub".into()], "example.org")
    }

    #[test]
    fn stable_and_unstable_api_scopes_grant_full_access() {
        for s in [SCOPE_API, SCOPE_API_UNSTABLE] {
            let id = build(&claims(s, json!({"username": "alice"}))).unwrap();
            assert_eq!(id.access, Access::Full);
            assert_eq!(id.user_id, "@alice:example.org");
            assert_eq!(id.device_id, None);
        }
    }

    #[test]
    fn guest_scope_alone_is_guest_and_full_wins_over_guest() {
        let g = build(&claims(SCOPE_GUEST_UNSTABLE, json!({"username": "g"}))).unwrap();
        assert_eq!(g.access, Access::Guest);
        let both = format!("{SCOPE_GUEST} {SCOPE_API}");
        assert_eq!(
            build(&claims(&both, json!({"username": "g"})))
                .unwrap()
                .access,
            Access::Full
        );
    }

    #[test]
    fn no_api_scope_is_rejected() {
        for s in [
            "openid",
            "",
            "urn:matrix:client:device:ABCDEFGHIJ",
            "urn:synapse:admin:*",
        ] {
            assert_eq!(
                build(&claims(s, json!({"username": "a"}))),
                Err(IdentityError::Reject(RejectReason::NoApiScope)),
                "{s}"
            );
        }
    }

    #[test]
    fn device_scope_either_spelling_counts_once() {
        let s = format!("{SCOPE_API} {DEVICE_PREFIX}ABCDEFGHIJ {DEVICE_PREFIX_UNSTABLE}ABCDEFGHIJ");
        let id = build(&claims(&s, json!({"username": "a"}))).unwrap();
        assert_eq!(id.device_id.as_deref(), Some("ABCDEFGHIJ"));
    }

    #[test]
    fn two_different_devices_are_rejected() {
        let s = format!("{SCOPE_API} {DEVICE_PREFIX}AAAAAAAAAA {DEVICE_PREFIX_UNSTABLE}BBBBBBBBBB");
        assert_eq!(
            build(&claims(&s, json!({"username": "a"}))),
            Err(IdentityError::Reject(RejectReason::MultipleDevices))
        );
    }

    #[test]
    fn explicit_device_id_wins_over_scope() {
        let s = format!("{SCOPE_API} {DEVICE_PREFIX}AAAAAAAAAA {DEVICE_PREFIX}BBBBBBBBBB");
        let id = build(&claims(
            &s,
            json!({"username": "a", "device_id": "EXPLICIT"}),
        ))
        .unwrap();
        assert_eq!(id.device_id.as_deref(), Some("EXPLICIT"));
    }

    #[test]
    fn device_id_rules() {
        assert!(valid_device_id("A"));
        assert!(valid_device_id(&"x".repeat(255)));
        assert!(valid_device_id("a!#[]~:@/"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id(&"x".repeat(256)));
        assert!(!valid_device_id("has space"));
        assert!(!valid_device_id("quote\""));
        assert!(!valid_device_id("back\\slash"));
        assert!(!valid_device_id("é"));
        let s = format!("{SCOPE_API} {DEVICE_PREFIX}");
        assert_eq!(
            build(&claims(&s, json!({"username": "a"}))),
            Err(IdentityError::Reject(RejectReason::InvalidDevice))
        );
    }

    #[test]
    fn localpart_grammar() {
        for ok in ["alice", "a.b_c=d-e/f+g", "0"] {
            assert!(valid_localpart(ok), "{ok}");
        }
        for bad in ["", "Alice", "a b", "a:b", "@a", "ä", "a\u{0}"] {
            assert!(!valid_localpart(bad), "{bad:?}");
        }
    }

    #[test]
    fn claim_order_and_mapping_failures() {
        // username wins over sub
        let id = build(&claims(SCOPE_API, json!({"username": "bob"}))).unwrap();
        assert_eq!(id.user_id, "@bob:example.org");
        // falls back to sub
        let mut c = claims(SCOPE_API, json!({}));
        c.all.insert("sub".into(), json!("carol"));
        assert_eq!(build(&c).unwrap().user_id, "@carol:example.org");
        // invalid localpart is a mapping failure (500), not a 401
        assert_eq!(
            build(&claims(SCOPE_API, json!({"username": "Bad Name"}))),
            Err(IdentityError::Mapping(MappingFailure::InvalidLocalpart))
        );
        // no usable claim at all
        let only = build_identity(
            &claims(SCOPE_API, json!({})),
            &["preferred_username".into()],
            "x",
        );
        assert_eq!(
            only,
            Err(IdentityError::Mapping(MappingFailure::MissingClaim))
        );
        // a non-string claim does not count
        let num = build_identity(&claims(SCOPE_API, json!({"uid": 5})), &["uid".into()], "x");
        assert_eq!(
            num,
            Err(IdentityError::Mapping(MappingFailure::MissingClaim))
        );
    }

    #[test]
    fn too_long_user_id_is_a_mapping_failure() {
        let lp = "a".repeat(250);
        assert_eq!(
            build(&claims(SCOPE_API, json!({"username": lp}))),
            Err(IdentityError::Mapping(MappingFailure::InvalidLocalpart))
        );
    }

    #[test]
    fn missing_subject_is_rejected() {
        let mut c = claims(SCOPE_API, json!({"username": "a"}));
        c.sub = None;
        assert_eq!(
            build(&c),
            Err(IdentityError::Reject(RejectReason::NoSubject))
        );
    }

    #[test]
    fn subject_keys_are_issuer_scoped() {
        let mut id = build(&claims(SCOPE_API, json!({"username": "alice"}))).unwrap();
        id.issuer = "https://op-a".into();
        assert!(id.owns_subject_key(&id.subject_key()));
        assert!(id.owns_subject_key(&issuer_scoped("https://op-a", "sub-1")));
        assert!(!id.owns_subject_key(&issuer_scoped("https://op-b", "sub-1")));
        assert!(!id.owns_subject_key(&issuer_scoped("https://op-a", "sub-10")));
        assert!(!id.owns_subject_key("sub-1"), "a bare, unscoped subject");
        assert!(!id.owns_subject_key(&issuer_scoped("https://op-a\u{1f}sub", "1")));
    }
}

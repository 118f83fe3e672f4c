//! The verified identity of a request, and the MSC2967 rules that produce it from token claims:
//! API scopes (stable and unstable), the device scope, and the Matrix user-ID mapping.
//!
//! Pure functions only; no I/O. Both token kinds (introspection answers today, JWTs later) go
//! through [`Claims`] → [`build_identity`].

use std::collections::BTreeSet;
use std::sync::Arc;

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

/// A verified caller, as the request path and the cache hold it: the per-token strings
/// (user, device, subject, OP session, `jti`) in one buffer, the issuer and the scope shared
/// with every other identity that has the same ones (see [`intern_scope`]). About 200 bytes
/// on the heap for a typical identity, against about 400 for six separate `String`s. Its
/// serialised form (the shared cache's) is [`IdentityParts`], unchanged.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "IdentityParts", into = "IdentityParts")]
pub struct Identity {
    /// `user_id`, `device_id`, `subject`, `session_id`, `token_id`, back to back.
    text: Box<str>,
    /// Where each of them ends in `text`.
    ends: [u32; 5],
    /// Which of the optional ones are present (bits: device, session, token ID), and whether
    /// `scope` is a template.
    present: u8,
    /// The scope as the OP sent it, the device scope token's ID replaced by [`DEVICE_MARK`]
    /// when it is this identity's device (so that equal grants share one string).
    scope: Arc<str>,
    /// Full or guest access.
    pub access: Access,
    /// The issuer that vouched for the token (as configured). Subjects and sessions are only
    /// unique per issuer: see [`Identity::subject_key`].
    pub issuer: Arc<str>,
    /// When the token stops being valid (Unix ms), when known.
    pub expires_at_ms: Option<u64>,
    /// When the token was issued (Unix ms): `iat`, else when the OP first vouched for it.
    /// Revocations of a subject, user or device apply to tokens issued before them.
    pub issued_at_ms: u64,
}

/// A verified caller's parts: what builds an [`Identity`], and its serialised form.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityParts {
    /// `@localpart:server_name`.
    pub user_id: String,
    /// The device from `device_id` or the device scope; `None` when the token names none.
    pub device_id: Option<String>,
    /// The granted scope, as the OP sent it.
    pub scope: String,
    /// Full or guest access.
    pub access: Access,
    /// The issuer that vouched for the token.
    #[serde(default)]
    pub issuer: Arc<str>,
    /// The OIDC subject.
    pub subject: String,
    /// The OP session (`sid`), when known.
    pub session_id: Option<String>,
    /// When the token stops being valid (Unix ms), when known.
    pub expires_at_ms: Option<u64>,
    /// The token's `jti`, when known (for targeted purges).
    pub token_id: Option<String>,
    /// When the token was issued (Unix ms).
    pub issued_at_ms: u64,
}

/// Stands for the identity's own device ID inside an interned scope (a control character no
/// scope token may contain: RFC 6749 section 3.3).
const DEVICE_MARK: char = '\u{0}';
/// [`DEVICE_MARK`]'s one byte in UTF-8.
const DEVICE_MARK_BYTE: u8 = 0;
/// At most this many distinct scopes are shared; past it each identity keeps its own copy
/// (an OP minting a new scope per token must not grow the table without bound).
const MAX_INTERNED_SCOPES: usize = 4_096;

/// The shared copy of `scope` (a new one once the table is full).
fn intern_scope(scope: &str) -> Arc<str> {
    static SCOPES: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashSet<Arc<str>>>> =
        std::sync::LazyLock::new(Default::default);
    let mut table = SCOPES.lock();
    if let Some(shared) = table.get(scope) {
        return shared.clone();
    }
    let new: Arc<str> = Arc::from(scope);
    if table.len() < MAX_INTERNED_SCOPES {
        table.insert(new.clone());
    }
    new
}

/// `scope` with each device scope token naming `device` written as the prefix and
/// [`DEVICE_MARK`]; `None` when there is nothing to replace (or the scope already holds the
/// mark, so a replacement could not be undone).
fn scope_template(scope: &str, device: Option<&str>) -> Option<String> {
    let device = device?;
    if scope.contains(DEVICE_MARK) {
        return None;
    }
    let mut out = String::with_capacity(scope.len());
    let mut replaced = false;
    for (i, token) in scope.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let prefix = [DEVICE_PREFIX, DEVICE_PREFIX_UNSTABLE]
            .into_iter()
            .find(|p| token.strip_prefix(p) == Some(device));
        match prefix {
            Some(p) => {
                out.push_str(p);
                out.push(DEVICE_MARK);
                replaced = true;
            }
            None => out.push_str(token),
        }
    }
    replaced.then_some(out)
}

const HAS_DEVICE: u8 = 1;
const HAS_SESSION: u8 = 2;
const HAS_TOKEN_ID: u8 = 4;
/// `scope` is a template: [`DEVICE_MARK`] stands for the device ID.
const SCOPE_TEMPLATE: u8 = 8;

impl From<IdentityParts> for Identity {
    fn from(p: IdentityParts) -> Self {
        let optional = [&p.device_id, &p.session_id, &p.token_id];
        let len = p.user_id.len()
            + p.subject.len()
            + optional
                .iter()
                .map(|o| o.as_ref().map_or(0, String::len))
                .sum::<usize>();
        let mut text = String::with_capacity(len);
        let mut ends = [0u32; 5];
        let mut present = 0;
        let fields = [
            (Some(&p.user_id), 0),
            (p.device_id.as_ref(), HAS_DEVICE),
            (Some(&p.subject), 0),
            (p.session_id.as_ref(), HAS_SESSION),
            (p.token_id.as_ref(), HAS_TOKEN_ID),
        ];
        for (i, (value, bit)) in fields.into_iter().enumerate() {
            if let Some(v) = value {
                text.push_str(v);
                present |= bit;
            }
            // Token claims are bounded far below 4 GiB by the token length limit.
            ends[i] = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        let scope = match scope_template(&p.scope, p.device_id.as_deref()) {
            Some(template) => {
                present |= SCOPE_TEMPLATE;
                intern_scope(&template)
            }
            None => intern_scope(&p.scope),
        };
        Identity {
            text: text.into_boxed_str(),
            ends,
            present,
            scope,
            access: p.access,
            issuer: p.issuer,
            expires_at_ms: p.expires_at_ms,
            issued_at_ms: p.issued_at_ms,
        }
    }
}

impl From<Identity> for IdentityParts {
    fn from(id: Identity) -> Self {
        IdentityParts {
            user_id: id.user_id().to_owned(),
            device_id: id.device_id().map(str::to_owned),
            scope: id.scope().into_owned(),
            access: id.access,
            issuer: id.issuer.clone(),
            subject: id.subject().to_owned(),
            session_id: id.session_id().map(str::to_owned),
            expires_at_ms: id.expires_at_ms,
            token_id: id.token_id().map(str::to_owned),
            issued_at_ms: id.issued_at_ms,
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id())
            .field("device_id", &self.device_id())
            .field("scope", &self.scope())
            .field("access", &self.access)
            .field("issuer", &self.issuer)
            .field("subject", &self.subject())
            .field("session_id", &self.session_id())
            .field("expires_at_ms", &self.expires_at_ms)
            .field("token_id", &self.token_id())
            .field("issued_at_ms", &self.issued_at_ms)
            .finish()
    }
}

impl Identity {
    /// The `i`-th string of `text`.
    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    fn optional(&self, i: usize, bit: u8) -> Option<&str> {
        (self.present & bit != 0).then(|| self.part(i))
    }

    /// `@localpart:server_name`.
    pub fn user_id(&self) -> &str {
        self.part(0)
    }

    /// The device from `device_id` or the device scope; `None` when the token names none.
    pub fn device_id(&self) -> Option<&str> {
        self.optional(1, HAS_DEVICE)
    }

    /// The OIDC subject.
    pub fn subject(&self) -> &str {
        self.part(2)
    }

    /// The OP session (`sid`), when known.
    pub fn session_id(&self) -> Option<&str> {
        self.optional(3, HAS_SESSION)
    }

    /// The token's `jti`, when known (for targeted purges).
    pub fn token_id(&self) -> Option<&str> {
        self.optional(4, HAS_TOKEN_ID)
    }

    /// The granted scope, as the OP sent it.
    pub fn scope(&self) -> std::borrow::Cow<'_, str> {
        match self.device_id() {
            Some(device) if self.present & SCOPE_TEMPLATE != 0 => {
                // One allocation of the final size (`str::replace` grows its string as it goes;
                // this runs for every proxied request).
                let scope: &str = &self.scope;
                let marks = scope.bytes().filter(|&b| b == DEVICE_MARK_BYTE).count();
                let mut out = String::with_capacity(scope.len() + marks * device.len());
                let mut rest = scope;
                // The mark is one ASCII byte: every position found is a character boundary.
                while let Some(at) = rest.bytes().position(|b| b == DEVICE_MARK_BYTE) {
                    out.push_str(&rest[..at]);
                    out.push_str(device);
                    rest = &rest[at + 1..];
                }
                out.push_str(rest);
                out.into()
            }
            _ => std::borrow::Cow::Borrowed(&self.scope),
        }
    }

    /// The same identity with `parts` changed by `edit` (tests and the rare rewrite; the
    /// request path never calls it).
    pub fn edited(&self, edit: impl FnOnce(&mut IdentityParts)) -> Identity {
        let mut parts = IdentityParts::from(self.clone());
        edit(&mut parts);
        parts.into()
    }
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
        issuer_scoped(&self.issuer, self.subject())
    }

    /// Whether `key` is this identity's [`Identity::subject_key`] (no allocation: the pin check
    /// runs on every request).
    pub fn owns_subject_key(&self, key: &str) -> bool {
        key.strip_prefix(&*self.issuer)
            .and_then(|rest| rest.strip_prefix(ISSUER_SEP))
            .is_some_and(|sub| sub == self.subject())
    }

    /// The issuer-scoped OP session, when known.
    pub fn session_key(&self) -> Option<String> {
        self.session_id()
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
    pub issuer: Arc<str>,
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
    Ok(IdentityParts {
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
    }
    .into())
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
            assert_eq!(id.user_id(), "@alice:example.org");
            assert_eq!(id.device_id(), None);
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
        assert_eq!(id.device_id(), Some("ABCDEFGHIJ"));
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
        assert_eq!(id.device_id(), Some("EXPLICIT"));
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
        assert_eq!(id.user_id(), "@bob:example.org");
        // falls back to sub
        let mut c = claims(SCOPE_API, json!({}));
        c.all.insert("sub".into(), json!("carol"));
        assert_eq!(build(&c).unwrap().user_id(), "@carol:example.org");
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

    fn parts(device: Option<&str>, scope: &str) -> IdentityParts {
        IdentityParts {
            user_id: "@alice:example.org".into(),
            device_id: device.map(str::to_owned),
            scope: scope.into(),
            access: Access::Full,
            issuer: Arc::from("https://op-a"),
            subject: "sub-1".into(),
            session_id: Some("sid-1".into()),
            expires_at_ms: Some(9),
            token_id: None,
            issued_at_ms: 7,
        }
    }

    #[test]
    fn every_part_reads_back_as_given() {
        let cases = [
            (Some("DEV1"), "openid urn:matrix:client:api:* urn:matrix:client:device:DEV1"),
            // Order, the unstable spelling and odd spacing are kept.
            (Some("DEV1"), "urn:matrix:org.matrix.msc2967.client:device:DEV1  urn:matrix:client:api:*"),
            // Both spellings of the device, and a device scope naming another device (MAS
            // sends `device_id` explicitly).
            (
                Some("DEV1"),
                "urn:matrix:client:device:DEV1 urn:matrix:org.matrix.msc2967.client:device:DEV1 urn:matrix:client:device:OTHER urn:matrix:client:api:*",
            ),
            // A device ID that is a prefix of another's, or of a longer token.
            (Some("D"), "urn:matrix:client:device:DD urn:matrix:client:device:D urn:matrix:client:api:*"),
            (None, "urn:matrix:client:api:* urn:matrix:client:device:DEV1"),
            (Some("DEV1"), ""),
            // A scope holding the mark itself stays as sent.
            (Some("DEV1"), "urn:matrix:client:api:* urn:matrix:client:device:DEV1 x\u{0}y"),
        ];
        for (device, scope) in cases {
            let mut p = parts(device, scope);
            p.token_id = Some("jti-1".into());
            let id = Identity::from(p.clone());
            assert_eq!(IdentityParts::from(id.clone()), p, "{scope:?}");
            assert_eq!(id.scope(), scope);
            assert_eq!(id.device_id(), device);
            assert_eq!(id.user_id(), "@alice:example.org");
            assert_eq!(id.subject(), "sub-1");
            assert_eq!(id.session_id(), Some("sid-1"));
            assert_eq!(id.token_id(), Some("jti-1"));
        }
        // Absent and empty are told apart.
        let mut p = parts(None, "");
        p.session_id = Some(String::new());
        let id = Identity::from(p);
        assert_eq!((id.session_id(), id.token_id()), (Some(""), None));
    }

    #[test]
    fn identities_with_the_same_grant_share_one_scope() {
        let a = Identity::from(parts(
            Some("AAA"),
            "openid urn:matrix:client:api:* urn:matrix:client:device:AAA",
        ));
        let b = Identity::from(parts(
            Some("BBB"),
            "openid urn:matrix:client:api:* urn:matrix:client:device:BBB",
        ));
        assert!(Arc::ptr_eq(&a.scope, &b.scope));
        assert_ne!(a.scope(), b.scope());
    }

    #[test]
    fn the_serialised_form_is_the_parts() {
        // Replicas of an earlier version share the cache through Redis: the form must not
        // change.
        let p = parts(
            Some("DEV1"),
            "urn:matrix:client:api:* urn:matrix:client:device:DEV1",
        );
        let id = Identity::from(p.clone());
        let json = serde_json::to_value(&id).unwrap();
        assert_eq!(json, serde_json::to_value(&p).unwrap());
        assert_eq!(json["user_id"], "@alice:example.org");
        assert_eq!(
            json["scope"],
            "urn:matrix:client:api:* urn:matrix:client:device:DEV1"
        );
        let back: Identity = serde_json::from_value(json).unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn an_identity_is_small() {
        // The per-token part: the struct (in its `Arc`) and one string buffer.
        assert!(
            std::mem::size_of::<Identity>() <= 96,
            "{}",
            std::mem::size_of::<Identity>()
        );
    }
}

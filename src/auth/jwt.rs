//! RFC 9068 JWT access tokens, validated locally against the issuer's JWKS, hardened along
//! RFC 8725 (JWT BCP).
//!
//! - The issuer is chosen by the unverified `iss` *before* any key is used; only configured
//!   issuers in mode `jwt` or `auto` qualify.
//! - `kid` is only a lookup key into that issuer's published key set; `jku`, `x5u`, `x5c` and
//!   embedded `jwk` headers are never read.
//! - The algorithm must be on the issuer's allow-list **and** match the key's type (and the
//!   key's own `alg`, when it names one); `none` never parses, HMAC needs a configured secret.
//! - `typ` must be on the accepted list; ID tokens and logout tokens (`nonce`, `at_hash`,
//!   `events`) never pass; `aud` must hold a configured audience; `exp` is required; `exp`,
//!   `nbf` and `iat` are checked against the gateway clock with the configured leeway.
//! - Keys come from the issuer's [`KeyStore`] (`jwks.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::identity::Claims;
use super::jwks::{KeyLookup, KeyStore};
use super::op::OpClient;
use crate::clock::SharedClock;
use crate::config::{normalize_typ, JwtSettings};
use crate::error::{OpFailure, RejectReason};

/// Why a JWT was refused (all are 401 `M_UNKNOWN_TOKEN` to the client; logged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRejection {
    /// Not three base64url segments, or undecodable JSON.
    Malformed,
    /// `iss` names no configured JWT issuer.
    UnknownIssuer,
    /// Algorithm not allowed, or not matching the key.
    Algorithm,
    /// `typ` missing or not accepted.
    Type,
    /// No published key with that `kid` (after the allowed refetch).
    UnknownKey,
    /// Bad signature.
    Signature,
    /// `aud` holds no configured audience.
    Audience,
    /// `exp` passed, missing, or `nbf`/`iat` in the future.
    Time,
    /// Carries `nonce`, `at_hash` or `events`: an ID or logout token.
    NotAccessToken,
}

impl JwtRejection {
    /// Label for logs and metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            JwtRejection::Malformed => "malformed",
            JwtRejection::UnknownIssuer => "unknown_issuer",
            JwtRejection::Algorithm => "algorithm",
            JwtRejection::Type => "type",
            JwtRejection::UnknownKey => "unknown_key",
            JwtRejection::Signature => "signature",
            JwtRejection::Audience => "audience",
            JwtRejection::Time => "time",
            JwtRejection::NotAccessToken => "not_access_token",
        }
    }
}

/// The outcome of local JWT validation.
#[derive(Debug)]
pub enum JwtOutcome {
    /// Valid: the claims to map, and the `jti`.
    Valid(Box<Claims>, Option<String>),
    /// Refused.
    Rejected(JwtRejection),
    /// The keys could not be obtained (never loaded): 503.
    Unavailable(OpFailure),
}

/// Whether a token is shaped like a JWS compact serialisation (three base64url segments whose
/// header is a JSON object).
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !h.is_empty() && !p.is_empty() && h.starts_with("eyJ") && p.starts_with("eyJ")
}

pub(crate) fn b64(segment: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .ok()
}

/// The unverified `iss` of a JWT-shaped token (for routing only).
pub fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let v: Value = serde_json::from_slice(&b64(payload)?).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawHeader {
    pub(crate) alg: String,
    #[serde(default)]
    pub(crate) typ: Option<String>,
    #[serde(default)]
    pub(crate) kid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AccessClaims {
    sub: Option<String>,
    exp: Option<f64>,
    #[serde(default)]
    nbf: Option<f64>,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Value>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// One issuer's JWT access-token validator.
pub struct JwtIssuer {
    keys: Arc<KeyStore>,
    settings: JwtSettings,
    clock: SharedClock,
    /// The issuer identifier, shared by every identity it vouches for.
    name: Arc<str>,
}

impl JwtIssuer {
    /// A validator using `keys` (the issuer's key store) and `settings`.
    pub fn new(keys: Arc<KeyStore>, settings: JwtSettings, clock: SharedClock) -> Self {
        let name = Arc::from(keys.issuer());
        Self {
            keys,
            settings,
            clock,
            name,
        }
    }

    /// The issuer identifier.
    pub fn issuer(&self) -> &str {
        self.keys.issuer()
    }

    /// The issuer's OP client.
    pub fn op(&self) -> &Arc<OpClient> {
        self.keys.op()
    }

    /// The issuer's key store.
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Whether a key set has been loaded.
    pub fn keys_loaded(&self) -> bool {
        self.keys.loaded()
    }

    /// Validates one JWT of this issuer.
    pub async fn validate(&self, token: &str) -> JwtOutcome {
        use JwtRejection as R;
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            return JwtOutcome::Rejected(R::Malformed);
        };
        let Some(header) = b64(h).and_then(|b| serde_json::from_slice::<RawHeader>(&b).ok()) else {
            return JwtOutcome::Rejected(R::Malformed);
        };
        // `none` and anything unknown fail to parse here.
        let Ok(alg) = header.alg.parse::<Algorithm>() else {
            return JwtOutcome::Rejected(R::Algorithm);
        };
        if !self.settings.algorithms.contains(&alg) {
            return JwtOutcome::Rejected(R::Algorithm);
        }
        // An empty entry in `token_types` admits tokens without `typ` (Okta).
        let typ = header.typ.as_deref().map(normalize_typ).unwrap_or_default();
        let typ_ok = self.settings.token_types.contains(&typ);
        if !typ_ok {
            return JwtOutcome::Rejected(R::Type);
        }
        let key = match self
            .keys
            .key_for(
                alg,
                header.kid.as_deref(),
                self.settings.hmac_secret.as_ref(),
            )
            .await
        {
            Ok(k) => k,
            Err(KeyLookup::Unavailable(f)) => return JwtOutcome::Unavailable(f),
            Err(KeyLookup::WrongAlgorithm) => return JwtOutcome::Rejected(R::Algorithm),
            Err(KeyLookup::Unknown) => return JwtOutcome::Rejected(R::UnknownKey),
        };
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["iss", "aud"]);
        validation.set_issuer(&[self.issuer()]);
        validation.set_audience(&self.settings.audiences);
        let data = match jsonwebtoken::decode::<AccessClaims>(token, &key, &validation) {
            Ok(d) => d,
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                return JwtOutcome::Rejected(match e.kind() {
                    K::InvalidSignature => R::Signature,
                    K::InvalidAudience => R::Audience,
                    K::InvalidIssuer => R::UnknownIssuer,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => R::Algorithm,
                    K::MissingRequiredClaim(c) if c == "aud" => R::Audience,
                    _ => R::Malformed,
                });
            }
        };
        let c = data.claims;
        if ["nonce", "at_hash", "events", "c_hash", "s_hash"]
            .iter()
            .any(|k| c.other.contains_key(*k))
        {
            return JwtOutcome::Rejected(R::NotAccessToken);
        }
        let now = self.clock.now_ms() as f64 / 1000.0;
        let leeway = self.settings.leeway.as_secs_f64();
        let Some(exp) = c.exp else {
            return JwtOutcome::Rejected(R::Time);
        };
        if exp + leeway <= now
            || c.nbf.is_some_and(|nbf| nbf > now + leeway)
            || c.iat.is_some_and(|iat| iat > now + leeway)
        {
            return JwtOutcome::Rejected(R::Time);
        }
        let scope = match (&c.scope, &c.scp) {
            (Some(s), _) => s.clone(),
            (None, Some(Value::String(s))) => s.clone(),
            (None, Some(Value::Array(items))) => items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        let mut all = c.other;
        if let Some(sub) = &c.sub {
            all.insert("sub".into(), Value::String(sub.clone()));
        }
        let claims = Claims {
            issuer: self.name.clone(),
            sub: c.sub,
            scope,
            device_id: c.device_id,
            sid: c.sid,
            expires_at_ms: Some((exp * 1000.0) as u64),
            // Without `iat` a JWT counts as issued before any revocation.
            // An `iat` within the leeway ahead counts as now (a later `iat` was refused
            // above): while the verdict is cached, every revocation made from now on covers
            // it.
            issued_at_ms: c.iat.map_or(0, |i| {
                ((i.max(0.0) * 1000.0) as u64).min(self.clock.now_ms())
            }),
            all,
        };
        JwtOutcome::Valid(Box::new(claims), c.jti)
    }
}

/// Every configured JWT issuer, by `iss`.
#[derive(Default)]
pub struct JwtIssuers {
    by_iss: HashMap<String, Arc<JwtIssuer>>,
}

impl JwtIssuers {
    /// Registers an issuer.
    pub fn insert(&mut self, issuer: Arc<JwtIssuer>) {
        self.by_iss.insert(issuer.issuer().to_owned(), issuer);
    }

    /// The issuer whose identifier is exactly `iss`.
    pub fn get(&self, iss: &str) -> Option<&Arc<JwtIssuer>> {
        self.by_iss.get(iss)
    }

    /// Whether any issuer validates JWTs.
    pub fn is_empty(&self) -> bool {
        self.by_iss.is_empty()
    }

    /// All issuers.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<JwtIssuer>> {
        self.by_iss.values()
    }
}

impl From<JwtRejection> for RejectReason {
    fn from(_: JwtRejection) -> Self {
        RejectReason::InvalidJwt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln"));
        assert!(!looks_like_jwt("opaque-token"));
        assert!(!looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("eyJ.eyJ.c.d"));
        assert!(!looks_like_jwt("eyJhbGciOiJSUzI1NiJ9..c2ln"));
    }

    #[test]
    fn unverified_issuer_is_read_for_routing() {
        let p =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"https://op/"}"#);
        assert_eq!(
            unverified_issuer(&format!("eyJhbGciOiJub25lIn0.{p}.")),
            Some("https://op/".into())
        );
        assert_eq!(unverified_issuer("eyJ.!!!.x"), None);
    }
}

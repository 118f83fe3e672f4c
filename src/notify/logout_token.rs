//! OIDC Back-Channel Logout 1.0 §2.6: validation of a logout token, each step its own refusal.
//!
//! The issuer is chosen by the unverified `iss` among the configured issuers; its key store
//! verifies the signature (`kid` only as a lookup key; `none` never parses; HMAC only with the
//! issuer's configured secret). Then: `alg` on the allow-list, `typ` `logout+jwt` when present,
//! `iss`, `aud` in the issuer's logout audiences, `iat` and `exp` with leeway, `sub` or `sid`,
//! the back-channel-logout `events` member, no `nonce`, and a `jti` never seen before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::jwks::{KeyLookup, KeyStore};
use crate::auth::jwt::{b64, unverified_issuer, RawHeader};
use crate::clock::SharedClock;
use crate::config::{normalize_typ, Secret};
use crate::store::Store;

/// The `events` member that marks a logout token.
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// Why a logout token was refused (400 `invalid_request`; the step is logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutRejection {
    /// Not a JWS compact serialisation, or undecodable.
    Malformed,
    /// `iss` names no configured issuer.
    Issuer,
    /// Algorithm not allowed (including `none`) or not matching the key.
    Algorithm,
    /// `typ` present but not `logout+jwt`.
    Type,
    /// Signature invalid or key unknown.
    Signature,
    /// `aud` holds none of the logout audiences.
    Audience,
    /// `iat`/`exp` missing, expired, or from the future.
    Time,
    /// Neither `sub` nor `sid`.
    Subject,
    /// No back-channel-logout `events` member.
    Events,
    /// Carries a `nonce` (an ID token).
    Nonce,
    /// No `jti`, or a `jti` already seen.
    Replay,
    /// The keys could not be loaded.
    Keys,
    /// The state store could not check or record the `jti` (a fault: 503, the OP retries).
    Unavailable,
}

impl LogoutRejection {
    /// Whether this is a fault on the gateway's side (503, retry) rather than a bad token (400).
    pub fn is_fault(self) -> bool {
        matches!(self, LogoutRejection::Keys | LogoutRejection::Unavailable)
    }
}

impl LogoutRejection {
    /// A bounded metric label.
    pub fn metric_label(self) -> &'static str {
        match self {
            LogoutRejection::Malformed => "malformed",
            LogoutRejection::Issuer => "issuer",
            LogoutRejection::Algorithm => "algorithm",
            LogoutRejection::Type => "type",
            LogoutRejection::Signature => "signature",
            LogoutRejection::Audience => "audience",
            LogoutRejection::Time => "time",
            LogoutRejection::Subject => "subject",
            LogoutRejection::Events => "events",
            LogoutRejection::Nonce => "nonce",
            LogoutRejection::Replay => "replay",
            LogoutRejection::Unavailable => "unavailable",
            LogoutRejection::Keys => "keys",
        }
    }

    /// Label for logs, metrics and `error_description`.
    pub fn as_label(self) -> &'static str {
        match self {
            LogoutRejection::Malformed => "malformed logout token",
            LogoutRejection::Issuer => "unknown issuer",
            LogoutRejection::Algorithm => "algorithm not allowed",
            LogoutRejection::Type => "wrong typ",
            LogoutRejection::Signature => "invalid signature",
            LogoutRejection::Audience => "wrong audience",
            LogoutRejection::Time => "expired or not yet valid",
            LogoutRejection::Subject => "neither sub nor sid",
            LogoutRejection::Events => "missing back-channel logout event",
            LogoutRejection::Nonce => "nonce present",
            LogoutRejection::Replay => "jti missing or replayed",
            LogoutRejection::Keys => "issuer keys unavailable",
            LogoutRejection::Unavailable => "temporarily unavailable",
        }
    }
}

/// A validated logout request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutEvent {
    /// The issuer.
    pub issuer: String,
    /// `sub`, if present.
    pub sub: Option<String>,
    /// `sid`, if present.
    pub sid: Option<String>,
    /// How the token's `jti` is remembered (to forget it when the logout fails).
    pub jti_key: String,
}

#[derive(Debug, Deserialize)]
struct LogoutClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    events: Option<Map<String, Value>>,
    #[serde(default)]
    nonce: Option<Value>,
}

/// One issuer's logout-token settings.
pub struct LogoutIssuer {
    /// Its key store.
    pub keys: Arc<KeyStore>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// HMAC secret, when the issuer signs with one.
    pub hmac_secret: Option<Secret>,
    /// Clock skew allowance.
    pub leeway: Duration,
}

/// Validates logout tokens for every configured issuer.
pub struct LogoutValidator {
    issuers: HashMap<String, LogoutIssuer>,
    store: Arc<dyn Store>,
    clock: SharedClock,
}

impl LogoutValidator {
    /// A validator over `issuers`, remembering `jti`s in `store`.
    pub fn new(issuers: Vec<LogoutIssuer>, store: Arc<dyn Store>, clock: SharedClock) -> Self {
        Self {
            issuers: issuers
                .into_iter()
                .map(|i| (i.keys.issuer().to_owned(), i))
                .collect(),
            store,
            clock,
        }
    }

    /// Runs every step of §2.6.
    pub async fn validate(&self, token: &str) -> Result<LogoutEvent, LogoutRejection> {
        use LogoutRejection as R;
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(R::Malformed);
        };
        let header = b64(h)
            .and_then(|b| serde_json::from_slice::<RawHeader>(&b).ok())
            .ok_or(R::Malformed)?;
        let iss = unverified_issuer(token).ok_or(R::Malformed)?;
        let issuer = self.issuers.get(&iss).ok_or(R::Issuer)?;
        let alg = header.alg.parse::<Algorithm>().map_err(|_| R::Algorithm)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(R::Algorithm);
        }
        if header
            .typ
            .as_deref()
            .is_some_and(|t| normalize_typ(t) != "logout+jwt")
        {
            return Err(R::Type);
        }
        let key = issuer
            .keys
            .key_for(alg, header.kid.as_deref(), issuer.hmac_secret.as_ref())
            .await
            .map_err(|e| match e {
                KeyLookup::Unavailable(_) => R::Keys,
                KeyLookup::WrongAlgorithm => R::Algorithm,
                KeyLookup::Unknown => R::Signature,
            })?;
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["iss", "aud"]);
        validation.set_issuer(&[iss.as_str()]);
        validation.set_audience(&issuer.audiences);
        let claims = jsonwebtoken::decode::<LogoutClaims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => R::Signature,
                    K::InvalidAudience => R::Audience,
                    K::MissingRequiredClaim(c) if c == "aud" => R::Audience,
                    K::InvalidIssuer => R::Issuer,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => R::Algorithm,
                    _ => R::Malformed,
                }
            })?
            .claims;
        let now = self.clock.now_ms() as f64 / 1000.0;
        let leeway = issuer.leeway.as_secs_f64();
        let (Some(iat), Some(exp)) = (claims.iat, claims.exp) else {
            return Err(R::Time);
        };
        if exp + leeway <= now || iat > now + leeway {
            return Err(R::Time);
        }
        if claims.sub.is_none() && claims.sid.is_none() {
            return Err(R::Subject);
        }
        let has_event = claims
            .events
            .as_ref()
            .and_then(|e| e.get(BACKCHANNEL_LOGOUT_EVENT))
            .is_some_and(Value::is_object);
        if !has_event {
            return Err(R::Events);
        }
        if claims.nonce.is_some() {
            return Err(R::Nonce);
        }
        let jti = claims.jti.ok_or(R::Replay)?;
        let jti_key = format!("{iss}\u{1f}{jti}");
        // Remembered until the token expires (plus leeway): a replay inside that window fails.
        let until_ms = ((exp + leeway) * 1000.0) as u64;
        let fresh = self
            .store
            .remember_jti(&jti_key, until_ms, self.clock.now_ms())
            .await
            .map_err(|_| R::Unavailable)?;
        if !fresh {
            return Err(R::Replay);
        }
        Ok(LogoutEvent {
            issuer: iss,
            sub: claims.sub,
            sid: claims.sid,
            jti_key,
        })
    }
}

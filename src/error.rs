//! The one error type of the request path, [`GatewayError`], and the bounded reasons behind it.
//!
//! Each variant maps to exactly one Matrix answer (status, `errcode`, client-facing text) in
//! [`GatewayError::status`] / [`GatewayError::errcode`] / [`GatewayError::client_message`]; the
//! internal reason travels alongside for logs and metric labels and is never sent to the client.
//! `gateway::respond` is the only place that turns one into bytes. Statuses and errcodes follow
//! `shared/decisions.md` (Synapse's delegated-auth semantics).

use std::fmt;

/// Why a request carried no usable token (401 `M_MISSING_TOKEN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingTokenReason {
    /// No `Authorization` header and no `access_token` parameter.
    Absent,
    /// The `Authorization` header is not `Bearer <b64token>`, or is repeated.
    Malformed,
    /// The header and the query parameter were both present, or the parameter was repeated.
    Ambiguous,
}

/// Why a token was refused (401 `M_UNKNOWN_TOKEN`, `soft_logout: false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RejectReason {
    /// The OP says `active: false` (unknown, revoked, expired at the OP).
    Inactive,
    /// The token's `exp` / `expires_in` has passed.
    Expired,
    /// `token_type` says this is a refresh token.
    RefreshToken,
    /// `token_type` is missing or not one of the accepted access-token types.
    NotAccessToken,
    /// Neither the full API scope nor the guest scope was granted.
    NoApiScope,
    /// The scope names two different device IDs.
    MultipleDevices,
    /// The device ID is empty, too long or has characters outside the RFC 6749 scope set.
    InvalidDevice,
    /// Longer than `auth.max_token_length`; the OP was not asked.
    TooLong,
    /// An active answer without `sub`.
    NoSubject,
    /// A JWT failed local validation (the detailed reason is logged).
    InvalidJwt,
    /// No configured issuer accepts this token (e.g. an opaque token with only JWT issuers).
    NoVerifier,
    /// Revoked through back-channel logout, the revocation proxy or the admin API.
    Revoked,
}

/// How a call to the OP failed (503, never 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpFailure {
    /// Connection refused, DNS or TLS failure.
    Unreachable,
    /// No answer within the configured timeout.
    Timeout,
    /// A non-2xx status.
    Status,
    /// Not JSON, or JSON of the wrong shape or types.
    InvalidBody,
    /// Larger than `max_response_bytes`.
    TooLarge,
    /// The discovery document has no usable introspection endpoint or the wrong issuer.
    BadMetadata,
    /// Shed by the gateway: `max_concurrent_introspections` calls in flight and the queue full
    /// (a flood of new tokens); the OP was not asked.
    Overloaded,
    /// The OP vouched for a new token whose `iat` is further ahead of the gateway's clock than
    /// the issuer's leeway (an issue time no revocation could precede).
    ClockSkew,
}

/// Why a verified token could not be mapped to a Matrix user (500: an OP misconfiguration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MappingFailure {
    /// None of `auth.user_id_claims` is present as a string.
    MissingClaim,
    /// The claim is not a valid Matrix localpart, or the user ID would be too long.
    InvalidLocalpart,
}

/// Why the upstream binding of an identity could not be established (503, never 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingFailure {
    /// The homeserver did not answer a provisioning call.
    Unreachable,
    /// Appservice registration of the user failed.
    Registration,
    /// Appservice login of the device failed.
    Login,
    /// Appservice creation of the device failed.
    DeviceCreation,
    /// The state store failed.
    Store,
    /// The homeserver no longer accepts the bound credentials; re-provisioned on the next request.
    Lost,
}

/// Endpoints the gateway answers itself with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Owned by the OP now (login, logout, refresh, password, 3PID changes, deactivation, …):
    /// 404 `M_UNRECOGNIZED`.
    OwnedByOp,
    /// `/register`: 403 `M_FORBIDDEN`.
    Registration,
    /// Only an application service may call it: 403 `M_FORBIDDEN`.
    AppserviceOnly,
    /// A homeserver admin API on the public listener: 404 `M_UNRECOGNIZED`.
    AdminApi,
}

/// Everything that stops a request inside the gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// 401 `M_MISSING_TOKEN`.
    #[error("missing token: {0:?}")]
    MissingToken(MissingTokenReason),
    /// 401 `M_UNKNOWN_TOKEN`.
    #[error("token refused: {0:?}")]
    UnknownToken(RejectReason),
    /// 403 `M_GUEST_ACCESS_FORBIDDEN` + `WWW-Authenticate: Bearer error="insufficient_scope"`.
    #[error("guest token outside the guest endpoint list")]
    GuestAccessForbidden,
    /// 400 `M_UNRECOGNIZED`: the request target is not origin-form.
    #[error("request target is not origin-form")]
    BadRequestTarget,
    /// 503 `M_UNKNOWN` with `Retry-After`.
    #[error("OpenID Provider unavailable: {0:?}")]
    OpUnavailable(OpFailure),
    /// 502 `M_UNKNOWN`.
    #[error("homeserver unreachable")]
    UpstreamUnavailable,
    /// 500 `M_UNKNOWN`.
    #[error("cannot map the token to a Matrix user: {0:?}")]
    UserMapping(MappingFailure),
    /// 500 `M_UNKNOWN`: a bug or resource problem inside the gateway.
    #[error("internal error")]
    Internal,
    /// 403 `M_FORBIDDEN`: the token's `sub` is not the subject pinned to this user ID.
    #[error("subject does not own this user ID")]
    SubjectMismatch,
    /// 403 `M_FORBIDDEN`: the user ID is the application service's own (`sender_localpart`)
    /// or in `homeserver.reserved_localparts`.
    #[error("reserved user ID")]
    ReservedUserId,
    /// 404 / 403: the gateway refuses this endpoint.
    #[error("endpoint refused: {0:?}")]
    Refused(Refused),
    /// 503 `M_UNKNOWN` with `Retry-After`.
    #[error("upstream binding unavailable: {0:?}")]
    BindingUnavailable(BindingFailure),
    /// 401 user-interactive-auth answer pointing at the OP's account page (`m.oauth`).
    #[error("cross-signing reset needs approval at the OP")]
    CrossSigningResetRequired,
    /// 403 `M_USER_DEACTIVATED`: the user ID is tombstoned.
    #[error("user deactivated")]
    UserDeactivated,
    /// 415 `M_UNRECOGNIZED`: an authenticated request with a body the homeserver would parse
    /// as form arguments (`application/x-www-form-urlencoded`, `multipart/form-data`), which
    /// could carry appservice parameters past the query.
    #[error("form-encoded body on an authenticated request")]
    FormBody,
    /// 403 `M_FORBIDDEN`: a member list of a room the caller has not joined (the check the
    /// homeserver skips for appservice requests, made by the gateway in masquerade mode).
    #[error("not joined to the room")]
    NotJoined,
    /// A cross-signing key upload whose body the gateway must complete (Dendrite's password
    /// stage) but cannot read: 400 `M_NOT_JSON`, or 413 `M_TOO_LARGE` past the limit.
    #[error("cross-signing upload body unusable: {0:?}")]
    UploadBody(UploadBodyFault),
    /// 403 `M_FORBIDDEN`: a login token (`m.login.token`) that is unknown, used or expired.
    #[error("login token refused")]
    LoginRefused,
    /// 400 `M_UNKNOWN`: a `/login` or `/refresh` request the gateway does not support or
    /// cannot read (not JSON, another login type, no token).
    #[error("unsupported login request")]
    BadLogin,
    /// 429 `M_LIMIT_EXCEEDED` with `retry_after_ms` and `Retry-After`: the client address
    /// presented more new tokens than its budget allows (`auth.new_tokens_per_address`).
    #[error("too many new tokens from one address")]
    RateLimited {
        /// How long until the address may present a new token again.
        retry_after_ms: u64,
    },
}

/// Why the body of a cross-signing key upload could not be completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadBodyFault {
    /// Not a JSON object (or not readable from the client).
    NotJsonObject,
    /// Larger than the gateway buffers.
    TooLarge,
}

/// The Matrix standard error body
/// (<https://spec.matrix.org/latest/client-server-api/#standard-error-response>): the shape of
/// every Matrix error the gateway and its admin API write.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MatrixError {
    /// The Matrix error code.
    pub errcode: &'static str,
    /// A human-readable message.
    pub error: std::borrow::Cow<'static, str>,
    /// `false` on a refused access token: the client must sign in again (spec: soft logout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_logout: Option<bool>,
    /// On `M_LIMIT_EXCEEDED`: how long the client should wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl MatrixError {
    /// An error with a code and a message.
    pub fn new(errcode: &'static str, error: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        MatrixError {
            errcode,
            error: error.into(),
            soft_logout: None,
            retry_after_ms: None,
        }
    }
}

/// Matrix error codes the gateway emits
/// (<https://spec.matrix.org/latest/client-server-api/#standard-error-response>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errcode {
    /// No access token where one is required.
    MissingToken,
    /// The access token is not recognised.
    UnknownToken,
    /// A guest may not call this endpoint.
    GuestAccessForbidden,
    /// Not allowed.
    Forbidden,
    /// The account was deactivated.
    UserDeactivated,
    /// The endpoint or request is not recognised.
    Unrecognized,
    /// The request body is not valid JSON (or not the JSON object expected).
    NotJson,
    /// The request body is too large.
    TooLarge,
    /// Too many requests.
    LimitExceeded,
    /// Anything else.
    Unknown,
}

impl Errcode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Errcode::MissingToken => "M_MISSING_TOKEN",
            Errcode::UnknownToken => "M_UNKNOWN_TOKEN",
            Errcode::GuestAccessForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            Errcode::Forbidden => "M_FORBIDDEN",
            Errcode::UserDeactivated => "M_USER_DEACTIVATED",
            Errcode::Unrecognized => "M_UNRECOGNIZED",
            Errcode::NotJson => "M_NOT_JSON",
            Errcode::TooLarge => "M_TOO_LARGE",
            Errcode::LimitExceeded => "M_LIMIT_EXCEEDED",
            Errcode::Unknown => "M_UNKNOWN",
        }
    }
}

impl fmt::Display for Errcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl GatewayError {
    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::MissingToken(_) | GatewayError::UnknownToken(_) => 401,
            GatewayError::GuestAccessForbidden => 403,
            GatewayError::BadRequestTarget => 400,
            GatewayError::OpUnavailable(_) => 503,
            GatewayError::UpstreamUnavailable => 502,
            GatewayError::UserMapping(_) | GatewayError::Internal => 500,
            GatewayError::SubjectMismatch | GatewayError::ReservedUserId => 403,
            GatewayError::Refused(Refused::OwnedByOp | Refused::AdminApi) => 404,
            GatewayError::Refused(Refused::Registration | Refused::AppserviceOnly) => 403,
            GatewayError::BindingUnavailable(_) => 503,
            GatewayError::CrossSigningResetRequired => 401,
            GatewayError::UserDeactivated => 403,
            GatewayError::FormBody => 415,
            GatewayError::NotJoined => 403,
            GatewayError::UploadBody(UploadBodyFault::NotJsonObject) => 400,
            GatewayError::UploadBody(UploadBodyFault::TooLarge) => 413,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::LoginRefused => 403,
            GatewayError::BadLogin => 400,
        }
    }

    /// The Matrix errcode.
    pub fn errcode(&self) -> Errcode {
        match self {
            GatewayError::MissingToken(_) => Errcode::MissingToken,
            GatewayError::UnknownToken(_) => Errcode::UnknownToken,
            GatewayError::GuestAccessForbidden => Errcode::GuestAccessForbidden,
            GatewayError::BadRequestTarget
            | GatewayError::FormBody
            | GatewayError::Refused(Refused::OwnedByOp | Refused::AdminApi) => {
                Errcode::Unrecognized
            }
            GatewayError::SubjectMismatch
            | GatewayError::ReservedUserId
            | GatewayError::NotJoined
            | GatewayError::Refused(Refused::Registration | Refused::AppserviceOnly)
            | GatewayError::CrossSigningResetRequired => Errcode::Forbidden,
            GatewayError::BindingUnavailable(_) => Errcode::Unknown,
            GatewayError::UserDeactivated => Errcode::UserDeactivated,
            GatewayError::UploadBody(UploadBodyFault::NotJsonObject) => Errcode::NotJson,
            GatewayError::UploadBody(UploadBodyFault::TooLarge) => Errcode::TooLarge,
            GatewayError::RateLimited { .. } => Errcode::LimitExceeded,
            GatewayError::LoginRefused => Errcode::Forbidden,
            GatewayError::BadLogin => Errcode::Unknown,
            GatewayError::OpUnavailable(_)
            | GatewayError::UpstreamUnavailable
            | GatewayError::UserMapping(_)
            | GatewayError::Internal => Errcode::Unknown,
        }
    }

    /// The `error` text: says the gateway answered, never reveals the internal reason.
    pub fn client_message(&self) -> &'static str {
        match self {
            GatewayError::MissingToken(MissingTokenReason::Absent) => {
                "Missing access token (gateway)"
            }
            GatewayError::MissingToken(MissingTokenReason::Malformed) => {
                "Malformed Authorization header (gateway)"
            }
            GatewayError::MissingToken(MissingTokenReason::Ambiguous) => {
                "Access token given more than once (gateway)"
            }
            GatewayError::UnknownToken(_) => "Invalid access token (gateway)",
            GatewayError::GuestAccessForbidden => {
                "Guest access is not allowed on this endpoint (gateway)"
            }
            GatewayError::BadRequestTarget => "Unrecognized request target (gateway)",
            GatewayError::OpUnavailable(_) => "Unable to introspect the access token (gateway)",
            GatewayError::UpstreamUnavailable => "The homeserver is unreachable (gateway)",
            GatewayError::UserMapping(_) => {
                "The OpenID Provider returned an unusable user identity (gateway)"
            }
            GatewayError::Internal => "Internal error (gateway)",
            GatewayError::SubjectMismatch => {
                "This Matrix user ID belongs to another account at the OpenID Provider (gateway)"
            }
            GatewayError::ReservedUserId => {
                "This Matrix user ID is reserved on this homeserver (gateway)"
            }
            GatewayError::Refused(Refused::OwnedByOp) => {
                "This endpoint is handled by the OpenID Provider, not the homeserver (gateway)"
            }
            GatewayError::Refused(Refused::Registration) => {
                "Registration is handled by the OpenID Provider (gateway)"
            }
            GatewayError::Refused(Refused::AppserviceOnly) => {
                "Only application services may call this endpoint (gateway)"
            }
            GatewayError::Refused(Refused::AdminApi) => {
                "The homeserver admin API is not exposed on this listener (gateway)"
            }
            GatewayError::BindingUnavailable(_) => {
                "The homeserver session is being set up, try again (gateway)"
            }
            GatewayError::CrossSigningResetRequired => {
                "To reset your cross-signing identity, approve it at your account page first (gateway)"
            }
            GatewayError::UserDeactivated => "This account has been deactivated (gateway)",
            GatewayError::FormBody => {
                "Form-encoded request bodies are not accepted; send JSON or the file's own type (gateway)"
            }
            GatewayError::NotJoined => {
                "Getting joined members while not being a current member of the room is forbidden (gateway)"
            }
            GatewayError::UploadBody(UploadBodyFault::NotJsonObject) => {
                "The cross-signing key upload must be a JSON object (gateway)"
            }
            GatewayError::UploadBody(UploadBodyFault::TooLarge) => {
                "The cross-signing key upload is too large (gateway)"
            }
            GatewayError::RateLimited { .. } => {
                "Too many new access tokens from this address, try again later (gateway)"
            }
            GatewayError::LoginRefused => "Invalid or expired login token (gateway)",
            GatewayError::BadLogin => {
                "Unsupported login request: use m.login.token after single sign-on (gateway)"
            }
        }
    }

    /// The Matrix error body of this error.
    pub fn matrix_error(&self) -> MatrixError {
        MatrixError {
            soft_logout: self.soft_logout(),
            retry_after_ms: match self {
                GatewayError::RateLimited { retry_after_ms } => Some(*retry_after_ms),
                _ => None,
            },
            ..MatrixError::new(self.errcode().as_str(), self.client_message())
        }
    }

    /// Whether the body carries `soft_logout: false`.
    pub fn soft_logout(&self) -> Option<bool> {
        matches!(self, GatewayError::UnknownToken(_)).then_some(false)
    }

    /// A bounded label for logs and metrics.
    pub fn reason_label(&self) -> &'static str {
        match self {
            GatewayError::MissingToken(r) => match r {
                MissingTokenReason::Absent => "token_absent",
                MissingTokenReason::Malformed => "token_malformed",
                MissingTokenReason::Ambiguous => "token_ambiguous",
            },
            GatewayError::UnknownToken(r) => match r {
                RejectReason::Inactive => "inactive",
                RejectReason::Expired => "expired",
                RejectReason::RefreshToken => "refresh_token",
                RejectReason::NotAccessToken => "not_access_token",
                RejectReason::NoApiScope => "no_api_scope",
                RejectReason::MultipleDevices => "multiple_devices",
                RejectReason::InvalidDevice => "invalid_device",
                RejectReason::TooLong => "too_long",
                RejectReason::NoSubject => "no_subject",
                RejectReason::InvalidJwt => "invalid_jwt",
                RejectReason::NoVerifier => "no_verifier",
                RejectReason::Revoked => "revoked",
            },
            GatewayError::GuestAccessForbidden => "guest_forbidden",
            GatewayError::BadRequestTarget => "bad_target",
            GatewayError::OpUnavailable(f) => match f {
                OpFailure::Unreachable => "op_unreachable",
                OpFailure::Timeout => "op_timeout",
                OpFailure::Status => "op_status",
                OpFailure::InvalidBody => "op_invalid_body",
                OpFailure::TooLarge => "op_too_large",
                OpFailure::BadMetadata => "op_bad_metadata",
                OpFailure::Overloaded => "op_overloaded",
                OpFailure::ClockSkew => "op_clock_skew",
            },
            GatewayError::UpstreamUnavailable => "upstream_unreachable",
            GatewayError::UserMapping(m) => match m {
                MappingFailure::MissingClaim => "user_claim_missing",
                MappingFailure::InvalidLocalpart => "user_claim_invalid",
            },
            GatewayError::Internal => "internal",
            GatewayError::SubjectMismatch => "subject_mismatch",
            GatewayError::ReservedUserId => "reserved_user_id",
            GatewayError::Refused(r) => match r {
                Refused::OwnedByOp => "owned_by_op",
                Refused::Registration => "registration",
                Refused::AppserviceOnly => "appservice_only",
                Refused::AdminApi => "admin_api",
            },
            GatewayError::BindingUnavailable(b) => match b {
                BindingFailure::Unreachable => "binding_unreachable",
                BindingFailure::Registration => "binding_registration",
                BindingFailure::Login => "binding_login",
                BindingFailure::DeviceCreation => "binding_device",
                BindingFailure::Store => "binding_store",
                BindingFailure::Lost => "binding_lost",
            },
            GatewayError::CrossSigningResetRequired => "cross_signing_reset",
            GatewayError::UserDeactivated => "user_deactivated",
            GatewayError::FormBody => "form_body",
            GatewayError::NotJoined => "not_joined",
            GatewayError::UploadBody(UploadBodyFault::NotJsonObject) => "upload_not_json",
            GatewayError::UploadBody(UploadBodyFault::TooLarge) => "upload_too_large",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::LoginRefused => "login_refused",
            GatewayError::BadLogin => "bad_login",
        }
    }
}

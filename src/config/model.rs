//! The validated configuration the rest of the gateway reads: parsed, checked types (`Url`,
//! `Duration`, `HeaderName`, secrets). Built only by [`super::load`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use url::Url;

use super::Secret;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening sockets.
    pub listen: Listen,
    /// The upstream homeserver.
    pub homeserver: Homeserver,
    /// Accepted OPs; `issuers[0]` is the primary one.
    pub issuers: Vec<Issuer>,
    /// Token extraction and user mapping.
    pub auth: AuthPolicy,
    /// Verified-identity cache.
    pub cache: CachePolicy,
    /// Identity headers sent upstream.
    pub identity_headers: IdentityHeaders,
    /// Logging.
    pub log: LogSettings,
    /// Embedded state.
    pub store: StoreSettings,
    /// Discovery answers.
    pub discovery: Discovery,
    /// Notification endpoints.
    pub notifications: Notifications,
    /// Admin API bearer token (admin API off without one).
    pub admin_token: Option<Secret>,
    /// Legacy login, when enabled.
    pub compat: Option<Compat>,
}

/// `[notifications]`
#[derive(Debug, Clone)]
pub struct Notifications {
    /// Back-channel logout path.
    pub backchannel_logout_path: String,
    /// Serve and advertise the revocation proxy.
    pub revocation_proxy: bool,
    /// Revocation proxy path.
    pub revocation_path: String,
    /// How long revocations are remembered.
    pub revocation_retention: Duration,
    /// Whether revoking an access token (not only a refresh token) signs the device out.
    pub access_token_revocation_signs_out: bool,
    /// Most revocations held at once; a revocation beyond it is refused with a 5xx.
    pub max_revocations: usize,
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// SQLite database path.
    pub path: std::path::PathBuf,
    /// Redis settings when the store is shared.
    pub redis: Option<RedisSettings>,
    /// Seals upstream device tokens at rest (`store.encryption_key`); required with
    /// `appservice_login`, the only binding that stores tokens.
    pub sealer: Option<std::sync::Arc<crate::store::seal::Sealer>>,
}

/// How to reach Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server.
    Standalone,
    /// Redis Sentinel in front of a master (the master is looked up again after a failover).
    Sentinel,
}

/// `[redis]`
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Mode.
    pub mode: RedisMode,
    /// URLs.
    pub urls: Vec<String>,
    /// Sentinel master name.
    pub sentinel_service: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// Key prefix.
    pub key_prefix: String,
    /// Command timeout.
    pub timeout: Duration,
}

/// `[compat]`: legacy login (MSC3824 compatibility), when enabled.
#[derive(Debug, Clone)]
pub struct Compat {
    /// The OP client the gateway signs users in with.
    pub client_id: String,
    /// Its secret.
    pub client_secret: Secret,
    /// URL prefixes a login token may be sent to without a confirmation page.
    pub redirect_allowlist: Vec<Url>,
    /// Login token lifetime.
    pub login_token_ttl: Duration,
    /// Time a browser has to finish at the OP.
    pub sso_timeout: Duration,
    /// Longest compat session.
    pub session_lifetime: Duration,
    /// Access token lifetime when the client asked for a refresh token.
    pub access_token_ttl: Duration,
    /// Scopes a sign-in asks for beyond `openid`, the API and the device.
    pub extra_scopes: Vec<String>,
    /// How often a used session's OP grant is checked at the OP.
    pub grant_check_interval: Duration,
    /// `m.login.password` through the OP's password grant, when offered.
    pub password: Option<PasswordLogin>,
}

/// `[compat] password_login`: the limits on password attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordLogin {
    /// Attempts one user may make a minute.
    pub per_user_per_minute: u32,
    /// Attempts one client address may make a minute.
    pub per_address_per_minute: u32,
}

/// `[discovery]`
#[derive(Debug, Clone)]
pub struct Discovery {
    /// `m.homeserver.base_url` in `/.well-known/matrix/client`.
    pub public_base_url: Url,
    /// Fills `account_management_uri` when the OP lacks it.
    pub account_management_uri: Option<Url>,
    /// Fills `registration_endpoint` when the OP lacks it.
    pub registration_endpoint: Option<Url>,
}

/// Which homeserver implementation sits behind the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeserverKind {
    /// Synapse.
    Synapse,
    /// Dendrite.
    Dendrite,
    /// Conduit.
    Conduit,
    /// tuwunel / continuwuity.
    Tuwunel,
    /// Anything else.
    Generic,
}

/// How the verified identity reaches the homeserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingMode {
    /// One upstream token per (user, device) from appservice login (Dendrite, Conduit).
    AppserviceLogin,
    /// The AS token plus `user_id` / `device_id` query parameters (Synapse, tuwunel).
    AppserviceMasquerade,
    /// Identity headers only.
    Headers,
}

impl BindingMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BindingMode::AppserviceLogin => "appservice_login",
            BindingMode::AppserviceMasquerade => "appservice_masquerade",
            BindingMode::Headers => "headers",
        }
    }
}

/// `[listen]`
#[derive(Debug, Clone)]
pub struct Listen {
    /// Public listener address.
    pub public: SocketAddr,
    /// The HTTPS public listener, if any.
    pub tls: Option<TlsListener>,
    /// Worker threads of the public listener.
    pub threads: usize,
    /// Append to a client's `X-Forwarded-For` instead of replacing it.
    pub trust_forwarded_headers: bool,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// On SIGTERM, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long to keep accepting (closing each connection after its response)
    /// before the listener closes.
    pub shutdown_delay: Duration,
    /// Where the graceful upgrade's socket and the pid file live (graceful upgrade is off
    /// without it).
    pub runtime_dir: Option<PathBuf>,
}

/// An HTTPS public listener: its address and its PEM certificate chain and key.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Address.
    pub addr: SocketAddr,
    /// Certificate chain file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
}

/// `[homeserver]`
#[derive(Debug, Clone)]
pub struct Homeserver {
    /// Base URL.
    pub url: Url,
    /// Host to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// Whether the upstream speaks TLS.
    pub tls: bool,
    /// The Matrix server name.
    pub server_name: String,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream read timeout.
    pub read_timeout: Duration,
    /// Implementation.
    pub kind: HomeserverKind,
    /// Binding mode.
    pub binding: BindingMode,
    /// AS token (appservice bindings only).
    pub as_token: Option<Secret>,
    /// The application service's localpart (`sender_localpart`), reserved for it.
    pub appservice_sender: String,
    /// Other localparts no token may act as.
    pub reserved_localparts: Vec<String>,
    /// Admin APIs reachable through the public listener.
    pub expose_admin_api: bool,
    /// Synapse admin token (deactivation).
    pub admin_token: Option<Secret>,
}

/// How the gateway authenticates itself to the introspection endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMethod {
    /// HTTP Basic with client ID and secret (RFC 6749 §2.3.1).
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
    /// `Authorization: Bearer <shared secret>` (MAS style).
    Bearer,
}

/// How tokens of an issuer are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// RFC 7662 introspection only.
    Introspection,
    /// Local RFC 9068 JWT validation only.
    Jwt,
    /// JWT-shaped tokens locally, anything else by introspection.
    Auto,
}

/// The clock skew allowed for an issuer's times when its `jwt` section does not set `leeway`
/// (also the bound on an introspection answer's `iat` ahead of the gateway's clock).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// JWT validation settings of an issuer.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Accepted `typ` values, lower case, without `application/`.
    pub token_types: Vec<String>,
    /// Clock skew allowance.
    pub leeway: Duration,
    /// HMAC secret (HS* algorithms).
    pub hmac_secret: Option<Secret>,
    /// JWKS URL override.
    pub jwks_uri: Option<Url>,
    /// Scheduled refresh bounds.
    pub refresh_min: Duration,
    /// Scheduled refresh bounds (and default).
    pub refresh_max: Duration,
    /// Unknown-`kid` refetch rate limit.
    pub refetch_interval: Duration,
    /// Introspect JWTs too.
    pub introspect: bool,
}

/// `[[issuers]]`
#[derive(Debug, Clone)]
pub struct Issuer {
    /// Verification mode.
    pub mode: VerifyMode,
    /// JWT settings (modes `jwt` and `auto`).
    pub jwt: Option<JwtSettings>,
    /// The issuer identifier.
    pub issuer: String,
    /// Where the discovery document is read.
    pub discovery_url: Url,
    /// Introspection endpoint override.
    pub introspection_endpoint: Option<Url>,
    /// The gateway's client ID (absent only with `bearer` or without introspection).
    pub client_id: Option<String>,
    /// Client authentication method.
    pub client_auth: ClientAuthMethod,
    /// Client secret or shared secret (required when the issuer introspects).
    pub client_secret: Option<Secret>,
    /// Timeout of one OP request.
    pub timeout: Duration,
    /// Largest OP answer accepted.
    pub max_response_bytes: usize,
    /// Introspection calls in flight at once.
    pub max_concurrent_introspections: usize,
    /// Requests waiting for an introspection slot before new ones are shed.
    pub introspection_queue: usize,
    /// Discovery refresh interval.
    pub metadata_refresh: Duration,
    /// `token_type` values accepted as access tokens.
    pub access_token_types: Vec<String>,
    /// Refuse answers without `token_type`.
    pub require_token_type: bool,
    /// Accepted `aud` of logout tokens (`client_id` and `logout_audiences`).
    pub logout_audiences: Vec<String>,
}

/// Which endpoint list a guest-scoped token may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEndpoints {
    /// The Matrix spec's guest access list.
    Spec,
    /// The spec's list plus the endpoints Synapse allows guests.
    Synapse,
}

/// `[auth]`
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    /// Accept `?access_token=`.
    pub allow_query_token: bool,
    /// Longest token accepted.
    pub max_token_length: usize,
    /// Claims tried in order for the localpart.
    pub user_id_claims: Vec<String>,
    /// Guest endpoint list.
    pub guest_endpoints: GuestEndpoints,
    /// `Retry-After` seconds on 503.
    pub retry_after_secs: u32,
    /// New (uncached) tokens per second per client address; 0 turns the budget off.
    pub new_tokens_per_address: u32,
    /// Burst of new tokens per client address.
    pub new_tokens_burst: u32,
}

/// `[cache]`
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Longest reuse of an active verdict.
    pub max_ttl: Duration,
    /// Reuse of an inactive verdict.
    pub negative_ttl: Duration,
    /// Most entries.
    pub capacity: u64,
}

/// `[identity_headers]`
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    /// User ID header.
    pub user_id: HeaderName,
    /// Device ID header.
    pub device_id: HeaderName,
    /// Scope header.
    pub scope: HeaderName,
    /// Guest flag header.
    pub guest: HeaderName,
    /// OIDC subject header.
    pub subject: HeaderName,
    /// Signature header.
    pub signature: HeaderName,
    /// HMAC key; no signature header without it.
    pub signing_secret: Option<Secret>,
    /// More client headers removed before forwarding.
    pub also_strip: Vec<HeaderName>,
}

#[cfg(test)]
impl IdentityHeaders {
    /// The default names, `X-Remote-User` to strip too, and a signing key when `signing`.
    pub(crate) fn for_tests(signing: bool) -> Self {
        Self {
            user_id: HeaderName::from_static("x-matrix-user-id"),
            device_id: HeaderName::from_static("x-matrix-device-id"),
            scope: HeaderName::from_static("x-matrix-scope"),
            guest: HeaderName::from_static("x-matrix-guest"),
            subject: HeaderName::from_static("x-oidc-subject"),
            signature: HeaderName::from_static("x-matrix-identity-signature"),
            signing_secret: signing.then(|| Secret::new("k".repeat(32))),
            also_strip: vec![HeaderName::from_static("x-remote-user")],
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive.
    pub level: String,
}

/// A loaded configuration and the warnings `--check-config` prints.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Non-fatal remarks (e.g. plain `http://` to a non-loopback host).
    pub warnings: Vec<String>,
}

//! The configuration *file* model: exactly what an operator writes in TOML (or sets through
//! environment variables), with serde defaults.
//!
//! Nothing outside `config` reads these types: [`super::load`] turns them into the validated
//! internal [`super::Config`]. Every field is documented in `config/gateway.example.toml`.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listening sockets.
    #[serde(default)]
    pub listen: ListenFile,
    /// The homeserver behind the gateway.
    pub homeserver: Option<HomeserverFile>,
    /// The OpenID Providers whose tokens are accepted; the first one is the primary issuer.
    #[serde(default)]
    pub issuers: Vec<IssuerFile>,
    /// Token extraction and user mapping.
    #[serde(default)]
    pub auth: AuthFile,
    /// The verified-identity cache.
    #[serde(default)]
    pub cache: CacheFile,
    /// Identity headers sent upstream.
    #[serde(default)]
    pub identity_headers: IdentityHeadersFile,
    /// Logging.
    #[serde(default)]
    pub log: LogFile,
    /// Persistent state (bindings, provisioned devices, subject pins).
    #[serde(default)]
    pub store: StoreFile,
    /// What the gateway serves for OAuth discovery (MSC2965).
    #[serde(default)]
    pub discovery: DiscoveryFile,
    /// Sign-out and deactivation notifications from the OP.
    #[serde(default)]
    pub notifications: NotificationsFile,
    /// The admin API on the admin listener.
    #[serde(default)]
    pub admin: AdminFile,
    /// Redis, when `store.backend = "redis"`.
    #[serde(default)]
    pub redis: RedisFile,
}

/// `[notifications]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsFile {
    /// Path of the OIDC Back-Channel Logout endpoint on the public listener.
    #[serde(default = "default_bcl_path")]
    pub backchannel_logout_path: String,
    /// Advertise and serve the gateway's own RFC 7009 revocation endpoint.
    #[serde(default = "default_true")]
    pub revocation_proxy: bool,
    /// Path of that revocation endpoint on the public listener.
    #[serde(default = "default_revocation_path")]
    pub revocation_path: String,
    /// How long a revoked session, subject, device or token is remembered.
    #[serde(default = "default_retention")]
    pub revocation_retention: String,
    /// Which revocations sign the device out upstream: `any` (the Matrix spec: revoking either
    /// token ends the session) or `refresh_token`.
    #[serde(default = "default_revocation_signs_out")]
    pub revocation_signs_out: String,
    /// Most revocations held at once (each replica's memory, and the store).
    #[serde(default = "default_max_revocations")]
    pub max_revocations: usize,
}

fn default_max_revocations() -> usize {
    100_000
}

fn default_revocation_signs_out() -> String {
    "any".into()
}

impl Default for NotificationsFile {
    fn default() -> Self {
        Self {
            backchannel_logout_path: default_bcl_path(),
            revocation_proxy: true,
            revocation_path: default_revocation_path(),
            revocation_retention: default_retention(),
            revocation_signs_out: default_revocation_signs_out(),
            max_revocations: default_max_revocations(),
        }
    }
}

fn default_bcl_path() -> String {
    "/_matrix-oidc-gateway/oidc/backchannel-logout".into()
}
fn default_revocation_path() -> String {
    "/_matrix-oidc-gateway/oauth2/revoke".into()
}
fn default_retention() -> String {
    "24h".into()
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Bearer token of the admin API (the admin API is off without one).
    pub token: Option<String>,
    /// A file holding the admin token; its content is trimmed.
    pub token_file: Option<String>,
}

/// `[store]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `sqlite` (embedded, one replica) or `redis` (shared by several replicas).
    #[serde(default = "default_store_backend")]
    pub backend: String,
    /// Path of the embedded SQLite database (created with mode 0600).
    #[serde(default = "default_store_path")]
    pub path: String,
    /// Key sealing upstream device tokens at rest (32 bytes, hex or base64).
    pub encryption_key: Option<String>,
    /// File holding `encryption_key`.
    pub encryption_key_file: Option<String>,
    /// The key being rotated away from: still opens tokens, never seals.
    pub previous_encryption_key: Option<String>,
    /// File holding `previous_encryption_key`.
    pub previous_encryption_key_file: Option<String>,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            backend: default_store_backend(),
            path: default_store_path(),
            encryption_key: None,
            encryption_key_file: None,
            previous_encryption_key: None,
            previous_encryption_key_file: None,
        }
    }
}

fn default_store_backend() -> String {
    "sqlite".into()
}

/// `[redis]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// `standalone` or `sentinel`.
    #[serde(default = "default_redis_mode")]
    pub mode: String,
    /// Server URLs: the server (standalone) or the sentinels (sentinel).
    /// `redis://` or `rediss://` (TLS); `redis://user:password@host:port/db` for ACL auth.
    #[serde(default = "default_redis_urls")]
    pub urls: Vec<String>,
    /// The monitored master's name (sentinel mode).
    pub sentinel_service: Option<String>,
    /// Password (overrides one in the URLs).
    pub password: Option<String>,
    /// A file holding the password; its content is trimmed.
    pub password_file: Option<String>,
    /// Prefix of every key and of the fan-out channel.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Timeout of one Redis command (an unavailable Redis must not stall requests).
    #[serde(default = "default_redis_timeout")]
    pub timeout: String,
}

impl Default for RedisFile {
    fn default() -> Self {
        Self {
            mode: default_redis_mode(),
            urls: default_redis_urls(),
            sentinel_service: None,
            password: None,
            password_file: None,
            key_prefix: default_redis_prefix(),
            timeout: default_redis_timeout(),
        }
    }
}

fn default_redis_mode() -> String {
    "standalone".into()
}
fn default_redis_urls() -> Vec<String> {
    vec!["redis://127.0.0.1:6379".into()]
}
fn default_redis_prefix() -> String {
    "matrix-oidc-gateway:".into()
}
fn default_redis_timeout() -> String {
    "500ms".into()
}

fn default_store_path() -> String {
    "/var/lib/matrix-oidc-gateway/state.sqlite3".into()
}

/// `[discovery]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryFile {
    /// The homeserver's public client URL, as clients reach the gateway
    /// (default `https://<server_name>`).
    pub public_base_url: Option<String>,
    /// Account management page at the OP, when its metadata lacks `account_management_uri`.
    pub account_management_uri: Option<String>,
    /// Dynamic client registration endpoint, when the OP's metadata lacks it.
    pub registration_endpoint: Option<String>,
}

/// `[listen]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// Address of the public listener (client traffic).
    #[serde(default = "default_public")]
    pub public: String,
    /// Worker threads of the public listener.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Trust `X-Forwarded-For` from the client (only behind a trusted load balancer).
    #[serde(default)]
    pub trust_forwarded_headers: bool,
    /// Address of the admin listener (metrics, health, admin API); loopback by default.
    #[serde(default = "default_admin")]
    pub admin: String,
    /// On SIGTERM, how long requests in flight (`/sync` long-polls included) may take to finish.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
    /// On SIGTERM, how long to keep accepting (answering with `Connection: close`) before the
    /// listener closes, for load balancers that notice a stopping replica late.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: String,
    /// A private directory for the graceful upgrade's socket and the pid file; unset, SIGQUIT
    /// is a graceful stop and `--upgrade`/`--reload` are refused.
    #[serde(default)]
    pub runtime_dir: Option<String>,
}

fn default_shutdown_delay() -> String {
    "0s".into()
}

fn default_shutdown_grace() -> String {
    "35s".into()
}

fn default_admin() -> String {
    "127.0.0.1:9090".into()
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            public: default_public(),
            threads: default_threads(),
            trust_forwarded_headers: false,
            admin: default_admin(),
            shutdown_grace: default_shutdown_grace(),
            shutdown_delay: default_shutdown_delay(),
            runtime_dir: None,
        }
    }
}

fn default_public() -> String {
    "0.0.0.0:8008".into()
}
fn default_threads() -> usize {
    1
}

/// `[homeserver]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverFile {
    /// Base URL of the homeserver's client listener, `http://` or `https://`.
    pub url: Option<String>,
    /// The Matrix server name (the part after `:` in user IDs).
    pub server_name: Option<String>,
    /// Upstream connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// Upstream read timeout (must exceed the longest `/sync` long-poll).
    #[serde(default = "default_read_timeout")]
    pub read_timeout: String,
    /// `synapse`, `dendrite`, `conduit`, `tuwunel` or `generic`: picks defaults and quirks.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `appservice_login`, `appservice_masquerade` or `headers` (default depends on `kind`).
    pub binding: Option<String>,
    /// The application service token registered at the homeserver (appservice bindings).
    pub as_token: Option<String>,
    /// A file holding the AS token; its content is trimmed.
    pub as_token_file: Option<String>,
    /// Let clients reach homeserver admin APIs (`/_synapse/admin`, `/_dendrite/admin`) through
    /// the public listener.
    #[serde(default)]
    pub expose_admin_api: bool,
    /// A Synapse admin access token, for deactivation through the Synapse admin API.
    pub admin_token: Option<String>,
    /// A file holding that admin token; its content is trimmed.
    pub admin_token_file: Option<String>,
}

fn default_kind() -> String {
    "generic".into()
}

fn default_connect_timeout() -> String {
    "5s".into()
}
fn default_read_timeout() -> String {
    "300s".into()
}

/// `[[issuers]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    /// The issuer identifier, exactly as the OP's discovery document states it.
    pub issuer: Option<String>,
    /// Override of the discovery URL (default: `<issuer>/.well-known/openid-configuration`).
    pub discovery_url: Option<String>,
    /// Override of the introspection endpoint (default: from discovery).
    pub introspection_endpoint: Option<String>,
    /// The gateway's client ID at the OP.
    pub client_id: Option<String>,
    /// `client_secret_basic`, `client_secret_post` or `bearer` (a shared secret, MAS style).
    #[serde(default = "default_client_auth")]
    pub client_auth: String,
    /// The client secret (or shared secret for `bearer`).
    pub client_secret: Option<String>,
    /// A file holding the client secret; its content is trimmed.
    pub client_secret_file: Option<String>,
    /// Timeout of one request to the OP.
    #[serde(default = "default_op_timeout")]
    pub timeout: String,
    /// Largest introspection or discovery answer accepted, in bytes.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Introspection calls to this OP in flight at once (a flood of new tokens cannot exceed it).
    #[serde(default = "default_max_concurrent_introspections")]
    pub max_concurrent_introspections: usize,
    /// Requests that may wait for an introspection slot; beyond that they are shed with 503.
    #[serde(default = "default_introspection_queue")]
    pub introspection_queue: usize,
    /// How often the discovery document is re-read.
    #[serde(default = "default_metadata_refresh")]
    pub metadata_refresh: String,
    /// `token_type` values of an introspection answer that mean "access token"
    /// (compared case-insensitively; `refresh_token` is always refused).
    #[serde(default = "default_access_token_types")]
    pub access_token_types: Vec<String>,
    /// Refuse active answers without `token_type` (oidc-provider omits it for refresh tokens).
    #[serde(default = "default_true")]
    pub require_token_type: bool,
    /// `introspection`, `jwt` or `auto` (JWT-shaped tokens verified locally, others introspected).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Accepted `aud` values of JWT access tokens (one must be present).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// JWT signature algorithms accepted.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Accepted JWT `typ` header values (case-insensitive; `application/` prefix optional).
    #[serde(default = "default_token_types")]
    pub token_types: Vec<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: String,
    /// Shared secret for HS256/HS384/HS512 JWTs (HMAC is refused without it).
    pub hmac_secret: Option<String>,
    /// A file holding the HMAC secret; its content is trimmed.
    pub hmac_secret_file: Option<String>,
    /// Override of the JWKS URL (default: `jwks_uri` from discovery).
    pub jwks_uri: Option<String>,
    /// Shortest interval between scheduled JWKS refreshes (lower bound for `Cache-Control`).
    #[serde(default = "default_jwks_refresh_min")]
    pub jwks_refresh_min: String,
    /// Longest interval between scheduled JWKS refreshes (upper bound, and the default).
    #[serde(default = "default_jwks_refresh_max")]
    pub jwks_refresh_max: String,
    /// At most one unscheduled JWKS fetch (for an unknown `kid`) per this interval.
    #[serde(default = "default_jwks_refetch_interval")]
    pub jwks_refetch_interval: String,
    /// Also introspect JWTs at this issuer (closes the revocation gap for OPs that can).
    #[serde(default)]
    pub introspect_jwts: bool,
    /// `aud` values accepted on back-channel logout tokens besides `client_id`: the client IDs
    /// of the Matrix clients the OP logs users in with.
    #[serde(default)]
    pub logout_audiences: Vec<String>,
}

fn default_mode() -> String {
    "introspection".into()
}
fn default_algorithms() -> Vec<String> {
    [
        "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
    ]
    .map(String::from)
    .to_vec()
}
fn default_token_types() -> Vec<String> {
    vec!["at+jwt".into()]
}
fn default_leeway() -> String {
    "30s".into()
}
fn default_jwks_refresh_min() -> String {
    "60s".into()
}
fn default_jwks_refresh_max() -> String {
    "1h".into()
}
fn default_jwks_refetch_interval() -> String {
    "30s".into()
}

fn default_access_token_types() -> Vec<String> {
    vec!["access_token".into(), "Bearer".into()]
}

fn default_client_auth() -> String {
    "client_secret_basic".into()
}
fn default_op_timeout() -> String {
    "5s".into()
}
fn default_max_response_bytes() -> usize {
    1024 * 1024
}
fn default_max_concurrent_introspections() -> usize {
    64
}
fn default_introspection_queue() -> usize {
    256
}
fn default_metadata_refresh() -> String {
    "300s".into()
}

/// `[auth]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// Accept the deprecated `access_token` query parameter.
    #[serde(default = "default_true")]
    pub allow_query_token: bool,
    /// Tokens longer than this are refused without asking the OP.
    #[serde(default = "default_max_token_length")]
    pub max_token_length: usize,
    /// Claims tried in order for the Matrix localpart.
    #[serde(default = "default_user_id_claims")]
    pub user_id_claims: Vec<String>,
    /// Which endpoints a guest-scoped token may call: `spec` or `synapse`.
    #[serde(default = "default_guest_endpoints")]
    pub guest_endpoints: String,
    /// Seconds announced in `Retry-After` when the OP is unavailable.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u32,
}

impl Default for AuthFile {
    fn default() -> Self {
        Self {
            allow_query_token: true,
            max_token_length: default_max_token_length(),
            user_id_claims: default_user_id_claims(),
            guest_endpoints: default_guest_endpoints(),
            retry_after_secs: default_retry_after(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_token_length() -> usize {
    4096
}
fn default_user_id_claims() -> Vec<String> {
    vec!["username".into(), "sub".into()]
}
fn default_guest_endpoints() -> String {
    "spec".into()
}
fn default_retry_after() -> u32 {
    5
}

/// `[cache]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    /// Longest time an active verdict is reused.
    #[serde(default = "default_max_ttl")]
    pub max_ttl: String,
    /// How long an inactive verdict is reused.
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl: String,
    /// Most cached verdicts.
    #[serde(default = "default_capacity")]
    pub capacity: u64,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            max_ttl: default_max_ttl(),
            negative_ttl: default_negative_ttl(),
            capacity: default_capacity(),
        }
    }
}

fn default_max_ttl() -> String {
    "120s".into()
}
fn default_negative_ttl() -> String {
    "10s".into()
}
fn default_capacity() -> u64 {
    100_000
}

/// `[identity_headers]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeadersFile {
    /// Carries the Matrix user ID.
    #[serde(default = "default_h_user")]
    pub user_id: String,
    /// Carries the device ID (absent when the token names no device).
    #[serde(default = "default_h_device")]
    pub device_id: String,
    /// Carries the granted scope.
    #[serde(default = "default_h_scope")]
    pub scope: String,
    /// `true` for a guest-scoped token, `false` otherwise.
    #[serde(default = "default_h_guest")]
    pub guest: String,
    /// Carries the OIDC subject (`sub`).
    #[serde(default = "default_h_subject")]
    pub subject: String,
    /// Carries the HMAC signature over the identity headers (only with a signing secret).
    #[serde(default = "default_h_signature")]
    pub signature: String,
    /// HMAC-SHA256 key for the signature header.
    pub signing_secret: Option<String>,
    /// A file holding the HMAC key; its content is trimmed.
    pub signing_secret_file: Option<String>,
    /// More client headers to remove before forwarding.
    #[serde(default)]
    pub also_strip: Vec<String>,
}

impl Default for IdentityHeadersFile {
    fn default() -> Self {
        Self {
            user_id: default_h_user(),
            device_id: default_h_device(),
            scope: default_h_scope(),
            guest: default_h_guest(),
            subject: default_h_subject(),
            signature: default_h_signature(),
            signing_secret: None,
            signing_secret_file: None,
            also_strip: Vec::new(),
        }
    }
}

fn default_h_user() -> String {
    "X-Matrix-User-Id".into()
}
fn default_h_device() -> String {
    "X-Matrix-Device-Id".into()
}
fn default_h_scope() -> String {
    "X-Matrix-Scope".into()
}
fn default_h_guest() -> String {
    "X-Matrix-Guest".into()
}
fn default_h_subject() -> String {
    "X-OIDC-Subject".into()
}
fn default_h_signature() -> String {
    "X-Matrix-Identity-Signature".into()
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// `pretty` or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A `tracing` filter directive such as `info` or `matrix_oidc_gateway=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> String {
    "pretty".into()
}
fn default_log_level() -> String {
    "info".into()
}

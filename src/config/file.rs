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
    /// Legacy login for clients without the OAuth 2.0 API (MSC3824 compatibility).
    #[serde(default)]
    pub compat: CompatFile,
}

/// `[compat]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompatFile {
    /// Serve `/login`, the SSO redirect, `/logout` and `/refresh` for legacy clients.
    pub enabled: bool,
    /// The OP client the gateway signs users in with (default: the primary issuer's).
    pub client_id: Option<String>,
    /// Its secret (default: the primary issuer's).
    pub client_secret: Option<String>,
    /// Its secret, from a file.
    pub client_secret_file: Option<String>,
    /// Where a client may be sent back with its login token without a confirmation page:
    /// URL prefixes (scheme, host, optional port and path).
    pub redirect_allowlist: Vec<String>,
    /// How long a login token is valid.
    pub login_token_ttl: String,
    /// How long a browser has to finish signing in at the OP.
    pub sso_timeout: String,
    /// Longest life of a compat session (without an OP grant: at most
    /// `notifications.revocation_retention`).
    pub session_lifetime: String,
    /// Access token lifetime for clients that asked for a refresh token.
    pub access_token_ttl: String,
    /// Scopes a sign-in asks the OP for beyond `openid`, the API and the device (e.g.
    /// `offline_access`, for OPs that issue refresh tokens only with it).
    pub extra_scopes: Vec<String>,
    /// How often a used compat session's OP grant is checked (refreshed) at the OP.
    pub grant_check_interval: String,
    /// Offer `m.login.password`, checked at the OP with the resource-owner password grant.
    pub password_login: bool,
    /// Password logins one user may attempt a minute (on each replica).
    pub password_attempts_per_user: u32,
    /// Password logins one client address may attempt a minute (on each replica).
    pub password_attempts_per_address: u32,
}

impl Default for CompatFile {
    fn default() -> Self {
        Self {
            enabled: false,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            redirect_allowlist: Vec::new(),
            login_token_ttl: "2m".into(),
            sso_timeout: "10m".into(),
            session_lifetime: "24h".into(),
            access_token_ttl: "5m".into(),
            extra_scopes: Vec::new(),
            grant_check_interval: "5m".into(),
            password_login: false,
            password_attempts_per_user: 5,
            password_attempts_per_address: 20,
        }
    }
}

/// `[notifications]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationsFile {
    /// Path of the OIDC Back-Channel Logout endpoint on the public listener.
    pub backchannel_logout_path: String,
    /// Advertise and serve the gateway's own RFC 7009 revocation endpoint.
    pub revocation_proxy: bool,
    /// Path of that revocation endpoint on the public listener.
    pub revocation_path: String,
    /// How long a revoked session, subject, device or token is remembered.
    pub revocation_retention: String,
    /// Which revocations sign the device out upstream: `any` (the Matrix spec: revoking either
    /// token ends the session) or `refresh_token`.
    pub revocation_signs_out: String,
    /// Most revocations held at once (each replica's memory, and the store).
    pub max_revocations: usize,
}

impl Default for NotificationsFile {
    fn default() -> Self {
        Self {
            backchannel_logout_path: "/_matrix-oidc-gateway/oidc/backchannel-logout".into(),
            revocation_proxy: true,
            revocation_path: "/_matrix-oidc-gateway/oauth2/revoke".into(),
            revocation_retention: "24h".into(),
            revocation_signs_out: "any".into(),
            max_revocations: 100_000,
        }
    }
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
#[serde(default, deny_unknown_fields)]
pub struct StoreFile {
    /// `sqlite` (embedded, one replica) or `redis` (shared by several replicas).
    pub backend: String,
    /// Path of the embedded SQLite database (created with mode 0600).
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
            backend: "sqlite".into(),
            path: "/var/lib/matrix-oidc-gateway/state.sqlite3".into(),
            encryption_key: None,
            encryption_key_file: None,
            previous_encryption_key: None,
            previous_encryption_key_file: None,
        }
    }
}

/// `[redis]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisFile {
    /// `standalone` or `sentinel`.
    pub mode: String,
    /// Server URLs: the server (standalone) or the sentinels (sentinel).
    /// `redis://` or `rediss://` (TLS); `redis://user:password@host:port/db` for ACL auth.
    pub urls: Vec<String>,
    /// The monitored master's name (sentinel mode).
    pub sentinel_service: Option<String>,
    /// Password (overrides one in the URLs).
    pub password: Option<String>,
    /// A file holding the password; its content is trimmed.
    pub password_file: Option<String>,
    /// Prefix of every key and of the fan-out channel.
    pub key_prefix: String,
    /// Timeout of one Redis command (an unavailable Redis must not stall requests).
    pub timeout: String,
}

impl Default for RedisFile {
    fn default() -> Self {
        Self {
            mode: "standalone".into(),
            urls: vec!["redis://127.0.0.1:6379".into()],
            sentinel_service: None,
            password: None,
            password_file: None,
            key_prefix: "matrix-oidc-gateway:".into(),
            timeout: "500ms".into(),
        }
    }
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
#[serde(default, deny_unknown_fields)]
pub struct ListenFile {
    /// Address of the public listener (client traffic).
    pub public: String,
    /// Address of an HTTPS public listener (the same service as `public`, with TLS terminated
    /// by the gateway); needs `tls_cert_file` and `tls_key_file`.
    pub public_tls: Option<String>,
    /// PEM certificate chain of the HTTPS listener.
    pub tls_cert_file: Option<String>,
    /// PEM private key of the HTTPS listener.
    pub tls_key_file: Option<String>,
    /// Worker threads of the public listener.
    pub threads: usize,
    /// Trust `X-Forwarded-For` from the client (only behind a trusted load balancer).
    pub trust_forwarded_headers: bool,
    /// Address of the admin listener (metrics, health, admin API); loopback by default.
    pub admin: String,
    /// On SIGTERM, how long requests in flight (`/sync` long-polls included) may take to finish.
    pub shutdown_grace: String,
    /// On SIGTERM, how long to keep accepting (answering with `Connection: close`) before the
    /// listener closes, for load balancers that notice a stopping replica late.
    pub shutdown_delay: String,
    /// A private directory for the graceful upgrade's socket and the pid file; unset, SIGQUIT
    /// is a graceful stop and `--upgrade`/`--reload` are refused.
    pub runtime_dir: Option<String>,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            public: "0.0.0.0:8008".into(),
            public_tls: None,
            tls_cert_file: None,
            tls_key_file: None,
            threads: 1,
            trust_forwarded_headers: false,
            admin: "127.0.0.1:9090".into(),
            shutdown_grace: "35s".into(),
            shutdown_delay: "0s".into(),
            runtime_dir: None,
        }
    }
}

/// `[homeserver]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HomeserverFile {
    /// Base URL of the homeserver's client listener, `http://` or `https://`.
    pub url: Option<String>,
    /// The Matrix server name (the part after `:` in user IDs).
    pub server_name: Option<String>,
    /// Upstream connect timeout.
    pub connect_timeout: String,
    /// Upstream read timeout (must exceed the longest `/sync` long-poll).
    pub read_timeout: String,
    /// `synapse`, `dendrite`, `conduit`, `tuwunel` or `generic`: picks defaults and quirks.
    pub kind: String,
    /// `appservice_login`, `appservice_masquerade` or `headers` (default depends on `kind`).
    pub binding: Option<String>,
    /// The application service token registered at the homeserver (appservice bindings).
    pub as_token: Option<String>,
    /// A file holding the AS token; its content is trimmed.
    pub as_token_file: Option<String>,
    /// The application service's own localpart (its registration's `sender_localpart`): no
    /// token may act as that user.
    pub appservice_sender: String,
    /// More localparts no token may act as: the homeserver's own accounts (Synapse's
    /// server-notices user, other appservices' bots).
    pub reserved_localparts: Vec<String>,
    /// Let clients reach homeserver admin APIs (`/_synapse/admin`, `/_dendrite/admin`) through
    /// the public listener.
    pub expose_admin_api: bool,
    /// A homeserver admin access token: deactivation through the Synapse admin API (Synapse,
    /// tuwunel); the password stage of cross-signing uploads (Dendrite).
    pub admin_token: Option<String>,
    /// A file holding that admin token; its content is trimmed.
    pub admin_token_file: Option<String>,
}

impl Default for HomeserverFile {
    fn default() -> Self {
        Self {
            url: None,
            server_name: None,
            connect_timeout: "5s".into(),
            read_timeout: "300s".into(),
            kind: "generic".into(),
            binding: None,
            as_token: None,
            as_token_file: None,
            appservice_sender: "oidc-gateway".into(),
            reserved_localparts: Vec::new(),
            expose_admin_api: false,
            admin_token: None,
            admin_token_file: None,
        }
    }
}

/// `[[issuers]]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    pub client_auth: String,
    /// The client secret (or shared secret for `bearer`).
    pub client_secret: Option<String>,
    /// A file holding the client secret; its content is trimmed.
    pub client_secret_file: Option<String>,
    /// Timeout of one request to the OP.
    pub timeout: String,
    /// Largest introspection or discovery answer accepted, in bytes.
    pub max_response_bytes: usize,
    /// Introspection calls to this OP in flight at once (a flood of new tokens cannot exceed it).
    pub max_concurrent_introspections: usize,
    /// Requests that may wait for an introspection slot; beyond that they are shed with 503.
    pub introspection_queue: usize,
    /// How often the discovery document is re-read.
    pub metadata_refresh: String,
    /// `token_type` values of an introspection answer that mean "access token"
    /// (compared case-insensitively; `refresh_token` is always refused).
    pub access_token_types: Vec<String>,
    /// Refuse active answers without `token_type` (oidc-provider omits it for refresh tokens).
    pub require_token_type: bool,
    /// `introspection`, `jwt` or `auto` (JWT-shaped tokens verified locally, others introspected).
    pub mode: String,
    /// Accepted `aud` values of JWT access tokens (one must be present).
    pub audiences: Vec<String>,
    /// JWT signature algorithms accepted.
    pub algorithms: Vec<String>,
    /// Accepted JWT `typ` header values (case-insensitive; `application/` prefix optional).
    pub token_types: Vec<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    pub leeway: String,
    /// Shared secret for HS256/HS384/HS512 JWTs (HMAC is refused without it).
    pub hmac_secret: Option<String>,
    /// A file holding the HMAC secret; its content is trimmed.
    pub hmac_secret_file: Option<String>,
    /// Override of the JWKS URL (default: `jwks_uri` from discovery).
    pub jwks_uri: Option<String>,
    /// Shortest interval between scheduled JWKS refreshes (lower bound for `Cache-Control`).
    pub jwks_refresh_min: String,
    /// Longest interval between scheduled JWKS refreshes (upper bound, and the default).
    pub jwks_refresh_max: String,
    /// At most one unscheduled JWKS fetch (for an unknown `kid`) per this interval.
    pub jwks_refetch_interval: String,
    /// Also introspect JWTs at this issuer (closes the revocation gap for OPs that can).
    pub introspect_jwts: bool,
    /// `aud` values accepted on back-channel logout tokens besides `client_id`: the client IDs
    /// of the Matrix clients the OP logs users in with.
    pub logout_audiences: Vec<String>,
}

impl Default for IssuerFile {
    fn default() -> Self {
        Self {
            issuer: None,
            discovery_url: None,
            introspection_endpoint: None,
            client_id: None,
            client_auth: "client_secret_basic".into(),
            client_secret: None,
            client_secret_file: None,
            timeout: "5s".into(),
            max_response_bytes: 1024 * 1024,
            max_concurrent_introspections: 64,
            introspection_queue: 256,
            metadata_refresh: "300s".into(),
            access_token_types: vec!["access_token".into(), "Bearer".into()],
            require_token_type: true,
            mode: "introspection".into(),
            audiences: Default::default(),
            algorithms: [
                "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
            ]
            .map(String::from)
            .to_vec(),
            token_types: vec!["at+jwt".into()],
            leeway: "30s".into(),
            hmac_secret: None,
            hmac_secret_file: None,
            jwks_uri: None,
            jwks_refresh_min: "60s".into(),
            jwks_refresh_max: "1h".into(),
            jwks_refetch_interval: "30s".into(),
            introspect_jwts: false,
            logout_audiences: Default::default(),
        }
    }
}

/// `[auth]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthFile {
    /// Accept the deprecated `access_token` query parameter.
    pub allow_query_token: bool,
    /// Tokens longer than this are refused without asking the OP.
    pub max_token_length: usize,
    /// Claims tried in order for the Matrix localpart.
    pub user_id_claims: Vec<String>,
    /// Which endpoints a guest-scoped token may call: `spec` or `synapse`.
    pub guest_endpoints: String,
    /// Seconds announced in `Retry-After` when the OP is unavailable.
    pub retry_after_secs: u32,
    /// Tokens the gateway has not cached that one client address may present per second (0:
    /// no budget).
    pub new_tokens_per_address: u32,
    /// How many such tokens one address may present at once before the rate applies.
    pub new_tokens_burst: u32,
}

impl Default for AuthFile {
    fn default() -> Self {
        Self {
            allow_query_token: true,
            max_token_length: 4096,
            user_id_claims: vec!["username".into(), "sub".into()],
            guest_endpoints: "spec".into(),
            retry_after_secs: 5,
            new_tokens_per_address: 100,
            new_tokens_burst: 1000,
        }
    }
}

/// `[cache]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheFile {
    /// Longest time an active verdict is reused.
    pub max_ttl: String,
    /// How long an inactive verdict is reused.
    pub negative_ttl: String,
    /// Most cached verdicts.
    pub capacity: u64,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            max_ttl: "120s".into(),
            negative_ttl: "10s".into(),
            capacity: 100_000,
        }
    }
}

/// `[identity_headers]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityHeadersFile {
    /// Carries the Matrix user ID.
    pub user_id: String,
    /// Carries the device ID (absent when the token names no device).
    pub device_id: String,
    /// Carries the granted scope.
    pub scope: String,
    /// `true` for a guest-scoped token, `false` otherwise.
    pub guest: String,
    /// Carries the OIDC subject (`sub`).
    pub subject: String,
    /// Carries the HMAC signature over the identity headers (only with a signing secret).
    pub signature: String,
    /// HMAC-SHA256 key for the signature header.
    pub signing_secret: Option<String>,
    /// A file holding the HMAC key; its content is trimmed.
    pub signing_secret_file: Option<String>,
    /// More client headers to remove before forwarding.
    pub also_strip: Vec<String>,
}

impl Default for IdentityHeadersFile {
    fn default() -> Self {
        Self {
            user_id: "X-Matrix-User-Id".into(),
            device_id: "X-Matrix-Device-Id".into(),
            scope: "X-Matrix-Scope".into(),
            guest: "X-Matrix-Guest".into(),
            subject: "X-OIDC-Subject".into(),
            signature: "X-Matrix-Identity-Signature".into(),
            signing_secret: None,
            signing_secret_file: None,
            also_strip: Default::default(),
        }
    }
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogFile {
    /// `pretty` or `json`.
    pub format: String,
    /// A `tracing` filter directive such as `info` or `matrix_oidc_gateway=debug`.
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            level: "info".into(),
        }
    }
}

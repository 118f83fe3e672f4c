//! Configuration: the TOML file, environment overrides, and validation into the internal
//! [`Config`] that the rest of the gateway reads.
//!
//! Two layers (see `docs/configuration.md`):
//! - [`file`]: the serde model of what operators write (`deny_unknown_fields`, defaults);
//! - [`Config`]: parsed, validated types (`Url`, `Duration`, `HeaderName`, secrets).
//!
//! [`load`] reports **every** problem at once, each naming its key, so `--check-config` can list
//! them all. Environment variables override file keys with one rule: `MATRIX_OIDC_GATEWAY__`
//! followed by the key path in upper case joined with `__` (array entries by index), e.g.
//! `MATRIX_OIDC_GATEWAY__ISSUERS__0__CLIENT_SECRET`. A value that parses as a TOML value (number,
//! boolean, array, quoted string) is taken as that; anything else is a plain string.

pub mod file;
pub mod secret;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use url::Url;

pub use secret::Secret;

/// The prefix of environment-variable overrides.
pub const ENV_PREFIX: &str = "MATRIX_OIDC_GATEWAY__";

/// One configuration problem, naming the key that causes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `issuers[0].client_secret_file`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found while loading, in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records a problem under `key`.
    pub fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

// === internal configuration ===

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

// === loading ===

/// Reads the file (if any), applies environment overrides from `env`, and validates.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, Problems> {
    let mut problems = Problems::default();
    let mut root = match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(t) => t,
                Err(e) => {
                    problems.add(&p.display().to_string(), format!("not valid TOML: {e}"));
                    return Err(problems);
                }
            },
            Err(e) => {
                problems.add("--config", format!("cannot read {}: {e}", p.display()));
                return Err(problems);
            }
        },
        None => toml::Table::new(),
    };
    apply_env(&mut root, env, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let file: file::FileConfig = match toml::Value::Table(root).try_into() {
        Ok(f) => f,
        Err(e) => {
            problems.add("(file)", e.to_string().trim().to_owned());
            return Err(problems);
        }
    };
    validate(file)
}

/// Parses a TOML string (tests and `--check-config` on inline text).
pub fn load_str(text: &str) -> Result<Loaded, Problems> {
    let mut problems = Problems::default();
    let root: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            problems.add("(file)", format!("not valid TOML: {e}"));
            return Err(problems);
        }
    };
    let file: file::FileConfig = match toml::Value::Table(root).try_into() {
        Ok(f) => f,
        Err(e) => {
            problems.add("(file)", e.to_string().trim().to_owned());
            return Err(problems);
        }
    };
    validate(file)
}

fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Problems,
) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|s| s.is_empty()) {
            problems.add(&name, "empty key segment");
            continue;
        }
        let value = parse_env_value(&raw);
        if let Err(msg) = set_path(root, &path, value) {
            problems.add(&name, msg);
        }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let next_is_index = rest[0].parse::<usize>().is_ok();
    let entry = table.entry(first.clone()).or_insert_with(|| {
        if next_is_index {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::Table(toml::Table::new())
        }
    });
    set_in_value(entry, rest, value)
}

fn set_in_value(node: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    match node {
        toml::Value::Table(t) => set_path(t, path, value),
        toml::Value::Array(items) => {
            let (first, rest) = path.split_first().ok_or("empty key")?;
            let idx: usize = first
                .parse()
                .map_err(|_| format!("`{first}` is not an array index"))?;
            if idx > items.len() {
                return Err(format!(
                    "index {idx} skips entries (array has {})",
                    items.len()
                ));
            }
            if idx == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if rest.is_empty() {
                items[idx] = value;
                Ok(())
            } else {
                set_in_value(&mut items[idx], rest, value)
            }
        }
        _ => Err("overrides a key that is not a table".into()),
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. \"500ms\", \"30s\", \"5m\")"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
    }
}

fn duration(problems: &mut Problems, key: &str, s: &str) -> Duration {
    parse_duration(s).unwrap_or_else(|e| {
        problems.add(key, e);
        Duration::ZERO
    })
}

fn header_name(problems: &mut Problems, key: &str, s: &str) -> HeaderName {
    HeaderName::from_bytes(s.as_bytes()).unwrap_or_else(|_| {
        problems.add(key, format!("{s:?} is not a valid HTTP header name"));
        HeaderName::from_static("x-invalid")
    })
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn http_url(
    problems: &mut Problems,
    warnings: &mut Vec<String>,
    key: &str,
    s: &str,
) -> Option<Url> {
    match Url::parse(s) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
            if u.host().is_none() {
                problems.add(key, format!("{s:?} has no host"));
                return None;
            }
            if u.scheme() == "http" && !is_loopback_host(&u) {
                warnings.push(format!(
                    "{key}: {s:?} uses plain http:// to a non-loopback host; use https:// in production"
                ));
            }
            Some(u)
        }
        Ok(_) => {
            problems.add(key, format!("{s:?} must be an http:// or https:// URL"));
            None
        }
        Err(e) => {
            problems.add(key, format!("{s:?} is not a URL ({e})"));
            None
        }
    }
}

fn jwt_settings(
    p: &mut Problems,
    warnings: &mut Vec<String>,
    k: &dyn Fn(&str) -> String,
    iss: &file::IssuerFile,
) -> JwtSettings {
    use jsonwebtoken::Algorithm;
    if iss.audiences.is_empty() {
        p.add(
            &k("audiences"),
            "required with mode jwt or auto: the `aud` a JWT must carry",
        );
    }
    let hmac_secret = secret::resolve(
        p,
        &k("hmac_secret"),
        iss.hmac_secret.as_deref(),
        iss.hmac_secret_file.as_deref(),
        false,
    );
    let mut algorithms = Vec::new();
    for (j, name) in iss.algorithms.iter().enumerate() {
        let key = k(&format!("algorithms[{j}]"));
        match name.parse::<Algorithm>() {
            Ok(alg @ (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)) => {
                if hmac_secret.is_none() {
                    p.add(
                        &key,
                        format!("{name} needs `hmac_secret` (HMAC is refused otherwise)"),
                    );
                }
                algorithms.push(alg);
            }
            Ok(alg) => algorithms.push(alg),
            Err(_) => p.add(
                &key,
                format!("{name:?} is not a supported JWS algorithm (\"none\" never is)"),
            ),
        }
    }
    if iss.algorithms.is_empty() {
        p.add(&k("algorithms"), "must list at least one algorithm");
    }
    if iss.token_types.is_empty() {
        p.add(&k("token_types"), "must list at least one `typ`");
    }
    let token_types = iss.token_types.iter().map(|t| normalize_typ(t)).collect();
    let jwks_uri = iss
        .jwks_uri
        .as_deref()
        .and_then(|u| http_url(p, warnings, &k("jwks_uri"), u));
    let refresh_min = duration(p, &k("jwks_refresh_min"), &iss.jwks_refresh_min);
    let refresh_max = duration(p, &k("jwks_refresh_max"), &iss.jwks_refresh_max);
    if refresh_min > refresh_max {
        p.add(&k("jwks_refresh_min"), "must not exceed jwks_refresh_max");
    }
    if refresh_min < Duration::from_secs(1) {
        p.add(&k("jwks_refresh_min"), "must be at least 1s");
    }
    JwtSettings {
        audiences: iss.audiences.clone(),
        algorithms,
        token_types,
        leeway: duration(p, &k("leeway"), &iss.leeway),
        hmac_secret,
        jwks_uri,
        refresh_min,
        refresh_max,
        refetch_interval: duration(p, &k("jwks_refetch_interval"), &iss.jwks_refetch_interval),
        introspect: iss.introspect_jwts,
    }
}

/// `typ` values compare case-insensitively and without the `application/` prefix (RFC 7515 §4.1.9).
pub fn normalize_typ(t: &str) -> String {
    let lower = t.to_ascii_lowercase();
    lower
        .strip_prefix("application/")
        .map(str::to_owned)
        .unwrap_or(lower)
}

/// Whether `name` is a valid Matrix server name (host with optional port).
fn valid_server_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 230
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// `store.encryption_key[_file]` and `store.previous_encryption_key[_file]` as a sealer.
fn store_sealer(
    p: &mut Problems,
    store: &file::StoreFile,
    required: bool,
) -> Option<std::sync::Arc<crate::store::seal::Sealer>> {
    const HOW: &str = "must be 32 random bytes written as 64 hex digits or base64 \
                       (generate one with `openssl rand -hex 32`)";
    let mut key = |name: &str, value: Option<&str>, file: Option<&str>| {
        let s = secret::resolve(p, name, value, file, false)?;
        let parsed = crate::store::seal::parse_key(s.expose());
        if parsed.is_none() {
            p.add(name, HOW);
        }
        parsed
    };
    let current = key(
        "store.encryption_key",
        store.encryption_key.as_deref(),
        store.encryption_key_file.as_deref(),
    );
    let previous = key(
        "store.previous_encryption_key",
        store.previous_encryption_key.as_deref(),
        store.previous_encryption_key_file.as_deref(),
    );
    if required && store.encryption_key.is_none() && store.encryption_key_file.is_none() {
        p.add(
            "store.encryption_key",
            "required with binding = appservice_login (upstream device tokens are encrypted at \
             rest): set `store.encryption_key` or `store.encryption_key_file`; generate one with \
             `openssl rand -hex 32`",
        );
    }
    if previous.is_some() && current.is_none() {
        p.add(
            "store.previous_encryption_key",
            "only meaningful next to store.encryption_key (key rotation)",
        );
    }
    if current.is_some() && current == previous {
        p.add(
            "store.previous_encryption_key",
            "is the same key as store.encryption_key",
        );
    }
    let current = current?;
    match crate::store::seal::Sealer::new(&current, previous.as_ref()) {
        Ok(s) => Some(std::sync::Arc::new(s)),
        Err(e) => {
            p.add("store.encryption_key", e.to_string());
            None
        }
    }
}

fn validate(f: file::FileConfig) -> Result<Loaded, Problems> {
    let mut p = Problems::default();
    let mut warnings = Vec::new();

    // [listen]
    let public = f.listen.public.parse::<SocketAddr>().unwrap_or_else(|_| {
        p.add(
            "listen.public",
            format!(
                "{:?} is not an address like \"0.0.0.0:8008\"",
                f.listen.public
            ),
        );
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    let admin = f.listen.admin.parse::<SocketAddr>().unwrap_or_else(|_| {
        p.add(
            "listen.admin",
            format!(
                "{:?} is not an address like \"127.0.0.1:9090\"",
                f.listen.admin
            ),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    if !admin.ip().is_loopback() {
        warnings.push(format!(
            "listen.admin: {admin} is not a loopback address; the admin API must not be reachable by clients"
        ));
    }
    if admin == public {
        p.add("listen.admin", "must differ from listen.public");
    }
    if f.listen.threads == 0 {
        p.add("listen.threads", "must be at least 1");
    }
    let shutdown_grace = duration(&mut p, "listen.shutdown_grace", &f.listen.shutdown_grace);
    let shutdown_delay = duration(&mut p, "listen.shutdown_delay", &f.listen.shutdown_delay);
    let runtime_dir = match f.listen.runtime_dir.as_deref() {
        None | Some("") => None,
        Some(d) if !Path::new(d).is_absolute() => {
            p.add(
                "listen.runtime_dir",
                format!("{d:?} must be an absolute path"),
            );
            None
        }
        Some(d) => Some(PathBuf::from(d)),
    };

    // [homeserver]
    let hs = f.homeserver.unwrap_or(file::HomeserverFile {
        url: None,
        server_name: None,
        connect_timeout: "5s".into(),
        read_timeout: "300s".into(),
        kind: "generic".into(),
        binding: None,
        as_token: None,
        as_token_file: None,
        expose_admin_api: false,
        admin_token: None,
        admin_token_file: None,
    });
    let kind = match hs.kind.as_str() {
        "synapse" => HomeserverKind::Synapse,
        "dendrite" => HomeserverKind::Dendrite,
        "conduit" => HomeserverKind::Conduit,
        "tuwunel" => HomeserverKind::Tuwunel,
        "generic" => HomeserverKind::Generic,
        other => {
            p.add(
                "homeserver.kind",
                format!("{other:?} is not one of synapse, dendrite, conduit, tuwunel, generic"),
            );
            HomeserverKind::Generic
        }
    };
    let binding = match hs.binding.as_deref() {
        None => match kind {
            // Per-device credentials for every stock homeserver: the homeserver then enforces
            // identity itself (docs/homeservers.md says why masquerade is opt-in only).
            HomeserverKind::Dendrite
            | HomeserverKind::Conduit
            | HomeserverKind::Synapse
            | HomeserverKind::Tuwunel => BindingMode::AppserviceLogin,
            HomeserverKind::Generic => BindingMode::Headers,
        },
        Some("appservice_login") => BindingMode::AppserviceLogin,
        Some("appservice_masquerade") => BindingMode::AppserviceMasquerade,
        Some("headers") => BindingMode::Headers,
        Some(other) => {
            p.add(
                "homeserver.binding",
                format!("{other:?} is not one of appservice_login, appservice_masquerade, headers"),
            );
            BindingMode::Headers
        }
    };
    if binding == BindingMode::AppserviceMasquerade {
        warnings.push(
            "homeserver.binding: appservice_masquerade sends the appservice token on every user's \
             behalf, lending them its powers (no rate limits or account-lock checks, room member \
             lists without membership on Synapse; docs/homeservers.md); prefer appservice_login"
                .to_owned(),
        );
    }
    if binding == BindingMode::AppserviceMasquerade
        && matches!(kind, HomeserverKind::Dendrite | HomeserverKind::Conduit)
    {
        p.add(
            "homeserver.binding",
            format!(
                "{} cannot masquerade a device through the appservice API: use appservice_login",
                hs.kind
            ),
        );
    }
    let as_token = secret::resolve(
        &mut p,
        "homeserver.as_token",
        hs.as_token.as_deref(),
        hs.as_token_file.as_deref(),
        binding != BindingMode::Headers,
    );
    let hs_url = match hs.url.as_deref() {
        Some(u) => http_url(&mut p, &mut warnings, "homeserver.url", u),
        None => {
            p.add("homeserver.url", "required");
            None
        }
    };
    if let Some(u) = &hs_url {
        if u.path() != "/" && !u.path().is_empty() {
            p.add(
                "homeserver.url",
                "must not have a path: the gateway forwards client paths unchanged",
            );
        }
    }
    let server_name = match hs.server_name {
        Some(s) if valid_server_name(&s) => s,
        Some(s) => {
            p.add(
                "homeserver.server_name",
                format!("{s:?} is not a valid server name"),
            );
            String::new()
        }
        None => {
            p.add("homeserver.server_name", "required");
            String::new()
        }
    };
    let connect_timeout = duration(&mut p, "homeserver.connect_timeout", &hs.connect_timeout);
    let read_timeout = duration(&mut p, "homeserver.read_timeout", &hs.read_timeout);

    // [[issuers]]
    if f.issuers.is_empty() {
        p.add("issuers", "at least one [[issuers]] entry is required");
    }
    let mut issuers = Vec::new();
    for (i, iss) in f.issuers.iter().enumerate() {
        let k = |name: &str| format!("issuers[{i}].{name}");
        let issuer = match iss.issuer.as_deref() {
            Some(s) => {
                http_url(&mut p, &mut warnings, &k("issuer"), s);
                s.to_owned()
            }
            None => {
                p.add(&k("issuer"), "required");
                String::new()
            }
        };
        let discovery_url = match iss.discovery_url.as_deref() {
            Some(s) => http_url(&mut p, &mut warnings, &k("discovery_url"), s),
            None if !issuer.is_empty() => Url::parse(&format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            ))
            .ok(),
            None => None,
        };
        let introspection_endpoint = iss
            .introspection_endpoint
            .as_deref()
            .and_then(|s| http_url(&mut p, &mut warnings, &k("introspection_endpoint"), s));
        let client_auth = match iss.client_auth.as_str() {
            "client_secret_basic" => ClientAuthMethod::ClientSecretBasic,
            "client_secret_post" => ClientAuthMethod::ClientSecretPost,
            "bearer" => ClientAuthMethod::Bearer,
            other => {
                p.add(
                    &k("client_auth"),
                    format!(
                        "{other:?} is not one of client_secret_basic, client_secret_post, bearer"
                    ),
                );
                ClientAuthMethod::ClientSecretBasic
            }
        };
        let mode = match iss.mode.as_str() {
            "introspection" => VerifyMode::Introspection,
            "jwt" => VerifyMode::Jwt,
            "auto" => VerifyMode::Auto,
            other => {
                p.add(
                    &k("mode"),
                    format!("{other:?} is not one of introspection, jwt, auto"),
                );
                VerifyMode::Introspection
            }
        };
        let introspects = mode != VerifyMode::Jwt || iss.introspect_jwts;
        if introspects && client_auth != ClientAuthMethod::Bearer && iss.client_id.is_none() {
            p.add(
                &k("client_id"),
                format!("required with client_auth = {:?}", iss.client_auth),
            );
        }
        let secret = secret::resolve(
            &mut p,
            &k("client_secret"),
            iss.client_secret.as_deref(),
            iss.client_secret_file.as_deref(),
            introspects,
        );
        let timeout = duration(&mut p, &k("timeout"), &iss.timeout);
        if timeout.is_zero() {
            p.add(&k("timeout"), "must be greater than zero");
        }
        let metadata_refresh = duration(&mut p, &k("metadata_refresh"), &iss.metadata_refresh);
        if metadata_refresh < Duration::from_secs(1) {
            p.add(&k("metadata_refresh"), "must be at least 1s");
        }
        if iss.access_token_types.is_empty() {
            p.add(
                &k("access_token_types"),
                "must list at least one token type",
            );
        }
        if iss
            .access_token_types
            .iter()
            .any(|t| t.eq_ignore_ascii_case("refresh_token"))
        {
            p.add(&k("access_token_types"), "must not accept refresh_token");
        }
        if iss.max_response_bytes < 1024 {
            p.add(&k("max_response_bytes"), "must be at least 1024");
        }
        if iss.max_concurrent_introspections == 0 {
            p.add(&k("max_concurrent_introspections"), "must be at least 1");
        }
        let jwt = (mode != VerifyMode::Introspection)
            .then(|| jwt_settings(&mut p, &mut warnings, &k, iss));
        if let Some(discovery_url) = discovery_url {
            issuers.push(Issuer {
                mode,
                jwt,
                issuer,
                discovery_url,
                introspection_endpoint,
                client_id: iss.client_id.clone(),
                client_auth,
                client_secret: secret,
                timeout,
                max_response_bytes: iss.max_response_bytes,
                max_concurrent_introspections: iss.max_concurrent_introspections,
                introspection_queue: iss.introspection_queue,
                metadata_refresh,
                access_token_types: iss.access_token_types.clone(),
                require_token_type: iss.require_token_type,
                logout_audiences: iss
                    .client_id
                    .iter()
                    .chain(iss.logout_audiences.iter())
                    .cloned()
                    .collect(),
            });
        }
    }
    if issuers.len() > 1 {
        for (i, a) in issuers.iter().enumerate() {
            if issuers[..i].iter().any(|b| b.issuer == a.issuer) {
                p.add(&format!("issuers[{i}].issuer"), "configured twice");
            }
        }
    }

    // [auth]
    if f.auth.max_token_length < 16 {
        p.add("auth.max_token_length", "must be at least 16");
    }
    if f.auth.user_id_claims.is_empty() {
        p.add("auth.user_id_claims", "must name at least one claim");
    }
    let guest_endpoints = match f.auth.guest_endpoints.as_str() {
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

    // [cache]
    let max_ttl = duration(&mut p, "cache.max_ttl", &f.cache.max_ttl);
    let negative_ttl = duration(&mut p, "cache.negative_ttl", &f.cache.negative_ttl);
    if negative_ttl > max_ttl {
        p.add("cache.negative_ttl", "must not exceed cache.max_ttl");
    }
    if f.cache.capacity == 0 {
        p.add("cache.capacity", "must be at least 1");
    }

    // [identity_headers]
    let h = &f.identity_headers;
    let identity_headers = IdentityHeaders {
        user_id: header_name(&mut p, "identity_headers.user_id", &h.user_id),
        device_id: header_name(&mut p, "identity_headers.device_id", &h.device_id),
        scope: header_name(&mut p, "identity_headers.scope", &h.scope),
        guest: header_name(&mut p, "identity_headers.guest", &h.guest),
        subject: header_name(&mut p, "identity_headers.subject", &h.subject),
        signature: header_name(&mut p, "identity_headers.signature", &h.signature),
        signing_secret: secret::resolve(
            &mut p,
            "identity_headers.signing_secret",
            h.signing_secret.as_deref(),
            h.signing_secret_file.as_deref(),
            false,
        ),
        also_strip: h
            .also_strip
            .iter()
            .enumerate()
            .map(|(i, s)| header_name(&mut p, &format!("identity_headers.also_strip[{i}]"), s))
            .collect(),
    };
    if let Some(s) = &identity_headers.signing_secret {
        if s.expose().len() < 32 {
            p.add(
                "identity_headers.signing_secret",
                "must be at least 32 bytes",
            );
        }
    }

    // [discovery]
    let public_base_url = match f.discovery.public_base_url.as_deref() {
        Some(u) => http_url(&mut p, &mut warnings, "discovery.public_base_url", u),
        None => Url::parse(&format!("https://{server_name}")).ok(),
    };
    let account_management_uri = f
        .discovery
        .account_management_uri
        .as_deref()
        .and_then(|u| http_url(&mut p, &mut warnings, "discovery.account_management_uri", u));
    let registration_endpoint = f
        .discovery
        .registration_endpoint
        .as_deref()
        .and_then(|u| http_url(&mut p, &mut warnings, "discovery.registration_endpoint", u));
    let hs_admin_token = secret::resolve(
        &mut p,
        "homeserver.admin_token",
        hs.admin_token.as_deref(),
        hs.admin_token_file.as_deref(),
        false,
    );
    let admin_token = secret::resolve(
        &mut p,
        "admin.token",
        f.admin.token.as_deref(),
        f.admin.token_file.as_deref(),
        false,
    );
    if admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        p.add("admin.token", "must be at least 16 characters");
    }
    let n = &f.notifications;
    for (key, path) in [
        (
            "notifications.backchannel_logout_path",
            &n.backchannel_logout_path,
        ),
        ("notifications.revocation_path", &n.revocation_path),
    ] {
        if !path.starts_with('/') || path.contains('?') || path.contains('#') {
            p.add(
                key,
                format!("{path:?} must be an absolute path without query or fragment"),
            );
        } else if path.starts_with("/_matrix/") || path.starts_with("/.well-known/") {
            p.add(key, format!("{path:?} must not shadow a Matrix path"));
        }
    }
    if n.backchannel_logout_path == n.revocation_path {
        p.add(
            "notifications.revocation_path",
            "must differ from backchannel_logout_path",
        );
    }
    let access_token_revocation_signs_out = match n.revocation_signs_out.as_str() {
        "any" => true,
        "refresh_token" => false,
        other => {
            p.add(
                "notifications.revocation_signs_out",
                format!("{other:?} is not one of any, refresh_token"),
            );
            true
        }
    };
    let revocation_retention = duration(
        &mut p,
        "notifications.revocation_retention",
        &n.revocation_retention,
    );
    if n.max_revocations == 0 {
        p.add("notifications.max_revocations", "must be at least 1");
    }
    let redis = match f.store.backend.as_str() {
        "sqlite" => None,
        "redis" => {
            let r = &f.redis;
            let mode = match r.mode.as_str() {
                "standalone" => RedisMode::Standalone,
                "sentinel" => RedisMode::Sentinel,
                "cluster" => {
                    p.add(
                        "redis.mode",
                        "\"cluster\" is not supported (no failover test proves it): use standalone or sentinel",
                    );
                    RedisMode::Standalone
                }
                other => {
                    p.add(
                        "redis.mode",
                        format!("{other:?} is not one of standalone, sentinel"),
                    );
                    RedisMode::Standalone
                }
            };
            if r.urls.is_empty() {
                p.add("redis.urls", "must list at least one URL");
            }
            for (i, u) in r.urls.iter().enumerate() {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    p.add(
                        &format!("redis.urls[{i}]"),
                        format!("{u:?} must start with redis:// or rediss://"),
                    );
                }
            }
            if mode == RedisMode::Sentinel && r.sentinel_service.is_none() {
                p.add(
                    "redis.sentinel_service",
                    "required with mode = \"sentinel\"",
                );
            }
            if r.key_prefix.is_empty() {
                p.add(
                    "redis.key_prefix",
                    "must not be empty (several gateways may share a Redis)",
                );
            }
            Some(RedisSettings {
                mode,
                urls: r.urls.clone(),
                sentinel_service: r.sentinel_service.clone(),
                password: secret::resolve(
                    &mut p,
                    "redis.password",
                    r.password.as_deref(),
                    r.password_file.as_deref(),
                    false,
                ),
                key_prefix: r.key_prefix.clone(),
                timeout: duration(&mut p, "redis.timeout", &r.timeout),
            })
        }
        other => {
            p.add(
                "store.backend",
                format!("{other:?} is not one of sqlite, redis"),
            );
            None
        }
    };
    if f.store.path.trim().is_empty() {
        p.add("store.path", "must not be empty");
    }
    let sealer = store_sealer(&mut p, &f.store, binding == BindingMode::AppserviceLogin);

    // [log]
    let format = match f.log.format.as_str() {
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
    if tracing_subscriber::EnvFilter::try_new(&f.log.level).is_err() {
        p.add(
            "log.level",
            format!("{:?} is not a tracing filter", f.log.level),
        );
    }

    if !p.is_empty() {
        return Err(p);
    }
    let hs_url = hs_url.ok_or_else(Problems::default)?;
    let public_base_url = public_base_url.ok_or_else(Problems::default)?;
    let tls = hs_url.scheme() == "https";
    let host = hs_url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = hs_url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    Ok(Loaded {
        config: Config {
            listen: Listen {
                public,
                threads: f.listen.threads,
                trust_forwarded_headers: f.listen.trust_forwarded_headers,
                admin,
                shutdown_grace,
                shutdown_delay,
                runtime_dir,
            },
            homeserver: Homeserver {
                url: hs_url,
                host,
                port,
                tls,
                server_name,
                connect_timeout,
                read_timeout,
                kind,
                binding,
                as_token,
                expose_admin_api: hs.expose_admin_api,
                admin_token: hs_admin_token,
            },
            issuers,
            auth: AuthPolicy {
                allow_query_token: f.auth.allow_query_token,
                max_token_length: f.auth.max_token_length,
                user_id_claims: f.auth.user_id_claims,
                guest_endpoints,
                retry_after_secs: f.auth.retry_after_secs,
            },
            cache: CachePolicy {
                max_ttl,
                negative_ttl,
                capacity: f.cache.capacity,
            },
            identity_headers,
            log: LogSettings {
                format,
                level: f.log.level,
            },
            store: StoreSettings {
                path: f.store.path.into(),
                redis,
                sealer,
            },
            discovery: Discovery {
                public_base_url,
                account_management_uri,
                registration_endpoint,
            },
            notifications: Notifications {
                backchannel_logout_path: f.notifications.backchannel_logout_path,
                revocation_proxy: f.notifications.revocation_proxy,
                revocation_path: f.notifications.revocation_path,
                revocation_retention,
                access_token_revocation_signs_out,
                max_revocations: f.notifications.max_revocations,
            },
            admin_token,
        },
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [homeserver]
        url = "http://127.0.0.1:8080"
        server_name = "example.org"
        [[issuers]]
        issuer = "https://op.example.org/"
        client_id = "gw"
        client_secret = "s3cret"
    "#;

    #[test]
    fn the_runtime_dir_must_be_absolute_and_the_stop_timings_parse() {
        let text = format!("[listen]\nruntime_dir = \"run\"\nshutdown_delay = \"soon\"\n{MINIMAL}");
        let Err(problems) = load_str(&text) else {
            panic!("a relative runtime_dir was accepted")
        };
        let problems = problems.to_string();
        assert!(problems.contains("listen.runtime_dir"), "{problems}");
        assert!(problems.contains("listen.shutdown_delay"), "{problems}");
        let c = load_str(MINIMAL).expect("valid").config;
        assert_eq!(c.listen.runtime_dir, None);
        assert_eq!(c.listen.shutdown_delay, Duration::ZERO);
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = load_str(MINIMAL).expect("valid").config;
        assert_eq!(c.cache.max_ttl, Duration::from_secs(120));
        assert_eq!(c.auth.max_token_length, 4096);
        assert_eq!(c.auth.user_id_claims, vec!["username", "sub"]);
        assert_eq!(
            c.issuers[0].discovery_url.as_str(),
            "https://op.example.org/.well-known/openid-configuration"
        );
        assert_eq!(c.homeserver.port, 8080);
        assert!(!c.homeserver.tls);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [listen]
            public = "nope"
            [homeserver]
            url = "ftp://x"
            [[issuers]]
            issuer = "https://op/"
            client_auth = "magic"
            client_secret = "a"
            client_secret_file = "/nonexistent"
            [cache]
            max_ttl = "10 parsecs"
        "#;
        let err = load_str(text).expect_err("invalid");
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "listen.public",
            "homeserver.url",
            "homeserver.server_name",
            "issuers[0].client_auth",
            "issuers[0].client_secret",
            "cache.max_ttl",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
    }

    #[test]
    fn redis_cluster_is_refused_and_sentinel_needs_its_service() {
        let with =
            |redis: &str| format!("{MINIMAL}\n[store]\nbackend = \"redis\"\n[redis]\n{redis}\n");
        let err = load_str(&with("mode = \"cluster\"")).expect_err("cluster");
        assert_eq!(err.0[0].key, "redis.mode");
        assert!(
            err.0[0].message.contains("not supported"),
            "{}",
            err.0[0].message
        );
        let err = load_str(&with("mode = \"sentinel\"")).expect_err("no service");
        assert_eq!(err.0[0].key, "redis.sentinel_service");
        let ok = load_str(&with(
            "mode = \"sentinel\"\nsentinel_service = \"m\"\nurls = [\"redis://s1:26379\"]",
        ))
        .expect("sentinel");
        assert_eq!(
            ok.config.store.redis.map(|r| r.mode),
            Some(RedisMode::Sentinel)
        );
    }

    #[test]
    fn unreadable_secret_file_names_the_file_key() {
        let text = MINIMAL.replace(
            "client_secret = \"s3cret\"",
            "client_secret_file = \"/nonexistent/op\"",
        );
        let err = load_str(&text).expect_err("invalid");
        assert_eq!(err.0[0].key, "issuers[0].client_secret_file");
        assert!(err.0[0].message.contains("/nonexistent/op"));
    }

    #[test]
    fn secret_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "  abc\n").unwrap();
        let text = MINIMAL.replace(
            "client_secret = \"s3cret\"",
            &format!("client_secret_file = {:?}", path.display().to_string()),
        );
        let c = load_str(&text).expect("valid").config;
        assert_eq!(c.issuers[0].client_secret.as_ref().unwrap().expose(), "abc");
        assert!(!format!("{:?}", c.issuers[0]).contains("abc"));
    }

    #[test]
    fn environment_overrides_every_kind_of_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let env = vec![
            (
                "MATRIX_OIDC_GATEWAY__CACHE__MAX_TTL".to_owned(),
                "30s".to_owned(),
            ),
            (
                "MATRIX_OIDC_GATEWAY__AUTH__ALLOW_QUERY_TOKEN".to_owned(),
                "false".to_owned(),
            ),
            (
                "MATRIX_OIDC_GATEWAY__ISSUERS__0__CLIENT_SECRET".to_owned(),
                "from-env".to_owned(),
            ),
            (
                "MATRIX_OIDC_GATEWAY__AUTH__USER_ID_CLAIMS".to_owned(),
                "[\"preferred_username\"]".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = load(Some(&path), env).expect("valid").config;
        assert_eq!(c.cache.max_ttl, Duration::from_secs(30));
        assert!(!c.auth.allow_query_token);
        assert_eq!(
            c.issuers[0].client_secret.as_ref().unwrap().expose(),
            "from-env"
        );
        assert_eq!(c.auth.user_id_claims, vec!["preferred_username"]);
    }

    #[test]
    fn environment_alone_can_configure_the_gateway() {
        let env = [
            ("HOMESERVER__URL", "http://127.0.0.1:8080"),
            ("HOMESERVER__SERVER_NAME", "example.org"),
            ("ISSUERS__0__ISSUER", "https://op.example.org/"),
            ("ISSUERS__0__CLIENT_AUTH", "bearer"),
            ("ISSUERS__0__CLIENT_SECRET", "shared"),
        ]
        .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_owned()));
        let c = load(None, env).expect("valid").config;
        assert_eq!(c.issuers[0].client_auth, ClientAuthMethod::Bearer);
    }

    #[test]
    fn plain_http_to_remote_host_warns_but_loads() {
        let text = MINIMAL.replace("http://127.0.0.1:8080", "http://matrix.internal:8008");
        let l = load_str(&text).expect("valid");
        assert!(l.warnings.iter().any(|w| w.starts_with("homeserver.url")));
    }

    const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn with_homeserver(extra: &str, store: &str) -> String {
        let text = MINIMAL.replace(
            "server_name = \"example.org\"",
            &format!("server_name = \"example.org\"\n{extra}"),
        );
        format!("{text}\n[store]\n{store}\n")
    }

    #[test]
    fn every_stock_homeserver_defaults_to_per_device_credentials() {
        let with = |kind: &str| {
            let text = with_homeserver(
                &format!("kind = \"{kind}\"\nas_token = \"t\""),
                &format!("encryption_key = \"{KEY}\""),
            );
            load_str(&text).expect("valid").config.homeserver.binding
        };
        assert_eq!(with("dendrite"), BindingMode::AppserviceLogin);
        assert_eq!(with("conduit"), BindingMode::AppserviceLogin);
        assert_eq!(with("synapse"), BindingMode::AppserviceLogin);
        assert_eq!(with("tuwunel"), BindingMode::AppserviceLogin);
        assert_eq!(with("generic"), BindingMode::Headers);
    }

    #[test]
    fn masquerade_is_opt_in_and_warned_about() {
        let text = with_homeserver(
            "kind = \"synapse\"\nbinding = \"appservice_masquerade\"\nas_token = \"t\"",
            "",
        );
        let l = load_str(&text).expect("valid: masquerade stores no tokens, so needs no key");
        assert_eq!(
            l.config.homeserver.binding,
            BindingMode::AppserviceMasquerade
        );
        assert!(
            l.warnings
                .iter()
                .any(|w| w.starts_with("homeserver.binding") && w.contains("appservice token")),
            "{:?}",
            l.warnings
        );
        let quiet = with_homeserver(
            "kind = \"synapse\"\nas_token = \"t\"",
            &format!("encryption_key = \"{KEY}\""),
        );
        assert!(load_str(&quiet)
            .expect("valid")
            .warnings
            .iter()
            .all(|w| !w.starts_with("homeserver.binding")));
    }

    #[test]
    fn per_device_credentials_need_a_valid_store_key() {
        let keys_of = |store: &str| -> Vec<String> {
            let text = with_homeserver("kind = \"synapse\"\nas_token = \"t\"", store);
            match load_str(&text) {
                Ok(_) => Vec::new(),
                Err(e) => {
                    e.0.into_iter()
                        .map(|p| format!("{}: {}", p.key, p.message))
                        .collect()
                }
            }
        };
        let missing = keys_of("");
        assert!(
            missing.len() == 1 && missing[0].starts_with("store.encryption_key: required"),
            "{missing:?}"
        );
        let short = keys_of("encryption_key = \"abcd\"");
        assert!(
            short[0].starts_with("store.encryption_key: must be 32 random bytes"),
            "{short:?}"
        );
        let same = keys_of(&format!(
            "encryption_key = \"{KEY}\"\nprevious_encryption_key = \"{KEY}\""
        ));
        assert!(
            same[0].starts_with("store.previous_encryption_key"),
            "{same:?}"
        );
        let both = keys_of(&format!(
            "encryption_key = \"{KEY}\"\nencryption_key_file = \"/x\""
        ));
        assert!(
            both[0].starts_with("store.encryption_key: set either"),
            "{both:?}"
        );
        assert!(keys_of(&format!("encryption_key = \"{KEY}\"")).is_empty());
        let b64 = "Dx4tPEtaaXiHlqW0w9Lh8A8eLTxLWml4h5altMPS4fA=";
        assert!(keys_of(&format!("encryption_key = \"{b64}\"")).is_empty());
    }

    #[test]
    fn appservice_bindings_need_an_as_token_and_a_capable_homeserver() {
        let text = MINIMAL.replace(
            "server_name = \"example.org\"",
            "server_name = \"example.org\"\nkind = \"dendrite\"\nbinding = \"appservice_masquerade\"",
        );
        let err = load_str(&text).expect_err("invalid");
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"homeserver.binding"), "{keys:?}");
        assert!(keys.contains(&"homeserver.as_token"), "{keys:?}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("7d").is_err());
        assert!(parse_duration("").is_err());
    }
}

//! Legacy login (MSC3824 compatibility, issue #15): clients that predate the OAuth 2.0 API sign
//! in with `m.login.sso` and `m.login.token`, and get a **compat session**: a gateway-issued
//! access token (stored hashed) for a device the OP granted.
//!
//! The flow:
//! 1. `GET /login/sso/redirect?redirectUrl=…` ([`Compat::start`]): the gateway, a confidential
//!    client of the OP, starts an authorization-code + PKCE flow for `openid`, the full API
//!    scope and a fresh device scope. Its `state` is bound to the browser by an HttpOnly,
//!    SameSite=Lax cookie.
//! 2. The OP sends the browser back to the callback ([`Compat::finish`]): the state is taken
//!    (single use), the cookie compared, the code exchanged, and the OP's access token verified
//!    like any other (so scopes, user mapping and device rules are the same). A single-use,
//!    short-lived login token is then handed to `redirectUrl` (allow-listed) or shown on a
//!    confirmation page that names where it goes.
//! 3. `POST /login` with `m.login.token` ([`Compat::redeem`], then [`Compat::open_session`]):
//!    the login token is taken once, and the session's tokens are issued.
//!
//! A compat session's identity is the OP's (issuer, subject, device, OP session `sid`), so the
//! revocations, back-channel logouts, pins and tombstones that apply to OAuth tokens apply to it.
//! This module holds no HTTP: `gateway::compat` reads requests and writes answers.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::auth::budget::{AddressBudget, Budget};
use crate::auth::op::{OpClient, TokenResponse};
use crate::auth::{Identity, TokenHash};
use crate::clock::SharedClock;
use crate::config;
use crate::error::{BindingFailure, GatewayError, OpFailure};
use crate::store::{Space, Store};

/// Login tokens (`m.login.token`) start with this.
pub const LOGIN_PREFIX: &str = "mgl_";
/// Compat access tokens start with this: the verifier looks them up in the store, never at
/// the OP.
pub const ACCESS_PREFIX: &str = "mgc_";
/// Compat refresh tokens start with this.
pub const REFRESH_PREFIX: &str = "mgr_";
/// Where the OP sends the browser back.
pub const CALLBACK_PATH: &str = "/_matrix/gateway/compat/callback";
/// The browser cookie that binds a pending sign-in to the browser that started it.
pub const COOKIE_PREFIX: &str = "mog_sso_";

/// A random token: `prefix` and 32 bytes, URL-safe base64.
fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The stored key of a token: its SHA-256, hex.
fn stored_key(token: &str) -> String {
    hex::encode(TokenHash::of(token).0)
}

/// A device ID as MAS generates them for compat sessions: 10 upper-case letters and digits.
pub fn new_device_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let bytes: [u8; 10] = rand::random();
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// Which of a compat session's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Its access token (`mgc_`).
    Access,
    /// Its refresh token (`mgr_`).
    Refresh,
}

impl TokenKind {
    /// The kind of a compat token, by its prefix; `None` for any other token.
    pub fn of(token: &str) -> Option<TokenKind> {
        if token.starts_with(ACCESS_PREFIX) {
            Some(TokenKind::Access)
        } else if token.starts_with(REFRESH_PREFIX) {
            Some(TokenKind::Refresh)
        } else {
            None
        }
    }
}

/// Whether `token` is a compat access token (by its prefix).
pub fn is_compat_access(token: &str) -> bool {
    token.starts_with(ACCESS_PREFIX)
}

/// What went wrong in the browser part of the flow: shown on an HTML page, never as Matrix
/// JSON (the caller is a browser).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrowserFault {
    /// No `redirectUrl`, or not a URL.
    BadRedirect,
    /// The state is unknown, used or expired.
    UnknownState,
    /// The browser is not the one that started the sign-in (cookie missing or different).
    StateMismatch,
    /// The OP reported an error (the user cancelled, consent refused…).
    Denied,
    /// The OP's answer was refused: no access token for the device asked for, a wrong
    /// `nonce`.
    BadGrant,
    /// The OP or the store cannot be reached now.
    Unavailable,
}

impl BrowserFault {
    /// HTTP status of the page.
    pub fn status(self) -> u16 {
        match self {
            BrowserFault::BadRedirect | BrowserFault::UnknownState => 400,
            BrowserFault::StateMismatch | BrowserFault::Denied | BrowserFault::BadGrant => 403,
            BrowserFault::Unavailable => 503,
        }
    }

    /// The page's message.
    pub fn message(self) -> &'static str {
        match self {
            BrowserFault::BadRedirect => "The client did not say where to return (redirectUrl).",
            BrowserFault::UnknownState => {
                "This sign-in has expired or was already used. Start again from your Matrix client."
            }
            BrowserFault::StateMismatch => {
                "This sign-in was started in another browser. Start again from your Matrix client."
            }
            BrowserFault::Denied => "Sign-in was cancelled at the identity provider.",
            BrowserFault::BadGrant => "The identity provider's answer could not be used.",
            BrowserFault::Unavailable => {
                "The identity provider cannot be reached right now. Try again in a moment."
            }
        }
    }

    /// A bounded label for logs.
    pub fn label(self) -> &'static str {
        match self {
            BrowserFault::BadRedirect => "bad_redirect",
            BrowserFault::UnknownState => "unknown_state",
            BrowserFault::StateMismatch => "state_mismatch",
            BrowserFault::Denied => "denied",
            BrowserFault::BadGrant => "bad_grant",
            BrowserFault::Unavailable => "unavailable",
        }
    }
}

/// A pending sign-in, stored under its `state`.
#[derive(Serialize, Deserialize)]
struct Pending {
    verifier: String,
    nonce: String,
    redirect_url: String,
    device_id: String,
    /// SHA-256 of the browser cookie's value.
    browser: String,
}

/// What a login token stands for.
#[derive(Serialize, Deserialize)]
struct Grant {
    identity: Identity,
    /// The OP's refresh token of the sign-in, sealed (see [`OpGrant`]).
    #[serde(default)]
    op_refresh: Option<String>,
}

/// A compat session's OP grant: the refresh token the OP issued with the sign-in, checked at
/// the OP every `grant_check_interval` while the session is used. Stored apart from the
/// session (its own record, rewritten by the check only).
#[derive(Serialize, Deserialize)]
struct OpGrant {
    /// The refresh token, sealed with the store's key.
    refresh: String,
    /// When the OP last confirmed the grant (Unix ms).
    checked_ms: u64,
}

/// The OP's refresh token of a sign-in, on its way to a compat session. No `Debug`.
pub struct OpRefresh(String);

/// A sign-in the OP granted (by single sign-on or password): who, and the OP's refresh token
/// when it issued one.
pub struct SignedIn {
    /// The identity of the device signed in.
    pub identity: Identity,
    op_refresh: Option<OpRefresh>,
}

/// Where a compat session's OP grant stands at a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantState {
    /// Checked within `grant_check_interval`.
    Fresh,
    /// Due for a check (run in the background; the session is served meanwhile).
    Due,
    /// Not confirmed for longer than a sign-out is remembered: checked before the session is
    /// served again.
    Lapsed,
}

/// What a grant check did (the `result` label of `compat_grant_checks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantCheck {
    /// The OP refreshed the grant.
    Renewed,
    /// The grant is gone (or the session was signed out): the session ended.
    Ended,
    /// Another check did it already.
    Skipped,
    /// Another check holds the lease.
    Busy,
    /// The OP or the store could not answer: tried again after the lease.
    Failed,
}

impl GrantCheck {
    fn label(self) -> &'static str {
        match self {
            GrantCheck::Renewed => "renewed",
            GrantCheck::Ended => "ended",
            GrantCheck::Skipped | GrantCheck::Busy => "skipped",
            GrantCheck::Failed => "failed",
        }
    }
}

/// What the compat layer needs from the rest of the gateway: the verifier (for the OP's
/// access tokens of sign-ins and grant checks), the revocations, and the sign-out of a
/// session's device when its OP grant ended.
#[async_trait::async_trait]
pub trait SessionHooks: Send + Sync {
    /// Whether a sign-out recorded since it was issued applies to the session (its access
    /// token's hash given).
    fn revoked(&self, identity: &Identity, access: &TokenHash) -> bool;
    /// Refuses the session's device everywhere and signs it out upstream.
    async fn sign_out(&self, identity: &Identity) -> Result<(), GatewayError>;
    /// Verifies an OP access token as a request's would be.
    async fn verify(&self, access_token: &str) -> Result<Arc<Identity>, GatewayError>;
}

/// The sealing context of an OP refresh token: the record it is stored in (`login:<key>` of a
/// login token, `session:<id>`), its user and device.
fn grant_context(record: &str, identity: &Identity) -> Vec<u8> {
    format!(
        "compat-op-grant\u{0}{record}\u{0}{}\u{0}{}",
        identity.user_id(),
        identity.device_id().unwrap_or("")
    )
    .into_bytes()
}

/// A compat session, stored under its ID.
#[derive(Serialize, Deserialize)]
struct Session {
    identity: Identity,
    /// When the session ends whatever happens (`compat.session_lifetime`).
    ends_ms: u64,
    /// The stored key of its current access token.
    access: String,
    /// The stored key of its current refresh token, when the client asked for one.
    refresh: Option<String>,
    /// Whether it is tied to an OP grant ([`OpGrant`], checked while it is used).
    #[serde(default)]
    op_grant: bool,
}

impl Session {
    /// The hash of its current access token (its stored key, decoded); `None` when the record
    /// is unreadable.
    fn access_hash(&self) -> Option<TokenHash> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&self.access, &mut hash).ok()?;
        Some(TokenHash(hash))
    }
}

/// A live compat session, as [`Compat::sessions_of`] finds it.
pub struct LiveSession {
    id: String,
    /// The hash of its current access token (to purge it from caches).
    pub access: TokenHash,
    session: Session,
}

impl LiveSession {
    /// The session `id` as listed, unless its record is unreadable (skipped, and logged: one
    /// bad record must not stop a sign-out of the others).
    fn of(id: String, session: Session) -> Option<LiveSession> {
        let Some(access) = session.access_hash() else {
            tracing::error!("compat: a session record is unreadable; skipped");
            return None;
        };
        Some(LiveSession {
            id,
            access,
            session,
        })
    }

    /// Its ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its identity (user, device, OP session).
    pub fn identity(&self) -> &Identity {
        &self.session.identity
    }

    /// When it ends whatever happens (Unix ms).
    pub fn ends_at_ms(&self) -> u64 {
        self.session.ends_ms
    }

    /// Whether the client holds a refresh token for it.
    pub fn refreshable(&self) -> bool {
        self.session.refresh.is_some()
    }

    /// Whether it is tied to an OP grant the gateway keeps checking.
    pub fn op_grant(&self) -> bool {
        self.session.op_grant
    }
}

/// The start of a sign-in: where to send the browser, and the cookie to set.
#[derive(Debug)]
pub struct Started {
    /// The OP's authorization URL.
    pub location: Url,
    /// The cookie's name.
    pub cookie_name: String,
    /// The cookie's value.
    pub cookie_value: String,
}

/// The end of a sign-in at the OP: where the login token goes.
#[derive(Debug)]
pub struct Finished {
    /// `redirectUrl` with `loginToken` added.
    pub redirect: Url,
    /// Whether `redirectUrl` is on the allow-list (else the user confirms on a page).
    pub allowed: bool,
    /// The cookie to clear.
    pub cookie_name: String,
}

/// A compat session's tokens.
#[derive(Debug)]
pub struct Issued {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when asked for.
    pub refresh_token: Option<String>,
    /// The access token's lifetime, when it has one (only with a refresh token).
    pub expires_in_ms: Option<u64>,
}

/// Why the OP's answer to a grant was not taken.
enum GrantRefused {
    /// The OP cannot be asked now (503).
    Unavailable,
    /// The answer is for another device, lacks the full API scope, or its ID token is for
    /// another client or sign-in.
    Refused,
}

/// One `m.login.password` attempt. No `Debug`: it holds the password.
pub struct PasswordAttempt<'a> {
    /// The Matrix user asked for (`@localpart:server_name`).
    pub user_id: &'a str,
    /// Its localpart: the user name sent to the OP.
    pub localpart: &'a str,
    /// The password, sent to the OP only.
    pub password: &'a str,
    /// The device to sign in.
    pub device_id: &'a str,
    /// The client's address, for its budget.
    pub client: Option<std::net::IpAddr>,
}

/// The password-attempt budgets (per user, per client address), on this replica.
struct PasswordBudgets {
    per_user: Budget<[u8; 16]>,
    per_address: AddressBudget,
}

/// A user's key in the per-user budget: the first half of its ID's SHA-256 (the table holds
/// no user names).
fn user_key(user_id: &str) -> [u8; 16] {
    let digest = Sha256::digest(user_id.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// The compat layer.
pub struct Compat {
    cfg: config::Compat,
    password: Option<PasswordBudgets>,
    callback: Url,
    store: Arc<dyn Store>,
    op: Arc<OpClient>,
    clock: SharedClock,
    /// Seals the OP refresh tokens kept with sessions; without it no OP grant is kept.
    sealer: Option<Arc<crate::store::seal::Sealer>>,
    /// How long a sign-out is remembered (`notifications.revocation_retention`): a session
    /// without an OP grant lives at most this long.
    retention: std::time::Duration,
    /// A session whose grant the OP has not confirmed for this long ends: a sign-out recorded
    /// after the last confirmation is still remembered until then (the retention less the
    /// cache's reuse window).
    horizon: std::time::Duration,
    hooks: Arc<dyn SessionHooks>,
}

impl std::fmt::Debug for Compat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compat")
            .field("callback", &self.callback.as_str())
            .finish_non_exhaustive()
    }
}

fn store_failure(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "compat: state store failed");
    GatewayError::BindingUnavailable(BindingFailure::Store)
}

/// [`store_failure`] on the request path, where the verifier answers 503 for it.
fn store_unreachable(e: crate::store::StoreError) -> OpFailure {
    tracing::error!(error = %e, "compat: state store failed");
    OpFailure::Unreachable
}

/// The sealing record of a login token's OP refresh token (see [`grant_context`]).
fn login_record(login_token: &str) -> String {
    format!("login:{}", stored_key(login_token))
}

/// The sealing record of a session's OP refresh token (see [`grant_context`]).
fn session_record(id: &str) -> String {
    format!("session:{id}")
}

impl Compat {
    /// The compat layer of `config.compat` (which must be on); the callback is under the
    /// public base URL.
    pub fn new(
        config: &config::Config,
        store: Arc<dyn Store>,
        op: Arc<OpClient>,
        clock: SharedClock,
        hooks: Arc<dyn SessionHooks>,
    ) -> Option<Self> {
        let cfg = config.compat.clone()?;
        let retention = config.notifications.revocation_retention;
        let horizon = retention.saturating_sub(config.cache.max_ttl);
        let mut callback = config.discovery.public_base_url.clone();
        callback.set_path(CALLBACK_PATH);
        callback.set_query(None);
        let password = cfg.password.map(|p| PasswordBudgets {
            per_user: Budget::per_minute(p.per_user_per_minute),
            per_address: AddressBudget::per_minute(p.per_address_per_minute),
        });
        Some(Self {
            cfg,
            password,
            callback,
            store,
            op,
            clock,
            sealer: config.store.sealer.clone(),
            retention,
            horizon,
            hooks,
        })
    }

    /// How long the browser cookie of a pending sign-in lives.
    pub fn sso_timeout_secs(&self) -> u64 {
        self.cfg.sso_timeout.as_secs().max(1)
    }

    /// Whether a `redirectUrl` is on the allow-list: same scheme, host and port as an entry,
    /// and a path under the entry's (at a `/` boundary).
    pub fn allowed(&self, redirect: &Url) -> bool {
        self.cfg.redirect_allowlist.iter().any(|entry| {
            entry.scheme() == redirect.scheme()
                && entry.host_str() == redirect.host_str()
                && entry.port_or_known_default() == redirect.port_or_known_default()
                && under(entry.path(), redirect.path())
        })
    }

    /// Starts a sign-in for a browser that will come back to `redirect_url`; `register` asks
    /// the OP to show its sign-up page (`prompt=create`, MSC3824 `action=register`).
    pub async fn start(&self, redirect_url: &str, register: bool) -> Result<Started, BrowserFault> {
        let redirect = checked_redirect(redirect_url)?;
        let state = new_token("");
        let verifier = new_token("");
        let nonce = new_token("");
        let cookie_value = new_token("");
        let device_id = new_device_id();
        let pending = Pending {
            verifier: verifier.clone(),
            nonce: nonce.clone(),
            redirect_url: redirect.to_string(),
            device_id: device_id.clone(),
            browser: stored_key(&cookie_value),
        };
        let mut location = self
            .op
            .endpoint("authorization_endpoint")
            .await
            .map_err(|_| BrowserFault::Unavailable)?;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.as_bytes()));
        let scope = self.scope(&device_id);
        {
            let mut q = location.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &self.cfg.client_id)
                .append_pair("redirect_uri", self.callback.as_str())
                .append_pair("scope", &scope)
                .append_pair("state", &state)
                .append_pair("nonce", &nonce)
                .append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256");
            if register {
                q.append_pair("prompt", "create");
            }
        }
        let value = serde_json::to_string(&pending).map_err(|_| BrowserFault::Unavailable)?;
        let until = self.clock.now_ms() + self.cfg.sso_timeout.as_millis() as u64;
        self.store
            .put_expiring(Space::SsoState, &stored_key(&state), &value, until)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "compat: state store failed");
                BrowserFault::Unavailable
            })?;
        Ok(Started {
            location,
            cookie_name: cookie_name(&state),
            cookie_value,
        })
    }

    /// The browser came back from the OP with `state` and `code` (or `error`); `cookie` is
    /// the value of the browser's cookie for that state. The OP's access token is verified by
    /// the verifier every request goes through ([`SessionHooks::verify`]).
    pub async fn finish(
        &self,
        state: &str,
        code: Option<&str>,
        error: Option<&str>,
        cookie: Option<&str>,
    ) -> Result<Finished, BrowserFault> {
        let now = self.clock.now_ms();
        let stored = self
            .store
            .take_expiring(Space::SsoState, &stored_key(state), now)
            .await
            .map_err(|_| BrowserFault::Unavailable)?
            .ok_or(BrowserFault::UnknownState)?;
        let pending: Pending =
            serde_json::from_str(&stored).map_err(|_| BrowserFault::UnknownState)?;
        // The state was taken first: a mismatch uses it up, so it cannot be tried again.
        if cookie.map(stored_key).as_deref() != Some(pending.browser.as_str()) {
            return Err(BrowserFault::StateMismatch);
        }
        if let Some(e) = error {
            tracing::info!(error = %oauth_code(e), "compat: the OP refused the sign-in");
            return Err(BrowserFault::Denied);
        }
        let code = code.ok_or(BrowserFault::BadGrant)?;
        let granted = self
            .op
            .token_grant(
                &self.cfg.client_id,
                self.cfg.client_secret.expose(),
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", self.callback.as_str()),
                    ("code_verifier", &pending.verifier),
                ],
            )
            .await
            .map_err(|f| {
                tracing::warn!(reason = ?f, "compat: code exchange failed");
                BrowserFault::Unavailable
            })?
            .map_err(|e| {
                tracing::warn!(error = %oauth_code(&e), "compat: the OP refused the code");
                BrowserFault::BadGrant
            })?;
        let signed_in = self
            .accept_grant(granted, &pending.device_id, Some(&pending.nonce))
            .await
            .map_err(|r| match r {
                GrantRefused::Unavailable => BrowserFault::Unavailable,
                GrantRefused::Refused => BrowserFault::BadGrant,
            })?;
        let login_token = new_token(LOGIN_PREFIX);
        let identity = signed_in.identity;
        let record = login_record(&login_token);
        let op_refresh = self.seal_refresh(&record, &identity, signed_in.op_refresh.as_ref());
        let grant = Grant {
            identity: identity.clone(),
            op_refresh,
        };
        let value = serde_json::to_string(&grant).map_err(|_| BrowserFault::Unavailable)?;
        let until = now + self.cfg.login_token_ttl.as_millis() as u64;
        self.store
            .put_expiring(Space::LoginToken, &stored_key(&login_token), &value, until)
            .await
            .map_err(|_| BrowserFault::Unavailable)?;
        let mut redirect =
            Url::parse(&pending.redirect_url).map_err(|_| BrowserFault::BadRedirect)?;
        let allowed = self.allowed(&redirect);
        redirect
            .query_pairs_mut()
            .append_pair("loginToken", &login_token);
        tracing::info!(user = %identity.user_id(), device = %pending.device_id, allowed, "compat: login token issued");
        Ok(Finished {
            redirect,
            allowed,
            cookie_name: cookie_name(state),
        })
    }

    /// Checks the OP's answer to a grant the gateway asked for (a code exchange, a password
    /// grant) and verifies its access token like a request's: the identity of the device
    /// asked for, with the full API scope. `nonce`: the ID token's, when the grant had one.
    async fn accept_grant(
        &self,
        granted: TokenResponse,
        device_id: &str,
        nonce: Option<&str>,
    ) -> Result<SignedIn, GrantRefused> {
        let op_refresh = granted.refresh_token.map(OpRefresh);
        // Received straight from the token endpoint over the connection the gateway opened
        // (OIDC Core §3.1.3.7 6.): issuer, audience and nonce bind it to this sign-in. Its
        // `sid` names the OP session, for the OP's back-channel logout of it.
        let mut sid = None;
        if let Some(id_token) = &granted.id_token {
            let claims = jwt_payload(id_token).unwrap_or_default();
            let audience_ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => *a == self.cfg.client_id,
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .any(|a| a.as_str() == Some(self.cfg.client_id.as_str())),
                _ => false,
            };
            let str_claim = |name: &str| claims.get(name).and_then(|v| v.as_str());
            let nonce_ok = nonce.is_none_or(|n| str_claim("nonce") == Some(n));
            if !nonce_ok
                || str_claim("iss") != Some(self.op.issuer().issuer.as_str())
                || !audience_ok
            {
                tracing::warn!("compat: ID token nonce, issuer or audience mismatch");
                return Err(GrantRefused::Refused);
            }
            sid = str_claim("sid").map(str::to_owned);
        }
        let identity = match self.hooks.verify(&granted.access_token).await {
            Ok(identity) => identity,
            Err(GatewayError::OpUnavailable(_)) => return Err(GrantRefused::Unavailable),
            Err(e) => {
                tracing::warn!(
                    reason = e.reason_label(),
                    "compat: the OP's access token was refused"
                );
                return Err(GrantRefused::Refused);
            }
        };
        if identity.device_id() != Some(device_id) || identity.access != crate::auth::Access::Full {
            tracing::warn!("compat: the OP granted another device or no full API scope");
            return Err(GrantRefused::Refused);
        }
        let identity = match (identity.session_id(), sid) {
            (None, Some(sid)) => identity.edited(|p| p.session_id = Some(sid)),
            _ => (*identity).clone(),
        };
        Ok(SignedIn {
            identity,
            op_refresh,
        })
    }

    /// The scope a sign-in asks the OP for: `openid`, the full API, the device, and the
    /// configured `extra_scopes` (say `offline_access`, for OPs that issue refresh tokens only
    /// with it).
    fn scope(&self, device_id: &str) -> String {
        let mut scope =
            format!("openid urn:matrix:client:api:* urn:matrix:client:device:{device_id}");
        for extra in &self.cfg.extra_scopes {
            scope.push(' ');
            scope.push_str(extra);
        }
        scope
    }

    /// Whether `m.login.password` is offered.
    pub fn password_login(&self) -> bool {
        self.password.is_some()
    }

    /// `m.login.password` (when offered): `password` is checked at the OP with the
    /// resource-owner password grant (RFC 6749 §4.3) for the user `localpart`, for the device
    /// `device_id`; the result must be this server's `user_id`. Attempts are charged to the
    /// user's and the client address's budgets first (429); the OP's refusal, or an answer
    /// for another user, is 403 `M_FORBIDDEN`; an OP that cannot answer, 503 (the attempt
    /// counts all the same). The password goes to the OP's token endpoint and nowhere else: never
    /// logged, never stored.
    pub async fn password_grant(
        &self,
        login: PasswordAttempt<'_>,
    ) -> Result<SignedIn, GatewayError> {
        let Some(budgets) = &self.password else {
            return Err(GatewayError::BadLogin);
        };
        let user_key = user_key(login.user_id);
        budgets
            .per_user
            .spend_now(user_key)
            .map_err(|retry_after_ms| GatewayError::RateLimited { retry_after_ms })?;
        if let Some(ip) = login.client {
            if let Err(retry_after_ms) = budgets.per_address.spend_now(ip) {
                budgets.per_user.refund_now(user_key);
                return Err(GatewayError::RateLimited { retry_after_ms });
            }
        }
        let scope = self.scope(login.device_id);
        let granted = match self
            .op
            .token_grant(
                &self.cfg.client_id,
                self.cfg.client_secret.expose(),
                &[
                    ("grant_type", "password"),
                    ("username", login.localpart),
                    ("password", login.password),
                    ("scope", &scope),
                ],
            )
            .await
        {
            Ok(Ok(granted)) => granted,
            Ok(Err(e)) => {
                let code = oauth_code(&e);
                if code == "invalid_grant" {
                    tracing::info!(user = %login.user_id, "compat: the OP refused the password");
                } else {
                    // Not the user's fault: the OP does not allow the grant for this client.
                    tracing::warn!(user = %login.user_id, error = %code, "compat: the OP refused the password grant");
                }
                return Err(GatewayError::LoginRefused);
            }
            Err(f) => {
                // The attempt counts: whether the OP saw the password cannot be told (an OP
                // answering guesses with errors or resets must not make them free).
                tracing::warn!(reason = ?f, "compat: password grant failed");
                return Err(GatewayError::OpUnavailable(f));
            }
        };
        let signed_in = match self.accept_grant(granted, login.device_id, None).await {
            Ok(signed_in) => signed_in,
            Err(GrantRefused::Unavailable) => {
                return Err(GatewayError::OpUnavailable(OpFailure::Unreachable));
            }
            Err(GrantRefused::Refused) => return Err(GatewayError::LoginRefused),
        };
        let granted_user = signed_in.identity.user_id();
        if granted_user != login.user_id {
            // The OP signed in a user who maps to another Matrix ID: the client asked for one
            // user and must not get another.
            tracing::warn!(asked = %login.user_id, granted = %granted_user, "compat: the OP's user for this password is another Matrix user");
            return Err(GatewayError::LoginRefused);
        }
        Ok(signed_in)
    }

    /// Takes a login token (once): the sign-in it stands for, or 403 `M_FORBIDDEN` when it is
    /// unknown, used or expired.
    pub async fn redeem(&self, login_token: &str) -> Result<SignedIn, GatewayError> {
        let taken = self
            .store
            .take_expiring(
                Space::LoginToken,
                &stored_key(login_token),
                self.clock.now_ms(),
            )
            .await
            .map_err(store_failure)?
            .ok_or(GatewayError::LoginRefused)?;
        let grant: Grant = serde_json::from_str(&taken).map_err(|_| GatewayError::LoginRefused)?;
        let record = login_record(login_token);
        let op_refresh = grant.op_refresh.as_deref().and_then(|sealed| {
            let sealer = self
                .sealer
                .as_ref()
                .filter(|_| crate::store::seal::is_sealed(sealed))?;
            match sealer.open(sealed, &grant_context(&record, &grant.identity)) {
                Ok(opened) => Some(OpRefresh(opened.plaintext)),
                Err(e) => {
                    tracing::warn!(error = %e, "compat: the sign-in's OP grant cannot be opened; the session gets none");
                    None
                }
            }
        });
        Ok(SignedIn {
            identity: grant.identity,
            op_refresh,
        })
    }

    /// The OP refresh token sealed for storing with `identity`'s session, when there is one
    /// and a key to seal it with.
    fn seal_refresh(
        &self,
        record: &str,
        identity: &Identity,
        refresh: Option<&OpRefresh>,
    ) -> Option<String> {
        let (sealer, refresh) = (self.sealer.as_ref()?, refresh?);
        match sealer.seal(&refresh.0, &grant_context(record, identity)) {
            Ok(sealed) => Some(sealed),
            Err(e) => {
                tracing::warn!(error = %e, "compat: the OP grant cannot be sealed; the session gets none");
                None
            }
        }
    }

    /// Opens a compat session for a sign-in (already provisioned upstream) and issues its
    /// tokens. Without a refresh token the access token lives as long as the session.
    ///
    /// With an OP grant (the OP issued a refresh token, and the store has a key to seal it) the
    /// session lives `session_lifetime` and ends with the grant; without one, at most as long
    /// as a sign-out is remembered (`revocation_retention`).
    pub async fn open_session(
        &self,
        signed_in: SignedIn,
        want_refresh: bool,
    ) -> Result<Issued, GatewayError> {
        // `issued_at_ms` stays the OP token's: a sign-out of its OP session or device recorded
        // since then (say between the callback and this login) applies to this session too.
        let now = self.clock.now_ms();
        let identity = signed_in.identity;
        let id = new_token("");
        let sealed = self.seal_refresh(
            &session_record(&id),
            &identity,
            signed_in.op_refresh.as_ref(),
        );
        let lifetime = if sealed.is_some() {
            self.cfg.session_lifetime
        } else {
            self.cfg.session_lifetime.min(self.retention)
        };
        let ends_ms = now.saturating_add(lifetime.as_millis() as u64);
        let op_grant = sealed.is_some();
        if let Some(refresh) = sealed {
            let grant = OpGrant {
                refresh,
                checked_ms: now,
            };
            let value = serde_json::to_string(&grant).map_err(|_| GatewayError::Internal)?;
            self.store
                .put_expiring(Space::CompatGrant, &id, &value, ends_ms)
                .await
                .map_err(store_failure)?;
        }
        self.issue(&id, identity, ends_ms, want_refresh, op_grant)
            .await
    }

    async fn issue(
        &self,
        id: &str,
        mut identity: Identity,
        ends_ms: u64,
        want_refresh: bool,
        op_grant: bool,
    ) -> Result<Issued, GatewayError> {
        let now = self.clock.now_ms();
        let access_token = new_token(ACCESS_PREFIX);
        let refresh_token = want_refresh.then(|| new_token(REFRESH_PREFIX));
        let access_until = match &refresh_token {
            Some(_) => (now + self.cfg.access_token_ttl.as_millis() as u64).min(ends_ms),
            None => ends_ms,
        };
        identity.expires_at_ms = Some(access_until);
        let session = Session {
            identity,
            ends_ms,
            access: stored_key(&access_token),
            refresh: refresh_token.as_deref().map(stored_key),
            op_grant,
        };
        let value = serde_json::to_string(&session).map_err(|_| GatewayError::Internal)?;
        let s = &self.store;
        s.put_expiring(Space::CompatSession, id, &value, ends_ms)
            .await
            .map_err(store_failure)?;
        // Kept until the session ends, so /logout finds the session by an expired access
        // token too (the identity's expiry refuses it for requests).
        s.put_expiring(Space::CompatAccess, &session.access, id, ends_ms)
            .await
            .map_err(store_failure)?;
        if let Some(r) = &session.refresh {
            s.put_expiring(Space::CompatRefresh, r, id, ends_ms)
                .await
                .map_err(store_failure)?;
        }
        s.add_member(
            Space::CompatUserSessions,
            session.identity.user_id(),
            id,
            ends_ms,
        )
        .await
        .map_err(store_failure)?;
        if let Some(op_session) = session.identity.session_key() {
            s.add_member(Space::CompatOpSessions, &op_session, id, ends_ms)
                .await
                .map_err(store_failure)?;
        }
        Ok(Issued {
            access_token,
            refresh_token,
            expires_in_ms: want_refresh.then(|| access_until.saturating_sub(now)),
        })
    }

    /// The identity of a compat access token: `Ok(None)` when it is unknown, expired or its
    /// session ended. `Err` only when the store cannot answer (the caller answers 503).
    ///
    /// A session tied to an OP grant is served while the grant is fresh; when a check is due
    /// it runs in the background (the session is served meanwhile); when the OP has not
    /// confirmed the grant for longer than a sign-out is remembered, the session ends.
    pub async fn identity_of(
        self: &Arc<Self>,
        access_token: &str,
    ) -> Result<Option<Identity>, OpFailure> {
        let now = self.clock.now_ms();
        let key = stored_key(access_token);
        let Some((id, session)) = self.session_of(Space::CompatAccess, &key, now).await? else {
            return Ok(None);
        };
        if session.access != key {
            return Ok(None);
        }
        // Signed out (its devices' upstream sign-out may still be pending).
        if self
            .ended_meanwhile(&id)
            .await
            .map_err(|_| OpFailure::Unreachable)?
        {
            return Ok(None);
        }
        if session.op_grant {
            let grant = self.grant_of(&id, now).await.map_err(store_unreachable)?;
            // No grant record (its session half-forgotten): checked now, which ends it.
            match grant.map_or(GrantState::Lapsed, |g| self.grant_state(&g, now)) {
                GrantState::Fresh => {}
                GrantState::Due => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.check_grant(&id).await;
                    });
                }
                GrantState::Lapsed => {
                    // Its own task: a request given up on cannot cut the check between the
                    // OP's rotation of the refresh token and its storing.
                    let this = self.clone();
                    let check_id = id.clone();
                    let checked = tokio::spawn(async move { this.check_grant(&check_id).await })
                        .await
                        .unwrap_or(GrantCheck::Failed);
                    match checked {
                        // Still there after the check (it may have ended meanwhile)?
                        GrantCheck::Renewed | GrantCheck::Skipped => {
                            let still = self
                                .session_by_id(&id, self.clock.now_ms())
                                .await
                                .map_err(store_unreachable)?;
                            // Ended, or refreshed (this token replaced) meanwhile.
                            if still.is_none_or(|s| s.access != key) {
                                return Ok(None);
                            }
                        }
                        GrantCheck::Ended => return Ok(None),
                        // Not confirmed now: 503 (the client retries), never a 401 that would
                        // sign it out over an OP outage.
                        GrantCheck::Busy | GrantCheck::Failed => {
                            return Err(OpFailure::Unreachable)
                        }
                    }
                }
            }
        }
        Ok(Some(session.identity))
    }

    /// The stored OP grant of session `id`.
    async fn grant_of(
        &self,
        id: &str,
        now: u64,
    ) -> Result<Option<OpGrant>, crate::store::StoreError> {
        Ok(self
            .store
            .get_expiring(Space::CompatGrant, id, now)
            .await?
            .and_then(|v| serde_json::from_str(&v).ok()))
    }

    fn grant_state(&self, grant: &OpGrant, now: u64) -> GrantState {
        let since = now.saturating_sub(grant.checked_ms);
        if since >= self.horizon.as_millis() as u64 {
            GrantState::Lapsed
        } else if since >= self.cfg.grant_check_interval.as_millis() as u64 {
            GrantState::Due
        } else {
            GrantState::Fresh
        }
    }

    /// How long one grant check holds its lease: longer than the OP call may take (its
    /// timeout and a second), so that no second check starts while one is at the OP.
    fn lease_ms(&self) -> u64 {
        (self.op.grant_timeout() + std::time::Duration::from_secs(1)).as_millis() as u64
    }

    /// How long after a failed check the next may start: a quarter of the interval, between
    /// a second and a minute.
    fn backoff_ms(&self) -> u64 {
        (self.cfg.grant_check_interval.as_millis() as u64 / 4).clamp(1_000, 60_000)
    }

    /// Checks session `id`'s OP grant (a refresh at the OP), under a lease so that of all
    /// replicas and requests one checks it (two refreshes with one refresh token would look
    /// like a stolen token to the OP, which then revokes the grant).
    async fn check_grant(&self, id: &str) -> GrantCheck {
        let started = std::time::Instant::now();
        let now = self.clock.now_ms();
        let holder = new_token("");
        let claimed = self
            .store
            .claim_expiring(
                Space::CompatGrantLease,
                id,
                &holder,
                now.saturating_add(self.lease_ms()),
                now,
            )
            .await;
        let result = match claimed {
            Ok(true) => {
                let result = self.check_leased_grant(id, now).await;
                // Done: this check's lease goes (only while it is surely still this check's,
                // and only if it still holds it); after a failure a backoff is claimed, unless
                // another check holds the key.
                if started.elapsed().as_millis() < u128::from(self.lease_ms()) {
                    if let Err(e) = self
                        .store
                        .delete_expiring_if(Space::CompatGrantLease, id, &holder)
                        .await
                    {
                        tracing::warn!(error = %e, "compat: a grant check's lease stays until it expires");
                    }
                }
                if result == GrantCheck::Failed {
                    let at = self.clock.now_ms();
                    let _ = self
                        .store
                        .claim_expiring(
                            Space::CompatGrantLease,
                            id,
                            "backoff",
                            at.saturating_add(self.backoff_ms()),
                            at,
                        )
                        .await;
                }
                result
            }
            Ok(false) => GrantCheck::Busy,
            Err(e) => {
                tracing::error!(error = %e, "compat: state store failed");
                GrantCheck::Failed
            }
        };
        crate::metrics::COMPAT_GRANT_CHECKS
            .with_label_values(&[result.label()])
            .inc();
        result
    }

    async fn check_leased_grant(&self, id: &str, now: u64) -> GrantCheck {
        let (session, grant) = match (
            self.session_by_id(id, now).await,
            self.grant_of(id, now).await,
        ) {
            (Ok(Some(session)), Ok(Some(grant))) => (session, grant),
            // Ended meanwhile.
            (Ok(None), _) => return GrantCheck::Skipped,
            (Ok(Some(session)), Ok(None)) => return self.ended(id, &session).await,
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "compat: state store failed");
                return GrantCheck::Failed;
            }
        };
        if self.grant_state(&grant, now) == GrantState::Fresh {
            return GrantCheck::Skipped;
        }
        match self.ended_meanwhile(id).await {
            Ok(false) => {}
            Ok(true) => return self.ended(id, &session).await,
            Err(_) => return GrantCheck::Failed,
        }
        if session
            .access_hash()
            .is_none_or(|access| self.hooks.revoked(&session.identity, &access))
        {
            return self.ended(id, &session).await;
        }
        let context = grant_context(&session_record(id), &session.identity);
        let Some(refresh) = self
            .sealer
            .as_ref()
            .filter(|_| crate::store::seal::is_sealed(&grant.refresh))
            .and_then(|s| s.open(&grant.refresh, &context).ok())
            .map(|o| o.plaintext)
        else {
            tracing::warn!("compat: a session's OP grant cannot be opened; it ends");
            return self.ended(id, &session).await;
        };
        let answer = self
            .op
            .token_grant(
                &self.cfg.client_id,
                self.cfg.client_secret.expose(),
                &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
            )
            .await;
        match answer {
            Ok(Ok(renewed)) => {
                // The OP may rotate the refresh token; if it did not, the old one stays. Kept
                // first: whatever happens next, the token the OP now holds is the stored one.
                let refresh = renewed.refresh_token.unwrap_or(refresh);
                let Some(sealed) = self
                    .sealer
                    .as_ref()
                    .and_then(|s| s.seal(&refresh, &context).ok())
                else {
                    return GrantCheck::Failed;
                };
                // Stored with the old check time: confirmed only once verified below.
                let mut grant = OpGrant {
                    refresh: sealed,
                    checked_ms: grant.checked_ms,
                };
                if !self.put_grant(id, &grant, session.ends_ms).await {
                    return GrantCheck::Failed;
                }
                // Ended while the OP was asked (`/logout`): its grant record goes too.
                match self.session_by_id(id, self.clock.now_ms()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let _ = self.store.delete_expiring(Space::CompatGrant, id).await;
                        return GrantCheck::Skipped;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "compat: state store failed");
                        return GrantCheck::Failed;
                    }
                }
                // What the grant now gives must still be this session: the same user,
                // subject and device, with the full API.
                match self.hooks.verify(&renewed.access_token).await {
                    Ok(now_granted)
                        if now_granted.user_id() == session.identity.user_id()
                            && now_granted.subject_key() == session.identity.subject_key()
                            && now_granted.device_id() == session.identity.device_id()
                            && now_granted.access == crate::auth::Access::Full =>
                    {
                        grant.checked_ms = self.clock.now_ms();
                        if !self.put_grant(id, &grant, session.ends_ms).await {
                            return GrantCheck::Failed;
                        }
                        // Ended meanwhile: the record just written goes too.
                        if !matches!(self.ended_meanwhile(id).await, Ok(false)) {
                            let _ = self.store.delete_expiring(Space::CompatGrant, id).await;
                            return GrantCheck::Skipped;
                        }
                        GrantCheck::Renewed
                    }
                    Err(GatewayError::OpUnavailable(_)) => GrantCheck::Failed,
                    Ok(_) | Err(_) => {
                        tracing::warn!(user = %session.identity.user_id(), "compat: the OP's grant no longer gives this session's user, device or full access; it ends");
                        self.ended(id, &session).await
                    }
                }
            }
            Ok(Err(e)) if e == "invalid_grant" => {
                tracing::info!(user = %session.identity.user_id(), device = ?session.identity.device_id(), "compat: the session's OP grant is gone; it ends");
                self.ended(id, &session).await
            }
            Ok(Err(e)) => {
                // Not the grant's fault (the gateway's client is refused): keep the session
                // until the horizon, and say so.
                tracing::warn!(error = %oauth_code(&e), "compat: the OP refused the grant check");
                GrantCheck::Failed
            }
            Err(f) => {
                tracing::warn!(reason = ?f, "compat: the grant check could not reach the OP");
                GrantCheck::Failed
            }
        }
    }

    /// Stores session `id`'s grant record; `false` (logged) when the store failed.
    async fn put_grant(&self, id: &str, grant: &OpGrant, ends_ms: u64) -> bool {
        let Ok(value) = serde_json::to_string(grant) else {
            return false;
        };
        match self
            .store
            .put_expiring(Space::CompatGrant, id, &value, ends_ms)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "compat: state store failed");
                false
            }
        }
    }

    async fn ended(&self, id: &str, session: &Session) -> GrantCheck {
        if self.end_for_grant(id, session).await {
            GrantCheck::Ended
        } else {
            GrantCheck::Failed
        }
    }

    /// Ends session `id` because its OP grant ended: its device is refused and signed out
    /// upstream first, then the session is forgotten. `false` when that failed (the next
    /// request of the session tries again).
    async fn end_for_grant(&self, id: &str, session: &Session) -> bool {
        if let Err(e) = self.hooks.sign_out(&session.identity).await {
            tracing::warn!(
                reason = e.reason_label(),
                "compat: the session's device could not be signed out; tried again"
            );
            return false;
        }
        self.forget(id, session).await.is_ok()
    }

    async fn session_of(
        &self,
        space: Space,
        key: &str,
        now: u64,
    ) -> Result<Option<(String, Session)>, OpFailure> {
        let Some(id) = self
            .store
            .get_expiring(space, key, now)
            .await
            .map_err(store_unreachable)?
        else {
            return Ok(None);
        };
        Ok(self
            .session_by_id(&id, now)
            .await
            .map_err(store_unreachable)?
            .map(|s| (id, s)))
    }

    /// The stored session `id`, unless it ended or its record cannot be read.
    async fn session_by_id(
        &self,
        id: &str,
        now: u64,
    ) -> Result<Option<Session>, crate::store::StoreError> {
        Ok(self
            .store
            .get_expiring(Space::CompatSession, id, now)
            .await?
            .and_then(|value| serde_json::from_str::<Session>(&value).ok()))
    }

    /// The identity of the live session a compat token belongs to (an access token, expired
    /// or not, as `/logout` takes it; or a refresh token, read without using it up, to check
    /// revocations before a refresh), or `None`.
    pub async fn session_identity(
        &self,
        kind: TokenKind,
        token: &str,
    ) -> Result<Option<Identity>, GatewayError> {
        Ok(self
            .live_session(kind, token)
            .await?
            .map(|(_, s)| s.identity))
    }

    /// Ends the session a compat token belongs to (after its device was revoked): its tokens
    /// are gone from the store.
    pub async fn end_session(&self, kind: TokenKind, token: &str) -> Result<(), GatewayError> {
        if let Some((id, session)) = self.live_session(kind, token).await? {
            self.forget(&id, &session).await?;
        }
        Ok(())
    }

    async fn live_session(
        &self,
        kind: TokenKind,
        token: &str,
    ) -> Result<Option<(String, Session)>, GatewayError> {
        let key = stored_key(token);
        let space = match kind {
            TokenKind::Access => Space::CompatAccess,
            TokenKind::Refresh => Space::CompatRefresh,
        };
        Ok(self
            .session_of(space, &key, self.clock.now_ms())
            .await
            .map_err(GatewayError::OpUnavailable)?
            .filter(|(_, s)| match kind {
                TokenKind::Access => s.access == key,
                TokenKind::Refresh => s.refresh.as_deref() == Some(key.as_str()),
            }))
    }

    async fn forget(&self, id: &str, session: &Session) -> Result<(), GatewayError> {
        let s = &self.store;
        // First: a `/refresh` that read the session before this end and writes it back after
        // finds the marker and undoes its write.
        self.mark_ended(id, session).await?;
        s.delete_expiring(Space::CompatAccess, &session.access)
            .await
            .map_err(store_failure)?;
        if let Some(r) = &session.refresh {
            s.delete_expiring(Space::CompatRefresh, r)
                .await
                .map_err(store_failure)?;
        }
        s.delete_expiring(Space::CompatSession, id)
            .await
            .map_err(store_failure)?;
        if session.op_grant {
            s.delete_expiring(Space::CompatGrant, id)
                .await
                .map_err(store_failure)?;
        }
        if let Some(op_session) = session.identity.session_key() {
            s.remove_member(Space::CompatOpSessions, &op_session, id)
                .await
                .map_err(store_failure)?;
        }
        // Last: until the session is gone, /logout/all can still find it.
        s.remove_member(Space::CompatUserSessions, session.identity.user_id(), id)
            .await
            .map_err(store_failure)
    }

    /// The live compat sessions of `user_id` (for `/logout/all`).
    pub async fn sessions_of(&self, user_id: &str) -> Result<Vec<LiveSession>, GatewayError> {
        let now = self.clock.now_ms();
        let ids = self
            .store
            .members(Space::CompatUserSessions, user_id, now)
            .await
            .map_err(store_failure)?;
        let mut live = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(session) = self.session_by_id(&id, now).await.map_err(store_failure)? else {
                continue;
            };
            if session.identity.user_id() != user_id {
                continue;
            }
            live.extend(LiveSession::of(id, session));
        }
        Ok(live)
    }

    /// The compat sessions of an OP session (issuer-scoped `sid`).
    pub async fn sessions_of_op_session(
        &self,
        op_session: &str,
    ) -> Result<Vec<LiveSession>, GatewayError> {
        let now = self.clock.now_ms();
        let ids = self
            .store
            .members(Space::CompatOpSessions, op_session, now)
            .await
            .map_err(store_failure)?;
        let mut live = Vec::new();
        for id in ids {
            if let Some(session) = self.session_by_id(&id, now).await.map_err(store_failure)? {
                if session.identity.session_key().as_deref() == Some(op_session) {
                    live.extend(LiveSession::of(id, session));
                }
            }
        }
        Ok(live)
    }

    /// The compat session one of whose tokens (access or refresh) has hash `token`.
    pub async fn session_of_token(
        &self,
        token: &TokenHash,
    ) -> Result<Option<LiveSession>, GatewayError> {
        let key = hex::encode(token.0);
        let now = self.clock.now_ms();
        for space in [Space::CompatAccess, Space::CompatRefresh] {
            let found = self
                .session_of(space, &key, now)
                .await
                .map_err(GatewayError::OpUnavailable)?;
            if let Some((id, session)) =
                found.filter(|(_, s)| s.access == key || s.refresh.as_deref() == Some(key.as_str()))
            {
                return Ok(LiveSession::of(id, session));
            }
        }
        Ok(None)
    }

    /// Marks a session signed out for good (a sign-out covers it): it is refused from now
    /// on, whether or not its records are deleted later.
    pub async fn mark_signed_out(&self, live: &LiveSession) -> Result<(), GatewayError> {
        self.mark_ended(&live.id, &live.session).await
    }

    /// Writes session `id`'s end marker (read by [`Compat::ended_meanwhile`]), kept as long as
    /// the session could have lived.
    async fn mark_ended(&self, id: &str, session: &Session) -> Result<(), GatewayError> {
        self.store
            .put_expiring(Space::CompatEnded, id, "1", session.ends_ms.max(1))
            .await
            .map_err(store_failure)
    }

    /// Ends `user_id`'s compat sessions on `device_id` (a new sign-in takes the device over, as
    /// a homeserver replaces a device's token on a login naming it): the hashes of their
    /// access tokens, for purging them from caches.
    pub async fn end_device_sessions(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Vec<TokenHash>, GatewayError> {
        let mut ended = Vec::new();
        for live in self.sessions_of(user_id).await? {
            if live.identity().device_id() == Some(device_id) {
                self.end(&live).await?;
                ended.push(live.access);
            }
        }
        Ok(ended)
    }

    /// Ends one session [`Compat::sessions_of`] found (after its device was revoked): its
    /// tokens are gone from the store.
    pub async fn end(&self, live: &LiveSession) -> Result<(), GatewayError> {
        self.forget(&live.id, &live.session).await
    }

    /// `/refresh` with a compat refresh token: new tokens for the same session (the old ones
    /// stop working; the old access token's hash is returned for purging it from caches), or
    /// `None` when the refresh token is unknown, used or its session ended.
    pub async fn refresh(
        &self,
        refresh_token: &str,
    ) -> Result<Option<(Issued, TokenHash)>, GatewayError> {
        let now = self.clock.now_ms();
        let key = stored_key(refresh_token);
        // Taken, not read: of two refreshes with one token, one wins.
        let Some(id) = self
            .store
            .take_expiring(Space::CompatRefresh, &key, now)
            .await
            .map_err(store_failure)?
        else {
            return Ok(None);
        };
        let Some(value) = self
            .store
            .get_expiring(Space::CompatSession, &id, now)
            .await
            .map_err(store_failure)?
        else {
            return Ok(None);
        };
        let Ok(session) = serde_json::from_str::<Session>(&value) else {
            return Ok(None);
        };
        if session.refresh.as_deref() != Some(key.as_str()) {
            return Ok(None);
        }
        self.store
            .delete_expiring(Space::CompatAccess, &session.access)
            .await
            .map_err(store_failure)?;
        let old = session.access_hash().ok_or(GatewayError::Internal)?;
        if self.ended_meanwhile(&id).await? {
            return Ok(None);
        }
        let identity = session.identity.clone();
        let issued = self
            .issue(&id, identity, session.ends_ms, true, session.op_grant)
            .await?;
        // Ended while this refresh wrote (a device taken over, a sign-out): what it wrote
        // goes, and the client gets no tokens.
        if self.ended_meanwhile(&id).await? {
            let written = Session {
                identity: session.identity,
                ends_ms: session.ends_ms,
                access: stored_key(&issued.access_token),
                refresh: issued.refresh_token.as_deref().map(stored_key),
                op_grant: session.op_grant,
            };
            self.forget(&id, &written).await?;
            return Ok(None);
        }
        Ok(Some((issued, old)))
    }

    /// Whether session `id` was ended (its marker, written first by [`Compat::forget`]).
    async fn ended_meanwhile(&self, id: &str) -> Result<bool, GatewayError> {
        self.store
            .get_expiring(Space::CompatEnded, id, self.clock.now_ms())
            .await
            .map(|m| m.is_some())
            .map_err(store_failure)
    }
}

/// The cookie of one pending sign-in (one per state, so two sign-ins in one browser do not
/// overwrite each other).
pub fn cookie_name(state: &str) -> String {
    format!("{COOKIE_PREFIX}{}", &stored_key(state)[..16])
}

/// An OAuth error code as it may be logged: the browser brings it, so only its first 64
/// letters, digits and underscores (RFC 6749 codes are such).
fn oauth_code(e: &str) -> String {
    e.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

/// Longest `redirectUrl` accepted (each pending sign-in stores it).
const MAX_REDIRECT_URL: usize = 2048;

/// A `redirectUrl` the gateway will send a login token to: a URL of at most 2 KiB, not a
/// scheme that runs or reads something in the browser itself, without a `loginToken` of its own.
fn checked_redirect(redirect_url: &str) -> Result<Url, BrowserFault> {
    if redirect_url.len() > MAX_REDIRECT_URL {
        return Err(BrowserFault::BadRedirect);
    }
    let mut url = Url::parse(redirect_url).map_err(|_| BrowserFault::BadRedirect)?;
    if matches!(
        url.scheme(),
        "javascript" | "data" | "vbscript" | "file" | "blob" | "about"
    ) {
        return Err(BrowserFault::BadRedirect);
    }
    if url.query_pairs().any(|(k, _)| k == "loginToken") {
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "loginToken")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
    }
    Ok(url)
}

/// Whether `path` is `prefix` or below it at a `/` boundary.
fn under(prefix: &str, path: &str) -> bool {
    path == prefix
        || (path.starts_with(prefix)
            && (prefix.ends_with('/') || path.as_bytes().get(prefix.len()) == Some(&b'/')))
}

/// A JWT's payload, unverified (the caller knows where the JWT came from).
fn jwt_payload(jwt: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

/// `GET /login`'s flows (MSC3824: SSO flagged as the OAuth-aware choice, in the stable and
/// unstable spellings MAS sends; `m.login.token` to finish it; `m.login.password` only when
/// `password` login is offered).
pub fn flows(password: bool) -> serde_json::Value {
    let mut flows = vec![
        serde_json::json!({
            "type": "m.login.sso",
            "oauth_aware_preferred": true,
            "org.matrix.msc3824.delegated_oidc_compatibility": true,
        }),
        serde_json::json!({"type": "m.login.token"}),
    ];
    if password {
        flows.push(serde_json::json!({"type": "m.login.password"}));
    }
    serde_json::json!({ "flows": flows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_a_prefix_only_at_a_slash() {
        assert!(under("/", "/anything"));
        assert!(under("/app", "/app"));
        assert!(under("/app", "/app/x"));
        assert!(under("/app/", "/app/x"));
        assert!(!under("/app", "/application"));
        assert!(!under("/app/x", "/app"));
    }

    #[test]
    fn tokens_are_long_random_and_prefixed_and_device_ids_look_like_mass() {
        let a = new_token(ACCESS_PREFIX);
        assert!(a.starts_with("mgc_") && a.len() == 4 + 43, "{a}");
        assert_ne!(a, new_token(ACCESS_PREFIX));
        let d = new_device_id();
        assert_eq!(d.len(), 10);
        assert!(d
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
        assert!(is_compat_access(&a) && !is_compat_access("mat_x"));
    }

    #[test]
    fn logged_oauth_codes_cannot_forge_log_lines() {
        assert_eq!(oauth_code("access_denied"), "access_denied");
        assert_eq!(oauth_code("x\nINFO forged=1"), "xINFOforged1");
        assert_eq!(oauth_code(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn an_id_tokens_payload_is_read() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"nonce":"n-1","sid":"s"}"#);
        let jwt = format!("e30.{payload}.sig");
        let claims = jwt_payload(&jwt).unwrap();
        assert_eq!(claims["nonce"], "n-1");
        assert!(jwt_payload("garbage").is_none());
        assert!(
            jwt_payload("a.W10.c").is_none(),
            "an array is not a payload"
        );
    }

    #[test]
    fn redirect_urls_that_run_in_the_browser_or_are_huge_are_refused_and_a_login_token_is_dropped()
    {
        for bad in [
            "javascript:alert(1)",
            "data:text/html,x",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert_eq!(
                checked_redirect(bad).unwrap_err(),
                BrowserFault::BadRedirect,
                "{bad}"
            );
        }
        let long = format!("https://c.example/{}", "a".repeat(MAX_REDIRECT_URL));
        assert!(checked_redirect(&long).is_err());
        let u = checked_redirect("https://c.example/cb?a=1&loginToken=planted&b=2").unwrap();
        assert_eq!(u.query(), Some("a=1&b=2"));
        let u = checked_redirect("https://c.example/cb?loginToken=planted").unwrap();
        assert_eq!(u.query(), None);
        assert!(checked_redirect("io.element.app:/callback").is_ok());
    }
}

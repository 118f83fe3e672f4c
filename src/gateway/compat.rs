//! request_filter, served endpoints: the legacy-login endpoints (`[compat]`, MSC3824). Reads
//! the request, calls [`crate::compat::Compat`], writes the answer: Matrix JSON for clients,
//! redirects and small HTML pages for the browser part of single sign-on.

use std::sync::Arc;

use pingora::proxy::Session;
use pingora::Result;
use serde::{Deserialize, Serialize};

use super::classify::CompatRoute;
use super::ctx::Ctx;
use super::notifications::read_body;
use super::token::{self, Presented};
use super::{respond, Gateway};
use crate::compat::{self, BrowserFault, Compat, Issued, SessionHooks, SignedIn, TokenKind};
use crate::error::{GatewayError, Refused, RejectReason};
use crate::notify::Source;

/// The compat layer's hooks into the gateway: the verifier, revocations, and the sign-out of
/// a session's device when its OP grant ended.
pub(crate) struct Hooks {
    pub(crate) verifier: Arc<crate::auth::Verifier>,
    pub(crate) notifier: Arc<crate::notify::Notifier>,
    pub(crate) clock: crate::clock::SharedClock,
}

#[async_trait::async_trait]
impl SessionHooks for Hooks {
    fn revoked(&self, identity: &crate::auth::Identity, access: &crate::auth::TokenHash) -> bool {
        self.verifier
            .revocations()
            .is_revoked(identity, access, self.clock.now_ms())
    }

    async fn verify(
        &self,
        access_token: &str,
    ) -> std::result::Result<Arc<crate::auth::Identity>, GatewayError> {
        self.verifier.verify(access_token, None).await.result
    }

    async fn sign_out(
        &self,
        identity: &crate::auth::Identity,
    ) -> std::result::Result<(), GatewayError> {
        match identity.device_id() {
            Some(device) => self
                .notifier
                .revoke_device(identity.user_id(), device, Source::OpGrantEnded)
                .await
                .map(|_| ()),
            None => Ok(()),
        }
    }
}

/// Answers one legacy-login endpoint.
pub async fn serve(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut Ctx,
    compat: &Arc<Compat>,
    route: CompatRoute,
) -> Result<bool> {
    let answered = match route {
        CompatRoute::Flows => {
            respond::json_response(session, 200, &compat::flows(compat.password_login()), &[])
                .await?;
            Ok(())
        }
        CompatRoute::SsoRedirect => return sso_redirect(gw, session, compat).await,
        CompatRoute::Callback => return callback(gw, session, compat).await,
        CompatRoute::Login => login(gw, session, compat).await?,
        CompatRoute::Logout => logout(gw, session, compat).await?,
        CompatRoute::LogoutAll => logout_all(gw, session, compat).await?,
        CompatRoute::Refresh => refresh(gw, session, compat).await?,
    };
    match answered {
        Ok(()) => Ok(true),
        Err(err) => gw.refuse(session, ctx, err).await,
    }
}

fn query_param(session: &Session, name: &str) -> Option<String> {
    let query = session.req_header().uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn cookie(session: &Session, name: &str) -> Option<String> {
    session
        .req_header()
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether a sign-out recorded since `identity` was issued, or a revocation of `token`
/// itself, applies to it now.
fn revoked(gw: &Gateway, identity: &crate::auth::Identity, token: &str) -> bool {
    gw.verifier.revocations().is_revoked(
        identity,
        &crate::auth::TokenHash::of(token),
        gw.clock.now_ms(),
    )
}

/// Charges one store lookup or write a client can cause without a session to its address's
/// new-token budget.
fn charge(gw: &Gateway, session: &Session) -> std::result::Result<(), GatewayError> {
    gw.verifier
        .charge_new_token(client_of(gw, session))
        .map(|_| ())
        .map_err(|retry_after_ms| GatewayError::RateLimited { retry_after_ms })
}

/// The client's address: the peer's, or the last `X-Forwarded-For` hop behind a trusted proxy.
fn client_of(gw: &Gateway, session: &Session) -> Option<std::net::IpAddr> {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    super::headers::client_address(
        session.req_header(),
        peer,
        gw.config.listen.trust_forwarded_headers,
    )
}

/// The `Set-Cookie` value of a pending sign-in's cookie (`max_age` 0 clears it): only for the
/// callback's path, HttpOnly, SameSite=Lax, `Secure` when the public base URL is https.
fn sso_cookie(gw: &Gateway, name: &str, value: &str, max_age: u64) -> String {
    let secure = if gw.config.discovery.public_base_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{name}={value}; Path=/_matrix/gateway/compat/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    )
}

async fn fault_page(session: &mut Session, fault: BrowserFault) -> Result<bool> {
    tracing::info!(fault = fault.label(), "compat: single sign-on refused");
    respond::html_page(
        session,
        fault.status(),
        "Sign-in failed",
        &[fault.message()],
        None,
        &[],
    )
    .await?;
    Ok(true)
}

/// `GET /login/sso/redirect?redirectUrl=…[&action=register]`.
async fn sso_redirect(gw: &Gateway, session: &mut Session, compat: &Compat) -> Result<bool> {
    let Some(redirect_url) = query_param(session, "redirectUrl") else {
        return fault_page(session, BrowserFault::BadRedirect).await;
    };
    // Each start stores a pending sign-in: charged like a new token.
    if charge(gw, session).is_err() {
        respond::html_page(
            session,
            429,
            "Sign-in failed",
            &["Too many sign-ins from this address. Try again in a minute."],
            None,
            &[],
        )
        .await?;
        return Ok(true);
    }
    let register = ["action", "org.matrix.msc3824.action"]
        .iter()
        .any(|k| query_param(session, k).as_deref() == Some("register"));
    match compat.start(&redirect_url, register).await {
        Ok(started) => {
            let cookie = sso_cookie(
                gw,
                &started.cookie_name,
                &started.cookie_value,
                compat.sso_timeout_secs(),
            );
            respond::redirect(session, started.location.as_str(), &[cookie]).await?;
            Ok(true)
        }
        Err(fault) => fault_page(session, fault).await,
    }
}

/// `GET /_matrix/gateway/compat/callback?state=…&code=…` (or `error=…`).
async fn callback(gw: &Gateway, session: &mut Session, compat: &Compat) -> Result<bool> {
    let Some(state) = query_param(session, "state") else {
        return fault_page(session, BrowserFault::UnknownState).await;
    };
    let code = query_param(session, "code");
    let error = query_param(session, "error");
    let browser = cookie(session, &compat::cookie_name(&state));
    let finished = compat
        .finish(
            &state,
            code.as_deref(),
            error.as_deref(),
            browser.as_deref(),
        )
        .await;
    let finished = match finished {
        Ok(f) => f,
        Err(fault) => return fault_page(session, fault).await,
    };
    let clear = sso_cookie(gw, &finished.cookie_name, "", 0);
    if finished.allowed {
        respond::redirect(session, finished.redirect.as_str(), &[clear]).await?;
    } else {
        // Not on the allow-list: the user sees where the login goes and decides (as Synapse's
        // SSO redirect confirmation). The page cannot be framed, so it cannot be clicked for
        // the user.
        // The whole destination but the login token: scheme, host, port and path.
        let r = &finished.redirect;
        let target = match r.host_str() {
            Some(host) => match r.port() {
                Some(port) => format!("{}://{host}:{port}{}", r.scheme(), r.path()),
                None => format!("{}://{host}{}", r.scheme(), r.path()),
            },
            None => format!("{}:{}", r.scheme(), r.path()),
        };
        let question = format!("Continue to {target}?");
        respond::html_page(
            session,
            200,
            "Continue to your client",
            &[
                &question,
                "A Matrix client asked to sign you in. Continue only if you started this \
                 sign-in in that client: it will get access to your account.",
            ],
            Some((finished.redirect.as_str(), "Continue")),
            &[clear],
        )
        .await?;
    }
    Ok(true)
}

/// The body of `POST /login`.
#[derive(Deserialize)]
struct LoginRequest {
    #[serde(rename = "type")]
    kind: String,
    /// `m.login.token`'s login token.
    token: Option<String>,
    /// `m.login.password`'s user.
    identifier: Option<UserIdentifier>,
    /// The deprecated form of `identifier` (older clients and bots).
    user: Option<String>,
    /// `m.login.password`'s password.
    password: Option<Password>,
    /// The device a password login signs in (default: a new one).
    device_id: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

/// A password as a login body brings it: no `Debug`, so it cannot end up in a log line.
#[derive(Deserialize)]
#[serde(transparent)]
struct Password(String);

/// `identifier` of a login body (only `m.id.user` names a user here).
#[derive(Deserialize)]
struct UserIdentifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

/// The answer to a login or a refresh.
#[derive(Serialize)]
struct LoginResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    home_server: Option<&'a str>,
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_ms: Option<u64>,
}

async fn json_body<T: for<'de> Deserialize<'de>>(
    session: &mut Session,
) -> Result<std::result::Result<T, GatewayError>> {
    Ok(match read_body(session).await? {
        Some(body) => serde_json::from_slice(&body).map_err(|_| GatewayError::BadLogin),
        None => Err(GatewayError::BadLogin),
    })
}

/// `POST /login`: `m.login.token` (the login token is taken once) or, when offered,
/// `m.login.password` (checked at the OP); then the device is provisioned upstream and the
/// session's tokens issued.
async fn login(
    gw: &Gateway,
    session: &mut Session,
    compat: &Compat,
) -> Result<std::result::Result<(), GatewayError>> {
    let req: LoginRequest = match json_body(session).await? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let identity = match req.kind.as_str() {
        "m.login.token" => token_login(gw, session, compat, req.token).await,
        "m.login.password" if compat.password_login() => {
            password_login(gw, session, compat, &req).await
        }
        _ => Err(GatewayError::BadLogin),
    };
    let signed_in = match identity {
        Ok(i) => i,
        Err(e) => return Ok(Err(e)),
    };
    // The same binding as an OAuth token's first request: pin, tombstone, provisioning.
    if let Err(e) = gw.binder.bind(&signed_in.identity).await {
        return Ok(Err(e));
    }
    let identity = signed_in.identity.clone();
    // A password login naming a device takes it over: the user's earlier compat sessions on
    // it end (so an old session's token cannot sign the new one's device out later).
    if let (true, Some(device)) = (req.device_id.is_some(), identity.device_id()) {
        match compat.end_device_sessions(identity.user_id(), device).await {
            Ok(ended) => {
                for hash in ended {
                    gw.verifier.purge_token_everywhere(&hash).await;
                }
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    let issued = match compat.open_session(signed_in, req.refresh_token).await {
        Ok(i) => i,
        Err(e) => return Ok(Err(e)),
    };
    // A revocation recorded while the session was being opened found no session to end:
    // checked again now that it is stored.
    if revoked(gw, &identity, &issued.access_token) {
        if let Err(e) = compat
            .end_session(TokenKind::Access, &issued.access_token)
            .await
        {
            return Ok(Err(e));
        }
        return Ok(Err(GatewayError::LoginRefused));
    }
    tracing::info!(user = %identity.user_id(), device = ?identity.device_id(), kind = %req.kind, "compat: session opened");
    write_tokens(gw, session, Some(&identity), &issued).await?;
    Ok(Ok(()))
}

/// `m.login.token`: the sign-in the login token stands for, taken once.
async fn token_login(
    gw: &Gateway,
    session: &Session,
    compat: &Compat,
    token: Option<String>,
) -> std::result::Result<SignedIn, GatewayError> {
    let token = token.ok_or(GatewayError::BadLogin)?;
    charge(gw, session)?;
    let signed_in = compat.redeem(&token).await?;
    // Signed out since the callback (its OP session, device, user or subject revoked): no
    // device is provisioned for it.
    if revoked(gw, &signed_in.identity, &token) {
        return Err(GatewayError::LoginRefused);
    }
    Ok(signed_in)
}

/// `m.login.password`: the user (`m.id.user` identifier or the deprecated `user`: a localpart
/// or a full user ID of this server, matched case-insensitively as Synapse does) and the
/// password go to the OP's password grant, for the client's `device_id` or a new device.
async fn password_login(
    gw: &Gateway,
    session: &Session,
    compat: &Compat,
    req: &LoginRequest,
) -> std::result::Result<SignedIn, GatewayError> {
    let named = match (&req.identifier, &req.user) {
        (Some(UserIdentifier { kind, user }), _) if kind == "m.id.user" => user.as_deref(),
        (Some(_), _) => None,
        (None, user) => user.as_deref(),
    };
    let (Some(named), Some(password)) = (named, &req.password) else {
        return Err(GatewayError::BadLogin);
    };
    let device_id = match &req.device_id {
        Some(d) if crate::auth::identity::valid_device_id(d) => d.clone(),
        Some(_) => return Err(GatewayError::BadLogin),
        None => compat::new_device_id(),
    };
    let server_name = &gw.config.homeserver.server_name;
    let localpart = match named.strip_prefix('@') {
        Some(full) => match full.split_once(':') {
            Some((local, server)) if server == server_name => local,
            _ => return Err(GatewayError::LoginRefused),
        },
        None => named,
    }
    .to_ascii_lowercase();
    if !crate::auth::identity::valid_localpart(&localpart) || localpart.len() > 255 {
        return Err(GatewayError::LoginRefused);
    }
    // One OP call a client can cause without a session: the address's new-token budget too.
    charge(gw, session)?;
    let user_id = format!("@{localpart}:{server_name}");
    compat
        .password_grant(compat::PasswordAttempt {
            user_id: &user_id,
            localpart: &localpart,
            password: &password.0,
            device_id: &device_id,
            client: client_of(gw, session),
        })
        .await
}

async fn write_tokens(
    gw: &Gateway,
    session: &mut Session,
    identity: Option<&crate::auth::Identity>,
    issued: &Issued,
) -> Result<()> {
    let body = LoginResponse {
        user_id: identity.map(|i| i.user_id()),
        device_id: identity.and_then(|i| i.device_id()),
        home_server: identity.map(|_| gw.config.homeserver.server_name.as_str()),
        access_token: &issued.access_token,
        refresh_token: issued.refresh_token.as_deref(),
        expires_in_ms: issued.expires_in_ms,
    };
    respond::json_response(session, 200, &body, &[]).await
}

/// `POST /logout` with a compat access token: the session ends, its device is signed out
/// upstream. OAuth sessions end at the OP: their tokens get the usual 404.
/// The compat access token of a `/logout` or `/logout/all` request. Any other token: the
/// usual 404 (OAuth sessions end at the OP).
fn compat_token(gw: &Gateway, session: &Session) -> std::result::Result<String, GatewayError> {
    let token = match token::extract(session.req_header(), gw.config.auth.allow_query_token) {
        Ok(e) => match e.presented {
            Presented::Token(t) => t,
            Presented::None => {
                return Err(GatewayError::MissingToken(
                    crate::error::MissingTokenReason::Absent,
                ))
            }
        },
        Err(r) => return Err(GatewayError::MissingToken(r)),
    };
    if !compat::is_compat_access(&token) {
        return Err(GatewayError::Refused(Refused::OwnedByOp));
    }
    Ok(token)
}

async fn logout(
    gw: &Gateway,
    session: &mut Session,
    compat: &Compat,
) -> Result<std::result::Result<(), GatewayError>> {
    let token = match compat_token(gw, session) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let identity = match compat.session_identity(TokenKind::Access, &token).await {
        Ok(Some(i)) => i,
        Ok(None) => return Ok(Err(GatewayError::UnknownToken(RejectReason::Inactive))),
        Err(e) => return Ok(Err(e)),
    };
    if let Some(device) = identity.device_id() {
        // First refuse the device's tokens and sign it out upstream: if that fails the client
        // gets 503 and its retry finds the session still there to end.
        if let Err(e) = gw
            .notifier
            .revoke_device(identity.user_id(), device, Source::Logout)
            .await
        {
            return Ok(Err(e));
        }
    }
    if let Err(e) = compat.end_session(TokenKind::Access, &token).await {
        return Ok(Err(e));
    }
    gw.verifier
        .purge_token_everywhere(&crate::auth::TokenHash::of(&token))
        .await;
    tracing::info!(user = %identity.user_id(), device = ?identity.device_id(), "compat: session ended by /logout");
    respond::json_response(session, 200, &respond::Empty {}, &[]).await?;
    Ok(Ok(()))
}

/// The body of `POST /logout/all`: as with MAS, a client says it accepts that only the user's
/// compat sessions end (its OAuth sessions are the OP's).
#[derive(Deserialize, Default)]
struct LogoutAllRequest {
    #[serde(rename = "io.element.only_compat_is_fine", default)]
    only_compat_is_fine: bool,
}

/// `POST /logout/all` with a compat access token of a live session (expired or signed out
/// too, as `/logout` takes it) and `io.element.only_compat_is_fine`: every compat session of
/// the user ends. Only sessions of the caller's own OP subject (after a user name moved to a
/// new subject, an old session cannot end the new owner's), and the caller's own session
/// always (also one the per-user index does not know). Each device is refused and signed out
/// upstream, the caller's last, and its sessions end once that worked: a failure answers 503
/// and the retry, with the same token, finds everything not yet ended. Without the flag, or
/// with an OAuth token: the usual 404 (signing out everywhere is the OP's).
async fn logout_all(
    gw: &Gateway,
    session: &mut Session,
    compat: &Compat,
) -> Result<std::result::Result<(), GatewayError>> {
    let token = match compat_token(gw, session) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    // The token's session, found as `/logout` finds it (one store lookup, charged to the
    // address): expired or already signed out too, so that the retry of a sign-out that
    // failed upstream can finish it. Then held to the user's pin and tombstone like a refresh.
    if let Err(e) = charge(gw, session) {
        return Ok(Err(e));
    }
    let identity = match compat.session_identity(TokenKind::Access, &token).await {
        Ok(Some(i)) => i,
        Ok(None) => return Ok(Err(GatewayError::UnknownToken(RejectReason::Inactive))),
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = gw.binder.check_user(&identity).await {
        return Ok(Err(e));
    }
    let body = match read_body(session).await? {
        None => LogoutAllRequest::default(),
        Some(b) if b.iter().all(u8::is_ascii_whitespace) => LogoutAllRequest::default(),
        Some(b) => match serde_json::from_slice(&b) {
            Ok(r) => r,
            Err(_) => return Ok(Err(GatewayError::BadLogin)),
        },
    };
    if !body.only_compat_is_fine {
        return Ok(Err(GatewayError::Refused(Refused::OwnedByOp)));
    }
    let own = crate::auth::TokenHash::of(&token);
    let subject = identity.subject_key();
    let mut sessions: Vec<_> = match compat.sessions_of(identity.user_id()).await {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    sessions.retain(|l| l.identity().subject_key() == subject);
    // The caller's own session last.
    sessions.sort_by_key(|l| l.access == own);
    let mut devices: Vec<&str> = sessions
        .iter()
        .filter_map(|l| l.identity().device_id())
        .chain(identity.device_id())
        .collect();
    devices.sort_unstable();
    devices.dedup();
    // The caller's device last: its sign-out ends the caller's session, and until every
    // other device is done a failure must leave the caller a session to retry with.
    let own_device = identity.device_id();
    devices.sort_by_key(|d| Some(*d) == own_device);
    for device in devices {
        if let Err(e) = gw
            .notifier
            .revoke_device(identity.user_id(), device, Source::Logout)
            .await
        {
            return Ok(Err(e));
        }
    }
    for live in &sessions {
        if let Err(e) = compat.end(live).await {
            return Ok(Err(e));
        }
        gw.verifier.purge_token_everywhere(&live.access).await;
    }
    if let Err(e) = compat.end_session(TokenKind::Access, &token).await {
        return Ok(Err(e));
    }
    gw.verifier.purge_token_everywhere(&own).await;
    tracing::info!(user = %identity.user_id(), sessions = sessions.len(), "compat: sessions ended by /logout/all");
    respond::json_response(session, 200, &respond::Empty {}, &[]).await?;
    Ok(Ok(()))
}

/// The body of `POST /refresh`.
#[derive(Deserialize)]
struct RefreshRequest {
    refresh_token: String,
}

/// `POST /refresh` with a compat refresh token. Other refresh tokens are the OP's business:
/// the usual 404.
async fn refresh(
    gw: &Gateway,
    session: &mut Session,
    compat: &Compat,
) -> Result<std::result::Result<(), GatewayError>> {
    let req: RefreshRequest = match json_body(session).await? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    if !req.refresh_token.starts_with(compat::REFRESH_PREFIX) {
        return Ok(Err(GatewayError::Refused(Refused::OwnedByOp)));
    }
    if let Err(e) = charge(gw, session) {
        return Ok(Err(e));
    }
    // A session signed out meanwhile (its device, user, subject or OP session revoked, the
    // user deactivated) gets no new tokens: it ends here.
    let identity = match compat
        .session_identity(TokenKind::Refresh, &req.refresh_token)
        .await
    {
        Ok(Some(i)) => i,
        Ok(None) => return Ok(Err(GatewayError::UnknownToken(RejectReason::Inactive))),
        Err(e) => return Ok(Err(e)),
    };
    let signed_out = revoked(gw, &identity, &req.refresh_token);
    let refused = match gw.binder.check_user(&identity).await {
        Ok(()) if !signed_out => None,
        Ok(()) => Some(GatewayError::UnknownToken(RejectReason::Revoked)),
        Err(
            e @ (GatewayError::UserDeactivated
            | GatewayError::SubjectMismatch
            | GatewayError::ReservedUserId),
        ) => Some(e),
        Err(e) => return Ok(Err(e)),
    };
    if let Some(err) = refused {
        if let Err(e) = compat
            .end_session(TokenKind::Refresh, &req.refresh_token)
            .await
        {
            return Ok(Err(e));
        }
        return Ok(Err(err));
    }
    match compat.refresh(&req.refresh_token).await {
        Ok(Some((issued, old))) => {
            gw.verifier.purge_token_everywhere(&old).await;
            write_tokens(gw, session, None, &issued).await?;
            Ok(Ok(()))
        }
        Ok(None) => Ok(Err(GatewayError::UnknownToken(RejectReason::Inactive))),
        Err(e) => Ok(Err(e)),
    }
}

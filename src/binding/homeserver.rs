//! The homeserver's application-service API, as the binding uses it: register a user, log a
//! device in or create it, sign devices out, deactivate an account, and the few reads the
//! request path needs (`whoami`, room membership, cross-signing keys). Every call goes through
//! [`Homeserver::call`]: one place that sends, reads the answer, decides, logs and counts.

use serde_json::{json, Value};
use url::Url;

use super::{localpart, utf8_percent_encode_segment, Bound, Credential};
use crate::config::{Config, HomeserverKind, Secret};
use crate::error::{BindingFailure, GatewayError};

/// One kind of call: its name in logs, its metric label, and the failure it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Register,
    Login,
    CreateDevice,
    Logout,
    DeleteDevice,
    LogoutAll,
    Deactivate,
    Whoami,
    Membership,
    KeysQuery,
    SetPassword,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Register => "appservice registration",
            Call::Login => "appservice login",
            Call::CreateDevice => "appservice device creation",
            Call::Logout => "upstream logout",
            Call::DeleteDevice => "upstream device deletion",
            Call::LogoutAll => "appservice logout/all",
            Call::Deactivate => "upstream deactivation",
            Call::Whoami => "whoami",
            Call::Membership => "membership check",
            Call::KeysQuery => "keys/query",
            Call::SetPassword => "dendrite password reset",
        }
    }

    /// The `kind` label of `provisioning_requests_total`; reads are not counted.
    fn metric(self) -> Option<&'static str> {
        match self {
            Call::Register => Some("register"),
            Call::Login => Some("login"),
            Call::CreateDevice => Some("device"),
            Call::Logout | Call::DeleteDevice => Some("logout"),
            Call::Deactivate => Some("deactivate"),
            Call::LogoutAll
            | Call::Whoami
            | Call::Membership
            | Call::KeysQuery
            | Call::SetPassword => None,
        }
    }

    fn failure(self) -> BindingFailure {
        match self {
            Call::Register => BindingFailure::Registration,
            Call::Login => BindingFailure::Login,
            Call::CreateDevice => BindingFailure::DeviceCreation,
            _ => BindingFailure::Unreachable,
        }
    }
}

/// A homeserver answer: its status and its JSON body (`null` when it has none).
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The appservice-API client.
pub struct Homeserver {
    pub(super) kind: HomeserverKind,
    url: Url,
    as_token: Option<Secret>,
    admin_token: Option<Secret>,
    http: reqwest::Client,
}

/// Timeout of one call to the homeserver's appservice API.
pub const HOMESERVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl Homeserver {
    /// The client for `config`'s homeserver.
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        Ok(Homeserver {
            kind: config.homeserver.kind,
            url: config.homeserver.url.clone(),
            as_token: config.homeserver.as_token.clone(),
            admin_token: config.homeserver.admin_token.clone(),
            http: crate::http_client::build(HOMESERVER_TIMEOUT)?,
        })
    }

    /// Whether this homeserver asks cross-signing uploads for a password the gateway can set
    /// and give (Dendrite, with an admin token configured).
    pub fn answers_password_stage(&self) -> bool {
        self.kind == HomeserverKind::Dendrite && self.admin_token.is_some()
    }

    /// Sets `user_id`'s homeserver password to `password` through Dendrite's admin API
    /// (`POST /_dendrite/admin/resetPassword/{userID}`), keeping its devices signed in. Any
    /// answer but 200 is a 503.
    pub async fn set_password(&self, user_id: &str, password: &str) -> Result<(), GatewayError> {
        let Some(admin) = &self.admin_token else {
            return Err(GatewayError::Internal);
        };
        let url = self.endpoint(&format!(
            "/_dendrite/admin/resetPassword/{}",
            utf8_percent_encode_segment(user_id)
        ));
        let req = self
            .http
            .post(url)
            .bearer_auth(admin.expose())
            .json(&json!({"password": password, "logout_devices": false}));
        self.call(Call::SetPassword, user_id, req, |a| {
            (a.status == 200).then_some(())
        })
        .await
    }

    /// The AS token (appservice modes).
    pub fn as_token(&self) -> Option<&Secret> {
        self.as_token.as_ref()
    }

    /// Sends `req`; `accept` turns the answer into the result, or `None` for a failure, which
    /// is logged with its status and errcode and becomes a 503 (never a 401). Provisioning
    /// calls are counted by kind and outcome.
    async fn call<T>(
        &self,
        call: Call,
        user: &str,
        req: reqwest::RequestBuilder,
        accept: impl FnOnce(&Answer) -> Option<T>,
    ) -> Result<T, GatewayError> {
        let outcome = match req.send().await {
            Err(e) => {
                tracing::error!(user, call = call.name(), error = %e, "homeserver unreachable");
                Err(GatewayError::BindingUnavailable(
                    BindingFailure::Unreachable,
                ))
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                // Appservice-API answers are small JSON; anything else reads as `null`.
                let body = resp.json().await.unwrap_or(Value::Null);
                let answer = Answer { status, body };
                accept(&answer).ok_or_else(|| {
                    tracing::error!(
                        user,
                        call = call.name(),
                        status,
                        errcode = %answer.body["errcode"],
                        "homeserver call failed"
                    );
                    GatewayError::BindingUnavailable(call.failure())
                })
            }
        };
        if let Some(kind) = call.metric() {
            let result = if outcome.is_ok() { "ok" } else { "error" };
            crate::metrics::PROVISIONING
                .with_label_values(&[kind, result])
                .inc();
        }
        outcome
    }

    fn endpoint(&self, path: &str) -> Url {
        let mut u = self.url.clone();
        u.set_path(path);
        u
    }

    /// `path` with `?user_id=` (the appservice acting as that user).
    fn as_user(&self, path: &str, user_id: &str) -> Url {
        let mut url = self.endpoint(path);
        url.query_pairs_mut().append_pair("user_id", user_id);
        url
    }

    fn as_bearer(&self) -> Result<&str, GatewayError> {
        self.as_token
            .as_ref()
            .map(Secret::expose)
            .ok_or(GatewayError::Internal)
    }

    /// A request with `bound`'s credentials; `None` without any (`headers` mode).
    fn as_bound(
        &self,
        method: reqwest::Method,
        path: &str,
        bound: &Bound,
    ) -> Option<reqwest::RequestBuilder> {
        let mut url = self.endpoint(path);
        let token = match &bound.credential {
            Credential::DeviceToken(t) => t.clone(),
            Credential::Masquerade => {
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("user_id", &bound.user_id);
                    if let Some(d) = &bound.device_id {
                        q.append_pair("device_id", d);
                    }
                }
                self.as_token.as_ref()?.expose().to_owned()
            }
            Credential::None => return None,
        };
        Some(self.http.request(method, url).bearer_auth(token))
    }

    /// Registers the user (`M_USER_IN_USE` counts as done).
    pub async fn register(&self, user_id: &str) -> Result<(), GatewayError> {
        let mut body = json!({
            "type": "m.login.application_service",
            "username": localpart(user_id),
            "inhibit_login": true,
        });
        if self.kind == HomeserverKind::Conduit {
            // Conduit reports password-less appservice users as guests.
            body["password"] = Value::String(random_secret());
        }
        let req = self
            .http
            .post(self.endpoint("/_matrix/client/v3/register"))
            .bearer_auth(self.as_bearer()?)
            .json(&body);
        self.call(Call::Register, user_id, req, |a| {
            (a.ok() || a.body["errcode"] == "M_USER_IN_USE").then_some(())
        })
        .await?;
        tracing::info!(user = %user_id, "user registered upstream");
        Ok(())
    }

    /// Logs `device_id` in with `m.login.application_service`; its new access token.
    pub async fn login(&self, user_id: &str, device_id: &str) -> Result<String, GatewayError> {
        let req = self
            .http
            .post(self.endpoint("/_matrix/client/v3/login"))
            .bearer_auth(self.as_bearer()?)
            .json(&json!({
                "type": "m.login.application_service",
                "identifier": {"type": "m.id.user", "user": localpart(user_id)},
                "device_id": device_id,
                "initial_device_display_name": "OIDC session",
            }));
        self.call(Call::Login, user_id, req, |a| {
            a.body["access_token"]
                .as_str()
                .filter(|_| a.ok())
                .map(str::to_owned)
        })
        .await
    }

    /// Creates `device_id` for the user (`PUT /devices/{id}?user_id=`, MSC4190).
    pub async fn create_device(&self, user_id: &str, device_id: &str) -> Result<(), GatewayError> {
        let path = device_path(device_id);
        let req = self
            .http
            .put(self.as_user(&path, user_id))
            .bearer_auth(self.as_bearer()?)
            .json(&json!({"display_name": "OIDC session"}));
        self.call(Call::CreateDevice, user_id, req, |a| a.ok().then_some(()))
            .await
    }

    /// `POST /logout` with the device's own token (401: the device is already gone).
    pub async fn logout(&self, user_id: &str, token: &str) -> Result<(), GatewayError> {
        let req = self
            .http
            .post(self.endpoint("/_matrix/client/v3/logout"))
            .bearer_auth(token)
            .json(&json!({}));
        self.call(Call::Logout, user_id, req, |a| {
            (a.ok() || a.status == 401).then_some(())
        })
        .await
    }

    /// The AS `DELETE /devices/{id}?user_id=` (404: already gone).
    pub async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<(), GatewayError> {
        let path = device_path(device_id);
        let req = self
            .http
            .delete(self.as_user(&path, user_id))
            .bearer_auth(self.as_bearer()?)
            .json(&json!({}));
        self.call(Call::DeleteDevice, user_id, req, |a| {
            (a.ok() || a.status == 404).then_some(())
        })
        .await
    }

    /// The AS `POST /logout/all?user_id=` (Dendrite, Conduit): every device of the user.
    /// Whether the homeserver took it; an unreachable homeserver is an error (503).
    pub async fn logout_all(&self, user_id: &str) -> Result<bool, GatewayError> {
        let req = self
            .http
            .post(self.as_user("/_matrix/client/v3/logout/all", user_id))
            .bearer_auth(self.as_bearer()?)
            .json(&json!({}));
        self.call(Call::LogoutAll, user_id, req, |a| Some(a.ok()))
            .await
    }

    /// Deactivates the account with the best mechanism the homeserver has; its name.
    pub async fn deactivate(
        &self,
        user_id: &str,
        erase: bool,
    ) -> Result<&'static str, GatewayError> {
        let (req, mechanism) = match (self.kind, &self.admin_token) {
            (HomeserverKind::Synapse | HomeserverKind::Tuwunel, Some(admin)) => {
                let url = self.endpoint(&format!(
                    "/_synapse/admin/v1/deactivate/{}",
                    utf8_percent_encode_segment(user_id)
                ));
                (
                    self.http.post(url).bearer_auth(admin.expose()),
                    "synapse_admin_api",
                )
            }
            (HomeserverKind::Synapse | HomeserverKind::Tuwunel, None) => {
                let url = self.as_user("/_matrix/client/v3/account/deactivate", user_id);
                (
                    self.http.post(url).bearer_auth(self.as_bearer()?),
                    "appservice_deactivate",
                )
            }
            _ => return Ok("logout_all"),
        };
        let req = req.json(&json!({"erase": erase}));
        self.call(Call::Deactivate, user_id, req, |a| a.ok().then_some(()))
            .await?;
        Ok(mechanism)
    }

    /// Whether the homeserver still accepts `bound` (`whoami`). Only a clear refusal says no:
    /// an unreachable homeserver or an odd answer counts as yes.
    pub async fn accepts(&self, bound: &Bound) -> bool {
        let Some(req) = self.as_bound(
            reqwest::Method::GET,
            "/_matrix/client/v3/account/whoami",
            bound,
        ) else {
            return true;
        };
        self.call(Call::Whoami, &bound.user_id, req, |a| {
            Some(!matches!(a.status, 400 | 401 | 403))
        })
        .await
        .unwrap_or(true)
    }

    /// Whether the bound user has joined `room` (its raw path segment), asked with the bound
    /// credentials through the room-state API, which checks membership for appservice requests
    /// too. Anything but a clear answer is a 503: the guard fails closed.
    pub async fn is_joined(&self, bound: &Bound, room: &str) -> Result<bool, GatewayError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{room}/state/m.room.member/{}",
            utf8_percent_encode_segment(&bound.user_id)
        );
        let Some(req) = self.as_bound(reqwest::Method::GET, &path, bound) else {
            // Only reached with masquerade credentials; without them nothing can be checked.
            return Err(GatewayError::Internal);
        };
        self.call(Call::Membership, &bound.user_id, req, |a| match a.status {
            // A body that is not JSON says nothing: 503. Without `membership` it is no join.
            200 if a.body.is_null() => None,
            200 => Some(a.body["membership"] == "join"),
            403 | 404 => Some(false),
            _ => None,
        })
        .await
    }

    /// Whether the user already has a cross-signing master key upstream. The guard fails
    /// closed: an answer that is not a keys/query answer is not "no key". (Some homeservers
    /// leave out empty maps, so only the shape is required.)
    pub async fn has_master_key(&self, bound: &Bound) -> Result<bool, GatewayError> {
        let Some(req) = self.as_bound(
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/query",
            bound,
        ) else {
            return Ok(false);
        };
        let req = req.json(&json!({"device_keys": {bound.user_id.clone(): []}}));
        self.call(Call::KeysQuery, &bound.user_id, req, |a| {
            let shaped = a.ok()
                && a.body.is_object()
                && a.body.get("master_keys").is_none_or(|m| m.is_object());
            shaped.then(|| a.body["master_keys"].get(&bound.user_id).is_some())
        })
        .await
    }
}

/// `/_matrix/client/v3/devices/{device_id}`, the ID percent-encoded.
fn device_path(device_id: &str) -> String {
    format!(
        "/_matrix/client/v3/devices/{}",
        utf8_percent_encode_segment(device_id)
    )
}

pub(super) fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conduit_passwords_are_random() {
        assert_eq!(random_secret().len(), 48);
        assert_ne!(random_secret(), random_secret());
    }
}

//! matrix-rust-sdk (Element X's SDK) against the gateway, the way Element X uses it. For two
//! users, everything through the gateway:
//!
//! - sign-in: discovery from the server name (`/.well-known/matrix/client`), the homeserver's
//!   OAuth 2.0 metadata, dynamic client registration at the OP, authorization code + PKCE; the
//!   OP's sign-in and consent pages are driven by a headless browser (a cookie jar), the SDK
//!   builds the authorization URL and finishes the login from the callback URL;
//! - whoami on the device the SDK asked for;
//! - end-to-end encryption: device and one-time keys uploaded by the SDK, an encrypted room where
//!   the second user's SDK decrypts what the first one sent;
//! - with `--cross-signing 1`: cross-signing bootstrapped by the SDK, then Element X's "reset identity" through the gateway's `m.oauth`
//!   stage and approval (its admin API, where the OP's account page would send it), after
//!   which the SDK's retry succeeds;
//! - refresh: an expired access token refreshed by the SDK, the session going on;
//! - logout: the SDK's own `OAuth::logout()` (a revocation at the advertised endpoint, which
//!   must be https: the gateway's HTTPS listener, its certificate trusted with `--ca-cert`); the
//!   old token refused.
//!
//!   gateway-e2e-sdk-client --server-name 127.0.0.1:8008 --users alice,bob \
//!       --admin http://127.0.0.1:9090 --admin-token TOKEN --expires-in 4 --ca-cert cert.pem
//!
//! Prints `STEP <name> <json>` lines and `OK`; exits 1 with the error otherwise.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use matrix_sdk::authentication::oauth::registration::{
    ApplicationType, ClientMetadata, Localized, OAuthGrantType,
};
use matrix_sdk::authentication::oauth::ClientRegistrationData;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::encryption::CrossSigningResetAuthType;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId, ServerName};
use matrix_sdk::utils::UrlOrQuery;
use matrix_sdk::{Client, SessionChange};
use rand::Rng;
use serde_json::{json, Value};
use url::Url;

const REDIRECT: &str = "http://127.0.0.1/callback";

struct Args {
    server_name: String,
    users: Vec<String>,
    admin: String,
    admin_token: String,
    expires_in: u64,
    cross_signing: bool,
    /// PEM certificate the gateway's HTTPS listener presents, trusted as a root.
    ca_cert: Option<reqwest::Certificate>,
}

fn args() -> Result<Args> {
    let mut raw = std::env::args().skip(1);
    let mut a = Args {
        server_name: String::new(),
        users: vec!["alice".into(), "bob".into()],
        admin: String::new(),
        admin_token: String::new(),
        expires_in: 4,
        cross_signing: false,
        ca_cert: None,
    };
    while let Some(k) = raw.next() {
        let v = raw.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--server-name" => a.server_name = v,
            "--users" => a.users = v.split(',').map(str::to_owned).collect(),
            "--admin" => a.admin = v.trim_end_matches('/').to_owned(),
            "--admin-token" => a.admin_token = v,
            "--expires-in" => a.expires_in = v.parse()?,
            "--cross-signing" => a.cross_signing = v == "1",
            "--ca-cert" => {
                let pem = std::fs::read(&v).with_context(|| format!("--ca-cert {v}"))?;
                a.ca_cert = Some(reqwest::Certificate::from_pem(&pem)?);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(!a.server_name.is_empty(), "--server-name is required");
    ensure!(a.users.len() == 2, "--users names two users");
    Ok(a)
}

fn out(name: &str, value: Value) {
    println!("STEP {name} {value}");
}

/// The OP's sign-in as a browser does it: follows redirects, fills the dev login form with
/// `user` (any password) and the consent form; the callback URL it ends at.
async fn browse(a: &Args, auth_url: &Url, user: &str) -> Result<Url> {
    let mut browser = reqwest::Client::builder();
    if let Some(cert) = &a.ca_cert {
        browser = browser.add_root_certificate(cert.clone());
    }
    let browser = browser
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut res = browser.get(auth_url.clone()).send().await?;
    for _ in 0..12 {
        let location = res
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        let Some(location) = location else {
            let status = res.status();
            bail!(
                "no redirect ({status}): {}",
                res.text().await.unwrap_or_default()
            );
        };
        let next = auth_url.join(&location)?;
        if next.as_str().starts_with(REDIRECT) {
            return Ok(next);
        }
        if next.path().starts_with("/interaction/") {
            let page = browser.get(next.clone()).send().await?.text().await?;
            let form: Vec<(&str, &str)> = if page.contains("name=\"login\"") {
                vec![("prompt", "login"), ("login", user), ("password", "any")]
            } else {
                vec![("prompt", "consent")]
            };
            res = browser.post(next).form(&form).send().await?;
        } else {
            res = browser.get(next).send().await?;
        }
    }
    bail!("too many redirects")
}

struct Session {
    user: String,
    client: Client,
    user_id: OwnedUserId,
    device_id: OwnedDeviceId,
}

/// Element X's sign-in: a client built from the server name, its OAuth 2.0 login.
async fn sign_in(a: &Args, user: &str) -> Result<Session> {
    let client = Client::builder()
        .insecure_server_name_no_tls(&ServerName::parse(&a.server_name)?)
        .add_root_certificates(a.ca_cert.iter().cloned().collect())
        .handle_refresh_tokens()
        .build()
        .await
        .context("server discovery")?;
    let metadata = ClientMetadata::new(
        ApplicationType::Native,
        vec![OAuthGrantType::AuthorizationCode {
            redirect_uris: vec![Url::parse(REDIRECT)?],
        }],
        Localized::new(Url::parse("http://127.0.0.1/")?, []),
    );
    let registration: ClientRegistrationData = Raw::new(&metadata)?.into();
    let device: String = {
        let mut rng = rand::rng();
        (0..10)
            .map(|_| rng.random_range(b'A'..=b'Z') as char)
            .collect()
    };
    let oauth = client.oauth();
    let auth = oauth
        .login(
            Url::parse(REDIRECT)?,
            Some(format!("RS{device}").into()),
            Some(registration),
            None,
        )
        .build()
        .await
        .context("the OAuth 2.0 login URL (metadata, registration)")?;
    let callback = browse(a, &auth.url, user).await?;
    oauth
        .finish_login(UrlOrQuery::Url(callback))
        .await
        .context("finishing the login")?;
    let who = client.whoami().await.context("whoami")?;
    let device_id = who.device_id.context("whoami names no device")?;
    ensure!(
        device_id.as_str() == format!("RS{device}"),
        "whoami names device {device_id}, not the one asked for"
    );
    out(
        "signed_in",
        json!({"user": user, "user_id": who.user_id, "device_id": device_id,
               "client_id": oauth.client_id().map(|c| c.as_str().to_owned())}),
    );
    Ok(Session {
        user: user.to_owned(),
        client,
        user_id: who.user_id,
        device_id,
    })
}

async fn sync(s: &Session) -> Result<()> {
    s.client
        .sync_once(SyncSettings::default().timeout(Duration::from_millis(500)))
        .await
        .with_context(|| format!("{}'s sync", s.user))?;
    Ok(())
}

async fn admin_approve_reset(a: &Args, user: &OwnedUserId) -> Result<()> {
    let url = format!(
        "{}/admin/v1/users/{}/cross_signing_reset",
        a.admin,
        url::form_urlencoded::byte_serialize(user.as_str().as_bytes()).collect::<String>()
    );
    let res = reqwest::Client::new()
        .post(url)
        .bearer_auth(&a.admin_token)
        .json(&json!({"valid_for_secs": 60}))
        .send()
        .await?;
    ensure!(res.status().is_success(), "approval: {}", res.status());
    Ok(())
}

/// Cross-signing as the SDK bootstraps it (the first upload needs no approval).
async fn cross_signing_bootstrap(alice: &Session, bob: &Session) -> Result<()> {
    alice
        .client
        .encryption()
        .bootstrap_cross_signing(None)
        .await
        .context("alice's first cross-signing upload")?;
    bob.client
        .encryption()
        .bootstrap_cross_signing(None)
        .await
        .context("bob's first cross-signing upload")?;
    let status = alice.client.encryption().cross_signing_status().await;
    ensure!(
        status.as_ref().is_some_and(|s| s.is_complete()),
        "alice's cross-signing is not complete: {status:?}"
    );
    out(
        "cross_signing",
        json!({"users": [alice.user_id, bob.user_id], "master_key": master_key(alice).await?}),
    );

    Ok(())
}

/// Element X's "reset identity": refused until approved through the gateway's approval flow,
/// then the SDK's retry succeeds.
async fn cross_signing_reset(a: &Args, alice: &Session) -> Result<()> {
    let handle = alice
        .client
        .encryption()
        .recovery()
        .reset_identity()
        .await
        .context("reset_identity")?
        .context("the reset needed no approval: the cross-signing guard let it through")?;
    let approval_url = match handle.auth_type() {
        CrossSigningResetAuthType::OAuth(info) => info.approval_url.to_string(),
        CrossSigningResetAuthType::Uiaa(info) => {
            bail!("the SDK did not see an m.oauth stage: {info:?}")
        }
    };
    let started = Instant::now();
    let retried = {
        let approve = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            admin_approve_reset(a, &alice.user_id).await
        };
        let (reset, approved) = tokio::join!(handle.reset(None), approve);
        approved?;
        reset.context("the SDK's retried cross-signing upload")?;
        started.elapsed()
    };
    ensure!(
        retried >= Duration::from_millis(1500),
        "the reset went through before it was approved"
    );
    out(
        "cross_signing_reset",
        json!({
            "approval_url": approval_url,
            "completed_after_ms": retried.as_millis() as u64,
            "master_key": master_key(alice).await?,
        }),
    );

    Ok(())
}

/// The user's own cross-signing master key as the SDK knows it (unpadded base64).
async fn master_key(s: &Session) -> Result<String> {
    let identity = s
        .client
        .encryption()
        .get_user_identity(&s.user_id)
        .await?
        .context("no own identity")?;
    identity
        .master_key()
        .get_first_key()
        .map(|k| k.to_base64())
        .context("no master key")
}

async fn run(a: &Args) -> Result<()> {
    let alice = sign_in(a, &a.users[0]).await?;
    let bob = sign_in(a, &a.users[1]).await?;

    // Keys: the SDK uploads device and one-time keys on sync, and bootstraps cross-signing.
    sync(&alice).await?;
    sync(&bob).await?;
    if a.cross_signing {
        cross_signing_bootstrap(&alice, &bob).await?;
    }

    // An encrypted room: alice sends, bob's SDK decrypts.
    let mut request = CreateRoomRequest::new();
    request.preset = Some(RoomPreset::PrivateChat);
    request.invite = vec![bob.user_id.clone()];
    request.name = Some("e2e matrix-rust-sdk".into());
    let room = alice.client.create_room(request).await?;
    room.enable_encryption().await?;
    sync(&bob).await?;
    bob.client.join_room_by_id(room.room_id()).await?;
    sync(&alice).await?;
    sync(&bob).await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    bob.client
        .add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
            let seen_tx = seen_tx.clone();
            async move {
                if let MessageType::Text(t) = ev.content.msgtype {
                    let _ = seen_tx.send((ev.sender.to_string(), t.body));
                }
            }
        });
    let body = format!("encrypted hello {}", rand::rng().random::<u32>());
    let room = alice
        .client
        .get_room(room.room_id())
        .context("alice's room")?;
    ensure!(
        room.latest_encryption_state().await?.is_encrypted(),
        "the room is not encrypted"
    );
    room.send(RoomMessageEventContent::text_plain(&body))
        .await
        .context("alice's encrypted message")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut read = None;
    while read.is_none() && Instant::now() < deadline {
        sync(&bob).await?;
        while let Ok((sender, text)) = seen_rx.try_recv() {
            if text == body && sender == alice.user_id.as_str() {
                read = Some(text);
            }
        }
    }
    ensure!(read.is_some(), "bob's SDK did not decrypt alice's message");
    out(
        "encrypted_message",
        json!({"room_id": room.room_id(), "from": alice.user_id, "decrypted_by": bob.user_id}),
    );

    if a.cross_signing {
        cross_signing_reset(a, &alice).await?;
    }

    // Refresh: once the access token has expired, the SDK refreshes it and goes on.
    let mut changes = alice.client.subscribe_to_session_changes();
    tokio::time::sleep(Duration::from_millis(a.expires_in * 1000 + 1500)).await;
    let who = alice.client.whoami().await.context("whoami after expiry")?;
    ensure!(
        who.device_id.as_ref() == Some(&alice.device_id),
        "the device changed"
    );
    let mut refreshed = 0;
    while let Ok(change) = changes.try_recv() {
        if change == SessionChange::TokensRefreshed {
            refreshed += 1;
        }
    }
    ensure!(
        refreshed >= 1,
        "the SDK did not refresh the expired access token"
    );
    out(
        "refreshed",
        json!({"user": alice.user, "refreshes": refreshed}),
    );

    // Logout: the SDK revokes at the advertised endpoint; the old token is refused.
    let old = alice
        .client
        .session_tokens()
        .context("alice's tokens")?
        .access_token;
    let base = alice.client.homeserver();
    let revocation = alice
        .client
        .oauth()
        .server_metadata()
        .await?
        .revocation_endpoint;
    alice
        .client
        .oauth()
        .logout()
        .await
        .with_context(|| format!("the SDK's logout (revocation at {revocation})"))?;
    let mut http = reqwest::Client::builder();
    if let Some(cert) = &a.ca_cert {
        http = http.add_root_certificate(cert.clone());
    }
    let status = http
        .build()?
        .get(base.join("/_matrix/client/v3/account/whoami")?)
        .bearer_auth(&old)
        .send()
        .await?
        .status()
        .as_u16();
    ensure!(
        status == 401,
        "the revoked access token got {status}, not 401"
    );
    out(
        "signed_out",
        json!({"user": alice.user, "device_id": alice.device_id, "old_token_status": status,
               "revocation_endpoint": revocation}),
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let result = match args() {
        Ok(a) => run(&a).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => println!("OK"),
        Err(e) => {
            eprintln!("FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

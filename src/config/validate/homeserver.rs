//! `[homeserver]`: where the homeserver is, what kind it is, and how identities are bound to it
//! (the binding mode's default and its constraints per kind, the AS and admin tokens).

use super::Check;
use crate::config::parse::{duration, http_url, valid_server_name};
use crate::config::{file, secret, BindingMode, Homeserver, HomeserverKind};

/// Validates `[homeserver]`: the section (`None` without a usable URL) and its binding mode,
/// which other sections depend on (known even when the URL is not).
pub(super) fn homeserver(
    hs: &file::HomeserverFile,
    c: &mut Check,
) -> (Option<Homeserver>, BindingMode) {
    let Check { p, warnings } = c;
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
        p,
        "homeserver.as_token",
        hs.as_token.as_deref(),
        hs.as_token_file.as_deref(),
        binding != BindingMode::Headers,
    );
    let admin_token = secret::resolve(
        p,
        "homeserver.admin_token",
        hs.admin_token.as_deref(),
        hs.admin_token_file.as_deref(),
        false,
    );
    let url = match hs.url.as_deref() {
        Some(u) => http_url(p, warnings, "homeserver.url", u),
        None => {
            p.add("homeserver.url", "required");
            None
        }
    };
    if let Some(u) = &url {
        if u.path() != "/" && !u.path().is_empty() {
            p.add(
                "homeserver.url",
                "must not have a path: the gateway forwards client paths unchanged",
            );
        }
    }
    let server_name = match &hs.server_name {
        Some(s) if valid_server_name(s) => s.clone(),
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
    if !crate::auth::identity::valid_localpart(&hs.appservice_sender) {
        p.add(
            "homeserver.appservice_sender",
            format!("{:?} is not a valid localpart", hs.appservice_sender),
        );
    }
    for (i, lp) in hs.reserved_localparts.iter().enumerate() {
        if !crate::auth::identity::valid_localpart(lp) {
            p.add(
                &format!("homeserver.reserved_localparts[{i}]"),
                format!("{lp:?} is not a valid localpart"),
            );
        }
    }
    let connect_timeout = duration(p, "homeserver.connect_timeout", &hs.connect_timeout);
    let read_timeout = duration(p, "homeserver.read_timeout", &hs.read_timeout);
    let Some(url) = url else {
        return (None, binding);
    };
    let tls = url.scheme() == "https";
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let section = Homeserver {
        url,
        host,
        port,
        tls,
        server_name,
        connect_timeout,
        read_timeout,
        kind,
        binding,
        as_token,
        appservice_sender: hs.appservice_sender.clone(),
        reserved_localparts: hs.reserved_localparts.clone(),
        expose_admin_api: hs.expose_admin_api,
        admin_token,
    };
    (Some(section), binding)
}

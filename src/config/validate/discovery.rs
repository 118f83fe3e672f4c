//! `[discovery]`: what the gateway serves for OAuth discovery (MSC2965): its public base URL
//! (default `https://<server_name>`) and the URLs filled in where the OP lacks them.

use url::Url;

use super::Check;
use crate::config::parse::http_url;
use crate::config::{file, Discovery};

/// Validates `[discovery]`; `server_name` gives the default base URL.
pub(super) fn discovery(
    f: &file::DiscoveryFile,
    server_name: &str,
    c: &mut Check,
) -> Option<Discovery> {
    let Check { p, warnings } = c;
    let public_base_url = match f.public_base_url.as_deref() {
        Some(u) => http_url(p, warnings, "discovery.public_base_url", u),
        None => Url::parse(&format!("https://{server_name}")).ok(),
    };
    let account_management_uri = f
        .account_management_uri
        .as_deref()
        .and_then(|u| http_url(p, warnings, "discovery.account_management_uri", u));
    let registration_endpoint = f
        .registration_endpoint
        .as_deref()
        .and_then(|u| http_url(p, warnings, "discovery.registration_endpoint", u));
    Some(Discovery {
        public_base_url: public_base_url?,
        account_management_uri,
        registration_endpoint,
    })
}

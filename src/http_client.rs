//! The one place that builds outbound HTTP clients: towards the OP (discovery, introspection,
//! JWKS, revocation) and the homeserver's appservice API (binding). `clippy.toml` refuses
//! `reqwest::Client::new` and `::builder` everywhere else.
//!
//! Redirects are never followed: a redirected introspection request would carry the gateway's
//! client credentials to wherever the redirect points.

use std::time::Duration;

/// Builds the client used for an OP with the given per-request timeout.
pub fn build(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    #[allow(clippy::disallowed_methods)] // this is the place
    reqwest::Client::builder()
        .user_agent(concat!("matrix-oidc-gateway/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

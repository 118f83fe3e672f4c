//! The one place that builds outbound HTTP clients: towards the OP (discovery, introspection,
//! JWKS, revocation) and the homeserver's appservice API (binding). `clippy.toml` refuses
//! `reqwest::Client::new` and `::builder` everywhere else.
//!
//! Redirects are never followed: a redirected introspection request would carry the gateway's
//! client credentials to wherever the redirect points.

use std::time::Duration;

/// Sends a request that only reads at the other end (introspection, discovery, keys), once more
/// on a fresh connection when the first attempt failed on the connection itself without an
/// answer: a pooled connection the server closed while idle (Node's default keep-alive is 5 s)
/// fails the request that takes it, and that must not turn into a 503. A refused connection
/// or a timeout is not retried.
pub async fn send_read(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let again = req.try_clone();
    let started = std::time::Instant::now();
    match req.send().await {
        // A stale connection fails at once; a failure after a while is the OP's own, and a
        // second attempt would only double the wait (each has the full timeout).
        Err(e)
            if e.is_request()
                && !e.is_connect()
                && !e.is_timeout()
                && started.elapsed() < STALE_FAILS_WITHIN =>
        {
            match again {
                Some(again) => {
                    tracing::debug!(error = %e, "OP connection closed under a request; sending it again");
                    again.send().await
                }
                None => Err(e),
            }
        }
        other => other,
    }
}

/// A request on a connection the server had already closed fails within this.
const STALE_FAILS_WITHIN: Duration = Duration::from_millis(500);

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

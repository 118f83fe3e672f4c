//! request_filter, step 4: what a verified identity may do with this request. A guest token
//! reaches only the guest endpoint allow-list (less the membership changes when the
//! homeserver cannot tell a guest from a user), and a request that is about to carry a
//! credential upstream must not also carry a body the homeserver would merge into its
//! arguments.

use pingora::http::RequestHeader;

use super::classify::{self, Route};
use crate::auth::{Access, Identity};
use crate::config::GuestEndpoints;
use crate::error::GatewayError;

/// Refuses what `identity` may not do on `route`.
pub fn authorise(
    req: &RequestHeader,
    route: &Route<'_>,
    identity: &Identity,
    guest_endpoints: GuestEndpoints,
    upstream_sees_guests: bool,
) -> Result<(), GatewayError> {
    if has_form_body(req) {
        // A credential is about to be attached: a body the homeserver would merge into its
        // arguments must not ride along (Twisted merges form bodies over the query).
        return Err(GatewayError::FormBody);
    }
    if identity.access == Access::Guest
        && !classify::guest_allowed(route, guest_endpoints, upstream_sees_guests)
    {
        return Err(GatewayError::GuestAccessForbidden);
    }
    Ok(())
}

/// Whether any `Content-Type` of the request names a media type that an upstream framework
/// parses into request arguments: `application/x-www-form-urlencoded` or `multipart/form-data`,
/// in any case, with any parameters or surrounding list (matched anywhere in the value).
pub fn has_form_body(req: &RequestHeader) -> bool {
    req.headers
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .any(|v| {
            [&b"x-www-form-urlencoded"[..], b"multipart/form-data"]
                .iter()
                .any(|needle| {
                    v.as_bytes()
                        .windows(needle.len())
                        .any(|w| w.eq_ignore_ascii_case(needle))
                })
        })
}

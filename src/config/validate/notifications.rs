//! `[notifications]`: the back-channel logout and revocation endpoints on the public listener,
//! and the revocation list's retention and bound.

use super::Check;
use crate::config::parse::duration;
use crate::config::{file, Notifications};

/// Validates `[notifications]`.
pub(super) fn notifications(n: &file::NotificationsFile, c: &mut Check) -> Option<Notifications> {
    let p = &mut c.p;
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
        p,
        "notifications.revocation_retention",
        &n.revocation_retention,
    );
    if n.max_revocations == 0 {
        p.add("notifications.max_revocations", "must be at least 1");
    }
    Some(Notifications {
        backchannel_logout_path: n.backchannel_logout_path.clone(),
        revocation_proxy: n.revocation_proxy,
        revocation_path: n.revocation_path.clone(),
        revocation_retention,
        access_token_revocation_signs_out,
        max_revocations: n.max_revocations,
    })
}

//! File model → validated [`Config`]: one validator per section, each reading its part of the
//! file and recording every problem (with its key) and warning in a shared [`Check`], so that
//! `--check-config` lists them all at once. A validator returns `None` only where it cannot
//! build its section at all; any problem fails the whole load.

mod compat;
mod discovery;
mod homeserver;
mod issuers;
mod listen;
mod notifications;
mod policy;
mod store;

use super::{file, Config, Loaded, Problems};

/// What validation found so far.
#[derive(Debug, Default)]
pub(super) struct Check {
    /// Problems: any one fails the load.
    pub p: Problems,
    /// Remarks that do not (e.g. plain `http://` to a non-loopback host).
    pub warnings: Vec<String>,
}

/// Validates every section; the configuration, or every problem found.
pub(super) fn validate(f: file::FileConfig) -> Result<Loaded, Problems> {
    let mut c = Check::default();
    let hs = f.homeserver.unwrap_or_default();
    let listen = listen::listen(&f.listen, &mut c);
    let (homeserver, binding) = homeserver::homeserver(&hs, &mut c);
    let issuers = issuers::issuers(&f.issuers, &mut c);
    let auth = policy::auth(&f.auth, &mut c);
    let cache = policy::cache(&f.cache, &mut c);
    let identity_headers = policy::identity_headers(&f.identity_headers, &mut c);
    let server_name = hs.server_name.as_deref().unwrap_or_default();
    let discovery = discovery::discovery(&f.discovery, server_name, &mut c);
    let admin_token = policy::admin(&f.admin, &mut c);
    let notifications = notifications::notifications(&f.notifications, &mut c);
    let store = store::store(&f.store, &f.redis, binding, &mut c);
    let log = policy::log(&f.log, &mut c);
    let compat = compat::compat(&f.compat, f.issuers.first(), &mut c);
    if let (Some(cp), Some(n), Some(cache)) = (&compat, &notifications, &cache) {
        // A session's OP grant is checked every interval while it is used; one not confirmed
        // for the retention (less the cache's reuse window) ends, so that a sign-out recorded
        // after the last check is still remembered when the session would come back. Two
        // intervals must fit in that horizon, or a session would end between two checks.
        let horizon = n.revocation_retention.saturating_sub(cache.max_ttl);
        if cp.grant_check_interval.saturating_mul(2) > horizon {
            c.p.add(
                "compat.grant_check_interval",
                format!(
                    "must be at most half of notifications.revocation_retention less cache.max_ttl ({}s)",
                    horizon.as_secs()
                ),
            );
        }
        if store.as_ref().is_some_and(|s| s.sealer.is_none())
            && cp.session_lifetime > n.revocation_retention
        {
            c.warnings.push(format!(
                "compat.session_lifetime: without store.encryption_key no OP grant is kept, so compat sessions last at most notifications.revocation_retention ({}s)",
                n.revocation_retention.as_secs()
            ));
        }
    }
    if !c.p.is_empty() {
        return Err(c.p);
    }
    // Without a problem every section was built; `Problems::default()` cannot happen.
    let missing = Problems::default;
    Ok(Loaded {
        config: Config {
            listen: listen.ok_or_else(missing)?,
            homeserver: homeserver.ok_or_else(missing)?,
            issuers,
            auth: auth.ok_or_else(missing)?,
            cache: cache.ok_or_else(missing)?,
            identity_headers: identity_headers.ok_or_else(missing)?,
            log: log.ok_or_else(missing)?,
            store: store.ok_or_else(missing)?,
            discovery: discovery.ok_or_else(missing)?,
            notifications: notifications.ok_or_else(missing)?,
            admin_token,
            compat,
        },
        warnings: c.warnings,
    })
}

//! `[listen]`: the public and admin sockets, worker threads, and the stop and upgrade settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::Check;
use crate::config::parse::duration;
use crate::config::{file, Listen};

/// Validates `[listen]`.
pub(super) fn listen(f: &file::ListenFile, c: &mut Check) -> Option<Listen> {
    let Check { p, warnings } = c;
    let public = f.public.parse::<SocketAddr>().unwrap_or_else(|_| {
        p.add(
            "listen.public",
            format!("{:?} is not an address like \"0.0.0.0:8008\"", f.public),
        );
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    let admin = f.admin.parse::<SocketAddr>().unwrap_or_else(|_| {
        p.add(
            "listen.admin",
            format!("{:?} is not an address like \"127.0.0.1:9090\"", f.admin),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    if !admin.ip().is_loopback() {
        warnings.push(format!(
            "listen.admin: {admin} is not a loopback address; the admin API must not be reachable by clients"
        ));
    }
    if admin == public {
        p.add("listen.admin", "must differ from listen.public");
    }
    if f.threads == 0 {
        p.add("listen.threads", "must be at least 1");
    }
    let shutdown_grace = duration(p, "listen.shutdown_grace", &f.shutdown_grace);
    let shutdown_delay = duration(p, "listen.shutdown_delay", &f.shutdown_delay);
    let runtime_dir = match f.runtime_dir.as_deref() {
        None | Some("") => None,
        Some(d) if !Path::new(d).is_absolute() => {
            p.add(
                "listen.runtime_dir",
                format!("{d:?} must be an absolute path"),
            );
            None
        }
        Some(d) => Some(PathBuf::from(d)),
    };
    Some(Listen {
        public,
        threads: f.threads,
        trust_forwarded_headers: f.trust_forwarded_headers,
        admin,
        shutdown_grace,
        shutdown_delay,
        runtime_dir,
    })
}

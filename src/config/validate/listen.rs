//! `[listen]`: the public (and optional HTTPS) and admin sockets, worker threads, and the stop
//! and upgrade settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::Check;
use crate::config::parse::duration;
use crate::config::{file, Listen, TlsListener};

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
    let tls = tls_listener(f, p, &[public, admin]);
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
        tls,
        threads: f.threads,
        trust_forwarded_headers: f.trust_forwarded_headers,
        admin,
        shutdown_grace,
        shutdown_delay,
        runtime_dir,
    })
}

/// `listen.public_tls` with its certificate and key files: all three or none; the files must
/// be readable (their PEM is parsed when the listener starts).
fn tls_listener(
    f: &file::ListenFile,
    p: &mut crate::config::Problems,
    taken: &[SocketAddr],
) -> Option<TlsListener> {
    let Some(addr) = f.public_tls.as_deref() else {
        for (key, v) in [
            ("listen.tls_cert_file", &f.tls_cert_file),
            ("listen.tls_key_file", &f.tls_key_file),
        ] {
            if v.is_some() {
                p.add(key, "only used with listen.public_tls");
            }
        }
        return None;
    };
    let addr = match addr.parse::<SocketAddr>() {
        Ok(a) if taken.contains(&a) => {
            p.add(
                "listen.public_tls",
                "must differ from listen.public and listen.admin",
            );
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            p.add(
                "listen.public_tls",
                format!("{addr:?} is not an address like \"0.0.0.0:8448\""),
            );
            None
        }
    };
    let mut file = |key: &str, v: &Option<String>| match v.as_deref() {
        None | Some("") => {
            p.add(key, "required with listen.public_tls");
            None
        }
        Some(path) => match std::fs::File::open(path) {
            Ok(_) => Some(PathBuf::from(path)),
            Err(e) => {
                p.add(key, format!("{path:?} cannot be read: {e}"));
                None
            }
        },
    };
    let cert = file("listen.tls_cert_file", &f.tls_cert_file);
    let key = file("listen.tls_key_file", &f.tls_key_file);
    Some(TlsListener {
        addr: addr?,
        cert: cert?,
        key: key?,
    })
}

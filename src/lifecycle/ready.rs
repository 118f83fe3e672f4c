//! Readiness: once the public listener accepts, systemd is told (`READY=1`, `MAINPID`) and the
//! pid file is written.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::write_pid_file;

/// Announces that the process serves: once its public listener accepts, it writes the pid
/// file (when `listen.runtime_dir` is set) and tells systemd (`READY=1` and, since after an
/// upgrade the serving process is no longer the one systemd started, `MAINPID`).
pub(crate) struct Ready {
    pub(crate) public: std::net::SocketAddr,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) armed: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for Ready {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let target = loopback_for(self.public);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (!self.armed.load(Ordering::Acquire)
            || tokio::net::TcpStream::connect(target).await.is_err())
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = std::process::id();
        // systemd first: `--reload` returns when the pid file names this process, and systemd
        // must know the new main process before the old one exits.
        let mut attempts = 0;
        loop {
            match notify_systemd(&format!("READY=1\nMAINPID={pid}\n")) {
                Ok(true) => tracing::info!(pid, "told systemd: ready"),
                Ok(false) => {}
                Err(e) if attempts < 5 => {
                    attempts += 1;
                    tracing::warn!(error = %e, "cannot notify systemd; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot notify systemd: the pid file is not written, so --reload fails");
                    return;
                }
            }
            break;
        }
        if let Some(pid_file) = &self.pid_file {
            if let Err(e) = write_pid_file(pid_file, pid) {
                tracing::error!(error = %e, path = %pid_file.display(), "cannot write the pid file");
            }
        }
        tracing::info!(pid, "serving");
    }
}

/// A listener address to connect to (a wildcard address is reached on loopback).
fn loopback_for(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Sends `message` to systemd's notification socket (`$NOTIFY_SOCKET`, a path or an abstract
/// name); `Ok(false)` when not run by systemd.
pub fn notify_systemd(message: &str) -> std::io::Result<bool> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&target)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(message.as_bytes(), &addr)?;
    Ok(true)
}

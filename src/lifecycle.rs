//! The process's life around the request path: the signals that stop or upgrade it, draining
//! (closing client connections while it stops), readiness (the pid file and systemd's
//! notification socket), the catch-up of a process that takes over from another, and the
//! `--reload` control command that starts that process.
//!
//! A zero-downtime upgrade is Pingora's: the running process, on SIGQUIT, sends its listening
//! sockets over a Unix socket in `listen.runtime_dir` to a new process started with
//! `--upgrade`, keeps serving a few seconds, then drains and exits. `--reload` runs that
//! sequence so that a new process that cannot start never costs the running one its sockets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::auth::revocations::Revocations;
use crate::binding::Binder;
use crate::clock::SharedClock;
use crate::gateway::ctx::InFlight;

/// The socket in `listen.runtime_dir` that hands the listeners to a new process.
pub const UPGRADE_SOCKET: &str = "upgrade.sock";
/// The pid file in `listen.runtime_dir`: the process serving now.
pub const PID_FILE: &str = "gateway.pid";

/// Creates `dir` (mode 0700) when missing and checks that no one but this process's user can
/// write it: whoever can create the upgrade socket there is handed the listening sockets.
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    // Not followed: a symbolic link could be pointed elsewhere after this check.
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!("{} is a symbolic link", dir.display()));
    }
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to the gateway's uid {me}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}); make it 0700",
            dir.display(),
            meta.mode() & 0o777
        ));
    }
    // Whoever can write the parent could rename the directory away and put theirs in its
    // place, unless the parent is sticky (as /tmp is).
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let pm = std::fs::metadata(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let sticky = pm.mode() & 0o1000 != 0;
        if pm.mode() & 0o002 != 0 && !sticky || pm.mode() & 0o020 != 0 && pm.uid() != me && !sticky
        {
            return Err(format!(
                "its parent {} is writable by others (mode {:o}) and not sticky",
                parent.display(),
                pm.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Whether a new process waits for the sockets: `upgrade.sock` in a still-safe runtime
/// directory is a socket of this process's user.
fn new_process_waits(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    prepare_runtime_dir(dir)?;
    let socket = dir.join(UPGRADE_SOCKET);
    let meta = std::fs::symlink_metadata(&socket)
        .map_err(|e| format!("no new process waits on {}: {e}", socket.display()))?;
    if !meta.file_type().is_socket() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "{} is not a socket of the gateway's user",
            socket.display()
        ));
    }
    Ok(())
}

/// Pingora's shutdown signals, with the gateway's additions:
/// - SIGQUIT hands the listeners over (graceful upgrade) when `listen.runtime_dir` is set, and
///   is a graceful stop otherwise;
/// - SIGTERM keeps accepting for `listen.shutdown_delay`, then stops accepting and drains;
/// - SIGINT stops at once;
/// - from the first of them on, every response closes its connection.
pub struct Signals {
    pub(crate) traffic: InFlight,
    pub(crate) delay: Duration,
    pub(crate) runtime_dir: Option<PathBuf>,
    /// Set once the handlers are installed ([`Ready`] waits for it: before, SIGQUIT's default
    /// action would kill the process).
    pub(crate) armed: Arc<AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let listen = |kind: SignalKind| {
            signal(kind).unwrap_or_else(|e| panic!("cannot listen for signal {kind:?}: {e}"))
        };
        let mut quit = listen(SignalKind::quit());
        let mut term = listen(SignalKind::terminate());
        let mut int = listen(SignalKind::interrupt());
        self.armed.store(true, Ordering::Release);
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    let Some(dir) = &self.runtime_dir else {
                        tracing::warn!("SIGQUIT without listen.runtime_dir: no upgrade possible; stopping gracefully");
                        self.traffic.start_draining();
                        return ShutdownSignal::GracefulTerminate;
                    };
                    // Pingora stops serving after a SIGQUIT even when nobody took the sockets:
                    // only hand over to a process that waits for them.
                    if let Err(e) = new_process_waits(dir) {
                        tracing::warn!(error = %e, "SIGQUIT ignored: still serving (start the new process with --reload)");
                        continue;
                    }
                    tracing::info!("SIGQUIT: handing the listeners to the new process, then draining");
                    self.traffic.start_draining();
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => {
                    self.traffic.start_draining();
                    if !self.delay.is_zero() {
                        tracing::info!(delay_ms = self.delay.as_millis() as u64, "SIGTERM: closing connections; still accepting for listen.shutdown_delay");
                        tokio::select! {
                            _ = tokio::time::sleep(self.delay) => {}
                            _ = int.recv() => return ShutdownSignal::FastShutdown,
                        }
                    }
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}

/// Ends the process as soon as a graceful shutdown (SIGTERM, or SIGQUIT after the hand-over)
/// has drained the requests in flight, instead of sleeping out the rest of
/// `listen.shutdown_grace` (Pingora's grace period is a fixed wait; what still runs when it
/// ends is cancelled).
pub(crate) struct Drain {
    pub(crate) in_flight: InFlight,
    pub(crate) pid_file: Option<PathBuf>,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        tracing::info!(
            in_flight = self.in_flight.count(),
            "shutting down: no new connections; draining requests in flight"
        );
        // Two idle readings a little apart: a connection accepted just before the listener
        // closed has its request counted by then.
        let mut idle_readings = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.in_flight.count() == 0 {
                idle_readings += 1;
                if idle_readings >= 2 {
                    if let Some(pid_file) = &self.pid_file {
                        remove_pid_file_if_mine(pid_file);
                    }
                    tracing::info!("drained; exiting");
                    std::process::exit(0);
                }
            } else {
                idle_readings = 0;
            }
        }
    }
}

/// Removes the pid file when it names this process (at exit).
pub fn remove_pid_file_if_mine(pid_file: &Path) {
    if read_pid(pid_file) == Some(std::process::id()) {
        let _ = std::fs::remove_file(pid_file);
    }
}

fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

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

fn write_pid_file(pid_file: &Path, pid: u32) -> std::io::Result<()> {
    let tmp = pid_file.with_extension("pid.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{pid}")?;
    }
    std::fs::rename(&tmp, pid_file)
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

/// With the embedded store, two processes serve from one SQLite file for a few seconds around a
/// hand-over, and a sign-out or deactivation one of them records is only in the file for the
/// other. So each reloads the revocation list and forgets its cached bindings and tombstones
/// every 250 ms: the new process (`--upgrade`) from its start until the old one must be gone
/// (`until`), the old one from its SIGQUIT or SIGTERM until it exits. (With Redis, the fan-out
/// delivers them.)
pub(crate) struct Handover {
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) binder: Arc<Binder>,
    pub(crate) clock: SharedClock,
    pub(crate) traffic: InFlight,
    /// `Some(until)` in a process started with `--upgrade`.
    pub(crate) new_process_for: Option<Duration>,
}

impl Handover {
    async fn catch_up(&self) {
        if let Err(e) = self.revocations.load(self.clock.now_ms()).await {
            tracing::warn!(error = %e, "hand-over: revocations not reloaded");
        }
        self.binder.forget_cached();
    }
}

#[async_trait]
impl BackgroundService for Handover {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let tick = Duration::from_millis(250);
        if let Some(until) = self.new_process_for {
            let deadline = Instant::now() + until;
            while Instant::now() < deadline {
                self.catch_up().await;
                tokio::time::sleep(tick).await;
            }
            tracing::debug!("hand-over: the old process is gone; reloads stop");
        }
        // The old side: from the signal on, until the process exits. (Not stopped by the
        // shutdown watch: requests are still served after it fires.)
        while !self.traffic.is_draining() {
            tokio::time::sleep(tick).await;
        }
        loop {
            self.catch_up().await;
            tokio::time::sleep(tick).await;
        }
    }
}

/// Whether `pid` runs this program (its executable, possibly replaced on disk since, has this
/// one's file name).
fn runs_a_gateway(pid: u32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let name = |p: &Path| {
        p.file_name().map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned()
        })
    };
    let mine = std::env::current_exe().ok();
    name(&exe).is_some() && name(&exe) == mine.as_deref().and_then(name)
}

/// Why `--reload` failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// `listen.runtime_dir` is not configured.
    #[error("listen.runtime_dir is not set: graceful upgrade needs it")]
    NoRuntimeDir,
    /// No pid file, or its process is gone.
    #[error("no running gateway to take over from ({0})")]
    NotRunning(String),
    /// The new process could not be started.
    #[error("cannot start the new process: {0}")]
    Spawn(std::io::Error),
    /// The new process exited before it asked for the sockets: the old one keeps serving.
    #[error("the new process exited ({0}) before taking over; pid {1} keeps serving")]
    NewFailedEarly(std::process::ExitStatus, u32),
    /// The new process exited after the hand-over began.
    #[error("the new process exited ({0}) during the hand-over")]
    NewFailedLate(std::process::ExitStatus),
    /// The new process did not become ready in time.
    #[error("the new process (pid {0}) did not report ready within {1:?}")]
    Timeout(u32, Duration),
    /// The runtime directory is unsafe.
    #[error("listen.runtime_dir: {0}")]
    RuntimeDir(String),
    /// The running process could not be signalled.
    #[error("cannot signal pid {0}: {1}")]
    Signal(u32, nix::Error),
}

/// `--reload`: starts `<this binary> --upgrade` with the same arguments, waits until it waits
/// for the sockets (if it fails before that, the running process is untouched), sends the
/// running process SIGQUIT, and returns once the new process serves (its pid is in the pid
/// file). The new process inherits stdout, stderr and the environment (systemd's
/// `NOTIFY_SOCKET` included) and runs in a process group of its own.
pub fn reload(runtime_dir: Option<&Path>, args: &[std::ffi::OsString]) -> Result<u32, ReloadError> {
    use std::os::unix::process::CommandExt;
    let dir = runtime_dir.ok_or(ReloadError::NoRuntimeDir)?;
    prepare_runtime_dir(dir).map_err(ReloadError::RuntimeDir)?;
    let pid_file = dir.join(PID_FILE);
    let socket = dir.join(UPGRADE_SOCKET);
    // systemd tells its control processes the main pid; otherwise the pid file says it.
    let old = std::env::var("MAINPID")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .or_else(|| read_pid(&pid_file))
        .ok_or_else(|| ReloadError::NotRunning(format!("no pid in {}", pid_file.display())))?;
    // A stale pid file can name another process by now: only signal a gateway.
    if !runs_a_gateway(old) {
        return Err(ReloadError::NotRunning(format!(
            "pid {old} is not a running matrix-oidc-gateway"
        )));
    }
    let old_pid = nix::unistd::Pid::from_raw(old as i32);
    let _ = std::fs::remove_file(&socket);
    let exe = std::env::current_exe().map_err(ReloadError::Spawn)?;
    let mut child = Command::new(exe)
        .args(args)
        .arg("--upgrade")
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(ReloadError::Spawn)?;
    let new = child.id();
    // Until the socket exists, the new process is still starting (config, store, OP client).
    let start_limit = Duration::from_secs(30);
    let started = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ReloadError::NewFailedEarly(status, old));
        }
        if started.elapsed() > start_limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ReloadError::Timeout(new, start_limit));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(old_pid, nix::sys::signal::Signal::SIGQUIT)
        .map_err(|e| ReloadError::Signal(old, e))?;
    let ready_limit = Duration::from_secs(30);
    let handed = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ReloadError::NewFailedLate(status));
        }
        if read_pid(&pid_file) == Some(new) {
            return Ok(new);
        }
        if handed.elapsed() > ready_limit {
            return Err(ReloadError::Timeout(new, ready_limit));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_runtime_dir_others_can_write_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("a/run");
        prepare_runtime_dir(&fresh).expect("created");
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_runtime_dir(&open).unwrap_err();
        assert!(err.contains("writable by group or others"), "{err}");
        let file = base.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(prepare_runtime_dir(&file).is_err());
        // A link to a safe directory could be pointed elsewhere later.
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        let err = prepare_runtime_dir(&link).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // Inside a directory others can write (and not sticky), the directory could be swapped.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_runtime_dir(&open.join("run")).unwrap_err();
        assert!(err.contains("not sticky"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_runtime_dir(&open.join("run2")).expect("a sticky parent like /tmp is fine");
    }

    #[test]
    fn the_pid_file_is_replaced_whole_and_only_its_owner_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join(PID_FILE);
        write_pid_file(&pid_file, 1).unwrap();
        write_pid_file(&pid_file, 42).unwrap();
        assert_eq!(read_pid(&pid_file), Some(42));
        remove_pid_file_if_mine(&pid_file);
        assert!(pid_file.exists(), "another process's pid file was removed");
        write_pid_file(&pid_file, std::process::id()).unwrap();
        remove_pid_file_if_mine(&pid_file);
        assert!(!pid_file.exists());
    }

    #[test]
    fn a_reload_without_a_runtime_dir_or_a_running_gateway_is_refused() {
        assert!(matches!(reload(None, &[]), Err(ReloadError::NoRuntimeDir)));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            reload(Some(dir.path()), &[]),
            Err(ReloadError::NotRunning(_))
        ));
    }
}

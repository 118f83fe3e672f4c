//! `--reload`: start the new process, hand the sockets over once it waits for them, and return
//! when it serves.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{prepare_runtime_dir, read_pid, PID_FILE, UPGRADE_SOCKET};

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

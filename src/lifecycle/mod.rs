//! The process's life around the request path: the signals that stop or upgrade it, draining
//! (closing client connections while it stops), readiness (the pid file and systemd's
//! notification socket), the catch-up of a process that takes over from another, and the
//! `--reload` control command that starts that process.
//!
//! A zero-downtime upgrade is Pingora's: the running process, on SIGQUIT, sends its listening
//! sockets over a Unix socket in `listen.runtime_dir` to a new process started with
//! `--upgrade`, keeps serving a few seconds, then drains and exits. `--reload` runs that
//! sequence so that a new process that cannot start never costs the running one its sockets.

//!
//! - `signals`: which signal stops or upgrades the process, and the drain that ends it;
//! - `ready`: telling systemd and the pid file that the process serves;
//! - `handover`: the catch-up of two processes sharing the embedded store during a hand-over;
//! - `reload`: the `--reload` control command.

mod handover;
mod ready;
mod reload;
mod signals;

use std::io::Write;
use std::path::Path;

pub(crate) use handover::Handover;
pub use ready::notify_systemd;
pub(crate) use ready::Ready;
pub use reload::{reload, ReloadError};
pub(crate) use signals::Drain;
pub use signals::Signals;

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

/// Removes the pid file when it names this process (at exit).
pub fn remove_pid_file_if_mine(pid_file: &Path) {
    if read_pid(pid_file) == Some(std::process::id()) {
        let _ = std::fs::remove_file(pid_file);
    }
}

pub(crate) fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

pub(crate) fn write_pid_file(pid_file: &Path, pid: u32) -> std::io::Result<()> {
    let tmp = pid_file.with_extension("pid.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{pid}")?;
    }
    std::fs::rename(&tmp, pid_file)
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

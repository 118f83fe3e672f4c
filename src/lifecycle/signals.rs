//! The signals that end or upgrade the process, and the drain that ends it once the requests
//! in flight are done.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use super::{prepare_runtime_dir, remove_pid_file_if_mine, UPGRADE_SOCKET};
use crate::gateway::ctx::InFlight;

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

//! The hand-over between an old and a new process sharing the embedded store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::auth::revocations::Revocations;
use crate::binding::Binder;
use crate::clock::SharedClock;
use crate::gateway::ctx::InFlight;

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

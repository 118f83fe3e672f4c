//! Background services beside the request path: the OP's discovery document and each JWT
//! issuer's key set kept fresh, and the fan-out subscriber that applies the other replicas'
//! revocations and binding changes (Redis).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::auth::jwks::KeyStore;
use crate::auth::op::OpClient;
use crate::clock::SharedClock;
use crate::notify::Notifier;
use crate::store::redis::{Event, Redis};
use crate::store::StoreError;

/// Keeps the primary OP's discovery document fresh.
pub(crate) struct MetadataRefresher {
    pub(crate) op: Arc<OpClient>,
}

#[async_trait]
impl BackgroundService for MetadataRefresher {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.op.refresh_loop(shutdown).await;
    }
}

/// Frees the identity cache's entries whose window has ended (kept a while: see
/// `auth::cache`), giving their memory back before eviction would.
pub(crate) struct CacheSweeper {
    pub(crate) verifier: Arc<crate::auth::Verifier>,
    /// The HTTP/1 driver's idle homeserver connections, swept on the same schedule.
    pub(crate) pool: Option<Arc<crate::front::pool::Pool>>,
}

/// How often the identity cache is swept.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

#[async_trait]
impl BackgroundService for CacheSweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {
                    self.verifier.sweep_cache();
                    if let Some(pool) = &self.pool {
                        pool.sweep();
                    }
                }
            }
        }
    }
}

/// Receives the other replicas' revocations and binding changes; after missing some (Redis
/// down, a failover) it resynchronises: reloads revocations and drops what was cached before the
/// outage. The outage only ends when that reload succeeded: a replica that subscribed again but
/// could not read the revocations keeps retrying, because until then it may accept tokens
/// another replica revoked while it was away.
pub(crate) struct Fanout {
    pub(crate) redis: Redis,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) clock: SharedClock,
    /// When the revocations were loaded at start: events published between then and the
    /// first subscription (a process taking over waits seconds for its sockets in between)
    /// are caught up like an outage's.
    pub(crate) loaded_at: u64,
}

impl Fanout {
    /// Catches up after an outage that began at `since`; the number of cached verdicts dropped.
    async fn resynchronise(&self, since: u64) -> Result<usize, StoreError> {
        let verifier = self.notifier.verifier();
        verifier.revocations().load(self.clock.now_ms()).await?;
        let dropped = verifier.purge_decided_before(since).await;
        self.notifier.binder().forget_cached();
        Ok(dropped)
    }

    /// A subscription on the server that takes writes now (after a failover: the new master).
    async fn subscribe(&self) -> Option<redis::aio::PubSub> {
        let connect = async {
            let client = self.redis.data_client().await.ok()?;
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe(self.redis.channel()).await.ok()?;
            Some(pubsub)
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), connect)
            .await
            .ok()
            .flatten()
    }
}

#[async_trait]
impl BackgroundService for Fanout {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use futures_util::StreamExt;
        let mut outage_since: Option<u64> = Some(self.loaded_at);
        let mut first = true;
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            if let Some(mut pubsub) = self.subscribe().await {
                let caught_up = match outage_since {
                    None => true,
                    Some(since) => match self.resynchronise(since).await {
                        Ok(dropped) => {
                            if first {
                                tracing::info!(
                                    "revocation fan-out subscribed; caught up since start"
                                );
                            } else {
                                tracing::info!(dropped, "shared state back: resynchronised");
                            }
                            outage_since = None;
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "resynchronisation failed; retrying");
                            false
                        }
                    },
                };
                if caught_up {
                    backoff = std::time::Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            msg = messages.next() => match msg {
                                Some(m) => {
                                    let payload: String = m.get_payload().unwrap_or_default();
                                    if let Ok(event) = serde_json::from_str::<Event>(&payload) {
                                        self.notifier.apply_remote(&event).await;
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                }
            }
            first = false;
            if outage_since.is_none() {
                tracing::warn!("revocation fan-out lost; reconnecting");
                outage_since = Some(self.clock.now_ms());
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
        }
    }
}

/// Keeps one JWT issuer's key set fresh.
pub(crate) struct JwksRefresher {
    pub(crate) keys: Arc<KeyStore>,
}

#[async_trait]
impl BackgroundService for JwksRefresher {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.keys.refresh_loop(shutdown).await;
    }
}

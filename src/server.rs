//! Assembles the Pingora server from a validated [`Config`]: the state store, the verifier, the
//! binder and the notifier, the public proxy service, the admin listener and the background
//! services (`background`, `lifecycle`). `main` and the in-process tests both go through
//! [`build`] or [`start`].

use std::sync::Arc;

use pingora::server::configuration::Opt;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;

use crate::auth::jwks::{KeyStore, Schedule};
use crate::auth::jwt::{JwtIssuer, JwtIssuers};
use crate::auth::op::OpClient;
use crate::auth::revocations::Revocations;
use crate::auth::Verifier;
use crate::background::{CacheSweeper, Fanout, JwksRefresher, MetadataRefresher};
use crate::binding::Binder;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::gateway::ctx::InFlight;
use crate::gateway::upstream::Upstream;
use crate::gateway::Gateway;
use crate::lifecycle::{self, Drain, Handover, Ready, Signals};
use crate::notify::logout_token::{LogoutIssuer, LogoutValidator};
use crate::notify::Notifier;
use crate::store::redis::{Redis, RedisStore};
use crate::store::seal::{check_key_and_reseal, KeyCheckError};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Why the server could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The homeserver host does not resolve.
    #[error("homeserver.url: cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver error.
        source: std::io::Error,
    },
    /// An HTTP client could not be built.
    #[error("cannot build an HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// The state store could not be opened.
    #[error("store.path: {0}")]
    Store(#[from] StoreError),
    /// The configured key does not open the store's sealed secrets.
    #[error("store.encryption_key: {0}")]
    StoreKey(String),
    /// The HTTPS listener's certificate or key could not be loaded.
    #[error("listen.public_tls: {0}")]
    Tls(String),
    /// The runtime directory is unusable or unsafe.
    #[error("listen.runtime_dir: {0}")]
    RuntimeDir(String),
}

/// A built server and the signal handling it runs with.
pub struct Process {
    /// The Pingora server.
    pub server: Server,
    signals: Signals,
    pid_file: Option<std::path::PathBuf>,
}

impl Process {
    /// Runs until a signal stops the process.
    pub fn run_forever(self) -> ! {
        self.server.run(RunArgs {
            shutdown_signal: Box::new(self.signals),
        });
        if let Some(pid_file) = &self.pid_file {
            lifecycle::remove_pid_file_if_mine(pid_file);
        }
        std::process::exit(0)
    }
}

fn default_logout_algorithms() -> Vec<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    vec![
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    ]
}

/// Builds a ready-to-run server (a fresh start; the caller brings the signal handling).
pub fn build(config: Config, clock: SharedClock) -> Result<Server, BuildError> {
    start(config, clock, false).map(|p| p.server)
}

/// Builds the server with the gateway's signal handling; with `upgrade`, it takes the
/// listening sockets over from the running process (see [`crate::lifecycle`]), which blocks
/// here until that process sends them.
pub fn start(config: Config, clock: SharedClock, upgrade: bool) -> Result<Process, BuildError> {
    crate::metrics::init();
    if let Some(dir) = &config.listen.runtime_dir {
        lifecycle::prepare_runtime_dir(dir).map_err(BuildError::RuntimeDir)?;
    } else if upgrade {
        return Err(BuildError::RuntimeDir(
            "not set: --upgrade takes the sockets over through it".into(),
        ));
    }
    let config = Arc::new(config);
    let upstream = Upstream::resolve(&config.homeserver).map_err(|source| BuildError::Resolve {
        host: config.homeserver.host.clone(),
        source,
    })?;
    let mut ops = Vec::new();
    for issuer in &config.issuers {
        ops.push(Arc::new(OpClient::new(issuer.clone())?));
    }
    let op = ops[0].clone();
    // Every issuer has a key store (logout tokens are signed too); JWT issuers keep theirs
    // fresh in the background.
    let mut jwt = JwtIssuers::default();
    let mut key_stores = Vec::new();
    let mut jwks_refreshers = Vec::new();
    for o in &ops {
        let settings = o.issuer().jwt.clone();
        let schedule = settings
            .as_ref()
            .map_or_else(Schedule::default, |s| Schedule {
                refresh_min: s.refresh_min,
                refresh_max: s.refresh_max,
                refetch_interval: s.refetch_interval,
            });
        let jwks_uri = settings.as_ref().and_then(|s| s.jwks_uri.clone());
        let keys = Arc::new(KeyStore::new(o.clone(), jwks_uri, schedule));
        key_stores.push(keys.clone());
        if let Some(settings) = settings {
            jwt.insert(Arc::new(JwtIssuer::new(
                keys.clone(),
                settings,
                clock.clone(),
            )));
            jwks_refreshers.push(keys);
        }
    }
    let redis = match &config.store.redis {
        Some(settings) => Some(Redis::new(settings)?),
        None => None,
    };
    let store: Arc<dyn Store> = match &redis {
        Some(r) => Arc::new(RedisStore::new(r.clone())),
        None => Arc::new(SqliteStore::open(&config.store.path)?),
    };
    let issuer_ids: Vec<String> = config.issuers.iter().map(|i| i.issuer.clone()).collect();
    let revocations = Arc::new(Revocations::bounded(
        store.clone(),
        &issuer_ids,
        config.notifications.max_revocations,
    ));
    // Persisted revocations are in force before the first request. (On a thread and runtime of
    // its own, with its own connection: `build` may run inside a runtime, as the in-process
    // tests do, and connections must not outlive the runtime that made them.)
    let loaded_at = clock.now_ms();
    let (loaded, key_check) = {
        let revocations = revocations.clone();
        let sealer = config.store.sealer.clone();
        let now = clock.now_ms();
        let loader: Arc<dyn Store> = match &config.store.redis {
            Some(settings) => Arc::new(RedisStore::new(Redis::new(settings)?)),
            None => store.clone(),
        };
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError(e.to_string()))?;
            Ok::<_, StoreError>(rt.block_on(async {
                let loaded = revocations.load_from(loader.as_ref(), now).await;
                let key_check = match &sealer {
                    Some(s) => Some(check_key_and_reseal(loader.as_ref(), s).await),
                    None => None,
                };
                (loaded, key_check)
            }))
        })
        .join()
        .map_err(|_| StoreError("revocation loader panicked".into()))??
    };
    let shared = redis.is_some();
    let loaded = match loaded {
        Ok(n) => n,
        Err(e) if shared => {
            // A replica must start while Redis is down; events resynchronise it later.
            tracing::warn!(error = %e, "revocations not loaded: shared state unavailable");
            0
        }
        Err(e) => return Err(e.into()),
    };
    if loaded > 0 {
        tracing::info!(revocations = loaded, "revocations restored from the store");
    }
    match key_check {
        None => {}
        Some(Ok(r)) if r.resealed > 0 => {
            tracing::info!(
                tokens = r.resealed,
                "device tokens sealed under the current store key"
            );
        }
        Some(Ok(_)) => {}
        Some(Err(KeyCheckError::Store(e))) if shared => {
            tracing::warn!(error = %e, "store key not checked: shared state unavailable");
        }
        Some(Err(e)) => return Err(BuildError::StoreKey(e.to_string())),
    }
    let mut verifier = Verifier::new(&config, op.clone(), jwt, revocations, clock.clone());
    let mut binder = Binder::new(&config, store.clone())?;
    if let Some(r) = &redis {
        verifier = verifier.with_shared(r.clone());
        binder = binder.with_shared(r.clone());
    }
    let verifier = Arc::new(verifier);
    let mut sweeper = CacheSweeper {
        verifier: verifier.clone(),
        pool: None,
    };
    let binder = Arc::new(binder);
    let logout_issuers = key_stores
        .iter()
        .map(|keys| {
            let issuer = keys.op().issuer();
            let jwt = issuer.jwt.as_ref();
            LogoutIssuer {
                keys: keys.clone(),
                audiences: issuer.logout_audiences.clone(),
                algorithms: jwt.map_or_else(default_logout_algorithms, |j| j.algorithms.clone()),
                hmac_secret: jwt.and_then(|j| j.hmac_secret.clone()),
                leeway: jwt.map_or(std::time::Duration::from_secs(30), |j| j.leeway),
            }
        })
        .collect();
    let logout = LogoutValidator::new(logout_issuers, store, clock.clone());
    let notifier = Arc::new(Notifier::new(
        verifier.clone(),
        binder.clone(),
        logout,
        clock.clone(),
        config.notifications.revocation_retention,
        config.notifications.access_token_revocation_signs_out,
    ));

    let conf = ServerConf {
        threads: config.listen.threads,
        // On SIGTERM Pingora stops accepting, then gives the requests in flight (`/sync`
        // long-polls included) the grace period to finish; what still runs after it is
        // cancelled, and the runtimes get a few more seconds to wind down.
        grace_period_seconds: Some(config.listen.shutdown_grace.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(5),
        // Without a runtime directory SIGQUIT is a graceful stop (see `Signals`) and this path
        // is never used.
        upgrade_sock: config
            .listen
            .runtime_dir
            .as_ref()
            .map(|d| d.join(lifecycle::UPGRADE_SOCKET).display().to_string())
            .unwrap_or_else(|| "/dev/null/no-upgrade-socket".into()),
        ..ServerConf::default()
    };
    let opt = upgrade.then(|| Opt {
        upgrade: true,
        ..Opt::default()
    });
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With `upgrade`, this is where the running process's sockets arrive.
    server.bootstrap();
    let pid_file = config
        .listen
        .runtime_dir
        .as_ref()
        .map(|d| d.join(lifecycle::PID_FILE));

    let handover_revocations = verifier.revocations().clone();
    let handover_binder = binder.clone();
    let fanout_notifier = notifier.clone();
    let fanout_clock = clock.clone();
    let clock_for_handover = clock.clone();
    let admin = crate::admin::AdminApp::new(
        config.clone(),
        verifier.clone(),
        notifier.clone(),
        clock.clone(),
    )
    .with_redis(redis.clone());
    let in_flight = InFlight::default();
    let admin = admin.with_traffic(in_flight.clone());
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gateway = Gateway::new(
        config.clone(),
        verifier,
        binder,
        upstream,
        clock,
        notifier,
        in_flight.clone(),
    );
    // The public listener: the HTTP/1 driver, with Pingora's proxy behind it (`front`).
    let front = crate::front::Front::new(
        gateway.clone(),
        pingora::proxy::http_proxy(&server.configuration, gateway),
    );
    sweeper.pool = front.pool();
    let mut proxy =
        pingora::services::listening::Service::new("matrix-oidc-gateway".to_owned(), front);
    proxy.add_tcp(&config.listen.public.to_string());
    if let Some(tls) = &config.listen.tls {
        proxy
            .add_tls(
                &tls.addr.to_string(),
                &tls.cert.display().to_string(),
                &tls.key.display().to_string(),
            )
            .map_err(|e| BuildError::Tls(e.to_string()))?;
    }
    server.add_service(proxy);
    let mut admin_service = pingora::services::listening::Service::new("admin".to_owned(), admin);
    admin_service.add_tcp(&config.listen.admin.to_string());
    server.add_service(admin_service);
    server.add_service(background_service("op-metadata", MetadataRefresher { op }));
    server.add_service(background_service("cache-sweep", sweeper));
    server.add_service(background_service(
        "drain",
        Drain {
            in_flight: in_flight.clone(),
            pid_file: pid_file.clone(),
        },
    ));
    server.add_service(background_service(
        "ready",
        Ready {
            public: config.listen.public,
            pid_file: pid_file.clone(),
            armed: armed.clone(),
        },
    ));
    if redis.is_none() {
        server.add_service(background_service(
            "handover",
            Handover {
                revocations: handover_revocations,
                binder: handover_binder,
                clock: clock_for_handover,
                traffic: in_flight.clone(),
                new_process_for: upgrade.then(|| {
                    config.listen.shutdown_grace
                        + config.listen.shutdown_delay
                        + std::time::Duration::from_secs(15)
                }),
            },
        ));
    }
    if let Some(r) = redis {
        server.add_service(background_service(
            "fanout",
            Fanout {
                redis: r,
                notifier: fanout_notifier,
                clock: fanout_clock,
                loaded_at,
            },
        ));
    }
    for keys in jwks_refreshers {
        server.add_service(background_service("jwks", JwksRefresher { keys }));
    }
    let signals = Signals {
        traffic: in_flight,
        delay: config.listen.shutdown_delay,
        runtime_dir: config.listen.runtime_dir.clone(),
        armed,
    };
    Ok(Process {
        server,
        signals,
        pid_file,
    })
}

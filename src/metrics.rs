//! Every metric the gateway exports, under one prefix, with labels from bounded enums only
//! (never a user ID, token, path with IDs or other unbounded value). Served by the admin
//! listener at `/metrics` from Prometheus' default registry (the one Pingora registers into).
//! Names and label sets are pinned by `tests/fixtures/metrics.golden`.

use std::sync::LazyLock;

use prometheus::{
    register_gauge, register_gauge_vec, register_histogram, register_histogram_vec,
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec, Gauge, GaugeVec,
    Histogram, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
};

/// The prefix of every metric.
pub const PREFIX: &str = "matrix_oidc_gateway_";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

macro_rules! name {
    ($n:literal) => {
        concat!("matrix_oidc_gateway_", $n)
    };
}

/// Handles of labelled metrics, cached per thread and keyed by the labels' addresses: the
/// request path's labels are `'static` and few, so a short list beats `with_label_values`
/// (hashing and a lock) on every request. Past [`HANDLES_MAX`] entries it falls back to
/// `with_label_values`.
pub mod handles {
    use std::cell::RefCell;

    use prometheus::{Histogram, IntCounter};

    const HANDLES_MAX: usize = 512;

    type Key = [usize; 3];

    fn key(labels: &[&'static str]) -> Key {
        let mut k = [0; 3];
        for (slot, l) in k.iter_mut().zip(labels) {
            *slot = l.as_ptr() as usize ^ (l.len() << 48);
        }
        k
    }

    thread_local! {
        static COUNTERS: RefCell<Vec<(usize, Key, IntCounter)>> = const { RefCell::new(Vec::new()) };
        static HISTOGRAMS: RefCell<Vec<(usize, Key, Histogram)>> = const { RefCell::new(Vec::new()) };
    }

    fn counter(
        which: usize,
        vec: &prometheus::IntCounterVec,
        labels: &[&'static str],
    ) -> IntCounter {
        let k = key(labels);
        COUNTERS.with(|c| {
            if let Some((_, _, h)) = c
                .borrow()
                .iter()
                .find(|(w, key, _)| *w == which && *key == k)
            {
                return h.clone();
            }
            let h = vec.with_label_values(labels);
            let mut c = c.borrow_mut();
            if c.len() < HANDLES_MAX {
                c.push((which, k, h.clone()));
            }
            h
        })
    }

    /// `requests_total{route, outcome, token_kind}`.
    pub fn requests(route: &'static str, outcome: &'static str, kind: &'static str) -> IntCounter {
        counter(0, &super::REQUESTS, &[route, outcome, kind])
    }

    /// `auth_cache_lookups_total{result}`.
    pub fn cache_lookups(result: &'static str) -> IntCounter {
        counter(1, &super::CACHE_LOOKUPS, &[result])
    }

    /// `request_duration_seconds{route}`.
    pub fn request_duration(route: &'static str) -> Histogram {
        let k = key(&[route]);
        HISTOGRAMS.with(|c| {
            if let Some((_, _, h)) = c.borrow().iter().find(|(_, key, _)| *key == k) {
                return h.clone();
            }
            let h = super::REQUEST_DURATION.with_label_values(&[route]);
            let mut c = c.borrow_mut();
            if c.len() < HANDLES_MAX {
                c.push((0, k, h.clone()));
            }
            h
        })
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_cached_handle_is_the_labelled_metric() {
            let before = super::super::REQUESTS
                .with_label_values(&["authenticated", "2xx", "oauth"])
                .get();
            for _ in 0..3 {
                super::requests("authenticated", "2xx", "oauth").inc();
            }
            // Same values at other addresses: the same series.
            let route = String::from("authenticated").leak();
            super::requests(route, "2xx", "oauth").inc();
            assert_eq!(
                super::super::REQUESTS
                    .with_label_values(&["authenticated", "2xx", "oauth"])
                    .get(),
                before + 4
            );
        }
    }
}

/// Requests by route class, outcome (errcode of a gateway answer, else the status class) and
/// the kind of token verified (`none`, `oauth`, `compat`).
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("requests_total"),
        "Requests by route class, outcome and kind of token",
        &["route", "outcome", "token_kind"]
    )
    .expect("metric")
});
/// Request latency by route class.
pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        name!("request_duration_seconds"),
        "Time from request arrival to the end of the response",
        &["route"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric")
});
/// Upstream latency.
pub static UPSTREAM_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        name!("upstream_duration_seconds"),
        "Time from choosing the homeserver to the end of the response",
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric")
});
/// Identity cache lookups by result.
pub static CACHE_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("auth_cache_lookups_total"),
        "Identity cache lookups: hit, negative_hit, miss, refresh, coalesced, bypass",
        &["result"]
    )
    .expect("metric")
});
/// Background re-checks of cached valid tokens ahead of their window's end, by result.
pub static CACHE_RECHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("auth_cache_rechecks_total"),
        "Background re-checks of cached valid tokens before their reuse window ends: renewed, refused, superseded, skipped, failed",
        &["result"]
    )
    .expect("metric")
});
/// Checks of compat sessions' OP grants, by result.
pub static COMPAT_GRANT_CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("compat_grant_checks_total"),
        "Checks of compat sessions' OP grants (a refresh at the OP): renewed, ended, skipped, failed",
        &["result"]
    )
    .expect("metric")
});
/// Identity cache entries.
pub static CACHE_ENTRIES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(name!("auth_cache_entries"), "Cached verdicts (approximate)")
        .expect("metric")
});
/// Revocations held.
pub static REVOCATIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        name!("revocations"),
        "Revocations held (sessions, subjects, users, devices, tokens); bounded by notifications.max_revocations"
    )
    .expect("metric")
});
/// Introspection requests by result.
pub static INTROSPECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("introspection_requests_total"),
        "RFC 7662 introspection requests: active, inactive, or the failure",
        &["result"]
    )
    .expect("metric")
});
/// Introspection latency.
pub static INTROSPECTION_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        name!("introspection_duration_seconds"),
        "Latency of introspection requests to the OP",
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric")
});
/// JWT verifications by result.
pub static JWT_VERIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("jwt_verifications_total"),
        "Local JWT validations: valid or the refusal reason",
        &["result"]
    )
    .expect("metric")
});
/// JWKS fetches by result.
pub static JWKS_REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("jwks_refreshes_total"),
        "JWKS fetches",
        &["issuer", "result"]
    )
    .expect("metric")
});
/// Usable keys per issuer.
pub static JWKS_KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        name!("jwks_keys"),
        "Usable signing keys per issuer",
        &["issuer"]
    )
    .expect("metric")
});
/// Last successful JWKS fetch per issuer.
pub static JWKS_LAST_SUCCESS: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        name!("jwks_last_success_timestamp_seconds"),
        "Unix time of the last successful JWKS fetch",
        &["issuer"]
    )
    .expect("metric")
});
/// Provisioning calls to the homeserver by kind and result.
pub static PROVISIONING: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("provisioning_requests_total"),
        "Appservice calls: register, login, device, logout, deactivate",
        &["kind", "result"]
    )
    .expect("metric")
});
/// Bindings held in memory.
pub static BINDINGS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(name!("bindings"), "Upstream bindings held in memory").expect("metric")
});
/// Sign-outs by source.
pub static SIGNOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("signouts_total"),
        "Sign-outs: backchannel_logout, revocation, admin",
        &["source"]
    )
    .expect("metric")
});
/// Purged identities by source.
pub static PURGED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("purged_identities_total"),
        "Cached identities purged",
        &["source"]
    )
    .expect("metric")
});
/// Back-channel logout tokens refused, by step.
pub static LOGOUT_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        name!("logout_tokens_refused_total"),
        "Back-channel logout tokens refused, by validation step",
        &["reason"]
    )
    .expect("metric")
});
/// Whether the last call to the OP succeeded.
pub static OP_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        name!("op_up"),
        "1 when the last call to the primary OP succeeded"
    )
    .expect("metric")
});
/// Whether Redis answers (1), does not (0); absent without Redis.
pub static REDIS_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(name!("redis_up"), "1 when the shared state (Redis) answers")
        .expect("metric")
});
/// Build information.
pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        name!("build_info"),
        "Build information",
        &["version", "revision"]
    )
    .expect("metric")
});
/// Start time.
pub static START_TIME: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(name!("start_time_seconds"), "Unix time the gateway started").expect("metric")
});

/// Registers every metric (so each appears in the exposition from the start) and the process
/// collector.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        BUILD_INFO
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GIT_REVISION")])
            .set(1);
        START_TIME.set(crate::clock::unix_secs_f64());
        OP_UP.set(1);
        LazyLock::force(&REQUESTS);
        LazyLock::force(&REQUEST_DURATION);
        LazyLock::force(&UPSTREAM_DURATION);
        LazyLock::force(&CACHE_LOOKUPS);
        LazyLock::force(&CACHE_ENTRIES);
        LazyLock::force(&CACHE_RECHECKS);
        LazyLock::force(&INTROSPECTIONS);
        LazyLock::force(&REVOCATIONS);
        LazyLock::force(&INTROSPECTION_DURATION);
        LazyLock::force(&JWT_VERIFICATIONS);
        LazyLock::force(&JWKS_REFRESHES);
        LazyLock::force(&JWKS_KEYS);
        LazyLock::force(&JWKS_LAST_SUCCESS);
        LazyLock::force(&PROVISIONING);
        LazyLock::force(&BINDINGS);
        LazyLock::force(&SIGNOUTS);
        LazyLock::force(&PURGED);
        LazyLock::force(&LOGOUT_REFUSED);
        LazyLock::force(&REDIS_UP);
        #[cfg(target_os = "linux")]
        let _ = prometheus::register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    });
}

/// `name{label,label} kind` for every gateway metric, sorted: what the golden file pins.
pub fn descriptors() -> Vec<String> {
    use prometheus::core::Collector;
    init();
    let collectors: Vec<(&dyn Collector, &str)> = vec![
        (&*REQUESTS, "counter"),
        (&*REQUEST_DURATION, "histogram"),
        (&*UPSTREAM_DURATION, "histogram"),
        (&*CACHE_LOOKUPS, "counter"),
        (&*CACHE_ENTRIES, "gauge"),
        (&*CACHE_RECHECKS, "counter"),
        (&*INTROSPECTIONS, "counter"),
        (&*REVOCATIONS, "gauge"),
        (&*INTROSPECTION_DURATION, "histogram"),
        (&*JWT_VERIFICATIONS, "counter"),
        (&*JWKS_REFRESHES, "counter"),
        (&*JWKS_KEYS, "gauge"),
        (&*JWKS_LAST_SUCCESS, "gauge"),
        (&*PROVISIONING, "counter"),
        (&*BINDINGS, "gauge"),
        (&*SIGNOUTS, "counter"),
        (&*PURGED, "counter"),
        (&*LOGOUT_REFUSED, "counter"),
        (&*OP_UP, "gauge"),
        (&*REDIS_UP, "gauge"),
        (&*BUILD_INFO, "gauge"),
        (&*START_TIME, "gauge"),
    ];
    let mut out: Vec<String> = collectors
        .into_iter()
        .flat_map(|(c, kind)| {
            c.desc()
                .into_iter()
                .map(move |d| {
                    let mut labels = d.variable_labels.clone();
                    labels.sort();
                    format!("{}{{{}}} {kind}", d.fq_name, labels.join(","))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

/// The text exposition of the default registry.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    let _ = encoder.encode(&prometheus::gather(), &mut buf);
    buf
}

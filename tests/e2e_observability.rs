//! Operations end to end: a real Prometheus (Debian's package) scrapes the built gateway while
//! real tokens from the real OP go through it. `promtool` checks the exposition and the alert
//! rules, and every PromQL query of the Grafana dashboard is evaluated against that Prometheus;
//! the panels the run exercises must return data.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

#[path = "common/mod.rs"]
mod common;
mod e2e_support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Echo;
use e2e_support::{free_port, wait_for_port, GatewayProcess, Op};
use serde_json::Value;
use wiremock::{Mock, MockServer};

fn repo(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("grafana/matrix-oidc-gateway.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for a in dash["annotations"]["list"].as_array().unwrap() {
        out.push(("annotation".into(), a["expr"].as_str().unwrap().to_owned()));
    }
    out
}

fn concrete(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$job", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_dashboard_query_evaluates() {
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "prometheus is not installed: scripts/setup.sh installs Debian's prometheus package"
    );
    let op = Op::start();
    let hs = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(Echo)
        .mount(&hs)
        .await;
    let gw = GatewayProcess::start(&format!(
        "[listen]\npublic = \"127.0.0.1:{{port}}\"\nadmin = \"127.0.0.1:{{admin_port}}\"\n\
         [homeserver]\nurl = \"{}\"\nserver_name = \"localhost\"\n\
         [store]\npath = \"{{state_dir}}/state.sqlite3\"\nencryption_key = \"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\"\n\
         [[issuers]]\nissuer = \"{}\"\nclient_id = \"gateway\"\nclient_secret = \"gateway-secret\"\n",
        hs.uri(),
        op.issuer
    ));

    // The exposition passes promtool's lint, and so do the alert rules.
    let exposition = reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let rules = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/alerts.yaml"))
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );

    // A real Prometheus scraping the admin listener every second.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = gw.admin.trim_start_matches("http://").to_owned();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: matrix-oidc-gateway\n    static_configs:\n      - targets: ['{admin}']\n",
            repo("deploy/prometheus/alerts.yaml").display()
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, "prometheus", &mut prom);

    let client = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let query = |q: String| {
        let client = client.clone();
        let api = api.clone();
        async move {
            let v: Value = client
                .post(&api)
                .form(&[("query", q.as_str())])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    let samples = |v: &Value| -> u64 {
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    // Order: Prometheus has scraped the gateway once before the traffic starts...
    let mut scraped = false;
    for _ in 0..80 {
        if samples(&query("count_over_time(matrix_oidc_gateway_build_info[1m])".into()).await) >= 1
        {
            scraped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(scraped, "Prometheus did not scrape the gateway");

    // ...traffic spread over several scrapes: cache hits and misses, a refusal, a public route...
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    let bob = op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0001",
    );
    for round in 0..8 {
        for t in [&alice.access_token, &bob.access_token] {
            for _ in 0..5 {
                client
                    .get(gw.url("/_matrix/client/v3/sync"))
                    .bearer_auth(t)
                    .send()
                    .await
                    .unwrap();
            }
        }
        client
            .get(gw.url("/_matrix/client/v3/sync"))
            .bearer_auth(format!("unknown-{round}"))
            .send()
            .await
            .unwrap();
        client
            .get(gw.url("/_matrix/client/versions"))
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ...and it scraped again after the traffic.
    let mut n = 0;
    for _ in 0..40 {
        n = samples(
            &query(
                "count_over_time(matrix_oidc_gateway_auth_cache_lookups_total{result=\"hit\"}[1m])"
                    .into(),
            )
            .await,
        );
        if n >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(n >= 4, "too few scrapes after the traffic");

    let must_have_data = [
        "Cache hit ratio",
        "Request rate by route class",
        "Introspection latency p50 / p99",
        "Outcomes",
    ];
    let mut checked = 0;
    for (title, expr) in dashboard_queries() {
        let v = query(concrete(&expr)).await;
        assert_eq!(v["status"], "success", "{title}: {expr}: {v}");
        if must_have_data.contains(&title.as_str()) {
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            assert!(!result.is_empty(), "{title} returned no data: {expr}");
            let has_number = result
                .iter()
                .any(|r| r["value"][1].as_str().is_some_and(|s| s != "NaN"));
            assert!(has_number, "{title} returned only NaN: {expr}: {v}");
        }
        checked += 1;
    }
    assert!(
        checked >= 25,
        "only {checked} queries found in the dashboard"
    );
    // The alert rules loaded and evaluate.
    let rules: Value = client
        .get(format!("http://127.0.0.1:{port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(groups.len(), 1, "{rules}");
    for r in groups[0]["rules"].as_array().unwrap() {
        assert_ne!(r["health"], "err", "{r}");
    }
    let _ = prom.kill();
    let _ = prom.wait();
}

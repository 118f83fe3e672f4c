//! `--check-config` over every configuration file in the repository, and over a file with many
//! mistakes: the binary must list every problem with its key and exit non-zero.

use std::path::Path;
use std::process::Command;

fn check(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_matrix-oidc-gateway"))
        .arg("--check-config")
        .arg("--config")
        .arg(path)
        .env_remove("MATRIX_OIDC_GATEWAY_CONFIG")
        .output()
        .expect("run the binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_shipped_config_file_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("config/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, text) = check(&path);
            assert_eq!(code, 0, "{}: {text}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example and minimal configs");
}

#[test]
fn every_problem_is_listed_with_its_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad/many-problems.toml");
    let (code, text) = check(&path);
    assert_eq!(code, 2, "{text}");
    for key in [
        "listen.public",
        "listen.threads",
        "homeserver.url",
        "homeserver.server_name",
        "homeserver.connect_timeout",
        "homeserver.appservice_sender",
        "issuers[0].client_auth",
        "issuers[0].client_secret",
        "auth.guest_endpoints",
        "cache.negative_ttl",
        "identity_headers.user_id",
    ] {
        assert!(
            text.contains(&format!("  {key}: ")),
            "{key} not reported in:\n{text}"
        );
    }
}

/// An identity header named after one HTTP or the gateway owns would replace it on every
/// request (a `Transfer-Encoding` identity header desynchronises the homeserver connection),
/// or strip it (`also_strip = ["host"]`).
#[test]
fn identity_headers_may_not_take_a_framing_or_gateway_header_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reserved.toml");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.minimal.toml");
    let base = std::fs::read_to_string(&example).unwrap();
    std::fs::write(
        &path,
        format!(
            "{base}\n[identity_headers]\nuser_id = \"Transfer_Encoding\"\n\
             subject = \"Authorization\"\nalso_strip = [\"X-Custom\", \"host\"]\n"
        ),
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 2, "{text}");
    for key in [
        "identity_headers.user_id",
        "identity_headers.subject",
        "identity_headers.also_strip[1]",
    ] {
        assert!(
            text.contains(&format!("  {key}: ")),
            "{key} not reported in:\n{text}"
        );
    }
    assert!(!text.contains("also_strip[0]"), "{text}");
}

#[test]
fn unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[homeserver]\nurl = \"http://127.0.0.1:1\"\nserver_name = \"x\"\nsevrer = 1\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 2);
    assert!(text.contains("sevrer"), "{text}");
}

#[test]
fn plain_http_to_a_remote_host_only_warns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("remote.toml");
    std::fs::write(
        &path,
        "[homeserver]\nurl = \"http://synapse.internal:8008\"\nserver_name = \"x\"\n\
         [[issuers]]\nissuer = \"https://op/\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("warning: homeserver.url"), "{text}");
}

//! The admin API against its OpenAPI document (`docs/admin-api.openapi.yaml`): the document is
//! validated, then schemathesis (a property-based client, PyPI) drives every operation of the
//! running gateway with generated inputs and checks that no answer is a 5xx and that every
//! answer matches the documented status codes and schemas.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const TOKEN: &str = "schema-admin-token-0123456789";

fn tools() -> PathBuf {
    let cache = std::env::var_os("PEER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/matrix-oidc-gateway"));
    let bin = cache.join("tools-venv/bin");
    assert!(
        bin.join("schemathesis").exists(),
        "schemathesis is not installed in {}: run scripts/peers/install-tools.sh (scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/admin-api.openapi.yaml")
}

#[test]
fn the_openapi_document_is_valid() {
    let out = Command::new(tools().join("openapi-spec-validator"))
        .arg(schema())
        .output()
        .expect("openapi-spec-validator");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let f = Fakes::start().await;
    let gw = spawn(&f.config(&format!("\n[admin]\ntoken = \"{TOKEN}\""))).await;
    let url = gw.admin_url("");
    let bin = tools();
    // schemathesis keeps a `.schemathesis/` cache in its working directory: not the checkout.
    let scratch = tempfile::tempdir().expect("tempdir");
    let cwd = scratch.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin.join("schemathesis"))
            .current_dir(cwd)
            .arg("run")
            .arg(schema())
            .args(["--url", &url])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .args(["--checks", "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"])
            .args(["--max-examples", "40", "--generation-deterministic"])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .expect("schemathesis")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("passed"), "schemathesis ran no test:\n{text}");
}

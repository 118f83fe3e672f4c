//! Metric names, kinds and label sets are an interface (dashboards and alerts depend on them):
//! pinned by `tests/fixtures/metrics.golden`, so a rename is a reviewed change. To accept a
//! change, run with `UPDATE_GOLDEN=1`.

#[test]
fn metric_names_and_labels_match_the_golden_file() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics.golden");
    let actual = matrix_oidc_gateway::metrics::descriptors().join("\n") + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual, expected,
        "metrics changed; review, then UPDATE_GOLDEN=1 cargo test --test metrics_golden"
    );
    for line in actual.lines() {
        for forbidden in ["user", "token", "device", "path", "sub"] {
            let labels = line.split('{').nth(1).unwrap_or_default();
            assert!(
                !labels
                    .split([',', '}'])
                    .any(|l| l == forbidden || l == format!("{forbidden}_id")),
                "unbounded label in {line}"
            );
        }
    }
}

//! The CRD YAML committed in `manifests/` and the Helm chart is exactly what
//! the Rust types generate. If this fails, run
//! `cargo run -p distrocache-operator --bin crdgen` and commit the result.

use distrocache_operator::crdgen::{
    CHART_PATH, MANIFEST_PATH, chart_crd, manifest_crd, workspace_root,
};

#[test]
fn committed_crd_files_match_the_types() {
    for (path, expected) in [(MANIFEST_PATH, manifest_crd()), (CHART_PATH, chart_crd())] {
        let committed = std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| {
            panic!("{path}: {e}; run `cargo run -p distrocache-operator --bin crdgen`")
        });
        assert!(
            committed == expected,
            "{path} differs from the CRD the types generate; run `cargo run -p distrocache-operator --bin crdgen` and commit the result"
        );
    }
}

//! The CRD YAML as it ships, generated from [`crate::crd`]: plain for
//! `manifests/`, and as a guarded, upgrade-friendly template for the Helm
//! chart. Shared by the `crdgen` binary and the test that keeps the
//! committed files current.

use std::path::PathBuf;

use kube::CustomResourceExt;

use crate::crd::DistroCache;

pub const MANIFEST_PATH: &str = "manifests/10-crd.yaml";
pub const CHART_PATH: &str = "charts/distrocache/templates/crd.yaml";

const HEADER: &str = "# Generated from operator/src/crd.rs by `cargo run -p distrocache-operator --bin crdgen`; do not edit.\n";

/// The repository root (the operator crate's parent).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the operator crate sits in the workspace")
        .to_path_buf()
}

pub fn manifest_crd() -> String {
    let yaml = serde_yaml::to_string(&DistroCache::crd()).expect("the CRD always serialises");
    format!("{HEADER}{yaml}")
}

/// The chart's copy: installed and upgraded with the release when
/// `crds.install` is true (the default), and kept when the release is
/// uninstalled, since deleting a CRD deletes every cache it defines.
pub fn chart_crd() -> String {
    let mut crd = DistroCache::crd();
    crd.metadata
        .annotations
        .get_or_insert_default()
        .insert("helm.sh/resource-policy".into(), "keep".into());
    let yaml = serde_yaml::to_string(&crd).expect("the CRD always serialises");
    // Helm must not read anything in the schema's descriptions as a template.
    assert!(
        !yaml.contains("{{"),
        "the CRD text must not contain template delimiters"
    );
    format!("{HEADER}{{{{- if .Values.crds.install }}}}\n{yaml}{{{{- end }}}}\n")
}

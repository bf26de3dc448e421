//! Writes the DistroCache CRD, generated from the Rust types, where it ships:
//! `manifests/10-crd.yaml` for `kubectl apply -f manifests/`, and
//! `charts/distrocache/templates/crd.yaml` for Helm. Run from anywhere:
//!
//! ```text
//! cargo run -p distrocache-operator --bin crdgen            # write both files
//! cargo run -p distrocache-operator --bin crdgen -- --stdout
//! ```
//!
//! The chart carries the CRD as a template (not in `crds/`, which Helm never
//! upgrades), guarded by `crds.install` and kept on uninstall, so
//! `helm upgrade` delivers schema changes. `operator/tests/crd_files.rs`
//! fails when the committed files differ from the types.

use distrocache_operator::crdgen::{
    CHART_PATH, MANIFEST_PATH, chart_crd, manifest_crd, workspace_root,
};

fn main() -> std::io::Result<()> {
    if std::env::args().any(|a| a == "--stdout") {
        print!("{}", manifest_crd());
        return Ok(());
    }
    let root = workspace_root();
    for (path, text) in [(MANIFEST_PATH, manifest_crd()), (CHART_PATH, chart_crd())] {
        let path = root.join(path);
        std::fs::write(&path, text)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

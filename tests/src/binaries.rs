//! Where the control-plane binaries are: kube-apiserver, kube-controller-manager,
//! kubectl, etcd and helm, built from Go modules by
//! `scripts/build-control-plane.sh` into a cache outside the clone (DESIGN 6).
//! The lookup mirrors the script's: `DISTROCACHE_K8S_BIN`, else
//! `${DISTROCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distrocache}/k8s-<version>`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The Kubernetes version the binaries are built at (kube-apiserver, kubectl...).
pub const K8S_VERSION: &str = "v1.34.4";
/// The helm version.
pub const HELM_VERSION: &str = "v3.19.5";

/// Paths of the five binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl Binaries {
    /// The directory the binaries are expected in (it may not exist yet).
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("DISTROCACHE_K8S_BIN") {
            return PathBuf::from(dir);
        }
        let cache_root = match std::env::var_os("DISTROCACHE_CACHE") {
            Some(root) => PathBuf::from(root),
            None => {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                    .unwrap_or_else(|| PathBuf::from(".cache"));
                cache.join("distrocache")
            }
        };
        cache_root.join(format!("k8s-{K8S_VERSION}"))
    }

    /// Finds every binary, or says how to build the missing ones.
    pub fn locate() -> Result<Binaries> {
        Self::locate_in(&Self::default_dir())
    }

    /// Finds every binary in `dir`.
    pub fn locate_in(dir: &Path) -> Result<Binaries> {
        let path = |name: &str| dir.join(name);
        let binaries = Binaries {
            dir: dir.to_path_buf(),
            etcd: path("etcd"),
            kube_apiserver: path("kube-apiserver"),
            kube_controller_manager: path("kube-controller-manager"),
            kubectl: path("kubectl"),
            helm: path("helm"),
        };
        let missing: Vec<String> = [
            &binaries.etcd,
            &binaries.kube_apiserver,
            &binaries.kube_controller_manager,
            &binaries.kubectl,
            &binaries.helm,
        ]
        .into_iter()
        .filter(|p| !is_executable(p))
        .map(|p| p.display().to_string())
        .collect();
        if !missing.is_empty() {
            bail!(
                "the test control plane's binaries are missing: {}.\n\
                 Build them once with `bash scripts/build-control-plane.sh` (a few minutes; \
                 they are cached in {} and the script skips those already built), \
                 or point DISTROCACHE_K8S_BIN at a directory that holds them.",
                missing.join(", "),
                dir.display()
            );
        }
        Ok(binaries)
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_name_the_build_script() {
        let empty = tempfile::tempdir().expect("a temporary directory");
        let error = Binaries::locate_in(empty.path()).expect_err("nothing is there");
        let message = format!("{error:#}");
        assert!(
            message.contains("bash scripts/build-control-plane.sh"),
            "{message}"
        );
        assert!(message.contains("kube-apiserver"), "{message}");
        assert!(message.contains("DISTROCACHE_K8S_BIN"), "{message}");
    }
}

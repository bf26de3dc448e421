//! Kubeconfig files (token authentication, the test CA) and clients built
//! from them.

use std::path::Path;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki::Pki;

/// Builds a client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("load {}", path.display()))?;
    Client::try_from(config).context("build a Kubernetes client")
}

/// Writes a kubeconfig for `server` with a bearer token and the CA.
pub(crate) fn write_kubeconfig(path: &Path, server: &str, pki: &Pki) -> Result<()> {
    write_token_kubeconfig(path, server, &pki.ca_cert, &pki.admin_token, "admin")
}

/// Writes a kubeconfig that authenticates with `token` (JSON is valid YAML,
/// and serde_json escapes every value correctly).
pub(crate) fn write_token_kubeconfig(
    path: &Path,
    server: &str,
    ca_cert: &Path,
    token: &str,
    user: &str,
) -> Result<()> {
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "distrocache-test",
            "cluster": {
                "server": server,
                "certificate-authority": ca_cert,
            },
        }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{
            "name": "distrocache-test",
            "context": { "cluster": "distrocache-test", "user": user, "namespace": "default" },
        }],
        "current-context": "distrocache-test",
    });
    std::fs::write(path, serde_json::to_string_pretty(&kubeconfig)?)
        .with_context(|| format!("write {}", path.display()))
}

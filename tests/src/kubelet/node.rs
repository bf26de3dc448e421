//! The Node object of the test kubelet: registered with a Ready condition
//! and an InternalIP of 127.0.0.1. No heartbeats follow: no node-lifecycle
//! controller runs to mark a silent node NotReady.

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::worker;

/// Creates (or updates) the Node with a Ready condition.
pub(super) async fn register(client: &Client, name: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
            },
        },
    });
    let params = PatchParams::apply("distrocache-test-kubelet").force();
    nodes
        .patch(name, &params, &Patch::Apply(&node))
        .await
        .context("apply the Node")?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let condition = |type_: &str, status: &str, reason: &str| {
        serde_json::json!({
            "type": type_, "status": status, "reason": reason,
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        })
    };
    let resources = serde_json::json!({ "cpu": "2", "memory": "24Gi", "pods": "250" });
    let status = serde_json::json!({
        "status": {
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [
                { "type": "InternalIP", "address": worker::HOST_IP.to_string() },
                { "type": "Hostname", "address": name },
            ],
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {
                "architecture": std::env::consts::ARCH,
                "bootID": "", "machineID": "", "systemUUID": "",
                "containerRuntimeVersion": "test-kubelet://1",
                "kernelVersion": "", "kubeProxyVersion": "",
                "kubeletVersion": crate::binaries::K8S_VERSION,
                "operatingSystem": "linux", "osImage": "DistroCache test kubelet",
            },
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("write the Node's status")?;
    Ok(())
}

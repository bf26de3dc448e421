//! The command lines of the control plane's components: etcd,
//! kube-apiserver and kube-controller-manager, all on 127.0.0.1, with the
//! reasons for the flags that are not defaults.

use std::path::Path;

use super::Ports;
use crate::pki::Pki;

/// The controllers kube-controller-manager runs: those the StatefulSet tests
/// and the operator need (statefulset, garbagecollector, namespace,
/// serviceaccount and its tokens, the root CA publisher that fills the
/// `kube-root-ca.crt` ConfigMap every pod's service-account volume refers
/// to), plus deployment/replicaset (the operator may run as a Deployment),
/// endpointslice (Services) and disruption (PodDisruptionBudget status).
/// Nothing that needs a kubelet's cooperation (node lifecycle, pod GC) runs.
const CONTROLLERS: &str = "statefulset,garbagecollector,namespace,serviceaccount,serviceaccount-token,\
root-ca-cert-publisher,deployment,replicaset,endpointslice,disruption";

/// Where a control plane's files and ports are.
pub(super) struct Layout<'a> {
    pub dir: &'a Path,
    pub ports: Ports,
    pub pki: &'a Pki,
    pub tokens: &'a Path,
    pub kubeconfig: &'a Path,
}

impl Layout<'_> {
    fn etcd_client(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.etcd_client)
    }
}

pub(super) fn etcd(l: &Layout<'_>) -> Vec<String> {
    let etcd_client = l.etcd_client();
    let etcd_peer = format!("http://127.0.0.1:{}", l.ports.etcd_peer);
    vec![
        "--name=test".to_string(),
        format!("--data-dir={}", l.dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_client}"),
        format!("--advertise-client-urls={etcd_client}"),
        format!("--listen-peer-urls={etcd_peer}"),
        format!("--initial-advertise-peer-urls={etcd_peer}"),
        format!("--initial-cluster=test={etcd_peer}"),
        // Test data is thrown away: skipping fsync makes every write cheap.
        "--unsafe-no-fsync".to_string(),
        "--log-level=warn".to_string(),
    ]
}

pub(super) fn apiserver(l: &Layout<'_>) -> Vec<String> {
    let etcd_client = l.etcd_client();
    vec![
        format!("--etcd-servers={etcd_client}"),
        "--bind-address=127.0.0.1".to_string(),
        "--advertise-address=127.0.0.1".to_string(),
        format!("--secure-port={}", l.ports.apiserver),
        format!("--cert-dir={}", l.dir.join("apiserver-certs").display()),
        format!("--tls-cert-file={}", l.pki.serving_cert.display()),
        format!("--tls-private-key-file={}", l.pki.serving_key.display()),
        format!("--token-auth-file={}", l.tokens.display()),
        "--authorization-mode=Node,RBAC".to_string(),
        format!(
            "--service-account-key-file={}",
            l.pki.service_account_public_key.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            l.pki.service_account_key.display()
        ),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
        // Only a range recorded in etcd: Services get addresses from it,
        // but nothing here listens on them or routes to them.
        "--service-cluster-ip-range=10.96.0.0/16".to_string(),
        "--allow-privileged=true".to_string(),
        "--profiling=false".to_string(),
        // The `kubernetes` Service's endpoints would name the advertise
        // address, which the API server itself refuses as loopback
        // (an error logged every few seconds); nothing here uses them.
        "--endpoint-reconciler-type=none".to_string(),
    ]
}

pub(super) fn controller_manager(l: &Layout<'_>) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", l.kubeconfig.display()),
        format!("--controllers={CONTROLLERS}"),
        format!(
            "--service-account-private-key-file={}",
            l.pki.service_account_key.display()
        ),
        format!("--root-ca-file={}", l.pki.ca_cert.display()),
        "--bind-address=127.0.0.1".to_string(),
        // No health endpoint is needed: readiness is judged through the
        // API (the `default` ServiceAccount appearing).
        "--secure-port=0".to_string(),
        "--leader-elect=false".to_string(),
        // The controllers act with the admin's token: per-controller
        // service-account credentials would first wait for their tokens,
        // slowing every start for no benefit to the tests.
        "--use-service-account-credentials=false".to_string(),
        "--kube-api-qps=100".to_string(),
        "--kube-api-burst=200".to_string(),
        "--profiling=false".to_string(),
    ]
}

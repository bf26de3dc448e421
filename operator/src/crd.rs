//! The `DistroCache` custom resource (group `distrocache.io`, version
//! `v1alpha1`): what a user asks for (spec) and what the operator reports
//! (status). `crdgen` turns these types into the CRD YAML shipped in
//! `manifests/` and the Helm chart, so the schema the API server enforces is
//! exactly what this file says.
//!
//! Validation lives in the schema where the API server can enforce it:
//! minimums, maximums, patterns and defaults, and the cross-field rules as
//! CEL (`x-kubernetes-validations`, from the `#[x_kube(validation)]`
//! attributes below), so `kubectl apply` refuses a bad cache at once.
//! [`DistroCacheSpec::validate`] repeats the rules that matter for safety as
//! a second line (a CRD applied by an older release has no CEL), and checks
//! what CEL cannot afford (label syntax over unbounded maps), reporting it
//! as a condition.
//!
//! Defaults that are policy rather than syntax (the cache-node image, pod
//! placement, resource requests, the byte budget derived from a memory
//! limit) are not in the schema: the operator fills them in when it builds
//! the StatefulSet, so they can improve without rewriting stored objects,
//! and a user's value replaces them whole.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation;

/// Durations as both the node and CEL's `duration()` read them: `30s`,
/// `5m`, `1h30m`, `500ms` (Go's units; no days, which CEL refuses).
const DURATION_PATTERN: &str = r"^([0-9]+(ns|us|ms|s|m|h))+$";
/// Byte sizes as the node reads them: `1048576`, `512MiB`, `1GB`.
const BYTES_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?\s*([KMGT]i?B|B)?$";

/// A DistroCache: a cluster of cache nodes sharing a consistent-hash ring.
// Clippy reads the repeated `type_ = "integer"` of two printer columns as a
// duplicated attribute; they are arguments of different columns.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "distrocache.io",
    version = "v1alpha1",
    kind = "DistroCache",
    plural = "distrocaches",
    // Not `dc`, which is OpenShift's DeploymentConfig.
    shortname = "dcache",
    // `kubectl get distrocache-all` lists every cache.
    category = "distrocache-all",
    namespaced,
    status = "DistroCacheStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.ringEpoch"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "A DistroCache: a ring of cache nodes that any client can read and write through any node"
)]
#[x_kube(validation = Rule::new("!has(self.restoreFrom) || has(self.backup)")
    .message("spec.restoreFrom needs spec.backup: the backup is read from spec.backup.url")
    .field_path(".restoreFrom"))]
#[x_kube(validation = Rule::new("self.peerPort != self.port")
    .message("spec.peerPort must differ from spec.port: the peer API needs a port of its own")
    .field_path(".peerPort"))]
#[x_kube(validation = Rule::new(
        "!self.podDisruptionBudget.enabled || self.replicas <= 1 || \
         self.podDisruptionBudget.maxUnavailable < self.replicationFactor")
    .message("spec.podDisruptionBudget.maxUnavailable must be below spec.replicationFactor, \
              or a voluntary disruption could remove every copy of a key")
    .field_path(".podDisruptionBudget.maxUnavailable"))]
#[x_kube(validation = Rule::new(
        "!has(self.tls) || !has(self.tls.probePort) || \
         (self.tls.probePort != self.port && self.tls.probePort != self.peerPort)")
    .message("spec.tls.probePort must differ from spec.port and spec.peerPort")
    .field_path(".tls.probePort"))]
#[x_kube(validation = Rule::new(
        "!has(self.tls) || !has(self.tls.clientCaSecretName) || !has(self.monitoring) || \
         !has(self.monitoring.serviceMonitor) || !has(self.monitoring.serviceMonitor.enabled) || \
         !self.monitoring.serviceMonitor.enabled || \
         has(self.monitoring.serviceMonitor.clientCertSecretName)")
    .message("spec.monitoring.serviceMonitor.clientCertSecretName is needed with \
              spec.tls.clientCaSecretName: the nodes refuse a Prometheus without a client certificate")
    .field_path(".monitoring.serviceMonitor.clientCertSecretName"))]
#[serde(rename_all = "camelCase")]
pub struct DistroCacheSpec {
    /// Number of cache nodes. Scaling moves data before any pod is removed.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The cache-node container image. Unset: the operator's default
    /// (its `--default-image`, which the Helm chart sets to the cache-node
    /// image of the same release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Secrets for pulling the cache-node image from a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,

    /// Image pull policy of the cache-node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: Option<String>,

    /// Most items each node holds; the least recently used go first.
    #[serde(default = "default_max_size")]
    #[schemars(range(min = 1))]
    pub max_size: i64,

    /// Most memory each node's items may take, e.g. `512MiB` (keys, values,
    /// tags and per-item bookkeeping). Unset: derived from the memory limit
    /// in `resources` (leaving room for connections and allocator slack, so
    /// a full node is not OOM-killed), or no byte cap without a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BYTES_PATTERN))]
    pub max_memory: Option<String>,

    /// TTL of items written without one, e.g. `5m`.
    #[serde(default = "default_ttl", rename = "defaultTTL")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 64))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]+(ns|us|ms|s|m|h))+$') || duration(self) > duration('0s')")
        .message("spec.defaultTTL must be longer than zero"))]
    pub default_ttl: String,

    /// How often expired items are swept in the background, e.g. `1m`.
    #[serde(default = "default_cleanup_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 64))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]+(ns|us|ms|s|m|h))+$') || duration(self) > duration('0s')")
        .message("spec.cleanupInterval must be longer than zero"))]
    pub cleanup_interval: String,

    /// How many nodes hold each key. Changing it moves data like a scale.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 16))]
    pub replication_factor: i32,

    /// Port of the nodes' REST API, health endpoints and /metrics.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Port of the nodes' peer API (`/internal/v1/`), which only other nodes
    /// of the cache use; a port of its own so a NetworkPolicy can close it to
    /// everyone else.
    #[serde(default = "default_peer_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub peer_port: i32,

    /// CPU and memory for each node. Unset: requests of 100m CPU and 128Mi
    /// memory, no limits. With a memory limit and no `maxMemory`, the
    /// node's byte budget is derived from the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_resources")]
    #[x_kube(validation = Rule::new(
            "(!has(self.limits) || \
              ((!('memory' in self.limits) || isQuantity(string(self.limits['memory']))) && \
               (!('cpu' in self.limits) || isQuantity(string(self.limits['cpu']))))) && \
             (!has(self.requests) || \
              ((!('memory' in self.requests) || isQuantity(string(self.requests['memory']))) && \
               (!('cpu' in self.requests) || isQuantity(string(self.requests['cpu'])))))")
        .message("spec.resources: cpu and memory must be quantities, e.g. 500m, 256Mi, 2"))]
    #[x_kube(validation = Rule::new(
            "!has(self.limits) || !has(self.requests) || \
             ['cpu', 'memory'].all(k, !(k in self.limits) || !(k in self.requests) || \
               !isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || \
               quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)")
        .message("spec.resources.requests must not exceed spec.resources.limits"))]
    pub resources: Option<ResourceRequirements>,

    /// Node log filter (tracing EnvFilter syntax), e.g. `info`.
    #[serde(default = "default_log_level")]
    pub log_level: String,

    /// Seconds a node gets to finish after it is told to stop; a leaving node
    /// has already handed its data off, so this only drains requests.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 1, max = 3600))]
    pub termination_grace_period_seconds: i64,

    /// Pod placement: node selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Pod placement: tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Pod placement: affinity and anti-affinity. Unset: a preferred pod
    /// anti-affinity on `kubernetes.io/hostname`, so the copies of a key
    /// land on different Kubernetes nodes where the scheduler can manage.
    /// A value here replaces it (`{}` for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Pod placement: topology spread constraints. Their label selectors
    /// should match the pods' `app.kubernetes.io/instance` label. Unset: a
    /// spread over `topology.kubernetes.io/zone` (maxSkew 1,
    /// ScheduleAnyway). A value here replaces it (`[]` for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// Pod placement: priority class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Extra annotations on every node pod. Changing them restarts the pods
    /// one at a time (a rolling restart that moves no data for good).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// Extra labels on every node pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,

    /// The user id the node runs as. Unset: the image's own (65532), so a
    /// platform that assigns ids (OpenShift's restricted SCC) can do so.
    /// The pods always run as non-root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_user: Option<i64>,

    /// The group id the node runs as (and owns its volumes with). Unset:
    /// the image's own, or what the platform assigns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_group: Option<i64>,

    /// The PodDisruptionBudget that keeps voluntary evictions from taking
    /// every copy of a key at once.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// Prometheus integration.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// Bearer-token authentication of the client and peer APIs.
    #[serde(default)]
    pub auth: AuthSpec,

    /// A NetworkPolicy admitting peer traffic only from the cache's own pods
    /// and client traffic only from selected namespaces.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// Snapshots on a PersistentVolumeClaim per node, so a restart of every
    /// pod at once keeps the data (see the README's "Persistence").
    #[serde(default)]
    #[x_kube(validation = Rule::new(
            "self.enabled == oldSelf.enabled && self.size == oldSelf.size && \
             has(self.storageClassName) == has(oldSelf.storageClassName) && \
             (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)")
        .message("spec.persistence.enabled, size and storageClassName cannot change once the cache \
                  exists: a StatefulSet's claim templates are immutable"))]
    pub persistence: PersistenceSpec,

    /// TLS on the client API and mutual TLS between the nodes (issue 15).
    /// Off unless `secretName` or `certManager` is set.
    #[serde(default)]
    #[x_kube(validation = Rule::new("!has(self.secretName) || !has(self.certManager)")
        .message("spec.tls: set secretName or certManager, not both"))]
    #[x_kube(validation = Rule::new(
            "!has(self.clientCaSecretName) || has(self.secretName) || has(self.certManager)")
        .message("spec.tls.clientCaSecretName needs TLS: set secretName or certManager")
        .field_path(".clientCaSecretName"))]
    pub tls: TlsSpec,

    /// Backups to S3-compatible storage (issue 17): where the nodes upload
    /// their snapshots, on `schedule` (and when asked:
    /// `PUT /api/v1/backups/{id}` on each node), and read `restoreFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// Create this cache from a backup in `spec.backup.url`: each node
    /// starting without data of its own loads the keys it owns from every
    /// node's part of the backup before it turns ready (see the README's
    /// "Backups").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreFromSpec>,
}

/// Where and how often a cache backs up.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// `s3://bucket[/prefix]`. Give each cache a prefix of its own: backup
    /// ids are unique within a URL only.
    #[schemars(
        regex(pattern = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$"),
        length(max = 1024)
    )]
    pub url: String,
    /// The S3 endpoint, for storage other than AWS (`http://minio.storage:9000`).
    /// Plain HTTP only when named here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/[^\s]*)?$"), length(max = 1024))]
    pub endpoint: Option<String>,
    /// The bucket's region.
    #[serde(default = "default_region")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub region: String,
    /// A Secret in the cache's namespace with the keys `accessKeyId` and
    /// `secretAccessKey`, given to every node as `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub credentials_secret: String,
    /// Back up every this long (e.g. `6h`): every node uploads at each
    /// slot (whole multiples since the Unix epoch) under the id
    /// `scheduled-<slot start, Unix seconds>`. Unset: only when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 64))]
    pub schedule: Option<String>,
    /// Scheduled backups kept; each node deletes its part of older ones.
    #[serde(default = "default_backup_keep")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep: i32,
}

/// The backup a new cache starts from.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreFromSpec {
    /// The backup id (`status.lastBackup.id` of the cache backed up, or
    /// the id given to `PUT /api/v1/backups/{id}`).
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"))]
    pub backup_id: String,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_backup_keep() -> i32 {
    7
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceSpec {
    /// Give each node a volume (a `volumeClaimTemplate` named `data`) and
    /// start it with `--data-dir` on it: it writes a snapshot there when it
    /// stops and loads it when it starts. Set it (and `size` and
    /// `storageClassName`) when the cache is created: a StatefulSet's claim
    /// templates cannot change, so the API server refuses the change on an
    /// existing cache.
    #[serde(default)]
    pub enabled: bool,
    /// Size of each node's claim. A snapshot takes about the bytes the node
    /// holds (`maxMemory`) plus 30 bytes per item; twice that leaves room for
    /// the next one while the last is kept.
    #[serde(default = "default_volume_size")]
    #[schemars(
        regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"),
        length(max = 64)
    )]
    pub size: String,
    /// Storage class of the claims. Unset: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Also write a snapshot this often while serving (e.g. `5m`), so a
    /// crash loses at most this much. Unset: only when a node stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 64))]
    pub snapshot_interval: Option<String>,
    /// What happens to the claims when the DistroCache (and so its
    /// StatefulSet) is deleted: `Retain` (default; a cache created again
    /// under the same name starts from them) or `Delete`.
    #[serde(default = "retain")]
    #[schemars(regex(pattern = r"^(Retain|Delete)$"))]
    pub when_deleted: String,
    /// What happens to the claims of the pods a scale-down removes: `Delete`
    /// (default; those nodes handed their data off before they went, so
    /// their snapshots are stale) or `Retain`.
    #[serde(default = "delete")]
    #[schemars(regex(pattern = r"^(Retain|Delete)$"))]
    pub when_scaled: String,
}

impl Default for PersistenceSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            size: default_volume_size(),
            storage_class_name: None,
            snapshot_interval: None,
            when_deleted: retain(),
            when_scaled: delete(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret in the cache's namespace with `tls.crt`,
    /// `tls.key` and `ca.crt` (as cert-manager writes it). Its certificate
    /// serves the client API (names of the client Service) and is each
    /// node's peer certificate, so it must also carry
    /// `*.<name>-peers.<namespace>.svc` and the client-auth usage; peers are
    /// verified against its `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Have cert-manager issue the certificates: the operator creates the
    /// Certificates `<name>-tls` (client API) and `<name>-peer-tls` (peer
    /// mutual TLS) from this issuer. Needs cert-manager's CRDs; without them
    /// the `TLSCertificates` condition says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerSpec>,
    /// Mutual TLS on the client API: a Secret in the cache's namespace whose
    /// `ca.crt` holds the CA certificates of the clients. Every client must
    /// then present a certificate signed by one of them (the ring-aware
    /// client's `client_cert_files`, the CLI's `--cert-file`); the kubelet's
    /// probes and the operator use the plain probe port. Re-read by the
    /// nodes when the Secret changes. With a ServiceMonitor, set
    /// `monitoring.serviceMonitor.clientCertSecretName` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_ca_secret_name: Option<String>,
    /// Port of the nodes' plain-HTTP probe listener (health, readiness,
    /// metrics and rebalance progress only, never data), which the kubelet's
    /// probes, the preStop hook and the operator use while TLS is on.
    #[serde(default = "default_probe_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub probe_port: i32,
}

impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            secret_name: None,
            cert_manager: None,
            client_ca_secret_name: None,
            probe_port: default_probe_port(),
        }
    }
}

fn default_volume_size() -> String {
    "1Gi".into()
}
fn retain() -> String {
    "Retain".into()
}
fn delete() -> String {
    "Delete".into()
}

impl TlsSpec {
    pub fn enabled(&self) -> bool {
        self.secret_name.is_some() || self.cert_manager.is_some()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerSpec {
    /// The cert-manager issuer of the certificates.
    pub issuer_ref: IssuerRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    #[schemars(length(min = 1))]
    pub name: String,
    /// `Issuer` (the default) or `ClusterIssuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The issuer's API group; `cert-manager.io` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Require `Authorization: Bearer <token>` on the client API (the
    /// health, readiness, metrics and rebalance-progress endpoints stay
    /// open for probes, Prometheus and the operator) and on the peer API.
    #[serde(default)]
    pub enabled: bool,
    /// A Secret in the cache's namespace with the keys `client-token` and
    /// `peer-token`. Unset: the operator creates `<name>-auth` with random
    /// tokens (and never changes them afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy.
    #[serde(default)]
    pub enabled: bool,
    /// Namespaces whose pods may use the client API. Unset: only the cache's
    /// own namespace. The operator's namespace is always admitted (it reads
    /// the nodes' progress), as are the cache's own pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_namespace_selector: Option<LabelSelector>,
    /// Further restrict clients to pods with these labels (in the selected
    /// namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_pod_selector: Option<LabelSelector>,
    /// The namespace admitted as the operator's (it reads the nodes'
    /// progress on the client port). Unset: the namespace the operator runs
    /// in, which it learns from the downward API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_namespace: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Create the PodDisruptionBudget.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Most node pods voluntarily unavailable at once. Must stay below the
    /// replication factor, or an eviction could take every copy of a key.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: 1,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
    /// Where Prometheus runs, for the NetworkPolicy: with both the
    /// ServiceMonitor and `networkPolicy` enabled, pods in these namespaces
    /// may scrape the client port's `/metrics`. Unset: the namespace named
    /// `monitoring` (kube-prometheus' and the prometheus-community chart's
    /// usual home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_namespace_selector: Option<LabelSelector>,
    /// Further restrict the scrapers admitted to pods with these labels.
    /// Unset: every pod of the selected namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_pod_selector: Option<LabelSelector>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Create a prometheus-operator ServiceMonitor for the nodes (needs its
    /// CRD in the cluster; without it a condition says why it was skipped).
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub interval: Option<String>,
    /// Labels for the ServiceMonitor, so a Prometheus' serviceMonitorSelector
    /// picks it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// With `spec.tls.clientCaSecretName`: a `kubernetes.io/tls` Secret in
    /// the cache's namespace (`tls.crt`, `tls.key`) whose certificate, signed
    /// by that CA, Prometheus presents when it scrapes the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_cert_secret_name: Option<String>,
}

/// What the operator observed, as of `observedGeneration`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistroCacheStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Ring members whose pods are ready (hold their data and serve). A
    /// ready pod that is not in the ring serves no keys, so it is not
    /// counted.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Epoch of the ring the nodes were last given.
    #[serde(default)]
    pub ring_epoch: i64,
    /// The ring's members.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// `Ready`, `Progressing`, `Degraded` and `Rebalancing`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Label selector of the node pods (for the scale subresource and HPA).
    #[serde(default)]
    pub selector: String,
    /// The newest backup the nodes reported (with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupStatus>,
}

/// A backup as the nodes reported it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    pub id: String,
    /// `Completed` (every member uploaded its part), `Failed` (one
    /// reported an error) or `Running` (not every member has reported).
    pub phase: String,
    /// Items and bytes over the parts uploaded.
    pub items: i64,
    pub bytes: i64,
    /// When the first part reported started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the last part reported finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Each node's part.
    #[serde(default)]
    pub nodes: Vec<NodeBackupStatus>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBackupStatus {
    pub pod: String,
    /// Where its snapshot went.
    pub object: String,
    pub items: i64,
    pub bytes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// The pod, which is the member's id.
    pub pod: String,
    /// Where peers reach it.
    pub address: String,
    /// joining, active or leaving.
    pub state: String,
    /// Items it holds, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<i64>,
    /// Its pod is ready.
    #[serde(default)]
    pub ready: bool,
}

fn default_replicas() -> i32 {
    3
}
/// The cache-node image of this release: the operator's `--default-image`
/// unless told otherwise.
pub fn default_image() -> String {
    format!(
        "ghcr.io/distrocache/cache-node:{}",
        env!("CARGO_PKG_VERSION")
    )
}
fn default_max_size() -> i64 {
    10_000
}
fn default_ttl() -> String {
    "5m".into()
}
fn default_cleanup_interval() -> String {
    "1m".into()
}
fn default_replication_factor() -> i32 {
    2
}
fn default_port() -> i32 {
    8080
}
fn default_peer_port() -> i32 {
    8081
}
fn default_probe_port() -> i32 {
    8082
}
fn default_log_level() -> String {
    "info".into()
}
fn default_grace() -> i64 {
    60
}
fn yes() -> bool {
    true
}
fn one() -> i32 {
    1
}

/// Most entries in `resources.limits` or `.requests`; bounds what the API
/// server estimates its CEL rules cost.
const MAX_RESOURCE_NAMES: u64 = 16;
/// Longest quantity string in `resources`.
const MAX_QUANTITY_LENGTH: u64 = 64;

/// The schema of `resources` (k8s-openapi's), with its maps and quantity
/// strings bounded: without bounds the API server estimates the CEL rules
/// on them to cost more than it allows, and refuses the CRD.
fn bounded_resources(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Option<ResourceRequirements>>::json_schema(generator);
    for map in ["limits", "requests"] {
        if let Some(map) = schema
            .get_mut("properties")
            .and_then(|p| p.get_mut(map))
            .and_then(|m| m.as_object_mut())
        {
            map.insert("maxProperties".into(), MAX_RESOURCE_NAMES.into());
            if let Some(values) = map
                .get_mut("additionalProperties")
                .and_then(|v| v.as_object_mut())
            {
                values.insert(
                    "anyOf".into(),
                    serde_json::json!([
                        {"type": "integer"},
                        {"type": "string", "maxLength": MAX_QUANTITY_LENGTH}
                    ]),
                );
            }
        }
    }
    schema
}

impl DistroCacheSpec {
    /// What the schema cannot check. Returns a message for the `Degraded`
    /// condition when the spec cannot be acted on.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("defaultTTL", &self.default_ttl),
            ("cleanupInterval", &self.cleanup_interval),
        ] {
            let d = humantime::parse_duration(value)
                .map_err(|e| format!("spec.{field} {value:?} is not a duration: {e}"))?;
            if d.is_zero() {
                return Err(format!("spec.{field} must be longer than zero"));
            }
        }
        if let Some(interval) = &self.persistence.snapshot_interval {
            humantime::parse_duration(interval).map_err(|e| {
                format!("spec.persistence.snapshotInterval {interval:?} is not a duration: {e}")
            })?;
        }
        if let Some(schedule) = self.backup.as_ref().and_then(|b| b.schedule.as_ref()) {
            let d = humantime::parse_duration(schedule)
                .map_err(|e| format!("spec.backup.schedule {schedule:?} is not a duration: {e}"))?;
            if d < std::time::Duration::from_secs(1) {
                return Err("spec.backup.schedule must be at least 1s".into());
            }
        }
        if self.restore_from.is_some() && self.backup.is_none() {
            return Err(
                "spec.restoreFrom needs spec.backup: the backup is read from spec.backup.url"
                    .into(),
            );
        }
        if self.peer_port == self.port {
            return Err(format!(
                "spec.peerPort must differ from spec.port ({}): the peer API needs a port of its own",
                self.port
            ));
        }
        if self.pod_disruption_budget.enabled
            && self.replicas > 1
            && self.pod_disruption_budget.max_unavailable >= self.replication_factor
        {
            return Err(format!(
                "spec.podDisruptionBudget.maxUnavailable ({}) must be below spec.replicationFactor ({}), \
                 or a voluntary disruption could remove every copy of a key",
                self.pod_disruption_budget.max_unavailable, self.replication_factor
            ));
        }
        // The CRD's CEL rules say the same; checked here too, because a
        // clients' CA ignored would leave a cache open that its owner
        // believes closed (an older CRD installed, a `null` CEL takes for
        // a value).
        if self.tls.client_ca_secret_name.is_some() {
            if !self.tls.enabled() {
                return Err(
                    "spec.tls.clientCaSecretName needs TLS: set secretName or certManager".into(),
                );
            }
            let monitor = &self.monitoring.service_monitor;
            if monitor.enabled && monitor.client_cert_secret_name.is_none() {
                return Err(
                    "spec.monitoring.serviceMonitor.clientCertSecretName is needed with \
                     spec.tls.clientCaSecretName: the nodes refuse a Prometheus without a \
                     client certificate"
                        .into(),
                );
            }
        }
        // What goes into the pod template verbatim: the API server would
        // refuse the StatefulSet, and every reconcile with it.
        if let Some(labels) = &self.pod_labels {
            validation::check_labels("spec.podLabels", labels)?;
        }
        if let Some(selector) = &self.node_selector {
            validation::check_labels("spec.nodeSelector", selector)?;
        }
        if let Some(annotations) = &self.pod_annotations {
            validation::check_annotations("spec.podAnnotations", annotations)?;
        }
        if let Some(resources) = &self.resources {
            validation::check_resources("spec.resources", resources)?;
        }
        crate::resources::defaults::max_memory(self)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn spec(yaml: &str) -> DistroCacheSpec {
        serde_yaml::from_str(yaml).expect("valid spec")
    }

    #[test]
    fn backups_are_checked_and_a_restore_needs_a_destination() {
        let s = spec(
            "{backup: {url: s3://b/p, credentialsSecret: s3-creds, schedule: 6h}, \
              restoreFrom: {backupId: scheduled-1764720000}}",
        );
        assert!(s.validate().is_ok());
        let b = s.backup.as_ref().unwrap();
        assert_eq!((b.region.as_str(), b.keep), ("us-east-1", 7));
        let err = spec("{restoreFrom: {backupId: x}}").validate().unwrap_err();
        assert!(err.contains("needs spec.backup"), "{err}");
        let err = spec("{backup: {url: s3://b, credentialsSecret: c, schedule: 10ms}}")
            .validate()
            .unwrap_err();
        assert!(err.contains("at least 1s"), "{err}");
    }

    #[test]
    fn an_empty_spec_gets_the_seed_defaults() {
        let s = spec("{}");
        assert_eq!(s.replicas, 3);
        assert_eq!(s.max_size, 10_000);
        assert_eq!(s.default_ttl, "5m");
        assert_eq!(s.cleanup_interval, "1m");
        assert_eq!(s.replication_factor, 2);
        assert_eq!(s.port, 8080);
        assert!(s.pod_disruption_budget.enabled);
        assert!(!s.monitoring.service_monitor.enabled);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn semantic_validation_catches_what_the_schema_cannot() {
        let mut s = spec("{defaultTTL: 0s}");
        assert!(s.validate().unwrap_err().contains("defaultTTL"));
        s = spec("{replicationFactor: 2, podDisruptionBudget: {maxUnavailable: 2}}");
        assert!(s.validate().unwrap_err().contains("maxUnavailable"));
        s = spec("{replicas: 1, replicationFactor: 1}");
        assert!(
            s.validate().is_ok(),
            "a single replica needs no PDB headroom"
        );
        s = spec("{tls: {clientCaSecretName: clients}}");
        assert!(s.validate().unwrap_err().contains("needs TLS"));
        s = spec(
            "{tls: {secretName: c, clientCaSecretName: clients}, \
              monitoring: {serviceMonitor: {enabled: true}}}",
        );
        assert!(s.validate().unwrap_err().contains("clientCertSecretName"));
        s = spec(
            "{tls: {secretName: c, clientCaSecretName: clients}, \
              monitoring: {serviceMonitor: {enabled: true, clientCertSecretName: prom}}}",
        );
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn what_the_pod_template_carries_verbatim_is_checked_before_it_is_applied() {
        // Each of these is accepted by the CRD schema and then refused by
        // the API server in the StatefulSet, on every reconcile.
        // (cpu and memory quantities are the CRD's CEL rules; the
        // control-plane tests check that the API server refuses them.)
        for (yaml, field) in [
            ("{resources: {limits: {gpu: 1}}}", "spec.resources.limits"),
            (
                "{resources: {limits: {ephemeral-storage: lots}}}",
                "spec.resources.limits.ephemeral-storage",
            ),
            ("{podLabels: {'bad key': x}}", "spec.podLabels"),
            ("{podLabels: {team: 'a b'}}", "spec.podLabels"),
            ("{podAnnotations: {'-x': y}}", "spec.podAnnotations"),
            ("{nodeSelector: {disk: 'fast ssd'}}", "spec.nodeSelector"),
        ] {
            let err = spec(yaml).validate().unwrap_err();
            assert!(err.contains(field), "{yaml}: {err}");
        }
        let fine = spec(
            "{resources: {limits: {memory: 512Mi}, requests: {cpu: 100m, memory: 320Mi}}, \
              podLabels: {team: a}, podAnnotations: {example.com/note: 'free text'}, \
              nodeSelector: {kubernetes.io/os: linux}}",
        );
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn the_crd_has_status_scale_printer_columns_and_validation() {
        let crd = serde_json::to_value(DistroCache::crd()).unwrap();
        assert_eq!(crd["spec"]["group"], "distrocache.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        assert_eq!(
            version["subresources"]["scale"]["labelSelectorPath"],
            ".status.selector"
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Replicas", "Ready", "Epoch", "Status", "Age"]);
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["replicas"]["minimum"].as_f64(), Some(0.0));
        assert_eq!(spec["replicationFactor"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(spec["replicationFactor"]["maximum"].as_f64(), Some(16.0));
        assert_eq!(spec["defaultTTL"]["pattern"], DURATION_PATTERN);
        assert_eq!(spec["maxMemory"]["pattern"], BYTES_PATTERN);
        assert_eq!(spec["replicas"]["default"], 3);
    }
}

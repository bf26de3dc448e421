//! The StatefulSet of cache nodes. Pod names (`<name>-<ordinal>`) are the
//! nodes' stable ring ids; the node learns its id, namespace and ring
//! ConfigMap through its environment.
//!
//! Choices worth knowing:
//! * `podManagementPolicy: Parallel`: new pods of a scale-up start together.
//!   Ordering is not what keeps data safe here; the operator's two-phase
//!   ring changes are, and it only shrinks the StatefulSet after the leaving
//!   members have handed their data off.
//! * Rolling updates go one pod at a time, and a pod is Ready only once it
//!   has pulled its keys back from the other replicas, so a restart with
//!   replication factor 2 loses nothing.
//! * The preStop hook waits for a leaving member's handoff (bounded by the
//!   grace period); for any other pod it returns at once.
//! * Unset placement, resources and byte budget come from [`super::defaults`];
//!   the image from the operator's `--default-image`. The pods run as
//!   non-root with the image's user unless the spec names one, so a
//!   platform that assigns user ids can.
//! * A startup probe holds the liveness probe off while a node starts.
//! * With `spec.persistence`, a claim template `data` mounted at
//!   [`DATA_MOUNT`] holds the node's snapshots (`--data-dir`), with the
//!   spec's retention policy. The node writes its snapshot after it stops
//!   serving, so the in-flight drain (`--shutdown-timeout`) gets only part
//!   of the grace period and the snapshot the rest.
//! * With `spec.tls`, the client and peer ports speak TLS only; the probes
//!   and the preStop hook go to the plain probe port (`spec.tls.probePort`,
//!   health, readiness, metrics and handoff only), so the kubelet needs no
//!   client certificate and no CA.
//! * What the ring decides stays out of the pod template. The replication
//!   factor reaches the nodes in the ring document (a node in cluster mode
//!   reads it from there, not from its flag); in the template, a change of
//!   it would also roll every pod while the ring moves data, and a pod
//!   restarted after the switch to factor 1 would come back empty with no
//!   other copy of its keys.

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy,
    StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::auth::{AUTH_MOUNT, CLIENT_TOKEN_KEY, PEER_TOKEN_KEY, auth_volume, auth_volume_mount};
use super::defaults;
use super::rbac::node_service_account_name;
use super::tls::{tls_env, tls_volume_mounts, tls_volumes};
use super::{child_meta, labels, peer_service_name, ring_configmap_name, selector_labels};
use crate::crd::{BackupSpec, DistroCache};

pub(crate) const CONTAINER_NAME: &str = "cache-node";
/// Where a node's persistent volume is mounted (its `--data-dir`).
pub(crate) const DATA_MOUNT: &str = "/var/lib/distrocache";
/// The claim template's (and so the volume's) name.
pub(crate) const DATA_VOLUME: &str = "data";
/// The group the image runs as; owns the data volume unless the spec
/// names another.
const IMAGE_GROUP: i64 = 65532;

/// The StatefulSet of `dc` at `replicas` pods, with `default_image` where
/// the spec names none.
pub fn statefulset(dc: &DistroCache, replicas: i32, default_image: &str) -> StatefulSet {
    let mut pod_labels = labels(dc, "cache-node");
    if let Some(extra) = &dc.spec.pod_labels {
        for (k, v) in extra {
            pod_labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    StatefulSet {
        metadata: child_meta(dc, dc.name_any(), "cache-node"),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(peer_service_name(dc)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(dc)),
                ..LabelSelector::default()
            },
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    max_unavailable: Some(IntOrString::Int(1)),
                    partition: Some(0),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: dc.spec.pod_annotations.clone(),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(dc, default_image)),
            },
            volume_claim_templates: dc.spec.persistence.enabled.then(|| vec![data_claim(dc)]),
            persistent_volume_claim_retention_policy: dc.spec.persistence.enabled.then(|| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(dc.spec.persistence.when_deleted.clone()),
                    when_scaled: Some(dc.spec.persistence.when_scaled.clone()),
                }
            }),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The claim template of a node's data volume.
fn data_claim(dc: &DistroCache) -> PersistentVolumeClaim {
    let p = &dc.spec.persistence;
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(selector_labels(dc)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: p.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_string(), Quantity(p.size.clone()))].into()),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn pod_spec(dc: &DistroCache, default_image: &str) -> PodSpec {
    let spec = &dc.spec;
    let spread = defaults::topology_spread(dc);
    PodSpec {
        service_account_name: Some(node_service_account_name(dc)),
        termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.clone(),
        affinity: Some(defaults::affinity(dc)),
        topology_spread_constraints: (!spread.is_empty()).then_some(spread),
        priority_class_name: spec.priority_class_name.clone(),
        image_pull_secrets: spec.image_pull_secrets.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: spec.run_as_user,
            run_as_group: spec.run_as_group,
            // The data volume must be writable by the node's group.
            fs_group: spec
                .run_as_group
                .or(spec.persistence.enabled.then_some(IMAGE_GROUP)),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container(dc, default_image)],
        volumes: volumes(dc),
        ..PodSpec::default()
    }
}

fn volumes(dc: &DistroCache) -> Option<Vec<Volume>> {
    let mut volumes = Vec::new();
    if dc.spec.auth.enabled {
        volumes.push(auth_volume(dc));
    }
    if dc.spec.tls.enabled() {
        volumes.extend(tls_volumes(dc));
    }
    (!volumes.is_empty()).then_some(volumes)
}

fn volume_mounts(dc: &DistroCache) -> Option<Vec<VolumeMount>> {
    let mut mounts = Vec::new();
    if dc.spec.auth.enabled {
        mounts.push(auth_volume_mount());
    }
    if dc.spec.tls.enabled() {
        mounts.extend(tls_volume_mounts(dc));
    }
    if dc.spec.persistence.enabled {
        mounts.push(VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_MOUNT.into(),
            ..VolumeMount::default()
        });
    }
    (!mounts.is_empty()).then_some(mounts)
}

fn container(dc: &DistroCache, default_image: &str) -> Container {
    let spec = &dc.spec;
    // Probes and the preStop hook: plain HTTP on the probe port under TLS.
    let probe_port = if spec.tls.enabled() { "probe" } else { "http" };
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::String(probe_port.into()),
        ..HTTPGetAction::default()
    };
    let mut ports = vec![
        ContainerPort {
            name: Some("http".into()),
            container_port: spec.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        },
        ContainerPort {
            name: Some("peer".into()),
            container_port: spec.peer_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        },
    ];
    if spec.tls.enabled() {
        ports.push(ContainerPort {
            name: Some("probe".into()),
            container_port: spec.tls.probe_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }
    // The hook must return before the kubelet's grace period ends.
    let handoff_timeout = (spec.termination_grace_period_seconds - 5).max(1);
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| default_image.to_owned()),
        ),
        image_pull_policy: spec.image_pull_policy.clone(),
        env: Some(env(dc)),
        ports: Some(ports),
        volume_mounts: volume_mounts(dc),
        readiness_probe: Some(Probe {
            http_get: Some(http_get("/api/v1/ready")),
            period_seconds: Some(2),
            timeout_seconds: Some(2),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        // Up to 2 minutes to start listening before liveness takes over.
        startup_probe: Some(Probe {
            http_get: Some(http_get("/api/v1/health")),
            period_seconds: Some(2),
            timeout_seconds: Some(2),
            failure_threshold: Some(60),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http_get("/api/v1/health")),
            period_seconds: Some(10),
            timeout_seconds: Some(3),
            failure_threshold: Some(6),
            ..Probe::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                http_get: Some(http_get(&format!(
                    "/api/v1/cluster/handoff?timeout={handoff_timeout}s"
                ))),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: Some(defaults::resources(dc)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn env(dc: &DistroCache) -> Vec<EnvVar> {
    let spec = &dc.spec;
    let literal = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut env = vec![
        field("DISTROCACHE_NODE_ID", "metadata.name"),
        field("DISTROCACHE_NAMESPACE", "metadata.namespace"),
        literal("DISTROCACHE_MEMBERSHIP_CONFIGMAP", ring_configmap_name(dc)),
        literal("DISTROCACHE_PORT", spec.port.to_string()),
        literal("DISTROCACHE_PEER_PORT", spec.peer_port.to_string()),
        literal("DISTROCACHE_MAX_SIZE", spec.max_size.to_string()),
        literal("DISTROCACHE_DEFAULT_TTL", spec.default_ttl.clone()),
        literal(
            "DISTROCACHE_CLEANUP_INTERVAL",
            spec.cleanup_interval.clone(),
        ),
        literal("DISTROCACHE_LOG_LEVEL", spec.log_level.clone()),
        literal("DISTROCACHE_LOG_FORMAT", "json".into()),
        // On SIGTERM a node first fails its readiness probe and keeps
        // serving for a few seconds, so endpoints and peers move away
        // before its listener closes.
        literal(
            "DISTROCACHE_SHUTDOWN_DELAY",
            format!(
                "{}s",
                (spec.termination_grace_period_seconds / 4).clamp(1, 5)
            ),
        ),
        // In-flight requests get most of the grace period to finish; with
        // persistence, a quarter of it, and the snapshot the rest.
        literal(
            "DISTROCACHE_SHUTDOWN_TIMEOUT",
            format!(
                "{}s",
                if spec.persistence.enabled {
                    (spec.termination_grace_period_seconds / 4).max(1)
                } else {
                    (spec.termination_grace_period_seconds - 2).max(1)
                }
            ),
        ),
    ];
    if spec.persistence.enabled {
        env.push(literal("DISTROCACHE_DATA_DIR", DATA_MOUNT.into()));
        if let Some(interval) = &spec.persistence.snapshot_interval {
            env.push(literal("DISTROCACHE_SNAPSHOT_INTERVAL", interval.clone()));
        }
    }
    if spec.auth.enabled {
        env.push(literal(
            "DISTROCACHE_AUTH_TOKEN_FILE",
            format!("{AUTH_MOUNT}/{CLIENT_TOKEN_KEY}"),
        ));
        env.push(literal(
            "DISTROCACHE_PEER_TOKEN_FILE",
            format!("{AUTH_MOUNT}/{PEER_TOKEN_KEY}"),
        ));
    }
    if spec.tls.enabled() {
        for (name, value) in tls_env(dc) {
            env.push(literal(name, value));
        }
    }
    if let Some(backup) = &spec.backup {
        env.extend(backup_env(backup));
        if let Some(restore) = &spec.restore_from {
            env.push(literal(
                "DISTROCACHE_RESTORE_FROM",
                restore.backup_id.clone(),
            ));
        }
    }
    // validate() refused a limit too small to derive a budget from.
    if let Ok(Some(max_memory)) = defaults::max_memory(spec) {
        env.push(literal("DISTROCACHE_MAX_MEMORY", max_memory));
    }
    env
}

/// Where the nodes back up to, and the credentials from the Secret the
/// spec names (read by the node's S3 client as the standard AWS variables).
fn backup_env(backup: &BackupSpec) -> Vec<EnvVar> {
    let literal = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    let secret = |name: &str, key: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: backup.credentials_secret.clone(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut env = vec![
        literal("DISTROCACHE_BACKUP_URL", backup.url.clone()),
        literal("DISTROCACHE_BACKUP_REGION", backup.region.clone()),
        literal("DISTROCACHE_BACKUP_KEEP", backup.keep.to_string()),
        secret("AWS_ACCESS_KEY_ID", BACKUP_ACCESS_KEY_ID),
        secret("AWS_SECRET_ACCESS_KEY", BACKUP_SECRET_ACCESS_KEY),
    ];
    if let Some(endpoint) = &backup.endpoint {
        env.push(literal("DISTROCACHE_BACKUP_ENDPOINT", endpoint.clone()));
    }
    if let Some(schedule) = &backup.schedule {
        env.push(literal("DISTROCACHE_BACKUP_SCHEDULE", schedule.clone()));
    }
    env
}

/// The keys of `spec.backup.credentialsSecret`.
pub const BACKUP_ACCESS_KEY_ID: &str = "accessKeyId";
pub const BACKUP_SECRET_ACCESS_KEY: &str = "secretAccessKey";

/// The environment as a map, for tests.
#[cfg(test)]
fn env_map(sts: &StatefulSet) -> std::collections::BTreeMap<String, EnvVar> {
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn pods_are_ring_members_configured_from_the_spec() {
        let dc = cache(
            "{maxSize: 500, maxMemory: 64MiB, defaultTTL: 90s, cleanupInterval: 10s, port: 9000, \
              replicationFactor: 3, image: example/cache:1, terminationGracePeriodSeconds: 40}",
        );
        let sts = statefulset(&dc, 4, "default/cache:1");
        assert_owned(&sts.metadata, "orders");
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(4));
        assert_eq!(spec.service_name.as_deref(), Some("orders-peers"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap(),
            &selector_labels(&dc)
        );
        let env = env_map(&sts);
        let field = |n: &str| {
            env[n]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path
                .clone()
        };
        assert_eq!(field("DISTROCACHE_NODE_ID"), "metadata.name");
        assert_eq!(field("DISTROCACHE_NAMESPACE"), "metadata.namespace");
        let value = |n: &str| env[n].value.clone().unwrap();
        assert_eq!(value("DISTROCACHE_MEMBERSHIP_CONFIGMAP"), "orders-ring");
        assert_eq!(value("DISTROCACHE_MAX_SIZE"), "500");
        assert_eq!(value("DISTROCACHE_MAX_MEMORY"), "64MiB");
        assert_eq!(value("DISTROCACHE_DEFAULT_TTL"), "90s");
        assert_eq!(value("DISTROCACHE_CLEANUP_INTERVAL"), "10s");
        assert_eq!(value("DISTROCACHE_PORT"), "9000");

        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("orders-node"));
        assert_eq!(pod.termination_grace_period_seconds, Some(40));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("example/cache:1"));
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 9000);
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/api/v1/ready"));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/api/v1/health"));
        let hook = c
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            hook.path.as_deref(),
            Some("/api/v1/cluster/handoff?timeout=35s")
        );
    }

    #[test]
    fn ring_settings_do_not_restart_pods() {
        // The replication factor and the replica count are ring changes the
        // operator makes step by step; neither may touch the pod template.
        let template = |spec: &str| {
            statefulset(&cache(spec), 3, "default/cache:1")
                .spec
                .unwrap()
                .template
        };
        let base = template("{replicationFactor: 2, replicas: 3}");
        assert_eq!(template("{replicationFactor: 1, replicas: 3}"), base);
        assert_eq!(template("{replicationFactor: 3, replicas: 5}"), base);
        let env = env_map(&statefulset(
            &cache("{replicationFactor: 3}"),
            3,
            "default/cache:1",
        ));
        assert!(
            !env.keys().any(|k| k.contains("REPLICATION")),
            "the node takes the factor from the ring: {:?}",
            env.keys()
        );
    }

    #[test]
    fn backups_point_the_node_at_the_bucket_with_the_secrets_credentials() {
        let env = env_map(&statefulset(&cache("{}"), 1, "x"));
        assert!(
            !env.keys()
                .any(|k| k.contains("BACKUP") || k.starts_with("AWS_"))
        );
        let dc = cache(
            "{backup: {url: s3://backups/orders, endpoint: http://minio.storage:9000, \
              credentialsSecret: s3-creds, schedule: 6h, keep: 3}, \
              restoreFrom: {backupId: scheduled-1764720000}}",
        );
        let env = env_map(&statefulset(&dc, 1, "x"));
        let value = |k: &str| {
            env[k]
                .value
                .clone()
                .unwrap_or_else(|| panic!("{k} is a value"))
        };
        assert_eq!(value("DISTROCACHE_BACKUP_URL"), "s3://backups/orders");
        assert_eq!(
            value("DISTROCACHE_BACKUP_ENDPOINT"),
            "http://minio.storage:9000"
        );
        assert_eq!(value("DISTROCACHE_BACKUP_REGION"), "us-east-1");
        assert_eq!(value("DISTROCACHE_BACKUP_SCHEDULE"), "6h");
        assert_eq!(value("DISTROCACHE_BACKUP_KEEP"), "3");
        assert_eq!(value("DISTROCACHE_RESTORE_FROM"), "scheduled-1764720000");
        for (var, key) in [
            ("AWS_ACCESS_KEY_ID", "accessKeyId"),
            ("AWS_SECRET_ACCESS_KEY", "secretAccessKey"),
        ] {
            let from = env[var].value_from.as_ref().unwrap();
            let secret = from.secret_key_ref.as_ref().unwrap();
            assert_eq!(
                (secret.name.as_str(), secret.key.as_str()),
                ("s3-creds", key)
            );
            assert!(
                env[var].value.is_none(),
                "{var} never in the pod spec as text"
            );
        }
    }

    #[test]
    fn auth_mounts_the_secret_and_points_the_node_at_its_files() {
        let sts = statefulset(&cache("{}"), 1, "default/cache:1");
        assert!(!env_map(&sts).contains_key("DISTROCACHE_AUTH_TOKEN_FILE"));
        let sts = statefulset(
            &cache("{auth: {enabled: true}, peerPort: 7000}"),
            1,
            "default/cache:1",
        );
        let env = env_map(&sts);
        assert_eq!(
            env["DISTROCACHE_AUTH_TOKEN_FILE"].value.as_deref(),
            Some("/etc/distrocache/auth/client-token")
        );
        assert_eq!(
            env["DISTROCACHE_PEER_TOKEN_FILE"].value.as_deref(),
            Some("/etc/distrocache/auth/peer-token")
        );
        assert_eq!(env["DISTROCACHE_PEER_PORT"].value.as_deref(), Some("7000"));
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let volume = &pod.volumes.unwrap()[0];
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("orders-auth")
        );
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/etc/distrocache/auth", Some(true))
        );
        let ports = pod.containers[0].ports.clone().unwrap();
        assert_eq!(ports[1].name.as_deref(), Some("peer"));
        assert_eq!(ports[1].container_port, 7000);
    }

    #[test]
    fn pods_pass_the_restricted_pod_security_standard() {
        let sts = statefulset(&cache("{}"), 3, "default/cache:1");
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    }

    #[test]
    fn placement_knobs_pass_through() {
        let dc = cache(
            "{nodeSelector: {disk: ssd}, tolerations: [{key: dedicated, operator: Exists}], \
              priorityClassName: high, podAnnotations: {restartedAt: '1'}, podLabels: {team: a}, \
              topologySpreadConstraints: [{maxSkew: 1, topologyKey: zone, whenUnsatisfiable: DoNotSchedule}], \
              affinity: {podAntiAffinity: {preferredDuringSchedulingIgnoredDuringExecution: []}}, \
              resources: {limits: {memory: 1Gi}}}",
        );
        let sts = statefulset(&dc, 3, "default/cache:1");
        let template = sts.spec.unwrap().template;
        let meta = template.metadata.unwrap();
        assert_eq!(meta.annotations.unwrap()["restartedAt"], "1");
        assert_eq!(meta.labels.unwrap()["team"], "a");
        let pod = template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(
            pod.topology_spread_constraints.unwrap()[0].topology_key,
            "zone"
        );
        assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
        assert!(
            pod.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .is_some()
        );
    }

    #[test]
    fn defaults_fill_what_the_spec_leaves_unset() {
        let sts = statefulset(&cache("{}"), 3, "registry.example/cache-node:9");
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/cache-node:9"));
        assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
        assert_eq!(
            pod.topology_spread_constraints.unwrap()[0].topology_key,
            defaults::ZONE_KEY
        );
        let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, defaults::DEFAULT_CPU_REQUEST);
        let startup = c.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(startup.path.as_deref(), Some("/api/v1/health"));
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_user, None, "the image's user, or the platform's");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert!(pod.image_pull_secrets.is_none());
        assert!(
            !env_map(&statefulset(&cache("{}"), 1, "x")).contains_key("DISTROCACHE_MAX_MEMORY")
        );

        let sts = statefulset(
            &cache(
                "{image: mine/cache:2, runAsUser: 1000, runAsGroup: 2000, \
                  imagePullSecrets: [{name: regcred}], topologySpreadConstraints: [], \
                  resources: {limits: {memory: 1Gi}}}",
            ),
            3,
            "registry.example/cache-node:9",
        );
        let env = env_map(&sts);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("mine/cache:2"));
        let psc = pod.security_context.unwrap();
        assert_eq!(
            (psc.run_as_user, psc.run_as_group),
            (Some(1000), Some(2000))
        );
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
        assert!(pod.topology_spread_constraints.is_none());
        assert_eq!(
            env["DISTROCACHE_MAX_MEMORY"].value,
            defaults::max_memory(&cache("{resources: {limits: {memory: 1Gi}}}").spec).unwrap()
        );
    }

    #[test]
    fn persistence_adds_a_claim_template_its_retention_and_the_data_dir() {
        let none = statefulset(&cache("{}"), 3, "c:1");
        let spec = none.spec.as_ref().unwrap();
        assert!(spec.volume_claim_templates.is_none());
        assert!(spec.persistent_volume_claim_retention_policy.is_none());
        assert!(!env_map(&none).contains_key("DISTROCACHE_DATA_DIR"));

        let dc = cache(
            "{terminationGracePeriodSeconds: 60, persistence: {enabled: true, size: 5Gi, \
              storageClassName: fast, snapshotInterval: 5m}}",
        );
        let sts = statefulset(&dc, 3, "c:1");
        let spec = sts.spec.as_ref().unwrap();
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(claim.metadata.name.as_deref(), Some(DATA_VOLUME));
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "5Gi"
        );
        let retention = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .unwrap();
        assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
        assert_eq!(retention.when_scaled.as_deref(), Some("Delete"));
        let env = env_map(&sts);
        let value = |n: &str| env[n].value.clone().unwrap();
        assert_eq!(value("DISTROCACHE_DATA_DIR"), DATA_MOUNT);
        assert_eq!(value("DISTROCACHE_SNAPSHOT_INTERVAL"), "5m");
        assert_eq!(
            value("DISTROCACHE_SHUTDOWN_TIMEOUT"),
            "15s",
            "the rest is the snapshot's"
        );
        let pod = spec.template.spec.as_ref().unwrap();
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            (DATA_VOLUME, DATA_MOUNT)
        );
        assert_eq!(
            pod.security_context.as_ref().unwrap().fs_group,
            Some(IMAGE_GROUP)
        );
    }

    #[test]
    fn with_tls_the_nodes_get_both_certificates_and_probe_on_the_plain_port() {
        let plain = statefulset(&cache("{}"), 1, "img");
        let plain_env = env_map(&plain);
        assert!(!plain_env.contains_key("DISTROCACHE_TLS_CERT_FILE"));
        let probe_port = |sts: &StatefulSet| {
            let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let c = &pod.containers[0];
            let port =
                |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().port.clone();
            let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
            let ports = [
                port(&c.readiness_probe),
                port(&c.liveness_probe),
                port(&c.startup_probe),
                pre_stop.http_get.as_ref().unwrap().port.clone(),
            ];
            assert!(ports.iter().all(|p| p == &ports[0]), "{ports:?}");
            ports[0].clone()
        };
        assert_eq!(probe_port(&plain), IntOrString::String("http".into()));

        let dc = cache("{tls: {secretName: orders-cert, probePort: 9100}, auth: {enabled: true}}");
        let sts = statefulset(&dc, 1, "img");
        assert_eq!(probe_port(&sts), IntOrString::String("probe".into()));
        let env = env_map(&sts);
        let value = |n: &str| env[n].value.clone().unwrap();
        assert_eq!(
            value("DISTROCACHE_TLS_CERT_FILE"),
            "/etc/distrocache/tls/tls.crt"
        );
        assert_eq!(
            value("DISTROCACHE_TLS_KEY_FILE"),
            "/etc/distrocache/tls/tls.key"
        );
        assert_eq!(
            value("DISTROCACHE_PEER_TLS_CA_FILE"),
            "/etc/distrocache/peer-tls/ca.crt"
        );
        assert_eq!(
            value("DISTROCACHE_PEER_TLS_DOMAIN"),
            "orders-peers.shop.svc"
        );
        assert_eq!(value("DISTROCACHE_PROBE_PORT"), "9100");
        // Tokens stay, alongside.
        assert!(env.contains_key("DISTROCACHE_AUTH_TOKEN_FILE"));
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        let ports = c.ports.as_ref().unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p.name.as_deref() == Some("probe") && p.container_port == 9100)
        );
        let secrets: Vec<_> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
            .collect();
        assert_eq!(secrets, ["orders-auth", "orders-cert", "orders-cert"]);
        let mounts: Vec<_> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.mount_path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/etc/distrocache/auth", Some(true)),
                ("/etc/distrocache/tls", Some(true)),
                ("/etc/distrocache/peer-tls", Some(true)),
            ]
        );
        // No clients' CA unless one is named.
        assert!(!env.contains_key("DISTROCACHE_TLS_CLIENT_CA_FILE"));
    }

    #[test]
    fn a_clients_ca_is_mounted_and_named_to_the_nodes() {
        let dc =
            cache("{tls: {certManager: {issuerRef: {name: ca}}, clientCaSecretName: clients}}");
        let sts = statefulset(&dc, 1, "img");
        let env = env_map(&sts);
        assert_eq!(
            env["DISTROCACHE_TLS_CLIENT_CA_FILE"].value.as_deref(),
            Some("/etc/distrocache/client-ca/ca.crt")
        );
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "client-ca")
            .expect("the client-ca volume");
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("clients")
        );
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "client-ca")
            .expect("the client-ca mount");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/etc/distrocache/client-ca", Some(true))
        );
    }
}

//! The operator against the real control plane (issue: operator). The CRD,
//! RBAC and operator are installed with `kubectl apply -f manifests/`; the
//! operator runs as the Deployment's pod (the test kubelet runs the
//! workspace's binary with the operator ServiceAccount's token, so its RBAC
//! is the manifests'), and the cache nodes are real `cache-node` processes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{
    self, apply_cache, apply_crd_fixture, cache_yaml, condition, installed, kubectl_ok, wait_ready,
};
use distrocache_tests::{ControlPlane, Kubelet, TestNamespace, wait};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const READY: Duration = Duration::from_secs(120);

fn assert_owned_by(meta: &kube::core::ObjectMeta, dc: &DistroCache) {
    let owner = meta
        .owner_references
        .as_ref()
        .and_then(|o| o.first())
        .unwrap_or_else(|| panic!("{:?} has no owner reference", meta.name));
    assert_eq!(owner.uid, dc.uid().unwrap(), "{:?}", meta.name);
    assert_eq!(owner.kind, "DistroCache");
    assert_eq!(owner.controller, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_gets_every_child_follows_spec_edits_scales_and_is_collected() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-children")
        .await?
        .with_kubelet(kubelet);
    let client = ns.client().await?;
    let n = ns.name();

    let started = Instant::now();
    apply_cache(
        cp,
        n,
        "shop",
        "  replicas: 3\n  maxSize: 5000\n  replicationFactor: 2\n",
    )?;
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), n);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), n);
    let roles: Api<Role> = Api::namespaced(client.clone(), n);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), n);

    // Every child, with an owner reference.
    wait::until("every child of the cache", READY, || {
        let (sts_api, services, configmaps, pdbs, accounts, roles, bindings) = (
            sts_api.clone(),
            services.clone(),
            configmaps.clone(),
            pdbs.clone(),
            accounts.clone(),
            roles.clone(),
            bindings.clone(),
        );
        async move {
            let all = sts_api.get_opt("shop").await?.is_some()
                && services.get_opt("shop").await?.is_some()
                && services.get_opt("shop-peers").await?.is_some()
                && configmaps.get_opt("shop-ring").await?.is_some()
                && pdbs.get_opt("shop").await?.is_some()
                && accounts.get_opt("shop-node").await?.is_some()
                && roles.get_opt("shop-node").await?.is_some()
                && bindings.get_opt("shop-node").await?.is_some();
            Ok(all.then_some(()))
        }
    })
    .await?;
    eprintln!(
        "DistroCache applied -> every child exists: {:.1?}",
        started.elapsed()
    );
    let dc = wait_ready(&client, n, "shop", 3, READY).await?;
    eprintln!(
        "DistroCache applied -> Ready with 3 active members: {:.1?}",
        started.elapsed()
    );

    let sts = sts_api.get("shop").await?;
    assert_owned_by(&sts.metadata, &dc);
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("shop-peers"));
    let env = |sts: &StatefulSet| -> BTreeMap<String, String> {
        sts.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    };
    assert_eq!(env(&sts)["DISTROCACHE_MAX_SIZE"], "5000");
    assert_eq!(env(&sts)["DISTROCACHE_MEMBERSHIP_CONFIGMAP"], "shop-ring");
    for meta in [
        services.get("shop").await?.metadata,
        services.get("shop-peers").await?.metadata,
        configmaps.get("shop-ring").await?.metadata,
        pdbs.get("shop").await?.metadata,
        accounts.get("shop-node").await?.metadata,
        roles.get("shop-node").await?.metadata,
        bindings.get("shop-node").await?.metadata,
    ] {
        assert_owned_by(&meta, &dc);
    }
    let status = dc.status.clone().unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (3, 3));
    assert!(status.selector.contains("app.kubernetes.io/instance=shop"));
    assert_eq!(status.observed_generation, dc.metadata.generation);
    // The ring in the ConfigMap is the one in the status, with pod IPs.
    let ring = configmaps.get("shop-ring").await?.data.unwrap()["ring.json"].clone();
    let doc = distrocache_membership::MembershipDoc::from_json(ring.as_bytes())?;
    assert_eq!(doc.epoch as i64, status.ring_epoch);
    assert!(doc.members.iter().all(|m| m.address.starts_with("127.")));

    // Editing the spec updates the children.
    caches
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"maxSize": 7000, "podDisruptionBudget": {"enabled": false}}}),
            ),
        )
        .await?;
    wait::until(
        "the StatefulSet follows the new maxSize and the PDB goes",
        READY,
        || {
            let (sts_api, pdbs) = (sts_api.clone(), pdbs.clone());
            async move {
                let sts = sts_api.get("shop").await?;
                let ok = env(&sts)["DISTROCACHE_MAX_SIZE"] == "7000"
                    && pdbs.get_opt("shop").await?.is_none();
                Ok(ok.then_some(()))
            }
        },
    )
    .await?;

    // Scaling through the scale subresource.
    kubectl_ok(cp, &["scale", "-n", n, "distrocache/shop", "--replicas=4"])?;
    assert_eq!(caches.get("shop").await?.spec.replicas, 4);
    wait_ready(&client, n, "shop", 4, READY).await?;
    let scale = kubectl_ok(
        cp,
        &[
            "get",
            "-n",
            n,
            "distrocache/shop",
            "-o",
            "jsonpath={.status.replicas} {.status.selector}",
        ],
    )?;
    assert!(scale.starts_with("4 "), "{scale}");

    // Deleting the cache garbage-collects every child.
    caches.delete("shop", &Default::default()).await?;
    wait::until("garbage collection of every child", READY, || {
        let (sts_api, services, configmaps, accounts, roles, bindings) = (
            sts_api.clone(),
            services.clone(),
            configmaps.clone(),
            accounts.clone(),
            roles.clone(),
            bindings.clone(),
        );
        async move {
            let none = sts_api.get_opt("shop").await?.is_none()
                && services.get_opt("shop").await?.is_none()
                && services.get_opt("shop-peers").await?.is_none()
                && configmaps.get_opt("shop-ring").await?.is_none()
                && accounts.get_opt("shop-node").await?.is_none()
                && roles.get_opt("shop-node").await?.is_none()
                && bindings.get_opt("shop-node").await?.is_none();
            Ok(none.then_some(()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_or_reported() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-invalid")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    // The schema refuses what it can express, the cross-field rules (CEL)
    // included, at once and with a message naming the field.
    for (spec, field) in [
        ("  replicationFactor: 0\n", "replicationFactor"),
        ("  replicas: -1\n", "replicas"),
        ("  defaultTTL: soon\n", "defaultTTL"),
        ("  defaultTTL: 1d\n", "defaultTTL"),
        (
            "  defaultTTL: 0s\n",
            "spec.defaultTTL must be longer than zero",
        ),
        (
            "  cleanupInterval: 0m\n",
            "spec.cleanupInterval must be longer than zero",
        ),
        ("  port: 70000\n", "port"),
        ("  maxMemory: lots\n", "maxMemory"),
        (
            "  peerPort: 8080\n",
            "spec.peerPort must differ from spec.port",
        ),
        (
            "  replicas: 3\n  replicationFactor: 1\n  podDisruptionBudget:\n    maxUnavailable: 1\n",
            "spec.podDisruptionBudget.maxUnavailable must be below spec.replicationFactor",
        ),
        (
            "  resources:\n    limits:\n      memory: lots\n",
            "spec.resources: cpu and memory must be quantities",
        ),
        (
            "  resources:\n    limits:\n      memory: 1Gi\n    requests:\n      memory: 2Gi\n",
            "spec.resources.requests must not exceed spec.resources.limits",
        ),
        ("  runAsUser: 0\n", "runAsUser"),
        (
            "  tls:\n    clientCaSecretName: clients\n",
            "spec.tls.clientCaSecretName needs TLS",
        ),
        (
            "  tls:\n    secretName: cert\n    clientCaSecretName: clients\n  \
             monitoring:\n    serviceMonitor:\n      enabled: true\n",
            "spec.monitoring.serviceMonitor.clientCertSecretName is needed",
        ),
    ] {
        let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &cache_yaml(n, "bad", spec))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(stderr.contains(field), "{spec}: {stderr}");
    }
    // What it cannot is reported in a condition, and nothing is created:
    // label syntax (CEL over unbounded maps would exceed the API server's
    // cost budget), and a memory limit too small to derive a byte budget from.
    let client = ns.client().await?;
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    for (name, spec, says) in [
        (
            "labelled",
            "  replicas: 1\n  podLabels:\n    'bad key': x\n",
            "spec.podLabels",
        ),
        (
            "cramped",
            "  replicas: 1\n  resources:\n    limits:\n      memory: 32Mi\n",
            "leaves no room",
        ),
    ] {
        apply_cache(cp, n, name, spec)?;
        wait::until(
            &format!("an InvalidSpec condition on {name}"),
            READY,
            || {
                let caches = caches.clone();
                async move {
                    let dc = caches.get(name).await?;
                    Ok(condition(&dc, "Degraded")
                        .filter(|(s, r, m)| s == "True" && r == "InvalidSpec" && m.contains(says)))
                }
            },
        )
        .await?;
        assert!(sts.get_opt(name).await?.is_none());
    }
    Ok(())
}

/// The safe defaults of a cache's pods are in the StatefulSet the operator
/// writes (the default image from the operator, a preferred anti-affinity
/// on hostname, a spread over zones, resource requests, a startup probe,
/// the image's user, Prometheus admitted by the NetworkPolicy), and a
/// user's value replaces each (a byte budget derived from a memory limit,
/// an image pull secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_defaults_are_written_and_a_users_values_replace_them() -> Result<()> {
    use distrocache_operator::resources::defaults;
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-defaults")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(client.clone(), n);
    let statefulset = |name: &'static str| {
        let sts_api = sts_api.clone();
        async move {
            wait::until(&format!("the StatefulSet {name}"), READY, || {
                let sts_api = sts_api.clone();
                async move { Ok(sts_api.get_opt(name).await?) }
            })
            .await
        }
    };
    let pod_of = |sts: &StatefulSet| {
        sts.spec
            .clone()
            .and_then(|s| s.template.spec)
            .expect("a pod template")
    };
    let env_of = |pod: &k8s_openapi::api::core::v1::PodSpec| -> BTreeMap<String, String> {
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    };
    let scrape_rule = |name: &'static str| {
        let policies = policies.clone();
        async move {
            let policy = wait::until(&format!("the NetworkPolicy {name}"), READY, || {
                let policies = policies.clone();
                async move { Ok(policies.get_opt(name).await?) }
            })
            .await?;
            let rules = policy.spec.and_then(|s| s.ingress).unwrap_or_default();
            assert_eq!(rules.len(), 3, "peers, clients, Prometheus: {rules:?}");
            anyhow::Ok(rules[2].from.clone().unwrap_or_default()[0].clone())
        }
    };

    let monitored = "  monitoring:\n    serviceMonitor:\n      enabled: true\n  networkPolicy:\n    enabled: true\n";
    apply_cache(
        cp,
        n,
        "plain",
        &format!("  replicas: 1\n  replicationFactor: 1\n{monitored}"),
    )?;
    let pod = pod_of(&statefulset("plain").await?);
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/distrocache/cache-node:0.1.0"),
        "the operator's --default-image, from manifests/30-operator.yaml"
    );
    let anti = pod
        .affinity
        .clone()
        .and_then(|a| a.pod_anti_affinity)
        .expect("anti-affinity");
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .expect("preferred")[0];
    assert_eq!(
        term.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    let spread = pod
        .topology_spread_constraints
        .clone()
        .expect("a zone spread");
    assert_eq!(
        (
            spread[0].topology_key.as_str(),
            spread[0].when_unsatisfiable.as_str()
        ),
        ("topology.kubernetes.io/zone", "ScheduleAnyway")
    );
    let requests = c
        .resources
        .clone()
        .and_then(|r| r.requests)
        .expect("requests");
    assert_eq!(requests["cpu"].0, defaults::DEFAULT_CPU_REQUEST);
    assert_eq!(requests["memory"].0, defaults::DEFAULT_MEMORY_REQUEST);
    assert_eq!(
        c.startup_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/api/v1/health")
    );
    let psc = pod
        .security_context
        .clone()
        .expect("a pod security context");
    assert_eq!((psc.run_as_user, psc.run_as_non_root), (None, Some(true)));
    assert!(
        !env_of(&pod).contains_key("DISTROCACHE_MAX_MEMORY"),
        "no limit, no byte cap"
    );
    let prometheus = scrape_rule("plain").await?;
    assert_eq!(
        prometheus
            .namespace_selector
            .and_then(|s| s.match_labels)
            .expect("labels")["kubernetes.io/metadata.name"],
        "monitoring"
    );
    wait_ready(&client, n, "plain", 1, READY).await?;

    // Every default replaced by the user's value.
    let custom = "  replicas: 1\n  replicationFactor: 1\n  image: example.com/cache-node:7\n\
                  \x20 imagePullSecrets:\n  - name: regcred\n  runAsUser: 1000\n  runAsGroup: 3000\n\
                  \x20 affinity: {}\n\
                  \x20 topologySpreadConstraints:\n  - maxSkew: 2\n    topologyKey: rack\n    whenUnsatisfiable: DoNotSchedule\n\
                  \x20 resources:\n    limits:\n      memory: 1Gi\n\
                  \x20 monitoring:\n    serviceMonitor:\n      enabled: true\n    prometheusNamespaceSelector:\n      matchLabels:\n        team: observability\n\
                  \x20 networkPolicy:\n    enabled: true\n";
    apply_cache(cp, n, "custom", custom)?;
    let pod = pod_of(&statefulset("custom").await?);
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("example.com/cache-node:7"));
    assert_eq!(
        pod.image_pull_secrets.clone().expect("pull secrets")[0].name,
        "regcred"
    );
    assert!(
        pod.affinity
            .as_ref()
            .is_none_or(|a| a.pod_anti_affinity.is_none()),
        "{:?}",
        pod.affinity
    );
    let spread = pod
        .topology_spread_constraints
        .clone()
        .expect("the user's spread");
    assert_eq!((spread.len(), spread[0].topology_key.as_str()), (1, "rack"));
    let resources = c.resources.clone().expect("resources");
    assert!(
        resources.requests.is_none(),
        "the user's resources, whole: {resources:?}"
    );
    let psc = pod
        .security_context
        .clone()
        .expect("a pod security context");
    assert_eq!(
        (psc.run_as_user, psc.run_as_group),
        (Some(1000), Some(3000))
    );
    let derived = defaults::budget_under(1024 * 1024 * 1024).expect("1Gi leaves room");
    assert_eq!(
        env_of(&pod).get("DISTROCACHE_MAX_MEMORY"),
        Some(&derived.to_string()),
        "maxMemory derived from the memory limit"
    );
    eprintln!(
        "a 1Gi memory limit gives --max-memory {} MiB",
        derived / (1024 * 1024)
    );
    let prometheus = scrape_rule("custom").await?;
    assert_eq!(
        prometheus
            .namespace_selector
            .and_then(|s| s.match_labels)
            .expect("labels")["team"],
        "observability"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_monitor_appears_once_its_crd_exists() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-monitor")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(
        cp,
        n,
        "watched",
        "  replicas: 1\n  replicationFactor: 1\n  monitoring:\n    serviceMonitor:\n      enabled: true\n",
    )?;
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);
    wait::until(
        "a condition explaining the skipped ServiceMonitor",
        READY,
        || {
            let caches = caches.clone();
            async move {
                let dc = caches.get("watched").await?;
                Ok(condition(&dc, "ServiceMonitor").filter(|(s, r, m)| {
                    s == "False" && r == "CRDNotInstalled" && m.contains("CRD")
                }))
            }
        },
    )
    .await?;

    apply_crd_fixture(
        cp,
        "servicemonitor-crd.yaml",
        "servicemonitors.monitoring.coreos.com",
    )?;
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    );
    let monitors: Api<DynamicObject> = Api::namespaced_with(client.clone(), n, &resource);
    let sm = wait::until("the ServiceMonitor", READY, || {
        let monitors = monitors.clone();
        async move { Ok(monitors.get_opt("watched").await?) }
    })
    .await?;
    let dc = caches.get("watched").await?;
    assert_owned_by(&sm.metadata, &dc);
    assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(sm.data["spec"]["endpoints"][0]["path"], "/metrics");
    // It selects the client Service, which exposes that port.
    let svc: Service = Api::namespaced(client.clone(), n).get("watched").await?;
    let labels = svc.labels();
    for (k, v) in sm.data["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(labels.get(k).map(String::as_str), v.as_str(), "{k}");
    }
    assert_eq!(
        svc.spec.unwrap().ports.unwrap()[0].name.as_deref(),
        Some("http")
    );
    wait::until("the ServiceMonitor condition to turn True", READY, || {
        let caches = caches.clone();
        async move {
            let dc = caches.get("watched").await?;
            Ok(condition(&dc, "ServiceMonitor").filter(|(s, _, _)| s == "True"))
        }
    })
    .await?;
    // The skip was also an Event, once.
    let skipped: Vec<_> = events_of(&client, n, "watched")
        .await?
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ServiceMonitorSkipped"))
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0]
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("CRD")
    );

    // Deleting the cache collects the ServiceMonitor and the PDB too.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), n);
    assert!(pdbs.get_opt("watched").await?.is_some());
    caches.delete("watched", &Default::default()).await?;
    wait::until(
        "garbage collection of the ServiceMonitor and PDB",
        READY,
        || {
            let (monitors, pdbs) = (monitors.clone(), pdbs.clone());
            async move {
                let none = monitors.get_opt("watched").await?.is_none()
                    && pdbs.get_opt("watched").await?.is_none();
                Ok(none.then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// The operator's Events about one cache, oldest first.
async fn events_of(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Vec<k8s_openapi::api::events::v1::Event>> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let mut list: Vec<_> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("DistroCache") && r.name.as_deref() == Some(name)
            })
        })
        .collect();
    list.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
    });
    Ok(list)
}

/// Restarting the operator changes nothing that should not change: no new
/// ring epoch, no new StatefulSet generation, no pod restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_operator_changes_nothing() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-restart")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(
        cp,
        n,
        "calm",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n",
    )?;
    let before = wait_ready(&client, n, "calm", 2, READY).await?;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    let sts_before = sts_api.get("calm").await?;
    let pods_before = distrocache::node_addresses(&client, n, "calm", 8080).await?;

    restart_operator(cp, kubelet).await?;
    // Judged after the new leader has reconciled the cache (counted in its
    // metrics), not after a while: that reconcile is what could change it.
    let leader = wait::until("the new leader to reconcile the cache", READY, || {
        let client = client.clone();
        async move {
            let (leader, count) =
                distrocache::operator_cache_reconciles(&client, n, "calm").await?;
            Ok((count >= 1).then_some(leader))
        }
    })
    .await?;
    let after = wait_ready(&client, n, "calm", 2, READY).await?;
    let sts_after = sts_api.get("calm").await?;
    assert_eq!(
        after.status.as_ref().unwrap().ring_epoch,
        before.status.as_ref().unwrap().ring_epoch
    );
    assert_eq!(
        sts_after.metadata.generation,
        sts_before.metadata.generation
    );
    assert_eq!(
        distrocache::node_addresses(&client, n, "calm", 8080).await?,
        pods_before
    );
    let (still, _) = distrocache::operator_cache_reconciles(&client, n, "calm").await?;
    assert_eq!(still, leader, "the leader changed during the check");
    Ok(())
}

/// Kills the leading operator's process, waits for the kubelet to restart
/// it and for a replica to lead again (the standby, or the restarted
/// process: either carries on).
async fn restart_operator(cp: &ControlPlane, kubelet: &Kubelet) -> Result<()> {
    let client: Client = cp.client().await?;
    let leader = wait::until("an operator replica to lead", READY, || {
        let client = client.clone();
        async move {
            distrocache::operator_leader(
                &client,
                distrocache::OPERATOR_NAMESPACE,
                distrocache::OPERATOR_LEASE,
            )
            .await
        }
    })
    .await?;
    let api: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), distrocache::OPERATOR_NAMESPACE);
    let restarts = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |c| c[0].restart_count)
    };
    let before = restarts(&api.get(&leader.pod).await?);
    kubelet
        .crash(distrocache::OPERATOR_NAMESPACE, &leader.pod)
        .await?;
    wait::until("the operator back after a crash", READY, || {
        let api = api.clone();
        let pod = leader.pod.clone();
        async move {
            let p = api.get(&pod).await?;
            Ok((restarts(&p) > before && distrocache::is_ready(&p)).then_some(()))
        }
    })
    .await?;
    wait::until("a new leader", READY, || {
        let client = client.clone();
        let old = leader.identity.clone();
        async move {
            Ok(distrocache::operator_leader(
                &client,
                distrocache::OPERATOR_NAMESPACE,
                distrocache::OPERATOR_LEASE,
            )
            .await?
            .filter(|l| l.identity != old))
        }
    })
    .await?;
    Ok(())
}

/// Hardening as deployed: in a namespace enforcing the `restricted` Pod
/// Security Standard, a cache with auth and a NetworkPolicy comes up (so its
/// pods pass the standard), the operator generates the token Secret, and the
/// nodes refuse requests without the client token. (No CNI runs here, so the
/// NetworkPolicy is checked as an object, not enforced.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_namespace_runs_a_cache_with_auth_and_a_network_policy() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-restricted")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    kubectl_ok(
        cp,
        &[
            "label",
            "namespace",
            n,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
    )?;
    // The standard really is enforced: a privileged pod is refused.
    let privileged = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: root\n  namespace: {n}\nspec:\n  containers:\n  - name: c\n    image: x\n    securityContext:\n      privileged: true\n"
    );
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &privileged)?;
    assert!(!out.status.success(), "a privileged pod was admitted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("restricted"));

    apply_cache(
        cp,
        n,
        "locked",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n  auth:\n    enabled: true\n  networkPolicy:\n    enabled: true\n",
    )?;
    let client = ns.client().await?;
    wait_ready(&client, n, "locked", 2, READY).await?;

    let secret: k8s_openapi::api::core::v1::Secret = Api::namespaced(client.clone(), n)
        .get("locked-auth")
        .await?;
    let data = secret.data.unwrap_or_default();
    let token = String::from_utf8(data["client-token"].0.clone())?;
    assert_eq!(token.len(), 64);
    assert_ne!(data["client-token"], data["peer-token"]);
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(client.clone(), n);
    let rules = policies.get("locked").await?.spec.unwrap().ingress.unwrap();
    assert_eq!(
        rules.len(),
        2,
        "one rule for the peer port, one for the client port"
    );
    // The operator's namespace is admitted: the one it runs in, as its
    // Deployment tells it through the downward API.
    let admitted: Vec<String> = rules[1]
        .from
        .iter()
        .flatten()
        .filter_map(|peer| {
            let labels = peer.namespace_selector.as_ref()?.match_labels.as_ref()?;
            labels.get("kubernetes.io/metadata.name").cloned()
        })
        .collect();
    assert!(
        admitted.iter().any(|ns| ns == "distrocache-system"),
        "{admitted:?}"
    );

    let nodes = distrocache::node_addresses(&client, n, "locked", 8080).await?;
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/v1/cache/secret-key", nodes[0].1);
    let refused = http.post(&url).json(&json!({"value": 1})).send().await?;
    assert_eq!(refused.status(), 401);
    let stored = http
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({"value": 1}))
        .send()
        .await?;
    assert_eq!(stored.status(), 201);
    // Through the other node (a forward or a local read, both authenticated).
    let read = http
        .get(format!("http://{}/api/v1/cache/secret-key", nodes[1].1))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(read.status(), 200);

    // Deleting the cache collects the generated Secret and the policy.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), n);
    Api::<DistroCache>::namespaced(client.clone(), n)
        .delete("locked", &Default::default())
        .await?;
    wait::until(
        "garbage collection of the Secret and NetworkPolicy",
        READY,
        || {
            let (secrets, policies) = (secrets.clone(), policies.clone());
            async move {
                let none = secrets.get_opt("locked-auth").await?.is_none()
                    && policies.get_opt("locked").await?.is_none();
                Ok(none.then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// Every scale step is one Event, and `kubectl scale` works both ways: up
/// through joining and activation, down through leaving, handoff and
/// removal, the StatefulSet shrinking only at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_up_and_down_with_one_event_per_step() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-steps")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(cp, n, "steps", "  replicas: 1\n  replicationFactor: 2\n")?;
    wait_ready(&client, n, "steps", 1, READY).await?;
    kubectl_ok(cp, &["scale", "-n", n, "distrocache/steps", "--replicas=2"])?;
    wait_ready(&client, n, "steps", 2, READY).await?;
    kubectl_ok(cp, &["scale", "-n", n, "distrocache/steps", "--replicas=1"])?;
    let dc = wait_ready(&client, n, "steps", 1, READY).await?;
    assert_eq!(dc.status.as_ref().unwrap().members[0].pod, "steps-0");
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    wait::until("the StatefulSet shrunk to 1", READY, || {
        let sts_api = sts_api.clone();
        async move {
            let sts = sts_api.get("steps").await?;
            Ok((sts.spec.and_then(|s| s.replicas) == Some(1)).then_some(()))
        }
    })
    .await?;

    let steps: Vec<(String, String)> = events_of(&client, n, "steps")
        .await?
        .into_iter()
        .filter(|e| e.action.as_deref() == Some("Scale"))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect();
    let reasons: Vec<&str> = steps.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "RingCreated",
            "MembersJoining",
            "MembersActive",
            "MembersLeaving",
            "MembersRemoved"
        ],
        "{steps:#?}"
    );
    // Each names its own epoch, one after the other.
    let epochs: Vec<i64> = steps
        .iter()
        .map(|(_, note)| {
            note.rsplit("ring epoch ")
                .next()
                .and_then(|e| e.trim_end_matches(')').parse().ok())
                .unwrap_or(-1)
        })
        .collect();
    let first = epochs[0];
    assert_eq!(epochs, (first..first + 5).collect::<Vec<_>>(), "{steps:#?}");
    assert_eq!(dc.status.unwrap().ring_epoch, first + 4);
    Ok(())
}

/// A running cache whose spec turns invalid keeps running and keeps its
/// status: the members and epoch there are the ring's backup. Losing the
/// ring ConfigMap meanwhile is then survivable: once the spec is fixed, the
/// ring comes back under a newer epoch the nodes accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_keeps_the_ring_of_a_running_cache() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-keep")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(
        cp,
        n,
        "kept",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n",
    )?;
    let before = wait_ready(&client, n, "kept", 2, READY).await?;
    let before = before.status.unwrap();
    let pods_before = distrocache::node_addresses(&client, n, "kept", 8080).await?;

    // The schema accepts this; the operator cannot act on it.
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);
    caches
        .patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podLabels": {"bad key": "x"}}})),
        )
        .await?;
    let invalid = wait::until("an InvalidSpec condition", READY, || {
        let caches = caches.clone();
        async move {
            let dc = caches.get("kept").await?;
            let invalid = condition(&dc, "Degraded")
                .is_some_and(|(s, r, _)| s == "True" && r == "InvalidSpec");
            Ok(invalid.then_some(dc))
        }
    })
    .await?;
    let status = invalid.status.unwrap();
    assert_eq!(status.ring_epoch, before.ring_epoch);
    assert_eq!(
        status
            .members
            .iter()
            .map(|m| (&m.pod, &m.address, &m.state))
            .collect::<Vec<_>>(),
        before
            .members
            .iter()
            .map(|m| (&m.pod, &m.address, &m.state))
            .collect::<Vec<_>>()
    );
    assert_eq!((status.replicas, status.ready_replicas), (2, 2));
    assert_eq!(
        distrocache::node_addresses(&client, n, "kept", 8080).await?,
        pods_before,
        "the pods keep running"
    );

    // The ring ConfigMap goes while nothing may be written.
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    configmaps.delete("kept-ring", &Default::default()).await?;
    caches
        .patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podLabels": null}})),
        )
        .await?;
    let after = wait::until("Ready again on a newer ring epoch", READY, || {
        let client = client.clone();
        let n = n.to_owned();
        async move {
            let dc = wait_ready(&client, &n, "kept", 2, Duration::from_secs(1)).await?;
            let epoch = dc.status.as_ref().unwrap().ring_epoch;
            Ok((epoch > before.ring_epoch).then_some(dc))
        }
    })
    .await?;
    let ring = configmaps.get("kept-ring").await?.data.unwrap()["ring.json"].clone();
    let doc = distrocache_membership::MembershipDoc::from_json(ring.as_bytes())?;
    assert_eq!(doc.epoch as i64, after.status.as_ref().unwrap().ring_epoch);
    assert_eq!(doc.members.len(), 2);
    assert_eq!(
        distrocache::node_addresses(&client, n, "kept", 8080).await?,
        pods_before,
        "no pod was restarted"
    );
    Ok(())
}

/// A replicationFactor change is a ring change, not a pod change: the ring
/// moves to the new factor under a new epoch while every pod keeps running
/// (a rolling restart on top of it could leave a key with no copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_replication_factor_restarts_no_pod() -> Result<()> {
    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-factor")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(
        cp,
        n,
        "factor",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n",
    )?;
    let before = wait_ready(&client, n, "factor", 2, READY).await?;
    let epoch_before = before.status.unwrap().ring_epoch;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    let sts_before = sts_api.get("factor").await?;
    let pods_before = distrocache::node_addresses(&client, n, "factor", 8080).await?;

    let caches: Api<DistroCache> = Api::namespaced(client.clone(), n);
    caches
        .patch(
            "factor",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicationFactor": 1}})),
        )
        .await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    wait::until("Ready on a ring with factor 1", READY, || {
        let (client, configmaps, n) = (client.clone(), configmaps.clone(), n.to_owned());
        async move {
            let dc = wait_ready(&client, &n, "factor", 2, Duration::from_secs(1)).await?;
            let ring = configmaps
                .get("factor-ring")
                .await?
                .data
                .and_then(|mut d| d.remove(distrocache_membership::CONFIGMAP_KEY))
                .ok_or_else(|| anyhow::anyhow!("factor-ring holds no ring document"))?;
            let doc = distrocache_membership::MembershipDoc::from_json(ring.as_bytes())?;
            let moved = doc.replication_factor == 1
                && dc.status.as_ref().unwrap().ring_epoch == doc.epoch as i64
                && doc.epoch as i64 > epoch_before;
            Ok(moved.then_some(()))
        }
    })
    .await?;
    let sts_after = sts_api.get("factor").await?;
    assert_eq!(
        sts_after.metadata.generation, sts_before.metadata.generation,
        "the pod template did not change"
    );
    assert_eq!(
        distrocache::node_addresses(&client, n, "factor", 8080).await?,
        pods_before,
        "no pod was restarted"
    );
    Ok(())
}

/// A steady cache under write traffic is not reconciled in a loop: its
/// status changes with every pass (the members' item counts), and a
/// controller triggered by its own status patches would patch again at
/// once. Only spec changes, children, pods and the resync timer trigger.
/// Counted in events, not seconds: each poke of a pod must cost one
/// reconcile (the operator's per-cache counter), where a loop costs many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_steady_cache_is_not_reconciled_in_a_loop() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Pokes, and the reconciles allowed beyond one per poke (a resync
    /// timer or the writes' first status change may add one or two).
    const POKES: u64 = 10;
    const SLACK: u64 = 3;

    let (cp, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "op-busy")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(
        cp,
        n,
        "busy",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n",
    )?;
    wait_ready(&client, n, "busy", 2, READY).await?;
    let nodes = distrocache::node_addresses(&client, n, "busy", 8080).await?;

    // Writes of new keys, so the item counts keep changing.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let node = nodes[0].1;
        tokio::spawn(async move {
            let http = reqwest::Client::builder().no_proxy().build()?;
            while !stop.load(Ordering::Relaxed) {
                let i = writes.load(Ordering::Relaxed);
                let resp = http
                    .post(format!("http://{node}/api/v1/cache/busy-{i}"))
                    .json(&json!({"value": i}))
                    .send()
                    .await?;
                anyhow::ensure!(resp.status().is_success(), "write: {}", resp.status());
                writes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };
    let reconciles = || distrocache::operator_cache_reconciles(&client, n, "busy");
    let (leader, first) = reconciles().await?;
    let mut last = first;
    for poke in 0..POKES {
        // Each poke lands while the item counts are changing: a write
        // between the previous poke and this one.
        let before = writes.load(Ordering::Relaxed);
        wait::until("a write before the next poke", READY, || async {
            Ok((writes.load(Ordering::Relaxed) > before).then_some(()))
        })
        .await?;
        kubectl_ok(
            cp,
            &[
                "label",
                "--overwrite",
                "pod",
                "-n",
                n,
                "busy-0",
                &format!("poked={poke}"),
            ],
        )?;
        // The poke's reconcile.
        last = wait::until("the poke's reconcile", READY, || async {
            let (now, count) = reconciles().await?;
            anyhow::ensure!(now == leader, "the leader changed: {leader:?} -> {now:?}");
            Ok((count > last).then_some(count))
        })
        .await?;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    let written = writes.load(Ordering::Relaxed);
    let spent = last - first;
    eprintln!("{POKES} pokes under {written} writes cost {spent} reconciles");
    assert!(written >= POKES, "{written} writes under {POKES} pokes");
    assert!(
        spent <= POKES + SLACK,
        "{POKES} pokes cost {spent} reconciles: reconciling in a loop"
    );
    Ok(())
}

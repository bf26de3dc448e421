//! The Helm chart on the real control plane (its own, so the chart's
//! operator is the only one): `helm lint`, `helm template` accepted by the
//! API server's dry run, `helm install` creating the CRD, RBAC and operator
//! Deployment, a DistroCache served by that operator reaching Ready, and
//! `helm upgrade` bringing the CRD back to the chart's version; then what
//! the chart's README says about a CRD that already exists (applied from
//! `manifests/`): `crds.install=false`, and handing it over to the release;
//! values.schema.json refusing bad values; and a release watching a list of
//! namespaces with a Role in each and nothing cluster-wide.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use distrocache_tests::distrocache::{self, apply_cache, kubectl_ok, wait_ready};
use distrocache_tests::{ControlPlane, Kubelet, TestNamespace, wait};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

fn helm_ok(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = cp.helm(args)?;
    ensure!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_an_operator_that_serves_a_cache() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let kubelet = Kubelet::shared().await?;
    let _logs = cp.logs_on_panic();
    distrocache::register_images(kubelet)?;
    let chart = distrocache::workspace_root().join("charts/distrocache");
    let chart = chart.to_str().expect("UTF-8 path");

    let lint = helm_ok(cp, &["lint", "--strict", chart])?;
    ensure!(lint.contains("0 chart(s) failed"), "{lint}");
    // values.schema.json: a bad value fails lint and install, naming it.
    for (value, says) in [
        ("metricsPort=notaport", "metricsPort"),
        ("logFormat=xml", "logFormat"),
        ("replicaCount=0", "replicaCount"),
        ("watchNamespace=a", "watchNamespace"),
        ("resync=soon", "resync"),
    ] {
        let out = cp.helm(["lint", chart, "--set", value])?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!out.status.success(), "helm lint accepted {value}: {text}");
        ensure!(text.contains(says), "helm lint --set {value}: {text}");
    }
    let out = cp.helm([
        "install",
        "bad",
        chart,
        "--namespace",
        "default",
        "--set",
        "logFormat=xml",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("logFormat") && stderr.contains("json"),
        "helm install with logFormat=xml: {stderr}"
    );

    // What `helm template` renders is accepted by the API server as is.
    // --kube-version: the chart needs 1.30+, and `helm template` assumes
    // the Kubernetes version helm was built with; this helm is built from
    // its module without the ldflags that set it, so it would assume 1.20.
    let rendered = helm_ok(
        cp,
        &[
            "template",
            "dc",
            chart,
            "--namespace",
            "default",
            "--kube-version",
            distrocache_tests::binaries::K8S_VERSION,
        ],
    )?;
    let out = cp.kubectl_with_stdin(["apply", "--dry-run=server", "-f", "-"], &rendered)?;
    ensure!(
        out.status.success(),
        "dry run refused the chart: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A fresh namespace gets the operator; the CRD and cluster RBAC with it.
    let ns = TestNamespace::create(cp, "helm")
        .await?
        .with_kubelet(kubelet);
    let release_ns = ns.name().to_owned();
    let started = Instant::now();
    helm_ok(
        cp,
        &[
            "install",
            "dc",
            chart,
            "--namespace",
            &release_ns,
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    eprintln!("helm install --wait: {:.1?}", started.elapsed());
    let client = ns.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get("distrocaches.distrocache.io").await?;
    ensure!(
        crd.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/resource-policy"))
            .map(String::as_str)
            == Some("keep"),
        "the chart's CRD is kept on uninstall"
    );
    Api::<ClusterRole>::all(client.clone())
        .get("dc-distrocache")
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .get("dc-distrocache")
        .await?;
    let deployment: Deployment = Api::namespaced(client.clone(), &release_ns)
        .get("dc-distrocache")
        .await?;
    ensure!(
        deployment.status.and_then(|s| s.ready_replicas) == Some(2),
        "the operator Deployment's two replicas are ready"
    );

    // A cache in the release's namespace, served by the chart's operator.
    apply_cache(
        cp,
        &release_ns,
        "charted",
        "  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n\
         \x20 networkPolicy:\n    enabled: true\n",
    )?;
    let started = Instant::now();
    wait_ready(&client, &release_ns, "charted", 2, Duration::from_secs(120)).await?;
    eprintln!(
        "DistroCache via the chart's operator: Ready in {:.1?}",
        started.elapsed()
    );
    // Its NetworkPolicy admits the namespace the chart's operator runs in,
    // which is the release's, not a fixed default.
    let policy: NetworkPolicy = Api::namespaced(client.clone(), &release_ns)
        .get("charted")
        .await?;
    let admitted: Vec<String> = policy
        .spec
        .and_then(|s| s.ingress)
        .unwrap_or_default()
        .iter()
        .flat_map(|rule| rule.from.iter().flatten())
        .filter_map(|peer| {
            let labels = peer.namespace_selector.as_ref()?.match_labels.as_ref()?;
            labels.get("kubernetes.io/metadata.name").cloned()
        })
        .collect();
    ensure!(
        admitted.iter().all(|ns| ns == &release_ns) && !admitted.is_empty(),
        "the NetworkPolicy admits {admitted:?}, not the operator's namespace {release_ns}"
    );

    // `helm upgrade` manages the CRD: a drifted CRD comes back to the chart's.
    kubectl_ok(
        cp,
        &[
            "patch",
            "crd",
            "distrocaches.distrocache.io",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/names/shortNames"}]"#,
        ],
    )?;
    ensure!(
        crds.get("distrocaches.distrocache.io")
            .await?
            .spec
            .names
            .short_names
            .is_none()
    );
    helm_ok(
        cp,
        &[
            "upgrade",
            "dc",
            chart,
            "--namespace",
            &release_ns,
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    let short = crds
        .get("distrocaches.distrocache.io")
        .await?
        .spec
        .names
        .short_names;
    ensure!(
        short == Some(vec!["dcache".to_string()]),
        "helm upgrade restored the CRD: {short:?}"
    );

    // Uninstalling keeps the CRD (deleting it would delete every cache).
    helm_ok(
        cp,
        &["uninstall", "dc", "--namespace", &release_ns, "--wait"],
    )?;
    ensure!(
        crds.get_opt("distrocaches.distrocache.io").await?.is_some(),
        "helm uninstall deleted the CRD"
    );

    // A CRD from `manifests/`, as with `kubectl apply -f manifests/`.
    kubectl_ok(
        cp,
        &[
            "delete",
            "crd",
            "distrocaches.distrocache.io",
            "--timeout=60s",
        ],
    )?;
    distrocache::kubectl_apply(
        cp,
        &distrocache::workspace_root().join("manifests/10-crd.yaml"),
    )?;
    let install = [
        "install",
        "dc",
        chart,
        "--namespace",
        &release_ns,
        "--wait",
        "--timeout",
        "120s",
    ];
    let refused = cp.helm(install)?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("exists and cannot be imported"),
        "helm install over a CRD it did not create: {stderr}"
    );
    let mut without_crd = install.to_vec();
    without_crd.extend(["--set", "crds.install=false"]);
    helm_ok(cp, &without_crd)?;
    // Handed over as the README says, `helm upgrade` manages it again.
    kubectl_ok(
        cp,
        &[
            "label",
            "crd",
            "distrocaches.distrocache.io",
            "app.kubernetes.io/managed-by=Helm",
        ],
    )?;
    kubectl_ok(
        cp,
        &[
            "annotate",
            "crd",
            "distrocaches.distrocache.io",
            "meta.helm.sh/release-name=dc",
            &format!("meta.helm.sh/release-namespace={release_ns}"),
        ],
    )?;
    helm_ok(
        cp,
        &[
            "upgrade",
            "dc",
            chart,
            "--namespace",
            &release_ns,
            "--set",
            "crds.install=true",
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    let crd = crds.get("distrocaches.distrocache.io").await?;
    ensure!(
        crd.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/resource-policy"))
            .map(String::as_str)
            == Some("keep"),
        "the release now manages the CRD"
    );

    helm_ok(
        cp,
        &["uninstall", "dc", "--namespace", &release_ns, "--wait"],
    )?;
    scoped_release(cp, kubelet, chart, &release_ns).await
}

/// A release watching two namespaces: a Role and RoleBinding in each,
/// nothing cluster-wide, a cache in a watched namespace served (with the
/// chart's cache-node image as the default), one elsewhere left alone.
async fn scoped_release(
    cp: &ControlPlane,
    kubelet: &Kubelet,
    chart: &str,
    release_ns: &str,
) -> Result<()> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let a = TestNamespace::create(cp, "helm-a")
        .await?
        .with_kubelet(kubelet);
    let b = TestNamespace::create(cp, "helm-b")
        .await?
        .with_kubelet(kubelet);
    let other = TestNamespace::create(cp, "helm-other")
        .await?
        .with_kubelet(kubelet);
    let watched = format!("watchNamespaces={{{},{}}}", a.name(), b.name());
    helm_ok(
        cp,
        &[
            "install",
            "scoped",
            chart,
            "--namespace",
            release_ns,
            "--set",
            &watched,
            "--set",
            "crds.install=false",
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    let client = a.client().await?;
    for ns in [a.name(), b.name()] {
        Api::<Role>::namespaced(client.clone(), ns)
            .get("scoped-distrocache")
            .await?;
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .get("scoped-distrocache")
            .await?;
    }
    ensure!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt("scoped-distrocache")
            .await?
            .is_none(),
        "a scoped release grants nothing cluster-wide"
    );
    // The one it must leave alone first, so an operator that (wrongly)
    // watched it would hear of it before the one it serves.
    for ns in [other.name(), a.name()] {
        apply_cache(cp, ns, "scoped", "  replicas: 1\n  replicationFactor: 1\n")?;
    }
    wait_ready(&client, a.name(), "scoped", 1, Duration::from_secs(120)).await?;
    let sts: StatefulSet = Api::namespaced(client.clone(), a.name())
        .get("scoped")
        .await?;
    let image = sts
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers[0].image.clone());
    ensure!(
        image.as_deref() == Some("ghcr.io/distrocache/cache-node:0.1.0"),
        "the chart's cacheNode.image is the operator's default: {image:?}"
    );
    // The cache outside the watched namespaces is not served. Judged on
    // events, not after a while: the leader has reconciled the served cache
    // (created after the other), then once more after a poke of its pod; by
    // then any event about the other cache has long been handled.
    let reconciles = |ns: &str| {
        let (client, ns) = (client.clone(), ns.to_owned());
        async move {
            distrocache::operator_cache_reconciles_at(
                &client,
                release_ns,
                "scoped-distrocache",
                &ns,
                "scoped",
            )
            .await
        }
    };
    let (leader, served) = reconciles(a.name()).await?;
    ensure!(served >= 1, "the served cache was reconciled ({served})");
    kubectl_ok(
        cp,
        &[
            "label",
            "--overwrite",
            "pod",
            "-n",
            a.name(),
            "scoped-0",
            "poked=yes",
        ],
    )?;
    wait::until("the poke's reconcile", Duration::from_secs(60), || async {
        let (now, count) = reconciles(a.name()).await?;
        ensure!(now == leader, "the leader changed: {leader:?} -> {now:?}");
        Ok((count > served).then_some(()))
    })
    .await?;
    let (_, count) = reconciles(other.name()).await?;
    ensure!(
        count == 0,
        "the unwatched cache was reconciled {count} times"
    );
    let untouched =
        Api::<distrocache_operator::crd::DistroCache>::namespaced(client.clone(), other.name())
            .get("scoped")
            .await?;
    ensure!(
        untouched.status.is_none()
            && Api::<StatefulSet>::namespaced(client.clone(), other.name())
                .get_opt("scoped")
                .await?
                .is_none(),
        "a cache outside the watched namespaces was reconciled"
    );
    helm_ok(
        cp,
        &["uninstall", "scoped", "--namespace", release_ns, "--wait"],
    )?;
    Ok(())
}

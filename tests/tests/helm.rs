//! The Helm chart on the real control plane (its own, so the chart's
//! operator is the only one): `helm lint`, `helm template` accepted by the
//! API server's dry run, `helm install` creating the CRD, RBAC and operator
//! Deployment, a DistroCache served by that operator reaching Ready, and
//! `helm upgrade` bringing the CRD back to the chart's version; then what
//! the chart's README says about a CRD that already exists (applied from
//! `manifests/`): `crds.install=false`, and handing it over to the release.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use distrocache_tests::distrocache::{self, kubectl_ok, wait_ready};
use distrocache_tests::{ControlPlane, Kubelet, TestNamespace};
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

    let lint = helm_ok(cp, &["lint", chart])?;
    ensure!(lint.contains("0 chart(s) failed"), "{lint}");

    // What `helm template` renders is accepted by the API server as is.
    let rendered = helm_ok(cp, &["template", "dc", chart, "--namespace", "default"])?;
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
        deployment.status.and_then(|s| s.ready_replicas) == Some(1),
        "the operator Deployment is ready"
    );

    // A cache in the release's namespace, served by the chart's operator.
    let cache = format!(
        "apiVersion: distrocache.io/v1alpha1\nkind: DistroCache\nmetadata:\n  name: charted\n  namespace: {release_ns}\n\
         spec:\n  replicas: 2\n  replicationFactor: 2\n  podDisruptionBudget:\n    enabled: false\n\
         \x20 networkPolicy:\n    enabled: true\n"
    );
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &cache)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        short == Some(vec!["dc".to_string()]),
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
    Ok(())
}

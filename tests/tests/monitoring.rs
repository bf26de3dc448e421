//! Monitoring end to end: with the prometheus-operator ServiceMonitor CRD
//! installed, a cache's ServiceMonitor exists and selects the node Service's
//! metrics port; a real Prometheus (Debian package `prometheus`, started on
//! loopback with a static scrape config of the nodes' addresses) scrapes
//! every node, and `distrocache_items_total` summed over the nodes equals the
//! items written times the replication factor.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{
    self, CacheClient, kubectl_ok, node_addresses, wait_ready, write_items,
};
use distrocache_tests::prometheus::Prometheus;
use distrocache_tests::{ControlPlane, Kubelet, TestNamespace, procs, wait};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

const ITEMS: usize = 3000;

/// A scrape configuration with the nodes as static targets, every second.
fn static_config(targets: &[SocketAddr]) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: distrocache\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_node_through_the_service_monitors_port() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let kubelet = Kubelet::shared().await?;
    let _logs = cp.logs_on_panic();
    distrocache::register_images(kubelet)?;
    distrocache::install(cp).await?;
    distrocache::kubectl_apply(
        cp,
        &distrocache::workspace_root().join("tests/fixtures/servicemonitor-crd.yaml"),
    )?;
    kubectl_ok(
        cp,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
    )?;

    let ns = TestNamespace::create(cp, "monitoring")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    let cache = format!(
        "apiVersion: distrocache.io/v1alpha1\nkind: DistroCache\nmetadata:\n  name: scraped\n  namespace: {n}\n\
         spec:\n  replicas: 3\n  replicationFactor: 2\n  monitoring:\n    serviceMonitor:\n      enabled: true\n      interval: 5s\n"
    );
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &cache)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dc: DistroCache = wait_ready(&client, n, "scraped", 3, Duration::from_secs(120)).await?;

    // The ServiceMonitor selects the client Service and its metrics port.
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    );
    let monitors: Api<DynamicObject> = Api::namespaced_with(client.clone(), n, &resource);
    let sm = wait::until("the ServiceMonitor", Duration::from_secs(60), || {
        let monitors = monitors.clone();
        async move { Ok(monitors.get_opt("scraped").await?) }
    })
    .await?;
    ensure!(
        sm.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == dc.metadata.uid.as_ref())
    );
    let svc: Service = Api::namespaced(client.clone(), n).get("scraped").await?;
    let labels = svc.labels();
    for (k, v) in sm.data["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        ensure!(
            labels.get(k).map(String::as_str) == v.as_str(),
            "the ServiceMonitor selector {k}={v} does not match the Service"
        );
    }
    let port = sm.data["spec"]["endpoints"][0]["port"]
        .as_str()
        .context("the ServiceMonitor's endpoint names no port")?
        .to_owned();
    let svc_port = svc
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.into_iter().find(|p| p.name.as_deref() == Some(&port)));
    ensure!(svc_port.is_some(), "the Service has no port named {port:?}");
    ensure!(sm.data["spec"]["endpoints"][0]["path"] == "/metrics");

    // Write through the nodes, then let a real Prometheus scrape them.
    let nodes: Vec<SocketAddr> = node_addresses(&client, n, "scraped", 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    ensure!(nodes.len() == 3);
    write_items(&CacheClient::default(), &nodes, 0..ITEMS, |_| {
        vec!["m".into()]
    })
    .await?;
    let prometheus_dir = tempfile::tempdir()?;
    let prometheus = Prometheus::start(
        prometheus_dir.path(),
        &static_config(&nodes),
        procs::free_port()?,
    )
    .await?;
    let expected = (ITEMS * 2) as f64;
    let (sum, evicted) = wait::until(
        "Prometheus to see every item on every node",
        Duration::from_secs(60),
        || {
            let prometheus = &prometheus;
            async move {
                let up = prometheus.query("up{job=\"distrocache\"} == 1").await?;
                if up.len() != 3 {
                    return Ok(None);
                }
                let value = |r: &[Value]| {
                    r.first()
                        .and_then(|v| v["value"][1].as_str())
                        .and_then(|v| v.parse::<f64>().ok())
                };
                let sum = value(&prometheus.query("sum(distrocache_items_total)").await?);
                // Every node exports the counter (0 until it evicts): an
                // empty answer means Prometheus has not scraped it yet.
                let Some(evicted) =
                    value(&prometheus.query("sum(distrocache_evictions_total)").await?)
                else {
                    return Ok(None);
                };
                Ok(sum
                    .filter(|&s| s == expected - evicted)
                    .map(|s| (s, evicted)))
            }
        },
    )
    .await?;
    eprintln!(
        "Prometheus: 3 of 3 nodes up; sum(distrocache_items_total) = {sum} = {ITEMS} items x rf 2 - {evicted} evicted"
    );
    Ok(())
}

//! Monitoring end to end: with the prometheus-operator ServiceMonitor CRD
//! installed, a cache's ServiceMonitor exists and selects the node Service's
//! metrics port; a real Prometheus (Debian package `prometheus`, started on
//! loopback with a static scrape config of the nodes' addresses) scrapes
//! every node, and `distrocache_items_total` summed over the nodes equals the
//! items written times the replication factor. With the same Prometheus
//! (also scraping both operator replicas), every query and variable of the
//! Grafana dashboard and every alert expression is valid and every metric
//! selector in it returns data for this cache.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use distrocache_operator::crd::DistroCache;
use distrocache_tests::dashboards;
use distrocache_tests::distrocache::{
    self, CacheClient, apply_cache, apply_crd_fixture, installed, node_addresses, wait_ready,
    write_items,
};
use distrocache_tests::prometheus::Prometheus;
use distrocache_tests::{ControlPlane, TestNamespace, procs, wait};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;

const ITEMS: usize = 3000;

/// A scrape configuration with the nodes and the operator replicas as
/// static targets, every second. Each target carries the labels a
/// ServiceMonitor's would (`namespace`, `service`, `pod`), which the
/// dashboard and the alerts select on; the operator is scraped with
/// `honor_labels`, as the chart's ServiceMonitor does.
fn static_config(
    namespace: &str,
    service: &str,
    nodes: &[(String, SocketAddr)],
    operators: &[(String, SocketAddr)],
) -> String {
    let group = |ns: &str, service: &str, (pod, addr): &(String, SocketAddr)| {
        format!(
            "      - targets: ['{addr}']\n        labels: {{namespace: '{ns}', service: '{service}', pod: '{pod}'}}\n"
        )
    };
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: distrocache\n    static_configs:\n",
    );
    for node in nodes {
        config.push_str(&group(namespace, service, node));
    }
    config.push_str(
        "  - job_name: distrocache-operator\n    honor_labels: true\n    static_configs:\n",
    );
    for operator in operators {
        config.push_str(&group(
            distrocache::OPERATOR_NAMESPACE,
            "distrocache-operator",
            operator,
        ));
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_node_through_the_service_monitors_port() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.logs_on_panic();
    let (_, kubelet) = installed().await?;
    apply_crd_fixture(
        cp,
        "servicemonitor-crd.yaml",
        "servicemonitors.monitoring.coreos.com",
    )?;

    let ns = TestNamespace::create(cp, "monitoring")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(
        cp,
        n,
        "scraped",
        "  replicas: 3\n  replicationFactor: 2\n  monitoring:\n    serviceMonitor:\n      enabled: true\n      interval: 5s\n",
    )?;
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
    let named_nodes = node_addresses(&client, n, "scraped", 8080).await?;
    let nodes: Vec<SocketAddr> = named_nodes.iter().map(|(_, a)| *a).collect();
    ensure!(nodes.len() == 3);
    let operators = operator_addresses(&client).await?;
    ensure!(operators.len() == distrocache::OPERATOR_REPLICAS);
    write_items(&CacheClient::default(), &nodes, 0..ITEMS, |_| {
        vec!["m".into()]
    })
    .await?;
    let prometheus_dir = tempfile::tempdir()?;
    let prometheus = Prometheus::start(
        prometheus_dir.path(),
        &static_config(n, "scraped", &named_nodes, &operators),
        procs::free_port()?,
    )
    .await?;
    // Reads that hit and miss, a delete and a tag invalidation, so every
    // operation has been through the store.
    let http = CacheClient::default();
    for (i, node) in nodes.iter().enumerate() {
        let (status, _) = http
            .get_json(*node, &format!("/api/v1/cache/key-{i}"))
            .await?;
        ensure!(status == 200 || status == 404, "GET answered {status}");
        let (status, _) = http.get_json(*node, "/api/v1/cache/never-written").await?;
        ensure!(status == 404, "GET of an unwritten key answered {status}");
    }
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

    let checked = dashboards_and_alerts_return_data(&prometheus, n, "scraped").await?;
    eprintln!("Prometheus: {checked}");
    Ok(())
}

/// The operator replicas' metrics addresses (pod IP, metrics port 8081).
async fn operator_addresses(client: &kube::Client) -> Result<Vec<(String, SocketAddr)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), distrocache::OPERATOR_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(distrocache::OPERATOR_SELECTOR))
        .await?;
    let mut out = Vec::new();
    for pod in list.items {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .with_context(|| format!("operator pod {} has no IP", pod.name_any()))?;
        out.push((pod.name_any(), SocketAddr::new(ip.parse()?, 8081)));
    }
    Ok(out)
}

/// Evaluates every dashboard variable and query (for this cache) and every
/// alert expression, and every metric selector inside each: all must be
/// valid, and each query and selector must return data (waiting, with a
/// deadline, for the rates to have two samples). An alert expression itself
/// is empty while the cache is healthy, so for alerts the selectors are
/// what must have data.
async fn dashboards_and_alerts_return_data(
    prometheus: &Prometheus,
    namespace: &str,
    cache: &str,
) -> Result<String> {
    let dashboard = dashboards::dashboard()?;
    let non_empty = |what: String, promql: String| async move {
        wait::until(&what.clone(), Duration::from_secs(60), || {
            let promql = promql.clone();
            async move {
                let result = prometheus
                    .query(&promql)
                    .await
                    .with_context(|| format!("evaluate {promql}"))?;
                Ok((!result.is_empty()).then_some(result))
            }
        })
        .await
    };

    for var in dashboards::variables(&dashboard)? {
        let selector = dashboards::substitute(&var.selector, namespace, cache);
        let result = non_empty(format!("variable ${} to have values", var.name), selector).await?;
        let expected = if var.name == "namespace" {
            namespace
        } else {
            cache
        };
        ensure!(
            result
                .iter()
                .any(|r| r["metric"][var.label.as_str()] == expected),
            "variable ${}: no series with {}={expected:?}",
            var.name,
            var.label
        );
    }

    let queries = dashboards::panel_queries(&dashboard)?;
    let mut selectors = std::collections::BTreeSet::new();
    for q in &queries {
        let promql = dashboards::substitute(&q.expr, namespace, cache);
        for selector in dashboards::selectors(&promql)? {
            selectors.insert(selector);
        }
        non_empty(
            format!("panel {:?}: {promql} to return data", q.panel),
            promql,
        )
        .await?;
    }

    let alerts = dashboards::alerts()?;
    for alert in &alerts {
        // Valid PromQL on this Prometheus (an empty answer is fine: the
        // cache is healthy).
        prometheus
            .query(&alert.expr)
            .await
            .with_context(|| format!("alert {}: evaluate {}", alert.name, alert.expr))?;
        for selector in dashboards::selectors(&alert.expr)? {
            selectors.insert(selector);
        }
    }
    for selector in &selectors {
        non_empty(format!("{selector} to return data"), selector.clone()).await?;
    }
    Ok(format!(
        "{} dashboard queries, {} alert expressions and {} metric selectors all return data",
        queries.len(),
        alerts.len(),
        selectors.len()
    ))
}

//! The playground's optional Prometheus: started with a file-based service
//! discovery whose targets file this module keeps up to date from the pods
//! (every cache node's client port and the operator's metrics port), so the
//! targets follow `kubectl scale`. Debian's `prometheus` package is built
//! without Kubernetes service discovery, which is why the playground does the
//! discovering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use distrocache_tests::prometheus::Prometheus;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

/// How often the targets are listed again.
const REFRESH: Duration = Duration::from_secs(2);
/// The pods scraped: their `app.kubernetes.io/name` and the port name scraped.
const SCRAPED: [(&str, &str); 2] = [
    ("distrocache", "http"),
    ("distrocache-operator", "http-metrics"),
];

/// Prometheus and the task that keeps its targets current.
pub struct Monitoring {
    pub prometheus: Prometheus,
    targets: tokio::task::JoinHandle<()>,
}

impl Monitoring {
    /// Starts Prometheus on 127.0.0.1:`port` with its files in `dir`.
    pub async fn start(dir: &Path, port: u16, client: Client) -> Result<Monitoring> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let targets_file = dir.join("targets.json");
        // The first list before Prometheus starts, so its first scrape finds
        // the operator already.
        write_targets(&targets_file, &targets(&client).await?)?;
        let prometheus = Prometheus::start(dir, &config(&targets_file), port).await?;
        let targets = tokio::spawn(keep_targets(client, targets_file));
        Ok(Monitoring {
            prometheus,
            targets,
        })
    }

    pub fn stop(self) {
        self.targets.abort();
        self.prometheus.stop();
    }
}

fn config(targets_file: &Path) -> String {
    format!(
        "global:\n  scrape_interval: 5s\n  scrape_timeout: 4s\nscrape_configs:\n  \
         - job_name: distrocache\n    file_sd_configs:\n      - files: ['{}']\n        \
         refresh_interval: 5s\n",
        targets_file.display()
    )
}

/// Lists the targets every [`REFRESH`] and rewrites the file when they change.
async fn keep_targets(client: Client, file: PathBuf) {
    let mut last = None;
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(REFRESH).await;
        match targets(&client).await {
            Ok(targets) if Some(&targets) != last.as_ref() => {
                match write_targets(&file, &targets) {
                    Ok(()) => last = Some(targets),
                    Err(e) => report(&mut last_error, format!("{e:#}")),
                }
            }
            Ok(_) => {}
            Err(e) => report(&mut last_error, format!("{e:#}")),
        }
    }
}

/// Prints an error once, not every two seconds.
fn report(last: &mut String, error: String) {
    if *last != error {
        eprintln!("warning: updating Prometheus' targets: {error}");
        *last = error;
    }
}

/// The file_sd document: one group per pod, labelled with its namespace and name.
async fn targets(client: &Client) -> Result<Value> {
    let pods: Api<Pod> = Api::all(client.clone());
    let names: Vec<&str> = SCRAPED.iter().map(|(name, _)| *name).collect();
    let selector = format!("app.kubernetes.io/name in ({})", names.join(","));
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .context("list the pods to scrape")?;
    let mut groups = BTreeMap::new();
    for pod in &list.items {
        if let Some(target) = target(pod) {
            let labels = json!({
                "namespace": pod.namespace().unwrap_or_default(),
                "pod": pod.name_any(),
            });
            groups.insert(
                pod.name_any(),
                json!({"targets": [target], "labels": labels}),
            );
        }
    }
    Ok(Value::Array(groups.into_values().collect()))
}

/// `ip:port` of a running pod's scraped port, if it has one yet.
fn target(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let app = pod.labels().get("app.kubernetes.io/name")?;
    let (_, port_name) = SCRAPED.iter().find(|(name, _)| name == app)?;
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?;
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port_name))?
        .container_port;
    Some(format!("{ip}:{port}"))
}

/// Replaces the file in one rename, so Prometheus never reads half of it.
fn write_targets(file: &Path, targets: &Value) -> Result<()> {
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(targets)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("rename to {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(app: &str, ip: Option<&str>, port: (&str, i32)) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app.kubernetes.io/name": app}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "other", "containerPort": 1},
                {"name": port.0, "containerPort": port.1},
            ]}]},
            "status": {"podIP": ip},
        }))
        .expect("a pod")
    }

    #[test]
    fn nodes_and_the_operator_are_scraped_on_their_metrics_ports() {
        assert_eq!(
            target(&pod("distrocache", Some("127.0.100.11"), ("http", 8080))).as_deref(),
            Some("127.0.100.11:8080")
        );
        assert_eq!(
            target(&pod(
                "distrocache-operator",
                Some("127.0.100.10"),
                ("http-metrics", 8081)
            ))
            .as_deref(),
            Some("127.0.100.10:8081")
        );
        assert_eq!(target(&pod("distrocache", None, ("http", 8080))), None);
        assert_eq!(
            target(&pod("other", Some("127.0.100.12"), ("http", 80))),
            None
        );
    }
}

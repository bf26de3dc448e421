//! DistroCache itself on the test control plane: where the workspace's
//! binaries are, the images the test kubelet maps to them, installing the
//! CRD and operator from `manifests/`, waiting for a cache to be Ready, and
//! a small REST client for talking to the cache nodes on their pod IPs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use distrocache_operator::crd::DistroCache;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::control_plane::ControlPlane;
use crate::kubelet::{Kubelet, Program};
use crate::wait;

/// The images the manifests and the operator use (any tag).
pub(crate) const NODE_IMAGE: &str = "ghcr.io/distrocache/cache-node";
pub(crate) const OPERATOR_IMAGE: &str = "ghcr.io/distrocache/operator";
/// Where `manifests/` installs the operator, its replicas (which elect a
/// leader) and their Lease.
pub const OPERATOR_NAMESPACE: &str = "distrocache-system";
pub const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=distrocache-operator";
pub const OPERATOR_REPLICAS: usize = 2;
pub const OPERATOR_LEASE: &str = "distrocache-operator";

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// A binary of this workspace (`cache-node`, `distrocache-operator`), built
/// by `cargo build --workspace --bins` (the README's test command does that
/// before the tests). `DISTROCACHE_BIN_DIR` overrides the directory.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("DISTROCACHE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("debug"),
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing; build it first with `cargo build --workspace --bins` \
             (bash scripts/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// Maps the node and operator images to the workspace's binaries, each
/// listening on its pod IP.
pub fn register_images(kubelet: &Kubelet) -> Result<()> {
    kubelet.add_image(
        NODE_IMAGE,
        Program::new(workspace_bin("cache-node")?).env("DISTROCACHE_BIND_ADDRESS", "{podIP}"),
    );
    kubelet.add_image(
        OPERATOR_IMAGE,
        Program::new(workspace_bin("distrocache-operator")?)
            .env("DISTROCACHE_OPERATOR_BIND_ADDRESS", "{podIP}"),
    );
    Ok(())
}

/// `kubectl apply -f <path>`, failing with kubectl's output.
pub fn kubectl_apply(cp: &ControlPlane, path: &Path) -> Result<String> {
    kubectl_ok(cp, &["apply", "-f", &path.display().to_string()])
}

/// Applies the CRD in `tests/fixtures/<file>` (a third party's, such as
/// prometheus-operator's ServiceMonitor) and waits until `crd` (its
/// `<plural>.<group>` name) is established, so objects of it can be created.
pub fn apply_crd_fixture(cp: &ControlPlane, file: &str, crd: &str) -> Result<()> {
    let path = workspace_root().join("tests/fixtures").join(file);
    // Tests of one binary share its control plane and may apply the same
    // fixture at once: kubectl's create then loses to the other's and says
    // AlreadyExists. Applied again, it finds the CRD and patches it.
    if let Err(e) = kubectl_apply(cp, &path) {
        if !format!("{e:#}").contains("AlreadyExists") {
            return Err(e);
        }
        kubectl_apply(cp, &path)?;
    }
    kubectl_ok(
        cp,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ],
    )?;
    Ok(())
}

/// Runs kubectl and returns its stdout, or fails with its stderr.
pub fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = cp.kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl apply -f manifests/`, then waits for the CRD to be established,
/// the operator's pods to be ready and one of them to lead.
pub async fn install(cp: &ControlPlane) -> Result<()> {
    kubectl_apply(cp, &workspace_root().join("manifests"))?;
    kubectl_ok(
        cp,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/distrocaches.distrocache.io",
        ],
    )?;
    let client = cp.client().await?;
    wait_pods_ready(
        &client,
        OPERATOR_NAMESPACE,
        OPERATOR_SELECTOR,
        OPERATOR_REPLICAS,
        Duration::from_secs(90),
    )
    .await
    .context("the operator's pods did not become ready")?;
    wait::until(
        "an operator replica to lead",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move { operator_leader(&client, OPERATOR_NAMESPACE, OPERATOR_LEASE).await }
        },
    )
    .await?;
    Ok(())
}

/// The shared control plane and kubelet with DistroCache installed once per
/// test binary: the first caller registers the images ([`register_images`])
/// and installs `manifests/` ([`install`]), later callers get the same pair.
/// An install that failed is tried again by the next caller.
pub async fn installed() -> Result<(&'static ControlPlane, &'static Kubelet)> {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    let cp = ControlPlane::shared().await?;
    let kubelet = Kubelet::shared().await?;
    INSTALLED
        .get_or_try_init(|| async {
            register_images(kubelet)?;
            let started = Instant::now();
            install(cp).await?;
            eprintln!(
                "kubectl apply -f manifests/ to a ready operator: {:.1?}",
                started.elapsed()
            );
            anyhow::Ok(())
        })
        .await?;
    Ok((cp, kubelet))
}

/// The YAML of the DistroCache `ns/name`; `spec` is its spec's lines, each
/// indented two spaces (under `spec:`) and ending in a newline.
pub fn cache_yaml(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: distrocache.io/v1alpha1\nkind: DistroCache\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

/// `kubectl apply -f -` of [`cache_yaml`], failing with kubectl's stderr.
/// (A test expecting the apply to fail runs kubectl itself, to look at
/// that stderr.)
pub fn apply_cache(cp: &ControlPlane, ns: &str, name: &str, spec: &str) -> Result<()> {
    let out = cp.kubectl_with_stdin(["apply", "-f", "-"], &cache_yaml(ns, name, spec))?;
    ensure!(
        out.status.success(),
        "kubectl apply of DistroCache {ns}/{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Who holds an operator Lease: its pod and the holder identity (a process
/// of that pod), or `None` while nobody does.
pub async fn operator_leader(
    client: &Client,
    namespace: &str,
    lease: &str,
) -> Result<Option<Leader>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), namespace);
    let Some(lease) = leases.get_opt(lease).await? else {
        return Ok(None);
    };
    let Some(identity) = lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
    else {
        return Ok(None);
    };
    // The operator's identity is `<pod name>-<random suffix>`.
    let pod = identity
        .rsplit_once('-')
        .map(|(pod, _)| pod.to_owned())
        .with_context(|| format!("holder identity {identity:?} names no pod"))?;
    Ok(Some(Leader { pod, identity }))
}

/// How many times the leading operator process has reconciled the cache
/// `ns/name` (its `distrocache_operator_cache_reconciles_total`; 0 before
/// the first), and which process that is: the count is per process, so a
/// change of leader restarts it.
pub async fn operator_cache_reconciles(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<(Leader, u64)> {
    operator_cache_reconciles_at(client, OPERATOR_NAMESPACE, OPERATOR_LEASE, ns, name).await
}

/// [`operator_cache_reconciles`] for an operator installed elsewhere (a
/// Helm release): the namespace it runs in and its Lease.
pub async fn operator_cache_reconciles_at(
    client: &Client,
    operator_namespace: &str,
    lease: &str,
    ns: &str,
    name: &str,
) -> Result<(Leader, u64)> {
    let leader = operator_leader(client, operator_namespace, lease)
        .await?
        .context("no operator replica leads")?;
    let pod = Api::<Pod>::namespaced(client.clone(), operator_namespace)
        .get(&leader.pod)
        .await?;
    let ip: std::net::IpAddr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .with_context(|| format!("the leading operator pod {} has no IP", leader.pod))?
        .parse()?;
    let metrics = CacheClient::default()
        .text(SocketAddr::new(ip, OPERATOR_PORT), "/metrics")
        .await?;
    if !metrics.contains("distrocache_operator_reconciles_total") {
        bail!("{ip}:{OPERATOR_PORT}/metrics holds no operator metrics: {metrics:.200}");
    }
    let (want_ns, want_name) = (format!("namespace=\"{ns}\""), format!("name=\"{name}\""));
    let count = metrics
        .lines()
        .filter(|l| l.starts_with("distrocache_operator_cache_reconciles_total{"))
        .filter(|l| l.contains(&want_ns) && l.contains(&want_name))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("a sample without a value: {l}"))
        })
        .sum::<Result<f64>>()?;
    Ok((leader, count as u64))
}

/// The port of the operator's /metrics (its default).
pub(crate) const OPERATOR_PORT: u16 = 8081;

/// The holder of an operator Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub pod: String,
    pub identity: String,
}

/// Waits until `n` pods matching `selector` in `ns` are ready.
pub async fn wait_pods_ready(
    client: &Client,
    ns: &str,
    selector: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait::until(
        &format!("{n} ready pods {selector} in {ns}"),
        timeout,
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default().labels(selector)).await?;
                let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
                Ok((ready.len() == n).then_some(ready))
            }
        },
    )
    .await
}

/// Waits (failing at `timeout`) until pod `name` has restarted its
/// container at least once and is ready again: the end of a kill -9.
pub async fn wait_restarted(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait::until(&format!("{ns}/{name} restarted and ready"), timeout, || {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .map_or(0, |c| c.restart_count);
            Ok((restarts >= 1 && is_ready(&p)).then_some(()))
        }
    })
    .await
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status condition `type_` of a cache, if set.
pub fn condition(dc: &DistroCache, type_: &str) -> Option<(String, String, String)> {
    dc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the cache reports Ready with `replicas` active members.
pub async fn wait_ready(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: usize,
    timeout: Duration,
) -> Result<DistroCache> {
    let caches: Api<DistroCache> = Api::namespaced(client.clone(), ns);
    wait::until(
        &format!("DistroCache {ns}/{name} Ready with {replicas} active members"),
        timeout,
        || {
            let caches = caches.clone();
            async move {
                let dc = caches.get(name).await?;
                let ready = condition(&dc, "Ready").is_some_and(|(s, _, _)| s == "True");
                let status = dc.status.clone().unwrap_or_default();
                let active = status
                    .members
                    .iter()
                    .filter(|m| m.state == "active")
                    .count();
                if ready && active == replicas && status.members.len() == replicas {
                    Ok(Some(dc))
                } else {
                    bail!(
                        "ready={ready} members={:?} conditions={:?}",
                        status
                            .members
                            .iter()
                            .map(|m| format!("{}:{}", m.pod, m.state))
                            .collect::<Vec<_>>(),
                        status
                            .conditions
                            .iter()
                            .map(|c| format!(
                                "{}={} {}: {}",
                                c.type_, c.status, c.reason, c.message
                            ))
                            .collect::<Vec<_>>()
                    )
                }
            }
        },
    )
    .await
}

/// The REST addresses of a cache's node pods that have an IP, by pod name.
pub async fn node_addresses(
    client: &Client,
    ns: &str,
    name: &str,
    port: u16,
) -> Result<Vec<(String, SocketAddr)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={name},app.kubernetes.io/name=distrocache"
        )))
        .await?;
    let mut out: Vec<(String, SocketAddr)> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
            Some((p.name_any(), SocketAddr::new(ip, port)))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A REST client for cache nodes (loopback pod IPs only).
#[derive(Clone)]
pub struct CacheClient {
    http: reqwest::Client,
    /// The peer protocol's client, for what only it can tell (which node
    /// holds which copy).
    peers: std::sync::Arc<cache_node::peer::PeerClient>,
}

impl Default for CacheClient {
    fn default() -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(64)
                .no_proxy()
                .build()
                .expect("a plain HTTP client always builds"),
            peers: std::sync::Arc::new(cache_node::peer::PeerClient::new(
                "e2e-test",
                cache_node::peer::PeerSettings {
                    connect_timeout: Duration::from_secs(2),
                    request_timeout: Duration::from_secs(10),
                    max_message_bytes: 8 << 20,
                },
                None,
            )),
        }
    }
}

impl CacheClient {
    fn url(addr: SocketAddr, path: &str) -> Result<String> {
        if !addr.ip().is_loopback() {
            bail!("refusing to send traffic outside 127.0.0.0/8: {addr}");
        }
        Ok(format!("http://{addr}{path}"))
    }

    pub async fn get_json(&self, addr: SocketAddr, path: &str) -> Result<(u16, Value)> {
        let resp = self.http.get(Self::url(addr, path)?).send().await?;
        Self::json_answer(resp).await
    }

    /// The status and JSON body of an answer. Every answer of a node is
    /// JSON, errors included (DESIGN 2.1): a body that is not is an error,
    /// not a `null` that a check could mistake for "nothing there".
    async fn json_answer(resp: reqwest::Response) -> Result<(u16, Value)> {
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        let value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "a {status} answer that is not JSON: {:.200}",
                String::from_utf8_lossy(&body)
            )
        })?;
        Ok((status, value))
    }

    pub async fn post_json(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &Value,
    ) -> Result<(u16, Value)> {
        let resp = self
            .http
            .post(Self::url(addr, path)?)
            .json(body)
            .send()
            .await?;
        Self::json_answer(resp).await
    }

    /// A DELETE; the status.
    pub async fn delete(&self, addr: SocketAddr, path: &str) -> Result<u16> {
        let resp = self.http.delete(Self::url(addr, path)?).send().await?;
        Ok(resp.status().as_u16())
    }

    pub async fn text(&self, addr: SocketAddr, path: &str) -> Result<String> {
        Ok(self
            .http
            .get(Self::url(addr, path)?)
            .send()
            .await?
            .text()
            .await?)
    }
}

/// What a test wrote: key -> the value it expects to read back.
pub type Written = BTreeMap<String, Value>;

/// Writes `keys` through nodes picked round-robin, 32 at a time, each with
/// a TTL of 30 to 90 minutes and the tags `tag_of(i)`; every write must be
/// answered 200 or 201.
pub async fn write_items(
    client: &CacheClient,
    nodes: &[SocketAddr],
    keys: std::ops::Range<usize>,
    tag_of: impl Fn(usize) -> Vec<String>,
) -> Result<Written> {
    use futures::StreamExt;
    if nodes.is_empty() {
        bail!("no node to write through");
    }
    let writes = futures::stream::iter(keys.map(|i| {
        let node = nodes[i % nodes.len()];
        let key = format!("item:{i}");
        let value = serde_json::json!({"n": i, "body": format!("value-{i}-{}", "x".repeat(40))});
        let body = serde_json::json!({"value": value, "ttl": 1800 + (i % 3600), "tags": tag_of(i)});
        let client = client.clone();
        async move {
            let (status, answer) = client
                .post_json(node, &format!("/api/v1/cache/{key}"), &body)
                .await?;
            if status != 200 && status != 201 {
                bail!("write of {key} through {node}: {status} {answer}");
            }
            anyhow::Ok((key, value))
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    writes.into_iter().collect()
}

/// Reads every key through `node`; returns the keys missing or wrong.
pub(crate) async fn missing_through(
    client: &CacheClient,
    node: SocketAddr,
    expected: &Written,
) -> Vec<String> {
    use futures::StreamExt;
    futures::stream::iter(expected.iter().map(|(key, value)| {
        let client = client.clone();
        async move {
            match client.get_json(node, &format!("/api/v1/cache/{key}")).await {
                Ok((200, item)) if item["value"] == *value => None,
                Ok((status, body)) => Some(format!("{key}: {status} {body}")),
                Err(e) => Some(format!("{key}: {e:#}")),
            }
        }
    }))
    .buffer_unordered(32)
    .filter_map(|missing| async move { missing })
    .collect()
    .await
}

/// How many of `nodes` (peer addresses) hold each key, asked through the
/// peer protocol without touching the items. Reads through the client API
/// are served by one owner, so only this shows a replica that went missing.
pub async fn copies(
    client: &CacheClient,
    nodes: &[SocketAddr],
    keys: impl Iterator<Item = &String> + Clone,
) -> Result<BTreeMap<String, usize>> {
    use futures::StreamExt;
    let mut held: BTreeMap<String, usize> = keys.clone().map(|k| (k.clone(), 0)).collect();
    for &peer in nodes {
        if !peer.ip().is_loopback() {
            bail!("refusing to send traffic outside 127.0.0.0/8: {peer}");
        }
        let found: Vec<Result<Option<String>>> = futures::stream::iter(keys.clone().map(|key| {
            let peers = client.peers.clone();
            async move {
                let copy = peers
                    .fetch(peer, key)
                    .await
                    .map_err(|e| anyhow::anyhow!("{key} on {peer}: {e}"))?;
                Ok(copy.map(|_| key.clone()))
            }
        }))
        .buffer_unordered(256)
        .collect()
        .await;
        let found: Vec<Option<String>> = found.into_iter().collect::<Result<_>>()?;
        for key in found.into_iter().flatten() {
            *held.get_mut(&key).expect("asked for it") += 1;
        }
    }
    Ok(held)
}

/// Reads every key through every node; returns how many reads failed.
pub async fn lost_keys(client: &CacheClient, nodes: &[SocketAddr], expected: &Written) -> usize {
    let mut lost = 0;
    for &node in nodes {
        let missing = missing_through(client, node, expected).await;
        if !missing.is_empty() {
            eprintln!(
                "{} of {} keys missing through {node}, e.g. {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(5)]
            );
        }
        lost += missing.len();
    }
    lost
}

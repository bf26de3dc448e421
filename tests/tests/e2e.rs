//! End to end: the whole product the way a platform team runs it. The CRD
//! and operator are installed with `kubectl apply -f manifests/`, the
//! operator runs as its Deployment's pod, the StatefulSet controller creates
//! the node pods, the test kubelet runs real `cache-node` processes for them,
//! and clients talk REST to the nodes. One cache lives through every
//! scenario in turn (install, traffic, scale up, scale down, rolling
//! restart, crash, operator crash); each step counts the keys it cannot read
//! back, and the bar is zero.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use distrocache_membership::MembershipDoc;
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{
    self, CacheClient, Written, kubectl_ok, lost_keys, node_addresses, wait_ready, write_items,
};
use distrocache_tests::{ControlPlane, Kubelet, wait};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const NS: &str = "default";
const NAME: &str = "example";
const SELECTOR: &str = "app.kubernetes.io/instance=example,app.kubernetes.io/name=distrocache";
const STEP: Duration = Duration::from_secs(180);
const ITEMS: usize = 20_000;

struct Env {
    cp: &'static ControlPlane,
    kubelet: &'static Kubelet,
    client: Client,
    http: CacheClient,
}

impl Env {
    async fn nodes(&self) -> Result<Vec<SocketAddr>> {
        Ok(node_addresses(&self.client, NS, NAME, 8080)
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .collect())
    }

    async fn ring(&self) -> Result<MembershipDoc> {
        let cm: ConfigMap = Api::namespaced(self.client.clone(), NS)
            .get("example-ring")
            .await?;
        let json = cm
            .data
            .unwrap_or_default()
            .remove("ring.json")
            .unwrap_or_default();
        Ok(MembershipDoc::from_json(json.as_bytes())?)
    }

    async fn ready(&self, replicas: usize) -> Result<DistroCache> {
        wait_ready(&self.client, NS, NAME, replicas, STEP).await
    }

    /// Reads every key through every node; the count must be zero.
    async fn assert_nothing_lost(&self, expected: &Written, step: &str) -> Result<()> {
        let nodes = self.nodes().await?;
        let lost = lost_keys(&self.http, &nodes, expected).await;
        eprintln!(
            "[{step}] {} keys read through each of {} nodes: {lost} lost",
            expected.len(),
            nodes.len()
        );
        ensure!(lost == 0, "{step}: {lost} reads failed");
        // Once the ring has settled, every key must have exactly two copies:
        // reads are served by primaries, so a missing replica would go
        // unnoticed until the primary went away.
        let mut peers = Vec::new();
        for node in &nodes {
            let (_, view) = self.http.get_json(*node, "/api/v1/cluster").await?;
            if view["settled"] != true {
                eprintln!("[{step}] {node} has not settled yet; copies not checked");
                return Ok(());
            }
            peers.push(SocketAddr::new(node.ip(), 8081));
        }
        let want = 2.min(peers.len());
        let copies = distrocache::copies(&self.http, &peers, expected.keys()).await?;
        let wrong: Vec<_> = copies.iter().filter(|(_, n)| **n != want).take(5).collect();
        ensure!(
            wrong.is_empty(),
            "{step}: keys without exactly {want} copies, e.g. {wrong:?}"
        );
        eprintln!("[{step}] every key has {want} copies");
        Ok(())
    }

    /// Items each node holds and keys each received by rebalancing, by pod.
    async fn node_progress(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        let mut out = BTreeMap::new();
        for (pod, addr) in node_addresses(&self.client, NS, NAME, 8080).await? {
            let (_, p) = self
                .http
                .get_json(addr, "/api/v1/cluster/rebalance")
                .await?;
            out.insert(
                pod,
                (
                    p["items"].as_u64().unwrap_or(0),
                    p["keysReceived"].as_u64().unwrap_or(0),
                ),
            );
        }
        Ok(out)
    }

    async fn scale(&self, replicas: usize) -> Result<()> {
        kubectl_ok(
            self.cp,
            &[
                "scale",
                "-n",
                NS,
                &format!("distrocache/{NAME}"),
                &format!("--replicas={replicas}"),
            ],
        )?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_survives_scaling_restarts_and_crashes_without_losing_a_key() -> Result<()> {
    let kubelet = Kubelet::shared().await?;
    let result = scenarios(kubelet).await;
    if result.is_err() {
        eprintln!("{}", kubelet.log_tails(NS, 60));
        eprintln!("{}", kubelet.log_tails("distrocache-system", 40));
    }
    result
}

async fn scenarios(kubelet: &'static Kubelet) -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.logs_on_panic();
    distrocache::register_images(kubelet)?;
    let env = Env {
        cp,
        kubelet,
        client: cp.client().await?,
        http: CacheClient::default(),
    };
    let mut report = Vec::new();

    // 1. Install.
    let started = Instant::now();
    distrocache::install(cp).await?;
    distrocache::kubectl_apply(
        cp,
        &distrocache::workspace_root().join("manifests/examples/distrocache.yaml"),
    )?;
    let dc = env.ready(3).await?;
    let to_ready = started.elapsed();
    let epoch = dc.status.as_ref().unwrap().ring_epoch;
    for node in env.nodes().await? {
        let (_, view) = env.http.get_json(node, "/api/v1/cluster").await?;
        ensure!(
            view["epoch"] == epoch,
            "{node} holds epoch {} not {epoch}",
            view["epoch"]
        );
    }
    report.push(format!("1. install: apply -> Ready with 3 active members in {to_ready:.1?}; every node at epoch {epoch}"));

    // 2. Traffic through every node, then a tag invalidation through one.
    let nodes = env.nodes().await?;
    let mut written = write_items(&env.http, &nodes, 0..ITEMS, |i| {
        vec![format!("t{}", i % 10), "all".into()]
    })
    .await?;
    env.assert_nothing_lost(&written, "2. traffic").await?;
    let (status, answer) = env
        .http
        .post_json(nodes[1], "/api/v1/invalidate/tag/t3", &json!({}))
        .await?;
    ensure!(
        status == 200 && answer["invalidated"] == ITEMS / 10,
        "invalidation answered {status} {answer}"
    );
    let invalidated: Written = written
        .iter()
        .filter(|(_, v)| v["n"].as_u64().unwrap() % 10 == 3)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for node in &nodes {
        for key in invalidated.keys().take(200) {
            let (status, _) = env
                .http
                .get_json(*node, &format!("/api/v1/cache/{key}"))
                .await?;
            ensure!(
                status == 404,
                "{key} still served by {node} after its tag was invalidated"
            );
        }
    }
    written.retain(|k, _| !invalidated.contains_key(k));
    env.assert_nothing_lost(&written, "2. after invalidating t3")
        .await?;
    report.push(format!("2. traffic: {ITEMS} items written through 3 nodes; tag t3 invalidated ({} items) everywhere; 0 lost", invalidated.len()));

    // 3. Scale up to 5.
    let started = Instant::now();
    env.scale(5).await?;
    env.ready(5).await?;
    let scale_up = started.elapsed();
    env.assert_nothing_lost(&written, "3. scale up to 5")
        .await?;
    let progress = env.node_progress().await?;
    let received: u64 = ["example-3", "example-4"]
        .iter()
        .map(|p| progress.get(*p).map_or(0, |v| v.1))
        .sum();
    // With rf 2, each of the 2 new nodes owns 2/5 of the keys: ideally 2/5
    // of the stored copies move to them, nothing else moves.
    let moved = received as f64 / (2 * written.len()) as f64;
    report.push(format!(
        "3. scale 3 -> 5 in {:.1?}: the new nodes pulled {received} keys = {:.1}% of the {} stored copies \
         (ideal 2/5 = 40%); items per node {:?}; 0 lost",
        scale_up,
        moved * 100.0,
        2 * written.len(),
        progress.iter().map(|(p, v)| (p.clone(), v.0)).collect::<Vec<_>>()
    ));

    // 4. Scale down to 2: pods go only after their members left the ring.
    let started = Instant::now();
    let watch = RingPodWatch::start(env.client.clone());
    env.scale(2).await?;
    env.ready(2).await?;
    let scale_down = started.elapsed();
    let violations = watch.stop().await;
    ensure!(
        violations.is_empty(),
        "pods deleted while still ring members: {violations:?}"
    );
    env.assert_nothing_lost(&written, "4. scale down to 2")
        .await?;
    report.push(format!(
        "4. scale 5 -> 2 in {scale_down:.1?}: members went leaving, handed off, then their pods went; 0 lost"
    ));

    // 5. Rolling restart, with a client reading throughout.
    let started = Instant::now();
    let reader = BackgroundReader::start(env.client.clone(), env.http.clone(), written.clone());
    let pods_before = pod_uids(&env.client).await?;
    let caches: Api<DistroCache> = Api::namespaced(env.client.clone(), NS);
    caches
        .patch(NAME, &PatchParams::default(), &Patch::Merge(json!({"spec": {"podAnnotations": {"restartedAt": format!("{:?}", Instant::now())}}})))
        .await?;
    // Check after each pod comes back.
    let mut restarted = BTreeSet::new();
    while restarted.len() < pods_before.len() {
        let now = wait::until("the next restarted pod to be ready", STEP, || {
            let client = env.client.clone();
            let pods_before = pods_before.clone();
            let restarted = restarted.clone();
            async move {
                let fresh: BTreeSet<String> = pod_uids(&client)
                    .await?
                    .into_iter()
                    .filter(|(name, (uid, ready))| {
                        *ready
                            && pods_before.get(name).is_some_and(|(old, _)| old != uid)
                            && !restarted.contains(name)
                    })
                    .map(|(name, _)| name)
                    .collect();
                Ok((!fresh.is_empty()).then_some(fresh))
            }
        })
        .await?;
        for pod in now {
            restarted.insert(pod.clone());
            // First, what the restarted node itself holds (its pull), asked
            // before the next pod's restart can muddy the picture.
            let ip = env
                .kubelet
                .pod_ip(NS, &pod)
                .expect("a running pod has an IP");
            let held = distrocache::copies(
                &env.http,
                &[SocketAddr::new(ip.into(), 8081)],
                written.keys(),
            )
            .await?;
            let absent: Vec<&String> = held
                .iter()
                .filter(|(_, n)| **n == 0)
                .map(|(k, _)| k)
                .collect();
            if !absent.is_empty() {
                let mut others = Vec::new();
                for other in ["example-0", "example-1"]
                    .into_iter()
                    .filter(|p| **p != pod)
                {
                    if let Some(ip) = env.kubelet.pod_ip(NS, other) {
                        let keys = absent.iter().map(|k| (*k).clone()).collect::<Vec<_>>();
                        let there = distrocache::copies(
                            &env.http,
                            &[SocketAddr::new(ip.into(), 8081)],
                            keys.iter(),
                        )
                        .await?;
                        others.push(format!("{other} holds {:?}", there));
                    }
                }
                anyhow::bail!(
                    "{pod} came back without {} keys: {:?}; {others:?}",
                    absent.len(),
                    &absent[..absent.len().min(5)]
                );
            }
            env.assert_nothing_lost(&written, &format!("5. rolling restart, {pod} back"))
                .await?;
        }
    }
    env.ready(2).await?;
    let (ok, failed) = reader.stop().await;
    report.push(format!(
        "5. rolling restart of 2 pods in {:.1?} (with a full read check after each pod): 0 lost after each pod; \
         background client: {ok} reads ok, {} failed {:?}",
        started.elapsed(),
        failed.values().sum::<u64>(),
        failed
    ));

    // 6. kill -9 a node: the kubelet restarts it, it pulls its keys back.
    let members_before: Vec<String> = env
        .ring()
        .await?
        .members
        .into_iter()
        .map(|m| m.id)
        .collect();
    let pid = env.kubelet.crash(NS, "example-0").await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    wait::until("example-0 restarted and ready", STEP, || {
        let pods = pods.clone();
        async move {
            let p = pods.get("example-0").await?;
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |c| c[0].restart_count);
            Ok((restarts >= 1 && distrocache::is_ready(&p)).then_some(()))
        }
    })
    .await?;
    env.ready(2).await?;
    let members_after: Vec<String> = env
        .ring()
        .await?
        .members
        .into_iter()
        .map(|m| m.id)
        .collect();
    ensure!(
        members_before == members_after,
        "the ring changed ids: {members_before:?} -> {members_after:?}"
    );
    env.assert_nothing_lost(&written, "6. crash").await?;
    report.push(format!("6. kill -9 of example-0 (pid {pid}): restarted, kept its id in the ring, pulled its keys; 0 lost"));

    // 7. The operator dies in the middle of a scale-down.
    env.scale(3).await?;
    env.ready(3).await?;
    env.assert_nothing_lost(&written, "7. back to 3").await?;
    env.scale(2).await?;
    wait::until("a leaving member", STEP, || async {
        Ok(env
            .ring()
            .await?
            .members
            .iter()
            .any(|m| m.state == distrocache_membership::MemberState::Leaving)
            .then_some(()))
    })
    .await?;
    // The leading replica (the other stands by).
    let leader = distrocache::operator_leader(
        &env.client,
        distrocache::OPERATOR_NAMESPACE,
        distrocache::OPERATOR_LEASE,
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("no operator replica leads"))?;
    env.kubelet
        .crash(distrocache::OPERATOR_NAMESPACE, &leader.pod)
        .await?;
    env.ready(2).await?;
    env.assert_nothing_lost(&written, "7. operator crash during scale-down")
        .await?;
    let after = distrocache::operator_leader(
        &env.client,
        distrocache::OPERATOR_NAMESPACE,
        distrocache::OPERATOR_LEASE,
    )
    .await?;
    report.push(format!(
        "7. leading operator ({}) killed while a member was leaving: {} finished the scale-down; 0 lost",
        leader.identity,
        after.map_or("?".to_string(), |l| l.identity)
    ));

    eprintln!("\n==== end-to-end report ====\n{}\n", report.join("\n"));
    Ok(())
}

/// Pods of the cache: name -> (uid, ready).
async fn pod_uids(client: &Client) -> Result<BTreeMap<String, (String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    Ok(pods
        .list(&ListParams::default().labels(SELECTOR))
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            (
                p.name_any(),
                (p.uid().unwrap_or_default(), distrocache::is_ready(&p)),
            )
        })
        .collect())
}

/// Watches, every 100 ms, that no pod is deleted while it is a ring member.
struct RingPodWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl RingPodWatch {
    fn start(client: Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut violations = Vec::new();
            let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
            let pods: Api<Pod> = Api::namespaced(client, NS);
            while !flag.load(Ordering::Relaxed) {
                let ring = configmaps.get("example-ring").await.ok().and_then(|cm| {
                    MembershipDoc::from_json(cm.data?.get("ring.json")?.as_bytes()).ok()
                });
                let listed = pods
                    .list(&ListParams::default().labels(SELECTOR))
                    .await
                    .ok();
                if let (Some(ring), Some(listed)) = (ring, listed) {
                    for m in &ring.members {
                        let pod = listed.items.iter().find(|p| p.name_any() == m.id);
                        let deleting = pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some());
                        // A leaving or active member's pod may restart (crash),
                        // but must never be deleted by a scale-down.
                        if deleting {
                            violations
                                .push(format!("{} ({}) at epoch {}", m.id, m.state, ring.epoch));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            violations
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// A client that keeps reading random known keys through the ready nodes
/// (the node list refreshed from the API, as a Service's endpoints would be),
/// counting answers that were not the right item.
struct BackgroundReader {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BackgroundReader {
    fn start(client: Client, http: CacheClient, written: Written) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let (flag, ok_count, failed_count) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let keys: Vec<(String, serde_json::Value)> = written.into_iter().collect();
            let pods: Api<Pod> = Api::namespaced(client, NS);
            let mut ready: Vec<SocketAddr> = Vec::new();
            let mut refreshed = Instant::now() - Duration::from_secs(1);
            let mut i = 0usize;
            while !flag.load(Ordering::Relaxed) {
                if refreshed.elapsed() > Duration::from_millis(200) {
                    if let Ok(list) = pods.list(&ListParams::default().labels(SELECTOR)).await {
                        ready = list
                            .items
                            .iter()
                            .filter(|p| distrocache::is_ready(p))
                            .filter_map(|p| {
                                Some(SocketAddr::new(
                                    p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?,
                                    8080,
                                ))
                            })
                            .collect();
                    }
                    refreshed = Instant::now();
                }
                if ready.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                i = i.wrapping_add(7919);
                let (key, value) = &keys[i % keys.len()];
                let node = ready[i % ready.len()];
                let why = match http.get_json(node, &format!("/api/v1/cache/{key}")).await {
                    Ok((200, item)) if item["value"] == *value => {
                        ok_count.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok((200, _)) => "wrong value".to_string(),
                    Ok((status, _)) => format!("status {status}"),
                    Err(e) => format!("{:.60}", format!("{e:#}")),
                };
                *failed_count
                    .lock()
                    .expect("never poisoned")
                    .entry(why)
                    .or_insert(0) += 1;
            }
        });
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Reads answered right, and the others by what went wrong.
    async fn stop(self) -> (u64, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let failed = self.failed.lock().expect("never poisoned").clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

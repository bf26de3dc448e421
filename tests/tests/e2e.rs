//! End to end: the whole product the way a platform team runs it. The CRD
//! and operator are installed with `kubectl apply -f manifests/`, the
//! operator runs as its Deployment's pod, the StatefulSet controller creates
//! the node pods, the test kubelet runs real `cache-node` processes for them,
//! and clients talk REST to the nodes. One cache lives through every
//! scenario in turn (install, traffic, scale up, scale down, rolling
//! restart, crash, operator crash, two membership changes in quick
//! succession, every pod deleted at once). Each scenario is a named step
//! that asserts its own outcome, so a failure names the step; each counts
//! the keys it cannot read back, and the bar is zero.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use distrocache_membership::{MemberState, MembershipDoc};
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{
    self, CacheClient, Written, kubectl_ok, lost_keys, node_addresses, wait_ready, write_items,
};
use distrocache_tests::{ControlPlane, Kubelet, wait};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::oneshot;

const NS: &str = "default";
const NAME: &str = "example";
const RING: &str = "example-ring";
const SELECTOR: &str = "app.kubernetes.io/instance=example,app.kubernetes.io/name=distrocache";
const STEP: Duration = Duration::from_secs(180);
const ITEMS: usize = 20_000;
/// The client port and the peer port of every node (the spec's defaults).
const CLIENT_PORT: u16 = 8080;
const PEER_PORT: u16 = 8081;

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
    let mut s = Scenario {
        env: Env {
            cp,
            kubelet,
            client: cp.client().await?,
            http: CacheClient::default(),
        },
        written: Written::new(),
        report: Vec::new(),
    };
    s.step("1. install", Scenario::install).await?;
    s.step("2. traffic and a tag invalidation", Scenario::traffic)
        .await?;
    s.step("3. scale up 3 -> 5", Scenario::scale_up).await?;
    s.step("4. scale down 5 -> 2", Scenario::scale_down).await?;
    s.step("5. rolling restart under reads", Scenario::rolling_restart)
        .await?;
    s.step("6. kill -9 of a node", Scenario::crash).await?;
    s.step(
        "7. the leading operator killed during a scale-down",
        Scenario::operator_crash,
    )
    .await?;
    s.step(
        "8. scale up while a member is leaving",
        Scenario::quick_membership_changes,
    )
    .await?;
    s.step(
        "9. every pod deleted at once",
        Scenario::whole_cache_deleted,
    )
    .await?;
    eprintln!("\n==== end-to-end report ====\n{}\n", s.report.join("\n"));
    Ok(())
}

/// The cache under test and how to reach it.
struct Env {
    cp: &'static ControlPlane,
    kubelet: &'static Kubelet,
    client: Client,
    http: CacheClient,
}

impl Env {
    async fn nodes(&self) -> Result<Vec<SocketAddr>> {
        Ok(node_addresses(&self.client, NS, NAME, CLIENT_PORT)
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .collect())
    }

    /// The membership document in the ring ConfigMap; a missing ConfigMap,
    /// key or a document that does not parse is an error.
    async fn ring(&self) -> Result<MembershipDoc> {
        let cm: ConfigMap = Api::namespaced(self.client.clone(), NS).get(RING).await?;
        ring_of(&cm)
    }

    async fn ready(&self, replicas: usize) -> Result<DistroCache> {
        wait_ready(&self.client, NS, NAME, replicas, STEP).await
    }

    /// Waits (failing at the deadline) until every node of the ring runs,
    /// holds the ring's epoch and reports `settled` (no data moving), and
    /// returns the nodes' client addresses.
    async fn settled(&self, step: &str) -> Result<Vec<SocketAddr>> {
        wait::until(
            &format!("{step}: every node settled on the ring's epoch"),
            STEP,
            || async {
                let ring = self.ring().await?;
                let nodes = node_addresses(&self.client, NS, NAME, CLIENT_PORT).await?;
                let running: BTreeSet<&str> = nodes.iter().map(|(p, _)| p.as_str()).collect();
                let members: BTreeSet<&str> = ring.members.iter().map(|m| m.id.as_str()).collect();
                ensure!(
                    running == members,
                    "pods {running:?}, ring members {members:?} (epoch {})",
                    ring.epoch
                );
                let mut unsettled = Vec::new();
                for (pod, node) in &nodes {
                    let (status, view) = self.http.get_json(*node, "/api/v1/cluster").await?;
                    ensure!(
                        status == 200,
                        "{pod}: /api/v1/cluster answered {status} {view}"
                    );
                    if view["settled"] != true || view["epoch"] != ring.epoch {
                        unsettled.push(format!(
                            "{pod} at epoch {} settled={}",
                            view["epoch"], view["settled"]
                        ));
                    }
                }
                ensure!(
                    unsettled.is_empty(),
                    "ring epoch {}: {unsettled:?}",
                    ring.epoch
                );
                Ok(Some(nodes.into_iter().map(|(_, a)| a).collect()))
            },
        )
        .await
    }

    /// Reads every key through every node (the count of failed reads must
    /// be zero), then waits for the ring to settle and checks that every
    /// key has exactly two copies: reads are served by primaries, so a
    /// missing replica would go unnoticed until the primary went away.
    async fn assert_nothing_lost(&self, expected: &Written, step: &str) -> Result<()> {
        let nodes = self.nodes().await?;
        let lost = lost_keys(&self.http, &nodes, expected).await;
        eprintln!(
            "[{step}] {} keys read through each of {} nodes: {lost} lost",
            expected.len(),
            nodes.len()
        );
        ensure!(lost == 0, "{step}: {lost} reads failed");
        let nodes = self.settled(step).await?;
        let peers: Vec<SocketAddr> = nodes
            .iter()
            .map(|n| SocketAddr::new(n.ip(), PEER_PORT))
            .collect();
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
        for (pod, addr) in node_addresses(&self.client, NS, NAME, CLIENT_PORT).await? {
            let (status, p) = self
                .http
                .get_json(addr, "/api/v1/cluster/rebalance")
                .await?;
            ensure!(status == 200, "{pod}: rebalance progress {status} {p}");
            let field = |name: &str| {
                p[name]
                    .as_u64()
                    .with_context(|| format!("{pod}: no {name} in {p}"))
            };
            out.insert(pod.clone(), (field("items")?, field("keysReceived")?));
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

    /// Waits until the ring lists a leaving member; returns its id.
    async fn leaving_member(&self) -> Result<String> {
        wait::until("a leaving member", STEP, || async {
            Ok(self
                .ring()
                .await?
                .members
                .into_iter()
                .find(|m| m.state == MemberState::Leaving)
                .map(|m| m.id))
        })
        .await
    }
}

fn ring_of(cm: &ConfigMap) -> Result<MembershipDoc> {
    let json = cm
        .data
        .as_ref()
        .and_then(|d| d.get(distrocache_membership::CONFIGMAP_KEY))
        .with_context(|| format!("{} has no ring document", cm.name_any()))?;
    MembershipDoc::from_json(json.as_bytes())
        .with_context(|| format!("{} holds an invalid ring document", cm.name_any()))
}

/// The cache, what was written to it, and the report of the steps so far.
struct Scenario {
    env: Env,
    written: Written,
    report: Vec<String>,
}

impl Scenario {
    /// Runs one step; its error names it, its outcome joins the report.
    async fn step<F>(&mut self, name: &str, run: F) -> Result<()>
    where
        F: for<'a> AsyncStep<'a>,
    {
        eprintln!("==> {name}");
        let started = Instant::now();
        let outcome = run
            .call(self)
            .await
            .with_context(|| format!("step {name}"))?;
        let line = format!("{name} ({:.1?}): {outcome}", started.elapsed());
        eprintln!("<== {line}");
        self.report.push(line);
        Ok(())
    }

    async fn install(&mut self) -> Result<String> {
        let env = &self.env;
        let started = Instant::now();
        distrocache::install(env.cp).await?;
        distrocache::kubectl_apply(
            env.cp,
            &distrocache::workspace_root().join("manifests/examples/distrocache.yaml"),
        )?;
        let dc = env.ready(3).await?;
        let to_ready = started.elapsed();
        let epoch = dc
            .status
            .as_ref()
            .context("a Ready cache has a status")?
            .ring_epoch;
        for node in env.nodes().await? {
            let (_, view) = env.http.get_json(node, "/api/v1/cluster").await?;
            ensure!(
                view["epoch"] == epoch,
                "{node} holds epoch {} not {epoch}",
                view["epoch"]
            );
        }
        Ok(format!(
            "apply -> Ready with 3 active members in {to_ready:.1?}; every node at epoch {epoch}"
        ))
    }

    async fn traffic(&mut self) -> Result<String> {
        let env = &self.env;
        let nodes = env.nodes().await?;
        let mut written = write_items(&env.http, &nodes, 0..ITEMS, |i| {
            vec![format!("t{}", i % 10), "all".into()]
        })
        .await?;
        env.assert_nothing_lost(&written, "traffic").await?;
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
            .filter(|(_, v)| v["n"].as_u64().is_some_and(|n| n % 10 == 3))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ensure!(
            invalidated.len() == ITEMS / 10,
            "{} tagged t3",
            invalidated.len()
        );
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
        env.assert_nothing_lost(&written, "after invalidating t3")
            .await?;
        self.written = written;
        Ok(format!(
            "{ITEMS} items written through 3 nodes; tag t3 invalidated ({} items) everywhere; 0 lost",
            invalidated.len()
        ))
    }

    async fn scale_up(&mut self) -> Result<String> {
        let env = &self.env;
        env.scale(5).await?;
        env.ready(5).await?;
        env.assert_nothing_lost(&self.written, "scale up to 5")
            .await?;
        let progress = env.node_progress().await?;
        let received: u64 = ["example-3", "example-4"]
            .iter()
            .map(|p| {
                progress
                    .get(*p)
                    .map(|v| v.1)
                    .context("a new pod's progress")
            })
            .sum::<Result<u64>>()?;
        // With rf 2, each of the 2 new nodes owns 2/5 of the keys: ideally 2/5
        // of the stored copies move to them, nothing else moves.
        let moved = received as f64 / (2 * self.written.len()) as f64;
        Ok(format!(
            "the new nodes pulled {received} keys = {:.1}% of the {} stored copies \
             (ideal 2/5 = 40%); items per node {:?}; 0 lost",
            moved * 100.0,
            2 * self.written.len(),
            progress
                .iter()
                .map(|(p, v)| (p.clone(), v.0))
                .collect::<Vec<_>>()
        ))
    }

    /// Pods go only after their members left the ring.
    async fn scale_down(&mut self) -> Result<String> {
        let env = &self.env;
        let watch = RingPodWatch::start(env.client.clone()).await?;
        env.scale(2).await?;
        env.ready(2).await?;
        let deleted = watch.stop().await?;
        ensure!(deleted.len() == 3, "3 pods deleted, saw {deleted:?}");
        env.assert_nothing_lost(&self.written, "scale down to 2")
            .await?;
        Ok(format!(
            "members went leaving, handed off, then their pods ({}) went; 0 lost",
            deleted.join(", ")
        ))
    }

    /// A rolling restart, with a client reading throughout and a full read
    /// check after each pod comes back.
    async fn rolling_restart(&mut self) -> Result<String> {
        let env = &self.env;
        let written = &self.written;
        let reader =
            BackgroundReader::start(env.client.clone(), env.http.clone(), written.clone(), 2)
                .await?;
        let pods_before = pod_uids(&env.client).await?;
        let caches: Api<DistroCache> = Api::namespaced(env.client.clone(), NS);
        caches
            .patch(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"podAnnotations": {"restartedAt": format!("{:?}", Instant::now())}}})),
            )
            .await?;
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
                self.restarted_pod_holds_its_keys(&pod).await?;
                env.assert_nothing_lost(written, &format!("rolling restart, {pod} back"))
                    .await?;
            }
        }
        env.ready(2).await?;
        let seen = reader.stop().await?;
        // Reads must never answer a wrong value or a false miss, and a node
        // may be unreachable only inside a fault window (see
        // `BackgroundReader`), a bounded number of times.
        ensure!(
            seen.failures.is_empty(),
            "the background client saw wrong answers: {:?} ({} right)",
            seen.failures,
            seen.ok
        );
        ensure!(seen.ok > 0, "the background client read nothing");
        ensure!(
            seen.windows >= 1,
            "the background client saw no pod restart (no fault window)"
        );
        let unavailable: u64 = seen.unavailable.values().sum();
        let bound = UNAVAILABLE_PER_RESTART * pods_before.len() as u64;
        ensure!(
            unavailable <= bound,
            "{unavailable} reads found their node unavailable (bound {bound}): {:?}",
            seen.unavailable
        );
        Ok(format!(
            "{} pods restarted; 0 lost after each pod; background client: {} reads right, \
             0 wrong, 0 false misses; {unavailable} unavailable answers {:?}, all inside \
             the {} fault windows ({} reads inside them)",
            pods_before.len(),
            seen.ok,
            seen.unavailable,
            seen.windows,
            seen.in_window,
        ))
    }

    /// What a restarted node holds itself (its pull), asked before the next
    /// pod's restart can muddy the picture.
    async fn restarted_pod_holds_its_keys(&self, pod: &str) -> Result<()> {
        let env = &self.env;
        let ip = env
            .kubelet
            .pod_ip(NS, pod)
            .with_context(|| format!("the running pod {pod} has no IP"))?;
        let held = distrocache::copies(
            &env.http,
            &[SocketAddr::new(ip.into(), PEER_PORT)],
            self.written.keys(),
        )
        .await?;
        let absent: Vec<&String> = held
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(k, _)| k)
            .collect();
        if absent.is_empty() {
            return Ok(());
        }
        let mut others = Vec::new();
        for other in ["example-0", "example-1"].into_iter().filter(|p| *p != pod) {
            if let Some(ip) = env.kubelet.pod_ip(NS, other) {
                let keys = absent.iter().map(|k| (*k).clone()).collect::<Vec<_>>();
                let there = distrocache::copies(
                    &env.http,
                    &[SocketAddr::new(ip.into(), PEER_PORT)],
                    keys.iter(),
                )
                .await?;
                others.push(format!("{other} holds {there:?}"));
            }
        }
        bail!(
            "{pod} came back without {} keys: {:?}; {others:?}",
            absent.len(),
            &absent[..absent.len().min(5)]
        )
    }

    /// kill -9 a node: the kubelet restarts it, it pulls its keys back.
    async fn crash(&mut self) -> Result<String> {
        let env = &self.env;
        let members_before: Vec<String> = env
            .ring()
            .await?
            .members
            .into_iter()
            .map(|m| m.id)
            .collect();
        let pid = env.kubelet.crash(NS, "example-0").await?;
        distrocache::wait_restarted(&env.client, NS, "example-0", STEP).await?;
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
        env.assert_nothing_lost(&self.written, "crash").await?;
        Ok(format!(
            "example-0 (pid {pid}) restarted, kept its id in the ring, pulled its keys; 0 lost"
        ))
    }

    /// The operator dies in the middle of a scale-down.
    async fn operator_crash(&mut self) -> Result<String> {
        let env = &self.env;
        env.scale(3).await?;
        env.ready(3).await?;
        env.assert_nothing_lost(&self.written, "back to 3").await?;
        env.scale(2).await?;
        env.leaving_member().await?;
        // The leading replica (the other stands by).
        let leader = distrocache::operator_leader(
            &env.client,
            distrocache::OPERATOR_NAMESPACE,
            distrocache::OPERATOR_LEASE,
        )
        .await?
        .context("no operator replica leads")?;
        env.kubelet
            .crash(distrocache::OPERATOR_NAMESPACE, &leader.pod)
            .await?;
        env.ready(2).await?;
        env.assert_nothing_lost(&self.written, "operator crash during scale-down")
            .await?;
        let after = wait::until("an operator replica to lead", STEP, || async {
            distrocache::operator_leader(
                &env.client,
                distrocache::OPERATOR_NAMESPACE,
                distrocache::OPERATOR_LEASE,
            )
            .await
        })
        .await?;
        Ok(format!(
            "leading operator ({}) killed while a member was leaving: {} finished the scale-down; 0 lost",
            leader.identity, after.identity
        ))
    }

    /// Two membership changes in quick succession: 3 -> 2, and as soon as a
    /// member is leaving, 2 -> 4 (nodes join while another leaves). No pod
    /// may go while it is a member, nothing may be lost, the ring settles.
    async fn quick_membership_changes(&mut self) -> Result<String> {
        let env = &self.env;
        env.scale(3).await?;
        env.ready(3).await?;
        let epoch_before = env.ring().await?.epoch;
        let watch = RingPodWatch::start(env.client.clone()).await?;
        env.scale(2).await?;
        let leaving = env.leaving_member().await?;
        env.scale(4).await?;
        env.ready(4).await?;
        let deleted = watch.stop().await?;
        env.assert_nothing_lost(&self.written, "scaled 3 -> 2 -> 4")
            .await?;
        let ring = env.ring().await?;
        ensure!(
            ring.members.len() == 4 && ring.members.iter().all(|m| m.state == MemberState::Active),
            "the ring after 3 -> 2 -> 4: {:?}",
            ring.members
        );
        Ok(format!(
            "{leaving} was leaving when 4 replicas were asked for; ring epoch {epoch_before} -> {}, \
             4 active members, pods deleted meanwhile (never while members): {deleted:?}; 0 lost",
            ring.epoch
        ))
    }

    /// Every pod of the cache deleted at once. Without persistence the data
    /// is gone with the processes (README, "When every pod goes at once"):
    /// the cache must come back empty, Ready, on the same ring members, and
    /// serve and replicate new writes.
    async fn whole_cache_deleted(&mut self) -> Result<String> {
        let env = &self.env;
        let before = pod_uids(&env.client).await?;
        let ring_before = env.ring().await?;
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
        pods.delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(SELECTOR),
        )
        .await?;
        wait::until("every pod replaced and ready", STEP, || async {
            let now = pod_uids(&env.client).await?;
            let replaced = now.len() == before.len()
                && now.iter().all(|(name, (uid, ready))| {
                    *ready && before.get(name).is_some_and(|(old, _)| old != uid)
                });
            Ok(replaced.then_some(()))
        })
        .await?;
        env.ready(before.len()).await?;
        let nodes = env.settled("after every pod was deleted").await?;
        let ring_after = env.ring().await?;
        let ids = |d: &MembershipDoc| d.members.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        ensure!(
            ids(&ring_before) == ids(&ring_after),
            "the ring's members changed: {:?} -> {:?}",
            ids(&ring_before),
            ids(&ring_after)
        );
        // Empty: no node holds an item, and an old key is a miss everywhere.
        for node in &nodes {
            let (status, stats) = env.http.get_json(*node, "/api/v1/stats").await?;
            ensure!(status == 200, "{node}: stats {status} {stats}");
            ensure!(stats["items"] == 0, "{node} holds items: {stats}");
            for key in self.written.keys().take(100) {
                let (status, body) = env
                    .http
                    .get_json(*node, &format!("/api/v1/cache/{key}"))
                    .await?;
                ensure!(status == 404, "{node}: {key} answered {status} {body}");
            }
        }
        // Healthy: new writes are served by every node, with two copies.
        let fresh = write_items(&env.http, &nodes, ITEMS..ITEMS + 2_000, |_| vec![]).await?;
        env.assert_nothing_lost(&fresh, "new writes after every pod was deleted")
            .await?;
        self.written = fresh;
        Ok(format!(
            "{} pods replaced; the cache came back empty (0 items on every node), Ready, \
             settled at epoch {} -> {} with the same members; {} new writes read back with 2 copies",
            before.len(),
            ring_before.epoch,
            ring_after.epoch,
            self.written.len()
        ))
    }
}

/// A step: an async method of [`Scenario`] returning its outcome line.
trait AsyncStep<'a> {
    type Fut: Future<Output = Result<String>> + 'a;
    fn call(self, s: &'a mut Scenario) -> Self::Fut;
}

impl<'a, F, Fut> AsyncStep<'a> for F
where
    F: FnOnce(&'a mut Scenario) -> Fut,
    Fut: Future<Output = Result<String>> + 'a,
{
    type Fut = Fut;
    fn call(self, s: &'a mut Scenario) -> Fut {
        self(s)
    }
}

/// Pods of the cache not being deleted: name -> (uid, ready).
async fn pod_uids(client: &Client) -> Result<BTreeMap<String, (String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.list(&ListParams::default().labels(SELECTOR))
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let uid = p.uid().context("a stored pod has a uid")?;
            Ok((p.name_any(), (uid, distrocache::is_ready(&p))))
        })
        .collect()
}

/// A resourceVersion as a number. On this control plane (one etcd behind
/// one API server) it is the etcd revision of the change, one sequence
/// across every kind, which orders a ConfigMap change against a pod's.
fn revision(meta: &kube::core::ObjectMeta) -> Result<u64> {
    let rv = meta
        .resource_version
        .as_deref()
        .context("an object from a watch has a resourceVersion")?;
    rv.parse()
        .with_context(|| format!("resourceVersion {rv:?} is not an etcd revision"))
}

/// Watches the ring ConfigMap and the cache's pods (watch streams, no
/// polling) and checks that no pod is deleted while the ring in force at
/// that moment lists it as a member: a leaving or active member's pod may
/// restart (crash), but a scale-down must remove it from the ring first.
/// "In force" is decided by revision, not by arrival: the two streams are
/// independent, so a pod's deletion may arrive before the ring change that
/// preceded it. An API error, a relist (which could skip a ring version) or
/// a dead task fails the test.
struct RingPodWatch {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<RingPodHistory>>,
}

#[derive(Default)]
struct RingPodHistory {
    /// Every ring version seen: (revision, document), in order.
    rings: Vec<(u64, MembershipDoc)>,
    /// The first sign of each pod's deletion: (revision, pod name, uid).
    deletions: Vec<(u64, String, String)>,
}

// One event at a time passes through: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Seen {
    Ring(watcher::Event<ConfigMap>),
    Pod(watcher::Event<Pod>),
}

impl RingPodWatch {
    /// Starts both watches and returns once both have listed what exists.
    async fn start(client: Client) -> Result<Self> {
        let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let ring_api = configmaps.clone();
        let pods: Api<Pod> = Api::namespaced(client, NS);
        let rings = watcher(
            configmaps,
            watcher::Config::default().fields(&format!("metadata.name={RING}")),
        )
        .map(|e| e.map(Seen::Ring))
        .boxed();
        let pods = watcher(pods, watcher::Config::default().labels(SELECTOR))
            .map(|e| e.map(Seen::Pod))
            .boxed();
        let mut events = futures::stream::select(rings, pods);
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let (listed_tx, listed_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut history = RingPodHistory::default();
            let mut listed = (false, false);
            let mut listed_tx = Some(listed_tx);
            let mut deleting: BTreeSet<String> = BTreeSet::new();
            // After the stop signal: the ring revision to catch up to.
            let mut until: Option<u64> = None;
            loop {
                if let Some(rv) = until
                    && history.rings.last().is_some_and(|(r, _)| *r >= rv)
                {
                    return Ok(history);
                }
                let event = tokio::select! {
                    event = events.next() => event.context("a watch stream ended")??,
                    _ = &mut stop_rx, if until.is_none() => {
                        // Everything up to now must be seen before judging:
                        // the ring's current revision, read fresh.
                        until = Some(revision(&ring_api.get(RING).await?.metadata)?);
                        continue;
                    }
                };
                match event {
                    Seen::Ring(watcher::Event::Init) | Seen::Pod(watcher::Event::Init) => {
                        if listed.0 && listed.1 {
                            bail!("a watch restarted (relisted); ring versions may be missed");
                        }
                    }
                    Seen::Ring(watcher::Event::InitDone) => listed.0 = true,
                    Seen::Pod(watcher::Event::InitDone) => listed.1 = true,
                    Seen::Ring(watcher::Event::InitApply(cm) | watcher::Event::Apply(cm)) => {
                        history.rings.push((revision(&cm.metadata)?, ring_of(&cm)?));
                    }
                    Seen::Ring(watcher::Event::Delete(_)) => {
                        bail!("the ring ConfigMap was deleted")
                    }
                    Seen::Pod(watcher::Event::InitApply(pod)) => {
                        // Already on its way out before the watch began.
                        if pod.metadata.deletion_timestamp.is_some() {
                            deleting.insert(pod.uid().context("a pod's uid")?);
                        }
                    }
                    Seen::Pod(watcher::Event::Apply(pod))
                        if pod.metadata.deletion_timestamp.is_none() => {}
                    // The first sign of a deletion: the deletion timestamp,
                    // or the delete itself for a pod removed without grace.
                    Seen::Pod(watcher::Event::Apply(pod) | watcher::Event::Delete(pod)) => {
                        let uid = pod.uid().context("a pod's uid")?;
                        if deleting.insert(uid.clone()) {
                            history
                                .deletions
                                .push((revision(&pod.metadata)?, pod.name_any(), uid));
                        }
                    }
                }
                if listed == (true, true)
                    && let Some(tx) = listed_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        // The task ends only with an error before the stop signal.
        let this = Self {
            stop: stop_tx,
            task,
        };
        match tokio::time::timeout(STEP, listed_rx).await {
            Ok(Ok(())) => Ok(this),
            Ok(Err(_)) => Err(this
                .task
                .await?
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the ring/pod watch ended before listing"))),
            Err(_) => {
                this.task.abort();
                bail!("the ring/pod watch did not list the ring and pods in {STEP:?}")
            }
        }
    }

    /// Stops the watch and judges every deletion it saw; returns the pods
    /// deleted (each while no ring in force listed it).
    async fn stop(self) -> Result<Vec<String>> {
        // A task that already ended (with its error) has dropped the
        // receiver; its result says why.
        let _ = self.stop.send(());
        let history = tokio::time::timeout(STEP, self.task)
            .await
            .context("the ring/pod watch did not catch up with the ring")?
            .context("the ring/pod watch task died")?
            .context("the ring/pod watch failed")?;
        let mut violations = Vec::new();
        let mut deleted = Vec::new();
        for (rv, pod, _) in &history.deletions {
            let (ring_rv, ring) = history
                .rings
                .iter()
                .rev()
                .find(|(r, _)| r < rv)
                .with_context(|| format!("no ring known before {pod}'s deletion at {rv}"))?;
            if let Some(m) = ring.members.iter().find(|m| &m.id == pod) {
                violations.push(format!(
                    "{pod} deleted at revision {rv} while {} in the ring of epoch {} (revision {ring_rv})",
                    m.state, ring.epoch
                ));
            }
            deleted.push(pod.clone());
        }
        ensure!(
            violations.is_empty(),
            "pods deleted while still ring members: {violations:?}"
        );
        Ok(deleted)
    }
}

/// How many reads may find their node unavailable per restarted pod. A
/// node's process may die with requests in flight (or the client may pick
/// it just before the watch says it is going); after such an answer the
/// client leaves that node alone until the pods change again, as a client
/// behind a Service's endpoints would, and a pod's restart is a handful of
/// pod changes (terminating, deleted, created, running, ready).
const UNAVAILABLE_PER_RESTART: u64 = 5;

/// The pods as the background reader's watch last saw them.
#[derive(Default)]
struct PodsSeen {
    /// name -> (client address if ready).
    pods: BTreeMap<String, Option<SocketAddr>>,
    /// Bumped on every pod event.
    version: u64,
    /// Fault windows opened so far.
    windows: u64,
    /// A fault window is open: fewer than the expected pods are ready, or
    /// one is being deleted.
    fault: bool,
}

/// What the background reader saw.
#[derive(Debug, Default)]
struct ReaderSeen {
    ok: u64,
    /// Reads sent or answered inside a fault window.
    in_window: u64,
    /// Refused or broken connections and 503s inside a fault window.
    unavailable: BTreeMap<String, u64>,
    /// Everything else that was not the right item: wrong values, false
    /// misses, other statuses, timeouts, unavailability outside a window.
    failures: BTreeMap<String, u64>,
    windows: u64,
}

/// A client that keeps reading known keys through the ready nodes (taken
/// from a watch of the pods, as a Service's endpoints would be), sorting
/// every answer that is not the right item. The fault window is from the
/// watch event that shows a pod of the cache not ready or being deleted
/// (or fewer pods than replicas) to the event that shows them all ready.
struct BackgroundReader {
    stop: Arc<std::sync::atomic::AtomicBool>,
    watch: tokio::task::JoinHandle<Result<()>>,
    reader: tokio::task::JoinHandle<ReaderSeen>,
}

impl BackgroundReader {
    async fn start(
        client: Client,
        http: CacheClient,
        written: Written,
        replicas: usize,
    ) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let seen = Arc::new(Mutex::new(PodsSeen::default()));
        let (listed_tx, listed_rx) = oneshot::channel();
        let watch = {
            let seen = seen.clone();
            let pods: Api<Pod> = Api::namespaced(client, NS);
            tokio::spawn(async move {
                let mut events = watcher(pods, watcher::Config::default().labels(SELECTOR)).boxed();
                let mut listed_tx = Some(listed_tx);
                let mut listing = BTreeMap::new();
                while let Some(event) = events.next().await {
                    let mut seen = seen.lock().expect("never poisoned");
                    match event? {
                        watcher::Event::Init => {
                            if listed_tx.is_none() {
                                bail!("the pod watch restarted (relisted)");
                            }
                        }
                        watcher::Event::InitApply(pod) => {
                            listing.insert(pod.name_any(), client_address(&pod));
                        }
                        watcher::Event::InitDone => {
                            seen.pods = std::mem::take(&mut listing);
                            if let Some(tx) = listed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        watcher::Event::Apply(pod) => {
                            seen.pods.insert(pod.name_any(), client_address(&pod));
                        }
                        watcher::Event::Delete(pod) => {
                            seen.pods.remove(&pod.name_any());
                        }
                    }
                    seen.version += 1;
                    let fault =
                        seen.pods.len() != replicas || seen.pods.values().any(|a| a.is_none());
                    if fault && !seen.fault {
                        seen.windows += 1;
                    }
                    seen.fault = fault;
                }
                bail!("the pod watch ended")
            })
        };
        match tokio::time::timeout(STEP, listed_rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(watch
                    .await?
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("the pod watch ended before listing")));
            }
            Err(_) => {
                watch.abort();
                bail!("the pod watch did not list the pods in {STEP:?}");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let reader = tokio::spawn(async move {
            let keys: Vec<(String, serde_json::Value)> = written.into_iter().collect();
            let mut out = ReaderSeen::default();
            // Nodes that answered "unavailable", left alone until the pods
            // change (the pod version at the time).
            let mut shunned: BTreeMap<SocketAddr, u64> = BTreeMap::new();
            let mut i = 0usize;
            while !flag.load(Ordering::Relaxed) {
                let (nodes, version, fault_at_send) = {
                    let seen = seen.lock().expect("never poisoned");
                    shunned.retain(|_, v| *v == seen.version);
                    let nodes: Vec<SocketAddr> = seen
                        .pods
                        .values()
                        .flatten()
                        .filter(|a| !shunned.contains_key(a))
                        .copied()
                        .collect();
                    (nodes, seen.version, seen.fault)
                };
                if nodes.is_empty() {
                    // Nothing to read through until the pods change.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                i = i.wrapping_add(7919);
                let (key, value) = &keys[i % keys.len()];
                let node = nodes[i % nodes.len()];
                let answer = http.get_json(node, &format!("/api/v1/cache/{key}")).await;
                let in_window = fault_at_send || seen.lock().expect("never poisoned").fault;
                if in_window {
                    out.in_window += 1;
                }
                let failure = match answer {
                    Ok((200, item)) if item["value"] == *value => {
                        out.ok += 1;
                        continue;
                    }
                    Ok((200, _)) => "wrong value".to_string(),
                    Ok((404, _)) => "false miss (404)".to_string(),
                    Ok((503, body)) => {
                        shunned.insert(node, version);
                        if in_window {
                            *out.unavailable.entry(format!("503 {body}")).or_insert(0) += 1;
                            continue;
                        }
                        format!("503 outside a fault window: {body}")
                    }
                    Ok((status, body)) => format!("status {status}: {body}"),
                    Err(e) => match unavailable(&e) {
                        Some(why) => {
                            shunned.insert(node, version);
                            if in_window {
                                *out.unavailable.entry(why).or_insert(0) += 1;
                                continue;
                            }
                            format!("{why} outside a fault window")
                        }
                        None => format!("{:.80}", format!("{e:#}")),
                    },
                };
                *out.failures.entry(failure).or_insert(0) += 1;
            }
            out.windows = seen.lock().expect("never poisoned").windows;
            out
        });
        Ok(Self {
            stop,
            watch,
            reader,
        })
    }

    /// Stops reading; a watch that failed or a task that died fails here.
    async fn stop(self) -> Result<ReaderSeen> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = self.reader.await.context("the background reader died")?;
        if self.watch.is_finished() {
            self.watch
                .await
                .context("the background reader's pod watch died")?
                .context("the background reader's pod watch failed")?;
            bail!("the background reader's pod watch ended");
        }
        self.watch.abort();
        Ok(seen)
    }
}

/// The client address of a ready pod, `None` for any other.
fn client_address(pod: &Pod) -> Option<SocketAddr> {
    if !distrocache::is_ready(pod) {
        return None;
    }
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    Some(SocketAddr::new(ip, CLIENT_PORT))
}

/// Why a request found its node unavailable (a refused or broken
/// connection), or `None` for any other error (a timeout is never
/// "unavailable": a node must fail fast or answer).
fn unavailable(e: &anyhow::Error) -> Option<String> {
    let e = e.downcast_ref::<reqwest::Error>()?;
    if e.is_timeout() {
        None
    } else if e.is_connect() {
        Some("connection refused".into())
    } else if e.is_request() || e.is_body() {
        Some("connection broken".into())
    } else {
        None
    }
}

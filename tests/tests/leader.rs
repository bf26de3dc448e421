//! Leader election on the real control plane (issue 14): the operator runs
//! as two replicas (`kubectl apply -f manifests/`), one holds the Lease and
//! reconciles. The leader is stopped dead in the middle of a scale-down
//! (SIGSTOP: it can neither renew its Lease nor release it, as on a node
//! that froze or lost the network) right after it marked a member leaving;
//! the other replica takes the Lease once it expires and finishes the
//! scale-down, and no key is lost. Then the stale leader is let go on: it
//! notices it lost the Lease and exits (its pod restarts it as a standby),
//! changing nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use distrocache_membership::{MemberState, MembershipDoc};
use distrocache_operator::crd::DistroCache;
use distrocache_tests::distrocache::{
    self, CacheClient, Leader, OPERATOR_LEASE, OPERATOR_NAMESPACE, apply_cache, installed,
    kubectl_ok, lost_keys, node_addresses, wait_ready, write_items,
};
use distrocache_tests::{ControlPlane, TestNamespace, wait};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{Api, Client};

const STEP: Duration = Duration::from_secs(180);
const ITEMS: usize = 5_000;

async fn leader(client: &Client) -> Result<Leader> {
    wait::until("an operator replica to lead", STEP, || {
        let client = client.clone();
        async move { distrocache::operator_leader(&client, OPERATOR_NAMESPACE, OPERATOR_LEASE).await }
    })
    .await
}

async fn ring(client: &Client, ns: &str) -> Result<MembershipDoc> {
    let cm: ConfigMap = Api::namespaced(client.clone(), ns)
        .get("failover-ring")
        .await?;
    let json = cm
        .data
        .and_then(|mut d| d.remove(distrocache_membership::CONFIGMAP_KEY))
        .context("failover-ring holds no ring document")?;
    Ok(MembershipDoc::from_json(json.as_bytes())?)
}

fn signal(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) on a pid the test kubelet started and still tracks.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    ensure!(
        rc == 0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_finishes_a_scale_down_when_the_leader_dies() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.logs_on_panic();
    let (_, kubelet) = installed().await?;
    let ns = TestNamespace::create(cp, "leader")
        .await?
        .with_kubelet(kubelet);
    let n = ns.name();
    let client = ns.client().await?;
    apply_cache(cp, n, "failover", "  replicas: 3\n  replicationFactor: 2\n")?;
    wait_ready(&client, n, "failover", 3, STEP).await?;
    let http = CacheClient::default();
    let nodes: Vec<_> = node_addresses(&client, n, "failover", 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let written = write_items(&http, &nodes, 0..ITEMS, |i| vec![format!("t{}", i % 7)]).await?;

    let old = leader(&client).await?;
    let pid = kubelet
        .pod_pid(OPERATOR_NAMESPACE, &old.pod)
        .ok_or_else(|| anyhow::anyhow!("the leader's pod {} runs no process", old.pod))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |c| c[0].restart_count)
    };
    let restarts_before = restarts(&pods.get(&old.pod).await?);

    // Scale down; once the leader has marked the member leaving (the first
    // of the two phases), stop it dead.
    kubectl_ok(
        cp,
        &["scale", "-n", n, "distrocache/failover", "--replicas=2"],
    )?;
    wait::until("the leader to mark a member leaving", STEP, || {
        let (client, n) = (client.clone(), n.to_owned());
        async move {
            let doc = ring(&client, &n).await?;
            Ok(doc
                .members
                .iter()
                .any(|m| m.state == MemberState::Leaving)
                .then_some(doc.epoch))
        }
    })
    .await?;
    signal(pid, libc::SIGSTOP)?;
    let stopped = Instant::now();
    eprintln!(
        "leader {} (pid {pid}) stopped with a member leaving",
        old.identity
    );

    let new = wait::until("another replica to take the Lease", STEP, || {
        let client = client.clone();
        let old = old.clone();
        async move {
            Ok(
                distrocache::operator_leader(&client, OPERATOR_NAMESPACE, OPERATOR_LEASE)
                    .await?
                    .filter(|l| l.identity != old.identity),
            )
        }
    })
    .await?;
    let took_over = stopped.elapsed();
    ensure!(
        new.pod != old.pod,
        "the Lease went to {} in the stopped leader's pod",
        new.identity
    );
    let dc: DistroCache = wait_ready(&client, n, "failover", 2, STEP).await?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    wait::until("the StatefulSet shrunk to 2", STEP, || {
        let sts = sts.clone();
        async move {
            let s = sts.get("failover").await?;
            Ok((s.spec.and_then(|s| s.replicas) == Some(2)).then_some(()))
        }
    })
    .await?;
    let finished = stopped.elapsed();
    let nodes: Vec<_> = node_addresses(&client, n, "failover", 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let lost = lost_keys(&http, &nodes, &written).await;
    eprintln!(
        "leader failover: {} took the Lease {took_over:.1?} after the leader stopped; \
         the scale-down finished {finished:.1?} after; {ITEMS} keys, {lost} lost",
        new.identity
    );
    ensure!(lost == 0, "{lost} reads failed after the failover");
    let epoch = dc.status.as_ref().map_or(0, |s| s.ring_epoch);

    // The stale leader goes on: it finds the Lease taken and exits, its pod
    // restarts it, and it stands by without changing anything.
    signal(pid, libc::SIGCONT)?;
    let resumed = Instant::now();
    wait::until("the stale leader to exit and restart", STEP, || {
        let (pods, pod) = (pods.clone(), old.pod.clone());
        async move {
            let p = pods.get(&pod).await?;
            Ok((restarts(&p) > restarts_before && distrocache::is_ready(&p)).then_some(()))
        }
    })
    .await?;
    eprintln!(
        "the stale leader exited {:.1?} after it was let go on, and stands by",
        resumed.elapsed()
    );
    ensure!(
        leader(&client).await? == new,
        "the Lease stays with the replica that took over"
    );
    let after = wait_ready(&client, n, "failover", 2, STEP).await?;
    ensure!(
        after.status.as_ref().map_or(0, |s| s.ring_epoch) == epoch,
        "the stale leader changed the ring"
    );
    let lost = lost_keys(&http, &nodes, &written).await;
    ensure!(
        lost == 0,
        "{lost} reads failed after the stale leader resumed"
    );
    Ok(())
}

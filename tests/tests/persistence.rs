//! End to end with persistence (`spec.persistence`): the operator gives each
//! node a claim, the test kubelet maps each claim to a directory that
//! outlives the pod, and the nodes write and load real snapshots there.
//!
//! 1. Every pod of the cache deleted at once (a whole-cache restart): every
//!    item comes back from the nodes' own disks, with tags and TTLs, and
//!    what was deleted or invalidated before stays gone.
//! 2. The cache stopped (operator and StatefulSet scaled to zero), one
//!    node's snapshot corrupted, started again: every key comes back (the
//!    other copy), and that node reports the file it refused and kept aside.
//! 3. Backups (`spec.backup`) to an S3-compatible server the test starts on
//!    loopback (gofakes3): the cache given a backup schedule reports a
//!    completed backup in its status; the cache is deleted, and a new one
//!    of another size created with `spec.restoreFrom` turns Ready with
//!    every item back (two copies each) and nothing deleted back.
//!
//! The cache retains its claims on scale-down (`whenScaled: Retain`): step 2
//! stops it by scaling the StatefulSet to zero, which with the default
//! (`Delete`) would delete the claims, and the test kubelet ties a claim's
//! directory to the claim's uid, so the data would go with them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use distrocache_tests::distrocache::{
    self, CacheClient, Written, kubectl_ok, lost_keys, node_addresses, wait_ready, write_items,
};
use distrocache_tests::{ControlPlane, Kubelet, wait};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

#[path = "../../cache-node/tests/s3_support/mod.rs"]
mod s3_support;

const NS: &str = "default";
const NAME: &str = "persist";
const SELECTOR: &str = "app.kubernetes.io/instance=persist,app.kubernetes.io/name=distrocache";
const STEP: Duration = Duration::from_secs(180);
const ITEMS: usize = 20_000;

const CACHE: &str = r#"
apiVersion: distrocache.io/v1alpha1
kind: DistroCache
metadata:
  name: persist
  namespace: default
spec:
  replicas: 3
  replicationFactor: 2
  maxSize: 100000
  terminationGracePeriodSeconds: 30
  persistence:
    enabled: true
    size: 1Gi
    whenScaled: Retain
"#;
/// Items written with a TTL this short expire while the cache restarts.
const SHORT_TTL_ITEMS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cache_restart_keeps_the_data_and_a_corrupt_snapshot_costs_only_its_file()
-> Result<()> {
    let kubelet = Kubelet::shared().await?;
    let result = scenarios(kubelet).await;
    if result.is_err() {
        eprintln!("{}", kubelet.log_tails(NS, 60));
    }
    result
}

async fn pod_uids(client: &kube::Client) -> Result<BTreeMap<String, (String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    Ok(pods
        .list(&ListParams::default().labels(SELECTOR))
        .await?
        .items
        .into_iter()
        .map(|p| {
            let ready = distrocache::is_ready(&p);
            (
                p.metadata.name.clone().unwrap_or_default(),
                (p.metadata.uid.clone().unwrap_or_default(), ready),
            )
        })
        .collect())
}

async fn rest_addrs(client: &kube::Client) -> Result<Vec<SocketAddr>> {
    rest_addrs_of(client, NAME).await
}

async fn rest_addrs_of(client: &kube::Client, name: &str) -> Result<Vec<SocketAddr>> {
    Ok(node_addresses(client, NS, name, 8080)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect())
}

/// Every live key readable through every node with its value, exactly two
/// copies of each, and every gone key a 404 through every node.
async fn check(
    http: &CacheClient,
    client: &kube::Client,
    live: &Written,
    gone: &[String],
    step: &str,
) -> Result<()> {
    check_cache(http, client, NAME, live, gone, step).await
}

async fn check_cache(
    http: &CacheClient,
    client: &kube::Client,
    name: &str,
    live: &Written,
    gone: &[String],
    step: &str,
) -> Result<()> {
    let nodes = rest_addrs_of(client, name).await?;
    let lost = lost_keys(http, &nodes, live).await;
    ensure!(lost == 0, "{step}: {lost} reads failed");
    for node in &nodes {
        for key in gone {
            let (status, body) = http
                .get_json(*node, &format!("/api/v1/cache/{key}"))
                .await?;
            ensure!(
                status == 404,
                "{step}: {key} came back through {node}: {body}"
            );
        }
    }
    let peers: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| SocketAddr::new(n.ip(), 8081))
        .collect();
    let copies = distrocache::copies(http, &peers, live.keys()).await?;
    let wrong: Vec<_> = copies.iter().filter(|(_, n)| **n != 2).take(5).collect();
    ensure!(
        wrong.is_empty(),
        "{step}: keys without exactly 2 copies, e.g. {wrong:?}"
    );
    eprintln!(
        "[{step}] {} keys read through each of {} nodes with 2 copies each, {} deleted keys absent",
        live.len(),
        nodes.len(),
        gone.len()
    );
    Ok(())
}

/// The cache's claims: name -> uid.
async fn claims(client: &kube::Client) -> Result<BTreeMap<String, String>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    Ok(claims
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|c| Some((c.metadata.name?, c.metadata.uid?)))
        .filter(|(name, _)| name.starts_with(&format!("data-{NAME}-")))
        .collect())
}

/// What must survive a restart of an item as a client reads it: everything
/// but the access metadata (tags as a set).
fn kept(item: &Value) -> Value {
    let mut tags: Vec<String> = item["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    tags.sort();
    json!({
        "key": item["key"],
        "value": item["value"],
        "ttl": item["ttl"],
        "created_at": item["created_at"],
        "expires_at": item["expires_at"],
        "tags": tags,
    })
}

/// `kept` of each of `keys` as read through `node`.
async fn sample(http: &CacheClient, node: SocketAddr, keys: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for key in keys {
        let (status, item) = http.get_json(node, &format!("/api/v1/cache/{key}")).await?;
        ensure!(status == 200, "{key} through {node}: {status} {item}");
        out.push(kept(&item));
    }
    Ok(out)
}

async fn metric(http: &CacheClient, node: SocketAddr, series: &str) -> Result<f64> {
    let text = http.text(node, "/metrics").await?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("{node} exposes no {series}"))
}

async fn scenarios(kubelet: &'static Kubelet) -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let _logs = cp.logs_on_panic();
    let client = cp.client().await?;
    let http = CacheClient::default();
    distrocache::installed().await?;
    let file = cp.dir().join("persist-cache.yaml");
    std::fs::write(&file, CACHE)?;
    distrocache::kubectl_apply(cp, &file)?;
    wait_ready(&client, NS, NAME, 3, STEP).await?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let retention = sts
        .get(NAME)
        .await?
        .spec
        .and_then(|s| s.persistent_volume_claim_retention_policy)
        .context("the StatefulSet has a claim retention policy")?;
    ensure!(
        retention.when_deleted.as_deref() == Some("Retain")
            && retention.when_scaled.as_deref() == Some("Retain"),
        "retention policy from the spec: {retention:?}"
    );
    // The claim template cannot change under a StatefulSet: refused at apply.
    let refused = kubectl_ok(
        cp,
        &[
            "patch",
            "distrocache",
            "-n",
            NS,
            NAME,
            "--type=merge",
            "-p",
            r#"{"spec":{"persistence":{"size":"2Gi"}}}"#,
        ],
    );
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("claim templates are immutable")),
        "a change of spec.persistence.size is refused: {refused:?}"
    );
    let claims_before = claims(&client).await?;
    ensure!(
        claims_before.len() == 3,
        "a claim per node: {claims_before:?}"
    );

    // Items with tags and TTLs; then deletes and an invalidation.
    let nodes = rest_addrs(&client).await?;
    let mut live = write_items(&http, &nodes, 0..ITEMS, |i| {
        vec![format!("t{}", i % 10), "all".into()]
    })
    .await?;
    let mut gone = Vec::new();
    for i in 0..300 {
        let key = format!("item:{i}");
        let status = http
            .delete(nodes[i % 3], &format!("/api/v1/cache/{key}"))
            .await?;
        ensure!(status == 200 || status == 204, "delete {key}: {status}");
        live.remove(&key);
        gone.push(key);
    }
    let (status, answer) = http
        .post_json(nodes[1], "/api/v1/invalidate/tag/t3", &json!({}))
        .await?;
    ensure!(status == 200, "invalidation: {status} {answer}");
    let invalidated: Vec<String> = live
        .iter()
        .filter(|(_, v)| v["n"].as_u64().is_some_and(|n| n % 10 == 3))
        .map(|(k, _)| k.clone())
        .collect();
    ensure!(
        invalidated.len() > 1000,
        "{} keys tagged t3",
        invalidated.len()
    );
    for key in &invalidated {
        live.remove(key);
    }
    gone.extend(invalidated.into_iter().take(500));
    check(&http, &client, &live, &gone, "before the restart").await?;
    let sampled: Vec<String> = live.keys().step_by(97).cloned().collect();
    let items_before = sample(&http, nodes[0], &sampled).await?;
    // Items that expire during the restart must not come back with it.
    for i in 0..SHORT_TTL_ITEMS {
        let key = format!("short:{i}");
        let body = json!({"value": {"n": i}, "ttl": 3, "tags": ["short"]});
        let (status, answer) = http
            .post_json(nodes[i % 3], &format!("/api/v1/cache/{key}"), &body)
            .await?;
        ensure!(
            status == 200 || status == 201,
            "write {key}: {status} {answer}"
        );
        gone.push(key);
    }

    // 1. Every pod deleted at once.
    let before = pod_uids(&client).await?;
    kubectl_ok(
        cp,
        &["delete", "pods", "-n", NS, "-l", SELECTOR, "--wait=false"],
    )?;
    wait::until("every pod replaced and ready", STEP, || {
        let client = client.clone();
        let before = before.clone();
        async move {
            let now = pod_uids(&client).await?;
            let replaced = now.len() == 3
                && now.iter().all(|(pod, (uid, ready))| {
                    *ready && before.get(pod).is_none_or(|(old, _)| old != uid)
                });
            Ok(replaced.then_some(()))
        }
    })
    .await?;
    wait_ready(&client, NS, NAME, 3, STEP).await?;
    check(
        &http,
        &client,
        &live,
        &gone,
        "1. after deleting every pod at once",
    )
    .await?;
    let nodes = rest_addrs(&client).await?;
    let mut loaded = 0.0;
    for node in &nodes {
        loaded += metric(&http, *node, "distrocache_snapshot_loaded_items").await?;
    }
    ensure!(
        loaded as usize == live.len() * 2,
        "every copy came from disk: {loaded} loaded for {} keys",
        live.len()
    );
    let items_after = sample(&http, nodes[0], &sampled).await?;
    for (before, after) in items_before.iter().zip(&items_after) {
        ensure!(
            before == after,
            "value, tags, TTL and times kept: before {before}, after {after}"
        );
    }
    eprintln!(
        "[1] {} sampled items identical (value, tags, ttl, created_at, expires_at)",
        sampled.len()
    );
    let claims_after = claims(&client).await?;
    ensure!(
        claims_after == claims_before,
        "the same claims: {claims_before:?} then {claims_after:?}"
    );

    // 2. A corrupt snapshot on one node.
    kubectl_ok(
        cp,
        &[
            "scale",
            "deployment",
            "-n",
            distrocache::OPERATOR_NAMESPACE,
            "distrocache-operator",
            "--replicas=0",
        ],
    )?;
    // Gone, not only unready: an operator still shutting down would set
    // the StatefulSet back to the cache's replicas.
    wait::until("every operator pod gone", STEP, || {
        let pods: Api<Pod> = Api::namespaced(client.clone(), distrocache::OPERATOR_NAMESPACE);
        async move {
            let left = pods
                .list(&ListParams::default().labels(distrocache::OPERATOR_SELECTOR))
                .await?
                .items
                .len();
            Ok((left == 0).then_some(()))
        }
    })
    .await?;
    kubectl_ok(
        cp,
        &["scale", "statefulset", "-n", NS, NAME, "--replicas=0"],
    )?;
    wait::until("every cache pod gone", STEP, || {
        let client = client.clone();
        async move { Ok(pod_uids(&client).await?.is_empty().then_some(())) }
    })
    .await?;
    let claim_name = format!("data-{NAME}-0");
    let claim = kubelet
        .dir()
        .join("claims")
        .join(NS)
        .join(format!("{claim_name}-{}", claims_before[&claim_name]));
    let snapshot = std::fs::read_dir(&claim)
        .with_context(|| format!("{}", claim.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "dcs"))
        .context("persist-0's snapshot")?;
    let mut bytes = std::fs::read(&snapshot)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&snapshot, &bytes)?;
    kubectl_ok(
        cp,
        &["scale", "statefulset", "-n", NS, NAME, "--replicas=3"],
    )?;
    kubectl_ok(
        cp,
        &[
            "scale",
            "deployment",
            "-n",
            distrocache::OPERATOR_NAMESPACE,
            "distrocache-operator",
            &format!("--replicas={}", distrocache::OPERATOR_REPLICAS),
        ],
    )?;
    wait::until("every pod back and ready", STEP, || {
        let client = client.clone();
        async move {
            let now = pod_uids(&client).await?;
            Ok((now.len() == 3 && now.values().all(|(_, ready)| *ready)).then_some(()))
        }
    })
    .await?;
    wait_ready(&client, NS, NAME, 3, STEP).await?;
    check(
        &http,
        &client,
        &live,
        &gone,
        "2. after a restart with a corrupt snapshot",
    )
    .await?;
    let pod0 = node_addresses(&client, NS, NAME, 8080)
        .await?
        .into_iter()
        .find(|(pod, _)| pod == "persist-0")
        .context("persist-0's address")?
        .1;
    let refused = metric(
        &http,
        pod0,
        "distrocache_snapshot_load_refused_total{reason=\"checksum\"}",
    )
    .await?;
    ensure!(
        refused == 1.0,
        "persist-0 counted the refused file: {refused}"
    );
    let aside = std::fs::read_dir(claim.join("corrupt"))?.count();
    ensure!(
        aside == 1,
        "the bad file is kept for inspection ({aside} files)"
    );
    eprintln!(
        "[2] persist-0 refused its corrupt snapshot (kept in corrupt/) and pulled its keys back"
    );
    backup_and_restore(cp, &client, &http, &live, &gone).await
}

const RESTORED: &str = "restored";

/// Step 3: the cache is given a backup schedule, reports a completed
/// backup taken after its last write, and is deleted; a new cache of 2
/// nodes restores that backup and turns Ready with every item.
async fn backup_and_restore(
    cp: &ControlPlane,
    client: &kube::Client,
    http: &CacheClient,
    live: &Written,
    gone: &[String],
) -> Result<()> {
    let s3 = s3_support::S3Server::start();
    let (key_id, secret) = (s3_support::ENV[0].1, s3_support::ENV[1].1);
    let backup = format!(
        "backup: {{url: s3://{bucket}/{NAME}, endpoint: \"{endpoint}\", credentialsSecret: s3-creds, schedule: 3s, keep: 100}}",
        bucket = s3_support::BUCKET,
        endpoint = s3.endpoint
    );
    let file = cp.dir().join("s3-creds.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: s3-creds, namespace: {NS}}}\n\
             stringData: {{accessKeyId: {key_id}, secretAccessKey: {secret}}}\n"
        ),
    )?;
    distrocache::kubectl_apply(cp, &file)?;
    kubectl_ok(
        cp,
        &[
            "patch",
            "distrocache",
            "-n",
            NS,
            NAME,
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{{}}}}}", yaml_to_json(&backup)?),
        ],
    )?;
    // The pods roll to take the new environment; the first slot after the
    // rollout holds every item.
    let caches: Api<distrocache_operator::crd::DistroCache> = Api::namespaced(client.clone(), NS);
    let rolled_at = std::time::SystemTime::now();
    wait::until(
        "a completed backup of every item after the rollout",
        STEP,
        || {
            let caches = caches.clone();
            let want = live.len() as i64 * 2;
            async move {
                let dc = caches.get(NAME).await?;
                let Some(b) = dc.status.and_then(|s| s.last_backup) else {
                    bail!("no backup reported yet");
                };
                let slot: u64 = b.id.trim_start_matches("scheduled-").parse()?;
                let after = std::time::UNIX_EPOCH + Duration::from_secs(slot) > rolled_at;
                if b.phase == "Completed" && after && b.items == want && b.nodes.len() == 3 {
                    Ok(Some(b))
                } else {
                    bail!(
                        "{} {} items {} of {want}, {} nodes",
                        b.id,
                        b.phase,
                        b.items,
                        b.nodes.len()
                    )
                }
            }
        },
    )
    .await
    .map(|b| {
        eprintln!(
            "[3] backup {} completed: {} items, {} bytes",
            b.id, b.items, b.bytes
        )
    })?;
    let id = caches
        .get(NAME)
        .await?
        .status
        .and_then(|s| s.last_backup)
        .context("the backup")?
        .id;
    kubectl_ok(
        cp,
        &["delete", "distrocache", "-n", NS, NAME, "--wait=true"],
    )?;
    wait::until("every pod of the backed-up cache gone", STEP, || {
        let client = client.clone();
        async move { Ok(pod_uids(&client).await?.is_empty().then_some(())) }
    })
    .await?;

    let file = cp.dir().join("restored-cache.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: distrocache.io/v1alpha1\nkind: DistroCache\n\
             metadata: {{name: {RESTORED}, namespace: {NS}}}\n\
             spec:\n  replicas: 2\n  replicationFactor: 2\n  maxSize: 100000\n  \
             {backup}\n  restoreFrom: {{backupId: {id}}}\n"
        ),
    )?;
    distrocache::kubectl_apply(cp, &file)?;
    wait_ready(client, NS, RESTORED, 2, STEP).await?;
    check_cache(
        http,
        client,
        RESTORED,
        live,
        gone,
        "3. restored into a new cache of 2 nodes",
    )
    .await?;
    let mut restored = 0.0;
    for node in rest_addrs_of(client, RESTORED).await? {
        restored += metric(http, node, "distrocache_backup_restored_items").await?;
    }
    ensure!(
        restored as usize == live.len() * 2,
        "every copy came from the backup: {restored} restored for {} keys",
        live.len()
    );
    eprintln!(
        "[3] backup {id} restored into {RESTORED}: {} keys, 2 copies each",
        live.len()
    );
    kubectl_ok(
        cp,
        &["delete", "distrocache", "-n", NS, RESTORED, "--wait=true"],
    )?;
    Ok(())
}

/// `{a: b, ...}` flow YAML as JSON text, for a merge patch.
fn yaml_to_json(yaml: &str) -> Result<String> {
    let value: Value = serde_yaml::from_str(&format!("{{{yaml}}}"))?;
    let text = serde_json::to_string(&value)?;
    Ok(text[1..text.len() - 1].to_owned())
}

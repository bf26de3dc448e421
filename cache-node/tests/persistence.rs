//! Persistence with real processes: nodes with `--data-dir`, stopped with
//! SIGTERM (they write a snapshot) or killed, and started again. Every key
//! written must come back (minus what expired), with its tags and TTL; every
//! delete and tag invalidation made before or during the restarts must stay
//! made; a corrupt snapshot must cost nothing but that node's file.
//!
//! Backups too (`--backup-url`, `--restore-from`), against an S3-compatible
//! server process (`s3_support`): a backup restored into a new cluster of
//! another size brings every item back, deletes made before it stay
//! deleted, and a corrupt object costs only its copy.

mod cluster_support;
mod node_proc;
mod s3_support;
mod tls_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cluster_support::ProcCluster;
use distrocache_membership::MemberState::Active;
use futures_util::StreamExt;
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(90);

fn key(i: usize) -> String {
    format!("user:{i}")
}

fn tag(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "even" } else { "odd" }
}

/// Writes keys `range` through node `via`, each with a one-hour TTL and the
/// tags `[even|odd, all]`.
async fn write(c: &ProcCluster, via: usize, range: std::ops::Range<usize>) {
    futures_util::stream::iter(range.map(|i| {
        let body = json!({"value": {"i": i, "pad": "x".repeat(100)}, "ttl": 3600, "tags": [tag(i), "all"]});
        let request = c
            .client
            .put(c.url(via, &format!("/api/v1/cache/{}", key(i))))
            .json(&body)
            .send();
        async move {
            let resp = request.await.expect("write");
            assert!(resp.status().is_success(), "write {i}: {}", resp.status());
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
}

async fn delete(c: &ProcCluster, via: usize, range: std::ops::Range<usize>) {
    futures_util::stream::iter(range.map(|i| {
        let request = c
            .client
            .delete(c.url(via, &format!("/api/v1/cache/{}", key(i))))
            .send();
        async move {
            let status = request.await.expect("delete").status().as_u16();
            assert!(status == 200 || status == 204, "delete {i}: {status}");
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
}

/// Checks, through every running node's client API, that exactly the keys
/// in `live` of `0..n` are readable, each with its value, tags and TTL.
async fn assert_exactly(c: &ProcCluster, n: usize, live: &HashSet<usize>, what: &str) {
    for via in c.running() {
        let wrong: Vec<String> = futures_util::stream::iter((0..n).map(|i| {
            let request = c
                .client
                .get(c.url(via, &format!("/api/v1/cache/{}", key(i))))
                .send();
            async move {
                let resp = request.await.expect("read");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("JSON answer");
                let ok = if live.contains(&i) {
                    status == 200
                        && body["value"]["i"] == i
                        && body["tags"] == json!([tag(i), "all"])
                        && body["ttl"] == json!(3_600_000_000_000u64)
                } else {
                    status == 404
                };
                (!ok).then(|| format!("{i}: {status} {body}"))
            }
        }))
        .buffer_unordered(64)
        .filter_map(|w| async move { w })
        .collect()
        .await;
        assert!(
            wrong.is_empty(),
            "{what}: {} of {n} keys wrong through node {via}, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

/// Checks that each key of `live` has exactly `copies` copies over the
/// running nodes and each other key of `0..n` none (asked through the peer
/// protocol, so a stale copy on a replica cannot hide behind the primary).
async fn assert_copies(c: &ProcCluster, n: usize, live: &HashSet<usize>, copies: usize) {
    let mut wrong = Vec::new();
    for i in 0..n {
        let mut held = 0;
        for node in c.running() {
            held += usize::from(c.held(node, &key(i)).await.is_some());
        }
        let want = if live.contains(&i) { copies } else { 0 };
        if held != want {
            wrong.push((i, held, want));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} keys with the wrong number of copies (key, held, wanted), e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

async fn metric(c: &ProcCluster, i: usize, series: &str) -> f64 {
    c.metric(i, series)
        .await
        .unwrap_or_else(|| panic!("node {i} exposes no {series}"))
}

async fn started(n: usize, flags: &[&str]) -> (ProcCluster, u64) {
    let mut c = ProcCluster::new(n, 2).with_data_dirs().with_flags(flags);
    let epoch = c.start_members(n, SETTLE).await;
    (c, epoch)
}

/// The whole cache stops at once (SIGTERM to every node) and starts again:
/// every item comes back, with tags and TTL, from the nodes' own
/// snapshots (nothing else holds them), and what was deleted or
/// invalidated before stays gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_brings_every_item_back_and_deletes_stay_deleted() {
    const N: usize = 4000;
    let (mut c, epoch) = started(3, &[]).await;
    write(&c, 0, 0..N).await;
    delete(&c, 1, 0..300).await;
    c.invalidate_tag(2, "odd").await;
    let live: HashSet<usize> = (300..N).filter(|i| i.is_multiple_of(2)).collect();
    assert_exactly(&c, N, &live, "before the restart").await;

    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        assert_eq!(
            std::fs::read_dir(c.data_dir(i))
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".dcs"))
                .count(),
            1,
            "node {i} wrote one snapshot"
        );
    }
    for i in 0..3 {
        c.start(i);
    }
    c.wait_settled(epoch, SETTLE).await;
    assert_exactly(&c, N, &live, "after the whole-cluster restart").await;
    assert_copies(&c, N, &live, 2).await;
    let mut loaded = 0.0;
    for i in 0..3 {
        loaded += metric(&c, i, "distrocache_snapshot_loaded_items").await;
        assert_eq!(
            metric(
                &c,
                i,
                "distrocache_snapshot_restores_total{outcome=\"reconciled\"}"
            )
            .await,
            1.0
        );
    }
    assert_eq!(loaded as usize, live.len() * 2, "every copy came from disk");
}

/// A node stopped while deletes and an invalidation are made: the only
/// other owner then restarts too (so its repair queue, which would have
/// told the first node, is gone). The deletes survive in that owner's
/// snapshot as tombstones, and the first node's snapshot must not bring
/// the keys back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_made_while_a_node_was_down_do_not_come_back_with_its_snapshot() {
    const N: usize = 2000;
    let (mut c, epoch) = started(2, &[]).await;
    write(&c, 0, 0..N).await;
    c.stop(0);
    delete(&c, 1, 0..200).await;
    c.invalidate_tag(1, "odd").await;
    // Rewritten after the invalidation: must survive it.
    write(&c, 1, 1001..1003).await;
    c.stop(1);
    c.start(0);
    c.start(1);
    c.wait_settled(epoch, SETTLE).await;
    let live: HashSet<usize> = (200..N)
        .filter(|i| i.is_multiple_of(2) || (1001..1003).contains(i))
        .collect();
    assert_exactly(&c, N, &live, "after the restarts").await;
    assert_copies(&c, N, &live, 2).await;
    assert_eq!(
        metric(
            &c,
            0,
            "distrocache_snapshot_restores_total{outcome=\"reconciled\"}"
        )
        .await,
        1.0
    );
    let removed = metric(&c, 0, "distrocache_snapshot_restore_removed_items_total").await;
    assert!(
        removed >= 200.0 + 900.0,
        "node-0 removed what was deleted meanwhile: {removed}"
    );
}

/// When a peer remembers more deletes since the snapshot than it can tell
/// (here: more than one small batch), the restarted node cannot know what
/// was deleted, so it discards its snapshot and pulls everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_peers_cannot_vouch_for_is_discarded() {
    const N: usize = 5000;
    let (mut c, epoch) = started(2, &["--rebalance-batch-bytes", "64KiB"]).await;
    write(&c, 0, 0..N).await;
    c.stop(0);
    delete(&c, 1, 0..3000).await;
    c.start(0);
    c.wait_settled(epoch, SETTLE).await;
    let live: HashSet<usize> = (3000..N).collect();
    assert_exactly(&c, N, &live, "after the restart").await;
    assert_copies(&c, N, &live, 2).await;
    assert_eq!(
        metric(
            &c,
            0,
            "distrocache_snapshot_restores_total{outcome=\"discarded\"}"
        )
        .await,
        1.0
    );
}

/// A corrupt snapshot on one node: that node starts without it (the file
/// set aside, counted), and every key comes back from its other copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_costs_only_its_file() {
    const N: usize = 3000;
    let (mut c, epoch) = started(3, &[]).await;
    write(&c, 0, 0..N).await;
    for i in 0..3 {
        c.stop(i);
    }
    let file = std::fs::read_dir(c.data_dir(0))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dcs"))
        .expect("node-0's snapshot");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    for i in 0..3 {
        c.start(i);
    }
    c.wait_settled(epoch, SETTLE).await;
    let live: HashSet<usize> = (0..N).collect();
    assert_exactly(&c, N, &live, "after a restart with a corrupt snapshot").await;
    assert_copies(&c, N, &live, 2).await;
    assert_eq!(
        metric(
            &c,
            0,
            "distrocache_snapshot_load_refused_total{reason=\"checksum\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&c, 0, "distrocache_snapshot_loaded_items").await,
        0.0
    );
    let aside = std::fs::read_dir(c.data_dir(0).join("corrupt"))
        .unwrap()
        .count();
    assert_eq!(aside, 1, "the bad file is kept for inspection");
}

/// A single node with periodic snapshots, killed with SIGKILL (no snapshot
/// at shutdown): it comes back with what its last periodic snapshot held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_single_node_comes_back_from_its_periodic_snapshot() {
    const N: usize = 1000;
    let mut c = ProcCluster::new(1, 1)
        .with_data_dirs()
        .with_flags(&["--snapshot-interval", "200ms"]);
    let epoch = c.start_members(1, SETTLE).await;
    write(&c, 0, 0..N).await;
    c.wait_node_metric(
        0,
        "distrocache_snapshot_last_write_items",
        N as f64,
        Duration::from_secs(30),
        "no periodic snapshot with every item",
    )
    .await;
    c.kill(0);
    c.start(0);
    c.wait_settled(epoch, SETTLE).await;
    let live: HashSet<usize> = (0..N).collect();
    assert_exactly(&c, N, &live, "after kill -9").await;
}

/// `n` nodes (replication factor 2) backing up to `s3` under `prefix`, with
/// `extra` flags, all members of one ring and started; returns the cluster
/// and the ring's epoch.
fn backing_up(
    s3: &s3_support::S3Server,
    prefix: &str,
    n: usize,
    extra: &[&str],
) -> (ProcCluster, u64) {
    let mut flags = s3.flags(prefix);
    flags.extend(extra.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut c = ProcCluster::new(n, 2)
        .with_flags(&flags)
        .with_env(s3_support::ENV);
    let members: Vec<_> = (0..n).map(|i| (i, Active)).collect();
    let epoch = c.set_ring(&members);
    for i in 0..n {
        c.start(i);
    }
    (c, epoch)
}

/// Asks every running node for its part of backup `id`; returns the items
/// each uploaded.
async fn backup(c: &ProcCluster, id: &str) -> Vec<u64> {
    let mut items = Vec::new();
    for i in c.running() {
        let resp = c
            .client
            .put(c.url(i, &format!("/api/v1/backups/{id}")))
            .send()
            .await
            .expect("backup");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("JSON answer");
        assert_eq!(status, 201, "node {i} backed up: {body}");
        assert_eq!(body["id"], id);
        items.push(body["items"].as_u64().expect("items"));
    }
    items
}

/// A cache of 3 nodes is backed up (one item in three bigger than a
/// multipart upload's part, so each node's object goes up in parts), then
/// gone; a new cache of 2 nodes restores it: every item is back with its
/// tags and TTL, two copies each, and what was deleted or invalidated
/// before the backup stays gone. The id cannot be written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_new_cluster_of_another_size() {
    const N: usize = 3000;
    let s3 = s3_support::S3Server::start();
    let (c, epoch) = backing_up(&s3, "team-a", 3, &[]);
    c.wait_settled(epoch, SETTLE).await;
    write(&c, 0, 0..N).await;
    // 600 items of 24 KiB: about 10 MiB per node, over one 8 MiB part.
    let big = json!({"value": "b".repeat(24 << 10), "ttl": 3600, "tags": ["big"]});
    futures_util::stream::iter((0..600).map(|i| {
        let request = c
            .client
            .put(c.url(1, &format!("/api/v1/cache/big:{i}")))
            .json(&big)
            .send();
        async move { assert!(request.await.expect("write").status().is_success()) }
    }))
    .buffer_unordered(16)
    .collect::<Vec<()>>()
    .await;
    delete(&c, 1, 0..300).await;
    c.invalidate_tag(2, "odd").await;
    let live: HashSet<usize> = (300..N).filter(|i| i.is_multiple_of(2)).collect();

    let uploaded = backup(&c, "nightly-1").await;
    assert_eq!(
        uploaded.iter().sum::<u64>() as usize,
        (live.len() + 600) * 2,
        "every copy went up: {uploaded:?}"
    );
    let again = c
        .client
        .put(c.url(0, "/api/v1/backups/nightly-1"))
        .send()
        .await
        .expect("backup again");
    assert_eq!(again.status().as_u16(), 409, "a backup id is written once");
    for bad in [".hidden", "scheduled-1764720000"] {
        let resp = c
            .client
            .put(c.url(0, &format!("/api/v1/backups/{bad}")))
            .send()
            .await
            .expect("bad id");
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
    }
    drop(c);

    let (mut r, epoch) = backing_up(&s3, "team-a", 2, &["--restore-from", "nightly-1"]);
    r.wait_settled(epoch, SETTLE).await;
    assert_exactly(&r, N, &live, "after the restore").await;
    assert_copies(&r, N, &live, 2).await;
    for i in 0..600 {
        for node in 0..2 {
            let item = r
                .held(node, &format!("big:{i}"))
                .await
                .expect("a big item on both nodes");
            assert_eq!(item["value"].as_str().map(str::len), Some(24 << 10));
        }
    }
    for i in 0..2 {
        assert_eq!(
            metric(&r, i, "distrocache_backup_restores_total{outcome=\"ok\"}").await,
            1.0
        );
        assert_eq!(
            metric(
                &r,
                i,
                "distrocache_backup_restore_objects_total{outcome=\"ok\"}"
            )
            .await,
            3.0,
            "node {i} read the three nodes' objects"
        );
        assert_eq!(
            metric(&r, i, "distrocache_backup_restored_items").await as usize,
            live.len() + 600,
            "node {i} kept what it owns (rf 2 of 2: everything)"
        );
    }

    // A node of the restored cache restarts (kill -9, no snapshot): the
    // cache serves, so it pulls from its peer instead of the backup.
    r.kill(0);
    r.start(0);
    r.wait_settled(epoch, SETTLE).await;
    r.wait_for_log(0, "the cache already serves", Duration::from_secs(30))
        .await;
    assert_exactly(&r, N, &live, "after a restart in the restored cache").await;
    assert_copies(&r, N, &live, 2).await;
}

/// A new cache told to restore a backup that does not exist stays not
/// ready (saying why) rather than starting empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_waits_for_a_backup_that_does_not_exist() {
    let s3 = s3_support::S3Server::start();
    let (c, _) = backing_up(&s3, "nothing", 2, &["--restore-from", "missing"]);
    for i in 0..2 {
        c.wait_for_log(i, "cannot restore the backup yet", Duration::from_secs(30))
            .await;
    }
    // Several retries later, still waiting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..2 {
        assert!(
            !c.is_ready(i).await,
            "node {i} is not ready without its backup"
        );
    }
}

/// One node's object of a backup is corrupt: the restore refuses it (and
/// counts why), and every key comes back from its other copy, in the other
/// nodes' objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_backup_object_costs_only_its_copy() {
    const N: usize = 3000;
    let s3 = s3_support::S3Server::start();
    let (c, epoch) = backing_up(&s3, "team-b", 3, &[]);
    c.wait_settled(epoch, SETTLE).await;
    write(&c, 0, 0..N).await;
    backup(&c, "b").await;
    let ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    drop(c);

    let object = s3.object_url(&format!("team-b/b/{}.dcs", ids[0]));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut bytes = http
        .get(&object)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    http.put(&object)
        .body(bytes)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    let (r, epoch) = backing_up(&s3, "team-b", 3, &["--restore-from", "b"]);
    r.wait_settled(epoch, SETTLE).await;
    let live: HashSet<usize> = (0..N).collect();
    assert_exactly(&r, N, &live, "after a restore with a corrupt object").await;
    assert_copies(&r, N, &live, 2).await;
    for i in 0..3 {
        assert_eq!(
            metric(
                &r,
                i,
                "distrocache_backup_restore_objects_total{outcome=\"checksum\"}"
            )
            .await,
            1.0,
            "node {i} refused the corrupt object"
        );
        assert_eq!(
            metric(
                &r,
                i,
                "distrocache_backup_restore_objects_total{outcome=\"ok\"}"
            )
            .await,
            2.0
        );
    }
}

/// A single node (no cluster) restores a backup before it listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_restores_a_backup_before_it_serves() {
    const N: usize = 500;
    let s3 = s3_support::S3Server::start();
    let mut flags = s3.flags("single");
    let mut launch = node_proc::Launch::new().args(&flags);
    for (k, v) in s3_support::ENV {
        launch = launch.env(k, v);
    }
    let node = launch.spawn();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for i in 0..N {
        let body = json!({"value": {"i": i}, "ttl": 3600, "tags": [tag(i)]});
        let resp = http
            .put(node.url(&format!("/api/v1/cache/{}", key(i))))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    let resp = http
        .put(node.url("/api/v1/backups/one"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    node.kill();

    flags.extend(["--restore-from".to_owned(), "one".to_owned()]);
    let mut launch = node_proc::Launch::new().args(&flags);
    for (k, v) in s3_support::ENV {
        launch = launch.env(k, v);
    }
    let node = launch.spawn();
    for i in 0..N {
        let resp = http
            .get(node.url(&format!("/api/v1/cache/{}", key(i))))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{} is back", key(i));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["value"]["i"], i);
        assert_eq!(body["tags"], json!([tag(i)]));
        assert_eq!(body["ttl"], json!(3_600_000_000_000u64));
    }
    // A backup id that does not exist: the node refuses to start, naming it.
    let mut missing = std::process::Command::new(node_proc::cache_node_bin())
        .args(s3.flags("single"))
        .args(["--port", "0", "--restore-from", "missing"])
        .envs(s3_support::ENV.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = missing.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            missing.kill().unwrap();
            panic!("a node told to restore a missing backup still runs after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut missing.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("--restore-from missing: no backup missing"),
        "{stderr}"
    );
}

/// With `--backup-schedule`, every node uploads at each slot under the
/// same id, reports it in its progress (where the operator reads it), and
/// keeps only the newest `--backup-keep` of its scheduled backups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_share_an_id_report_it_and_keep_the_newest() {
    const N: usize = 400;
    let s3 = s3_support::S3Server::start();
    let schedule = ["--backup-schedule", "1s", "--backup-keep", "2"];
    let (c, epoch) = backing_up(&s3, "sched", 2, &schedule);
    c.wait_settled(epoch, SETTLE).await;
    write(&c, 0, 0..N).await;

    // Wait for three slots uploaded after the writes, with every item.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "three scheduled backups within 60 s: {seen:?}"
        );
        let reports: Vec<_> = futures_util::future::join_all((0..2).map(|i| c.progress(i)))
            .await
            .into_iter()
            .map(|p| p.expect("progress").last_backup)
            .collect();
        if let [Some(a), Some(b)] = &reports[..]
            && a.id == b.id
            && a.items == N as u64
            && b.items == N as u64
            && !seen.contains(&a.id)
        {
            assert!(a.error.is_none() && b.error.is_none(), "{reports:?}");
            assert!(a.id.starts_with("scheduled-"), "{}", a.id);
            assert!(
                a.object
                    .ends_with(&format!("/{}/{}.dcs", a.id, c.nodes[0].id)),
                "{}",
                a.object
            );
            seen.push(a.id.clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each node keeps its part of the newest two.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let list_url = format!(
        "{}/{}?list-type=2&prefix=sched/",
        s3.endpoint,
        s3_support::BUCKET
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listing = http
            .get(&list_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let keys: Vec<&str> = listing
            .split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .collect();
        let per_node: Vec<usize> = c
            .nodes
            .iter()
            .map(|n| {
                keys.iter()
                    .filter(|k| k.ends_with(&format!("/{}.dcs", n.id)))
                    .count()
            })
            .collect();
        // Pruning follows each upload: between the two a node may hold
        // one more than it keeps, never more than that.
        assert!(
            per_node.iter().all(|&n| n <= 3),
            "each node keeps 2 scheduled backups (3 while pruning), found {per_node:?}: {keys:?}"
        );
        // The oldest seen is pruned; the newest kept are at least as new as
        // the last seen.
        let ids: Vec<&str> = keys.iter().filter_map(|k| k.split('/').nth(1)).collect();
        let oldest_gone = !ids.contains(&seen[0].as_str());
        let newest_kept = ids.iter().any(|id| *id >= seen[2].as_str());
        if per_node == [2, 2] && oldest_gone && newest_kept {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "each node keeps its 2 newest scheduled backups, found {per_node:?}: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! Cluster mode with real processes: `cache-node` nodes on their own
//! loopback addresses, a membership file the test rewrites to change the
//! ring, and clients talking REST to random nodes. Every scenario counts the
//! keys it cannot read back; the bar is zero.

mod cluster_support;
mod node_proc;
mod tls_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cache_node::cluster::leases::{LEASE, RENEW_EVERY};
use cluster_support::ProcCluster;
use distrocache_membership::MemberState::{Active, Joining, Leaving};
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{Value, json};

const KEYS: usize = 10_000;
const SETTLE: Duration = Duration::from_secs(60);
const LEASE_VALID: &str = "distrocache_read_lease_valid";

fn key(i: usize) -> String {
    // Characters that need escaping in a path, to keep that honest too.
    format!("user:{i}/profile")
}

fn encoded(key: &str) -> String {
    key.replace('/', "%2F")
}

fn tag(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "even" } else { "odd" }
}

/// Writes keys `range` through random running nodes, 64 at a time; returns
/// the value written for each.
async fn write_keys(
    c: &ProcCluster,
    range: std::ops::Range<usize>,
    round: u32,
) -> HashMap<String, Value> {
    let running = c.running();
    let writes = futures_util::stream::iter(range.map(|i| {
        let node = running[rand::rng().random_range(0..running.len())];
        let value = json!({"i": i, "round": round, "pad": "x".repeat(64)});
        let url = c.url(node, &format!("/api/v1/cache/{}", encoded(&key(i))));
        let body = json!({"value": value, "ttl": 3600, "tags": [tag(i), "all"]});
        let request = c.client.post(url).json(&body).send();
        async move {
            let resp = request.await.expect("write request");
            let status = resp.status().as_u16();
            assert!(
                status == 201 || status == 200,
                "write of {i} via node {node}: {status} {}",
                resp.text().await.unwrap_or_default()
            );
            (key(i), value)
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    writes.into_iter().collect()
}

/// Reads every key through node `via`; returns the keys missing or wrong.
async fn missing_through(
    c: &ProcCluster,
    via: usize,
    expected: &HashMap<String, Value>,
) -> Vec<String> {
    futures_util::stream::iter(expected.iter().map(|(k, v)| {
        let url = c.url(via, &format!("/api/v1/cache/{}", encoded(k)));
        let request = c.client.get(url).send();
        async move {
            let resp = request.await.expect("read request");
            let ok = resp.status().as_u16() == 200
                && resp
                    .json::<Value>()
                    .await
                    .is_ok_and(|item| item["value"] == *v && item["key"] == **k);
            (!ok).then(|| k.clone())
        }
    }))
    .buffer_unordered(64)
    .filter_map(|missing| async move { missing })
    .collect::<Vec<_>>()
    .await
}

async fn assert_all_readable(c: &ProcCluster, expected: &HashMap<String, Value>, what: &str) {
    for via in c.running() {
        let missing = missing_through(c, via, expected).await;
        assert!(
            missing.is_empty(),
            "{what}: {} of {} keys missing or wrong through node {via}, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(5)]
        );
    }
    eprintln!(
        "{what}: all {} keys readable through each of {} nodes; 0 lost",
        expected.len(),
        c.running().len()
    );
}

/// Asks every running node (through the peer protocol) which keys it holds,
/// and checks each key has exactly `copies` copies, each with the value
/// written: no replica went missing or stale (reads alone cannot tell,
/// since one owner serves them) and none lingers where it is no longer
/// owned. Valid once the cluster has settled.
async fn assert_copies(
    c: &ProcCluster,
    expected: &HashMap<String, Value>,
    copies: usize,
    what: &str,
) {
    let wrong = wrong_copies(c, expected, copies).await;
    assert!(
        wrong.is_empty(),
        "{what}: {} keys without exactly {copies} copies of the value written, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// [`assert_copies`] once repairs have had time to run: waits (up to
/// `SETTLE`) until every key has exactly `copies` copies of its value.
async fn wait_copies(
    c: &ProcCluster,
    expected: &HashMap<String, Value>,
    copies: usize,
    what: &str,
) {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let wrong = wrong_copies(c, expected, copies).await;
        if wrong.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {} keys still without exactly {copies} copies of the value written after {SETTLE:?}, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Keys whose count of copies holding the expected value is not `copies`,
/// with the (copies of the value, copies in all) found.
async fn wrong_copies(
    c: &ProcCluster,
    expected: &HashMap<String, Value>,
    copies: usize,
) -> Vec<(String, usize, usize)> {
    let mut held: HashMap<&str, (usize, usize)> = HashMap::new();
    for i in c.running() {
        let found: Vec<(&str, bool)> =
            futures_util::stream::iter(expected.iter().map(|(k, v)| async move {
                c.held(i, k)
                    .await
                    .map(|item| (k.as_str(), item["value"] == *v))
            }))
            .buffer_unordered(256)
            .filter_map(|k| async move { k })
            .collect()
            .await;
        for (k, right) in found {
            let entry = held.entry(k).or_default();
            entry.0 += usize::from(right);
            entry.1 += 1;
        }
    }
    expected
        .keys()
        .map(|k| {
            let (right, all) = held.get(k.as_str()).copied().unwrap_or((0, 0));
            (k.clone(), right, all)
        })
        .filter(|&(_, right, all)| right != copies || all != copies)
        .collect()
}

async fn cluster_items(c: &ProcCluster, via: usize) -> u64 {
    let (status, stats) = c.get_json(via, "/api/v1/cluster/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["unreachable"], json!([]), "{stats}");
    stats["totals"]["items"].as_u64().expect("items")
}

/// How a scenario's cluster is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    Open,
    /// Every node requires tokens and serves its peer API on its own port.
    Tokens,
    /// Tokens, and mutual TLS on the peer port.
    TokensAndPeerMtls,
}

/// Starts nodes 0..n as one active ring and waits for it to settle, secured
/// as `security` says.
async fn started(n: usize, rf: u32, security: Security) -> ProcCluster {
    let mut c = ProcCluster::new(n, rf);
    if security != Security::Open {
        c = c.with_auth();
    }
    if security == Security::TokensAndPeerMtls {
        c = c.with_peer_mtls();
    }
    start_members(c, n).await
}

/// Starts the first `members` slots of `c` as the active members of its
/// first ring and waits for them to settle (the other slots stay free for
/// nodes the test adds later).
async fn start_members(mut c: ProcCluster, members: usize) -> ProcCluster {
    c.start_members(members, SETTLE).await;
    c
}

/// Peer timeouts short enough that a fault test outlasts several of them.
const SHORT_PEER_TIMEOUTS: &[&str] = &["--peer-timeout", "1s", "--peer-connect-timeout", "500ms"];

/// `n` settled nodes, each owning every key (replication factor `n`,
/// `flags` on all), and a key whose primary is node-0: node-0 coordinates
/// its writes, and node-1 is a replica (which keeps its own copy of the
/// writes it forwards, see `Request::Set`).
async fn primary_and_replicas(n: usize, flags: &[&str], prefix: &str) -> (ProcCluster, String) {
    let c = ProcCluster::new(n, n as u32).with_flags(flags);
    every_node_an_owner(c, prefix).await
}

/// [`primary_and_replicas`] from a cluster already set up (its slots not
/// started): a ring of every slot as an active member, each started and
/// settled, and a key whose primary is node-0.
async fn every_node_an_owner(mut c: ProcCluster, prefix: &str) -> (ProcCluster, String) {
    let n = c.nodes.len();
    c.start_members(n, SETTLE).await;
    let key = (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| c.primary_of(k) == "node-0")
        .expect("some key");
    (c, key)
}

/// Whether node-0 and node-1 hold the same version of `key`, of `value`;
/// the two values held, if not.
async fn same_copies(c: &ProcCluster, key: &str, value: &str) -> Result<(), (Value, Value)> {
    let primary = c.held(0, key).await.expect("on node-0");
    let kept = c.held(1, key).await.expect("on node-1");
    let same = ["value", "created_at", "expires_at", "tags"]
        .iter()
        .all(|field| primary[field] == kept[field]);
    match same && primary["value"] == value {
        true => Ok(()),
        false => Err((primary["value"].clone(), kept["value"].clone())),
    }
}

/// Waits (up to 30 s) until node-0 and node-1 hold the same version of
/// `key`, of `value`.
async fn wait_same_copies(c: &ProcCluster, key: &str, value: &str, after: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err((primary, kept)) = same_copies(c, key, value).await {
        assert!(
            std::time::Instant::now() < deadline,
            "copies apart after {after}: node-0 {primary}, node-1 {kept}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Secured, a smaller data set keeps the extra runs short.
async fn three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere_scenario(
    security: Security,
) {
    let keys = if security != Security::Open {
        3_000
    } else {
        KEYS
    };
    let c = started(3, 2, security).await;
    let written = write_keys(&c, 0..keys, 1).await;
    assert_all_readable(&c, &written, "3 nodes, rf 2").await;
    assert_copies(&c, &written, 2, "3 nodes, rf 2").await;
    assert_eq!(
        cluster_items(&c, 0).await,
        2 * keys as u64,
        "each key is held by exactly 2 nodes"
    );

    // The answer names the node that served it, and that node owns the key.
    let k = key(42);
    let resp = c
        .client
        .get(c.url(0, &format!("/api/v1/cache/{}", encoded(&k))))
        .send()
        .await
        .unwrap();
    let served_by = resp.headers()["x-distrocache-served-by"]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, view) = c
        .get_json(1, &format!("/api/v1/cluster?key={}", encoded(&k)))
        .await;
    let owners: Vec<&str> = view["owners"]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 2);
    assert_eq!(
        served_by, view["owners"]["primary"],
        "reads are served by the primary"
    );

    // Tag invalidation through one node reaches every node.
    let body = c.invalidate_tag(1, "even").await;
    assert_eq!(body["tag"], "even");
    assert_eq!(
        body["invalidated"],
        keys / 2,
        "distinct items, not copies: {body}"
    );
    assert_eq!(body["removed_copies"], keys, "{body}");
    assert_eq!(body["unreachable"], json!([]));
    for via in 0..3 {
        for i in (0..keys).step_by(7) {
            let resp = c
                .client
                .get(c.url(via, &format!("/api/v1/cache/{}", encoded(&key(i)))))
                .send()
                .await
                .unwrap();
            let expected = if tag(i) == "even" { 404 } else { 200 };
            assert_eq!(
                resp.status().as_u16(),
                expected,
                "key {i} through node {via}"
            );
        }
    }
    let odd: HashMap<String, Value> = written
        .into_iter()
        .filter(|(k, _)| {
            k.trim_start_matches("user:")
                .trim_end_matches("/profile")
                .parse::<usize>()
                .unwrap()
                % 2
                == 1
        })
        .collect();
    assert_all_readable(&c, &odd, "after invalidating \"even\"").await;
    assert_eq!(cluster_items(&c, 2).await, keys as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere() {
    three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere_scenario(Security::Open)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere_with_auth() {
    three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere_scenario(Security::Tokens)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere_with_peer_mtls() {
    three_nodes_serve_any_key_from_any_node_and_invalidate_everywhere_scenario(
        Security::TokensAndPeerMtls,
    )
    .await;
}

async fn adding_a_node_moves_its_share_and_loses_nothing_scenario(security: Security) {
    let keys = if security != Security::Open {
        3_000
    } else {
        KEYS
    };
    let mut c = started(3, 2, security).await;
    let written = write_keys(&c, 0..keys, 1).await;

    let new = c.add_slot();
    let epoch = c.set_ring(&[(0, Active), (1, Active), (2, Active), (new, Joining)]);
    c.start(new);
    c.wait_settled(epoch, SETTLE).await;
    // Readable while the new member is still joining, too.
    assert_all_readable(&c, &written, "4th node joining").await;
    let epoch = c.set_ring(&[(0, Active), (1, Active), (2, Active), (new, Active)]);
    c.wait_settled(epoch, SETTLE).await;
    assert_all_readable(&c, &written, "4th node active").await;
    assert_copies(&c, &written, 2, "4th node active").await;

    let progress = c.progress(new).await.expect("progress");
    let moved = progress.keys_received as f64 / keys as f64;
    eprintln!(
        "adding a 4th node (rf 2): {} of {keys} keys gained an owner ({:.1}%; ideal rf/N = 50%), \
         i.e. {:.1}% of the {} stored copies moved (ideal 1/N = 25%); pull took {:.3}s",
        progress.keys_received,
        moved * 100.0,
        moved * 50.0,
        2 * keys,
        progress.last_sync_seconds,
    );
    assert!((0.45..0.55).contains(&moved), "moved fraction {moved}");
    assert_eq!(
        cluster_items(&c, 0).await,
        2 * keys as u64,
        "old owners dropped what they gave away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_moves_its_share_and_loses_nothing() {
    adding_a_node_moves_its_share_and_loses_nothing_scenario(Security::Open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_moves_its_share_and_loses_nothing_with_auth() {
    adding_a_node_moves_its_share_and_loses_nothing_scenario(Security::Tokens).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_moves_its_share_and_loses_nothing_with_peer_mtls() {
    adding_a_node_moves_its_share_and_loses_nothing_scenario(Security::TokensAndPeerMtls).await;
}

async fn a_leaving_node_hands_off_before_it_is_removed_scenario(security: Security) {
    let keys = if security != Security::Open {
        3_000
    } else {
        KEYS
    };
    let mut c = started(4, 2, security).await;
    let written = write_keys(&c, 0..keys, 1).await;
    let before = c.progress(1).await.unwrap().items;

    let epoch = c.set_ring(&[(0, Active), (1, Leaving), (2, Active), (3, Active)]);
    let handoff = c.wait_handoff(1, SETTLE).await;
    assert!(handoff.synced_epoch >= epoch);
    eprintln!(
        "leaving node-1 held {before} items and sent {} keys to their new owners",
        handoff.keys_sent
    );
    // Still a member while leaving: writes reach the new owners.
    let more = write_keys(&c, keys..keys + 500, 2).await;

    let epoch = c.set_ring(&[(0, Active), (2, Active), (3, Active)]);
    c.wait_settled(epoch, SETTLE).await;
    c.kill(1);
    let mut all = written;
    all.extend(more);
    assert_all_readable(&c, &all, "after node-1 left").await;
    assert_copies(&c, &all, 2, "after node-1 left").await;
    assert_eq!(cluster_items(&c, 0).await, 2 * all.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_hands_off_before_it_is_removed() {
    a_leaving_node_hands_off_before_it_is_removed_scenario(Security::Open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_hands_off_before_it_is_removed_with_auth() {
    a_leaving_node_hands_off_before_it_is_removed_scenario(Security::Tokens).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_hands_off_before_it_is_removed_with_peer_mtls() {
    a_leaving_node_hands_off_before_it_is_removed_scenario(Security::TokensAndPeerMtls).await;
}

async fn killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back_scenario(
    security: Security,
) {
    let keys = if security != Security::Open {
        3_000
    } else {
        KEYS
    };
    let mut c = started(3, 2, security).await;
    let mut written = write_keys(&c, 0..keys, 1).await;

    c.kill(0);
    assert_all_readable(&c, &written, "node-0 killed").await;
    // Writes while a replica is down are answered; node-0 gets them later.
    written.extend(write_keys(&c, keys..keys + 300, 2).await);

    c.start(0);
    c.wait_ready(0, SETTLE).await;
    let pulled = c.progress(0).await.unwrap();
    eprintln!(
        "node-0 restarted empty and pulled {} keys in {:.3}s ({:.0} keys/s)",
        pulled.keys_received,
        pulled.last_sync_seconds,
        pulled.keys_received as f64 / pulled.last_sync_seconds.max(1e-6)
    );
    assert!(pulled.items > 0);

    assert_copies(&c, &written, 2, "node-0 back").await;
    c.kill(1);
    assert_all_readable(&c, &written, "node-0 back, node-1 killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back() {
    killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back_scenario(Security::Open)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back_with_auth() {
    killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back_scenario(Security::Tokens)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back_with_peer_mtls() {
    killed_nodes_lose_nothing_and_a_restarted_node_pulls_its_keys_back_scenario(
        Security::TokensAndPeerMtls,
    )
    .await;
}

/// A rolling restart as Kubernetes does it: the pod comes back empty with a
/// new IP, first reads the ring with its old address, then the operator
/// publishes the new address (a new epoch) while the node is still pulling,
/// and clients keep reading meanwhile: a read may find a node down, but
/// must never get a false 404. Every key must end with two copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_at_a_new_address_pulls_every_key() {
    // Small pull batches stretch each pull over many requests, so reads
    // really do land on a node while it is still pulling.
    let mut c = ProcCluster::new(2, 2).with_flags(&["--rebalance-batch-items", "50"]);
    c.start_members(2, SETTLE).await;
    let written = write_keys(&c, 0..KEYS, 1).await;
    assert_copies(&c, &written, 2, "before the restarts").await;
    let keys: Arc<Vec<String>> = Arc::new(written.keys().map(|k| encoded(k)).collect());
    for (round, node) in [1usize, 0, 1].into_iter().enumerate() {
        // Readers go through the node that stays up; it forwards the keys
        // the restarting node is primary of to it, mid-pull.
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..8)
            .map(|r| {
                let (client, keys, stop) = (c.client.clone(), keys.clone(), stop.clone());
                let base = c.url(1 - node, "/api/v1/cache/");
                tokio::spawn(async move {
                    let mut false_misses = Vec::new();
                    let mut i = r * 997;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 7919) % keys.len();
                        let answer = client.get(format!("{base}{}", keys[i])).send().await;
                        if answer.is_ok_and(|a| a.status() == 404) {
                            false_misses.push(keys[i].clone());
                        }
                    }
                    false_misses
                })
            })
            .collect();
        c.kill(node);
        c.readdress(node, 40 + round as u8);
        c.start(node);
        tokio::time::sleep(Duration::from_millis(150 * round as u64 + 50)).await;
        let epoch = c.set_ring(&[(0, Active), (1, Active)]);
        c.wait_settled(epoch, SETTLE).await;
        stop.store(true, Ordering::Relaxed);
        let mut false_misses = Vec::new();
        for reader in readers {
            false_misses.extend(reader.await.expect("the reader ran"));
        }
        assert!(
            false_misses.is_empty(),
            "round {round}: {} reads answered 404 for keys that exist, e.g. {:?}",
            false_misses.len(),
            &false_misses[..false_misses.len().min(5)]
        );
        assert_copies(
            &c,
            &written,
            2,
            &format!("round {round}: node-{node} back at a new address"),
        )
        .await;
    }
    assert_all_readable(&c, &written, "after three restarts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_where_they_should_be_and_only_there() {
    let c = started(2, 2, Security::Tokens).await;
    let bare = reqwest::Client::new();
    let node = c.nodes[0].addr;
    let peer = c.nodes[0].peer_addr;
    for (url, auth, expected) in [
        (format!("http://{node}/api/v1/cache/k"), None, 401),
        (
            format!("http://{node}/api/v1/cache/k"),
            Some("Bearer wrong"),
            401,
        ),
        (
            format!("http://{node}/api/v1/cache/k"),
            Some("Bearer peer-secret-token"),
            401,
        ),
        (
            format!("http://{node}/api/v1/cache/k"),
            Some("Bearer client-secret-token"),
            404,
        ),
        (format!("http://{node}/api/v1/stats"), None, 401),
        (format!("http://{node}/api/v1/cluster"), None, 401),
        (format!("http://{peer}/internal/v1/connect"), None, 401),
        (
            format!("http://{peer}/internal/v1/connect"),
            Some("Bearer client-secret-token"),
            401,
        ),
        (
            format!("http://{peer}/internal/v1/connect"),
            Some("Bearer peer-secret-token"),
            101,
        ),
        // The peer API is not served on the client port, nor the reverse.
        (
            format!("http://{node}/internal/v1/connect"),
            Some("Bearer peer-secret-token"),
            404,
        ),
        (
            format!("http://{peer}/api/v1/cache/k"),
            Some("Bearer client-secret-token"),
            404,
        ),
        // Probes, Prometheus and the operator need no token.
        (format!("http://{node}/api/v1/health"), None, 200),
        (format!("http://{node}/api/v1/ready"), None, 200),
        (format!("http://{node}/metrics"), None, 200),
        (format!("http://{node}/api/v1/cluster/rebalance"), None, 200),
    ] {
        let mut request = bare
            .get(&url)
            .header("connection", "upgrade")
            .header("upgrade", "distrocache-peer/1");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let resp = request.send().await.unwrap();
        let status = resp.status().as_u16();
        if status == 101 {
            assert_eq!(expected, 101, "{url} with {auth:?}: upgraded");
            continue;
        }
        let text = resp.text().await.unwrap();
        assert_eq!(status, expected, "{url} with {auth:?}: {text}");
        if status == 401 {
            let body: Value = serde_json::from_str(&text).expect("a JSON error");
            assert!(body["error"].is_string(), "{text}");
        }
    }

    // The same tokens in X-DistroCache-Token, the header a proxy that
    // takes Authorization (kube-apiserver's) lets through: a write and a
    // read with it, and the same refusals as the bearer token.
    let item = format!("http://{node}/api/v1/cache/through-a-proxy");
    let with_token = |request: reqwest::RequestBuilder, token: &str| {
        request
            .header("x-distrocache-token", token)
            // What the proxy sends on: its own credentials are not the node's.
            .header("authorization", "Bearer the-users-kubernetes-token")
    };
    let resp = with_token(bare.put(&item), "client-secret-token")
        .json(&serde_json::json!({"value": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let resp = with_token(bare.get(&item), "client-secret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["value"], 7);
    for token in ["wrong", "peer-secret-token", "Bearer client-secret-token"] {
        let resp = with_token(bare.get(&item), token).send().await.unwrap();
        assert_eq!(resp.status(), 401, "client API with {token:?}");
        let body: Value = resp.json().await.expect("a JSON error");
        assert_eq!(body["error"], "invalid bearer token");
    }
    let resp = bare
        .get(format!("http://{peer}/internal/v1/connect"))
        .header("connection", "upgrade")
        .header("upgrade", "distrocache-peer/1")
        .header("x-distrocache-token", "client-secret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "the peer API takes only the peer token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stalls_is_repaired_when_it_answers_again() {
    let (c, key) = primary_and_replicas(2, SHORT_PEER_TIMEOUTS, "stalled").await;
    let repairs_before = c
        .metric(0, r#"distrocache_peer_requests_total{operation="repair"}"#)
        .await
        .unwrap_or(0.0);

    // SIGSTOP: the replica accepts connections (the kernel does) but never answers.
    c.signal(1, libc::SIGSTOP);
    let resp = c
        .client
        .put(c.url(0, &format!("/api/v1/cache/{key}")))
        .json(&json!({"value": "written while node-1 stalled"}))
        .send()
        .await
        .unwrap();
    // While node-1 stays stalled the missed write waits in the repair queue
    // (up to 20 s: a debug build with the whole suite running is slow).
    let mut hinted = None;
    for _ in 0..200 {
        hinted = c.metric(0, "distrocache_replication_pending_repairs").await;
        if hinted == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.signal(1, libc::SIGCONT);
    assert!(
        resp.status().is_success(),
        "the write is answered with a replica down"
    );
    assert_eq!(
        hinted,
        Some(1.0),
        "the missed write waits in the repair queue"
    );

    // Without any restart, the repair queue brings node-1 up to date.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(item) = c.held(1, &key).await {
            assert_eq!(item["value"], "written while node-1 stalled");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 was never repaired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let repairs = c
        .metric(0, r#"distrocache_peer_requests_total{operation="repair"}"#)
        .await
        .unwrap_or(0.0);
    assert!(
        repairs > repairs_before,
        "node-1 got the write from the repair queue ({repairs_before} -> {repairs} repair requests)"
    );
}

/// A node that restarts empty while another member is stalled must not
/// report ready (nor stop asking other owners about misses) until it has
/// pulled from that member too: some of its keys have their only other copy
/// there. Waits for the event that matters, the node giving up one round of
/// retries on the stalled member (its "cannot pull from a member yet" log
/// line, after the 15 s for which one pull request is retried), then checks
/// it is still not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_waits_for_a_stalled_peer_before_it_is_ready() {
    let mut c = start_members(ProcCluster::new(3, 2).with_flags(SHORT_PEER_TIMEOUTS), 3).await;
    let written = write_keys(&c, 0..2000, 1).await;

    c.kill(0);
    c.signal(1, libc::SIGSTOP);
    c.start(0);
    c.wait_for_log(0, "cannot pull from a member yet", Duration::from_secs(90))
        .await;
    // Asked strictly: an answer, 503, saying why (a failed request is not
    // "not ready").
    let (status, readiness) = c.get_json(0, "/api/v1/ready").await;
    c.signal(1, libc::SIGCONT);
    assert_eq!(
        status, 503,
        "node-0 reported ready without the keys whose other copy is on the stalled node-1: {readiness}"
    );
    assert!(
        readiness["error"]
            .as_str()
            .is_some_and(|e| e.contains("loading")),
        "{readiness}"
    );
    c.wait_ready(0, SETTLE).await;
    assert_copies(&c, &written, 2, "node-0 back after node-1 stalled").await;
    c.kill(1);
    assert_all_readable(&c, &written, "node-0 back, node-1 killed").await;
}

/// Items of a few KB: every pull answer and push batch stays within the
/// batch byte limit (plus one item), which the receiving node accepts, so
/// data still moves when values are large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_move_in_batches_the_receiver_accepts() {
    let mut c = start_members(
        ProcCluster::new(4, 2).with_flags(&["--rebalance-batch-bytes", "64KiB"]),
        3,
    )
    .await;
    let big = "x".repeat(16 * 1024);
    let written: HashMap<String, Value> = futures_util::stream::iter((0..1500).map(|i| {
        let value = json!({"i": i, "pad": big});
        let url = c.url(i % 3, &format!("/api/v1/cache/{}", encoded(&key(i))));
        let request = c.client.put(url).json(&json!({"value": value})).send();
        async move {
            let status = request.await.expect("write").status().as_u16();
            assert!(status == 200 || status == 201, "write of {i}: {status}");
            (key(i), value)
        }
    }))
    .buffer_unordered(32)
    .collect()
    .await;

    // A new member pulls its share; then a member leaves and pushes all it has.
    let epoch = c.set_ring(&[(0, Active), (1, Active), (2, Active), (3, Active)]);
    c.start(3);
    c.wait_settled(epoch, SETTLE).await;
    assert_copies(&c, &written, 2, "16 KiB values, 4th node added").await;
    let epoch = c.set_ring(&[(0, Active), (1, Leaving), (2, Active), (3, Active)]);
    let handoff = c.wait_handoff(1, SETTLE).await;
    assert!(handoff.synced_epoch >= epoch && handoff.keys_sent > 0);
    let epoch = c.set_ring(&[(0, Active), (2, Active), (3, Active)]);
    c.wait_settled(epoch, SETTLE).await;
    c.kill(1);
    assert_all_readable(&c, &written, "16 KiB values, node-1 left").await;
    assert_copies(&c, &written, 2, "16 KiB values, node-1 left").await;
}

/// A leaving member that crashes and restarts holds nothing any more: it
/// must still report its handoff complete (the keys' other owners push them
/// on), or the operator would wait on it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_that_restarts_still_completes_its_handoff() {
    let mut c = started(4, 2, Security::Open).await;
    let written = write_keys(&c, 0..3000, 1).await;
    let epoch = c.set_ring(&[(0, Active), (1, Leaving), (2, Active), (3, Active)]);
    c.kill(1);
    c.start(1);
    let handoff = c.wait_handoff(1, SETTLE).await;
    assert!(handoff.synced_epoch >= epoch);
    let epoch = c.set_ring(&[(0, Active), (2, Active), (3, Active)]);
    c.wait_settled(epoch, SETTLE).await;
    c.kill(1);
    assert_all_readable(&c, &written, "node-1 restarted while leaving, then left").await;
    assert_copies(&c, &written, 2, "node-1 restarted while leaving, then left").await;
}

/// A member removed from the ring (its process still running, its data
/// dropped) and later added back must pull its keys like a new member: its
/// peers treat it as new and push it nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_and_added_back_pulls_its_keys_again() {
    let mut c = started(3, 2, Security::Open).await;
    let written = write_keys(&c, 0..3000, 1).await;
    c.set_ring(&[(0, Active), (1, Active), (2, Leaving)]);
    c.wait_handoff(2, SETTLE).await;
    let epoch = c.set_ring(&[(0, Active), (1, Active)]);
    c.wait_settled(epoch, SETTLE).await;
    let (_, view) = c.get_json(2, "/api/v1/cluster/rebalance").await;
    assert_eq!(view["items"], 0, "a non-member drops everything: {view}");
    let epoch = c.set_ring(&[(0, Active), (1, Active), (2, Active)]);
    c.wait_settled(epoch, SETTLE).await;
    assert_copies(&c, &written, 2, "node-2 added back").await;
    c.kill(0);
    assert_all_readable(&c, &written, "node-2 added back, node-0 killed").await;
}

/// Readiness and the preStop handoff follow the ring the node holds: a node
/// the ring does not list is not ready and says why; a handoff asked for an
/// epoch the node does not hold yet is not reported complete (it waits for
/// that epoch), and an active member has handed nothing off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_handoff_follow_the_ring_the_node_holds() {
    let mut c = ProcCluster::new(3, 2);
    let first = c.set_ring(&[(0, Active), (1, Active)]);
    for i in 0..3 {
        c.start(i);
    }
    c.wait_ready(0, SETTLE).await;
    c.wait_ready(1, SETTLE).await;
    let written = write_keys(&c, 0..500, 1).await;

    // node-2 holds the ring (it reads the same file) but is not in it.
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (_, view) = c.get_json(2, "/api/v1/cluster").await;
        if view["epoch"] == first {
            assert!(view.get("memberState").is_none(), "{view}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-2 never read the ring: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, readiness) = c.get_json(2, "/api/v1/ready").await;
    assert_eq!(status, 503, "{readiness}");
    assert!(
        readiness["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a member")),
        "{readiness}"
    );

    // An active member: nothing handed off, answered at once.
    let (status, handoff) = c.get_json(0, "/api/v1/cluster/handoff?timeout=30s").await;
    assert_eq!(status, 200, "{handoff}");
    assert_eq!(handoff["handoffComplete"], false, "{handoff}");
    // The epoch that will mark node-1 leaving, before node-1 holds it: not
    // complete, after waiting the whole timeout for it.
    let leaving = first + 1;
    let (status, handoff) = c
        .get_json(
            1,
            &format!("/api/v1/cluster/handoff?epoch={leaving}&timeout=1s"),
        )
        .await;
    assert_eq!(status, 200, "{handoff}");
    assert_eq!(handoff["handoffComplete"], false, "{handoff}");
    assert_eq!(handoff["progress"]["memberState"], "active", "{handoff}");
    assert!(handoff["waited"].as_f64().unwrap() >= 1.0, "{handoff}");

    // node-2 joins, then node-1 leaves; its handoff, asked for that epoch,
    // completes.
    let joined = c.set_ring(&[(0, Active), (1, Active), (2, Joining)]);
    c.wait_settled(joined, SETTLE).await;
    let active = c.set_ring(&[(0, Active), (1, Active), (2, Active)]);
    c.wait_settled(active, SETTLE).await;
    assert!(c.is_ready(2).await, "a member that holds its data is ready");
    let leaving = c.set_ring(&[(0, Active), (1, Leaving), (2, Active)]);
    let (status, handoff) = c
        .get_json(
            1,
            &format!("/api/v1/cluster/handoff?epoch={leaving}&timeout=60s"),
        )
        .await;
    assert_eq!(status, 200, "{handoff}");
    assert_eq!(handoff["handoffComplete"], true, "{handoff}");
    assert_eq!(handoff["progress"]["memberState"], "leaving", "{handoff}");
    assert!(handoff["progress"]["epoch"].as_u64().unwrap() >= leaving);

    let gone = c.set_ring(&[(0, Active), (2, Active)]);
    c.wait_settled(gone, SETTLE).await;
    let (status, _) = c.get_json(1, "/api/v1/ready").await;
    assert_eq!(status, 503, "a node the ring dropped is not ready");
    c.kill(1);
    assert_all_readable(&c, &written, "node-1 handed off and left").await;
    assert_copies(&c, &written, 2, "node-1 handed off and left").await;

    // Bad handoff parameters are JSON errors.
    for query in [
        "epoch=soon",
        "epoch=1&epoch=2",
        "timeout=1s&timeout=2s",
        "when=now",
    ] {
        let (status, body) = c
            .get_json(0, &format!("/api/v1/cluster/handoff?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].is_string(), "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_never_acts_on_a_stale_ring() {
    // rf 1 makes ownership sharp: exactly one node may serve each key.
    // Nodes 0-2 are members; node-3 is a gateway (not a member) that only
    // forwards, with a membership file of its own that will go stale.
    let mut c = ProcCluster::new(5, 1);
    let old = c.doc(1, &[(0, Active), (1, Active), (2, Active)]);
    cluster_support::write_atomically(&c.membership_file(), &old.to_json());
    cluster_support::write_atomically(&c.private_membership_file(3), &old.to_json());
    for i in 0..3 {
        c.start(i);
    }
    let gateway_file = c.private_membership_file(3);
    c.start_with_file(3, &gateway_file);
    for i in 0..3 {
        c.wait_ready(i, SETTLE).await;
    }
    // The gateway holds the ring but is not in it: it serves (forwards) yet
    // is not ready, saying why.
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (status, readiness) = c.get_json(3, "/api/v1/ready").await;
        if readiness["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a member"))
        {
            assert_eq!(status, 503, "{readiness}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never said it is not a member: {status} {readiness}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.epoch = 1;
    let written = write_keys(&c, 0..2000, 1).await;

    // Epoch 2 adds node-4. The members learn it; the gateway does not.
    let new = c.doc(2, &[(0, Active), (1, Active), (2, Active), (4, Active)]);
    cluster_support::write_atomically(&c.membership_file(), &new.to_json());
    c.start(4);
    c.wait_ready(4, SETTLE).await;
    for i in [0, 1, 2, 4] {
        let deadline = std::time::Instant::now() + SETTLE;
        while c.get_json(i, "/api/v1/cluster").await.1["settled"] != true
            || c.get_json(i, "/api/v1/cluster").await.1["epoch"] != 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "node {i} did not settle"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A peer request made with an older ring is refused, naming the newer
    // epoch, and changes nothing.
    let mut batch = cache_node::peer::protocol::RecordBatch::default();
    batch.push(&Planted {
        key: "stale-write",
        value: b"1",
    });
    let stale = cache_node::peer::Call::replicate(
        cache_node::peer::protocol::Source::Write,
        batch.freeze(),
        Vec::new(),
    );
    let refused = c
        .peers
        .ask(c.nodes[0].peer_addr, 1, &stale, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            cache_node::peer::PeerError::Misdirected { theirs: 2, .. }
        ),
        "{refused}"
    );
    assert!(
        c.held(0, "stale-write").await.is_none(),
        "the stale request was not applied"
    );
    // An older ring offered by a peer is not adopted.
    let adopted = c.peers.put_ring(c.nodes[0].peer_addr, &old).await.unwrap();
    assert!(!adopted);
    assert_eq!(c.get_json(0, "/api/v1/cluster").await.1["epoch"], 2);

    // A key that moved to node-4, asked of the gateway, which still holds
    // epoch 1 and so sends it to the old owner: that owner refuses the stale
    // request, the gateway catches up, and node-4 answers.
    let owner = |doc: &distrocache_membership::MembershipDoc, k: &str| {
        let ring = cache_node::cluster::ring::Ring::new(std::sync::Arc::new(doc.clone()), "client");
        ring.member(ring.owners(k.as_bytes())[0]).id.clone()
    };
    let (moved, value) = written
        .iter()
        .find(|(k, _)| owner(&new, k) == "node-4")
        .expect("some key moved to node-4");
    let (_, before) = c.get_json(3, "/api/v1/cluster").await;
    assert_eq!(before["epoch"], 1, "the gateway still holds the old ring");
    let resp = c
        .client
        .get(c.url(3, &format!("/api/v1/cache/{}", encoded(moved))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-distrocache-served-by"], "node-4");
    let item: Value = resp.json().await.unwrap();
    assert_eq!(item["value"], *value);
    let (_, after) = c.get_json(3, "/api/v1/cluster").await;
    assert_eq!(
        after["epoch"], 2,
        "the gateway caught up instead of acting on epoch 1"
    );
    c.epoch = 2;
}

/// An item written straight into a peer request, as a stale coordinator
/// (or a peer ignoring the limits) would send it.
struct Planted<'a> {
    key: &'a str,
    value: &'a [u8],
}

impl cache_node::store::ItemView for Planted<'_> {
    fn key(&self) -> &str {
        self.key
    }
    fn value(&self) -> &[u8] {
        self.value
    }
    fn meta(&self) -> cache_node::store::ItemMeta {
        cache_node::store::ItemMeta {
            created_at: 1,
            accessed_at: 1,
            expires_at: u64::MAX,
            access_count: 0,
        }
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

/// A replica that missed a write must not serve reads of its own copy
/// until it is repaired. Node-1, the replica, keeps running, but what
/// node-0 (the primary) sends it is lost (a relay in front of its peer
/// address is cut), so node-0 answers the write with a hint for node-1,
/// and node-1's copy stays the replaced value. No read through node-1 may
/// return that value: node-1 holds no read lease while a hint for it is
/// pending (it asks node-0, which refuses), so it sends its reads to the
/// primary. That holds too while node-0's repairs are on their way and get
/// no answer (the relay then holds what it is sent): a repair not yet
/// acknowledged has repaired nothing. Once the relay is restored, the
/// repair lands and node-1 serves reads itself again, of the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_on_hinted_writes_is_not_read_until_repaired() {
    let mut c = ProcCluster::new(2, 2).with_flags(SHORT_PEER_TIMEOUTS);
    let relay = c.relay_peer_traffic(1).await;
    let (c, key) = every_node_an_owner(c, "behind").await;
    let url = |i| c.url(i, &format!("/api/v1/cache/{key}"));
    let put = |i, value: &'static str| c.client.put(url(i)).json(&json!({ "value": value })).send();
    assert!(put(0, "old").await.unwrap().status().is_success());
    // Both copies hold "old", and node-1 serves it itself once its lease is held.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (value, by) = read_via(&c, 1, &key).await;
        assert_eq!(value, "old");
        if by == "node-1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 never served its own copy (no read lease)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    relay.cut().await;
    let written = put(0, "new").await.unwrap();
    assert!(
        written.status().is_success(),
        "answered with a replica cut off"
    );
    // node-0's repairs now reach the relay and wait there for their time
    // limit (a second), while node-1's lease requests reach node-0.
    relay.black_hole().await;
    // From the moment the write is acknowledged, for longer than a lease
    // and its renewals: node-1 would have served its stale copy by now if
    // it still held a lease, or could get one.
    let until = std::time::Instant::now() + LEASE + RENEW_EVERY * 4;
    let mut reads = 0;
    while std::time::Instant::now() < until {
        let (value, by) = read_via(&c, 1, &key).await;
        assert_eq!(
            value, "new",
            "a read through the replica returned the value an acknowledged write replaced"
        );
        assert_eq!(by, "node-0", "node-1 served a read while behind");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reads > 0);
    // It was behind all along: its copy is the replaced one, and node-0
    // holds the hint that will repair it.
    assert_eq!(
        c.held(1, &key).await.expect("node-1 keeps its copy")["value"],
        "old",
        "node-1 missed the write"
    );
    // The gauge follows the repair queue once a second; the deadline is
    // generous because the suite runs many clusters at once on two cores.
    let mut pending = None;
    for _ in 0..200 {
        pending = c.metric(0, "distrocache_replication_pending_repairs").await;
        if pending == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, Some(1.0), "the missed write is hinted");

    relay.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (value, by) = read_via(&c, 1, &key).await;
        assert_eq!(value, "new");
        if by == "node-1" {
            // Serving its own copy again: it was granted a lease, which the
            // primary only does with nothing waiting to be repaired on it.
            assert_eq!(
                c.metric(0, "distrocache_replication_pending_repairs").await,
                Some(0.0)
            );
            assert_eq!(c.held(1, &key).await.unwrap()["value"], "new");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 never served its own copy again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A write a replica missed, whose item is gone from the primary by the
/// time the repair runs (it expired): the replica must not keep the value
/// that write replaced. The repair deletes the replica's older copy, and a
/// read through the replica misses, as one through the primary does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_write_that_expired_before_its_repair_still_removes_the_replaced_value() {
    let mut c = ProcCluster::new(2, 2).with_flags(SHORT_PEER_TIMEOUTS);
    let relay = c.relay_peer_traffic(1).await;
    let (c, key) = every_node_an_owner(c, "expired").await;
    let url = |i| c.url(i, &format!("/api/v1/cache/{key}"));
    let put = |value: &'static str, ttl: u64| {
        c.client
            .put(url(0))
            .json(&json!({ "value": value, "ttl": ttl }))
            .send()
    };
    assert!(put("old", 3600).await.unwrap().status().is_success());
    assert_eq!(
        c.held(1, &key).await.expect("replicated")["value"],
        "old",
        "node-1 holds the first value"
    );

    relay.cut().await;
    let written = put("new", 1).await.unwrap();
    assert!(written.status().is_success(), "{}", written.status());
    assert_eq!(c.held(1, &key).await.unwrap()["value"], "old", "missed");
    // The new value expires on node-0 before node-1 can be repaired.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.held(0, &key).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new value never expired on node-0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    relay.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.held(1, &key).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 kept the value the missed write replaced: {:?}",
            c.held(1, &key).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in [0, 1] {
        let resp = c.client.get(url(i)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "a read through node-{i}");
    }
}

/// The value a read of `key` through node `i` returns, and the node that
/// served it.
async fn read_via(c: &ProcCluster, i: usize, key: &str) -> (Value, String) {
    let resp = c
        .client
        .get(c.url(i, &format!("/api/v1/cache/{key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a read of {key} through node-{i}");
    let by = resp.headers()["x-distrocache-served-by"]
        .to_str()
        .unwrap()
        .to_owned();
    let item: Value = resp.json().await.unwrap();
    (item["value"].clone(), by)
}

/// Reads `key` through node `i`, the key's primary, for longer than a lease
/// and its renewals, asserting every read returns `value` and is served
/// there.
async fn always_reads(c: &ProcCluster, i: usize, key: &str, value: &str, what: &str) {
    let until = std::time::Instant::now() + LEASE + RENEW_EVERY * 4;
    let mut reads = 0;
    while std::time::Instant::now() < until {
        let (read, by) = read_via(c, i, key).await;
        assert_eq!(
            read, value,
            "{what}: a read through node-{i} (served by {by})"
        );
        assert_eq!(by, format!("node-{i}"), "{what}: served by the primary");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reads > 0);
}

/// Reads `key` through node `i` for as long as [`always_reads`] does,
/// asserting every read misses.
async fn always_misses(c: &ProcCluster, i: usize, key: &str, what: &str) {
    let until = std::time::Instant::now() + LEASE + RENEW_EVERY * 4;
    while std::time::Instant::now() < until {
        let url = c.url(i, &format!("/api/v1/cache/{key}"));
        let resp = c.client.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica that missed a write (its primary could not reach it) and then
/// becomes the key's primary, because the old primary leaves the ring, must
/// not serve the value that write replaced: the primary of a new ring has
/// not coordinated the key's earlier writes, so it serves its own copy only
/// once it holds a read lease from every member (none holds a hint for it),
/// and until then asks the key's other owners for anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_write_and_becomes_primary_serves_the_write() {
    let mut c = ProcCluster::new(2, 2).with_flags(SHORT_PEER_TIMEOUTS);
    let relay = c.relay_peer_traffic(1).await;
    let (mut c, key) = every_node_an_owner(c, "promoted").await;
    let put = |value: &'static str| {
        c.client
            .put(c.url(0, &format!("/api/v1/cache/{key}")))
            .json(&json!({ "value": value }))
            .send()
    };
    assert!(put("old").await.unwrap().status().is_success());
    assert_eq!(c.held(1, &key).await.expect("replicated")["value"], "old");

    relay.cut().await;
    let written = put("new").await.unwrap();
    assert!(written.status().is_success(), "{}", written.status());
    // node-0's repairs and handoff now wait at the relay for their time
    // limit: node-1 stays behind.
    relay.black_hole().await;
    let epoch = c.set_ring(&[(0, Leaving), (1, Active)]);
    let deadline = std::time::Instant::now() + SETTLE;
    while c.get_json(1, "/api/v1/cluster").await.1["epoch"] != epoch {
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 never adopted epoch {epoch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.primary_of(&key), "node-1");
    assert_eq!(c.held(1, &key).await.unwrap()["value"], "old", "behind");
    always_reads(&c, 1, &key, "new", "the new primary, behind").await;

    relay.restore();
    c.wait_handoff(0, SETTLE).await;
    let epoch = c.set_ring(&[(1, Active)]);
    c.kill(0);
    c.wait_settled(epoch, SETTLE).await;
    assert_eq!(c.held(1, &key).await.unwrap()["value"], "new", "handed off");
    assert_eq!(read_via(&c, 1, &key).await, ("new".into(), "node-1".into()));
}

/// A read is counted once in the cluster's stats, a hit or a miss, though
/// a replica that finds nothing asks the primary: the replica's own miss is
/// not its answer, so it does not count (it counted, and the cluster's
/// misses were two for one read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_through_a_replica_counts_once_in_the_cluster_stats() {
    let (c, key) = every_node_an_owner(ProcCluster::new(2, 2), "counted").await;
    c.wait_node_metric(1, LEASE_VALID, 1.0, SETTLE, "node-1 never held a lease")
        .await;
    let totals = || async {
        let (status, stats) = c.get_json(0, "/api/v1/cluster/stats").await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(stats["unreachable"], json!([]), "{stats}");
        let count = |name: &str| stats["totals"][name].as_u64().expect(name);
        (count("hits"), count("misses"))
    };
    let url = c.url(1, &format!("/api/v1/cache/{key}"));

    let before = totals().await;
    let resp = c.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(totals().await, (before.0, before.1 + 1), "one miss");

    let resp = c
        .client
        .put(&url)
        .json(&json!({ "value": "here" }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let before = totals().await;
    assert_eq!(
        read_via(&c, 1, &key).await,
        ("here".into(), "node-1".into())
    );
    assert_eq!(totals().await, (before.0 + 1, before.1), "one hit");
}

/// A write whose primary could not be reached goes to the next owner, which
/// coordinates it and hints the primary. The primary, reachable again for
/// clients but not yet repaired, must not serve the value that write
/// replaced (it holds no read lease while a member holds a hint for it), nor
/// keep a delete's victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_missed_a_write_made_through_a_replica_serves_the_write() {
    let mut c = ProcCluster::new(2, 2).with_flags(SHORT_PEER_TIMEOUTS);
    let relay = c.relay_peer_traffic(0).await;
    let (c, key) = every_node_an_owner(c, "failover").await;
    let url = |i| c.url(i, &format!("/api/v1/cache/{key}"));
    let put = |i, value: &'static str| c.client.put(url(i)).json(&json!({ "value": value })).send();
    assert!(put(0, "old").await.unwrap().status().is_success());
    // node-0 serves its own copy, holding its lease.
    c.wait_node_metric(0, LEASE_VALID, 1.0, SETTLE, "node-0 never held a lease")
        .await;
    assert_eq!(read_via(&c, 0, &key).await, ("old".into(), "node-0".into()));

    relay.cut().await;
    let written = put(1, "new").await.unwrap();
    assert!(written.status().is_success(), "{}", written.status());
    relay.black_hole().await;
    assert_eq!(c.held(0, &key).await.unwrap()["value"], "old", "behind");
    always_reads(&c, 0, &key, "new", "the primary, behind on a write").await;

    // A delete node-0 missed as well: its old copy is not served either.
    relay.cut().await;
    let resp = c.client.delete(url(1)).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    relay.black_hole().await;
    assert_eq!(
        c.held(0, &key).await.unwrap()["value"],
        "new",
        "node-0 holds the write it was told of, and missed the delete"
    );
    always_misses(
        &c,
        0,
        &key,
        "a read through node-0 after a delete it missed",
    )
    .await;

    relay.restore();
    c.wait_node_metric(0, LEASE_VALID, 1.0, SETTLE, "node-0 was never repaired")
        .await;
    assert!(
        c.held(0, &key).await.is_none(),
        "node-0 holds a lease again, and not the deleted key"
    );
    let resp = c.client.get(url(0)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

/// A write the primary missed (made through the next owner while it could
/// not be reached) that has expired before the primary reads the key: no
/// member holds the new value or a tombstone any more, but the owner that
/// took the write still holds its hint, so the primary learns that its copy
/// was replaced and does not serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_write_that_expired_is_not_served_by_the_primary_that_missed_it() {
    let mut c = ProcCluster::new(2, 2).with_flags(SHORT_PEER_TIMEOUTS);
    let relay = c.relay_peer_traffic(0).await;
    let (c, key) = every_node_an_owner(c, "expired-missed").await;
    let url = |i| c.url(i, &format!("/api/v1/cache/{key}"));
    let put = |i, value: &'static str, ttl: u64| {
        c.client
            .put(url(i))
            .json(&json!({ "value": value, "ttl": ttl }))
            .send()
    };
    assert!(put(0, "old", 3600).await.unwrap().status().is_success());
    relay.cut().await;
    let written = put(1, "new", 1).await.unwrap();
    assert!(written.status().is_success(), "{}", written.status());
    relay.black_hole().await;
    let deadline = std::time::Instant::now() + SETTLE;
    while c.held(1, &key).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new value never expired on node-1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.held(0, &key).await.unwrap()["value"], "old", "missed");
    let resp = c.client.get(url(0)).send().await.unwrap();
    assert_eq!(
        resp.status(),
        404,
        "a read through the primary of a value an acknowledged write replaced"
    );
    assert!(c.held(0, &key).await.is_none(), "the replaced copy is gone");
}

/// A tag invalidation made through a member that owns nothing of a key,
/// while neither owner of the key could be reached from it: the
/// invalidating member answers (naming them unreachable) and keeps the
/// hints, and neither owner knows. The key's primary must not serve the
/// invalidated item: it holds no read lease (the invalidating member
/// refuses it one), so it asks that member too before it serves a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_both_owners_missed_is_not_served() {
    let mut c = ProcCluster::new(3, 2).with_flags(SHORT_PEER_TIMEOUTS);
    let relays = [c.relay_peer_traffic(0).await, c.relay_peer_traffic(1).await];
    c.start_members(3, SETTLE).await;
    let key = (0..)
        .map(|i| format!("tagged-{i}"))
        .find(|k| c.owners_of(k) == ["node-0", "node-1"])
        .expect("some key");
    let url = |i| c.url(i, &format!("/api/v1/cache/{key}"));
    let resp = c
        .client
        .put(url(0))
        .json(&json!({ "value": "v", "tags": ["gone"] }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(c.held(1, &key).await.expect("replicated")["value"], "v");

    for relay in &relays {
        relay.cut().await;
    }
    let body = c.invalidate_tag(2, "gone").await;
    assert_eq!(body["unreachable"], json!(["node-0", "node-1"]), "{body}");
    for relay in &relays {
        relay.black_hole().await;
    }
    assert!(c.held(0, &key).await.is_some(), "node-0 missed it");
    assert!(c.held(1, &key).await.is_some(), "node-1 missed it");
    always_misses(
        &c,
        0,
        &key,
        "an item whose tag was invalidated, through its primary",
    )
    .await;
    assert!(c.held(0, &key).await.is_none(), "node-0 learned of it");
}

/// In cluster mode an answer names the ring epoch the answering node holds
/// whenever that is news to the connection: any answer of the API (refusals
/// included) on a new connection, the first after the node adopts another
/// ring, and a reminder every `EPOCH_REMINDER_EVERY` answers; the answers
/// in between leave it out. So a ring-aware client learns of a new ring from
/// whichever answer comes first, and is reminded.
#[tokio::test]
async fn an_answer_names_the_ring_epoch_whenever_it_is_news_to_the_connection() {
    use cache_node::api::answer::EPOCH_REMINDER_EVERY;
    use http_body_util::{BodyExt, Full};
    use hyper::http::{Request, header};
    use reqwest::Method;

    let mut c = ProcCluster::new(1, 1);
    c.set_ring(&[(0, Active)]);
    c.start(0);
    c.wait_settled(1, SETTLE).await;
    let epoch = c.set_ring(&[(0, Active)]);
    c.wait_settled(epoch, SETTLE).await;

    // Every kind of answer, each the first on its connection.
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let long_key = "k".repeat(600);
    let cases: &[(Method, &str, u16)] = &[
        (Method::PUT, "/api/v1/cache/here", 201),
        (Method::GET, "/api/v1/cache/here", 200),
        (Method::GET, "/api/v1/cache/absent", 404),
        (Method::DELETE, "/api/v1/cache/here", 200),
        (Method::GET, "/api/v1/stats", 200),
        (Method::GET, "/api/v1/nowhere", 404),
        (Method::PATCH, "/api/v1/cache/here", 405),
        (Method::GET, &format!("/api/v1/cache/{long_key}"), 414),
        (Method::GET, "/api/v1/cache/%FF", 400),
        // A peer connection asked for without the upgrade.
        (Method::GET, "/internal/v1/connect", 426),
    ];
    for (method, path, status) in cases {
        let resp = fresh
            .request(method.clone(), c.url(0, path))
            .json(&json!({ "value": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), *status, "{method} {path}");
        assert_eq!(epoch_of(&resp), Some(epoch), "{method} {path}");
    }

    // One keep-alive connection, driven by hand so that every answer is
    // known to come on it. Its requests take turns: a read answered at once,
    // a write answered once its body is read (later), and a refusal.
    let stream = tokio::net::TcpStream::connect(c.nodes[0].addr)
        .await
        .unwrap();
    let (mut conn, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(driver);
    let host = c.nodes[0].addr.to_string();
    let mut sent = 0;
    let mut next_epoch_named = async || {
        let (method, path, body, status) = match sent % 3 {
            0 => (Method::GET, "/api/v1/cache/absent", "", &[404][..]),
            1 => (
                Method::PUT,
                "/api/v1/cache/kept",
                r#"{"value":1}"#,
                &[201, 200][..],
            ),
            _ => (Method::PATCH, "/api/v1/cache/kept", "", &[405][..]),
        };
        sent += 1;
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, &host)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), conn.send_request(request))
            .await
            .expect("an answer within 10 s")
            .expect("an answer on the kept connection");
        assert!(
            status.contains(&answer.status().as_u16()),
            "{method} {path}: {}",
            answer.status()
        );
        let named = answer
            .headers()
            .get("x-distrocache-epoch")
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        answer.into_body().collect().await.unwrap();
        named
    };
    assert_eq!(next_epoch_named().await, Some(epoch), "the first answer");
    for n in 1..EPOCH_REMINDER_EVERY {
        assert_eq!(next_epoch_named().await, None, "answer {n} after the first");
    }
    assert_eq!(next_epoch_named().await, Some(epoch), "the reminder");
    assert_eq!(next_epoch_named().await, None, "the answer after it");
    let newer = c.set_ring(&[(0, Active)]);
    c.wait_settled(newer, SETTLE).await;
    assert_eq!(
        next_epoch_named().await,
        Some(newer),
        "the first answer after a new ring"
    );
    assert_eq!(next_epoch_named().await, None, "the answer after it");

    // A request without the client token, to a cluster that requires one.
    let mut authed = ProcCluster::new(1, 1).with_auth();
    let epoch = authed.start_members(1, SETTLE).await;
    let resp = fresh
        .get(authed.url(0, "/api/v1/cache/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(epoch_of(&resp), Some(epoch), "a request without the token");
}

/// The ring epoch an answer names, if any.
fn epoch_of(resp: &reqwest::Response) -> Option<u64> {
    let value = resp.headers().get("x-distrocache-epoch")?;
    Some(value.to_str().unwrap().parse().unwrap())
}

/// A write that an owner forwards to the key's primary is kept by that
/// owner from the primary's answer: both copies hold the same version when
/// the client is answered, the primary sends nothing back to it, and the
/// answer still tells a created key from a replaced one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_forwarding_a_write_keeps_its_copy_from_the_answer() {
    const REPLICATES: &str = r#"distrocache_peer_requests_total{operation="replicate"}"#;
    const FORWARDS: &str = r#"distrocache_peer_requests_total{operation="forward"}"#;
    let (c, key) = primary_and_replicas(2, &[], "kept").await;
    let url = |i| c.url(i, &format!("/api/v1/cache/{key}"));
    let put = |i, value: &'static str| {
        c.client
            .put(url(i))
            .json(&json!({ "value": value, "tags": ["kept"] }))
            .send()
    };
    let counts = || async {
        (
            c.metric(0, REPLICATES).await.unwrap_or(0.0),
            c.metric(1, FORWARDS).await.unwrap_or(0.0),
        )
    };

    let (replicates, forwards) = counts().await;
    for (value, status) in [("first", 201), ("second", 200)] {
        let resp = put(1, value).await.unwrap();
        assert_eq!(
            resp.status().as_u16(),
            status,
            "writing {value:?} through node-1"
        );
        assert_eq!(resp.headers()["x-distrocache-served-by"], "node-0");
        // Kept before the client was answered: no waiting.
        assert_eq!(same_copies(&c, &key, value).await, Ok(()));
    }
    assert_eq!(
        counts().await,
        (replicates, forwards + 2.0),
        "both writes were forwarded, and the primary sent no replicate back"
    );

    // Written through the primary, the same key is replicated as before:
    // the counter the assertion above relies on counts.
    let resp = put(0, "third").await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(same_copies(&c, &key, "third").await, Ok(()));
    assert_eq!(counts().await, (replicates + 1.0, forwards + 2.0));
}

/// A client that gives up on a write it sent through an owner (a client
/// timeout, a closed connection) does not leave that owner's copy behind:
/// the primary, stalled while the client waited, applies the write when it
/// resumes, and the owner keeps its copy from the answer with no client
/// waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_write_whose_client_gave_up_still_reaches_the_keeper() {
    let (c, key) = primary_and_replicas(2, SHORT_PEER_TIMEOUTS, "abandoned").await;
    let url = c.url(1, &format!("/api/v1/cache/{key}"));
    let put = |value: &'static str| c.client.put(&url).json(&json!({ "value": value }));
    assert!(put("old").send().await.unwrap().status().is_success());

    c.signal(0, libc::SIGSTOP);
    let gave_up = put("new").timeout(Duration::from_millis(500)).send().await;
    c.signal(0, libc::SIGCONT);
    assert!(
        gave_up.is_err(),
        "the write was answered with its primary stalled: {gave_up:?}"
    );
    wait_same_copies(&c, &key, "new", "the client gave up").await;
}

/// A write an owner forwarded and its primary took without answering in
/// time (stalled past the forwarded write's timeout) gets a 503 saying it
/// may have been applied; once the primary resumes and applies it, the
/// owner takes the primary's copy, so the copies do not stay apart. With
/// `n` 3 a third owner answers fetches while the primary is stalled (and
/// is asked first, the primary being marked down) with the old copy: the
/// keeper waits for the primary's own.
async fn a_kept_write_left_unanswered_scenario(n: usize) {
    let (c, key) = primary_and_replicas(n, SHORT_PEER_TIMEOUTS, "unanswered").await;
    let url = c.url(1, &format!("/api/v1/cache/{key}"));
    let put = |value: &'static str| c.client.put(&url).json(&json!({ "value": value })).send();
    assert!(put("old").await.unwrap().status().is_success());

    c.signal(0, libc::SIGSTOP);
    let unanswered = put("new").await;
    // Past the 503, node-1 asks for the key's copy while node-0 is stalled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.signal(0, libc::SIGCONT);
    let unanswered = unanswered.expect("an answer from node-1");
    assert_eq!(unanswered.status().as_u16(), 503);
    let body: Value = unanswered.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("may have been applied"), "{body}");
    wait_same_copies(&c, &key, "new", "an unanswered write").await;
    for other in 2..n {
        assert_eq!(
            c.held(other, &key).await.expect("on every owner")["value"],
            "new"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_write_left_unanswered_is_resynced_from_the_primary() {
    a_kept_write_left_unanswered_scenario(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_write_left_unanswered_is_resynced_from_the_primary_not_another_owner() {
    a_kept_write_left_unanswered_scenario(3).await;
}

/// Clients writing through some nodes for as long as a fault lasts: every
/// write either succeeds or fails cleanly with a 503; which keys were
/// acknowledged is what the test then checks for.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(HashMap<String, Value>, u64)>,
}

impl Writer {
    /// Writes fresh keys `writer-<n>` through `via` (round robin), 16 at a
    /// time, until stopped.
    fn start(c: &ProcCluster, via: Vec<usize>, label: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<String> = via.iter().map(|&i| c.url(i, "/api/v1/cache/")).collect();
        let client = c.client.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut acknowledged = HashMap::new();
            let mut refused = 0u64;
            let mut n = 0usize;
            while !flag.load(Ordering::Acquire) {
                let batch: Vec<_> = (n..n + 16)
                    .map(|i| {
                        let key = format!("{label}-{i}");
                        let value = json!({"i": i, "by": label});
                        let url = format!("{}{}", urls[i % urls.len()], key);
                        let request = client
                            .put(url)
                            .json(&json!({"value": value, "ttl": 3600}))
                            .send();
                        async move {
                            let resp = request
                                .await
                                .unwrap_or_else(|e| panic!("write of {key}: {e}"));
                            (key, value, resp.status().as_u16())
                        }
                    })
                    .collect();
                n += 16;
                for (key, value, status) in futures_util::future::join_all(batch).await {
                    match status {
                        200 | 201 => {
                            acknowledged.insert(key, value);
                        }
                        503 => refused += 1,
                        other => panic!("write of {key}: {other}, neither success nor a 503"),
                    }
                }
            }
            (acknowledged, refused)
        });
        Self { stop, task }
    }

    /// Stops and returns the acknowledged writes and how many got a 503.
    async fn stop(self) -> (HashMap<String, Value>, u64) {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("the writer did not panic")
    }
}

/// A member paused (SIGSTOP) for longer than the peer timeout, first while
/// clients write, then while a node joins and pulls its share from it:
/// every write is acknowledged or fails cleanly (a 503), nothing
/// acknowledged is lost, and once it resumes the paused node catches up
/// (every key back to exactly two copies of the value written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_loses_no_acknowledged_write_and_catches_up() {
    let mut c = start_members(ProcCluster::new(4, 2).with_flags(SHORT_PEER_TIMEOUTS), 3).await;
    let before = write_keys(&c, 0..2000, 1).await;

    // During writes: node-1 paused for 3 s (three peer timeouts).
    let writer = Writer::start(&c, vec![0, 2], "paused-writes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.signal(1, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.signal(1, libc::SIGCONT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (during_writes, refused_writes) = writer.stop().await;

    // During a data move: node-3 joins and must pull from node-1, which is
    // paused while it does; writes go on meanwhile.
    let writer = Writer::start(&c, vec![0, 2], "paused-move");
    let joined = c.set_ring(&[(0, Active), (1, Active), (2, Active), (3, Joining)]);
    c.start(3);
    c.signal(1, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.signal(1, libc::SIGCONT);
    c.wait_settled(joined, SETTLE).await;
    let active = c.set_ring(&[(0, Active), (1, Active), (2, Active), (3, Active)]);
    c.wait_settled(active, SETTLE).await;
    let (during_move, refused_move) = writer.stop().await;
    eprintln!(
        "paused node: {} writes acknowledged and {refused_writes} refused during writes; {} and {refused_move} during a move",
        during_writes.len(),
        during_move.len()
    );
    assert!(
        !during_writes.is_empty() && !during_move.is_empty(),
        "writes through the nodes that were not paused went on"
    );

    let mut expected = before;
    expected.extend(during_writes);
    expected.extend(during_move);
    wait_copies(&c, &expected, 2, "after node-1 was paused twice").await;
    assert_all_readable(&c, &expected, "after node-1 was paused twice").await;
}

/// A peer that answers slowly (stopped for 700 ms of every 800, so each
/// request waits most of the 1 s peer timeout) while another member hands
/// its data off to it: the handoff completes and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_to_a_slow_peer_completes_and_loses_nothing() {
    let mut c = start_members(ProcCluster::new(3, 2).with_flags(SHORT_PEER_TIMEOUTS), 3).await;
    let written = write_keys(&c, 0..3000, 1).await;

    let slow = Arc::new(AtomicBool::new(true));
    let pid = c.pid(2);
    let slowing = {
        let slow = slow.clone();
        tokio::spawn(async move {
            let node = libc::pid_t::try_from(pid).expect("pid");
            while slow.load(Ordering::Acquire) {
                // SAFETY: kill(2) on our own child process.
                assert_eq!(unsafe { libc::kill(node, libc::SIGSTOP) }, 0);
                tokio::time::sleep(Duration::from_millis(700)).await;
                // SAFETY: as above.
                assert_eq!(unsafe { libc::kill(node, libc::SIGCONT) }, 0);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let leaving = c.set_ring(&[(0, Active), (1, Leaving), (2, Active)]);
    let handoff = c.wait_handoff(1, Duration::from_secs(180)).await;
    slow.store(false, Ordering::Release);
    slowing.await.expect("the slowing task");
    assert!(
        handoff.synced_epoch >= leaving && handoff.keys_sent > 0,
        "{handoff:?}"
    );

    let gone = c.set_ring(&[(0, Active), (2, Active)]);
    c.wait_settled(gone, SETTLE).await;
    c.kill(1);
    assert_all_readable(&c, &written, "node-1 handed off to a slow node-2").await;
    assert_copies(&c, &written, 2, "node-1 handed off to a slow node-2").await;
}

/// Two ring changes in quick succession, the second before the first has
/// settled: node-2 starts leaving and, at once, node-3 joins. Writes go on
/// throughout; nothing acknowledged is lost and the ring settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_while_another_leaves_loses_nothing() {
    let mut c = started(4, 2, Security::Open).await;
    // started() ran all four; make node-3 the newcomer.
    c.kill(3);
    let three = c.set_ring(&[(0, Active), (1, Active), (2, Active)]);
    c.wait_settled(three, SETTLE).await;
    let before = write_keys(&c, 0..3000, 1).await;

    let writer = Writer::start(&c, vec![0, 1], "two-changes");
    c.set_ring(&[(0, Active), (1, Active), (2, Leaving)]);
    c.start(3);
    let both = c.set_ring(&[(0, Active), (1, Active), (2, Leaving), (3, Joining)]);
    let handoff = c.wait_handoff(2, SETTLE).await;
    assert!(handoff.synced_epoch >= both, "{handoff:?}");
    c.wait_settled(both, SETTLE).await;
    let after = c.set_ring(&[(0, Active), (1, Active), (3, Active)]);
    c.wait_settled(after, SETTLE).await;
    let (during, refused) = writer.stop().await;
    c.kill(2);
    eprintln!(
        "two changes at once: {} writes acknowledged, {refused} refused",
        during.len()
    );
    let mut expected = before;
    expected.extend(during);
    assert_all_readable(&c, &expected, "node-3 joined while node-2 left").await;
    wait_copies(&c, &expected, 2, "node-3 joined while node-2 left").await;
}

/// Every node killed at once (no persistence): the cluster comes back
/// empty and healthy on the same ring, every node ready and settled, and
/// serves writes again. Nothing can survive without a copy anywhere; what
/// must not happen is a ring stuck waiting for data that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_killed_whole_comes_back_empty_and_healthy() {
    let mut c = started(3, 2, Security::Open).await;
    let epoch = c.epoch;
    write_keys(&c, 0..1000, 1).await;
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start(i);
    }
    c.wait_settled(epoch, SETTLE).await;
    assert_eq!(cluster_items(&c, 0).await, 0, "nothing survives in memory");
    let written = write_keys(&c, 0..1000, 2).await;
    assert_all_readable(&c, &written, "after a whole-cluster restart").await;
    assert_copies(&c, &written, 2, "after a whole-cluster restart").await;
}

/// With peer mutual TLS, only a node holding a certificate from the peer CA
/// that names the member it claims to be can open a peer connection: one
/// without TLS, with a certificate of another CA, an expired one, or one
/// for another name can neither pull (fetch), push (replace the ring) nor
/// forward (a client's read), even with the right peer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_valid_certificate_cannot_pull_push_or_forward() {
    use cache_node::peer::Request;
    use cache_node::tls::PeerTls;
    use cluster_support::{PEER_DOMAIN, peer_client_as};
    use tls_support::{TestCa, Validity};

    let c = started(2, 2, Security::TokensAndPeerMtls).await;
    let written = write_keys(&c, 0..20, 1).await;
    let key = written.keys().next().expect("a key").clone();
    // The real peer client (the members' certificate) is served.
    let held = c.peers.fetch(c.nodes[0].peer_addr, &key).await;
    assert!(held.is_ok(), "a member's certificate: {held:?}");

    let pki = c.peer_pki.as_ref().expect("mTLS cluster");
    let dir = tempfile::tempdir().unwrap();
    let other_ca = TestCa::new(&dir.path().join("other"), "other-ca");
    let wildcard = format!("*.{PEER_DOMAIN}");
    let foreign = other_ca.issue("foreign", &[&wildcard], Validity::Current);
    let expired = pki.ca.issue("expired", &[&wildcard], Validity::Expired);
    let misnamed = pki
        .ca
        .issue("misnamed", &["intruder.elsewhere"], Validity::Current);
    let tls = |issued: &tls_support::Issued| {
        Some(
            PeerTls::load(
                issued.cert.clone(),
                issued.key.clone(),
                pki.ca.ca_file.clone(),
                Some(PEER_DOMAIN.into()),
            )
            .expect("intruder TLS config"),
        )
    };
    let token = c.peer_token();
    let intruders = [
        ("no TLS", peer_client_as("node-1", token.as_deref(), None)),
        (
            "another CA",
            peer_client_as("node-1", token.as_deref(), tls(&foreign)),
        ),
        (
            "expired",
            peer_client_as("node-1", token.as_deref(), tls(&expired)),
        ),
        (
            "another name",
            peer_client_as("node-1", token.as_deref(), tls(&misnamed)),
        ),
    ];
    let target = c.nodes[0].peer_addr;
    let ring = c.doc(c.epoch + 1, &[(0, Active)]);
    for (why, intruder) in &intruders {
        intruder.learn_names(c.nodes.iter().map(|n| (n.peer_addr, n.id.as_str())));
        let pulled = intruder.fetch(target, &key).await;
        let refusal = pulled.expect_err(why).to_string();
        // Refused for the reason meant: plain HTTP on the TLS port gets a
        // 400, a misnamed certificate a 403, the others fail the handshake.
        let expected = match *why {
            "no TLS" => "400",
            "another name" => "403",
            _ => "",
        };
        assert!(refusal.contains(expected), "{why}: {refusal}");
        let pushed = intruder.put_ring(target, &ring).await;
        assert!(pushed.is_err(), "{why}: pushed a ring {pushed:?}");
        let forwarded = intruder
            .send(target, c.epoch, &Request::Get { key: key.clone() }, None)
            .await;
        assert!(forwarded.is_err(), "{why}: forwarded a read");
    }
    // Nothing changed: the ring is the one the test set.
    let (status, view) = c.get_json(0, "/api/v1/cluster").await;
    assert_eq!((status, &view["epoch"]), (200, &json!(c.epoch)), "{view}");
}

/// The views a user reads to run a cluster by hand (the README's "Running a
/// cluster from a membership file"): which nodes hold a key, asked through
/// any node, and each node's capacity beside what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_views_say_who_holds_a_key_and_each_nodes_capacity() {
    let c = start_members(
        ProcCluster::new(3, 2).with_flags(&["--max-size", "5000", "--max-memory", "64MiB"]),
        3,
    )
    .await;
    let written = write_keys(&c, 0..300, 1).await;
    for key in written.keys().take(20) {
        for via in 0..3 {
            let (status, view) = c
                .get_json(via, &format!("/api/v1/cluster/copies?key={}", encoded(key)))
                .await;
            assert_eq!(status, 200, "{view}");
            assert_eq!(view["key"], json!(key), "{view}");
            assert_eq!(view["unreachable"], json!([]), "{view}");
            let ids = |v: &Value| -> Vec<String> {
                v.as_array()
                    .unwrap_or_else(|| panic!("an array: {v}"))
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .unwrap_or_else(|| x["node"].as_str().expect("a node"))
                            .to_owned()
                    })
                    .collect()
            };
            let owners = ids(&view["owners"]);
            assert_eq!(owners.len(), 2, "{view}");
            assert_eq!(owners[0], c.primary_of(key), "{view}");
            let mut holders = ids(&view["copies"]);
            let mut expected = owners.clone();
            holders.sort();
            expected.sort();
            assert_eq!(
                holders, expected,
                "the owners and only they hold {key}: {view}"
            );
        }
    }
    let (status, view) = c
        .get_json(2, "/api/v1/cluster/copies?key=never-written")
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["copies"], json!([]), "{view}");

    let (status, stats) = c.get_json(1, "/api/v1/cluster/stats").await;
    assert_eq!(status, 200, "{stats}");
    let nodes = stats["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{stats}");
    let mut held = 0;
    for node in nodes {
        assert_eq!(node["capacity"], json!(5000), "{node}");
        assert_eq!(node["max_memory"], json!(64u64 << 20), "{node}");
        let items = node["items"].as_u64().expect("items");
        assert!(items > 0 && items <= 5000, "{node}");
        held += items;
    }
    assert_eq!(
        held,
        2 * written.len() as u64,
        "two copies of every key: {stats}"
    );
}

/// Every limit a client's request meets, a peer's request meets too, on
/// the node that receives it (the peer API may be reachable by more than
/// the cache's own nodes), and an owner's refusal of a forwarded request
/// reaches the client as the owner gave it: its status and its JSON error.
/// Node-1 runs with smaller limits than node-0 (as during a rolling change
/// of them), so node-0 accepts and forwards requests that node-1, their
/// owner, refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_requests_meet_the_limits_and_an_owners_refusal_reaches_the_client() {
    use cache_node::exec::Write;
    use cache_node::peer::protocol::{Answer, RecordBatch, Source};
    use cache_node::peer::{Call, Request};

    let mut c = ProcCluster::new(2, 1);
    let epoch = c.set_ring(&[(0, Active), (1, Active)]);
    c.start(0);
    c.start_with_flags(
        1,
        &[
            "--max-key-bytes",
            "64",
            "--max-value-bytes",
            "100",
            "--max-tags",
            "2",
            "--max-tag-bytes",
            "16",
        ],
    );
    c.wait_settled(epoch, SETTLE).await;
    let owned_by_1 = |prefix: &str| {
        (0..1000)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| c.primary_of(k) == "node-1")
            .expect("node-1 owns some key")
    };
    let long_key = owned_by_1(&"k".repeat(80));
    let key = owned_by_1("small-");
    let big_value = format!(r#""{}""#, "v".repeat(200));
    let long_tag = "a-tag-of-twenty-bytes";
    let key_too_long = format!("key is {} bytes; the limit is 64", long_key.len());

    // Through node-0, within its limits and beyond its owner's.
    let writes = [
        (
            &long_key,
            r#"{"value":1}"#.to_owned(),
            414,
            key_too_long.as_str(),
        ),
        (
            &key,
            format!(r#"{{"value":{big_value}}}"#),
            413,
            "value is 202 bytes; the limit is 100",
        ),
        (
            &key,
            r#"{"value":1,"tags":["a","b","c"]}"#.to_owned(),
            400,
            "3 tags given; the limit is 2",
        ),
        (
            &key,
            format!(r#"{{"value":1,"tags":["{long_tag}"]}}"#),
            400,
            "tag is 21 bytes; the limit is 16",
        ),
    ];
    for (k, body, status, says) in &writes {
        let resp = c
            .client
            .put(c.url(0, &format!("/api/v1/cache/{}", encoded(k))))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), *status, "PUT {k} {body}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"], *says, "PUT {k} {body}");
    }
    for (method, path) in [
        (
            reqwest::Method::GET,
            format!("/api/v1/cache/{}", encoded(&long_key)),
        ),
        (
            reqwest::Method::DELETE,
            format!("/api/v1/cache/{}", encoded(&long_key)),
        ),
    ] {
        let resp = c
            .client
            .request(method.clone(), c.url(0, &path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 414, "{method} {path}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"], key_too_long.as_str(), "{method} {path}");
    }
    for i in 0..2 {
        assert!(
            c.held(i, &long_key).await.is_none(),
            "node {i} holds {long_key}"
        );
        assert!(c.held(i, &key).await.is_none(), "node {i} holds {key}");
    }

    // Straight to node-1 over the peer protocol: each request refused with
    // the status a client would get, and nothing applied.
    let at = c.nodes[1].peer_addr;
    let set = |key: &str, value: &str, tags: &[&str]| Request::Set {
        key: key.to_owned(),
        write: Write {
            value: bytes::Bytes::from(value.to_owned()),
            ttl: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        },
        keeper: None,
    };
    let refusals = [
        (set(&long_key, "1", &[]), 414, key_too_long.as_str()),
        (
            set(&key, &big_value, &[]),
            413,
            "value is 202 bytes; the limit is 100",
        ),
        (set(&key, "{", &[]), 400, "value is not valid JSON"),
        (
            set(&key, "1", &["a", "b", "c"]),
            400,
            "3 tags given; the limit is 2",
        ),
        (
            set(&key, "1", &[long_tag]),
            400,
            "tag is 21 bytes; the limit is 16",
        ),
        (set("", "1", &[]), 400, "key must not be empty"),
        (
            Request::Get {
                key: long_key.clone(),
            },
            414,
            key_too_long.as_str(),
        ),
        (
            Request::Delete {
                key: long_key.clone(),
            },
            414,
            key_too_long.as_str(),
        ),
        (
            Request::InvalidateTag {
                tag: long_tag.to_owned(),
            },
            400,
            "tag is 21 bytes; the limit is 16",
        ),
    ];
    for (request, status, says) in &refusals {
        // The answer as it came: anything but a refusal fails the test.
        let reply = c.peers.send(at, epoch, request, None).await.unwrap();
        match reply.answer {
            Answer::Refused {
                status: got,
                message,
            } => {
                assert_eq!(got, *status, "{request:?}");
                assert!(message.starts_with(says), "{request:?}: {message}");
            }
            other => panic!("{request:?}: {other:?}"),
        }
    }
    assert!(c.held(1, &key).await.is_none(), "a refused set was applied");
    // A replicated batch: the records within the limits are applied, the
    // others refused one by one.
    let mut batch = RecordBatch::default();
    batch.push(&Planted {
        key: &long_key,
        value: b"1",
    });
    batch.push(&Planted {
        key: &key,
        value: big_value.as_bytes(),
    });
    batch.push(&Planted {
        key: &key,
        value: b"{",
    });
    batch.push(&Planted {
        key: &key,
        value: b"\"fits\"",
    });
    let outcome = c
        .peers
        .ask(
            at,
            epoch,
            &Call::replicate(Source::Write, batch.freeze(), Vec::new()),
            None,
        )
        .await
        .unwrap();
    assert_eq!((outcome.applied, outcome.refused), (1, 3), "{outcome:?}");
    assert!(c.held(1, &long_key).await.is_none());
    assert_eq!(c.held(1, &key).await.unwrap()["value"], "fits");
}

//! The ring-aware client against a real cluster (cache-node processes on
//! loopback, replication factor 2): it learns the ring from one seed, sends
//! every request straight to an owner of its key (no node forwards any of
//! them, replicas' reads included), learns a changed ring from the epoch an
//! answer carries, and when an owner is gone, reads and writes go to the
//! key's other owner.
//!
//! "Straight to an owner" is judged by what the nodes did, not by the
//! client's plan: a request that reaches a member which may not serve it is
//! forwarded, and every node counts its forwards in
//! `distrocache_peer_requests_total{operation="forward"}`. (A replica whose
//! read lease lapsed forwards reads too, as it must: reads that meet a
//! forward are read again, in at most three rounds in all.)

#[path = "../../cache-node/tests/cluster_support/mod.rs"]
mod cluster_support;
#[path = "../../cache-node/tests/node_proc/mod.rs"]
mod node_proc;
#[path = "../../cache-node/tests/tls_support/mod.rs"]
mod tls_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_support::ProcCluster;
use distrocache_client::{Client, Error, Method, ReadFrom};
use distrocache_membership::MemberState::{Active, Joining, Leaving};

const SETTLE: Duration = Duration::from_secs(60);
const KEYS: usize = 60;
const FORWARDS: &str = r#"distrocache_peer_requests_total{operation="forward"}"#;
const LEASE_ERRORS: &str = r#"distrocache_peer_errors_total{operation="lease"}"#;

fn key(i: usize) -> String {
    format!("ring-key-{i}")
}

fn body(value: &str) -> Bytes {
    Bytes::from(format!(r#"{{"value":"{value}"}}"#))
}

/// Requests the running nodes have forwarded so far (each node shows the
/// series from its start, so a missing one fails the test rather than
/// reading as none).
async fn forwards(c: &ProcCluster) -> f64 {
    let mut total = 0.0;
    for i in c.running() {
        total += c
            .metric(i, FORWARDS)
            .await
            .unwrap_or_else(|| panic!("node {i} shows no {FORWARDS}"));
    }
    total
}

/// Node `i`'s failed lease requests so far (the series is shown from the
/// node's start).
async fn lease_errors_of(c: &ProcCluster, i: usize) -> f64 {
    c.metric(i, LEASE_ERRORS)
        .await
        .unwrap_or_else(|| panic!("node {i} shows no {LEASE_ERRORS}"))
}

/// Each running node's GET hits so far, by node id.
async fn hits(c: &ProcCluster) -> HashMap<String, f64> {
    let mut hits = HashMap::new();
    for i in c.running() {
        let n = c.metric(i, "distrocache_hits_total").await;
        hits.insert(c.nodes[i].id.clone(), n.expect("a hit counter"));
    }
    hits
}

/// Waits until `client` has let go of its connections to the node at
/// `addr`, which has stopped: a request to it is refused when it connects.
/// (A write sent on a connection the client still held may have arrived,
/// and is rightly reported uncertain rather than sent elsewhere.)
async fn refused(client: &Client, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.at(addr, Method::GET, "/api/v1/health".into()).await {
            Err(Error::Unreachable(reason)) if reason.contains("cannot connect") => return,
            other => assert!(
                Instant::now() < deadline,
                "{addr} still answers after it stopped: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to 10 s for `client` to hold a ring at `epoch` or newer,
/// running `between` (a request that may bring the news, or nothing) and
/// pausing 20 ms between looks.
async fn until_client_holds(client: &Client, epoch: u64, mut between: impl AsyncFnMut()) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.ring().epoch < epoch {
        assert!(
            Instant::now() < deadline,
            "the client still holds epoch {} after an answer named {epoch}",
            client.ring().epoch
        );
        between().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes every key through the client, each answered by the key's primary
/// itself, then reads each twice (the client takes the owners in turn, so
/// both copies are read): the values written, each node serving one read
/// of every key it owns, and not one forward.
async fn every_request_goes_straight_to_an_owner(c: &ProcCluster, client: &Client, round: &str) {
    let before = forwards(c).await;
    for i in 0..KEYS {
        let key = key(i);
        let answer = client
            .set_raw(&key, body(&format!("{round}-{i}")))
            .await
            .unwrap_or_else(|e| panic!("SET {key}: {e}"));
        let primary = c.primary_of(&key);
        assert_eq!(
            answer.served_by(),
            Some(primary.as_str()),
            "{key} was written by another node than its primary"
        );
    }
    assert_eq!(
        forwards(c).await,
        before,
        "a node forwarded writes of the ring-aware client ({round})"
    );

    let mut owned: HashMap<String, f64> = HashMap::new();
    for i in 0..KEYS {
        for owner in c.owners_of(&key(i)) {
            *owned.entry(owner).or_default() += 1.0;
        }
    }
    // A replica serves its own copies only while it holds read leases
    // (renewed every half second, each good for two), and forwards reads to
    // the primary otherwise, as it must. A node stalled for over a second on
    // a loaded machine can let its leases lapse in the middle of the reads,
    // so reads that met a forward are read again, in at most three rounds
    // in all: a client that sends reads anywhere but to owners fails every
    // one.
    for attempt in 1.. {
        c.wait_metric("distrocache_read_lease_valid", 1.0, SETTLE)
            .await;
        let before = forwards(c).await;
        let hits_before = hits(c).await;
        for i in 0..KEYS {
            for _ in 0..2 {
                let got = client
                    .get(&key(i))
                    .await
                    .unwrap_or_else(|e| panic!("GET {}: {e}", key(i)))
                    .unwrap_or_else(|| panic!("{} is missing", key(i)));
                assert_eq!(got.value, serde_json::json!(format!("{round}-{i}")));
            }
        }
        let forwarded = forwards(c).await - before;
        let served: HashMap<String, f64> = hits(c)
            .await
            .into_iter()
            .map(|(id, n)| (id.clone(), n - hits_before[&id]))
            .filter(|(_, n)| *n > 0.0)
            .collect();
        if forwarded == 0.0 {
            assert_eq!(served, owned, "reads served per node ({round})");
            return;
        }
        assert!(
            attempt < 3,
            "nodes forwarded {forwarded} reads of the ring-aware client in each of {attempt} \
             rounds ({round}); reads served per node {served:?}, keys owned {owned:?}"
        );
        eprintln!("{round}: {forwarded} read(s) forwarded (a lease lapsed?); reading again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_the_ring_and_goes_around_a_lost_owner() {
    let mut c = ProcCluster::new(3, 2);
    let epoch = c.start_members(3, SETTLE).await;

    // One seed is enough to learn every member.
    let client = Client::builder([c.nodes[0].addr.to_string()])
        .read_from(ReadFrom::AnyOwner)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the client learns the ring");
    let ring = client.ring();
    assert_eq!(ring.epoch, epoch);
    let mut learned: Vec<_> = ring
        .nodes
        .iter()
        .map(|n| (n.id.clone(), n.address))
        .collect();
    learned.sort();
    let members: Vec<_> = c.nodes.iter().map(|n| (n.id.clone(), n.addr)).collect();
    assert_eq!(learned, members);
    every_request_goes_straight_to_an_owner(&c, &client, "three").await;

    // A fourth member joins, then becomes active. The client is not told:
    // an answer's epoch makes it learn the new ring.
    let joined = c.add_slot();
    let joining = c.set_ring(&[(0, Active), (1, Active), (2, Active), (joined, Joining)]);
    c.start(joined);
    c.wait_settled(joining, SETTLE).await;
    let active = c.set_ring(&[(0, Active), (1, Active), (2, Active), (joined, Active)]);
    c.wait_settled(active, SETTLE).await;
    assert!(client.ring().epoch < active);
    until_client_holds(&client, active, async || {
        client
            .get(&key(0))
            .await
            .expect("a read while the ring changes");
    })
    .await;
    assert_eq!(client.ring().nodes.len(), 4);
    every_request_goes_straight_to_an_owner(&c, &client, "four").await;

    // An owner dies (the ring still lists it): every key keeps an owner
    // that answers, and the client goes to it for reads and for writes.
    let lost = 1;
    let lost_id = c.nodes[lost].id.clone();
    let lost_addr = c.nodes[lost].addr;
    let mut lease_errors = Vec::new();
    for i in c.running().into_iter().filter(|&i| i != lost) {
        lease_errors.push((i, lease_errors_of(&c, i).await));
    }
    c.kill(lost);
    // The kernel closed every connection to it. A write sent on one before
    // its sender noticed may have arrived, and is rightly reported uncertain
    // rather than sent elsewhere; the writes below must meet none. So wait
    // until the client has let go of its own (a request to the node is
    // refused when it connects), and until every other node has found the
    // node gone (one of its lease requests to it failed, which ends the
    // connection it went on).
    refused(&client, lost_addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, before) in lease_errors {
        while lease_errors_of(&c, i).await <= before {
            assert!(
                Instant::now() < deadline,
                "node {i} did not find {lost_id} gone"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut primaries_lost = 0;
    for i in 0..KEYS {
        let key = key(i);
        let got = client
            .get(&key)
            .await
            .unwrap_or_else(|e| panic!("GET {key} with {lost_id} gone: {e}"))
            .unwrap_or_else(|| panic!("{key} is missing with {lost_id} gone"));
        assert_eq!(got.value, serde_json::json!(format!("four-{i}")));
        let answer = client
            .set_raw(&key, body(&format!("after-{i}")))
            .await
            .unwrap_or_else(|e| panic!("SET {key} with {lost_id} gone: {e}"));
        // Answered, so by a node that is up: for a key whose primary is
        // gone, the next owner coordinated the write.
        assert!(answer.status.is_success());
        if c.primary_of(&key) == lost_id {
            primaries_lost += 1;
        }
    }
    assert!(
        primaries_lost > 0,
        "no key of the test had {lost_id} as its primary"
    );
    for i in 0..KEYS {
        let got = client.get(&key(i)).await.unwrap().unwrap();
        assert_eq!(got.value, serde_json::json!(format!("after-{i}")));
    }
}

/// A client that was not told of a ring change still reaches every key: a
/// node leaves (handing its keys off) and stops, and for the keys it alone
/// owned in the ring the client holds, the client finds that owner gone and
/// sends reads and writes to another member, which serves them from the new
/// ring; the answers' epoch then brings the client that ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_an_old_ring_reaches_keys_whose_owner_left_through_another_member() {
    let mut c = ProcCluster::new(3, 1);
    let first = c.start_members(3, SETTLE).await;
    let connect = || async {
        Client::builder([c.nodes[0].addr.to_string()])
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("the client learns the ring")
    };
    // One client reads and one writes, so that neither learns the new ring
    // from the other's answers before its own request is sent.
    let (reader, writer) = (connect().await, connect().await);
    for i in 0..KEYS {
        let answer = writer.set_raw(&key(i), body(&format!("before-{i}"))).await;
        assert!(
            answer
                .unwrap_or_else(|e| panic!("SET {}: {e}", key(i)))
                .status
                .is_success()
        );
    }
    let left = 2;
    let left_id = c.nodes[left].id.clone();
    let left_addr = c.nodes[left].addr;
    let moved: Vec<usize> = (0..KEYS)
        .filter(|&i| c.primary_of(&key(i)) == left_id)
        .collect();
    assert!(!moved.is_empty(), "{left_id} owns none of the test's keys");

    let leaving = c.set_ring(&[(0, Active), (1, Active), (left, Leaving)]);
    c.wait_handoff(left, SETTLE).await;
    let removed = c.set_ring(&[(0, Active), (1, Active)]);
    c.wait_settled(removed, SETTLE).await;
    c.stop(left);
    assert!(removed > leaving);
    for client in [&reader, &writer] {
        refused(client, left_addr).await;
        assert_eq!(
            client.ring().epoch,
            first,
            "the client was told of the change"
        );
        assert!(client.ring().nodes.iter().any(|n| n.address == left_addr));
    }

    // In the clients' ring, the node that left is the only owner of
    // `moved`'s keys: each request first meets a refused connection.
    let got = reader
        .get(&key(moved[0]))
        .await
        .unwrap_or_else(|e| panic!("GET {} with its owner gone: {e}", key(moved[0])))
        .unwrap_or_else(|| panic!("{} is missing with its owner gone", key(moved[0])));
    assert_eq!(got.value, serde_json::json!(format!("before-{}", moved[0])));
    assert_eq!(writer.ring().epoch, first, "the writer learned the ring");
    let answer = writer
        .set_raw(&key(moved[0]), body("after"))
        .await
        .unwrap_or_else(|e| panic!("SET {} with its owner gone: {e}", key(moved[0])));
    assert!(answer.status.is_success(), "{answer:?}");
    // Whichever member the client fell back to, the new primary wrote it.
    let owner = c.primary_of(&key(moved[0]));
    assert_eq!(answer.served_by(), Some(owner.as_str()));
    // The writer's first answer on that connection since the ring changed
    // (its last request met the refused connection): it names the epoch.
    assert_eq!(answer.epoch, Some(removed));

    // The answers' epoch brings both clients the ring without the node
    // that left; then every key reads back, the one rewritten with its new
    // value.
    for client in [&reader, &writer] {
        until_client_holds(client, removed, async || {
            client.get(&key(moved[0])).await.expect("a read");
        })
        .await;
        assert_eq!(client.ring().epoch, removed);
        assert!(client.ring().nodes.iter().all(|n| n.address != left_addr));
    }
    for i in 0..KEYS {
        let expected = if i == moved[0] {
            "after".to_string()
        } else {
            format!("before-{i}")
        };
        let got = reader.get(&key(i)).await.unwrap().unwrap();
        assert_eq!(got.value, serde_json::json!(expected), "{}", key(i));
    }
}

/// An answer that names a newer epoch sends the client to the node that
/// gave it for the ring: the client learns that ring even while the other
/// members (which it would otherwise ask first) still serve the older one,
/// and needs no second answer to name it (a node names a new epoch to a
/// connection once, and then only as a reminder every 64th answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_learns_a_newer_ring_from_the_node_that_named_it() {
    let mut c = ProcCluster::new(3, 2);
    let members = [(0, Active), (1, Active), (2, Active)];
    // Each node reads a ring file of its own, so that one can be given the
    // next ring before the others.
    let first = c.set_ring(&members);
    for i in 0..3 {
        let file = c.private_membership_file(i);
        cluster_support::write_atomically(&file, &c.doc(first, &members).to_json());
        c.start_with_file(i, &file);
    }
    c.wait_settled(first, SETTLE).await;
    let client = Client::builder([c.nodes[0].addr.to_string()])
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the client learns the ring");
    assert_eq!(client.ring().epoch, first);

    // The node the client would ask last gets the next ring (the same
    // members).
    let named_by = client.ring().nodes.last().unwrap().address;
    let told = c.nodes.iter().position(|n| n.addr == named_by).unwrap();
    let newer = first + 1;
    cluster_support::write_atomically(
        &c.private_membership_file(told),
        &c.doc(newer, &members).to_json(),
    );
    let deadline = Instant::now() + SETTLE;
    while c.get_json(told, "/api/v1/cluster").await.1["epoch"] != newer {
        assert!(
            Instant::now() < deadline,
            "node {told} never took epoch {newer}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let answer = client
        .at(named_by, Method::GET, "/api/v1/stats".into())
        .await
        .expect("stats from the node with the newer ring");
    assert_eq!(answer.epoch, Some(newer));
    // Nothing more is sent: the one answer has to be enough.
    until_client_holds(&client, newer, async || {}).await;
    assert_eq!(client.ring().epoch, newer);
}

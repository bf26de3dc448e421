//! The client's keep-alive connections against real cache-node processes on
//! loopback: a client with no time limit is served, connections are reused,
//! one the node closed while it sat idle is replaced without failing the
//! request (a write included: it never left, so it is not "uncertain"),
//! many requests at once each get their own answer, and a node that is gone
//! is reported unreachable. Then, against stand-ins for members that
//! script their answers: a seed without a ring is passed over, a write
//! whose connection never opened goes elsewhere, one whose connection
//! breaks after it was sent is uncertain, one time limit bounds a request
//! over every node it tries, and a cache made again with lower epochs is
//! followed without asking every node over and over. (Linux: the test of
//! connection reuse reads the kernel's TCP table.)

#[path = "../../cache-node/tests/node_proc/mod.rs"]
mod node_proc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use distrocache_client::{Client, Error, Method, ReadFrom};
use distrocache_membership::{ClusterView, MemberState, MemberView, Mode};
use node_proc::NodeProc;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn client_of(node: &NodeProc) -> Client {
    Client::builder([node.addr.to_string()])
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the client learns the ring")
}

/// The loopback TCP connections to `port` from this side, by state, from
/// the kernel's table: (established, in TIME_WAIT). A client that closed a
/// connection leaves it in TIME_WAIT for a minute, so a count of zero means
/// none was closed.
fn connections_to(port: u16) -> (usize, usize) {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let mut established = 0;
    let mut time_wait = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let remote_port = fields[2].rsplit(':').next().unwrap();
        if u16::from_str_radix(remote_port, 16).unwrap() != port {
            continue;
        }
        match fields[3] {
            "01" => established += 1,
            "06" => time_wait += 1,
            _ => {}
        }
    }
    (established, time_wait)
}

#[tokio::test]
async fn a_client_with_no_time_limit_is_served() {
    let node = NodeProc::start(&[]);
    // A limit too large to add to the clock: no deadline at all.
    let client = Client::builder([node.addr.to_string()])
        .timeout(Duration::MAX)
        .connect()
        .await
        .expect("the client learns the ring");
    client.set_raw("k", r#"{"value":1}"#.into()).await.unwrap();
    let got = client.get("k").await.unwrap().unwrap();
    assert_eq!(got.value, serde_json::json!(1));
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let node = NodeProc::start(&[]);
    let client = client_of(&node).await;
    for i in 0..50 {
        let body = format!(r#"{{"value":{i}}}"#);
        client.set_raw(&format!("k{i}"), body.into()).await.unwrap();
        let got = client.get(&format!("k{i}")).await.unwrap().unwrap();
        assert_eq!(got.value, serde_json::json!(i));
    }
    // Learning the ring and 100 requests, one after another: one
    // connection, never closed.
    assert_eq!(connections_to(node.addr.port()), (1, 0));
}

#[tokio::test]
async fn a_connection_the_node_closed_while_idle_is_replaced() {
    let node = NodeProc::start(&["--idle-timeout", "300ms"]);
    let client = client_of(&node).await;
    client
        .set_raw("before", r#"{"value":1}"#.into())
        .await
        .unwrap();
    // The node closes the connection that now sits idle in the pool.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A write on it would never leave: it goes on a new connection and
    // succeeds, rather than failing as "may have been applied".
    client
        .set_raw("after", r#"{"value":2}"#.into())
        .await
        .expect("a write after the idle close");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = client
        .get("after")
        .await
        .expect("a read after the idle close");
    assert_eq!(got.unwrap().value, serde_json::json!(2));
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let node = NodeProc::start(&[]);
    let client = client_of(&node).await;
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                for round in 0..20 {
                    let key = format!("t{t}");
                    let value = t * 1000 + round;
                    client
                        .set_raw(&key, format!(r#"{{"value":{value}}}"#).into())
                        .await
                        .unwrap();
                    let got = client.get(&key).await.unwrap().unwrap();
                    assert_eq!(got.key, key);
                    assert_eq!(got.value, serde_json::json!(value));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a task panicked");
    }
}

#[tokio::test]
async fn a_node_that_is_gone_is_unreachable_and_a_write_to_it_never_left() {
    let node = NodeProc::start(&[]);
    let client = client_of(&node).await;
    client.set_raw("k", r#"{"value":1}"#.into()).await.unwrap();
    node.kill();
    match client.get("k").await {
        Err(Error::Unreachable(_)) => {}
        other => panic!("a read from a node that is gone: {other:?}"),
    }
    match client.set_raw("k", r#"{"value":2}"#.into()).await {
        Err(Error::Unreachable(_)) => {}
        other => panic!("a write to a node that is gone: {other:?}"),
    }
}

/// A stand-in for a cluster member on loopback: it answers its ring view to
/// a request for the ring (counting those), records the request line of
/// every other request, and then does with it what its [`Items`] say.
struct FakeNode {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    ring: Arc<Mutex<FakeRing>>,
}

/// What a [`FakeNode`] answers for the ring, and the epoch it names on
/// every answer once it has adopted one ([`FakeNode::adopt`]; a real node
/// names it only where it is news to the connection, see the client's
/// module comment: naming it on every answer asks more of the client).
#[derive(Default)]
struct FakeRing {
    view: String,
    names: Option<u64>,
    asked: usize,
}

/// What a [`FakeNode`] does with a request other than for the ring.
#[derive(Clone, Copy, PartialEq)]
enum Items {
    /// Answers with an item.
    Answer,
    /// Hangs up without answering.
    HangUp,
    /// Keeps the connection open and never answers.
    Silent,
}

impl FakeNode {
    /// Its listener (so that its address can go into the ring view before
    /// it serves), and itself.
    async fn start() -> (TcpListener, Self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, ring) = Default::default();
        (listener, Self { addr, seen, ring })
    }

    fn serve(&self, listener: TcpListener, items: Items, view: String) {
        self.ring.lock().view = view;
        let (seen, ring) = (self.seen.clone(), self.ring.clone());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (seen, ring) = (seen.clone(), ring.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(line) = read_request(&mut conn, &mut buf).await {
                        let body = if line.starts_with("get /api/v1/cluster ") {
                            let mut ring = ring.lock();
                            ring.asked += 1;
                            ring.view.clone()
                        } else {
                            seen.lock().push(line);
                            match items {
                                Items::Answer => {}
                                Items::HangUp => return,
                                Items::Silent => std::future::pending().await,
                            }
                            r#"{"key":"k","value":"from the other owner","ttl":0,"created_at":"2026-01-01T00:00:00Z","accessed_at":"2026-01-01T00:00:00Z","access_count":1,"tags":[]}"#.to_owned()
                        };
                        let epoch = ring.lock().names.map_or(String::new(), |e| {
                            format!("{}: {e}\r\n", distrocache_client::EPOCH_HEADER)
                        });
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{epoch}content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// From now on, answers `view` (a ring at `epoch`) for the ring and
    /// names `epoch` on every answer.
    fn adopt(&self, epoch: u64, view: String) {
        let mut ring = self.ring.lock();
        ring.view = view;
        ring.names = Some(epoch);
    }

    /// How many requests for the ring it has answered.
    fn ring_requests(&self) -> usize {
        self.ring.lock().asked
    }
}

/// Reads one request from `conn` (its head, then a body of its
/// content-length), keeping bytes past it in `buf`; its request line,
/// lowercased, or `None` once the client has closed.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut need = None;
    loop {
        if need.is_none()
            && let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&buf[..i + 4]).to_lowercase();
            let body_len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let line = head.lines().next().expect("a request line").to_owned();
            need = Some((i + 4 + body_len, line));
        }
        if let Some((len, line)) = &need
            && buf.len() >= *len
        {
            buf.drain(..*len);
            return Some(line.clone());
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A cluster member's view of a ring of `members` (id, client address) at
/// `epoch`, replication factor 2, as JSON.
fn view_of(epoch: u64, members: &[(&str, SocketAddr)]) -> String {
    let view = ClusterView {
        node_id: "a".into(),
        mode: Mode::Cluster,
        epoch,
        replication_factor: Some(2),
        hashing: None,
        member_state: Some(MemberState::Active),
        members: members
            .iter()
            .map(|(id, addr)| MemberView {
                id: (*id).into(),
                address: None,
                client_address: Some(addr.to_string()),
                state: MemberState::Active,
            })
            .collect(),
        previous_epoch: None,
        settled: true,
        ready: true,
        read_lease: true,
        owners: None,
    };
    serde_json::to_string(&view).unwrap()
}

/// A key whose primary, in the ring `client` holds, is the member `id`.
fn key_with_primary(client: &Client, id: &str) -> String {
    let ring = client.ring();
    (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| ring.nodes[ring.owners(k)[0]].id == id)
        .unwrap_or_else(|| panic!("{id} is the primary of no key"))
}

/// A seed that is a cluster node without a ring yet (it lists no member)
/// is not taken for the ring: the client asks the next seed.
#[tokio::test]
async fn a_seed_without_a_ring_yet_is_passed_over_for_one_with_a_ring() {
    let (listener_a, a) = FakeNode::start().await;
    let (listener_b, b) = FakeNode::start().await;
    a.serve(listener_a, Items::Answer, view_of(0, &[]));
    b.serve(
        listener_b,
        Items::Answer,
        view_of(4, &[("a", a.addr), ("b", b.addr)]),
    );
    let client = Client::builder([a.addr.to_string(), b.addr.to_string()])
        .connect()
        .await
        .expect("the second seed has a ring");
    assert_eq!(client.ring().epoch, 4);
    assert_eq!(client.ring().nodes.len(), 2);

    // With no seed holding a ring, there is nothing to route by.
    let (listener_c, c) = FakeNode::start().await;
    c.serve(listener_c, Items::Answer, view_of(0, &[]));
    match Client::builder([c.addr.to_string()]).connect().await {
        Err(Error::BadAnswer(e)) => assert!(e.contains("no ring yet"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a client with an empty ring"),
    }
}

/// A node that takes no new connection (its accept queue full, so the
/// kernel drops the handshake): a write whose connection never opened
/// within the client's time limit never left, so it goes to another node
/// rather than failing as "may have been applied".
#[tokio::test]
async fn a_write_whose_connection_never_opened_in_time_goes_elsewhere() {
    // A listener that never accepts, its queue filled.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = socket.listen(1).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(silent_addr))
            .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(silent_addr))
            .await
            .is_err(),
        "the queue is full: a connection no longer opens"
    );

    let (listener_b, b) = FakeNode::start().await;
    b.serve(
        listener_b,
        Items::Answer,
        view_of(1, &[("a", silent_addr), ("b", b.addr)]),
    );
    let client = Client::builder([b.addr.to_string()])
        .timeout(Duration::from_millis(700))
        .connect()
        .await
        .expect("the client learns the ring");
    let key = key_with_primary(&client, "a");
    client
        .set_raw(&key, r#"{"value":1}"#.into())
        .await
        .expect("the write goes to b");
    assert_eq!(
        *b.seen.lock(),
        [format!("put /api/v1/cache/{key} http/1.1")]
    );
    drop(fillers);
}

/// A write whose connection breaks after it was sent may have been applied:
/// the client says so (`Error::Uncertain`) and does not send it to another
/// node, where it could be applied a second time; nor a tag invalidation. A
/// read in the same situation goes on to the key's other owner.
#[tokio::test]
async fn a_write_cut_off_after_it_was_sent_is_uncertain_and_not_sent_again() {
    let (listener_a, a) = FakeNode::start().await;
    let (listener_b, b) = FakeNode::start().await;
    let view = view_of(1, &[("a", a.addr), ("b", b.addr)]);
    a.serve(listener_a, Items::HangUp, view.clone());
    b.serve(listener_b, Items::Answer, view);
    let client = Client::builder([a.addr.to_string()])
        .read_from(ReadFrom::Primary)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the client learns the ring");
    // A key whose primary is `a`, the node that hangs up.
    let key = key_with_primary(&client, "a");

    match client.set_raw(&key, r#"{"value":1}"#.into()).await {
        Err(Error::Uncertain { node, .. }) => assert_eq!(node, a.addr),
        other => panic!("a write cut off after it was sent: {other:?}"),
    }
    assert_eq!(
        *a.seen.lock(),
        [format!("put /api/v1/cache/{key} http/1.1")]
    );
    assert!(
        b.seen.lock().is_empty(),
        "the write went on to b: {:?}",
        b.seen.lock()
    );

    // A tag invalidation is not sent to another node after one that may
    // have run it hung up: it would run again there.
    match client.invalidate_tag("red").await {
        Err(Error::Uncertain { node, .. }) => assert_eq!(node, a.addr),
        other => panic!("an invalidation cut off after it was sent: {other:?}"),
    }
    assert_eq!(a.seen.lock().len(), 2);
    assert_eq!(a.seen.lock()[1], "post /api/v1/invalidate/tag/red http/1.1");
    assert!(
        b.seen.lock().is_empty(),
        "the invalidation went on to b: {:?}",
        b.seen.lock()
    );

    let got = client.get(&key).await.unwrap().expect("b answers");
    assert_eq!(got.value, serde_json::json!("from the other owner"));
    assert_eq!(a.seen.lock().len(), 3, "the read went to the primary first");
    assert_eq!(
        *b.seen.lock(),
        [format!("get /api/v1/cache/{key} http/1.1")]
    );
}

/// The client's time limit is how long one request may take, every node it
/// tries included. A read whose owner takes it and never answers goes on
/// to the next owner after half of the limit, so the read is served within
/// it; and a read no node answers fails once the limit has passed, not
/// after a limit for each node it tried.
#[tokio::test]
async fn the_time_limit_bounds_a_request_over_every_node_it_tries() {
    let (listener_a, a) = FakeNode::start().await;
    let (listener_b, b) = FakeNode::start().await;
    let (listener_c, c) = FakeNode::start().await;
    let view = view_of(1, &[("a", a.addr), ("b", b.addr), ("c", c.addr)]);
    a.serve(listener_a, Items::Silent, view.clone());
    b.serve(listener_b, Items::Answer, view.clone());
    c.serve(listener_c, Items::Silent, view);
    let limit = Duration::from_millis(800);
    let client = Client::builder([b.addr.to_string()])
        .read_from(ReadFrom::Primary)
        .timeout(limit)
        .connect()
        .await
        .expect("the client learns the ring");

    // Owned by a (silent) and b: b serves it once a has had half the limit.
    let ring = client.ring();
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let owners: Vec<&str> = ring
                .owners(k)
                .iter()
                .map(|&i| ring.nodes[i].id.as_str())
                .collect();
            owners == ["a", "b"]
        })
        .expect("a key owned by a, then b");
    let started = tokio::time::Instant::now();
    let got = client.get(&key).await.unwrap().expect("b answers");
    assert_eq!(got.value, serde_json::json!("from the other owner"));
    let took = started.elapsed();
    assert!(
        took >= limit / 2,
        "a was given {took:?}, not half the limit"
    );
    assert!(
        took < limit,
        "the read took {took:?}, past its {limit:?} limit"
    );

    // With no node answering, a read fails once the limit has passed.
    let mut silent = Vec::new();
    for id in ["x", "y", "z"] {
        let (listener, node) = FakeNode::start().await;
        silent.push((id, listener, node));
    }
    let members: Vec<(&str, SocketAddr)> = silent.iter().map(|(id, _, n)| (*id, n.addr)).collect();
    let view = view_of(1, &members);
    let mut seeds = Vec::new();
    for (_, listener, node) in silent {
        node.serve(listener, Items::Silent, view.clone());
        seeds.push(node.addr.to_string());
    }
    let client = Client::builder(seeds)
        .timeout(limit)
        .connect()
        .await
        .expect("the client learns the ring");
    let started = tokio::time::Instant::now();
    match client.get("k").await {
        Err(Error::Unreachable(_)) => {}
        other => panic!("a read no node answered in time: {other:?}"),
    }
    let took = started.elapsed();
    assert!(took >= limit, "failed after {took:?}, before its limit");
    // One limit and the timers' slack; a limit per node tried is 3x.
    assert!(
        took < limit * 3 / 2,
        "failed after {took:?}: the limit was {limit:?}"
    );
}

/// A cache made again starts its epochs again, below the one the client
/// last saw named. Once every node has given its ring and none was that
/// new, the client stops waiting for that epoch: a later epoch one answer
/// names is then learned from the node that named it, in one request,
/// rather than by asking every node again, attempt after attempt.
#[tokio::test]
async fn a_cache_made_again_with_lower_epochs_is_followed_from_the_node_that_names_one() {
    let (listener_a, a) = FakeNode::start().await;
    let (listener_b, b) = FakeNode::start().await;
    let members = [("a", a.addr), ("b", b.addr)];
    a.serve(listener_a, Items::Answer, String::new());
    b.serve(listener_b, Items::Answer, String::new());
    for node in [&a, &b] {
        node.adopt(50, view_of(50, &members));
    }
    let client = Client::builder([a.addr.to_string()])
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("the client learns the ring");
    assert_eq!(client.ring().epoch, 50);

    // The cache is made again: its members are at epoch 1. A refresh asks
    // both, and takes the newest ring they have.
    for node in [&a, &b] {
        node.adopt(1, view_of(1, &members));
    }
    client.refresh().await.expect("both nodes answer");
    assert_eq!(client.ring().epoch, 1);

    // Epoch 2: an answer names it, and the node that named it has it.
    for node in [&a, &b] {
        node.adopt(2, view_of(2, &members));
    }
    let before = a.ring_requests() + b.ring_requests();
    let answer = client
        .at(a.addr, Method::GET, "/api/v1/cache/k".into())
        .await
        .expect("a answers");
    assert_eq!(answer.epoch, Some(2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.ring().epoch < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never learned epoch 2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A refresh still waiting for epoch 50 would go on asking both nodes
    // for 1 s (five attempts, 100 ms more apart each time): wait past that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        a.ring_requests() + b.ring_requests() - before,
        1,
        "requests for the ring after epoch 2 was named"
    );
}

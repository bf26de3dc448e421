//! Test support for multi-node tests: real `cache-node` processes, each on
//! its own loopback address (127.1.B.x, a block B per test so tests can run
//! in parallel), sharing a membership file the test rewrites to change the
//! ring. Every process is killed when the cluster is dropped; if the test is
//! failing, the tail of each node's log is printed first.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use cache_node::peer::{PeerClient, PeerSettings};
use cache_node::reload::Reloadable;
use cache_node::tls::PeerTls;
use cache_node::tokens::TokenSet;
use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc, NodeProgress};
use serde_json::Value;

use crate::node_proc::{Launch, NodeProc};

/// Loopback blocks of other crates' tests (the CLI's and the client's
/// include this module) start elsewhere, each crate at its own, so that they
/// never meet cache-node's own tests' nodes or each other's.
const FIRST_BLOCK: u8 = match env!("CARGO_PKG_NAME").as_bytes() {
    b"cache-node" => 1,
    b"distrocache-cli" => 200,
    b"distrocache-client" => 230,
    _ => panic!("give this crate loopback blocks of its own in cluster_support"),
};
const PORT: u16 = 18_400;
/// The peer port, when a cluster gives the peer API a listener of its own.
const PEER_PORT: u16 = 18_401;

static NEXT_BLOCK: AtomicU8 = AtomicU8::new(FIRST_BLOCK);

pub struct ProcNode {
    pub id: String,
    pub addr: SocketAddr,
    /// Where peers reach it: `addr`, or its own peer port.
    pub peer_addr: SocketAddr,
    /// Where the ring tells peers to reach it, when a [`PeerRelay`] stands
    /// in front of `peer_addr`.
    ring_addr: Option<SocketAddr>,
    child: Option<NodeProc>,
    log: PathBuf,
    /// Where in `log` the running process's lines begin (the file is kept
    /// across restarts of the slot).
    log_from: usize,
}

impl ProcNode {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct ProcCluster {
    dir: tempfile::TempDir,
    block: u8,
    pub nodes: Vec<ProcNode>,
    pub epoch: u64,
    pub replication_factor: u32,
    pub client: reqwest::Client,
    /// Extra flags for every node.
    flags: Vec<String>,
    /// Extra environment for every node.
    env: Vec<(String, String)>,
    /// The client token, when the cluster runs with authentication.
    pub client_token: Option<String>,
    /// The peer protocol's client, with the peer token when the cluster runs
    /// with authentication: how tests ask a node what it holds.
    pub peers: PeerClient,
    /// Each node runs with `--data-dir` (see [`Self::data_dir`]).
    data_dirs: bool,
    /// The peer CA and the members' certificate, when the peer API runs
    /// mutual TLS.
    pub peer_pki: Option<PeerPki>,
    /// Whether the peer API has a port of its own ([`PEER_PORT`]).
    own_peer_port: bool,
}

/// The peer API's PKI: a CA and one certificate for every member, valid for
/// `*.`[`PEER_DOMAIN`] (as one Secret mounted in every pod of a
/// StatefulSet).
pub struct PeerPki {
    pub ca: crate::tls_support::TestCa,
    pub members: crate::tls_support::Issued,
}

/// The value of `series` (an unlabelled or exactly labelled sample, e.g.
/// `distrocache_peer_requests_total{operation="forward"}`) in a Prometheus
/// exposition, if shown there. A value that is not a number fails the test.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?.trim();
        Some(
            value
                .parse()
                .unwrap_or_else(|e| panic!("{series}: {value:?}: {e}")),
        )
    })
}

/// The `--peer-tls-domain` of mTLS clusters: member `node-3`'s identity is
/// `node-3.peers.test`.
pub const PEER_DOMAIN: &str = "peers.test";
/// The name the client API's certificate carries under
/// [`ProcCluster::with_client_tls`].
pub const CLIENT_TLS_NAME: &str = "cache.test";

fn peer_client(token: Option<&str>) -> PeerClient {
    peer_client_as("test", token, None)
}

/// A peer client that says it is `from`, with `token` and `tls`.
pub fn peer_client_as(from: &str, token: Option<&str>, tls: Option<Arc<PeerTls>>) -> PeerClient {
    PeerClient::with_credentials(
        from,
        PeerSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_message_bytes: 8 << 20,
        },
        token.map(|t| Reloadable::fixed("peer token", TokenSet::one(t))),
        tls,
    )
}

impl ProcCluster {
    /// A cluster of `n` node slots (not started), ids `node-0..`.
    pub fn new(n: usize, replication_factor: u32) -> Self {
        let block = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes = (0..n).map(|i| slot(block, i, dir.path())).collect();
        Self {
            dir,
            block,
            nodes,
            epoch: 0,
            replication_factor,
            client: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(64)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            flags: Vec::new(),
            env: Vec::new(),
            client_token: None,
            peers: peer_client(None),
            data_dirs: false,
            peer_pki: None,
            own_peer_port: false,
        }
    }

    /// Every node keeps snapshots in a directory of its own, which outlives
    /// its process (as a pod's volume does).
    pub fn with_data_dirs(mut self) -> Self {
        self.data_dirs = true;
        self
    }

    /// Node `i`'s snapshot directory (with [`Self::with_data_dirs`]).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}-data"))
    }

    /// SIGTERM, as Kubernetes stops a pod, and waits for the process to
    /// exit (it writes its snapshot first, with a data directory).
    pub fn stop(&mut self, i: usize) {
        let Some(mut child) = self.nodes[i].child.take() else {
            return;
        };
        child.signal(libc::SIGTERM);
        let status = child.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "node {i} exited with {status}");
    }

    /// The peer API on its own port with mutual TLS (on top of
    /// [`with_auth`](Self::with_auth) when called after it): every node
    /// presents the members' certificate and checks its peers' against the
    /// CA and their member names; the test's peer client does the same.
    pub fn with_peer_mtls(mut self) -> Self {
        use crate::tls_support::{TestCa, Validity};
        let ca = TestCa::new(&self.dir.path().join("peer-pki"), "peer-ca");
        let members = ca.issue("members", &[&format!("*.{PEER_DOMAIN}")], Validity::Current);
        self.peer_port_of_its_own();
        self.flags.extend([
            "--peer-tls-cert-file".into(),
            members.cert.display().to_string(),
            "--peer-tls-key-file".into(),
            members.key.display().to_string(),
            "--peer-tls-ca-file".into(),
            ca.ca_file.display().to_string(),
            "--peer-tls-domain".into(),
            PEER_DOMAIN.into(),
        ]);
        let tls = PeerTls::load(
            members.cert.clone(),
            members.key.clone(),
            ca.ca_file.clone(),
            Some(PEER_DOMAIN.into()),
        )
        .expect("the test's peer TLS");
        self.peers = peer_client_as("test", self.peer_token().as_deref(), Some(tls));
        self.peer_pki = Some(PeerPki { ca, members });
        self.learn_peer_names();
        self
    }

    /// The peer token, when the cluster runs with authentication.
    pub fn peer_token(&self) -> Option<String> {
        self.client_token
            .as_ref()
            .map(|_| "peer-secret-token".to_owned())
    }

    /// Tells the test's peer client which member is at which address (with
    /// mutual TLS, the name each node's certificate is checked against).
    pub fn learn_peer_names(&self) {
        self.peers
            .learn_names(self.nodes.iter().map(|n| (n.peer_addr, n.id.as_str())));
    }

    /// Every node requires bearer tokens (client and peer, read from files)
    /// and serves its peer API on a port of its own; the test client sends
    /// the client token.
    pub fn with_auth(mut self) -> Self {
        let client = self.dir.path().join("client-token");
        let peer = self.dir.path().join("peer-token");
        std::fs::write(&client, "client-secret-token\n").expect("token file");
        std::fs::write(&peer, "peer-secret-token\n").expect("token file");
        self.peer_port_of_its_own();
        self.flags.extend([
            "--auth-token-file".into(),
            client.display().to_string(),
            "--peer-token-file".into(),
            peer.display().to_string(),
        ]);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            "Bearer client-secret-token".parse().expect("header value"),
        );
        self.client = reqwest::Client::builder()
            .no_proxy()
            .default_headers(headers)
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        self.client_token = Some("client-secret-token".into());
        self.peers = peer_client(Some("peer-secret-token"));
        self
    }

    /// The client API over TLS, as a cache with `spec.tls` serves it: every
    /// node presents one certificate naming [`CLIENT_TLS_NAME`] (as the nodes
    /// of a cache share the certificate of its Service), issued by a CA
    /// whose PEM file is returned; the peer API moves to its own port. The
    /// helpers here that speak plain HTTP to the client API (readiness,
    /// metrics, `get_json`) cannot reach such a cluster: ask through a TLS
    /// client.
    pub fn with_client_tls(mut self) -> (Self, PathBuf) {
        use crate::tls_support::{TestCa, Validity};
        let ca = TestCa::new(&self.dir.path().join("client-pki"), "client-ca");
        let server = ca.issue("client-api", &[CLIENT_TLS_NAME], Validity::Current);
        self.peer_port_of_its_own();
        self.flags.extend([
            "--tls-cert-file".into(),
            server.cert.display().to_string(),
            "--tls-key-file".into(),
            server.key.display().to_string(),
        ]);
        (self, ca.ca_file)
    }

    /// Moves the peer API to [`PEER_PORT`], once: the client port is then
    /// the clients' alone (tokens, TLS).
    fn peer_port_of_its_own(&mut self) {
        if self.own_peer_port {
            return;
        }
        self.own_peer_port = true;
        for node in &mut self.nodes {
            node.peer_addr.set_port(PEER_PORT);
        }
        self.flags
            .extend(["--peer-port".into(), PEER_PORT.to_string()]);
    }

    pub fn with_flags(mut self, flags: &[&str]) -> Self {
        self.flags = flags.iter().map(|f| f.to_string()).collect();
        self
    }

    pub fn with_env(mut self, env: &[(&str, &str)]) -> Self {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }

    /// Adds one more node slot; returns its index.
    pub fn add_slot(&mut self) -> usize {
        let i = self.nodes.len();
        let mut node = slot(self.block, i, self.dir.path());
        if self.own_peer_port {
            node.peer_addr.set_port(PEER_PORT);
        }
        self.nodes.push(node);
        self.learn_peer_names();
        i
    }

    pub fn membership_file(&self) -> PathBuf {
        self.dir.path().join("ring.json")
    }

    /// A private membership file for node `i` (to give it a ring of its own).
    pub fn private_membership_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("ring-{i}.json"))
    }

    /// The ring document for the given members and states, at `epoch`.
    pub fn doc(&self, epoch: u64, members: &[(usize, MemberState)]) -> MembershipDoc {
        MembershipDoc {
            epoch,
            replication_factor: self.replication_factor,
            hashing: Hashing::Rendezvous,
            members: members
                .iter()
                .map(|&(i, state)| {
                    let node = &self.nodes[i];
                    let reached_at = node.ring_addr.unwrap_or(node.peer_addr);
                    Member {
                        id: node.id.clone(),
                        address: reached_at.to_string(),
                        client_address: (reached_at != node.addr).then(|| node.addr.to_string()),
                        state,
                    }
                })
                .collect(),
        }
    }

    /// Writes a new ring (the next epoch) to the shared membership file.
    pub fn set_ring(&mut self, members: &[(usize, MemberState)]) -> u64 {
        self.epoch += 1;
        let doc = self.doc(self.epoch, members);
        write_atomically(&self.membership_file(), &doc.to_json());
        self.epoch
    }

    /// Starts node `i` reading the shared membership file.
    pub fn start(&mut self, i: usize) {
        let file = self.membership_file();
        self.start_with_file(i, &file);
    }

    /// Starts node `i` with `flags` besides the cluster's own (which they
    /// must not repeat: a flag given twice is refused), e.g. limits of its
    /// own, as during a rolling change.
    pub fn start_with_flags(&mut self, i: usize, flags: &[&str]) {
        let file = self.membership_file();
        self.launch(i, &file, flags);
    }

    pub fn start_with_file(&mut self, i: usize, membership_file: &Path) {
        self.launch(i, membership_file, &[]);
    }

    fn launch(&mut self, i: usize, membership_file: &Path, flags: &[&str]) {
        assert!(self.nodes[i].child.is_none(), "node {i} already running");
        self.nodes[i].log_from = std::fs::metadata(&self.nodes[i].log)
            .map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX));
        let node = &self.nodes[i];
        let mut launch = Launch::new().at(node.addr);
        if self.data_dirs {
            launch = launch.arg("--data-dir").arg(self.data_dir(i));
        }
        for (key, value) in &self.env {
            launch = launch.env(key, value);
        }
        let proc = launch
            .args(["--node-id", &node.id])
            .arg("--membership-file")
            .arg(membership_file)
            .args(["--membership-poll-interval", "100ms"])
            .args(["--log-level", "info"])
            .args(&self.flags)
            .args(flags)
            .log_file(&node.log)
            .spawn();
        assert_eq!(proc.addr, node.addr, "node {i} bound where the ring says");
        self.nodes[i].child = Some(proc);
    }

    /// `kill -9`: the process dies at once, its memory with it.
    pub fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].child.take() {
            node.kill();
        }
    }

    /// Moves node `i` (not running) to a new loopback address, as a pod that
    /// comes back with a new IP.
    pub fn readdress(&mut self, i: usize, last_octet: u8) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let node = &mut self.nodes[i];
        let ip = Ipv4Addr::new(127, 1, self.block, last_octet);
        node.addr.set_ip(ip.into());
        node.peer_addr.set_ip(ip.into());
        self.learn_peer_names();
    }

    /// Puts a [`PeerRelay`] in front of node `i`'s peer address: rings
    /// written from now on tell the other members to reach it through the
    /// relay (clients and [`Self::held`] still reach it directly).
    pub async fn relay_peer_traffic(&mut self, i: usize) -> PeerRelay {
        let ip = Ipv4Addr::new(127, 1, self.block, 200 + i as u8);
        let relay = PeerRelay::start(SocketAddr::from((ip, 0)), self.nodes[i].peer_addr).await;
        self.nodes[i].ring_addr = Some(relay.addr);
        relay
    }

    /// The id of `key`'s primary under the ring the cluster was last given.
    pub fn primary_of(&self, key: &str) -> String {
        self.owners_of(key).swap_remove(0)
    }

    /// The ids of `key`'s owners under the ring the cluster was last given,
    /// primary first.
    pub fn owners_of(&self, key: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.membership_file()).expect("a ring was written");
        let doc = MembershipDoc::from_json(text.as_bytes()).expect("a valid ring");
        let ring = cache_node::cluster::ring::Ring::new(std::sync::Arc::new(doc), "test");
        ring.owners(key.as_bytes())
            .iter()
            .map(|&i| ring.member(i).id.clone())
            .collect()
    }

    /// Whether node `i` answers its readiness probe with success now.
    pub async fn is_ready(&self, i: usize) -> bool {
        self.client
            .get(self.url(i, "/api/v1/ready"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// The value of an unlabelled (or exactly labelled) sample in node `i`'s
    /// `/metrics`, e.g. `distrocache_peer_requests_total{operation="repair"}`.
    pub async fn metric(&self, i: usize, series: &str) -> Option<f64> {
        let text = self
            .client
            .get(self.url(i, "/metrics"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("scraping node {i}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("scraping node {i}: {e}"));
        sample(&text, series)
    }

    /// Invalidates `tag` through node `i`'s client API, asserting the
    /// answer is a 200, and returns its body.
    pub async fn invalidate_tag(&self, i: usize, tag: &str) -> Value {
        let resp = self
            .client
            .post(self.url(i, &format!("/api/v1/invalidate/tag/{tag}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("invalidating {tag} through node {i}: {e}"));
        assert_eq!(resp.status(), 200, "invalidating {tag} through node {i}");
        resp.json().await.expect("a JSON answer")
    }

    /// The copy of `key` node `i` holds, as the item JSON, asked through the
    /// peer protocol without touching it (reads through the client API may
    /// be served by another owner).
    pub async fn held(&self, i: usize, key: &str) -> Option<Value> {
        let record = self
            .peers
            .fetch(self.nodes[i].peer_addr, key)
            .await
            .unwrap_or_else(|e| panic!("asking node {i} for {key}: {e}"))?;
        let record = record.single().expect("one record");
        Some(serde_json::from_slice(&cache_node::item_json::item_to_vec(&record)).expect("JSON"))
    }

    /// Sends node `i` a signal (`SIGSTOP` stalls it: the kernel still
    /// accepts its connections, nothing answers; `SIGCONT` resumes it).
    /// `kill` returns before the process has stopped, so after a `SIGSTOP`
    /// this waits until every thread of it has (a request sent in between
    /// could still be answered).
    pub fn signal(&self, i: usize, signal: libc::c_int) {
        self.nodes[i]
            .child
            .as_ref()
            .expect("node is running")
            .signal(signal);
        if signal != libc::SIGSTOP {
            return;
        }
        let pid = self.pid(i);
        let stopped = || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.filter_map(Result::ok).all(|task| {
                std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                    // The state follows the ")" that closes the command name.
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                })
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stopped() {
            assert!(
                Instant::now() < deadline,
                "node {i} did not stop within 10 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the running process of node `i` logs a line containing
    /// `needle` (fails the test after `within`).
    pub async fn wait_for_log(&self, i: usize, needle: &str, within: Duration) {
        let node = &self.nodes[i];
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read(&node.log)
                .unwrap_or_else(|e| panic!("reading node {i}'s log {}: {e}", node.log.display()));
            let since =
                String::from_utf8_lossy(&text[node.log_from.min(text.len())..]).into_owned();
            if since.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not log {needle:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.as_ref().expect("node is running").pid()
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{}", self.nodes[i].addr, path)
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect()
    }

    pub async fn get_json(&self, i: usize, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(self.url(i, path))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("GET {path} on node {i}: {status}, not JSON ({e}): {text:?}")
        });
        (status, body)
    }

    pub async fn progress(&self, i: usize) -> Option<NodeProgress> {
        let resp = self
            .client
            .get(self.url(i, "/api/v1/cluster/rebalance"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// Starts the first `members` slots as the active members of a new ring
    /// and waits, up to `within`, for it to settle (the other slots stay
    /// free for nodes a test adds later); returns the ring's epoch.
    pub async fn start_members(&mut self, members: usize, within: Duration) -> u64 {
        let ring: Vec<_> = (0..members).map(|i| (i, MemberState::Active)).collect();
        let epoch = self.set_ring(&ring);
        for i in 0..members {
            self.start(i);
        }
        self.wait_settled(epoch, within).await;
        epoch
    }

    /// Waits until every running node holds `epoch`, has synced it, is ready
    /// and sees the cluster settled (data moved, old copies dropped).
    pub async fn wait_settled(&self, epoch: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            for i in self.running() {
                let view = self
                    .client
                    .get(self.url(i, "/api/v1/cluster"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                let ok = match view {
                    Ok(resp) => {
                        let v: Value = resp.json().await.unwrap_or(Value::Null);
                        v["epoch"] == epoch && v["settled"] == true && v["ready"] == true
                    }
                    Err(_) => false,
                };
                all &= ok;
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not settle at epoch {epoch} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `i` shows `series` at `value` in its `/metrics`;
    /// fails saying `what` did not happen.
    pub async fn wait_node_metric(
        &self,
        i: usize,
        series: &str,
        value: f64,
        within: Duration,
        what: &str,
    ) {
        let deadline = Instant::now() + within;
        while self.metric(i, series).await != Some(value) {
            assert!(Instant::now() < deadline, "{what} within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node shows `series` at `value` in its
    /// `/metrics`.
    pub async fn wait_metric(&self, series: &str, value: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            for i in self.running() {
                all &= self.metric(i, series).await == Some(value);
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes did not all show {series} {value} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `i` answers its readiness probe.
    pub async fn wait_ready(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.is_ready(i).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} not ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a leaving node reports its handoff complete.
    pub async fn wait_handoff(&self, i: usize, within: Duration) -> NodeProgress {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.progress(i).await
                && p.handoff_complete
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not hand off within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn dump_logs(&self) {
        for node in &self.nodes {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- {} ({}) last log lines ----", node.id, node.addr);
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn slot(block: u8, i: usize, dir: &Path) -> ProcNode {
    let addr = SocketAddr::from((Ipv4Addr::new(127, 1, block, 10 + i as u8), PORT));
    ProcNode {
        id: format!("node-{i}"),
        addr,
        peer_addr: addr,
        ring_addr: None,
        child: None,
        log: dir.join(format!("node-{i}.log")),
        log_from: 0,
    }
}

/// A TCP relay on loopback in front of one node's peer address, which a
/// test cuts and restores: while cut, every relayed connection is closed
/// and new ones are closed as soon as they are accepted, so what the other
/// members send that node is lost (the node itself keeps running, and its
/// own requests to them, which do not pass here, still arrive). A relay
/// made a black hole closes what it relays too, but then accepts new
/// connections and holds them without a word: a request sent that node
/// waits for its time limit, as one does when packets are lost.
pub struct PeerRelay {
    pub addr: SocketAddr,
    gate: tokio::sync::watch::Sender<Gate>,
    /// Connections being relayed now.
    relaying: Arc<std::sync::atomic::AtomicUsize>,
    accepting: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    Cut,
    BlackHole,
}

impl PeerRelay {
    async fn start(bind: SocketAddr, target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("relay on {bind}: {e}"));
        let addr = listener.local_addr().expect("relay address");
        let (gate, _) = tokio::sync::watch::channel(Gate::Open);
        let relaying = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let watch = gate.subscribe();
        let count = relaying.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                let now = *watch.borrow();
                match now {
                    Gate::Cut => continue, // closed on drop
                    Gate::BlackHole => {
                        // Held, what comes read and dropped, until the gate
                        // changes (or the peer gives up).
                        tokio::spawn(async move {
                            let mut sink = tokio::io::sink();
                            tokio::select! {
                                _ = watch.wait_for(|g| *g != Gate::BlackHole) => {}
                                _ = tokio::io::copy(&mut inbound, &mut sink) => {}
                            }
                        });
                        continue;
                    }
                    Gate::Open => {}
                }
                // Counted before the cut can be checked again, uncounted
                // once both sockets are closed.
                count.fetch_add(1, Ordering::SeqCst);
                let count = count.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        tokio::select! {
                            biased;
                            _ = watch.wait_for(|g| *g != Gate::Open) => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    }
                    drop(inbound);
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            gate,
            relaying,
            accepting,
        }
    }

    /// Closes every relayed connection, and every new one until
    /// [`Self::restore`]; returns once none is relayed any more, so nothing
    /// sent after it passes.
    pub async fn cut(&self) {
        self.close(Gate::Cut).await;
    }

    /// Closes every relayed connection, and holds every new one unanswered
    /// until [`Self::restore`]; returns once none is relayed any more.
    pub async fn black_hole(&self) {
        self.close(Gate::BlackHole).await;
    }

    async fn close(&self, gate: Gate) {
        self.gate.send_replace(gate);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.relaying.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "relayed connections still open 10 s after the cut"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn restore(&self) {
        self.gate.send_replace(Gate::Open);
    }
}

impl Drop for PeerRelay {
    fn drop(&mut self) {
        self.gate.send_replace(Gate::Cut);
        self.accepting.abort();
    }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write ring");
    std::fs::rename(&tmp, path).expect("rename ring");
}

//! `distrocache-client`: a ring-aware async client of DistroCache's REST API.
//!
//! Any node of a cluster answers any key, forwarding the request to an owner
//! when it is not one; that hop costs a round trip and CPU on two nodes.
//! This client skips it: it learns the ring from a node's `/api/v1/cluster`
//! (members, the addresses clients reach them at, the replication factor
//! and the placement algorithm), computes each key's owners with the same
//! placement code the nodes run, and sends each request straight to an
//! owner: writes to the key's primary (which coordinates them), reads by
//! default to whichever of the key's owners has the fewest of the client's
//! requests in flight ([`ReadFrom`]; an owner that cannot serve a read
//! itself forwards it, so a stale choice only costs the hop).
//!
//! An answer names the answering node's ring epoch (`x-distrocache-epoch`)
//! whenever that is news to its connection: the connection's first answer,
//! the first after the node adopts another ring, and at least every 64th.
//! One newer than the client's copy makes it fetch the ring again, in the
//! background, from that node first, until it holds a ring that new (a
//! notice that comes meanwhile is kept, not dropped, since it may not come
//! again for 63 answers); the reminders bring the epoch again if every try
//! failed. When an owner cannot be reached, a read goes to the next owner
//! and then to any member (which forwards it); a write goes elsewhere only
//! if it certainly never reached the owner, so it is never applied twice.
//!
//! Keep-alive connections per node (`pool.rs`), each carrying one request
//! at a time in the requesting task (`conn.rs`, HTTP/1.1 written by hand,
//! which says why), no redirects, no decompression: the requests are small
//! and the answers are JSON. A request that may have run and got no answer
//! is never sent again elsewhere unless it is a read (a write or a tag
//! invalidation is [`Error::Uncertain`]). Seeds
//! given as `https://host:port` make every connection TLS (`tls.rs`: which
//! CA is trusted, which name every node's certificate must carry, and the
//! certificate the client presents to nodes that ask for one).

mod conn;
mod pool;
mod ring;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use distrocache_membership::{CLUSTER_PATH, MemberState};
use http::{HeaderValue, Uri};
use parking_lot::Mutex;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant as TokioInstant;

pub use http::{Method, StatusCode};
use pool::{Failed, Limits, Pool};
use ring::host_header;
pub use ring::{Node, Ring};
use tls::{ClientCert, Tls};

/// How many times a refresh asks before it gives up on an epoch an answer
/// named, pausing [`REFRESH_PAUSE`] longer each time (1 s in all).
const REFRESH_ATTEMPTS: u32 = 5;
const REFRESH_PAUSE: Duration = Duration::from_millis(100);

/// The answering node's ring epoch, on the answers of a cluster node for
/// which it is news to the connection (see the module comment).
pub const EPOCH_HEADER: &str = "x-distrocache-epoch";
/// The node that served an item request.
pub const SERVED_BY_HEADER: &str = "x-distrocache-served-by";

/// Largest answer read.
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// A node that failed to accept a connection is tried last for this long.
const DOWN_FOR: Duration = Duration::from_secs(2);

/// Characters left as they are in a path segment: RFC 3986 "unreserved".
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no node could be reached: {0}")]
    Unreachable(String),
    /// A write reached its node but no answer came back: it may or may not
    /// have been applied (writes are idempotent: retry, or read to find out).
    #[error("{node} took the write but did not answer ({reason}); it may have been applied")]
    Uncertain { node: SocketAddr, reason: String },
    /// The cache answered with an error.
    #[error("{status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Where reads go. Every choice is as fresh as the primary: an owner other
/// than the primary serves a read only while it holds read leases (it then
/// holds every acknowledged write), and forwards it otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadFrom {
    /// The key's primary: access metadata (`access_count`, `accessed_at`)
    /// counted on one copy, and no forwarded read while leases are being
    /// renewed (after a ring change).
    Primary,
    /// Every owner in turn: spreads the reads of a hot key over its copies.
    AnyOwner,
    /// The owner with the fewest of this client's requests in flight (the
    /// primary among equals), as a least-request load balancer picks: a
    /// busy or slow owner's share moves to its copies. The default: in
    /// `bench/cluster.sh` (three nodes sharing one core) it served more GETs
    /// than `Primary` in twenty-eight runs of thirty-eight, fewer in nine
    /// (`bench/HISTORY.md` has the figures).
    #[default]
    LeastBusy,
}

/// An item as the cache returns it (the seed's shape).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Item {
    pub key: String,
    pub value: serde_json::Value,
    /// Time to live in nanoseconds.
    pub ttl: u64,
    pub created_at: String,
    pub accessed_at: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    pub access_count: u64,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A raw answer, and who gave it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    /// The node the request was sent to.
    pub node: SocketAddr,
    /// The ring epoch of the node that answered, in a cluster, when the
    /// answer named it (news to the connection it came on).
    pub epoch: Option<u64>,
    /// `x-distrocache-served-by` as it came (kept as the header, not
    /// copied into a string on every answer).
    served_by: Option<HeaderValue>,
}

impl Answer {
    /// The node that served it (`x-distrocache-served-by`), if named.
    pub fn served_by(&self) -> Option<&str> {
        self.served_by.as_ref().and_then(|v| v.to_str().ok())
    }
}

/// The nodes one request may try, by index in the ring: a few at most.
type Plan = smallvec::SmallVec<[usize; 8]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

pub struct Builder {
    seeds: Vec<String>,
    token: Option<String>,
    read_from: ReadFrom,
    timeout: Duration,
    ca_pem: Option<Vec<u8>>,
    tls_server_name: Option<String>,
    client_cert: Option<ClientCert>,
}

impl Builder {
    /// A bearer token for the client API.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn read_from(mut self, read_from: ReadFrom) -> Self {
        self.read_from = read_from;
        self
    }

    /// How long one request may take (default 10 s), every node it tries
    /// included: a node that another may follow (a read's next owner, or
    /// any node for a write that never left) is given half of what is
    /// left, so that one that does not answer leaves time for the next.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// For `https://` seeds: trust the CA certificates of `pem` (PEM, e.g.
    /// the `ca.crt` of the cache's TLS Secret) rather than the public roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// For `https://` seeds: the name every node's certificate must carry
    /// (a DNS name or an IP address); by default the first seed's host. The
    /// nodes share one certificate naming the cache's Service, while the
    /// client reaches each member at its own address (see `tls.rs`).
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// For `https://` seeds: the certificate this client presents to nodes
    /// that ask for one (nodes started with `--tls-client-ca-file`): a PEM
    /// certificate chain, the client's own first, and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1), e.g. `tls.crt` and `tls.key` of a
    /// cert-manager Secret.
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_cert = Some(ClientCert::Pem(cert.into(), key.into()));
        self
    }

    /// As [`Builder::client_cert_pem`], read from files (`tls.crt` and
    /// `tls.key` of a mounted Secret), and read again when they change: a
    /// renewed certificate is presented from the next new connection on
    /// (looked for at most once a second), without a restart. A pair that
    /// does not make a certificate and its key (one file rewritten before
    /// the other) is ignored until it does.
    pub fn client_cert_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some(ClientCert::Files(cert.into(), key.into()));
        self
    }

    /// Resolves the seeds and learns the ring from the first that answers.
    pub async fn connect(self) -> Result<Client, Error> {
        // (https, host:port) of each seed.
        let parsed: Vec<(bool, &str)> = self
            .seeds
            .iter()
            .map(|seed| {
                let seed = seed.trim_end_matches('/');
                match seed.strip_prefix("https://") {
                    Some(host_port) => (true, host_port),
                    None => (false, seed.strip_prefix("http://").unwrap_or(seed)),
                }
            })
            .collect();
        if parsed.is_empty() {
            return Err(Error::Invalid("no seed address given".into()));
        }
        // Settings checked before any name is looked up.
        let https = parsed.iter().filter(|(https, _)| *https).count();
        let tls = if https == parsed.len() {
            let name = match &self.tls_server_name {
                Some(name) => name.as_str(),
                None => tls::seed_host(parsed[0].1),
            };
            Some(
                Tls::new(self.ca_pem.as_deref(), name, self.client_cert.as_ref())
                    .map_err(Error::Invalid)?,
            )
        } else if https > 0 {
            return Err(Error::Invalid(
                "the seeds mix http:// and https://: a cache serves one or the other".into(),
            ));
        } else if self.ca_pem.is_some()
            || self.tls_server_name.is_some()
            || self.client_cert.is_some()
        {
            return Err(Error::Invalid(
                "a CA, TLS server name or client certificate was given but no seed is https://"
                    .into(),
            ));
        } else {
            None
        };
        let hosts: Vec<&str> = parsed.iter().map(|&(_, host_port)| host_port).collect();
        let seeds = resolve_seeds(&hosts, |host_port| async move {
            tokio::net::lookup_host(host_port)
                .await
                .map(|addrs| addrs.collect())
        })
        .await?;
        let first = *seeds
            .first()
            .ok_or_else(|| Error::Invalid("no seed address given".into()))?;
        let token = match self.token {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| Error::Invalid("the token is not header text".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let client = Client {
            inner: Arc::new(Inner::new(
                seeds,
                first,
                token,
                self.read_from,
                self.timeout,
                tls,
            )),
        };
        client.refresh().await?;
        Ok(client)
    }
}

/// The addresses of the seeds that resolve (`lookup`: the system's
/// resolver). A seed that does not is passed over, as one that does not
/// answer is: it may name a pod that is not published yet. An error when
/// none resolves ([`Error::Unreachable`], with every seed's error), or at
/// once when a seed is not `host:port` at all ([`Error::Invalid`]).
async fn resolve_seeds<'a, F, Fut>(hosts: &[&'a str], lookup: F) -> Result<Vec<SocketAddr>, Error>
where
    F: Fn(&'a str) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    for &host_port in hosts {
        match lookup(host_port).await {
            Ok(found) if found.is_empty() => {
                failures.push(format!("seed {host_port:?}: no address"))
            }
            Ok(found) => addrs.extend(found),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(Error::Invalid(format!("seed {host_port:?}: {e}")));
            }
            Err(e) => failures.push(format!("seed {host_port:?}: {e}")),
        }
    }
    if addrs.is_empty() {
        return Err(Error::Unreachable(failures.join("; ")));
    }
    Ok(addrs)
}

/// A ring-aware client; cheap to clone (clones share the ring and the
/// connection pools).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    seeds: Vec<SocketAddr>,
    ring: ArcSwap<Ring>,
    token: Option<HeaderValue>,
    read_from: ReadFrom,
    timeout: Duration,
    refreshing: AtomicBool,
    /// The newest epoch an answer named: a refresh goes on until the ring
    /// held is at least this new, so a notice that comes while a refresh is
    /// under way is kept rather than dropped (a node names a new epoch to a
    /// connection once, then only as a reminder every 64th answer). Lowered
    /// when every node gave an older ring: the epoch was an earlier cache's.
    wanted: AtomicU64,
    next: AtomicUsize,
    down: Mutex<HashMap<SocketAddr, Instant>>,
    /// Whether `down` may hold anything: read on every request, so that a
    /// client whose nodes all answer never takes its lock.
    any_down: AtomicBool,
}

impl Client {
    /// A client that starts from `seeds` (`host:port`, any node of the cache).
    pub fn builder<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Builder {
        Builder {
            seeds: seeds.into_iter().map(Into::into).collect(),
            token: None,
            read_from: ReadFrom::default(),
            timeout: Duration::from_secs(10),
            ca_pem: None,
            tls_server_name: None,
            client_cert: None,
        }
    }

    /// The ring the client holds now.
    pub fn ring(&self) -> Arc<Ring> {
        self.inner.ring.load_full()
    }

    /// Fetches the ring from a member (or a seed), and holds it.
    pub async fn refresh(&self) -> Result<(), Error> {
        self.refresh_from(None).await
    }

    /// [`Self::refresh`], asking `first` (a node that named a newer epoch,
    /// so holds that ring) before the members and the seeds. Stops at the
    /// first ring at least as new as any epoch an answer named; when no node
    /// has one yet, keeps the newest it was given, even one older than the
    /// ring held (a cache made again starts its epochs again). When every
    /// node asked gave its ring and none was that new, no node holds the
    /// epoch named: it was an earlier cache's, and what the client waits
    /// for comes down to the newest ring it was given, so that later
    /// refreshes stop at the first node that holds the ring they want
    /// instead of asking every node [`REFRESH_ATTEMPTS`] times.
    async fn refresh_from(&self, first: Option<SocketAddr>) -> Result<(), Error> {
        let held = self.ring();
        let wanted = self.inner.wanted.load(Ordering::Acquire);
        let mut every_node_answered = true;
        let mut asked: Vec<SocketAddr> = first.into_iter().collect();
        for addr in held
            .nodes
            .iter()
            .map(|n| n.address)
            .chain(self.inner.seeds.iter().copied())
        {
            if !asked.contains(&addr) {
                asked.push(addr);
            }
        }
        let mut newest: Option<Ring> = None;
        let mut last = Error::Unreachable("no address to ask".into());
        let deadline = Deadline::after(self.inner.timeout);
        let count = asked.len();
        let view = Request::new(Method::GET, Uri::from_static(CLUSTER_PATH), Bytes::new());
        for (n, addr) in asked.into_iter().enumerate() {
            let answer = self
                .inner
                .request(
                    addr,
                    &host_header(addr),
                    &view,
                    deadline.try_of(n + 1 < count),
                )
                .await;
            let ring = match answer {
                Ok(a) if a.status == StatusCode::OK => {
                    // The node may adopt a newer ring between reading the
                    // view and stamping the answer.
                    if let Some(epoch) = a.epoch {
                        self.inner.wanted.fetch_max(epoch, Ordering::AcqRel);
                    }
                    serde_json::from_slice(&a.body)
                        .map_err(|e| format!("{CLUSTER_PATH}: {e}"))
                        .and_then(|view| Ring::from_view(view, addr))
                        .map_err(|e| Error::BadAnswer(format!("{addr}: {e}")))
                }
                Ok(a) => Err(Error::Unreachable(format!(
                    "{addr} answered {}: {}",
                    a.status,
                    error_message(&a.body)
                ))),
                Err(e) => Err(Error::Unreachable(e.to_string())),
            };
            match ring {
                Ok(ring) if ring.epoch >= self.inner.wanted.load(Ordering::Acquire) => {
                    self.learned(&held, ring);
                    return Ok(());
                }
                Ok(ring) => {
                    if newest.as_ref().is_none_or(|n| ring.epoch > n.epoch) {
                        newest = Some(ring);
                    }
                }
                Err(e) => {
                    every_node_answered = false;
                    last = e;
                }
            }
        }
        match newest {
            Some(ring) => {
                if every_node_answered {
                    // Unless a notice raised it meanwhile: that one is news.
                    let _ = self.inner.wanted.compare_exchange(
                        wanted,
                        ring.epoch,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                self.learned(&held, ring);
                Ok(())
            }
            None => Err(last),
        }
    }

    /// Holds `ring`, fetched while `held` was the ring held, unless another
    /// refresh stored a newer one meanwhile (two may run at once: the
    /// background one and [`Self::refresh`]).
    fn learned(&self, held: &Arc<Ring>, ring: Ring) {
        tracing::debug!(
            epoch = ring.epoch,
            nodes = ring.nodes.len(),
            "learned the ring"
        );
        let ring = Arc::new(ring);
        let before = self.inner.ring.rcu(|current| {
            if Arc::ptr_eq(current, held) || ring.epoch >= current.epoch {
                ring.clone()
            } else {
                current.clone()
            }
        });
        if Arc::ptr_eq(&before, held) || ring.epoch >= before.epoch {
            // Connections kept for nodes no longer in the ring are closed.
            let seeds = &self.inner.seeds;
            self.inner.pool.retain(|addr| {
                seeds.contains(&addr) || ring.nodes.iter().any(|n| n.address == addr)
            });
        }
    }

    /// The item, or `None` when the key is absent or expired.
    pub async fn get(&self, key: &str) -> Result<Option<Item>, Error> {
        match self.get_raw(key).await? {
            Some(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| Error::BadAnswer(e.to_string())),
            None => Ok(None),
        }
    }

    /// The item's JSON as the cache sent it, or `None`.
    pub async fn get_raw(&self, key: &str) -> Result<Option<Bytes>, Error> {
        let answer = self.send(key, Method::GET, Bytes::new()).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(answer.body)),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(failure(status, &answer.body)),
        }
    }

    /// Writes `value` (any JSON) with an optional TTL and tags; returns the
    /// item as stored.
    pub async fn set(
        &self,
        key: &str,
        value: &impl Serialize,
        ttl: Option<Duration>,
        tags: &[&str],
    ) -> Result<Item, Error> {
        #[derive(Serialize)]
        struct Body<'a, V: Serialize> {
            value: &'a V,
            #[serde(skip_serializing_if = "Option::is_none")]
            ttl: Option<u64>,
            tags: &'a [&'a str],
        }
        let body = serde_json::to_vec(&Body {
            value,
            ttl: ttl.map(|t| t.as_secs().max(1)),
            tags,
        })
        .map_err(|e| Error::Invalid(format!("value: {e}")))?;
        let answer = self.set_raw(key, Bytes::from(body)).await?;
        serde_json::from_slice(&answer.body).map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// Writes a raw body (`{"value": ..., "ttl": ..., "tags": [...]}`).
    pub async fn set_raw(&self, key: &str, body: Bytes) -> Result<Answer, Error> {
        let answer = self.send(key, Method::PUT, body).await?;
        match answer.status {
            StatusCode::OK | StatusCode::CREATED => Ok(answer),
            status => Err(failure(status, &answer.body)),
        }
    }

    /// Deletes the key; `false` when it was absent.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        let answer = self.send(key, Method::DELETE, Bytes::new()).await?;
        match answer.status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(failure(status, &answer.body)),
        }
    }

    /// Removes every item carrying `tag`, on every node; how many.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64, Error> {
        let path = format!(
            "/api/v1/invalidate/tag/{}",
            utf8_percent_encode(tag, SEGMENT)
        );
        let answer = self.any_node(Method::POST, path).await?;
        if answer.status != StatusCode::OK {
            return Err(failure(answer.status, &answer.body));
        }
        #[derive(Deserialize)]
        struct Invalidated {
            invalidated: u64,
        }
        serde_json::from_slice::<Invalidated>(&answer.body)
            .map(|i| i.invalidated)
            .map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// A request to one node in particular (its own progress, its view):
    /// the `distrocache` CLI asks every member this way.
    pub async fn at(
        &self,
        node: SocketAddr,
        method: Method,
        path: String,
    ) -> Result<Answer, Error> {
        let request = Request::new(method, path_uri(path)?, Bytes::new());
        let writes = changes_state(&request.method);
        let epoch = self.inner.ring.load().epoch;
        let only = Deadline::after(self.inner.timeout).try_of(false);
        self.call(epoch, node, &host_header(node), &request, only)
            .await
            .map_err(|e| match e {
                Failed::Lost(reason) if writes => Error::Uncertain { node, reason },
                e => Error::Unreachable(format!("{node}: {e}")),
            })
    }

    /// A request on no key in particular (stats, views): any node will do.
    pub async fn any_node(&self, method: Method, path: String) -> Result<Answer, Error> {
        let request = Request::new(method, path_uri(path)?, Bytes::new());
        let ring = self.ring();
        let writes = changes_state(&request.method);
        let mut last = String::from("no node");
        let deadline = Deadline::after(self.inner.timeout);
        for (n, node) in ring.nodes.iter().enumerate() {
            let this = deadline.try_of(n + 1 < ring.nodes.len());
            match self
                .call(ring.epoch, node.address, &node.host, &request, this)
                .await
            {
                Ok(answer) => return Ok(answer),
                // A tag invalidation that may have run is not run again
                // elsewhere: it would count (and delete) anew.
                Err(Failed::Lost(reason)) if writes => {
                    return Err(Error::Uncertain {
                        node: node.address,
                        reason,
                    });
                }
                Err(e) => last = format!("{}: {e}", node.address),
            }
        }
        Err(Error::Unreachable(last))
    }

    /// Sends a request on `key` to an owner, falling back as the module
    /// comment says.
    async fn send(&self, key: &str, method: Method, body: Bytes) -> Result<Answer, Error> {
        if key.is_empty() {
            return Err(Error::Invalid("keys must not be empty".into()));
        }
        let access = if method == Method::GET {
            Access::Read
        } else {
            Access::Write
        };
        let uri = path_uri(format!(
            "/api/v1/cache/{}",
            utf8_percent_encode(key, SEGMENT)
        ))?;
        let request = Request::new(method, uri, body);
        let ring = self.ring();
        let plan = self.inner.plan(&ring, key, access);
        let mut last = String::from("no node");
        let deadline = Deadline::after(self.inner.timeout);
        for (n, &i) in plan.iter().enumerate() {
            let node = &ring.nodes[i];
            let addr = node.address;
            let _in_flight = ring.count_request(i);
            let this = deadline.try_of(n + 1 < plan.len());
            match self
                .call(ring.epoch, addr, &node.host, &request, this)
                .await
            {
                Ok(answer) => {
                    self.inner.up(addr);
                    return Ok(answer);
                }
                Err(Failed::NotSent(reason)) => {
                    self.inner.mark_down(addr);
                    last = format!("{addr}: {reason}");
                }
                Err(Failed::Lost(reason)) if access == Access::Write => {
                    return Err(Error::Uncertain { node: addr, reason });
                }
                Err(Failed::Lost(reason)) => last = format!("{addr}: {reason}"),
            }
        }
        // The ring may be out of date: learn it again for next time.
        self.refresh_later(None);
        Err(Error::Unreachable(last))
    }

    /// `request` to one node, sent with the ring at epoch `seen`, as the
    /// try `this` of its request; an answer that names a newer ring makes
    /// the client learn it (in the background).
    async fn call(
        &self,
        seen: u64,
        addr: SocketAddr,
        host: &HeaderValue,
        request: &Request,
        this: Try,
    ) -> Result<Answer, Failed> {
        let answer = self.inner.request(addr, host, request, this).await?;
        if let Some(newer) = answer.epoch.filter(|&e| e > seen) {
            self.refresh_later(Some((newer, addr)));
        }
        Ok(answer)
    }

    /// Learns the ring again, in the background, one refresh at a time:
    /// after an answer from `node` named epoch `named`, until a ring at least
    /// that new is held (asking `node` first), in up to [`REFRESH_ATTEMPTS`]
    /// attempts; with no notice, once. A notice that comes while a refresh
    /// is under way raises what that refresh waits for.
    fn refresh_later(&self, notice: Option<(u64, SocketAddr)>) {
        if let Some((named, _)) = notice {
            self.inner.wanted.fetch_max(named, Ordering::AcqRel);
            if self.inner.ring.load().epoch >= named {
                return;
            }
        }
        let Some(mut turn) = RefreshTurn::take(&self.inner) else {
            return;
        };
        let client = self.clone();
        let mut first = notice.map(|(_, node)| node);
        tokio::spawn(async move {
            let inner = &client.inner;
            let mut attempt = 0;
            loop {
                attempt += 1;
                if let Err(e) = client.refresh_from(first).await {
                    tracing::debug!(error = %e, "could not refresh the ring");
                }
                let held = || inner.ring.load().epoch >= inner.wanted.load(Ordering::Acquire);
                if held() {
                    drop(turn);
                    // A notice that came after the check found the turn
                    // taken and left its epoch to this task: take it up.
                    if held() {
                        return;
                    }
                    let Some(again) = RefreshTurn::take(inner) else {
                        return;
                    };
                    (turn, attempt, first) = (again, 0, None);
                    continue;
                }
                if attempt == REFRESH_ATTEMPTS {
                    // No node serves that ring yet, or none answers: the
                    // next answer that names it (a reminder at the latest)
                    // asks again.
                    return;
                }
                tokio::time::sleep(REFRESH_PAUSE * attempt).await;
            }
        });
    }
}

/// The one background refresh's turn (`Inner::refreshing` set), given
/// back when dropped: when its task ends, and also when the task is
/// dropped unfinished (its runtime shut down), which would otherwise leave
/// the client never refreshing its ring again.
struct RefreshTurn(Arc<Inner>);

impl RefreshTurn {
    fn take(inner: &Arc<Inner>) -> Option<Self> {
        (!inner.refreshing.swap(true, Ordering::AcqRel)).then(|| RefreshTurn(inner.clone()))
    }
}

impl Drop for RefreshTurn {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

impl Inner {
    /// A client's state before it has learned the ring: the first seed
    /// stands for it.
    fn new(
        seeds: Vec<SocketAddr>,
        first: SocketAddr,
        token: Option<HeaderValue>,
        read_from: ReadFrom,
        timeout: Duration,
        tls: Option<Tls>,
    ) -> Self {
        Inner {
            pool: Pool::new(tls),
            seeds,
            ring: ArcSwap::from_pointee(Ring::single("seed", first)),
            token,
            read_from,
            timeout,
            refreshing: AtomicBool::new(false),
            wanted: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            down: Mutex::new(HashMap::new()),
            any_down: AtomicBool::new(false),
        }
    }

    /// The nodes to try (indices into `ring.nodes`), in order: the owners
    /// (primary first, or for reads the owner [`ReadFrom`] picks first),
    /// then every other member; recently unreachable nodes last.
    fn plan(&self, ring: &Ring, key: &str, access: Access) -> Plan {
        let mut owners = ring.owners(key);
        if access == Access::Read {
            owners.retain(|i| ring.nodes[*i].state == MemberState::Active);
            if owners.len() > 1 {
                match self.read_from {
                    ReadFrom::Primary => {}
                    ReadFrom::AnyOwner => {
                        let k = self.next.fetch_add(1, Ordering::Relaxed) % owners.len();
                        owners.rotate_left(k);
                    }
                    ReadFrom::LeastBusy => {
                        // `min_by_key` keeps the first of equals: the primary.
                        let k = (0..owners.len())
                            .min_by_key(|&k| ring.in_flight(owners[k]))
                            .unwrap_or(0);
                        owners[..=k].rotate_right(1);
                    }
                }
            }
        }
        let mut plan: Plan = owners.iter().copied().collect();
        for i in 0..ring.nodes.len() {
            if !plan.contains(&i) {
                plan.push(i);
            }
        }
        if !self.any_down.load(Ordering::Acquire) {
            return plan;
        }
        let mut down = self.down.lock();
        // Nodes past their time leave the list, so that one which left the
        // ring (or answers only through `Client::at`) does not keep every
        // request on this path.
        let now = Instant::now();
        down.retain(|_, until| *until > now);
        if down.is_empty() {
            self.any_down.store(false, Ordering::Release);
        } else {
            plan.sort_by_key(|&i| down.contains_key(&ring.nodes[i].address));
        }
        plan
    }

    fn mark_down(&self, addr: SocketAddr) {
        let mut down = self.down.lock();
        down.insert(addr, Instant::now() + DOWN_FOR);
        self.any_down.store(true, Ordering::Release);
    }

    fn up(&self, addr: SocketAddr) {
        if !self.any_down.load(Ordering::Acquire) {
            return;
        }
        let mut down = self.down.lock();
        down.remove(&addr);
        if down.is_empty() {
            self.any_down.store(false, Ordering::Release);
        }
    }

    /// `request` to `addr` (`host` its `Host` header), its answer read in
    /// full within what the try `this` may spend.
    async fn request(
        &self,
        addr: SocketAddr,
        host: &HeaderValue,
        request: &Request,
        this: Try,
    ) -> Result<Answer, Failed> {
        let head = conn::Head {
            method: &request.method,
            path: request.uri.path_and_query().map_or("/", |p| p.as_str()),
            host,
            token: self.token.as_ref(),
            body: &request.body,
        };
        // One clock read per try: its limits, and the connection's idle
        // time when it is taken and put back. Tokio's clock, which is the
        // system's unless a test pauses it.
        let started = TokioInstant::now();
        let limits = this.limits(started, changes_state(&request.method));
        let (answer, conn) = self
            .pool
            .send(addr, &head, MAX_ANSWER_BYTES, started, limits)
            .await?;
        self.pool.put(addr, conn, started.into_std());
        Ok(Answer {
            status: answer.status,
            body: answer.body,
            node: addr,
            epoch: answer.epoch,
            served_by: answer.served_by,
        })
    }
}

/// A request as it is sent to each node it tries.
struct Request {
    method: Method,
    uri: Uri,
    body: Bytes,
}

impl Request {
    fn new(method: Method, uri: Uri, body: Bytes) -> Self {
        Self { method, uri, body }
    }
}

/// When a request must be done by: the client's timeout is how long one
/// request may take, every node it tries included. `None`: no limit (a
/// timeout too large to add to the clock waits for ever, as
/// `tokio::time::timeout` has it).
#[derive(Debug, Clone, Copy)]
struct Deadline(Option<TokioInstant>);

impl Deadline {
    fn after(timeout: Duration) -> Self {
        Deadline(TokioInstant::now().checked_add(timeout))
    }

    /// One try of the request: `fallback` when another node may take the
    /// request if this one fails.
    fn try_of(self, fallback: bool) -> Try {
        Try {
            deadline: self,
            fallback,
        }
    }
}

/// One try of a request at one node.
#[derive(Debug, Clone, Copy)]
struct Try {
    deadline: Deadline,
    fallback: bool,
}

impl Try {
    /// What the try started at `now` may spend. The last node a request
    /// tries has all that is left. One that another node may follow has
    /// half of it to open its connection, so that a node that takes no
    /// connection leaves the next one time to answer; and for a read (which
    /// may go elsewhere after it was sent), half of it for the answer too.
    /// A write that was sent goes nowhere else (it may have been applied),
    /// so it waits for its answer until the deadline.
    fn limits(self, now: TokioInstant, changes_state: bool) -> Limits {
        let Deadline(until) = self.deadline;
        let share = match until {
            Some(until) if self.fallback => Some(now + until.saturating_duration_since(now) / 2),
            until => until,
        };
        Limits {
            open_by: share,
            answer_by: if changes_state { until } else { share },
        }
    }
}

/// Whether a request with `method` may change what the cache holds: one
/// that may have run is never sent again elsewhere.
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// A request path as a URI, parsed once for every node a request tries.
fn path_uri(path: String) -> Result<Uri, Error> {
    Uri::try_from(path).map_err(|e| Error::Invalid(format!("request path: {e}")))
}

fn failure(status: StatusCode, body: &[u8]) -> Error {
    Error::Status {
        status,
        message: error_message(body),
    }
}

/// The `{"error": ...}` message of an error answer, or its raw text.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[cfg(test)]
mod tests {
    use distrocache_membership::{ClusterView, MemberView, Mode};

    use super::*;

    /// Three active members, replication factor 2.
    fn ring() -> Ring {
        Ring::from_view(view(), "127.0.0.1:7001".parse().unwrap()).unwrap()
    }

    /// A node's view of [`ring`].
    fn view() -> ClusterView {
        let member = |id: &str, port: u16| MemberView {
            id: id.into(),
            address: Some(format!("127.0.0.1:{port}")),
            client_address: None,
            state: MemberState::Active,
        };
        ClusterView {
            node_id: "a".into(),
            mode: Mode::Cluster,
            epoch: 3,
            replication_factor: Some(2),
            hashing: None,
            member_state: Some(MemberState::Active),
            members: vec![member("a", 7001), member("b", 7002), member("c", 7003)],
            previous_epoch: None,
            settled: true,
            ready: true,
            read_lease: true,
            owners: None,
        }
    }

    /// Seeds that do not resolve are passed over for those that do; with
    /// none resolving, every seed's error is said; one that is not
    /// `host:port` at all is refused at once.
    #[tokio::test]
    async fn seeds_that_do_not_resolve_are_passed_over() {
        let lookup = |host_port: &str| {
            let result = match host_port {
                "up:1" => Ok(vec!["127.0.0.1:1".parse().unwrap()]),
                "empty:1" => Ok(vec![]),
                "no-port" => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "invalid socket address",
                )),
                _ => Err(std::io::Error::other("Name or service not known")),
            };
            std::future::ready(result)
        };
        let addrs = resolve_seeds(&["down:1", "empty:1", "up:1"], lookup)
            .await
            .unwrap();
        assert_eq!(addrs, ["127.0.0.1:1".parse::<SocketAddr>().unwrap()]);
        match resolve_seeds(&["down:1", "empty:1"], lookup).await {
            Err(Error::Unreachable(e)) => {
                assert!(e.contains("down:1") && e.contains("empty:1"), "{e}");
            }
            other => panic!("no seed resolves: {other:?}"),
        }
        match resolve_seeds(&["up:1", "no-port"], lookup).await {
            Err(Error::Invalid(e)) => assert!(e.contains("no-port"), "{e}"),
            other => panic!("a seed that is not host:port: {other:?}"),
        }
    }

    /// A background refresh dropped before it ran (its runtime shut down)
    /// gives its turn back: the client goes on learning rings, where it
    /// used to stay on the one it held for good.
    #[test]
    fn a_refresh_dropped_unfinished_gives_its_turn_back() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let client = Client {
            inner: Arc::new(Inner::new(
                vec![addr],
                addr,
                None,
                ReadFrom::default(),
                Duration::from_secs(1),
                None,
            )),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Spawned, and the runtime ends before it is ever polled.
        runtime.block_on(async { client.refresh_later(None) });
        assert!(client.inner.refreshing.load(Ordering::Acquire));
        drop(runtime);
        assert!(
            !client.inner.refreshing.load(Ordering::Acquire),
            "the dropped refresh kept its turn: no refresh would start again"
        );
    }

    /// A view with nothing to route by, or with what no node sends, is not
    /// taken for a ring: a refresh then asks the next node.
    #[test]
    fn a_view_without_a_ring_or_with_an_invalid_one_is_refused() {
        let asked: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let mut empty = view();
        empty.members.clear();
        empty.epoch = 0;
        let e = Ring::from_view(empty, asked).err().unwrap();
        assert!(e.contains("no ring yet"), "{e}");

        let mut huge = view();
        huge.hashing = Some(distrocache_membership::Hashing::Consistent {
            virtual_nodes: u32::MAX,
        });
        let e = Ring::from_view(huge, asked).err().unwrap();
        assert!(e.contains("virtualNodes"), "{e}");

        let mut none = view();
        none.replication_factor = Some(0);
        let e = Ring::from_view(none, asked).err().unwrap();
        assert!(e.contains("replicationFactor"), "{e}");
    }

    #[test]
    fn only_reads_may_be_sent_again_after_an_unanswered_try() {
        assert!(!changes_state(&Method::GET));
        assert!(!changes_state(&Method::HEAD));
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(changes_state(&method), "{method}");
        }
    }

    fn inner(read_from: ReadFrom) -> Inner {
        let seed: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        Inner::new(
            vec![seed],
            seed,
            None,
            read_from,
            Duration::from_secs(1),
            None,
        )
    }

    /// The key's owners (primary first) and the member that owns nothing.
    fn owners_of(ring: &Ring, key: &str) -> (usize, usize, usize) {
        let owners = ring.owners(key);
        assert_eq!(owners.len(), 2);
        let other = (0..3).find(|i| !owners.contains(i)).unwrap();
        (owners[0], owners[1], other)
    }

    #[test]
    fn reads_and_writes_go_to_the_primary_then_the_other_owner_then_anyone() {
        let ring = ring();
        let inner = inner(ReadFrom::Primary);
        for key in ["k1", "k2", "k3", "k4"] {
            let (primary, replica, other) = owners_of(&ring, key);
            for access in [Access::Read, Access::Write] {
                let plan = inner.plan(&ring, key, access);
                assert_eq!(plan.as_slice(), [primary, replica, other], "{key}");
            }
        }
    }

    #[test]
    fn least_busy_reads_go_to_the_owner_with_fewer_requests_in_flight() {
        let ring = ring();
        let inner = inner(ReadFrom::LeastBusy);
        let (primary, replica, other) = owners_of(&ring, "k1");
        // Equals: the primary.
        assert_eq!(
            inner.plan(&ring, "k1", Access::Read).as_slice(),
            [primary, replica, other]
        );
        // A busier primary: its copy first, the primary next.
        let busy = [ring.count_request(primary), ring.count_request(primary)];
        let one_on_replica = ring.count_request(replica);
        assert_eq!(
            inner.plan(&ring, "k1", Access::Read).as_slice(),
            [replica, primary, other]
        );
        // Writes still go to the primary, which coordinates them.
        assert_eq!(
            inner.plan(&ring, "k1", Access::Write).as_slice(),
            [primary, replica, other]
        );
        // Requests that ended are no longer counted: equals again.
        drop(busy);
        assert_eq!(ring.in_flight(primary), 0);
        let _one_on_primary = ring.count_request(primary);
        assert_eq!(
            inner.plan(&ring, "k1", Access::Read).as_slice(),
            [primary, replica, other]
        );
        drop(one_on_replica);
        // A node with nothing in flight that owns nothing is never chosen
        // over an owner.
        assert_eq!(ring.in_flight(other), 0);
        assert_eq!(
            inner.plan(&ring, "k1", Access::Read).as_slice(),
            [replica, primary, other]
        );
    }

    #[test]
    fn any_owner_reads_take_the_owners_in_turn() {
        let ring = ring();
        let inner = inner(ReadFrom::AnyOwner);
        let (primary, replica, other) = owners_of(&ring, "k3");
        let firsts: Vec<usize> = (0..4)
            .map(|_| inner.plan(&ring, "k3", Access::Read)[0])
            .collect();
        assert_eq!(firsts, [primary, replica, primary, replica]);
        assert_eq!(
            inner.plan(&ring, "k3", Access::Write).as_slice(),
            [primary, replica, other]
        );
    }

    #[test]
    fn a_node_recently_unreachable_is_tried_last() {
        let ring = ring();
        let inner = inner(ReadFrom::LeastBusy);
        let (primary, replica, other) = owners_of(&ring, "k2");
        inner.mark_down(ring.nodes[primary].address);
        for access in [Access::Read, Access::Write] {
            assert_eq!(
                inner.plan(&ring, "k2", access).as_slice(),
                [replica, other, primary]
            );
        }
        inner.up(ring.nodes[primary].address);
        assert_eq!(
            inner.plan(&ring, "k2", Access::Read).as_slice(),
            [primary, replica, other]
        );
        // One of two unreachable nodes answering again leaves the other last.
        inner.mark_down(ring.nodes[primary].address);
        inner.mark_down(ring.nodes[replica].address);
        inner.up(ring.nodes[primary].address);
        assert_eq!(
            inner.plan(&ring, "k2", Access::Read).as_slice(),
            [primary, other, replica]
        );
        inner.up(ring.nodes[replica].address);
        assert_eq!(
            inner.plan(&ring, "k2", Access::Read).as_slice(),
            [primary, replica, other]
        );
        assert!(!inner.any_down.load(Ordering::Acquire));
    }

    #[test]
    fn a_node_down_for_longer_than_it_is_held_leaves_the_list() {
        let ring = ring();
        let inner = inner(ReadFrom::LeastBusy);
        let (primary, replica, other) = owners_of(&ring, "k2");
        // Marked down long ago: as if it had left the ring since.
        inner.down.lock().insert(
            "127.0.0.1:9".parse().unwrap(),
            Instant::now() - Duration::from_secs(1),
        );
        inner.any_down.store(true, Ordering::Release);
        assert_eq!(
            inner.plan(&ring, "k2", Access::Read).as_slice(),
            [primary, replica, other]
        );
        assert!(inner.down.lock().is_empty());
        assert!(!inner.any_down.load(Ordering::Acquire));
    }

    #[test]
    fn a_path_that_is_no_uri_is_refused_before_anything_is_sent() {
        assert!(matches!(
            path_uri("/api/v1/cache/a b".into()),
            Err(Error::Invalid(_))
        ));
        assert_eq!(
            path_uri("/api/v1/cache/a%20b".into()).unwrap().path(),
            "/api/v1/cache/a%20b"
        );
    }
}

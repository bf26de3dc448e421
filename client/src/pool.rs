//! Keep-alive HTTP/1.1 connections to the cache's nodes: idle ones kept per
//! node, taken for one request at a time and put back once its answer has
//! been read.
//!
//! Not `hyper_util`'s pooled client: the client is a benchmark's load
//! generator as much as a library, and that pool cost more than the cache
//! node it drives (about 20 µs of CPU per request: a task spawned per
//! request to return the connection, a SipHash map keyed by scheme and
//! authority, a URI parsed per request, against the node's 9). What a
//! ring-aware client needs of a pool is small, and is all here: a stack of
//! idle connections per node (the most recently used first, so a quiet
//! period lets the rest time out), a bound on how many are kept, and
//! telling a request that never left (safe to send elsewhere) from one that
//! may have reached the node. With TLS (`tls.rs`), a new connection
//! completes its handshake before it is used, and a node that refuses the
//! client's certificate only once the first request is on its way has not
//! read it; a connection then carries requests the same way either way
//! (`conn.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant as TokioInstant;

use crate::conn::{Answer, Conn, Head, Stream};
use crate::tls::{Refusal, Tls};

/// How long a connection may wait unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most idle connections kept for one node.
const MAX_IDLE_PER_NODE: usize = 1024;
/// How long opening a connection may take (its TLS handshake included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failed {
    /// It never reached the node (no connection, or the connection closed
    /// before the request was written): sending it elsewhere is safe.
    NotSent(String),
    /// It may have reached the node.
    Lost(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::NotSent(r) | Failed::Lost(r) => f.write_str(r),
        }
    }
}

/// How long one request at one node may take (`None`: no limit).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For a new connection to open (its TLS handshake included); at most
    /// [`CONNECT_TIMEOUT`] after the request started in any case.
    pub open_by: Option<TokioInstant>,
    /// For the whole answer.
    pub answer_by: Option<TokioInstant>,
}

/// Idle connections, per node.
pub struct Pool {
    idle: Mutex<IdleConns>,
    /// How new connections open TLS, when the nodes serve it.
    tls: Option<Tls>,
}

/// Idle connections by node.
struct IdleConns {
    /// A few nodes at most: a list scanned in place beats hashing the key.
    nodes: Vec<NodeConns>,
    /// When every node's stale connections are closed next (a node that
    /// gets no more requests does not keep its connections for ever).
    next_sweep: Option<Instant>,
}

impl IdleConns {
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.next_sweep = Some(now + IDLE_TIMEOUT);
        for node in &mut self.nodes {
            drop_stale(&mut node.idle, now);
        }
        self.nodes.retain(|n| !n.idle.is_empty());
    }
}

/// Closes the connections of a node's stack idle for longer than
/// [`IDLE_TIMEOUT`] at `now` (the oldest are at the bottom).
fn drop_stale(idle: &mut Vec<Idle>, now: Instant) {
    let stale = idle
        .iter()
        .take_while(|i| now.saturating_duration_since(i.since) > IDLE_TIMEOUT)
        .count();
    idle.drain(..stale);
}

/// One node's idle connections, a stack: the most recently used on top.
struct NodeConns {
    addr: SocketAddr,
    idle: Vec<Idle>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Pool {
    pub fn new(tls: Option<Tls>) -> Self {
        Self {
            idle: Mutex::new(IdleConns {
                nodes: Vec::new(),
                next_sweep: None,
            }),
            tls,
        }
    }

    /// Sends a request to `addr` on an idle connection or a new one, and
    /// reads its answer (a body of `max_body` bytes at most) within
    /// `limits`; the connection is handed back with it, to be returned with
    /// [`Pool::put`]. `started` is the request's start, read once by the
    /// caller.
    ///
    /// A request still waiting for its connection to open at `open_by`
    /// never left ([`Failed::NotSent`]); one written and not answered by
    /// `answer_by` is [`Failed::Lost`].
    pub async fn send(
        &self,
        addr: SocketAddr,
        head: &Head<'_>,
        max_body: usize,
        started: TokioInstant,
        limits: Limits,
    ) -> Result<(Answer, Conn), Failed> {
        let deadline = limits.answer_by;
        // An idle connection the node closed meanwhile is found out here,
        // before anything is written: the request then goes on another.
        while let Some(mut conn) = self.take(addr, started.into_std()) {
            match by(deadline, started, conn.send(head, max_body)).await {
                Ok(answer) => return Ok((answer, conn)),
                // Closed as the request was written: another may do.
                Err(Failed::NotSent(_)) => continue,
                Err(lost) => return Err(lost),
            }
        }
        let open_by = match limits.open_by {
            Some(d) => d.min(started + CONNECT_TIMEOUT),
            None => started + CONNECT_TIMEOUT,
        };
        // Boxed: opening a connection is rare, and its future (a TLS
        // handshake's state included) would otherwise make every request's
        // future larger.
        let opened =
            tokio::time::timeout_at(open_by, Box::pin(connect(addr, self.tls.as_ref()))).await;
        let (mut conn, refusal) =
            opened.map_err(|_| Failed::NotSent(format!("connecting to {addr} timed out")))??;
        match by(deadline, started, conn.send(head, max_body)).await {
            Ok(answer) => Ok((answer, conn)),
            // A node that refused this client's TLS (its certificate, with
            // TLS 1.3) never read the request, however the failure shows.
            Err(failed) => match refusal.as_ref().and_then(Refusal::alert) {
                Some(alert) => Err(Failed::NotSent(format!(
                    "TLS with {addr}: the node refused the handshake: {alert:?}"
                ))),
                None => Err(failed),
            },
        }
    }

    /// Keeps a connection whose last answer has been read in full;
    /// `started` is when its request started (its idle time counts from
    /// there: a request's length early at most).
    pub fn put(&self, addr: SocketAddr, conn: Conn, started: Instant) {
        if !conn.may_keep() {
            return;
        }
        let mut idle_conns = self.idle.lock();
        idle_conns.sweep(started);
        let nodes = &mut idle_conns.nodes;
        let index = match nodes.iter().position(|n| n.addr == addr) {
            Some(i) => i,
            None => {
                nodes.push(NodeConns {
                    addr,
                    idle: Vec::new(),
                });
                nodes.len() - 1
            }
        };
        let idle = &mut nodes[index].idle;
        drop_stale(idle, started);
        if idle.len() < MAX_IDLE_PER_NODE {
            // Stamped no earlier than the one below it, so that the stack
            // stays oldest first though requests end in another order than
            // they started (and never later than now).
            let since = idle.last().map_or(started, |top| top.since.max(started));
            idle.push(Idle { conn, since });
        }
    }

    /// Closes the idle connections of every node `keep` does not keep (one
    /// that left the ring).
    pub fn retain(&self, keep: impl Fn(SocketAddr) -> bool) {
        self.idle.lock().nodes.retain(|n| keep(n.addr));
    }

    /// The most recently used idle connection to `addr` that is still open.
    fn take(&self, addr: SocketAddr, now: Instant) -> Option<Conn> {
        let mut idle_conns = self.idle.lock();
        let node = idle_conns.nodes.iter_mut().find(|n| n.addr == addr)?;
        while let Some(Idle { mut conn, since }) = node.idle.pop() {
            if now.saturating_duration_since(since) <= IDLE_TIMEOUT && conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }
}

/// `request` given until `deadline` (none: no limit), which `started`
/// counts from.
async fn by<T>(
    deadline: Option<TokioInstant>,
    started: TokioInstant,
    request: impl Future<Output = Result<T, Failed>>,
) -> Result<T, Failed> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, request)
            .await
            .unwrap_or_else(|_| {
                Err(Failed::Lost(format!(
                    "no answer within {:?}",
                    deadline.saturating_duration_since(started)
                )))
            }),
        None => request.await,
    }
}

/// A new connection to `addr`, over TLS with `tls` (then with what keeps
/// the alert the node may refuse it with).
async fn connect(addr: SocketAddr, tls: Option<&Tls>) -> Result<(Conn, Option<Refusal>), Failed> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Failed::NotSent(format!("cannot connect to {addr}: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| Failed::NotSent(format!("{addr}: {e}")))?;
    match tls {
        None => Ok((Conn::new(Stream::Plain(stream)), None)),
        Some(tls) => {
            let (stream, refusal) = tls
                .handshake(stream)
                .await
                .map_err(|e| Failed::NotSent(format!("TLS with {addr}: {e}")))?;
            Ok((Conn::new(Stream::Tls(Box::new(stream))), Some(refusal)))
        }
    }
}

//! Keep-alive HTTP/1.1 connections to the cache's nodes: idle ones kept per
//! node, taken for one request at a time and put back once its answer has
//! been read.
//!
//! Written on hyper's connection API rather than `hyper_util`'s pooled
//! client because the client is a benchmark's load generator as much as a
//! library, and the pooled client cost more than the cache node it drives:
//! about 20 µs of CPU per request (a task spawned per request to return the
//! connection, a SipHash map keyed by scheme and authority, a URI parsed per
//! request), against the node's 9. What it did that a ring-aware client needs
//! is small, and is all here: a stack of idle connections per node (the most
//! recently used first, so a quiet period lets the rest time out), a bound
//! on how many are kept, and telling a request that never left (safe to send
//! elsewhere) from one that may have reached the node. With TLS
//! (`tls.rs`), a new connection completes its handshake before it is used,
//! and a node that refuses the client's certificate only once the first
//! request is on its way has not read it; a connection then carries
//! requests the same way either way.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::Request;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::tls::{Refusal, Tls};

/// How long a connection may wait unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most idle connections kept for one node.
const MAX_IDLE_PER_NODE: usize = 1024;
/// How long opening a connection may take (its TLS handshake included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Sender = SendRequest<Full<Bytes>>;

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

/// Idle connections, per node.
pub struct Pool {
    /// A few nodes at most: a list scanned in place beats hashing the key.
    nodes: Mutex<Vec<NodeConns>>,
    /// How new connections open TLS, when the nodes serve it.
    tls: Option<Tls>,
}

/// One node's idle connections, a stack: the most recently used on top.
struct NodeConns {
    addr: SocketAddr,
    idle: Vec<Idle>,
}

struct Idle {
    conn: Sender,
    since: Instant,
}

impl Pool {
    pub fn new(tls: Option<Tls>) -> Self {
        Self {
            nodes: Mutex::default(),
            tls,
        }
    }

    /// Sends `request` to `addr` on an idle connection or a new one, and
    /// returns the answer's head; the connection is handed back with it, to
    /// be returned with [`Pool::put`] once the body has been read.
    /// `now` is the request's start, read once by the caller.
    pub async fn send(
        &self,
        addr: SocketAddr,
        request: Request<Full<Bytes>>,
        now: Instant,
    ) -> Result<(Response<Incoming>, Sender), Failed> {
        let mut request = request;
        // An idle connection the node closed meanwhile is found out here,
        // before anything is written: the request then goes on a new one.
        while let Some(mut conn) = self.take(addr, now) {
            if conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(Failed::Lost(e.into_error().to_string())),
                },
            }
        }
        // Boxed: opening a connection is rare, and its future (a TLS
        // handshake's state included) would otherwise make every request's
        // future larger.
        let (mut conn, refusal) = Box::pin(connect(addr, self.tls.as_ref())).await?;
        // A node that refused this client's TLS (its certificate, with TLS
        // 1.3) never read the request, however hyper reports the failure.
        let refused = |failed: Failed| match refusal.as_ref().and_then(Refusal::alert) {
            Some(alert) => Failed::NotSent(format!(
                "TLS with {addr}: the node refused the handshake: {alert:?}"
            )),
            None => failed,
        };
        if let Err(e) = conn.ready().await {
            return Err(refused(Failed::NotSent(format!(
                "connection to {addr} closed: {e}"
            ))));
        }
        match conn.try_send_request(request).await {
            Ok(response) => Ok((response, conn)),
            Err(e) if e.message().is_some() => {
                Err(refused(Failed::NotSent(e.into_error().to_string())))
            }
            Err(e) => Err(refused(Failed::Lost(e.into_error().to_string()))),
        }
    }

    /// Keeps a connection whose last answer has been read in full;
    /// `started` is when its request started (its idle time counts from
    /// there: a request's length early at most).
    pub fn put(&self, addr: SocketAddr, conn: Sender, started: Instant) {
        if conn.is_closed() {
            return;
        }
        let mut nodes = self.nodes.lock();
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
        // The oldest are at the bottom of the stack.
        let stale = idle
            .iter()
            .take_while(|i| started.saturating_duration_since(i.since) > IDLE_TIMEOUT)
            .count();
        idle.drain(..stale);
        if idle.len() < MAX_IDLE_PER_NODE {
            // Stamped no earlier than the one below it, so that the stack
            // stays oldest first though requests end in another order than
            // they started (and never later than now).
            let since = idle.last().map_or(started, |top| top.since.max(started));
            idle.push(Idle { conn, since });
        }
    }

    /// The most recently used idle connection to `addr` that is still open.
    fn take(&self, addr: SocketAddr, now: Instant) -> Option<Sender> {
        let mut nodes = self.nodes.lock();
        let node = nodes.iter_mut().find(|n| n.addr == addr)?;
        while let Some(Idle { conn, since }) = node.idle.pop() {
            if !conn.is_closed() && now.saturating_duration_since(since) <= IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }
}

/// A new connection to `addr` (over TLS with `tls`, then with what keeps
/// the alert the node may refuse it with), its I/O driven by a task of its
/// own (which ends when the connection closes or its last handle is
/// dropped).
async fn connect(addr: SocketAddr, tls: Option<&Tls>) -> Result<(Sender, Option<Refusal>), Failed> {
    let open = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Failed::NotSent(format!("cannot connect to {addr}: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Failed::NotSent(format!("{addr}: {e}")))?;
        match tls {
            None => Ok((handshake(addr, stream).await?, None)),
            Some(tls) => {
                let (stream, refusal) = tls
                    .handshake(stream)
                    .await
                    .map_err(|e| Failed::NotSent(format!("TLS with {addr}: {e}")))?;
                Ok((handshake(addr, stream).await?, Some(refusal)))
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| Failed::NotSent(format!("connecting to {addr} timed out")))?
}

/// HTTP/1.1 on an open stream, plain or TLS.
async fn handshake<S>(addr: SocketAddr, stream: S) -> Result<Sender, Failed>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failed::NotSent(format!("{addr}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, error = %e, "connection closed");
        }
    });
    Ok(sender)
}

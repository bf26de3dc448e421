//! The peer client: one multiplexed connection to each peer, asked a
//! [`Call`] (one constructor per operation of the protocol, in `call.rs`)
//! and answering with what that call is due.
//!
//! A connection carries any number of requests at once. Each request gets
//! an id, its frame joins the connection's [`Outbox`] (so requests made
//! while a write is in flight leave together in the next one), and its
//! caller waits for the answer with that id, which may come back before or
//! after the answers to other requests. The connection is opened on first
//! use: TCP, then an HTTP/1.1 upgrade (`GET /internal/v1/connect`,
//! `Upgrade: distrocache-peer/1`) that carries the peer token and this
//! node's id, so authentication and every limit of the HTTP listener apply
//! before a single frame is read; then frames both ways.
//!
//! Failures are told apart by what the peer may have done, which is what a
//! caller needs to decide whether to send a request elsewhere:
//! * never sent ([`PeerError::Refused`]): no connection, or the request was
//!   still in the outbox when the connection ended, or the peer announced it
//!   was going away before reading it; sending it elsewhere is safe;
//! * sent, no answer ([`PeerError::Unreachable`], [`PeerError::Timeout`]):
//!   the peer may have acted on it.
//!
//! A connection that dies fails exactly the requests in flight on it, each
//! with its own error; nothing is ever answered with another request's
//! answer (answers are matched by id, and an id is never reused on a
//! connection). A connection idle for [`IDLE_CLOSE`] is closed by this side,
//! which knows nothing is in flight, so no request is ever caught by a close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::http::{HeaderValue, Method, StatusCode, header};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, oneshot};
use tokio_util::codec::FramedRead;

use distrocache_membership::{MembershipDoc, NodeProgress};

use super::call::Call;
use super::frame::{self, Frame, FrameCodec};
use super::outbox::Outbox;
use super::protocol::{Answer, Features, NodeStats, Records, Request};
use super::{
    CONNECT_PATH, FEATURE_NEWER, FEATURE_SET_KEEPER, FEATURES_HEADER, FROM_HEADER, PROTOCOL,
};
use crate::reload::Reloadable;
use crate::tls::PeerTls;
use crate::tokens::{TokenFile, TokenSet};

/// A connection with nothing in flight for this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(15);
/// How often a connection with calls in flight looks for those past their
/// deadline: a call's timeout fires up to this late.
const SWEEP: Duration = Duration::from_millis(20);
/// A deadline beyond any timeout given (a year).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most requests in flight on one connection; further callers wait (within
/// their time limit).
const MAX_IN_FLIGHT: usize = 4096;
/// Most bytes of requests waiting to be written on one connection; further
/// callers wait (within their time limit).
const MAX_OUTBOX_BYTES: usize = 16 * 1024 * 1024;
/// Largest error body read from a refused upgrade.
const MAX_REFUSAL_BYTES: usize = 4096;

/// Timeouts and bounds of peer calls.
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Largest frame body sent or accepted (a rebalancing batch and then some).
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The request never reached the peer: sending it to another owner is
    /// safe even for a write.
    #[error("cannot reach {addr}: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    /// The connection broke after the request left: the peer may or may not
    /// have acted on it.
    #[error("lost {addr} mid-request: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The peer refused or failed the request.
    #[error("{addr} answered {status}: {message}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        message: String,
    },
    /// The peer holds another ring epoch (`theirs`) and did nothing.
    #[error("{addr} holds ring epoch {theirs}, a different one")]
    Misdirected { addr: SocketAddr, theirs: u64 },
    /// The peer held a newer ring, which this node has now adopted: the
    /// caller must plan again with it.
    #[error("the ring changed while talking to {addr}")]
    RingChanged { addr: SocketAddr },
    #[error("{addr} sent an answer this node cannot read: {reason}")]
    BadAnswer { addr: SocketAddr, reason: String },
}

impl PeerError {
    /// Whether the peer looks down or failing, so that trying another owner
    /// could help.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            PeerError::Refused { .. } | PeerError::Unreachable { .. } | PeerError::Timeout { .. }
        ) || matches!(self, PeerError::Status { status, .. } if status.is_server_error())
    }

    /// Whether the peer may have acted on the request although no answer
    /// says so. Otherwise a write may go to another owner instead without
    /// being applied twice with different outcomes.
    pub fn may_have_acted(&self) -> bool {
        matches!(
            self,
            PeerError::Unreachable { .. } | PeerError::Timeout { .. }
        )
    }
}

/// An answer and the ring epoch its sender holds.
#[derive(Debug)]
pub struct Reply {
    pub epoch: u64,
    pub answer: Answer,
}

/// One multiplexed connection to a peer.
struct Connection {
    addr: SocketAddr,
    /// What the peer said it takes beyond the protocol's first version.
    features: Features,
    outbox: Outbox,
    /// Ids are handed out under the outbox's lock, in the order the frames
    /// enter it: every id below `next_id` is in the outbox or gone.
    next_id: AtomicU64,
    /// Every id up to this one has been handed to the socket.
    taken_through: AtomicU64,
    calls: Mutex<Calls>,
    /// A permit per call in the peer's hands: held by the call's entry in
    /// `calls`, so it is given back when the entry goes (answered, past
    /// its deadline, or the connection failed), not when its caller stops
    /// waiting, which would let calls that no one waits for any more pile
    /// up without bound.
    in_flight: Arc<Semaphore>,
    last_used: Mutex<Instant>,
    /// Wakes the housekeeping when the first call of a quiet spell is sent.
    busy: Notify,
}

/// What the peer that sent `value` as its `FEATURES_HEADER` takes.
fn features_of(value: Option<&HeaderValue>) -> Features {
    let listed = value
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .map(str::trim);
    let mut features = Features::default();
    for feature in listed {
        match feature {
            FEATURE_SET_KEEPER => features.set_keeper = true,
            FEATURE_NEWER => features.newer = true,
            _ => {}
        }
    }
    features
}

type Waiter = oneshot::Sender<Result<Frame, PeerError>>;

/// A call waiting for its answer.
struct Pending {
    waiter: Waiter,
    _permit: OwnedSemaphorePermit,
    /// When it fails with [`PeerError::Timeout`] if no answer came.
    deadline: Instant,
    timeout: Duration,
}

/// The maps looked up on every call (the waiter of a request id, a peer's
/// slot by address) hash with foldhash rather than std's SipHash: their
/// keys are chosen by this node (ids it numbers, addresses from its ring),
/// so SipHash's resistance to chosen keys buys nothing, and it cost about
/// 80 ns per cluster SET in perf (`bench/cluster.sh`).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Calls {
    pending: FastMap<u64, Pending>,
    /// The peer is going away after answering requests up to this id.
    going_away: Option<u64>,
    /// Why no request is taken any more.
    closed: Option<String>,
}

impl Connection {
    fn is_usable(&self) -> bool {
        let calls = self.calls.lock();
        calls.closed.is_none() && calls.going_away.is_none()
    }

    /// Sends `request` and waits for its answer.
    async fn call(
        &self,
        epoch: u64,
        request: &Request,
        timeout: Duration,
    ) -> Result<Frame, PeerError> {
        let refused = |reason: &str| PeerError::Refused {
            addr: self.addr,
            reason: reason.to_owned(),
        };
        let now = Instant::now();
        // A timeout too large to add waits for ever (as
        // `tokio::time::timeout` does).
        let deadline = now.checked_add(timeout).unwrap_or(now + FOREVER);
        // The call's time limit covers its wait for room too: a call that
        // finds the connection full waits no longer than it would for an
        // answer, and never left, so it may go elsewhere. Only then is a
        // timer armed; the usual call takes its permit at once.
        let mut permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(TryAcquireError::Closed) => return Err(refused("connection closed")),
            Err(TryAcquireError::NoPermits) => Some(
                tokio::time::timeout_at(deadline.into(), self.in_flight.clone().acquire_owned())
                    .await
                    .map_err(|_| refused("too many requests in flight on the connection"))?
                    .map_err(|_| refused("connection closed"))?,
            ),
        };
        // A peer of an older version gets the request it can read.
        let downgraded = request.downgraded_for(self.features);
        let request = downgraded.as_ref().unwrap_or(request);
        let (tx, rx) = oneshot::channel();
        let mut waiter = Some(tx);
        let first = loop {
            let queued = self
                .outbox
                .with(|buf| {
                    // The frames of calls that no one waits for any more
                    // still leave: what waits here is bounded in bytes too.
                    if buf.len() >= MAX_OUTBOX_BYTES {
                        return Some(None);
                    }
                    let mut calls = self.calls.lock();
                    if calls.closed.is_some() || calls.going_away.is_some() {
                        return None;
                    }
                    // Taken once, on the pass that sends (every other pass
                    // ends the loop or appends nothing).
                    let (waiter, permit) = (waiter.take()?, permit.take()?);
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    frame::encode(buf, id, epoch, |body| request.encode(body));
                    let first = calls.pending.is_empty();
                    calls.pending.insert(
                        id,
                        Pending {
                            waiter,
                            _permit: permit,
                            deadline,
                            timeout,
                        },
                    );
                    Some(Some(first))
                })
                .ok_or_else(|| refused("connection closing"))?;
            match queued {
                Some(first) => break first,
                None => tokio::time::timeout_at(
                    deadline.into(),
                    self.outbox.wait_below(MAX_OUTBOX_BYTES),
                )
                .await
                .map_err(|_| refused("the peer is not reading its requests"))?,
            }
        };
        *self.last_used.lock() = now;
        if first {
            self.busy.notify_one();
        }
        // No timer of its own: the connection's housekeeping fails the call
        // once past its deadline (one periodic sweep per connection instead
        // of a timer registered and removed per call, which cost ~0.2 µs of
        // every cluster SET in perf).
        rx.await.unwrap_or_else(|_| {
            Err(PeerError::Unreachable {
                addr: self.addr,
                reason: "connection dropped".into(),
            })
        })
    }

    /// Reads answers and hands each to its caller, until the stream ends,
    /// fails, or the peer, going away, has answered everything it read.
    async fn read_answers<R>(&self, mut frames: FramedRead<R, FrameCodec>) -> String
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        loop {
            let frame = match frames.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return e.to_string(),
                None => return "the peer closed the connection".into(),
            };
            let mut calls = self.calls.lock();
            if frame.kind == frame::GOING_AWAY {
                let last = frame.id;
                calls.going_away = Some(last);
                let never_read: Vec<u64> = calls
                    .pending
                    .keys()
                    .copied()
                    .filter(|&id| id > last)
                    .collect();
                for id in never_read {
                    if let Some(call) = calls.pending.remove(&id) {
                        let _ = call.waiter.send(Err(PeerError::Refused {
                            addr: self.addr,
                            reason: "the peer is going away".into(),
                        }));
                    }
                }
            } else if let Some(call) = calls.pending.remove(&frame.id) {
                let _ = call.waiter.send(Ok(frame));
            }
            if calls.going_away.is_some() && calls.pending.is_empty() {
                return "the peer went away".into();
            }
        }
    }

    /// Fails the calls past their deadline, every [`SWEEP`] while calls
    /// are in flight, and closes the connection once it has been idle for
    /// [`IDLE_CLOSE`]. Quiet, it sleeps until a call is sent (or the idle
    /// check is due), so an idle connection costs no wake-ups per sweep.
    async fn housekeeping(&self) -> String {
        loop {
            let idle = {
                let calls = self.calls.lock();
                calls.pending.is_empty()
            };
            if idle {
                tokio::select! {
                    () = self.busy.notified() => {}
                    () = tokio::time::sleep(IDLE_CLOSE / 3) => {}
                }
            } else {
                tokio::time::sleep(SWEEP).await;
            }
            let now = Instant::now();
            let overdue: Vec<Pending> = {
                let mut calls = self.calls.lock();
                if calls.pending.is_empty() {
                    if now.duration_since(*self.last_used.lock()) >= IDLE_CLOSE {
                        calls.closed = Some("idle".into());
                        drop(calls);
                        // Outside the calls lock: callers take the outbox's
                        // lock first.
                        self.outbox.close();
                        return "idle".into();
                    }
                    continue;
                }
                calls
                    .pending
                    .extract_if(|_, call| call.deadline <= now)
                    .map(|(_, call)| call)
                    .collect()
            };
            for call in overdue {
                let _ = call.waiter.send(Err(PeerError::Timeout {
                    addr: self.addr,
                    timeout: call.timeout,
                }));
            }
        }
    }

    /// Fails every request still waiting: those handed to the socket (and
    /// not beyond what a departing peer said it read) may have been acted
    /// on; the rest never left.
    fn fail_all(&self, reason: &str) {
        let (waiting, read_by_peer) = {
            let mut calls = self.calls.lock();
            calls.closed.get_or_insert_with(|| reason.to_owned());
            let waiting: Vec<(u64, Pending)> = calls.pending.drain().collect();
            (waiting, calls.going_away.unwrap_or(u64::MAX))
        };
        // Outside the calls lock: callers take the outbox's lock first.
        self.outbox.close();
        let taken = self.taken_through.load(Ordering::Acquire);
        for (id, call) in waiting {
            let error = if id <= taken && id <= read_by_peer {
                PeerError::Unreachable {
                    addr: self.addr,
                    reason: reason.to_owned(),
                }
            } else {
                PeerError::Refused {
                    addr: self.addr,
                    reason: reason.to_owned(),
                }
            };
            let _ = call.waiter.send(Err(error));
        }
    }
}

/// Fails what is in flight on a connection however its driver ends:
/// returning, panicking, or dropped with the runtime. Its callers have no
/// timer of their own, so nothing else would end their wait, and the
/// connection must stop taking calls.
struct FailOnStop(Arc<Connection>);

impl Drop for FailOnStop {
    fn drop(&mut self) {
        self.0.fail_all("the connection stopped");
    }
}

/// Runs a connection until it ends, then fails what was in flight on it.
async fn drive<R, W>(conn: Arc<Connection>, read: R, mut write: W, read_buf: Bytes, max_body: usize)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let _stop = FailOnStop(conn.clone());
    let mut frames = FramedRead::new(read, FrameCodec::new(max_body));
    frames.read_buffer_mut().extend_from_slice(&read_buf);
    let reason = tokio::select! {
        reason = conn.read_answers(frames) => reason,
        written = conn.outbox.write_to(&mut write, || {
            // Called with the outbox locked: no id is being handed out.
            let last = conn.next_id.load(Ordering::Relaxed).saturating_sub(1);
            conn.taken_through.store(last, Ordering::Release);
        }) => match written {
            Ok(()) => "closed".to_owned(),
            Err(e) => format!("write failed: {e}"),
        },
        reason = conn.housekeeping() => reason,
    };
    tracing::debug!(peer = %conn.addr, %reason, "peer connection ended");
    conn.fail_all(&reason);
}

/// The two halves of an upgraded connection, and what was read past the
/// upgrade: TCP's own halves, or a split TLS stream.
enum Halves {
    Plain(
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
        Bytes,
    ),
    Tls(
        tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>,
        tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
        Bytes,
    ),
}

/// A peer's connection, or the way to one.
#[derive(Default)]
struct Slot {
    conn: ArcSwapOption<Connection>,
    /// Held while connecting, so concurrent callers share one attempt.
    connecting: tokio::sync::Mutex<()>,
    /// The last attempt failed: callers in the next instants fail at once
    /// rather than each wait for a connect timeout of their own.
    failed: Mutex<Option<(Instant, String)>>,
}

impl Slot {
    /// Its connection, if open and not closing.
    fn usable(&self) -> Option<Arc<Connection>> {
        self.conn.load_full().filter(|c| c.is_usable())
    }
}

/// How long a failed connection attempt answers for the peer.
const FAILURE_HOLD: Duration = Duration::from_millis(250);

/// The client every node uses to reach its peers (and tests to reach
/// nodes): one multiplexed connection per peer address.
pub struct PeerClient {
    from: HeaderValue,
    /// The peer tokens (the first is sent), when the peer API requires one;
    /// read afresh for every new connection, so a rotation reaches them.
    tokens: Option<Arc<TokenFile>>,
    /// Mutual TLS to peers, when the peer API is served over it.
    tls: Option<Arc<PeerTls>>,
    /// The member id at each peer address, for checking the certificate a
    /// peer presents names the member this node meant to reach.
    names: parking_lot::RwLock<FastMap<SocketAddr, Arc<str>>>,
    settings: PeerSettings,
    slots: parking_lot::RwLock<FastMap<SocketAddr, Arc<Slot>>>,
}

impl PeerClient {
    pub fn new(node_id: &str, settings: PeerSettings, token: Option<&str>) -> Self {
        let tokens = token.map(|t| Reloadable::fixed("peer token", TokenSet::one(t)));
        Self::with_credentials(node_id, settings, tokens, None)
    }

    /// A client sending the first token of `tokens` (as they are when each
    /// connection opens) and speaking mutual TLS with `tls`.
    pub fn with_credentials(
        node_id: &str,
        settings: PeerSettings,
        tokens: Option<Arc<TokenFile>>,
        tls: Option<Arc<PeerTls>>,
    ) -> Self {
        Self {
            from: HeaderValue::from_str(node_id)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid-node-id")),
            tokens,
            tls,
            names: Default::default(),
            settings,
            slots: Default::default(),
        }
    }

    /// The member ids at the peer addresses (the ring's members): with
    /// mutual TLS, the name each peer's certificate must carry.
    pub fn learn_names<'a>(&self, members: impl IntoIterator<Item = (SocketAddr, &'a str)>) {
        let names: FastMap<SocketAddr, Arc<str>> = members
            .into_iter()
            .map(|(addr, id)| (addr, Arc::from(id)))
            .collect();
        // The slots of addresses no member has any more (a pod that came
        // back at another address) go once their connection has ended, with
        // its buffers; a connection still open ends at its idle close.
        self.slots
            .write()
            .retain(|addr, slot| names.contains_key(addr) || slot.usable().is_some());
        *self.names.write() = names;
    }

    fn authorization(&self) -> Option<HeaderValue> {
        let tokens = self.tokens.as_ref()?.current();
        let mut value = HeaderValue::from_str(&format!("Bearer {}", tokens.first())).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    pub fn settings(&self) -> PeerSettings {
        self.settings
    }

    /// Sends one request with this node's `epoch` and returns the answer,
    /// whatever it says; only transport failures are errors.
    pub async fn send(
        &self,
        addr: SocketAddr,
        epoch: u64,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Reply, PeerError> {
        let timeout = timeout.unwrap_or(self.settings.request_timeout);
        let frame = self.call(addr, epoch, request, timeout).await?;
        let answer = Answer::decode(frame.kind, &frame.body).map_err(|e| PeerError::BadAnswer {
            addr,
            reason: e.to_string(),
        })?;
        Ok(Reply {
            epoch: frame.epoch,
            answer,
        })
    }

    async fn call(
        &self,
        addr: SocketAddr,
        epoch: u64,
        request: &Request,
        timeout: Duration,
    ) -> Result<Frame, PeerError> {
        // A request that never left a connection that was closing (idle,
        // or the peer going away) goes out once more on a new one; not one
        // refused by a connection still open (it found it full for as long
        // as its time limit).
        for attempt in 0..2 {
            let conn = self.connection(addr).await?;
            match conn.call(epoch, request, timeout).await {
                Err(PeerError::Refused { .. })
                    if attempt == 0 && (!conn.is_usable() || conn.outbox.is_closed()) =>
                {
                    continue;
                }
                result => return result,
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn slot(&self, addr: SocketAddr) -> Arc<Slot> {
        if let Some(slot) = self.slots.read().get(&addr) {
            return slot.clone();
        }
        self.slots.write().entry(addr).or_default().clone()
    }

    /// The open connection to `addr`, opening one if needed.
    async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>, PeerError> {
        let slot = self.slot(addr);
        if let Some(conn) = slot.usable() {
            return Ok(conn);
        }
        // Boxed: opening one (TCP, TLS, the upgrade) is rare, and its
        // future, kilobytes, would otherwise be part of every request's.
        Box::pin(self.reconnect(addr, slot)).await
    }

    /// Opens a connection to `addr` for `slot`, one caller at a time (the
    /// others then take the one it opened).
    async fn reconnect(
        &self,
        addr: SocketAddr,
        slot: Arc<Slot>,
    ) -> Result<Arc<Connection>, PeerError> {
        let _connecting = slot.connecting.lock().await;
        if let Some(conn) = slot.usable() {
            return Ok(conn);
        }
        if let Some((at, reason)) = slot.failed.lock().as_ref()
            && at.elapsed() < FAILURE_HOLD
        {
            return Err(PeerError::Refused {
                addr,
                reason: reason.clone(),
            });
        }
        match self.open(addr).await {
            Ok(conn) => {
                *slot.failed.lock() = None;
                slot.conn.store(Some(conn.clone()));
                Ok(conn)
            }
            Err(e) => {
                let reason = match &e {
                    PeerError::Refused { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                *slot.failed.lock() = Some((Instant::now(), reason));
                Err(e)
            }
        }
    }

    /// Connects and upgrades to the peer protocol (over mutual TLS when
    /// configured).
    async fn open(&self, addr: SocketAddr) -> Result<Arc<Connection>, PeerError> {
        let refused = |reason: String| PeerError::Refused { addr, reason };
        let handshake = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| refused(e.to_string()))?;
            crate::tcp::tune(&stream);
            let Some(tls) = &self.tls else {
                let (stream, read_buf, features) = self.upgrade(addr, stream).await?;
                let (read, write) = stream.into_split();
                return Ok::<_, PeerError>((Halves::Plain(read, write, read_buf), features));
            };
            let name = self.names.read().get(&addr).cloned().ok_or_else(|| {
                refused(format!(
                    "no member id known for {addr}: its certificate cannot be checked"
                ))
            })?;
            let server_name = tls.member_name(&name).map_err(|e| refused(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls.client.current())
                .connect(server_name, stream)
                .await
                .map_err(|e| refused(format!("TLS handshake: {}", error_chain(&e))))?;
            let (stream, read_buf, features) = self.upgrade(addr, stream).await?;
            let (read, write) = tokio::io::split(stream);
            Ok((Halves::Tls(read, write, read_buf), features))
        };
        let (halves, features) = tokio::time::timeout(self.settings.connect_timeout, handshake)
            .await
            .map_err(|_| {
                refused(format!(
                    "no connection within {:?}",
                    self.settings.connect_timeout
                ))
            })??;
        let conn = Arc::new(Connection {
            addr,
            features,
            outbox: Outbox::default(),
            next_id: AtomicU64::new(1),
            taken_through: AtomicU64::new(0),
            calls: Mutex::new(Calls::default()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            last_used: Mutex::new(Instant::now()),
            busy: Notify::new(),
        });
        let max = self.settings.max_message_bytes;
        match halves {
            Halves::Plain(read, write, read_buf) => {
                tokio::spawn(drive(conn.clone(), read, write, read_buf, max));
            }
            Halves::Tls(read, write, read_buf) => {
                tokio::spawn(drive(conn.clone(), read, write, read_buf, max));
            }
        }
        Ok(conn)
    }

    /// The HTTP/1.1 upgrade on an open stream: `GET /internal/v1/connect`,
    /// answered 101; returns the stream, what was read past the answer, and
    /// what the peer said it takes.
    async fn upgrade<S>(
        &self,
        addr: SocketAddr,
        stream: S,
    ) -> Result<(S, Bytes, Features), PeerError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let refused = |reason: String| PeerError::Refused { addr, reason };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| refused(error_chain(&e)))?;
        let driving = tokio::spawn(conn.with_upgrades());
        let mut request = hyper::Request::builder()
            .method(Method::GET)
            .uri(CONNECT_PATH)
            .header(header::HOST, addr.to_string())
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, PROTOCOL)
            .header(FROM_HEADER, self.from.clone());
        if let Some(authorization) = self.authorization() {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| refused(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| refused(error_chain(&e)))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_REFUSAL_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            driving.abort();
            return Err(PeerError::Status {
                addr,
                status,
                message: error_message(&body),
            });
        }
        let features = features_of(response.headers().get(FEATURES_HEADER));
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| refused(error_chain(&e)))?;
        let parts = upgraded
            .downcast::<TokioIo<S>>()
            .map_err(|_| refused("upgraded connection of an unexpected type".into()))?;
        Ok((parts.io.into_inner(), parts.read_buf, features))
    }

    /// Sends `call`'s request and takes the answer it is due (see
    /// [`Call`]); a refusal, a different epoch and any other answer are
    /// errors.
    pub async fn ask<T>(
        &self,
        addr: SocketAddr,
        epoch: u64,
        call: &Call<T>,
        timeout: Option<Duration>,
    ) -> Result<T, PeerError> {
        let request = call.request();
        let reply = self.send(addr, epoch, request, timeout).await?;
        match reply.answer {
            Answer::Misdirected => Err(PeerError::Misdirected {
                addr,
                theirs: reply.epoch,
            }),
            Answer::Refused { status, message } => Err(PeerError::Status {
                addr,
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                message,
            }),
            answer => call.read(answer).map_err(|other| PeerError::BadAnswer {
                addr,
                reason: format!("{} answered with {other:?}", request.name()),
            }),
        }
    }

    /// The copy of `key` the peer holds, untouched (any epoch will do).
    pub async fn fetch(&self, addr: SocketAddr, key: &str) -> Result<Option<Records>, PeerError> {
        self.ask(addr, 0, &Call::fetch(key.to_owned()), None).await
    }

    pub async fn progress(
        &self,
        addr: SocketAddr,
        timeout: Option<Duration>,
    ) -> Result<NodeProgress, PeerError> {
        self.ask(addr, 0, &Call::progress(), timeout).await
    }

    pub async fn stats(&self, addr: SocketAddr) -> Result<NodeStats, PeerError> {
        self.ask(addr, 0, &Call::stats(), None).await
    }

    pub async fn ring(&self, addr: SocketAddr) -> Result<MembershipDoc, PeerError> {
        self.ask(addr, 0, &Call::ring(), None).await
    }

    /// Offers the peer a ring; whether it adopted it.
    pub async fn put_ring(&self, addr: SocketAddr, doc: &MembershipDoc) -> Result<bool, PeerError> {
        self.ask(addr, doc.epoch, &Call::put_ring(doc.clone()), None)
            .await
    }
}

/// An error and its causes on one line (hyper's errors hide the useful part,
/// e.g. "connection refused", in their source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The `{"error": ...}` message of an HTTP error answer, or its raw text.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use futures_util::future::join_all;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::peer::protocol::RecordBatch;
    use crate::peer::testing::{fake_peer_for_each, read_frame, take_upgrade};
    use crate::store::{ItemMeta, ItemView};

    struct Copy(String);

    impl ItemView for Copy {
        fn key(&self) -> &str {
            &self.0
        }
        fn value(&self) -> &[u8] {
            b"1"
        }
        fn meta(&self) -> crate::store::ItemMeta {
            ItemMeta {
                created_at: 1,
                accessed_at: 1,
                expires_at: 2,
                access_count: 0,
            }
        }
        fn tags(&self) -> impl Iterator<Item = &str> {
            std::iter::empty()
        }
    }

    /// A peer that takes the upgrade (saying it takes `features`, if any),
    /// reads `wanted` requests, then does what `script` says with them, and
    /// closes the connection.
    async fn fake_peer(
        listener: TcpListener,
        features: Option<&str>,
        wanted: usize,
        script: impl FnOnce(Vec<Frame>, &mut BytesMut),
    ) {
        fake_peer_until(listener, features, wanted, script, std::future::ready(())).await;
    }

    /// [`fake_peer`], keeping the connection open until `hold` is done.
    async fn fake_peer_until(
        listener: TcpListener,
        features: Option<&str>,
        wanted: usize,
        script: impl FnOnce(Vec<Frame>, &mut BytesMut),
        hold: impl std::future::Future<Output = ()>,
    ) {
        let (mut socket, _) = listener.accept().await.unwrap();
        take_upgrade(&mut socket, features).await;
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        while frames.len() < wanted {
            let frame = read_frame(&mut socket, &mut buf).await;
            frames.push(frame.expect("the client sent every request"));
        }
        let mut out = BytesMut::new();
        script(frames, &mut out);
        socket.write_all(&out).await.unwrap();
        hold.await;
        socket.shutdown().await.unwrap();
    }

    fn answer_item(out: &mut BytesMut, frame: &Frame) {
        let Request::Fetch { key } = Request::decode(frame.kind, &frame.body).unwrap() else {
            panic!("a fetch");
        };
        let mut record = RecordBatch::default();
        record.push(&Copy(key));
        let answer = Answer::Item {
            created: false,
            record: record.freeze(),
        };
        frame::encode(out, frame.id, 1, |body| answer.encode(body));
    }

    fn client() -> PeerClient {
        PeerClient::new(
            "test",
            PeerSettings {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(5),
                max_message_bytes: 1 << 20,
            },
            None,
        )
    }

    /// Calls made one after another, each waiting for its answer, share one
    /// connection: the peer sees one connection however many calls it
    /// answers.
    #[tokio::test]
    async fn calls_one_after_another_share_one_connection() {
        let (addr, accepted) = fake_peer_for_each(|mut socket| async move {
            let mut buf = BytesMut::new();
            while let Some(frame) = read_frame(&mut socket, &mut buf).await {
                let mut out = BytesMut::new();
                answer_item(&mut out, &frame);
                socket.write_all(&out).await.unwrap();
            }
        })
        .await;
        let client = client();
        for i in 0..5 {
            let key = format!("k{i}");
            let record = client.fetch(addr, &key).await.unwrap().expect("answered");
            assert_eq!(record.single().unwrap().key(), key);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// Calls made together leave together: a hundred calls started at once
    /// reach the socket in a batch or two, not a write each.
    #[tokio::test]
    async fn calls_made_together_are_written_together() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(fake_peer(listener, None, 100, |frames, out| {
            for frame in &frames {
                answer_item(out, frame);
            }
        }));
        let client = client();
        let conn = client.connection(addr).await.unwrap();
        let before = conn.outbox.batches_written();
        let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        let results = join_all(keys.iter().map(|k| client.fetch(addr, k))).await;
        peer.await.unwrap();
        for (key, result) in keys.iter().zip(results) {
            let record = result.unwrap().expect("answered");
            assert_eq!(record.single().unwrap().key(), key);
        }
        let batches = conn.outbox.batches_written() - before;
        assert!(
            (1..=2).contains(&batches),
            "{batches} batches for 100 calls"
        );
    }

    /// Requests in flight on a connection that dies each get their own
    /// answer (those answered, out of order, before it died) or an error
    /// saying the peer may have acted; never another request's answer.
    #[tokio::test]
    async fn a_connection_that_dies_fails_exactly_the_requests_in_flight_on_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(fake_peer(listener, None, 10, |frames, out| {
            for i in [7, 3, 1] {
                answer_item(out, &frames[i]);
            }
        }));
        let client = client();
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let results = join_all(keys.iter().map(|k| client.fetch(addr, k))).await;
        peer.await.unwrap();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(Some(record)) => {
                    assert!([1, 3, 7].contains(&i), "k{i} answered");
                    assert_eq!(record.single().unwrap().key(), keys[i], "its own answer");
                }
                Ok(None) => panic!("k{i}: no one answered that it is missing"),
                Err(e) => {
                    assert!(![1, 3, 7].contains(&i), "k{i} was answered: {e}");
                    assert!(e.may_have_acted(), "k{i} was sent: {e}");
                }
            }
        }
    }

    /// A call its peer never answers fails once its deadline passes (the
    /// connection's sweep, not a timer of its own), with an error saying the
    /// peer may have acted; the calls answered on the same connection get
    /// their own answers.
    #[tokio::test]
    async fn a_call_the_peer_never_answers_times_out_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, held) = oneshot::channel::<()>();
        let peer = tokio::spawn(fake_peer_until(
            listener,
            None,
            3,
            |frames, out| {
                for f in &frames {
                    let Request::Fetch { key } = Request::decode(f.kind, &f.body).unwrap() else {
                        panic!("a fetch");
                    };
                    if key != "k1" {
                        answer_item(out, f);
                    }
                }
            },
            async {
                let _ = held.await;
            },
        ));
        let timeout = Duration::from_millis(300);
        let client = PeerClient::new(
            "test",
            PeerSettings {
                connect_timeout: Duration::from_secs(2),
                request_timeout: timeout,
                max_message_bytes: 1 << 20,
            },
            None,
        );
        let keys: Vec<String> = (0..3).map(|i| format!("k{i}")).collect();
        let started = Instant::now();
        let results = tokio::time::timeout(
            Duration::from_secs(20),
            join_all(keys.iter().map(|k| client.fetch(addr, k))),
        )
        .await
        .expect("every call ends: answered or timed out");
        let waited = started.elapsed();
        for (i, result) in results.into_iter().enumerate() {
            match (i, result) {
                (1, Err(PeerError::Timeout { timeout: t, .. })) => assert_eq!(t, timeout),
                (1, other) => panic!("k1 was never answered: {other:?}"),
                (_, Ok(Some(record))) => assert_eq!(record.single().unwrap().key(), keys[i]),
                (_, other) => panic!("k{i} was answered: {other:?}"),
            }
        }
        assert!(
            waited >= timeout,
            "k1 failed after {waited:?}, before its {timeout:?}"
        );
        let _ = release.send(());
        peer.await.unwrap();
    }

    /// Calls that no one waits for any more (their callers gave up) keep
    /// their place on the connection until the peer answers them or their
    /// deadline passes, so the peer never has more than [`MAX_IN_FLIGHT`]
    /// of its requests in hand; and a call that finds no place waits no
    /// longer than its own time limit, failing as never sent.
    #[tokio::test]
    async fn abandoned_calls_keep_their_place_and_a_call_waits_for_one_within_its_limit() {
        use futures_util::FutureExt;

        let (addr, _) = fake_peer_for_each(|mut socket| async move {
            let mut buf = BytesMut::new();
            while read_frame(&mut socket, &mut buf).await.is_some() {}
        })
        .await;
        let client = PeerClient::new(
            "test",
            PeerSettings {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(60),
                max_message_bytes: 1 << 20,
            },
            None,
        );
        let conn = client.connection(addr).await.unwrap();
        // Each call is sent (or finds no place) on its first poll, and then
        // its caller drops it. (Unconstrained: tokio's cooperative budget
        // would otherwise hold back every call past the 128th.)
        tokio::task::unconstrained(async {
            for i in 0..2 * MAX_IN_FLIGHT {
                let key = format!("k{i}");
                assert!(Box::pin(client.fetch(addr, &key)).now_or_never().is_none());
            }
        })
        .await;
        assert_eq!(conn.calls.lock().pending.len(), MAX_IN_FLIGHT);

        let limit = Duration::from_millis(200);
        let started = Instant::now();
        let late = Request::Fetch { key: "late".into() };
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            client.send(addr, 0, &late, Some(limit)),
        )
        .await
        .expect("a call waits for a place no longer than its limit");
        match result {
            Err(e @ PeerError::Refused { .. }) => assert!(!e.may_have_acted()),
            other => panic!("a call that found no place: {other:?}"),
        }
        assert!(started.elapsed() >= limit, "{:?}", started.elapsed());
        assert_eq!(conn.calls.lock().pending.len(), MAX_IN_FLIGHT);
    }

    /// Against a peer that stops reading, what waits to be written stays
    /// within [`MAX_OUTBOX_BYTES`] (and a frame): a call that finds no room
    /// waits no longer than its time limit, failing as never sent.
    #[tokio::test]
    async fn requests_wait_for_a_peer_that_stops_reading_within_a_byte_bound() {
        let (addr, _) = fake_peer_for_each(|socket| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(socket);
        })
        .await;
        let client = PeerClient::new(
            "test",
            PeerSettings {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_millis(300),
                max_message_bytes: 4 << 20,
            },
            None,
        );
        let conn = client.connection(addr).await.unwrap();
        let big = Request::Fetch {
            key: "k".repeat(1 << 20),
        };
        let calls = (0..64).map(|_| client.send(addr, 0, &big, None));
        let results = tokio::time::timeout(Duration::from_secs(20), join_all(calls))
            .await
            .expect("every call ends within its limit");
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(e @ PeerError::Refused { .. }) if !e.may_have_acted()))
            .count();
        assert!(refused > 0, "no call waited for room: {results:?}");
        assert!(
            conn.outbox.pending_bytes() <= MAX_OUTBOX_BYTES + (1 << 20) + 1024,
            "{} bytes waiting",
            conn.outbox.pending_bytes()
        );
    }

    /// The slot of an address that left the ring goes at the next ring
    /// change once its connection has ended (pods come back at other
    /// addresses: every old one kept a dead connection and its buffers);
    /// one whose connection is still open stays until it ends.
    #[tokio::test]
    async fn the_slot_of_an_address_that_left_goes_once_its_connection_ended() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, held) = oneshot::channel::<()>();
        let peer = tokio::spawn(fake_peer_until(
            listener,
            None,
            1,
            |frames, out| answer_item(out, &frames[0]),
            async {
                let _ = held.await;
            },
        ));
        let client = client();
        client.fetch(addr, "k").await.unwrap().expect("answered");
        client.learn_names([]);
        assert!(
            client.slots.read().contains_key(&addr),
            "a slot whose connection is open stays"
        );
        let _ = release.send(());
        peer.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.slot(addr).usable().is_some() {
            assert!(Instant::now() < deadline, "the connection never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client.learn_names([]);
        assert!(
            client.slots.read().is_empty(),
            "the dead connection's slot went"
        );
    }

    /// A peer going away answers what it read up to the request it names;
    /// the requests after it fail as never read (safe to send elsewhere).
    #[tokio::test]
    async fn a_peer_going_away_names_what_it_never_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(fake_peer(listener, None, 6, |frames, out| {
            let mut ids: Vec<u64> = frames.iter().map(|f| f.id).collect();
            ids.sort_unstable();
            let last_read = ids[2];
            frame::encode(out, last_read, 1, |_| frame::GOING_AWAY);
            for f in frames.iter().filter(|f| f.id <= last_read) {
                answer_item(out, f);
            }
        }));
        let client = client();
        let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
        let results = join_all(keys.iter().map(|k| client.fetch(addr, k))).await;
        peer.await.unwrap();
        let (mut answered, mut refused) = (0, 0);
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(Some(record)) => {
                    assert_eq!(record.single().unwrap().key(), keys[i]);
                    answered += 1;
                }
                Err(PeerError::Refused { .. }) => refused += 1,
                other => panic!("k{i}: {other:?}"),
            }
        }
        assert_eq!((answered, refused), (3, 3));
    }

    /// What a peer that says it takes `features` (if anything) receives
    /// when sent `request`.
    async fn as_received(request: Request, features: Option<&'static str>) -> Request {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (received, taken) = std::sync::mpsc::channel();
        let peer = tokio::spawn(fake_peer(listener, features, 1, move |frames, _| {
            received
                .send(Request::decode(frames[0].kind, &frames[0].body).unwrap())
                .unwrap();
        }));
        // The fake peer closes without answering: the error is expected.
        let _ = client().send(addr, 1, &request, None).await;
        peer.await.unwrap();
        taken.recv().unwrap()
    }

    /// A `Set` naming a keeper, as a peer taking `features` receives it.
    async fn set_as_received(features: Option<&'static str>) -> Request {
        let request = Request::Set {
            key: "k".into(),
            write: crate::exec::Write {
                value: Bytes::from_static(b"1"),
                ttl: None,
                tags: vec![],
            },
            keeper: Some("node-1".into()),
        };
        as_received(request, features).await
    }

    #[tokio::test]
    async fn a_keeper_is_named_only_to_a_peer_that_takes_one() {
        let Request::Set { keeper, .. } = set_as_received(None).await else {
            panic!("a set");
        };
        assert_eq!(keeper, None, "sent to a peer that predates keepers");
        let Request::Set { keeper, .. } = set_as_received(Some("something-else, set-keeper")).await
        else {
            panic!("a set");
        };
        assert_eq!(keeper.as_deref(), Some("node-1"));
    }

    /// `Newer` goes only to a peer that said it takes it; a node that
    /// predates it gets a `Fetch` for the key, whose answer (its copy or
    /// none) is one `Newer` may get.
    #[tokio::test]
    async fn newer_is_asked_only_of_a_peer_that_takes_it() {
        use crate::peer::protocol::HeldCopy;
        let newer = Request::Newer {
            key: "k".into(),
            node: "node-1".into(),
            held: Some(HeldCopy {
                version: 5,
                tags: vec!["red".into()],
            }),
        };
        assert_eq!(
            as_received(newer.clone(), Some("set-keeper")).await,
            Request::Fetch { key: "k".into() },
            "sent to a peer that predates it"
        );
        assert_eq!(
            as_received(newer.clone(), Some(crate::peer::FEATURES)).await,
            newer
        );
    }
}

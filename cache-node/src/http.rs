//! The HTTP/1.1 listener: accepts connections, serves a [`Service`] (the
//! API's dispatcher) on each, bounds what a client can make a connection
//! cost, hands connections that upgrade (peer connections) on, and drains
//! connections on shutdown. It knows nothing of the routes.
//!
//! This is hyper's HTTP/1.1 connection driven directly, for speed and for
//! bounds: hyper-util's "auto" connection sniffs every connection for
//! HTTP/2 and writes responses with `writev`; the cache speaks HTTP/1.1
//! only, and a cache response is small enough that copying headers and
//! body into one buffer and issuing one `write` is cheaper.
//!
//! The bounds, each a setting of [`HttpSettings`]:
//! * connections: the accept loop waits for a free slot, leaving the rest in
//!   the kernel's backlog; a connection that upgrades keeps its slot;
//! * the request head: hyper refuses one larger than `max_header_bytes` or
//!   with more than `max_headers` fields with 431, and closes. hyper writes
//!   that answer itself, before any request exists to route, and gives it no
//!   body; so do its 400 (a request line or header that is not HTTP) and 414
//!   (a URI over 64 KiB). The socket wrapper recognises those bodiless
//!   answers on their way out and sends a JSON `{"error": ...}` answer with
//!   the same status in their place (see [`hyper_refusal`]); hyper stays
//!   the one that bounds the bytes buffered;
//! * time, in three separate clocks, all kept by a per-connection watchdog
//!   (see [`Phase`]; no timer per request): the head must arrive within
//!   `header_read_timeout` (else a JSON 408 if any of it arrived, and the
//!   connection closes), a request must be answered within `request_timeout`
//!   of its head (else a JSON 408 and the connection closes), and a
//!   connection idle between requests for `idle_timeout` is closed without a
//!   word (there is no request to answer). hyper has a header timeout of its
//!   own, but its clock also runs while a keep-alive connection sits idle,
//!   which makes the two one setting; it is turned off here in favour of the
//!   watchdog.
//!
//! TLS (the client API with `--tls-cert-file`, the peer API with mutual
//! TLS): the handshake runs in the connection's task under the header clock
//! (`header_read_timeout`), so a client that stalls it holds its connection
//! slot no longer than one that stalls a request head, and never holds up
//! the accept loop. A connection whose first byte is not a TLS handshake
//! record (plain HTTP sent to a TLS port) gets a JSON 400 saying so, in
//! plain text since it speaks no TLS, and is closed. After the handshake
//! everything above applies unchanged: the bounds sit on the decrypted
//! stream.
//!
//! What still leaves without a JSON answer: a connection that sent nothing
//! before its header clock ran out, or whose head timed out while an earlier
//! answer was still stuck in the socket (a client that does not read); a
//! refusal hyper queued behind an earlier answer it could not flush (same);
//! and an HTTP/2 preface, which hyper drops without an answer.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::http::{HeaderValue, Request, StatusCode, header};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::ServerTls;

/// An answer: always a complete body (cache answers are small and whole).
pub type Response = hyper::Response<Full<Bytes>>;

/// An answer that will take a while (it awaits a body or a peer).
pub type Pending = Pin<Box<dyn Future<Output = Response> + Send>>;

/// What a service made of a request.
pub enum Dispatch {
    /// Answered at once (a read served from this node's store, a refusal).
    Now(Response),
    /// Being answered by a future that the connection awaits under the
    /// request's deadline.
    Later(Pending),
}

/// What serves requests: the API's dispatcher.
pub trait Service: Clone + Send + Sync + 'static {
    /// What the service keeps for each connection, made when the connection
    /// is accepted and dropped with it (the API: what the connection has
    /// been told of the ring epoch).
    type PerConnection: Default + Send + Sync + 'static;

    fn call(&self, request: Request<Incoming>, conn: &Conn<Self::PerConnection>) -> Dispatch;
}

/// What a service may know of the connection a request came on, and what it
/// keeps for it (`T`).
pub struct Conn<T> {
    slot: Arc<OwnedSemaphorePermit>,
    /// The certificate the client presented in the TLS handshake (already
    /// verified against the listener's client CA), when it did.
    peer_certificate: Option<CertificateDer<'static>>,
    /// Shared, so that an answer that takes a while can still reach it.
    kept: Arc<T>,
}

/// A connection's place among the listener's `max_connections`: held by
/// whatever serves the connection after an upgrade, so an upgraded
/// connection counts as long as it lives.
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl<T> Conn<T> {
    pub fn keep_slot(&self) -> ConnectionSlot {
        ConnectionSlot(self.slot.clone())
    }

    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.peer_certificate.as_ref()
    }

    /// What the service keeps for this connection.
    pub fn kept(&self) -> &Arc<T> {
        &self.kept
    }
}

/// A connection's socket: plain TCP, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The connection of a request answered `101 Switching Protocols`, once
/// hyper hands it over: the socket, and what was read past the request.
pub async fn upgraded(request: Request<Incoming>) -> io::Result<(Stream, Bytes)> {
    let upgraded = hyper::upgrade::on(request)
        .await
        .map_err(|e| io::Error::other(format!("upgrade failed: {e}")))?;
    let parts = upgraded
        .downcast::<TokioIo<Watched>>()
        .map_err(|_| io::Error::other("upgraded connection of an unexpected type"))?;
    Ok((parts.io.into_inner().stream, parts.read_buf))
}

/// hyper parses up to this many header fields into a stack array; asking for
/// any other count moves them to the heap on every request (~5% throughput).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Connection-level settings.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// A request's head must arrive within this long: from accept for the
    /// first request of a connection, from its first byte for later ones.
    pub header_read_timeout: Duration,
    /// A request must be answered within this long of its head arriving
    /// (body reading and handling included).
    pub request_timeout: Duration,
    /// A connection with no request in progress and no bytes moving for this
    /// long is closed.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests before giving up.
    pub drain_timeout: Duration,
}

/// Serves `service` on `listener` until `shutdown` fires, then stops
/// accepting and lets in-flight requests finish (closing idle keep-alive
/// connections at once). Every connection task, upgraded ones included,
/// is spawned on `tracker`, which the caller waits on. With `tls`, every
/// connection starts with a handshake under the config current at accept.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: S,
    settings: HttpSettings,
    tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = http1::Builder::new();
    builder
        .writev(false)
        .keep_alive(true)
        .timer(TokioTimer::new())
        // The watchdog keeps this clock (see the module comment).
        .header_read_timeout(None)
        .max_header_size(settings.max_header_bytes);
    if settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.max_headers(settings.max_headers);
    }
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));

    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or a connection reset before
                    // accept: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        crate::tcp::tune(&stream);
        let shutdown = shutdown.clone();
        let service = service.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let (stream, peer_certificate) = match tls {
                None => (Stream::Plain(stream), None),
                Some(tls) => {
                    let handshake = tls_handshake(stream, &tls, settings.header_read_timeout);
                    let accepted = tokio::select! {
                        accepted = handshake => accepted,
                        _ = shutdown.cancelled() => return,
                    };
                    match accepted {
                        Ok(stream) => {
                            let certificate = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .map(|c| c.clone().into_owned());
                            (Stream::Tls(Box::new(stream)), certificate)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                    }
                }
            };
            let activity = Arc::new(Activity::new());
            let io = Watched {
                stream,
                activity: activity.clone(),
                settings,
                write_backlog: false,
                replacement: Vec::new(),
                replacement_sent: 0,
            };
            let service = Tracked {
                inner: service,
                conn: Conn {
                    slot: Arc::new(permit),
                    peer_certificate,
                    kept: Arc::default(),
                },
                activity: activity.clone(),
                request_timeout: settings.request_timeout,
            };
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = &mut conn => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = shutdown.cancelled(), if !draining => {
                        // Finish the request in flight, if any, then close;
                        // an idle keep-alive connection closes at once.
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    why = watchdog(&activity, &settings) => {
                        tracing::debug!(why = why.as_str(), "closing connection");
                        if why == Expired::Head && activity.head_started() {
                            // Part of a head came and the rest did not: answer
                            // 408. hyper is waiting for bytes; polled once more,
                            // its next read finds the flag, writes the answer on
                            // the socket and reports end of stream (see
                            // `Watched::poll_read`).
                            activity.head_timed_out.store(true, Ordering::Relaxed);
                            std::future::poll_fn(|cx| {
                                let _ = conn.as_mut().poll(cx);
                                Poll::Ready(())
                            })
                            .await;
                        }
                        // Dropping the connection closes the socket. Nothing is
                        // in flight (a request in flight keeps the phase busy,
                        // and its clock ends in a 408, not here).
                        break;
                    }
                }
            }
        });
    }
    drop(listener);
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Accepts TLS on `stream` with the config current now, within `timeout`
/// (a client that stalls the handshake is dropped). A client that speaks
/// plain HTTP instead gets a JSON 400 in plain HTTP, and the connection
/// closes.
async fn tls_handshake(
    mut stream: TcpStream,
    tls: &ServerTls,
    timeout: Duration,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the handshake",
            ));
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            // Take what was sent (so closing does not reset the connection
            // under the answer), answer, close.
            let mut sent = vec![0u8; 16 * 1024];
            let _ = stream.read(&mut sent).await;
            let answer = error_answer(
                StatusCode::BAD_REQUEST,
                "this port serves HTTPS (TLS): plain HTTP is not accepted here; connect with https://",
            );
            stream.write_all(&answer).await?;
            let _ = stream.shutdown().await;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "plain HTTP on a TLS port",
            ));
        }
        tokio_rustls::TlsAcceptor::from(tls.current())
            .accept(stream)
            .await
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake not completed within {}",
                    humantime::format_duration(timeout)
                ),
            )
        })?
}

/// What a connection is doing, which decides the clock that applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request's head since this instant: accept for the first
    /// request, the first byte for later ones. `header_read_timeout` applies.
    /// `started`: some of it has arrived (always so after the first request).
    Head { since: Instant, started: bool },
    /// `count` requests are being served (their heads have arrived and the
    /// router has not answered yet; hyper serves one at a time, but counting
    /// keeps the phase right whatever order it drops and starts them in),
    /// the latest since `since`. `request_timeout` applies, counted from
    /// `since`: no request is cut off before its own deadline, and were
    /// there two at once, the earlier would run to the later one's.
    /// (hyper's HTTP/1 server never has two: it drops a request's future
    /// before it calls the service for the next.)
    Busy { count: usize, since: Instant },
    /// Between requests, with no bytes read or written since this instant.
    /// `idle_timeout` applies.
    Idle(Instant),
}

/// A connection's [`Phase`], shared by its socket (bytes moving), its
/// service (requests starting and finishing) and its watchdog. Uncontended:
/// only one connection's tasks touch it.
///
/// The watchdog keeps the request clock too, rather than a timer per
/// request: a request that waits (for its body, for a peer's answer) would
/// register a timer in tokio's wheel and remove it again, and every poll
/// would poll it; the watchdog's one timer per connection is there anyway.
/// A request past its deadline learns it from a flag the watchdog sets.
/// That flag needs no waker: the requests' futures are polled by hyper
/// inside the connection, in the connection's task, the watchdog's own,
/// so the watchdog wakes its own task and the request answers 408 when
/// hyper polls it next. (hyper 1.12's HTTP/1 dispatcher polls the request
/// in flight on every poll of the connection while it has no answer bytes
/// queued, which `writev(false)`, a flattened write buffer, ensures; the
/// test `a_body_dripped_a_byte_at_a_time_gets_408` in `tests/hostile.rs`,
/// whose second request's body never comes and so never wakes the task,
/// fails if that changes.)
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    /// Set by the watchdog when a head ran out of time, for the socket to
    /// answer 408 on hyper's next read.
    head_timed_out: AtomicBool,
    /// Set by the watchdog when the requests being served ran out of time,
    /// for each to answer 408 when next polled; cleared by the next request.
    request_overdue: AtomicBool,
}

/// What the watchdog found when it looked at a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// The connection overstayed this clock: it closes.
    Expired(Expired),
    /// The requests being served just became overdue.
    Overdue,
    /// Nothing is due before this instant.
    Until(Instant),
    /// Nothing is due (the requests, overdue, are being answered).
    Nothing,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
                started: false,
            }),
            head_timed_out: AtomicBool::new(false),
            request_overdue: AtomicBool::new(false),
        }
    }

    /// Bytes arrived: between requests, they start the next request's head.
    /// (During a request they are its body; during a head, more of it.)
    fn on_read(&self) {
        let mut phase = self.phase.lock();
        match *phase {
            Phase::Idle(_) => {
                *phase = Phase::Head {
                    since: Instant::now(),
                    started: true,
                }
            }
            Phase::Head {
                ref mut started, ..
            } => *started = true,
            Phase::Busy { .. } => {}
        }
    }

    /// Part of a head has arrived and the request has not started.
    fn head_started(&self) -> bool {
        matches!(*self.phase.lock(), Phase::Head { started: true, .. })
    }

    /// Bytes left: an answer still being written is not idleness.
    fn on_write(&self) {
        let mut phase = self.phase.lock();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Idle(Instant::now());
        }
    }

    fn request_started(&self) {
        let mut phase = self.phase.lock();
        let count = match *phase {
            Phase::Busy { count, .. } => count + 1,
            _ => 1,
        };
        *phase = Phase::Busy {
            count,
            since: Instant::now(),
        };
        self.request_overdue.store(false, Ordering::Relaxed);
    }

    /// A request answered as soon as its head arrived: the connection is
    /// idle again (unless an earlier request is still being served).
    fn request_answered(&self) {
        let mut phase = self.phase.lock();
        if !matches!(*phase, Phase::Busy { .. }) {
            *phase = Phase::Idle(Instant::now());
        }
    }

    fn request_finished(&self) {
        let mut phase = self.phase.lock();
        *phase = match *phase {
            Phase::Busy { count, since } if count > 1 => Phase::Busy {
                count: count - 1,
                since,
            },
            _ => Phase::Idle(Instant::now()),
        };
    }

    /// What is due at `now` by the clock of the connection's phase. Requests
    /// past their deadline are marked overdue (their 408 answer closes the
    /// connection), once.
    fn check(&self, now: Instant, settings: &HttpSettings) -> Found {
        let (deadline, expired) = match *self.phase.lock() {
            Phase::Head { since, .. } => (since + settings.header_read_timeout, Expired::Head),
            Phase::Idle(since) => (since + settings.idle_timeout, Expired::Idle),
            Phase::Busy { since, .. } => {
                let deadline = since + settings.request_timeout;
                if deadline > now {
                    return Found::Until(deadline);
                }
                return match self.request_overdue.swap(true, Ordering::Relaxed) {
                    false => Found::Overdue,
                    true => Found::Nothing,
                };
            }
        };
        if deadline <= now {
            return Found::Expired(expired);
        }
        Found::Until(deadline)
    }
}

/// Which clock a connection overstayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Head,
    Idle,
}

impl Expired {
    fn as_str(self) -> &'static str {
        match self {
            Expired::Head => "header read timeout",
            Expired::Idle => "idle timeout",
        }
    }
}

/// Completes when the connection has overstayed the head or idle clock,
/// naming which; requests that overstay theirs are told so on the way (see
/// [`Activity`]). Activity only updates the shared phase and never
/// touches a timer; the watchdog reads the phase when it wakes. It wakes at
/// the current phase's deadline or after the shortest of the three clocks,
/// whichever comes first, so a phase change to a shorter clock (a long
/// header clock giving way to a short idle one, or a request starting) is
/// noticed in time, at the cost of one wake-up per clock period at most.
async fn watchdog(activity: &Activity, settings: &HttpSettings) -> Expired {
    let recheck = settings
        .header_read_timeout
        .min(settings.idle_timeout)
        .min(settings.request_timeout);
    loop {
        let now = Instant::now();
        let wake = match activity.check(now, settings) {
            Found::Expired(why) => return why,
            Found::Until(deadline) => deadline.min(now + recheck),
            Found::Overdue => {
                // This task polls the requests: woken, it lets hyper poll
                // them again, and they answer 408.
                tokio::task::yield_now().await;
                now + recheck
            }
            Found::Nothing => now + recheck,
        };
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// The socket, reporting bytes moving to the connection's [`Activity`], and
/// answering in JSON where hyper would answer without a body: its own
/// refusals of a head (see [`hyper_refusal`]) and a head that ran out of
/// time (see [`Activity::head_timed_out`]).
struct Watched {
    stream: Stream,
    activity: Arc<Activity>,
    settings: HttpSettings,
    /// The last write did not take everything it was given: hyper still
    /// holds part of an answer, and nothing may be written past it.
    write_backlog: bool,
    /// An answer written in place of hyper's bodiless one, and how much of
    /// it has gone; empty when there is none.
    replacement: Vec<u8>,
    replacement_sent: usize,
}

impl Watched {
    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.replacement_sent < self.replacement.len() {
            let rest = &self.replacement[self.replacement_sent..];
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.replacement_sent += n;
        }
        self.replacement = Vec::new();
        self.replacement_sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.activity.head_timed_out.load(Ordering::Relaxed) {
            // Polled by the watchdog's last poll of the connection: answer
            // 408 unless an earlier answer is still on its way (this one
            // would land inside it), then end the stream; hyper drops a
            // partial head at end of stream without answering itself.
            if !self.write_backlog && self.replacement.is_empty() {
                let answer = error_answer(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "request head not received within {}",
                        humantime::format_duration(self.settings.header_read_timeout)
                    ),
                );
                // Small, and the socket has nothing queued: one write, and
                // whatever does not fit is dropped with the connection.
                let _ = Pin::new(&mut self.stream).poll_write(cx, &answer);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.replacement.is_empty() {
            ready!(self.poll_replacement(cx))?;
        }
        if let Some((at, status)) = hyper_refusal(buf) {
            // Sent in hyper's place: whatever precedes the refusal (an
            // earlier answer in the same buffer), then the JSON answer.
            let mut replacement = buf[..at].to_vec();
            replacement.extend_from_slice(&refusal_answer(status, &self.settings));
            self.replacement = replacement;
            self.replacement_sent = 0;
            if let Poll::Ready(Err(e)) = self.poll_replacement(cx) {
                return Poll::Ready(Err(e));
            }
            // The rest goes out on the flush hyper makes next.
            return Poll::Ready(Ok(buf.len()));
        }
        let written = match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(Ok(written)) => written,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                self.write_backlog = true;
                return Poll::Pending;
            }
        };
        self.write_backlog = written < buf.len();
        if written > 0 {
            self.activity.on_write();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Finds an answer hyper wrote itself at the end of `buf`: where it starts
/// and its status. hyper answers a head it cannot accept (400 not HTTP, 414
/// URI over 64 KiB, 431 over `max_header_bytes` or `max_headers`) with
/// exactly a status line, `connection: close`, `content-length: 0` and
/// `date`, and nothing else; every answer the router makes has a JSON body
/// and a content type, so it never looks like that. (Only a cached value
/// could contain those bytes, and then only split by a partial write at
/// exactly that point, and it would only be that client's own answer
/// changing.)
fn hyper_refusal(buf: &[u8]) -> Option<(usize, StatusCode)> {
    const LONGEST: usize = 160;
    // Cheap first: every answer with a body ends in its body.
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let tail_from = buf.len().saturating_sub(LONGEST);
    let at = tail_from + find_last(&buf[tail_from..], b"HTTP/1.1 4")?;
    let head = &buf[at..];
    let status = match &head[9..13.min(head.len())] {
        b"400 " => StatusCode::BAD_REQUEST,
        b"414 " => StatusCode::URI_TOO_LONG,
        b"431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let lines = head[..head.len() - 4].split(|&b| b == b'\n').skip(1);
    let mut fields = 0;
    for line in lines {
        let line = line
            .strip_suffix(b"\r")
            .unwrap_or(line)
            .to_ascii_lowercase();
        match &line[..] {
            b"connection: close" | b"content-length: 0" => fields += 1,
            l if l.starts_with(b"date: ") => {}
            _ => return None,
        }
    }
    (fields == 2).then_some((at, status))
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// The JSON answer sent in place of hyper's refusal with `status`.
fn refusal_answer(status: StatusCode, settings: &HttpSettings) -> Vec<u8> {
    let message = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
            "request head too large: at most {} bytes of request line and headers, and {} header fields",
            settings.max_header_bytes, settings.max_headers
        ),
        StatusCode::URI_TOO_LONG => "request URI too long".to_owned(),
        _ => "malformed HTTP request".to_owned(),
    };
    error_answer(status, &message)
}

/// A complete HTTP/1.1 answer `{"error": message}` that closes the
/// connection, as bytes for the socket.
fn error_answer(status: StatusCode, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// The service as a connection's hyper service: marks the connection busy
/// while a request is served, which starts its clock (kept by the watchdog).
struct Tracked<S: Service> {
    inner: S,
    conn: Conn<S::PerConnection>,
    activity: Arc<Activity>,
    request_timeout: Duration,
}

impl<S: Service> hyper::service::Service<Request<Incoming>> for Tracked<S> {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<std::future::Ready<Result<Response, Infallible>>, Deadline<Pending>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        match self.inner.call(request, &self.conn) {
            Dispatch::Now(response) => {
                // Served without waiting on anything: no deadline to keep.
                self.activity.request_answered();
                Either::Left(std::future::ready(Ok(response)))
            }
            Dispatch::Later(pending) => {
                self.activity.request_started();
                Either::Right(Deadline {
                    inner: pending,
                    timeout: self.request_timeout,
                    busy: Busy(self.activity.clone()),
                })
            }
        }
    }
}

/// Marks the connection idle again when its request is answered, or dropped
/// (the connection closing mid-request).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

pin_project! {
    /// A request's handling (body reading included: the handlers read the
    /// body themselves), cut off with a JSON 408 once the watchdog finds it
    /// overdue.
    struct Deadline<F> {
        #[pin]
        inner: F,
        timeout: Duration,
        busy: Busy,
    }
}

impl<F> Future for Deadline<F>
where
    F: Future<Output = Response>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            return Poll::Ready(Ok(response));
        }
        // No waker to register: see `Activity`.
        if this.busy.0.request_overdue.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(timed_out(*this.timeout)));
        }
        Poll::Pending
    }
}

/// The answer to a request that ran out of time. The connection closes after
/// it: the client may be part-way through a body that nobody will read.
fn timed_out(timeout: Duration) -> Response {
    let body = serde_json::json!({
        "error": format!(
            "request not completed within {}",
            humantime::format_duration(timeout)
        )
    })
    .to_string();
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSAL_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 21:42:10 GMT\r\n\r\n";

    fn settings(request_timeout: Duration) -> HttpSettings {
        HttpSettings {
            max_connections: 1,
            max_header_bytes: 1024,
            max_headers: 10,
            header_read_timeout: Duration::from_secs(5),
            request_timeout,
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(1),
        }
    }

    fn busy_since(activity: &Activity) -> Instant {
        match *activity.phase.lock() {
            Phase::Busy { since, .. } => since,
            other => panic!("not busy: {other:?}"),
        }
    }

    #[test]
    fn a_request_is_overdue_from_its_own_start_once() {
        let settings = settings(Duration::from_secs(10));
        let activity = Activity::new();
        let overdue = || activity.request_overdue.load(Ordering::Relaxed);

        activity.request_started();
        let since = busy_since(&activity);
        // Before its deadline the watchdog waits for it; the head clock,
        // shorter and long run out, does not apply to a request.
        let deadline = since + Duration::from_secs(10);
        assert_eq!(
            activity.check(since + Duration::from_secs(9), &settings),
            Found::Until(deadline)
        );
        assert!(!overdue());
        // At it, the request is overdue, found so once (the watchdog wakes
        // the task once); the connection is not closed by the watchdog
        // (the 408 answer closes it).
        assert_eq!(activity.check(deadline, &settings), Found::Overdue);
        assert!(overdue());
        assert_eq!(
            activity.check(deadline + Duration::from_secs(1), &settings),
            Found::Nothing
        );

        // Answered, the connection is idle under the idle clock, and the
        // next request has a clock of its own, not the last one's.
        activity.request_finished();
        let Phase::Idle(idle) = *activity.phase.lock() else {
            panic!("answered: idle");
        };
        assert_eq!(
            activity.check(idle, &settings),
            Found::Until(idle + Duration::from_secs(60))
        );
        activity.request_started();
        assert!(!overdue());
        let next = busy_since(&activity);
        assert!(next >= since);
        assert_eq!(
            activity.check(next, &settings),
            Found::Until(next + Duration::from_secs(10))
        );
    }

    #[test]
    fn the_head_and_idle_clocks_close_the_connection() {
        let settings = settings(Duration::from_secs(10));
        let activity = Activity::new();
        let Phase::Head { since, .. } = *activity.phase.lock() else {
            panic!("a new connection waits for a head");
        };
        assert_eq!(
            activity.check(since + Duration::from_secs(4), &settings),
            Found::Until(since + Duration::from_secs(5))
        );
        assert_eq!(
            activity.check(since + Duration::from_secs(5), &settings),
            Found::Expired(Expired::Head)
        );
        activity.request_answered();
        let Phase::Idle(since) = *activity.phase.lock() else {
            panic!("answered at once: idle");
        };
        assert_eq!(
            activity.check(since + Duration::from_secs(60), &settings),
            Found::Expired(Expired::Idle)
        );
    }

    #[test]
    fn hyper_refusals_are_recognised_alone_and_after_an_answer() {
        assert_eq!(
            hyper_refusal(REFUSAL_431),
            Some((0, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
        );
        for (code, status) in [
            ("400 Bad Request", StatusCode::BAD_REQUEST),
            ("414 URI Too Long", StatusCode::URI_TOO_LONG),
        ] {
            let head = format!(
                "HTTP/1.1 {code}\r\ncontent-length: 0\r\nconnection: close\r\ndate: x\r\n\r\n"
            );
            assert_eq!(hyper_refusal(head.as_bytes()), Some((0, status)));
        }
        let mut pipelined =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec();
        let at = pipelined.len();
        pipelined.extend_from_slice(REFUSAL_431);
        assert_eq!(
            hyper_refusal(&pipelined),
            Some((at, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
        );
    }

    #[test]
    fn the_routers_answers_are_never_taken_for_refusals() {
        for answer in [
            // Ours: a JSON body and a content type.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"error\":\"x\"}"[..],
            // An answer to HEAD: the head alone, with its content type.
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            // Statuses hyper does not refuse with, or a missing field.
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 4\r\n\r\n",
            b"\r\n\r\n",
            b"",
        ] {
            assert_eq!(
                hyper_refusal(answer),
                None,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn error_answers_are_complete_json_answers_that_close() {
        let answer = error_answer(StatusCode::REQUEST_TIMEOUT, "too \"slow\"");
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "too \"slow\"");
    }
}

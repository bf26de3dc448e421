//! The HTTP/1.1 listener: accepts connections, serves the router on each,
//! bounds what a client can make a connection cost, and drains connections on
//! shutdown.
//!
//! This replaces `axum::serve` for speed and for bounds. `axum::serve` runs
//! hyper-util's "auto" connection, which sniffs every connection for HTTP/2
//! and writes responses with `writev`; the cache speaks HTTP/1.1 only, and a
//! cache response is small enough that copying headers and body into one
//! buffer and issuing one `write` is cheaper.
//!
//! The bounds, each a setting of [`HttpSettings`]:
//! * connections: the accept loop waits for a free slot, leaving the rest in
//!   the kernel's backlog;
//! * the request head: hyper refuses one larger than `max_header_bytes` or
//!   with more than `max_headers` fields with a bare 431 and closes (hyper
//!   writes that answer itself, before any request exists to route, so it has
//!   no JSON body);
//! * time, in three separate clocks, kept by a per-connection watchdog and a
//!   per-request deadline (see [`Phase`]): the head must arrive within
//!   `header_read_timeout`, a request must be answered within
//!   `request_timeout` of its head (else a JSON 408 and the connection
//!   closes), and a connection idle between requests for `idle_timeout` is
//!   closed. hyper has a header timeout of its own, but its clock also runs
//!   while a keep-alive connection sits idle, which makes the two one
//!   setting; it is turned off here in favour of the watchdog.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::api::ApiError;

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

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting, lets in-flight requests finish (closing idle keep-alive
/// connections at once) and returns when all are done or the drain timeout
/// passes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()>,
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
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
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
            _ = &mut shutdown => break,
        };
        // Responses are small and written whole; don't let Nagle delay them.
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = Watched {
            stream,
            activity: activity.clone(),
        };
        let service = Tracked {
            inner: TowerToHyperService::new(app.clone()),
            activity: activity.clone(),
            request_timeout: settings.request_timeout,
        };
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                why = watchdog(&activity, &settings) => {
                    // Dropping the connection closes the socket. Nothing is
                    // in flight (a request in flight is the deadline's).
                    tracing::debug!(why, "closing connection");
                }
            }
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(settings.drain_timeout) => {
            tracing::warn!(timeout = ?settings.drain_timeout, "in-flight requests did not finish in time");
        }
    }
}

/// What a connection is doing, which decides the clock that applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request's head since this instant: accept for the first
    /// request, the first byte for later ones. `header_read_timeout` applies.
    Head(Instant),
    /// This many requests are being served (their heads have arrived and the
    /// router has not answered yet; hyper serves one at a time, but counting
    /// keeps the phase right whatever order it drops and starts them in).
    /// Each request's own deadline applies.
    Busy(usize),
    /// Between requests, with no bytes read or written since this instant.
    /// `idle_timeout` applies.
    Idle(Instant),
}

/// A connection's [`Phase`], shared by its socket (bytes moving), its
/// service (requests starting and finishing) and its watchdog. Uncontended:
/// only one connection's tasks touch it.
#[derive(Debug)]
struct Activity(Mutex<Phase>);

impl Activity {
    fn new() -> Self {
        Self(Mutex::new(Phase::Head(Instant::now())))
    }

    /// Bytes arrived: between requests, they start the next request's head.
    /// (During a request they are its body; during a head, more of it.)
    fn on_read(&self) {
        let mut phase = self.0.lock();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
        }
    }

    /// Bytes left: an answer still being written is not idleness.
    fn on_write(&self) {
        let mut phase = self.0.lock();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Idle(Instant::now());
        }
    }

    fn request_started(&self) {
        let mut phase = self.0.lock();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
    }

    fn request_finished(&self) {
        let mut phase = self.0.lock();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
    }

    fn phase(&self) -> Phase {
        *self.0.lock()
    }
}

/// Completes when the connection has overstayed the clock of its phase,
/// naming which. Activity only updates the shared phase and never touches a
/// timer; the watchdog reads the phase when it wakes. It wakes at the current
/// phase's deadline or after the shorter of the two clocks, whichever comes
/// first, so a phase change to a shorter clock (a long header clock giving
/// way to a short idle one) is noticed in time, at the cost of one wake-up per
/// clock period at most.
async fn watchdog(activity: &Activity, settings: &HttpSettings) -> &'static str {
    let recheck = settings.header_read_timeout.min(settings.idle_timeout);
    loop {
        let now = Instant::now();
        let expiry = match activity.phase() {
            Phase::Head(since) => {
                Some((since + settings.header_read_timeout, "header read timeout"))
            }
            Phase::Idle(since) => Some((since + settings.idle_timeout, "idle timeout")),
            // The request's deadline bounds it.
            Phase::Busy(_) => None,
        };
        let mut wake = now + recheck;
        if let Some((deadline, why)) = expiry {
            if deadline <= now {
                return why;
            }
            wake = wake.min(deadline);
        }
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// The socket, reporting bytes moving to the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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
        let written = ready!(Pin::new(&mut self.stream).poll_write(cx, buf))?;
        if written > 0 {
            self.activity.on_write();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router as a connection's hyper service: marks the connection busy
/// while a request is served and gives each request its deadline.
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    request_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Deadline<
        <TowerToHyperService<Router> as hyper::service::Service<Request<Incoming>>>::Future,
    >;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.request_started();
        Deadline {
            inner: self.inner.call(request),
            sleep: tokio::time::sleep(self.request_timeout),
            timeout: self.request_timeout,
            _busy: Busy(self.activity.clone()),
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
    /// body themselves), cut off at its deadline with a JSON 408.
    struct Deadline<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: tokio::time::Sleep,
        timeout: Duration,
        _busy: Busy,
    }
}

impl<F> Future for Deadline<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            return Poll::Ready(response);
        }
        ready!(this.sleep.poll(cx));
        Poll::Ready(Ok(timed_out(*this.timeout)))
    }
}

/// The answer to a request that ran out of time. The connection closes after
/// it: the client may be part-way through a body that nobody will read.
fn timed_out(timeout: Duration) -> Response<Body> {
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "request not completed within {}",
            humantime::format_duration(timeout)
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

//! The peer server: serves one upgraded peer connection, reading request
//! frames, handing each to the node's [`Handler`] and writing the answers
//! back through an [`Outbox`] (so answers ready together leave together).
//!
//! What a handler can answer at once (a read from the store, a progress
//! report) is answered inline, in the order read; what must wait (a write
//! that replicates before answering) runs as a task of its own and answers
//! whenever it is done, unless its first poll, made inline, finishes it.
//! The handler does the part it can at once as the request is read (a
//! write is applied to the store then, so later requests on the
//! connection see it; the first poll then encodes its replications, and a
//! delete is applied), which holds up the requests behind it for that
//! long: at most one value of the message limit, copied a few times.
//! Requests that act on ownership are refused with `Misdirected` when the
//! sender's ring epoch differs from this node's, here, in one place, before
//! any handler sees them.
//!
//! Bounds: frames above the message limit end the connection (nothing past
//! a bad length can be trusted); at most [`MAX_IN_FLIGHT`] requests are
//! being handled at once and at most [`MAX_OUTBOX_BYTES`] of answers wait
//! to be written (and the answers of the requests already being handled),
//! after which the connection stops reading, which slows the sender
//! instead of growing this node's memory; still within its idle close and
//! shutdown.
//!
//! Shutdown: the server stops reading, sends a `GOING_AWAY` frame naming
//! the last request it read, answers everything up to it (within the drain
//! time) and closes. The client fails the requests it sent after that one
//! as never read, so they may safely go elsewhere.
//!
//! Idle connections: the client closes a connection it has not used for
//! `client::IDLE_CLOSE`. A client that stops using one without closing it
//! (its process stalled, or it stopped reading, or it is gone behind a
//! partition that TCP has not yet found out, see `crate::tcp`) would hold
//! it here for good. So the server closes a connection too, the same way as
//! on shutdown, once it has moved nothing (no byte read, no batch of
//! answers written) for [`IDLE_CLOSE`] with no request being handled. It
//! checks every half of [`IDLE_CLOSE`], so it closes between one and one
//! and a half times that after the last movement. A writer stuck on a peer
//! that never reads is then stopped after the drain time rather than left
//! waiting.
//!
//! A handler that panics (a bug) ends its connection: one that panics
//! while the loop polls it unwinds the loop, and the outbox is closed on
//! the way (see `CloseOnDrop`), so the socket closes and the client fails
//! what it had in flight as possibly applied; one that panics in a task of
//! its own makes the connection go away as on shutdown, answering the rest.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::frame::{self, FrameCodec, FrameError};
use super::outbox::Outbox;
use super::protocol::{Answer, Request};

/// Most requests of one connection being handled at once.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Most bytes of answers waiting to be written on one connection.
pub const MAX_OUTBOX_BYTES: usize = 16 * 1024 * 1024;
/// How long a connection may carry nothing before this side closes it:
/// well past the client's own idle close, so a client in use never meets it.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// An answer, now or later.
pub enum Reply {
    Now(Answer),
    /// An answer that may have to wait. The connection's reader polls it
    /// once itself, with a waker that does nothing, and moves it to a task
    /// of its own only if it is not ready: so it must register its waker
    /// on every poll (as tokio's primitives do), and do no more than brief
    /// work before it first waits.
    Later(Pin<Box<dyn Future<Output = Answer> + Send>>),
}

/// What a node does with the requests of its peers.
pub trait Handler: Send + Sync + 'static {
    /// The ring epoch this node holds, stamped on every answer.
    fn epoch(&self) -> u64;
    /// Handles one request (already checked against this node's epoch).
    fn handle(self: Arc<Self>, request: Request) -> Reply;
}

/// Serves one peer connection until the peer closes it or `shutdown` fires.
pub async fn serve<H, R, W>(
    read: R,
    mut write: W,
    read_buf: Bytes,
    handler: Arc<H>,
    max_message_bytes: usize,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) where
    H: Handler,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let outbox = Arc::new(Outbox::default());
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let written = outbox.write_to(&mut write, || {}).await;
            if let Err(e) = written {
                tracing::debug!(error = %e, "writing to a peer failed");
            }
            // Whatever ended the writing, nothing more will be written.
            outbox.close();
        })
    };
    let _close = CloseOnDrop(outbox.clone());
    // This connection's own way to go away: a handler that panics in its
    // task cancels it.
    let shutdown = shutdown.child_token();
    let mut frames = FramedRead::new(read, FrameCodec::new(max_message_bytes));
    frames.read_buffer_mut().extend_from_slice(&read_buf);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut last_read = 0;
    // Movement is counted rather than timed, so a frame costs no clock
    // read: frames read, bytes of a frame still arriving, batches written.
    let mut frames_read = 0u64;
    let mut moved_at_check = (0u64, 0usize, 0u64);
    let mut quiet_checks = 0u32;
    let mut idle_check =
        tokio::time::interval_at(tokio::time::Instant::now() + IDLE_CLOSE / 2, IDLE_CLOSE / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let going_away = loop {
        // With too many answers waiting to be written, no frame is read
        // until some are: the peer is slowed down instead of this node's
        // memory growing. The wait is one of the branches below, so a peer
        // that stopped reading still meets the idle close and shutdown.
        let full = outbox.pending_bytes() >= MAX_OUTBOX_BYTES;
        // Biased, frames first: a frame already read is taken without
        // polling the other two, which would each register this task to be
        // woken (the shutdown token's waiter list, the timer) only to be
        // dropped at once, for every frame. The others are still polled
        // whenever no frame is ready: once the frames already buffered (in
        // the codec, or in TLS) are taken, at the latest when tokio's
        // cooperative budget makes a socket read yield.
        let frame = tokio::select! {
            biased;
            frame = frames.next(), if !full => frame,
            () = outbox.wait_below(MAX_OUTBOX_BYTES), if full => continue,
            _ = shutdown.cancelled() => break true,
            _ = idle_check.tick() => {
                let moved = (frames_read, frames.read_buffer().len(), outbox.batches_written());
                // A request being handled keeps the connection. Answers
                // waiting to be written do not by themselves: with no batch
                // written for a whole check, the peer stopped reading.
                let handling = in_flight.available_permits() < MAX_IN_FLIGHT;
                let quiet = moved == moved_at_check && !handling;
                moved_at_check = moved;
                quiet_checks = if quiet { quiet_checks + 1 } else { 0 };
                if quiet_checks >= 2 {
                    tracing::debug!("closing a peer connection idle for {IDLE_CLOSE:?}");
                    break true;
                }
                continue;
            }
        };
        frames_read += 1;
        let frame = match frame {
            Some(Ok(frame)) => frame,
            // A connection that failed (a peer killed or gone, a TLS
            // session cut without close_notify) is not a peer misbehaving.
            Some(Err(FrameError::Io(e))) => {
                tracing::debug!(error = %e, "a peer connection failed");
                break false;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "closing a peer connection that sent a bad frame");
                break false;
            }
            None => break false,
        };
        if outbox.is_closed() {
            break false;
        }
        last_read = frame.id;
        let epoch = handler.epoch();
        let answer = match Request::decode(frame.kind, &frame.body) {
            Err(e) => Answer::refused(400, e.to_string()),
            Ok(request) if request.needs_same_epoch() && frame.epoch != epoch => {
                Answer::Misdirected
            }
            Ok(request) => match handler.clone().handle(request) {
                Reply::Now(answer) => answer,
                // Polled once here first, when a permit is free: what may
                // wait often does not (a write whose only other owner is
                // the keeper that sent it has nothing to replicate), and
                // then costs no task. What does wait goes on in a task of
                // its own with that permit (free still: only this loop
                // takes permits), polled again there with the task's waker.
                // With no permit free nothing is started here: a started
                // future left waiting for one could hold what the requests
                // being handled need (a connection being opened to a peer).
                Reply::Later(mut handling) => {
                    let ready = match in_flight.available_permits() {
                        0 => None,
                        _ => (&mut handling).now_or_never(),
                    };
                    match ready {
                        Some(answer) => answer,
                        None => {
                            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                                break false;
                            };
                            tokio::spawn(answer_later(
                                handling,
                                frame.id,
                                permit,
                                outbox.clone(),
                                handler.clone(),
                                shutdown.clone(),
                            ));
                            continue;
                        }
                    }
                }
            },
        };
        outbox.push(frame.id, epoch, |out| answer.encode(out));
    };
    if going_away {
        outbox.push(last_read, handler.epoch(), |_| frame::GOING_AWAY);
    }
    // Answer what was read before closing.
    let all = u32::try_from(MAX_IN_FLIGHT).expect("a small constant");
    let drained = tokio::time::timeout(drain_timeout, in_flight.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!(
            ?drain_timeout,
            "closing a peer connection with requests still being handled"
        );
    }
    outbox.close();
    // A writer still blocked after the drain time writes to a peer that
    // does not read: stopped, so the connection is freed.
    let mut writer = writer;
    if tokio::time::timeout(drain_timeout, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Answers request `id` once `handling` is done, holding its in-flight
/// `permit` until then. A handler that panics makes the connection go away
/// (`going_away`), as on shutdown.
async fn answer_later<H: Handler>(
    handling: Pin<Box<dyn Future<Output = Answer> + Send>>,
    id: u64,
    permit: OwnedSemaphorePermit,
    outbox: Arc<Outbox>,
    handler: Arc<H>,
    going_away: CancellationToken,
) {
    match AssertUnwindSafe(handling).catch_unwind().await {
        Ok(answer) => {
            outbox.push(id, handler.epoch(), |out| answer.encode(out));
        }
        Err(_) => {
            tracing::error!("a peer request's handler panicked; closing its connection");
            going_away.cancel();
        }
    }
    drop(permit);
}

/// Closes the outbox however the serve loop ends, a handler that panics in
/// it included (unwinding skips the loop's own close): the writer then
/// writes what it holds and ends, closing the socket, so the peer fails the
/// requests in flight on it, instead of sending more to a connection nobody
/// reads and waiting out each one's deadline. (A writer blocked on a peer
/// that does not read is not aborted on this path, as it is after the drain
/// time on the others; it ends when TCP gives up on the peer.)
struct CloseOnDrop(Arc<Outbox>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    use super::*;
    use crate::peer::testing::read_frame;

    /// The key a request asks for when it should take two idle times to
    /// answer.
    const SLOW: &str = "slow";
    /// The key a request asks for when its answer may wait but does not.
    const LATER_AT_ONCE: &str = "later-at-once";
    /// The key a request asks for when its answer waits a little, counting
    /// in [`STARTED`] when its handling starts.
    const COUNTED: &str = "counted";
    /// The keys a request asks for when its handler should panic: at once,
    /// on the first poll of an answer that may wait, or after that answer
    /// has waited (in a task of its own).
    const PANICS: &str = "panics";
    const PANICS_LATER: &str = "panics-later";
    const PANICS_AFTER_WAITING: &str = "panics-after-waiting";
    /// The key a request asks for when its answer should be a MiB.
    const BIG: &str = "big";
    /// How many [`COUNTED`] requests have started being handled.
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Answers that the key is not held here: at once, or for [`SLOW`]
    /// after twice [`IDLE_CLOSE`], or for [`LATER_AT_ONCE`] as an answer
    /// that may wait, ready on its first poll, or for [`COUNTED`] after a
    /// second.
    struct NothingHeld;

    impl Handler for NothingHeld {
        fn epoch(&self) -> u64 {
            1
        }
        fn handle(self: Arc<Self>, request: Request) -> Reply {
            match request {
                Request::Fetch { key } if key == SLOW => Reply::Later(Box::pin(async {
                    tokio::time::sleep(IDLE_CLOSE * 2).await;
                    Answer::Missing
                })),
                Request::Fetch { key } if key == LATER_AT_ONCE => {
                    Reply::Later(Box::pin(async { Answer::Missing }))
                }
                Request::Fetch { key } if key == BIG => {
                    Reply::Now(Answer::refused(500, "x".repeat(1 << 20)))
                }
                Request::Fetch { key } if key == PANICS => panic!("a handler's bug"),
                Request::Fetch { key } if key == PANICS_LATER => {
                    Reply::Later(Box::pin(async { panic!("a handler's bug, later") }))
                }
                Request::Fetch { key } if key == PANICS_AFTER_WAITING => {
                    Reply::Later(Box::pin(async {
                        tokio::task::yield_now().await;
                        panic!("a handler's bug, after waiting")
                    }))
                }
                Request::Fetch { key } if key == COUNTED => Reply::Later(Box::pin(async {
                    STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Answer::Missing
                })),
                _ => Reply::Now(Answer::Missing),
            }
        }
    }

    /// A connection to a server of [`NothingHeld`], from the client's end,
    /// through a pipe that holds `buffer` bytes each way; and the server.
    fn connect_with(buffer: usize) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(buffer);
        let (read, write) = tokio::io::split(server);
        let server = tokio::spawn(serve(
            read,
            write,
            Bytes::new(),
            Arc::new(NothingHeld),
            1 << 20,
            Duration::from_secs(1),
            CancellationToken::new(),
        ));
        (client, server)
    }

    fn connect() -> DuplexStream {
        connect_with(1 << 16).0
    }

    async fn send_fetch_of(conn: &mut DuplexStream, id: u64, key: &str) {
        let mut out = BytesMut::new();
        frame::encode(&mut out, id, 1, |body| {
            Request::Fetch { key: key.into() }.encode(body)
        });
        conn.write_all(&out).await.unwrap();
    }

    async fn send_fetch(conn: &mut DuplexStream, id: u64) {
        send_fetch_of(conn, id, "k").await;
    }

    /// An answer that may wait but is ready on its first poll is answered
    /// inline, in the order the requests were read (no task of its own that
    /// would answer after the requests read with it).
    #[tokio::test]
    async fn a_later_answer_ready_at_once_keeps_the_order_read() {
        let mut conn = connect();
        let mut out = BytesMut::new();
        for (id, key) in [(1, LATER_AT_ONCE), (2, "k"), (3, LATER_AT_ONCE), (4, "k")] {
            frame::encode(&mut out, id, 1, |body| {
                Request::Fetch { key: key.into() }.encode(body)
            });
        }
        conn.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let answer = read_frame(&mut conn, &mut buf).await.expect("an answer");
            assert!(matches!(
                Answer::decode(answer.kind, &answer.body),
                Ok(Answer::Missing)
            ));
            ids.push(answer.id);
        }
        assert_eq!(ids, [1, 2, 3, 4]);
    }

    /// A handler that panics (a bug) ends its connection: the peer sees it
    /// close, and fails what it had in flight on it, rather than wait out
    /// each request's deadline on a connection nobody reads any more.
    #[tokio::test]
    async fn a_handler_that_panics_closes_its_connection() {
        for key in [PANICS, PANICS_LATER, PANICS_AFTER_WAITING] {
            let (mut conn, server) = connect_with(1 << 16);
            let mut buf = BytesMut::new();
            send_fetch(&mut conn, 1).await;
            let answer = read_frame(&mut conn, &mut buf).await.expect("an answer");
            assert_eq!(answer.id, 1);
            send_fetch_of(&mut conn, 2, key).await;
            // Nothing but, from a task's panic, the going-away notice that
            // names the last request read; then the end.
            let closed = async {
                while let Some(frame) = read_frame(&mut conn, &mut buf).await {
                    assert_eq!(frame.kind, frame::GOING_AWAY, "{key}: no answer");
                    assert_eq!(frame.id, 2);
                }
            };
            tokio::time::timeout(Duration::from_secs(10), closed)
                .await
                .unwrap_or_else(|_| panic!("{key}: the connection was left open"));
            // A panic in the loop ends it; one in a task of its own does not.
            let in_loop = key != PANICS_AFTER_WAITING;
            assert_eq!(server.await.is_err(), in_loop, "{key}");
        }
    }

    /// With [`MAX_IN_FLIGHT`] requests being handled, the next one that may
    /// wait is not started (not even polled once) until one of them ends.
    #[tokio::test(start_paused = true)]
    async fn no_request_starts_past_the_in_flight_bound() {
        let (mut conn, _server) = connect_with(1 << 20);
        let mut out = BytesMut::new();
        for id in 1..=MAX_IN_FLIGHT as u64 {
            frame::encode(&mut out, id, 1, |body| {
                Request::Fetch { key: SLOW.into() }.encode(body)
            });
        }
        let last = MAX_IN_FLIGHT as u64 + 1;
        frame::encode(&mut out, last, 1, |body| {
            Request::Fetch {
                key: COUNTED.into(),
            }
            .encode(body)
        });
        let asked = Instant::now();
        conn.write_all(&out).await.unwrap();
        tokio::time::sleep(IDLE_CLOSE / 2).await;
        assert_eq!(STARTED.load(std::sync::atomic::Ordering::SeqCst), 0);
        let mut buf = BytesMut::new();
        let mut answered = 0;
        loop {
            let answer = read_frame(&mut conn, &mut buf).await.expect("an answer");
            assert_ne!(answer.kind, frame::GOING_AWAY);
            answered += 1;
            if answer.id == last {
                break;
            }
        }
        assert!(answered > 1, "answered before the slow ones");
        assert!(asked.elapsed() >= IDLE_CLOSE * 2);
        assert_eq!(STARTED.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A connection that carries nothing is closed, with a `GOING_AWAY`
    /// naming the last request read, once it has been idle for
    /// [`IDLE_CLOSE`] and no later than half as long again, whenever in
    /// the server's checks its last request came.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_idle_time() {
        for last_request_at in [Duration::ZERO, IDLE_CLOSE / 2 + Duration::from_secs(1)] {
            let mut conn = connect();
            let mut buf = BytesMut::new();
            tokio::time::sleep(last_request_at).await;
            send_fetch(&mut conn, 7).await;
            let answer = read_frame(&mut conn, &mut buf).await.expect("an answer");
            assert_eq!(answer.id, 7);
            let idle_since = Instant::now();
            let going_away = tokio::time::timeout(IDLE_CLOSE * 3, read_frame(&mut conn, &mut buf))
                .await
                .expect("closed within three times the idle time")
                .expect("going away");
            assert_eq!((going_away.kind, going_away.id), (frame::GOING_AWAY, 7));
            let idle = idle_since.elapsed();
            assert!(
                idle >= IDLE_CLOSE && idle <= IDLE_CLOSE * 3 / 2 + Duration::from_secs(1),
                "last request at {last_request_at:?}: closed after {idle:?} idle"
            );
            assert!(read_frame(&mut conn, &mut buf).await.is_none(), "closed");
        }
    }

    /// A connection used more often than [`IDLE_CLOSE`] stays open however
    /// long it lives.
    #[tokio::test(start_paused = true)]
    async fn a_connection_in_use_stays_open() {
        let mut conn = connect();
        let mut buf = BytesMut::new();
        for id in 1..=6 {
            send_fetch(&mut conn, id).await;
            let answer = read_frame(&mut conn, &mut buf).await.expect("open");
            assert_eq!((answer.kind == frame::GOING_AWAY, answer.id), (false, id));
            tokio::time::sleep(IDLE_CLOSE - Duration::from_secs(1)).await;
        }
    }

    /// A request still being handled keeps its connection open, however
    /// long it takes: its answer comes, not a `GOING_AWAY`.
    #[tokio::test(start_paused = true)]
    async fn a_connection_waiting_for_an_answer_stays_open() {
        let mut conn = connect();
        let mut buf = BytesMut::new();
        send_fetch_of(&mut conn, 1, SLOW).await;
        let asked = Instant::now();
        let answer = read_frame(&mut conn, &mut buf).await.expect("open");
        assert_eq!((answer.kind == frame::GOING_AWAY, answer.id), (false, 1));
        assert!(asked.elapsed() >= IDLE_CLOSE * 2);
    }

    /// Requests on one connection are handled side by side, each answered
    /// when it is ready: a quick request sent after a slow one is answered
    /// first, while the slow one is still being handled.
    #[tokio::test(start_paused = true)]
    async fn a_quick_request_is_answered_before_a_slow_one_sent_earlier() {
        let mut conn = connect();
        let mut buf = BytesMut::new();
        let asked = Instant::now();
        send_fetch_of(&mut conn, 1, SLOW).await;
        send_fetch(&mut conn, 2).await;
        let first = read_frame(&mut conn, &mut buf).await.expect("open");
        assert_eq!((first.kind == frame::GOING_AWAY, first.id), (false, 2));
        assert!(
            asked.elapsed() < IDLE_CLOSE,
            "answered while the slow one waits"
        );
        let second = read_frame(&mut conn, &mut buf).await.expect("open");
        assert_eq!((second.kind == frame::GOING_AWAY, second.id), (false, 1));
        assert!(asked.elapsed() >= IDLE_CLOSE * 2);
    }

    /// A peer that stops reading while its answers pass the outbox's bound
    /// (the server then reads no more of its requests) still loses the
    /// connection at the idle close: the wait for room does not keep the
    /// server from its checks.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_past_the_outbox_bound_loses_the_connection() {
        let (mut conn, server) = connect_with(1024);
        let mut requests = BytesMut::new();
        let answers = MAX_OUTBOX_BYTES / (1 << 20) + 4;
        for id in 1..=answers as u64 {
            frame::encode(&mut requests, id, 1, |body| {
                Request::Fetch { key: BIG.into() }.encode(body)
            });
        }
        conn.write_all(&requests).await.unwrap();
        tokio::time::timeout(IDLE_CLOSE * 3, server)
            .await
            .expect("the server gave up the connection")
            .unwrap();
    }

    /// A peer that stops reading (its answers fill the pipe, so the
    /// server's writer blocks) loses the connection: the server closes it
    /// as idle and stops its writer, so the pipe's other end is dropped.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_loses_the_connection() {
        let (mut conn, server) = connect_with(1024);
        let mut requests = BytesMut::new();
        for id in 1..=200 {
            frame::encode(&mut requests, id, 1, |body| {
                Request::Fetch { key: "k".into() }.encode(body)
            });
        }
        // 200 answers are four times what the pipe holds.
        conn.write_all(&requests).await.unwrap();
        tokio::time::timeout(IDLE_CLOSE * 3, server)
            .await
            .expect("the server gave up the connection")
            .unwrap();
        // Its end is gone (a writer left blocked would keep it, and would
        // finish writing as soon as the peer read again).
        let write = conn.write_all(&requests[..1]).await;
        assert_eq!(
            write.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::BrokenPipe),
            "the server's end of the connection is dropped"
        );
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        assert!(!rest.is_empty(), "the answers the pipe held");
    }
}

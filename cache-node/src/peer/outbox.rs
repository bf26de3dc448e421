//! The sending half of a peer connection: frames are appended to one buffer
//! by whoever has something to send (callers on the client side, request
//! handlers on the server side), and one writer task moves the buffer to the
//! socket.
//!
//! This is where frames coalesce: while the writer is in a `write`, every
//! frame appended meanwhile waits in the buffer, and the next `write` takes
//! them all; and a writer woken by a frame lets the other ready tasks run
//! (and append theirs) before it takes the buffer, for as long as they keep
//! appending (up to sixteen scheduler rounds, see [`MAX_ROUNDS`]). Under
//! load one syscall carries many requests or answers; idle, a lone frame
//! leaves after one round.
//! Appending is a short critical section (the encoding itself, into a
//! buffer that keeps its capacity); nothing allocates per frame.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::frame;

/// Most scheduler rounds a woken writer waits for frames to stop coming
/// before it writes. Each round, every task that was ready has run and the
/// sockets were polled once more, so the requests that reached the node
/// meanwhile have appended theirs. A batch costs a `send` here and a wake-up
/// and a `recv` at the peer, whatever it carries: in `bench/cluster.sh`'s
/// set-up (three nodes on one core), waiting up to four rounds instead of
/// one took peer `send`s from about 0.48 to 0.39 per cluster SET, and node
/// CPU per SET from 25.4 to 23.5 µs (means of four runs each); and up to
/// sixteen instead of four took the cluster's GETs from 0.735x to 0.79x the
/// single node's, and its CPU per GET from 1.41x to 1.30x the single
/// node's (medians of 45 rounds each, in five sets alternating the
/// two builds; higher in each set). Few gathers go on that long: in one
/// counted run, three in four ended after one round, one in forty went
/// past four and one in four thousand past eight; those that go on are a
/// node's busiest moments, when every round brings more, and sending then
/// would mostly hand the peer a frame or two and a wake-up. The bound
/// keeps a node that is never idle from holding its frames back: its
/// writer writes at most sixteen rounds after it was woken.
const MAX_ROUNDS: usize = 16;
/// A writer that holds this much writes without waiting for more.
const FULL_BATCH: usize = 64 * 1024;

/// Frames waiting to be written.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer: something was appended, or the outbox was closed.
    wake: Notify,
    /// Wakes those waiting for the buffer to shrink (backpressure).
    drained: Notify,
    /// Batches written in full so far: whether the connection moves.
    written: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    buf: BytesMut,
    /// No more frames: the writer flushes what is left and stops.
    closed: bool,
}

impl Outbox {
    /// Appends one frame (see [`frame::encode`]); false if the outbox is
    /// closed, when nothing was appended.
    pub fn push(&self, id: u64, epoch: u64, body: impl FnOnce(&mut BytesMut) -> u8) -> bool {
        self.with(|buf| {
            frame::encode(buf, id, epoch, body);
            Some(())
        })
        .is_some()
    }

    /// Appends under the caller's own bookkeeping: `f` runs with the buffer
    /// locked and may append frames to it (or decline, returning `None`),
    /// so what it records (a request id, say) is in the order the frames
    /// will leave in.
    pub fn with<R>(&self, f: impl FnOnce(&mut BytesMut) -> Option<R>) -> Option<R> {
        let (result, was_empty) = {
            let mut state = self.state.lock();
            if state.closed {
                return None;
            }
            let was_empty = state.buf.is_empty();
            (f(&mut state.buf), was_empty)
        };
        // A buffer that was not empty means the writer is already due to run.
        if was_empty && result.is_some() {
            self.wake.notify_one();
        }
        result
    }

    /// Bytes waiting to be written.
    pub fn pending_bytes(&self) -> usize {
        self.state.lock().buf.len()
    }

    /// How many batches have been written in full so far. One that stays
    /// the same while frames wait, or while a batch is being written, says
    /// the other end is not reading.
    pub fn batches_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Waits until fewer than `limit` bytes are waiting, or the outbox is
    /// closed (its writer may have stopped on an error, and nothing would
    /// drain it any more).
    pub async fn wait_below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let state = self.state.lock();
                if state.buf.len() < limit || state.closed {
                    return;
                }
            }
            drained.await;
        }
    }

    /// No frame is appended after this; the writer writes what is waiting
    /// and stops.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_one();
        self.drained.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Moves frames to `out` until the outbox is closed and empty (then
    /// `Ok`), or writing fails. `taken` is called with the buffer locked
    /// each time a batch is taken, before it is written.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &self,
        out: &mut W,
        mut taken: impl FnMut(),
    ) -> io::Result<()> {
        let mut batch = BytesMut::with_capacity(FULL_BATCH);
        loop {
            let closed = {
                let mut state = self.state.lock();
                if !state.buf.is_empty() {
                    // Swap, so both buffers keep their capacity.
                    std::mem::swap(&mut state.buf, &mut batch);
                    taken();
                    false
                } else {
                    state.closed
                }
            };
            if batch.is_empty() {
                // Before it waits: a writer that buffers (TLS: rustls takes
                // a whole write as sent and keeps what the socket had no
                // room for) would keep the end of the last batch until the
                // next frame came, while its request or answer waited for
                // it. A no-op on plain TCP.
                out.flush().await?;
                if closed {
                    return Ok(());
                }
                self.wake.notified().await;
                self.gather().await;
                continue;
            }
            out.write_all(&batch).await?;
            batch.clear();
            self.written.fetch_add(1, Ordering::Relaxed);
            self.drained.notify_waiters();
        }
    }

    /// Lets every task that is ready run before the batch is taken, round
    /// after round while they keep appending (up to [`MAX_ROUNDS`] or a
    /// [`FULL_BATCH`]). Without it the writer, woken by the first frame,
    /// would take that frame alone while the requests that arrived with it
    /// wait their turn. `yield_now` sends the writer behind every ready
    /// task and one more poll of the sockets.
    async fn gather(&self) {
        for _ in 0..MAX_ROUNDS {
            let before = self.pending_bytes();
            tokio::task::yield_now().await;
            let after = self.pending_bytes();
            if after == before || after >= FULL_BATCH {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use bytes::BufMut;

    use super::*;

    /// Records each `write` it is given.
    #[derive(Clone, Default)]
    struct Recorder(Arc<parking_lot::Mutex<Vec<usize>>>);

    impl Recorder {
        fn writes(&self) -> Vec<usize> {
            self.0.lock().clone()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer that buffers as TLS does (tokio-rustls): a write is taken
    /// whole, but only `room` bytes of it reach the wire, and the rest only
    /// when the writer is flushed.
    #[derive(Clone)]
    struct Buffering {
        room: usize,
        held: Arc<parking_lot::Mutex<(Vec<u8>, Vec<u8>)>>,
    }

    impl Buffering {
        fn on_the_wire(&self) -> usize {
            self.held.lock().1.len()
        }
    }

    impl AsyncWrite for Buffering {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut held = self.held.lock();
            let (pending, wire) = &mut *held;
            pending.extend_from_slice(buf);
            let n = pending.len().min(self.room);
            wire.extend(pending.drain(..n));
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut held = self.held.lock();
            let (pending, wire) = &mut *held;
            wire.append(pending);
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Over a writer that buffers (TLS), the end of a batch is flushed
    /// before the writer waits for more frames: it does not sit there until
    /// the next frame comes, which on a quiet connection is never.
    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_is_flushed_in_full_before_the_writer_waits() {
        let outbox = Arc::new(Outbox::default());
        let out = Buffering {
            room: 4,
            held: Default::default(),
        };
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            let mut out = out.clone();
            async move { outbox.write_to(&mut out, || {}).await }
        });
        push(&outbox, 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while outbox.batches_written() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the frame was never written"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The writer is back waiting for frames (it never gets another).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished());
        assert_eq!(out.on_the_wire(), FRAME, "the frame's end was held back");
        outbox.close();
        writer.await.unwrap().unwrap();
    }

    const BODY: &[u8] = b"0123456789";
    const FRAME: usize = frame::HEADER_LEN + BODY.len();

    fn push(outbox: &Outbox, id: u64) {
        assert!(outbox.push(id, 1, |out| {
            out.put_slice(BODY);
            7
        }));
    }

    /// Starts a writer and lets it run until it waits for frames.
    async fn start(outbox: &Arc<Outbox>) -> (Recorder, tokio::task::JoinHandle<io::Result<()>>) {
        let recorder = Recorder::default();
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            let mut out = recorder.clone();
            async move { outbox.write_to(&mut out, || {}).await }
        });
        tokio::task::yield_now().await;
        (recorder, writer)
    }

    /// A sender held back by a full outbox is let go when the outbox is
    /// closed (say, its writer failed), rather than waiting for good.
    #[tokio::test(flavor = "current_thread")]
    async fn closing_lets_go_of_whoever_waits_for_room() {
        let outbox = Arc::new(Outbox::default());
        push(&outbox, 1);
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait_below(1).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the frame is still waiting");
        outbox.close();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("let go on close")
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_appended_over_a_few_rounds_leave_in_one_write() {
        let outbox = Arc::new(Outbox::default());
        let (recorder, writer) = start(&outbox).await;
        // A busy node: each round of the scheduler, another request appends
        // its frame.
        for id in 0..3 {
            push(&outbox, id);
            tokio::task::yield_now().await;
        }
        outbox.close();
        writer.await.unwrap().unwrap();
        assert_eq!(recorder.writes(), vec![3 * FRAME]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_frame_leaves_without_waiting_for_more() {
        let outbox = Arc::new(Outbox::default());
        let (recorder, writer) = start(&outbox).await;
        push(&outbox, 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while recorder.writes().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the frame was never written"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(recorder.writes(), vec![FRAME]);
        outbox.close();
        writer.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_node_that_never_stops_appending_still_writes() {
        let outbox = Arc::new(Outbox::default());
        let (recorder, writer) = start(&outbox).await;
        // A frame every round, for many more rounds than the writer waits.
        let rounds = 10 * MAX_ROUNDS as u64;
        for id in 0..rounds {
            push(&outbox, id);
            tokio::task::yield_now().await;
        }
        let writes = recorder.writes();
        assert!(writes.len() >= 3, "writes while appending: {writes:?}");
        assert!(
            writes.iter().all(|&n| n <= (MAX_ROUNDS + 1) * FRAME),
            "a write held more than {} rounds of frames: {writes:?}",
            MAX_ROUNDS + 1
        );
        outbox.close();
        writer.await.unwrap().unwrap();
        let written: usize = recorder.writes().iter().sum();
        assert_eq!(written, rounds as usize * FRAME);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_batch_is_written_at_once() {
        let outbox = Arc::new(Outbox::default());
        let (recorder, writer) = start(&outbox).await;
        // Every round appends half a batch and then some, for more rounds
        // than the writer would wait: it writes as soon as it holds a full
        // batch, after the second.
        let per_round = FULL_BATCH / 2 / FRAME + 1;
        let mut id = 0;
        for _ in 0..=MAX_ROUNDS {
            for _ in 0..per_round {
                push(&outbox, id);
                id += 1;
            }
            tokio::task::yield_now().await;
        }
        outbox.close();
        writer.await.unwrap().unwrap();
        let writes = recorder.writes();
        assert_eq!(writes[0], 2 * per_round * FRAME, "{writes:?}");
        assert_eq!(
            writes.iter().sum::<usize>(),
            (MAX_ROUNDS + 1) * per_round * FRAME
        );
    }
}

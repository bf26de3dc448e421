//! The sending half of a peer connection: frames are appended to one buffer
//! by whoever has something to send (callers on the client side, request
//! handlers on the server side), and one writer task moves the buffer to the
//! socket.
//!
//! This is where frames coalesce: while the writer is in a `write`, every
//! frame appended meanwhile waits in the buffer, and the next `write` takes
//! them all; and a writer woken by a frame lets the other ready tasks run
//! (and append theirs) before it takes the buffer. Under load one syscall
//! carries many requests or answers; idle, a lone frame leaves at once.
//! Appending is a short critical section (the encoding itself, into a
//! buffer that keeps its capacity); nothing allocates per frame.

use std::io;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::frame;

/// Frames waiting to be written.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer: something was appended, or the outbox was closed.
    wake: Notify,
    /// Wakes those waiting for the buffer to shrink (backpressure).
    drained: Notify,
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

    /// Waits until fewer than `limit` bytes are waiting.
    pub async fn wait_below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.pending_bytes() < limit {
                return;
            }
            drained.await;
        }
    }

    /// No frame is appended after this; the writer writes what is waiting
    /// and stops.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_one();
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
        let mut batch = BytesMut::with_capacity(64 * 1024);
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
                if closed {
                    out.flush().await?;
                    return Ok(());
                }
                self.wake.notified().await;
                // Let every task that is ready run before taking the batch:
                // tokio runs a task it just woke first (its LIFO slot), so
                // without this the writer would take the first frame alone
                // while the requests that arrived with it wait their turn.
                // Yielding sends the writer to the back of the run queue,
                // behind the tasks about to append theirs.
                tokio::task::yield_now().await;
                continue;
            }
            out.write_all(&batch).await?;
            batch.clear();
            self.drained.notify_waiters();
        }
    }
}

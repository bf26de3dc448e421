//! [`Finishing`]: a future that is carried to its end even when whoever
//! awaits it gives up.
//!
//! A kept write (see `cluster::keepers`) must store this node's copy once
//! the coordinator may have applied the write, whether or not the client
//! still waits. Spawning it as a task of its own does that, but costs a
//! task, a wake-up and a switch on every kept write, while clients almost
//! never give up. So the future runs in its caller's task, and only if it
//! is dropped unfinished is the rest of it spawned. Hand-written: no crate
//! we use offers it, and it is a few lines.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future that, dropped before it finished, finishes as a task of its
/// own (its output then goes unread). Dropped outside a runtime, or on one
/// shutting down (a process ending), the rest is dropped with it.
pub(crate) struct Finishing<F: Future<Output: Send> + Send + 'static> {
    inner: Option<Pin<Box<F>>>,
}

impl<F: Future<Output: Send> + Send + 'static> Finishing<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self {
            inner: Some(Box::pin(inner)),
        }
    }
}

impl<F: Future<Output: Send> + Send + 'static> Future for Finishing<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Taken out while polled: if the poll panics, the half-run future
        // unwinds with the panic instead of being spawned again by `drop`.
        let mut inner = self
            .inner
            .take()
            .expect("a Finishing polled after it finished");
        match inner.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(output),
            Poll::Pending => {
                self.inner = Some(inner);
                Poll::Pending
            }
        }
    }
}

impl<F: Future<Output: Send> + Send + 'static> Drop for Finishing<F> {
    fn drop(&mut self) {
        if let Some(rest) = self.inner.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn awaited_it_gives_its_output() {
        assert_eq!(Finishing::new(async { 7 }).await, 7);
    }

    #[tokio::test]
    async fn dropped_unfinished_it_still_runs_to_its_end() {
        let (go, wait) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel();
        let work = Finishing::new(async move {
            wait.await
                .expect("the test keeps the sender until it sends");
            done.send(()).expect("the test waits for it");
        });
        // Started, then given up on, as a client that hangs up does.
        let given_up = tokio::time::timeout(Duration::from_millis(20), work).await;
        assert!(given_up.is_err(), "the work waits for `go`");
        go.send(()).expect("the work, spawned on drop, still waits");
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the work finished on its own")
            .expect("the work sent its end");
    }

    /// Ready at its first poll, counting its polls.
    struct CountsPolls(Arc<AtomicUsize>);

    impl Future for CountsPolls {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(())
        }
    }

    #[tokio::test]
    async fn finished_it_is_not_run_again_when_dropped() {
        let polls = Arc::new(AtomicUsize::new(0));
        Finishing::new(CountsPolls(polls.clone())).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    /// Panics at its first poll, counting its polls.
    struct PanicsWhenPolled(Arc<AtomicUsize>);

    impl Future for PanicsWhenPolled {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("in the work");
        }
    }

    #[tokio::test]
    async fn a_panic_in_it_reaches_whoever_awaits_it_and_is_not_run_again() {
        let polls = Arc::new(AtomicUsize::new(0));
        let awaited = tokio::spawn(Finishing::new(PanicsWhenPolled(polls.clone())));
        let error = awaited.await.expect_err("the panic is not swallowed");
        assert!(error.is_panic());
        // Dropped while unwinding: a half-run future must not be spawned
        // (and polled) again.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropped_outside_a_runtime_it_is_dropped_quietly() {
        let dropped = Arc::new(AtomicUsize::new(0));
        struct CountsDrop(Arc<AtomicUsize>);
        impl Drop for CountsDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let held = CountsDrop(dropped.clone());
        drop(Finishing::new(async move {
            let _held = held;
            std::future::pending::<()>().await;
        }));
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}

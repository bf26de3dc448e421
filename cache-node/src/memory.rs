//! Resident memory that follows the data: giving the allocator's freed
//! memory back to the system after the store shrank (a burst that expired,
//! a mass delete or tag invalidation, a rebalance that moved keys away).
//!
//! The store frees what it no longer needs (items, emptied slab chunks,
//! mostly-empty hash tables: see [`crate::store`]), but mimalloc keeps freed
//! pages in its per-thread heaps and arenas, and purges them to the system
//! only lazily, on later allocator calls. An idle node after a mass delete
//! makes no such calls, so its resident set would stay at its peak.
//!
//! So a background task watches the bytes the store holds and, after a drop
//! of more than an eighth since the last release (and at least
//! [`MIN_DROP_BYTES`]), asks every runtime thread to collect: it bumps a
//! release epoch that each worker checks when it parks (idle, so the
//! collection never delays a request; see [`on_thread_park`]), and collects
//! once on the blocking pool, which also purges the shared arenas. Growth
//! alone never triggers a collection, so a node whose data only grows pays
//! nothing.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// How often the task looks at the store's size.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Drops smaller than this are not worth a collection.
pub const MIN_DROP_BYTES: u64 = 4 << 20;

static RELEASE_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN_EPOCH: Cell<u64> = const { Cell::new(0) };
}

/// Returns this thread's freed memory (and the arenas' purgeable pages) to
/// the system now. Costs a walk over the thread's heap; a no-op when the
/// process's allocator is not mimalloc.
pub fn release_on_this_thread() {
    // SAFETY: `mi_collect` only takes the calling thread's heap and the
    // allocator's own locks; it is safe to call at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Asks every runtime thread to release its freed memory the next time it
/// parks.
pub fn request_release() {
    RELEASE_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// For the runtime's `on_thread_park` hook: collects once per requested
/// release. One relaxed load when there is nothing to do.
pub fn on_thread_park() {
    let epoch = RELEASE_EPOCH.load(Ordering::Relaxed);
    if SEEN_EPOCH.get() != epoch {
        SEEN_EPOCH.set(epoch);
        release_on_this_thread();
    }
}

/// Whether a store that held `peak` bytes and now holds `now` shrank enough
/// to release.
pub fn shrank_enough(peak: u64, now: u64) -> bool {
    let drop = peak.saturating_sub(now);
    drop >= MIN_DROP_BYTES && drop > peak / 8
}

/// Watches the store until told to stop; see the module doc.
pub async fn follow_data(store: Arc<Store>, stop: watch::Receiver<bool>) {
    follow_data_with(store, stop, || {
        request_release();
        tokio::task::spawn_blocking(release_on_this_thread)
    })
    .await;
}

/// [`follow_data`] with the release step given (tests count it).
async fn follow_data_with(
    store: Arc<Store>,
    mut stop: watch::Receiver<bool>,
    release: impl Fn() -> tokio::task::JoinHandle<()>,
) {
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = store.bytes();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = store.bytes();
        if shrank_enough(peak, now) {
            tracing::debug!(peak, now, "store shrank: releasing freed memory");
            if let Err(e) = release().await {
                tracing::error!(error = %e, "memory release failed");
            }
            peak = now;
        } else {
            peak = peak.max(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_drop_releases() {
        let mib = 1 << 20;
        assert!(!shrank_enough(100 * mib, 100 * mib));
        assert!(
            !shrank_enough(100 * mib, 120 * mib),
            "growth never releases"
        );
        assert!(
            !shrank_enough(100 * mib, 90 * mib),
            "a tenth is within the noise"
        );
        assert!(shrank_enough(100 * mib, 80 * mib));
        assert!(!shrank_enough(2 * mib, 0), "too little to bother");
        assert!(shrank_enough(1000 * mib, 100 * mib));
    }

    #[tokio::test]
    async fn a_mass_delete_releases_once_and_growth_does_not() {
        use std::sync::atomic::AtomicUsize;
        use std::time::Instant;

        use crate::store::{NO_TAGS, StoreConfig};

        let store = Arc::new(Store::with_config(StoreConfig {
            max_items: 100_000,
            max_bytes: 0,
            default_ttl: Duration::from_secs(3600),
            shards: 0,
        }));
        let releases = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(follow_data_with(store.clone(), stop_rx, {
            let releases = releases.clone();
            move || {
                releases.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async {})
            }
        }));
        let value = [b'v'; 200];
        let key = |i: u32| format!("key:{i:08}");
        for i in 0..50_000 {
            store.set(&key(i), &value, NO_TAGS, None, |_| ()).unwrap();
        }
        assert!(store.bytes() > 2 * MIN_DROP_BYTES);
        // Growth alone: a few checks pass without a release.
        tokio::time::sleep(CHECK_EVERY * 3).await;
        assert_eq!(releases.load(Ordering::SeqCst), 0, "growth never releases");
        for i in 0..45_000 {
            assert!(store.delete(&key(i)));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while releases.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no release after a 90% delete");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(CHECK_EVERY * 3).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1, "one release per drop");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task stops when told")
            .unwrap();
    }

    #[test]
    fn each_thread_collects_once_per_request() {
        on_thread_park();
        let seen = SEEN_EPOCH.get();
        assert_eq!(seen, RELEASE_EPOCH.load(Ordering::Relaxed));
        request_release();
        on_thread_park();
        assert_eq!(SEEN_EPOCH.get(), seen + 1);
        on_thread_park();
        assert_eq!(SEEN_EPOCH.get(), seen + 1, "nothing new to do");
    }
}

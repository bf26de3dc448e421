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
//! [`MIN_DROP_BYTES`]), gives memory back ([`give_back`]). The end of a
//! drop counts too: once the store stops falling, a drop of more than an
//! eighth since the last release is given back if it is at least
//! [`MIN_TAIL_BYTES`], so the last part of a mass delete (after the release
//! in its middle) is not kept for good. Deletions spread over the keys
//! (nine in ten gone everywhere) leave every slab chunk and allocator page
//! with a few survivors, so nothing is free to give back: the store first
//! rebuilds its shards that lost more than a quarter of their items,
//! packing the survivors together. Then it asks every runtime thread to
//! collect: it bumps a release epoch that each worker checks when it parks
//! (idle, so the collection never delays a request; see
//! [`on_thread_park`]), and collects once on the compaction thread, which
//! also purges the shared arenas. Growth alone never triggers a
//! collection, so a node whose data only grows pays nothing.
//!
//! Memory the store never held is freed too: connection buffers after a
//! crowd of clients left, request bodies after a burst of large writes. The
//! task also reads the process's resident set and tracks what it holds
//! beyond the store's bytes (the node's overhead). When that overhead is
//! more than [`MIN_EXCESS_BYTES`] above the lowest it has been, it releases;
//! if the memory is still in use (the clients are still connected), the
//! release frees nothing and the next one waits twice as long, up to
//! [`MAX_RETRY`], so a busy node pays at most one collection per
//! `MAX_RETRY`.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::Store;

/// How often the task looks at the store's size.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Drops smaller than this are not worth a collection while the store is
/// still falling.
pub const MIN_DROP_BYTES: u64 = 4 << 20;
/// Once the store stopped falling, a drop this big since the last release
/// is worth one.
pub const MIN_TAIL_BYTES: u64 = 1 << 20;
/// Overhead (resident memory beyond the store's bytes) this far above its
/// lowest is worth a collection.
pub const MIN_EXCESS_BYTES: u64 = 8 << 20;
/// The longest wait between collections while the overhead stays high.
pub const MAX_RETRY: Duration = Duration::from_secs(16);

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
/// to release: by more than an eighth, and by at least [`MIN_DROP_BYTES`]
/// while it is still falling or [`MIN_TAIL_BYTES`] once it stopped.
pub fn shrank_enough(peak: u64, now: u64, still_falling: bool) -> bool {
    let drop = peak.saturating_sub(now);
    let at_least = if still_falling {
        MIN_DROP_BYTES
    } else {
        MIN_TAIL_BYTES
    };
    drop >= at_least && drop > peak / 8
}

/// When to release, from what the store holds and what the process holds
/// (see the module doc). Plain data, so the rule is tested without an
/// allocator.
#[derive(Debug)]
pub struct ReleasePolicy {
    /// The store's bytes at their highest since the last release.
    peak: u64,
    /// The store's bytes at the last check.
    last: u64,
    /// The lowest overhead (resident minus store bytes) seen.
    floor: u64,
    /// No overhead release before this.
    next_try: Instant,
    /// The wait after an overhead release that did not bring it down.
    retry: Duration,
}

impl ReleasePolicy {
    pub fn new(store_bytes: u64, resident: Option<u64>, now: Instant) -> Self {
        Self {
            peak: store_bytes,
            last: store_bytes,
            floor: resident.map_or(u64::MAX, |r| r.saturating_sub(store_bytes)),
            next_try: now,
            retry: CHECK_EVERY,
        }
    }

    /// Whether to release now, given the store's bytes and the process's
    /// resident bytes (None where the platform does not say).
    pub fn check(&mut self, store_bytes: u64, resident: Option<u64>, now: Instant) -> bool {
        let still_falling = store_bytes < self.last;
        self.last = store_bytes;
        let shrank = shrank_enough(self.peak, store_bytes, still_falling);
        self.peak = if shrank {
            store_bytes
        } else {
            self.peak.max(store_bytes)
        };
        let Some(resident) = resident else {
            return shrank;
        };
        let overhead = resident.saturating_sub(store_bytes);
        self.floor = self.floor.min(overhead);
        let excess = overhead - self.floor >= MIN_EXCESS_BYTES;
        if !excess {
            // Back near the floor: the next excess is released at once.
            self.retry = CHECK_EVERY;
            self.next_try = now;
            return shrank;
        }
        if shrank || now >= self.next_try {
            // Whatever was freed goes back now; if the overhead is still
            // high at the next look, it is in use: wait longer each time.
            self.next_try = now + self.retry;
            self.retry = (self.retry * 2).min(MAX_RETRY);
            return true;
        }
        false
    }
}

/// The process's resident set in bytes, where the platform tells it
/// (Linux's `/proc/self/statm`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// What a drop of the store's bytes sets off, on a blocking thread: the
/// store rebuilds its thinned shards ([`Store::compact`]), so that memory
/// held by a few survivors per slab chunk and allocator page is freed;
/// then this thread collects, and every runtime thread is asked to collect
/// when it next parks (a block freed here that another thread allocated
/// goes back to that thread's heap, and only that thread can release it).
pub fn give_back(store: &Store) {
    let compacted = store.compact();
    if compacted > 0 {
        tracing::debug!(shards = compacted, "compacted thinned shards");
    }
    release_on_this_thread();
    request_release();
}

/// Watches the store and the process until told to stop; see the module
/// doc.
///
/// Releases run on one thread of their own, for the node's life, rather
/// than on the runtime's blocking pool: a compaction allocates the
/// survivors anew, from the heap of the thread it runs on, and with a
/// different pool thread each time (as under load) the survivors of
/// successive compactions would spread over several heaps, each keeping
/// pages part full.
pub async fn follow_data(store: Arc<Store>, stop: watch::Receiver<bool>) {
    let (requests, pending) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
    let compacted = store.clone();
    let spawned = std::thread::Builder::new()
        .name("distrocache-compactor".into())
        .spawn(move || {
            // Ends when the watcher below drops its sender.
            for done in pending {
                give_back(&compacted);
                let _ = done.send(());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the compaction thread: freed memory is not given back");
        return;
    }
    follow_data_with(store, stop, resident_bytes, move || {
        let (done, finished) = tokio::sync::oneshot::channel();
        let sent = requests.send(done).is_ok();
        tokio::spawn(async move {
            if sent {
                let _ = finished.await;
            }
        })
    })
    .await;
}

/// [`follow_data`] with the resident-set reading and the release step given
/// (tests drive them).
async fn follow_data_with(
    store: Arc<Store>,
    mut stop: watch::Receiver<bool>,
    resident: impl Fn() -> Option<u64>,
    release: impl Fn() -> tokio::task::JoinHandle<()>,
) {
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut policy = ReleasePolicy::new(store.bytes(), resident(), Instant::now());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = store.bytes();
        if policy.check(now, resident(), Instant::now()) {
            tracing::debug!(store_bytes = now, "releasing freed memory");
            if let Err(e) = release().await {
                tracing::error!(error = %e, "memory release failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_drop_releases() {
        let mib = 1 << 20;
        assert!(!shrank_enough(100 * mib, 100 * mib, true));
        assert!(
            !shrank_enough(100 * mib, 120 * mib, true),
            "growth never releases"
        );
        assert!(
            !shrank_enough(100 * mib, 90 * mib, true),
            "a tenth is within the noise"
        );
        assert!(shrank_enough(100 * mib, 80 * mib, true));
        assert!(!shrank_enough(2 * mib, 0, true), "too little to bother");
        assert!(shrank_enough(1000 * mib, 100 * mib, true));
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
        let task = tokio::spawn(follow_data_with(store.clone(), stop_rx, || None, {
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
    fn overhead_above_its_floor_releases_with_a_growing_wait_while_it_stays() {
        let mib = 1 << 20;
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut policy = ReleasePolicy::new(0, Some(20 * mib), t0);
        // Data growth with its own resident memory: no release.
        assert!(!policy.check(100 * mib, Some(121 * mib), at(1)));
        // Clients arrive and hold 30 MiB of buffers: released once, then
        // (still held) after 1 s, 2 s, 4 s... waits, never more than
        // MAX_RETRY apart.
        let held = Some(151 * mib);
        let mut releases = Vec::new();
        for s in 2..80 {
            if policy.check(100 * mib, held, at(s)) {
                releases.push(s);
            }
        }
        assert_eq!(releases[..5], [2, 3, 5, 9, 17], "{releases:?}");
        let gaps: Vec<u64> = releases.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&g| g <= MAX_RETRY.as_secs()), "{gaps:?}");
        // The clients leave but the allocator keeps their buffers: the next
        // due check releases, within MAX_RETRY.
        let last = *releases.last().unwrap();
        let released_at = (80..80 + MAX_RETRY.as_secs() + 1)
            .find(|&s| policy.check(100 * mib, held, at(s)))
            .expect("a release within MAX_RETRY");
        assert!(released_at - last <= MAX_RETRY.as_secs());
        // Back near the floor: quiet, and the next excess is released at once.
        assert!(!policy.check(100 * mib, Some(122 * mib), at(200)));
        assert!(!policy.check(100 * mib, Some(123 * mib), at(201)));
        assert!(policy.check(100 * mib, Some(140 * mib), at(202)));
    }

    #[test]
    fn the_tail_of_a_drop_is_released_once_the_store_stops_falling() {
        let mib = 1 << 20;
        let t0 = Instant::now();
        let mut policy = ReleasePolicy::new(40 * mib, None, t0);
        // A mass delete: released in its middle, at 20 MiB.
        assert!(!policy.check(38 * mib, None, t0), "within the noise");
        assert!(policy.check(20 * mib, None, t0));
        // It goes on by less than MIN_DROP_BYTES: nothing while it falls...
        assert!(!policy.check(18 * mib, None, t0));
        assert!(!policy.check(17 * mib, None, t0));
        // ...and one release once it stopped (3 MiB is over an eighth).
        assert!(policy.check(17 * mib, None, t0));
        assert!(!policy.check(17 * mib, None, t0), "once per drop");
        // A small drop that stops (an eighth at most) is not worth one.
        assert!(!policy.check(16 * mib, None, t0));
        assert!(!policy.check(16 * mib, None, t0));
        // Nor a tail under MIN_TAIL_BYTES, however large a share it is.
        let mut small = ReleasePolicy::new(2 * mib, None, t0);
        assert!(!small.check(mib + mib / 2, None, t0));
        assert!(!small.check(mib + mib / 2, None, t0));
    }

    #[test]
    fn without_a_resident_reading_only_the_store_decides() {
        let mib = 1 << 20;
        let t0 = Instant::now();
        let mut policy = ReleasePolicy::new(100 * mib, None, t0);
        assert!(!policy.check(120 * mib, None, t0));
        assert!(policy.check(10 * mib, None, t0));
        assert!(!policy.check(10 * mib, None, t0), "once per drop");
    }

    #[test]
    fn this_process_reports_its_resident_set() {
        let resident = resident_bytes().expect("Linux reports it");
        assert!(resident > 1 << 20, "{resident}");
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

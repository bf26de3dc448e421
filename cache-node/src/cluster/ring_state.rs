//! The rings a node holds: the current one, and while data is still moving
//! to it the one before (reads that miss during a move also ask the previous
//! owners; writes go to both). Adopting a newer document and settling (the
//! move is done everywhere, forget the previous ring) are the only changes,
//! serialised by one lock; everything else reads a snapshot without locking.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use distrocache_membership::MembershipDoc;
use tokio::sync::watch;

use super::ring::Ring;

/// A snapshot of the rings held.
#[derive(Debug)]
pub struct Rings {
    pub current: Arc<Ring>,
    pub previous: Option<Arc<Ring>>,
}

impl Rings {
    /// Both rings, current first.
    pub(super) fn both(&self) -> impl Iterator<Item = &Arc<Ring>> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

pub struct RingState {
    node_id: String,
    rings: ArcSwapOption<Rings>,
    /// The current ring's epoch (0 before the first), read on every peer
    /// request; kept beside `rings` so that costs one atomic load.
    epoch: AtomicU64,
    /// The latest epoch every member has finished moving data for.
    settled_epoch: AtomicU64,
    /// Serialises adoption and settling.
    change: parking_lot::Mutex<()>,
    epoch_tx: watch::Sender<u64>,
}

impl RingState {
    pub(super) fn new(node_id: &str) -> Self {
        Self {
            node_id: node_id.to_owned(),
            rings: ArcSwapOption::empty(),
            epoch: AtomicU64::new(0),
            settled_epoch: AtomicU64::new(0),
            change: parking_lot::Mutex::new(()),
            epoch_tx: watch::channel(0).0,
        }
    }

    /// The rings held now, if a membership document has arrived.
    pub(super) fn rings(&self) -> Option<Arc<Rings>> {
        self.rings.load_full()
    }

    /// The rings held now, without taking a reference count (the request
    /// paths' view).
    pub(super) fn load(&self) -> arc_swap::Guard<Option<Arc<Rings>>> {
        self.rings.load()
    }

    /// The current ring, if any.
    pub(super) fn current(&self) -> Option<Arc<Ring>> {
        self.rings.load().as_ref().map(|r| r.current.clone())
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(super) fn settled_epoch(&self) -> u64 {
        self.settled_epoch.load(Ordering::Acquire)
    }

    /// No data is moving: the current ring is the only one held.
    pub(super) fn is_settled(&self) -> bool {
        self.rings
            .load()
            .as_ref()
            .is_some_and(|r| r.previous.is_none())
    }

    /// Changes of the epoch.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.epoch_tx.subscribe()
    }

    /// Adopts `doc` if it is newer than the ring held, returning the new
    /// ring. An older or equal epoch is ignored, so documents may arrive
    /// from the membership source and from peers in any order.
    pub(super) fn adopt(&self, doc: MembershipDoc) -> Option<Arc<Ring>> {
        let _change = self.change.lock();
        let held = self.rings.load_full();
        if held
            .as_ref()
            .is_some_and(|r| r.current.epoch() >= doc.epoch)
        {
            return None;
        }
        let ring = Arc::new(Ring::new(Arc::new(doc), &self.node_id));
        // While a move is still under way the data may still sit with the
        // owners of the ring before the one being replaced; keep that one.
        let previous = held.map(|r| {
            if self.settled_epoch() >= r.current.epoch() {
                r.current.clone()
            } else {
                r.previous.clone().unwrap_or_else(|| r.current.clone())
            }
        });
        let epoch = ring.epoch();
        self.rings.store(Some(Arc::new(Rings {
            current: ring.clone(),
            previous,
        })));
        self.epoch.store(epoch, Ordering::Release);
        self.epoch_tx.send_replace(epoch);
        Some(ring)
    }

    /// Forgets the previous ring once every member has finished moving data
    /// for `epoch`; returns the current ring if it did.
    pub(super) fn settle(&self, epoch: u64) -> Option<Arc<Ring>> {
        let _change = self.change.lock();
        let rings = self.rings.load_full()?;
        if rings.current.epoch() != epoch {
            return None;
        }
        self.settled_epoch.fetch_max(epoch, Ordering::AcqRel);
        self.rings.store(Some(Arc::new(Rings {
            current: rings.current.clone(),
            previous: None,
        })));
        Some(rings.current.clone())
    }
}

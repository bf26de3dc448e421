//! Repairing replicas that missed writes.
//!
//! When a write, delete or tag invalidation cannot reach one of a key's
//! owners, the coordinator still answers the client (the other owners have
//! it) and records a *hint*: the key (or tag) and what happened to it. A
//! background task retries the hinted peers every [`REPAIR_INTERVAL`]; for a
//! hinted write it sends the item as held *now*, so repeated writes collapse
//! into one transfer. Repair batches close at the rebalancing batch limits
//! (items and bytes), which the receiving node accepts. A peer that restarts
//! empty pulls its keys anyway (see `rebalance`); hints cover the peer that
//! was only briefly unreachable.
//!
//! Hints per peer are capped at [`MAX_HINTS_PER_PEER`]. Past that a new
//! delete still displaces a write hint (a missed delete could bring a key
//! back; a missed write cannot lose one), and the peer is marked for a
//! *resync*: when it answers again it is sent every item held here that it
//! owns, which covers every write hint dropped. Dropped hints are counted in
//! `distrocache_replication_dropped_hints_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::Cluster;
use super::metrics::PeerOp;
use super::ring::{MemberIdx, Ring};
use crate::peer::protocol::{Deletion, RecordBatch, Source};
use crate::peer::{Call, PeerError};
use crate::store::UnixNanos;

pub const REPAIR_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_HINTS_PER_PEER: usize = 100_000;
/// Most key hints taken from the queue per request (fewer when the
/// rebalancing batch limits are lower).
const REPAIR_BATCH: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyHint {
    /// Send the item as held now. The version the missed write stored (its
    /// `created_at`): if the item is no longer held here when the repair
    /// runs (expired, evicted, or handed off after a ring change), the
    /// peer's copies older than it are deleted instead, since they are
    /// versions an acknowledged write replaced.
    Write(UnixNanos),
    /// Delete the key unless written after `at`.
    Delete(UnixNanos),
}

/// Key hints and tag hints taken from (or put back into) the queue.
type Taken = (Vec<(String, KeyHint)>, Vec<(String, UnixNanos)>);

#[derive(Default)]
struct PeerHints {
    keys: HashMap<String, KeyHint>,
    tags: HashMap<String, UnixNanos>,
    /// Write hints were dropped: send the peer everything it owns.
    resync: bool,
    /// A resync is on its way: the peer is behind until it lands.
    resyncing: bool,
    /// Hints taken out for a repair that has not answered yet. They count
    /// as pending: until the peer acknowledges them it is still behind, and
    /// must not be granted a read lease, and what it missed must still be
    /// told when it asks (see `reconcile`).
    sent_keys: HashMap<String, KeyHint>,
    sent_tags: HashMap<String, UnixNanos>,
}

impl PeerHints {
    /// Keys and tags the peer is behind on, their hints queued or on their
    /// way: one hinted again while its earlier hint is on its way counts
    /// once.
    fn len(&self) -> usize {
        let sent_keys = self
            .sent_keys
            .keys()
            .filter(|k| !self.keys.contains_key(*k));
        let sent_tags = self
            .sent_tags
            .keys()
            .filter(|t| !self.tags.contains_key(*t));
        self.queued() + sent_keys.count() + sent_tags.count()
    }

    /// Whether every hint has been delivered.
    fn is_empty(&self) -> bool {
        self.queued() == 0 && self.sent_keys.is_empty() && self.sent_tags.is_empty()
    }

    fn queued(&self) -> usize {
        self.keys.len() + self.tags.len()
    }
}

/// Hints by the id of the member that missed them.
#[derive(Default)]
pub struct Hints {
    peers: Mutex<HashMap<String, PeerHints>>,
    dropped: AtomicU64,
}

impl Hints {
    /// `peer` missed the write of `key` that stored version `created_at`.
    pub(super) fn write(&self, peer: &str, key: &str, created_at: UnixNanos) {
        self.add_key(peer, key, KeyHint::Write(created_at));
    }

    pub(super) fn delete(&self, peer: &str, key: &str, at: UnixNanos) {
        self.add_key(peer, key, KeyHint::Delete(at));
    }

    /// Tag invalidations are few and each may stand for many deletes, so they
    /// are kept even past the cap, displacing a write hint like a delete.
    pub(super) fn invalidate(&self, peer: &str, tag: &str, at: UnixNanos) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        if hints.queued() >= MAX_HINTS_PER_PEER
            && !hints.tags.contains_key(tag)
            && Self::make_room(peer, hints)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        hints.tags.insert(tag.to_owned(), at);
    }

    /// Whether anything waits to be repaired on `peer` (a read lease is
    /// then refused to it).
    pub(super) fn has_pending(&self, peer: &str) -> bool {
        self.peers
            .lock()
            .get(peer)
            .is_some_and(|h| !h.is_empty() || h.resync || h.resyncing)
    }

    /// Until when `peer`'s copies of `key` are dead by what it missed here
    /// (queued or on its way): copies at or before a missed delete, and,
    /// if `writes` (the item is no longer held here), copies written before
    /// a missed write's version (it replaced them).
    pub(super) fn missed_key(&self, peer: &str, key: &str, writes: bool) -> Option<UnixNanos> {
        let peers = self.peers.lock();
        let hints = peers.get(peer)?;
        [hints.keys.get(key), hints.sent_keys.get(key)]
            .into_iter()
            .flatten()
            .filter_map(|hint| match *hint {
                KeyHint::Write(version) => writes.then(|| version.saturating_sub(1)),
                KeyHint::Delete(at) => Some(at),
            })
            .max()
    }

    /// Whether `peer` missed an invalidation of one of `tags` made at or
    /// after `version` (so its copy of that version, carrying them, is
    /// dead).
    pub(super) fn missed_tag(&self, peer: &str, tags: &[String], version: UnixNanos) -> bool {
        let peers = self.peers.lock();
        peers.get(peer).is_some_and(|hints| {
            tags.iter().any(|t| {
                [hints.tags.get(t), hints.sent_tags.get(t)]
                    .into_iter()
                    .flatten()
                    .any(|&at| at >= version)
            })
        })
    }

    /// Hints waiting, over every peer.
    pub(super) fn pending(&self) -> usize {
        self.peers.lock().values().map(PeerHints::len).sum()
    }

    /// Hints dropped since the last call, for the metric.
    pub(super) fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    fn add_key(&self, peer: &str, key: &str, hint: KeyHint) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        if hints.queued() >= MAX_HINTS_PER_PEER && !hints.keys.contains_key(key) {
            match hint {
                KeyHint::Write(_) => {
                    // The resync will send the item anyway.
                    hints.resync = true;
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                KeyHint::Delete(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    if !Self::make_room(peer, hints) {
                        tracing::warn!(peer, key, "repair queue full of deletes; dropping one");
                        return;
                    }
                }
            }
        }
        hints.keys.insert(key.to_owned(), hint);
    }

    /// Drops one write hint (the resync covers it); false if there is none.
    fn make_room(peer: &str, hints: &mut PeerHints) -> bool {
        let Some(victim) = hints
            .keys
            .iter()
            .find(|(_, h)| matches!(h, KeyHint::Write(_)))
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        hints.keys.remove(&victim);
        if !hints.resync {
            tracing::warn!(
                peer,
                "repair queue full; the replica will be resynced whole when it answers"
            );
        }
        hints.resync = true;
        true
    }

    /// Whether `peer` is marked for a resync; if so, the resync is on its
    /// way (still pending) until [`Self::resynced`].
    fn take_resync(&self, peer: &str) -> bool {
        let mut peers = self.peers.lock();
        let Some(hints) = peers.get_mut(peer) else {
            return false;
        };
        let resync = std::mem::take(&mut hints.resync);
        hints.resyncing |= resync;
        if hints.is_empty() && !hints.resyncing {
            peers.remove(peer);
        }
        resync
    }

    /// The resync taken for `peer` landed (`ok`) or must be tried again.
    fn resynced(&self, peer: &str, ok: bool) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        hints.resyncing = false;
        hints.resync |= !ok;
        if hints.is_empty() && !hints.resync {
            peers.remove(peer);
        }
    }

    /// Takes up to `n` key hints and every tag hint for `peer`, to be sent;
    /// they stay pending (and known) until [`Self::delivered`] or
    /// [`Self::restore`].
    fn take(&self, peer: &str, n: usize) -> Taken {
        let mut peers = self.peers.lock();
        let Some(hints) = peers.get_mut(peer) else {
            return (Vec::new(), Vec::new());
        };
        let keys: Vec<String> = hints.keys.keys().take(n).cloned().collect();
        let keys: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let hint = hints.keys.remove(&k).expect("just listed");
                (k, hint)
            })
            .collect();
        let tags: Vec<_> = hints.tags.drain().collect();
        hints.sent_keys.extend(keys.iter().cloned());
        hints.sent_tags.extend(tags.iter().cloned());
        (keys, tags)
    }

    /// `peer` acknowledged the hints taken for it.
    fn delivered(&self, peer: &str, keys: &[(String, KeyHint)], tags: &[(String, UnixNanos)]) {
        let mut peers = self.peers.lock();
        let Some(hints) = peers.get_mut(peer) else {
            return;
        };
        for (k, _) in keys {
            hints.sent_keys.remove(k);
        }
        for (t, _) in tags {
            hints.sent_tags.remove(t);
        }
        if hints.is_empty() && !hints.resync && !hints.resyncing {
            peers.remove(peer);
        }
    }

    /// Puts back hints taken for `peer` that were not delivered (newer
    /// hints win).
    fn restore(&self, peer: &str, keys: Vec<(String, KeyHint)>, tags: Vec<(String, UnixNanos)>) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        for (k, h) in keys {
            hints.sent_keys.remove(&k);
            hints.keys.entry(k).or_insert(h);
        }
        for (t, at) in tags {
            hints.sent_tags.remove(&t);
            hints.tags.entry(t).or_insert(at);
        }
    }

    fn peers_with_hints(&self) -> Vec<String> {
        self.peers.lock().keys().cloned().collect()
    }

    /// Forgets a peer (it left the ring).
    fn forget(&self, peer: &str) {
        self.peers.lock().remove(peer);
    }
}

/// Retries hinted peers until the node stops.
pub async fn run(cluster: Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(REPAIR_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        for peer in cluster.hints.peers_with_hints() {
            repair_peer(&cluster, &peer).await;
        }
        cluster
            .metrics
            .pending_repairs
            .set(cluster.hints.pending() as i64);
        cluster
            .metrics
            .dropped_hints
            .inc_by(cluster.hints.take_dropped());
    }
}

/// Sends one peer everything hinted for it, batch by batch, until done or a
/// batch fails (then the rest waits for the next round); first the whole
/// resync, if one is due.
async fn repair_peer(cluster: &Cluster, peer: &str) {
    let settings = cluster.settings;
    let per_batch = REPAIR_BATCH.min(settings.batch_items).max(1);
    loop {
        let Some(ring) = cluster.ring.current() else {
            return;
        };
        let Some(idx) = ring.index_of(peer) else {
            cluster.hints.forget(peer);
            return;
        };
        let member = ring.member(idx).clone();
        if cluster.hints.take_resync(peer) {
            let done = resync(cluster, &ring, idx).await;
            cluster.hints.resynced(peer, done.is_ok());
            if let Err(e) = done {
                tracing::debug!(peer, error = %e, "resync failed; retrying later");
                return;
            }
            tracing::info!(peer, "resynced a replica whose repair queue overflowed");
        }
        let (mut keys, tags) = cluster.hints.take(peer, per_batch);
        if keys.is_empty() && tags.is_empty() {
            return;
        }
        let mut records = RecordBatch::default();
        let mut deletes = Vec::new();
        // Close the batch at the byte limit; what did not fit goes back.
        let mut fitted = keys.len();
        for (i, (key, hint)) in keys.iter().enumerate() {
            if records.size() >= settings.batch_bytes {
                fitted = i;
                break;
            }
            match hint {
                KeyHint::Write(version) => {
                    let held = cluster.store.peek(key, |item| records.push(&item));
                    if held.is_none() {
                        // Gone from here since: the peer must not keep
                        // serving what that write replaced.
                        deletes.push(Deletion {
                            key: key.clone(),
                            at: version.saturating_sub(1),
                        });
                    }
                }
                KeyHint::Delete(at) => deletes.push(Deletion {
                    key: key.clone(),
                    at: *at,
                }),
            }
        }
        let later = keys.split_off(fitted);
        cluster.hints.restore(peer, later, Vec::new());
        let mut delivered = true;
        if !records.is_empty() || !deletes.is_empty() {
            let call = Call::replicate(Source::Repair, records.freeze(), deletes);
            let result = cluster.call(&member, &call, None).await;
            delivered = result.is_ok();
            cluster.metrics.peer_call(PeerOp::Repair, delivered);
        }
        for (tag, _) in &tags {
            if !delivered {
                break;
            }
            let call = Call::invalidate_tag(tag.clone());
            let result = cluster.call(&member, &call, None).await;
            cluster.metrics.peer_call(PeerOp::Repair, result.is_ok());
            delivered &= result.is_ok();
        }
        if !delivered {
            cluster.hints.restore(peer, keys, tags);
            return;
        }
        cluster.hints.delivered(peer, &keys, &tags);
        tracing::info!(
            peer,
            keys = keys.len(),
            tags = tags.len(),
            "repaired a replica"
        );
    }
}

/// Sends the member `target` of `ring` every item held here that it owns,
/// in batches within the rebalancing limits.
async fn resync(cluster: &Cluster, ring: &Ring, target: MemberIdx) -> Result<(), PeerError> {
    let settings = cluster.settings;
    let member = ring.member(target);
    let mut cursor = Some(0);
    while let Some(at) = cursor {
        let (batch, next) = cluster.owned_batch(ring, target, at, settings.batch_items, usize::MAX);
        cursor = next;
        if batch.is_empty() {
            continue;
        }
        let call = Call::replicate(Source::Repair, batch.freeze(), Vec::new());
        // No retry here: the repair task comes back every interval.
        let result = cluster.call(member, &call, None).await;
        cluster.metrics.peer_call(PeerOp::Repair, result.is_ok());
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_collapse_per_key_and_restore_keeps_newer() {
        let h = Hints::default();
        h.write("b", "k1", 1);
        h.write("b", "k1", 2);
        h.delete("b", "k2", 5);
        h.invalidate("b", "red", 9);
        assert_eq!(h.pending(), 3);
        let (keys, tags) = h.take("b", 10);
        assert_eq!(keys.len(), 2);
        assert_eq!(tags, vec![("red".to_string(), 9)]);
        let k1 = keys.iter().find(|(k, _)| k == "k1").unwrap();
        assert_eq!(k1.1, KeyHint::Write(2), "the later write's version");
        h.delete("b", "k1", 7); // newer than the write being put back
        h.restore("b", keys, tags);
        assert_eq!(h.pending(), 3);
        let (keys, _) = h.take("b", 10);
        let k1 = keys.iter().find(|(k, _)| k == "k1").unwrap();
        assert_eq!(k1.1, KeyHint::Delete(7));
    }

    /// A repair on its way has not repaired anything yet: the peer stays
    /// behind (no read lease) until it acknowledges, and a failed repair
    /// leaves the hints as they were.
    #[test]
    fn hints_taken_for_a_repair_stay_pending_until_delivered() {
        let h = Hints::default();
        h.write("b", "k1", 1);
        h.invalidate("b", "red", 9);
        let (keys, tags) = h.take("b", 10);
        assert_eq!((keys.len(), tags.len()), (1, 1));
        assert!(h.has_pending("b"), "taken, not yet delivered");
        assert_eq!(h.pending(), 2);
        assert_eq!(h.take("b", 10), (Vec::new(), Vec::new()), "taken once");

        h.restore("b", keys, tags);
        assert!(h.has_pending("b"));
        assert_eq!(h.pending(), 2);

        let (keys, tags) = h.take("b", 10);
        h.write("b", "k2", 3); // written while the repair is on its way
        h.delivered("b", &keys, &tags);
        assert!(h.has_pending("b"), "the later write still waits");
        assert_eq!(h.pending(), 1);
        let (keys, tags) = h.take("b", 10);
        h.delivered("b", &keys, &tags);
        assert!(!h.has_pending("b"));
        assert_eq!(h.pending(), 0);
        assert!(h.peers_with_hints().is_empty());
    }

    /// A key or tag hinted again while its earlier hint is on its way is
    /// one the peer is behind on, not two.
    #[test]
    fn a_key_hinted_again_while_its_repair_is_on_its_way_counts_once() {
        let h = Hints::default();
        h.write("b", "k", 1);
        h.invalidate("b", "red", 2);
        let (keys, tags) = h.take("b", 10);
        h.write("b", "k", 3);
        h.invalidate("b", "red", 4);
        assert_eq!(h.pending(), 2);
        h.delivered("b", &keys, &tags);
        assert_eq!(h.pending(), 2, "the later hints still wait");
        assert!(h.has_pending("b"));
        let (keys, tags) = h.take("b", 10);
        assert_eq!(
            (keys, tags),
            (
                vec![("k".to_string(), KeyHint::Write(3))],
                vec![("red".to_string(), 4)]
            )
        );
    }

    /// What a peer missed is known while its hints are queued and while
    /// they are on their way, and forgotten once delivered: a missed write
    /// kills the copies older than its version, a missed delete those at
    /// or before it, a missed invalidation the copies of its tag made at
    /// or before it.
    #[test]
    fn what_a_peer_missed_is_known_until_it_is_delivered() {
        let h = Hints::default();
        assert_eq!(h.missed_key("b", "k", true), None);
        h.write("b", "k", 10);
        h.delete("b", "gone", 20);
        h.invalidate("b", "red", 30);
        let tags = |t: &[&str]| t.iter().map(|&t| t.to_owned()).collect::<Vec<_>>();
        for on_its_way in [false, true] {
            let taken = on_its_way.then(|| h.take("b", 10));
            assert_eq!(
                h.missed_key("b", "k", true),
                Some(9),
                "on its way: {on_its_way}"
            );
            assert_eq!(h.missed_key("b", "k", false), None, "held here");
            assert_eq!(h.missed_key("b", "gone", false), Some(20));
            assert_eq!(h.missed_key("b", "other", true), None);
            assert_eq!(h.missed_key("c", "k", true), None, "another peer's");
            assert!(h.missed_tag("b", &tags(&["blue", "red"]), 30));
            assert!(!h.missed_tag("b", &tags(&["red"]), 31), "written after");
            assert!(!h.missed_tag("b", &tags(&["blue"]), 1));
            if let Some((keys, tags)) = taken {
                h.delivered("b", &keys, &tags);
            }
        }
        assert_eq!(h.missed_key("b", "k", true), None, "delivered");
        assert!(!h.missed_tag("b", &tags(&["red"]), 0));
    }

    #[test]
    fn hints_are_capped_per_peer_and_an_overflow_asks_for_a_resync() {
        let h = Hints::default();
        for i in 0..MAX_HINTS_PER_PEER + 10 {
            h.write("b", &format!("k{i}"), 1);
        }
        assert_eq!(h.pending(), MAX_HINTS_PER_PEER);
        assert_eq!(h.take_dropped(), 10);
        assert!(h.take_resync("b"), "dropped writes are covered by a resync");
        assert!(!h.take_resync("b"), "once");
        // The resync on its way: still behind, even with no hint left.
        let (keys, tags) = h.take("b", MAX_HINTS_PER_PEER);
        h.delivered("b", &keys, &tags);
        assert!(h.has_pending("b"), "resyncing");
        h.resynced("b", false);
        assert!(h.has_pending("b"), "failed: due again");
        assert!(h.take_resync("b"));
        h.resynced("b", true);
        assert!(!h.has_pending("b"), "resynced");
        assert!(h.peers_with_hints().is_empty());
    }

    #[test]
    fn a_full_queue_keeps_deletes_and_invalidations_over_writes() {
        let h = Hints::default();
        for i in 0..MAX_HINTS_PER_PEER {
            h.write("b", &format!("k{i}"), 1);
        }
        h.delete("b", "gone", 3);
        h.invalidate("b", "red", 4);
        assert_eq!(h.pending(), MAX_HINTS_PER_PEER, "each displaced a write");
        assert_eq!(h.take_dropped(), 2, "two write hints displaced");
        let (keys, tags) = h.take("b", MAX_HINTS_PER_PEER);
        assert!(keys.contains(&("gone".to_string(), KeyHint::Delete(3))));
        assert_eq!(tags, vec![("red".to_string(), 4)]);
        assert!(h.take_resync("b"));
    }
}

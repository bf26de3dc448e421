//! Moving data when the ring changes, so that a ring change loses nothing
//! (DESIGN 3.4).
//!
//! On every new epoch the node *syncs* it:
//! * a node that has not yet pulled as a member (it just started, empty, or
//!   was just added) **pulls**: it asks every other member for the items it
//!   owns under the new ring, batch by batch, and only then reports ready;
//! * any other member **pushes**: it scans its items and sends each one to
//!   the owners that gained it since the ring it last synced (a leaving
//!   member sends everything it holds to the key's new owners). New members
//!   are skipped, since they pull.
//!
//! Batches are sent one at a time per node and each waits for the receiver's
//! answer, which is the backpressure: a slow receiver slows the sender's scan.
//! Once every member reports it has synced the epoch, the cluster has
//! *settled*: the node forgets the previous ring (which kept reads and writes
//! going to old owners too) and drops the keys it no longer owns.
//!
//! The node's [`Progress`] is served on `/api/v1/cluster/rebalance` for the
//! operator, which waits on it before marking joining members active and
//! before removing leaving ones.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distrocache_membership::{MemberState, NodeProgress, SyncPhase};
use futures_util::future::join_all;
use tokio::sync::watch;

use super::Cluster;
use super::metrics::PeerOp;
use super::pace::UntilDone;
use super::ring::{MemberIdx, Ring, RingMember};
use crate::peer::protocol::{RecordBatch, Records, Source};
use crate::peer::{Call, PeerError};

/// Slots a pull answer may look at per request, as a multiple of its item
/// limit: bounds the time one pull request holds the answering node's CPU
/// when the requester owns few of its keys.
const PULL_SCAN_FACTOR: usize = 16;
/// How often settling asks the members how far they got.
const SETTLE_POLL: Duration = Duration::from_millis(250);
/// Slots looked at per store scan step while pushing, pulling or resyncing.
pub(super) const SCAN_STEP: usize = 4096;

/// This node's data-movement state, read by the progress endpoint.
#[derive(Debug, Default)]
pub struct Progress {
    synced_epoch: AtomicU64,
    /// The latest epoch settled here: the previous ring forgotten and the
    /// keys no longer owned dropped.
    settled_epoch: AtomicU64,
    phase: AtomicU8,
    /// Has pulled its keys as a member since it started.
    pulled: AtomicBool,
    /// Pushed everything it held at its synced epoch while leaving.
    handed_off: AtomicBool,
    keys_sent: AtomicU64,
    keys_received: AtomicU64,
    last_sync_micros: AtomicU64,
}

impl Progress {
    pub(super) fn synced_epoch(&self) -> u64 {
        self.synced_epoch.load(Ordering::Acquire)
    }

    /// The latest epoch for which this node forgot the previous ring and
    /// dropped what it no longer owns.
    pub fn settled_epoch(&self) -> u64 {
        self.settled_epoch.load(Ordering::Acquire)
    }

    pub(super) fn pulled(&self) -> bool {
        self.pulled.load(Ordering::Acquire)
    }

    /// As if this node had pulled its keys, for tests of what depends on it.
    #[cfg(test)]
    pub(super) fn mark_pulled(&self) {
        self.pulled.store(true, Ordering::Release);
    }

    fn set_phase(&self, phase: SyncPhase) {
        let n = match phase {
            SyncPhase::Idle => 0,
            SyncPhase::Pulling => 1,
            SyncPhase::Pushing => 2,
        };
        self.phase.store(n, Ordering::Release);
    }

    pub(super) fn phase(&self) -> SyncPhase {
        match self.phase.load(Ordering::Acquire) {
            1 => SyncPhase::Pulling,
            2 => SyncPhase::Pushing,
            _ => SyncPhase::Idle,
        }
    }
}

impl Cluster {
    /// The progress report (`/api/v1/cluster/rebalance`).
    pub fn report(&self) -> NodeProgress {
        let ring = self.ring.current();
        let epoch = ring.as_ref().map_or(0, |r| r.epoch());
        let member_state = ring.as_ref().and_then(|r| r.my_state());
        let p = &self.progress;
        let synced_epoch = p.synced_epoch();
        NodeProgress {
            node_id: self.node_id.clone(),
            epoch,
            synced_epoch,
            member_state,
            phase: p.phase(),
            handoff_complete: member_state == Some(MemberState::Leaving)
                && synced_epoch >= epoch
                && p.handed_off.load(Ordering::Acquire),
            ready: self.is_ready(),
            items: self.store.len() as u64,
            keys_sent: p.keys_sent.load(Ordering::Relaxed),
            keys_received: p.keys_received.load(Ordering::Relaxed),
            last_sync_seconds: p.last_sync_micros.load(Ordering::Relaxed) as f64 / 1e6,
            last_backup: None,
        }
    }

    fn set_phase(&self, phase: SyncPhase) {
        self.progress.set_phase(phase);
        self.metrics.observe_phase(phase);
    }

    /// Counts keys another node pushed here while moving data.
    pub(super) fn count_received(&self, keys: u64) {
        self.progress
            .keys_received
            .fetch_add(keys, Ordering::Relaxed);
        self.metrics.keys_received.inc_by(keys);
    }

    /// Answers a pull: the items `node` owns under the current ring, from
    /// `cursor` on. The peer server has already checked that both sides
    /// hold the same epoch.
    pub fn serve_pull(
        &self,
        node: &str,
        cursor: u64,
        limit: u32,
    ) -> Result<(Records, Option<u64>), String> {
        let ring = self.ring.current().ok_or("no ring held")?;
        let Some(requester) = ring.index_of(node) else {
            return Err(format!("{node:?} is not a member of ring {}", ring.epoch()));
        };
        let limit = (limit as usize).clamp(1, self.settings.batch_items);
        let (batch, next) =
            self.owned_batch(&ring, requester, cursor, limit, limit * PULL_SCAN_FACTOR);
        let served = batch.len() as u64;
        self.progress.keys_sent.fetch_add(served, Ordering::Relaxed);
        self.metrics.keys_sent.inc_by(served);
        Ok((batch.freeze(), next))
    }
}

/// Why a sync stopped before finishing.
#[derive(Debug)]
enum Abort {
    /// A newer ring arrived: sync that one instead.
    RingChanged,
    /// A member could not be reached in time: retry the same epoch later.
    Failed(String),
}

/// Syncs every epoch the node adopts, then waits for the cluster to settle,
/// until `stop` fires.
pub async fn run(cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
    let mut epochs = cluster.subscribe();
    // The ring whose data this node holds: the one it last finished syncing.
    let mut synced: Option<Arc<Ring>> = None;
    let mut pace = UntilDone::new();
    loop {
        let ring = cluster.ring.current();
        let pending = match &ring {
            Some(ring) => synced.as_ref().is_none_or(|s| s.epoch() != ring.epoch()),
            None => false,
        };
        if !pending {
            tokio::select! {
                changed = epochs.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        }
        let ring = ring.expect("pending implies a ring");
        let started = Instant::now();
        cluster.metrics.rebalancing.set(1);
        let outcome = tokio::select! {
            outcome = sync(&cluster, synced.as_deref(), &ring) => outcome,
            _ = stop.changed() => return,
        };
        cluster.metrics.rebalancing.set(0);
        cluster.set_phase(SyncPhase::Idle);
        match outcome {
            Ok(()) => {
                let took = started.elapsed();
                let p = &cluster.progress;
                p.last_sync_micros
                    .store(took.as_micros() as u64, Ordering::Relaxed);
                p.synced_epoch.fetch_max(ring.epoch(), Ordering::AcqRel);
                cluster.metrics.rebalance_seconds.set(took.as_secs_f64());
                cluster.metrics.synced_epoch.set(ring.epoch() as i64);
                cluster.set_ready(true);
                tracing::info!(epoch = ring.epoch(), took = ?took, "synced ring");
                synced = Some(ring.clone());
                pace = UntilDone::new();
                tokio::select! {
                    _ = settle(&cluster, &ring) => {}
                    _ = stop.changed() => return,
                }
            }
            Err(Abort::RingChanged) => {}
            Err(Abort::Failed(reason)) => {
                let pause = pace.next_pause();
                tracing::warn!(epoch = ring.epoch(), %reason, retry_in = ?pause, "data movement failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = epochs.changed() => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Moves what `ring` asks of this node, given that it holds the data of
/// `synced` (`None`: it holds nothing yet).
async fn sync(cluster: &Cluster, synced: Option<&Ring>, ring: &Ring) -> Result<(), Abort> {
    let progress = &cluster.progress;
    let Some(me) = ring.me else {
        // Not a member: nothing is owned here, so nothing to move. The node
        // forwards every request, and drops what it held once the cluster
        // settles; if it is made a member again it must pull like a new one
        // (its peers treat it as new and push it nothing).
        progress.pulled.store(false, Ordering::Release);
        return Ok(());
    };
    let leaving = ring.member(me).state == MemberState::Leaving;
    progress.handed_off.store(false, Ordering::Release);
    if !progress.pulled() {
        // Not ready until its keys are here: joining members receive before
        // they serve, and a restarted one must not be counted as a copy.
        cluster.set_ready(false);
        cluster.set_phase(SyncPhase::Pulling);
        // A node restoring a backup loads the keys it owns; a node back
        // from a snapshot or a backup first learns the deletes it missed.
        cluster
            .load_backup(ring, me)
            .await
            .map_err(|super::restore::Interrupted::RingChanged| Abort::RingChanged)?;
        cluster
            .reconcile_restore(ring, me)
            .await
            .map_err(|super::restore::Interrupted::RingChanged| Abort::RingChanged)?;
        pull_all(cluster, ring, me).await?;
        progress.pulled.store(true, Ordering::Release);
        // A leaving member that restarted owns nothing, so it pulled nothing
        // and holds nothing to hand off: the keys' other owners push them to
        // their new owners.
        progress.handed_off.store(leaving, Ordering::Release);
        return Ok(());
    }
    cluster.set_phase(SyncPhase::Pushing);
    push(cluster, synced, ring, me, leaving).await?;
    progress.handed_off.store(leaving, Ordering::Release);
    Ok(())
}

/// Pulls, from every other member at once, the items this node owns. Every
/// member must answer: one that cannot be reached may hold the only other
/// copy of some keys (it is down for now, or slow), so it is retried, with
/// backoff, until it answers or the ring changes, and meanwhile the node
/// stays not ready and keeps asking the other owners about every local miss.
async fn pull_all(cluster: &Cluster, ring: &Ring, me: MemberIdx) -> Result<(), Abort> {
    let others = ring.others(me);
    let results = join_all(others.iter().map(|m| pull_from(cluster, ring, me, m))).await;
    for (member, result) in others.iter().zip(results) {
        let n = result?;
        tracing::info!(peer = %member.id, items = n, "pulled owned keys");
    }
    Ok(())
}

/// Pulls every item `member` holds that this node owns, page by page,
/// resuming where it broke off when the member stops answering for a while.
async fn pull_from(
    cluster: &Cluster,
    ring: &Ring,
    me: MemberIdx,
    member: &RingMember,
) -> Result<u64, Abort> {
    let node = ring.member(me).id.clone();
    let limit = u32::try_from(cluster.settings.batch_items).unwrap_or(u32::MAX);
    let mut cursor = 0;
    let mut received = 0;
    let mut epochs = cluster.subscribe();
    let mut pace = UntilDone::new();
    loop {
        let call = Call::pull(node.clone(), cursor, limit);
        let page = call_with_retry(cluster, ring, member, PeerOp::Pull, &call).await;
        let (items, next) = match page {
            Ok(page) => page,
            Err(Abort::RingChanged) => return Err(Abort::RingChanged),
            Err(Abort::Failed(reason)) => {
                // Every member must answer (it may hold the only other copy
                // of some keys): wait longer, with the node not ready.
                let pause = pace.next_pause();
                tracing::warn!(
                    peer = %member.id, %reason, retry_in = ?pause,
                    "cannot pull from a member yet; staying not ready until it answers"
                );
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = epochs.changed() => {}
                }
                continue;
            }
        };
        pace = UntilDone::new();
        let records = items.decode().map_err(|e| {
            Abort::Failed(format!("unreadable pull answer from {}: {e}", member.id))
        })?;
        let outcome = cluster.apply_records(&records);
        received += outcome.applied;
        cluster.count_received(outcome.applied);
        match next {
            Some(next) => cursor = next,
            None => return Ok(received),
        }
    }
}

/// Pushes every held item to the owners that gained it (all of its new
/// owners when this member is leaving), batched per receiver.
async fn push(
    cluster: &Cluster,
    synced: Option<&Ring>,
    ring: &Ring,
    me: MemberIdx,
    leaving: bool,
) -> Result<(), Abort> {
    let my_id = &ring.member(me).id;
    // Receivers that pull for themselves: members new since the synced ring.
    let is_new =
        |idx: MemberIdx| synced.is_some_and(|s| s.index_of(&ring.member(idx).id).is_none());
    let mut batches: HashMap<MemberIdx, RecordBatch> = HashMap::new();
    let mut cursor = Some(0);
    let mut sent = 0u64;
    while let Some(at) = cursor {
        if cluster.epoch() != ring.epoch() {
            return Err(Abort::RingChanged);
        }
        let is_full = |b: &RecordBatch| {
            b.len() >= cluster.settings.batch_items || b.size() >= cluster.settings.batch_bytes
        };
        // The scan stops right after an item that fills a receiver's batch,
        // so no batch overshoots its limits by more than that one item.
        cursor = cluster.store.scan_while(at, SCAN_STEP, |item| {
            let key = item.key().as_bytes();
            let owners = ring.owners(key);
            let before = synced.map(|s| s.owners(key));
            let mut filled = false;
            for &target in &owners {
                let id = &ring.member(target).id;
                if id == my_id || is_new(target) {
                    continue;
                }
                let gained = match &before {
                    Some(before) => !before
                        .iter()
                        .any(|&b| synced.expect("before implies synced").member(b).id == *id),
                    None => true,
                };
                if gained || leaving {
                    let batch = batches.entry(target).or_default();
                    batch.push(&item);
                    filled |= is_full(batch);
                }
            }
            if filled {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        let full: Vec<MemberIdx> = batches
            .iter()
            .filter(|(_, b)| is_full(b))
            .map(|(&i, _)| i)
            .collect();
        for target in full {
            let batch = batches.remove(&target).expect("listed");
            sent += send_batch(cluster, ring, target, batch).await?;
        }
    }
    for (target, batch) in batches {
        sent += send_batch(cluster, ring, target, batch).await?;
    }
    if sent > 0 {
        tracing::info!(
            epoch = ring.epoch(),
            keys = sent,
            "pushed keys to their new owners"
        );
    }
    Ok(())
}

async fn send_batch(
    cluster: &Cluster,
    ring: &Ring,
    target: MemberIdx,
    batch: RecordBatch,
) -> Result<u64, Abort> {
    if batch.is_empty() {
        return Ok(0);
    }
    let count = batch.len() as u64;
    let call = Call::replicate(Source::Rebalance, batch.freeze(), Vec::new());
    let member = ring.member(target);
    call_with_retry(cluster, ring, member, PeerOp::Push, &call).await?;
    cluster
        .progress
        .keys_sent
        .fetch_add(count, Ordering::Relaxed);
    cluster.metrics.keys_sent.inc_by(count);
    Ok(count)
}

/// Sends `call` to `member` with the one retry policy while it cannot
/// be reached (see [`Cluster::call_with_retry`]); gives up at once when the
/// ring changes, since the data movement must then be planned again.
async fn call_with_retry<T>(
    cluster: &Cluster,
    ring: &Ring,
    member: &RingMember,
    op: PeerOp,
    call: &Call<T>,
) -> Result<T, Abort> {
    let result = cluster.call_with_retry(member, ring.epoch(), call).await;
    cluster.metrics.peer_call(op, result.is_ok());
    match result {
        Ok(answer) => Ok(answer),
        Err(PeerError::RingChanged { .. }) => Err(Abort::RingChanged),
        Err(e) => Err(Abort::Failed(e.to_string())),
    }
}

/// Waits until every member reports it has synced `ring`'s epoch, then
/// forgets the previous ring and drops the keys this node no longer owns.
/// Returns early (without settling) when the epoch changes.
async fn settle(cluster: &Cluster, ring: &Arc<Ring>) {
    let mut epochs = cluster.subscribe();
    loop {
        if cluster.epoch() != ring.epoch() {
            return;
        }
        if all_synced(cluster, ring).await {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(SETTLE_POLL) => {}
            _ = epochs.changed() => {}
        }
    }
    if cluster.ring.settle(ring.epoch()).is_none() {
        return;
    }
    let me = ring.me;
    // A leaving member keeps its copy until it is removed: reads that race
    // the ring change may still find it here.
    if me.is_none_or(|me| ring.member(me).state != MemberState::Leaving) {
        let dropped = cluster
            .store
            .retain(|key| me.is_some_and(|me| ring.is_owner(key.as_bytes(), me)));
        tracing::info!(
            epoch = ring.epoch(),
            dropped,
            "cluster settled; dropped keys no longer owned"
        );
    }
    // Only now: `settled` in the cluster view promises both.
    cluster
        .progress
        .settled_epoch
        .fetch_max(ring.epoch(), Ordering::AcqRel);
}

async fn all_synced(cluster: &Cluster, ring: &Ring) -> bool {
    let others = ring.members.iter().filter(|m| m.id != cluster.node_id);
    let calls = others.map(|m| {
        cluster
            .peers
            .progress(m.address, Some(Duration::from_secs(2)))
    });
    join_all(calls)
        .await
        .into_iter()
        .all(|answer| answer.is_ok_and(|p| p.synced_epoch >= ring.epoch()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::cluster::Cluster;
    use crate::store::{ItemView, Store, StoreConfig};

    fn cluster(items: usize, shards: usize, batch_items: usize) -> Arc<Cluster> {
        cluster_of(items, shards, batch_items, b"1", 4 << 20)
    }

    fn cluster_of(
        items: usize,
        shards: usize,
        batch_items: usize,
        value: &[u8],
        batch_bytes: usize,
    ) -> Arc<Cluster> {
        let store = Arc::new(Store::with_config(StoreConfig {
            max_items: 100_000,
            shards,
            default_ttl: Duration::from_secs(3600),
            ..StoreConfig::default()
        }));
        for i in 0..items {
            store
                .set(
                    &format!("item:{i}"),
                    value,
                    &["t".to_string()],
                    None,
                    |_| (),
                )
                .unwrap();
        }
        crate::cluster::testing::two_members(store, batch_items, batch_bytes)
    }

    /// A pull answer stops at the batch byte limit, overshooting it by at
    /// most one item, however many items one scan step would reach.
    #[test]
    fn a_pull_answer_stays_within_the_byte_limit() {
        let value = format!("\"{}\"", "v".repeat(10_000));
        let batch_bytes = 64 * 1024;
        let c = cluster_of(2000, 4, 1000, value.as_bytes(), batch_bytes);
        let mut cursor = 0;
        let (mut pages, mut items) = (0, 0);
        loop {
            let (page, next) = c.serve_pull("b", cursor, 1000).unwrap();
            assert!(
                page.size() <= batch_bytes + value.len() + 512,
                "a {} byte answer",
                page.size()
            );
            items += page.len();
            pages += 1;
            match next {
                Some(next) => cursor = next,
                None => break,
            }
        }
        assert!(
            items > 500 && pages > items / 8,
            "{items} items in {pages} pages"
        );
    }

    /// Pulling page by page returns every item the requester owns, once.
    #[test]
    fn a_pull_returns_every_owned_item() {
        for (items, shards, batch) in [
            (18_000, 64, 1000),
            (5000, 8, 7),
            (300, 64, 1000),
            (0, 4, 10),
        ] {
            let c = cluster(items, shards, batch);
            let mut seen = std::collections::HashSet::new();
            let mut cursor = 0;
            for page in 0.. {
                assert!(page < 100_000, "the pull makes progress");
                let (items, next) = c.serve_pull("b", cursor, batch as u32).unwrap();
                for r in items.decode().unwrap() {
                    assert!(seen.insert(r.key().to_string()), "{} sent twice", r.key());
                }
                match next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
            assert_eq!(
                seen.len(),
                items,
                "{items} items in {shards} shards, batches of {batch}"
            );
        }
    }
}

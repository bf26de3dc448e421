//! Keeping the owners of a key alike: replicating a coordinator's writes and
//! deletes to the other owners, applying what peers send, and the fan-outs
//! that reach every member (tag invalidation, stats, copies of a key).

use std::ops::ControlFlow;

use futures_util::future::join_all;
use serde::Serialize;
use smallvec::SmallVec;

use super::Cluster;
use super::metrics::PeerOp;
use super::ring::{Ring, RingMember};
use super::routing::Replicas;
use crate::peer::protocol::{
    Deletion, LocalInvalidation, NodeStats, RecordRef, Records, ReplicateOutcome, Source,
};
use crate::peer::{Call, PeerError, Request};
use crate::store::{Applied, ItemView, UnixNanos};

/// A tag invalidation, as the client sees it: the seed's `tag` and
/// `invalidated`, and in a cluster how it went over the members.
#[derive(Debug, Clone, Serialize)]
pub struct TagInvalidation {
    pub tag: String,
    /// Distinct items invalidated (each counted by its primary).
    pub invalidated: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<InvalidationSpread>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InvalidationSpread {
    /// Copies removed, replicas included.
    pub removed_copies: u64,
    /// Members asked, this node included.
    pub nodes: usize,
    /// Members that could not be reached; they get the invalidation when
    /// they answer again.
    pub unreachable: Vec<String>,
}

/// Every member's stats and their sums (`/api/v1/cluster/stats`).
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStats {
    pub epoch: u64,
    pub totals: Totals,
    pub nodes: Vec<NodeStats>,
    pub unreachable: Vec<String>,
}

impl ClusterStats {
    /// A single node's stats, as a one-member cluster.
    pub fn single(local: NodeStats) -> Self {
        let totals = Totals {
            hits: local.hits,
            misses: local.misses,
            sets: local.sets,
            deletes: local.deletes,
            evictions: local.evictions,
            expirations: local.expirations,
            tag_invalidations: local.tag_invalidations,
            items: local.items,
            bytes: local.bytes,
            hit_ratio: local.hit_ratio,
        };
        Self {
            epoch: 0,
            totals,
            nodes: vec![local],
            unreachable: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub hits: u64,
    pub misses: u64,
    pub sets: u64,
    pub deletes: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub tag_invalidations: u64,
    pub items: u64,
    pub bytes: u64,
    pub hit_ratio: f64,
}

/// Which members hold a copy of a key (`/api/v1/cluster/copies`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Copies {
    pub key: String,
    pub epoch: u64,
    /// The key's owners under the ring held, primary first.
    pub owners: Vec<String>,
    /// Members holding a copy, with its version (the coordinator's write
    /// time, nanoseconds since the epoch).
    pub copies: Vec<Copy>,
    pub unreachable: Vec<String>,
}

impl Copies {
    /// A single node's copy of `key`, if it holds one.
    pub fn single(node_id: &str, key: &str, meta: Option<crate::store::ItemMeta>) -> Self {
        Self {
            key: key.to_owned(),
            epoch: 0,
            owners: vec![node_id.to_owned()],
            copies: meta
                .map(|meta| Copy {
                    node: node_id.to_owned(),
                    created_at: meta.created_at,
                    expires_at: meta.expires_at,
                })
                .into_iter()
                .collect(),
            unreachable: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Copy {
    pub node: String,
    pub created_at: UnixNanos,
    pub expires_at: UnixNanos,
}

impl Cluster {
    /// Sends `items` and `deletes` for `key` to its other owners and waits
    /// for them. An owner that cannot be reached does not fail the write: it
    /// is hinted for repair, and before this returns (and the client is
    /// answered) any read lease this node granted it has run out. If a
    /// replica holds a newer ring, this node adopts it and sends to the
    /// owners that ring adds. `keeper`: an owner that stores the write
    /// itself before its client is answered (it forwarded the write here,
    /// see `keepers`), which is neither sent it nor hinted, nor waited for.
    /// Returns what the replicas did.
    pub async fn replicate(
        &self,
        key: &str,
        items: Records,
        deletes: &[Deletion],
        keeper: Option<&str>,
    ) -> ReplicateOutcome {
        // The items moved, not cloned: the first clone of frozen bytes
        // allocates.
        let call = Call::replicate(Source::Write, items, deletes.to_vec());
        let mut total = ReplicateOutcome::default();
        // The owners handled in earlier rounds. Filled only when the ring
        // changes under the write, so the usual write copies no id.
        let mut handled: Vec<String> = Vec::new();
        let mut hinted: Vec<String> = Vec::new();
        let mut hint = |id: &str| {
            if deletes.is_empty() {
                // The version the write stores, read from its record only
                // when a replica missed it.
                let version = match call.request() {
                    Request::Replicate { items, .. } => {
                        items.single().map_or(0, |r| r.meta().created_at)
                    }
                    _ => 0,
                };
                self.hints.write(id, key, version);
            } else {
                for d in deletes {
                    self.hints.delete(id, &d.key, d.at);
                }
            }
            hinted.push(id.to_owned());
        };
        for round in 0.. {
            let Some(rings) = self.ring.rings() else {
                break;
            };
            let mut targets = self.replicas(&rings, key);
            targets.retain(|m| Some(m.id.as_str()) != keeper && !handled.contains(&m.id));
            if targets.is_empty() {
                break;
            }
            if round == 3 {
                // The ring changed on every round while this write was on
                // its way: leave the owners still missing it to the repair
                // queue rather than chase a ring that keeps moving.
                for t in &targets {
                    hint(&t.id);
                }
                break;
            }
            let calls = targets.iter().map(|m| self.call(m, &call, None));
            let mut answered = Replicas::new();
            for (&target, result) in targets.iter().zip(join_calls(calls).await) {
                if matches!(result, Err(PeerError::RingChanged { .. })) {
                    continue;
                }
                self.metrics.peer_call(PeerOp::Replicate, result.is_ok());
                answered.push(target);
                match result {
                    Ok(outcome) => total += outcome,
                    Err(e) => {
                        tracing::warn!(peer = %target.id, key, error = %e, "replica unreachable; the write will be repaired when it answers");
                        hint(&target.id);
                    }
                }
            }
            if answered.len() == targets.len() {
                break;
            }
            // A replica holds a newer ring, now adopted here: send to the
            // owners it adds.
            handled.extend(answered.iter().map(|m| m.id.clone()));
        }
        self.leases.wait_out(&hinted).await;
        total
    }

    /// Applies items sent by another node (replication, rebalancing, repair,
    /// pulls), unless a newer version is held, they were deleted since, or
    /// this node does not own them. Ownership is by the current ring or,
    /// while data still moves, the previous one: a node that has settled
    /// drops what it no longer owns, and must not take such keys back from
    /// a coordinator that has not settled yet (the key's current owners get
    /// the same write), or the copy would linger unowned.
    pub(super) fn apply_records(&self, records: &[RecordRef<'_>]) -> ReplicateOutcome {
        let mut outcome = ReplicateOutcome::default();
        let guard = self.ring.load();
        let owned = |key: &str| {
            guard.as_ref().is_some_and(|r| {
                r.both()
                    .any(|ring| ring.me.is_some_and(|me| ring.is_owner(key.as_bytes(), me)))
            })
        };
        for r in records {
            let meta = r.meta();
            if !owned(r.key())
                || self
                    .tombstones
                    .buries(r.key(), meta.created_at, r.tag_list())
            {
                outcome.stale += 1;
                continue;
            }
            match self
                .store
                .put_replica(r.key(), r.value(), r.tag_list(), meta)
            {
                Ok(Applied::Created) => outcome.applied += 1,
                Ok(Applied::Replaced) => {
                    outcome.applied += 1;
                    outcome.replaced += 1;
                }
                Ok(Applied::Stale) => {
                    if meta.expires_at <= self.store.now() {
                        self.drop_older(r.key(), meta.created_at);
                    }
                    outcome.stale += 1;
                }
                Err(e) => {
                    tracing::warn!(key = %r.key(), error = %e, "refused an item from a peer");
                    self.drop_older(r.key(), meta.created_at);
                    outcome.refused += 1;
                }
            }
        }
        outcome
    }

    /// Removes a copy of `key` held here that is older than a version of
    /// it this node could not store (refused, or expired on its way): the
    /// older copy must not be served in its place. Without it, reads go to
    /// an owner holding the newer one (a replica's miss is not believed).
    pub(super) fn drop_older(&self, key: &str, than: UnixNanos) {
        self.store.delete_replica(key, than.saturating_sub(1));
    }

    /// Applies deletes sent by the key's coordinator.
    pub(super) fn apply_deletes(&self, deletes: &[Deletion]) -> u64 {
        let mut deleted = 0;
        for d in deletes {
            self.tombstones.deleted(&d.key, d.at);
            deleted += u64::from(self.store.delete_replica(&d.key, d.at));
        }
        deleted
    }

    /// Applies a replicate request: the items, then the deletes.
    pub fn apply_replicate(
        &self,
        source: Source,
        records: &[RecordRef<'_>],
        deletes: &[Deletion],
    ) -> ReplicateOutcome {
        let mut outcome = self.apply_records(records);
        outcome.deleted = self.apply_deletes(deletes);
        if source == Source::Rebalance {
            self.count_received(outcome.applied);
        }
        outcome
    }

    /// A client's delete that this node coordinates: remember it (so copies
    /// in flight cannot revive the key) and send it to the other owners.
    /// Returns whether any replica held the key.
    pub async fn replicate_delete(&self, key: &str, at: UnixNanos) -> bool {
        self.tombstones.deleted(key, at);
        let deletes = [Deletion {
            key: key.to_owned(),
            at,
        }];
        self.replicate(key, Records::default(), &deletes, None)
            .await
            .deleted
            > 0
    }

    /// Removes the tag's items here, counting those this node is the primary of.
    pub fn invalidate_locally(&self, tag: &str) -> LocalInvalidation {
        let at = self.store.now();
        self.tombstones.invalidated(tag, at);
        let ring = self.ring.current();
        let (removed, primary) = self.store.invalidate_tag_counting(tag, |key| {
            ring.as_ref().is_some_and(|r| {
                r.me.is_some() && r.owners(key.as_bytes()).first() == r.me.as_ref()
            })
        });
        LocalInvalidation {
            removed: removed as u64,
            primary: primary as u64,
        }
    }

    /// Invalidates `tag` on every member. A member that cannot be reached is
    /// named in the answer, gets the invalidation when it answers again, and
    /// has stopped serving reads before this returns.
    pub async fn invalidate_everywhere(&self, tag: &str) -> TagInvalidation {
        let at = self.store.now();
        let local = self.invalidate_locally(tag);
        let others = self.other_members();
        let call = Call::invalidate_tag(tag.to_owned());
        let calls = others.iter().map(|m| self.call(m, &call, None));
        let (mut removed, mut primary) = (local.removed, local.primary);
        let mut unreachable = Vec::new();
        for (member, result) in others.iter().zip(join_all(calls).await) {
            self.metrics.peer_call(PeerOp::FanOut, result.is_ok());
            match result {
                Ok(a) => {
                    removed += a.removed;
                    primary += a.primary;
                }
                Err(e) => {
                    tracing::warn!(peer = %member.id, tag, error = %e, "member unreachable; the invalidation will be repaired when it answers");
                    self.hints.invalidate(&member.id, tag, at);
                    unreachable.push(member.id.clone());
                }
            }
        }
        self.leases.wait_out(&unreachable).await;
        TagInvalidation {
            tag: tag.to_owned(),
            invalidated: primary,
            cluster: Some(InvalidationSpread {
                removed_copies: removed,
                nodes: others.len() + 1,
                unreachable,
            }),
        }
    }

    /// Every member's stats and their sums, `local` being this node's.
    pub async fn cluster_stats(&self, local: NodeStats) -> ClusterStats {
        let others = self.other_members();
        let epoch = self.epoch();
        let calls = others.iter().map(|m| self.peers.stats(m.address));
        let mut nodes = vec![local];
        let mut unreachable = Vec::new();
        for (member, result) in others.iter().zip(join_all(calls).await) {
            self.metrics.peer_call(PeerOp::FanOut, result.is_ok());
            match result {
                Ok(s) => nodes.push(s),
                Err(_) => unreachable.push(member.id.clone()),
            }
        }
        let mut t = Totals::default();
        for n in &nodes {
            t.hits += n.hits;
            t.misses += n.misses;
            t.sets += n.sets;
            t.deletes += n.deletes;
            t.evictions += n.evictions;
            t.expirations += n.expirations;
            t.tag_invalidations += n.tag_invalidations;
            t.items += n.items;
            t.bytes += n.bytes;
        }
        t.hit_ratio = if t.hits + t.misses == 0 {
            0.0
        } else {
            t.hits as f64 / (t.hits + t.misses) as f64
        };
        ClusterStats {
            epoch,
            totals: t,
            nodes,
            unreachable,
        }
    }

    /// Which members hold a copy of `key`, asking every member (this one
    /// included) without touching the key.
    pub async fn copies(&self, key: &str) -> Copies {
        let epoch = self.epoch();
        let owners = self
            .ring
            .current()
            .map(|ring| {
                ring.owners(key.as_bytes())
                    .iter()
                    .map(|&i| ring.member(i).id.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut copies = Vec::new();
        if let Some(meta) = self.store.peek(key, |item| item.meta()) {
            copies.push(Copy {
                node: self.node_id.clone(),
                created_at: meta.created_at,
                expires_at: meta.expires_at,
            });
        }
        let others = self.other_members();
        let calls = others.iter().map(|m| self.peers.fetch(m.address, key));
        let mut unreachable = Vec::new();
        for (member, result) in others.iter().zip(join_all(calls).await) {
            self.metrics.peer_call(PeerOp::Fetch, result.is_ok());
            match result {
                Ok(Some(record)) => {
                    if let Ok(r) = record.single() {
                        let meta = r.meta();
                        copies.push(Copy {
                            node: member.id.clone(),
                            created_at: meta.created_at,
                            expires_at: meta.expires_at,
                        });
                    }
                }
                Ok(None) => {}
                Err(_) => unreachable.push(member.id.clone()),
            }
        }
        Copies {
            key: key.to_owned(),
            epoch,
            owners,
            copies,
            unreachable,
        }
    }

    /// Every member of the current and previous rings but this node.
    pub(super) fn other_members(&self) -> Vec<RingMember> {
        let Some(rings) = self.ring.rings() else {
            return Vec::new();
        };
        let mut out: Vec<RingMember> = Vec::new();
        for ring in rings.both() {
            for m in &ring.members {
                if m.id != self.node_id && !out.iter().any(|o| o.id == m.id) {
                    out.push(m.clone());
                }
            }
        }
        out
    }

    /// Sends the member `target` of `ring` every item held here that it owns
    /// (a resync, or a pull answered), in batches within the rebalancing
    /// limits, starting at slot `cursor`; returns the batch and where to go
    /// on (`None`: the store has been scanned through).
    pub(super) fn owned_batch(
        &self,
        ring: &Ring,
        target: usize,
        cursor: u64,
        limit: usize,
        scan_budget: usize,
    ) -> (crate::peer::protocol::RecordBatch, Option<u64>) {
        let max_bytes = self.settings.batch_bytes;
        let mut batch = crate::peer::protocol::RecordBatch::default();
        let mut cursor = Some(cursor);
        let mut budget = scan_budget;
        let full =
            |b: &crate::peer::protocol::RecordBatch| b.len() >= limit || b.size() >= max_bytes;
        while let Some(at) = cursor {
            if full(&batch) || budget == 0 {
                break;
            }
            let step = budget.min(super::rebalance::SCAN_STEP);
            // Stop right after the item that fills the batch: a batch
            // overshoots its byte limit by at most one item, which the
            // receiver's message bound allows for.
            cursor = self.store.scan_while(at, step, |item| {
                if ring.is_owner(item.key().as_bytes(), target) {
                    batch.push(&item);
                    if full(&batch) {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            });
            budget -= step;
        }
        (batch, cursor)
    }
}

/// Awaits `calls` together, their outputs in their order. A write at rf 2
/// has one replica, whose call is awaited as it is: `join_all` allocates
/// twice (its futures, their outputs), and this is on every write's path.
async fn join_calls<F: Future>(
    mut calls: impl ExactSizeIterator<Item = F>,
) -> SmallVec<[F::Output; 2]> {
    if calls.len() == 1
        && let Some(only) = calls.next()
    {
        return smallvec::smallvec![only.await];
    }
    join_all(calls).await.into()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::cluster::testing::{self, Version};
    use crate::store::{Store, StoreConfig};

    /// A version of a key this node cannot store (too large for its byte
    /// budget) takes an older copy held here with it: reads then go to the
    /// owner holding the newer one instead of being served the old value.
    /// A copy newer than the refused version stays.
    #[tokio::test]
    async fn a_refused_version_removes_only_an_older_copy() {
        let store = Arc::new(Store::with_config(StoreConfig {
            max_items: 100,
            max_bytes: 4096,
            default_ttl: Duration::from_secs(3600),
            shards: 1,
        }));
        let c = testing::two_members(store.clone(), 100, 1 << 20);
        let held = || store.peek("k", |item| item.meta().created_at);
        let refused_at = |created_at: u64| {
            let large = format!("\"{}\"", "v".repeat(8192));
            let records = Version::at(created_at, large.as_bytes()).records();
            c.apply_records(&records.decode().unwrap())
        };

        store
            .set("k", b"\"old\"", &[] as &[String], None, |_| ())
            .unwrap();
        let old = held().expect("written");
        assert_eq!(refused_at(old - 1).refused, 1);
        assert_eq!(held(), Some(old), "a refused older version changes nothing");
        assert_eq!(refused_at(old + 1).refused, 1);
        assert_eq!(held(), None, "the copy a newer version replaced is gone");
    }

    /// A write kept from its coordinator's answer that expired on its way
    /// is not stored, and does not leave the older copy it replaced in its
    /// place (this node may serve reads of the key); a newer copy stays.
    #[tokio::test]
    async fn a_kept_write_that_expired_on_its_way_takes_the_older_copy_with_it() {
        let store = Arc::new(Store::with_config(StoreConfig {
            max_items: 100,
            default_ttl: Duration::from_secs(3600),
            shards: 1,
            ..StoreConfig::default()
        }));
        let c = testing::two_members(store.clone(), 100, 1 << 20);
        let held = || store.peek("k", |item| item.meta().created_at);
        let now = store.now();
        let expired = |created_at: u64| Version {
            value: b"\"new\"".to_vec(),
            created_at,
            expires_at: now - 1,
        };

        store
            .set("k", b"\"old\"", &[] as &[String], None, |_| ())
            .unwrap();
        let old = held().expect("written");
        let kept = c.keep("k", &expired(old - 1).records(), c.epoch()).await;
        assert_eq!(kept.applied, 0);
        assert_eq!(held(), Some(old), "a copy newer than the write stays");
        let kept = c.keep("k", &expired(old + 1).records(), c.epoch()).await;
        assert_eq!(kept.applied, 0);
        assert_eq!(held(), None, "the copy the expired write replaced is gone");
    }
}

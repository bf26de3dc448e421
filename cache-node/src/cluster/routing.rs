//! Client requests in a cluster: which owner serves a key, forwarding to it,
//! replicating a write to the other owners, recovering a key that is still
//! on its way during a move, and the fan-outs (tag invalidation, stats).
//!
//! The API calls [`Cluster::route`] first; `Routed::Local` means "this node
//! is the one to serve it", and the API then uses the store as a single node
//! would, calling back here to replicate a write.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use futures_util::future::join_all;
use parking_lot::Mutex;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use super::Cluster;
use super::metrics::PeerOp;
use super::peer::{PeerError, PeerResponse};
use super::ring::{MemberIdx, Ring, RingMember};
use super::wire::{self, Deletion, LocalInvalidation, Record, RecordBatch, ReplicateOutcome};
use crate::store::{Applied, UnixNanos};

/// Characters left as they are in a path segment: RFC 3986 "unreserved".
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A key or tag as one percent-encoded path segment.
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// What a client request on one key needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Served by the first serving owner; other owners are fallbacks.
    Read,
    /// Coordinated by the primary, which replicates to the other owners.
    Write,
}

/// Where a request went.
#[derive(Debug)]
pub enum Routed {
    /// This node is the one to serve it.
    Local,
    /// Another node served it; relay its answer.
    Remote {
        answer: PeerResponse,
        served_by: String,
    },
}

/// Why no node could serve a request.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("this node has not received its cluster ring yet")]
    NoRing,
    #[error("the ring has no member that owns keys")]
    NoOwners,
    #[error("no owner of this key can be reached (tried {0})")]
    Unreachable(String),
    /// A forwarded write reached its owner but no answer came back: it may
    /// or may not have been applied, so it is not sent to another owner
    /// (which would apply it a second time and answer for the first).
    #[error(
        "the key's owner {owner} took the write but did not answer ({reason}); it may have been applied: read the key to find out, or retry (writes are idempotent)"
    )]
    Uncertain { owner: String, reason: String },
}

/// One candidate to serve a request.
#[derive(Debug, Clone)]
struct Target {
    ring: Arc<Ring>,
    idx: MemberIdx,
}

impl Target {
    fn member(&self) -> &RingMember {
        self.ring.member(self.idx)
    }
}

/// Members that recently failed to answer, tried last for a short while so
/// that one dead owner does not add a connect timeout to every request.
#[derive(Default)]
pub struct PeerHealth {
    down_until: Mutex<Vec<(String, Instant)>>,
}

const DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(2);

impl PeerHealth {
    fn mark_down(&self, id: &str) {
        let until = Instant::now() + DOWN_FOR;
        let mut down = self.down_until.lock();
        down.retain(|(d, _)| d != id);
        down.push((id.to_owned(), until));
    }

    fn mark_up(&self, id: &str) {
        let mut down = self.down_until.lock();
        if !down.is_empty() {
            down.retain(|(d, _)| d != id);
        }
    }

    fn is_down(&self, id: &str) -> bool {
        let down = self.down_until.lock();
        !down.is_empty()
            && down
                .iter()
                .any(|(d, until)| d == id && *until > Instant::now())
    }
}

impl Cluster {
    /// The candidates to serve `key`, in the order to try them.
    fn plan(&self, key: &str, access: Access) -> Result<Vec<Target>, RouteError> {
        let rings = self.rings().ok_or(RouteError::NoRing)?;
        let current = &rings.current;
        let owners = current.owners(key.as_bytes());
        if owners.is_empty() {
            return Err(RouteError::NoOwners);
        }
        let mut plan: Vec<Target> = Vec::with_capacity(owners.len() + 2);
        let push = |plan: &mut Vec<Target>, ring: &Arc<Ring>, idx: MemberIdx| {
            let id = &ring.member(idx).id;
            if !plan.iter().any(|t| &t.member().id == id) {
                plan.push(Target {
                    ring: ring.clone(),
                    idx,
                });
            }
        };
        match access {
            // Joining members own their keys but may not hold them yet: they
            // serve reads only when no active owner can.
            Access::Read => {
                for &i in owners.iter().filter(|&&i| current.member(i).serves()) {
                    push(&mut plan, current, i);
                }
                for &i in &owners {
                    push(&mut plan, current, i);
                }
            }
            Access::Write => {
                for &i in &owners {
                    push(&mut plan, current, i);
                }
            }
        }
        if let Some(previous) = &rings.previous {
            for i in previous.owners(key.as_bytes()) {
                push(&mut plan, previous, i);
            }
        }
        // Recently unreachable members last (stable among themselves).
        if plan.iter().any(|t| self.health.is_down(&t.member().id)) {
            plan.sort_by_key(|t| self.health.is_down(&t.member().id));
        }
        Ok(plan)
    }

    /// Whether a read of `key` is this node's to serve: what [`Self::route`]
    /// answers `Local` for without asking anyone.
    pub fn serves_here(&self, key: &str) -> bool {
        self.plan(key, Access::Read)
            .is_ok_and(|plan| plan.first().is_some_and(|t| t.member().id == self.node_id))
    }

    /// Sends a client request on `key` to the node that should serve it:
    /// `Local` when that is this node, otherwise the answer of the first owner
    /// that could be reached, in plan order. `path` is the peer API path that
    /// serves the request as an owner (e.g. `/internal/v1/cache/{key}`).
    pub async fn route(
        &self,
        key: &str,
        access: Access,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Routed, RouteError> {
        let mut tried = Vec::new();
        // The owner of a write replicates it before answering, one more peer
        // call of up to the peer timeout: the forward waits for that too, so
        // that a slow replica does not make this node give up on an owner
        // that is about to answer.
        let timeout = match access {
            Access::Read => None,
            Access::Write => Some(2 * self.peers.settings().request_timeout),
        };
        // A peer with a newer ring makes us adopt it and plan again; bound
        // the replanning so two flapping rings cannot loop forever.
        for _ in 0..3 {
            let mut replan = false;
            for target in self.plan(key, access)? {
                let member = target.member();
                if member.id == self.node_id {
                    return Ok(Routed::Local);
                }
                let result = self
                    .call(member, method.clone(), path, body.clone(), timeout)
                    .await;
                match result {
                    Ok(answer) if !answer.status.is_server_error() => {
                        self.health.mark_up(&member.id);
                        self.metrics.peer_call(PeerOp::Forward, true);
                        let served_by = answer
                            .headers
                            .get(wire::SERVED_BY_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(&member.id)
                            .to_owned();
                        return Ok(Routed::Remote { answer, served_by });
                    }
                    Err(PeerError::RingChanged { .. }) => {
                        replan = true;
                        break;
                    }
                    Ok(answer) => {
                        self.metrics.peer_call(PeerOp::Forward, false);
                        tracing::warn!(peer = %member.id, status = %answer.status, "owner failed a forwarded request; trying the next");
                        tried.push(member.id.clone());
                    }
                    Err(e) => {
                        self.metrics.peer_call(PeerOp::Forward, false);
                        if e.is_unavailable() {
                            self.health.mark_down(&member.id);
                        }
                        // Reads may go anywhere; a write goes on to the
                        // next owner only if the first never received it.
                        if access == Access::Write && e.may_have_acted() {
                            tracing::warn!(peer = %member.id, error = %e, "owner took a write without answering");
                            return Err(RouteError::Uncertain {
                                owner: member.id.clone(),
                                reason: e.to_string(),
                            });
                        }
                        tracing::warn!(peer = %member.id, error = %e, "owner unreachable; trying the next");
                        tried.push(member.id.clone());
                    }
                }
            }
            if !replan {
                break;
            }
        }
        Err(RouteError::Unreachable(if tried.is_empty() {
            "none".into()
        } else {
            tried.join(", ")
        }))
    }

    /// The other members a write or delete of `key` must reach: every owner
    /// in the current ring and, while data moves, in the previous one.
    fn replicas(&self, key: &str) -> Vec<Target> {
        let Ok(plan) = self.plan(key, Access::Write) else {
            return Vec::new();
        };
        plan.into_iter()
            .filter(|t| t.member().id != self.node_id)
            .collect()
    }

    /// Sends `records` and `deletes` for `key` to its other owners and waits
    /// for them. An owner that cannot be reached does not fail the write: it
    /// is hinted for repair (see `repair`). If a replica holds a newer ring,
    /// this node adopts it and sends to the owners that ring adds. Returns
    /// what the replicas did.
    pub async fn replicate(
        &self,
        key: &str,
        records: &RecordBatch,
        deletes: &[Deletion],
    ) -> ReplicateOutcome {
        let body = Bytes::from(wire::replicate_body(records, deletes));
        let mut total = ReplicateOutcome::default();
        let mut handled: Vec<String> = Vec::new();
        let hint = |id: &str| {
            if deletes.is_empty() {
                self.hints.write(id, key);
            } else {
                for d in deletes {
                    self.hints.delete(id, &d.key, d.at);
                }
            }
        };
        let unhandled = |handled: &[String]| -> Vec<Target> {
            self.replicas(key)
                .into_iter()
                .filter(|t| !handled.contains(&t.member().id))
                .collect()
        };
        for round in 0.. {
            let targets = unhandled(&handled);
            if targets.is_empty() {
                break;
            }
            if round == 3 {
                // The ring changed on every round while this write was on
                // its way: leave the owners still missing it to the repair
                // queue rather than chase a ring that keeps moving.
                for t in &targets {
                    hint(&t.member().id);
                }
                break;
            }
            let calls = targets.iter().map(|t| {
                self.call(
                    t.member(),
                    Method::POST,
                    "/internal/v1/replicate",
                    body.clone(),
                    None,
                )
            });
            let mut ring_changed = false;
            for (target, result) in targets.iter().zip(join_all(calls).await) {
                let id = &target.member().id;
                if matches!(result, Err(PeerError::RingChanged { .. })) {
                    ring_changed = true;
                    continue;
                }
                let outcome = match result {
                    Ok(answer) if answer.status.is_success() => {
                        serde_json::from_slice::<ReplicateOutcome>(&answer.body).ok()
                    }
                    _ => None,
                };
                self.metrics.peer_call(PeerOp::Replicate, outcome.is_some());
                handled.push(id.clone());
                match outcome {
                    Some(o) => {
                        total.applied += o.applied;
                        total.replaced += o.replaced;
                        total.stale += o.stale;
                        total.refused += o.refused;
                        total.deleted += o.deleted;
                    }
                    None => {
                        tracing::warn!(peer = %id, key, "replica unreachable; the write will be repaired when it answers");
                        hint(id);
                    }
                }
            }
            if !ring_changed {
                break;
            }
        }
        total
    }

    /// Applies items sent by another node (replication, rebalancing, repair,
    /// pulls), unless a newer version is held, they were deleted since, or
    /// this node does not own them. Ownership is by the current ring or,
    /// while data still moves, the previous one: a node that has settled
    /// drops what it no longer owns, and must not take such keys back from
    /// a coordinator that has not settled yet (the key's current owners get
    /// the same write), or the copy would linger unowned.
    pub fn apply_records(&self, records: &[Record<'_>]) -> ReplicateOutcome {
        let mut outcome = ReplicateOutcome::default();
        let rings = self.rings();
        let owned = |key: &str| {
            rings.as_ref().is_some_and(|r| {
                let mine =
                    |ring: &Ring| ring.me.is_some_and(|me| ring.is_owner(key.as_bytes(), me));
                mine(&r.current) || r.previous.as_deref().is_some_and(mine)
            })
        };
        for r in records {
            if !owned(&r.key) || self.tombstones.buries(&r.key, r.created_at, &r.tags) {
                outcome.stale += 1;
                continue;
            }
            match self
                .store
                .put_replica(&r.key, r.value.get().as_bytes(), &r.tags, r.meta())
            {
                Ok(Applied::Created) => outcome.applied += 1,
                Ok(Applied::Replaced) => {
                    outcome.applied += 1;
                    outcome.replaced += 1;
                }
                Ok(Applied::Stale) => outcome.stale += 1,
                Err(e) => {
                    tracing::warn!(key = %r.key, error = %e, "refused an item from a peer");
                    outcome.refused += 1;
                }
            }
        }
        outcome
    }

    /// Applies deletes sent by the key's coordinator.
    pub fn apply_deletes(&self, deletes: &[Deletion]) -> u64 {
        let mut deleted = 0;
        for d in deletes {
            self.tombstones.deleted(&d.key, d.at);
            deleted += u64::from(self.store.delete_replica(&d.key, d.at));
        }
        deleted
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
        self.replicate(key, &RecordBatch::default(), &deletes)
            .await
            .deleted
            > 0
    }

    /// After a local miss while data is moving: asks the key's other owners
    /// (current and previous) for it and stores it here if one has it.
    /// Returns whether the key is held here now. That is checked in the
    /// store, not taken from whether this call wrote it: while a pull runs,
    /// the pull may store the same version between the miss and this call's
    /// write (which then finds it stale), and the key is there all the same.
    /// A ring change met on the way (moves come with them) means asking the
    /// new ring's owners, not giving up.
    pub async fn recover(&self, key: &str) -> bool {
        let held = || self.store.peek(key, |_| ()).is_some();
        if !self.is_moving() {
            return false;
        }
        if held() {
            return true;
        }
        let path = format!("/internal/v1/items/{}", encode_segment(key));
        for _ in 0..3 {
            let mut replan = false;
            for target in self.replicas(key) {
                let answer = self
                    .call(target.member(), Method::GET, &path, Bytes::new(), None)
                    .await;
                self.metrics.peer_call(PeerOp::Fetch, answer.is_ok());
                let answer = match answer {
                    Ok(answer) if answer.status == StatusCode::OK => answer,
                    Err(PeerError::RingChanged { .. }) => {
                        replan = true;
                        break;
                    }
                    _ => continue,
                };
                if let Ok(record) = serde_json::from_slice::<Record<'_>>(&answer.body) {
                    self.apply_records(std::slice::from_ref(&record));
                }
                if held() {
                    return true;
                }
            }
            if !replan {
                break;
            }
        }
        held()
    }

    /// Removes the tag's items here, counting those this node is the primary of.
    pub fn invalidate_locally(&self, tag: &str) -> LocalInvalidation {
        let at = self.store.now();
        self.tombstones.invalidated(tag, at);
        let rings = self.rings();
        let (removed, primary) = self.store.invalidate_tag_counting(tag, |key| {
            rings.as_ref().is_some_and(|r| {
                r.current.me.is_some()
                    && r.current.owners(key.as_bytes()).first() == r.current.me.as_ref()
            })
        });
        LocalInvalidation {
            removed: removed as u64,
            primary: primary as u64,
        }
    }

    /// Invalidates `tag` on every member. A member that cannot be reached is
    /// named in the answer and gets the invalidation when it answers again.
    pub async fn invalidate_everywhere(&self, tag: &str) -> Value {
        let at = self.store.now();
        let local = self.invalidate_locally(tag);
        let path = format!("/internal/v1/invalidate/tag/{}", encode_segment(tag));
        let others = self.other_members();
        let calls = others
            .iter()
            .map(|m| self.call(m, Method::POST, &path, Bytes::new(), None));
        let (mut removed, mut primary) = (local.removed, local.primary);
        let mut unreachable = Vec::new();
        for (member, result) in others.iter().zip(join_all(calls).await) {
            let answer = result
                .ok()
                .filter(|a| a.status.is_success())
                .and_then(|a| serde_json::from_slice::<LocalInvalidation>(&a.body).ok());
            self.metrics.peer_call(PeerOp::FanOut, answer.is_some());
            match answer {
                Some(a) => {
                    removed += a.removed;
                    primary += a.primary;
                }
                None => {
                    self.hints.invalidate(&member.id, tag, at);
                    unreachable.push(member.id.clone());
                }
            }
        }
        json!({
            "tag": tag,
            "invalidated": primary,
            "removed_copies": removed,
            "nodes": others.len() + 1,
            "unreachable": unreachable,
        })
    }

    /// Every node's `/api/v1/stats`, and their sums.
    pub async fn cluster_stats(&self, local: Value) -> Value {
        let others = self.other_members();
        let calls = others.iter().map(|m| {
            self.peers.send(
                m.address,
                Method::GET,
                "/internal/v1/stats",
                self.epoch(),
                Bytes::new(),
                None,
            )
        });
        let mut nodes = vec![local];
        let mut unreachable = Vec::new();
        for (member, result) in others.iter().zip(join_all(calls).await) {
            let stats = result
                .ok()
                .filter(|a| a.status.is_success())
                .and_then(|a| serde_json::from_slice::<Value>(&a.body).ok());
            self.metrics.peer_call(PeerOp::FanOut, stats.is_some());
            match stats {
                Some(s) => nodes.push(s),
                None => unreachable.push(member.id.clone()),
            }
        }
        let mut totals = serde_json::Map::new();
        for field in [
            "hits",
            "misses",
            "sets",
            "deletes",
            "evictions",
            "expirations",
            "tag_invalidations",
            "items",
            "bytes",
        ] {
            let sum: u64 = nodes.iter().filter_map(|n| n[field].as_u64()).sum();
            totals.insert(field.into(), sum.into());
        }
        let (hits, misses) = (
            totals["hits"].as_u64().unwrap_or(0),
            totals["misses"].as_u64().unwrap_or(0),
        );
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        totals.insert("hit_ratio".into(), json!(ratio));
        json!({
            "epoch": self.epoch(),
            "totals": totals,
            "nodes": nodes,
            "unreachable": unreachable,
        })
    }

    /// Every member of the current and previous rings but this node.
    pub(super) fn other_members(&self) -> Vec<RingMember> {
        let Some(rings) = self.rings() else {
            return Vec::new();
        };
        let mut out: Vec<RingMember> = Vec::new();
        let rings = std::iter::once(&rings.current).chain(rings.previous.as_ref());
        for ring in rings {
            for m in &ring.members {
                if m.id != self.node_id && !out.iter().any(|o| o.id == m.id) {
                    out.push(m.clone());
                }
            }
        }
        out
    }
}

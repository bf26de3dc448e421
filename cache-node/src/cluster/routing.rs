//! Which member serves a client request on a key, and forwarding it there.
//!
//! * Reads: the key's *read primary* (its first active owner) serves it:
//!   from its own copy while it holds read leases (see `leases`: it then
//!   holds every acknowledged write of the key), otherwise after asking the
//!   other owners for anything newer (see `reconcile`). Another owner serves
//!   it too, from its own copy, while it holds read leases. Anyone else
//!   forwards it, to the read primary first and then to the other owners if
//!   that one cannot be reached.
//! * Writes and deletes: the key's primary coordinates them (applies, then
//!   replicates to the other owners before answering); anyone else
//!   forwards them there. A write goes to the next owner only when the
//!   primary certainly never received it.
//!
//! Members that recently failed to answer are tried last for a short while,
//! so one dead owner does not add a connect timeout to every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::http::StatusCode;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::Cluster;
use super::leases::LEASE;
use super::metrics::PeerOp;
use super::ring::{MemberIdx, Ring, RingMember};
use super::ring_state::Rings;
use crate::peer::{Call, PeerError};

/// What a client request on one key needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Served by the first serving owner; other owners are fallbacks.
    Read,
    /// Coordinated by the primary, which replicates to the other owners.
    Write,
}

/// Where a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRoute {
    /// Here, as the key's read primary. `reconcile`: this node holds no
    /// read lease, so it may have missed writes of the key (a ring change
    /// made it the primary, or a write went to another owner while it could
    /// not be reached, or data moves): it asks the other owners for anything
    /// newer first (see `reconcile`).
    Primary { reconcile: bool },
    /// Here, as a replica holding read leases, if the key is held; a miss
    /// is forwarded (the replica may have evicted what the primary keeps).
    Replica,
    /// By another member.
    Forward,
}

/// Where a request went.
#[derive(Debug)]
pub enum Routed<T> {
    /// This node is the one to serve it.
    Local,
    /// Another node served it.
    Remote { served_by: String, answer: T },
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
    /// The owner refused the request (a client error, such as a value too
    /// large for its budget): the answer the client gets.
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
}

/// One candidate to serve a request: a member of the current ring or, while
/// data moves, of the previous one.
type Target<'a> = (&'a Arc<Ring>, MemberIdx);

/// The candidates of one request, most owners being 2 or 3 per ring.
type Plan<'a> = SmallVec<[Target<'a>; 6]>;

/// The other owners of a key a write must reach: one or two in the usual
/// ring (rf 2 or 3), twice that while data moves.
pub(super) type Replicas<'a> = SmallVec<[&'a RingMember; 4]>;

fn member<'a>(target: &Target<'a>) -> &'a RingMember {
    target.0.member(target.1)
}

/// Members that recently failed to answer, until when.
#[derive(Default)]
pub struct PeerHealth {
    /// Whether the list may hold anyone: read on every request, so the
    /// usual case (nobody down) takes no lock.
    any: AtomicBool,
    down_until: Mutex<Vec<(String, Instant)>>,
}

const DOWN_FOR: Duration = Duration::from_secs(2);

impl PeerHealth {
    pub(super) fn mark_down(&self, id: &str) {
        let until = Instant::now() + DOWN_FOR;
        let mut down = self.down_until.lock();
        down.retain(|(d, _)| d != id);
        down.push((id.to_owned(), until));
        self.any.store(true, Ordering::Release);
    }

    pub(super) fn mark_up(&self, id: &str) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut down = self.down_until.lock();
        down.retain(|(d, _)| d != id);
        self.any.store(!down.is_empty(), Ordering::Release);
    }

    pub(super) fn is_down(&self, id: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        self.down_until
            .lock()
            .iter()
            .any(|(d, until)| d == id && *until > now)
    }
}

impl Cluster {
    /// The candidates to serve `key`, in the order to try them.
    fn plan<'a>(
        &self,
        rings: &'a Rings,
        key: &str,
        access: Access,
    ) -> Result<Plan<'a>, RouteError> {
        let current = &rings.current;
        let owners = current.owners(key.as_bytes());
        if owners.is_empty() {
            return Err(RouteError::NoOwners);
        }
        // A key's owners in one ring are distinct members, so the current
        // ring's go in as they are; only the previous ring's are checked
        // against them, by id (a member has its own index in each ring).
        // Every client request plans, and this keeps string comparisons off
        // the settled ring's path.
        let mut plan = Plan::new();
        let in_current = |&i: &MemberIdx| (current, i);
        match access {
            // Joining members own their keys but may not hold them yet: they
            // serve reads only when no active owner can.
            Access::Read => {
                let serves = |&&i: &&MemberIdx| current.member(i).serves();
                plan.extend(owners.iter().filter(serves).map(in_current));
                plan.extend(owners.iter().filter(|i| !serves(i)).map(in_current));
            }
            Access::Write => plan.extend(owners.iter().map(in_current)),
        }
        if let Some(previous) = &rings.previous {
            for i in previous.owners(key.as_bytes()) {
                let id = &previous.member(i).id;
                if !plan.iter().any(|t| &member(t).id == id) {
                    plan.push((previous, i));
                }
            }
        }
        // Recently unreachable members last (stable among themselves).
        if plan.iter().any(|t| self.health.is_down(&member(t).id)) {
            plan.sort_by_key(|t| self.health.is_down(&member(t).id));
        }
        Ok(plan)
    }

    /// Where a read of `key` is served.
    pub fn read_route(&self, key: &str) -> ReadRoute {
        match self.ring.load().as_ref() {
            Some(rings) => self.read_route_in(rings, key),
            None => ReadRoute::Forward,
        }
    }

    /// [`Self::read_route`] in one snapshot of the rings: the plan, whether
    /// data moves and the lease's epoch all come from `rings`.
    fn read_route_in(&self, rings: &Rings, key: &str) -> ReadRoute {
        let Ok(plan) = self.plan(rings, key, Access::Read) else {
            return ReadRoute::Forward;
        };
        if member(&plan[0]).id == self.node_id {
            return ReadRoute::Primary {
                reconcile: !self.holds_read_lease_in(rings),
            };
        }
        // The plan holds the current ring's owners (a member of it named by
        // its index in that ring): whether this node is one needs no second
        // placement of the key.
        let current = &rings.current;
        let replica = current.me.is_some_and(|me| {
            current.member(me).serves()
                && plan
                    .iter()
                    .any(|&(ring, idx)| Arc::ptr_eq(ring, current) && idx == me)
        });
        if replica && self.holds_read_lease_in(rings) {
            ReadRoute::Replica
        } else {
            ReadRoute::Forward
        }
    }

    /// Whether this node is one of the owners a write of `key` must reach,
    /// but not its coordinator.
    pub(super) fn is_replica_of(&self, key: &str) -> bool {
        let guard = self.ring.load();
        guard.as_ref().is_some_and(|rings| {
            self.plan(rings, key, Access::Write)
                .is_ok_and(|plan| plan.iter().skip(1).any(|t| member(t).id == self.node_id))
        })
    }

    /// Sends a client request on `key` to the member that should serve it,
    /// taking the answer its call is due: `Local` when that is this node,
    /// otherwise the answer of the first owner that could be reached, in
    /// plan order. An owner's refusal of a client error (4xx) is the
    /// answer; a server error or no answer sends a read to the next owner,
    /// and a write too if the owner certainly never received it.
    ///
    /// `make_call` builds the peer call, and runs only if one is sent (once,
    /// whichever owners are tried): a request served here costs no copy of
    /// its key, value and tags.
    pub async fn route<T>(
        &self,
        key: &str,
        access: Access,
        make_call: impl Fn() -> Call<T>,
    ) -> Result<Routed<T>, RouteError> {
        // The owner of a write replicates it before answering: the forward
        // waits for that too.
        let timeout = match access {
            Access::Read => None,
            Access::Write => Some(self.forwarded_write_timeout()),
        };
        let mut tried = Vec::new();
        let mut built = None;
        // A peer with a newer ring makes us adopt it and plan again; bound
        // the replanning so two flapping rings cannot loop forever.
        for _ in 0..3 {
            let rings = self.ring.rings().ok_or(RouteError::NoRing)?;
            let plan = self.plan(&rings, key, access)?;
            let mut replan = false;
            for target in &plan {
                let member = member(target);
                if member.id == self.node_id {
                    return Ok(Routed::Local);
                }
                let call = built.get_or_insert_with(&make_call);
                match self.call(member, call, timeout).await {
                    Ok(answer) => {
                        self.health.mark_up(&member.id);
                        self.metrics.peer_call(PeerOp::Forward, true);
                        return Ok(Routed::Remote {
                            served_by: member.id.clone(),
                            answer,
                        });
                    }
                    Err(PeerError::RingChanged { .. }) => {
                        replan = true;
                        break;
                    }
                    Err(PeerError::Status {
                        status, message, ..
                    }) if status.is_client_error() => {
                        self.health.mark_up(&member.id);
                        self.metrics.peer_call(PeerOp::Forward, true);
                        return Err(RouteError::Refused { status, message });
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
                        tracing::warn!(peer = %member.id, error = %e, "owner could not serve a forwarded request; trying the next");
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

    /// How long a forwarded write may take: the owner replicates before it
    /// answers (up to one peer timeout), and may wait for a lease it granted
    /// a replica it could not reach to run out.
    pub(super) fn forwarded_write_timeout(&self) -> Duration {
        2 * self.settings.peer.request_timeout + LEASE
    }

    /// Member `id` of the current ring or, while data moves, the previous
    /// one.
    pub(super) fn member_by_id(&self, id: &str) -> Option<RingMember> {
        let rings = self.ring.rings()?;
        rings
            .both()
            .find_map(|ring| ring.index_of(id).map(|idx| ring.member(idx).clone()))
    }

    /// The other members a write or delete of `key` must reach: every owner
    /// in `rings`' current ring and, while data moves, in the previous one.
    /// Borrowed from `rings`, not cloned: every write asks for them.
    pub(super) fn replicas<'a>(&self, rings: &'a Rings, key: &str) -> Replicas<'a> {
        let Ok(plan) = self.plan(rings, key, Access::Write) else {
            return Replicas::new();
        };
        plan.iter()
            .map(member)
            .filter(|m| m.id != self.node_id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use distrocache_membership::MemberState;

    use super::*;
    use crate::cluster::testing;
    use crate::store::Store;

    /// A ring of `members` as node "a" sees it, rf 2.
    fn ring(epoch: u64, members: &[(&str, MemberState)]) -> Arc<Ring> {
        Arc::new(Ring::new(
            Arc::new(testing::membership(epoch, members)),
            "a",
        ))
    }

    /// Node "a" (see `testing::two_members`), whose routing the tests call
    /// with rings of their own.
    fn node_a() -> Arc<Cluster> {
        testing::two_members(
            Arc::new(Store::with_config(Default::default())),
            100,
            1 << 20,
        )
    }

    /// `current` alone (settled), and with `previous` (data moving).
    fn settled_and_moving(current: &Arc<Ring>, previous: &Arc<Ring>) -> (Rings, Rings) {
        let settled = Rings {
            current: current.clone(),
            previous: None,
        };
        let moving = Rings {
            current: current.clone(),
            previous: Some(previous.clone()),
        };
        (settled, moving)
    }

    fn ids(ring: &Ring, idx: &[MemberIdx]) -> Vec<String> {
        idx.iter().map(|&i| ring.member(i).id.clone()).collect()
    }

    fn plan_ids(cluster: &Cluster, rings: &Rings, key: &str, access: Access) -> Vec<String> {
        let plan = cluster.plan(rings, key, access).expect("owners");
        plan.iter().map(|t| member(t).id.clone()).collect()
    }

    /// The plan holds every candidate once: for a read the current ring's
    /// active owners, then its joining ones; for a write its owners in
    /// placement order; then, while data moves, the previous ring's owners
    /// that are not already in it.
    #[tokio::test]
    async fn a_plan_lists_each_candidate_once_in_the_order_to_try_them() {
        use MemberState::{Active, Joining};
        let cluster = node_a();
        let current = ring(3, &[("a", Active), ("b", Joining), ("c", Active)]);
        let previous = ring(2, &[("a", Active), ("c", Active), ("d", Active)]);
        let (settled, moving) = settled_and_moving(&current, &previous);
        let (mut joining_owned, mut added, mut already_in) = (0, 0, 0);
        for i in 0..200 {
            let key = format!("key:{i}");
            let owners = current.owners(key.as_bytes());
            let (active, joining): (Vec<MemberIdx>, Vec<MemberIdx>) =
                owners.iter().partition(|&&o| current.member(o).serves());
            joining_owned += joining.len();
            let read = [ids(&current, &active), ids(&current, &joining)].concat();
            let write = ids(&current, &owners);
            assert_eq!(plan_ids(&cluster, &settled, &key, Access::Read), read);
            assert_eq!(plan_ids(&cluster, &settled, &key, Access::Write), write);

            let (already, earlier): (Vec<String>, Vec<String>) =
                ids(&previous, &previous.owners(key.as_bytes()))
                    .into_iter()
                    .partition(|id| write.contains(id));
            (added, already_in) = (added + earlier.len(), already_in + already.len());
            assert_eq!(
                plan_ids(&cluster, &moving, &key, Access::Read),
                [read, earlier.clone()].concat()
            );
            let plan = plan_ids(&cluster, &moving, &key, Access::Write);
            assert_eq!(plan, [write, earlier].concat());
            let mut unique = plan.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), plan.len(), "{key}: {plan:?}");
        }
        // Every case came up: a joining owner (read order), and previous
        // owners both added and already planned.
        assert!(joining_owned > 0 && added > 0 && already_in > 0);
    }

    /// An owner serves a read from its own copy as it is only while it is
    /// active and holds a lease for the epoch of the rings the read was
    /// planned in, and no data moves. Without, a replica forwards it and a
    /// primary serves it after reconciling its copy with the other owners'.
    #[tokio::test]
    async fn a_replica_serves_reads_only_under_a_lease_for_the_planned_epoch() {
        use MemberState::{Active, Joining};
        let cluster = node_a();
        let current = ring(3, &[("a", Active), ("b", Active), ("c", Active)]);
        let previous = ring(2, &[("a", Active), ("b", Active)]);
        let (settled, moving) = settled_and_moving(&current, &previous);
        // This node has pulled its keys: only a previous ring means data moves.
        cluster.progress.mark_pulled();
        let route = |rings: &Rings, key: &str| cluster.read_route_in(rings, key);
        let (mut primary, mut replica, mut other) = (0, 0, 0);
        for i in 0..200 {
            let key = format!("key:{i}");
            let owners = ids(&current, &current.owners(key.as_bytes()));
            cluster.leases.drop_held();
            if owners[0] == "a" {
                primary += 1;
                let primary_route = |reconcile| ReadRoute::Primary { reconcile };
                assert_eq!(route(&settled, &key), primary_route(true), "no lease");
                cluster.leases.hold_as_granted(2);
                assert_eq!(route(&settled, &key), primary_route(true), "another epoch");
                cluster.leases.hold_as_granted(3);
                assert_eq!(route(&settled, &key), primary_route(false));
                assert_eq!(route(&moving, &key), primary_route(true), "data moves");
            } else if owners.contains(&"a".to_owned()) {
                replica += 1;
                assert_eq!(route(&settled, &key), ReadRoute::Forward, "no lease");
                cluster.leases.hold_as_granted(2);
                assert_eq!(
                    route(&settled, &key),
                    ReadRoute::Forward,
                    "a lease for another epoch"
                );
                cluster.leases.hold_as_granted(3);
                assert_eq!(route(&settled, &key), ReadRoute::Replica);
                assert_eq!(route(&moving, &key), ReadRoute::Forward, "data moves");
            } else {
                other += 1;
                cluster.leases.hold_as_granted(3);
                assert_eq!(route(&settled, &key), ReadRoute::Forward);
            }
        }
        assert!(primary > 0 && replica > 0 && other > 0);

        // A joining owner may not hold a key yet: it serves none of its
        // reads itself, whatever lease it holds.
        let joining = ring(3, &[("a", Joining), ("b", Active), ("c", Active)]);
        let joining = Rings {
            current: joining,
            previous: None,
        };
        cluster.leases.hold_as_granted(3);
        let mut owned = 0;
        for i in 0..200 {
            let key = format!("key:{i}");
            let ring = &joining.current;
            if ids(ring, &ring.owners(key.as_bytes())).contains(&"a".to_owned()) {
                owned += 1;
                assert_eq!(route(&joining, &key), ReadRoute::Forward, "{key}");
            }
        }
        assert!(owned > 0);
    }

    /// A forwarded write whose owner took it and then went silent (the
    /// connection closed before an answer) is not sent on to the next
    /// owner, which would apply it a second time: it is uncertain. A read in
    /// the same situation goes on, and so does a write the owner certainly
    /// never got (nothing listens where it should be).
    #[tokio::test]
    async fn a_write_an_owner_took_without_answering_is_not_sent_on() {
        use std::sync::atomic::AtomicUsize;

        use bytes::Bytes;

        use crate::peer::testing::{fake_peer_for_each, read_frame};
        use MemberState::Active;

        // "b" takes peer connections, reads one request on each (counting
        // them), and hangs up without answering it.
        let received = Arc::new(AtomicUsize::new(0));
        let counted = received.clone();
        let (silent, _) = fake_peer_for_each(move |mut socket| {
            let counted = counted.clone();
            async move {
                if read_frame(&mut socket, &mut Default::default())
                    .await
                    .is_some()
                {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await;
        let cluster = node_a();
        let mut doc = testing::membership(2, &[("a", Active), ("b", Active)]);
        let unreachable = doc.members[1].address.clone();
        doc.members[1].address = silent.to_string();
        cluster.adopt(doc.clone());
        let rings = cluster.rings().unwrap();
        let key = (0..1000)
            .map(|i| format!("key:{i}"))
            .find(|k| plan_ids(&cluster, &rings, k, Access::Write)[0] == "b")
            .expect("b is the primary of some key");
        let write = crate::exec::Write {
            value: Bytes::from_static(b"1"),
            ttl: None,
            tags: Vec::new(),
        };
        let set = Call::set(key.clone(), write, None);
        match cluster.route(&key, Access::Write, || set.clone()).await {
            Err(RouteError::Uncertain { owner, .. }) => assert_eq!(owner, "b"),
            Err(e) => panic!("a write b took without answering: {e}"),
            Ok(_) => panic!("a write b took without answering was served"),
        }
        assert_eq!(received.load(Ordering::SeqCst), 1, "b got the write");

        // "b" failed, so it is tried last for a while: forget that, so that
        // each request below goes to "b" first.
        cluster.health.mark_up("b");
        let get = Call::get(key.clone());
        let read = cluster.route(&key, Access::Read, || get.clone()).await;
        assert!(matches!(read, Ok(Routed::Local)), "{read:?}");
        assert_eq!(received.load(Ordering::SeqCst), 2, "b got the read first");

        // Nothing listens where "b" is now: the write never left, and this
        // node, the next owner, serves it.
        doc.members[1].address = unreachable;
        doc.epoch = 3;
        cluster.adopt(doc);
        cluster.health.mark_up("b");
        let write = cluster.route(&key, Access::Write, || set.clone()).await;
        assert!(matches!(write, Ok(Routed::Local)), "{write:?}");
        assert!(cluster.health.is_down("b"), "b was tried first");
    }
}

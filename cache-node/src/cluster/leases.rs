//! Read leases: when a replica may serve reads of the keys it owns itself,
//! instead of sending them to the key's primary.
//!
//! A replica may answer a read only if it holds every acknowledged write of
//! the key. Writes reach replicas before the client is answered (from the
//! coordinator, or, for a replica that forwarded the write, in the
//! coordinator's answer: see `keepers`), except when a replica cannot be
//! reached: then the coordinator answers anyway and
//! leaves a *hint* to repair the replica later (see `repair`), and until the
//! repair lands that replica is behind. It cannot know that on its own (the
//! hint lives with the coordinator), so it asks: every [`RENEW_EVERY`] it
//! asks every other member for a lease, and serves reads of its replicated
//! keys only while it holds one from all of them, for the ring epoch it
//! holds, while settled, active and ready.
//!
//! A member grants a lease for [`LEASE`] only while it holds no hint for the
//! asker, and records until when it granted it. A coordinator that fails to
//! reach a replica records the hint first (no lease is granted after that)
//! and then, before it answers its client, waits until the lease it last
//! granted that replica has run out. So once a client has been told a write
//! succeeded, every replica that missed it has stopped serving reads of it,
//! until repaired.
//!
//! The clocks: the holder counts its lease from the moment it *sent* the
//! request, the grantor from the moment it *answered* it, which is later;
//! so the holder's lease always ends first (given clocks that advance at
//! the same rate). A node that restarts has forgotten what it granted, so
//! it treats every member as holding a lease for [`LEASE`] after it starts.
//! A ring change ends every lease the node holds (they were granted for an
//! epoch); a member that cannot be reached grants nothing, so while any
//! member is down, replicas send their reads to primaries, as without
//! leases.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distrocache_membership::MemberState;
use futures_util::future::join_all;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::Cluster;
use super::metrics::PeerOp;
use super::ring_state::Rings;
use crate::peer::Call;

/// How long a lease lasts.
pub const LEASE: Duration = Duration::from_secs(2);
/// How often a replica renews its leases: often enough that a lease never
/// lapses while every member answers.
pub const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How long a renewal waits for a member's answer.
const RENEW_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Leases {
    origin: Instant,
    /// Holder side: replicated keys may be read here until this many
    /// nanoseconds after `origin`, while the ring epoch is `held_epoch`.
    held_until: AtomicU64,
    held_epoch: AtomicU64,
    /// Grantor side: until when each member holds a lease from this node.
    granted: Mutex<HashMap<String, Instant>>,
    /// Until this instant every member counts as holding a lease from this
    /// node (one it may have granted before it restarted).
    granted_before_start: Instant,
    /// The members that did not grant this node a lease at its last
    /// renewal (refused, or did not answer in time): they may hold hints for
    /// it (writes, deletes or tag invalidations it missed), so a read it
    /// serves without a lease asks them too (see `reconcile`). Kept while
    /// the node does not renew (data moving): hints do not go with epochs.
    refused_by: Mutex<Vec<String>>,
}

impl Default for Leases {
    fn default() -> Self {
        let origin = Instant::now();
        Self {
            origin,
            held_until: AtomicU64::new(0),
            held_epoch: AtomicU64::new(0),
            granted: Mutex::new(HashMap::new()),
            granted_before_start: origin + LEASE,
            refused_by: Mutex::new(Vec::new()),
        }
    }
}

impl Leases {
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether this node holds leases from every member for `epoch` now.
    pub(super) fn held(&self, epoch: u64) -> bool {
        self.held_epoch.load(Ordering::Acquire) == epoch
            && self.nanos(Instant::now()) < self.held_until.load(Ordering::Acquire)
    }

    /// Records leases from every member for `epoch`, counted from `asked`.
    fn hold(&self, epoch: u64, asked: Instant) {
        // Epoch first: a reader that sees the new end sees its epoch.
        self.held_until.store(0, Ordering::Release);
        self.held_epoch.store(epoch, Ordering::Release);
        self.held_until
            .store(self.nanos(asked + LEASE), Ordering::Release);
    }

    /// As if every member had just granted leases for `epoch`, for tests
    /// of what depends on them.
    #[cfg(test)]
    pub(super) fn hold_as_granted(&self, epoch: u64) {
        self.hold(epoch, Instant::now());
    }

    /// Ends the leases this node holds (the ring changed).
    pub(super) fn drop_held(&self) {
        self.held_until.store(0, Ordering::Release);
    }

    /// The members that did not grant this node a lease at its last
    /// renewal.
    pub(super) fn refused_by(&self) -> Vec<String> {
        self.refused_by.lock().clone()
    }

    /// Grants `member` a lease if `allowed` says it may have one, checked
    /// under the same lock [`Self::granted_until`] reads, so a hint recorded
    /// before `granted_until` is asked can never be followed by a grant.
    pub(super) fn grant_if(&self, member: &str, allowed: impl FnOnce() -> bool) -> bool {
        let mut granted = self.granted.lock();
        if !allowed() {
            return false;
        }
        let until = Instant::now() + LEASE;
        granted.insert(member.to_owned(), until);
        true
    }

    /// Until when `member` may hold a lease granted by this node.
    pub(super) fn granted_until(&self, member: &str) -> Instant {
        let granted = self.granted.lock().get(member).copied();
        granted.map_or(self.granted_before_start, |g| {
            g.max(self.granted_before_start)
        })
    }

    /// Waits until none of `members` can hold a lease from this node any
    /// more. Called after hinting them, before answering the client.
    pub(super) async fn wait_out(&self, members: &[String]) {
        let until = members.iter().map(|m| self.granted_until(m)).max();
        if let Some(until) = until
            && until > Instant::now()
        {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

impl Cluster {
    /// Whether this node may grant `member` a read lease: it is an active
    /// member of the ring held, and this node holds no hint for it.
    pub fn grant_lease(&self, member: &str) -> bool {
        let active = self.ring.current().is_some_and(|ring| {
            ring.index_of(member)
                .is_some_and(|i| ring.member(i).state == MemberState::Active)
        });
        active
            && self
                .leases
                .grant_if(member, || !self.hints.has_pending(member))
    }

    /// Whether this node may serve reads of keys it holds as a replica.
    pub fn holds_read_lease(&self) -> bool {
        self.ring
            .load()
            .as_ref()
            .is_some_and(|rings| self.holds_read_lease_in(rings))
    }

    /// [`Self::holds_read_lease`], for the rings of a snapshot already
    /// loaded: a read decided on one snapshot checks its lease against that
    /// snapshot's epoch, not against a ring adopted since.
    pub(super) fn holds_read_lease_in(&self, rings: &Rings) -> bool {
        rings.previous.is_none() && self.leases.held(rings.current.epoch())
    }

    /// Asks every other member for a lease; holds them if all grant one.
    async fn renew_leases(&self) {
        let Some(ring) = self.ring.current() else {
            return;
        };
        let epoch = ring.epoch();
        let eligible = ring.my_state() == Some(MemberState::Active)
            && self.is_ready()
            && self.ring.is_settled();
        if !eligible {
            self.leases.drop_held();
            self.metrics.read_lease.set(0);
            return;
        }
        let asked = Instant::now();
        let others: Vec<_> = ring
            .members
            .iter()
            .filter(|m| m.id != self.node_id)
            .collect();
        let call = Call::lease(self.node_id.clone());
        let answers = join_all(
            others
                .iter()
                .map(|m| self.peers.ask(m.address, epoch, &call, Some(RENEW_TIMEOUT))),
        )
        .await;
        let mut all = true;
        let mut refused_by = Vec::new();
        for (member, answer) in others.iter().zip(answers) {
            let granted = matches!(answer, Ok(true));
            self.metrics.peer_call(PeerOp::Lease, answer.is_ok());
            // Refused, or no answer: it may hold hints for this node. A
            // misdirected answer (it holds another ring, mid-change) says
            // nothing either way; every member is asked again next time.
            if matches!(&answer, Ok(false)) || answer.as_ref().is_err_and(|e| e.is_unavailable()) {
                refused_by.push(member.id.clone());
            }
            all &= granted;
        }
        *self.leases.refused_by.lock() = refused_by;
        if all && self.ring.epoch() == epoch && self.ring.is_settled() {
            self.leases.hold(epoch, asked);
            self.metrics.read_lease.set(1);
        } else {
            self.metrics
                .read_lease
                .set(i64::from(self.holds_read_lease()));
        }
    }
}

/// Renews this node's leases until `stop` fires.
pub async fn run(cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(RENEW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        cluster.renew_leases().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_held_for_its_epoch_until_it_runs_out() {
        let leases = Leases::default();
        assert!(!leases.held(1));
        leases.hold(1, Instant::now());
        assert!(leases.held(1));
        assert!(!leases.held(2), "another epoch");
        leases.drop_held();
        assert!(!leases.held(1));
        leases.hold(1, Instant::now() - LEASE);
        assert!(!leases.held(1), "run out");
    }

    /// A node grants a lease only to an active member of the ring it holds
    /// for which it holds no hint: a joining member may not hold its keys
    /// yet, a hinted one has missed writes, and a stranger owns nothing.
    #[tokio::test]
    async fn a_lease_goes_only_to_an_active_member_with_no_hint_pending() {
        use crate::cluster::testing;
        let cluster = testing::two_members(
            std::sync::Arc::new(crate::store::Store::with_config(Default::default())),
            100,
            1 << 20,
        );
        assert!(cluster.grant_lease("b"));
        assert!(!cluster.grant_lease("z"), "not a member");
        for (epoch, state) in [(2, MemberState::Joining), (3, MemberState::Leaving)] {
            cluster.adopt(testing::membership(
                epoch,
                &[("a", MemberState::Active), ("b", state)],
            ));
            assert!(!cluster.grant_lease("b"), "{state:?}");
        }
        cluster.adopt(testing::membership(
            4,
            &[("a", MemberState::Active), ("b", MemberState::Active)],
        ));
        assert!(cluster.grant_lease("b"));
        cluster.hints.write("b", "k", 1);
        assert!(!cluster.grant_lease("b"), "a hint pending");
    }

    #[test]
    fn a_grant_is_refused_when_not_allowed_and_a_restart_counts_as_granted() {
        let leases = Leases::default();
        // Just started: every member may still hold a lease from before.
        assert!(leases.granted_until("b") >= leases.granted_before_start);
        assert!(!leases.grant_if("b", || false));
        assert!(leases.grant_if("b", || true));
        assert!(leases.granted_until("b") >= Instant::now() + LEASE - Duration::from_millis(100));
    }
}

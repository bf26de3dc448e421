//! Prometheus metrics of cluster mode: the ring, peer traffic, replication
//! repairs and data movement. Registered in the node's registry next to the
//! store's metrics, so one scrape of `/metrics` shows both.

use distrocache_membership::SyncPhase;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::ring::Ring;

/// Peer operations, the `operation` label of the peer counters.
#[derive(Debug, Clone, Copy)]
pub enum PeerOp {
    Forward,
    Replicate,
    Push,
    Pull,
    FanOut,
    Repair,
    Fetch,
    Lease,
    Reconcile,
}

impl PeerOp {
    const ALL: [PeerOp; 9] = [
        PeerOp::Forward,
        PeerOp::Replicate,
        PeerOp::Push,
        PeerOp::Pull,
        PeerOp::FanOut,
        PeerOp::Repair,
        PeerOp::Fetch,
        PeerOp::Lease,
        PeerOp::Reconcile,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            PeerOp::Forward => "forward",
            PeerOp::Replicate => "replicate",
            PeerOp::Push => "push",
            PeerOp::Pull => "pull",
            PeerOp::FanOut => "fan_out",
            PeerOp::Repair => "repair",
            PeerOp::Fetch => "fetch",
            PeerOp::Lease => "lease",
            PeerOp::Reconcile => "reconcile",
        }
    }
}

#[derive(Clone)]
pub struct ClusterMetrics {
    pub ring_epoch: IntGauge,
    pub ring_members: IntGaugeVec,
    pub peer_requests: IntCounterVec,
    pub peer_errors: IntCounterVec,
    pub keys_sent: IntCounter,
    pub keys_received: IntCounter,
    pub rebalance_seconds: prometheus::Gauge,
    pub rebalancing: IntGauge,
    pub synced_epoch: IntGauge,
    pub rebalance_phase: IntGaugeVec,
    pub pending_repairs: IntGauge,
    pub dropped_hints: IntCounter,
    pub read_lease: IntGauge,
    /// Snapshots checked against the peers' deletes, by outcome.
    pub restores: IntCounterVec,
    /// Restored items removed by that check.
    pub restore_removed: IntCounter,
    /// `peer_requests` and `peer_errors` per [`PeerOp`], resolved once:
    /// forwarding counts on every forwarded request.
    by_op: [(IntCounter, IntCounter); PeerOp::ALL.len()],
}

impl ClusterMetrics {
    pub fn new(registry: &Registry) -> Self {
        let peer_requests = IntCounterVec::new(
            Opts::new(
                "distrocache_peer_requests_total",
                "Requests this node sent to other nodes",
            ),
            &["operation"],
        )
        .expect("valid metric");
        let peer_errors = IntCounterVec::new(
            Opts::new(
                "distrocache_peer_errors_total",
                "Requests to other nodes that failed (unreachable, timeout or error answer)",
            ),
            &["operation"],
        )
        .expect("valid metric");
        let by_op = PeerOp::ALL.map(|op| {
            (
                peer_requests.with_label_values(&[op.label()]),
                peer_errors.with_label_values(&[op.label()]),
            )
        });
        let m = Self {
            ring_epoch: IntGauge::new(
                "distrocache_ring_epoch",
                "Epoch of the ring this node holds",
            )
            .expect("valid metric"),
            ring_members: IntGaugeVec::new(
                Opts::new("distrocache_ring_members", "Members of the ring by state"),
                &["state"],
            )
            .expect("valid metric"),
            peer_requests,
            peer_errors,
            by_op,
            keys_sent: IntCounter::new(
                "distrocache_rebalance_keys_sent_total",
                "Keys sent to other nodes by rebalancing",
            )
            .expect("valid metric"),
            keys_received: IntCounter::new(
                "distrocache_rebalance_keys_received_total",
                "Keys received from other nodes by rebalancing",
            )
            .expect("valid metric"),
            rebalance_seconds: prometheus::Gauge::new(
                "distrocache_rebalance_last_duration_seconds",
                "Duration of the last completed data movement",
            )
            .expect("valid metric"),
            rebalancing: IntGauge::new(
                "distrocache_rebalance_in_progress",
                "1 while this node is moving data for a ring change",
            )
            .expect("valid metric"),
            synced_epoch: IntGauge::new(
                "distrocache_rebalance_synced_epoch",
                "The latest ring epoch whose data movement this node finished",
            )
            .expect("valid metric"),
            rebalance_phase: IntGaugeVec::new(
                Opts::new(
                    "distrocache_rebalance_phase",
                    "1 for the data-movement phase this node is in (idle, pulling or pushing)",
                ),
                &["phase"],
            )
            .expect("valid metric"),
            pending_repairs: IntGauge::new(
                "distrocache_replication_pending_repairs",
                "Keys and tags that members which could not be reached missed (writes, deletes, invalidations), summed over the members, waiting to be repaired",
            )
            .expect("valid metric"),
            read_lease: IntGauge::new(
                "distrocache_read_lease_valid",
                "1 while this node may serve reads of the keys it holds as a replica (every member has granted it a read lease)",
            )
            .expect("valid metric"),
            dropped_hints: IntCounter::new(
                "distrocache_replication_dropped_hints_total",
                "Repair hints dropped because a replica's queue was full (that replica is then resynced whole when it answers)",
            )
            .expect("valid metric"),
            restores: IntCounterVec::new(
                Opts::new(
                    "distrocache_snapshot_restores_total",
                    "Loaded snapshots checked against the peers' deletes: reconciled (kept, minus what was deleted meanwhile) or discarded (the peers no longer remember every delete since it was taken)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            restore_removed: IntCounter::new(
                "distrocache_snapshot_restore_removed_items_total",
                "Items loaded from a snapshot and then removed because they were deleted while the node was down (or the snapshot was discarded)",
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.ring_epoch.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.ring_members.clone()),
            Box::new(m.peer_requests.clone()),
            Box::new(m.peer_errors.clone()),
            Box::new(m.keys_sent.clone()),
            Box::new(m.keys_received.clone()),
            Box::new(m.rebalance_seconds.clone()),
            Box::new(m.rebalancing.clone()),
            Box::new(m.synced_epoch.clone()),
            Box::new(m.rebalance_phase.clone()),
            Box::new(m.pending_repairs.clone()),
            Box::new(m.dropped_hints.clone()),
            Box::new(m.read_lease.clone()),
            Box::new(m.restores.clone()),
            Box::new(m.restore_removed.clone()),
        ] {
            registry
                .register(c)
                .expect("cluster metrics are registered once");
        }
        m.observe_phase(SyncPhase::Idle);
        for outcome in ["reconciled", "discarded"] {
            m.restores.with_label_values(&[outcome]);
        }
        m
    }

    pub(super) fn observe_phase(&self, phase: SyncPhase) {
        for p in [SyncPhase::Idle, SyncPhase::Pulling, SyncPhase::Pushing] {
            self.rebalance_phase
                .with_label_values(&[p.as_str()])
                .set(i64::from(p == phase));
        }
    }

    pub(super) fn observe_ring(&self, ring: &Ring) {
        self.ring_epoch.set(ring.epoch() as i64);
        for state in ["joining", "active", "leaving"] {
            let n = ring
                .members
                .iter()
                .filter(|m| m.state.as_str() == state)
                .count();
            self.ring_members.with_label_values(&[state]).set(n as i64);
        }
    }

    pub(super) fn peer_call(&self, op: PeerOp, ok: bool) {
        let (requests, errors) = &self.by_op[op as usize];
        requests.inc();
        if !ok {
            errors.inc();
        }
    }
}

//! Cluster mode: the ring this node holds, and everything that crosses
//! nodes: routing a client request to the key's owners, replicating writes,
//! fanning out tag invalidations and stats, moving data when the ring
//! changes, and read leases (DESIGN 3).
//!
//! Data flows one way: the executor asks the cluster who serves a key; the
//! cluster either answers "here" (the executor then uses the store) or
//! talks to the owner through the peer client. The store never knows about
//! any of this, and the cluster never knows the REST API.
//!
//! The parts, each in its own file:
//! * [`ring_state`]: the rings held (adopt a newer document, settle);
//! * [`routing`]: which member serves a request, and forwarding to it;
//! * [`replication`]: replicating writes, applying what peers send,
//!   recovering keys mid-move, the fan-outs;
//! * [`keepers`]: an owner forwarding a write keeps its own copy from the
//!   coordinator's answer;
//! * [`rebalance`]: moving data when the ring changes;
//! * [`repair`]: hints for replicas that missed writes, and their repair;
//! * [`leases`]: when a replica may serve reads itself;
//! * [`tombstones`]: recent deletes, so copies in flight cannot revive them;
//! * [`restore`]: the rule for a node that comes back from a snapshot;
//! * [`membership`]: where the ring documents come from;
//! * [`pace`]: how long peer work waits between attempts.
//!
//! Consistency model, in short (the README has the long form):
//! * every write and delete goes to the key's primary, which applies it and
//!   replicates it to the other owners before answering (an owner that
//!   forwarded the write stores its copy from the answer, see [`keepers`],
//!   before its client is answered); a replica that
//!   cannot be reached gets the write later from the [`repair`] queue, and
//!   stops serving reads (its lease runs out before the client is answered);
//! * versions are the coordinator's write time: a replica never lets an
//!   older copy overwrite a newer one, and recent deletes leave short-lived
//!   [`tombstones`] so a copy in flight cannot bring a deleted key back;
//! * every peer request carries the sender's ring epoch; a peer holding a
//!   different epoch refuses it, and whichever side is older adopts the
//!   newer document before the request is retried, so no node acts on stale
//!   ownership.

pub mod keepers;
pub mod leases;
pub mod membership;
pub mod metrics;
pub mod pace;
pub mod rebalance;
pub mod reconcile;
pub mod repair;
pub mod replication;
pub mod restore;
pub mod ring;
pub mod ring_state;
pub mod routing;
#[cfg(test)]
mod testing;
pub mod tombstones;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::Retryable;
use distrocache_membership::{MemberState, MembershipDoc};
use hyper::http::StatusCode;
use tokio::sync::watch;

use crate::peer::{Call, PeerClient, PeerError, PeerSettings};
use crate::store::Store;
use leases::Leases;
use metrics::ClusterMetrics;
use pace::retry_policy;
use rebalance::Progress;
use repair::Hints;
use ring::RingMember;
use ring_state::{RingState, Rings};
use tombstones::Tombstones;

/// Cluster tuning; every field is a node flag (see `config.rs`).
#[derive(Debug, Clone, Copy)]
pub struct ClusterSettings {
    pub peer: PeerSettings,
    /// Most items per rebalancing batch.
    pub batch_items: usize,
    /// Most bytes per rebalancing batch (a batch closes at whichever comes first).
    pub batch_bytes: usize,
    /// How often the membership file is re-read.
    pub file_poll_interval: Duration,
}

pub struct Cluster {
    node_id: String,
    store: Arc<Store>,
    ring: RingState,
    peers: PeerClient,
    progress: Progress,
    hints: Hints,
    tombstones: Tombstones,
    /// Set when the node loaded a snapshot it has not yet checked against
    /// its peers' deletes (see [`restore`]).
    restore: restore::PendingRestore,
    /// Set when the node starts with `--restore-from` and loaded no
    /// snapshot: the backup it loads, once it knows which keys it owns.
    backup: restore::PendingBackup,
    leases: Leases,
    keepers: keepers::Keepers,
    health: routing::PeerHealth,
    metrics: ClusterMetrics,
    settings: ClusterSettings,
    /// The node's readiness flag, shared with the API.
    ready: Arc<AtomicBool>,
}

impl Cluster {
    pub(crate) fn new(
        node_id: String,
        store: Arc<Store>,
        settings: ClusterSettings,
        metrics: ClusterMetrics,
        ready: Arc<AtomicBool>,
        peer_tokens: Option<Arc<crate::tokens::TokenFile>>,
        peer_tls: Option<Arc<crate::tls::PeerTls>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            peers: PeerClient::with_credentials(&node_id, settings.peer, peer_tokens, peer_tls),
            ring: RingState::new(&node_id),
            node_id,
            store,
            progress: Progress::default(),
            hints: Hints::default(),
            tombstones: Tombstones::default(),
            restore: restore::PendingRestore::default(),
            backup: restore::PendingBackup::default(),
            leases: Leases::default(),
            keepers: keepers::Keepers::default(),
            health: routing::PeerHealth::default(),
            metrics,
            settings,
            ready,
        })
    }

    pub(crate) fn node_id(&self) -> &str {
        &self.node_id
    }

    pub(crate) fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub(crate) fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The rings held now, if a membership document has arrived.
    pub(crate) fn rings(&self) -> Option<Arc<Rings>> {
        self.ring.rings()
    }

    /// The current ring's epoch (0 before the first document).
    pub(crate) fn epoch(&self) -> u64 {
        self.ring.epoch()
    }

    /// Changes of the epoch.
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.ring.subscribe()
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Adopts `doc` if it is newer than the ring held; returns whether it did.
    pub(crate) fn adopt(&self, doc: MembershipDoc) -> bool {
        let Some(ring) = self.ring.adopt(doc) else {
            return false;
        };
        // With peer TLS, the names peers' certificates must carry: the
        // members of this ring and of the previous one (still reached while
        // data moves).
        if let Some(rings) = self.ring.rings() {
            self.peers.learn_names(
                rings
                    .both()
                    .flat_map(|r| r.members.iter())
                    .map(|m| (m.address, m.id.as_str())),
            );
        }
        // Leases were granted for the epoch held until now.
        self.leases.drop_held();
        self.metrics.read_lease.set(0);
        tracing::info!(
            epoch = ring.epoch(),
            members = ring.members.len(),
            replication_factor = ring.replication_factor(),
            state = ring.my_state().map_or("not a member", MemberState::as_str),
            "adopted ring"
        );
        self.metrics.observe_ring(&ring);
        true
    }

    /// Whether data is moving as this node sees it in `rings`: a previous
    /// ring is kept, or this node has not finished pulling its keys.
    fn is_moving_in(&self, rings: &Rings) -> bool {
        rings.previous.is_some() || !self.progress.pulled()
    }

    /// Sends `call` to `member` with this node's epoch and takes the
    /// answer it is due, reconciling rings on a mismatch: a peer with an
    /// older ring is sent ours and the request sent again; a peer with a
    /// newer one is asked for it, which is adopted, and the caller gets
    /// [`PeerError::RingChanged`] so it plans again.
    async fn call<T>(
        &self,
        member: &RingMember,
        call: &Call<T>,
        timeout: Option<Duration>,
    ) -> Result<T, PeerError> {
        let addr = member.address;
        for _ in 0..3 {
            let epoch = self.epoch();
            match self.peers.ask(addr, epoch, call, timeout).await {
                // The ring exchanges below are rare: boxed, so their futures
                // are not part of every call's.
                Err(PeerError::Misdirected { theirs, .. }) if theirs > epoch => {
                    let doc = Box::pin(self.peers.ring(addr)).await?;
                    tracing::info!(%addr, epoch = doc.epoch, "a peer holds a newer ring; catching up");
                    self.adopt(doc);
                    return Err(PeerError::RingChanged { addr });
                }
                Err(PeerError::Misdirected { theirs, .. }) if theirs < epoch => {
                    if let Some(ring) = self.ring.current() {
                        Box::pin(self.peers.put_ring(addr, &ring.doc)).await?;
                    }
                }
                // Equal now: the peer caught up in between; send again.
                Err(PeerError::Misdirected { .. }) => {}
                result => return result,
            }
        }
        Err(PeerError::Status {
            addr,
            status: StatusCode::MISDIRECTED_REQUEST,
            message: "rings kept disagreeing".into(),
        })
    }

    /// Like [`Self::call`], retrying with [`retry_policy`] while the member
    /// cannot be reached or fails, for as long as this node holds ring
    /// `epoch`; a ring change is never retried (the caller must plan again).
    async fn call_with_retry<T>(
        &self,
        member: &RingMember,
        epoch: u64,
        call: &Call<T>,
    ) -> Result<T, PeerError> {
        let attempt = || async {
            if self.epoch() != epoch {
                return Err(PeerError::RingChanged {
                    addr: member.address,
                });
            }
            self.call(member, call, None).await
        };
        attempt
            .retry(retry_policy())
            .when(|e| !matches!(e, PeerError::RingChanged { .. }))
            .notify(|e, pause| tracing::debug!(peer = %member.id, error = %e, ?pause, "retrying"))
            .await
    }
}

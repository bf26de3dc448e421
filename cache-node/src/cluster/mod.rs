//! Cluster mode: the ring this node holds, and everything that crosses
//! nodes — routing a client request to the key's owners, replicating writes,
//! fanning out tag invalidations and stats, and moving data when the ring
//! changes (DESIGN 3).
//!
//! Data flows one way: the API asks the cluster who owns a key; the cluster
//! either answers "serve it here" (the API then uses the store) or talks to
//! the owner through the [`peer`] client. The store never knows about any of
//! this.
//!
//! Consistency model, in short (the README has the long form):
//! * every write and delete goes to the key's primary, which applies it and
//!   replicates it to the other owners before answering; a replica that
//!   cannot be reached gets the write later from the [`repair`] queue;
//! * versions are the coordinator's write time: a replica never lets an older
//!   copy overwrite a newer one, and recent deletes leave short-lived
//!   [`tombstones`] so a copy in flight cannot bring a deleted key back;
//! * every peer request carries the sender's ring epoch; a peer holding a
//!   different epoch refuses it (421), and whichever side is older adopts the
//!   newer document before the request is retried, so no node acts on stale
//!   ownership.

pub mod membership;
pub mod metrics;
pub mod peer;
pub mod rebalance;
pub mod repair;
pub mod ring;
pub mod routing;
pub mod tombstones;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use distrocache_membership::{MemberState, MembershipDoc};
use tokio::sync::watch;

use crate::store::Store;
use metrics::ClusterMetrics;
use peer::{PeerClient, PeerError, PeerResponse, PeerSettings};
use rebalance::Progress;
use repair::Hints;
use ring::{Ring, RingMember};
use tombstones::Tombstones;

/// The rings a node holds: the current one, and while data is still moving
/// to it, the one before (reads that miss during a move also ask the
/// previous owners; writes go to both).
#[derive(Debug)]
pub struct Rings {
    pub current: Arc<Ring>,
    pub previous: Option<Arc<Ring>>,
}

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
    rings: ArcSwapOption<Rings>,
    /// Serialises ring changes (adoption and settling).
    change: parking_lot::Mutex<()>,
    epoch_tx: watch::Sender<u64>,
    peers: PeerClient,
    progress: Progress,
    hints: Hints,
    tombstones: Tombstones,
    health: routing::PeerHealth,
    metrics: ClusterMetrics,
    settings: ClusterSettings,
    /// The node's readiness flag, shared with the API.
    ready: Arc<AtomicBool>,
}

impl Cluster {
    pub fn new(
        node_id: String,
        store: Arc<Store>,
        settings: ClusterSettings,
        metrics: ClusterMetrics,
        ready: Arc<AtomicBool>,
        peer_token: Option<&str>,
    ) -> Arc<Self> {
        let (epoch_tx, _) = watch::channel(0);
        Arc::new(Self {
            peers: PeerClient::new(&node_id, settings.peer, peer_token),
            node_id,
            store,
            rings: ArcSwapOption::empty(),
            change: parking_lot::Mutex::new(()),
            epoch_tx,
            progress: Progress::default(),
            hints: Hints::default(),
            tombstones: Tombstones::default(),
            health: routing::PeerHealth::default(),
            metrics,
            settings,
            ready,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn tombstones(&self) -> &Tombstones {
        &self.tombstones
    }

    pub fn hints(&self) -> &Hints {
        &self.hints
    }

    /// The rings held now, if a membership document has arrived.
    pub fn rings(&self) -> Option<Arc<Rings>> {
        self.rings.load_full()
    }

    /// The current ring's epoch (0 before the first document).
    pub fn epoch(&self) -> u64 {
        self.rings.load().as_ref().map_or(0, |r| r.current.epoch())
    }

    /// Changes of the epoch, for the rebalancer.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.epoch_tx.subscribe()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Adopts `doc` if it is newer than the ring held; returns whether it did.
    /// An older or equal epoch is ignored, so documents may arrive from the
    /// membership source and from peers in any order.
    pub fn adopt(&self, doc: MembershipDoc) -> bool {
        let _change = self.change.lock();
        let held = self.rings.load_full();
        if held
            .as_ref()
            .is_some_and(|r| r.current.epoch() >= doc.epoch)
        {
            return false;
        }
        let ring = Arc::new(Ring::new(Arc::new(doc), &self.node_id));
        // While a move is still under way the data may still sit with the
        // owners of the ring before the one being replaced; keep that one.
        let previous = held.map(|r| {
            if self.progress.settled_epoch() >= r.current.epoch() {
                r.current.clone()
            } else {
                r.previous.clone().unwrap_or_else(|| r.current.clone())
            }
        });
        tracing::info!(
            epoch = ring.epoch(),
            members = ring.members.len(),
            replication_factor = ring.replication_factor(),
            state = ring.my_state().map_or("not a member", MemberState::as_str),
            "adopted ring"
        );
        self.metrics.observe_ring(&ring);
        let epoch = ring.epoch();
        self.rings.store(Some(Arc::new(Rings {
            current: ring,
            previous,
        })));
        self.epoch_tx.send_replace(epoch);
        true
    }

    /// Forgets the previous ring once every member has finished moving data
    /// for `epoch`; returns the current ring if it did.
    pub fn settle(&self, epoch: u64) -> Option<Arc<Ring>> {
        let _change = self.change.lock();
        let rings = self.rings.load_full()?;
        if rings.current.epoch() != epoch {
            return None;
        }
        self.progress.set_settled(epoch);
        self.rings.store(Some(Arc::new(Rings {
            current: rings.current.clone(),
            previous: None,
        })));
        Some(rings.current.clone())
    }

    /// Whether a read that misses here should ask other owners: data is still
    /// moving (a previous ring is kept) or this node has not finished pulling
    /// its keys.
    pub fn is_moving(&self) -> bool {
        self.rings().is_some_and(|r| r.previous.is_some()) || !self.progress.pulled()
    }

    /// Calls a peer with this node's epoch, reconciling rings on a mismatch:
    /// a peer with an older ring is sent ours and the call retried; a peer with
    /// a newer one is asked for it, which is adopted, and the caller gets
    /// [`PeerError::RingChanged`] so it plans again.
    pub async fn call(
        &self,
        member: &RingMember,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<PeerResponse, PeerError> {
        let addr = member.address;
        for _ in 0..3 {
            let epoch = self.epoch();
            let answer = self
                .peers
                .send(addr, method.clone(), path, epoch, body.clone(), timeout)
                .await?;
            if answer.status != StatusCode::MISDIRECTED_REQUEST {
                return Ok(answer);
            }
            let theirs = answer.epoch().unwrap_or(0);
            if theirs > epoch {
                self.catch_up_from(addr).await?;
                return Err(PeerError::RingChanged { addr });
            }
            if theirs < epoch {
                self.send_ring_to(addr).await?;
            }
            // Equal: the peer caught up in between; just retry.
        }
        Err(PeerError::Status {
            addr,
            status: StatusCode::MISDIRECTED_REQUEST,
            message: "rings kept disagreeing".into(),
        })
    }

    /// Fetches and adopts the ring of the peer at `addr`.
    async fn catch_up_from(&self, addr: SocketAddr) -> Result<(), PeerError> {
        let answer = self
            .peers
            .send(
                addr,
                Method::GET,
                "/internal/v1/ring",
                self.epoch(),
                Bytes::new(),
                None,
            )
            .await?;
        if !answer.status.is_success() {
            return Err(PeerError::Status {
                addr,
                status: answer.status,
                message: peer::error_message(&answer.body),
            });
        }
        let doc = MembershipDoc::from_json(&answer.body).map_err(|e| PeerError::BadAnswer {
            addr,
            reason: e.to_string(),
        })?;
        tracing::info!(%addr, epoch = doc.epoch, "a peer holds a newer ring; catching up");
        self.adopt(doc);
        Ok(())
    }

    /// Sends this node's ring to the peer at `addr`, which adopts it if newer.
    async fn send_ring_to(&self, addr: SocketAddr) -> Result<(), PeerError> {
        let Some(rings) = self.rings() else {
            return Ok(());
        };
        let body = Bytes::from(rings.current.doc.to_json());
        let answer = self
            .peers
            .send(
                addr,
                Method::PUT,
                "/internal/v1/ring",
                rings.current.epoch(),
                body,
                None,
            )
            .await?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(PeerError::Status {
                addr,
                status: answer.status,
                message: peer::error_message(&answer.body),
            })
        }
    }
}

//! The executor: the one place a typed [`Operation`] is carried out,
//! whichever transport it came in on, and turned into a typed [`Outcome`].
//!
//! It decides where each operation is served (this node's store, or the
//! key's owner through the cluster) and does the local part itself: reads
//! from the store, writes coordinated here (stored, then replicated before
//! the answer), deletes, tag invalidations, stats and the cluster views.
//! The REST API turns requests into operations and outcomes into answers;
//! the peer server ([`peer_service`]) serves what other nodes forward here
//! through the same functions, so a request forwarded to its owner is
//! carried out exactly as one that arrived there directly.
//!
//! What can be answered at once (a read of an item held here, a single
//! node's write) is answered without a future, so the common GET costs a
//! store lookup and its JSON encoding; anything that waits (a peer) is a
//! boxed future.

mod finishing;
pub mod limits;
pub mod operation;
pub mod outcome;
mod peer_service;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use distrocache_membership::{ClusterView, KeyOwners, MemberState, MemberView, Mode};

pub use limits::Limits;
pub use operation::{Operation, Write};
pub use outcome::{Failure, Handoff, Health, ItemStatus, Outcome, Readiness, ServedBy};

use self::finishing::Finishing;
use crate::cluster::Cluster;
use crate::cluster::keepers::KeepPermit;
use crate::cluster::replication::TagInvalidation;
use crate::cluster::routing::{Access, ReadRoute, RouteError, Routed};
use crate::item_json;
use crate::metrics::{Metrics, Op};
use crate::peer::Call;
use crate::peer::protocol::{NodeStats, RecordBatch, Records, ReplicateOutcome};
use crate::store::{ItemRef, Miss, Store, StoreError};

/// An operation's outcome, now or later.
pub enum Execution {
    Now(Outcome),
    Later(Pin<Box<dyn Future<Output = Outcome> + Send>>),
}

/// Everything operations are carried out with.
pub struct Executor {
    pub store: Arc<Store>,
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub node_id: String,
    pub started: Instant,
    /// Set once the node may receive traffic (see readiness).
    pub ready: Arc<AtomicBool>,
    /// Where backups go (`--backup-url`).
    pub backups: Option<Arc<crate::backup::Backups>>,
}

impl Executor {
    pub fn execute(self: &Arc<Self>, op: Operation) -> Execution {
        match op {
            Operation::Get { key } => self.get(key),
            Operation::Set { key, write } => match &self.cluster {
                // A single node's write waits on nothing (no owner to ask,
                // no replica to tell): answered at once, like a read of an
                // item held here, without a boxed future.
                None => Execution::Now(Self::written(
                    self.apply_set(&key, &write, |item| item_json::item_to_vec(item))
                        .map(|(created, json, _)| (created, json)),
                )),
                Some(cluster) => match cluster.keeping(&key) {
                    None => {
                        self.later(move |ex| async move { ex.route_set(&key, &write, false).await })
                    }
                    // Carried to its end even if the client gives up (see
                    // `set_kept`).
                    Some(keeping) => Execution::Later(Box::pin(Finishing::new(
                        self.clone().set_kept(key, write, keeping),
                    ))),
                },
            },
            Operation::Delete { key } => self.later(move |ex| async move { ex.delete(&key).await }),
            Operation::InvalidateTag { tag } => {
                self.later(move |ex| async move { ex.invalidate_tag(&tag).await })
            }
            Operation::Stats => Execution::Now(Outcome::Stats(Box::new(self.stats()))),
            Operation::Health => Execution::Now(Outcome::Health(self.health())),
            Operation::OpenApi => Execution::Now(Outcome::OpenApi),
            Operation::Ready => Execution::Now(Outcome::Ready(self.readiness())),
            Operation::Metrics => Execution::Now(Outcome::Metrics(
                self.metrics
                    .render(&self.store.stats(), self.started.elapsed()),
            )),
            Operation::ClusterView { key } => {
                Execution::Now(Outcome::ClusterView(Box::new(self.cluster_view(key))))
            }
            Operation::ClusterStats => self.later(|ex| async move {
                let local = ex.stats();
                match &ex.cluster {
                    Some(cluster) => {
                        Outcome::ClusterStats(Box::new(cluster.cluster_stats(local).await))
                    }
                    None => Outcome::ClusterStats(Box::new(
                        crate::cluster::replication::ClusterStats::single(local),
                    )),
                }
            }),
            Operation::Copies { key } => self.later(move |ex| async move {
                match &ex.cluster {
                    Some(cluster) => Outcome::Copies(Box::new(cluster.copies(&key).await)),
                    None => Outcome::Copies(Box::new(crate::cluster::replication::Copies::single(
                        &ex.node_id,
                        &key,
                        ex.store.peek(&key, |item| item.meta()),
                    ))),
                }
            }),
            Operation::Rebalance => Execution::Now(match &self.cluster {
                Some(cluster) => {
                    let mut report = cluster.report();
                    report.last_backup = self.backups.as_ref().and_then(|b| b.last());
                    Outcome::Progress(Box::new(report))
                }
                None => Failure::not_found("this node is not in cluster mode").into(),
            }),
            Operation::Handoff { timeout, epoch } => {
                self.later(move |ex| async move { ex.handoff(timeout, epoch).await })
            }
            Operation::Backup { id } => self.later(move |ex| async move { ex.backup(&id).await }),
        }
    }

    /// Uploads this node's snapshot as its part of backup `id`.
    async fn backup(&self, id: &str) -> Outcome {
        use crate::backup::{BackupError, SCHEDULED_PREFIX, summary};
        let Some(backups) = &self.backups else {
            return Failure::not_found("this node has no backup destination (--backup-url)").into();
        };
        if id.starts_with(SCHEDULED_PREFIX) {
            return Failure::bad_request(format!(
                "backup ids starting with {SCHEDULED_PREFIX:?} are the schedule's"
            ))
            .into();
        }
        let cluster = self.cluster.clone();
        let log = move || cluster.map_or_else(Default::default, |c| c.tombstone_log());
        match backups
            .upload(self.store.clone(), &self.node_id, id, log)
            .await
        {
            Ok(uploaded) => Outcome::Backup(Box::new(uploaded)),
            Err(e @ BackupError::InvalidId(_)) => Failure::bad_request(e.to_string()).into(),
            Err(e @ (BackupError::Exists(..) | BackupError::Busy)) => {
                Failure::conflict(e.to_string()).into()
            }
            Err(e) => Failure::unavailable(summary(&e)).into(),
        }
    }

    fn later<F>(self: &Arc<Self>, f: impl FnOnce(Arc<Self>) -> F) -> Execution
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        Execution::Later(Box::pin(f(self.clone())))
    }

    /// The item as the seed's JSON, read from this node's store (counted as
    /// a hit or a miss).
    fn read_json(&self, key: &str, miss: Miss) -> Option<Vec<u8>> {
        let started = Instant::now();
        let json = self
            .store
            .get_with(key, miss, |item| item_json::item_to_vec(&item));
        self.metrics.observe(Op::Get, started.elapsed());
        json
    }

    fn found(json: Vec<u8>, served_by: ServedBy) -> Outcome {
        Outcome::Item {
            json,
            status: ItemStatus::Found,
            served_by,
        }
    }

    fn missing(key: String, served_by: ServedBy) -> Outcome {
        Outcome::Missing { key, served_by }
    }

    /// A client's read: served here when this node may (see
    /// `cluster::routing`), from the store without waiting on anything
    /// when this node holds every acknowledged write of the key; otherwise
    /// by the owner it is forwarded to.
    fn get(self: &Arc<Self>, key: String) -> Execution {
        let route = match &self.cluster {
            None => ReadRoute::Primary { reconcile: false },
            Some(cluster) => cluster.read_route(&key),
        };
        match route {
            ReadRoute::Primary { reconcile: false } => Execution::Now(self.read_here(key)),
            ReadRoute::Primary { reconcile: true } => {
                self.later(move |ex| async move { ex.read_reconciled(key).await })
            }
            // A replica's miss is not believed (it may have evicted what the
            // primary still holds), nor counted: the primary counts the read.
            ReadRoute::Replica => match self.read_json(&key, Miss::NotCounted) {
                Some(json) => Execution::Now(Self::found(json, ServedBy::Here)),
                None => self.later(move |ex| async move { ex.forward_get(key).await }),
            },
            ReadRoute::Forward => self.later(move |ex| async move { ex.forward_get(key).await }),
        }
    }

    /// A read served from this node's copy as it is.
    fn read_here(&self, key: String) -> Outcome {
        match self.read_json(&key, Miss::Counted) {
            Some(json) => Self::found(json, ServedBy::Here),
            None => Self::missing(key, ServedBy::Here),
        }
    }

    /// A read served here by a node that may have missed writes of the key
    /// (it holds no read lease): the other owners are asked for anything
    /// newer first (see `cluster::reconcile`).
    async fn read_reconciled(&self, key: String) -> Outcome {
        if let Some(cluster) = &self.cluster {
            cluster.reconcile(&key).await;
        }
        self.read_here(key)
    }

    async fn forward_get(&self, key: String) -> Outcome {
        let Some(cluster) = &self.cluster else {
            return self.read_here(key);
        };
        let make_call = || Call::get(key.clone());
        let routed = cluster.route(&key, Access::Read, make_call).await;
        match routed {
            // This node's turn in the plan (the owners before it could not
            // serve): its copy, as for a primary.
            Ok(Routed::Local) if cluster.serves_own_copies() => self.read_here(key),
            // Boxed: rare, and its future would otherwise be part of every
            // forward's.
            Ok(Routed::Local) => Box::pin(self.read_reconciled(key)).await,
            Ok(Routed::Remote {
                served_by,
                answer: Some(record),
            }) => match render_record(&record) {
                Ok(json) => Self::found(json, ServedBy::Peer(served_by)),
                Err(f) => f.into(),
            },
            Ok(Routed::Remote {
                served_by,
                answer: None,
            }) => Self::missing(key, ServedBy::Peer(served_by)),
            Err(e) => route_failure(e).into(),
        }
    }

    /// A client's write that this node, an owner of the key but not its
    /// primary, forwards and keeps its own copy of from the primary's
    /// answer (see `cluster::keepers`). Run as a [`Finishing`]: once the
    /// primary may have applied the write, this node's copy must follow
    /// whether or not the client still waits.
    async fn set_kept(self: Arc<Self>, key: String, write: Write, keeping: KeepPermit) -> Outcome {
        let _keeping = keeping;
        self.route_set(&key, &write, true).await
    }

    /// A client's write, sent to its coordinator (`keeps`: this node keeps
    /// its own copy from the answer) or coordinated here.
    async fn route_set(&self, key: &str, write: &Write, keeps: bool) -> Outcome {
        if let Some(cluster) = &self.cluster {
            let epoch = cluster.epoch();
            let make_call = || {
                let keeper = keeps.then(|| cluster.node_id().to_owned());
                Call::set(key.to_owned(), write.clone(), keeper)
            };
            let routed = cluster.route(key, Access::Write, make_call).await;
            match routed {
                Ok(Routed::Local) => {}
                Ok(Routed::Remote {
                    served_by,
                    answer: (mut created, record),
                }) => {
                    if keeps {
                        created &= cluster.keep(key, &record, epoch).await.replaced == 0;
                    }
                    return match render_record(&record) {
                        Ok(json) => Outcome::Item {
                            json,
                            status: if created {
                                ItemStatus::Created
                            } else {
                                ItemStatus::Replaced
                            },
                            served_by: ServedBy::Peer(served_by),
                        },
                        Err(f) => f.into(),
                    };
                }
                Err(e) => {
                    if keeps
                        && let RouteError::Uncertain { owner, .. } = &e
                        && let Some(resyncing) = cluster.start_resync(key)
                    {
                        // The primary may hold the write and this node not:
                        // the copies are made equal once it answers again,
                        // while the client gets its 503 now.
                        tokio::spawn(cluster.clone().resync_kept(resyncing, owner.clone()));
                    }
                    return route_failure(e).into();
                }
            }
        }
        let (created, json, record) =
            match self.apply_set(key, write, |item| item_json::item_to_vec(item)) {
                Ok(applied) => applied,
                Err(f) => return f.into(),
            };
        let outcome = self.replicate_set(key, record, None).await;
        // Mid-move this node may not hold the key yet while another owner
        // does: the write replaced it all the same.
        Self::written(Ok((created && outcome.replaced == 0, json)))
    }

    /// The answer to a write stored here.
    fn written(stored: Result<(bool, Vec<u8>), Failure>) -> Outcome {
        match stored {
            Ok((created, json)) => Outcome::Item {
                json,
                status: if created {
                    ItemStatus::Created
                } else {
                    ItemStatus::Replaced
                },
                served_by: ServedBy::Here,
            },
            Err(f) => f.into(),
        }
    }

    /// The replicas' part of a write coordinated here: `record` sent to the
    /// other owners (but `keeper`, which stores its own copy).
    async fn replicate_set(
        &self,
        key: &str,
        record: RecordBatch,
        keeper: Option<&str>,
    ) -> ReplicateOutcome {
        match &self.cluster {
            Some(cluster) => cluster.replicate(key, record.freeze(), &[], keeper).await,
            None => ReplicateOutcome::default(),
        }
    }

    /// The store's part of a write coordinated here: whether it created the
    /// key, the stored item as `render` encodes it, and (in cluster mode)
    /// its record for the replicas.
    fn apply_set<R>(
        &self,
        key: &str,
        write: &Write,
        render: impl FnOnce(&ItemRef<'_>) -> R,
    ) -> Result<(bool, R, RecordBatch), Failure> {
        let started = Instant::now();
        let replicate = self.cluster.is_some();
        let stored = self
            .store
            .set(key, &write.value, &write.tags, write.ttl, |item| {
                let mut record = RecordBatch::default();
                if replicate {
                    record.push(&item);
                }
                (render(&item), record)
            });
        self.metrics.observe(Op::Set, started.elapsed());
        let (created, (rendered, record)) = stored.map_err(|e| match e {
            StoreError::TooLarge { .. } => Failure::too_large(e.to_string()),
            StoreError::TtlTooLarge => Failure::bad_request(e.to_string()),
            StoreError::KeyTooLong { .. } | StoreError::ValueTooLarge { .. } => {
                Failure::too_large(e.to_string())
            }
            StoreError::TooManyTags { .. } => Failure::bad_request(e.to_string()),
        })?;
        Ok((created, rendered, record))
    }

    /// A client's delete: coordinated here, or by the key's primary.
    async fn delete(&self, key: &str) -> Outcome {
        let mut served_by = ServedBy::Here;
        let deleted = match &self.cluster {
            Some(cluster) => {
                let make_call = || Call::delete(key.to_owned());
                let routed = cluster.route(key, Access::Write, make_call).await;
                match routed {
                    Ok(Routed::Local) => self.coordinate_delete(key).await,
                    Ok(Routed::Remote {
                        served_by: by,
                        answer,
                    }) => {
                        served_by = ServedBy::Peer(by);
                        answer
                    }
                    Err(e) => return route_failure(e).into(),
                }
            }
            None => self.coordinate_delete(key).await,
        };
        if deleted {
            Outcome::Deleted {
                key: key.to_owned(),
                served_by,
            }
        } else {
            Self::missing(key.to_owned(), served_by)
        }
    }

    /// A delete this node applies as the key's coordinator, then sends to the
    /// other owners. Found if any owner held the key.
    pub async fn coordinate_delete(&self, key: &str) -> bool {
        let started = Instant::now();
        let at = self.store.now();
        let mut deleted = self.store.delete(key);
        self.metrics.observe(Op::Delete, started.elapsed());
        if let Some(cluster) = &self.cluster {
            deleted |= cluster.replicate_delete(key, at).await;
        }
        deleted
    }

    async fn invalidate_tag(&self, tag: &str) -> Outcome {
        let started = Instant::now();
        let report = match &self.cluster {
            Some(cluster) => cluster.invalidate_everywhere(tag).await,
            None => TagInvalidation {
                tag: tag.to_owned(),
                invalidated: self.store.invalidate_tag(tag) as u64,
                cluster: None,
            },
        };
        self.metrics.observe(Op::InvalidateTag, started.elapsed());
        Outcome::TagInvalidated(report)
    }

    /// This node's counters (the seed's `/api/v1/stats`).
    pub fn stats(&self) -> NodeStats {
        let s = self.store.stats();
        let c = s.counters;
        let lookups = c.hits + c.misses;
        let uptime = self.started.elapsed();
        NodeStats {
            node_id: self.node_id.clone(),
            hits: c.hits,
            misses: c.misses,
            sets: c.sets,
            deletes: c.deletes,
            evictions: c.evictions,
            expirations: c.expirations,
            tag_invalidations: c.tag_invalidations,
            items: s.items as u64,
            bytes: s.bytes,
            hit_ratio: if lookups == 0 {
                0.0
            } else {
                c.hits as f64 / lookups as f64
            },
            capacity: s.max_items as u64,
            max_memory: s.max_bytes,
            uptime_seconds: uptime.as_secs_f64(),
            uptime: humantime::format_duration(Duration::from_secs(uptime.as_secs())).to_string(),
        }
    }

    fn health(&self) -> Health {
        let mut now = Vec::new();
        item_json::write_rfc3339(&mut now, self.store.now());
        Health {
            status: "healthy",
            node_id: self.node_id.clone(),
            timestamp: String::from_utf8_lossy(&now).into_owned(),
        }
    }

    /// Ready once the node holds the data it owns: a single node as soon as
    /// it listens, a cluster node once it has loaded its ring and its keys.
    /// Ready once the node holds its data, and, in a cluster, only while
    /// the ring it holds lists it: a node outside the ring owns no keys, so
    /// a Service must not count it among the cache's endpoints (it would
    /// only forward) and a supervisor must see that it is not serving as a
    /// member.
    fn readiness(&self) -> Readiness {
        let not_a_member = self.cluster.as_ref().and_then(|cluster| {
            let ring = cluster.rings()?.current.clone();
            ring.my_state().is_none().then(|| {
                format!(
                    "this node is not a member of the ring it holds (epoch {}): it owns no keys until a membership document lists it",
                    ring.epoch()
                )
            })
        });
        let error = not_a_member.or_else(|| {
            (!self.ready.load(Ordering::Acquire))
                .then(|| "node is still loading the data it owns".to_owned())
        });
        Readiness {
            status: if error.is_none() {
                "ready"
            } else {
                "not ready"
            },
            node_id: self.node_id.clone(),
            error,
        }
    }

    fn cluster_view(&self, key: Option<String>) -> ClusterView {
        let single = || ClusterView {
            node_id: self.node_id.clone(),
            mode: Mode::Single,
            epoch: 0,
            replication_factor: None,
            hashing: None,
            member_state: Some(MemberState::Active),
            members: vec![MemberView {
                id: self.node_id.clone(),
                address: None,
                client_address: None,
                state: MemberState::Active,
            }],
            previous_epoch: None,
            settled: true,
            ready: self.ready.load(Ordering::Acquire),
            read_lease: true,
            owners: key.as_ref().map(|key| KeyOwners {
                key: key.clone(),
                primary: Some(self.node_id.clone()),
                owners: vec![self.node_id.clone()],
            }),
        };
        let Some(cluster) = &self.cluster else {
            return single();
        };
        let Some(rings) = cluster.rings() else {
            return ClusterView {
                mode: Mode::Cluster,
                members: Vec::new(),
                member_state: None,
                settled: false,
                read_lease: false,
                owners: None,
                ..single()
            };
        };
        let ring = &rings.current;
        let owners = key.map(|key| {
            let owners: Vec<String> = ring
                .owners(key.as_bytes())
                .iter()
                .map(|&i| ring.member(i).id.clone())
                .collect();
            KeyOwners {
                key,
                primary: owners.first().cloned(),
                owners,
            }
        });
        ClusterView {
            node_id: self.node_id.clone(),
            mode: Mode::Cluster,
            epoch: ring.epoch(),
            replication_factor: Some(ring.doc.replication_factor),
            hashing: Some(ring.doc.hashing),
            member_state: ring.my_state(),
            members: ring
                .doc
                .members
                .iter()
                .map(|m| MemberView {
                    id: m.id.clone(),
                    address: Some(m.address.clone()),
                    client_address: Some(m.client_address().to_owned()),
                    state: m.state,
                })
                .collect(),
            previous_epoch: rings.previous.as_ref().map(|p| p.epoch()),
            settled: rings.previous.is_none() && cluster.progress().settled_epoch() >= ring.epoch(),
            ready: cluster.is_ready(),
            read_lease: cluster.holds_read_lease(),
            owners,
        }
    }

    /// The preStop hook's wait: until this node has handed its data off,
    /// or `timeout`. With `epoch`, first until the node holds that epoch (the
    /// ring that marks it leaving), so a node that has not yet seen the ring
    /// never reports a handoff it has not started.
    ///
    /// Complete means: a leaving member whose handoff is done, or a node the
    /// ring no longer lists (it owns nothing). An active or joining member
    /// has handed nothing off: it answers at once, not complete (its peers
    /// hold the other copies, so its pod may still go).
    async fn handoff(&self, timeout: Duration, epoch: Option<u64>) -> Outcome {
        let Some(cluster) = &self.cluster else {
            return Outcome::Handoff(Box::new(Handoff {
                handoff_complete: true,
                waited: 0.0,
                progress: None,
            }));
        };
        let started = Instant::now();
        loop {
            let report = cluster.report();
            let reached = epoch.is_none_or(|e| report.epoch >= e);
            let settled_answer = match (reached, report.member_state) {
                (false, _) => None,
                (true, None) => Some(true),
                (true, Some(MemberState::Leaving)) => report.handoff_complete.then_some(true),
                (true, Some(_)) => Some(false),
            };
            let timed_out = started.elapsed() >= timeout;
            if settled_answer.is_some() || timed_out {
                return Outcome::Handoff(Box::new(Handoff {
                    handoff_complete: settled_answer.unwrap_or(false),
                    waited: started.elapsed().as_secs_f64(),
                    progress: Some(report),
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// An owner's record as the seed's JSON.
fn render_record(record: &Records) -> Result<Vec<u8>, Failure> {
    let record = record.single().map_err(|e| {
        Failure::new(
            hyper::http::StatusCode::BAD_GATEWAY,
            format!("the key's owner sent an unreadable item: {e}"),
        )
    })?;
    Ok(item_json::item_to_vec(&record))
}

fn route_failure(e: RouteError) -> Failure {
    match e {
        RouteError::Refused { status, message } => Failure::new(status, message),
        other => Failure::unavailable(other.to_string()),
    }
}

//! What this node does with its peers' requests: the protocol's operations
//! mapped onto the executor (a client's request forwarded here as to its
//! owner goes through the same functions as one that arrived here) and onto
//! the cluster (replication, pulls, rings, progress, leases).
//!
//! Everything a peer sends meets the limits a client's request meets (keys,
//! values, tags, batch sizes): the peer API may be reachable by more than
//! the cache's own nodes.

use std::sync::Arc;

use hyper::http::StatusCode;

use super::{Executor, Failure};
use crate::cluster::Cluster;
use crate::peer::protocol::{Answer, Deletion, Newer, RecordBatch, RecordRef, Records, Request};
use crate::peer::server::{Handler, Reply};
use crate::store::ItemView;

impl Handler for Executor {
    fn epoch(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.epoch())
    }

    fn handle(self: Arc<Self>, request: Request) -> Reply {
        let Some(cluster) = self.cluster.clone() else {
            return Reply::Now(refused(Failure::not_found(
                "this node is not in cluster mode",
            )));
        };
        match request {
            Request::Get { key } => self.serve_get(cluster, key),
            Request::Set { key, write, keeper } => {
                let checked = self.limits.check_key(&key).and_then(|()| {
                    self.limits.check_value(&write.value)?;
                    self.limits
                        .check_tags(write.tags.iter().map(String::as_str))
                });
                if let Err(f) = checked {
                    return Reply::Now(refused(f));
                }
                // Applied as it is read, so whatever this connection carries
                // next (the sender asking for the key's copy after the write
                // went unanswered) finds it; replicated after.
                let (created, record, replicas) =
                    match self.apply_set(&key, &write, |item| record_of(item)) {
                        Ok(applied) => applied,
                        Err(f) => return Reply::Now(refused(f)),
                    };
                Reply::Later(Box::pin(async move {
                    let replicated = self.replicate_set(&key, replicas, keeper.as_deref()).await;
                    // Mid-move this node may not hold the key yet while
                    // another owner does: the write replaced it all the same.
                    Answer::Item {
                        created: created && replicated.replaced == 0,
                        record,
                    }
                }))
            }
            Request::Delete { key } => {
                if let Err(f) = self.limits.check_key(&key) {
                    return Reply::Now(refused(f));
                }
                Reply::Later(Box::pin(async move {
                    if self.coordinate_delete(&key).await {
                        Answer::Deleted
                    } else {
                        Answer::Missing
                    }
                }))
            }
            Request::Replicate {
                source,
                items,
                deletes,
            } => Reply::Now(self.replicate(&cluster, source, &items, &deletes)),
            Request::Pull {
                node,
                cursor,
                limit,
            } => Reply::Now(match cluster.serve_pull(&node, cursor, limit) {
                Ok((items, next)) => Answer::Page { items, next },
                Err(why) => refused(Failure::bad_request(why)),
            }),
            Request::Fetch { key } => {
                Reply::Now(match self.store.peek(&key, |item| record_of(&item)) {
                    Some(record) => Answer::Item {
                        created: false,
                        record,
                    },
                    None => Answer::Missing,
                })
            }
            Request::Newer { key, node, held } => {
                // The held copy's tags are only compared, never stored, and
                // their number is bounded by the message size: checked
                // against this node's tag limits, a copy written under
                // another node's (a rollout of new limits) could never be
                // reconciled.
                if let Err(f) = self.limits.check_key(&key) {
                    return Reply::Now(refused(f));
                }
                let newer = cluster.newer_than(&key, &node, held.as_ref(), |item| record_of(item));
                Reply::Now(match newer {
                    Newer::Copy(record) => Answer::Item {
                        created: false,
                        record,
                    },
                    Newer::Deleted { at } => Answer::DeletedAt { at },
                    Newer::Nothing => Answer::Missing,
                })
            }
            Request::InvalidateTag { tag } => Reply::Now(match self.limits.check_tag(&tag) {
                Ok(()) => Answer::Invalidated(cluster.invalidate_locally(&tag)),
                Err(f) => refused(f),
            }),
            Request::Progress => Reply::Now(Answer::Progress(Box::new(cluster.report()))),
            Request::Stats => Reply::Now(Answer::Stats(Box::new(self.stats()))),
            Request::GetRing => Reply::Now(match cluster.rings() {
                Some(rings) => Answer::Ring(Box::new((*rings.current.doc).clone())),
                None => refused(Failure::not_found("no ring held yet")),
            }),
            Request::PutRing { doc } => {
                let adopted = cluster.adopt(doc);
                Reply::Now(Answer::RingAdopted {
                    epoch: cluster.epoch(),
                    adopted,
                })
            }
            Request::Lease { node } => Reply::Now(Answer::Lease {
                granted: cluster.grant_lease(&node),
            }),
            Request::Tombstones { since } => {
                Reply::Now(Answer::Tombstones(cluster.serve_tombstones(since)))
            }
        }
    }
}

impl Executor {
    /// A read forwarded here as to the key's owner: served from the store,
    /// after asking the other owners for anything newer when this node may
    /// have missed writes (see `cluster::reconcile`).
    fn serve_get(self: Arc<Self>, cluster: Arc<Cluster>, key: String) -> Reply {
        if let Err(f) = self.limits.check_key(&key) {
            return Reply::Now(refused(f));
        }
        if cluster.serves_own_copies() {
            return Reply::Now(self.read_answer(&key));
        }
        Reply::Later(Box::pin(async move {
            cluster.reconcile(&key).await;
            self.read_answer(&key)
        }))
    }

    /// The answer to a read of `key` from the store.
    fn read_answer(&self, key: &str) -> Answer {
        match self.read_record(key) {
            Some(record) => Answer::Item {
                created: false,
                record,
            },
            None => Answer::Missing,
        }
    }

    /// The key as a record, read from the store (counted as a hit or miss).
    fn read_record(&self, key: &str) -> Option<Records> {
        self.store.get(key, |item| record_of(&item))
    }

    /// Applies a replicate request: every record and delete checked first,
    /// the well-formed ones applied, the others counted as refused.
    fn replicate(
        &self,
        cluster: &Cluster,
        source: crate::peer::protocol::Source,
        items: &Records,
        deletes: &[Deletion],
    ) -> Answer {
        let most = cluster.settings().batch_items;
        if items.len() > most || deletes.len() > most {
            return refused(Failure::too_large(format!(
                "a batch holds at most {most} items and {most} deletes (--rebalance-batch-items); got {} and {}",
                items.len(),
                deletes.len()
            )));
        }
        let records = match items.decode() {
            Ok(records) => records,
            Err(e) => return refused(Failure::bad_request(e.to_string())),
        };
        let total = records.len();
        let records: Vec<RecordRef<'_>> = records
            .into_iter()
            .filter(|r| match self.record_within_limits(r) {
                Ok(()) => true,
                Err(f) => {
                    let key: String = r.key().chars().take(64).collect();
                    tracing::warn!(%key, why = %f.message, "refused an item from a peer");
                    false
                }
            })
            .collect();
        let deletes: Vec<Deletion> = deletes
            .iter()
            .filter(|d| self.limits.check_key(&d.key).is_ok())
            .cloned()
            .collect();
        let mut outcome = cluster.apply_replicate(source, &records, &deletes);
        outcome.refused += (total - records.len()) as u64;
        Answer::Replicated(outcome)
    }

    /// Whether a record from a peer meets the limits a client's write must
    /// meet, and has a life (created before it expires).
    fn record_within_limits(&self, r: &RecordRef<'_>) -> Result<(), Failure> {
        self.limits.check_key(r.key())?;
        self.limits.check_value(r.value())?;
        self.limits.check_tags(r.tag_list().iter().copied())?;
        let meta = r.meta();
        if meta.created_at > meta.expires_at {
            return Err(Failure::bad_request("created after it expires"));
        }
        Ok(())
    }
}

/// An item as the protocol's one-record answer.
fn record_of(item: &impl ItemView) -> Records {
    let mut batch = RecordBatch::default();
    batch.push(item);
    batch.freeze()
}

fn refused(f: Failure) -> Answer {
    let status = if f.status == StatusCode::OK {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        f.status
    };
    Answer::refused(status.as_u16(), f.message)
}

//! Keepers: an owner of a key that forwards a client's write of it to the
//! coordinator keeps its own copy from the coordinator's answer, instead of
//! the coordinator replicating the write back to it (see `Request::Set`).
//! One exchange between the two nodes instead of two.
//!
//! What makes that as safe as replication:
//! * the client is answered only after the keeper stored its copy, and the
//!   keeper's part runs as a task of its own, so a client that gives up
//!   does not cut it short once the coordinator may have applied the write;
//! * a ring change while the write was on its way sends it on to the owners
//!   of the ring the keeper now holds (the coordinator replicated under the
//!   ring it held);
//! * a write that could not be stored (expired on its way, deleted since)
//!   does not leave the older copy in its place;
//! * a write the coordinator took without answering is *resynced*: the
//!   keeper asks the coordinator for its copy until it answers. A
//!   coordinator applies a write as it reads it, so its answer to a fetch
//!   sent after the write's own exchange failed holds the write if it was
//!   ever applied.
//!
//! Both kinds of task are bounded: past [`MAX_KEEPING`] writes kept at once
//! a node forwards plainly (the coordinator then replicates back, which a
//! client giving up cannot cut short), and a key is resynced by one task at
//! a time, at most [`MAX_RESYNCING`] keys at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::PeerOp;
use super::{Cluster, retry_policy};
use crate::peer::protocol::{Records, ReplicateOutcome};
use crate::peer::{PeerError, Request, expect};
use crate::store::ItemView;

/// Most writes this node keeps a copy of at once.
pub const MAX_KEEPING: usize = 4096;
/// Most keys being resynced at once.
pub const MAX_RESYNCING: usize = 10_000;
/// How long a resync keeps asking the coordinator.
pub const RESYNC_DEADLINE: Duration = Duration::from_secs(120);

/// The keeper's bounds.
pub struct Keepers {
    keeping: Arc<Semaphore>,
    resyncing: Mutex<HashSet<String>>,
}

impl Default for Keepers {
    fn default() -> Self {
        Self {
            keeping: Arc::new(Semaphore::new(MAX_KEEPING)),
            resyncing: Mutex::default(),
        }
    }
}

/// A write this node forwards and keeps a copy of: held for as long as its
/// task runs.
pub struct Keeping {
    _permit: OwnedSemaphorePermit,
}

impl Cluster {
    /// Whether this node forwards a client's write of `key` and keeps its
    /// own copy from the answer: when it is one of the owners the write
    /// must reach but not its coordinator, and fewer than [`MAX_KEEPING`]
    /// writes are being kept.
    pub fn keeping(&self, key: &str) -> Option<Keeping> {
        if !self.is_replica_of(key) {
            return None;
        }
        let permit = self.keepers.keeping.clone().try_acquire_owned().ok()?;
        Some(Keeping { _permit: permit })
    }

    /// Stores this node's copy of a write it forwarded as the keeper, from
    /// the coordinator's answer, before its client is answered. `epoch`: the
    /// ring the write was sent under. If the ring changed since, the
    /// coordinator may have replicated under a ring this node no longer
    /// holds, so the write goes on to the owners of this node's ring too
    /// (those that hold it find it stale).
    pub async fn keep(&self, key: &str, record: &Records, epoch: u64) -> ReplicateOutcome {
        let mut outcome = match record.single() {
            Ok(record) => {
                let outcome = self.apply_records(std::slice::from_ref(&record));
                if outcome.applied == 0 {
                    self.drop_older(key, record.meta().created_at);
                }
                outcome
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "a coordinator answered a kept write with a bad record");
                ReplicateOutcome {
                    refused: 1,
                    ..Default::default()
                }
            }
        };
        if self.epoch() != epoch {
            outcome += self.replicate(key, record, &[], None).await;
        }
        outcome
    }

    /// After `coordinator` took a write of `key` this node keeps without
    /// answering: asks it for its copy (applied here if newer) until it
    /// answers, for up to [`RESYNC_DEADLINE`], or until it is no longer a
    /// member. Past the deadline the copies may differ until the key's next
    /// write, which is logged.
    pub async fn resync_kept(self: Arc<Self>, key: String, coordinator: String) {
        {
            let mut resyncing = self.keepers.resyncing.lock();
            if resyncing.len() >= MAX_RESYNCING || !resyncing.insert(key.clone()) {
                return;
            }
        }
        let request = Request::Fetch { key: key.clone() };
        let fetched = (|| async {
            let Some(member) = self.member_named(&coordinator) else {
                return Ok(());
            };
            let answer = self.call(&member, &request, None, expect::item).await;
            self.metrics.peer_call(PeerOp::Fetch, answer.is_ok());
            if let Some(record) = answer? {
                let record = record.single().map_err(|e| PeerError::BadAnswer {
                    addr: member.address,
                    reason: e.to_string(),
                })?;
                self.apply_records(std::slice::from_ref(&record));
            }
            Ok::<_, PeerError>(())
        })
        .retry(
            retry_policy()
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(RESYNC_DEADLINE)),
        )
        .await;
        self.keepers.resyncing.lock().remove(&key);
        if let Err(e) = fetched {
            tracing::warn!(key, %coordinator, error = %e, "the coordinator of a write it may hold never answered: this node's copy may differ until the key is written again");
        }
    }
}

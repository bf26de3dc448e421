//! Keepers: an owner of a key that forwards a client's write of it to the
//! coordinator keeps its own copy from the coordinator's answer, instead of
//! the coordinator replicating the write back to it (see `Request::Set`).
//! One exchange between the two nodes instead of two.
//!
//! What makes that as safe as replication:
//! * the client is answered only after the keeper stored its copy, and the
//!   keeper's part is carried to its end if the client gives up (it then
//!   goes on as a task of its own, see `exec::finishing`), so it is not cut
//!   short once the coordinator may have applied the write;
//! * a ring change while the write was on its way sends it on to the owners
//!   of the ring the keeper now holds (the coordinator replicated under the
//!   ring it held);
//! * a write that could not be stored (expired on its way, deleted since)
//!   does not leave the older copy in its place;
//! * a write the coordinator took without answering is *resynced*: the
//!   keeper asks the coordinator for its copy until it answers. A
//!   coordinator applies a write as it reads it, so its answer to a fetch
//!   sent on the same connection after the write holds the write if it was
//!   ever applied. (A fetch on a new connection, after the write's own
//!   broke, could in principle overtake a write frame still unread in the
//!   coordinator's socket; the new connection's handshake alone takes
//!   longer than reading a frame that has arrived.)
//!
//! Both are bounded: past [`MAX_KEEPING`] writes kept at once a node
//! forwards plainly (the coordinator then replicates back, which a client
//! giving up cannot cut short), and a key is resynced by one task at a
//! time, at most [`MAX_RESYNCING`] keys at once. A node shutting down
//! waits for the writes it keeps before its last snapshot; resyncs are
//! left to end with the process (the copies then meet again when the node
//! restarts and pulls its keys).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Cluster;
use super::metrics::PeerOp;
use super::pace::retry_policy;
use crate::peer::protocol::{Records, ReplicateOutcome};
use crate::peer::{Call, PeerError};

/// Most writes this node keeps a copy of at once.
pub(crate) const MAX_KEEPING: usize = 4096;
/// Most keys being resynced at once.
pub(crate) const MAX_RESYNCING: usize = 10_000;
/// How long a resync keeps asking the coordinator, in pauses between
/// attempts (each attempt may add up to a peer timeout).
pub(crate) const RESYNC_DEADLINE: Duration = Duration::from_secs(120);

/// The keepers' bounds.
pub(crate) struct Keepers {
    keeping: Arc<Semaphore>,
    resyncing: Arc<Mutex<HashSet<String>>>,
}

impl Default for Keepers {
    fn default() -> Self {
        Self {
            keeping: Arc::new(Semaphore::new(MAX_KEEPING)),
            resyncing: Arc::default(),
        }
    }
}

/// A write this node forwards and keeps a copy of: held until the
/// keeper's part ends.
pub(crate) struct KeepPermit {
    _permit: OwnedSemaphorePermit,
}

/// A key being resynced: off the list when the resync ends, however it
/// ends.
pub(crate) struct Resyncing {
    key: String,
    list: Arc<Mutex<HashSet<String>>>,
}

impl Drop for Resyncing {
    fn drop(&mut self) {
        self.list.lock().remove(&self.key);
    }
}

impl Cluster {
    /// Whether this node forwards a client's write of `key` and keeps its
    /// own copy from the answer: when it is one of the owners the write
    /// must reach but not its coordinator, and fewer than [`MAX_KEEPING`]
    /// writes are being kept.
    pub(crate) fn keeping(&self, key: &str) -> Option<KeepPermit> {
        if !self.is_replica_of(key) {
            return None;
        }
        let permit = self.keepers.keeping.clone().try_acquire_owned().ok()?;
        Some(KeepPermit { _permit: permit })
    }

    /// Waits, up to `timeout`, until no write is being kept. False if some
    /// still were at the deadline.
    pub(crate) async fn wait_keepers(&self, timeout: Duration) -> bool {
        let all = u32::try_from(MAX_KEEPING).expect("a small constant");
        tokio::time::timeout(timeout, self.keepers.keeping.acquire_many(all))
            .await
            .is_ok()
    }

    /// Puts `key` on the list of keys being resynced; `None` if it is on it
    /// already (that resync fetches the newest copy too) or the list is
    /// full (logged: the copies may then differ until the key's next write).
    pub(crate) fn start_resync(&self, key: &str) -> Option<Resyncing> {
        let mut list = self.keepers.resyncing.lock();
        if list.contains(key) {
            return None;
        }
        if list.len() >= MAX_RESYNCING {
            tracing::warn!(
                key,
                MAX_RESYNCING,
                "too many keys being resynced: this node's copy may differ from its coordinator's until the key is written again"
            );
            return None;
        }
        list.insert(key.to_owned());
        Some(Resyncing {
            key: key.to_owned(),
            list: self.keepers.resyncing.clone(),
        })
    }

    /// Stores this node's copy of a write it forwarded as the keeper, from
    /// the coordinator's answer, before its client is answered. `epoch`: the
    /// ring the write was sent under. If the ring changed since, the
    /// coordinator may have replicated under a ring this node no longer
    /// holds, so the write goes on to the owners of this node's ring too
    /// (those that hold it find it stale).
    pub(crate) async fn keep(&self, key: &str, record: &Records, epoch: u64) -> ReplicateOutcome {
        let mut outcome = match record.single() {
            Ok(record) => self.apply_records(std::slice::from_ref(&record)),
            Err(e) => {
                tracing::warn!(key, error = %e, "a coordinator answered a kept write with a bad record");
                return ReplicateOutcome {
                    refused: 1,
                    ..Default::default()
                };
            }
        };
        if self.epoch() != epoch {
            outcome += self.replicate(key, record.clone(), &[], None).await;
        }
        outcome
    }

    /// After `coordinator` took a write of `key` this node keeps without
    /// answering: asks it for its copy (applied here if newer) until it
    /// answers, for about [`RESYNC_DEADLINE`], or until it is no longer a
    /// member. Past the deadline the copies may differ until the key's next
    /// write, which is logged.
    pub(crate) async fn resync_kept(self: Arc<Self>, resyncing: Resyncing, coordinator: String) {
        let key = resyncing.key.clone();
        let call = Call::fetch(key.clone());
        let fetched = (|| async {
            let Some(member) = self.member_by_id(&coordinator) else {
                return Ok(());
            };
            let answer = self.call(&member, &call, None).await;
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
        drop(resyncing);
        if let Err(e) = fetched {
            tracing::warn!(key, %coordinator, error = %e, "the coordinator of a write it may hold never answered: this node's copy may differ until the key is written again");
        }
    }
}

//! The restore rule: what a node that comes back from a snapshot keeps, so
//! that a delete or tag invalidation made while it was down does not come
//! back with its snapshot.
//!
//! A delete reaches every owner of the key that is up; the ones that are
//! down miss it, and so do their snapshots. What the owners that were up
//! know of it is their tombstone (see [`super::tombstones`]), which they
//! keep for [`super::tombstones::TOMBSTONE_TTL`] (at most 200,000 deletes),
//! in memory and in their own snapshots, so a tombstone survives a clean
//! restart of the node that holds it. The rule, for a node that loaded a
//! snapshot whose scan started at `written_at`:
//!
//! 1. Before its first pull it asks every other member of the ring for the
//!    deletes and invalidations it remembers since `written_at` (minus
//!    [`CLOCK_MARGIN`]), and for the newest time it has forgotten one. Like
//!    the pull, every member must answer; the node stays not ready meanwhile.
//! 2. If every member's memory reaches back to `written_at` (nothing newer
//!    was forgotten, and the answer fit in one message), the node takes in
//!    those tombstones and removes every restored item one of them covers
//!    (written at or before the delete): the snapshot is *reconciled*.
//! 3. Otherwise the node cannot know what was deleted meanwhile, so it
//!    removes every item the snapshot brought (written at or before
//!    `written_at`) and pulls like an empty node: the snapshot is
//!    *discarded* (a full resync from the replicas).
//! 4. Then it pulls as usual; the newer version of a key wins, and the
//!    tombstones taken in keep a deleted key from coming back from a peer's
//!    stale snapshot too.
//!
//! A node started with `--restore-from` that loaded no snapshot of its own
//! first loads the backup (`crate::backup`), keeping the keys it owns in
//! the first ring it adopts, and the backup is then checked by the same
//! rule as a snapshot: in a new cache the members remember every delete
//! (they have seen none), so it is kept; a node restarting in a cache that
//! has lived longer than its members remember discards it and pulls.
//!
//! What it cannot cover: a delete whose only witnesses lost their memory of
//! it, that is every owner that applied it has since restarted without a
//! valid snapshot (a corrupt file, a crash after its last periodic
//! snapshot). The README says so under "Persistence".

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use parking_lot::Mutex;

use super::Cluster;
use super::metrics::PeerOp;
use super::pace::UntilDone;
use super::ring::{MemberIdx, Ring, RingMember};
use super::tombstones::TombstoneLog;
use crate::backup::{BackupError, Backups};
use crate::peer::{Call, PeerError};
use crate::store::UnixNanos;

/// Deletes are asked for from this long before the snapshot was taken, so
/// the clocks of the node and its peers (which stamp the deletes) may differ
/// by that much. Asking for more is harmless: a tombstone only removes items
/// written at or before it.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(60);

/// The `written_at` of a loaded snapshot not yet reconciled.
#[derive(Default)]
pub struct PendingRestore(Mutex<Option<UnixNanos>>);

/// How long a new cache waits for a backup that does not exist (or cannot
/// be read at all) before it starts from what its members hold.
pub const MISSING_BACKUP_WAIT: Duration = Duration::from_secs(600);

/// A backup to load before the first pull (`--restore-from`).
#[derive(Default)]
pub struct PendingBackup(Mutex<Option<(Arc<Backups>, String)>>);

/// What the check against the peers decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Kept, minus the items deleted meanwhile.
    Reconciled { removed: u64 },
    /// Dropped whole: the peers no longer remember every delete since.
    Discarded { removed: u64, why: String },
}

/// Why the check stopped before deciding.
#[derive(Debug)]
pub enum Interrupted {
    /// A newer ring arrived: plan again.
    RingChanged,
}

impl Cluster {
    /// The node loaded a snapshot whose scan started at `written_at`,
    /// remembering the deletes in `log`: keep them, and check the snapshot
    /// against the peers before the first pull.
    pub fn restored(&self, written_at: UnixNanos, log: &TombstoneLog) {
        self.tombstones.absorb(log);
        *self.restore.0.lock() = Some(written_at);
    }

    /// The node starts with no snapshot and `--restore-from id`: load that
    /// backup before the first pull.
    pub fn restore_backup(&self, backups: Arc<Backups>, id: String) {
        *self.backup.0.lock() = Some((backups, id));
    }

    /// Loads the pending backup, keeping the keys this node owns in
    /// `ring`, and hands it to the restore rule; a no-op when none is
    /// pending. Waits, not ready, retrying with backoff until the ring
    /// changes, while the backup cannot be read.
    ///
    /// `--restore-from` stays in a pod's environment for the life of the
    /// cache, so the node first asks whether the cache already serves:
    /// when every other member is ready, they hold newer data than the
    /// backup, and the node pulls from them instead (no download on every
    /// restart). A backup that does not exist (or of which no object can
    /// be read) keeps a new cache not ready for up to
    /// [`MISSING_BACKUP_WAIT`] (a restore the user asked for does not
    /// quietly start empty), but not a node of a cache that serves: it
    /// pulls from the members that do.
    pub(super) async fn load_backup(&self, ring: &Ring, me: MemberIdx) -> Result<(), Interrupted> {
        let Some((backups, id)) = self.backup.0.lock().clone() else {
            return Ok(());
        };
        // The ring, shared, for the loader on its blocking thread.
        let ring = match self.ring.current() {
            Some(current) if current.epoch() == ring.epoch() => current,
            _ => return Err(Interrupted::RingChanged),
        };
        let mut epochs = self.subscribe();
        let mut pace = UntilDone::new();
        let started = std::time::Instant::now();
        loop {
            let (ready, others) = self.members_ready(&ring, me).await;
            if others > 0 && ready == others {
                tracing::info!(backup = %id,
                    "the cache already serves: pulling from its members instead of restoring the backup");
                break;
            }
            let owned = ring.clone();
            let keep = Arc::new(move |key: &str| owned.is_owner(key.as_bytes(), me));
            let result = backups.restore(&self.store, &id, keep).await;
            if self.epoch() != ring.epoch() {
                // What it kept followed the old ring: load again for the
                // new one (loading twice is harmless: the newer version wins).
                return Err(Interrupted::RingChanged);
            }
            match result {
                Ok(restored) => {
                    for log in &restored.tombstones {
                        self.tombstones.absorb(log);
                    }
                    let mut pending = self.restore.0.lock();
                    // With a snapshot pending too, the older time rules.
                    let at = pending.map_or(restored.written_at, |p| p.min(restored.written_at));
                    *pending = Some(at);
                    break;
                }
                Err(
                    e @ (BackupError::NotFound(..)
                    | BackupError::Unreadable(..)
                    | BackupError::InvalidId(_)),
                ) if ready > 0 || started.elapsed() >= MISSING_BACKUP_WAIT => {
                    tracing::error!(backup = %id, error = %crate::backup::summary(&e),
                        "cannot restore the backup; starting from what the members hold");
                    break;
                }
                Err(e) => {
                    let pause = pace.next_pause();
                    tracing::error!(backup = %id, error = %crate::backup::summary(&e), retry_in = ?pause,
                        "cannot restore the backup yet; staying not ready until it can be read");
                    self.back_off(&mut epochs, ring.epoch(), pause).await?;
                }
            }
        }
        *self.backup.0.lock() = None;
        Ok(())
    }

    /// Waits `pause` (one of an [`UntilDone`]'s), or less if a new ring
    /// arrives; `Err` when the ring changed (plan again). Both restore
    /// steps wait this way.
    async fn back_off(
        &self,
        epochs: &mut tokio::sync::watch::Receiver<u64>,
        epoch: u64,
        pause: Duration,
    ) -> Result<(), Interrupted> {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = epochs.changed() => {}
        }
        if self.epoch() != epoch {
            return Err(Interrupted::RingChanged);
        }
        Ok(())
    }

    /// How many of the other members of `ring` say they are ready, of how
    /// many (one that does not answer within a second counts as not ready).
    async fn members_ready(&self, ring: &Ring, me: MemberIdx) -> (usize, usize) {
        let others = ring.others(me);
        let answers = join_all(
            others
                .iter()
                .map(|m| self.peers.progress(m.address, Some(Duration::from_secs(1)))),
        )
        .await;
        let ready = answers
            .iter()
            .filter(|a| a.as_ref().is_ok_and(|p| p.ready))
            .count();
        (ready, others.len())
    }

    /// What this node remembers of deletes, for its snapshot.
    pub fn tombstone_log(&self) -> TombstoneLog {
        self.tombstones.log()
    }

    /// Answers a peer's `Tombstones` request: what is remembered since
    /// `since`, or `None` when that is more than one batch holds.
    pub fn serve_tombstones(&self, since: UnixNanos) -> Option<TombstoneLog> {
        self.tombstones.log_since(since, self.settings.batch_bytes)
    }

    /// Checks a loaded snapshot against every other member of `ring` (see
    /// the module's doc); a no-op when none is pending. Waits for every
    /// member to answer, retrying with backoff, until the ring changes.
    pub(super) async fn reconcile_restore(
        &self,
        ring: &Ring,
        me: MemberIdx,
    ) -> Result<Option<Verdict>, Interrupted> {
        let Some(written_at) = *self.restore.0.lock() else {
            return Ok(None);
        };
        let since = written_at.saturating_sub(CLOCK_MARGIN.as_nanos() as u64);
        let others = ring.others(me);
        let answers = join_all(others.iter().map(|m| self.tombstones_of(ring, m, since))).await;
        let mut why = None;
        for (member, answer) in others.iter().zip(answers) {
            match answer? {
                None => {
                    why = Some(format!(
                        "{} remembers more deletes since the snapshot than one answer holds",
                        member.id
                    ));
                }
                Some(log) => {
                    if log.forgotten_before > written_at {
                        why = Some(format!(
                            "{} no longer remembers every delete since the snapshot",
                            member.id
                        ));
                    }
                    self.tombstones.absorb(&log);
                }
            }
        }
        let verdict = match why {
            None => Verdict::Reconciled {
                removed: self.remove_restored(|key, created_at, tags| {
                    self.tombstones.buries(key, created_at, tags)
                }),
            },
            Some(why) => Verdict::Discarded {
                removed: self.remove_restored(|_, created_at, _| created_at <= written_at),
                why,
            },
        };
        *self.restore.0.lock() = None;
        let (outcome, removed) = match &verdict {
            Verdict::Reconciled { removed } => {
                tracing::info!(
                    removed,
                    "snapshot reconciled with the peers: removed the items deleted while this node was down"
                );
                ("reconciled", *removed)
            }
            Verdict::Discarded { removed, why } => {
                tracing::warn!(
                    removed, %why,
                    "snapshot discarded: the peers cannot tell what was deleted since it was taken; pulling everything instead"
                );
                ("discarded", *removed)
            }
        };
        self.metrics.restores.with_label_values(&[outcome]).inc();
        self.metrics.restore_removed.inc_by(removed);
        Ok(Some(verdict))
    }

    /// Asks `member` for its tombstones until it answers.
    async fn tombstones_of(
        &self,
        ring: &Ring,
        member: &RingMember,
        since: UnixNanos,
    ) -> Result<Option<TombstoneLog>, Interrupted> {
        let call = Call::tombstones(since);
        let mut epochs = self.subscribe();
        let mut pace = UntilDone::new();
        loop {
            let result = self.call_with_retry(member, ring.epoch(), &call).await;
            self.metrics.peer_call(PeerOp::Pull, result.is_ok());
            match result {
                Ok(log) => return Ok(log),
                Err(PeerError::RingChanged { .. }) => return Err(Interrupted::RingChanged),
                Err(e) => {
                    let pause = pace.next_pause();
                    tracing::warn!(
                        peer = %member.id, error = %e, retry_in = ?pause,
                        "cannot ask a member for its deletes yet; staying not ready until it answers"
                    );
                    self.back_off(&mut epochs, ring.epoch(), pause).await?;
                }
            }
        }
    }

    /// Removes every item `doomed` picks. O(items), in batches of slots per
    /// shard lock; it runs once, before the node is ready.
    fn remove_restored(&self, doomed: impl Fn(&str, UnixNanos, &[&str]) -> bool) -> u64 {
        let removed = self.store.retain_items(|item| {
            let tags: Vec<&str> = item.tags().collect();
            !doomed(item.key(), item.meta().created_at, &tags)
        });
        removed as u64
    }
}

//! Repairing replicas that missed writes.
//!
//! When a write, delete or tag invalidation cannot reach one of a key's
//! owners, the coordinator still answers the client (the other owners have
//! it) and records a *hint*: the key (or tag) and what happened to it. A
//! background task retries the hinted peers every [`REPAIR_INTERVAL`]; for a
//! hinted write it sends the item as held *now*, so repeated writes collapse
//! into one transfer. A peer that restarts empty pulls its keys anyway (see
//! `rebalance`); hints cover the peer that was only briefly unreachable.
//!
//! Hints per peer are capped at [`MAX_HINTS_PER_PEER`]; past that the oldest
//! are dropped and a warning logged, since a peer gone that long will most
//! likely restart and pull.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use bytes::Bytes;
use parking_lot::Mutex;

use super::Cluster;
use super::metrics::PeerOp;
use super::wire::{self, Deletion, RecordBatch};
use crate::store::UnixNanos;

pub const REPAIR_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_HINTS_PER_PEER: usize = 100_000;
/// Most hints sent to one peer per request.
const REPAIR_BATCH: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyHint {
    /// Send the item as held now.
    Write,
    /// Delete the key unless written after `at`.
    Delete(UnixNanos),
}

/// Key hints and tag hints taken from (or put back into) the queue.
type Taken = (Vec<(String, KeyHint)>, Vec<(String, UnixNanos)>);

#[derive(Default)]
struct PeerHints {
    keys: HashMap<String, KeyHint>,
    tags: HashMap<String, UnixNanos>,
}

impl PeerHints {
    fn len(&self) -> usize {
        self.keys.len() + self.tags.len()
    }
}

/// Hints by the id of the member that missed them.
#[derive(Default)]
pub struct Hints {
    peers: Mutex<HashMap<String, PeerHints>>,
}

impl Hints {
    pub fn write(&self, peer: &str, key: &str) {
        self.add_key(peer, key, KeyHint::Write);
    }

    pub fn delete(&self, peer: &str, key: &str, at: UnixNanos) {
        self.add_key(peer, key, KeyHint::Delete(at));
    }

    pub fn invalidate(&self, peer: &str, tag: &str, at: UnixNanos) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        if hints.len() < MAX_HINTS_PER_PEER {
            hints.tags.insert(tag.to_owned(), at);
        } else {
            tracing::warn!(
                peer,
                tag,
                "repair queue full; dropping a tag invalidation hint"
            );
        }
    }

    /// Hints waiting, over every peer.
    pub fn pending(&self) -> usize {
        self.peers.lock().values().map(PeerHints::len).sum()
    }

    fn add_key(&self, peer: &str, key: &str, hint: KeyHint) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        if hints.len() >= MAX_HINTS_PER_PEER && !hints.keys.contains_key(key) {
            tracing::warn!(peer, "repair queue full; dropping a hint");
            return;
        }
        hints.keys.insert(key.to_owned(), hint);
    }

    /// Takes up to `n` key hints and every tag hint for `peer`.
    fn take(&self, peer: &str, n: usize) -> Taken {
        let mut peers = self.peers.lock();
        let Some(hints) = peers.get_mut(peer) else {
            return (Vec::new(), Vec::new());
        };
        let keys: Vec<String> = hints.keys.keys().take(n).cloned().collect();
        let keys = keys
            .into_iter()
            .map(|k| {
                let hint = hints.keys.remove(&k).expect("just listed");
                (k, hint)
            })
            .collect();
        let tags = hints.tags.drain().collect();
        if hints.len() == 0 {
            peers.remove(peer);
        }
        (keys, tags)
    }

    /// Puts back hints that could not be delivered (newer hints win).
    fn restore(&self, peer: &str, keys: Vec<(String, KeyHint)>, tags: Vec<(String, UnixNanos)>) {
        let mut peers = self.peers.lock();
        let hints = peers.entry(peer.to_owned()).or_default();
        for (k, h) in keys {
            hints.keys.entry(k).or_insert(h);
        }
        for (t, at) in tags {
            hints.tags.entry(t).or_insert(at);
        }
    }

    fn peers_with_hints(&self) -> Vec<String> {
        self.peers.lock().keys().cloned().collect()
    }

    /// Forgets a peer (it left the ring).
    fn forget(&self, peer: &str) {
        self.peers.lock().remove(peer);
    }
}

/// Retries hinted peers until the node stops.
pub async fn run(cluster: Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(REPAIR_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        for peer in cluster.hints.peers_with_hints() {
            repair_peer(&cluster, &peer).await;
        }
        cluster
            .metrics
            .pending_repairs
            .set(cluster.hints.pending() as i64);
    }
}

/// Sends one peer everything hinted for it, batch by batch, until done or a
/// batch fails (then the rest waits for the next round).
async fn repair_peer(cluster: &Cluster, peer: &str) {
    loop {
        let Some(rings) = cluster.rings() else { return };
        let Some(idx) = rings.current.index_of(peer) else {
            cluster.hints.forget(peer);
            return;
        };
        let member = rings.current.member(idx).clone();
        let (keys, tags) = cluster.hints.take(peer, REPAIR_BATCH);
        if keys.is_empty() && tags.is_empty() {
            return;
        }
        let mut records = RecordBatch::default();
        let mut deletes = Vec::new();
        for (key, hint) in &keys {
            match hint {
                KeyHint::Write => {
                    cluster.store.peek(key, |item| records.push(item));
                }
                KeyHint::Delete(at) => deletes.push(Deletion {
                    key: key.clone(),
                    at: *at,
                }),
            }
        }
        let mut delivered = true;
        if !records.is_empty() || !deletes.is_empty() {
            let body = Bytes::from(wire::replicate_body(&records, &deletes));
            let result = cluster
                .call(&member, Method::POST, "/internal/v1/replicate", body, None)
                .await;
            delivered = matches!(&result, Ok(a) if a.status.is_success());
            cluster.metrics.peer_call(PeerOp::Repair, delivered);
        }
        for (tag, _) in &tags {
            if !delivered {
                break;
            }
            let path = format!(
                "/internal/v1/invalidate/tag/{}",
                super::routing::encode_segment(tag)
            );
            let result = cluster
                .call(&member, Method::POST, &path, Bytes::new(), None)
                .await;
            let ok = matches!(&result, Ok(a) if a.status.is_success());
            cluster.metrics.peer_call(PeerOp::Repair, ok);
            delivered &= ok;
        }
        if !delivered {
            cluster.hints.restore(peer, keys, tags);
            return;
        }
        tracing::info!(
            peer,
            keys = keys.len(),
            tags = tags.len(),
            "repaired a replica"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_collapse_per_key_and_restore_keeps_newer() {
        let h = Hints::default();
        h.write("b", "k1");
        h.write("b", "k1");
        h.delete("b", "k2", 5);
        h.invalidate("b", "red", 9);
        assert_eq!(h.pending(), 3);
        let (keys, tags) = h.take("b", 10);
        assert_eq!(keys.len(), 2);
        assert_eq!(tags, vec![("red".to_string(), 9)]);
        assert_eq!(h.pending(), 0);
        h.delete("b", "k1", 7); // newer than the write being put back
        h.restore("b", keys, tags);
        let (keys, _) = h.take("b", 10);
        let k1 = keys.iter().find(|(k, _)| k == "k1").unwrap();
        assert_eq!(k1.1, KeyHint::Delete(7));
    }

    #[test]
    fn hints_are_capped_per_peer() {
        let h = Hints::default();
        for i in 0..MAX_HINTS_PER_PEER + 10 {
            h.write("b", &format!("k{i}"));
        }
        assert_eq!(h.pending(), MAX_HINTS_PER_PEER);
    }
}

//! A cluster node for unit tests of what a node does with its peers' data:
//! member "a" (this node) of a two-member ring with "b" (never started, or
//! a stand-in a test gives the address of), replication factor 2, so "a"
//! owns every key. Tests call the node's functions directly. And `Version`:
//! a version of a key as a peer sends it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc};

use super::metrics::ClusterMetrics;
use super::{Cluster, ClusterSettings};
use crate::peer::PeerSettings;
use crate::peer::protocol::{RecordBatch, Records};
use crate::store::{ItemMeta, ItemView, Store};

/// Node "a" around `store`, moving data in batches of `batch_items` items
/// or `batch_bytes` bytes.
pub(super) fn two_members(
    store: Arc<Store>,
    batch_items: usize,
    batch_bytes: usize,
) -> Arc<Cluster> {
    node_a(
        store,
        batch_items,
        batch_bytes,
        Duration::from_secs(1),
        membership(1, &[("a", MemberState::Active), ("b", MemberState::Active)]),
    )
}

/// Node "a" around `store` holding the ring `doc`, its requests to peers
/// timing out after `request_timeout`.
pub(super) fn node_a(
    store: Arc<Store>,
    batch_items: usize,
    batch_bytes: usize,
    request_timeout: Duration,
    doc: MembershipDoc,
) -> Arc<Cluster> {
    let settings = ClusterSettings {
        peer: PeerSettings {
            connect_timeout: Duration::from_secs(1),
            request_timeout,
            max_message_bytes: 1 << 24,
        },
        batch_items,
        batch_bytes,
        file_poll_interval: Duration::from_secs(1),
    };
    let c = Cluster::new(
        "a".into(),
        store,
        settings,
        ClusterMetrics::new(&prometheus::Registry::new()),
        Arc::new(AtomicBool::new(true)),
        None,
        None,
    );
    c.adopt(doc);
    c
}

/// A ring document at `epoch` with replication factor 2 and `members` in
/// their states, member `i` at the unreachable address 127.0.0.`i+1`:1.
pub(super) fn membership(epoch: u64, members: &[(&str, MemberState)]) -> MembershipDoc {
    MembershipDoc {
        epoch,
        replication_factor: 2,
        hashing: Hashing::Rendezvous,
        members: members
            .iter()
            .enumerate()
            .map(|(i, &(id, state))| Member {
                id: id.into(),
                address: format!("127.0.0.{}:1", i + 1),
                client_address: None,
                state,
            })
            .collect(),
    }
}

/// A version of key `k` a peer sends.
pub(super) struct Version {
    pub value: Vec<u8>,
    pub created_at: u64,
    pub expires_at: u64,
}

impl Version {
    /// Written at `created_at`, for an hour.
    pub(super) fn at(created_at: u64, value: &[u8]) -> Self {
        Self {
            value: value.to_vec(),
            created_at,
            expires_at: created_at + 3_600_000_000_000,
        }
    }

    pub(super) fn records(&self) -> Records {
        let mut batch = RecordBatch::default();
        batch.push(self);
        batch.freeze()
    }
}

impl ItemView for Version {
    fn key(&self) -> &str {
        "k"
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
    fn meta(&self) -> ItemMeta {
        ItemMeta {
            created_at: self.created_at,
            accessed_at: self.created_at,
            expires_at: self.expires_at,
            access_count: 0,
        }
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

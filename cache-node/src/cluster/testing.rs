//! A cluster node for unit tests of what a node does with its peers' data:
//! member "a" (this node) of a two-member ring with "b" (never started),
//! replication factor 2, so "a" owns every key. Nothing here is reachable:
//! tests call the node's functions directly.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc};

use super::metrics::ClusterMetrics;
use super::{Cluster, ClusterSettings};
use crate::peer::PeerSettings;
use crate::store::Store;

/// Node "a" around `store`, moving data in batches of `batch_items` items
/// or `batch_bytes` bytes.
pub(super) fn two_members(
    store: Arc<Store>,
    batch_items: usize,
    batch_bytes: usize,
) -> Arc<Cluster> {
    let settings = ClusterSettings {
        peer: PeerSettings {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
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
    c.adopt(membership(
        1,
        &[("a", MemberState::Active), ("b", MemberState::Active)],
    ));
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

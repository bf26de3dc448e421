//! The ring a node works with for one membership epoch: the document, its
//! members with parsed addresses, which one this node is, and where keys go
//! ([`Placement`], shared with ring-aware clients through the membership
//! crate, so both place keys alike).
//!
//! A [`Ring`] is built once per document and then only read, so lookups
//! take no lock. `cargo run --release -p cache-node --example ring_balance`
//! measures the placement algorithms (balance and movement against the
//! ideal 1/N); the figures behind the default are in the README.

use std::net::SocketAddr;
use std::sync::Arc;

use distrocache_membership::placement::Placement;
use distrocache_membership::{MemberState, MembershipDoc};

pub use distrocache_membership::placement::{MemberIdx, Owners};

#[derive(Debug, Clone)]
pub struct RingMember {
    pub id: String,
    /// Where the member's peer API listens.
    pub address: SocketAddr,
    pub state: MemberState,
}

impl RingMember {
    /// Owns keys (receives their writes and data).
    pub fn owns(&self) -> bool {
        self.state != MemberState::Leaving
    }

    /// Serves reads of the keys it owns.
    pub(super) fn serves(&self) -> bool {
        self.state == MemberState::Active
    }
}

#[derive(Debug)]
pub struct Ring {
    pub doc: Arc<MembershipDoc>,
    pub members: Vec<RingMember>,
    /// This node's index, when it is a member.
    pub me: Option<MemberIdx>,
    placement: Placement,
}

impl Ring {
    /// Builds the lookup structures for `doc` as seen by node `my_id`. The
    /// document must be valid ([`MembershipDoc::validate`]).
    pub fn new(doc: Arc<MembershipDoc>, my_id: &str) -> Self {
        let members: Vec<RingMember> = doc
            .members
            .iter()
            .map(|m| RingMember {
                id: m.id.clone(),
                address: m
                    .address
                    .parse()
                    .expect("validated documents have ip:port addresses"),
                state: m.state,
            })
            .collect();
        let me = members.iter().position(|m| m.id == my_id);
        Self {
            placement: Placement::new(&doc),
            doc,
            members,
            me,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.doc.epoch
    }

    pub(super) fn replication_factor(&self) -> usize {
        self.doc.replication_factor as usize
    }

    pub fn member(&self, idx: MemberIdx) -> &RingMember {
        &self.members[idx]
    }

    pub(super) fn index_of(&self, id: &str) -> Option<MemberIdx> {
        self.members.iter().position(|m| m.id == id)
    }

    /// The members other than `me`, in ring order: whom a node asks when
    /// it must hear from every peer (a pull, the restore rule).
    pub(super) fn others(&self, me: MemberIdx) -> Vec<&RingMember> {
        self.members
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .map(|(_, m)| m)
            .collect()
    }

    /// This node's own state in the ring, if it is a member.
    pub fn my_state(&self) -> Option<MemberState> {
        self.me.map(|i| self.members[i].state)
    }

    /// The members that own `key`, primary first: `replicationFactor` of them,
    /// or every owning member if there are fewer.
    pub fn owners(&self, key: &[u8]) -> Owners {
        self.placement.owners(key)
    }

    /// Whether member `idx` owns `key`.
    pub fn is_owner(&self, key: &[u8], idx: MemberIdx) -> bool {
        self.placement.is_owner(key, idx)
    }
}

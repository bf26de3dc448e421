//! The client's copy of the ring, learned from a node's `/api/v1/cluster`:
//! members with the addresses clients reach them at, and the placement of
//! keys (the membership crate's, the very code the nodes run).

use std::net::SocketAddr;

use distrocache_membership::placement::Placement;
use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc};
use serde::Deserialize;

/// `/api/v1/cluster` as a node answers it (the fields a client needs).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClusterView {
    pub mode: String,
    pub epoch: u64,
    #[serde(default)]
    pub replication_factor: Option<u32>,
    #[serde(default)]
    pub hashing: Option<Hashing>,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MemberView {
    pub id: String,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub client_address: Option<String>,
    pub state: MemberState,
}

/// One member as the client sees it.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    /// Where its client API listens.
    pub address: SocketAddr,
    pub state: MemberState,
}

/// The ring at one epoch.
#[derive(Debug)]
pub struct Ring {
    pub epoch: u64,
    pub nodes: Vec<Node>,
    /// `None` for a single node: it owns everything.
    placement: Option<Placement>,
}

impl Ring {
    /// A single node at `address`, before anything is known (or when the
    /// node says it runs alone).
    pub(crate) fn single(id: &str, address: SocketAddr) -> Self {
        Self {
            epoch: 0,
            nodes: vec![Node {
                id: id.to_owned(),
                address,
                state: MemberState::Active,
            }],
            placement: None,
        }
    }

    /// The ring a node described, `asked` being the address that answered
    /// (a single node's view carries no address).
    pub(crate) fn from_view(view: ClusterView, asked: SocketAddr) -> Result<Self, String> {
        if view.mode == "single" {
            let id = view.members.first().map_or("node", |m| m.id.as_str());
            return Ok(Self::single(id, asked));
        }
        let mut nodes = Vec::with_capacity(view.members.len());
        let mut members = Vec::with_capacity(view.members.len());
        for m in view.members {
            let client = m
                .client_address
                .clone()
                .or(m.address.clone())
                .ok_or_else(|| format!("member {} has no address", m.id))?;
            let address: SocketAddr = client
                .parse()
                .map_err(|e| format!("member {} has address {client:?}: {e}", m.id))?;
            members.push(Member {
                id: m.id.clone(),
                address: m.address.unwrap_or_else(|| client.clone()),
                client_address: Some(client),
                state: m.state,
            });
            nodes.push(Node {
                id: m.id,
                address,
                state: m.state,
            });
        }
        let doc = MembershipDoc {
            epoch: view.epoch,
            replication_factor: view.replication_factor.unwrap_or(1),
            hashing: view.hashing.unwrap_or_default(),
            members,
        };
        Ok(Self {
            epoch: view.epoch,
            nodes,
            placement: Some(Placement::new(&doc)),
        })
    }

    /// The members that own `key`, primary first (every member of a single
    /// node's ring).
    pub fn owners(&self, key: &str) -> Vec<usize> {
        match &self.placement {
            Some(p) => p.owners(key.as_bytes()).to_vec(),
            None => vec![0],
        }
    }
}

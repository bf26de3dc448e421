//! The client's copy of the ring, learned from a node's `/api/v1/cluster`:
//! members with the addresses clients reach them at, and the placement of
//! keys (the membership crate's, the very code the nodes run).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;

use distrocache_membership::placement::{Owners, Placement};
use distrocache_membership::{ClusterView, Member, MemberState, MembershipDoc, Mode};

/// One member as the client sees it.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    /// Where its client API listens.
    pub address: SocketAddr,
    pub state: MemberState,
    /// `address` as a `Host` header, made once per ring rather than
    /// formatted for every request.
    pub(crate) host: HeaderValue,
}

/// The ring at one epoch.
#[derive(Debug)]
pub struct Ring {
    pub epoch: u64,
    pub nodes: Vec<Node>,
    /// `None` for a single node: it owns everything.
    placement: Option<Placement>,
    /// This client's requests in flight to each node (by index in
    /// `nodes`), for [`crate::ReadFrom::LeastBusy`]. Counted in the ring a
    /// request was planned with, so a refresh starts from zero.
    in_flight: Vec<AtomicUsize>,
}

/// `address` as the value of a request's `Host` header.
pub(crate) fn host_header(address: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&address.to_string()).expect("a socket address is valid header text")
}

/// One request in flight to a node: counted while it lives.
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
                host: host_header(address),
            }],
            placement: None,
            in_flight: vec![AtomicUsize::new(0)],
        }
    }

    /// The ring a node described, `asked` being the address that answered
    /// (a single node's view carries no address).
    pub(crate) fn from_view(view: ClusterView, asked: SocketAddr) -> Result<Self, String> {
        if view.mode == Mode::Single {
            let id = view.members.first().map_or("node", |m| m.id.as_str());
            return Ok(Self::single(id, asked));
        }
        if view.members.is_empty() {
            // A cluster node before its first ring: nothing to route by.
            return Err("the node holds no ring yet".into());
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
                host: host_header(address),
            });
        }
        let doc = MembershipDoc {
            epoch: view.epoch,
            replication_factor: view.replication_factor.unwrap_or(1),
            hashing: view.hashing.unwrap_or_default(),
            members,
        };
        // Bounds the placement's size (virtual nodes, members) before it
        // is built: the view is a node's answer, not a trusted input.
        doc.validate()
            .map_err(|e| format!("an invalid ring: {e}"))?;
        Ok(Self {
            epoch: view.epoch,
            in_flight: nodes.iter().map(|_| AtomicUsize::new(0)).collect(),
            nodes,
            placement: Some(Placement::new(&doc)),
        })
    }

    /// The members that own `key`, primary first (every member of a single
    /// node's ring).
    pub fn owners(&self, key: &str) -> Owners {
        match &self.placement {
            Some(p) => p.owners(key.as_bytes()),
            None => Owners::from_elem(0, 1),
        }
    }

    /// How many of this client's requests node `i` has in flight.
    pub(crate) fn in_flight(&self, i: usize) -> usize {
        self.in_flight[i].load(Ordering::Relaxed)
    }

    /// Counts a request to node `i` until the guard is dropped.
    pub(crate) fn count_request(&self, i: usize) -> InFlight<'_> {
        self.in_flight[i].fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight[i])
    }
}

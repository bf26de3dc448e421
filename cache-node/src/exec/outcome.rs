//! What an operation came to, as typed values: the REST API encodes each as
//! its answer in one place (`api::answer`), and the peer server encodes the
//! ones a peer asks for in the protocol's terms.

use distrocache_membership::{ClusterView, NodeProgress};
use hyper::http::StatusCode;
use serde::Serialize;

use crate::cluster::replication::{ClusterStats, Copies, TagInvalidation};
use crate::peer::protocol::NodeStats;

/// A failed operation: the HTTP status that names the failure, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

/// Which node served an item request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServedBy {
    Here,
    Peer(String),
}

/// What became of an item request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    Found,
    Created,
    Replaced,
}

#[derive(Debug)]
pub enum Outcome {
    /// An item, already encoded as the seed's JSON (straight from the store
    /// or from the record an owner sent).
    Item {
        json: Vec<u8>,
        status: ItemStatus,
        served_by: ServedBy,
    },
    /// The key is not held (or expired).
    Missing {
        key: String,
        served_by: ServedBy,
    },
    Deleted {
        key: String,
        served_by: ServedBy,
    },
    TagInvalidated(TagInvalidation),
    Stats(Box<NodeStats>),
    Health(Health),
    Ready(Readiness),
    Metrics(String),
    /// The OpenAPI document (static).
    OpenApi,
    ClusterView(Box<ClusterView>),
    ClusterStats(Box<ClusterStats>),
    Copies(Box<Copies>),
    Progress(Box<NodeProgress>),
    Handoff(Box<Handoff>),
    Backup(Box<crate::backup::Uploaded>),
    Failed(Failure),
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        Outcome::Failed(f)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub node_id: String,
    pub timestamp: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub status: &'static str,
    pub node_id: String,
    /// Why the node is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of the preStop hook.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Handoff {
    pub handoff_complete: bool,
    pub waited: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<NodeProgress>,
}

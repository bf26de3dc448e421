//! What a client can ask of the cache, as typed operations. A request is
//! turned into one of these once, by whichever front end received it (the
//! REST API, or a peer forwarding a client's request), and the executor
//! does the rest.

use std::time::Duration;

use bytes::Bytes;

/// A validated write: the value's JSON text as the client sent it, its TTL
/// (`None`: the default) and its distinct tags in the order first given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub value: Bytes,
    pub ttl: Option<Duration>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Get {
        key: String,
    },
    Set {
        key: String,
        write: Write,
    },
    Delete {
        key: String,
    },
    InvalidateTag {
        tag: String,
    },
    /// This node's counters.
    Stats,
    /// Liveness.
    Health,
    /// Readiness: holds its data and may take traffic.
    Ready,
    /// The Prometheus exposition.
    Metrics,
    /// The OpenAPI document of the client API.
    OpenApi,
    /// The ring as this node holds it, and the owners of `key` if given.
    ClusterView {
        key: Option<String>,
    },
    /// Every member's counters and their sums.
    ClusterStats,
    /// Which members hold a copy of `key`.
    Copies {
        key: String,
    },
    /// This node's data-movement progress.
    Rebalance,
    /// The preStop hook: wait up to `timeout` for a leaving node's handoff
    /// (having first reached ring `epoch`, when given).
    Handoff {
        timeout: Duration,
        epoch: Option<u64>,
    },
    /// Upload this node's snapshot as its part of backup `id`.
    Backup {
        id: String,
    },
}

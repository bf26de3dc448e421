//! The peer protocol: how nodes of one cluster talk to each other.
//!
//! * [`protocol`]: every operation and answer as a type, with its binary
//!   encoding;
//! * [`frame`]: how messages are cut out of a connection's bytes;
//! * [`outbox`]: the sending half of a connection, where frames coalesce;
//! * [`call`]: every operation as a [`Call`], its request paired with the
//!   answer it is due by one constructor per operation;
//! * [`client`]: the [`PeerClient`], one multiplexed connection per peer,
//!   asked a [`Call`] and answering with what that call is due;
//! * [`server`]: serving one connection for the node's [`Handler`].
//!
//! A connection starts as HTTP/1.1 on the peer API's listener (the client
//! port, or `--peer-port`): `GET /internal/v1/connect` with
//! `Upgrade: distrocache-peer/1`, the peer token and the sender's id. The
//! listener's limits, timeouts and authentication apply to that request
//! like to any other; once it is answered `101 Switching Protocols`, both
//! sides speak frames. Clients of the cache never see any of this: the
//! client API stays plain HTTP/1.1.

pub mod call;
pub mod client;
pub mod frame;
pub mod outbox;
pub mod protocol;
pub mod server;
#[cfg(test)]
pub(crate) mod testing;

pub use call::Call;
pub use client::{PeerClient, PeerError, PeerSettings};
pub use protocol::Request;

/// The path a peer connection is opened on.
pub const CONNECT_PATH: &str = "/internal/v1/connect";
/// The `Upgrade` token of the protocol (and its version).
pub const PROTOCOL: &str = "distrocache-peer/1";
/// On the `101` answer to a peer connection: what this node's side of the
/// protocol takes beyond what `PROTOCOL` names, comma-separated, so nodes
/// of different versions (a rolling upgrade) only send each other what
/// both read.
pub const FEATURES_HEADER: &str = "x-distrocache-peer-features";
/// The feature of taking a `Set` that names a keeper (see `Request::Set`).
pub const FEATURE_SET_KEEPER: &str = "set-keeper";
/// The feature of taking `Newer` (see `Request::Newer`).
pub const FEATURE_NEWER: &str = "newer";
/// Every feature this node takes, as its `101` answer lists them.
pub const FEATURES: &str = "set-keeper, newer";
/// The id of the node opening a peer connection.
pub const FROM_HEADER: &str = "x-distrocache-from";
/// On answers to clients, when it is news to the connection (see
/// `api::answer::EpochTold`): the ring epoch of the node that answered, so a
/// ring-aware client knows when to refresh its copy of the ring.
pub const EPOCH_HEADER: &str = "x-distrocache-epoch";
/// On answers to clients: the id of the node that served the request.
pub const SERVED_BY_HEADER: &str = "x-distrocache-served-by";

//! DistroCache node library: the store, the executor of typed operations,
//! the REST API, the cluster and its peer protocol, metrics and
//! configuration, wired together by `server.rs` and run by `main.rs`. Kept
//! as a library so the integration tests and benchmarks drive exactly what
//! the binary runs.
//!
//! A request flows one way: `http` (connections) -> `api` (parsed once into
//! a typed operation) -> `exec` (where is it served?) -> `store` here, or
//! `cluster` -> `peer` to the key's owner -> one encoder of the answer.

pub mod api;
pub mod backup;
pub mod cluster;
pub mod config;
pub mod exec;
pub mod http;
pub mod item_json;
pub mod json_text;
pub mod memory;
pub mod metrics;
pub mod peer;
pub mod reload;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod tokens;

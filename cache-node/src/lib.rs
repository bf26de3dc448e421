//! DistroCache node library: the store, the REST API, metrics and configuration,
//! wired together by `server.rs` and run by `main.rs`. Kept as a library so the
//! integration tests and benchmarks drive exactly what the binary runs.

pub mod api;
pub mod cluster;
pub mod config;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;

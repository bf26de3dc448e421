//! DistroCache node library: the store, the REST API, metrics and configuration,
//! wired together by `main.rs`. Kept as a library so the integration tests and
//! benchmarks drive exactly what the binary runs.

pub mod store;

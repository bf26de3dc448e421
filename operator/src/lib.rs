//! The DistroCache operator: the `DistroCache` custom resource, the pure
//! builders of its children, the scale state machine, the controller that
//! ties them to the API server, and leader election between replicas.
//! `main.rs` runs it; `bin/crdgen.rs` writes the CRD YAML from these types.

pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod leader;
pub mod metrics;
pub mod node_client;
pub mod resources;
pub(crate) mod scaling;
pub mod server;
pub(crate) mod status;
pub(crate) mod validation;

//! The DistroCache operator: the `DistroCache` custom resource, the pure
//! builders of its children, the scale state machine, and the controller
//! that ties them to the API server. `main.rs` runs it; `bin/crdgen.rs`
//! writes the CRD YAML from these types.

pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod metrics;
pub mod node_client;
pub mod resources;
pub mod scaling;
pub mod server;
pub mod status;
pub mod validation;

//! Test support for DistroCache (DESIGN 6): a real Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager) started from cached
//! binaries, and a test kubelet that runs pods as local processes on loopback
//! addresses. The end-to-end tests in `tests/tests/` use both.
//!
//! A typical test:
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use distrocache_tests::{ControlPlane, Kubelet, Program, TestNamespace};
//! let cp = ControlPlane::shared().await?;
//! let kubelet = Kubelet::shared().await?;
//! kubelet.add_image("cache-node", Program::new("/path/to/cache-node")
//!     .env("DISTROCACHE_BIND_ADDRESS", "{podIP}"));
//! let ns = TestNamespace::create(cp, "my-test").await?.with_kubelet(kubelet);
//! let client = ns.client().await?;
//! // ... create a StatefulSet in ns.name() with `client`, wait for its pods ...
//! # Ok(())
//! # }
//! ```

pub mod binaries;
pub mod control_plane;
pub mod dashboards;
pub mod distrocache;
pub mod kubelet;
pub mod namespace;
pub mod oci;
pub mod pki;
pub mod procs;
pub mod prometheus;
pub mod tls;
pub mod wait;

pub use binaries::Binaries;
pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use kubelet::{Kubelet, KubeletConfig, PodProcess, Program};
pub use namespace::TestNamespace;

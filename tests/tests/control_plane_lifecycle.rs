//! An owned control plane: it starts, serves the real API, and when stopped
//! leaves no process, no open port and no file behind. Prints the start and
//! stop times (see them with `--nocapture`).
//!
//! This is its own test binary so that its control plane never competes for
//! the two cores with the shared one of the other test binaries.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use distrocache_tests::ControlPlane;
use distrocache_tests::binaries::K8S_VERSION;
use distrocache_tests::procs::{port_open, process_alive};

#[tokio::test]
async fn an_owned_control_plane_starts_serves_and_stops_cleanly() {
    let started = Instant::now();
    let cp = ControlPlane::start()
        .await
        .expect("start the control plane");
    let total = started.elapsed();
    let timings = cp.timings();
    eprintln!(
        "control plane start: /readyz after {:?}, controllers ready after {:?} \
         ({total:?} including credentials and files)",
        timings.readyz, timings.ready
    );

    let client = cp.client().await.expect("a client");
    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(version.git_version, K8S_VERSION);

    let ports = cp.ports();
    let ports = [ports.etcd_client, ports.etcd_peer, ports.apiserver];
    let addr = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for port in ports {
        assert!(port_open(addr(port)), "port {port} should be listening");
    }
    let pids = cp.pids();
    assert_eq!(
        pids.iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["etcd", "kube-apiserver", "kube-controller-manager"]
    );
    for (name, pid) in &pids {
        assert!(process_alive(*pid), "{name} (pid {pid}) should be running");
    }
    let dir = cp.dir().to_path_buf();
    assert!(
        dir.join("etcd").is_dir(),
        "etcd keeps its data in the control plane's directory"
    );

    drop(client);
    let stop = cp.stop();
    eprintln!("control plane stop: {stop:?}");

    for port in ports {
        assert!(
            !port_open(addr(port)),
            "port {port} should be closed after stop"
        );
    }
    for (name, pid) in &pids {
        assert!(
            !process_alive(*pid),
            "{name} (pid {pid}) should be gone after stop"
        );
    }
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

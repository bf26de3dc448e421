//! Checks made before anything starts, so that a newcomer's likely mistakes
//! get one clear line instead of a pod that restarts forever: the ports the
//! pods will listen on must be free on the first pod address. The cache nodes
//! listen on 8080 (clients) and 8081 (peers), the operator on 8081; a
//! `cache-node` left running from `cargo run` (which listens on every address)
//! or another playground on the same addresses would take them.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use anyhow::{Result, bail};

/// The ports the example cache and the operator listen on, on their pod IPs.
pub const POD_PORTS: [u16; 2] = [8080, 8081];

/// Fails with one line when a pod port is taken on `ip`.
pub fn pod_ports_free(ip: Ipv4Addr) -> Result<()> {
    for port in POD_PORTS {
        let addr = SocketAddr::from((ip, port));
        if let Err(e) = TcpListener::bind(addr) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                bail!(
                    "port {port} is already in use on {ip}, where a pod must listen \
                     (a cache-node from `cargo run`, or another playground?): stop that \
                     program, or give the pods other addresses with --pod-ips"
                );
            }
            bail!("cannot listen on {addr}, where a pod must listen: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_named_in_one_line() {
        let ip = Ipv4Addr::new(127, 0, 103, 10);
        pod_ports_free(ip).expect("nothing listens there");
        let _taken = TcpListener::bind((ip, 8081)).expect("bind 8081");
        let e = pod_ports_free(ip).expect_err("8081 is taken");
        let message = format!("{e:#}");
        assert!(
            message.contains("port 8081 is already in use on 127.0.103.10"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }
}

//! The TCP options every connection of a node gets, accepted (clients and
//! peers) or opened (to peers), in one place so both sides agree:
//!
//! * no Nagle delay: answers and peer frames are written whole, and waiting
//!   to coalesce them only adds latency;
//! * keepalive probes: a connection whose other end vanished without a word
//!   (its host lost power, a network partition) is otherwise never found
//!   out by a side that only reads. The peer server reads a connection for
//!   as long as it stays open, and without probes such a connection would
//!   hold its task and buffers for good. With these settings a silent
//!   connection is probed after [`KEEPALIVE_IDLE`] and closed by the kernel
//!   after [`KEEPALIVE_RETRIES`] unanswered probes [`KEEPALIVE_INTERVAL`]
//!   apart: about a minute. A live peer answers probes from its kernel, so
//!   they never close a connection that is merely quiet.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// How long a connection may be silent before the first probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel closes the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Sets the node's options on `stream`. A failure is logged and otherwise
/// ignored: the connection works without them.
pub fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_get_nodelay_and_keepalive_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opened = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        for stream in [&opened, &accepted] {
            tune(stream);
            let socket = SockRef::from(stream);
            assert!(stream.nodelay().unwrap());
            assert!(socket.keepalive().unwrap());
            assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
        }
    }
}

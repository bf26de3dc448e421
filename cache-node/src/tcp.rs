//! The TCP options every connection of a node gets, accepted (clients and
//! peers) or opened (to peers), in one place so both sides agree:
//!
//! * no Nagle delay: answers and peer frames are written whole, and waiting
//!   to coalesce them only adds latency;
//! * keepalive probes and a user timeout: a connection whose other end
//!   vanished without a word (its host lost power, a network partition) is
//!   otherwise never found out by a side that only reads, and found out only
//!   after about fifteen minutes of retransmissions by a side that writes.
//!   The peer server reads a connection for as long as it stays open, and
//!   the peer client's requests wait on theirs. With these settings a
//!   silent connection is probed after [`KEEPALIVE_IDLE`], and any
//!   connection whose data or probes go unacknowledged for
//!   [`UNACKNOWLEDGED_TIMEOUT`] is closed by the kernel (Linux: the user
//!   timeout also ends keepalive, in place of the probe count): about a
//!   minute after the other end went silent. A live peer's kernel answers
//!   probes and acknowledges data, so neither closes a connection that is
//!   merely quiet.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// How long a connection may be silent before the first probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel closes the connection (where
/// the user timeout below does not decide first).
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data or a probe may stay unacknowledged before the kernel
/// closes the connection (`TCP_USER_TIMEOUT`).
pub const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(30);

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
    let socket = SockRef::from(stream);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
    if let Err(e) = socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_get_nodelay_keepalive_probes_and_a_user_timeout() {
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
            assert_eq!(
                socket.tcp_user_timeout().unwrap(),
                Some(UNACKNOWLEDGED_TIMEOUT)
            );
        }
    }
}

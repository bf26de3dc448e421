//! Test support for unit tests that stand in for either end of a peer
//! connection with a plain socket: the accepting side of the upgrade, a
//! fake peer that takes every connection, and reading the frames that
//! follow, so each test scripts only what it sends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

use super::FEATURES_HEADER;
use super::frame::{Frame, FrameCodec};

/// Reads a peer client's upgrade request and takes it, saying the peer
/// takes `features` (comma-separated), if any; frames follow.
pub async fn take_upgrade(socket: &mut TcpStream, features: Option<&str>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let features = features
        .map(|f| format!("{FEATURES_HEADER}: {f}\r\n"))
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: distrocache-peer/1\r\n{features}\r\n"
    );
    socket.write_all(answer.as_bytes()).await.unwrap();
}

/// A peer on loopback that accepts every connection, takes its upgrade
/// (saying no features) and hands it to `on_connection`, each on a task of
/// its own. Returns its address and the count of connections it accepted.
pub async fn fake_peer_for_each<F, Fut>(on_connection: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let behaviour = on_connection.clone();
            tokio::spawn(async move {
                take_upgrade(&mut socket, None).await;
                behaviour(socket).await;
            });
        }
    });
    (addr, accepted)
}

/// The next frame from `socket`, bytes read past it kept in `buf` for the
/// next call; `None` once the other end has closed.
pub async fn read_frame(
    socket: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Option<Frame> {
    let mut codec = FrameCodec::new(1 << 20);
    loop {
        if let Some(frame) = codec.decode(buf).unwrap() {
            return Some(frame);
        }
        if socket.read_buf(buf).await.unwrap() == 0 {
            return None;
        }
    }
}

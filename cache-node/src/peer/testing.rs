//! Test support for unit tests that stand in for either end of a peer
//! connection with a plain socket: the accepting side of the upgrade, and
//! reading the frames that follow, so each test scripts only what it sends.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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

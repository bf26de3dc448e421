//! Frames: how requests and answers are cut out of a peer connection's byte
//! stream.
//!
//! Every frame is
//!
//! ```text
//! length: u32 (big-endian) | id: u64 | epoch: u64 | kind: u8 | body
//! ```
//!
//! `length` counts everything after itself. `id` pairs an answer with its
//! request (answers come back in any order). `epoch` is the sender's ring
//! epoch on a request, the answerer's on an answer, so every exchange tells
//! both sides whether they hold the same ring. `kind` names the operation
//! (requests) or the shape of the answer (answers); the body is its
//! encoding (see `protocol`).
//!
//! Written by hand over `tokio-util`'s codec traits: the encoding is five
//! fixed fields, and what matters is that a frame is appended to a shared
//! buffer without allocating (many frames leave in one `write`), and that a
//! bad length is refused before anything is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Bytes of a frame before its body: length, id, epoch and kind.
pub const HEADER_LEN: usize = 4 + 8 + 8 + 1;
/// Smallest value of the length field: id, epoch and kind, no body.
const MIN_LENGTH: usize = HEADER_LEN - 4;

/// One frame, its body still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub epoch: u64,
    pub kind: u8,
    pub body: Bytes,
}

/// Why a byte stream is not a sequence of frames. Either ends the connection:
/// past a bad frame nothing can be trusted to start where it should.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {length} bytes is larger than the limit of {limit}")]
    TooLarge { length: usize, limit: usize },
    #[error("a frame's length field says {0} bytes, less than a frame header")]
    TooShort(usize),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// The kind of the frame a server sends before it closes a connection on
/// purpose: its id is the last request it read, and it answers every
/// request up to that one before closing; later ones were never read, so a
/// client may send them again elsewhere. Neither a request nor an answer.
pub const GOING_AWAY: u8 = 255;

/// Appends a frame to `out`, its body written by `body`, which returns the
/// frame's kind. The length and kind are filled in afterwards, so the body
/// is encoded straight into the buffer.
pub fn encode(out: &mut BytesMut, id: u64, epoch: u64, body: impl FnOnce(&mut BytesMut) -> u8) {
    let start = out.len();
    out.put_u32(0);
    out.put_u64(id);
    out.put_u64(epoch);
    out.put_u8(0);
    let kind = body(out);
    let length = out.len() - start - 4;
    let length = u32::try_from(length).expect("frame bodies are bounded far below 4 GiB");
    out[start..start + 4].copy_from_slice(&length.to_be_bytes());
    out[start + HEADER_LEN - 1] = kind;
}

/// Cuts frames out of the bytes read from a connection.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    /// Largest value of the length field accepted.
    max_length: usize,
}

impl FrameCodec {
    /// Frames whose body is at most `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        Self {
            max_length: max_body + MIN_LENGTH,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_be_bytes(src[..4].try_into().expect("four bytes")) as usize;
        if length < MIN_LENGTH {
            return Err(FrameError::TooShort(length));
        }
        if length > self.max_length {
            return Err(FrameError::TooLarge {
                length,
                limit: self.max_length,
            });
        }
        if src.len() < 4 + length {
            // Room for the rest of this frame, so it arrives in few reads.
            src.reserve(4 + length - src.len());
            return Ok(None);
        }
        src.advance(4);
        let mut frame = src.split_to(length);
        let id = frame.get_u64();
        let epoch = frame.get_u64();
        let kind = frame.get_u8();
        Ok(Some(Frame {
            id,
            epoch,
            kind,
            body: frame.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(codec: &mut FrameCodec, bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut src = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(&mut src)? {
            out.push(frame);
        }
        Ok(out)
    }

    proptest! {
        /// Any sequence of frames, split at any point, decodes to itself.
        #[test]
        fn frames_round_trip_whatever_the_split(
            sent in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)),
                0..20,
            ),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            for (id, epoch, kind, body) in &sent {
                encode(&mut wire, *id, *epoch, |out| {
                    out.extend_from_slice(body);
                    *kind
                });
            }
            let cut = cut.index(wire.len() + 1);
            let mut codec = FrameCodec::new(300);
            let mut src = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(frame) = codec.decode(&mut src).unwrap() {
                got.push(frame);
            }
            src.extend_from_slice(&wire[cut..]);
            while let Some(frame) = codec.decode(&mut src).unwrap() {
                got.push(frame);
            }
            prop_assert!(src.is_empty());
            let expected: Vec<Frame> = sent
                .into_iter()
                .map(|(id, epoch, kind, body)| Frame { id, epoch, kind, body: body.into() })
                .collect();
            prop_assert_eq!(got, expected);
        }

        /// Arbitrary bytes never panic the decoder: they are frames, each
        /// of which encodes back to exactly the bytes it was read from,
        /// then a refusal of a bad length or a wait for the rest of a frame;
        /// and at the end of the stream, bytes left over are an error.
        #[test]
        fn arbitrary_bytes_are_frames_then_a_refusal_or_a_wait(
            frames_first in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..3),
            tail_length in 0u32..100,
            tail in proptest::collection::vec(any::<u8>(), 0..120),
            cut in any::<prop::sample::Index>(),
        ) {
            // Uniformly random bytes would almost always claim a frame of
            // gigabytes; so: whole frames, then a length near the bounds
            // (too short, fitting, too long) and any bytes, cut anywhere.
            let mut wire = BytesMut::new();
            for (i, body) in frames_first.iter().enumerate() {
                encode(&mut wire, i as u64, 9, |out| {
                    out.extend_from_slice(body);
                    3
                });
            }
            wire.put_u32(tail_length);
            wire.extend_from_slice(&tail);
            let bytes = wire[..cut.index(wire.len() + 1)].to_vec();
            let mut codec = FrameCodec::new(64);
            let mut src = BytesMut::from(&bytes[..]);
            let mut read = BytesMut::new();
            let outcome = loop {
                match codec.decode(&mut src) {
                    Ok(Some(frame)) => encode(&mut read, frame.id, frame.epoch, |out| {
                        out.extend_from_slice(&frame.body);
                        frame.kind
                    }),
                    other => break other,
                }
            };
            let rest = bytes.len() - read.len();
            prop_assert_eq!(&read[..], &bytes[..read.len()]);
            match outcome {
                Err(FrameError::TooShort(length)) => prop_assert!(length < MIN_LENGTH),
                Err(FrameError::TooLarge { length, .. }) => prop_assert!(length > 64 + MIN_LENGTH),
                Err(FrameError::Io(e)) => prop_assert!(false, "no I/O here: {}", e),
                Ok(Some(_)) => unreachable!("the loop reads every frame"),
                Ok(None) => {
                    // Waiting: what is left is less than one whole frame.
                    prop_assert_eq!(src.len(), rest);
                    if rest >= 4 {
                        let length = u32::from_be_bytes(src[..4].try_into().unwrap()) as usize;
                        prop_assert!(rest < 4 + length);
                    }
                    if rest > 0 {
                        prop_assert!(codec.decode_eof(&mut src).is_err(), "bytes left at the end");
                    }
                }
            }
        }

        /// A stream that ends inside a frame is an error, after the frames
        /// before it, wherever it ends.
        #[test]
        fn a_stream_ending_inside_a_frame_is_an_error(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 1..5),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            let mut ends = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                encode(&mut wire, i as u64, 1, |out| {
                    out.extend_from_slice(body);
                    1
                });
                ends.push(wire.len());
            }
            let cut = cut.index(wire.len());
            let whole_frames = ends.iter().filter(|&&end| end <= cut).count();
            let mut codec = FrameCodec::new(64);
            let mut src = BytesMut::from(&wire[..cut]);
            let mut got = 0;
            let ended = loop {
                match codec.decode_eof(&mut src) {
                    Ok(Some(_)) => got += 1,
                    other => break other,
                }
            };
            prop_assert_eq!(got, whole_frames);
            let at_a_boundary = cut == 0 || ends.contains(&cut);
            prop_assert_eq!(ended.is_err(), !at_a_boundary, "{:?}", ended);
        }
    }

    #[test]
    fn lengths_outside_the_bounds_are_refused_before_buffering() {
        let mut codec = FrameCodec::new(100);
        // Claims 4 GiB: refused from its first four bytes.
        assert!(matches!(
            frames(&mut codec, &[0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            frames(&mut codec, &[0, 0, 0, 3, 1, 2, 3]),
            Err(FrameError::TooShort(3))
        ));
        let mut big = BytesMut::new();
        encode(&mut big, 1, 1, |out| {
            out.put_bytes(0, 101);
            1
        });
        assert!(matches!(
            frames(&mut codec, &big),
            Err(FrameError::TooLarge { length: 118, .. })
        ));
        let mut ok = BytesMut::new();
        encode(&mut ok, 1, 1, |out| {
            out.put_bytes(0, 100);
            1
        });
        assert_eq!(frames(&mut codec, &ok).unwrap().len(), 1);
    }

    #[test]
    fn a_truncated_frame_waits_for_the_rest() {
        let mut wire = BytesMut::new();
        encode(&mut wire, 7, 3, |out| {
            out.extend_from_slice(b"hello");
            2
        });
        let mut codec = FrameCodec::new(100);
        for cut in 0..wire.len() {
            assert!(
                frames(&mut codec, &wire[..cut]).unwrap().is_empty(),
                "{cut}"
            );
        }
    }
}

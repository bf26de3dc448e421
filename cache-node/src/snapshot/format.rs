//! The snapshot file format: writing it as a stream of blocks, and reading
//! it back block by block, refusing anything truncated, corrupt or foreign
//! with a typed error, never a panic. No files here (the caller gives a
//! `Write` or a `Read`), so the fuzz target drives exactly this reader.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! magic    "DCSNAP\r\n"            8 bytes: a foreign file is refused here
//! version  u32                      FORMAT_VERSION; another one is refused
//! blocks   kind u8 | len u32 | body (len bytes) | xxh3-64 of kind, len, body
//!   HEADER (1)      first, once: JSON {"nodeId", "writtenAt", "graceful"}
//!   RECORDS (2)     any number: u32 count, then the peer protocol's item records
//!   TOMBSTONES (3)  once: the peer protocol's tombstone log
//!   END (4)         last: u64 items, u64 record blocks; then the file ends
//! ```
//!
//! Each block is checked on its own (its checksum, then its body decoded
//! whole), and the end block's counts against what was read, so a missing,
//! repeated, cut or flipped block is refused; the caller decides what to do
//! with what it applied before the error (the loader undoes it).

use std::io::{self, Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::cluster::tombstones::TombstoneLog;
use crate::peer::protocol::{RecordRef, Records, decode_tombstone_log, put_tombstone_log};
use crate::store::UnixNanos;

pub const MAGIC: &[u8; 8] = b"DCSNAP\r\n";
pub const FORMAT_VERSION: u32 = 1;
/// Largest block a reader accepts (and a writer writes): bounds what one
/// block may make the reader allocate.
pub const MAX_BLOCK: usize = 256 << 20;

const HEADER: u8 = 1;
const RECORDS: u8 = 2;
const TOMBSTONES: u8 = 3;
const END: u8 = 4;

/// What a snapshot says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    /// The node that wrote it.
    pub node_id: String,
    /// When its scan of the store started (nanoseconds since the Unix
    /// epoch): every delete after this may be missing from it.
    pub written_at: UnixNanos,
    /// Written on shutdown after the node stopped serving (as opposed to a
    /// periodic snapshot of a node still serving).
    pub graceful: bool,
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a DistroCache snapshot (wrong magic bytes)")]
    Foreign,
    #[error("snapshot format version {0}, this node reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("snapshot is truncated: {0}")]
    Truncated(String),
    #[error("snapshot block {0} fails its checksum")]
    Checksum(u64),
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
    #[error("reading the snapshot: {0}")]
    Io(#[from] io::Error),
}

impl FormatError {
    /// A short label for the metric.
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::Foreign => "foreign",
            FormatError::Version(_) => "version",
            FormatError::Truncated(_) => "truncated",
            FormatError::Checksum(_) => "checksum",
            FormatError::Malformed(_) => "malformed",
            FormatError::Io(_) => "io",
        }
    }
}

fn malformed<T>(why: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError::Malformed(why.into()))
}

/// Writes a snapshot as a stream: the header at once, then record blocks as
/// they are given, then the tombstones and the end block.
pub struct SnapshotWriter<W: Write> {
    out: W,
    items: u64,
    blocks: u64,
    bytes: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(mut out: W, header: &Header) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_be_bytes())?;
        let mut w = Self {
            out,
            items: 0,
            blocks: 0,
            bytes: 12,
        };
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        w.block(HEADER, &json)?;
        Ok(w)
    }

    /// One block of item records.
    pub fn records(&mut self, records: &Records) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut body = BytesMut::with_capacity(4 + records.size());
        body.put_u32(records.len() as u32);
        body.put_slice(records.encoded());
        self.block(RECORDS, &body)?;
        self.items += records.len() as u64;
        self.blocks += 1;
        Ok(())
    }

    /// The tombstones and the end block; returns the stream and the items
    /// and bytes written.
    pub fn finish(mut self, tombstones: &TombstoneLog) -> io::Result<(W, u64, u64)> {
        let mut body = BytesMut::new();
        put_tombstone_log(&mut body, tombstones);
        self.block(TOMBSTONES, &body)?;
        let mut end = BytesMut::with_capacity(16);
        end.put_u64(self.items);
        end.put_u64(self.blocks);
        self.block(END, &end)?;
        self.out.flush()?;
        Ok((self.out, self.items, self.bytes))
    }

    fn block(&mut self, kind: u8, body: &[u8]) -> io::Result<()> {
        if body.len() > MAX_BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a snapshot block of {} bytes is over the limit", body.len()),
            ));
        }
        let len = (body.len() as u32).to_be_bytes();
        self.out.write_all(&[kind])?;
        self.out.write_all(&len)?;
        self.out.write_all(body)?;
        self.out
            .write_all(&checksum(kind, &len, body).to_be_bytes())?;
        self.bytes += 1 + 4 + body.len() as u64 + 8;
        Ok(())
    }
}

fn checksum(kind: u8, len: &[u8; 4], body: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&[kind]);
    h.update(len);
    h.update(body);
    h.digest()
}

/// What a whole, valid snapshot held besides its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub header: Header,
    pub tombstones: TombstoneLog,
    pub items: u64,
    pub bytes: u64,
}

/// Reads a snapshot from `input`, handing each block of records to
/// `on_records` as soon as it is checked (the header has been read by then). Returns the header and tombstones
/// once the end block has been read and the input is exhausted; any error
/// means the snapshot as a whole is refused (blocks already handed over
/// included).
pub fn read<R: Read>(
    input: R,
    mut on_records: impl FnMut(&[RecordRef<'_>]),
) -> Result<Contents, FormatError> {
    let mut r = BlockReader {
        input,
        bytes: 0,
        index: 0,
    };
    let mut magic = [0u8; 8];
    r.exact(&mut magic, "the magic bytes")?;
    if &magic != MAGIC {
        return Err(FormatError::Foreign);
    }
    let mut version = [0u8; 4];
    r.exact(&mut version, "the format version")?;
    let version = u32::from_be_bytes(version);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let header: Header = match r.block()? {
        Some((HEADER, body)) => serde_json::from_slice(&body)
            .map_err(|e| FormatError::Malformed(format!("header: {e}")))?,
        Some((kind, _)) => return malformed(format!("block kind {kind} before the header")),
        None => return Err(FormatError::Truncated("no header".into())),
    };
    let (mut items, mut blocks) = (0u64, 0u64);
    let mut tombstones = None;
    loop {
        let Some((kind, body)) = r.block()? else {
            return Err(FormatError::Truncated("no end block".into()));
        };
        match kind {
            RECORDS if tombstones.is_none() => {
                if body.len() < 4 {
                    return malformed("a records block without its count");
                }
                let count = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                let records = Records::from_encoded(count, body.slice(4..))
                    .and_then(|r| r.decode().map(|refs| on_records(&refs)))
                    .map_err(|e| FormatError::Malformed(e.to_string()));
                records?;
                items += u64::from(count);
                blocks += 1;
            }
            TOMBSTONES if tombstones.is_none() => {
                tombstones = Some(
                    decode_tombstone_log(&body)
                        .map_err(|e| FormatError::Malformed(format!("tombstones: {e}")))?,
                );
            }
            END => {
                let Some(tombstones) = tombstones else {
                    return malformed("the end block before the tombstones");
                };
                if body.len() != 16 {
                    return malformed("an end block of the wrong size");
                }
                let said_items = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                let said_blocks = u64::from_be_bytes(body[8..].try_into().expect("8 bytes"));
                if (said_items, said_blocks) != (items, blocks) {
                    return malformed(format!(
                        "the end block counts {said_items} items in {said_blocks} blocks, the file holds {items} in {blocks}"
                    ));
                }
                let mut extra = [0u8; 1];
                if r.input.read(&mut extra)? != 0 {
                    return malformed("bytes after the end block");
                }
                return Ok(Contents {
                    header,
                    tombstones,
                    items,
                    bytes: r.bytes,
                });
            }
            other => return malformed(format!("unexpected block kind {other}")),
        }
    }
}

struct BlockReader<R> {
    input: R,
    bytes: u64,
    index: u64,
}

impl<R: Read> BlockReader<R> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), FormatError> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.bytes += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FormatError::Truncated(
                format!("cut in {what} at byte {}", self.bytes),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// The next block, checked; `None` at a clean end of input.
    fn block(&mut self) -> Result<Option<(u8, Bytes)>, FormatError> {
        let mut kind = [0u8; 1];
        if self.input.read(&mut kind)? == 0 {
            return Ok(None);
        }
        self.bytes += 1;
        let mut len = [0u8; 4];
        self.exact(&mut len, "a block's length")?;
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_BLOCK {
            return malformed(format!("a block of {n} bytes (the limit is {MAX_BLOCK})"));
        }
        // Read through `take` so a length larger than the file costs no
        // more memory than the file has.
        let mut body = Vec::new();
        let got = (&mut self.input).take(n as u64).read_to_end(&mut body)?;
        self.bytes += got as u64;
        if got < n {
            return Err(FormatError::Truncated(format!(
                "block {} cut after {got} of {n} bytes",
                self.index
            )));
        }
        let mut sum = [0u8; 8];
        self.exact(&mut sum, "a block's checksum")?;
        if u64::from_be_bytes(sum) != checksum(kind[0], &len, &body) {
            return Err(FormatError::Checksum(self.index));
        }
        self.index += 1;
        Ok(Some((kind[0], Bytes::from(body))))
    }
}

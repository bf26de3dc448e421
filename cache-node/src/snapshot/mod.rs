//! Snapshots on disk (`--data-dir`): writing the store's items to a file
//! atomically (on graceful shutdown, and every `--snapshot-interval` when
//! set), and loading the newest valid one when the node starts, before it
//! serves anything. The file format is [`format`]'s; what a node restored
//! from a snapshot keeps once it meets its peers is `cluster::restore`'s.
//!
//! Streaming both ways: a write scans the store a few thousand slots per
//! shard lock (the same scan that moves data between nodes), encodes them
//! into a block of about [`BLOCK_BYTES`] and writes it before taking more,
//! so no lock is held for long and memory grows by one block, not by a copy
//! of the store. A load applies each block as soon as it is checked.
//!
//! Atomic and safe to kill: a snapshot is written to a hidden temporary
//! file, fsynced, renamed into place and the directory fsynced; only then
//! are older snapshots removed. A refused file (truncated, corrupt, foreign
//! or of another format version) is moved to `corrupt/` for inspection (the
//! newest [`KEEP_CORRUPT`] are kept), counted in
//! `distrocache_snapshot_load_refused_total{reason}`, logged, and whatever
//! it had loaded is removed again, so a node never runs on half a file; the
//! node then tries the next older snapshot, or starts empty.

pub mod format;

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};

use crate::cluster::tombstones::TombstoneLog;
use crate::peer::protocol::RecordBatch;
use crate::store::{ItemView, Store};
use format::{Contents, FormatError, Header, SnapshotWriter};

/// A records block closes once it holds this many bytes.
pub const BLOCK_BYTES: usize = 1 << 20;
/// Slots a write looks at per shard lock.
const SCAN_SLOTS: usize = 2048;
/// Refused files kept in `corrupt/`; older ones are deleted.
pub const KEEP_CORRUPT: usize = 3;
const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".dcs";

/// What a load brought back.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: PathBuf,
    pub header: Header,
    pub tombstones: TombstoneLog,
    /// Items in the file.
    pub items: u64,
    /// Items stored (the others had expired, or were older than held).
    pub applied: u64,
    pub bytes: u64,
    pub took: Duration,
}

/// What a write produced.
#[derive(Debug, Clone)]
pub struct Written {
    pub file: PathBuf,
    pub items: u64,
    pub bytes: u64,
    pub took: Duration,
}

/// The snapshot directory of one node, and its metrics.
pub struct Snapshots {
    dir: PathBuf,
    metrics: SnapshotMetrics,
    /// One write at a time (the periodic one and the one at shutdown).
    writing: Mutex<()>,
}

impl Snapshots {
    /// Opens (creating it if needed) the directory, and removes temporary
    /// files a killed write left behind.
    pub fn open(dir: &Path, registry: &Registry) -> io::Result<Self> {
        fs::create_dir_all(dir.join("corrupt"))?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".tmp") {
                tracing::info!(file = %entry.path().display(), "removing an unfinished snapshot");
                fs::remove_file(entry.path())?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            metrics: SnapshotMetrics::new(registry),
            writing: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Snapshot files, newest first.
    pub fn files(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            })
            .collect();
        files.sort();
        files.reverse();
        Ok(files)
    }

    /// Loads the newest valid snapshot into `store` (which must be empty),
    /// setting aside every newer one that is refused. Blocking: call it
    /// from a blocking thread. `None` when there is none to load.
    pub fn load(&self, store: &Store) -> io::Result<Option<Loaded>> {
        for file in self.files()? {
            let started = Instant::now();
            match load_file(&file, store) {
                Ok((contents, applied)) => {
                    let took = started.elapsed();
                    let m = &self.metrics;
                    m.load_items.set(applied as i64);
                    m.load_bytes.set(contents.bytes as i64);
                    m.load_seconds.set(took.as_secs_f64());
                    tracing::info!(
                        file = %file.display(),
                        items = contents.items,
                        applied,
                        bytes = contents.bytes,
                        took = ?took,
                        written_at = contents.header.written_at,
                        graceful = contents.header.graceful,
                        "loaded snapshot"
                    );
                    return Ok(Some(Loaded {
                        file,
                        header: contents.header,
                        tombstones: contents.tombstones,
                        items: contents.items,
                        applied,
                        bytes: contents.bytes,
                        took,
                    }));
                }
                Err(e) => {
                    // Never run on half a file: undo what it loaded.
                    store.retain(|_| false);
                    self.metrics.refused.with_label_values(&[e.reason()]).inc();
                    let kept = self.set_aside(&file)?;
                    tracing::error!(
                        file = %file.display(),
                        kept_as = %kept.display(),
                        error = %e,
                        "refused a snapshot; it is kept for inspection and the node starts without it"
                    );
                }
            }
        }
        Ok(None)
    }

    /// Moves a refused file into `corrupt/`, keeping the newest few there.
    fn set_aside(&self, file: &Path) -> io::Result<PathBuf> {
        let corrupt = self.dir.join("corrupt");
        let name = file.file_name().expect("snapshot files have names");
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let to = corrupt.join(format!("{stamp}-{}", name.to_string_lossy()));
        fs::rename(file, &to)?;
        let mut kept: Vec<PathBuf> = fs::read_dir(&corrupt)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        kept.sort();
        let excess = kept.len().saturating_sub(KEEP_CORRUPT);
        for old in &kept[..excess] {
            fs::remove_file(old)?;
        }
        Ok(to)
    }

    /// Writes a snapshot of `store` with the tombstones `log` gives (asked
    /// once the scan is done, so it covers the deletes made during it).
    /// Blocking: call it from a blocking thread.
    pub fn write(
        &self,
        store: &Store,
        node_id: &str,
        graceful: bool,
        log: impl FnOnce() -> TombstoneLog,
    ) -> io::Result<Written> {
        let _one_at_a_time = self.writing.lock();
        let started = Instant::now();
        let result = self.write_file(store, node_id, graceful, log);
        let m = &self.metrics;
        match &result {
            Ok(w) => {
                m.writes.with_label_values(&["ok"]).inc();
                m.write_items.set(w.items as i64);
                m.write_bytes.set(w.bytes as i64);
                m.write_seconds.set(started.elapsed().as_secs_f64());
                m.last_success.set(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()),
                );
                tracing::info!(
                    file = %w.file.display(),
                    items = w.items,
                    bytes = w.bytes,
                    took = ?w.took,
                    graceful,
                    "wrote snapshot"
                );
            }
            Err(e) => {
                m.writes.with_label_values(&["failed"]).inc();
                tracing::error!(dir = %self.dir.display(), error = %e, "writing a snapshot failed; the previous one is kept");
            }
        }
        result
    }

    fn write_file(
        &self,
        store: &Store,
        node_id: &str,
        graceful: bool,
        log: impl FnOnce() -> TombstoneLog,
    ) -> io::Result<Written> {
        let started = Instant::now();
        let written_at = store.now();
        let name = format!("{PREFIX}{written_at:020}{SUFFIX}");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let file = self.dir.join(&name);
        let header = Header {
            node_id: node_id.to_owned(),
            written_at,
            graceful,
        };
        let outcome = (|| {
            let out = BufWriter::with_capacity(256 << 10, File::create(&tmp)?);
            let (out, items, bytes) = write_to(out, store, &header, log)?;
            let out = out.into_inner().map_err(|e| e.into_error())?;
            out.sync_all()?;
            Ok::<_, io::Error>((items, bytes))
        })();
        let (items, bytes) = match outcome {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &file)?;
        File::open(&self.dir)?.sync_all()?;
        for old in self.files()? {
            if old != file {
                fs::remove_file(&old)?;
            }
        }
        Ok(Written {
            file,
            items,
            bytes,
            took: started.elapsed(),
        })
    }
}

/// Writes a snapshot of `store` under `header` to `out`, a block of about
/// [`BLOCK_BYTES`] at a time, then the tombstones `log` gives (asked once
/// the scan is done, so it covers the deletes made during it). Returns
/// `out` and the items and bytes written. The one writer of the format: a
/// snapshot on disk and a backup uploaded to object storage (`backup.rs`)
/// are the same bytes.
pub fn write_to<W: Write>(
    out: W,
    store: &Store,
    header: &Header,
    log: impl FnOnce() -> TombstoneLog,
) -> io::Result<(W, u64, u64)> {
    let mut writer = SnapshotWriter::new(out, header)?;
    let mut cursor = Some(0);
    let mut batch = RecordBatch::default();
    while let Some(at) = cursor {
        cursor = store.scan_while(at, SCAN_SLOTS, |item| {
            batch.push(&item);
            if batch.size() >= BLOCK_BYTES {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if batch.size() >= BLOCK_BYTES || cursor.is_none() {
            writer.records(&std::mem::take(&mut batch).freeze())?;
        }
    }
    writer.finish(&log())
}

/// Reads one file into `store`; returns what it held and how many items
/// were stored.
fn load_file(file: &Path, store: &Store) -> Result<(Contents, u64), FormatError> {
    let input = BufReader::with_capacity(256 << 10, File::open(file)?);
    load_from(input, store, |_| true)
}

/// Reads a snapshot from `input` into `store`, each block as soon as it is
/// checked, keeping the items whose key `keep` accepts; returns what the
/// snapshot held and how many items were stored (the others were not
/// kept, had expired, or were older than the copy held). A refusal may
/// come after some blocks were stored: the caller decides what to undo.
pub fn load_from<R: Read>(
    input: R,
    store: &Store,
    keep: impl Fn(&str) -> bool,
) -> Result<(Contents, u64), FormatError> {
    let mut applied = 0u64;
    let mut refused = None;
    let contents = format::read(input, |records| {
        for r in records {
            if !keep(r.key()) {
                continue;
            }
            match store.put_replica(r.key(), r.value(), r.tag_list(), r.meta()) {
                Ok(crate::store::Applied::Stale) => {}
                Ok(_) => applied += 1,
                Err(e) => {
                    refused.get_or_insert_with(|| e.to_string());
                }
            }
        }
    })?;
    if let Some(why) = refused {
        // An item over this node's memory budget: the rest is loaded.
        tracing::warn!(%why, "some snapshot items were too large for this node's budget");
    }
    Ok((contents, applied))
}

struct SnapshotMetrics {
    writes: IntCounterVec,
    write_items: IntGauge,
    write_bytes: IntGauge,
    write_seconds: Gauge,
    last_success: Gauge,
    load_items: IntGauge,
    load_bytes: IntGauge,
    load_seconds: Gauge,
    refused: IntCounterVec,
}

impl SnapshotMetrics {
    fn new(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let fgauge = |name: &str, help: &str| Gauge::new(name, help).expect("valid metric");
        let m = Self {
            writes: IntCounterVec::new(
                Opts::new(
                    "distrocache_snapshot_writes_total",
                    "Snapshot writes, by outcome (ok or failed)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            write_items: gauge(
                "distrocache_snapshot_last_write_items",
                "Items in the last snapshot written",
            ),
            write_bytes: gauge(
                "distrocache_snapshot_last_write_bytes",
                "Size of the last snapshot written",
            ),
            write_seconds: fgauge(
                "distrocache_snapshot_last_write_duration_seconds",
                "Duration of the last snapshot write",
            ),
            last_success: fgauge(
                "distrocache_snapshot_last_success_timestamp_seconds",
                "When the last snapshot write succeeded (Unix time; 0: never)",
            ),
            load_items: gauge(
                "distrocache_snapshot_loaded_items",
                "Items stored from the snapshot loaded at start",
            ),
            load_bytes: gauge(
                "distrocache_snapshot_loaded_bytes",
                "Size of the snapshot loaded at start",
            ),
            load_seconds: fgauge(
                "distrocache_snapshot_load_duration_seconds",
                "Duration of the snapshot load at start",
            ),
            refused: IntCounterVec::new(
                Opts::new(
                    "distrocache_snapshot_load_refused_total",
                    "Snapshot files refused at start and set aside in corrupt/, by reason (truncated, checksum, malformed, foreign, version, io)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        };
        for outcome in ["ok", "failed"] {
            m.writes.with_label_values(&[outcome]);
        }
        for reason in [
            "truncated",
            "checksum",
            "malformed",
            "foreign",
            "version",
            "io",
        ] {
            m.refused.with_label_values(&[reason]);
        }
        for c in [
            Box::new(m.writes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.write_items.clone()),
            Box::new(m.write_bytes.clone()),
            Box::new(m.write_seconds.clone()),
            Box::new(m.last_success.clone()),
            Box::new(m.load_items.clone()),
            Box::new(m.load_bytes.clone()),
            Box::new(m.load_seconds.clone()),
            Box::new(m.refused.clone()),
        ] {
            registry
                .register(c)
                .expect("snapshot metrics are registered once");
        }
        m
    }
}

#[cfg(test)]
mod tests;

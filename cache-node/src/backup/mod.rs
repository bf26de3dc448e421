//! Backups to S3-compatible object storage (`--backup-url`), and restoring
//! a node from one (`--restore-from`).
//!
//! A backup is a set of snapshots, one per node, in the snapshot format of
//! [`crate::snapshot::format`] (the same writer and reader, so a backup is
//! checked block by block exactly like a file on disk):
//!
//! ```text
//! <backup-url>/<backup id>/<node id>.dcs
//! ```
//!
//! `PUT /api/v1/backups/{id}` makes a node upload its own; the operator (or
//! a script) asks every node of a cache for the same id. The upload streams:
//! the store is scanned a few thousand slots per shard lock into blocks of
//! about a MiB, and the blocks go out as a multipart upload of
//! [`PART_BYTES`] parts, at most [`PARTS_IN_FLIGHT`] at a time, so a backup
//! holds no lock for long and needs a few tens of MiB, not a copy of the
//! store. An object only appears once its upload completes, so a backup
//! cut short leaves nothing that looks whole; an id already written is
//! refused rather than overwritten.
//!
//! A restore reads every node's object of the backup (a new cache may have
//! another number of nodes, so a node's keys are spread over all of them)
//! and keeps the items this node owns; the newer version of a key wins, as
//! in a pull. An object refused by the reader (truncated, corrupt, foreign)
//! is logged and counted and the others still load: with a replication
//! factor above one its keys have another copy in another node's object.
//! What a node restored then goes through the same rule as a snapshot
//! loaded from disk (`cluster::restore`), so a node restarting in a running
//! cache does not bring back what was deleted since the backup.
//!
//! Object storage is `object_store`'s S3 client, over our HTTP client
//! ([`http`]), with credentials from the
//! standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN` variables); the bridge between its async streams and
//! the snapshot format's `Read`/`Write` is `tokio_util`'s `SyncIoBridge`,
//! run on a blocking thread.

mod http;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use tokio_util::io::{StreamReader, SyncIoBridge};

use distrocache_membership::BackupReport;

use crate::cluster::tombstones::TombstoneLog;
use crate::snapshot::{self, format::Header};
use crate::store::{Store, UnixNanos};

/// A download that brings no bytes for this long fails (and is retried).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of one part of a multipart upload (S3 wants at least 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// Parts uploading at once: bounds the memory an upload holds.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Longest backup id.
pub const MAX_ID_BYTES: usize = 128;
const SUFFIX: &str = ".dcs";

/// Where backups go: the `--backup-*` flags.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// The S3 endpoint when it is not AWS (`http://minio:9000`); plain HTTP
    /// is allowed only when named here.
    pub endpoint: Option<String>,
    pub region: String,
}

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("invalid backup id {0:?}: 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.'")]
    InvalidId(String),
    #[error("backup {0} already exists at {1}: a backup id is written once")]
    Exists(String, String),
    #[error("a backup of this node is already being written")]
    Busy,
    #[error("no backup {0} at {1}")]
    NotFound(String, String),
    #[error("no object of backup {0} could be read ({1} refused)")]
    Unreadable(String, usize),
    #[error("object storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What `PUT /api/v1/backups/{id}` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Uploaded {
    pub id: String,
    pub node_id: String,
    /// Where the node's snapshot went (`s3://bucket/prefix/id/node.dcs`).
    pub object: String,
    pub items: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// What a restore brought.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Objects read whole.
    pub objects: u64,
    /// Objects refused, with why.
    pub refused: Vec<(String, String)>,
    /// Items in the objects read.
    pub items: u64,
    /// Items stored here.
    pub applied: u64,
    /// The oldest scan start among the objects read (0: none read): every
    /// delete after it may be missing.
    pub written_at: UnixNanos,
    /// The deletes the objects remembered.
    pub tombstones: Vec<TombstoneLog>,
}

/// A node's backup destination, and its metrics.
pub struct Backups {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    url: String,
    metrics: BackupMetrics,
    /// One upload at a time (held by the upload's own task).
    uploading: Arc<tokio::sync::Mutex<()>>,
    /// The last upload's outcome, for the progress report.
    last: parking_lot::Mutex<Option<BackupReport>>,
}

/// Scheduled backups are named after their slot: `scheduled-<unix
/// seconds of the slot's start>`, slots being whole multiples of the
/// interval since the Unix epoch, so every node of a cache (clocks in sync)
/// picks the same id, and ids sort by time.
pub const SCHEDULED_PREFIX: &str = "scheduled-";

/// The id of the scheduled backup whose slot starts at `slot` (seconds).
pub fn scheduled_id(slot: u64) -> String {
    format!("{SCHEDULED_PREFIX}{slot:010}")
}

impl Backups {
    pub fn new(settings: &BackupSettings, registry: &Registry) -> Result<Self, String> {
        let rest = settings.url.strip_prefix("s3://").ok_or_else(|| {
            format!(
                "--backup-url {}: must be s3://bucket[/prefix]",
                settings.url
            )
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("--backup-url {}: no bucket", settings.url));
        }
        let allow_http = settings
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&settings.region)
            .with_allow_http(allow_http)
            .with_http_connector(http::S3Connector { allow_http });
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .build()
            .map_err(|e| format!("--backup-url {}: {e}", settings.url))?;
        let root = ObjectPath::parse(prefix.trim_end_matches('/'))
            .map_err(|e| format!("--backup-url {}: {e}", settings.url))?;
        Ok(Self {
            store: Arc::new(store),
            root,
            url: format!("s3://{bucket}"),
            metrics: BackupMetrics::new(registry),
            uploading: Arc::new(tokio::sync::Mutex::new(())),
            last: parking_lot::Mutex::new(None),
        })
    }

    fn object(&self, id: &str, node_id: &str) -> ObjectPath {
        self.dir(id).join(format!("{node_id}{SUFFIX}").as_str())
    }

    fn dir(&self, id: &str) -> ObjectPath {
        self.root.clone().join(id)
    }

    fn describe(&self, path: &ObjectPath) -> String {
        format!("{}/{path}", self.url)
    }

    /// Uploads a snapshot of `store` as this node's part of backup `id`,
    /// with the tombstones `log` gives once the scan is done.
    ///
    /// The upload runs in a task of its own, which holds the one-at-a-time
    /// lock, reports the outcome and aborts what it sent on failure: it
    /// goes to its end even when the caller stops waiting (a client that
    /// hangs up, the request timeout, a node shutting down).
    pub async fn upload(
        self: &Arc<Self>,
        store: Arc<Store>,
        node_id: &str,
        id: &str,
        log: impl FnOnce() -> TombstoneLog + Send + 'static,
    ) -> Result<Uploaded, BackupError> {
        check_id(id)?;
        let one = self
            .uploading
            .clone()
            .try_lock_owned()
            .map_err(|_| BackupError::Busy)?;
        let (this, node_id, id) = (self.clone(), node_id.to_owned(), id.to_owned());
        tokio::spawn(async move {
            let _one = one;
            this.upload_and_report(store, &node_id, &id, log).await
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn upload_and_report(
        &self,
        store: Arc<Store>,
        node_id: &str,
        id: &str,
        log: impl FnOnce() -> TombstoneLog + Send + 'static,
    ) -> Result<Uploaded, BackupError> {
        let started = Instant::now();
        let started_at = unix_now_secs() as u64;
        let result = self.upload_object(store, node_id, id, log).await;
        let m = &self.metrics;
        let report = |object: String, items, bytes, error| {
            *self.last.lock() = Some(BackupReport {
                id: id.to_owned(),
                object,
                items,
                bytes,
                started_at,
                finished_at: unix_now_secs() as u64,
                error,
            });
        };
        match &result {
            Ok(up) => {
                report(up.object.clone(), up.items, up.bytes, None);
                m.uploads.with_label_values(&["ok"]).inc();
                m.upload_items.set(up.items as i64);
                m.upload_bytes.set(up.bytes as i64);
                m.upload_seconds.set(started.elapsed().as_secs_f64());
                m.last_success.set(unix_now_secs());
                tracing::info!(id, object = %up.object, items = up.items, bytes = up.bytes,
                    seconds = up.seconds, "uploaded backup");
            }
            // Not an attempt: nothing to report.
            Err(BackupError::Exists(..) | BackupError::Busy) => {}
            Err(e) => {
                report(
                    self.describe(&self.object(id, node_id)),
                    0,
                    0,
                    Some(summary(e)),
                );
                m.uploads.with_label_values(&["failed"]).inc();
                tracing::error!(id, error = %summary(e), "uploading a backup failed");
            }
        }
        result
    }

    async fn upload_object(
        &self,
        store: Arc<Store>,
        node_id: &str,
        id: &str,
        log: impl FnOnce() -> TombstoneLog + Send + 'static,
    ) -> Result<Uploaded, BackupError> {
        let started = Instant::now();
        let path = self.object(id, node_id);
        match self.store.head(&path).await {
            Ok(_) => return Err(BackupError::Exists(id.to_owned(), self.describe(&path))),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let header = Header {
            node_id: node_id.to_owned(),
            written_at: store.now(),
            graceful: false,
        };
        let upload = BufWriter::with_capacity(self.store.clone(), path.clone(), PART_BYTES)
            .with_max_concurrency(PARTS_IN_FLIGHT);
        let mut bridge = SyncIoBridge::new(upload);
        let (bridge, written) = tokio::task::spawn_blocking(move || {
            let written = match snapshot::write_to(&mut bridge, &store, &header, log) {
                // Completes the upload: only now does the object exist.
                Ok((_, items, bytes)) => bridge
                    .shutdown()
                    .map(|()| (items, bytes))
                    .map_err(Failed::Completing),
                Err(e) => Err(Failed::Writing(e)),
            };
            (bridge, written)
        })
        .await
        .map_err(io::Error::other)?;
        let (items, bytes) = match written {
            Ok(w) => w,
            Err(Failed::Writing(e)) => {
                // Drop the parts already sent (a store that keeps parts
                // of an upload it could not abort cleans them up by its
                // lifecycle rule; see the README).
                if let Err(abort) = bridge.into_inner().abort().await {
                    tracing::warn!(object = %self.describe(&path), error = %abort,
                        "could not abort an unfinished upload");
                }
                return Err(e.into());
            }
            // A completion that failed has nothing left to abort.
            Err(Failed::Completing(e)) => return Err(e.into()),
        };
        Ok(Uploaded {
            id: id.to_owned(),
            node_id: node_id.to_owned(),
            object: self.describe(&path),
            items,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The last upload's outcome.
    pub fn last(&self) -> Option<BackupReport> {
        self.last.lock().clone()
    }

    /// Deletes this node's objects of every scheduled backup but the newest
    /// `keep` (other nodes prune their own). Returns how many backups it
    /// pruned (S3 does not say whether an object was there to delete).
    pub async fn prune(&self, node_id: &str, keep: usize) -> Result<usize, BackupError> {
        let listed = self.store.list_with_delimiter(Some(&self.root)).await?;
        let mut ids: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .filter(|id| id.starts_with(SCHEDULED_PREFIX))
            .collect();
        ids.sort();
        let old = ids.len().saturating_sub(keep);
        let mut deleted = 0;
        for id in &ids[..old] {
            match self.store.delete(&self.object(id, node_id)).await {
                Ok(()) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                keep,
                "removed this node's part of older scheduled backups"
            );
        }
        Ok(deleted)
    }

    /// Loads every node's object of backup `id` into `store`, keeping the
    /// items whose key `keep` accepts. `NotFound` when the backup has no
    /// object; an object refused by the reader is reported in the result.
    pub async fn restore(
        &self,
        store: &Arc<Store>,
        id: &str,
        keep: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Result<Restored, BackupError> {
        check_id(id)?;
        let started = Instant::now();
        let dir = self.dir(id);
        let mut objects: Vec<ObjectPath> = self
            .store
            .list(Some(&dir))
            .map_ok(|meta| meta.location)
            .try_filter(|p| std::future::ready(p.as_ref().ends_with(SUFFIX)))
            .try_collect()
            .await?;
        objects.sort();
        if objects.is_empty() {
            self.metrics.restores.with_label_values(&["failed"]).inc();
            return Err(BackupError::NotFound(id.to_owned(), self.describe(&dir)));
        }
        let mut restored = Restored::default();
        for path in objects {
            let name = self.describe(&path);
            let stream = idle_timeout(
                self.store.get(&path).await?.into_stream(),
                BODY_IDLE_TIMEOUT,
            );
            let reader = SyncIoBridge::new(StreamReader::new(stream));
            let (st, keep) = (store.clone(), keep.clone());
            let loaded = tokio::task::spawn_blocking(move || {
                let reader = io::BufReader::with_capacity(256 << 10, reader);
                snapshot::load_from(reader, &st, |key| keep(key))
            })
            .await
            .map_err(io::Error::other)?;
            match loaded {
                Ok((contents, applied)) => {
                    restored.objects += 1;
                    restored.items += contents.items;
                    restored.applied += applied;
                    let at = contents.header.written_at;
                    restored.written_at = match restored.written_at {
                        0 => at,
                        held => held.min(at),
                    };
                    restored.tombstones.push(contents.tombstones);
                    self.metrics.objects.with_label_values(&["ok"]).inc();
                }
                Err(crate::snapshot::format::FormatError::Io(e)) => {
                    // The store, not the object: try the restore again.
                    return Err(e.into());
                }
                Err(e) => {
                    // Items of the blocks read before the refusal were
                    // checked one block at a time and stay: they are whole.
                    self.metrics.objects.with_label_values(&[e.reason()]).inc();
                    tracing::error!(object = %name, error = %e,
                        "refused a backup object; restoring from the others");
                    restored.refused.push((name, e.to_string()));
                }
            }
        }
        if restored.objects == 0 {
            // Every object refused: nothing to restore from.
            self.metrics.restores.with_label_values(&["failed"]).inc();
            return Err(BackupError::Unreadable(
                id.to_owned(),
                restored.refused.len(),
            ));
        }
        self.metrics.restores.with_label_values(&["ok"]).inc();
        self.metrics.restored_items.set(restored.applied as i64);
        self.metrics
            .restore_seconds
            .set(started.elapsed().as_secs_f64());
        tracing::info!(id, objects = restored.objects, refused = restored.refused.len(),
            items = restored.items, applied = restored.applied,
            took = ?started.elapsed(), "restored backup");
        Ok(restored)
    }
}

/// The bytes of `stream`, failing with `TimedOut` when none come for
/// `idle`: a stalled download must not hold a restore forever.
fn idle_timeout(
    stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    idle: Duration,
) -> futures_util::stream::BoxStream<'static, io::Result<bytes::Bytes>> {
    futures_util::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(chunk)) => Some((chunk.map_err(io::Error::other), Some(stream))),
            Ok(None) => None,
            // The error ends the stream.
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no bytes for {idle:?}"),
                )),
                None,
            )),
        }
    })
    .boxed()
}

/// An error as it goes into logs and the progress report: the first line,
/// without an S3 error document (which may quote the request's signing
/// details), at most 300 bytes.
pub fn summary(e: &BackupError) -> String {
    let text = e.to_string();
    let text = text
        .split(['<', '\n'])
        .next()
        .unwrap_or_default()
        .trim_end();
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Where an upload failed.
enum Failed {
    Writing(io::Error),
    Completing(io::Error),
}

/// A backup id: 1 to [`MAX_ID_BYTES`] of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` (it is a path segment of every object of the backup).
pub fn check_id(id: &str) -> Result<(), BackupError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(BackupError::InvalidId(id.to_owned()))
    }
}

fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d: Duration| d.as_secs_f64())
}

struct BackupMetrics {
    uploads: IntCounterVec,
    upload_items: IntGauge,
    upload_bytes: IntGauge,
    upload_seconds: Gauge,
    last_success: Gauge,
    restores: IntCounterVec,
    objects: IntCounterVec,
    restored_items: IntGauge,
    restore_seconds: Gauge,
}

impl BackupMetrics {
    fn new(registry: &Registry) -> Self {
        let m = Self {
            uploads: IntCounterVec::new(
                Opts::new(
                    "distrocache_backup_uploads_total",
                    "Backups this node uploaded, by outcome (ok or failed)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            upload_items: IntGauge::new(
                "distrocache_backup_last_upload_items",
                "Items in the last backup this node uploaded",
            )
            .expect("valid metric"),
            upload_bytes: IntGauge::new(
                "distrocache_backup_last_upload_bytes",
                "Size of the last backup this node uploaded",
            )
            .expect("valid metric"),
            upload_seconds: Gauge::new(
                "distrocache_backup_last_upload_duration_seconds",
                "Duration of the last backup upload",
            )
            .expect("valid metric"),
            last_success: Gauge::new(
                "distrocache_backup_last_success_timestamp_seconds",
                "When the last backup upload succeeded (Unix time; 0: never)",
            )
            .expect("valid metric"),
            restores: IntCounterVec::new(
                Opts::new(
                    "distrocache_backup_restores_total",
                    "Restores from a backup (--restore-from), by outcome (ok, or failed: no such backup)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            objects: IntCounterVec::new(
                Opts::new(
                    "distrocache_backup_restore_objects_total",
                    "Backup objects read by restores, by outcome (ok, or why it was refused: truncated, checksum, malformed, foreign, version)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            restored_items: IntGauge::new(
                "distrocache_backup_restored_items",
                "Items the last restore stored on this node",
            )
            .expect("valid metric"),
            restore_seconds: Gauge::new(
                "distrocache_backup_restore_duration_seconds",
                "Duration of the last restore",
            )
            .expect("valid metric"),
        };
        for outcome in ["ok", "failed"] {
            m.uploads.with_label_values(&[outcome]);
            m.restores.with_label_values(&[outcome]);
        }
        for outcome in [
            "ok",
            "truncated",
            "checksum",
            "malformed",
            "foreign",
            "version",
        ] {
            m.objects.with_label_values(&[outcome]);
        }
        for c in [
            Box::new(m.uploads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.upload_items.clone()),
            Box::new(m.upload_bytes.clone()),
            Box::new(m.upload_seconds.clone()),
            Box::new(m.last_success.clone()),
            Box::new(m.restores.clone()),
            Box::new(m.objects.clone()),
            Box::new(m.restored_items.clone()),
            Box::new(m.restore_seconds.clone()),
        ] {
            registry
                .register(c)
                .expect("backup metrics are registered once");
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_path_segments() {
        for ok in [
            "nightly-2026-12-03",
            "a",
            "v1.2_3",
            &"x".repeat(MAX_ID_BYTES),
        ] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "a b",
            "é",
            "a%2Fb",
            &"x".repeat(MAX_ID_BYTES + 1),
        ] {
            assert!(
                matches!(check_id(bad), Err(BackupError::InvalidId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn error_summaries_leave_out_the_s3_error_document() {
        let e = BackupError::Io(io::Error::other(
            "Client error with status 403 Forbidden: <?xml version=\"1.0\"?><Error><AWSAccessKeyId>AKIA</AWSAccessKeyId></Error>",
        ));
        assert_eq!(summary(&e), "Client error with status 403 Forbidden:");
        let long = BackupError::Io(io::Error::other("é".repeat(400)));
        assert!(summary(&long).len() <= 300);
    }

    #[tokio::test]
    async fn a_stalled_download_times_out() {
        let stalled: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>> =
            futures_util::stream::iter([Ok(bytes::Bytes::from_static(b"abc"))])
                .chain(futures_util::stream::pending())
                .boxed();
        let mut s = std::pin::pin!(idle_timeout(stalled, Duration::from_millis(50)));
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"abc");
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            s.next().await.is_none(),
            "the stream ends after the timeout"
        );
    }

    #[test]
    fn scheduled_ids_are_valid_and_sort_by_time() {
        let ids: Vec<String> = [0, 86_400, 1_764_720_000, 9_999_999_999]
            .map(scheduled_id)
            .to_vec();
        for id in &ids {
            check_id(id).unwrap();
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
        assert_eq!(scheduled_id(1_764_720_000), "scheduled-1764720000");
    }

    #[test]
    fn the_url_names_a_bucket_and_an_optional_prefix() {
        let registry = Registry::new();
        let settings = |url: &str| BackupSettings {
            url: url.into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "us-east-1".into(),
        };
        let b = Backups::new(&settings("s3://bucket/some/prefix/"), &registry).unwrap();
        assert_eq!(
            b.describe(&b.object("nightly", "cache-0")),
            "s3://bucket/some/prefix/nightly/cache-0.dcs"
        );
        let b = Backups::new(&settings("s3://bucket"), &Registry::new()).unwrap();
        assert_eq!(b.describe(&b.object("n", "c-1")), "s3://bucket/n/c-1.dcs");
        for bad in ["bucket/prefix", "https://bucket", "s3://", "s3:///prefix"] {
            assert!(
                Backups::new(&settings(bad), &Registry::new()).is_err(),
                "{bad}"
            );
        }
    }
}

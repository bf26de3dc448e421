use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::format::{self, FormatError, Header, SnapshotWriter};
use super::*;
use crate::peer::protocol::Records;
use crate::store::{ItemMeta, ManualClock, StoreConfig};

const T0: u64 = 1_800_000_000_000_000_000;

fn store(clock: &Arc<ManualClock>) -> Store {
    Store::new(
        StoreConfig {
            max_items: 100_000,
            ..StoreConfig::default()
        },
        clock.clone(),
    )
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0))
}

/// Every item of a store, as (key, value, tags, meta), sorted by key.
fn contents(store: &Store) -> Vec<(String, Vec<u8>, Vec<String>, ItemMeta)> {
    let mut out = Vec::new();
    let mut cursor = Some(0);
    while let Some(at) = cursor {
        cursor = store.scan(at, 1 << 20, |item| {
            out.push((
                item.key().to_owned(),
                item.value().to_vec(),
                item.tags().map(str::to_owned).collect(),
                item.meta(),
            ))
        });
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn log() -> TombstoneLog {
    TombstoneLog {
        forgotten_before: 5,
        deletes: vec![("gone".into(), T0 - 10)],
        tags: vec![("red".into(), T0 - 20)],
    }
}

fn registry() -> Registry {
    Registry::new()
}

/// A snapshot of `store` as bytes, through the writer.
fn encode(store: &Store) -> Vec<u8> {
    let header = Header {
        node_id: "n".into(),
        written_at: store.now(),
        graceful: true,
    };
    let mut w = SnapshotWriter::new(Vec::new(), &header).unwrap();
    let mut batch = RecordBatch::default();
    let mut cursor = Some(0);
    while let Some(at) = cursor {
        // Small blocks, so the tests see many of them.
        cursor = store.scan_while(at, 7, |item| {
            batch.push(&item);
            ControlFlow::Continue(())
        });
        w.records(&std::mem::take(&mut batch).freeze()).unwrap();
    }
    w.finish(&log()).unwrap().0
}

fn decode_into(bytes: &[u8], store: &Store) -> Result<format::Contents, FormatError> {
    format::read(bytes, |records| {
        for r in records {
            store
                .put_replica(r.key(), r.value(), r.tag_list(), r.meta())
                .unwrap();
        }
    })
}

prop_compose! {
    fn items()(list in proptest::collection::vec(
        ("[a-z0-9:/]{1,12}", proptest::collection::vec(any::<u8>(), 0..40),
         proptest::collection::vec("[a-z]{1,5}", 0..3), 1u64..1_000_000, 1u64..3_600, 0u64..50),
        0..60)) -> Vec<(String, Vec<u8>, Vec<String>, u64, u64, u64)> {
        list
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Write then read gives back the same items: keys, values, tags,
    /// versions, expiry and access metadata.
    #[test]
    fn write_then_read_returns_the_same_items(list in items()) {
        let c = clock();
        let a = store(&c);
        for (key, value, tags, age, ttl, count) in &list {
            let created = T0 - age;
            a.put_replica(key, value, tags, ItemMeta {
                created_at: created,
                accessed_at: created + age / 2,
                expires_at: T0 + ttl * 1_000_000_000,
                access_count: *count,
            }).unwrap();
        }
        let bytes = encode(&a);
        let b = store(&c);
        let got = decode_into(&bytes, &b).unwrap();
        prop_assert_eq!(got.items as usize, a.len());
        prop_assert_eq!(got.tombstones, log());
        prop_assert_eq!(got.bytes as usize, bytes.len());
        prop_assert_eq!(contents(&a), contents(&b));
        b.assert_consistent();
    }

    /// A snapshot cut anywhere, or with any one byte changed, is refused.
    #[test]
    fn a_cut_or_flipped_snapshot_is_refused(list in items(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let c = clock();
        let a = store(&c);
        for (key, value, tags, age, ttl, _) in &list {
            a.put_replica(key, value, tags, ItemMeta {
                created_at: T0 - age, accessed_at: T0 - age,
                expires_at: T0 + ttl * 1_000_000_000, access_count: 0,
            }).unwrap();
        }
        let bytes = encode(&a);
        let cut = at.index(bytes.len());
        prop_assert!(format::read(&bytes[..cut], |_| ()).is_err());
        let mut flipped = bytes.clone();
        flipped[cut] ^= 1 << bit;
        prop_assert!(format::read(&flipped[..], |_| ()).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(format::read(&longer[..], |_| ()).is_err());
    }

    /// Arbitrary bytes, after the right magic or not, never panic.
    #[test]
    fn arbitrary_bytes_are_refused_without_a_panic(body in proptest::collection::vec(any::<u8>(), 0..300), magic in any::<bool>()) {
        let mut bytes = Vec::new();
        if magic {
            bytes.extend_from_slice(format::MAGIC);
            bytes.extend_from_slice(&format::FORMAT_VERSION.to_be_bytes());
        }
        bytes.extend(body);
        let _ = format::read(&bytes[..], |_| ());
    }
}

#[test]
fn foreign_and_future_files_are_told_apart() {
    assert!(matches!(
        format::read(&b"{\"not\": \"a snapshot\"}"[..], |_| ()),
        Err(FormatError::Foreign)
    ));
    let mut future = format::MAGIC.to_vec();
    future.extend_from_slice(&2u32.to_be_bytes());
    assert!(matches!(
        format::read(&future[..], |_| ()),
        Err(FormatError::Version(2))
    ));
    assert!(matches!(
        format::read(&format::MAGIC[..5], |_| ()),
        Err(FormatError::Truncated(_))
    ));
}

#[test]
fn a_block_claiming_more_than_the_limit_is_refused_before_reading_it() {
    let mut bytes = format::MAGIC.to_vec();
    bytes.extend_from_slice(&format::FORMAT_VERSION.to_be_bytes());
    bytes.push(1);
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        format::read(&bytes[..], |_| ()),
        Err(FormatError::Malformed(_))
    ));
}

#[test]
fn records_are_checked_whole() {
    assert!(Records::from_encoded(1, bytes::Bytes::from_static(b"\0\0")).is_err());
}

fn filled(n: usize, clock: &Arc<ManualClock>) -> Store {
    let s = store(clock);
    for i in 0..n {
        s.set(
            &format!("k{i}"),
            format!("{{\"i\":{i}}}").as_bytes(),
            &["t"],
            Some(Duration::from_secs(60 + i as u64)),
            |_| (),
        )
        .unwrap();
    }
    s
}

#[test]
fn a_snapshot_directory_round_trip_keeps_one_file_and_skips_expired_items() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let reg = registry();
    let snaps = Snapshots::open(dir.path(), &reg).unwrap();
    let a = filled(5000, &c);
    let first = snaps.write(&a, "n", false, TombstoneLog::default).unwrap();
    c.advance(Duration::from_secs(1));
    let second = snaps.write(&a, "n", true, log).unwrap();
    assert_eq!(second.items, 5000);
    assert_eq!(snaps.files().unwrap(), vec![second.file.clone()]);
    assert!(!first.file.exists(), "older snapshots are removed");

    // 100 s later, the items with a TTL under 100 s have expired.
    c.advance(Duration::from_secs(99));
    let b = store(&c);
    let loaded = snaps.load(&b).unwrap().expect("a snapshot");
    assert_eq!(loaded.items, 5000);
    assert_eq!(loaded.applied, 5000 - 41, "expired items are skipped");
    assert_eq!(loaded.tombstones, log());
    assert!(loaded.header.graceful);
    assert_eq!(b.len(), 5000 - 41);
    b.assert_consistent();
}

#[test]
fn a_corrupt_snapshot_is_set_aside_counted_and_nothing_of_it_stays_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let reg = registry();
    let snaps = Snapshots::open(dir.path(), &reg).unwrap();
    let a = filled(20_000, &c);
    let w = snaps.write(&a, "n", true, TombstoneLog::default).unwrap();
    // Flip a byte near the end: the blocks before it load, then it fails.
    let mut bytes = fs::read(&w.file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    fs::write(&w.file, &bytes).unwrap();
    // A stale temporary file from a killed write.
    fs::write(dir.path().join(".snapshot-1.dcs.tmp"), b"half").unwrap();

    let snaps = Snapshots::open(dir.path(), &reg_fresh()).unwrap();
    assert!(!dir.path().join(".snapshot-1.dcs.tmp").exists());
    let b = store(&c);
    assert!(snaps.load(&b).unwrap().is_none());
    assert_eq!(b.len(), 0, "never half a file");
    b.assert_consistent();
    assert!(snaps.files().unwrap().is_empty());
    let aside: Vec<_> = fs::read_dir(dir.path().join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(aside.len(), 1, "kept for inspection");
    assert_eq!(fs::read(&aside[0]).unwrap(), bytes);
    assert_eq!(
        snaps.metrics.refused.with_label_values(&["checksum"]).get(),
        1
    );
}

fn reg_fresh() -> Registry {
    Registry::new()
}

#[test]
fn an_older_valid_snapshot_is_loaded_when_the_newest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let snaps = Snapshots::open(dir.path(), &registry()).unwrap();
    let a = filled(100, &c);
    let w = snaps.write(&a, "n", true, TombstoneLog::default).unwrap();
    let newer = dir.path().join(format!("{PREFIX}{:020}{SUFFIX}", T0 + 5));
    fs::write(&newer, b"DCSNAP\r\n\0\0\0\x01").unwrap();
    let b = store(&c);
    let loaded = snaps.load(&b).unwrap().expect("the older one");
    assert_eq!(loaded.file, w.file);
    assert_eq!(b.len(), 100);
    assert_eq!(
        snaps
            .metrics
            .refused
            .with_label_values(&["truncated"])
            .get(),
        1
    );
}

#[test]
fn only_the_newest_refused_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let snaps = Snapshots::open(dir.path(), &registry()).unwrap();
    for i in 0..(KEEP_CORRUPT + 2) {
        let f = dir.path().join(format!("{PREFIX}{:020}{SUFFIX}", i));
        fs::write(&f, b"garbage").unwrap();
        assert!(snaps.load(&store(&c)).unwrap().is_none());
    }
    assert_eq!(
        fs::read_dir(dir.path().join("corrupt")).unwrap().count(),
        KEEP_CORRUPT
    );
}

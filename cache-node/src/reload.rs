//! Credentials re-read from files when the files change: TLS certificates,
//! keys and CAs, and bearer tokens. Kubernetes updates a mounted Secret in
//! place (an atomic swap of the volume's `..data` symlink), so a node that
//! re-reads the files picks up a rotation without a restart.
//!
//! Each [`Reloadable`] holds the material built from its files (a rustls
//! config, a token set) behind an `ArcSwap`: whoever starts something new (a
//! TLS handshake, a peer connection, a token check) takes the current value,
//! and what is already established keeps the value it started with, so a
//! rotation never cuts a connection.
//!
//! Change detection is by content, polled (every `--credentials-poll-interval`):
//! the files' bytes are hashed and compared with the last load. Polling
//! content rather than watching inotify events or modification times is what
//! works with the symlink swap (the path's own inode and mtime do not change)
//! and costs a few small reads per interval. When the new files do not make
//! valid material (a certificate written before its key, a half-written
//! file) the node keeps what it has, logs why and tries again on the next
//! poll: a bad rotation never takes a working node down.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

/// Largest credential file accepted (a certificate chain, a key, a CA
/// bundle, a token list): far above any real one, low enough to bound
/// memory when a wrong file is mounted.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a credential file, bounded by [`MAX_FILE_BYTES`].
pub fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {len} bytes; a credential file holds at most {MAX_FILE_BYTES}",
                path.display()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

type Loader<T> = Box<dyn Fn(&[Vec<u8>]) -> io::Result<T> + Send + Sync>;

/// Material built from files, rebuilt when their contents change.
pub struct Reloadable<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    build: Loader<T>,
    current: ArcSwap<T>,
    /// The hash of the files' contents the current value was built from.
    fingerprint: Mutex<u64>,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Reads `files` and builds the first value with `build` (given each
    /// file's bytes, in order); an error here is a startup error.
    pub fn load(
        what: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> io::Result<T> + Send + Sync + 'static,
    ) -> io::Result<Arc<Self>> {
        let contents = read_all(&files)?;
        let value =
            build(&contents).map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
        Ok(Arc::new(Self {
            what,
            files,
            build: Box::new(build),
            current: ArcSwap::from_pointee(value),
            fingerprint: Mutex::new(fingerprint(&contents)),
        }))
    }

    /// A fixed value that no file backs (never changes).
    pub fn fixed(what: &'static str, value: T) -> Arc<Self> {
        Arc::new(Self {
            what,
            files: Vec::new(),
            build: Box::new(|_| Err(io::Error::other("a fixed value is not reloaded"))),
            current: ArcSwap::from_pointee(value),
            fingerprint: Mutex::new(0),
        })
    }

    /// The value to start something new with.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// A cheap look at the current value, for checks made on every request.
    pub fn peek(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// Re-reads the files; when their contents changed and make valid
    /// material, that becomes the current value. Returns whether it did.
    pub fn check(&self) -> bool {
        if self.files.is_empty() {
            return false;
        }
        let contents = match read_all(&self.files) {
            Ok(contents) => contents,
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "cannot re-read credentials; keeping the current ones");
                return false;
            }
        };
        let seen = fingerprint(&contents);
        let mut last = self.fingerprint.lock();
        if *last == seen {
            return false;
        }
        match (self.build)(&contents) {
            Ok(value) => {
                self.current.store(Arc::new(value));
                *last = seen;
                tracing::info!(what = self.what, "credentials changed on disk: reloaded");
                true
            }
            Err(e) => {
                // Not remembered as seen: tried again on every poll until
                // the files make sense (a key written after its certificate).
                tracing::warn!(what = self.what, error = %e, "changed credentials are not valid; keeping the current ones");
                false
            }
        }
    }
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Anything [`watch`] can poll.
pub trait Check: Send + Sync {
    fn check(&self) -> bool;
}

impl<T: Send + Sync + 'static> Check for Reloadable<T> {
    fn check(&self) -> bool {
        Reloadable::check(self)
    }
}

/// Polls every item every `interval` until `stop` changes. The reads run on
/// the blocking pool: they are file I/O, and a slow volume must not stall a
/// runtime worker that serves requests.
pub async fn watch(
    items: Vec<Arc<dyn Check>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if items.is_empty() {
        return;
    }
    let items = Arc::new(items);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; the files were just read
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let items = items.clone();
        let polled = tokio::task::spawn_blocking(move || {
            for item in items.iter() {
                item.check();
            }
        })
        .await;
        if let Err(e) = polled {
            tracing::error!(error = %e, "credential reload failed");
        }
    }
}

fn read_all(files: &[PathBuf]) -> io::Result<Vec<Vec<u8>>> {
    files.iter().map(|f| read_bounded(f)).collect()
}

fn fingerprint(contents: &[Vec<u8>]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for c in contents {
        hasher.update(&(c.len() as u64).to_le_bytes());
        hasher.update(c);
    }
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(contents: &[Vec<u8>]) -> io::Result<String> {
        let s = String::from_utf8(contents[0].clone()).map_err(io::Error::other)?;
        if s.is_empty() {
            return Err(io::Error::other("empty"));
        }
        Ok(s)
    }

    #[test]
    fn changes_are_picked_up_and_bad_ones_ignored_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let r = Reloadable::load("test", vec![path.clone()], text).unwrap();
        assert_eq!(*r.current(), "one");
        assert!(!r.check(), "unchanged files change nothing");
        std::fs::write(&path, "").unwrap();
        assert!(!r.check(), "invalid material is not adopted");
        assert_eq!(*r.current(), "one");
        std::fs::remove_file(&path).unwrap();
        assert!(!r.check(), "a missing file keeps the current value");
        std::fs::write(&path, "two").unwrap();
        assert!(r.check());
        assert_eq!(*r.current(), "two");
    }

    #[test]
    fn oversized_and_missing_files_fail_the_first_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(Reloadable::load("test", vec![path.clone()], text).is_err());
        std::fs::write(&path, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let err = Reloadable::load("test", vec![path], text).err().unwrap();
        assert!(err.to_string().contains("at most"), "{err}");
    }
}

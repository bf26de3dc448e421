//! Time as the store sees it: nanoseconds since the Unix epoch.
//!
//! The store never reads the system clock directly; it asks a [`Clock`]. Production
//! uses [`SystemClock`]; tests use [`ManualClock`] to move time forward without
//! sleeping, which makes TTL behaviour exact and the tests fast.

#[cfg(any(test, feature = "test-util"))]
use std::sync::Arc;
#[cfg(any(test, feature = "test-util"))]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch. `u64` covers the years 1970 to 2554.
pub type UnixNanos = u64;

/// A source of wall-clock time for expiry and item metadata.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> UnixNanos;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixNanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as UnixNanos)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Cloning shares the same time.
/// For tests and benchmarks (the `test-util` feature).
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

#[cfg(any(test, feature = "test-util"))]
impl ManualClock {
    pub fn new(start: UnixNanos) -> Self {
        Self(Arc::new(AtomicU64::new(start)))
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, to: UnixNanos) {
        self.0.store(to, Ordering::SeqCst);
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Clock for ManualClock {
    fn now(&self) -> UnixNanos {
        self.0.load(Ordering::SeqCst)
    }
}

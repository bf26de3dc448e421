//! How long cluster work waits between attempts, in two paces, both
//! backon's exponential backoff, so that no loop in the cluster doubles its
//! own pauses:
//!
//! * [`retry_policy`]: one peer call that must get through (a data move's
//!   batch, a restore's request for a member's tombstones, and, with
//!   shorter pauses and its own deadline, an owner's fetch of a write it
//!   may have missed, see `keepers`), retried for a bounded time while the
//!   member cannot be reached, then given up for now (its caller tries
//!   again later);
//! * [`UntilDone`]: work a node never gives up on, because it stays not
//!   ready until it succeeds (moving its data when the ring changes,
//!   restoring from a backup or from its members, making the Kubernetes
//!   client that watches its ring): the pause between whole attempts, each
//!   of which may itself make calls under [`retry_policy`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How long a peer operation that must get through (a data move, a restore)
/// keeps retrying an unreachable member before giving up for now (unless
/// its caller sets a deadline of its own).
pub const PEER_RETRY_DEADLINE: Duration = Duration::from_secs(15);

/// The one retry policy of peer operations that must get through: backoff
/// from 100 ms doubling to 2 s, for up to [`PEER_RETRY_DEADLINE`] in all.
pub(super) fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .without_max_times()
        .with_total_delay(Some(PEER_RETRY_DEADLINE))
}

/// Shortest and longest pause of [`UntilDone`].
const UNTIL_DONE_FIRST_PAUSE: Duration = Duration::from_millis(500);
const UNTIL_DONE_LONGEST_PAUSE: Duration = Duration::from_secs(10);

/// The pace of work a node never gives up on (see the module doc): pauses
/// between attempts from 500 ms doubling to 10 s, for as long as it takes.
/// A new one starts from the shortest pause.
pub struct UntilDone(backon::ExponentialBackoff);

impl UntilDone {
    pub(super) fn new() -> Self {
        Self(
            ExponentialBuilder::default()
                .with_min_delay(UNTIL_DONE_FIRST_PAUSE)
                .with_max_delay(UNTIL_DONE_LONGEST_PAUSE)
                .with_factor(2.0)
                .without_max_times()
                .build(),
        )
    }

    /// How long to wait before the next attempt.
    pub(super) fn next_pause(&mut self) -> Duration {
        // The backoff has no last attempt; the longest pause, should it end.
        self.0.next().unwrap_or(UNTIL_DONE_LONGEST_PAUSE)
    }
}

impl Default for UntilDone {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_that_is_never_given_up_waits_longer_each_time_up_to_ten_seconds() {
        let ms = Duration::from_millis;
        let mut pace = UntilDone::new();
        let pauses: Vec<Duration> = (0..8).map(|_| pace.next_pause()).collect();
        assert_eq!(
            pauses,
            [500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000].map(ms)
        );
        assert_eq!(
            UntilDone::new().next_pause(),
            ms(500),
            "a new one starts over"
        );
    }
}

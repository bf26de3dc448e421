//! Bounded waiting: every wait in the tests has a deadline and says, when it
//! runs out, what it was waiting for and what it saw last.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often conditions are polled.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Polls `check` until it returns `Ok(Some(value))`, for at most `timeout`.
/// `Ok(None)` means "not yet"; `Err` is remembered as the last observation
/// (so transient API errors do not end the wait) and reported on timeout.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        // A check that hangs (an API call that never answers) must not
        // stretch the wait past its deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(left.max(POLL_INTERVAL), check()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => "condition not met".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "the last check did not finish in time".to_string(),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

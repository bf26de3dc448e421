//! Asking the cache nodes how far their data movement got: the operator
//! reads each member's `GET /api/v1/cluster/rebalance` on its pod IP before
//! it changes the ring again (the typed report, [`NodeProgress`], is the one
//! the nodes themselves exchange). A read that fails is tried again twice,
//! quickly, with `backon` (a connection reset by a node that just restarted
//! should not cost a whole reconcile interval); a node that still does not
//! answer simply has no report, which holds the ring where it is.

use std::collections::BTreeMap;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use distrocache_membership::{NodeProgress, PROGRESS_PATH};
use futures_util::future::join_all;

#[derive(Clone)]
pub struct NodeClient {
    http: reqwest::Client,
}

impl NodeClient {
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        Self { http }
    }

    /// The progress of each `(pod, address)` that answered.
    pub async fn progress(&self, members: &[(String, String)]) -> BTreeMap<String, NodeProgress> {
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_times(2);
        let calls = members.iter().map(|(pod, address)| async move {
            let url = format!("http://{address}{PROGRESS_PATH}");
            let ask = || async {
                let resp = self.http.get(&url).send().await?.error_for_status()?;
                resp.json::<NodeProgress>().await
            };
            match ask.retry(retry).await {
                Ok(report) => Some((pod.clone(), report)),
                Err(e) => {
                    tracing::debug!(%pod, error = %e, "node did not report its progress");
                    None
                }
            }
        });
        join_all(calls).await.into_iter().flatten().collect()
    }
}

//! Asking the cache nodes how far their data movement got: the operator
//! reads each member's `GET /api/v1/cluster/rebalance` on its pod IP before
//! it changes the ring again. A node that does not answer in time simply has
//! no report, which holds the ring where it is.

use std::collections::BTreeMap;
use std::time::Duration;

use distrocache_membership::NodeProgress;
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
        let calls = members.iter().map(|(pod, address)| async move {
            let url = format!("http://{address}/api/v1/cluster/rebalance");
            let report = match self.http.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => resp.json::<NodeProgress>().await.ok(),
                Ok(resp) => {
                    tracing::debug!(%pod, status = %resp.status(), "node answered its progress with an error");
                    None
                }
                Err(e) => {
                    tracing::debug!(%pod, error = %e, "node did not answer its progress");
                    None
                }
            };
            report.map(|r| (pod.clone(), r))
        });
        join_all(calls).await.into_iter().flatten().collect()
    }
}

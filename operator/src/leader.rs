//! Leader election on a `coordination.k8s.io` Lease, so two or more operator
//! replicas can run and exactly one reconciles (kube-lease-manager does the
//! locking, with server-side apply on the Lease so two replicas cannot both
//! take it).
//!
//! A replica waits until it holds the Lease, then reconciles while it
//! renews it. Losing it (a pause longer than the Lease, an API server it
//! could not reach) ends the process: it cannot know what the new leader
//! has changed since, and the restarted process simply stands by. On a
//! graceful stop the Lease is released (a standby finds it free the next
//! time it looks, at the latest when the last renewal would have expired).
//!
//! Each process is its own candidate (`<pod name>-<random suffix>`): a
//! leader that crashed and was restarted in the same pod must not pass for
//! the holder of the Lease its previous process took.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the election runs.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The Lease's namespace (the operator's own).
    pub namespace: String,
    pub lease_name: String,
    /// This candidate's identity, also the Lease's `holderIdentity`.
    pub identity: String,
    /// How long a Lease stays valid after its last renewal; a standby takes
    /// over at most this long after a leader stops renewing.
    pub lease_duration: Duration,
}

/// A unique identity for this process: its pod name (or host name) and a
/// random suffix.
pub fn identity(pod_name: Option<&str>) -> String {
    let mut bytes = [0u8; 4];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{suffix}", pod_name.unwrap_or("distrocache-operator"))
}

/// The Lease held by this process.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("the Lease {0}: {1}")]
    Lease(String, kube_lease_manager::LeaseManagerError),
    #[error("the leader election task ended")]
    Ended,
}

/// Becomes a candidate and waits until this process holds the Lease.
pub async fn acquire(client: Client, config: &ElectionConfig) -> Result<Leadership, ElectionError> {
    let secs = config.lease_duration.as_secs().max(3);
    let lease = format!("{}/{}", config.namespace, config.lease_name);
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_field_manager(format!("distrocache-operator-{}", config.identity))
        .with_duration(secs)
        // Renew a third of the Lease before it runs out: two renewals can
        // fail before a standby may take it.
        .with_grace(secs / 3)
        .build()
        .await
        .map_err(|e| ElectionError::Lease(lease.clone(), e))?;
    let (mut state, task) = manager.watch().await;
    while !*state.borrow_and_update() {
        state.changed().await.map_err(|_| ElectionError::Ended)?;
    }
    Ok(Leadership { state, task })
}

impl Leadership {
    /// Resolves when this process no longer holds the Lease.
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the Lease up, so a standby takes over at once (bounded: a
    /// release that hangs leaves the Lease to expire).
    pub async fn release(self) {
        let Leadership { state, task } = self;
        // Closing the channel makes the manager's task release and end.
        drop(state);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the leader Lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not release the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the leader election task failed"),
            Err(_) => tracing::warn!("releasing the leader Lease timed out; it will expire"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_is_a_candidate_of_its_own() {
        let a = identity(Some("op-7d9f-x2"));
        let b = identity(Some("op-7d9f-x2"));
        assert!(a.starts_with("op-7d9f-x2-"), "{a}");
        assert_ne!(a, b, "a restarted process is a new candidate");
        assert!(identity(None).starts_with("distrocache-operator-"));
    }
}

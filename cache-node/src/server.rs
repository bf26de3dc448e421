//! Wiring a node together: the store, the executor, the cluster (when a
//! membership source is configured), the background tasks (expiry sweeper;
//! in a cluster also the membership watcher, the rebalancer, replica repair
//! and read-lease renewal) and the HTTP listeners, with graceful shutdown.
//!
//! `main.rs` runs one [`Node`] until a signal; the integration tests run many
//! in one process, each on an ephemeral loopback port.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::auth::{Tokens, read_token};
use crate::api::{Api, PeerEndpoint, Surface};
use crate::cluster::membership::{self, Source};
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::{Cluster, leases, rebalance, repair};
use crate::config::Config;
use crate::exec::Executor;
use crate::http::{self, HttpSettings};
use crate::metrics::Metrics;
use crate::store::Store;

/// A bound, not yet serving, node.
pub struct Node {
    exec: Arc<Executor>,
    tokens: Tokens,
    max_message_bytes: usize,
    listener: TcpListener,
    /// The peer API's own listener, when it has a port of its own.
    peer_listener: Option<TcpListener>,
    cleanup_interval: Duration,
    shutdown_delay: Duration,
    http: HttpSettings,
    membership: Option<Source>,
}

impl Node {
    /// Builds the store (and the cluster, if a membership source is
    /// configured) and binds the listener (port 0 picks a free one).
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen_addr()).await?;
        let peer_listener = match config.peer_listen_addr() {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let client_token = config
            .auth_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        let mut peer_token = config
            .peer_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        // The peer API reads and writes any key and replaces the ring. On
        // the client port with no token of its own it would be a way around
        // the client token, so there it requires the client token, and nodes
        // send that one to each other (every node of a cluster is given the
        // same client token). On a port of its own it stays as configured:
        // open there means the operator chose a network boundary instead.
        if peer_token.is_none() && peer_listener.is_none() && client_token.is_some() {
            tracing::info!(
                "the peer API shares the client port and has no token file: it requires the client token"
            );
            peer_token = client_token.clone();
        }
        let tokens = Tokens {
            client: client_token,
            peer: peer_token,
        };
        let store = Arc::new(Store::with_config(config.store()));
        let metrics = Metrics::new();
        let ready = Arc::new(AtomicBool::new(false));
        let membership = config.membership();
        let cluster = membership.as_ref().map(|_| {
            Cluster::new(
                config.node_id.clone(),
                store.clone(),
                config.cluster(),
                ClusterMetrics::new(metrics.registry()),
                ready.clone(),
                tokens.peer.as_deref(),
            )
        });
        if hyper::http::HeaderValue::from_str(&config.node_id).is_err() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "node id must be printable ASCII",
            ));
        }
        let exec = Arc::new(Executor {
            store,
            limits: config.limits(),
            metrics,
            node_id: config.node_id.clone(),
            started: Instant::now(),
            ready,
            cluster,
        });
        Ok(Self {
            exec,
            tokens,
            max_message_bytes: config.cluster().peer.max_message_bytes,
            listener,
            peer_listener,
            cleanup_interval: config.cleanup_interval,
            shutdown_delay: config.shutdown_delay,
            http: HttpSettings {
                max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
                max_header_bytes: usize::try_from(config.max_header_bytes).unwrap_or(usize::MAX),
                max_headers: usize::from(config.max_headers),
                header_read_timeout: config.header_read_timeout,
                request_timeout: config.request_timeout,
                idle_timeout: config.idle_timeout,
                drain_timeout: config.shutdown_timeout,
            },
            membership,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The peer API's address, when it has a listener of its own.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn executor(&self) -> Arc<Executor> {
        self.exec.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight
    /// requests finish (up to the shutdown timeout) and stops the background
    /// tasks.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(sweep_expired(
            self.exec.clone(),
            self.cleanup_interval,
            stop_rx.clone(),
        ))];
        tasks.push(tokio::spawn(crate::memory::follow_data(
            self.exec.store.clone(),
            stop_rx.clone(),
        )));
        match (&self.exec.cluster, self.membership) {
            (Some(cluster), Some(source)) => {
                tracing::info!(%source, "cluster mode: waiting for the ring");
                tasks.push(tokio::spawn(membership::run(
                    cluster.clone(),
                    source,
                    stop_rx.clone(),
                )));
                tasks.push(tokio::spawn(rebalance::run(
                    cluster.clone(),
                    stop_rx.clone(),
                )));
                tasks.push(tokio::spawn(repair::run(cluster.clone(), stop_rx.clone())));
                tasks.push(tokio::spawn(leases::run(cluster.clone(), stop_rx.clone())));
            }
            // A single node holds everything it owns from the start.
            _ => self.exec.ready.store(true, Ordering::Release),
        }
        // On the signal: fail readiness first, keep serving for the delay
        // (so endpoints and peers move away), then close the listeners.
        let closing = CancellationToken::new();
        let exec = self.exec.clone();
        let delay = self.shutdown_delay;
        let closing_on_signal = closing.clone();
        tokio::spawn(async move {
            shutdown.await;
            exec.ready.store(false, Ordering::Release);
            if !delay.is_zero() {
                tracing::info!(?delay, "shutting down: not ready, still serving");
                tokio::time::sleep(delay).await;
            }
            closing_on_signal.cancel();
        });
        let tracker = TaskTracker::new();
        let endpoint = PeerEndpoint {
            max_message_bytes: self.max_message_bytes,
            drain_timeout: self.http.drain_timeout,
            shutdown: closing.clone(),
            tracker: tracker.clone(),
        };
        let api = |surface| {
            Api::new(
                self.exec.clone(),
                surface,
                self.tokens.clone(),
                endpoint.clone(),
            )
            .map_err(|f| std::io::Error::new(std::io::ErrorKind::InvalidInput, f.message))
        };
        match self.peer_listener {
            None => {
                http::serve(
                    self.listener,
                    api(Surface::All)?,
                    self.http,
                    closing.clone(),
                    tracker.clone(),
                )
                .await;
            }
            Some(peer_listener) => {
                tokio::join!(
                    http::serve(
                        self.listener,
                        api(Surface::Client)?,
                        self.http,
                        closing.clone(),
                        tracker.clone(),
                    ),
                    http::serve(
                        peer_listener,
                        api(Surface::Peer)?,
                        self.http,
                        closing.clone(),
                        tracker.clone(),
                    ),
                );
            }
        }
        tracing::info!("shutting down: finishing in-flight requests");
        tracker.close();
        if tokio::time::timeout(self.http.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.http.drain_timeout, "in-flight requests did not finish in time");
        }
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    }
}

/// Removes expired items every `interval` until told to stop. The sweep runs
/// on the blocking pool: its cost grows with the number of expired items, and
/// a large backlog must not stall request handling on a runtime worker.
async fn sweep_expired(exec: Arc<Executor>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let store = exec.store.clone();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || store.sweep_expired()).await {
            Ok(removed) if removed > 0 => {
                tracing::debug!(removed, took = ?started.elapsed(), "swept expired items");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
    }
}

/// Completes on SIGTERM (Kubernetes' stop signal) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

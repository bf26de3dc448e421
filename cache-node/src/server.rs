//! Wiring a node together: the store, the executor, the cluster (when a
//! membership source is configured), the background tasks (expiry sweeper;
//! in a cluster also the membership watcher, the rebalancer, replica repair
//! and read-lease renewal; with --data-dir periodic snapshots) and the HTTP
//! listeners, with graceful shutdown. With --data-dir the newest snapshot is
//! loaded before the listeners are bound, and one is written after they
//! close.
//!
//! `main.rs` runs one [`Node`] until a signal; the integration tests run many
//! in one process, each on an ephemeral loopback port.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::auth::Tokens;
use crate::api::{Api, PeerEndpoint, Surface};
use crate::backup::Backups;
use crate::cluster::membership::{self, Source};
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::{Cluster, leases, rebalance, repair};
use crate::config::Config;
use crate::exec::Executor;
use crate::http::{self, HttpSettings};
use crate::metrics::Metrics;
use crate::reload::{self, Check};
use crate::snapshot::Snapshots;
use crate::store::Store;
use crate::tls::{self, PeerTls, ServerTls};
use crate::tokens::load_tokens;

/// The addresses a node is bound to: what `--address-file` holds, so a
/// supervisor that started it with `--port 0` learns where it listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundAddresses {
    /// The client API (and the peer API, when it has no port of its own).
    pub client: SocketAddr,
    /// The peer API's own listener, with `--peer-port`.
    pub peer: Option<SocketAddr>,
    /// The plain-HTTP probe listener, with `--probe-port`.
    #[serde(default)]
    pub probe: Option<SocketAddr>,
}

impl BoundAddresses {
    /// Writes the addresses as JSON to `path`, atomically (a temporary file
    /// renamed over it), so a reader never sees half a file.
    pub fn write_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }
}

/// A listener on `addr` with a listen backlog of `backlog` (tokio's
/// `TcpListener::bind` fixes it at 128, which a burst of connections
/// overflows into seconds of SYN retransmits).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library and mio do: a restarted node can bind the
    // port again while connections of its predecessor sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A bound, not yet serving, node.
pub struct Node {
    exec: Arc<Executor>,
    tokens: Tokens,
    max_message_bytes: usize,
    listener: TcpListener,
    /// The peer API's own listener, when it has a port of its own.
    peer_listener: Option<TcpListener>,
    /// The plain listener of probes, Prometheus and the operator.
    probe_listener: Option<TcpListener>,
    /// The client API's TLS, when on.
    client_tls: Option<Arc<ServerTls>>,
    /// The peer API's mutual TLS, when on.
    peer_tls: Option<Arc<PeerTls>>,
    /// Every file-backed credential, polled for changes.
    reloadable: Vec<Arc<dyn Check>>,
    credentials_poll_interval: Duration,
    cleanup_interval: Duration,
    shutdown_delay: Duration,
    http: HttpSettings,
    membership: Option<Source>,
    snapshots: Option<Arc<Snapshots>>,
    snapshot_interval: Duration,
    /// Scheduled backups: every this long (zero: none), keeping this many.
    backup_schedule: Duration,
    backup_keep: usize,
}

impl Node {
    /// Builds the store (and the cluster, if a membership source is
    /// configured) and binds the listener (port 0 picks a free one).
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let invalid =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned());
        let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls::load_server(
                cert.clone(),
                key.clone(),
                config.tls_client_ca_file.clone(),
                "client API TLS",
            )?),
            _ => None,
        };
        let peer_tls = match (
            &config.peer_tls_cert_file,
            &config.peer_tls_key_file,
            &config.peer_tls_ca_file,
        ) {
            (Some(cert), Some(key), Some(ca)) => {
                if config.peer_listen_addr().is_none() {
                    return Err(invalid(
                        "--peer-tls-cert-file needs --peer-port: mutual TLS is served on the peer API's own listener",
                    ));
                }
                Some(PeerTls::load(
                    cert.clone(),
                    key.clone(),
                    ca.clone(),
                    config.peer_tls_domain.clone(),
                )?)
            }
            _ => None,
        };
        let client_token = config
            .auth_token_file
            .as_deref()
            .map(load_tokens)
            .transpose()?;
        let mut peer_token = config
            .peer_token_file
            .as_deref()
            .map(load_tokens)
            .transpose()?;
        let mut reloadable: Vec<Arc<dyn Check>> = Vec::new();
        if let Some(t) = &client_tls {
            reloadable.push(t.clone());
        }
        if let Some(t) = &peer_tls {
            reloadable.push(t.server.clone());
            reloadable.push(t.client.clone());
        }
        if let Some(t) = &client_token {
            reloadable.push(t.clone());
        }
        if let Some(t) = &peer_token {
            reloadable.push(t.clone());
        }
        // The peer API reads and writes any key and replaces the ring. On
        // the client port with no token of its own it would be a way around
        // the client token, so there it requires the client token, and nodes
        // send that one to each other (every node of a cluster is given the
        // same client token). On a port of its own it stays as configured:
        // open there means the operator chose a network boundary instead.
        if peer_token.is_none() && config.peer_listen_addr().is_none() && client_token.is_some() {
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
                tokens.peer.clone(),
                peer_tls.clone(),
            )
        });
        if hyper::http::HeaderValue::from_str(&config.node_id).is_err() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "node id must be printable ASCII",
            ));
        }
        let backups = match config.backup() {
            Some(settings) => Some(Arc::new(
                Backups::new(&settings, metrics.registry())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            )),
            None => None,
        };
        let (snapshots, loaded) = match &config.data_dir {
            Some(dir) => {
                let snapshots =
                    Arc::new(Snapshots::open(dir, metrics.registry()).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("--data-dir {}: {e}", dir.display()))
                    })?);
                let loaded = load_snapshot(&snapshots, &store, cluster.as_deref()).await?;
                (Some(snapshots), loaded)
            }
            None => (None, false),
        };
        if let (Some(id), Some(backups), false) = (&config.restore_from, &backups, loaded) {
            match &cluster {
                // Which keys are this node's is known once it has a ring:
                // the rebalancer loads the backup before its first pull.
                Some(cluster) => cluster.restore_backup(backups.clone(), id.clone()),
                None => restore_single(backups, &store, id).await?,
            }
        }
        // Bound only now: while the snapshot loads, peers find the node
        // down (and retry) rather than waiting on a listener that does not
        // answer.
        let listener = listen(config.listen_addr(), config.listen_backlog)?;
        let peer_listener = match config.peer_listen_addr() {
            Some(addr) => Some(listen(addr, config.listen_backlog)?),
            None => None,
        };
        let probe_listener = match config.probe_listen_addr() {
            Some(addr) => Some(listen(addr, config.listen_backlog)?),
            None => None,
        };
        let exec = Arc::new(Executor {
            store,
            limits: config.limits(),
            metrics,
            node_id: config.node_id.clone(),
            started: Instant::now(),
            ready,
            cluster,
            backups,
        });
        Ok(Self {
            exec,
            tokens,
            max_message_bytes: config.cluster().peer.max_message_bytes,
            listener,
            peer_listener,
            probe_listener,
            client_tls,
            peer_tls,
            reloadable,
            credentials_poll_interval: config.credentials_poll_interval,
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
            snapshots,
            snapshot_interval: config.snapshot_interval,
            backup_schedule: config.backup_schedule,
            backup_keep: config.backup_keep as usize,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where the node listens, as `--address-file` reports it.
    pub fn bound_addresses(&self) -> std::io::Result<BoundAddresses> {
        Ok(BoundAddresses {
            client: self.local_addr()?,
            peer: self.peer_addr(),
            probe: self.probe_addr(),
        })
    }

    /// The probe listener's address, when there is one.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
        if let Some(snapshots) = &self.snapshots
            && !self.snapshot_interval.is_zero()
        {
            tasks.push(tokio::spawn(periodic_snapshots(
                self.exec.clone(),
                snapshots.clone(),
                self.snapshot_interval,
                stop_rx.clone(),
            )));
        }
        if let Some(backups) = &self.exec.backups
            && !self.backup_schedule.is_zero()
        {
            tasks.push(tokio::spawn(scheduled_backups(
                self.exec.clone(),
                backups.clone(),
                self.backup_schedule,
                self.backup_keep,
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(reload::watch(
            self.reloadable,
            self.credentials_poll_interval,
            stop_rx.clone(),
        )));
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
            tls: self.peer_tls.clone(),
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
        let probes = async {
            if let Some(probe_listener) = self.probe_listener {
                http::serve(
                    probe_listener,
                    api(Surface::Probe)?,
                    self.http,
                    None,
                    closing.clone(),
                    tracker.clone(),
                )
                .await;
            }
            Ok::<_, std::io::Error>(())
        };
        let apis = async {
            match self.peer_listener {
                None => {
                    http::serve(
                        self.listener,
                        api(Surface::All)?,
                        self.http,
                        self.client_tls.clone(),
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
                            self.client_tls.clone(),
                            closing.clone(),
                            tracker.clone(),
                        ),
                        http::serve(
                            peer_listener,
                            api(Surface::Peer)?,
                            self.http,
                            self.peer_tls.as_ref().map(|t| t.server.clone()),
                            closing.clone(),
                            tracker.clone(),
                        ),
                    );
                }
            }
            Ok::<_, std::io::Error>(())
        };
        let (probes, apis) = tokio::join!(probes, apis);
        probes?;
        apis?;
        tracing::info!("shutting down: finishing in-flight requests");
        tracker.close();
        if tokio::time::timeout(self.http.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.http.drain_timeout, "in-flight requests did not finish in time");
        }
        // Writes kept for clients that went away run on (see
        // `cluster::keepers`): the snapshot below must not miss them.
        if let Some(cluster) = &self.exec.cluster
            && !cluster.wait_keepers(self.http.drain_timeout).await
        {
            tracing::warn!(timeout = ?self.http.drain_timeout, "kept writes did not finish in time");
        }
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        if let Some(snapshots) = self.snapshots {
            // Nothing is served any more: this snapshot misses no write.
            // A failure is logged and counted; the previous snapshot stays.
            let _ = write_snapshot(self.exec.clone(), snapshots, true).await;
        }
        Ok(())
    }
}

/// A single node started with --restore-from: loads the whole backup
/// before it binds its ports. A backup that cannot be read (missing, or the
/// store unreachable) fails the start: a restore asked for never silently
/// starts empty.
async fn restore_single(backups: &Backups, store: &Arc<Store>, id: &str) -> std::io::Result<()> {
    backups
        .restore(store, id, Arc::new(|_: &str| true))
        .await
        .map(|_| ())
        .map_err(|e| std::io::Error::other(format!("--restore-from {id}: {e}")))
}

/// Loads the newest valid snapshot into `store` (on a blocking thread), and
/// in a cluster hands its time and tombstones to the restore rule. Whether
/// one was loaded.
async fn load_snapshot(
    snapshots: &Arc<Snapshots>,
    store: &Arc<Store>,
    cluster: Option<&crate::cluster::Cluster>,
) -> std::io::Result<bool> {
    let (s, st) = (snapshots.clone(), store.clone());
    let loaded = tokio::task::spawn_blocking(move || s.load(&st))
        .await
        .map_err(std::io::Error::other)??;
    match loaded {
        Some(loaded) => {
            if let Some(cluster) = cluster {
                cluster.restored(loaded.header.written_at, &loaded.tombstones);
            }
            Ok(true)
        }
        None => {
            tracing::info!(dir = %snapshots.dir().display(), "no snapshot to load");
            Ok(false)
        }
    }
}

/// Writes a snapshot of the node's store on a blocking thread.
async fn write_snapshot(
    exec: Arc<Executor>,
    snapshots: Arc<Snapshots>,
    graceful: bool,
) -> std::io::Result<crate::snapshot::Written> {
    tokio::task::spawn_blocking(move || {
        let cluster = exec.cluster.clone();
        snapshots.write(&exec.store, &exec.node_id, graceful, || {
            cluster.map_or_else(Default::default, |c| c.tombstone_log())
        })
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Uploads a backup at the start of every slot of `every` (whole multiples
/// of it since the Unix epoch, so the nodes of a cache agree on the id),
/// then deletes this node's part of scheduled backups older than the newest
/// `keep`, until told to stop. A node down for a slot, or not ready at it
/// (still pulling or restoring its data, so its part would be partial),
/// skips it; so does one still uploading the previous slot. Failures are
/// logged, counted and reported; the next slot tries again. On shutdown
/// the loop stops at once: an upload under way goes on in its own task
/// until the process exits, and, cut short, leaves no object behind.
async fn scheduled_backups(
    exec: Arc<Executor>,
    backups: Arc<Backups>,
    every: Duration,
    keep: usize,
    mut stop: watch::Receiver<bool>,
) {
    let every = every.as_secs().max(1);
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let slot = (now.as_secs() / every + 1) * every;
        let wait = Duration::from_secs(slot).saturating_sub(now);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let id = crate::backup::scheduled_id(slot);
        if !exec.ready.load(std::sync::atomic::Ordering::Acquire) {
            tracing::warn!(backup = %id, "skipping a scheduled backup: this node is not ready (its data is still coming)");
            continue;
        }
        let cluster = exec.cluster.clone();
        let log = move || cluster.map_or_else(Default::default, |c| c.tombstone_log());
        let upload = backups.upload(exec.store.clone(), &exec.node_id, &id, log);
        let uploaded = tokio::select! {
            result = upload => result,
            _ = stop.changed() => return,
        };
        match uploaded {
            Ok(_) => {
                if let Err(e) = backups.prune(&exec.node_id, keep).await {
                    tracing::warn!(error = %crate::backup::summary(&e),
                        "cannot remove older scheduled backups; trying after the next one");
                }
            }
            Err(crate::backup::BackupError::Busy) => {
                tracing::warn!(backup = %id, "skipping a scheduled backup: the previous upload is still running");
            }
            // Logged, counted and reported by the upload.
            Err(_) => {}
        }
    }
}

/// Writes a snapshot every `interval` until told to stop.
async fn periodic_snapshots(
    exec: Arc<Executor>,
    snapshots: Arc<Snapshots>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        // Failures are logged and counted by the writer; try again next time.
        let _ = write_snapshot(exec.clone(), snapshots.clone(), false).await;
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

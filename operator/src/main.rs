//! The `distrocache-operator` binary: flags, logging, the health and
//! metrics server, leader election, and the controller.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kube::Api;
use kube::api::ListParams;
use tracing_subscriber::EnvFilter;

use distrocache_operator::controller::{self, Context, Scope};
use distrocache_operator::crd::{self, DistroCache};
use distrocache_operator::leader::{self, ElectionConfig};
use distrocache_operator::metrics::Metrics;
use distrocache_operator::node_client::NodeClient;
use distrocache_operator::server::{self, Health};

#[derive(Debug, Parser)]
#[command(
    name = "distrocache-operator",
    version,
    about = "Kubernetes operator for DistroCache"
)]
struct Flags {
    /// Watch DistroCaches in these namespaces only (comma-separated; its
    /// RBAC can then be a Role in each). Empty: every namespace.
    #[arg(
        long,
        env = "DISTROCACHE_OPERATOR_NAMESPACE",
        value_delimiter = ',',
        default_value = ""
    )]
    namespace: Vec<String>,

    /// The cache-node image of caches whose spec names none.
    #[arg(long, env = "DISTROCACHE_OPERATOR_DEFAULT_IMAGE", default_value_t = crd::default_image())]
    default_image: String,

    /// Run only while holding the leader Lease, so several replicas can
    /// run and one reconciles. Off: this process reconciles at once (for a
    /// single replica, or running outside the cluster).
    #[arg(long, env = "DISTROCACHE_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Name of the leader Lease, in the operator's own namespace.
    #[arg(
        long,
        env = "DISTROCACHE_OPERATOR_LEADER_ELECTION_LEASE",
        default_value = "distrocache-operator"
    )]
    leader_election_lease: String,

    /// How long the leader's Lease lasts without renewal: a standby takes
    /// over at most about this long after the leader stops renewing it.
    /// At least 3s.
    #[arg(long, env = "DISTROCACHE_OPERATOR_LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = parse_lease_duration)]
    leader_election_lease_duration: Duration,

    /// The namespace the operator itself runs in (the Deployment sets
    /// POD_NAMESPACE through the downward API). A cache's NetworkPolicy
    /// admits it to the nodes' client port, where the operator reads their
    /// progress.
    #[arg(long, env = "POD_NAMESPACE", default_value = "distrocache-system")]
    own_namespace: String,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "DISTROCACHE_OPERATOR_BIND_ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind_address: IpAddr,

    /// Port of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "DISTROCACHE_OPERATOR_PORT", default_value_t = 8081)]
    port: u16,

    /// How long to wait for a cache node's progress report.
    #[arg(long, env = "DISTROCACHE_OPERATOR_NODE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    node_timeout: Duration,

    /// How often a steady cache is reconciled even without a change.
    #[arg(long, env = "DISTROCACHE_OPERATOR_RESYNC", default_value = "30s", value_parser = humantime::parse_duration)]
    resync: Duration,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DISTROCACHE_OPERATOR_LOG_LEVEL", default_value = "info")]
    log_level: String,

    #[arg(long, env = "DISTROCACHE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn parse_lease_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(3) {
        return Err("must be at least 3s".into());
    }
    Ok(d)
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the operator");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let filter = EnvFilter::try_new(&flags.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match flags.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let client = kube::Client::try_default().await?;
    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let addr = SocketAddr::new(flags.bind_address, flags.port);
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = server::serve(addr, health).await {
            tracing::error!(error = %e, "the health and metrics server stopped");
        }
    });

    let scope = Scope::from_list(&flags.namespace);
    // Fail fast with a useful message if the CRD is missing or a namespace
    // is not readable.
    for namespace in scope.watches() {
        let caches: Api<DistroCache> = match &namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        if let Err(e) = caches.list(&ListParams::default().limit(1)).await {
            anyhow::bail!(
                "cannot list DistroCaches in {} ({e}); is the CRD installed (kubectl apply -f manifests/) \
                 and may the operator read them there?",
                namespace.as_deref().unwrap_or("every namespace")
            );
        }
    }
    // A standby is ready too: it serves its probes and metrics, and takes
    // over when the leader goes.
    ready.store(true, Ordering::Release);

    let leadership = if flags.leader_elect {
        let config = ElectionConfig {
            namespace: flags.own_namespace.clone(),
            lease_name: flags.leader_election_lease.clone(),
            identity: leader::identity(std::env::var("POD_NAME").ok().as_deref()),
            lease_duration: flags.leader_election_lease_duration,
        };
        tracing::info!(lease = %config.lease_name, namespace = %config.namespace, identity = %config.identity, "waiting to lead");
        tokio::select! {
            held = leader::acquire(client.clone(), &config) => {
                let held = held?;
                tracing::info!(identity = %config.identity, "leading");
                Some(held)
            }
            _ = stop_signal() => {
                tracing::info!("stopped before leading");
                return Ok(());
            }
        }
    } else {
        None
    };
    metrics.leader.set(1);

    tracing::info!(
        scope = ?scope,
        own_namespace = %flags.own_namespace,
        default_image = %flags.default_image,
        "starting the controller"
    );
    let ctx = Context::new(
        client,
        metrics,
        NodeClient::new(flags.node_timeout),
        flags.resync,
        flags.own_namespace.clone(),
        flags.default_image.clone(),
    );
    match leadership {
        Some(mut leadership) => {
            tokio::select! {
                _ = controller::run(ctx, &scope) => {
                    leadership.release().await;
                }
                _ = leadership.lost() => {
                    // Another replica may be reconciling already: stop at
                    // once; the restarted process stands by.
                    anyhow::bail!("lost the leader Lease; exiting so that only the new leader reconciles");
                }
            }
        }
        None => controller::run(ctx, &scope).await,
    }
    tracing::info!("operator stopped");
    Ok(())
}

//! The `distrocache-operator` binary: flags, logging, the health and
//! metrics server, and the controller.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kube::Api;
use kube::api::ListParams;
use tracing_subscriber::EnvFilter;

use distrocache_operator::controller::{self, Context};
use distrocache_operator::crd::DistroCache;
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
    /// Watch DistroCaches in this namespace only (its RBAC can then be a
    /// Role). Empty: every namespace.
    #[arg(long, env = "DISTROCACHE_OPERATOR_NAMESPACE", default_value = "")]
    namespace: String,

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

    let namespace = (!flags.namespace.is_empty()).then(|| flags.namespace.clone());
    let caches: Api<DistroCache> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Fail fast with a useful message if the CRD is missing.
    if let Err(e) = caches.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list DistroCaches ({e}); is the CRD installed (kubectl apply -f manifests/)?"
        );
    }
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        own_namespace = %flags.own_namespace,
        "starting the controller"
    );
    ready.store(true, Ordering::Release);
    let ctx = Context::new(
        client,
        metrics,
        NodeClient::new(flags.node_timeout),
        flags.resync,
        flags.own_namespace.clone(),
    );
    controller::run(ctx, namespace).await;
    tracing::info!("operator stopped");
    Ok(())
}

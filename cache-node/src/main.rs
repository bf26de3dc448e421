//! The `cache-node` binary: parse configuration, set up logging, serve until
//! SIGTERM or SIGINT, then shut down gracefully.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cache_node::config::{Config, LogFormat};
use cache_node::server::{Node, shutdown_signal};

/// mimalloc instead of the system allocator: a request allocates and frees a
/// few small buffers, and under load glibc's malloc spent ~10% of the CPU
/// (chunk unlinking and consolidation) where mimalloc's thread-local free
/// lists spend a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    init_logging(&config);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cache-node failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The runtime sized to the CPUs the node may use: one worker per CPU, and
/// on a single CPU (a pod limited to one core, the common shape of a cache
/// pod, or a process pinned with `taskset`) tokio's current-thread
/// scheduler. `available_parallelism` reads the affinity mask and the
/// cgroup's CPU quota. With one CPU the multi-thread scheduler can only add
/// cost (its work-stealing queues and cross-thread wake-ups): measured with
/// `bench/cluster.sh`, one node pinned to one core served 96,789 GETs/s on
/// the current-thread scheduler against 75,828 on the multi-thread one.
/// Blocking work (the expiry sweep) still goes to the blocking pool either way.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(cpus);
        builder
    };
    // An idle worker gives back freed memory when asked (src/memory.rs).
    builder
        .on_thread_park(cache_node::memory::on_thread_park)
        .enable_all()
        .build()
}

async fn run(config: Config) -> std::io::Result<()> {
    let node = Node::bind(&config).await?;
    if let Some(path) = &config.address_file {
        node.bound_addresses()?.write_to(path)?;
    }
    tracing::info!(
        addr = %node.local_addr()?,
        node_id = %config.node_id,
        max_size = config.max_size,
        max_memory = config.max_memory,
        default_ttl = ?config.default_ttl,
        "cache-node listening"
    );
    node.serve(shutdown_signal()).await?;
    tracing::info!("cache-node stopped");
    Ok(())
}

fn init_logging(config: &Config) {
    // rustls warns once per handshake about things that are the client's
    // business (an IP address sent as SNI, as wrk and many HTTP libraries
    // do): thousands of lines a second under load, each one costing the
    // handshake. Its errors stay; a filter that names rustls is taken as is.
    let directives = if config.log_level.contains("rustls") {
        config.log_level.clone()
    } else {
        format!("{},rustls=error", config.log_level)
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!(
            "invalid --log-level {:?} ({e}); using info",
            config.log_level
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

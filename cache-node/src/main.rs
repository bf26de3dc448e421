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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    init_logging(&config);
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cache-node failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> std::io::Result<()> {
    let node = Node::bind(&config).await?;
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
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
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

//! The command line (clap): global options (servers, token, output format,
//! timeout) and one subcommand per operation. Parsing only; `commands`
//! runs them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "distrocache",
    version,
    about = "Command-line client of a DistroCache node or cluster",
    long_about = "Command-line client of a DistroCache node or cluster. It learns the ring \
        from the first server that answers and sends each key straight to its owner. \
        Errors are one line on stderr and a non-zero exit status (1: the operation failed, \
        2: bad usage)."
)]
pub struct Cli {
    /// A node's client address (host:port, or https://host:port for a
    /// cache serving TLS); repeat for more seeds.
    #[arg(
        short,
        long = "server",
        global = true,
        env = "DISTROCACHE_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:8080"
    )]
    pub servers: Vec<String>,

    /// Bearer token of the client API.
    #[arg(
        long,
        global = true,
        env = "DISTROCACHE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// A file holding the bearer token (surrounding whitespace ignored).
    #[arg(long, global = true, env = "DISTROCACHE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// CA certificates (PEM) to trust for https:// servers, e.g. the
    /// ca.crt of the cache's TLS Secret; by default the public roots.
    #[arg(long, global = true, env = "DISTROCACHE_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// The name every node's certificate must carry (https:// servers); by
    /// default the first server's host. The nodes share one certificate
    /// naming the cache's Service while the CLI reaches each at its own
    /// address.
    #[arg(long, global = true, env = "DISTROCACHE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// The client certificate (PEM chain) to present to nodes that ask
    /// for one (nodes started with --tls-client-ca-file), with --key-file.
    #[arg(
        long,
        global = true,
        env = "DISTROCACHE_CERT_FILE",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,

    /// The private key (PEM) of --cert-file.
    #[arg(
        long,
        global = true,
        env = "DISTROCACHE_KEY_FILE",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,

    /// How answers are printed.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Timeout of each request (e.g. 5s, 500ms).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read an item (exit 1 when the key is absent).
    Get { key: String },
    /// Write an item. The value is JSON, from the argument, --file, or
    /// stdin (no argument, or `-`).
    Set {
        key: String,
        /// The value as JSON (`42`, `"text"`, `{"a":1}`); `-` or absent: stdin.
        value: Option<String>,
        /// Read the value from this file.
        #[arg(short, long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Store the input as a JSON string instead of parsing it as JSON.
        #[arg(long)]
        string: bool,
        /// Time to live (e.g. 30s, 5m); absent: the node's default.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// A tag; repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete an item (exit 1 when the key is absent).
    Del { key: String },
    /// Remove every item carrying a tag, on every node.
    InvalidateTag { tag: String },
    /// Counters of every node and their sums.
    Stats,
    /// The ring: epoch, members, their states, items and balance.
    Cluster,
    /// Follow a data move until every node has synced the ring's epoch.
    WatchRebalance {
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        within: Duration,
        /// How often the nodes are asked.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        every: Duration,
        /// Wait for the ring to reach at least this epoch first (right
        /// after a change, the nodes may not have read it yet).
        #[arg(long, default_value_t = 0)]
        epoch: u64,
    },
    /// A small load generator: GETs and SETs over a key space, with a
    /// latency histogram.
    Bench {
        /// Requests in total.
        #[arg(short = 'n', long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        requests: u64,
        /// Requests in flight.
        #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
        concurrency: u64,
        /// Distinct keys (bench:0 .. bench:N-1).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        keys: u64,
        /// Percentage of requests that are SETs (the rest are GETs).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
        set_percent: u8,
        /// Bytes of each value written.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
        value_size: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

/// A TTL: a duration of at least one second (the API counts seconds).
pub(crate) fn parse_ttl(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("a TTL is at least 1s".into());
    }
    Ok(d)
}

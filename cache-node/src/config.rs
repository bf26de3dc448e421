//! Node configuration: every setting is a command-line flag and a
//! `DISTROCACHE_*` environment variable, with the seed's defaults.
//!
//! Durations read as `30s`, `5m`, `1h30m`; byte sizes as `1048576`, `512MiB`,
//! `1GB`. `cache-node --help` describes each setting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::cluster::ClusterSettings;
use crate::cluster::membership::Source;
use crate::exec::Limits;
use crate::peer::PeerSettings;
use crate::store::StoreConfig;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "cache-node",
    version,
    about = "DistroCache node: an in-memory cache served over REST/JSON"
)]
pub struct Config {
    /// TCP port of the REST API, health endpoints and /metrics.
    #[arg(long, env = "DISTROCACHE_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, env = "DISTROCACHE_BIND_ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind_address: IpAddr,

    /// This node's stable identity (the pod name in Kubernetes).
    #[arg(long, env = "DISTROCACHE_NODE_ID", default_value = "node-1")]
    pub node_id: String,

    /// Most items held at once; the least recently used go first.
    #[arg(long, env = "DISTROCACHE_MAX_SIZE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_size: u64,

    /// Most memory held at once, counting keys, values, tags and per-item
    /// bookkeeping (e.g. 512MiB). 0 means no byte cap.
    #[arg(long, env = "DISTROCACHE_MAX_MEMORY", default_value = "0", value_parser = parse_bytes)]
    pub max_memory: u64,

    /// TTL of items written without one (or with ttl 0). Longer than zero.
    #[arg(long, env = "DISTROCACHE_DEFAULT_TTL", default_value = "5m", value_parser = parse_positive_duration)]
    pub default_ttl: Duration,

    /// How often expired items are swept in the background (they are also
    /// removed lazily when read). Longer than zero.
    #[arg(long, env = "DISTROCACHE_CLEANUP_INTERVAL", default_value = "1m", value_parser = parse_positive_duration)]
    pub cleanup_interval: Duration,

    /// Accepted for compatibility with the seed's configuration and checked,
    /// but not what a cluster uses: every node takes the replication factor
    /// from the ring document (`replicationFactor`, set by the operator from
    /// the DistroCache spec), so that all members agree on it.
    #[arg(long, env = "DISTROCACHE_REPLICATION_FACTOR", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub replication_factor: u32,

    /// Number of store shards (rounded up to a power of two, and raised so
    /// that a shard holds at most about 4 million items at --max-size); 0
    /// picks one from the core count.
    #[arg(long, env = "DISTROCACHE_SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// Longest key accepted, in bytes after percent-decoding (longer: 414).
    #[arg(long, env = "DISTROCACHE_MAX_KEY_BYTES", default_value = "512", value_parser = parse_bytes)]
    pub max_key_bytes: u64,

    /// Largest value accepted, as JSON text (larger: 413).
    #[arg(long, env = "DISTROCACHE_MAX_VALUE_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_value_bytes: u64,

    /// Largest request body accepted (larger: 413).
    #[arg(long, env = "DISTROCACHE_MAX_BODY_BYTES", default_value = "2MiB", value_parser = parse_bytes)]
    pub max_body_bytes: u64,

    /// Most tags on one item (more: 400); at most 255, what the store holds.
    #[arg(long, env = "DISTROCACHE_MAX_TAGS", default_value_t = 32, value_parser = parse_max_tags)]
    pub max_tags: usize,

    /// Longest tag, in bytes (longer: 400).
    #[arg(long, env = "DISTROCACHE_MAX_TAG_BYTES", default_value = "128", value_parser = parse_bytes)]
    pub max_tag_bytes: u64,

    /// Deepest nesting of JSON objects and arrays in a write body, the body's
    /// own object counting as level 1 (deeper: 400). Checked in the same pass
    /// that reads the body; at most 127, so that an item's answer (its value
    /// one level further in) stays within what JSON readers take (serde_json
    /// reads 127 levels).
    #[arg(long, env = "DISTROCACHE_MAX_JSON_DEPTH", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(2..=127))]
    pub max_json_depth: u16,

    /// Largest request head (request line plus headers), in bytes (larger:
    /// a JSON 431, then the connection is closed; the node never buffers
    /// more than this of a head). Between 1KiB and 256KiB.
    #[arg(long, env = "DISTROCACHE_MAX_HEADER_BYTES", default_value = "16KiB",
          value_parser = parse_header_bytes)]
    pub max_header_bytes: u64,

    /// Most header fields in one request (more: a JSON 431, then the
    /// connection is closed).
    #[arg(long, env = "DISTROCACHE_MAX_HEADERS", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_headers: u16,

    /// Log format.
    #[arg(long, env = "DISTROCACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `cache_node=debug`).
    #[arg(long, env = "DISTROCACHE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Most client connections served at once; further ones wait in the
    /// kernel's accept backlog until a slot frees.
    #[arg(long, env = "DISTROCACHE_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Length of the kernel's queue of connections not yet accepted (the
    /// listen backlog), on each listener. A burst of new connections beyond
    /// it waits on SYN retransmits (seconds), so the default is generous;
    /// the kernel caps it at `net.core.somaxconn`.
    #[arg(long, env = "DISTROCACHE_LISTEN_BACKLOG", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub listen_backlog: u32,

    /// Once listening, write the bound addresses here as JSON
    /// (`{"client": "127.0.0.1:43121", "peer": null}`), replacing the file
    /// atomically. With `--port 0` this is how a supervisor (or a test)
    /// learns the port the kernel chose.
    #[arg(long, env = "DISTROCACHE_ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,

    /// A client must send a request's head (request line and headers) within
    /// this long, or the connection is closed: with a JSON 408 if part of the
    /// head arrived, without an answer if nothing did. The clock
    /// starts when the connection is accepted (first request) or at the first
    /// byte of the request (later requests on a keep-alive connection); time
    /// spent idle between requests is --idle-timeout's, not this.
    #[arg(long, env = "DISTROCACHE_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub header_read_timeout: Duration,

    /// A request must be answered within this long of its head arriving:
    /// reading its body (a client dripping it slowly) and handling it (in a
    /// cluster, forwarding included). Past it the node answers 408 and closes
    /// the connection.
    #[arg(long, env = "DISTROCACHE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub request_timeout: Duration,

    /// A keep-alive connection with no request in progress and no bytes
    /// moving for this long is closed. Separate from --header-read-timeout,
    /// which bounds a request whose head has started to arrive.
    #[arg(long, env = "DISTROCACHE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// How long shutdown waits for in-flight requests before giving up.
    #[arg(long, env = "DISTROCACHE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// On SIGTERM, keep serving this long with the readiness probe failing
    /// before closing the listener, so load balancers and peers stop sending
    /// requests first (Kubernetes removes a pod's endpoints only after its
    /// probe fails). 0 stops accepting at once.
    #[arg(long, env = "DISTROCACHE_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// TCP port of the peer API (`/internal/v1/`), which only other nodes
    /// use. 0 serves it on --port with the client API; a port of its own lets
    /// a NetworkPolicy admit only the cache's own pods to it.
    #[arg(long, env = "DISTROCACHE_PEER_PORT", default_value_t = 0)]
    pub peer_port: u16,

    /// A file holding the bearer token clients must send
    /// (`Authorization: Bearer <token>`) on the client API. Unset: no
    /// authentication. /api/v1/health, /api/v1/ready, /metrics and
    /// /api/v1/cluster/{rebalance,handoff} stay open for probes, Prometheus
    /// and the operator.
    #[arg(long, env = "DISTROCACHE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// A file holding the bearer token of the peer API; nodes send it to each
    /// other. Unset: no authentication between nodes, except that a peer API
    /// sharing --port with the client API requires the --auth-token-file
    /// token when that is set (so /internal/v1/ is no way around it).
    #[arg(long, env = "DISTROCACHE_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<PathBuf>,

    /// Cluster mode, membership from a file: a JSON ring document (see the
    /// README), re-read when it changes. Without this or
    /// --membership-configmap the node runs alone.
    #[arg(
        long,
        env = "DISTROCACHE_MEMBERSHIP_FILE",
        conflicts_with = "membership_configmap"
    )]
    pub membership_file: Option<PathBuf>,

    /// Cluster mode, membership from a Kubernetes ConfigMap of this name
    /// (key `ring.json`), watched through the API with the pod's service
    /// account, in the namespace given by --namespace.
    #[arg(long, env = "DISTROCACHE_MEMBERSHIP_CONFIGMAP")]
    pub membership_configmap: Option<String>,

    /// Kubernetes namespace of the membership ConfigMap (the pod's own,
    /// usually passed in from the downward API).
    #[arg(long, env = "DISTROCACHE_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// How often the membership file is checked for changes.
    #[arg(long, env = "DISTROCACHE_MEMBERSHIP_POLL_INTERVAL", default_value = "500ms", value_parser = parse_positive_duration)]
    pub membership_poll_interval: Duration,

    /// Connect timeout for requests to other nodes; an owner that does not
    /// accept within it is treated as down and the next owner is tried.
    #[arg(long, env = "DISTROCACHE_PEER_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_positive_duration)]
    pub peer_connect_timeout: Duration,

    /// Overall timeout of one request to another node.
    #[arg(long, env = "DISTROCACHE_PEER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub peer_timeout: Duration,

    /// Most items per batch when moving data between nodes.
    #[arg(long, env = "DISTROCACHE_REBALANCE_BATCH_ITEMS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rebalance_batch_items: u64,

    /// Most bytes per batch when moving data between nodes (a batch closes
    /// at whichever limit it reaches first).
    #[arg(long, env = "DISTROCACHE_REBALANCE_BATCH_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub rebalance_batch_bytes: u64,

    /// Persistence: a directory for snapshots of the node's items. The node
    /// writes one there on graceful shutdown (and every
    /// --snapshot-interval), and loads the newest valid one when it starts,
    /// before serving. Unset: the node keeps nothing across restarts.
    #[arg(long, env = "DISTROCACHE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// With --data-dir: also write a snapshot this often while serving
    /// (e.g. 5m), so a crash loses at most this much. 0 writes one only on
    /// graceful shutdown.
    #[arg(long, env = "DISTROCACHE_SNAPSHOT_INTERVAL", default_value = "0s", value_parser = parse_duration)]
    pub snapshot_interval: Duration,

    /// Backups (`crate::backup`): where `PUT /api/v1/backups/{id}` uploads
    /// this node's snapshot and --restore-from reads, `s3://bucket[/prefix]`.
    /// Credentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and
    /// AWS_SESSION_TOKEN). Unset: no backups.
    #[arg(long, env = "DISTROCACHE_BACKUP_URL")]
    pub backup_url: Option<String>,

    /// With --backup-url: the S3 endpoint, for storage other than AWS
    /// (e.g. http://minio.storage:9000). Plain HTTP only when named here.
    #[arg(long, env = "DISTROCACHE_BACKUP_ENDPOINT", requires = "backup_url")]
    pub backup_endpoint: Option<String>,

    /// With --backup-url: the bucket's region.
    #[arg(
        long,
        env = "DISTROCACHE_BACKUP_REGION",
        default_value = "us-east-1",
        requires = "backup_url"
    )]
    pub backup_region: String,

    /// With --backup-url: also back up on a schedule, every this long (e.g.
    /// 6h), in slots aligned to the Unix epoch so every node of a cache
    /// uploads under the same id, `scheduled-<slot start, Unix seconds>`.
    /// 0: only when asked (PUT /api/v1/backups/{id}).
    #[arg(long, env = "DISTROCACHE_BACKUP_SCHEDULE", default_value = "0s", value_parser = parse_duration, requires = "backup_url")]
    pub backup_schedule: Duration,

    /// With --backup-schedule: scheduled backups kept; the node deletes its
    /// part of older ones after each scheduled upload.
    #[arg(long, env = "DISTROCACHE_BACKUP_KEEP", default_value_t = 7,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub backup_keep: u32,

    /// With --backup-url: when the node starts without a snapshot of its
    /// own, it first loads the backup with this id (every node's part of
    /// it, keeping the keys this node owns), then pulls from its peers as
    /// usual, the newer version winning.
    #[arg(long, env = "DISTROCACHE_RESTORE_FROM", requires = "backup_url")]
    pub restore_from: Option<String>,

    // TLS (issue 15). Certificate, key, CA and token files are re-read when
    // their contents change (see `reload.rs`).
    /// PEM certificate chain of the client API: with --tls-key-file, the
    /// client port serves HTTPS only (HTTP/1.1, ALPN `http/1.1`); plain HTTP
    /// sent to it gets a JSON 400. Re-read when it changes.
    #[arg(long, env = "DISTROCACHE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DISTROCACHE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA certificates: clients of the client API must present a
    /// certificate signed by one of them (mutual TLS). Unset: no client
    /// certificates asked for.
    #[arg(
        long,
        env = "DISTROCACHE_TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_client_ca_file: Option<PathBuf>,

    /// PEM certificate chain this node presents to its peers, as server and
    /// as client (mutual TLS on the peer API). Needs --peer-port,
    /// --peer-tls-key-file and --peer-tls-ca-file.
    #[arg(long, env = "DISTROCACHE_PEER_TLS_CERT_FILE",
          requires_all = ["peer_tls_key_file", "peer_tls_ca_file"])]
    pub peer_tls_cert_file: Option<PathBuf>,

    /// PEM private key of --peer-tls-cert-file.
    #[arg(
        long,
        env = "DISTROCACHE_PEER_TLS_KEY_FILE",
        requires = "peer_tls_cert_file"
    )]
    pub peer_tls_key_file: Option<PathBuf>,

    /// PEM CA certificates that peers' certificates must chain to (both
    /// directions).
    #[arg(
        long,
        env = "DISTROCACHE_PEER_TLS_CA_FILE",
        requires = "peer_tls_cert_file"
    )]
    pub peer_tls_ca_file: Option<PathBuf>,

    /// DNS suffix of members' identities: member `x` must present a
    /// certificate valid for `x.<domain>` (e.g. the headless Service,
    /// `cache-peers.default.svc`, covered by `*.cache-peers.default.svc`).
    /// Unset: the certificate must carry the member id itself as a DNS name.
    #[arg(
        long,
        env = "DISTROCACHE_PEER_TLS_DOMAIN",
        requires = "peer_tls_cert_file"
    )]
    pub peer_tls_domain: Option<String>,

    /// TCP port of a plain-HTTP listener serving only /api/v1/health,
    /// /api/v1/ready, /metrics and /api/v1/cluster/{rebalance,handoff}
    /// (what probes, Prometheus and the operator read; never data). 0: none.
    /// With TLS on, this is how kubelet probes and Prometheus reach the node
    /// without client certificates.
    #[arg(long, env = "DISTROCACHE_PROBE_PORT", default_value_t = 0)]
    pub probe_port: u16,

    /// How often certificate, key, CA and token files are checked for
    /// changes.
    #[arg(long, env = "DISTROCACHE_CREDENTIALS_POLL_INTERVAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub credentials_poll_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

impl Config {
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind_address, self.port)
    }

    /// Where the peer API listens, when not on the client listener.
    pub fn peer_listen_addr(&self) -> Option<SocketAddr> {
        (self.peer_port != 0).then(|| SocketAddr::new(self.bind_address, self.peer_port))
    }

    /// Where the plain probe listener listens, when there is one.
    pub fn probe_listen_addr(&self) -> Option<SocketAddr> {
        (self.probe_port != 0).then(|| SocketAddr::new(self.bind_address, self.probe_port))
    }

    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            max_items: usize::try_from(self.max_size).unwrap_or(usize::MAX),
            max_bytes: self.max_memory,
            default_ttl: self.default_ttl,
            shards: self.shards,
        }
    }

    /// The membership source, if the node runs in a cluster.
    pub fn membership(&self) -> Option<Source> {
        if let Some(path) = &self.membership_file {
            return Some(Source::File(path.clone()));
        }
        self.membership_configmap
            .as_ref()
            .map(|name| Source::ConfigMap {
                namespace: self.namespace.clone(),
                name: name.clone(),
            })
    }

    /// Where backups go, when --backup-url is set.
    pub fn backup(&self) -> Option<crate::backup::BackupSettings> {
        Some(crate::backup::BackupSettings {
            url: self.backup_url.clone()?,
            endpoint: self.backup_endpoint.clone(),
            region: self.backup_region.clone(),
        })
    }

    pub fn cluster(&self) -> ClusterSettings {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let batch_bytes = size(self.rebalance_batch_bytes).max(64 * 1024);
        ClusterSettings {
            peer: PeerSettings {
                connect_timeout: self.peer_connect_timeout,
                request_timeout: self.peer_timeout,
                // A batch may overshoot its byte limit by one item.
                max_message_bytes: batch_bytes + size(self.max_body_bytes) + 64 * 1024,
            },
            batch_items: size(self.rebalance_batch_items),
            batch_bytes,
            file_poll_interval: self.membership_poll_interval,
        }
    }

    pub fn limits(&self) -> Limits {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Limits {
            max_key_bytes: size(self.max_key_bytes),
            max_value_bytes: size(self.max_value_bytes),
            max_body_bytes: size(self.max_body_bytes),
            max_tags: self.max_tags,
            max_tag_bytes: size(self.max_tag_bytes),
            max_json_depth: usize::from(self.max_json_depth),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 30s, 5m, 1h30m)"))
}

/// For settings where zero means nothing useful: a zero default TTL expires
/// every item as it is written, a zero cleanup interval would make the
/// sweeper's `tokio::time::interval` panic, a zero poll interval spins, and a
/// zero peer timeout fails every request.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// Header limits below 1KiB refuse ordinary requests; above 256KiB they stop
/// bounding memory (hyper's whole read buffer is ~400KiB).
fn parse_header_bytes(s: &str) -> Result<u64, String> {
    let n = parse_bytes(s)?;
    if !(1024..=256 * 1024).contains(&n) {
        return Err(format!("{n} bytes is outside 1KiB..=256KiB"));
    }
    Ok(n)
}

/// The store keeps an item's tag count in a byte: a higher limit would let
/// through writes the store then refuses.
fn parse_max_tags(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n > crate::store::MAX_TAGS {
        return Err(format!("{n} is above {}", crate::store::MAX_TAGS));
    }
    Ok(n)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{e} (use e.g. 1048576, 512MiB, 1GB)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::try_parse_from(["cache-node"]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.node_id, "node-1");
        assert_eq!(c.max_size, 10_000);
        assert_eq!(c.default_ttl, Duration::from_secs(300));
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.replication_factor, 2);
        assert_eq!(c.limits(), Limits::default());
    }

    /// A tag limit the store cannot hold is refused at start, not met later
    /// as a write refused although the limit lets it through.
    #[test]
    fn the_tag_limit_stays_within_what_the_store_holds() {
        let parse = |n: &str| Config::try_parse_from(["cache-node", "--max-tags", n]);
        assert_eq!(parse("255").unwrap().max_tags, 255);
        assert_eq!(parse("0").unwrap().max_tags, 0);
        let refused = parse("256").expect_err("256 tags refused").to_string();
        assert!(refused.contains("256 is above 255"), "{refused}");
    }

    #[test]
    fn hostile_input_limits_have_safe_defaults() {
        let c = Config::try_parse_from(["cache-node"]).unwrap();
        assert_eq!(c.limits().max_json_depth, 32);
        assert_eq!(c.max_header_bytes, 16 * 1024);
        assert_eq!(c.max_headers, 100);
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        let c = Config::try_parse_from([
            "cache-node",
            "--max-json-depth",
            "127",
            "--max-header-bytes",
            "8KiB",
            "--idle-timeout",
            "500ms",
        ])
        .unwrap();
        assert_eq!(c.limits().max_json_depth, 127);
        assert_eq!(c.max_header_bytes, 8192);
        assert_eq!(c.idle_timeout, Duration::from_millis(500));
    }

    #[test]
    fn sizes_and_durations_parse_in_human_units() {
        let c = Config::try_parse_from([
            "cache-node",
            "--max-memory",
            "512MiB",
            "--default-ttl",
            "1h30m",
            "--max-value-bytes",
            "4096",
        ])
        .unwrap();
        assert_eq!(c.max_memory, 512 * 1024 * 1024);
        assert_eq!(c.default_ttl, Duration::from_secs(5400));
        assert_eq!(c.max_value_bytes, 4096);
    }

    #[test]
    fn nonsense_is_refused() {
        for args in [
            &["cache-node", "--max-size", "0"][..],
            &["cache-node", "--default-ttl", "soon"],
            &["cache-node", "--max-memory", "lots"],
            &["cache-node", "--port", "70000"],
            &["cache-node", "--replication-factor", "0"],
            &["cache-node", "--max-json-depth", "1"],
            &["cache-node", "--max-json-depth", "128"],
            &["cache-node", "--max-header-bytes", "512"],
            &["cache-node", "--max-header-bytes", "1MiB"],
            &["cache-node", "--max-headers", "0"],
            &["cache-node", "--header-read-timeout", "0s"],
            &["cache-node", "--request-timeout", "0s"],
            &["cache-node", "--idle-timeout", "0s"],
            &["cache-node", "--cleanup-interval", "0s"],
            &["cache-node", "--cleanup-interval", "0ms"],
            &["cache-node", "--default-ttl", "0s"],
            &["cache-node", "--membership-poll-interval", "0s"],
            &["cache-node", "--peer-connect-timeout", "0s"],
            &["cache-node", "--peer-timeout", "0s"],
        ] {
            assert!(Config::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}

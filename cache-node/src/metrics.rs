//! Prometheus metrics of a node, under the seed's names.
//!
//! Operation counters and sizes are not kept twice: the store already counts
//! them (per shard, without shared atomics), so they are read from
//! [`StoreStats`] at scrape time and turned into metric families then. Only
//! the access-duration histogram is recorded per request.
//!
//! `distrocache_items_total` is a gauge in the seed, but `promtool check
//! metrics` rejects a non-counter whose name ends in `_total`. It is therefore
//! exposed without a type (untyped), which keeps the seed's name and value for
//! existing dashboards and passes the linter; `distrocache_items` carries the
//! same number as a proper gauge for new ones.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};

use crate::store::StoreStats;

/// Store operations whose latency is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    Delete,
    InvalidateTag,
}

impl Op {
    const ALL: [Op; 4] = [Op::Get, Op::Set, Op::Delete, Op::InvalidateTag];

    fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Delete => "delete",
            Op::InvalidateTag => "invalidate_tag",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// One histogram per [`Op`], resolved once so recording costs no label lookup.
    access: [prometheus::Histogram; 4],
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let access = HistogramVec::new(
            HistogramOpts::new(
                "distrocache_access_duration_seconds",
                "Time spent in the store per cache operation",
            )
            .buckets(vec![
                1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2, 0.1,
                1.0,
            ]),
            &["operation"],
        )
        .expect("static histogram options are valid");
        registry
            .register(Box::new(access.clone()))
            .expect("registered once");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");
        Self {
            registry,
            access: Op::ALL.map(|op| access.with_label_values(&[op.label()])),
        }
    }

    /// The registry, for other parts of the node (cluster mode) to add theirs.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn observe(&self, op: Op, took: Duration) {
        self.access[op as usize].observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of everything this node knows.
    pub fn render(&self, stats: &StoreStats, uptime: Duration) -> String {
        let c = &stats.counters;
        let mut families = self.registry.gather();
        families.extend(
            [
                counter("distrocache_hits_total", "Cache hits", c.hits),
                counter("distrocache_misses_total", "Cache misses", c.misses),
                counter("distrocache_sets_total", "Set operations", c.sets),
                counter("distrocache_deletes_total", "Delete operations", c.deletes),
                counter("distrocache_evictions_total", "LRU evictions", c.evictions),
                counter(
                    "distrocache_expirations_total",
                    "Items removed because their TTL passed",
                    c.expirations,
                ),
                counter(
                    "distrocache_tag_invalidations_total",
                    "Items removed by tag invalidation",
                    c.tag_invalidations,
                ),
                gauge(
                    "distrocache_items",
                    "Current item count",
                    stats.items as u64,
                ),
                gauge(
                    "distrocache_memory_used_bytes",
                    "Bytes charged against the memory budget (keys, values, tags, bookkeeping)",
                    stats.bytes,
                ),
                gauge(
                    "distrocache_memory_limit_bytes",
                    "The memory budget in bytes (0: no byte cap)",
                    stats.max_bytes,
                ),
                gauge(
                    "distrocache_max_items",
                    "The item cap (maxSize)",
                    stats.max_items as u64,
                ),
                gauge(
                    "distrocache_uptime_seconds",
                    "Seconds since the node started",
                    uptime.as_secs(),
                ),
            ]
            .into_iter()
            .flatten(),
        );
        families.sort_by(|a, b| a.name().cmp(b.name()));

        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("encoding gathered families cannot fail");
        let mut out = String::from_utf8(out).expect("the text format is UTF-8");
        let _ = write!(
            out,
            "# HELP distrocache_items_total Current item count (a gauge; the seed's name, kept untyped)\n\
             distrocache_items_total {}\n",
            stats.items
        );
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(name: &str, help: &str, value: u64) -> Vec<MetricFamily> {
    let c = IntCounter::with_opts(Opts::new(name, help)).expect("static metric options are valid");
    c.inc_by(value);
    c.collect()
}

fn gauge(name: &str, help: &str, value: u64) -> Vec<MetricFamily> {
    let g = IntGauge::with_opts(Opts::new(name, help)).expect("static metric options are valid");
    g.set(value.min(i64::MAX as u64) as i64);
    g.collect()
}

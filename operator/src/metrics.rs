//! The operator's own Prometheus metrics: reconciles (in all and per
//! cache), failures (by error kind) and how long a reconcile takes, each
//! cache's ring epoch and conditions, served on `/metrics` with the process
//! metrics. The alert rules and the dashboard (charts/distrocache/files/)
//! read these names.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The `kind` label values of `distrocache_operator_reconcile_errors_total`,
/// created at zero on start so that a rate over them has data before the
/// first error (and a dashboard shows 0, not "no data").
pub const ERROR_KINDS: [&str; 6] = [
    "forbidden",
    "conflict",
    "invalid",
    "api",
    "transport",
    "bad_ring",
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    /// Reconciles of each cache: what tells a cache reconciled in a loop
    /// from one reconciled once per change (the tests count these).
    pub cache_reconciles: IntCounterVec,
    /// Failed reconciles by error kind (one of [`ERROR_KINDS`]).
    pub failures: IntCounterVec,
    pub duration: Histogram,
    pub ring_epoch: IntGaugeVec,
    /// 1 when a cache's condition `type` is True, 0 otherwise; the
    /// `DistroCacheDegraded` alert reads it.
    pub cache_condition: IntGaugeVec,
    /// 1 while this replica holds the leader Lease and reconciles.
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounter::new(
            "distrocache_operator_reconciles_total",
            "Reconciles of DistroCache resources",
        )
        .expect("valid metric");
        let cache_reconciles = IntCounterVec::new(
            Opts::new(
                "distrocache_operator_cache_reconciles_total",
                "Reconciles of each DistroCache resource",
            ),
            &["namespace", "name"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "distrocache_operator_reconcile_errors_total",
                "Reconciles that failed and will be retried, by error kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        for kind in ERROR_KINDS {
            failures.with_label_values(&[kind]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "distrocache_operator_reconcile_duration_seconds",
                "Time one reconcile took",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        let ring_epoch = IntGaugeVec::new(
            Opts::new(
                "distrocache_operator_ring_epoch",
                "Ring epoch last written for each DistroCache",
            ),
            &["namespace", "name"],
        )
        .expect("valid metric");
        let cache_condition = IntGaugeVec::new(
            Opts::new(
                "distrocache_operator_cache_condition",
                "1 when the condition `type` of a DistroCache is True, 0 otherwise",
            ),
            &["namespace", "name", "type"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "distrocache_operator_leader",
            "1 while this replica holds the leader Lease (only the leader reconciles)",
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cache_reconciles.clone()),
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(ring_epoch.clone()),
            Box::new(cache_condition.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("registered once");
        }
        Self {
            registry,
            reconciles,
            cache_reconciles,
            failures,
            duration,
            ring_epoch,
            cache_condition,
            leader,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding gathered families cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

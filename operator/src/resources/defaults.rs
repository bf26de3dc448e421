//! The safe defaults of a cache's pods, for what its spec leaves unset:
//! placement that spreads the copies of a key apart, resource requests, and
//! a byte budget derived from a memory limit. Each is replaced whole by the
//! user's value (an empty one turns it off), and each lives here rather
//! than in the CRD schema, so a better default reaches existing caches with
//! an operator upgrade instead of staying frozen in stored objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, PodAffinityTerm, PodAntiAffinity, ResourceRequirements, TopologySpreadConstraint,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::selector_labels;
use crate::crd::{DistroCache, DistroCacheSpec};
use crate::validation::parse_quantity;

pub(crate) const HOSTNAME_KEY: &str = "kubernetes.io/hostname";
pub(crate) const ZONE_KEY: &str = "topology.kubernetes.io/zone";
pub const DEFAULT_CPU_REQUEST: &str = "100m";
pub const DEFAULT_MEMORY_REQUEST: &str = "128Mi";

/// What a node's process takes beyond its items: a fixed part (runtime,
/// buffers, connections) and a part proportional to the bytes it holds
/// (allocator slack and the per-item structures the byte count does not
/// see). Measured with `bash bench/headroom.sh` (a static release node,
/// full and evicting under 64 connections of writes, then reads and
/// writes): full at 64 MiB it peaked at 97.4 MiB resident, full at 128 MiB
/// at 175.8 MiB, i.e. about 19 MiB + 1.23 x the bytes held. The
/// constants keep a margin over that for what a single node under load does
/// not show: peer connections, rebalancing batches (up to 4 MiB per peer in
/// flight), replication hints, and allocator variance. The derived budget
/// is what fits under the limit with both, rounded down to a MiB.
pub(crate) const HEADROOM_FIXED_BYTES: u64 = 48 * 1024 * 1024;
/// Resident bytes per byte of `--max-memory`, as a ratio in thousandths.
pub(crate) const HEADROOM_RATIO_PER_MILLE: u64 = 1_500;
/// The smallest budget worth running a node with.
const MIN_DERIVED_BYTES: u64 = 16 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

fn selector(dc: &DistroCache) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(dc)),
        ..LabelSelector::default()
    }
}

/// The spec's affinity, or a preferred anti-affinity between the cache's
/// own pods on `kubernetes.io/hostname`: preferred, so a cache with more
/// pods than nodes (or a one-node test cluster) still schedules.
pub fn affinity(dc: &DistroCache) -> Affinity {
    if let Some(affinity) = &dc.spec.affinity {
        return affinity.clone();
    }
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector(dc)),
                        topology_key: HOSTNAME_KEY.into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The spec's topology spread, or an even spread over zones that never
/// blocks scheduling (`ScheduleAnyway`): clusters without zone labels, or
/// with one zone, schedule as if it were absent.
pub(crate) fn topology_spread(dc: &DistroCache) -> Vec<TopologySpreadConstraint> {
    if let Some(constraints) = &dc.spec.topology_spread_constraints {
        return constraints.clone();
    }
    vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: ZONE_KEY.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(selector(dc)),
        ..TopologySpreadConstraint::default()
    }]
}

/// The spec's resources, or requests only (no limits: a default limit
/// would be a guess about the data, and an OOM kill loses a node's copy).
pub fn resources(dc: &DistroCache) -> ResourceRequirements {
    if let Some(resources) = &dc.spec.resources {
        return resources.clone();
    }
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(DEFAULT_CPU_REQUEST.into())),
            ("memory".to_owned(), Quantity(DEFAULT_MEMORY_REQUEST.into())),
        ])),
        ..ResourceRequirements::default()
    }
}

/// The memory limit of the spec's resources, in bytes.
fn memory_limit(spec: &DistroCacheSpec) -> Option<Result<u64, String>> {
    let limit = spec.resources.as_ref()?.limits.as_ref()?.get("memory")?;
    Some(
        parse_quantity(&limit.0)
            .filter(|v| *v >= 0.0)
            .map(|v| v as u64)
            .ok_or_else(|| {
                format!(
                    "spec.resources.limits.memory {:?} is not a quantity",
                    limit.0
                )
            }),
    )
}

/// The byte budget that fits under a memory limit with the measured
/// headroom, or `None` if the limit leaves too little for items.
pub fn budget_under(limit: u64) -> Option<u64> {
    let room = limit.checked_sub(HEADROOM_FIXED_BYTES)?;
    let budget = room.saturating_mul(1000) / HEADROOM_RATIO_PER_MILLE / MIB * MIB;
    (budget >= MIN_DERIVED_BYTES).then_some(budget)
}

/// What the node's `--max-memory` is: the spec's, else derived from its
/// memory limit, else unset (no byte cap). An error when the limit is too
/// small to derive one from.
pub fn max_memory(spec: &DistroCacheSpec) -> Result<Option<String>, String> {
    if let Some(max_memory) = &spec.max_memory {
        return Ok(Some(max_memory.clone()));
    }
    let Some(limit) = memory_limit(spec) else {
        return Ok(None);
    };
    let limit = limit?;
    match budget_under(limit) {
        Some(budget) => Ok(Some(budget.to_string())),
        None => Err(format!(
            "spec.resources.limits.memory ({limit} bytes) leaves no room for items: a node \
             needs {} MiB plus {}% of its items' bytes; raise the limit or set spec.maxMemory",
            HEADROOM_FIXED_BYTES / MIB,
            HEADROOM_RATIO_PER_MILLE / 10
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::cache;

    #[test]
    fn placement_spreads_copies_apart_unless_the_user_says_otherwise() {
        let dc = cache("{}");
        let anti = affinity(&dc).pod_anti_affinity.unwrap();
        let term = &anti
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(term.pod_affinity_term.topology_key, HOSTNAME_KEY);
        assert_eq!(
            term.pod_affinity_term.label_selector,
            Some(selector(&dc)),
            "it repels the cache's own pods"
        );
        assert!(
            anti.required_during_scheduling_ignored_during_execution
                .is_none()
        );
        let spread = topology_spread(&dc);
        assert_eq!(spread.len(), 1);
        assert_eq!(spread[0].topology_key, ZONE_KEY);
        assert_eq!(spread[0].when_unsatisfiable, "ScheduleAnyway");

        // A user's value replaces the default whole; empty turns it off.
        let dc = cache("{affinity: {}, topologySpreadConstraints: []}");
        assert_eq!(affinity(&dc), Affinity::default());
        assert!(topology_spread(&dc).is_empty());
        let dc = cache(
            "{topologySpreadConstraints: [{maxSkew: 2, topologyKey: rack, whenUnsatisfiable: DoNotSchedule}]}",
        );
        assert_eq!(topology_spread(&dc)[0].topology_key, "rack");
    }

    #[test]
    fn requests_by_default_and_the_users_resources_whole() {
        let r = resources(&cache("{}"));
        let requests = r.requests.unwrap();
        assert_eq!(requests["cpu"].0, DEFAULT_CPU_REQUEST);
        assert_eq!(requests["memory"].0, DEFAULT_MEMORY_REQUEST);
        assert!(r.limits.is_none());
        let r = resources(&cache("{resources: {limits: {memory: 1Gi}}}"));
        assert!(
            r.requests.is_none(),
            "the user's value replaces the default"
        );
    }

    #[test]
    fn max_memory_is_derived_from_a_memory_limit_with_headroom() {
        assert_eq!(max_memory(&cache("{}").spec), Ok(None));
        assert_eq!(
            max_memory(&cache("{maxMemory: 64MiB, resources: {limits: {memory: 1Gi}}}").spec),
            Ok(Some("64MiB".into())),
            "the user's maxMemory wins"
        );
        let derived = max_memory(&cache("{resources: {limits: {memory: 1Gi}}}").spec)
            .unwrap()
            .unwrap();
        let budget: u64 = derived.parse().unwrap();
        let gib = 1024 * MIB;
        assert_eq!(budget % MIB, 0);
        // Full, the node stays under its limit by the measured ratio.
        assert!(
            HEADROOM_FIXED_BYTES + budget * HEADROOM_RATIO_PER_MILLE / 1000 <= gib,
            "{budget}"
        );
        assert!(budget > gib / 2, "{budget}: not needlessly small");
        let err = max_memory(&cache("{resources: {limits: {memory: 32Mi}}}").spec).unwrap_err();
        assert!(err.contains("leaves no room"), "{err}");
    }
}

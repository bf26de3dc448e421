//! The PodDisruptionBudget: voluntary evictions (node drains, upgrades) may
//! take at most `maxUnavailable` node pods at once, which the spec keeps
//! below the replication factor so every key keeps a live copy.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{child_meta, selector_labels};
use crate::crd::DistroCache;

/// `None` when the spec disables it.
pub(crate) fn pod_disruption_budget(dc: &DistroCache) -> Option<PodDisruptionBudget> {
    let spec = &dc.spec.pod_disruption_budget;
    spec.enabled.then(|| PodDisruptionBudget {
        metadata: child_meta(dc, dc.name_any(), "cache-node"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(spec.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(dc)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn limits_voluntary_disruptions_unless_disabled() {
        let dc = cache("{replicationFactor: 3, podDisruptionBudget: {maxUnavailable: 2}}");
        let pdb = pod_disruption_budget(&dc).unwrap();
        assert_owned(&pdb.metadata, "orders");
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap(),
            selector_labels(&dc)
        );
        assert!(pod_disruption_budget(&cache("{podDisruptionBudget: {enabled: false}}")).is_none());
    }
}

//! The children of a DistroCache, as pure functions from the resource (and,
//! where the scaling logic decides, a replica count or ring document) to the
//! Kubernetes objects the controller applies with server-side apply. Nothing
//! here talks to the API server, so every builder is unit-tested.

mod auth;
pub mod defaults;
mod monitoring;
mod network;
mod pdb;
mod rbac;
mod ring;
mod services;
mod statefulset;
mod tls;

pub(crate) use auth::{auth_secret_name, generated_auth_secret};
pub(crate) use monitoring::{SERVICE_MONITOR_GROUP, service_monitor, service_monitor_resource};
pub(crate) use network::network_policy;
pub(crate) use pdb::pod_disruption_budget;
pub(crate) use rbac::{node_role, node_role_binding, node_service_account};
pub(crate) use ring::{ring_configmap, ring_configmap_name};
pub use services::peer_service;
pub(crate) use services::{client_service, peer_service_name};
pub use statefulset::statefulset;
pub(crate) use tls::{
    CERT_MANAGER_GROUP, certificate_resource, certificates, client_tls_secret_name,
};

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::DistroCache;

/// The field manager of every server-side apply the operator makes.
pub(crate) const FIELD_MANAGER: &str = "distrocache-operator";

/// Labels that select a cache's node pods. Stable for the life of the cache:
/// a StatefulSet's selector cannot change.
pub(crate) fn selector_labels(dc: &DistroCache) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "distrocache".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), dc.name_any()),
    ])
}

/// The selector as a label-selector string (`status.selector`, pod lists).
pub(crate) fn selector_string(dc: &DistroCache) -> String {
    selector_labels(dc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels on every child.
pub fn labels(dc: &DistroCache, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(dc);
    labels.insert("app.kubernetes.io/component".into(), component.into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "distrocache-operator".into(),
    );
    labels
}

/// Metadata of a child: its name, the cache's namespace, labels, and an
/// owner reference so deleting the cache garbage-collects it.
pub(crate) fn child_meta(dc: &DistroCache, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: dc.namespace(),
        labels: Some(labels(dc, component)),
        owner_references: Some(vec![owner_reference(dc)]),
        ..ObjectMeta::default()
    }
}

pub(crate) fn owner_reference(dc: &DistroCache) -> OwnerReference {
    dc.controller_owner_ref(&())
        .expect("a DistroCache read from the API server has a name and uid")
}

/// The ring member id (pod name) of ordinal `n`.
pub fn pod_name(dc: &DistroCache, n: i32) -> String {
    format!("{}-{n}", dc.name_any())
}

/// The ordinal of one of this cache's pods, from its name.
pub(crate) fn ordinal(dc: &DistroCache, pod: &str) -> Option<i32> {
    pod.strip_prefix(&dc.name_any())?
        .strip_prefix('-')?
        .parse()
        .ok()
}

#[cfg(test)]
pub(crate) mod test_support {
    use kube::core::ObjectMeta;

    use crate::crd::{DistroCache, DistroCacheSpec};

    /// A cache as the API server would hand it over (name, namespace, uid).
    pub fn cache(spec_yaml: &str) -> DistroCache {
        let spec: DistroCacheSpec = serde_yaml::from_str(spec_yaml).expect("valid spec");
        let mut dc = DistroCache::new("orders", spec);
        dc.metadata = ObjectMeta {
            name: Some("orders".into()),
            namespace: Some("shop".into()),
            uid: Some("0b5e3c1a-1111-2222-3333-444455556666".into()),
            generation: Some(3),
            ..ObjectMeta::default()
        };
        dc
    }

    /// Asserts that `meta` belongs to the test cache, with an owner reference.
    pub(crate) fn assert_owned(meta: &kube::core::ObjectMeta, name: &str) {
        assert_eq!(meta.name.as_deref(), Some(name));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let owner = &meta.owner_references.as_ref().expect("owner references")[0];
        assert_eq!(owner.kind, "DistroCache");
        assert_eq!(owner.name, "orders");
        assert_eq!(owner.controller, Some(true));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["app.kubernetes.io/instance"], "orders");
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "distrocache-operator"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::cache;
    use super::*;

    #[test]
    fn pod_names_and_ordinals_round_trip() {
        let dc = cache("{}");
        assert_eq!(pod_name(&dc, 4), "orders-4");
        assert_eq!(ordinal(&dc, "orders-4"), Some(4));
        assert_eq!(ordinal(&dc, "orders-x"), None);
        assert_eq!(ordinal(&dc, "ordersx-1"), None);
        assert_eq!(ordinal(&dc, "other-1"), None);
        assert_eq!(
            selector_string(&dc),
            "app.kubernetes.io/instance=orders,app.kubernetes.io/name=distrocache"
        );
    }
}

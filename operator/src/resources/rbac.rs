//! What the node pods may do with the API: read and watch their own ring
//! ConfigMap, nothing more (`resourceNames` pins the Role to that one
//! object; the node watches it with a `metadata.name` field selector, which
//! the API server authorises against `resourceNames`).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;

use super::{child_meta, ring_configmap_name};
use crate::crd::DistroCache;

pub(crate) fn node_service_account_name(dc: &DistroCache) -> String {
    format!("{}-node", dc.name_any())
}

pub(crate) fn node_service_account(dc: &DistroCache) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(dc, node_service_account_name(dc), "cache-node"),
        ..ServiceAccount::default()
    }
}

pub(crate) fn node_role(dc: &DistroCache) -> Role {
    Role {
        metadata: child_meta(dc, node_service_account_name(dc), "cache-node"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![ring_configmap_name(dc)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

pub(crate) fn node_role_binding(dc: &DistroCache) -> RoleBinding {
    let name = node_service_account_name(dc);
    RoleBinding {
        metadata: child_meta(dc, name.clone(), "cache-node"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: dc.namespace(),
            ..Subject::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn nodes_may_only_read_their_own_ring() {
        let dc = cache("{}");
        assert_owned(&node_service_account(&dc).metadata, "orders-node");
        let role = node_role(&dc);
        assert_owned(&role.metadata, "orders-node");
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["configmaps".to_string()][..])
        );
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["orders-ring".to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        let binding = node_role_binding(&dc);
        assert_eq!(binding.role_ref.name, "orders-node");
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("orders-node", Some("shop"))
        );
    }
}

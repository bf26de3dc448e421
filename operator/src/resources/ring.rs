//! The ring ConfigMap `<name>-ring`: the membership document the nodes
//! watch, under the key `ring.json`.

use std::collections::BTreeMap;

use distrocache_membership::{CONFIGMAP_KEY, MembershipDoc};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;

use super::child_meta;
use crate::crd::DistroCache;

pub(crate) fn ring_configmap_name(dc: &DistroCache) -> String {
    format!("{}-ring", dc.name_any())
}

pub(crate) fn ring_configmap(dc: &DistroCache, doc: &MembershipDoc) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(dc, ring_configmap_name(dc), "ring"),
        data: Some(BTreeMap::from([(CONFIGMAP_KEY.to_owned(), doc.to_json())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use distrocache_membership::{Hashing, Member, MemberState};

    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn holds_the_document_under_ring_json() {
        let dc = cache("{}");
        let doc = MembershipDoc {
            epoch: 4,
            replication_factor: 2,
            hashing: Hashing::Rendezvous,
            members: vec![Member {
                id: "orders-0".into(),
                address: "10.1.2.3:8081".into(),
                client_address: Some("10.1.2.3:8080".into()),
                state: MemberState::Active,
            }],
        };
        let cm = ring_configmap(&dc, &doc);
        assert_owned(&cm.metadata, "orders-ring");
        let json = &cm.data.unwrap()["ring.json"];
        assert_eq!(MembershipDoc::from_json(json.as_bytes()).unwrap(), doc);
    }
}

//! The two Services: `<name>` for clients (ready nodes only) and the
//! headless `<name>-peers` that gives every pod a stable DNS name and lists
//! not-yet-ready pods too, since nodes must reach a peer that is still
//! pulling its data.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{child_meta, selector_labels};
use crate::crd::DistroCache;

pub(crate) fn peer_service_name(dc: &DistroCache) -> String {
    format!("{}-peers", dc.name_any())
}

fn http_port(dc: &DistroCache) -> ServicePort {
    ServicePort {
        name: Some("http".into()),
        port: dc.spec.port,
        target_port: Some(IntOrString::String("http".into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// The client Service: REST API and /metrics of the ready nodes.
pub(crate) fn client_service(dc: &DistroCache) -> Service {
    Service {
        metadata: child_meta(dc, dc.name_any(), "client"),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(dc)),
            ports: Some(vec![http_port(dc)]),
            type_: Some("ClusterIP".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless peer Service the StatefulSet is governed by.
pub fn peer_service(dc: &DistroCache) -> Service {
    let peer = ServicePort {
        name: Some("peer".into()),
        port: dc.spec.peer_port,
        target_port: Some(IntOrString::String("peer".into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: child_meta(dc, peer_service_name(dc), "peers"),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(dc)),
            ports: Some(vec![http_port(dc), peer]),
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn client_and_peer_services_select_the_node_pods() {
        let dc = cache("{port: 9090}");
        let client = client_service(&dc);
        assert_owned(&client.metadata, "orders");
        let spec = client.spec.unwrap();
        assert_eq!(spec.selector.unwrap(), selector_labels(&dc));
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 9090));

        let peers = peer_service(&dc);
        assert_owned(&peers.metadata, "orders-peers");
        let spec = peers.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
    }
}

//! The optional NetworkPolicy of a cache: the peer port admits only the
//! cache's own pods; the client port admits the cache's own pods, the
//! operator's namespace (it reads the nodes' progress) and the namespaces
//! (and pods) the spec selects, by default the cache's own namespace only.
//!
//! With the ServiceMonitor on as well, Prometheus (the namespaces and pods
//! `monitoring.prometheus*Selector` name, by default the `monitoring`
//! namespace) is admitted to the client port, where `/metrics` is served:
//! turning on both must not silently stop the scraping.
//!
//! The operator's namespace is where it really runs (the chart installs it
//! anywhere), unless the spec names another: admitting the wrong one would
//! hide every node's progress and stall all scaling.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{child_meta, selector_labels};
use crate::crd::DistroCache;

/// Where Prometheus is looked for when the spec does not say.
pub(crate) const DEFAULT_PROMETHEUS_NAMESPACE: &str = "monitoring";

fn port(name: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

fn namespace_named(name: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            name.to_owned(),
        )])),
        ..LabelSelector::default()
    }
}

/// `None` unless the spec enables it. `operator_namespace` is the namespace
/// the operator runs in, used unless the spec overrides it.
pub(crate) fn network_policy(dc: &DistroCache, operator_namespace: &str) -> Option<NetworkPolicy> {
    let spec = &dc.spec.network_policy;
    if !spec.enabled {
        return None;
    }
    let own_pods = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(dc)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let clients = NetworkPolicyPeer {
        namespace_selector: Some(
            spec.client_namespace_selector
                .clone()
                .unwrap_or_else(|| namespace_named(&dc.namespace().unwrap_or_default())),
        ),
        pod_selector: spec.client_pod_selector.clone(),
        ..NetworkPolicyPeer::default()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(namespace_named(
            spec.operator_namespace
                .as_deref()
                .unwrap_or(operator_namespace),
        )),
        ..NetworkPolicyPeer::default()
    };
    let mut ingress = vec![
        NetworkPolicyIngressRule {
            from: Some(vec![own_pods.clone()]),
            ports: Some(vec![port("peer")]),
        },
        NetworkPolicyIngressRule {
            from: Some(vec![own_pods, clients, operator.clone()]),
            ports: Some(vec![port("http")]),
        },
    ];
    if dc.spec.tls.enabled() {
        // Under TLS the operator reads progress on the plain probe port
        // (the kubelet's probes come from the node and are not policed).
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![operator]),
            ports: Some(vec![port("probe")]),
        });
    }
    let monitoring = &dc.spec.monitoring;
    if monitoring.service_monitor.enabled {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(
                    monitoring
                        .prometheus_namespace_selector
                        .clone()
                        .unwrap_or_else(|| namespace_named(DEFAULT_PROMETHEUS_NAMESPACE)),
                ),
                pod_selector: monitoring.prometheus_pod_selector.clone(),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![port("http")]),
        });
    }
    Some(NetworkPolicy {
        metadata: child_meta(dc, dc.name_any(), "cache-node"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(dc)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn peers_only_from_own_pods_clients_from_selected_namespaces() {
        assert!(network_policy(&cache("{}"), "ops").is_none());
        let np = network_policy(&cache("{networkPolicy: {enabled: true}}"), "ops").unwrap();
        assert_owned(&np.metadata, "orders");
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"],
            "orders"
        );
        let rules = spec.ingress.unwrap();
        let peer = &rules[0];
        assert_eq!(
            peer.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::String("peer".into()))
        );
        let from = peer.from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        assert!(
            from[0].namespace_selector.is_none(),
            "own pods, own namespace only"
        );
        let client = &rules[1];
        assert_eq!(
            client.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::String("http".into()))
        );
        let ns = |peer: &NetworkPolicyPeer| {
            peer.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"]
                .clone()
        };
        let from = client.from.as_ref().unwrap();
        assert_eq!(
            ns(&from[1]),
            "shop",
            "by default, clients from the cache's namespace"
        );
        assert_eq!(ns(&from[2]), "ops", "and the operator's own namespace");

        let selected = network_policy(
            &cache(
                "{networkPolicy: {enabled: true, operatorNamespace: elsewhere, clientNamespaceSelector: {matchLabels: {team: web}}, clientPodSelector: {matchLabels: {role: api}}}}",
            ),
            "ops",
        )
        .unwrap();
        let rules = selected.spec.unwrap().ingress.unwrap();
        assert_eq!(
            ns(&rules[1].from.as_ref().unwrap()[2]),
            "elsewhere",
            "the spec overrides the operator's namespace"
        );
        let clients = &rules[1].from.as_ref().unwrap()[1];
        assert_eq!(
            clients
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["team"],
            "web"
        );
        assert_eq!(
            clients
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["role"],
            "api"
        );
    }

    #[test]
    fn prometheus_is_admitted_to_the_metrics_port_when_monitoring_is_on() {
        let rules = |yaml: &str| {
            network_policy(&cache(yaml), "ops")
                .unwrap()
                .spec
                .unwrap()
                .ingress
                .unwrap()
        };
        assert_eq!(rules("{networkPolicy: {enabled: true}}").len(), 2);
        let on = rules(
            "{networkPolicy: {enabled: true}, monitoring: {serviceMonitor: {enabled: true}}}",
        );
        assert_eq!(on.len(), 3);
        let scrape = &on[2];
        assert_eq!(
            scrape.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::String("http".into()))
        );
        let from = &scrape.from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            DEFAULT_PROMETHEUS_NAMESPACE
        );
        let chosen = rules(
            "{networkPolicy: {enabled: true}, monitoring: {serviceMonitor: {enabled: true}, \
              prometheusNamespaceSelector: {matchLabels: {team: obs}}, \
              prometheusPodSelector: {matchLabels: {app: prometheus}}}}",
        );
        let from = &chosen[2].from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["team"],
            "obs"
        );
        assert_eq!(
            from.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app"],
            "prometheus"
        );
    }
}

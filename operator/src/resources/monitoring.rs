//! The prometheus-operator ServiceMonitor for the node pods. Its type is not
//! in k8s-openapi (it is a CRD of another project), so it is built as a
//! dynamic object; the controller only applies it when the
//! `monitoring.coreos.com` API is served.

use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{child_meta, selector_labels};
use crate::crd::DistroCache;

pub(crate) const SERVICE_MONITOR_GROUP: &str = "monitoring.coreos.com";

pub(crate) fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(SERVICE_MONITOR_GROUP, "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// `None` unless the spec asks for one.
pub(crate) fn service_monitor(dc: &DistroCache) -> Option<DynamicObject> {
    let spec = &dc.spec.monitoring.service_monitor;
    if !spec.enabled {
        return None;
    }
    let mut meta = child_meta(dc, dc.name_any(), "monitoring");
    if let Some(extra) = &spec.labels {
        let labels = meta.labels.get_or_insert_default();
        for (k, v) in extra {
            labels.insert(k.clone(), v.clone());
        }
    }
    let mut selector = selector_labels(dc);
    selector.insert("app.kubernetes.io/component".into(), "client".into());
    let mut endpoint = json!({"port": "http", "path": "/metrics"});
    if dc.spec.tls.enabled() {
        // /metrics on the client port is HTTPS: verified against the CA
        // of the client certificate's Secret, by the client Service's name.
        endpoint["scheme"] = json!("https");
        endpoint["tlsConfig"] = json!({
            "ca": {"secret": {"name": super::client_tls_secret_name(dc), "key": "ca.crt"}},
            "serverName": format!("{}.{}.svc", dc.name_any(), dc.namespace().unwrap_or_default()),
        });
        // Nodes that ask for a client certificate get the one named.
        if let Some(secret) = &spec.client_cert_secret_name {
            endpoint["tlsConfig"]["cert"] = json!({"secret": {"name": secret, "key": "tls.crt"}});
            endpoint["tlsConfig"]["keySecret"] = json!({"name": secret, "key": "tls.key"});
        }
    }
    if let Some(interval) = &spec.interval {
        endpoint["interval"] = json!(interval);
    }
    let mut object = DynamicObject::new(&dc.name_any(), &service_monitor_resource()).data(json!({
        "spec": {
            "selector": {"matchLabels": selector},
            "namespaceSelector": {"matchNames": [dc.namespace()]},
            "endpoints": [endpoint],
        }
    }));
    object.metadata = meta;
    Some(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::client_service;
    use crate::resources::test_support::{assert_owned, cache};

    #[test]
    fn selects_the_client_service_metrics_port() {
        assert!(service_monitor(&cache("{}")).is_none());
        let dc = cache(
            "{monitoring: {serviceMonitor: {enabled: true, interval: 15s, labels: {release: prom}}}}",
        );
        let sm = service_monitor(&dc).unwrap();
        assert_owned(&sm.metadata, "orders");
        assert_eq!(sm.metadata.labels.as_ref().unwrap()["release"], "prom");
        let value = serde_json::to_value(&sm).unwrap();
        assert_eq!(value["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(value["kind"], "ServiceMonitor");
        let endpoint = &value["spec"]["endpoints"][0];
        assert_eq!(
            (endpoint["port"].as_str(), endpoint["path"].as_str()),
            (Some("http"), Some("/metrics"))
        );
        assert_eq!(endpoint["interval"], "15s");
        // The selector matches the client Service, and only it.
        let svc = client_service(&dc);
        let svc_labels = svc.metadata.labels.unwrap();
        for (k, v) in value["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(svc_labels.get(k).map(String::as_str), v.as_str(), "{k}");
        }
        assert_eq!(
            svc.spec.unwrap().ports.unwrap()[0].name.as_deref(),
            Some("http")
        );
    }

    #[test]
    fn with_tls_the_scrape_is_https_verified_against_the_secrets_ca() {
        let sm = service_monitor(&cache(
            "{monitoring: {serviceMonitor: {enabled: true}}, tls: {secretName: orders-cert}}",
        ))
        .unwrap();
        let endpoint = &sm.data["spec"]["endpoints"][0];
        assert_eq!(endpoint["scheme"], "https");
        assert_eq!(endpoint["tlsConfig"]["ca"]["secret"]["name"], "orders-cert");
        assert_eq!(endpoint["tlsConfig"]["ca"]["secret"]["key"], "ca.crt");
        assert_eq!(endpoint["tlsConfig"]["serverName"], "orders.shop.svc");
        assert!(endpoint["tlsConfig"].get("cert").is_none());
        let plain =
            service_monitor(&cache("{monitoring: {serviceMonitor: {enabled: true}}}")).unwrap();
        assert!(plain.data["spec"]["endpoints"][0].get("scheme").is_none());
    }

    #[test]
    fn nodes_asking_for_client_certificates_get_prometheus_one() {
        let sm = service_monitor(&cache(
            "{monitoring: {serviceMonitor: {enabled: true, clientCertSecretName: prom-client}}, \
              tls: {secretName: orders-cert, clientCaSecretName: clients}}",
        ))
        .unwrap();
        let tls = &sm.data["spec"]["endpoints"][0]["tlsConfig"];
        assert_eq!(
            tls["cert"],
            json!({"secret": {"name": "prom-client", "key": "tls.crt"}})
        );
        assert_eq!(
            tls["keySecret"],
            json!({"name": "prom-client", "key": "tls.key"})
        );
        assert_eq!(tls["ca"]["secret"]["name"], "orders-cert");
    }
}

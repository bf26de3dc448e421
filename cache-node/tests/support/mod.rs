//! Test support for the HTTP API tests: a real cache node (a [`NodeProc`]
//! on 127.0.0.1 and a port the kernel chose) and a JSON client for it. The
//! node is killed when the handle is dropped.

#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::Value;

use crate::node_proc::NodeProc;

pub struct TestNode {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub node: NodeProc,
}

impl TestNode {
    /// Starts a node with the given extra flags.
    pub async fn start(flags: &[&str]) -> Self {
        let node = NodeProc::start(flags);
        Self {
            addr: node.addr,
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
            node,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn set(&self, key: &str, body: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(&format!("/api/v1/cache/{key}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        read(resp).await
    }

    pub async fn get(&self, key: &str) -> (u16, Value) {
        read(
            self.client
                .get(self.url(&format!("/api/v1/cache/{key}")))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn delete(&self, key: &str) -> (u16, Value) {
        read(
            self.client
                .delete(self.url(&format!("/api/v1/cache/{key}")))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        read(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        read(self.client.post(self.url(path)).send().await.unwrap()).await
    }
}

/// Status and JSON body; panics if the body is not JSON, since every answer
/// of the API (errors included) must be.
pub async fn read(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    assert!(
        content_type.starts_with("application/json"),
        "status {status}: content type {content_type:?} for {text}"
    );
    (status, body)
}

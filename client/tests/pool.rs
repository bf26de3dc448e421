//! The client's keep-alive connections against real cache-node processes on
//! loopback: connections are reused, one the node closed while it sat idle
//! is replaced without failing the request (a write included: it never left,
//! so it is not "uncertain"), many requests at once each get their own
//! answer, and a node that is gone is reported unreachable. (Linux: the
//! first test reads the kernel's TCP table.)

#[path = "../../cache-node/tests/node_proc/mod.rs"]
mod node_proc;

use std::time::Duration;

use distrocache_client::{Client, Error};
use node_proc::NodeProc;

async fn client_of(node: &NodeProc) -> Client {
    Client::builder([node.addr.to_string()])
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the client learns the ring")
}

/// The loopback TCP connections to `port` from this side, by state, from
/// the kernel's table: (established, in TIME_WAIT). A client that closed a
/// connection leaves it in TIME_WAIT for a minute, so a count of zero means
/// none was closed.
fn connections_to(port: u16) -> (usize, usize) {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let mut established = 0;
    let mut time_wait = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let remote_port = fields[2].rsplit(':').next().unwrap();
        if u16::from_str_radix(remote_port, 16).unwrap() != port {
            continue;
        }
        match fields[3] {
            "01" => established += 1,
            "06" => time_wait += 1,
            _ => {}
        }
    }
    (established, time_wait)
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let node = NodeProc::start(&[]);
    let client = client_of(&node).await;
    for i in 0..50 {
        let body = format!(r#"{{"value":{i}}}"#);
        client.set_raw(&format!("k{i}"), body.into()).await.unwrap();
        let got = client.get(&format!("k{i}")).await.unwrap().unwrap();
        assert_eq!(got.value, serde_json::json!(i));
    }
    // Learning the ring and 100 requests, one after another: one
    // connection, never closed.
    assert_eq!(connections_to(node.addr.port()), (1, 0));
}

#[tokio::test]
async fn a_connection_the_node_closed_while_idle_is_replaced() {
    let node = NodeProc::start(&["--idle-timeout", "300ms"]);
    let client = client_of(&node).await;
    client
        .set_raw("before", r#"{"value":1}"#.into())
        .await
        .unwrap();
    // The node closes the connection that now sits idle in the pool.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A write on it would never leave: it goes on a new connection and
    // succeeds, rather than failing as "may have been applied".
    client
        .set_raw("after", r#"{"value":2}"#.into())
        .await
        .expect("a write after the idle close");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = client
        .get("after")
        .await
        .expect("a read after the idle close");
    assert_eq!(got.unwrap().value, serde_json::json!(2));
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let node = NodeProc::start(&[]);
    let client = client_of(&node).await;
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                for round in 0..20 {
                    let key = format!("t{t}");
                    let value = t * 1000 + round;
                    client
                        .set_raw(&key, format!(r#"{{"value":{value}}}"#).into())
                        .await
                        .unwrap();
                    let got = client.get(&key).await.unwrap().unwrap();
                    assert_eq!(got.key, key);
                    assert_eq!(got.value, serde_json::json!(value));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a task panicked");
    }
}

#[tokio::test]
async fn a_node_that_is_gone_is_unreachable_and_a_write_to_it_never_left() {
    let node = NodeProc::start(&[]);
    let client = client_of(&node).await;
    client.set_raw("k", r#"{"value":1}"#.into()).await.unwrap();
    node.kill();
    match client.get("k").await {
        Err(Error::Unreachable(_)) => {}
        other => panic!("a read from a node that is gone: {other:?}"),
    }
    match client.set_raw("k", r#"{"value":2}"#.into()).await {
        Err(Error::Unreachable(_)) => {}
        other => panic!("a write to a node that is gone: {other:?}"),
    }
}

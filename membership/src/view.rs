//! What a node says about the ring it holds, on `GET /api/v1/cluster`
//! ([`CLUSTER_PATH`]): the node serializes [`ClusterView`], ring-aware
//! clients and the CLI read the same type, so neither side can drift from
//! the other (the test below pins the JSON).

use serde::{Deserialize, Serialize};

use crate::{Hashing, MemberState};

/// Where a node answers with its [`ClusterView`]; with `?key=` it names the
/// key's owners too.
pub const CLUSTER_PATH: &str = "/api/v1/cluster";

/// Whether the node runs alone or as a member of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Single,
    Cluster,
}

/// `/api/v1/cluster`: the ring as one node holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub node_id: String,
    pub mode: Mode,
    /// 0 while a cluster node has no ring yet, and for a single node.
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashing: Option<Hashing>,
    /// The node's own state in its ring, if it is a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_state: Option<MemberState>,
    pub members: Vec<MemberView>,
    /// The ring the node still serves from while data moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_epoch: Option<u64>,
    /// No data is moving: every member has synced the epoch, this node has
    /// forgotten the previous ring and dropped the keys it no longer owns.
    pub settled: bool,
    pub ready: bool,
    /// This node may serve reads of the keys it holds as a replica.
    pub read_lease: bool,
    /// With `?key=`: that key's owners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owners: Option<KeyOwners>,
}

/// One member of the ring, as a node describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    pub id: String,
    /// The peer API's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where clients reach the member (ring-aware clients send here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    pub state: MemberState,
}

/// A key's owners, primary first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyOwners {
    pub key: String,
    pub primary: Option<String>,
    pub owners: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_view_round_trips_in_the_json_nodes_answer() {
        let view = ClusterView {
            node_id: "cache-0".into(),
            mode: Mode::Cluster,
            epoch: 4,
            replication_factor: Some(2),
            hashing: Some(Hashing::default()),
            member_state: Some(MemberState::Active),
            members: vec![MemberView {
                id: "cache-0".into(),
                address: Some("10.0.0.1:8081".into()),
                client_address: Some("10.0.0.1:8080".into()),
                state: MemberState::Active,
            }],
            previous_epoch: None,
            settled: true,
            ready: true,
            read_lease: true,
            owners: Some(KeyOwners {
                key: "k".into(),
                primary: Some("cache-0".into()),
                owners: vec!["cache-0".into()],
            }),
        };
        let json = serde_json::to_string(&view).unwrap();
        for field in [
            r#""nodeId":"cache-0""#,
            r#""mode":"cluster""#,
            r#""replicationFactor":2"#,
            r#""memberState":"active""#,
            r#""clientAddress":"10.0.0.1:8080""#,
            r#""readLease":true"#,
            r#""owners":{"key":"k","primary":"cache-0","owners":["cache-0"]}"#,
        ] {
            assert!(json.contains(field), "{field} in {json}");
        }
        assert!(!json.contains("previousEpoch"), "{json}");
        assert_eq!(serde_json::from_str::<ClusterView>(&json).unwrap(), view);
    }

    #[test]
    fn a_single_nodes_view_names_no_ring() {
        let json = r#"{"nodeId":"node","mode":"single","epoch":0,
            "members":[{"id":"node","state":"active"}],
            "settled":true,"ready":true,"readLease":true}"#;
        let view: ClusterView = serde_json::from_str(json).unwrap();
        assert_eq!(view.mode, Mode::Single);
        assert_eq!((view.replication_factor, view.hashing), (None, None));
        assert_eq!(view.members[0].address, None);
    }
}

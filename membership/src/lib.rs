//! The contracts between the cache nodes and what talks to them (the
//! operator, ring-aware clients, the CLI), as plain types.
//!
//! * [`MembershipDoc`]: the ring membership the operator writes to the
//!   ConfigMap `<name>-ring` under the key [`CONFIGMAP_KEY`] and every node
//!   watches (DESIGN 3.2). Nodes also exchange it among themselves when one
//!   holds an older epoch than a peer.
//! * [`NodeProgress`]: what a node reports about its data movement on
//!   [`PROGRESS_PATH`]; the operator reads it to decide when a joining
//!   member holds its data and when a leaving one has handed off.
//! * [`ClusterView`] ([`view`]): the ring as a node holds it, on
//!   [`CLUSTER_PATH`]; ring-aware clients learn the ring from it.
//!
//! * [`placement`]: which members own a key under a document, shared by
//!   the nodes and ring-aware clients so they place keys exactly alike.
//!
//! One crate defines them so the sides cannot drift: the operator,
//! `cache-node`, `distrocache-client` and the CLI all depend on it, and the
//! round-trip tests pin the JSON.

pub mod placement;
pub mod view;

pub use view::{CLUSTER_PATH, ClusterView, KeyOwners, MemberView, Mode};

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The ConfigMap key holding the JSON document.
pub const CONFIGMAP_KEY: &str = "ring.json";

/// Largest membership document a node accepts, in bytes. A ring of 1,000
/// members is ~100 KB; anything far beyond that is a mistake or an attack.
pub const MAX_DOC_BYTES: usize = 1024 * 1024;

/// Most members in one ring.
pub const MAX_MEMBERS: usize = 1024;

/// Longest member id (a pod name is at most 253 bytes).
pub const MAX_ID_BYTES: usize = 253;

/// Highest replication factor accepted.
pub const MAX_REPLICATION_FACTOR: u32 = 16;

/// The ring membership at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MembershipDoc {
    /// Increases on every change; a node ignores a document whose epoch is
    /// not newer than the one it holds.
    pub epoch: u64,
    /// How many distinct members hold each key (primary plus replicas).
    pub replication_factor: u32,
    /// How keys map to members.
    #[serde(default)]
    pub hashing: Hashing,
    /// The members, in any order (ownership never depends on it).
    pub members: Vec<Member>,
}

/// The placement algorithm and its parameters. Every node must use the same
/// one, which is why it travels in the document rather than in node flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Hashing {
    /// Highest random weight: a key's owners are the members with the highest
    /// hash of (key, member id). No parameters; balance and movement are as
    /// good as the hash.
    #[default]
    Rendezvous,
    /// A ring of `virtualNodes` points per member; a key's owners are the
    /// members of the next distinct points clockwise from the key's hash.
    #[serde(rename_all = "camelCase")]
    Consistent { virtual_nodes: u32 },
}

/// Most virtual nodes per member accepted for [`Hashing::Consistent`].
pub const MAX_VIRTUAL_NODES: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Member {
    /// Stable identity: the pod name. Placement hashes this, never the
    /// address, so a pod that restarts with a new IP keeps its keys.
    pub id: String,
    /// Where peers reach the member's API, `ip:port`.
    pub address: String,
    /// Where clients reach the member's client API, `ip:port`, when it is
    /// not `address` (the operator gives the peer API a port of its own).
    /// Ring-aware clients send each request here, straight to an owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    pub state: MemberState,
}

impl Member {
    /// Where clients reach this member: `clientAddress`, or `address` when
    /// the client and peer APIs share a port.
    pub fn client_address(&self) -> &str {
        self.client_address.as_deref().unwrap_or(&self.address)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Owns keys and receives them (writes and rebalancing), but does not
    /// serve reads until it holds its data and the operator marks it active.
    Joining,
    /// Owns keys and serves them.
    Active,
    /// Owns nothing any more: hands its data to the remaining owners, then
    /// reports completion so the operator can remove it.
    Leaving,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Leaving => "leaving",
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a membership document was refused.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("membership document is {0} bytes; the limit is {MAX_DOC_BYTES}")]
    TooLarge(usize),
    #[error("membership document is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid membership document: {0}")]
    Invalid(String),
}

impl MembershipDoc {
    /// Parses and validates a document (see [`Self::validate`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, DocError> {
        if bytes.len() > MAX_DOC_BYTES {
            return Err(DocError::TooLarge(bytes.len()));
        }
        let doc: MembershipDoc = serde_json::from_slice(bytes)?;
        doc.validate()?;
        Ok(doc)
    }

    /// The document as pretty JSON (what the operator writes to the ConfigMap).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the document always serialises")
    }

    /// Checks what serde cannot: bounds, unique ids, parseable addresses.
    pub fn validate(&self) -> Result<(), DocError> {
        let invalid = |m: String| Err(DocError::Invalid(m));
        if self.replication_factor == 0 || self.replication_factor > MAX_REPLICATION_FACTOR {
            return invalid(format!(
                "replicationFactor must be between 1 and {MAX_REPLICATION_FACTOR}, not {}",
                self.replication_factor
            ));
        }
        if let Hashing::Consistent { virtual_nodes } = self.hashing
            && (virtual_nodes == 0 || virtual_nodes > MAX_VIRTUAL_NODES)
        {
            return invalid(format!(
                "virtualNodes must be between 1 and {MAX_VIRTUAL_NODES}, not {virtual_nodes}"
            ));
        }
        if self.members.len() > MAX_MEMBERS {
            return invalid(format!(
                "{} members; the limit is {MAX_MEMBERS}",
                self.members.len()
            ));
        }
        let mut ids = HashSet::new();
        for m in &self.members {
            if m.id.is_empty() || m.id.len() > MAX_ID_BYTES {
                return invalid(format!(
                    "member id must be 1 to {MAX_ID_BYTES} bytes, not {:?}",
                    m.id
                ));
            }
            if !ids.insert(m.id.as_str()) {
                return invalid(format!("member id {:?} appears twice", m.id));
            }
            if m.address.parse::<SocketAddr>().is_err() {
                return invalid(format!(
                    "member {:?} has address {:?}, which is not ip:port",
                    m.id, m.address
                ));
            }
            if let Some(client) = &m.client_address
                && client.parse::<SocketAddr>().is_err()
            {
                return invalid(format!(
                    "member {:?} has clientAddress {:?}, which is not ip:port",
                    m.id, client
                ));
            }
        }
        Ok(())
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// Where a node answers with its [`NodeProgress`].
pub const PROGRESS_PATH: &str = "/api/v1/cluster/rebalance";

/// A node's report on its data movement (`GET /api/v1/cluster/rebalance`).
///
/// A node *syncs* an epoch by moving what that epoch asks of it: a joining
/// or freshly started node pulls the keys it owns from the other members; an
/// active or leaving node pushes the keys that gained an owner to that owner.
/// An epoch is settled once every member reports `syncedEpoch >= epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeProgress {
    pub node_id: String,
    /// The ring epoch the node holds (0: no ring yet).
    pub epoch: u64,
    /// The latest epoch whose data movement this node has finished.
    pub synced_epoch: u64,
    /// The node's own state in its ring, if it is a member.
    pub member_state: Option<MemberState>,
    pub phase: SyncPhase,
    /// A leaving member has pushed everything it holds to the new owners.
    pub handoff_complete: bool,
    /// The node may receive client traffic (its readiness probe).
    pub ready: bool,
    /// Items held right now.
    pub items: u64,
    /// Keys sent to and received from peers by rebalancing, since start.
    pub keys_sent: u64,
    pub keys_received: u64,
    /// How long the last completed sync took.
    pub last_sync_seconds: f64,
    /// The last backup this node uploaded or failed to (with `--backup-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupReport>,
}

/// A node's last backup upload (`lastBackup` of [`NodeProgress`]): the
/// operator reports the scheduled ones in the cache's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    /// The backup id; scheduled backups are `scheduled-<unix seconds>` of
    /// their slot, the same on every node.
    pub id: String,
    /// Where the node's snapshot went (`s3://bucket/prefix/id/node.dcs`).
    pub object: String,
    pub items: u64,
    pub bytes: u64,
    /// When the upload started and ended (Unix seconds).
    #[serde(default)]
    pub started_at: u64,
    pub finished_at: u64,
    /// Why it failed; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPhase {
    /// Nothing to move for the epoch it holds.
    Idle,
    /// Pulling the keys it owns from the other members.
    Pulling,
    /// Pushing keys to members that gained them.
    Pushing,
}

impl SyncPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPhase::Idle => "idle",
            SyncPhase::Pulling => "pulling",
            SyncPhase::Pushing => "pushing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> MembershipDoc {
        MembershipDoc {
            epoch: 7,
            replication_factor: 2,
            hashing: Hashing::Consistent { virtual_nodes: 160 },
            members: vec![
                Member {
                    id: "cache-0".into(),
                    address: "10.0.0.5:8081".into(),
                    client_address: Some("10.0.0.5:8080".into()),
                    state: MemberState::Active,
                },
                Member {
                    id: "cache-1".into(),
                    address: "[fd00::1]:8080".into(),
                    client_address: None,
                    state: MemberState::Joining,
                },
            ],
        }
    }

    #[test]
    fn round_trips_through_the_configmap_json() {
        let d = doc();
        let json = d.to_json();
        assert_eq!(MembershipDoc::from_json(json.as_bytes()).unwrap(), d);
        let rendezvous = MembershipDoc {
            hashing: Hashing::Rendezvous,
            ..doc()
        };
        let json = rendezvous.to_json();
        assert_eq!(
            MembershipDoc::from_json(json.as_bytes()).unwrap(),
            rendezvous
        );
    }

    #[test]
    fn the_json_shape_is_pinned() {
        let v: serde_json::Value = serde_json::from_str(&doc().to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "epoch": 7,
                "replicationFactor": 2,
                "hashing": {"algorithm": "consistent", "virtualNodes": 160},
                "members": [
                    {"id": "cache-0", "address": "10.0.0.5:8081", "clientAddress": "10.0.0.5:8080", "state": "active"},
                    {"id": "cache-1", "address": "[fd00::1]:8080", "state": "joining"}
                ]
            })
        );
        let minimal = r#"{"epoch": 1, "replicationFactor": 1, "members": []}"#;
        let d = MembershipDoc::from_json(minimal.as_bytes()).unwrap();
        assert_eq!(d.hashing, Hashing::Rendezvous);
        let d = doc();
        assert_eq!(d.members[0].client_address(), "10.0.0.5:8080");
        assert_eq!(d.members[1].client_address(), "[fd00::1]:8080");
    }

    #[test]
    fn refuses_invalid_documents() {
        let bad = |f: &dyn Fn(&mut MembershipDoc)| {
            let mut d = doc();
            f(&mut d);
            MembershipDoc::from_json(d.to_json().as_bytes()).unwrap_err()
        };
        bad(&|d| d.replication_factor = 0);
        bad(&|d| d.replication_factor = MAX_REPLICATION_FACTOR + 1);
        bad(&|d| d.hashing = Hashing::Consistent { virtual_nodes: 0 });
        bad(&|d| d.members[1].id = "cache-0".into());
        bad(&|d| d.members[0].id = String::new());
        bad(&|d| d.members[0].address = "cache-0:8080".into());
        bad(&|d| d.members[0].address = "10.0.0.5".into());
        bad(&|d| d.members[0].client_address = Some("cache-0:8080".into()));
        for text in [
            "",
            "{}",
            r#"{"epoch": -1, "replicationFactor": 1, "members": []}"#,
            r#"{"epoch": 1, "replicationFactor": 1, "members": [], "extra": 1}"#,
            r#"{"epoch": 1, "replicationFactor": 1, "members": [{"id": "a", "address": "1.2.3.4:1", "state": "gone"}]}"#,
            r#"{"epoch": 1, "replicationFactor": 1, "hashing": {"algorithm": "modulo"}, "members": []}"#,
        ] {
            assert!(MembershipDoc::from_json(text.as_bytes()).is_err(), "{text}");
        }
        let huge = vec![b' '; MAX_DOC_BYTES + 1];
        assert!(matches!(
            MembershipDoc::from_json(&huge),
            Err(DocError::TooLarge(_))
        ));
    }

    #[test]
    fn progress_round_trips() {
        let p = NodeProgress {
            node_id: "cache-2".into(),
            epoch: 9,
            synced_epoch: 8,
            member_state: Some(MemberState::Leaving),
            phase: SyncPhase::Pushing,
            handoff_complete: false,
            ready: true,
            items: 10,
            keys_sent: 5,
            keys_received: 0,
            last_sync_seconds: 0.25,
            last_backup: Some(BackupReport {
                id: "scheduled-1764720000".into(),
                object: "s3://backups/cache/scheduled-1764720000/cache-2.dcs".into(),
                items: 10,
                bytes: 2048,
                started_at: 1764720000,
                finished_at: 1764720003,
                error: None,
            }),
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""syncedEpoch":8"#), "{json}");
        assert!(
            json.contains(r#""lastBackup":{"id":"scheduled-1764720000""#),
            "{json}"
        );
        assert!(json.contains(r#""finishedAt":1764720003"#), "{json}");
        assert!(
            !json.contains("error"),
            "no error field when it succeeded: {json}"
        );
        assert!(json.contains(r#""memberState":"leaving""#), "{json}");
        assert_eq!(serde_json::from_str::<NodeProgress>(&json).unwrap(), p);
    }
}

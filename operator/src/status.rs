//! The DistroCache status: built from what a reconcile observed and decided,
//! so it tells the truth (Ready with no running pods is impossible by
//! construction). Conditions keep their `lastTransitionTime` while their
//! status does not change.

use distrocache_membership::{MemberState, MembershipDoc, NodeProgress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::collections::BTreeMap;

use crate::crd::{DistroCacheStatus, MemberStatus};
use crate::scaling::{PodView, Step};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const REBALANCING: &str = "Rebalancing";
pub const SERVICE_MONITOR: &str = "ServiceMonitor";

/// What the status is built from.
pub struct Facts<'a> {
    pub generation: Option<i64>,
    pub desired_replicas: i32,
    pub selector: String,
    pub ring: Option<&'a MembershipDoc>,
    pub pods: &'a BTreeMap<String, PodView>,
    pub progress: &'a BTreeMap<String, NodeProgress>,
    pub step: &'a Step,
    /// Why the spec cannot be acted on, if it cannot.
    pub invalid_spec: Option<&'a str>,
    /// `Some(Ok)` the ServiceMonitor was applied, `Some(Err(why))` it was
    /// asked for but skipped, `None` not asked for.
    pub service_monitor: Option<Result<(), String>>,
}

pub fn build(facts: &Facts<'_>, previous: Option<&DistroCacheStatus>) -> DistroCacheStatus {
    let ready_replicas = facts.pods.values().filter(|p| p.ready).count() as i32;
    let members: Vec<MemberStatus> = facts
        .ring
        .map(|doc| {
            doc.members
                .iter()
                .map(|m| MemberStatus {
                    pod: m.id.clone(),
                    address: m.address.clone(),
                    state: m.state.to_string(),
                    items: facts.progress.get(&m.id).map(|p| p.items as i64),
                    ready: facts.pods.get(&m.id).is_some_and(|p| p.ready),
                })
                .collect()
        })
        .unwrap_or_default();
    let epoch = facts.ring.map_or(0, |d| d.epoch);
    let settled = facts.ring.is_some_and(|doc| {
        doc.members.iter().all(|m| {
            facts
                .progress
                .get(&m.id)
                .is_some_and(|p| p.epoch == doc.epoch && p.synced_epoch >= doc.epoch)
        })
    });
    let all_active = facts.ring.is_some_and(|doc| {
        doc.members.len() as i32 == facts.desired_replicas
            && doc.members.iter().all(|m| m.state == MemberState::Active)
    });

    let mut conditions = Vec::new();
    let previous = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut set = |type_: &str, status: bool, reason: &str, message: String| {
        conditions.push(condition(
            previous,
            facts.generation,
            type_,
            status,
            reason,
            message,
        ));
    };

    if let Some(why) = facts.invalid_spec {
        set(READY, false, "InvalidSpec", why.to_owned());
        set(
            PROGRESSING,
            false,
            "InvalidSpec",
            "fix the spec to continue".into(),
        );
        set(DEGRADED, true, "InvalidSpec", why.to_owned());
    } else {
        let ready = matches!(facts.step, Step::Steady)
            && settled
            && all_active
            && ready_replicas == facts.desired_replicas;
        let (reason, message) = if ready {
            (
                "AllMembersActive",
                format!(
                    "{} of {} nodes ready, ring epoch {epoch}",
                    ready_replicas, facts.desired_replicas
                ),
            )
        } else if ready_replicas < facts.desired_replicas
            && matches!(facts.step, Step::Steady | Step::Waiting(_))
        {
            (
                "NodesNotReady",
                format!(
                    "{} of {} nodes ready",
                    ready_replicas, facts.desired_replicas
                ),
            )
        } else {
            (step_reason(facts.step), step_message(facts.step))
        };
        set(READY, ready, reason, message);
        let progressing = !matches!(facts.step, Step::Steady);
        set(
            PROGRESSING,
            progressing,
            if progressing {
                step_reason(facts.step)
            } else {
                "Steady"
            },
            if progressing {
                step_message(facts.step)
            } else {
                "the ring matches the spec".into()
            },
        );
        let missing = facts.desired_replicas - ready_replicas;
        let degraded = matches!(facts.step, Step::Steady) && missing > 0;
        set(
            DEGRADED,
            degraded,
            if degraded {
                "NodesNotReady"
            } else {
                "AsExpected"
            },
            if degraded {
                format!("{missing} node(s) not ready")
            } else {
                "no known problem".into()
            },
        );
    }
    let rebalancing = facts.ring.is_some() && !settled;
    set(
        REBALANCING,
        rebalancing,
        if rebalancing { "MovingData" } else { "Settled" },
        if rebalancing {
            format!("members are still moving data for ring epoch {epoch}")
        } else {
            format!("every member has synced ring epoch {epoch}")
        },
    );
    match &facts.service_monitor {
        Some(Ok(())) => set(
            SERVICE_MONITOR,
            true,
            "Applied",
            "the ServiceMonitor is in place".into(),
        ),
        Some(Err(why)) => set(SERVICE_MONITOR, false, "Skipped", why.clone()),
        None => {}
    }

    DistroCacheStatus {
        observed_generation: facts.generation,
        replicas: facts.pods.len() as i32,
        ready_replicas,
        ring_epoch: epoch as i64,
        members,
        conditions,
        selector: facts.selector.clone(),
    }
}

pub fn step_reason(step: &Step) -> &'static str {
    match step {
        Step::Steady => "Steady",
        Step::Waiting(_) => "Waiting",
        Step::Bootstrap(_) => "RingCreated",
        Step::Recovered => "RingRecovered",
        Step::AddressesUpdated(_) => "AddressesUpdated",
        Step::Joining(_) => "MembersJoining",
        Step::Activated(_) => "MembersActive",
        Step::Leaving(_) => "MembersLeaving",
        Step::Removed(_) => "MembersRemoved",
        Step::ReplicationFactorChanged { .. } => "ReplicationFactorChanged",
    }
}

pub fn step_message(step: &Step) -> String {
    match step {
        Step::Steady => "the ring matches the spec".into(),
        Step::Waiting(why) => why.clone(),
        Step::Bootstrap(ids) => format!("created the ring with {}", ids.join(", ")),
        Step::Recovered => "the ring ConfigMap was lost; wrote it again under a new epoch".into(),
        Step::AddressesUpdated(ids) => format!("new pod addresses for {}", ids.join(", ")),
        Step::Joining(ids) => format!("adding {} as joining; they pull their keys", ids.join(", ")),
        Step::Activated(ids) => format!("{} hold their data and serve now", ids.join(", ")),
        Step::Leaving(ids) => format!("{} are leaving and hand their data off", ids.join(", ")),
        Step::Removed(ids) => format!(
            "{} handed off and left the ring; removing their pods",
            ids.join(", ")
        ),
        Step::ReplicationFactorChanged { from, to } => {
            format!("replication factor {from} -> {to}; members move data")
        }
    }
}

fn condition(
    previous: &[Condition],
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use distrocache_membership::{Hashing, Member, SyncPhase};

    use super::*;

    fn doc(states: &[MemberState]) -> MembershipDoc {
        MembershipDoc {
            epoch: 3,
            replication_factor: 2,
            hashing: Hashing::Rendezvous,
            members: states
                .iter()
                .enumerate()
                .map(|(i, &state)| Member {
                    id: format!("c-{i}"),
                    address: format!("10.0.0.{i}:8080"),
                    state,
                })
                .collect(),
        }
    }

    fn progress(n: usize, synced: u64) -> BTreeMap<String, NodeProgress> {
        (0..n)
            .map(|i| {
                (
                    format!("c-{i}"),
                    NodeProgress {
                        node_id: format!("c-{i}"),
                        epoch: 3,
                        synced_epoch: synced,
                        member_state: Some(MemberState::Active),
                        phase: SyncPhase::Idle,
                        handoff_complete: false,
                        ready: true,
                        items: 7,
                        keys_sent: 0,
                        keys_received: 0,
                        last_sync_seconds: 0.0,
                    },
                )
            })
            .collect()
    }

    fn pods(ready: &[bool]) -> BTreeMap<String, PodView> {
        ready
            .iter()
            .enumerate()
            .map(|(i, &ready)| {
                (
                    format!("c-{i}"),
                    PodView {
                        ordinal: i as i32,
                        address: Some(format!("10.0.0.{i}:8080")),
                        client: Some(format!("10.0.0.{i}:8080")),
                        ready,
                    },
                )
            })
            .collect()
    }

    fn get<'a>(s: &'a DistroCacheStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn facts<'a>(
        ring: Option<&'a MembershipDoc>,
        pods: &'a BTreeMap<String, PodView>,
        progress: &'a BTreeMap<String, NodeProgress>,
        step: &'a Step,
    ) -> Facts<'a> {
        Facts {
            generation: Some(2),
            desired_replicas: 3,
            selector: "a=b".into(),
            ring,
            pods,
            progress,
            step,
            invalid_spec: None,
            service_monitor: None,
        }
    }

    #[test]
    fn ready_only_when_steady_settled_and_every_pod_ready() {
        let ring = doc(&[MemberState::Active; 3]);
        let (all, prog) = (pods(&[true, true, true]), progress(3, 3));
        let s = build(&facts(Some(&ring), &all, &prog, &Step::Steady), None);
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, DEGRADED).status, "False");
        assert_eq!(get(&s, REBALANCING).status, "False");
        assert_eq!((s.replicas, s.ready_replicas, s.ring_epoch), (3, 3, 3));
        assert_eq!(s.members[0].items, Some(7));

        let one_down = pods(&[true, false, true]);
        let s = build(&facts(Some(&ring), &one_down, &prog, &Step::Steady), None);
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, DEGRADED).status, "True");

        let unsynced = progress(3, 2);
        let s = build(&facts(Some(&ring), &all, &unsynced, &Step::Steady), None);
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, REBALANCING).status, "True");

        let (no_pods, no_progress) = (BTreeMap::new(), BTreeMap::new());
        let s = build(
            &facts(None, &no_pods, &no_progress, &Step::Waiting("pods".into())),
            None,
        );
        assert_eq!(get(&s, READY).status, "False", "no pods, never ready");
    }

    #[test]
    fn transitions_keep_their_time_until_the_status_flips() {
        let ring = doc(&[MemberState::Active; 3]);
        let (all, prog) = (pods(&[true, true, true]), progress(3, 3));
        let mut first = build(&facts(Some(&ring), &all, &prog, &Step::Steady), None);
        let old = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        for c in &mut first.conditions {
            c.last_transition_time = old.clone();
        }
        let again = build(
            &facts(Some(&ring), &all, &prog, &Step::Steady),
            Some(&first),
        );
        assert_eq!(get(&again, READY).last_transition_time, old);
        let step = Step::Leaving(vec!["c-2".into()]);
        let flipped = build(&facts(Some(&ring), &all, &prog, &step), Some(&first));
        assert_ne!(get(&flipped, READY).last_transition_time, old);
        assert_eq!(get(&flipped, PROGRESSING).reason, "MembersLeaving");
    }

    #[test]
    fn an_invalid_spec_is_degraded_and_says_why() {
        let (no_pods, no_progress) = (BTreeMap::new(), BTreeMap::new());
        let mut f = facts(None, &no_pods, &no_progress, &Step::Steady);
        f.invalid_spec = Some("spec.defaultTTL must be longer than zero");
        f.service_monitor = Some(Err("the ServiceMonitor CRD is not installed".into()));
        let s = build(&f, None);
        assert_eq!(get(&s, DEGRADED).status, "True");
        assert_eq!(get(&s, DEGRADED).reason, "InvalidSpec");
        assert!(get(&s, READY).message.contains("defaultTTL"));
        assert_eq!(get(&s, SERVICE_MONITOR).status, "False");
    }
}

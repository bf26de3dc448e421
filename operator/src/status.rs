//! The DistroCache status: built from what a reconcile observed and decided,
//! so it tells the truth (Ready with no running pods is impossible by
//! construction). Conditions keep their `lastTransitionTime` while their
//! status does not change.

use distrocache_membership::{BackupReport, MemberState, MembershipDoc, NodeProgress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::collections::BTreeMap;

use crate::crd::{BackupStatus, DistroCacheStatus, MemberStatus, NodeBackupStatus};
use crate::scaling::{PodView, Step};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const REBALANCING: &str = "Rebalancing";
pub const SERVICE_MONITOR: &str = "ServiceMonitor";
/// Whether the cert-manager Certificates of `spec.tls.certManager` exist.
pub const TLS_CERTIFICATES: &str = "TLSCertificates";

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
    /// `None` when the spec asks for no ServiceMonitor.
    pub service_monitor: Option<ServiceMonitorOutcome>,
    /// What became of the cert-manager Certificates; `None` when
    /// `spec.tls.certManager` is unset.
    pub certificates: Option<ServiceMonitorOutcome>,
}

/// What became of a ServiceMonitor the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMonitorOutcome {
    Applied,
    /// Not applied; `reason` is the condition's (`CRDNotInstalled` only when
    /// the API server really does not serve the kind).
    Skipped {
        reason: &'static str,
        message: String,
    },
}

pub fn build(facts: &Facts<'_>, previous: Option<&DistroCacheStatus>) -> DistroCacheStatus {
    let previous_backup = previous.and_then(|s| s.last_backup.as_ref());
    let pod_ready = |id: &str| facts.pods.get(id).is_some_and(|p| p.ready);
    // Ready members, not ready pods: a pod outside the ring serves no keys.
    let ready_replicas = facts.ring.map_or(0, |doc| {
        doc.members.iter().filter(|m| pod_ready(&m.id)).count()
    }) as i32;
    // Members expected to serve that do not. A joining member is not ready
    // until it holds its data, which is progress, not a fault.
    let down: Vec<&str> = facts
        .ring
        .iter()
        .flat_map(|doc| doc.members.iter())
        .filter(|m| m.state != MemberState::Joining && !pod_ready(&m.id))
        .map(|m| m.id.as_str())
        .collect();
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
                    ready: pod_ready(&m.id),
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
        let steady = matches!(facts.step, Step::Steady);
        // Ready with no node running would be a lie, whatever the spec asks.
        let ready = steady
            && settled
            && all_active
            && facts.desired_replicas > 0
            && ready_replicas == facts.desired_replicas;
        let (reason, message) = if ready {
            (
                "AllMembersActive",
                format!(
                    "{} of {} nodes ready, ring epoch {epoch}",
                    ready_replicas, facts.desired_replicas
                ),
            )
        } else if steady && facts.desired_replicas == 0 {
            (
                "ScaledToZero",
                "spec.replicas is 0: no cache node runs".to_owned(),
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
        // Whatever the step: a member down in the middle of a scale is
        // still a member down.
        match facts.step {
            Step::RingLost(why) => set(DEGRADED, true, "RingLost", why.clone()),
            _ if !down.is_empty() => set(
                DEGRADED,
                true,
                "MembersNotReady",
                format!("ring members not ready: {}", down.join(", ")),
            ),
            _ => set(DEGRADED, false, "AsExpected", "no known problem".into()),
        }
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
    match &facts.certificates {
        Some(ServiceMonitorOutcome::Applied) => set(
            TLS_CERTIFICATES,
            true,
            "Applied",
            "the cert-manager Certificates are in place".into(),
        ),
        Some(ServiceMonitorOutcome::Skipped { reason, message }) => {
            set(TLS_CERTIFICATES, false, reason, message.clone())
        }
        None => {}
    }
    match &facts.service_monitor {
        Some(ServiceMonitorOutcome::Applied) => set(
            SERVICE_MONITOR,
            true,
            "Applied",
            "the ServiceMonitor is in place".into(),
        ),
        Some(ServiceMonitorOutcome::Skipped { reason, message }) => {
            set(SERVICE_MONITOR, false, reason, message.clone())
        }
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
        last_backup: last_backup(facts, previous_backup),
    }
}

/// The newest backup the ring's members report (`lastBackup` of their
/// progress), or the one the status already holds when none reports a
/// newer one (a restarted node forgets its last upload). A member's part
/// reported earlier for the same id is kept.
fn last_backup(facts: &Facts<'_>, previous: Option<&BackupStatus>) -> Option<BackupStatus> {
    let members: Vec<&str> = facts
        .ring
        .map(|doc| doc.members.iter().map(|m| m.id.as_str()).collect())
        .unwrap_or_default();
    let reports: Vec<(&str, &BackupReport)> = members
        .iter()
        .filter_map(|id| Some((*id, facts.progress.get(*id)?.last_backup.as_ref()?)))
        .collect();
    // Newest by finish time; ties (one slot, many nodes) by id.
    let newest = reports
        .iter()
        .max_by(|a, b| (a.1.finished_at, &a.1.id).cmp(&(b.1.finished_at, &b.1.id)))
        .map(|(_, r)| (r.id.clone(), r.finished_at));
    let previous_at = previous
        .and_then(|p| p.finished_at.as_deref())
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map_or(0, |t| t.as_second());
    let id = match (newest, previous) {
        // Members that restarted may report an older backup than the
        // status holds (or none): the status keeps the newer one.
        (Some((id, at)), Some(previous)) if id != previous.id && (at as i64) < previous_at => {
            return Some(previous.clone());
        }
        (Some((id, _)), _) => id,
        (None, Some(previous)) => return Some(previous.clone()),
        (None, None) => return None,
    };
    let mut nodes: BTreeMap<String, NodeBackupStatus> = previous
        .filter(|p| p.id == id)
        .map(|p| p.nodes.iter().map(|n| (n.pod.clone(), n.clone())).collect())
        .unwrap_or_default();
    let mut finished_at = None;
    let mut started_at: Option<u64> = None;
    for (pod, report) in reports.iter().filter(|(_, r)| r.id == id) {
        finished_at = finished_at.max(Some(report.finished_at));
        started_at = Some(started_at.map_or(report.started_at, |s| s.min(report.started_at)));
        nodes.insert(
            pod.to_string(),
            NodeBackupStatus {
                pod: pod.to_string(),
                object: report.object.clone(),
                items: report.items as i64,
                bytes: report.bytes as i64,
                error: report.error.clone(),
            },
        );
    }
    let phase = if nodes.values().any(|n| n.error.is_some()) {
        "Failed"
    } else if members.iter().all(|m| nodes.contains_key(*m)) {
        "Completed"
    } else {
        "Running"
    };
    // The latest part's time, parts kept from the previous status included.
    let kept_at = previous.filter(|p| p.id == id).map_or(0, |_| previous_at);
    let finished_at = finished_at
        .and_then(|secs| i64::try_from(secs).ok())
        .map(|secs| secs.max(kept_at))
        .and_then(|secs| k8s_openapi::jiff::Timestamp::from_second(secs).ok())
        .map(|t| t.to_string())
        .or_else(|| {
            previous
                .filter(|p| p.id == id)
                .and_then(|p| p.finished_at.clone())
        });
    let rfc3339 = |secs: u64| {
        i64::try_from(secs)
            .ok()
            .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
            .map(|t| t.to_string())
    };
    // The earliest part's start, parts kept from the previous status included.
    let kept_start = previous
        .filter(|p| p.id == id)
        .and_then(|p| p.started_at.clone());
    let started_at = match (started_at.and_then(rfc3339), kept_start) {
        (Some(now), Some(kept)) => Some(now.min(kept)),
        (now, kept) => now.or(kept),
    };
    Some(BackupStatus {
        id,
        phase: phase.into(),
        started_at,
        items: nodes.values().map(|n| n.items).sum(),
        bytes: nodes.values().map(|n| n.bytes).sum(),
        finished_at,
        nodes: nodes.into_values().collect(),
    })
}

/// The conditions after a failed reconcile: the previous ones, with
/// `Degraded` saying why. A reconcile that fails before it writes the status
/// (an apply the API server refuses, say) would otherwise leave the status
/// claiming all is well.
pub fn reconcile_failed(
    previous: Option<&DistroCacheStatus>,
    generation: Option<i64>,
    message: &str,
) -> Vec<Condition> {
    let previous = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let degraded = condition(
        previous,
        generation,
        DEGRADED,
        true,
        "ReconcileFailed",
        message.chars().take(1000).collect(),
    );
    let mut conditions: Vec<Condition> = previous
        .iter()
        .filter(|c| c.type_ != DEGRADED)
        .cloned()
        .collect();
    conditions.push(degraded);
    conditions
}

pub fn step_reason(step: &Step) -> &'static str {
    match step {
        Step::Steady => "Steady",
        Step::Waiting(_) => "Waiting",
        Step::Bootstrap(_) => "RingCreated",
        Step::Recovered => "RingRecovered",
        Step::RingLost(_) => "RingLost",
        Step::Rebuilt(_) => "RingRebuilt",
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
        Step::RingLost(why) => why.clone(),
        Step::Rebuilt(ids) => format!(
            "the ring ConfigMap and its copy in the status were lost; rebuilt the ring from \
             what its members hold: {}",
            ids.join(", ")
        ),
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
                    client_address: None,
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
                        last_backup: None,
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

    fn report(id: &str, items: u64, finished_at: u64, error: Option<&str>) -> Option<BackupReport> {
        Some(BackupReport {
            id: id.into(),
            object: format!("s3://b/{id}/x.dcs"),
            items,
            bytes: items * 100,
            started_at: finished_at - 5,
            finished_at,
            error: error.map(Into::into),
        })
    }

    #[test]
    fn the_last_backup_is_the_newest_the_members_report() {
        let ring = doc(&[MemberState::Active; 3]);
        let all = pods(&[true, true, true]);
        let step = Step::Steady;
        let mut prog = progress(3, 3);
        assert_eq!(
            build(&facts(Some(&ring), &all, &prog, &step), None).last_backup,
            None
        );

        // Two of three uploaded the newest slot; the third still reports the older one.
        prog.get_mut("c-0").unwrap().last_backup = report("scheduled-200", 10, 205, None);
        prog.get_mut("c-1").unwrap().last_backup = report("scheduled-200", 20, 206, None);
        prog.get_mut("c-2").unwrap().last_backup = report("scheduled-100", 30, 105, None);
        let s = build(&facts(Some(&ring), &all, &prog, &step), None);
        let b = s.last_backup.clone().unwrap();
        assert_eq!(
            (b.id.as_str(), b.phase.as_str()),
            ("scheduled-200", "Running")
        );
        assert_eq!((b.items, b.bytes, b.nodes.len()), (30, 3000, 2));
        assert_eq!(b.finished_at.as_deref(), Some("1970-01-01T00:03:26Z"));
        assert_eq!(b.started_at.as_deref(), Some("1970-01-01T00:03:20Z"));

        // The third finishes: completed. Then c-0 restarts and forgets its
        // report: its part stays in the status.
        prog.get_mut("c-2").unwrap().last_backup = report("scheduled-200", 30, 207, None);
        prog.get_mut("c-0").unwrap().last_backup = None;
        let s = build(&facts(Some(&ring), &all, &prog, &step), Some(&s));
        let b = s.last_backup.clone().unwrap();
        assert_eq!(
            (b.phase.as_str(), b.items, b.nodes.len()),
            ("Completed", 60, 3)
        );

        // A failed part fails the backup; with no report at all the status keeps the last.
        prog.get_mut("c-1").unwrap().last_backup = report("scheduled-300", 0, 305, Some("denied"));
        let failed = build(&facts(Some(&ring), &all, &prog, &step), Some(&s));
        let b = failed.last_backup.unwrap();
        assert_eq!(
            (b.id.as_str(), b.phase.as_str()),
            ("scheduled-300", "Failed")
        );
        assert_eq!(b.nodes[0].error.as_deref(), Some("denied"));
        let none = progress(3, 3);
        let kept = build(&facts(Some(&ring), &all, &none, &step), Some(&s));
        assert_eq!(kept.last_backup, s.last_backup);
        // Members that restarted report an older backup: the newer stays.
        let mut older = progress(3, 3);
        older.get_mut("c-2").unwrap().last_backup = report("scheduled-100", 30, 105, None);
        let kept = build(&facts(Some(&ring), &all, &older, &step), Some(&s));
        assert_eq!(kept.last_backup, s.last_backup);
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
            certificates: None,
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
        f.service_monitor = Some(ServiceMonitorOutcome::Skipped {
            reason: "CRDNotInstalled",
            message: "the ServiceMonitor CRD is not installed".into(),
        });
        let s = build(&f, None);
        assert_eq!(get(&s, DEGRADED).status, "True");
        assert_eq!(get(&s, DEGRADED).reason, "InvalidSpec");
        assert!(get(&s, READY).message.contains("defaultTTL"));
        assert_eq!(get(&s, SERVICE_MONITOR).status, "False");
        assert_eq!(get(&s, SERVICE_MONITOR).reason, "CRDNotInstalled");
    }

    #[test]
    fn an_invalid_spec_keeps_reporting_the_cache_that_runs() {
        // The status' members and epoch are the ring's backup: an invalid
        // spec must not wipe them while the pods keep running.
        let ring = doc(&[MemberState::Active; 3]);
        let (all, prog) = (pods(&[true, true, true]), progress(3, 3));
        let step = Step::Waiting("invalid".into());
        let mut f = facts(Some(&ring), &all, &prog, &step);
        f.invalid_spec = Some("spec.peerPort must differ from spec.port");
        let s = build(&f, None);
        assert_eq!((s.replicas, s.ready_replicas, s.ring_epoch), (3, 3, 3));
        assert_eq!(s.members.len(), 3);
        assert_eq!(get(&s, READY).reason, "InvalidSpec");
    }

    #[test]
    fn ready_replicas_counts_ready_members_not_pods() {
        let ring = doc(&[MemberState::Active; 3]);
        let mut extra = pods(&[true, true, true, true]);
        extra.get_mut("c-1").unwrap().ready = false;
        let prog = progress(3, 3);
        let s = build(&facts(Some(&ring), &extra, &prog, &Step::Steady), None);
        assert_eq!(s.replicas, 4, "pods that exist");
        assert_eq!(s.ready_replicas, 2, "c-3 is no member, c-1 is not ready");
        assert!(!s.members[1].ready);
    }

    #[test]
    fn degraded_names_members_down_whatever_the_step() {
        let ring = doc(&[
            MemberState::Active,
            MemberState::Active,
            MemberState::Leaving,
        ]);
        let prog = progress(3, 3);
        let one_down = pods(&[true, false, true]);
        let step = Step::Waiting("leaving members still handing off their data: c-2".into());
        let s = build(&facts(Some(&ring), &one_down, &prog, &step), None);
        let degraded = get(&s, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "MembersNotReady")
        );
        assert!(degraded.message.contains("c-1"), "{}", degraded.message);

        // A joining member is not ready until it holds its data: progress,
        // not a fault.
        let ring = doc(&[
            MemberState::Active,
            MemberState::Active,
            MemberState::Joining,
        ]);
        let loading = pods(&[true, true, false]);
        let step = Step::Waiting("joining members still loading their data: c-2".into());
        let s = build(&facts(Some(&ring), &loading, &prog, &step), None);
        assert_eq!(get(&s, DEGRADED).status, "False");

        let (no_pods, no_progress) = (BTreeMap::new(), BTreeMap::new());
        let step = Step::RingLost("the ring is gone; waiting for c-0".into());
        let s = build(&facts(None, &no_pods, &no_progress, &step), None);
        assert_eq!(get(&s, DEGRADED).reason, "RingLost");
        assert_eq!(get(&s, PROGRESSING).reason, "RingLost");
    }

    #[test]
    fn zero_replicas_is_never_ready() {
        let ring = doc(&[]);
        let (no_pods, prog) = (BTreeMap::new(), BTreeMap::new());
        let mut f = facts(Some(&ring), &no_pods, &prog, &Step::Steady);
        f.desired_replicas = 0;
        let s = build(&f, None);
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ScaledToZero")
        );
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, DEGRADED).status, "False");
    }

    #[test]
    fn a_failed_reconcile_turns_degraded_and_keeps_the_rest() {
        let ring = doc(&[MemberState::Active; 3]);
        let (all, prog) = (pods(&[true, true, true]), progress(3, 3));
        let ok = build(&facts(Some(&ring), &all, &prog, &Step::Steady), None);
        let conditions = reconcile_failed(Some(&ok), Some(2), "StatefulSet is invalid");
        assert_eq!(conditions.len(), ok.conditions.len());
        let degraded = conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ReconcileFailed")
        );
        assert!(degraded.message.contains("StatefulSet"));
        let ready = conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready, get(&ok, READY));
        // No status yet: the condition alone.
        assert_eq!(reconcile_failed(None, Some(1), "x").len(), 1);
    }
}

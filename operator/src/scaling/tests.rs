//! The scale state machine, transition by transition.

use distrocache_membership::SyncPhase;

use super::*;
use MemberState::{Active, Joining, Leaving};

/// A cluster named "c" whose pods `0..pods` run with IPs 10.0.0.<n>.
fn observed(desired: i32, pods: i32) -> Observed {
    Observed {
        name: "c".into(),
        desired_replicas: desired,
        replication_factor: 2,
        ring: None,
        ring_recovered: false,
        last_epoch: 0,
        statefulset_replicas: Some(pods),
        pods: (0..pods)
            .map(|n| (format!("c-{n}"), pod(n, true)))
            .collect(),
        progress: BTreeMap::new(),
    }
}

fn pod(n: i32, ready: bool) -> PodView {
    PodView {
        ordinal: n,
        address: Some(format!("10.0.0.{n}:8080")),
        client: Some(format!("10.0.0.{n}:8080")),
        ready,
    }
}

fn ring(epoch: u64, members: &[(i32, MemberState)]) -> MembershipDoc {
    MembershipDoc {
        epoch,
        replication_factor: 2,
        hashing: Hashing::Rendezvous,
        members: members
            .iter()
            .map(|&(n, state)| Member {
                id: format!("c-{n}"),
                address: format!("10.0.0.{n}:8080"),
                client_address: Some(format!("10.0.0.{n}:8080")),
                state,
            })
            .collect(),
    }
}

/// Every member reports having synced the ring's epoch.
fn settled(o: &mut Observed) {
    let doc = o.ring.clone().expect("a ring");
    for m in &doc.members {
        o.progress.insert(
            m.id.clone(),
            NodeProgress {
                node_id: m.id.clone(),
                epoch: doc.epoch,
                synced_epoch: doc.epoch,
                member_state: Some(m.state),
                phase: SyncPhase::Idle,
                handoff_complete: m.state == Leaving,
                ready: true,
                items: 0,
                keys_sent: 0,
                keys_received: 0,
                last_sync_seconds: 0.0,
                last_backup: None,
            },
        );
    }
}

/// Pod `id` reports holding ring `epoch`, as a member in `state` (`None`:
/// not a member of it; epoch 0: no ring at all).
fn report(o: &mut Observed, id: &str, epoch: u64, state: Option<MemberState>) {
    o.progress.insert(
        id.to_owned(),
        NodeProgress {
            node_id: id.to_owned(),
            epoch,
            synced_epoch: epoch,
            member_state: state,
            phase: SyncPhase::Idle,
            handoff_complete: false,
            ready: state.is_some(),
            items: 0,
            keys_sent: 0,
            keys_received: 0,
            last_sync_seconds: 0.0,
            last_backup: None,
        },
    );
}

/// Every pod reports holding no ring, as new nodes do.
fn fresh(o: &mut Observed) {
    let ids: Vec<String> = o.pods.keys().cloned().collect();
    for id in ids {
        report(o, &id, 0, None);
    }
}

fn states(doc: &MembershipDoc) -> Vec<(String, MemberState)> {
    doc.members
        .iter()
        .map(|m| (m.id.clone(), m.state))
        .collect()
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn bootstrap_waits_for_every_pod_then_makes_all_active() {
    let mut o = observed(3, 3);
    o.pods.get_mut("c-2").unwrap().address = None;
    let p = plan(&o);
    assert_eq!(p.ring, None);
    assert_eq!(p.statefulset_replicas, 3);
    assert!(matches!(p.step, Step::Waiting(ref why) if why.contains("c-2")));

    // Started, but not yet asked which ring they hold.
    let mut o = observed(3, 3);
    let p = plan(&o);
    assert_eq!(p.ring, None);
    assert!(matches!(p.step, Step::Waiting(ref why) if why.contains("report")));

    fresh(&mut o);
    let p = plan(&o);
    let doc = p.ring.unwrap();
    assert_eq!(doc.epoch, 1);
    assert_eq!(doc.replication_factor, 2);
    assert!(doc.members.iter().all(|m| m.state == Active));
    assert_eq!(p.step, Step::Bootstrap(ids(&["c-0", "c-1", "c-2"])));
}

#[test]
fn a_settled_ring_that_matches_the_spec_is_steady() {
    let mut o = observed(3, 3);
    o.ring = Some(ring(5, &[(0, Active), (1, Active), (2, Active)]));
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Steady);
    assert_eq!(p.ring.unwrap().epoch, 5, "no change, no new epoch");
    assert_eq!(p.statefulset_replicas, 3);
}

#[test]
fn scale_up_starts_pods_then_joins_then_activates() {
    // 3 -> 5: the StatefulSet grows first; the ring waits for the pods.
    let mut o = observed(5, 3);
    o.ring = Some(ring(5, &[(0, Active), (1, Active), (2, Active)]));
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.statefulset_replicas, 5);
    assert!(matches!(p.step, Step::Waiting(_)));
    assert_eq!(p.ring.as_ref().unwrap().epoch, 5);

    // The new pods have IPs: they join.
    o.statefulset_replicas = Some(5);
    o.pods.insert("c-3".into(), pod(3, false));
    o.pods.insert("c-4".into(), pod(4, false));
    let p = plan(&o);
    assert_eq!(p.step, Step::Joining(ids(&["c-3", "c-4"])));
    let doc = p.ring.unwrap();
    assert_eq!(doc.epoch, 6);
    assert_eq!(
        states(&doc)[3..],
        [("c-3".into(), Joining), ("c-4".into(), Joining)]
    );

    // Not active until every member has synced epoch 6 and the joiners are ready.
    o.ring = Some(doc);
    assert!(matches!(plan(&o).step, Step::Waiting(ref why) if why.contains("not settled")));
    settled(&mut o);
    o.progress.get_mut("c-4").unwrap().ready = false;
    assert!(matches!(plan(&o).step, Step::Waiting(ref why) if why.contains("c-4")));
    o.progress.get_mut("c-4").unwrap().ready = true;
    let p = plan(&o);
    assert_eq!(p.step, Step::Activated(ids(&["c-3", "c-4"])));
    let doc = p.ring.unwrap();
    assert_eq!(doc.epoch, 7);
    assert!(doc.members.iter().all(|m| m.state == Active));
    assert_eq!(p.statefulset_replicas, 5);
}

#[test]
fn scale_down_marks_leaving_waits_for_handoff_then_removes_and_shrinks() {
    let mut o = observed(2, 4);
    o.ring = Some(ring(
        9,
        &[(0, Active), (1, Active), (2, Active), (3, Active)],
    ));
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Leaving(ids(&["c-2", "c-3"])));
    assert_eq!(p.statefulset_replicas, 4, "no pod goes before its data");
    let doc = p.ring.unwrap();
    assert_eq!(doc.epoch, 10);
    assert_eq!(
        states(&doc)[2..],
        [("c-2".into(), Leaving), ("c-3".into(), Leaving)]
    );

    o.ring = Some(doc);
    settled(&mut o);
    o.progress.get_mut("c-3").unwrap().handoff_complete = false;
    let p = plan(&o);
    assert!(matches!(p.step, Step::Waiting(ref why) if why.contains("c-3")));
    assert_eq!(p.statefulset_replicas, 4);

    o.progress.get_mut("c-3").unwrap().handoff_complete = true;
    let p = plan(&o);
    assert_eq!(p.step, Step::Removed(ids(&["c-2", "c-3"])));
    let doc = p.ring.unwrap();
    assert_eq!(doc.epoch, 11);
    assert_eq!(doc.members.len(), 2);
    assert_eq!(p.statefulset_replicas, 2);
}

#[test]
fn a_crashed_member_holds_the_ring_and_is_never_removed() {
    let mut o = observed(3, 3);
    o.ring = Some(ring(4, &[(0, Active), (1, Active), (2, Active)]));
    settled(&mut o);
    // c-1 crashed: no IP for now, no progress report.
    o.pods.get_mut("c-1").unwrap().address = None;
    o.progress.remove("c-1");
    let p = plan(&o);
    assert!(matches!(p.step, Step::Waiting(ref why) if why.contains("c-1")));
    assert_eq!(p.statefulset_replicas, 3);
    assert_eq!(p.ring.unwrap().members.len(), 3);

    // Even with the spec scaled down meanwhile, nothing moves until it is back.
    o.desired_replicas = 2;
    assert!(matches!(plan(&o).step, Step::Waiting(_)));
}

#[test]
fn a_restarted_pod_keeps_its_id_and_only_its_address_changes() {
    let mut o = observed(3, 3);
    o.ring = Some(ring(4, &[(0, Active), (1, Active), (2, Active)]));
    o.pods.get_mut("c-1").unwrap().address = Some("10.0.9.9:8080".into());
    // Even before the ring settles (the node is still pulling its keys).
    let p = plan(&o);
    assert_eq!(p.step, Step::AddressesUpdated(ids(&["c-1"])));
    let doc = p.ring.unwrap();
    assert_eq!(doc.epoch, 5);
    assert_eq!(doc.member("c-1").unwrap().address, "10.0.9.9:8080");
    assert_eq!(doc.member("c-1").unwrap().state, Active);
}

#[test]
fn changing_the_replication_factor_is_a_ring_change_of_its_own() {
    let mut o = observed(3, 3);
    o.ring = Some(ring(4, &[(0, Active), (1, Active), (2, Active)]));
    o.replication_factor = 3;
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::ReplicationFactorChanged { from: 2, to: 3 });
    let doc = p.ring.unwrap();
    assert_eq!((doc.epoch, doc.replication_factor), (5, 3));
}

#[test]
fn a_lost_ring_document_is_rewritten_under_a_newer_epoch() {
    let mut o = observed(3, 3);
    o.ring = Some(ring(7, &[(0, Active), (1, Active), (2, Active)]));
    o.ring_recovered = true;
    o.last_epoch = 7;
    let p = plan(&o);
    assert_eq!(p.step, Step::Recovered);
    assert_eq!(p.ring.unwrap().epoch, 8);
}

#[test]
fn a_pod_that_never_joined_is_dropped_when_the_spec_shrinks_back() {
    // An interrupted scale-up: the StatefulSet grew to 4, then the spec went
    // back to 3 before c-3 joined.
    let mut o = observed(3, 4);
    o.ring = Some(ring(2, &[(0, Active), (1, Active), (2, Active)]));
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Steady);
    assert_eq!(p.statefulset_replicas, 3);
}

#[test]
fn the_statefulset_never_shrinks_below_a_member() {
    // Someone scaled the StatefulSet down by hand: the operator restores it.
    let mut o = observed(3, 3);
    o.ring = Some(ring(2, &[(0, Active), (1, Active), (2, Active)]));
    o.statefulset_replicas = Some(1);
    let p = plan(&o);
    assert_eq!(p.statefulset_replicas, 3);
}

#[test]
fn scaling_to_zero_hands_everything_off_first() {
    let mut o = observed(0, 2);
    o.ring = Some(ring(3, &[(0, Active), (1, Active)]));
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Leaving(ids(&["c-0", "c-1"])));
    o.ring = p.ring;
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Removed(ids(&["c-0", "c-1"])));
    assert_eq!(p.statefulset_replicas, 0);
    assert!(p.ring.unwrap().members.is_empty());
}

#[test]
fn without_a_ring_the_statefulset_never_shrinks() {
    // A StatefulSet larger than the spec and no ring: those pods may hold
    // the only copy of some keys until a ring says otherwise.
    let mut o = observed(2, 4);
    o.pods.get_mut("c-3").unwrap().address = None;
    let p = plan(&o);
    assert_eq!(p.statefulset_replicas, 4);
    assert!(matches!(p.step, Step::Waiting(ref why) if why.contains("c-3")));

    // They all turn out to be new nodes: the ring gets the desired ones, and
    // the surplus pod only goes once that ring is steady.
    o.pods.insert("c-3".into(), pod(3, true));
    fresh(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Bootstrap(ids(&["c-0", "c-1"])));
    assert_eq!(p.statefulset_replicas, 4);
    o.ring = p.ring;
    settled(&mut o);
    let p = plan(&o);
    assert_eq!((p.step, p.statefulset_replicas), (Step::Steady, 2));
}

#[test]
fn a_lost_ring_is_rebuilt_from_what_the_nodes_hold() {
    // The ConfigMap and the status are gone; the nodes still serve epoch 9,
    // c-2 as a leaving member. The spec meanwhile says 1.
    let mut o = observed(1, 3);
    report(&mut o, "c-0", 9, Some(Active));
    report(&mut o, "c-1", 9, Some(Active));
    // c-2 does not answer: nothing is written, nothing shrinks.
    let p = plan(&o);
    assert_eq!(p.ring, None);
    assert_eq!(p.statefulset_replicas, 3);
    assert!(matches!(p.step, Step::RingLost(ref why) if why.contains("c-2")));
    assert!(!p.step.changes_ring());

    report(&mut o, "c-2", 9, Some(Leaving));
    let p = plan(&o);
    assert_eq!(p.step, Step::Rebuilt(ids(&["c-0", "c-1", "c-2"])));
    assert_eq!(p.statefulset_replicas, 3);
    let doc = p.ring.unwrap();
    assert_eq!(
        doc.epoch, 10,
        "newer than what the nodes hold, or they ignore it"
    );
    assert_eq!(
        states(&doc),
        [
            ("c-0".into(), Active),
            ("c-1".into(), Active),
            ("c-2".into(), Leaving)
        ]
    );
    assert_eq!(doc.member("c-1").unwrap().address, "10.0.0.1:8080");
}

#[test]
fn a_restarted_node_without_a_ring_is_left_out_of_a_rebuilt_one() {
    // c-1 restarted after the ConfigMap was lost: it holds nothing, so it
    // joins again like a new node once the rebuilt ring is in place.
    let mut o = observed(2, 2);
    o.last_epoch = 4;
    report(&mut o, "c-0", 4, Some(Active));
    report(&mut o, "c-1", 0, None);
    let p = plan(&o);
    assert_eq!(p.step, Step::Rebuilt(ids(&["c-0"])));
    o.ring = p.ring;
    assert_eq!(o.ring.as_ref().unwrap().epoch, 5);
    settled(&mut o);
    let p = plan(&o);
    assert_eq!(p.step, Step::Joining(ids(&["c-1"])));
}

#[test]
fn a_new_epoch_is_newer_than_any_a_node_holds() {
    // The operator wrote epoch 8 but died before its status said so; then
    // the ConfigMap was lost and recovered from the status at epoch 7.
    let mut o = observed(3, 3);
    o.ring = Some(ring(7, &[(0, Active), (1, Active), (2, Active)]));
    o.ring_recovered = true;
    o.last_epoch = 7;
    settled(&mut o);
    o.progress.get_mut("c-1").unwrap().epoch = 8;
    let p = plan(&o);
    assert_eq!(p.step, Step::Recovered);
    assert_eq!(p.ring.unwrap().epoch, 9);
}

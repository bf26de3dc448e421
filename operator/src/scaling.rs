//! The scale state machine: from what the cluster holds now (the ring, the
//! StatefulSet, the pods and each node's progress report) to the next ring
//! document and StatefulSet size. A pure function, so every transition is
//! unit-tested and the controller stays level-triggered: it can be killed
//! at any point and the next reconcile continues from what it observes.
//!
//! Rules, in the order they are applied:
//! 1. A member whose pod came back with a new IP gets its new address at
//!    once (its keys stay put: placement hashes pod names, not addresses).
//! 2. Nothing else changes until the ring has *settled*: every member
//!    reports it has finished moving data for the current epoch. A member
//!    that does not answer (crashed, restarting) holds the ring in place;
//!    it is never a reason to shrink.
//! 3. Joining members that hold their data become active.
//! 4. Leaving members that report their handoff complete are removed from
//!    the ring, and only then is the StatefulSet shrunk.
//! 5. A replication-factor change gets its own epoch.
//! 6. Scale-up: grow the StatefulSet; once the new pods have IPs, add them
//!    as joining.
//! 7. Scale-down: mark the highest ordinals leaving.
//!
//! Every ring change writes a new epoch, newer than any the operator wrote
//! and any a node reports holding (a node ignores a document that is not
//! newer than its own). The StatefulSet never shrinks below a pod that is
//! still a ring member.
//!
//! Without a ring (a new cache, or one whose ring ConfigMap and status were
//! both lost while its nodes kept running on the ring they hold), every pod
//! must start and report which ring it holds before a ring is written, and
//! the StatefulSet never shrinks: nothing then says which pods hold the only
//! copy of some keys.

use std::collections::BTreeMap;

use distrocache_membership::{Hashing, Member, MemberState, MembershipDoc, NodeProgress};

/// One node pod as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub ordinal: i32,
    /// `ip:peerPort`, the ring address, once the pod has an IP.
    pub address: Option<String>,
    /// `ip:port`, the client API (progress reports), once it has an IP.
    pub client: Option<String>,
    pub ready: bool,
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Observed {
    /// `<name>`; pods are `<name>-<ordinal>`.
    pub name: String,
    pub desired_replicas: i32,
    pub replication_factor: u32,
    /// The ring the nodes were given, if any.
    pub ring: Option<MembershipDoc>,
    /// True when `ring` was rebuilt from the status because the ConfigMap was
    /// lost: it must be written again under a new epoch.
    pub ring_recovered: bool,
    /// Highest epoch ever written (from the status), so a recreated ring
    /// never goes back in time.
    pub last_epoch: u64,
    /// `spec.replicas` of the StatefulSet, if it exists.
    pub statefulset_replicas: Option<i32>,
    /// Pods by name.
    pub pods: BTreeMap<String, PodView>,
    /// Progress reports of the members that answered, by pod name.
    pub progress: BTreeMap<String, NodeProgress>,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The ring document to hold (a new epoch when `step` changed it).
    pub ring: Option<MembershipDoc>,
    pub statefulset_replicas: i32,
    pub step: Step,
}

/// What the plan does, for events, conditions and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to change: the cache is as the spec says.
    Steady,
    /// Nothing may change yet; says why.
    Waiting(String),
    /// The first ring, every member active.
    Bootstrap(Vec<String>),
    /// The ring document was lost and written again.
    Recovered,
    /// The ring document and its copy in the status were lost while the
    /// nodes kept theirs, and nothing may change until every pod reported
    /// what it holds; says why.
    RingLost(String),
    /// A lost ring rebuilt from the members' own reports.
    Rebuilt(Vec<String>),
    AddressesUpdated(Vec<String>),
    Joining(Vec<String>),
    Activated(Vec<String>),
    Leaving(Vec<String>),
    Removed(Vec<String>),
    ReplicationFactorChanged {
        from: u32,
        to: u32,
    },
}

impl Step {
    /// Whether the ring document changed (a new epoch to write).
    pub fn changes_ring(&self) -> bool {
        !matches!(self, Step::Steady | Step::Waiting(_) | Step::RingLost(_))
    }
}

impl Observed {
    fn pod_name(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.name)
    }

    fn ordinal(&self, pod: &str) -> Option<i32> {
        pod.strip_prefix(&self.name)?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    /// The StatefulSet must keep every ring member's pod.
    fn members_need(&self, doc: &MembershipDoc) -> i32 {
        doc.members
            .iter()
            .filter_map(|m| self.ordinal(&m.id))
            .map(|o| o + 1)
            .max()
            .unwrap_or(0)
    }

    /// The newest epoch anyone has seen: the operator (its status) or a
    /// node (a status patch may have been lost after a ring was written).
    fn highest_epoch(&self) -> u64 {
        self.progress
            .values()
            .map(|p| p.epoch)
            .fold(self.last_epoch, u64::max)
    }

    fn next(&self, doc: &MembershipDoc, members: Vec<Member>, rf: u32) -> MembershipDoc {
        MembershipDoc {
            epoch: doc.epoch.max(self.highest_epoch()) + 1,
            replication_factor: rf,
            hashing: doc.hashing,
            members,
        }
    }
}

pub fn plan(o: &Observed) -> Plan {
    let desired = o.desired_replicas.max(0);
    let Some(doc) = &o.ring else {
        return bootstrap(o, desired);
    };
    let member_floor = o.members_need(doc);
    let current_sts = o.statefulset_replicas.unwrap_or(0);
    let keep = |step: Step| Plan {
        ring: Some(doc.clone()),
        statefulset_replicas: current_sts.max(member_floor),
        step,
    };

    // 1. New addresses of restarted pods (and a lost document) first.
    let mut moved = Vec::new();
    let members: Vec<Member> = doc
        .members
        .iter()
        .map(|m| {
            let mut m = m.clone();
            let pod = o.pods.get(&m.id);
            if let Some(address) = pod.and_then(|p| p.address.clone())
                && address != m.address
            {
                moved.push(m.id.clone());
                m.address = address;
            }
            // The client address moves with the peer address; a ring that
            // predates it (or was rebuilt from the status) gains it here.
            if let Some(client) = pod.and_then(|p| p.client.clone())
                && m.client_address.as_ref() != Some(&client)
            {
                if !moved.contains(&m.id) {
                    moved.push(m.id.clone());
                }
                m.client_address = Some(client);
            }
            m
        })
        .collect();
    if !moved.is_empty() || o.ring_recovered {
        // A ring rebuilt from the status always gains client addresses
        // (the status does not record them): the recovery is what happened.
        let mut plan = keep(if o.ring_recovered {
            Step::Recovered
        } else {
            Step::AddressesUpdated(moved)
        });
        plan.ring = Some(o.next(doc, members, doc.replication_factor));
        return plan;
    }

    // 2. Wait for the ring to settle.
    let unsettled: Vec<&str> = doc
        .members
        .iter()
        .filter(|m| {
            o.progress
                .get(&m.id)
                .is_none_or(|p| p.epoch != doc.epoch || p.synced_epoch < doc.epoch)
        })
        .map(|m| m.id.as_str())
        .collect();
    if !unsettled.is_empty() {
        return keep(Step::Waiting(format!(
            "ring epoch {} is not settled yet: waiting for {}",
            doc.epoch,
            unsettled.join(", ")
        )));
    }

    let in_state = |state: MemberState| -> Vec<&Member> {
        doc.members.iter().filter(|m| m.state == state).collect()
    };

    // 3. Joining members that hold their data become active.
    let joining = in_state(MemberState::Joining);
    if !joining.is_empty() {
        let not_ready: Vec<&str> = joining
            .iter()
            .filter(|m| !o.progress.get(&m.id).is_some_and(|p| p.ready))
            .map(|m| m.id.as_str())
            .collect();
        if !not_ready.is_empty() {
            return keep(Step::Waiting(format!(
                "joining members still loading their data: {}",
                not_ready.join(", ")
            )));
        }
        let members = doc
            .members
            .iter()
            .map(|m| Member {
                state: if m.state == MemberState::Joining {
                    MemberState::Active
                } else {
                    m.state
                },
                ..m.clone()
            })
            .collect();
        let mut plan = keep(Step::Activated(
            joining.iter().map(|m| m.id.clone()).collect(),
        ));
        plan.ring = Some(o.next(doc, members, doc.replication_factor));
        return plan;
    }

    // 4. Leaving members that handed off are removed, then their pods.
    let leaving = in_state(MemberState::Leaving);
    if !leaving.is_empty() {
        let pending: Vec<&str> = leaving
            .iter()
            .filter(|m| !o.progress.get(&m.id).is_some_and(|p| p.handoff_complete))
            .map(|m| m.id.as_str())
            .collect();
        if !pending.is_empty() {
            return keep(Step::Waiting(format!(
                "leaving members still handing off their data: {}",
                pending.join(", ")
            )));
        }
        let members: Vec<Member> = doc
            .members
            .iter()
            .filter(|m| m.state != MemberState::Leaving)
            .cloned()
            .collect();
        let next = o.next(doc, members, doc.replication_factor);
        // Shrink to the remaining members even if the spec grew again
        // meanwhile: a removed node's copy may be stale, so it must restart
        // empty before it can join again.
        return Plan {
            statefulset_replicas: o.members_need(&next),
            ring: Some(next),
            step: Step::Removed(leaving.iter().map(|m| m.id.clone()).collect()),
        };
    }

    // 5. The replication factor.
    if doc.replication_factor != o.replication_factor {
        let mut plan = keep(Step::ReplicationFactorChanged {
            from: doc.replication_factor,
            to: o.replication_factor,
        });
        plan.ring = Some(o.next(doc, doc.members.clone(), o.replication_factor));
        return plan;
    }

    // 6. Scale up: pods first, then the ring.
    let missing: Vec<i32> = (0..desired)
        .filter(|&n| doc.member(&o.pod_name(n)).is_none())
        .collect();
    if !missing.is_empty() {
        let sts = current_sts.max(member_floor).max(desired);
        let unstarted: Vec<String> = missing
            .iter()
            .map(|&n| o.pod_name(n))
            .filter(|p| o.pods.get(p).and_then(|v| v.address.as_ref()).is_none())
            .collect();
        if !unstarted.is_empty() {
            return Plan {
                ring: Some(doc.clone()),
                statefulset_replicas: sts,
                step: Step::Waiting(format!(
                    "waiting for new pods to start: {}",
                    unstarted.join(", ")
                )),
            };
        }
        let mut members = doc.members.clone();
        let added: Vec<String> = missing.iter().map(|&n| o.pod_name(n)).collect();
        for id in &added {
            members.push(Member {
                id: id.clone(),
                address: o.pods[id].address.clone().expect("checked above"),
                client_address: o.pods[id].client.clone(),
                state: MemberState::Joining,
            });
        }
        return Plan {
            ring: Some(o.next(doc, members, doc.replication_factor)),
            statefulset_replicas: sts,
            step: Step::Joining(added),
        };
    }

    // 7. Scale down: the highest ordinals leave.
    let surplus: Vec<String> = doc
        .members
        .iter()
        .filter(|m| o.ordinal(&m.id).is_none_or(|n| n >= desired))
        .map(|m| m.id.clone())
        .collect();
    if !surplus.is_empty() {
        let members = doc
            .members
            .iter()
            .map(|m| Member {
                state: if surplus.contains(&m.id) {
                    MemberState::Leaving
                } else {
                    m.state
                },
                ..m.clone()
            })
            .collect();
        let mut plan = keep(Step::Leaving(surplus));
        plan.ring = Some(o.next(doc, members, doc.replication_factor));
        return plan;
    }

    // Steady: the StatefulSet holds exactly the members (a surplus pod that
    // never joined, e.g. after an interrupted scale-up, goes).
    Plan {
        ring: Some(doc.clone()),
        statefulset_replicas: member_floor.max(desired),
        step: Step::Steady,
    }
}

/// No ring. Either a new cache, or the ring ConfigMap and its copy in the
/// status are both gone while the nodes keep serving the ring they hold (a
/// node keeps its ring when the ConfigMap goes). Every pod of the
/// StatefulSet must have started and reported which ring it holds; then:
/// * no pod holds one: a new cache, every desired pod active at once (no
///   data needs to move in);
/// * some do: the ring is rebuilt from their own member states.
///
/// The StatefulSet never shrinks here: without a ring nothing says which
/// pods hold the only copy of some keys.
fn bootstrap(o: &Observed, desired: i32) -> Plan {
    let size = o.statefulset_replicas.unwrap_or(0).max(desired);
    let ids: Vec<String> = (0..size).map(|n| o.pod_name(n)).collect();
    // A ring existed before: the status recorded one, or a node holds one.
    let lost = o.highest_epoch() > 0;
    let wait = |why: String| Plan {
        ring: None,
        statefulset_replicas: size,
        step: if lost {
            Step::RingLost(format!(
                "the ring ConfigMap and its copy in the status are gone; {why}"
            ))
        } else {
            Step::Waiting(why)
        },
    };
    let unstarted: Vec<&str> = ids
        .iter()
        .filter(|id| o.pods.get(*id).and_then(|p| p.address.as_ref()).is_none())
        .map(String::as_str)
        .collect();
    if !unstarted.is_empty() {
        return wait(format!(
            "waiting for pods to start: {}",
            unstarted.join(", ")
        ));
    }
    let unreported: Vec<&str> = ids
        .iter()
        .filter(|id| !o.progress.contains_key(*id))
        .map(String::as_str)
        .collect();
    if !unreported.is_empty() {
        return wait(format!(
            "waiting for pods to report the ring they hold: {}",
            unreported.join(", ")
        ));
    }
    let address = |id: &String| o.pods[id].address.clone().expect("checked above");
    let ring = |members: Vec<Member>| MembershipDoc {
        epoch: o.highest_epoch() + 1,
        replication_factor: o.replication_factor,
        hashing: Hashing::Rendezvous,
        members,
    };
    let held: Vec<Member> = ids
        .iter()
        .filter_map(|id| {
            Some(Member {
                id: id.clone(),
                address: address(id),
                client_address: o.pods[id].client.clone(),
                state: o.progress[id].member_state?,
            })
        })
        .collect();
    if !held.is_empty() {
        return Plan {
            step: Step::Rebuilt(held.iter().map(|m| m.id.clone()).collect()),
            ring: Some(ring(held)),
            statefulset_replicas: size,
        };
    }
    let members: Vec<Member> = ids[..desired as usize]
        .iter()
        .map(|id| Member {
            id: id.clone(),
            address: address(id),
            client_address: o.pods[id].client.clone(),
            state: MemberState::Active,
        })
        .collect();
    Plan {
        step: Step::Bootstrap(members.iter().map(|m| m.id.clone()).collect()),
        ring: Some(ring(members)),
        statefulset_replicas: size,
    }
}

#[cfg(test)]
mod tests;

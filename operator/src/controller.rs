//! The controller: watches DistroCaches, their children and their pods, and
//! reconciles each cache towards its spec (DESIGN 4).
//!
//! A reconcile is level-triggered and idempotent: it applies every child
//! with server-side apply (one field manager), observes the ring, the
//! StatefulSet, the pods and the nodes' progress, lets [`scaling::plan`]
//! decide the next step, writes the ring before the StatefulSet, and
//! reports the status. It keeps no state between runs that matters (the
//! ring lives in its ConfigMap, mirrored in the status), so the operator
//! can be killed at any point and carry on where it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distrocache_membership::{CONFIGMAP_KEY, Member, MemberState, MembershipDoc};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::crd::{DistroCache, DistroCacheStatus};
use crate::metrics::Metrics;
use crate::node_client::NodeClient;
use crate::resources::{self, FIELD_MANAGER};
use crate::scaling::{self, Observed, PodView, Step};
use crate::status::{self, Facts, ServiceMonitorOutcome};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the ring ConfigMap holds an invalid document: {0}")]
    BadRing(String),
}

impl Error {
    /// The `kind` label of the reconcile error metric (one of
    /// [`crate::metrics::ERROR_KINDS`]): what an alert or a dashboard
    /// groups by to tell missing RBAC from conflicts from an unreachable API.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) => match status.code {
                401 | 403 => "forbidden",
                409 => "conflict",
                400 | 422 => "invalid",
                _ => "api",
            },
            Error::Kube(_) => "transport",
            Error::BadRing(_) => "bad_ring",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub nodes: NodeClient,
    /// Requeue interval while nothing is changing.
    pub resync: Duration,
    /// The namespace the operator runs in, which a cache's NetworkPolicy
    /// admits to the nodes' client port unless its spec names another.
    pub operator_namespace: String,
    /// The cache-node image of caches whose spec names none.
    pub default_image: String,
    /// Consecutive failures per cache, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DistroCache>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        nodes: NodeClient,
        resync: Duration,
        operator_namespace: String,
        default_image: String,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: "distrocache-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            nodes,
            resync,
            operator_namespace,
            default_image,
            failures: Mutex::new(HashMap::new()),
        })
    }
}

/// Which namespaces the operator watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (a ClusterRole).
    All,
    /// Only these (a Role in each is enough).
    Namespaces(Vec<String>),
}

impl Scope {
    /// `All` for an empty list.
    pub fn from_list(namespaces: &[String]) -> Scope {
        let list: Vec<String> = namespaces
            .iter()
            .map(|ns| ns.trim().to_owned())
            .filter(|ns| !ns.is_empty())
            .collect();
        if list.is_empty() {
            Scope::All
        } else {
            Scope::Namespaces(list)
        }
    }

    /// One entry per watch: `None` for every namespace.
    pub fn watches(&self) -> Vec<Option<String>> {
        match self {
            Scope::All => vec![None],
            Scope::Namespaces(list) => list.iter().cloned().map(Some).collect(),
        }
    }
}

/// Runs the controller over `scope` until SIGTERM/SIGINT: one controller
/// per watched namespace, each with its own watches (a namespaced watch
/// needs only that namespace's Role), sharing the context.
pub async fn run(ctx: Arc<Context>, scope: &Scope) {
    futures_util::future::join_all(
        scope
            .watches()
            .into_iter()
            .map(|namespace| run_in(ctx.clone(), namespace)),
    )
    .await;
}

/// Runs one controller over `namespace` (every namespace if `None`).
async fn run_in(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let api = |c: &Client| -> Api<DistroCache> {
        match &namespace {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    };
    fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=distrocache-operator");
    let pods = watcher::Config::default().labels("app.kubernetes.io/name=distrocache");
    // A cache triggers its own reconcile only when its spec changes (a new
    // generation). Its status changes on every pass while it takes writes
    // (members' item counts), so reacting to the controller's own status
    // patches would reconcile in a tight loop. The reflector still sees
    // every change, so each reconcile reads the latest object; pods and
    // children still trigger, and every reconcile requeues itself.
    let (reader, writer) = reflector::store();
    let caches = watcher(api(&client), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(caches, reader)
        .owns(scoped::<StatefulSet>(&client, &namespace), managed.clone())
        .owns(scoped::<Service>(&client, &namespace), managed.clone())
        .owns(scoped::<ConfigMap>(&client, &namespace), managed.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, &namespace), managed)
        // Pods are owned by the StatefulSet, not the cache: map them back by
        // label so a pod's new IP or readiness reaches the ring quickly.
        .watches(scoped::<Pod>(&client, &namespace), pods, |pod| {
            let instance = pod.labels().get("app.kubernetes.io/instance")?.clone();
            Some(ObjectRef::new(&instance).within(&pod.namespace()?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile stream");
            }
        })
        .await;
}

/// A fresh trace id (W3C format: 32 hex digits) for one reconcile, recorded
/// on its span so every log line of that reconcile can be found together.
fn trace_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[tracing::instrument(
    skip(dc, ctx),
    fields(
        cache = %dc.name_any(),
        namespace = %dc.namespace().unwrap_or_default(),
        trace_id = %trace_id(),
    )
)]
pub async fn reconcile(dc: Arc<DistroCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    ctx.metrics
        .cache_reconciles
        .with_label_values(&[
            dc.namespace().as_deref().unwrap_or_default(),
            &dc.name_any(),
        ])
        .inc();
    let result = reconcile_inner(&dc, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("never poisoned")
            .remove(&ObjectRef::from_obj(dc.as_ref()));
    }
    result
}

/// Retries with exponential backoff per cache (2 s after the first failure,
/// doubling up to 5 min), and reports the error as an Event and in the
/// `Degraded` condition.
pub(crate) fn error_policy(dc: Arc<DistroCache>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .with_label_values(&[error.kind()])
        .inc();
    let failures = {
        let mut map = ctx.failures.lock().expect("never poisoned");
        let n = map.entry(ObjectRef::from_obj(dc.as_ref())).or_insert(0);
        *n += 1;
        *n
    };
    let delay = Duration::from_secs(1u64 << failures.min(9)).min(Duration::from_secs(300));
    tracing::warn!(cache = %dc.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    let message = error.to_string();
    tokio::spawn(async move {
        report_failure(&ctx, &dc, &message).await;
        publish(
            &ctx,
            &dc,
            EventType::Warning,
            "ReconcileFailed",
            "Reconcile",
            message,
        )
        .await;
    });
    Action::requeue(delay)
}

/// Best effort: `Degraded=True` with the error, the other conditions as
/// they were. Without it, a reconcile that fails before it writes the status
/// (an apply the API server refuses, every time) leaves the status saying
/// nothing is wrong.
async fn report_failure(ctx: &Context, dc: &DistroCache, message: &str) {
    let previous = dc.status.as_ref();
    let conditions = status::reconcile_failed(previous, dc.meta().generation, message);
    ctx.metrics
        .cache_condition
        .with_label_values(&[
            &dc.namespace().unwrap_or_default(),
            &dc.name_any(),
            status::DEGRADED,
        ])
        .set(1);
    if previous.is_some_and(|s| s.conditions == conditions) {
        return;
    }
    let api =
        Api::<DistroCache>::namespaced(ctx.client.clone(), &dc.namespace().expect("namespaced"));
    let patch = json!({ "status": { "conditions": conditions } });
    if let Err(e) = api
        .patch_status(
            &dc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        tracing::warn!(cache = %dc.name_any(), error = %e, "cannot report the failure in the status");
    }
}

async fn publish(
    ctx: &Context,
    dc: &DistroCache,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &dc.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// Server-side apply of one child under the operator's field manager.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object
        .meta()
        .name
        .clone()
        .expect("builders always name their objects");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(object)).await?)
}

async fn reconcile_inner(dc: &DistroCache, ctx: &Context) -> Result<Action, Error> {
    let ns = dc.namespace().expect("DistroCache is namespaced");
    let name = dc.name_any();
    let client = &ctx.client;
    let previous = dc.status.clone();

    if let Err(why) = dc.spec.validate() {
        // Nothing is applied, and the cache that runs keeps running as it
        // is, so the status goes on describing it: its members and epoch are
        // also the ring's backup should the ConfigMap be lost.
        let observed = observe(dc, ctx, &ns).await?;
        let step = Step::Waiting(why.clone());
        let facts = Facts {
            generation: dc.meta().generation,
            desired_replicas: dc.spec.replicas,
            selector: resources::selector_string(dc),
            ring: observed.ring.as_ref(),
            pods: &observed.pods,
            progress: &observed.progress,
            step: &step,
            invalid_spec: Some(&why),
            service_monitor: None,
            certificates: None,
        };
        let status = status::build(&facts, previous.as_ref());
        if !has_condition(previous.as_ref(), status::DEGRADED, "InvalidSpec", &why) {
            publish(
                ctx,
                dc,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                why.clone(),
            )
            .await;
        }
        patch_status(ctx, dc, &status).await?;
        return Ok(Action::requeue(ctx.resync));
    }

    // The children that do not depend on the ring.
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        &resources::node_service_account(dc),
    )
    .await?;
    apply(
        &Api::<Role>::namespaced(client.clone(), &ns),
        &resources::node_role(dc),
    )
    .await?;
    apply(
        &Api::<RoleBinding>::namespaced(client.clone(), &ns),
        &resources::node_role_binding(dc),
    )
    .await?;
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    apply(&services, &resources::peer_service(dc)).await?;
    apply(&services, &resources::client_service(dc)).await?;
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    match resources::pod_disruption_budget(dc) {
        Some(pdb) => {
            apply(&pdbs, &pdb).await?;
        }
        None => delete_if_owned(&pdbs, &name, dc).await?,
    }
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &ns);
    match resources::network_policy(dc, &ctx.operator_namespace) {
        Some(policy) => {
            apply(&policies, &policy).await?;
        }
        None => delete_if_owned(&policies, &name, dc).await?,
    }
    if dc.spec.auth.enabled && dc.spec.auth.secret_name.is_none() {
        ensure_auth_secret(dc, ctx, &ns).await?;
    }
    let service_monitor = reconcile_service_monitor(dc, ctx, &ns).await?;
    if let Some(ServiceMonitorOutcome::Skipped { reason, message }) = &service_monitor
        && !has_condition(previous.as_ref(), status::SERVICE_MONITOR, reason, message)
    {
        publish(
            ctx,
            dc,
            EventType::Warning,
            "ServiceMonitorSkipped",
            "Monitoring",
            message.clone(),
        )
        .await;
    }

    let certificates = reconcile_certificates(dc, ctx, &ns).await?;
    if let Some(ServiceMonitorOutcome::Skipped { reason, message }) = &certificates
        && !has_condition(previous.as_ref(), status::TLS_CERTIFICATES, reason, message)
    {
        publish(
            ctx,
            dc,
            EventType::Warning,
            "CertificatesSkipped",
            "TLS",
            message.clone(),
        )
        .await;
    }

    let observed = observe(dc, ctx, &ns).await?;

    // Decide, then write the ring before the StatefulSet: a scale-down drops
    // members from the ring before their pods go.
    let plan = scaling::plan(&observed);
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    if let Some(doc) = &plan.ring
        && (plan.step.changes_ring() || observed.ring.is_none())
    {
        apply(&configmaps, &resources::ring_configmap(dc, doc)).await?;
        ctx.metrics
            .ring_epoch
            .with_label_values(&[&ns, &name])
            .set(doc.epoch as i64);
    }
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    apply(
        &statefulsets,
        &resources::statefulset(dc, plan.statefulset_replicas, &ctx.default_image),
    )
    .await?;
    // A decision that blocks progress (waiting for members to load or hand
    // off their data, for pods to report, for a lost ring to be rebuilt) is
    // an Event once per reason, as the Progressing condition shows it.
    if let Step::Waiting(why) | Step::RingLost(why) = &plan.step
        && !has_condition(
            previous.as_ref(),
            status::PROGRESSING,
            status::step_reason(&plan.step),
            why,
        )
    {
        tracing::info!(cache = %name, namespace = %ns, step = ?plan.step, "waiting");
        let type_ = match plan.step {
            Step::RingLost(_) => EventType::Warning,
            _ => EventType::Normal,
        };
        publish(
            ctx,
            dc,
            type_,
            status::step_reason(&plan.step),
            "Wait",
            why.clone(),
        )
        .await;
    }
    if plan.step.changes_ring() {
        tracing::info!(cache = %name, namespace = %ns, epoch = plan.ring.as_ref().map(|d| d.epoch), step = ?plan.step, "ring changed");
        publish(
            ctx,
            dc,
            EventType::Normal,
            status::step_reason(&plan.step),
            "Scale",
            format!(
                "{} (ring epoch {})",
                status::step_message(&plan.step),
                plan.ring.as_ref().map_or(0, |d| d.epoch)
            ),
        )
        .await;
    }

    let facts = Facts {
        generation: dc.meta().generation,
        desired_replicas: dc.spec.replicas,
        selector: resources::selector_string(dc),
        ring: plan.ring.as_ref(),
        pods: &observed.pods,
        progress: &observed.progress,
        step: &plan.step,
        invalid_spec: None,
        service_monitor,
        certificates,
    };
    let status = status::build(&facts, previous.as_ref());
    patch_status(ctx, dc, &status).await?;

    // While anything moves, look again soon: node progress is polled, not
    // watched.
    Ok(match plan.step {
        Step::Steady if status.ready_replicas == dc.spec.replicas => Action::requeue(ctx.resync),
        _ => Action::requeue(Duration::from_secs(1)),
    })
}

/// Whether the last status holds condition `type_` with this reason and
/// message (so an Event about it was published already).
fn has_condition(
    status: Option<&DistroCacheStatus>,
    type_: &str,
    reason: &str,
    message: &str,
) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.reason == reason && c.message == message)
    })
}

/// What the cluster holds for this cache: the ring (from its ConfigMap, or
/// rebuilt from the status if the ConfigMap was lost), the StatefulSet's
/// size, the pods, and the progress of the nodes. Reads only.
async fn observe(dc: &DistroCache, ctx: &Context, ns: &str) -> Result<Observed, Error> {
    let client = &ctx.client;
    let previous = dc.status.as_ref();
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let mut ring = match configmaps
        .get_opt(&resources::ring_configmap_name(dc))
        .await?
        .and_then(|cm| cm.data?.remove(CONFIGMAP_KEY))
    {
        Some(json) => Some(
            MembershipDoc::from_json(json.as_bytes()).map_err(|e| Error::BadRing(e.to_string()))?,
        ),
        None => None,
    };
    let mut ring_recovered = false;
    let last_epoch = previous.map_or(0, |s| s.ring_epoch.max(0) as u64);
    if ring.is_none()
        && let Some(recovered) =
            previous.and_then(|s| ring_from_status(s, dc.spec.replication_factor as u32))
    {
        // The ConfigMap was deleted under a running cache: rebuild the ring
        // from the status rather than start over, which would strand data.
        ring = Some(recovered);
        ring_recovered = true;
    }
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(&dc.name_any())
        .await?;
    let pods = observe_pods(dc, ctx, ns).await?;
    // The members' progress; without a ring, every pod's, since each says
    // which ring it holds (none for a new node).
    let asked: Vec<(String, String)> = match &ring {
        Some(doc) => doc
            .members
            .iter()
            .filter_map(|m| Some((m.id.clone(), pods.get(&m.id)?.client.clone()?)))
            .collect(),
        None => pods
            .iter()
            .filter_map(|(id, pod)| Some((id.clone(), pod.client.clone()?)))
            .collect(),
    };
    // Under TLS the client port speaks HTTPS only; progress is read on the
    // plain probe port, which serves it and nothing of the data.
    let asked = if dc.spec.tls.enabled() {
        asked
            .into_iter()
            .filter_map(|(id, client)| {
                // `ip:port` or `[ipv6]:port`: the host part keeps its brackets.
                let (host, _) = client.rsplit_once(':')?;
                Some((id, format!("{host}:{}", dc.spec.tls.probe_port)))
            })
            .collect()
    } else {
        asked
    };
    let progress = ctx.nodes.progress(&asked).await;
    Ok(Observed {
        name: dc.name_any(),
        desired_replicas: dc.spec.replicas,
        replication_factor: dc.spec.replication_factor as u32,
        ring,
        ring_recovered,
        last_epoch,
        statefulset_replicas: sts.as_ref().and_then(|s| s.spec.as_ref()?.replicas),
        pods,
        progress,
    })
}

/// The pods of this cache, keyed by name.
async fn observe_pods(
    dc: &DistroCache,
    ctx: &Context,
    ns: &str,
) -> Result<BTreeMap<String, PodView>, Error> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default().labels(&resources::selector_string(dc)))
        .await?;
    let join = |ip: &str, port: i32| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    Ok(pods
        .into_iter()
        .filter_map(|pod| {
            let name = pod.name_any();
            let ordinal = resources::ordinal(dc, &name)?;
            let status = pod.status.as_ref();
            let ip = status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty());
            // A pod being deleted counts as not started: its process is on
            // its way out, and once gone the StatefulSet makes a new one
            // under the same name. Taken as live, a re-grow could add the old
            // process to the ring as joining and mark it active on its word.
            let running = status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && pod.metadata.deletion_timestamp.is_none();
            let ready = running
                && status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let ip = ip.filter(|_| running);
            Some((
                name,
                PodView {
                    ordinal,
                    address: ip.as_deref().map(|ip| join(ip, dc.spec.peer_port)),
                    client: ip.as_deref().map(|ip| join(ip, dc.spec.port)),
                    ready,
                },
            ))
        })
        .collect())
}

/// The ring as the status last recorded it (members and states). The status
/// does not record the replication factor; the spec's is the one last
/// applied, since a change of it is a ring change of its own.
fn ring_from_status(status: &DistroCacheStatus, replication_factor: u32) -> Option<MembershipDoc> {
    if status.ring_epoch <= 0 || status.members.is_empty() {
        return None;
    }
    let members = status
        .members
        .iter()
        .map(|m| Member {
            id: m.pod.clone(),
            address: m.address.clone(),
            // Not recorded in the status: the next plan fills it in from
            // the pod (see `scaling`, step 1).
            client_address: None,
            state: match m.state.as_str() {
                "joining" => MemberState::Joining,
                "leaving" => MemberState::Leaving,
                _ => MemberState::Active,
            },
        })
        .collect();
    Some(MembershipDoc {
        epoch: status.ring_epoch as u64,
        replication_factor,
        hashing: Default::default(),
        members,
    })
}

/// Creates the generated token Secret if it does not exist yet. Only ever
/// created, never read or updated (the operator needs no read access to
/// Secrets, and tokens never change under running nodes).
async fn ensure_auth_secret(dc: &DistroCache, ctx: &Context, ns: &str) -> Result<(), Error> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let secret = resources::generated_auth_secret(dc, || {
        let mut bytes = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut bytes);
        bytes
    });
    match secrets.create(&Default::default(), &secret).await {
        Ok(_) => {
            publish(
                ctx,
                dc,
                EventType::Normal,
                "AuthSecretCreated",
                "Auth",
                format!(
                    "created Secret {} with random tokens",
                    resources::auth_secret_name(dc)
                ),
            )
            .await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether the API server serves the ServiceMonitor kind: `Ok(false)` only
/// when it says it does not (the group or the kind is unknown), `Err` when
/// it could not tell (so nothing claims the CRD is missing on, say, a
/// timeout).
async fn service_monitor_served(client: &Client) -> Result<bool, kube::Error> {
    let gvk =
        kube::api::GroupVersionKind::gvk(resources::SERVICE_MONITOR_GROUP, "v1", "ServiceMonitor");
    match kube::discovery::pinned_kind(client, &gvk).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_served(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A discovery answer meaning "no such API": 404 for the group version, or
/// a group version without the kind.
fn is_not_served(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 404,
        kube::Error::Discovery(
            kube::error::DiscoveryError::MissingKind(_)
            | kube::error::DiscoveryError::MissingApiGroup(_)
            | kube::error::DiscoveryError::MissingResource(_),
        ) => true,
        _ => false,
    }
}

/// Whether the API server serves cert-manager's Certificate kind (as
/// [`service_monitor_served`]).
async fn certificates_served(client: &Client) -> Result<bool, kube::Error> {
    let gvk = kube::api::GroupVersionKind::gvk(resources::CERT_MANAGER_GROUP, "v1", "Certificate");
    match kube::discovery::pinned_kind(client, &gvk).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_served(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Applies the cert-manager Certificates of `spec.tls.certManager`. `None`
/// when not asked for. Until cert-manager fills their Secrets the pods wait
/// for the volumes (the kubelet's doing), which is the honest state: a node
/// must not serve without its certificate.
async fn reconcile_certificates(
    dc: &DistroCache,
    ctx: &Context,
    ns: &str,
) -> Result<Option<ServiceMonitorOutcome>, Error> {
    let wanted = resources::certificates(dc);
    if wanted.is_empty() {
        return Ok(None);
    }
    let resource = resources::certificate_resource();
    match certificates_served(&ctx.client).await {
        Ok(true) => {
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &resource);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            for certificate in &wanted {
                api.patch(&certificate.name_any(), &params, &Patch::Apply(certificate))
                    .await?;
            }
            Ok(Some(ServiceMonitorOutcome::Applied))
        }
        Ok(false) => Ok(Some(ServiceMonitorOutcome::Skipped {
            reason: "CRDNotInstalled",
            message: "spec.tls.certManager is set, but cert-manager's Certificate CRD \
                      (cert-manager.io/v1) is not installed in this cluster: install \
                      cert-manager or name a Secret in spec.tls.secretName"
                .into(),
        })),
        Err(e) => Ok(Some(ServiceMonitorOutcome::Skipped {
            reason: "DiscoveryFailed",
            message: format!(
                "cannot tell whether the API server serves cert-manager Certificates \
                 (cert-manager.io/v1); will retry: {e}"
            ),
        })),
    }
}

/// Applies (or removes) the ServiceMonitor. `None` when not asked for.
async fn reconcile_service_monitor(
    dc: &DistroCache,
    ctx: &Context,
    ns: &str,
) -> Result<Option<ServiceMonitorOutcome>, Error> {
    let resource = resources::service_monitor_resource();
    let served = service_monitor_served(&ctx.client).await;
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &resource);
    match (resources::service_monitor(dc), served) {
        (Some(sm), Ok(true)) => {
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&dc.name_any(), &params, &Patch::Apply(&sm))
                .await?;
            Ok(Some(ServiceMonitorOutcome::Applied))
        }
        (Some(_), Ok(false)) => Ok(Some(ServiceMonitorOutcome::Skipped {
            reason: "CRDNotInstalled",
            message: "monitoring.serviceMonitor.enabled is set, but the ServiceMonitor CRD \
                      (monitoring.coreos.com/v1) is not installed in this cluster"
                .into(),
        })),
        (Some(_), Err(e)) => Ok(Some(ServiceMonitorOutcome::Skipped {
            reason: "DiscoveryFailed",
            message: format!(
                "cannot tell whether the API server serves ServiceMonitors \
                 (monitoring.coreos.com/v1); will retry: {e}"
            ),
        })),
        (None, Ok(true)) => {
            delete_if_owned(&api, &dc.name_any(), dc).await?;
            Ok(None)
        }
        // Nothing to remove, or no way to know yet: the next pass retries.
        (None, _) => Ok(None),
    }
}

/// Deletes a child the spec no longer asks for, if this cache owns it.
async fn delete_if_owned<K>(api: &Api<K>, name: &str, dc: &DistroCache) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = api.get_opt(name).await? else {
        return Ok(());
    };
    let ours = object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == dc.meta().uid.as_ref());
    if ours {
        api.delete(name, &Default::default()).await?;
    }
    Ok(())
}

async fn patch_status(
    ctx: &Context,
    dc: &DistroCache,
    status: &DistroCacheStatus,
) -> Result<(), Error> {
    observe_conditions(ctx, dc, status);
    if dc.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api =
        Api::<DistroCache>::namespaced(ctx.client.clone(), &dc.namespace().expect("namespaced"));
    api.patch_status(
        &dc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// The cache's conditions as the `distrocache_operator_cache_condition`
/// gauge (1 for True), set on every reconcile so that a restarted or newly
/// elected operator reports them too.
fn observe_conditions(ctx: &Context, dc: &DistroCache, status: &DistroCacheStatus) {
    let ns = dc.namespace().unwrap_or_default();
    let name = dc.name_any();
    for c in &status.conditions {
        ctx.metrics
            .cache_condition
            .with_label_values(&[&ns, &name, &c.type_])
            .set(i64::from(c.status == "True"));
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;
    use kube::error::DiscoveryError;

    use super::*;

    #[test]
    fn only_a_real_not_found_means_the_service_monitor_crd_is_missing() {
        let api = |code| kube::Error::Api(Status::failure("x", "y").with_code(code).boxed());
        assert!(is_not_served(&api(404)));
        assert!(is_not_served(&kube::Error::Discovery(
            DiscoveryError::MissingKind("ServiceMonitor".into())
        )));
        // The API server could not tell: nothing claims the CRD is missing.
        assert!(!is_not_served(&api(403)));
        assert!(!is_not_served(&api(503)));
        assert!(!is_not_served(&kube::Error::Discovery(
            DiscoveryError::InvalidGroupVersion("x".into())
        )));
    }

    #[test]
    fn a_namespace_list_is_one_watch_each_and_empty_is_all() {
        assert_eq!(Scope::from_list(&[]), Scope::All);
        assert_eq!(Scope::from_list(&["".into()]), Scope::All);
        assert_eq!(Scope::All.watches(), vec![None]);
        let scope = Scope::from_list(&["a".into(), " b ".into()]);
        assert_eq!(
            scope.watches(),
            vec![Some("a".to_string()), Some("b".to_string())]
        );
    }

    #[test]
    fn each_reconcile_gets_its_own_w3c_shaped_trace_id() {
        let a = trace_id();
        let b = trace_id();
        assert_eq!(a.len(), 32, "{a}");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
        assert_ne!(a, b);
    }
}

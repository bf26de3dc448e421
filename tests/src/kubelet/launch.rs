//! What a container's process is started with: the executable from the image
//! table, the arguments, and the environment, resolved the way a kubelet
//! resolves them.
//!
//! - Executable: the image table's binary. `command[0]`, if set, names a
//!   file inside the image, which does not exist here, so it is ignored; the
//!   rest of `command`, then `args`, are the arguments.
//! - Environment, in this order (later wins): `PATH`, `HOME` (the pod's
//!   directory), `HOSTNAME`, `KUBECONFIG` (the pod's service-account
//!   kubeconfig, standing in for the token a real kubelet mounts), `envFrom`,
//!   `env` (literal values with `$(VAR)` expansion, `fieldRef`,
//!   `secretKeyRef`, `configMapKeyRef`), then the image table's variables with
//!   their placeholders replaced.
//! - `$(VAR)` in `command` and `args` expands against that environment.
//! - Volumes: a `secret` volume mounted by the container is written to
//!   `<pod dir>/volumes/<volume>/<key>`; an `emptyDir` is the directory
//!   `<pod dir>/volumes/<volume>` (gone with the pod); a
//!   `persistentVolumeClaim` is the directory
//!   `<kubelet dir>/claims/<namespace>/<claim>-<claim uid>`, which outlives
//!   the pod, so a StatefulSet's pod that comes back finds its claim's files
//!   as on a real volume, and a claim deleted and created again starts empty
//!   (no provisioner or binding is involved; the claim must exist, or the
//!   pod does not start). Processes here
//!   share one filesystem, so the mount path cannot be honoured as such;
//!   instead any environment value or argument that starts with the mount
//!   path is rewritten to the materialised directory (e.g. a `--token-file`
//!   pointing into the mount). Other volume types are ignored. While the
//!   container runs, secret volumes are brought up to date with their
//!   Secrets every second (a real kubelet's periodic sync of mounted
//!   Secrets, sped up).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVarSource, PersistentVolumeClaim, Pod, Secret,
};
use kube::{Api, Client};

use super::images::Program;

/// Everything needed to start the process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Facts about the pod that placeholders and field references read.
pub(crate) struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub node_name: &'a str,
    pub dir: &'a Path,
    pub kubeconfig: Option<&'a Path>,
}

impl PodFacts<'_> {
    fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }
}

/// Resolves the launch of `container`. Errors are messages for the
/// container's `CreateContainerConfigError` status.
pub(crate) async fn resolve(
    client: &Client,
    facts: &PodFacts<'_>,
    container: &Container,
    program: &Program,
) -> Result<Launch, String> {
    let mut env = Env::default();
    env.set(
        "PATH",
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    );
    env.set("HOME", facts.dir.display().to_string());
    let hostname = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| facts.name().to_string());
    env.set("HOSTNAME", hostname);
    if let Some(kubeconfig) = facts.kubeconfig {
        env.set("KUBECONFIG", kubeconfig.display().to_string());
    }

    let namespace = facts.namespace();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        if let Some(r) = &source.config_map_ref {
            let optional = r.optional.unwrap_or(false);
            if let Some(data) = config_map_data(client, namespace, &r.name, optional).await? {
                for (k, v) in data {
                    env.set(format!("{prefix}{k}"), v);
                }
            }
        }
        if let Some(r) = &source.secret_ref {
            let optional = r.optional.unwrap_or(false);
            if let Some(data) = secret_data(client, namespace, &r.name, optional).await? {
                for (k, v) in data {
                    env.set(format!("{prefix}{k}"), v);
                }
            }
        }
    }

    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => match value_from(client, facts, from).await? {
                Some(value) => value,
                None => continue, // an optional reference that is absent
            },
            (Some(value), None) => expand(value, |name| env.get(name)),
            (None, None) => String::new(),
        };
        env.set(var.name.clone(), value);
    }

    for (name, value) in &program.env {
        env.set(name.clone(), placeholders(value, facts));
    }

    let mounts = volumes(client, facts, container, Materialise::All).await?;
    let remount = |value: String| -> String {
        for (mount_path, dir) in &mounts {
            if let Some(rest) = value.strip_prefix(mount_path.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", dir.display());
            }
        }
        value
    };
    for slot in env.vars.iter_mut() {
        slot.1 = remount(std::mem::take(&mut slot.1));
    }
    let args = container
        .command
        .iter()
        .flatten()
        .skip(1)
        .chain(container.args.iter().flatten())
        .map(|arg| remount(expand(arg, |name| env.get(name))))
        .collect();
    Ok(Launch {
        binary: program.binary.clone(),
        args,
        env: env.vars,
    })
}

/// An ordered environment where setting a name again replaces its value.
#[derive(Default)]
struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.vars.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name, value)),
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

async fn value_from(
    client: &Client,
    facts: &PodFacts<'_>,
    from: &EnvVarSource,
) -> Result<Option<String>, String> {
    let namespace = facts.namespace();
    if let Some(field) = &from.field_ref {
        return field_value(facts, &field.field_path).map(Some);
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        let data = secret_data(client, namespace, &r.name, optional).await?;
        return match data.and_then(|mut data| data.remove(&r.key)) {
            Some(value) => Ok(Some(value)),
            None if optional => Ok(None),
            None => Err(format!("secret {:?} has no key {:?}", r.name, r.key)),
        };
    }
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        let data = config_map_data(client, namespace, &r.name, optional).await?;
        return match data.and_then(|mut data| data.remove(&r.key)) {
            Some(value) => Ok(Some(value)),
            None if optional => Ok(None),
            None => Err(format!("configmap {:?} has no key {:?}", r.name, r.key)),
        };
    }
    Err("only fieldRef, secretKeyRef and configMapKeyRef are supported by the test kubelet".into())
}

/// The downward API's `fieldRef` paths.
fn field_value(facts: &PodFacts<'_>, path: &str) -> Result<String, String> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    let map_entry = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default(),
        )
    };
    Ok(match path {
        "metadata.name" => facts.name().to_string(),
        "metadata.namespace" => facts.namespace().to_string(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => facts.node_name.to_string(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => facts.ip.to_string(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_string(),
        _ => map_entry(&meta.labels, "metadata.labels")
            .or_else(|| map_entry(&meta.annotations, "metadata.annotations"))
            .ok_or_else(|| format!("fieldRef {path:?} is not supported by the test kubelet"))?,
    })
}

/// Which of a container's volumes [`volumes`] materialises.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Materialise {
    /// Every volume: when the container starts.
    All,
    /// Secret volumes only: the periodic sync of a running container.
    Secrets,
}

/// Materialises the container's volumes (see the module's doc); returns
/// (mount path, directory) pairs, longest mount path first.
async fn volumes(
    client: &Client,
    facts: &PodFacts<'_>,
    container: &Container,
    which: Materialise,
) -> Result<Vec<(String, PathBuf)>, String> {
    let volumes = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut mounts = Vec::new();
    let create = |dir: &Path| -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))
    };
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = volumes.iter().find(|v| v.name == mount.name) else {
            continue;
        };
        let mount_path = mount.mount_path.trim_end_matches('/').to_string();
        if which == Materialise::Secrets && volume.secret.is_none() {
            continue;
        }
        if let Some(claim) = &volume.persistent_volume_claim {
            let root = facts
                .dir
                .parent()
                .ok_or("the pod directory has no parent")?;
            let uid = claim_uid(client, facts.namespace(), &claim.claim_name).await?;
            let dir = root
                .join("claims")
                .join(facts.namespace())
                .join(format!("{}-{uid}", claim.claim_name));
            create(&dir)?;
            mounts.push((mount_path, dir));
            continue;
        }
        if volume.empty_dir.is_some() {
            let dir = facts.dir.join("volumes").join(&mount.name);
            create(&dir)?;
            mounts.push((mount_path, dir));
            continue;
        }
        let Some(secret) = volume.secret.as_ref() else {
            continue;
        };
        let name = secret.secret_name.clone().unwrap_or_default();
        let optional = secret.optional.unwrap_or(false);
        let Some(data) = secret_data(client, facts.namespace(), &name, optional).await? else {
            continue;
        };
        let dir = facts.dir.join("volumes").join(&mount.name);
        write_volume(&dir, &data)?;
        mounts.push((mount.mount_path.trim_end_matches('/').to_string(), dir));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    Ok(mounts)
}

/// The uid of claim `name`: its directory is tied to the claim object, so
/// a claim deleted (e.g. by the StatefulSet's retention policy) and created
/// again starts empty, as a newly provisioned volume would.
async fn claim_uid(client: &Client, namespace: &str, name: &str) -> Result<String, String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    match claims.get_opt(name).await {
        Ok(Some(claim)) => claim
            .metadata
            .uid
            .ok_or_else(|| format!("persistentvolumeclaim {name:?} has no uid")),
        Ok(None) => Err(format!("persistentvolumeclaim {name:?} not found")),
        Err(e) => Err(format!("get persistentvolumeclaim {name:?}: {e}")),
    }
}

/// Brings the container's materialised secret volumes up to date with
/// their Secrets, as a real kubelet does periodically for mounted Secrets
/// (which is how a rotated Secret reaches a running process without a
/// restart). A Secret that is gone leaves its files as they are.
pub(crate) async fn sync_secret_volumes(
    client: &Client,
    facts: &PodFacts<'_>,
    container: &Container,
) -> Result<(), String> {
    volumes(client, facts, container, Materialise::Secrets)
        .await
        .map(drop)
}

/// Writes `data` as one file per key into `dir`: only files whose content
/// differs, each replaced atomically (written beside it, then renamed), so
/// a process polling the files never reads half a file. Files of keys no
/// longer in `data` are removed.
fn write_volume(dir: &Path, data: &BTreeMap<String, String>) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    for (key, value) in data {
        let file = dir.join(key);
        if std::fs::read(&file).is_ok_and(|old| old == value.as_bytes()) {
            continue;
        }
        let staged = dir.join(format!("..{key}.tmp"));
        std::fs::write(&staged, value)
            .and_then(|()| std::fs::rename(&staged, &file))
            .map_err(|e| format!("write {}: {e}", file.display()))?;
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !data.contains_key(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.get_opt(name).await {
        Ok(Some(secret)) => Ok(Some(
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect(),
        )),
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("secret {name:?} not found")),
        Err(e) => Err(format!("get secret {name:?}: {e}")),
    }
}

async fn config_map_data(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match maps.get_opt(name).await {
        Ok(Some(map)) => Ok(Some(map.data.unwrap_or_default())),
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!("configmap {name:?} not found")),
        Err(e) => Err(format!("get configmap {name:?}: {e}")),
    }
}

/// Replaces the image table's placeholders.
fn placeholders(value: &str, facts: &PodFacts<'_>) -> String {
    value
        .replace("{podIP}", &facts.ip.to_string())
        .replace("{podName}", facts.name())
        .replace("{namespace}", facts.namespace())
        .replace("{podDir}", &facts.dir.display().to_string())
        .replace(
            "{kubeconfig}",
            &facts
                .kubeconfig
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        )
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an
/// undefined reference is kept as written, and `$$` is a literal `$`.
pub(crate) fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(close) => {
                    let name = &inner[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => out.push_str(&rest[dollar..dollar + 2 + close + 1]),
                    }
                    rest = &inner[close + 1..];
                }
                None => {
                    out.push_str(&rest[dollar..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("127.0.0.10".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expand_follows_kubernetes_rules() {
        assert_eq!(
            expand("--addr=$(POD_IP):80", lookup),
            "--addr=127.0.0.10:80"
        );
        assert_eq!(expand("$(MISSING)", lookup), "$(MISSING)");
        assert_eq!(expand("$$(POD_IP)", lookup), "$(POD_IP)");
        assert_eq!(expand("a$b", lookup), "a$b");
        assert_eq!(expand("end$", lookup), "end$");
        assert_eq!(expand("$(POD_IP", lookup), "$(POD_IP");
        assert_eq!(expand("x$(EMPTY)y", lookup), "xy");
        assert_eq!(expand("é$(POD_IP)é", lookup), "é127.0.0.10é");
    }

    #[test]
    fn later_settings_replace_earlier_ones_in_place() {
        let mut env = Env::default();
        env.set("A", "1");
        env.set("B", "2");
        env.set("A", "3");
        assert_eq!(
            env.vars,
            vec![("A".into(), "3".into()), ("B".into(), "2".into())]
        );
    }
}

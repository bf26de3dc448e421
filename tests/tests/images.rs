//! The container images as they ship (issue 14), built by the test command
//! without a Docker daemon (`scripts/build-images.sh`, into OCI layouts in
//! `target/images/`): what is in them and how they are configured, that the
//! Dockerfiles describe the same image, and that a real OCI runtime (runc)
//! runs them under the pods' security context: the cache node serves its
//! health endpoint and a write and a read, the operator answers `--help`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use distrocache_operator::crd::{DistroCache, DistroCacheSpec};
use distrocache_operator::resources;
use distrocache_tests::distrocache::workspace_root;
use distrocache_tests::oci::runtime::{Container, SecurityContext};
use distrocache_tests::oci::{self, Image};
use distrocache_tests::{procs, wait};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodSpec;
use serde_json::json;

/// The non-root user both images run as.
const USER: u32 = 65532;
/// Sanity bound on an image's compressed size (a static binary or two).
const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

struct Expected {
    image: &'static str,
    binary: &'static str,
    ports: &'static [&'static str],
    dockerfile: &'static str,
}

const IMAGES: [Expected; 2] = [
    Expected {
        image: "cache-node",
        binary: "cache-node",
        ports: &["8080/tcp", "8081/tcp"],
        dockerfile: "cache-node/Dockerfile",
    },
    Expected {
        image: "operator",
        binary: "distrocache-operator",
        ports: &["8081/tcp"],
        dockerfile: "operator/Dockerfile",
    },
];

#[test]
fn both_images_are_static_non_root_and_match_their_dockerfiles() -> Result<()> {
    for want in &IMAGES {
        let image = oci::open(want.image, oci::host_arch())?;
        let entrypoint = format!("/usr/local/bin/{}", want.binary);
        assert_eq!(image.user()?, (USER, USER), "{}: User", want.image);
        assert_eq!(image.entrypoint(), [entrypoint.as_str()], "{}", want.image);
        assert!(
            image.config["config"]["Cmd"].is_null(),
            "{}: no Cmd",
            want.image
        );
        assert_eq!(image.exposed_ports(), want.ports, "{}", want.image);
        assert_eq!(
            image.config["config"]["Labels"]["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION"),
            "{}",
            want.image
        );

        // Exactly the binary and the user's passwd/group entries, owned by
        // root, nothing setuid or setgid, no shell.
        let entries = image.entries()?;
        let mut files: Vec<&str> = entries
            .iter()
            .filter(|e| e.kind.is_file())
            .map(|e| e.path.as_str())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["etc/group", "etc/passwd", &entrypoint[1..]],
            "{}: {entries:#?}",
            want.image
        );
        for e in &entries {
            assert_eq!((e.uid, e.gid), (0, 0), "{}: {e:?}", want.image);
            assert_eq!(e.mode & 0o6000, 0, "{}: setuid/setgid {e:?}", want.image);
            assert_eq!(e.mode & 0o002, 0, "{}: world-writable {e:?}", want.image);
        }
        let binary = entries.iter().find(|e| e.path == entrypoint[1..]).unwrap();
        assert_eq!(binary.mode & 0o777, 0o755, "{binary:?}");

        let root = tempfile::tempdir()?;
        image.unpack(root.path())?;
        let passwd = std::fs::read_to_string(root.path().join("etc/passwd"))?;
        assert!(
            passwd.contains(&format!("nonroot:x:{USER}:{USER}:")),
            "{passwd}"
        );
        let interpreter = oci::elf_interpreter(&root.path().join(&entrypoint[1..]))?;
        assert_eq!(
            interpreter, None,
            "{}: a static binary runs on an empty base",
            want.image
        );

        // The Dockerfile builds the same: same rootfs script, same config.
        let stage = oci::dockerfile_final_stage(&workspace_root().join(want.dockerfile))?;
        assert_eq!(stage.from, "scratch", "{}", want.dockerfile);
        assert_eq!(stage.user, format!("{USER}:{USER}"), "{}", want.dockerfile);
        assert_eq!(stage.exposed_ports, want.ports, "{}", want.dockerfile);
        assert_eq!(
            stage.entrypoint,
            [entrypoint.as_str()],
            "{}",
            want.dockerfile
        );
        assert!(
            stage
                .build_runs
                .iter()
                .any(|r| r.contains(&format!("scripts/build-images.sh rootfs {} ", want.image))),
            "{}: the build stage lays the image out with scripts/build-images.sh: {:?}",
            want.dockerfile,
            stage.build_runs
        );

        let size = image.compressed_size();
        eprintln!(
            "image {} (linux/{}): {} layer(s), {:.1} MiB compressed, {:.1} MiB unpacked",
            want.image,
            oci::host_arch(),
            image.layers.len(),
            size as f64 / 1048576.0,
            entries.iter().map(|e| e.size).sum::<u64>() as f64 / 1048576.0
        );
        assert!(size < MAX_IMAGE_BYTES, "{}: {size} bytes", want.image);
    }
    Ok(())
}

/// The pod a cache's StatefulSet runs, as the operator builds it.
fn cache_pod() -> Result<PodSpec> {
    let spec: DistroCacheSpec = serde_json::from_value(json!({}))?;
    let mut dc = DistroCache::new("images", spec);
    dc.metadata.namespace = Some("default".into());
    dc.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    let sts = resources::statefulset(&dc, 1, "ghcr.io/distrocache/cache-node:test");
    sts.spec
        .and_then(|s| s.template.spec)
        .context("the StatefulSet has a pod template")
}

/// The operator's pod, as `manifests/30-operator.yaml` runs it.
fn operator_pod() -> Result<PodSpec> {
    let text = std::fs::read_to_string(workspace_root().join("manifests/30-operator.yaml"))?;
    let deployment: Deployment = serde_yaml::from_str(&text)?;
    deployment
        .spec
        .and_then(|s| s.template.spec)
        .context("the Deployment has a pod template")
}

/// One `Key: value` line of /proc/<pid>/status.
fn proc_status(pid: u32, key: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Checks, from the host, that the container's process runs as the pod
/// says: its user, no capabilities, no privilege escalation, `/` read-only.
fn assert_confined(pid: u32, security: &SecurityContext) -> Result<()> {
    let uid = proc_status(pid, "Uid")?;
    let want = security.uid.to_string();
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        [want.as_str(); 4],
        "real, effective, saved and filesystem uid"
    );
    assert_eq!(proc_status(pid, "CapEff")?, "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm")?, "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs")?, "1");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .context("no / in the container's mountinfo")?;
    let options = root.split_whitespace().nth(5).unwrap_or_default();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "the root filesystem is read-only: {root}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_node_image_serves_under_the_pods_security_context() -> Result<()> {
    let image: Image = oci::open("cache-node", oci::host_arch())?;
    let pod = cache_pod()?;
    let security = SecurityContext::of(&pod, &pod.containers[0], &image)?;
    assert_eq!(
        (security.uid, security.gid),
        (USER, USER),
        "no runAsUser: the image's"
    );
    assert!(security.read_only_root && security.no_new_privileges);
    assert!(security.capabilities.is_empty(), "{security:?}");

    let port = procs::free_port()?;
    let port_arg = port.to_string();
    let mut container = Container::start(
        &image,
        &["--bind-address", "127.0.0.1", "--port", &port_arg],
        &[("DISTROCACHE_NODE_ID", "image-test")],
        &security,
    )?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let started = std::time::Instant::now();
    wait::until(
        "the containerised node to listen",
        Duration::from_secs(30),
        || {
            let exited = container.exited();
            let log = container.log();
            async move {
                ensure!(exited.is_none(), "the container exited ({exited:?}): {log}");
                Ok(procs::port_open(addr).then_some(()))
            }
        },
    )
    .await?;
    eprintln!(
        "runc run of the cache-node image: listening after {:.2?}",
        started.elapsed()
    );
    assert_confined(container.pid()?, &security)?;

    let http = reqwest::Client::builder().no_proxy().build()?;
    let health = http
        .get(format!("http://{addr}/api/v1/health"))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    let health: serde_json::Value = health.json().await?;
    assert_eq!(health["status"], "healthy", "{health}");
    let written = http
        .post(format!("http://{addr}/api/v1/cache/image:key"))
        .json(&json!({"value": {"from": "the image"}, "tags": ["t"]}))
        .send()
        .await?;
    assert_eq!(written.status(), 201);
    let read: serde_json::Value = http
        .get(format!("http://{addr}/api/v1/cache/image:key"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(read["value"]["from"], "the image", "{read}");
    eprintln!("health: {health}\nread back: {read}");
    assert!(container.exited().is_none(), "{}", container.log());
    Ok(())
}

#[test]
fn the_operator_image_answers_help_under_the_pods_security_context() -> Result<()> {
    let image = oci::open("operator", oci::host_arch())?;
    let pod = operator_pod()?;
    let security = SecurityContext::of(&pod, &pod.containers[0], &image)?;
    assert_eq!((security.uid, security.gid), (USER, USER));
    assert!(security.read_only_root && security.no_new_privileges);
    assert!(security.capabilities.is_empty(), "{security:?}");
    let mut container = Container::start(&image, &["--help"], &[], &security)?;
    let status = container
        .wait(Duration::from_secs(30))
        .context("--help did not exit within 30 s")?;
    let out = container.log();
    assert!(status.success(), "{status:?}: {out}");
    for flag in [
        "--default-image",
        "--namespace",
        "--leader-elect",
        "--resync",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}: {out}");
    }
    eprintln!(
        "runc run of the operator image with --help: {status}; first lines:\n{}",
        out.lines().take(4).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

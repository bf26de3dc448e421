//! The binaries the playground runs: the control plane's (built from Go
//! modules by scripts/build-control-plane.sh, the one way they are built,
//! cached outside the clone) and the workspace's cache-node and operator
//! (built by scripts/playground.sh with cargo). A failure is explained in one
//! line: no Go toolchain, a Go too old, or which binary failed to build and
//! where the full log is.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use distrocache_tests::Binaries;
use distrocache_tests::distrocache::{workspace_bin, workspace_root};
use distrocache_tests::procs;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The Go version the wrapper modules in tests/k8s/ ask for.
const GO_NEEDED: &str = "1.24";

/// What building the control plane did.
pub struct Built {
    pub binaries: Binaries,
    /// "cached in <dir>" or "built in <time>, in <dir>".
    pub summary: String,
}

/// Runs scripts/build-control-plane.sh (which skips what is cached and up
/// to date), streaming its progress, then finds the binaries.
pub async fn control_plane(no_build: bool) -> Result<Built> {
    if no_build {
        let binaries = Binaries::locate().map_err(|e| one_line(&e))?;
        let summary = format!("as they are in {}", binaries.dir.display());
        return Ok(Built { binaries, summary });
    }
    if procs::find_on_path("go").is_none() && Binaries::locate().is_err() {
        bail!("{}", no_go());
    }
    let cache = Binaries::default_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let log_path = cache.join("build-control-plane.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new("bash")
        .arg(workspace_root().join("scripts/build-control-plane.sh"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().context("duplicate the log's handle")?)
        // Its own process group, so that stopping the playground mid-build
        // stops `go build` too, not only the script.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("run bash scripts/build-control-plane.sh")?;
    let mut group = KillGroupOnDrop(child.id());
    let stdout = child.stdout.take().context("the script's stdout")?;
    let mut log = tokio::fs::File::from_std(log);
    let mut lines = BufReader::new(stdout).lines();
    let mut last_line = String::new();
    let mut built_any = false;
    while let Some(line) = lines
        .next_line()
        .await
        .context("read the script's output")?
    {
        log.write_all(format!("{line}\n").as_bytes()).await?;
        if line.contains(": building") || line.contains(": built") {
            built_any = true;
            println!("      {}", line.trim());
        }
        last_line = line;
    }
    log.flush().await?;
    let status = child.wait().await.context("wait for the build script")?;
    // Reaped: its group id may be reused from now on.
    group.0 = None;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_else(|e| format!("({e})"));
        bail!("{}", explain_failure(&text, &log_path));
    }
    let dir = PathBuf::from(last_line.trim());
    let binaries = Binaries::locate_in(&dir).map_err(|e| one_line(&e))?;
    let summary = if built_any {
        format!(
            "built in {:.0?}, in {}",
            started.elapsed(),
            binaries.dir.display()
        )
    } else {
        format!("cached in {}", binaries.dir.display())
    };
    Ok(Built { binaries, summary })
}

/// The workspace's cache-node and operator binaries.
pub fn workspace_binaries() -> Result<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        workspace_bin(name).map_err(|_| {
            anyhow!(
                "the {name} binary is not built: start the playground with \
                 `bash scripts/playground.sh`, which builds it (or run \
                 `cargo build --workspace --bins` first)"
            )
        })
    };
    Ok((find("cache-node")?, find("distrocache-operator")?))
}

fn no_go() -> String {
    format!(
        "no Go toolchain on PATH: the control plane (kube-apiserver, etcd...) is built \
         once from Go modules; install Go {GO_NEEDED} or newer (https://go.dev/dl/) and \
         start again"
    )
}

/// One line saying why the build script failed, from its log.
fn explain_failure(log: &str, log_path: &Path) -> String {
    if log.contains("go: command not found") || log.contains("go: not found") {
        return no_go();
    }
    if let Some(line) = log.lines().find(|l| l.contains("requires go >=")) {
        return format!(
            "your Go toolchain is too old for the control plane ({}): install Go \
             {GO_NEEDED} or newer (https://go.dev/dl/) and start again",
            line.trim()
        );
    }
    let binary = log
        .lines()
        .rev()
        .find_map(|l| l.trim().split_once(": building").map(|(name, _)| name))
        .and_then(|name| name.split_whitespace().next());
    let reason = log
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.contains(": building"))
        .unwrap_or("no output");
    match binary {
        Some(binary) => format!(
            "the control plane binary {binary} failed to build ({reason}); the full log is {}",
            log_path.display()
        ),
        None => format!(
            "scripts/build-control-plane.sh failed ({reason}); the full log is {}",
            log_path.display()
        ),
    }
}

/// An error's chain on one line.
fn one_line(e: &anyhow::Error) -> anyhow::Error {
    anyhow!(
        "{}",
        format!("{e:#}")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Kills a process group when dropped (a no-op once it has exited).
struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: plain killpg(2) on the group this module created.
            unsafe {
                libc::killpg(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "  kube-apiserver v1.34.4: cached\n  \
                       kube-controller-manager v1.34.4: building (the first build takes several minutes)\n\
                       go: downloading k8s.io/api v0.34.4\n\
                       # k8s.io/kubernetes/cmd/kube-controller-manager\n\
                       link: out of memory\n";

    #[test]
    fn a_failed_build_names_the_binary_and_the_last_error() {
        let message = explain_failure(LOG, Path::new("/c/build.log"));
        assert_eq!(
            message,
            "the control plane binary kube-controller-manager failed to build \
             (link: out of memory); the full log is /c/build.log"
        );
    }

    #[test]
    fn missing_or_old_go_is_said_so() {
        let missing = explain_failure(
            "  etcd v3.6.4: building\nscripts/build-control-plane.sh: line 38: go: command not found\n",
            Path::new("/l"),
        );
        assert!(missing.starts_with("no Go toolchain on PATH"), "{missing}");
        let old = explain_failure(
            "  etcd v3.6.4: building\ngo: go.mod requires go >= 1.24.0 (running go 1.19.8; GOTOOLCHAIN=local)\n",
            Path::new("/l"),
        );
        assert!(old.starts_with("your Go toolchain is too old"), "{old}");
        assert!(old.contains("running go 1.19.8"), "{old}");
    }

    #[test]
    fn errors_are_one_line() {
        let e = one_line(&anyhow!("a\nb").context("c"));
        assert_eq!(e.to_string(), "c: a b");
    }
}

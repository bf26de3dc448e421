//! The one way the tests start a cache-node: the real binary as a process,
//! listening where the test says (by default 127.0.0.1 and a port the kernel
//! chooses), which tells the test where it listens through `--address-file`
//! once its listeners are bound. No free-port guessing (binding a port,
//! dropping it and hoping nobody takes it before the node does), no log
//! scraping: the node itself reports its addresses.
//!
//! Every test file that runs nodes (`http_api`, `binary`, `hostile`,
//! `cluster`) builds on [`NodeProc`]; the process is killed when the handle
//! is dropped, and its log (a file) is there for failure messages.

#![allow(dead_code)]

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cache_node::server::BoundAddresses;

/// The cache-node binary. Cargo names it for cache-node's own tests; the
/// CLI's tests (cli/tests/) include this module too and find it in the
/// target directory, next to their own `deps/` folder.
pub fn cache_node_bin() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_cache-node") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary sits in <target>/<profile>/deps")
        .join("cache-node");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p cache-node`; scripts/test.sh does)",
        path.display()
    );
    path
}

/// How long a node may take to bind its listeners before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// What to start: where the node listens, its flags and environment, and
/// where it logs.
pub struct Launch {
    listen: SocketAddr,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            args: Vec::new(),
            env: Vec::new(),
            log: None,
        }
    }
}

impl Launch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listen on `addr` (port 0: the kernel chooses, and the node reports
    /// it). A cluster member restarted keeps its address this way, as a
    /// StatefulSet pod keeps its name.
    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Append the node's stdout and stderr to `path` (kept across restarts
    /// of the same slot) instead of a file in the node's own temporary
    /// directory.
    pub fn log_file(mut self, path: &Path) -> Self {
        self.log = Some(path.to_owned());
        self
    }

    /// Starts the node and waits until it reports its bound addresses.
    /// Fails the test (with the node's log) if it exits or does not bind
    /// within [`START_DEADLINE`].
    pub fn spawn(self) -> NodeProc {
        let dir = tempfile::tempdir().expect("temp dir");
        let address_file = dir.path().join("addresses.json");
        let log = self.log.unwrap_or_else(|| dir.path().join("node.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // The listen address and the address file go by environment, so
        // every test exercises that path and a test's own flags (or later
        // `env` entries) still override them.
        let child = Command::new(cache_node_bin())
            .env("DISTROCACHE_BIND_ADDRESS", self.listen.ip().to_string())
            .env("DISTROCACHE_PORT", self.listen.port().to_string())
            .env("DISTROCACHE_ADDRESS_FILE", &address_file)
            .args(&self.args)
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("log file")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start cache-node");
        let mut node = NodeProc {
            child,
            addr: self.listen,
            peer_addr: None,
            probe_addr: None,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        let bound = loop {
            // The node renames the file into place: it is absent or whole.
            if let Ok(text) = std::fs::read(&address_file) {
                break serde_json::from_slice::<BoundAddresses>(&text)
                    .unwrap_or_else(|e| panic!("address file {text:?}: {e}"));
            }
            if let Some(status) = node.child.try_wait().expect("child status") {
                panic!(
                    "cache-node exited before listening ({status}); log:\n{}",
                    node.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "cache-node did not bind within {START_DEADLINE:?}; log:\n{}",
                node.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        node.addr = bound.client;
        node.peer_addr = bound.peer;
        node.probe_addr = bound.probe;
        node
    }
}

/// A running `cache-node`, killed when dropped.
pub struct NodeProc {
    child: Child,
    /// The client API's address, as the node reported it.
    pub addr: SocketAddr,
    /// The peer API's own address, when it has a port of its own.
    pub peer_addr: Option<SocketAddr>,
    /// The plain-HTTP probe listener's address, with `--probe-port`.
    pub probe_addr: Option<SocketAddr>,
    log: PathBuf,
    /// Holds the address file (and the log, unless one was given).
    _dir: tempfile::TempDir,
}

impl NodeProc {
    /// A node on 127.0.0.1 and a port the kernel chooses, with `flags`.
    pub fn start(flags: &[&str]) -> Self {
        Launch::new().args(flags).spawn()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in bytes, from /proc/<pid>/statm.
    pub fn rss(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid()))
            .expect("the node is running");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("statm has a resident field");
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        pages * u64::try_from(page).unwrap_or(4096)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The whole log so far. The file exists from before the process
    /// starts, so failing to read it fails the test.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| panic!("reading the node's log {}: {e}", self.log.display()))
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        // For failure messages: an unreadable log is said, not a panic
        // inside the panic being reported.
        let text = match std::fs::read_to_string(&self.log) {
            Ok(text) => text,
            Err(e) => return format!("(log {} unreadable: {e})", self.log.display()),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails the test (with the log) if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("child status") {
            panic!("cache-node exited ({status}); log:\n{}", self.log_tail(40));
        }
    }

    /// Sends a signal (e.g. `libc::SIGTERM`, `SIGSTOP`, `SIGCONT`).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own child, not yet reaped (we hold its `Child`).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for the process to exit within `within`; kills it and fails
    /// the test if it does not.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "cache-node still running after {within:?}; log:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log has a line containing `needle` (or fails after
    /// `within`); returns that line.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {within:?}; log:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` and reap (what dropping the handle does; this says so).
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

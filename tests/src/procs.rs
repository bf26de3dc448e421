//! Child processes of the test harness: spawning them so that none outlives the
//! test binary, stopping them (SIGTERM, then SIGKILL), running short commands
//! with a deadline, reading the tail of a log, and picking free loopback ports.
//!
//! Why a spawner thread: a shared control plane lives in a `static` that is
//! never dropped, so its processes are tied to the test process with
//! `prctl(PR_SET_PDEATHSIG, SIGKILL)`. That signal fires when the *thread* that
//! forked the child exits, not the process, and test threads come and go; so
//! long-lived children are forked from one thread that lives as long as the
//! test process.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

type Job = Box<dyn FnOnce() + Send>;

/// The sender to the spawner thread, started on first use.
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("distrocache-spawner".into())
            // Never returns: the receiver lives in the thread and the sender in
            // a static, so the thread ends only with the process.
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("start the process-spawner thread");
        Mutex::new(tx)
    })
}

/// Makes the child receive SIGKILL when the thread that spawns it exits.
///
/// Works on `std::process::Command`; for `tokio::process::Command` pass
/// `cmd.as_std_mut()`. Spawn from a thread that lives as long as the child
/// should (see the module docs).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the forked child before exec and calls only
    // async-signal-safe system calls (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody
            // would ever send the signal, so give up now.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Removes the proxy variables from a command's environment: every address
/// the harness uses is on 127.0.0.0/8 and must be dialled directly (Go
/// programs such as etcd's and the API server's clients honour them).
pub(crate) fn without_proxy(cmd: &mut Command) -> &mut Command {
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Spawns `cmd` from the long-lived spawner thread, with [`die_with_parent`].
pub(crate) fn spawn_tied_to_test_process(mut cmd: Command) -> io::Result<Child> {
    die_with_parent(&mut cmd);
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(cmd.spawn());
    });
    spawner()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread dropped the job"))?
}

/// A long-running child process whose stdout and stderr go to a log file.
/// Dropping it kills the process (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Starts `program` with `args`, logging to `log` (created or truncated).
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Process> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("duplicate the log file handle")?;
        let mut cmd = Command::new(program);
        without_proxy(&mut cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_tied_to_test_process(cmd)
            .with_context(|| format!("start {name} ({})", program.display()))?;
        Ok(Process {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            exit: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has ended (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Sends `signal` unless the process has already been reaped.
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.exited().is_none() {
            // SAFETY: plain kill(2); the pid is ours and not yet reaped, so it
            // cannot belong to another process.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }

    /// Waits up to `timeout` for the process to end.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process at once and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        match self.exit {
            Some(status) => status,
            None => {
                let status = self
                    .child
                    .wait()
                    .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
                self.exit = Some(status);
                status
            }
        }
    }

    /// The last `lines` lines of the process's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGTERM to every process, waits up to `grace` for all of them
/// together, then SIGKILLs whichever is left. Returns the names of those that
/// needed SIGKILL.
pub(crate) fn stop_all(processes: &mut [Process], grace: Duration) -> Vec<String> {
    for p in processes.iter_mut() {
        p.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut killed = Vec::new();
    for p in processes.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if p.wait_timeout(left).is_none() {
            killed.push(p.name.clone());
            p.kill();
        }
    }
    killed
}

/// The last `lines` lines of a text file (or a note saying why there are none).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A TCP port that was free on 127.0.0.1 a moment ago.
///
/// The port is released before the caller binds it, so another process could
/// take it in between; the control plane retries its start when a component
/// reports the address in use.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// An inclusive range of TCP ports, written `FIRST-LAST` (e.g. `30000-30009`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::str::FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<PortRange> {
        let Some((first, last)) = s.split_once('-') else {
            bail!("expected FIRST-LAST, e.g. 30000-30009, not {s:?}");
        };
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|e| anyhow!("{p:?} is not a port: {e}"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first == 0 || first > last {
            bail!("port range {s:?} is empty or starts at 0");
        }
        Ok(PortRange { first, last })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// `count` distinct ports that were free on 127.0.0.1 a moment ago: any the
/// system picks, or the lowest free ones of `range` (so a user who gives a
/// range gets predictable ports). Same race as [`free_port`].
pub fn free_ports(count: usize, range: Option<PortRange>) -> Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(count);
    match range {
        None => {
            while ports.len() < count {
                let port = free_port()?;
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
        Some(range) => {
            for port in range.first..=range.last {
                if ports.len() == count {
                    break;
                }
                if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                    ports.push(port);
                }
            }
            if ports.len() < count {
                bail!(
                    "only {} of the {count} ports needed are free in {range} on 127.0.0.1 \
                     (the others are in use); give a wider or another range",
                    ports.len()
                );
            }
        }
    }
    Ok(ports)
}

/// Runs a short command to completion, killing it after `timeout`. `stdin`,
/// when given, is written to the command's standard input.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output> {
    let program = format!("{:?}", cmd.get_program());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("start {program}"))?;
    // Read both pipes on their own threads so a chatty command cannot block
    // on a full pipe while we wait for it.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that exits without reading its input breaks the pipe;
        // its exit status and stderr tell the caller why, so that error is
        // not the one to report.
        let _ = pipe.write_all(input.as_bytes());
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout
        .join()
        .map_err(|_| anyhow!("the stdout reader of {program} panicked"))?;
    let stderr = stderr
        .join()
        .map_err(|_| anyhow!("the stderr reader of {program} panicked"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// The first executable called `name` in the directories of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// True when something accepts TCP connections on `addr` (1 s timeout).
///
/// Panics for an address outside the loopback range: the tests never send
/// traffic anywhere else.
pub fn port_open(addr: std::net::SocketAddr) -> bool {
    assert!(
        addr.ip().is_loopback(),
        "port_open probes only loopback addresses, not {addr}"
    );
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// True when a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A process, told apart from a later one that reuses its pid by its start
/// time (in clock ticks since boot, field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    /// The process with this pid now, if one exists and is not a zombie.
    pub fn of(pid: u32) -> Option<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the parenthesised command name, from field 3 (state).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
            return None;
        }
        Some(ProcessId {
            pid,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    /// True while this very process runs (not a zombie, not a newer one with its pid).
    pub fn alive(&self) -> bool {
        ProcessId::of(self.pid) == Some(*self)
    }

    fn parent(&self) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every live descendant of `pid` (children, their children...).
pub fn descendants(pid: u32) -> Vec<ProcessId> {
    let all: Vec<ProcessId> = all_pids().into_iter().filter_map(ProcessId::of).collect();
    let mut found: Vec<ProcessId> = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for p in &all {
            if p.parent() == Some(parent) && !found.contains(p) {
                found.push(*p);
                parents.push(p.pid);
            }
        }
    }
    found
}

/// Live processes (other than this one) whose command line, environment or
/// working directory names `dir` or a path inside it: what a harness that
/// keeps everything of a run in one directory left running.
pub fn processes_using(dir: &Path) -> Vec<ProcessId> {
    all_pids()
        .into_iter()
        .filter(|&pid| pid != std::process::id() && uses(pid, dir))
        .filter_map(ProcessId::of)
        .collect()
}

fn uses(pid: u32, dir: &Path) -> bool {
    if std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
        return true;
    }
    ["cmdline", "environ"].iter().any(|what| {
        match std::fs::read(format!("/proc/{pid}/{what}")) {
            Ok(bytes) => names_path(&bytes, dir),
            // Gone meanwhile, or another user's (unreadable, so not one this
            // user could have started): it does not use the directory.
            Err(_) => false,
        }
    })
}

/// True when `hay` (NUL-separated arguments or variables) holds `dir` as a
/// whole path or a path prefix: `/a/pg` matches `/a/pg` and `/a/pg/x`, not `/a/pg2`.
fn names_path(hay: &[u8], dir: &Path) -> bool {
    let needle = dir.as_os_str().as_encoded_bytes();
    if needle.is_empty() || hay.len() < needle.len() {
        return false;
    }
    (0..=hay.len() - needle.len()).any(|at| {
        hay[at..].starts_with(needle) && matches!(hay.get(at + needle.len()), None | Some(b'/' | 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        let range: PortRange = "30000-30009".parse().expect("a range");
        assert_eq!((range.first, range.last), (30000, 30009));
        assert_eq!(range.to_string(), "30000-30009");
        for bad in ["30009-30000", "0-10", "30000", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn a_path_is_named_whole_or_as_a_prefix_only() {
        let dir = Path::new("/tmp/pg");
        assert!(names_path(b"etcd\0--data-dir=/tmp/pg/etcd\0", dir));
        assert!(names_path(b"HOME=/tmp/pg\0PATH=/bin", dir));
        assert!(names_path(b"/tmp/pg", dir));
        assert!(!names_path(b"HOME=/tmp/pg2\0", dir));
        assert!(!names_path(b"/tmp/p", dir));
    }

    #[test]
    fn this_process_and_its_children_are_found() {
        let me = ProcessId::of(std::process::id()).expect("this process");
        assert!(me.alive());
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let found = descendants(std::process::id());
        assert!(found.iter().any(|p| p.pid == child.id()), "{found:?}");
        let _ = child.kill();
        let _ = child.wait();
        let gone = found
            .iter()
            .find(|p| p.pid == child.id())
            .expect("found above");
        assert!(!gone.alive());
    }
}

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
pub fn die_with_parent(cmd: &mut Command) {
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
pub fn without_proxy(cmd: &mut Command) -> &mut Command {
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
pub fn spawn_tied_to_test_process(mut cmd: Command) -> io::Result<Child> {
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
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
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
    pub fn log_tail(&self, lines: usize) -> String {
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
pub fn stop_all(processes: &mut [Process], grace: Duration) -> Vec<String> {
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
pub fn tail(path: &Path, lines: usize) -> String {
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

//! Support for the hostile-client tests: the real `cache-node` binary as a
//! process on 127.0.0.1 (a [`NodeProc`], so its memory can be read from
//! /proc), raw TCP clients that can send anything, and a small HTTP/1
//! response reader.
//!
//! Everything is synchronous `std::net` with a timeout on every read and
//! write: a misbehaving node fails a test, it never hangs it.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::node_proc::{Launch, NodeProc};

/// How far above its baseline a node's resident memory may be after an
/// attack. Not byte-exact: the allocator (mimalloc) keeps freed pages for
/// reuse and the runtime keeps the stacks and buffers it grew, which is why
/// the attacks whose point is volume take their baseline after a warm-up
/// round of the same attack (see
/// [`Target::assert_repeated_attack_leaves_nothing`]): what caches grow to
/// then is in the baseline, and what remains above it is what the node kept.
/// Measured growth after a warm-up is ~0-2 MiB.
pub const RSS_SLACK: u64 = 16 * 1024 * 1024;

/// How much a volume attack sends after its warm-up round: four times the
/// slack, so a node that kept even a quarter of what it was sent fails the
/// check (with the former 64 MiB slack and ~1 MiB of attack traffic, no leak
/// could have).
pub const RETENTION_VOLUME: u64 = 4 * RSS_SLACK;

/// Default read timeout of the raw clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A `cache-node` under attack: the process (see [`NodeProc`]) and its
/// resident memory baseline.
pub struct Target {
    pub node: NodeProc,
    pub addr: SocketAddr,
    /// Resident memory after start-up and a first round of requests.
    pub baseline_rss: u64,
}

impl Target {
    /// Starts the binary on 127.0.0.1 and a port of the kernel's choosing
    /// with `flags` and environment `env`, and waits until it serves.
    pub fn start(flags: &[&str], env: &[(&str, &str)]) -> Self {
        let mut launch = Launch::new()
            .args(["--log-format", "json", "--log-level", "info"])
            .args(flags);
        for (k, v) in env {
            launch = launch.env(k, v);
        }
        let node = launch.spawn();
        let mut target = Self {
            addr: node.addr,
            node,
            baseline_rss: 0,
        };
        // Warm up (first allocations, lazily started runtime threads) before
        // taking the baseline.
        for _ in 0..3 {
            target.assert_serves();
        }
        target.baseline_rss = target.rss();
        target
    }

    pub fn pid(&self) -> u32 {
        self.node.pid()
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> u64 {
        self.node.rss()
    }

    pub fn log_tail(&self) -> String {
        self.node.log_tail(200)
    }

    /// The process is still running.
    pub fn assert_alive(&mut self) {
        self.node.assert_alive();
    }

    /// Health answers, and a write then a read of a fresh key work, each on a
    /// fresh connection.
    pub fn assert_serves(&mut self) {
        self.assert_alive();
        let r = self.request("GET", "/api/v1/health", None);
        assert_eq!(r.status, 200, "health: {r:?}\nlog:\n{}", self.log_tail());
        assert_eq!(r.json()["status"], "healthy");
        let key = format!("probe-{}", rand::random::<u32>());
        let value = serde_json::json!({"probe": key});
        let body = serde_json::json!({"value": value, "tags": ["probe"]}).to_string();
        let r = self.request("PUT", &format!("/api/v1/cache/{key}"), Some(&body));
        assert!(matches!(r.status, 200 | 201), "set: {r:?}");
        let r = self.request("GET", &format!("/api/v1/cache/{key}"), None);
        assert_eq!(r.status, 200, "get: {r:?}");
        assert_eq!(r.json()["value"], value);
    }

    /// [`Self::assert_serves`], and resident memory within [`RSS_SLACK`] of
    /// the baseline. Returns the growth in bytes (possibly negative).
    pub fn assert_recovered(&mut self, after: &str) -> i64 {
        self.assert_serves();
        // Freed memory goes back to the allocator, then to the system in
        // the background: give it a moment before judging.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rss = self.rss();
        while rss > self.baseline_rss + RSS_SLACK / 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            rss = self.rss();
        }
        let growth = rss as i64 - self.baseline_rss as i64;
        eprintln!(
            "after {after}: rss {} KiB (baseline {} KiB, {:+} KiB)",
            rss / 1024,
            self.baseline_rss / 1024,
            growth / 1024
        );
        assert!(
            rss <= self.baseline_rss + RSS_SLACK,
            "after {after}: rss {rss} is more than {RSS_SLACK} above the baseline {}",
            self.baseline_rss
        );
        growth
    }

    /// Takes the baseline again, now (after a check that the node serves).
    pub fn rebaseline(&mut self) {
        self.assert_serves();
        self.baseline_rss = self.rss();
    }

    /// Runs `round` (an attack returning how many bytes the node received)
    /// once to warm up, takes the baseline, runs it again until
    /// [`RETENTION_VOLUME`] bytes have gone in, and checks memory is back
    /// within [`RSS_SLACK`] of that baseline. Returns the bytes pushed.
    pub fn assert_repeated_attack_leaves_nothing(
        &mut self,
        what: &str,
        mut round: impl FnMut(&mut Self) -> u64,
    ) -> u64 {
        round(self);
        self.rebaseline();
        let (mut pushed, mut rounds) = (0u64, 0u32);
        while pushed < RETENTION_VOLUME {
            let sent = round(self);
            assert!(sent > 0, "{what}: a round pushed nothing");
            pushed += sent;
            rounds += 1;
        }
        self.assert_recovered(&format!(
            "{what}, {rounds} rounds, {} MiB pushed",
            pushed >> 20
        ));
        pushed
    }

    /// One well-formed request on a fresh connection (`Connection: close`).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        if let Some(body) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        let mut conn = self.connect();
        conn.write_all(req.as_bytes()).expect("send request");
        read_response(&mut conn).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A raw connection with [`IO_TIMEOUT`] on reads and writes.
    pub fn connect(&self) -> TcpStream {
        let conn = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).expect("connect");
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        conn.set_nodelay(true).unwrap();
        conn
    }

    /// Sends `bytes` on a fresh connection and reads the first response.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<HttpResponse, String> {
        let mut conn = self.connect();
        // The node may answer and close before reading everything (that is
        // what a limit does), so a failed write is not yet a failure.
        let _ = conn.write_all(bytes);
        read_response(&mut conn)
    }
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics (failing the test) if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A JSON `{"error": "..."}` answer with this status and
    /// `application/json` content type; returns the message.
    pub fn assert_json_error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(
            self.header("content-type")
                .is_some_and(|ct| ct.starts_with("application/json")),
            "content type of {self:?}"
        );
        let message = self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {self:?}"))
            .to_owned();
        assert!(!message.is_empty());
        message
    }
}

/// Reads one HTTP/1.1 response (status line, headers, a `Content-Length`
/// body). Bounded: heads over 64 KiB and bodies over 16 MiB are errors.
pub fn read_response(conn: &mut TcpStream) -> Result<HttpResponse, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {} bytes of response head",
                    head.len()
                ));
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("reading the response head: {e}")),
        }
        if head.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
    }
    let head = String::from_utf8(head).map_err(|e| format!("response head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().map_err(|e| format!("content-length {v:?}: {e}")))
        .transpose()?
        .unwrap_or(0);
    if length > 16 * 1024 * 1024 {
        return Err(format!("response body of {length} bytes"));
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)
        .map_err(|e| format!("reading a {length}-byte body: {e}"))?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Whether the peer has closed `conn`: waits up to `within` for EOF or a
/// reset, discarding any bytes that arrive first. Returns how long it took.
pub fn wait_closed(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if start.elapsed() >= within {
                    return None;
                }
            }
            // Reset or aborted: closed too.
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// Sends `bytes` one at a time, `gap` apart, until they are all sent, the
/// peer answers or closes the connection, or `budget` runs out. Returns how
/// many were sent and whether the peer answered or closed (the answer, if
/// any, is left unread).
pub fn drip(conn: &mut TcpStream, bytes: &[u8], gap: Duration, budget: Duration) -> (usize, bool) {
    let start = Instant::now();
    for (i, b) in bytes.iter().enumerate() {
        if start.elapsed() > budget {
            return (i, false);
        }
        if conn.write_all(std::slice::from_ref(b)).is_err() {
            return (i, true);
        }
        std::thread::sleep(gap);
        // An answer shows as bytes on a non-blocking peek, a closed peer as
        // EOF; stop at either, so the answer is not lost to a reset that
        // more bytes sent to a closed socket would provoke.
        conn.set_nonblocking(true).unwrap();
        let mut probe = [0u8; 1];
        let stopped = conn.peek(&mut probe).is_ok();
        conn.set_nonblocking(false).unwrap();
        if stopped {
            return (i + 1, true);
        }
    }
    (bytes.len(), false)
}

/// Closes a connection both ways, ignoring errors (it may already be gone).
pub fn hang_up(conn: TcpStream) {
    let _ = conn.shutdown(Shutdown::Both);
}

//! The real `cache-node` binary as a process: configuration from flags and
//! environment, `--help`, and graceful shutdown on SIGTERM that finishes a
//! request already in flight.

mod node_proc;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node_proc::{Launch, NodeProc, cache_node_bin};

fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn help_describes_every_setting_and_its_environment_variable() {
    let out = Command::new(cache_node_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for env in [
        "DISTROCACHE_PORT",
        "DISTROCACHE_NODE_ID",
        "DISTROCACHE_MAX_SIZE",
        "DISTROCACHE_MAX_MEMORY",
        "DISTROCACHE_DEFAULT_TTL",
        "DISTROCACHE_CLEANUP_INTERVAL",
        "DISTROCACHE_REPLICATION_FACTOR",
        "DISTROCACHE_MAX_KEY_BYTES",
        "DISTROCACHE_MAX_VALUE_BYTES",
        "DISTROCACHE_MAX_BODY_BYTES",
        "DISTROCACHE_MAX_TAGS",
        "DISTROCACHE_MAX_TAG_BYTES",
        "DISTROCACHE_LOG_FORMAT",
    ] {
        assert!(help.contains(env), "--help does not mention {env}:\n{help}");
    }
}

#[test]
fn bad_configuration_fails_fast_with_a_message() {
    let out = Command::new(cache_node_bin())
        .args(["--default-ttl", "forever"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--default-ttl"));
}

#[test]
fn sigterm_finishes_the_in_flight_request_then_exits_cleanly() {
    let node = Launch::new()
        .env("DISTROCACHE_NODE_ID", "from-env")
        .env("DISTROCACHE_LOG_FORMAT", "json")
        .spawn();
    let mut node = node;
    let addr = node.addr;

    let stats = http(
        addr,
        "GET /api/v1/stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(stats.contains("\"node_id\":\"from-env\""), "{stats}");

    // Start a write and send only half its body.
    let body = r#"{"value": "written during shutdown", "ttl": 60}"#;
    let (head, tail) = body.split_at(body.len() / 2);
    let mut in_flight = TcpStream::connect(addr).unwrap();
    in_flight
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        in_flight,
        "POST /api/v1/cache/late HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    in_flight.flush().unwrap();
    // Give the node the head before the signal: a connection whose request
    // has not begun when shutdown starts is closed, not served (that is
    // graceful shutdown's rule), and this test is about one that has.
    std::thread::sleep(Duration::from_millis(200));

    node.signal(libc::SIGTERM);
    // Wait until the node logged that it is shutting down, then finish the body.
    let line = node.wait_for_log("shutting down", Duration::from_secs(10));
    assert!(line.starts_with('{'), "JSON log format: {line}");
    // New connections are refused once shutdown began (the listener closes
    // right after that line: wait for it, with a deadline).
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting");
        std::thread::sleep(Duration::from_millis(20));
    }

    in_flight.write_all(tail.as_bytes()).unwrap();
    let mut response = String::new();
    in_flight.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(response.contains("written during shutdown"));

    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// The README's configuration table lists every flag `--help` knows, with
/// its environment variable, so the documentation cannot fall behind.
#[test]
fn the_readme_documents_every_setting() {
    let out = Command::new(cache_node_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md at the repository root");
    let mut checked = 0;
    for line in help.lines().map(str::trim) {
        let Some(flag) = line
            .strip_prefix("--")
            .and_then(|rest| rest.split([' ', '\t']).next())
        else {
            continue;
        };
        if flag == "help" || flag == "version" {
            continue;
        }
        assert!(
            readme.contains(&format!("| `--{flag}` |")),
            "README.md's configuration table lacks --{flag}"
        );
        let env = format!("DISTROCACHE_{}", flag.to_uppercase().replace('-', "_"));
        assert!(
            readme.contains(&format!("`{env}`")),
            "README.md lacks {env}"
        );
        checked += 1;
    }
    assert!(checked > 30, "parsed only {checked} flags from --help");
}

/// Waits for `child` to exit within `within`; kills it and fails if not.
fn exit_within(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A zero cleanup interval (which made the sweeper's timer panic while the
/// node kept serving without a sweeper) and a zero default TTL (which
/// expired every item as it was written) are refused at start, naming the
/// setting.
#[test]
fn zero_cleanup_interval_or_default_ttl_is_refused_at_start() {
    for (flag, env) in [
        ("--cleanup-interval", "DISTROCACHE_CLEANUP_INTERVAL"),
        ("--default-ttl", "DISTROCACHE_DEFAULT_TTL"),
    ] {
        for zero in ["0s", "0ms"] {
            let mut node = Command::new(cache_node_bin())
                .args(["--bind-address", "127.0.0.1", "--port", "0"])
                .args([flag, zero])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let status = exit_within(&mut node, Duration::from_secs(10));
            let mut stderr = String::new();
            node.stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            assert!(!status.success(), "{flag} {zero} accepted");
            assert!(
                stderr.contains(flag) && stderr.contains("longer than zero"),
                "{flag} {zero}: {stderr}"
            );
            // The same through the environment.
            let out = Command::new(cache_node_bin())
                .env(env, zero)
                .args(["--bind-address", "127.0.0.1", "--port", "0", "--help"])
                .output()
                .unwrap();
            assert!(out.status.success(), "--help parses no values");
            let mut node = Command::new(cache_node_bin())
                .env(env, zero)
                .args(["--bind-address", "127.0.0.1", "--port", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            assert!(!exit_within(&mut node, Duration::from_secs(10)).success());
        }
    }
}

/// The background sweeper removes expired items that nobody reads: items
/// written with the default TTL of 1s leave the stats soon after, with no
/// read touching them (hits and misses stay 0).
#[test]
fn the_sweeper_drops_expired_items_without_reads() {
    let node = NodeProc::start(&["--cleanup-interval", "100ms", "--default-ttl", "1s"]);
    let stats = || -> serde_json::Value {
        let response = http(
            node.addr,
            "GET /api/v1/stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        let (_, body) = response.split_once("\r\n\r\n").expect("a response");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
    };
    for i in 0..50 {
        let body = format!(r#"{{"value": {i}}}"#);
        let response = http(
            node.addr,
            &format!(
                "PUT /api/v1/cache/k{i} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    }
    let first = stats();
    assert!(first["items"].as_u64().unwrap() > 0, "{first}");
    // Bounded wait, not a timed assertion: 1s TTL plus sweeps every 100ms.
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let s = stats();
        if s["items"] == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "expired items never swept: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(last["expirations"], 50, "{last}");
    assert_eq!(last["hits"], 0, "{last}");
    assert_eq!(last["misses"], 0, "{last}");
    assert_eq!(last["bytes"], 0, "{last}");
}

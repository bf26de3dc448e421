//! The `distrocache` binary against real cache-node processes on loopback:
//! a single node (every command, both output formats, values from an
//! argument, a file and stdin, and bad input: unknown key, bad JSON, bad
//! flags, an unreachable node), a node that requires a token (none, wrong,
//! right, from a file), a node serving TLS (with its CA and the name its
//! certificate carries; refused without them), and a 3-node cluster with
//! replication factor 2
//! (writes through one node read through another, stats and cluster views,
//! tag invalidation across nodes, watch-rebalance while a 4th node joins,
//! bench).

#[path = "../../cache-node/tests/cluster_support/mod.rs"]
mod cluster_support;
#[path = "../../cache-node/tests/node_proc/mod.rs"]
mod node_proc;
#[path = "../../cache-node/tests/tls_support/mod.rs"]
mod tls_support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_support::ProcCluster;
use distrocache_membership::MemberState::{Active, Joining};
use node_proc::{Launch, NodeProc};
use serde_json::{Value, json};
use tls_support::{TestCa, Validity};

const CLI: &str = env!("CARGO_BIN_EXE_distrocache");
/// No CLI run may take longer than this.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(60);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// Asserts the run exited 0 (not `Result::ok`: it fails the test).
    fn succeeded(self) -> Self {
        assert_eq!(
            self.code, 0,
            "exit {}: {}{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Fails with exit status `code` and one error line containing `says`.
    fn fails(self, code: i32, says: &str) -> Self {
        assert_eq!(
            self.code, code,
            "exit {}: {}{}",
            self.code, self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(says),
            "stderr lacks {says:?}: {}",
            self.stderr
        );
        if code == 1 {
            let lines: Vec<&str> = self.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one error line: {}", self.stderr);
            assert!(lines[0].starts_with("error: "), "{}", self.stderr);
        }
        self
    }
}

/// Runs the CLI with `args` (and `stdin`), within [`RUN_DEADLINE`].
fn cli(args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(CLI)
        .args(args)
        .env_remove("DISTROCACHE_SERVER")
        .env_remove("DISTROCACHE_TOKEN")
        .env_remove("DISTROCACHE_TOKEN_FILE")
        .env_remove("DISTROCACHE_CA_FILE")
        .env_remove("DISTROCACHE_TLS_SERVER_NAME")
        .env("NO_PROXY", "*")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distrocache");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("distrocache {args:?} ran longer than {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn every_command_on_a_single_node_and_bad_input_is_one_clear_error() {
    let node = NodeProc::start(&[]);
    let s = node.addr.to_string();
    let with = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["-s".to_owned(), s.clone()];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    };
    let run = |args: &[&str], stdin: Option<&str>| {
        let all = with(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        cli(&refs, stdin)
    };

    // set from an argument, with TTL and tags; get it back as JSON.
    let item = run(
        &[
            "set",
            "user:1",
            r#"{"name":"Ann"}"#,
            "--ttl",
            "1m",
            "--tag",
            "user",
            "--tag",
            "x",
            "-o",
            "json",
        ],
        None,
    )
    .succeeded()
    .json();
    assert_eq!(item["value"]["name"], "Ann");
    assert_eq!(item["ttl"], 60_000_000_000u64);
    assert_eq!(item["tags"], serde_json::json!(["user", "x"]));
    let got = run(&["get", "user:1", "-o", "json"], None)
        .succeeded()
        .json();
    assert_eq!(got["value"], item["value"]);
    let table = run(&["get", "user:1"], None).succeeded().stdout;
    assert!(
        table.contains(r#"{"name":"Ann"}"#) && table.contains("user,x"),
        "{table}"
    );

    // From stdin (no argument, and `-`), from a file, and as a string.
    run(&["set", "n"], Some("42\n")).succeeded();
    assert_eq!(
        run(&["get", "n", "-o", "json"], None).succeeded().json()["value"],
        42
    );
    run(&["set", "arr", "-"], Some("[1, 2]")).succeeded();
    assert_eq!(
        run(&["get", "arr", "-o", "json"], None).succeeded().json()["value"],
        serde_json::json!([1, 2])
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.json");
    std::fs::write(&file, r#"{"from":"file"}"#).unwrap();
    run(
        &[
            "set",
            "f",
            "--file",
            file.to_str().unwrap(),
            "--tag",
            "user",
        ],
        None,
    )
    .succeeded();
    assert_eq!(
        run(&["get", "f", "-o", "json"], None).succeeded().json()["value"]["from"],
        "file"
    );
    run(&["set", "s", "plain text", "--string"], None).succeeded();
    assert_eq!(
        run(&["get", "s", "-o", "json"], None).succeeded().json()["value"],
        "plain text"
    );

    // Stats and the cluster view of a single node.
    let stats = run(&["stats", "-o", "json"], None).succeeded().json();
    assert_eq!(stats["totals"]["items"], 5);
    let table = run(&["stats"], None).succeeded().stdout;
    assert!(
        table.starts_with("NODE") && table.contains("TOTAL"),
        "{table}"
    );
    let view = run(&["cluster", "-o", "json"], None).succeeded().json();
    assert_eq!(view["mode"], "single");
    assert_eq!(view["members"][0]["items"], 5);
    let watched = run(&["watch-rebalance"], None).succeeded().stdout;
    assert!(watched.contains("single node"), "{watched}");

    // Tag invalidation and delete.
    let inv = run(&["invalidate-tag", "user", "-o", "json"], None)
        .succeeded()
        .json();
    assert_eq!(inv["invalidated"], 2);
    run(&["get", "user:1"], None).fails(1, r#"key "user:1" not found"#);
    assert!(
        run(&["del", "n"], None)
            .succeeded()
            .stdout
            .contains("deleted n")
    );

    // Bad input: one line, exit 1 (or clap's usage error, exit 2).
    run(&["get", "nope"], None).fails(1, r#"key "nope" not found"#);
    run(&["del", "nope"], None).fails(1, r#"key "nope" not found"#);
    run(&["set", "k", "{not json"], None).fails(1, "the value is not JSON");
    run(&["set", "k"], Some("")).fails(1, "the value is not JSON");
    run(&["set", "k", "--file", "/nonexistent/v.json"], None).fails(1, "/nonexistent/v.json");
    run(&["set", "k", "1", "--ttl", "soon"], None).fails(2, "--ttl");
    run(&["set", "k", "1", "--ttl", "0s"], None).fails(2, "at least 1s");
    run(&["bench", "-c", "0"], None).fails(2, "--concurrency");
    run(&["get", "k", "-o", "yaml"], None).fails(2, "yaml");
    let long_key = "k".repeat(100_000);
    run(&["set", &long_key, "1"], None).fails(1, "error: ");
    cli(&["-s", "127.0.0.1:1", "get", "k"], None).fails(1, "cannot reach 127.0.0.1:1");
    cli(&["-s", "no-such-host.invalid:80", "get", "k"], None).fails(1, "no-such-host.invalid");

    // bench: every request answered, a histogram printed.
    let report = run(
        &[
            "bench", "-n", "300", "-c", "4", "--keys", "50", "-o", "json",
        ],
        None,
    )
    .succeeded()
    .json();
    assert_eq!(report["requests"], 300);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["p99Us"].as_u64().unwrap() >= report["p50Us"].as_u64().unwrap());
    let counted: u64 = report["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[1].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 300);

    // Completions for each shell.
    for shell in ["bash", "zsh", "fish"] {
        let script = cli(&["completions", shell], None).succeeded().stdout;
        assert!(
            script.contains("distrocache") && script.contains("watch-rebalance"),
            "{shell}"
        );
    }
}

#[test]
fn tokens_from_the_flag_or_a_file_and_a_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let node = NodeProc::start(&["--auth-token-file", token_file.to_str().unwrap()]);
    let s = node.addr.to_string();
    cli(&["-s", &s, "get", "k"], None).fails(1, "refused the token");
    cli(&["-s", &s, "--token", "wrong", "get", "k"], None).fails(1, "refused the token");
    cli(
        &["-s", &s, "--token", "s3cret-token", "set", "k", "1"],
        None,
    )
    .succeeded();
    let got = cli(
        &[
            "-s",
            &s,
            "--token-file",
            token_file.to_str().unwrap(),
            "get",
            "k",
            "-o",
            "json",
        ],
        None,
    )
    .succeeded()
    .json();
    assert_eq!(got["value"], 1);
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    cli(
        &[
            "-s",
            &s,
            "--token-file",
            empty.to_str().unwrap(),
            "get",
            "k",
        ],
        None,
    )
    .fails(1, "is empty");
    cli(
        &[
            "-s",
            &s,
            "--token",
            "a",
            "--token-file",
            empty.to_str().unwrap(),
            "get",
            "k",
        ],
        None,
    )
    .fails(2, "cannot be used with");
}

/// A node serving its client API over TLS with a certificate of `ca` for
/// `cache.test`, asking for client certificates of `client_ca` if given.
fn tls_node(ca: &TestCa, client_ca: Option<&Path>) -> NodeProc {
    let cert = ca.issue("server", &["cache.test"], Validity::Current);
    let mut launch = Launch::new()
        .arg("--tls-cert-file")
        .arg(&cert.cert)
        .arg("--tls-key-file")
        .arg(&cert.key);
    if let Some(client_ca) = client_ca {
        launch = launch.arg("--tls-client-ca-file").arg(client_ca);
    }
    launch.spawn()
}

#[test]
fn a_node_serving_tls_is_reached_with_its_ca_and_name_and_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let node = tls_node(&ca, None);
    let server = format!("https://{}", node.addr);
    let ca_file = ca.ca_file.display().to_string();
    let tls = [
        "-s",
        &server,
        "--ca-file",
        &ca_file,
        "--tls-server-name",
        "cache.test",
    ];
    cli(&[&tls[..], &["set", "k", r#"{"a":1}"#]].concat(), None).succeeded();
    let got = cli(&[&tls[..], &["-o", "json", "get", "k"]].concat(), None).succeeded();
    assert_eq!(got.json()["value"], json!({"a": 1}));

    // Without the CA (the public roots), or checking another name: one
    // error line saying why.
    cli(
        &["-s", &server, "--tls-server-name", "cache.test", "get", "k"],
        None,
    )
    .fails(1, "certificate");
    cli(&["-s", &server, "--ca-file", &ca_file, "get", "k"], None).fails(1, "not valid for name");
    // A CA file without certificates, and a CA for a plain server.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let bogus = bogus.display().to_string();
    cli(&["-s", &server, "--ca-file", &bogus, "get", "k"], None).fails(1, "no certificate");
    let plain = NodeProc::start(&[]);
    cli(
        &[
            "-s",
            &plain.addr.to_string(),
            "--ca-file",
            &ca_file,
            "get",
            "k",
        ],
        None,
    )
    .fails(1, "no seed is https://");
}

#[test]
fn a_node_asking_for_client_certificates_is_reached_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let clients = TestCa::new(&dir.path().join("clients"), "clients-ca");
    let app = clients.issue("app", &["app"], Validity::Current);
    let node = tls_node(&ca, Some(&clients.ca_file));
    let server = format!("https://{}", node.addr);
    let ca_file = ca.ca_file.display().to_string();
    let tls = [
        "-s",
        &server,
        "--ca-file",
        &ca_file,
        "--tls-server-name",
        "cache.test",
    ];
    let (app_cert, app_key) = (
        app.cert.display().to_string(),
        app.key.display().to_string(),
    );
    let identity = ["--cert-file", &app_cert, "--key-file", &app_key];
    cli(&[&tls[..], &identity, &["set", "k", "7"]].concat(), None).succeeded();
    let got = cli(
        &[&tls[..], &identity, &["-o", "json", "get", "k"]].concat(),
        None,
    )
    .succeeded();
    assert_eq!(got.json()["value"], json!(7));

    // Without a certificate: one line saying what to pass.
    cli(&[&tls[..], &["get", "k"]].concat(), None).fails(1, "pass --cert-file and --key-file");
    // A certificate without its key is a usage error.
    cli(
        &[&tls[..], &["--cert-file", &app_cert, "get", "k"]].concat(),
        None,
    )
    .fails(2, "--key-file");
    // A key file that holds no key.
    cli(
        &[
            &tls[..],
            &[
                "--cert-file",
                &app_cert,
                "--key-file",
                &app_cert,
                "get",
                "k",
            ],
        ]
        .concat(),
        None,
    )
    .fails(1, "client key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_through_the_cli() {
    let mut c = ProcCluster::new(3, 2);
    let epoch = c.start_members(3, SETTLE).await;
    let first = c.nodes[0].addr.to_string();
    let last = c.nodes[2].addr.to_string();

    // Writes through one node, reads through another.
    for i in 0..30 {
        let key = format!("k{i}");
        let value = format!("{{\"i\":{i}}}");
        let mut args = vec!["-s", &first, "set", &key, &value];
        if i % 2 == 0 {
            args.extend(["--tag", "even"]);
        }
        let _ = tokio::task::block_in_place(|| cli(&args, None).succeeded());
    }
    let got = tokio::task::block_in_place(|| cli(&["-s", &last, "get", "k7", "-o", "json"], None))
        .succeeded()
        .json();
    assert_eq!(got["value"]["i"], 7);

    let view = tokio::task::block_in_place(|| cli(&["-s", &last, "cluster", "-o", "json"], None))
        .succeeded()
        .json();
    assert_eq!(view["epoch"], epoch);
    assert_eq!(view["replicationFactor"], 2);
    let members = view["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let held: u64 = members.iter().map(|m| m["items"].as_u64().unwrap()).sum();
    assert_eq!(held, 60, "30 keys x replication factor 2: {view}");
    assert!(members.iter().all(|m| m["state"] == "active"));
    let stats = tokio::task::block_in_place(|| cli(&["-s", &first, "stats", "-o", "json"], None))
        .succeeded()
        .json();
    assert_eq!(stats["totals"]["items"], 60);

    let inv = tokio::task::block_in_place(|| {
        cli(&["-s", &last, "invalidate-tag", "even", "-o", "json"], None)
    })
    .succeeded()
    .json();
    assert_eq!(
        inv["invalidated"].as_u64().unwrap(),
        15,
        "15 even keys: {inv}"
    );
    tokio::task::block_in_place(|| cli(&["-s", &first, "get", "k4"], None)).fails(1, "not found");

    // A 4th node joins, then becomes active; watch-rebalance follows each
    // move until every node has synced the epoch.
    let joined = c.add_slot();
    let joining = c.set_ring(&[(0, Active), (1, Active), (2, Active), (joined, Joining)]);
    c.start(joined);
    let mut received = 0;
    for epoch in [joining, joining + 1] {
        if epoch > joining {
            c.set_ring(&[(0, Active), (1, Active), (2, Active), (joined, Active)]);
        }
        let e = epoch.to_string();
        let watched = tokio::task::block_in_place(|| {
            cli(
                &[
                    "-s",
                    &first,
                    "watch-rebalance",
                    "--epoch",
                    &e,
                    "--within",
                    "60s",
                    "-o",
                    "json",
                ],
                None,
            )
        })
        .succeeded()
        .json();
        assert!(watched["epoch"].as_u64().unwrap() >= epoch, "{watched}");
        assert_eq!(watched["nodes"], 4, "{watched}");
        received += watched["keysReceived"].as_u64().unwrap();
        c.wait_settled(epoch, SETTLE).await;
    }
    eprintln!("watch-rebalance: {received} key(s) received while the 4th node joined");

    let report = tokio::task::block_in_place(|| {
        cli(
            &["-s", &first, "bench", "-n", "400", "-c", "8", "-o", "json"],
            None,
        )
    })
    .succeeded()
    .json();
    assert_eq!(report["errors"], 0, "{report}");

    // A node down: its reads fall back to a replica; the view says which
    // member did not answer.
    c.kill(1);
    let got = tokio::task::block_in_place(|| cli(&["-s", &first, "get", "k7", "-o", "json"], None))
        .succeeded()
        .json();
    assert_eq!(got["value"]["i"], 7);
    let view = tokio::task::block_in_place(|| cli(&["-s", &first, "cluster", "-o", "json"], None))
        .succeeded()
        .json();
    assert!(
        view["unreachable"]
            .as_array()
            .is_some_and(|u| !u.is_empty()),
        "{view}"
    );
}

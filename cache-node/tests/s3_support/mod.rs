//! An S3-compatible server for the backup tests: gofakes3 (built from its
//! Go module by `scripts/build-tools.sh`, like the control plane) as a
//! process on 127.0.0.1, on a port the kernel chooses, with one bucket in
//! memory. It speaks S3 over HTTP as a real store does (it does not check
//! signatures); the nodes reach it through `--backup-endpoint`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The bucket the server starts with.
pub const BUCKET: &str = "backups";

/// Credentials the nodes sign with (set, so the S3 client never looks for
/// instance credentials off the machine).
pub const ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "distrocache-test"),
    ("AWS_SECRET_ACCESS_KEY", "distrocache-test-secret"),
];

pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

/// Where `scripts/build-tools.sh` put gofakes3: `$DISTROCACHE_TOOLS`
/// (scripts/test.sh sets it), else its default cache directory.
fn gofakes3_bin() -> PathBuf {
    let dir = std::env::var_os("DISTROCACHE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("DISTROCACHE_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("distrocache"))
                })
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                        .join(".cache/distrocache")
                });
            cache.join("tools")
        });
    let bin = dir.join("gofakes3");
    assert!(
        bin.exists(),
        "{} is missing: run `bash scripts/build-tools.sh` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

impl S3Server {
    pub fn start() -> Self {
        let mut child = Command::new(gofakes3_bin())
            .args([
                "-backend",
                "memory",
                "-initialbucket",
                BUCKET,
                "-host",
                "127.0.0.1:0",
                "-quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gofakes3");
        // It reports the port the kernel gave it on stderr.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Some(port) = line.split("using port: ").nth(1) {
                    let _ = tx.send(port.trim().to_owned());
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("gofakes3 did not report its port within 30 s");
            }
        };
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The node flags that back up to this server under `prefix`.
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        vec![
            "--backup-url".into(),
            format!("s3://{BUCKET}/{prefix}"),
            "--backup-endpoint".into(),
            self.endpoint.clone(),
        ]
    }

    /// The URL of object `key` of the bucket (path style).
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{BUCKET}/{key}", self.endpoint)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

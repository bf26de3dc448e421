//! A tiny HTTP program for the control-plane tests: the test kubelet runs it as
//! a pod's container, so the tests can check what a real program sees (its
//! address, its environment, its signals) without depending on `cache-node`.
//!
//! Usage: `test-http-server [--listen IP:PORT] [--ready-file PATH] [--ignore-sigterm]`.
//! Without `--listen` it reads `TEST_HTTP_LISTEN` (`IP:PORT`), or
//! `TEST_HTTP_HOST` and `TEST_HTTP_PORT` (default `127.0.0.1:8080`).
//!
//! Endpoints (every answer closes the connection):
//! - `GET /healthz`: 200 `ok`.
//! - `GET /readyz`: 200 once `--ready-file` exists (or always, without the flag), 503 before.
//! - `GET /livez`: the same answer as `/readyz`, and a line `livez <status>` on
//!   stdout for each, so a test can count the probes it answered (a liveness
//!   probe on `/livez` is told apart from the readiness probe on `/readyz`).
//! - `GET /env/NAME`: 200 with the value of the environment variable `NAME`, 404 if unset.
//! - `GET /pid`: 200 with the process id.
//! - `GET /prestop`: prints `prestop hook called` to stdout and answers 200.
//!
//! SIGTERM (or SIGINT) makes it print `received SIGTERM, exiting` and exit 0,
//! unless `--ignore-sigterm` is given (to test the kubelet's SIGKILL after the
//! grace period).

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

struct Options {
    listen: SocketAddr,
    ready_file: Option<PathBuf>,
    ignore_sigterm: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut listen = std::env::var("TEST_HTTP_LISTEN").ok();
    if listen.is_none() {
        let host = std::env::var("TEST_HTTP_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port = std::env::var("TEST_HTTP_PORT").unwrap_or_else(|_| "8080".into());
        listen = Some(format!("{host}:{port}"));
    }
    let mut ready_file = None;
    let mut ignore_sigterm = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().ok_or("--listen needs IP:PORT")?),
            "--ready-file" => {
                ready_file = Some(PathBuf::from(
                    args.next().ok_or("--ready-file needs a path")?,
                ))
            }
            "--ignore-sigterm" => ignore_sigterm = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.unwrap_or_default();
    let listen = listen
        .parse()
        .map_err(|e| format!("bad listen address {listen:?}: {e}"))?;
    Ok(Options {
        listen,
        ready_file,
        ignore_sigterm,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("test-http-server: {message}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(options.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("test-http-server: cannot listen on {}: {e}", options.listen);
            std::process::exit(1);
        }
    };
    let mut sigterm = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut sigint = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    println!(
        "listening on {} (pid {})",
        options.listen,
        std::process::id()
    );
    let ready_file = options.ready_file.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ready_file = ready_file.clone();
                    tokio::spawn(async move { serve(stream, ready_file).await });
                }
                Err(e) => eprintln!("test-http-server: accept failed: {e}"),
            },
            _ = sigterm.recv() => {
                if options.ignore_sigterm {
                    println!("received SIGTERM, ignoring it");
                    continue;
                }
                println!("received SIGTERM, exiting");
                return;
            }
            _ = sigint.recv() => {
                println!("received SIGINT, exiting");
                return;
            }
        }
    }
}

/// Answers one request and closes the connection.
async fn serve(mut stream: TcpStream, ready_file: Option<PathBuf>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    // Only the request line matters; read until the end of the headers (bounded).
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let request = String::from_utf8_lossy(&request);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/healthz" => (200, "ok".to_string()),
        "/readyz" | "/livez" => {
            let answer = match &ready_file {
                Some(file) if !file.exists() => (503, "not ready".to_string()),
                _ => (200, "ready".to_string()),
            };
            if path == "/livez" {
                println!("livez {}", answer.0);
            }
            answer
        }
        "/pid" => (200, std::process::id().to_string()),
        "/prestop" => {
            println!("prestop hook called");
            (200, "ok".to_string())
        }
        _ => match path.strip_prefix("/env/") {
            Some(name) => match std::env::var(name) {
                Ok(value) => (200, value),
                Err(_) => (404, format!("{name} is not set")),
            },
            None => (404, "not found".to_string()),
        },
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

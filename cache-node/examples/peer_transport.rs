//! Two candidate peer transports, measured side by side on the same work:
//! the node's own framing (`peer::client` / `peer::server`: length-prefixed
//! frames with request ids over one connection, coalesced writes) and
//! HTTP/2 multiplexing (hyper's h2, one connection, one stream per
//! request). Each serves a fetch of a ~200-byte item to `CALLERS`
//! concurrent callers for `SECONDS`; server and client each run a
//! current-thread runtime on a thread of their own, as two nodes would.
//! Printed: requests per second and process CPU per request (client and
//! server together), which is what a forwarded request adds to a cluster.
//!
//! ```text
//! cargo run --release -p cache-node --example peer_transport      # CALLERS=64 SECONDS=5
//! ```
//!
//! Loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_node::peer::protocol::{Answer, RecordBatch, Records, Request};
use cache_node::peer::server::{Handler, Reply};
use cache_node::peer::{PeerClient, PeerSettings};
use cache_node::store::{ItemMeta, ItemView};
use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const VALUE: &[u8] = &[b'x'; 200];

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The item every fetch answers with.
struct Item;

impl ItemView for Item {
    fn key(&self) -> &str {
        "bench:item"
    }
    fn value(&self) -> &[u8] {
        VALUE
    }
    fn meta(&self) -> ItemMeta {
        ItemMeta {
            created_at: 1,
            accessed_at: 1,
            expires_at: u64::MAX,
            access_count: 0,
        }
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

fn record() -> Records {
    let mut batch = RecordBatch::default();
    batch.push(&Item);
    batch.freeze()
}

/// The frame protocol's server side: answers every fetch with the item.
struct FetchHandler(Records);

impl Handler for FetchHandler {
    fn epoch(&self) -> u64 {
        0
    }
    fn handle(self: Arc<Self>, _request: Request) -> Reply {
        Reply::Now(Answer::Item {
            created: false,
            record: self.0.clone(),
        })
    }
}

/// Accepts peer connections: the HTTP/1.1 upgrade the client asks for
/// (answered by hand, as the node's API does with hyper), then frames.
async fn frame_server(listener: TcpListener) {
    let handler = Arc::new(FetchHandler(record()));
    loop {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.expect("read");
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let rest = Bytes::copy_from_slice(&head[end..]);
            stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: distrocache-peer/1\r\n\r\n",
                )
                .await
                .expect("write");
            stream.set_nodelay(true).expect("nodelay");
            let (read, write) = stream.into_split();
            cache_node::peer::server::serve(
                read,
                write,
                rest,
                handler,
                8 << 20,
                Duration::from_secs(1),
                CancellationToken::new(),
            )
            .await;
        });
    }
}

/// HTTP/2's server side: answers every request with the item's bytes.
async fn h2_server(listener: TcpListener) {
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(VALUE),
                )))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs `server` on a thread of its own; returns its address.
fn spawn_server<F, Fut>(server: F) -> SocketAddr
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            server(listener).await;
        });
    });
    rx.recv().expect("server address")
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; no other precondition.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `CALLERS` callers of `call` for `SECONDS`; prints one line.
fn measure<F, Fut>(name: &str, callers: u64, seconds: u64, setup: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Fn() -> CallFuture + Send + Sync>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let call = setup().await;
        // Warm up (connections, buffers) before measuring.
        for _ in 0..100 {
            call().await;
        }
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let cpu = cpu_seconds();
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (call, done, stop) = (call.clone(), done.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        call().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("caller");
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        let n = done.load(Ordering::Relaxed) as f64;
        println!("{name:<28} {:>10.0} {:>12.2}", n / elapsed, cpu / n * 1e6);
    });
}

type CallFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn main() {
    let callers = env("CALLERS", 64);
    let seconds = env("SECONDS", 5);
    println!("{callers} concurrent callers, {seconds}s each, a ~200-byte item per answer");
    println!("{:<28} {:>10} {:>12}", "transport", "req/s", "cpu us/req");

    let frames = spawn_server(frame_server);
    measure("frames (peer protocol)", callers, seconds, || async move {
        let client = Arc::new(PeerClient::new(
            "bench",
            PeerSettings {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(10),
                max_message_bytes: 8 << 20,
            },
            None,
        ));
        Arc::new(move || -> CallFuture {
            let client = client.clone();
            Box::pin(async move {
                let found = client.fetch(frames, "bench:item").await.expect("fetch");
                assert!(found.is_some());
            })
        }) as Arc<dyn Fn() -> CallFuture + Send + Sync>
    });

    let h2 = spawn_server(h2_server);
    measure("HTTP/2 (hyper h2)", callers, seconds, || async move {
        let stream = TcpStream::connect(h2).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        Arc::new(move || -> CallFuture {
            let mut sender = sender.clone();
            Box::pin(async move {
                let request = hyper::Request::get(format!("http://{h2}/fetch/bench:item"))
                    .body(Empty::new())
                    .expect("request");
                let answer = sender.send_request(request).await.expect("h2 request");
                let body = answer.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body.len(), VALUE.len());
            })
        }) as Arc<dyn Fn() -> CallFuture + Send + Sync>
    });
}

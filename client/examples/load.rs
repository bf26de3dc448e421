//! A small load generator on `distrocache-client`, for `bench/cluster.sh`:
//! `--connections` tasks each send requests back to back (GET or SET of
//! random keys `bench:1..=keys`, ~200-byte values) for `--duration`, on one
//! thread, reads going where `--read-from` says (the client's default
//! unless given). Prints `requests_per_second p99_ms` on one line;
//! any failed request, or a GET that misses, fails the run (exit 1).
//!
//!   cargo run --release -p distrocache-client --example load -- \
//!       --duration 10s --connections 63 --keys 10000 --op get 127.0.0.1:8080

use std::time::{Duration, Instant};

use bytes::Bytes;
use distrocache_client::{Client, ReadFrom};

/// The node's allocator: glibc's malloc cost the load generator a few
/// percent of its CPU per request, and the load generator is the bound of
/// the client benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    duration: Duration,
    connections: usize,
    keys: u64,
    set: bool,
    read_from: ReadFrom,
    seeds: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(10),
        connections: 64,
        keys: 10_000,
        set: false,
        read_from: ReadFrom::default(),
        seeds: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => {
                let v = value()?;
                let secs: u64 = v
                    .trim_end_matches('s')
                    .parse()
                    .map_err(|_| format!("--duration {v}: whole seconds, e.g. 10s"))?;
                args.duration = Duration::from_secs(secs);
            }
            "--connections" => {
                args.connections = value()?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?
            }
            "--keys" => args.keys = value()?.parse().map_err(|e| format!("--keys: {e}"))?,
            "--op" => {
                args.set = match value()?.as_str() {
                    "get" => false,
                    "set" => true,
                    other => return Err(format!("--op {other}: get or set")),
                }
            }
            "--read-from" => {
                args.read_from = match value()?.as_str() {
                    "primary" => ReadFrom::Primary,
                    "any-owner" => ReadFrom::AnyOwner,
                    "least-busy" => ReadFrom::LeastBusy,
                    other => {
                        return Err(format!(
                            "--read-from {other}: primary, any-owner or least-busy"
                        ));
                    }
                }
            }
            seed => args.seeds.push(seed.to_owned()),
        }
    }
    if args.seeds.is_empty() || args.keys == 0 || args.connections == 0 {
        return Err(
            "usage: load [--duration 10s] [--connections 64] [--keys 10000] [--op get|set] \
             [--read-from primary|any-owner|least-busy] SEED..."
                .into(),
        );
    }
    Ok(args)
}

/// xorshift64*: keys drawn without a shared generator or a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let result = runtime.block_on(run(args));
    match result {
        Ok((rps, p99)) => println!("{rps:.0} {p99:.3}"),
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> Result<(f64, f64), String> {
    let client = Client::builder(args.seeds.clone())
        .read_from(args.read_from)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let body = Bytes::from(format!(
        r#"{{"value":"{}","ttl":3600,"tags":["bench"]}}"#,
        "v".repeat(200)
    ));
    let started = Instant::now();
    let until = started + args.duration;
    let mut tasks = Vec::new();
    for t in 0..args.connections {
        let client = client.clone();
        let body = body.clone();
        let (keys, set) = (args.keys, args.set);
        tasks.push(tokio::spawn(async move {
            let mut state = 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1);
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            // One clock read per request: its end is the next one's start.
            let mut sent = Instant::now();
            while sent < until {
                let key = format!("bench:{}", next(&mut state) % keys + 1);
                if set {
                    client
                        .set_raw(&key, body.clone())
                        .await
                        .map_err(|e| format!("SET {key}: {e}"))?;
                } else if client
                    .get_raw(&key)
                    .await
                    .map_err(|e| format!("GET {key}: {e}"))?
                    .is_none()
                {
                    return Err(format!("GET {key} missed"));
                }
                let done = Instant::now();
                let took = done.duration_since(sent).as_micros();
                latencies.push(took.min(u128::from(u32::MAX)) as u32);
                sent = done;
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let p99 = all
        .get(all.len() * 99 / 100)
        .map_or(0.0, |&us| f64::from(us) / 1000.0);
    Ok((all.len() as f64 / elapsed, p99))
}

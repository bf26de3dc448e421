//! Soak load generator and consistency checker for one cache node (run by
//! `bench/soak.sh`, which builds and starts the node).
//!
//! For `--duration`, `--workers` concurrent clients drive mixed load: GETs,
//! SETs with tags and short or long TTLs, DELETEs and tag invalidations, over
//! a key space larger than the node's `--max-size` (so it evicts) with TTLs of
//! a few seconds (so items expire). It samples the node's resident memory
//! (`--pid`) along the way, then checks that the node's books balance:
//!
//! * every counter of `/api/v1/stats` equals what the clients saw: `sets` the
//!   successful writes, `hits`/`misses` the GETs answered 200/404, `deletes`
//!   the DELETEs answered 200, `tag_invalidations` the sum of `invalidated`;
//! * items = created − deletes − evictions − expirations − tag_invalidations,
//!   where `created` counts writes answered 201. That identity holds in the
//!   store's code except for one path: a write that lands on an item which has
//!   expired but not yet been removed reuses its slot, answers 201 and counts
//!   no expiration. So the clients avoid writing a key whose item may be in
//!   that state: past its TTL they GET it first (which removes it, counted as
//!   an expiration), and near its TTL they read instead of writing. A client
//!   cannot see when the node handles its write, though, only when it sent
//!   it and got the answer; a write answered 201 after the previous item's
//!   TTL may have landed on it expired. Those are counted as `ambiguous`, and
//!   the check is `expected - ambiguous <= items <= expected` (exact when
//!   none are ambiguous, which is the usual case on an idle machine);
//! * no GET ever returns an item after its TTL, nor a value or tags other
//!   than the last ones written (each worker owns its keys, so it knows);
//! * after the load, once every short-TTL item has expired, a GET of every
//!   key finds exactly `items` items, and invalidating each tag removes
//!   exactly the number of found items that carry it (and are not already
//!   gone with an earlier tag): the tag index agrees with the items.
//!
//! Prints a report; exits 1 if any check fails.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// How long past a write's answer its item may still live, as far as the
/// client can tell (clock reads on both sides, the TTL's rounding).
const MARGIN: Duration = Duration::from_millis(100);

/// A write is made only if it is sent at least this long before the key's
/// item could expire (the node handles it some time after it is sent).
const WRITE_GUARD: Duration = Duration::from_millis(250);

/// TTL of the long-lived items: longer than any soak.
const LONG_TTL: u64 = 3600;

#[derive(Parser, Debug)]
#[command(about = "Mixed soak load against one cache node, then consistency checks")]
struct Args {
    /// The node, host:port (loopback).
    #[arg(long)]
    addr: String,
    /// How long to drive load.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    duration: Duration,
    /// The node's process id, to sample its resident memory.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 16)]
    workers: usize,
    #[arg(long, default_value_t = 2000)]
    keys_per_worker: usize,
    /// Distinct tags in use (at most 64).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=64))]
    tags: u8,
    /// Short TTLs are 1..=this many seconds.
    #[arg(long, default_value_t = 3)]
    max_short_ttl: u64,
    /// Resident-memory samples during the load.
    #[arg(long, default_value_t = 10)]
    rss_samples: u32,
}

/// The last write of a key, as its worker saw it.
#[derive(Debug, Clone, Copy)]
struct Written {
    sent: Instant,
    answered: Instant,
    ttl: Duration,
    version: u64,
    tags: u64,
}

impl Written {
    /// A write sent now will most likely find the item unexpired (if held).
    fn safe_to_write(&self, now: Instant) -> bool {
        now + WRITE_GUARD < self.sent + self.ttl
    }
    /// A write answered at `answered` certainly found the item unexpired
    /// (if held): the item cannot have expired before `sent + ttl`.
    fn certainly_unexpired_until(&self, answered: Instant) -> bool {
        answered < self.sent + self.ttl
    }
    /// The item has expired (if it is still held).
    fn surely_expired(&self, now: Instant) -> bool {
        now > self.answered + self.ttl + MARGIN
    }
}

#[derive(Debug, Default, Clone)]
struct Tally {
    gets: u64,
    hits: u64,
    misses: u64,
    sets: u64,
    created: u64,
    deletes: u64,
    delete_misses: u64,
    invalidations: u64,
    invalidated: u64,
    /// Writes not made because the key's item might have just expired.
    sets_deferred: u64,
    /// Writes answered 201 that may have landed on an expired, unremoved item.
    ambiguous: u64,
    /// GETs made first to clear an expired item before writing its key.
    clearing_gets: u64,
    errors: u64,
    violations: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.gets += o.gets;
        self.hits += o.hits;
        self.misses += o.misses;
        self.sets += o.sets;
        self.created += o.created;
        self.deletes += o.deletes;
        self.delete_misses += o.delete_misses;
        self.invalidations += o.invalidations;
        self.invalidated += o.invalidated;
        self.sets_deferred += o.sets_deferred;
        self.ambiguous += o.ambiguous;
        self.clearing_gets += o.clearing_gets;
        self.errors += o.errors;
        for v in &o.violations {
            if self.violations.len() < 20 {
                self.violations.push(v.clone());
            }
        }
    }

    fn violation(&mut self, v: String) {
        if self.violations.len() < 20 {
            self.violations.push(v);
        }
    }
}

struct Ctx {
    base: String,
    client: reqwest::Client,
    args: Args,
}

impl Ctx {
    fn key_url(&self, key: &str) -> String {
        format!("{}/api/v1/cache/{key}", self.base)
    }

    async fn call(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), Box<dyn std::error::Error>> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        Ok((status, serde_json::from_slice(&body)?))
    }

    async fn stats(&self) -> Value {
        self.call(self.client.get(format!("{}/api/v1/stats", self.base)))
            .await
            .expect("stats")
            .1
    }
}

fn tag_names(mask: u64, tags: usize) -> Vec<String> {
    (0..tags)
        .filter(|t| mask & (1 << t) != 0)
        .map(|t| format!("tag-{t}"))
        .collect()
}

fn value_of(key: &str, version: u64, pad: usize) -> String {
    format!("{key}:{version}:{}", "x".repeat(pad))
}

/// Checks a GET's item against the key's last write. `None` state means the
/// worker believes nothing is held (a 200 is then a violation).
fn check_item(
    t: &mut Tally,
    key: &str,
    item: &Value,
    state: Option<Written>,
    now: Instant,
    tags: usize,
) {
    let Some(w) = state else {
        t.violation(format!(
            "{key}: served, but it was deleted or never written"
        ));
        return;
    };
    if w.surely_expired(now) {
        t.violation(format!(
            "{key}: served {:?} after its TTL",
            now - (w.answered + w.ttl)
        ));
    }
    let value = item["value"].as_str().unwrap_or_default();
    if !value.starts_with(&format!("{key}:{}:", w.version)) {
        t.violation(format!(
            "{key}: value {:.40} is not version {}",
            value, w.version
        ));
    }
    let got: Vec<String> = item["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut want = tag_names(w.tags, tags);
    let mut got_sorted = got.clone();
    want.sort();
    got_sorted.sort();
    if got_sorted != want {
        t.violation(format!("{key}: tags {got:?}, last written {want:?}"));
    }
}

async fn worker(ctx: Arc<Ctx>, id: usize, stop: Arc<AtomicBool>) -> (Tally, Vec<Option<Written>>) {
    let n = ctx.args.keys_per_worker;
    let tags = usize::from(ctx.args.tags);
    let mut state: Vec<Option<Written>> = vec![None; n];
    let mut t = Tally::default();
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut version = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.random_range(0..n);
        let key = format!("w{id}-k{k}");
        let roll = rng.random_range(0..10_000);
        let now = Instant::now();
        // Writes to a key whose item may be expired-but-held would break the
        // created/expired books (see the module comment).
        let want_set = (5_000..8_500).contains(&roll);
        let set_ok = match state[k] {
            Some(w) if want_set && !w.safe_to_write(now) && !w.surely_expired(now) => {
                t.sets_deferred += 1;
                false
            }
            _ => want_set,
        };
        if roll < 5_000 || (want_set && !set_ok) {
            // GET
            t.gets += 1;
            match ctx.call(ctx.client.get(ctx.key_url(&key))).await {
                Ok((200, item)) => {
                    t.hits += 1;
                    check_item(&mut t, &key, &item, state[k], Instant::now(), tags);
                }
                Ok((404, _)) => {
                    t.misses += 1;
                    state[k] = None;
                }
                Ok((s, body)) => t.violation(format!("GET {key}: {s} {body}")),
                Err(_) => t.errors += 1,
            }
        } else if set_ok {
            if let Some(w) = state[k]
                && w.surely_expired(now)
            {
                // Clear the expired item first (counted as an expiration).
                t.gets += 1;
                t.clearing_gets += 1;
                match ctx.call(ctx.client.get(ctx.key_url(&key))).await {
                    Ok((404, _)) => t.misses += 1,
                    Ok((200, item)) => {
                        t.hits += 1;
                        check_item(&mut t, &key, &item, state[k], Instant::now(), tags);
                    }
                    Ok((s, body)) => t.violation(format!("GET {key}: {s} {body}")),
                    Err(_) => t.errors += 1,
                }
                state[k] = None;
            }
            version += 1;
            let ttl = if rng.random_bool(0.6) {
                rng.random_range(1..=ctx.args.max_short_ttl)
            } else {
                LONG_TTL
            };
            let mut mask = 0u64;
            for _ in 0..rng.random_range(0..=3) {
                mask |= 1u64 << rng.random_range(0..tags);
            }
            let body = json!({
                "value": value_of(&key, version, rng.random_range(10..400)),
                "ttl": ttl,
                "tags": tag_names(mask, tags),
            });
            let sent = Instant::now();
            match ctx
                .call(ctx.client.put(ctx.key_url(&key)).json(&body))
                .await
            {
                Ok((s @ (200 | 201), _)) => {
                    let answered = Instant::now();
                    t.sets += 1;
                    t.created += u64::from(s == 201);
                    if s == 201 && state[k].is_some_and(|w| !w.certainly_unexpired_until(answered))
                    {
                        t.ambiguous += 1;
                    }
                    state[k] = Some(Written {
                        sent,
                        answered,
                        ttl: Duration::from_secs(ttl),
                        version,
                        tags: mask,
                    });
                }
                Ok((s, body)) => t.violation(format!("PUT {key}: {s} {body}")),
                Err(_) => t.errors += 1,
            }
        } else if roll < 9_999 {
            match ctx.call(ctx.client.delete(ctx.key_url(&key))).await {
                Ok((200, _)) => t.deletes += 1,
                Ok((404, _)) => t.delete_misses += 1,
                Ok((s, body)) => t.violation(format!("DELETE {key}: {s} {body}")),
                Err(_) => t.errors += 1,
            }
            state[k] = None;
        } else {
            let tag = format!("tag-{}", rng.random_range(0..tags));
            let url = format!("{}/api/v1/invalidate/tag/{tag}", ctx.base);
            match ctx.call(ctx.client.post(url)).await {
                Ok((200, body)) => {
                    t.invalidations += 1;
                    t.invalidated += body["invalidated"].as_u64().unwrap_or(0);
                }
                Ok((s, body)) => t.violation(format!("invalidate {tag}: {s} {body}")),
                Err(_) => t.errors += 1,
            }
            // Every item of this worker carrying the tag is gone now (a worker
            // alone writes its keys, one request at a time), so a later GET
            // that still finds one is a violation.
            let bit = tag.trim_start_matches("tag-").parse::<u32>().unwrap_or(0);
            for s in state.iter_mut() {
                if s.is_some_and(|w| w.tags & (1u64 << bit) != 0) {
                    *s = None;
                }
            }
        }
    }
    (t, state)
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{}/statm", pid?)).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

fn counter(stats: &Value, name: &str) -> i64 {
    stats[name].as_i64().unwrap_or(-1)
}

/// Compares the node's counters with the clients' tally; returns failures.
fn check_books(stats: &Value, t: &Tally) -> Vec<String> {
    let c = |n| counter(stats, n);
    let mut failures = Vec::new();
    for (name, ours) in [
        ("sets", t.sets),
        ("hits", t.hits),
        ("misses", t.misses),
        ("deletes", t.deletes),
        ("tag_invalidations", t.invalidated),
    ] {
        if c(name) != ours as i64 {
            failures.push(format!("{name}: node {} vs clients {ours}", c(name)));
        }
    }
    let expected = t.created as i64
        - c("deletes")
        - c("evictions")
        - c("expirations")
        - c("tag_invalidations");
    if !(expected - t.ambiguous as i64..=expected).contains(&c("items")) {
        failures.push(format!(
            "items {} not within {} ambiguous writes of created {} - deletes {} - evictions {} - expirations {} - tag_invalidations {} = {expected}",
            c("items"),
            t.ambiguous,
            t.created,
            c("deletes"),
            c("evictions"),
            c("expirations"),
            c("tag_invalidations")
        ));
    }
    if c("items") > c("capacity") {
        failures.push(format!(
            "items {} over capacity {}",
            c("items"),
            c("capacity")
        ));
    }
    let max_memory = c("max_memory");
    if max_memory > 0 && c("bytes") > max_memory {
        failures.push(format!("bytes {} over max_memory {max_memory}", c("bytes")));
    }
    failures
}

/// The books, checked a few times: the expiry sweeper may run while stats
/// are read shard by shard, so one read can straddle a sweep.
async fn settled_books(ctx: &Ctx, t: &Tally) -> (Value, Vec<String>) {
    let mut last = (Value::Null, Vec::new());
    for _ in 0..10 {
        let stats = ctx.stats().await;
        let failures = check_books(&stats, t);
        if failures.is_empty() {
            return (stats, failures);
        }
        last = (stats, failures);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.workers * 2)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let ctx = Arc::new(Ctx {
        base: format!("http://{}", args.addr),
        client,
        args,
    });
    let args = &ctx.args;
    let started = Instant::now();
    let mut rss = vec![("start".to_owned(), rss_kib(args.pid))];

    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..args.workers)
        .map(|id| tokio::spawn(worker(ctx.clone(), id, stop.clone())))
        .collect();
    let samples = args.rss_samples.max(1);
    for _ in 1..=samples {
        tokio::time::sleep(args.duration / samples).await;
        let stats = ctx.stats().await;
        let sample = rss_kib(args.pid);
        eprintln!(
            "[{:>6.0?}] rss {} KiB, items {}, sets {}, evictions {}, expirations {}",
            started.elapsed(),
            sample.map_or("?".into(), |r| r.to_string()),
            stats["items"],
            stats["sets"],
            stats["evictions"],
            stats["expirations"]
        );
        rss.push((format!("{:.0?}", started.elapsed()), sample));
    }
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    let mut states = Vec::new();
    for h in handles {
        let (t, s) = h.await.expect("a worker");
        tally.add(&t);
        states.push(s);
    }
    let load_time = started.elapsed();
    let ops = tally.gets + tally.sets + tally.deletes + tally.delete_misses + tally.invalidations;

    let mut failures = Vec::new();
    let (stats_after_load, books) = settled_books(&ctx, &tally).await;
    failures.extend(books.iter().map(|f| format!("after load: {f}")));

    // Let every short-TTL item expire, then read every key: the GETs remove
    // the expired ones, and what is found must be exactly what is held.
    tokio::time::sleep(Duration::from_secs(args.max_short_ttl) + MARGIN * 5).await;
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, state) in states.iter().enumerate() {
        for (k, w) in state.iter().enumerate() {
            let key = format!("w{id}-k{k}");
            tally.gets += 1;
            match ctx.call(ctx.client.get(ctx.key_url(&key))).await {
                Ok((200, item)) => {
                    tally.hits += 1;
                    check_item(
                        &mut tally,
                        &key,
                        &item,
                        *w,
                        Instant::now(),
                        usize::from(args.tags),
                    );
                    let tags = item["tags"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|t| t.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    found.insert(key, tags);
                }
                Ok((404, _)) => tally.misses += 1,
                Ok((s, body)) => tally.violation(format!("scan GET {key}: {s} {body}")),
                Err(_) => tally.errors += 1,
            }
        }
    }
    let (stats_after_scan, books) = settled_books(&ctx, &tally).await;
    failures.extend(books.iter().map(|f| format!("after scan: {f}")));
    if counter(&stats_after_scan, "items") != found.len() as i64 {
        failures.push(format!(
            "the scan found {} items, the node holds {}",
            found.len(),
            stats_after_scan["items"]
        ));
    }

    // The tag index against the items: each invalidation removes exactly the
    // found items carrying the tag that earlier invalidations left.
    let mut tag_report = Vec::new();
    for tag in 0..args.tags {
        let tag = format!("tag-{tag}");
        let expected: Vec<String> = found
            .iter()
            .filter(|(_, tags)| tags.contains(&tag))
            .map(|(k, _)| k.clone())
            .collect();
        let url = format!("{}/api/v1/invalidate/tag/{tag}", ctx.base);
        let got = match ctx.call(ctx.client.post(url)).await {
            Ok((200, body)) => body["invalidated"].as_u64().unwrap_or(u64::MAX),
            other => {
                failures.push(format!("invalidate {tag}: {other:?}"));
                continue;
            }
        };
        tally.invalidations += 1;
        tally.invalidated += got;
        if got != expected.len() as u64 {
            failures.push(format!(
                "tag {tag}: invalidation removed {got}, GETs found {} carrying it",
                expected.len()
            ));
        }
        tag_report.push(format!("{tag}={got}"));
        for k in expected {
            found.remove(&k);
        }
    }
    let (stats_end, books) = settled_books(&ctx, &tally).await;
    failures.extend(books.iter().map(|f| format!("at the end: {f}")));
    if counter(&stats_end, "items") != found.len() as i64 {
        failures.push(format!(
            "{} untagged items should remain, the node holds {}",
            found.len(),
            stats_end["items"]
        ));
    }
    rss.push(("end".to_owned(), rss_kib(args.pid)));
    failures.extend(tally.violations.iter().cloned());
    if tally.errors > 0 {
        failures.push(format!("{} requests failed outright", tally.errors));
    }

    let s = &stats_after_load;
    println!(
        "soak: {:?} of load, {} workers, {} keys",
        load_time,
        args.workers,
        args.workers * args.keys_per_worker
    );
    println!(
        "  ops {ops} ({:.0}/s): gets {} (hits {}, misses {}), sets {} (created {}), deletes {} (+{} missing), invalidations {} removing {}",
        ops as f64 / load_time.as_secs_f64(),
        tally.gets,
        tally.hits,
        tally.misses,
        tally.sets,
        tally.created,
        tally.deletes,
        tally.delete_misses,
        tally.invalidations,
        tally.invalidated
    );
    println!(
        "  writes deferred (item might have just expired) {}, clearing GETs {}, ambiguous writes {}",
        tally.sets_deferred, tally.clearing_gets, tally.ambiguous
    );
    let c = |n| counter(s, n);
    println!(
        "  books after load: items {} vs created {} - deletes {} - evictions {} - expirations {} - tag_invalidations {} = {}",
        c("items"),
        tally.created,
        c("deletes"),
        c("evictions"),
        c("expirations"),
        c("tag_invalidations"),
        tally.created as i64
            - c("deletes")
            - c("evictions")
            - c("expirations")
            - c("tag_invalidations")
    );
    println!(
        "  node after load: items {} bytes {} evictions {} expirations {} tag_invalidations {} (capacity {}, max_memory {})",
        s["items"],
        s["bytes"],
        s["evictions"],
        s["expirations"],
        s["tag_invalidations"],
        s["capacity"],
        s["max_memory"]
    );
    println!(
        "  after the expiry wait and a full scan: items {}; tag invalidations {}",
        stats_after_scan["items"],
        tag_report.join(" ")
    );
    println!(
        "  rss KiB: {}",
        rss.iter()
            .map(|(at, r)| format!("{at}={}", r.map_or("?".into(), |r| r.to_string())))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let (Some(Some(first)), Some(Some(last))) =
        (rss.first().map(|r| r.1), rss.last().map(|r| r.1))
    {
        println!("  rss end - start: {:+} KiB", last as i64 - first as i64);
    }
    if failures.is_empty() {
        println!(
            "  consistency: OK (counters add up, no stale or expired reads, tag index agrees with the items)"
        );
        std::process::ExitCode::SUCCESS
    } else {
        println!("  consistency: FAILED");
        for f in &failures {
            println!("    {f}");
        }
        std::process::ExitCode::FAILURE
    }
}

//! `distrocache bench`: a small load generator. `concurrency` tasks share a
//! budget of requests, each a GET or a SET (by `set_percent`) of a key drawn
//! from `keys` with a per-task xorshift generator, through the ring-aware
//! client. Latencies go into an HDR histogram; the report has throughput,
//! percentiles and a coarse histogram. A GET miss is an answer, not an
//! error; failed requests are counted, and a run where every request failed
//! is an error. For the project's real benchmarks see bench/.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use distrocache_client::Client;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Plan {
    pub requests: u64,
    pub concurrency: usize,
    pub keys: u64,
    pub set_percent: u8,
    pub value_size: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub requests: u64,
    pub gets: u64,
    pub sets: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// (upper bound in microseconds, requests) per power-of-two bucket.
    pub histogram: Vec<(u64, u64)>,
}

struct TaskResult {
    histogram: Histogram<u64>,
    gets: u64,
    sets: u64,
    errors: u64,
    first_error: Option<String>,
}

pub async fn run(client: &Client, plan: &Plan) -> Result<Report> {
    let budget = Arc::new(AtomicU64::new(plan.requests));
    let value = Value::String("x".repeat(plan.value_size));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(plan.concurrency);
    for task in 0..plan.concurrency {
        let client = client.clone();
        let budget = budget.clone();
        let value = value.clone();
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let mut result = TaskResult {
                // 1 µs to 60 s, 3 significant digits.
                histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                    .expect("valid histogram bounds"),
                gets: 0,
                sets: 0,
                errors: 0,
                first_error: None,
            };
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (task as u64 + 1);
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            while budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let key = format!("bench:{}", next() % plan.keys);
                let is_set = next() % 100 < u64::from(plan.set_percent);
                let t = Instant::now();
                let outcome = if is_set {
                    result.sets += 1;
                    client.set(&key, &value, None, &[]).await.map(|_| ())
                } else {
                    result.gets += 1;
                    client.get_raw(&key).await.map(|_| ())
                };
                let micros = t.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                result.histogram.saturating_record(micros);
                if let Err(e) = outcome {
                    result.errors += 1;
                    result.first_error.get_or_insert_with(|| e.to_string());
                }
            }
            result
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut gets, mut sets, mut errors, mut first_error) = (0, 0, 0, None);
    for task in tasks {
        let r = task.await?;
        histogram.add(&r.histogram)?;
        gets += r.gets;
        sets += r.sets;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    if errors == plan.requests {
        bail!(
            "every request failed; the first: {}",
            first_error.unwrap_or_default()
        );
    }
    let mut buckets = Vec::new();
    let mut upper = 1u64;
    let mut below = 0u64;
    while below < histogram.len() && upper <= 60_000_000 * 2 {
        let count = histogram.count_between(0, upper) - below;
        if count > 0 {
            buckets.push((upper, count));
        }
        below += count;
        upper *= 2;
    }
    Ok(Report {
        requests: plan.requests,
        gets,
        sets,
        errors,
        first_error,
        seconds,
        requests_per_second: plan.requests as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.5),
        p90_us: histogram.value_at_quantile(0.9),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        histogram: buckets,
    })
}

impl Report {
    pub fn print(&self) {
        let us = |v: u64| format!("{:?}", Duration::from_micros(v));
        println!(
            "{} requests ({} GET, {} SET) in {:.2}s: {:.0} req/s, {} error(s)",
            self.requests,
            self.gets,
            self.sets,
            self.seconds,
            self.requests_per_second,
            self.errors
        );
        if let Some(e) = &self.first_error {
            println!("first error: {e}");
        }
        println!(
            "latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            us(self.p50_us),
            us(self.p90_us),
            us(self.p99_us),
            us(self.p999_us),
            us(self.max_us)
        );
        let most = self.histogram.iter().map(|b| b.1).max().unwrap_or(1).max(1);
        for (upper, count) in &self.histogram {
            let bar = "#".repeat(((count * 40).div_ceil(most)) as usize);
            println!("  <= {:>10}  {count:>9}  {bar}", us(*upper));
        }
    }
}

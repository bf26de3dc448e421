//! What each subcommand does, through the ring-aware client: build the
//! client from the global options, run the operation, print the answer as a
//! table or JSON. A missing key is an error (exit 1), so scripts can test
//! for it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use distrocache_client::{Client, Error as ClientError, Item, Method, StatusCode};
use distrocache_membership::{CLUSTER_PATH, ClusterView, NodeProgress, PROGRESS_PATH, SyncPhase};
use serde_json::{Value, json};

use crate::args::{Cli, Command, Output};
use crate::{bench, table};

/// Largest value read from a file or stdin (the node's default value limit
/// is smaller; this only bounds what the CLI holds in memory).
pub const MAX_VALUE_BYTES: u64 = 64 << 20;
/// Longest token file.
const MAX_TOKEN_BYTES: u64 = 4096;
/// Largest CA file (a bundle of a few hundred certificates fits).
const MAX_CA_FILE_BYTES: u64 = 1 << 20;

pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "distrocache", &mut std::io::stdout());
        return Ok(());
    }
    let client = connect(&cli).await?;
    let out = cli.output;
    match cli.command {
        Command::Get { key } => get(&client, &key, out).await,
        Command::Set {
            key,
            value,
            file,
            string,
            ttl,
            tags,
        } => {
            let value = value_of(value.as_deref(), file.as_deref(), string)?;
            set(&client, &key, &value, ttl, &tags, out).await
        }
        Command::Del { key } => {
            if !client.delete(&key).await.map_err(explain)? {
                bail!("key {key:?} not found");
            }
            match out {
                Output::Json => table::json(&json!({"key": key, "deleted": true})),
                Output::Table => {
                    println!("deleted {key}");
                    Ok(())
                }
            }
        }
        Command::InvalidateTag { tag } => {
            let n = client.invalidate_tag(&tag).await.map_err(explain)?;
            match out {
                Output::Json => table::json(&json!({"tag": tag, "invalidated": n})),
                Output::Table => {
                    println!("invalidated {n} item(s) tagged {tag}");
                    Ok(())
                }
            }
        }
        Command::Stats => stats(&client, out).await,
        Command::Cluster => cluster(&client, out).await,
        Command::WatchRebalance {
            within,
            every,
            epoch,
        } => watch_rebalance(&client, within, every, epoch, out).await,
        Command::Bench {
            requests,
            concurrency,
            keys,
            set_percent,
            value_size,
        } => {
            let plan = bench::Plan {
                requests,
                concurrency: concurrency as usize,
                keys,
                set_percent,
                value_size: value_size as usize,
            };
            let report = bench::run(&client, &plan).await?;
            match out {
                Output::Json => table::json(&report),
                Output::Table => {
                    report.print();
                    Ok(())
                }
            }
        }
        Command::Completions { .. } => unreachable!("handled above"),
    }
}

/// The token from --token or --token-file, if any.
pub fn token(cli: &Cli) -> Result<Option<String>> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.clone()));
    }
    let Some(path) = &cli.token_file else {
        return Ok(None);
    };
    let text = String::from_utf8(small_file(path, "token file", MAX_TOKEN_BYTES)?)
        .with_context(|| format!("token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(Some(token.to_owned()))
}

/// The whole of a file of settings (a token, CA certificates), refused
/// when it is larger than `max` bytes rather than read into memory: read
/// through the limit, whatever size the file system reports (a FIFO or a
/// device reports none).
fn small_file(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("{what} {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{what} {}: more than {max} bytes", path.display());
    }
    Ok(bytes)
}

async fn connect(cli: &Cli) -> Result<Client> {
    let mut builder = Client::builder(cli.servers.iter().cloned()).timeout(cli.timeout);
    if let Some(token) = token(cli)? {
        builder = builder.token(token);
    }
    if let Some(path) = &cli.ca_file {
        builder = builder.ca_pem(small_file(path, "CA file", MAX_CA_FILE_BYTES)?);
    }
    if let (Some(cert), Some(key)) = (&cli.cert_file, &cli.key_file) {
        builder = builder.client_cert_files(cert, key);
    }
    if let Some(name) = &cli.tls_server_name {
        builder = builder.tls_server_name(name.clone());
    }
    builder
        .connect()
        .await
        .map_err(explain)
        .with_context(|| format!("cannot reach {}", cli.servers.join(", ")))
}

/// A client error as the user should read it.
fn explain(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Status { status, message } if status == StatusCode::UNAUTHORIZED => {
            anyhow!("the server refused the token ({message}); pass --token or --token-file")
        }
        ClientError::Status { status, message } => anyhow!("{message} ({status})"),
        // The ring is learned before any command: a refused token shows up
        // as the seed's answer to that request.
        ClientError::Unreachable(why) if why.contains("401 Unauthorized") => {
            anyhow!("the server refused the token ({why}); pass --token or --token-file")
        }
        // The node's TLS refused this client's certificate, or its absence.
        ClientError::Unreachable(why) if why.contains("refused the handshake") => {
            anyhow!(
                "the server refused the TLS handshake ({why}); it asks for a client certificate \
                 its CA signed: pass --cert-file and --key-file"
            )
        }
        other => anyhow!(other),
    }
}

/// The value of `set`: the argument, the file or stdin, parsed as JSON
/// (or taken as a JSON string with `--string`).
pub(crate) fn value_of(arg: Option<&str>, file: Option<&Path>, string: bool) -> Result<Value> {
    let text = read_value(arg, file)?;
    if string {
        return Ok(Value::String(text));
    }
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("the value is not JSON ({e}); pass --string to store it as text"))
}

/// The value's text: the argument, the file, or stdin (bounded).
fn read_value(arg: Option<&str>, file: Option<&Path>) -> Result<String> {
    let mut bytes = Vec::new();
    match (arg, file) {
        (Some(v), _) if v != "-" => return Ok(v.to_owned()),
        (_, Some(path)) => {
            let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
            f.take(MAX_VALUE_BYTES + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("{}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .take(MAX_VALUE_BYTES + 1)
                .read_to_end(&mut bytes)
                .context("stdin")?;
        }
    }
    if bytes.len() as u64 > MAX_VALUE_BYTES {
        bail!("the value is larger than {MAX_VALUE_BYTES} bytes");
    }
    String::from_utf8(bytes).map_err(|_| anyhow!("the value is not UTF-8 text"))
}

async fn get(client: &Client, key: &str, out: Output) -> Result<()> {
    let item = client
        .get(key)
        .await
        .map_err(explain)?
        .ok_or_else(|| anyhow!("key {key:?} not found"))?;
    match out {
        Output::Json => table::json(&item_json(&item)),
        Output::Table => {
            print_item(&item);
            Ok(())
        }
    }
}

async fn set(
    client: &Client,
    key: &str,
    value: &Value,
    ttl: Option<Duration>,
    tags: &[String],
    out: Output,
) -> Result<()> {
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    let item = client.set(key, value, ttl, &tags).await.map_err(explain)?;
    match out {
        Output::Json => table::json(&item_json(&item)),
        Output::Table => {
            print_item(&item);
            Ok(())
        }
    }
}

pub(crate) fn item_json(item: &Item) -> Value {
    json!({
        "key": item.key,
        "value": item.value,
        "ttl": item.ttl,
        "created_at": item.created_at,
        "accessed_at": item.accessed_at,
        "expires_at": item.expires_at,
        "access_count": item.access_count,
        "tags": item.tags,
    })
}

pub(crate) fn print_item(item: &Item) {
    let ttl = humantime::format_duration(Duration::from_secs(item.ttl / 1_000_000_000));
    let rows = vec![
        vec!["key".into(), item.key.clone()],
        vec!["value".into(), item.value.to_string()],
        vec!["ttl".into(), ttl.to_string()],
        vec!["tags".into(), item.tags.join(",")],
        vec!["created".into(), item.created_at.clone()],
        vec![
            "expires".into(),
            item.expires_at.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["accesses".into(), item.access_count.to_string()],
    ];
    table::print(&["FIELD", "VALUE"], &rows);
}

/// GET `path` from any node; a non-200 answer is an error.
async fn any_json(client: &Client, path: &str) -> Result<Value> {
    let answer = client
        .any_node(Method::GET, path.to_owned())
        .await
        .map_err(explain)?;
    json_answer(answer.status, &answer.body, path)
}

fn json_answer(status: StatusCode, body: &[u8], path: &str) -> Result<Value> {
    let value: Value = serde_json::from_slice(body)
        .with_context(|| format!("{path}: the answer is not JSON ({status})"))?;
    if status != StatusCode::OK {
        let message = value["error"].as_str().unwrap_or("no message");
        return Err(explain(ClientError::Status {
            status,
            message: message.to_owned(),
        }));
    }
    Ok(value)
}

async fn stats(client: &Client, out: Output) -> Result<()> {
    let stats = any_json(client, "/api/v1/cluster/stats").await?;
    if out == Output::Json {
        return table::json(&stats);
    }
    let cell = |v: &Value, k: &str| match &v[k] {
        Value::Null => "-".to_owned(),
        Value::Number(n) if k == "hit_ratio" => format!("{:.3}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    };
    let columns = [
        "items",
        "bytes",
        "hits",
        "misses",
        "hit_ratio",
        "sets",
        "deletes",
        "evictions",
        "expirations",
    ];
    let mut rows = Vec::new();
    for node in stats["nodes"].as_array().into_iter().flatten() {
        let mut row = vec![node["node_id"].as_str().unwrap_or("?").to_owned()];
        row.extend(columns.iter().map(|c| cell(node, c)));
        rows.push(row);
    }
    let mut total = vec!["TOTAL".to_owned()];
    total.extend(columns.iter().map(|c| cell(&stats["totals"], c)));
    rows.push(total);
    let mut header = vec!["NODE"];
    let upper: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    header.extend(upper.iter().map(String::as_str));
    table::print(&header, &rows);
    for node in stats["unreachable"].as_array().into_iter().flatten() {
        eprintln!("warning: {node} did not answer");
    }
    Ok(())
}

async fn cluster(client: &Client, out: Output) -> Result<()> {
    client.refresh().await.map_err(explain)?;
    let ring = client.ring();
    let view: ClusterView = serde_json::from_value(any_json(client, CLUSTER_PATH).await?)
        .with_context(|| format!("{CLUSTER_PATH}: unexpected view of the ring"))?;
    let stats = any_json(client, "/api/v1/cluster/stats").await?;
    let items: BTreeMap<String, u64> = stats["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| Some((n["node_id"].as_str()?.to_owned(), n["items"].as_u64()?)))
        .collect();
    let total: u64 = items.values().sum();
    let mean = total as f64 / ring.nodes.len().max(1) as f64;
    let members: Vec<Value> = ring
        .nodes
        .iter()
        .map(|n| {
            let held = items.get(&n.id).copied();
            json!({
                "id": n.id,
                "address": n.address.to_string(),
                "state": n.state.as_str(),
                "items": held,
                // Items over the mean: 1.0 is perfect balance.
                "balance": held.map(|h| if mean > 0.0 { h as f64 / mean } else { 0.0 }),
            })
        })
        .collect();
    let summary = json!({
        "mode": view.mode,
        "epoch": ring.epoch,
        "replicationFactor": view.replication_factor,
        "settled": view.settled,
        "members": members,
        "unreachable": stats["unreachable"],
    });
    if out == Output::Json {
        return table::json(&summary);
    }
    println!(
        "mode {}, ring epoch {}, replication factor {}, settled {}",
        summary["mode"].as_str().unwrap_or("?"),
        ring.epoch,
        view.replication_factor.unwrap_or(1),
        view.settled
    );
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m["id"].as_str().unwrap_or("?").to_owned(),
                m["address"].as_str().unwrap_or("?").to_owned(),
                m["state"].as_str().unwrap_or("?").to_owned(),
                m["items"]
                    .as_u64()
                    .map_or("unreachable".into(), |i| i.to_string()),
                m["balance"]
                    .as_f64()
                    .map_or("-".into(), |b| format!("{b:.2}")),
            ]
        })
        .collect();
    table::print(&["MEMBER", "ADDRESS", "STATE", "ITEMS", "BALANCE"], &rows);
    Ok(())
}

/// Every member's progress, or the first error.
async fn progress(client: &Client) -> Result<Vec<NodeProgress>> {
    let ring = client.ring();
    let mut all = Vec::with_capacity(ring.nodes.len());
    for node in &ring.nodes {
        let answer = client
            .at(node.address, Method::GET, PROGRESS_PATH.to_owned())
            .await
            .map_err(explain)?;
        let value = json_answer(answer.status, &answer.body, PROGRESS_PATH)
            .with_context(|| format!("node {}", node.id))?;
        all.push(
            serde_json::from_value(value)
                .with_context(|| format!("node {}: unexpected progress report", node.id))?,
        );
    }
    Ok(all)
}

async fn watch_rebalance(
    client: &Client,
    within: Duration,
    every: Duration,
    min_epoch: u64,
    out: Output,
) -> Result<()> {
    let ring = client.ring();
    if ring.nodes.len() == 1 && ring.epoch == 0 && min_epoch == 0 {
        let message = "a single node (no ring): nothing to rebalance";
        return match out {
            Output::Json => table::json(&json!({"epoch": 0, "nodes": 1, "message": message})),
            Output::Table => {
                println!("{message}");
                Ok(())
            }
        };
    }
    let started = Instant::now();
    let deadline = started + within;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} nodes synced  {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let (sent0, received0) = {
        let p = progress(client).await?;
        (
            p.iter().map(|n| n.keys_sent).sum::<u64>(),
            p.iter().map(|n| n.keys_received).sum::<u64>(),
        )
    };
    loop {
        client.refresh().await.map_err(explain)?;
        let epoch = client.ring().epoch;
        let nodes = progress(client).await?;
        let synced = nodes
            .iter()
            .filter(|n| n.epoch >= epoch && n.synced_epoch >= epoch && n.phase == SyncPhase::Idle)
            .count();
        let reached = epoch >= min_epoch;
        // Since the watch began (a restarted node's counters start again
        // at zero, hence saturating).
        let sent = nodes
            .iter()
            .map(|n| n.keys_sent)
            .sum::<u64>()
            .saturating_sub(sent0);
        let received = nodes
            .iter()
            .map(|n| n.keys_received)
            .sum::<u64>()
            .saturating_sub(received0);
        bar.set_length(nodes.len() as u64);
        bar.set_position(synced as u64);
        bar.set_message(format!(
            "epoch {epoch}, keys sent {sent}, received {received}"
        ));
        if reached && synced == nodes.len() {
            bar.finish_and_clear();
            let report = json!({
                "epoch": epoch,
                "nodes": nodes.len(),
                "keysSent": sent,
                "keysReceived": received,
                "seconds": started.elapsed().as_secs_f64(),
            });
            return match out {
                Output::Json => table::json(&report),
                Output::Table => {
                    println!(
                        "ring epoch {epoch} settled on {} node(s) after {:.1}s: {} key(s) sent, {} received while watching",
                        nodes.len(),
                        started.elapsed().as_secs_f64(),
                        report["keysSent"],
                        report["keysReceived"]
                    );
                    Ok(())
                }
            };
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "the ring (epoch {epoch}) did not settle within {}: {synced} of {} node(s) synced",
                humantime::format_duration(within),
                nodes.len()
            );
        }
        tokio::time::sleep(every).await;
    }
}

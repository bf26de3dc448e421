//! `kubectl distrocache`: the same binary, installed on the PATH as
//! `kubectl-distrocache`, is a kubectl plugin. It finds a DistroCache by
//! name with the user's kubeconfig and talks to its nodes through the API
//! server's proxy of the cache's client Service
//! (`/api/v1/namespaces/<ns>/services/<name>:http/proxy/...`), so it works
//! wherever kubectl does, without a port-forward or a route to the pods.
//!
//! Why the Service's proxy and not each pod's: any node answers any key and
//! describes the whole ring, so one ready node behind the Service is
//! enough, and the Service is a stable name while pods come and go. Where
//! the pods have loopback or link-local IPs neither proxy reaches them (the
//! pods' proxy refuses such IPs, and the Service's Endpoints cannot hold
//! them): `status` then prints the resource's part and one line saying
//! why the nodes were not read, and `get`/`set` fail with the API server's
//! answer.
//!
//! A cache with `spec.auth.enabled`: the plugin reads the cache's client
//! token from its auth Secret (`spec.auth.secretName`, else `<name>-auth`,
//! key `client-token`: what the nodes mount) with the user's credentials,
//! and sends it in `X-DistroCache-Token`. Not in `Authorization`: the API
//! server authenticates the user by that header and removes it before
//! proxying, while other headers pass. So reading an auth cache's items
//! takes `get` on that Secret too; without it, `get`/`set` fail with the API
//! server's refusal, and `status` still shows the resource.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use distrocache_client::Item;
use distrocache_membership::{CLUSTER_PATH, NodeProgress, PROGRESS_PATH};
use http::{Method, Request, StatusCode, header};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::args::{Output, parse_ttl};
use crate::commands::{item_json, print_item, value_of};
use crate::table;

/// The file name that turns the binary into the plugin.
pub const PLUGIN_NAME: &str = "kubectl-distrocache";

/// Characters left as they are in a path segment: RFC 3986 "unreserved"
/// (as the typed client encodes keys).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The client Service's port name (operator/src/resources/services.rs).
const CLIENT_PORT_NAME: &str = "http";
/// The auth Secret's key holding the client tokens
/// (operator/src/resources/auth.rs).
const CLIENT_TOKEN_KEY: &str = "client-token";
/// The node's header for a token that cannot go in `Authorization`
/// (cache-node/src/api/auth.rs).
const TOKEN_HEADER: &str = "x-distrocache-token";

#[derive(Debug, Parser)]
#[command(
    name = "kubectl distrocache",
    bin_name = "kubectl distrocache",
    version,
    about = "kubectl plugin of DistroCache: a cache's status, and its items through the API server",
    long_about = "kubectl plugin of DistroCache: a cache's status, and its items through the API \
        server's proxy of the cache's client Service (needs get on distrocaches and get/create on \
        services/proxy in the cache's namespace, and get on the cache's auth Secret when it has \
        spec.auth.enabled). Errors are one line on stderr and a non-zero \
        exit status (1: the operation failed, e.g. an unknown cache or key; 2: bad usage)."
)]
pub struct PluginCli {
    /// The cache's namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,

    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,

    /// The kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// How answers are printed.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Timeout of each request to the API server (e.g. 10s, 500ms).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// The cache's conditions, replicas, members, ring epoch and rebalance
    /// progress (from the resource and from a node).
    Status { name: String },
    /// Read an item (exit 1 when the key is absent).
    Get { name: String, key: String },
    /// Write an item. The value is JSON, from the argument, --file, or
    /// stdin (no argument, or `-`).
    Set {
        name: String,
        key: String,
        /// The value as JSON (`42`, `"text"`, `{"a":1}`); `-` or absent: stdin.
        value: Option<String>,
        /// Read the value from this file.
        #[arg(short, long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Store the input as a JSON string instead of parsing it as JSON.
        #[arg(long)]
        string: bool,
        /// Time to live (e.g. 30s, 5m); absent: the cache's default.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// A tag; repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
}

/// Whether the program was started as the plugin: its file name (argv[0])
/// is `kubectl-distrocache` (kubectl runs plugins by their path).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_stem()
        .is_some_and(|name| name == PLUGIN_NAME)
}

pub async fn run(cli: PluginCli) -> Result<()> {
    let kube = Kube::connect(&cli).await?;
    let out = cli.output;
    match cli.command {
        PluginCommand::Status { name } => {
            let cache = kube.cache(&name).await?;
            status(&kube, cache, out).await
        }
        PluginCommand::Get { name, key } => {
            let mut cache = kube.cache(&name).await?;
            cache.load_token(&kube).await?;
            let item = item_request(&kube, &cache, Method::GET, &key, Vec::new())
                .await?
                .ok_or_else(|| anyhow!("key {key:?} not found in distrocache {name}"))?;
            print_answer(&item, out)
        }
        PluginCommand::Set {
            name,
            key,
            value,
            file,
            string,
            ttl,
            tags,
        } => {
            let value = value_of(value.as_deref(), file.as_deref(), string)?;
            let mut cache = kube.cache(&name).await?;
            cache.load_token(&kube).await?;
            let mut body = json!({"value": value, "tags": tags});
            if let Some(ttl) = ttl {
                body["ttl"] = json!(ttl.as_secs().max(1));
            }
            let body = serde_json::to_vec(&body)?;
            // POST, not PUT: through the proxy that is the `create` verb on
            // services/proxy (PUT would need `update`).
            let item = item_request(&kube, &cache, Method::POST, &key, body)
                .await?
                .ok_or_else(|| anyhow!("distrocache {name} did not store key {key:?}"))?;
            print_answer(&item, out)
        }
    }
}

fn print_answer(item: &Item, out: Output) -> Result<()> {
    match out {
        Output::Json => table::json(&item_json(item)),
        Output::Table => {
            print_item(item);
            Ok(())
        }
    }
}

/// The API server, as the user's kubeconfig reaches it.
struct Kube {
    client: Client,
    namespace: String,
    server: String,
}

impl Kube {
    async fn connect(cli: &PluginCli) -> Result<Kube> {
        let options = KubeConfigOptions {
            context: cli.context.clone(),
            cluster: None,
            user: None,
        };
        let mut config = match &cli.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            None if cli.context.is_some() => Config::from_kubeconfig(&options)
                .await
                .context("kubeconfig")?,
            None => Config::infer()
                .await
                .context("no kubeconfig found (set KUBECONFIG or pass --kubeconfig)")?,
        };
        config.connect_timeout = Some(cli.timeout);
        config.read_timeout = Some(cli.timeout);
        // One answer, and a clear error, rather than retries behind the
        // user's back (a 503 is usually "no ready node").
        config.default_retry = false;
        let server = config.cluster_url.to_string();
        let namespace = cli
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).context("cannot build the Kubernetes client")?;
        Ok(Kube {
            client,
            namespace,
            server,
        })
    }

    /// The DistroCache `name`, read as a dynamic object (the CLI does not
    /// link the operator).
    async fn cache(&self, name: &str) -> Result<Cache> {
        let gvk = GroupVersionKind::gvk("distrocache.io", "v1alpha1", "DistroCache");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "distrocaches");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        match api.get(name).await {
            Ok(object) => Ok(Cache {
                name: name.to_owned(),
                namespace: self.namespace.clone(),
                object,
                token: None,
            }),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                // Either the cache or the resource type is missing.
                bail!(
                    "distrocache {name:?} not found in namespace {:?} ({})",
                    self.namespace,
                    status.message
                )
            }
            Err(e) => Err(self.explain(e)),
        }
    }

    /// The first client token in the auth Secret of `cache`.
    async fn client_token(&self, cache: &Cache) -> Result<String> {
        let secret = cache.auth_secret_name();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let found = api.get(&secret).await.map_err(|e| {
            anyhow!(self.explain(e)).context(format!(
                "distrocache {} has spec.auth.enabled and its client token is in Secret {}/{secret}",
                cache.name, self.namespace
            ))
        })?;
        let data = found
            .data
            .as_ref()
            .and_then(|d| d.get(CLIENT_TOKEN_KEY))
            .ok_or_else(|| {
                anyhow!(
                    "Secret {}/{secret} has no {CLIENT_TOKEN_KEY:?} key",
                    self.namespace
                )
            })?;
        first_token(&data.0).ok_or_else(|| {
            anyhow!(
                "Secret {}/{secret}: {CLIENT_TOKEN_KEY:?} holds no token",
                self.namespace
            )
        })
    }

    /// A kube error as the user should read it.
    fn explain(&self, e: kube::Error) -> anyhow::Error {
        match e {
            kube::Error::Api(status) => anyhow!(
                "the API server refused: {} ({} {})",
                status.message,
                status.code,
                status.reason
            ),
            other => {
                anyhow!(other).context(format!("cannot reach the API server at {}", self.server))
            }
        }
    }

    /// One request to a node of `cache` through its client Service's
    /// proxy: the node's status and JSON answer. The API server's own
    /// refusals (no ready node, RBAC, unknown Service) are errors.
    async fn proxy(
        &self,
        cache: &Cache,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Value)> {
        let uri = format!("{}{path}", cache.proxy_base());
        let mut request = Request::builder().method(method.clone()).uri(&uri);
        if let Some(token) = &cache.token {
            request = request.header(TOKEN_HEADER, token.as_str());
        }
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(kube::client::Body::from(body))
            .with_context(|| format!("bad request {uri}"))?;
        let answer = self
            .client
            .send(request)
            .await
            .map_err(|e| self.explain(e))?;
        let status = answer.status();
        let bytes = answer
            .into_body()
            .collect_bytes()
            .await
            .map_err(|e| self.explain(e))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&bytes).trim().replace('\n', " "))
        });
        // The API server answers for itself with a Status object; a node
        // answers with its own JSON.
        if value["kind"] == "Status" && value["apiVersion"] == "v1" {
            let message = value["message"].as_str().unwrap_or("no message");
            // The Service's proxy answers 404 when the Service has no
            // Endpoints object, which happens when every pod IP is one the
            // API server refuses to hold (loopback, link-local).
            let hint = if status == StatusCode::NOT_FOUND {
                " (the client Service or its Endpoints are missing)"
            } else {
                ""
            };
            bail!(
                "{method} {path} on distrocache {}: the API server answered {status}: {message}{hint}",
                cache.name
            );
        }
        Ok((status, value))
    }
}

/// A DistroCache as the API server returned it, and the token its nodes
/// want (read when they want one).
struct Cache {
    name: String,
    namespace: String,
    object: DynamicObject,
    token: Option<String>,
}

impl Cache {
    fn spec(&self) -> &Value {
        &self.object.data["spec"]
    }

    fn status(&self) -> &Value {
        &self.object.data["status"]
    }

    fn auth(&self) -> bool {
        self.spec()["auth"]["enabled"].as_bool().unwrap_or(false)
    }

    fn tls(&self) -> bool {
        let tls = &self.spec()["tls"];
        !tls["secretName"].is_null() || !tls["certManager"].is_null()
    }

    /// The client Service's proxy (HTTPS to the nodes with spec.tls).
    fn proxy_base(&self) -> String {
        let scheme = if self.tls() { "https:" } else { "" };
        format!(
            "/api/v1/namespaces/{}/services/{scheme}{}:{CLIENT_PORT_NAME}/proxy",
            self.namespace, self.name
        )
    }

    /// The Secret holding the tokens: the user's, or `<name>-auth` (as the
    /// operator names it).
    fn auth_secret_name(&self) -> String {
        self.spec()["auth"]["secretName"]
            .as_str()
            .map_or_else(|| format!("{}-auth", self.name), str::to_owned)
    }

    /// Reads the client token, when the nodes want one.
    async fn load_token(&mut self, kube: &Kube) -> Result<()> {
        if self.auth() {
            self.token = Some(kube.client_token(self).await?);
        }
        Ok(())
    }
}

/// The token a client sends from a token file's text: the first line that
/// is not blank (every line is a valid token during a rotation).
fn first_token(text: &[u8]) -> Option<String> {
    std::str::from_utf8(text)
        .ok()?
        .lines()
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(str::to_owned)
}

/// GET or POST of one item through the proxy: the item, or `None` when the
/// key is absent.
async fn item_request(
    kube: &Kube,
    cache: &Cache,
    method: Method,
    key: &str,
    body: Vec<u8>,
) -> Result<Option<Item>> {
    if key.is_empty() {
        bail!("keys must not be empty");
    }
    let path = format!("/api/v1/cache/{}", utf8_percent_encode(key, SEGMENT));
    let (status, value) = kube.proxy(cache, method, &path, body).await?;
    match status {
        StatusCode::OK | StatusCode::CREATED => serde_json::from_value(value)
            .map(Some)
            .with_context(|| format!("{path}: unexpected answer")),
        StatusCode::NOT_FOUND => Ok(None),
        status => Err(node_error(status, &value)),
    }
}

/// A node's error answer as one line.
fn node_error(status: StatusCode, value: &Value) -> anyhow::Error {
    let message = value["error"]
        .as_str()
        .or_else(|| value.as_str())
        .unwrap_or("no message");
    if status == StatusCode::UNAUTHORIZED {
        return anyhow!(
            "the node refused the request ({message}): the cache has spec.auth.enabled and the \
             token sent was not one of its client tokens"
        );
    }
    anyhow!("{message} ({status})")
}

/// GET of a node's JSON through the proxy; a non-200 answer is an error.
async fn node_json(kube: &Kube, cache: &Cache, path: &str) -> Result<Value> {
    let (status, value) = kube.proxy(cache, Method::GET, path, Vec::new()).await?;
    if status != StatusCode::OK {
        return Err(node_error(status, &value)).with_context(|| format!("GET {path}"));
    }
    Ok(value)
}

async fn status(kube: &Kube, cache: Cache, out: Output) -> Result<()> {
    // What a node says. Without it the resource's status still stands (the
    // operator writes it from the nodes), so a proxy or a Secret the API
    // server refuses (RBAC, no endpoints) is reported, not fatal.
    // Without the token (a Secret the user may not read) the ring view is
    // out of reach, but the rebalance progress is open, like the probes.
    let mut cache = cache;
    let one_line = |e: anyhow::Error| format!("{e:#}").replace('\n', " ");
    let token_error = cache.load_token(kube).await.err().map(one_line);
    let status = cache.status();
    let (ring, progress, nodes_error) = match node_view(kube, &cache).await {
        Ok((ring, progress)) => (ring, Some(progress), token_error),
        Err(e) => (None, None, token_error.or(Some(one_line(e)))),
    };
    let summary = json!({
        "name": cache.name,
        "namespace": cache.namespace,
        "replicas": cache.spec()["replicas"],
        "readyReplicas": status["readyReplicas"].as_i64().unwrap_or(0),
        "ringEpoch": status["ringEpoch"].as_i64().unwrap_or(0),
        "observedGeneration": status["observedGeneration"],
        "conditions": status["conditions"].as_array().cloned().unwrap_or_default(),
        "members": status["members"].as_array().cloned().unwrap_or_default(),
        "ring": ring,
        "rebalance": progress,
        "nodesError": nodes_error,
    });
    if let Some(e) = &nodes_error {
        eprintln!("warning: the nodes were not read through the API server's proxy: {e}");
    }
    if out == Output::Json {
        return table::json(&summary);
    }
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "distrocache {}/{}: {} replicas wanted, {} ready, ring epoch {}",
        cache.namespace,
        cache.name,
        text(&summary["replicas"]),
        summary["readyReplicas"],
        summary["ringEpoch"]
    );
    println!();
    let conditions: Vec<Vec<String>> = summary["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            ["type", "status", "reason", "message"]
                .iter()
                .map(|k| text(&c[*k]).replace('\n', " "))
                .collect()
        })
        .collect();
    table::print(&["CONDITION", "STATUS", "REASON", "MESSAGE"], &conditions);
    println!();
    let members: Vec<Vec<String>> = summary["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            ["pod", "state", "ready", "items", "address"]
                .iter()
                .map(|k| text(&m[*k]))
                .collect()
        })
        .collect();
    table::print(&["MEMBER", "STATE", "READY", "ITEMS", "ADDRESS"], &members);
    println!();
    if let Some(e) = &nodes_error {
        println!("nodes: not read through the API server's proxy: {e}");
        if summary["rebalance"].is_null() {
            return Ok(());
        }
    }
    let ring = &summary["ring"];
    if ring.is_null() {
        println!("ring: not read (no client token)");
    } else {
        let moving = match ring["previousEpoch"].as_u64() {
            Some(previous) => format!("moving data from epoch {previous}"),
            None if ring["settled"] == true => "settled".to_owned(),
            None => "not settled".to_owned(),
        };
        println!(
            "ring seen by node {}: epoch {}, {} member(s), replication factor {}, {moving}",
            text(&ring["nodeId"]),
            text(&ring["epoch"]),
            ring["members"].as_array().map_or(0, Vec::len),
            text(&ring["replicationFactor"]),
        );
    }
    println!(
        "rebalance on node {}: phase {}, epoch {}, synced epoch {}, keys sent {}, received {}, last sync {:.2}s",
        progress_field(&summary, "nodeId"),
        progress_field(&summary, "phase"),
        progress_field(&summary, "epoch"),
        progress_field(&summary, "syncedEpoch"),
        progress_field(&summary, "keysSent"),
        progress_field(&summary, "keysReceived"),
        summary["rebalance"]["lastSyncSeconds"]
            .as_f64()
            .unwrap_or(0.0),
    );
    Ok(())
}

/// The ring as a node holds it (which takes the client token on an auth
/// cache: `None` without it) and that node's data movement (open).
async fn node_view(kube: &Kube, cache: &Cache) -> Result<(Option<Value>, NodeProgress)> {
    let ring = if cache.auth() && cache.token.is_none() {
        None
    } else {
        Some(node_json(kube, cache, CLUSTER_PATH).await?)
    };
    let progress = node_json(kube, cache, PROGRESS_PATH).await?;
    let progress = serde_json::from_value(progress)
        .with_context(|| format!("{PROGRESS_PATH}: unexpected progress report"))?;
    Ok((ring, progress))
}

fn progress_field(summary: &Value, key: &str) -> String {
    match &summary["rebalance"][key] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_recognised_by_its_file_name() {
        for argv0 in [
            "kubectl-distrocache",
            "/usr/local/bin/kubectl-distrocache",
            "C:\\bin\\kubectl-distrocache.exe",
        ] {
            let argv0 = argv0.replace('\\', std::path::MAIN_SEPARATOR_STR);
            assert!(invoked_as_plugin(argv0.as_ref()), "{argv0}");
        }
        for argv0 in ["distrocache", "/bin/kubectl", "kubectl-distrocache-old"] {
            assert!(!invoked_as_plugin(argv0.as_ref()), "{argv0}");
        }
    }

    fn cache(spec: Value) -> Cache {
        let gvk = GroupVersionKind::gvk("distrocache.io", "v1alpha1", "DistroCache");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "distrocaches");
        Cache {
            name: "orders".into(),
            namespace: "shop".into(),
            object: DynamicObject::new("orders", &resource).data(json!({ "spec": spec })),
            token: None,
        }
    }

    #[test]
    fn requests_go_through_the_client_services_proxy() {
        assert_eq!(
            cache(json!({"replicas": 3})).proxy_base(),
            "/api/v1/namespaces/shop/services/orders:http/proxy"
        );
        assert_eq!(
            cache(json!({"tls": {"secretName": "orders-tls"}})).proxy_base(),
            "/api/v1/namespaces/shop/services/https:orders:http/proxy"
        );
    }

    #[test]
    fn the_token_comes_from_the_secret_the_nodes_mount() {
        assert_eq!(
            cache(json!({"auth": {"enabled": true}})).auth_secret_name(),
            "orders-auth"
        );
        assert_eq!(
            cache(json!({"auth": {"enabled": true, "secretName": "mine"}})).auth_secret_name(),
            "mine"
        );
        assert_eq!(first_token(b"abc\n").as_deref(), Some("abc"));
        assert_eq!(first_token(b"\n  new \nold\n").as_deref(), Some("new"));
        assert_eq!(first_token(b" \n\n"), None);
        assert_eq!(first_token(&[0xff, 0xfe]), None);
    }

    #[test]
    fn plugin_arguments_parse() {
        let cli = PluginCli::try_parse_from([
            PLUGIN_NAME,
            "set",
            "orders",
            "k",
            "42",
            "--ttl",
            "30s",
            "--tag",
            "a",
            "-n",
            "shop",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("shop"));
        assert_eq!(cli.output, Output::Json);
        match cli.command {
            PluginCommand::Set {
                name,
                key,
                ttl,
                tags,
                ..
            } => {
                assert_eq!((name.as_str(), key.as_str()), ("orders", "k"));
                assert_eq!(ttl, Some(Duration::from_secs(30)));
                assert_eq!(tags, ["a"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(PluginCli::try_parse_from([PLUGIN_NAME, "get", "orders"]).is_err());
    }
}

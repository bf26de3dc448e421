//! The OpenAPI document (cache-node/openapi.json): the node serves exactly
//! the checked-in file, the file is a valid OpenAPI 3.1 document
//! (openapi-spec-validator), and a live node answers as it says: schemathesis
//! generates requests from the document (examples, coverage, fuzzing and
//! stateful phases, every check) and fails on any answer the document does
//! not describe. The Python tools come from scripts/openapi-tools.sh (pinned,
//! cached outside the clone); scripts/test.sh exports their directory as
//! DISTROCACHE_OPENAPI_TOOLS, and without it this test runs the script.

mod node_proc;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::TestNode;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn document_path() -> PathBuf {
    manifest_dir().join("openapi.json")
}

/// The bin directory of the virtualenv holding the validator and schemathesis.
fn tools() -> PathBuf {
    if let Some(dir) = std::env::var_os("DISTROCACHE_OPENAPI_TOOLS") {
        return PathBuf::from(dir);
    }
    let script = manifest_dir().join("../scripts/openapi-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    PathBuf::from(stdout.lines().last().expect("the tools directory").trim())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_node_serves_the_checked_in_document() {
    let checked_in = std::fs::read(document_path()).expect("cache-node/openapi.json");
    assert_eq!(
        cache_node::api::openapi::DOCUMENT.as_bytes(),
        checked_in.as_slice(),
        "the binary embeds the checked-in file"
    );
    let node = TestNode::start(&[]).await;
    let resp = node
        .client
        .get(node.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served = resp.bytes().await.unwrap();
    assert_eq!(
        served.as_ref(),
        checked_in.as_slice(),
        "GET /api/v1/openapi.json is byte for byte cache-node/openapi.json"
    );
    let doc: Value = serde_json::from_slice(&served).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");

    // The document is open even on a node that requires a token, like
    // /health and /metrics, so tools can discover the API before they log in.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let guarded = TestNode::start(&["--auth-token-file", token.to_str().unwrap()]).await;
    let resp = guarded
        .client
        .get(guarded.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let validator = tools().join("openapi-spec-validator");
    let out = Command::new(&validator)
        .arg(document_path())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", validator.display()));
    let text = text(&out);
    assert!(out.status.success(), "openapi-spec-validator:\n{text}");
    assert!(text.contains(": OK"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_the_document_does_not_describe() {
    let schemathesis = tools().join("schemathesis");
    let node = TestNode::start(&[]).await;
    let url = format!("http://{}", node.addr);
    let reports = tempfile::tempdir().unwrap();
    let junit = reports.path().join("junit.xml");
    let args: Vec<String> = vec![
        "run".into(),
        document_path().to_str().unwrap().into(),
        "--url".into(),
        url,
        "--checks".into(),
        "all".into(),
        "--phases".into(),
        "examples,coverage,fuzzing,stateful".into(),
        "--max-examples".into(),
        "40".into(),
        "--seed".into(),
        "16".into(),
        "--workers".into(),
        "1".into(),
        "--no-color".into(),
        "--generation-database".into(),
        "none".into(),
        "--report".into(),
        "junit".into(),
        "--report-junit-path".into(),
        junit.to_str().unwrap().into(),
    ];
    let scratch = reports.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&schemathesis)
            .args(&args)
            // Its working files (.schemathesis/) go there, not into the clone.
            .current_dir(&scratch)
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", schemathesis.display()))
    })
    .await
    .unwrap();
    let text = text(&out);
    println!("{text}");
    assert!(
        out.status.success(),
        "schemathesis found answers the document does not describe:\n{text}"
    );
    // It really tested something: every documented operation was exercised.
    let report = std::fs::read_to_string(&junit).expect("the JUnit report");
    let doc: Value = serde_json::from_str(cache_node::api::openapi::DOCUMENT).unwrap();
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "put", "post", "delete"].contains(&k.as_str()))
                .count()
        })
        .sum();
    let cases = report.matches("<testcase").count();
    assert!(
        cases >= operations,
        "{cases} test cases in the report for {operations} operations:\n{report}"
    );
    assert!(!report.contains("<failure"), "{report}");
    assert!(!report.contains("<error"), "{report}");
}

//! DistroCache node library: the store, the executor of typed operations,
//! the REST API, the cluster and its peer protocol, metrics and
//! configuration, wired together by `server.rs` and run by `main.rs`. Kept
//! as a library so the integration tests and benchmarks drive exactly what
//! the binary runs.
//!
//! A request flows one way: `http` (connections) -> `api` (parsed once into
//! a typed operation) -> `exec` (where is it served?) -> `store` here, or
//! `cluster` -> `peer` to the key's owner -> one encoder of the answer.

pub mod api;
pub mod backup;
pub mod cluster;
pub mod config;
pub mod exec;
pub mod http;
pub mod item_json;
pub mod json_text;
pub mod memory;
pub mod metrics;
pub mod peer;
pub mod reload;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod tokens;

/// The layers the request flow above keeps apart, checked in the sources:
/// the HTTP layer knows nothing of what it carries, the executor, the
/// cluster, the peer protocol and the store never reach back into the REST
/// API or the HTTP layer, and the store knows none of the others. A `use`
/// across those lines would let two ways into one behaviour grow again.
#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// The crate's top-level modules that `text` names through `root` (a
    /// path to the crate's root: `crate::`, or as many `super::` as the
    /// file is deep), in a path or in a `use ...::{...}` group.
    fn modules_named(text: &str, root: &str) -> BTreeSet<String> {
        let mut named = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find(root) {
            rest = &rest[at + root.len()..];
            let Some(group) = rest.strip_prefix('{') else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                named.insert(name);
                continue;
            };
            // The first segment of each path in the group, at its top level.
            let mut depth = 0;
            let mut name = String::new();
            let mut at_start = true;
            for c in group.chars() {
                if depth == 0 && at_start && (c.is_alphanumeric() || c == '_') {
                    name.push(c);
                    continue;
                }
                if !name.is_empty() {
                    named.insert(std::mem::take(&mut name));
                    at_start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    _ => {}
                }
            }
        }
        named
    }

    /// The modules of the crate a source file names, by `crate::` or by
    /// `super::` up to the crate's root.
    fn crate_modules_named(src: &Path, file: &Path, text: &str) -> BTreeSet<String> {
        let parts: Vec<_> = file.strip_prefix(src).unwrap().components().collect();
        let depth = parts.len() - usize::from(file.ends_with("mod.rs"));
        let mut named = modules_named(text, "crate::");
        named.extend(modules_named(text, &"super::".repeat(depth)));
        named
    }

    /// Every `.rs` file of `path` (a file, or a directory's files, deeply).
    fn sources(path: &Path) -> Vec<PathBuf> {
        if path.is_file() {
            return vec![path.to_owned()];
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).unwrap() {
            files.extend(sources(&entry.unwrap().path()));
        }
        files.retain(|f| f.extension().is_some_and(|e| e == "rs"));
        files
    }

    #[test]
    fn a_file_names_modules_by_path_by_group_and_by_super() {
        let src = Path::new("/src");
        let text = "use crate::{api, store::{Item, x}, peer::Request};\n\
                    let a = crate::exec::Write;\n\
                    use super::super::http::Conn;\n\
                    use super::limits::Limits;";
        let named = crate_modules_named(src, Path::new("/src/exec/answer.rs"), text);
        let named: Vec<String> = named.into_iter().collect();
        assert_eq!(named, ["api", "exec", "http", "peer", "store"]);
        let named = crate_modules_named(src, Path::new("/src/exec/mod.rs"), text);
        assert!(named.contains("limits"), "{named:?}");
    }

    #[test]
    fn no_layer_reaches_across_the_lines_the_request_flow_draws() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let rules: &[(&str, &[&str])] = &[
            ("http.rs", &["api", "exec", "cluster", "peer", "store"]),
            ("exec", &["api", "http"]),
            ("cluster", &["api", "http"]),
            ("peer", &["api", "http"]),
            ("store", &["api", "http", "exec", "cluster", "peer"]),
        ];
        let mut files = 0;
        for (layer, forbidden) in rules {
            for file in sources(&src.join(layer)) {
                files += 1;
                let text = std::fs::read_to_string(&file).unwrap();
                let named = crate_modules_named(&src, &file, &text);
                for module in *forbidden {
                    assert!(
                        !named.contains(*module),
                        "{} uses crate::{module}",
                        file.display()
                    );
                }
            }
        }
        assert!(files > 20, "only {files} files read: the layout changed?");
    }
}

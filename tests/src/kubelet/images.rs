//! The test kubelet's "image registry": a table from container image names to
//! local executables, given by the test. No image is ever pulled; a pod whose
//! image is not in the table waits with `ErrImageNeverPull`.

use std::collections::HashMap;
use std::path::PathBuf;

/// What runs for an image: the executable, plus environment variables set on
/// top of the container's own (the table wins). In the values,
/// `{podIP}`, `{podName}`, `{namespace}`, `{podDir}` (the pod's working
/// directory) and `{kubeconfig}` (a kubeconfig with the pod's service-account
/// token) are replaced, so a test can tell a program to bind to its pod IP,
/// e.g. `DISTROCACHE_BIND_ADDRESS={podIP}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub binary: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Program {
    pub fn new(binary: impl Into<PathBuf>) -> Program {
        Program {
            binary: binary.into(),
            env: Vec::new(),
        }
    }

    /// Adds an environment variable (placeholders allowed in the value).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Program {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// Image name -> program. A key with a tag or digest (`app:1`) matches only
/// that reference; a key without one (`app`) matches the image at any tag.
#[derive(Debug, Default)]
pub struct ImageTable {
    programs: HashMap<String, Program>,
}

impl ImageTable {
    pub fn insert(&mut self, image: &str, program: Program) {
        self.programs.insert(image.to_string(), program);
    }

    pub(crate) fn lookup(&self, image: &str) -> Option<&Program> {
        self.programs
            .get(image)
            .or_else(|| self.programs.get(repository(image)))
    }
}

/// The image reference without its tag and digest: `reg:5000/app:1@sha256:..` -> `reg:5000/app`.
fn repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].find(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_strips_tag_and_digest_but_not_a_registry_port() {
        assert_eq!(repository("app"), "app");
        assert_eq!(repository("app:1.2"), "app");
        assert_eq!(repository("reg:5000/team/app:1"), "reg:5000/team/app");
        assert_eq!(repository("reg:5000/app"), "reg:5000/app");
        assert_eq!(repository("app@sha256:abc"), "app");
        assert_eq!(repository("app:1@sha256:abc"), "app");
    }

    #[test]
    fn untagged_keys_match_any_tag_and_tagged_keys_only_their_own() {
        let mut table = ImageTable::default();
        table.insert("cache", Program::new("/bin/cache"));
        table.insert("other:2", Program::new("/bin/other2"));
        assert_eq!(
            table.lookup("cache:9").map(|p| &p.binary),
            Some(&"/bin/cache".into())
        );
        assert_eq!(
            table.lookup("cache").map(|p| &p.binary),
            Some(&"/bin/cache".into())
        );
        assert_eq!(
            table.lookup("other:2").map(|p| &p.binary),
            Some(&"/bin/other2".into())
        );
        assert!(table.lookup("other:3").is_none());
        assert!(table.lookup("other").is_none());
        assert!(table.lookup("missing:1").is_none());
    }
}

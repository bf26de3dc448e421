//! Token files: the bearer tokens of the client API and of the peer API,
//! each read from a file (so a Kubernetes Secret can be mounted) and
//! re-read when it changes. The API checks requests against them
//! (`api::auth`); the peer client sends the first peer token. Both use
//! this module, and neither depends on the other for it.
//!
//! Rotation: a token file may hold several tokens, one per line; every one
//! of them is accepted, and the first is the one a node sends to its peers.
//! The files are re-read when they change (see `reload.rs`), so a rotation
//! is three edits of the Secret, none of which restarts anything:
//! `old` -> `old\nnew` (every node accepts both) -> `new\nold` (nodes send
//! the new one) -> `new`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::reload::Reloadable;

/// Longest token file accepted.
const MAX_TOKEN_BYTES: usize = 4096;
/// Most tokens in one file (a rotation needs two).
const MAX_TOKENS: usize = 8;

/// The valid tokens of one API: all accepted, the first one sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet(Vec<Arc<str>>);

impl TokenSet {
    pub fn one(token: &str) -> Self {
        Self(vec![token.into()])
    }

    /// The token a node sends.
    pub fn first(&self) -> &str {
        &self.0[0]
    }

    /// Every token accepted.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|t| &**t)
    }

    /// Parses a token file: one token per line, surrounding whitespace
    /// (a trailing newline) not part of a token, blank lines skipped; an
    /// empty or oversized file is an error.
    pub fn parse(text: &[u8], what: &str) -> std::io::Result<Self> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        if text.len() > MAX_TOKEN_BYTES {
            return Err(invalid(format!(
                "{what}: {} bytes; a token file holds at most {MAX_TOKEN_BYTES}",
                text.len()
            )));
        }
        let text =
            std::str::from_utf8(text).map_err(|_| invalid(format!("{what} is not UTF-8")))?;
        let tokens: Vec<Arc<str>> = text
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(Arc::from)
            .collect();
        if tokens.is_empty() {
            return Err(invalid(format!("{what} is empty")));
        }
        if tokens.len() > MAX_TOKENS {
            return Err(invalid(format!(
                "{what}: {} tokens; at most {MAX_TOKENS}",
                tokens.len()
            )));
        }
        Ok(Self(tokens))
    }
}

/// A token file, re-read when it changes.
pub type TokenFile = Reloadable<TokenSet>;

/// Reads a token file (see [`TokenSet::parse`]), to be re-read when it
/// changes.
pub fn load_tokens(path: &Path) -> std::io::Result<Arc<TokenFile>> {
    let what = path.display().to_string();
    Reloadable::load("token file", vec![PathBuf::from(path)], move |f| {
        TokenSet::parse(&f[0], &what)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(load_tokens(&path).unwrap().current().first(), "abc123");
        std::fs::write(&path, " abc \n\n  def\n").unwrap();
        assert_eq!(
            *load_tokens(&path).unwrap().current(),
            TokenSet(vec!["abc".into(), "def".into()])
        );
        std::fs::write(&path, "  \n").unwrap();
        assert!(load_tokens(&path).is_err());
        std::fs::write(&path, vec![b'a'; 5000]).unwrap();
        assert!(load_tokens(&path).is_err());
        std::fs::write(&path, "a\nb\nc\nd\ne\nf\ng\nh\ni\n").unwrap();
        assert!(load_tokens(&path).is_err(), "too many tokens");
        assert!(load_tokens(&dir.path().join("missing")).is_err());
    }
}

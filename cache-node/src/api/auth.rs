//! Bearer-token authentication, optional and off by default: one token for
//! the client API and one for the peer API, each read from a file (so a
//! Kubernetes Secret can be mounted). Requests without the right
//! `Authorization: Bearer <token>` get 401 with a JSON error.
//!
//! Tokens are compared in constant time (`subtle`), so the time an answer
//! takes says nothing about how much of a guess was right.

use std::path::Path;
use std::sync::Arc;

use hyper::http::{HeaderMap, StatusCode, header};
use subtle::ConstantTimeEq;

use crate::exec::Failure;

/// Longest token file accepted.
const MAX_TOKEN_BYTES: u64 = 4096;

/// The tokens a node requires; `None` means that API is open.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub client: Option<Arc<str>>,
    pub peer: Option<Arc<str>>,
}

/// Reads a token file: surrounding whitespace (a trailing newline) is not
/// part of the token; an empty or oversized file is an error.
pub fn read_token(path: &Path) -> std::io::Result<Arc<str>> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let len = std::fs::metadata(path)?.len();
    if len > MAX_TOKEN_BYTES {
        return Err(invalid(format!(
            "{}: {len} bytes; a token file holds at most {MAX_TOKEN_BYTES}",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(format!("{} is empty", path.display())));
    }
    Ok(token.into())
}

/// Whether a request with `headers` carries `expected` (if any token is
/// expected); a refusal is a 401 saying why.
pub fn check(expected: Option<&str>, headers: &HeaderMap) -> Result<(), Failure> {
    presented(expected, headers).map_err(|why| Failure::new(StatusCode::UNAUTHORIZED, why))
}

/// `Err` carries why the request is refused.
fn presented(expected: Option<&str>, headers: &HeaderMap) -> Result<(), &'static str> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
        .unwrap_or_default();
    if bool::from(presented.ct_eq(expected.as_bytes())) {
        return Ok(());
    }
    Err(if presented.is_empty() {
        "authentication required: send Authorization: Bearer <token>"
    } else {
        "invalid bearer token"
    })
}

/// The token of `Bearer <token>`. The scheme name is case-insensitive
/// (RFC 7235 2.1: `bearer`, `BEARER` are the same scheme) and one or more
/// spaces separate it from the token; the token itself is compared exactly.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> hyper::http::Request<()> {
        let mut builder = hyper::http::Request::builder().uri("/x");
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        assert!(
            check(None, request(None).headers()).is_ok(),
            "no token configured: open"
        );
        for right in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "beaRer  s3cret",
        ] {
            assert!(
                check(Some("s3cret"), request(Some(right)).headers()).is_ok(),
                "{right}"
            );
        }
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Bearer S3CRET"),
            Some("s3cret"),
            Some("Basic s3cret"),
            Some("Bearers3cret"),
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer\ts3cret"),
            Some("Bear s3cret"),
        ] {
            let refused = check(Some("s3cret"), request(wrong).headers()).unwrap_err();
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
    }

    #[test]
    fn token_files_are_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(&*read_token(&path).unwrap(), "abc123");
        std::fs::write(&path, "  \n").unwrap();
        assert!(read_token(&path).is_err());
        std::fs::write(&path, vec![b'a'; 5000]).unwrap();
        assert!(read_token(&path).is_err());
        assert!(read_token(&dir.path().join("missing")).is_err());
    }
}

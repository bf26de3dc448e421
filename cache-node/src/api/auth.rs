//! Bearer-token authentication, optional and off by default: one token for
//! the client API and one for the peer API, each read from a file (so a
//! Kubernetes Secret can be mounted). Requests without the right
//! `Authorization: Bearer <token>` get 401 with a JSON error.
//!
//! The token may also come in [`TOKEN_HEADER`] (`X-DistroCache-Token:
//! <token>`), for the one path where `Authorization` cannot carry it:
//! kube-apiserver's proxy (`kubectl distrocache`, `kubectl get --raw`)
//! authenticates the user by that header and removes it before forwarding
//! (k8s.io/apiserver, filters/authentication.go), while other headers pass.
//! Either header is accepted; the tokens and their comparison are the same.
//!
//! Tokens are compared in constant time (`subtle`), so the time an answer
//! takes says nothing about how much of a guess was right.
//!
//! The token files, and how tokens are rotated, are `crate::tokens`'s.

use std::sync::Arc;

use hyper::http::{HeaderMap, StatusCode, header};
use subtle::ConstantTimeEq;

use crate::exec::Failure;
use crate::tokens::{TokenFile, TokenSet};

/// The header that carries a token where `Authorization` is taken by a
/// proxy (see the module comment).
pub const TOKEN_HEADER: &str = "x-distrocache-token";

/// The tokens a node requires; `None` means that API is open.
#[derive(Clone, Default)]
pub struct Tokens {
    pub client: Option<Arc<TokenFile>>,
    pub peer: Option<Arc<TokenFile>>,
}

/// Whether a request with `headers` carries one of `expected` (if any token
/// is expected); a refusal is a 401 saying why.
pub fn check(expected: Option<&TokenFile>, headers: &HeaderMap) -> Result<(), Failure> {
    let Some(expected) = expected else {
        return Ok(());
    };
    presented(&expected.peek(), headers).map_err(|why| Failure::new(StatusCode::UNAUTHORIZED, why))
}

/// `Err` carries why the request is refused.
fn presented(expected: &TokenSet, headers: &HeaderMap) -> Result<(), &'static str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    let plain = headers.get(TOKEN_HEADER).map(|v| v.as_bytes());
    if bearer.is_none() && plain.is_none() {
        return Err(
            "authentication required: send Authorization: Bearer <token> (or X-DistroCache-Token: <token>)",
        );
    }
    // Every token compared with every token presented (no early exit): the
    // time says nothing of which matched.
    let mut matched = subtle::Choice::from(0);
    for presented in [bearer, plain].into_iter().flatten() {
        for token in expected.all() {
            matched |= presented.ct_eq(token.as_bytes());
        }
    }
    if bool::from(matched) {
        return Ok(());
    }
    Err("invalid bearer token")
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
    use crate::reload::Reloadable;

    fn request(auth: Option<&str>) -> hyper::http::Request<()> {
        let mut builder = hyper::http::Request::builder().uri("/x");
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        builder.body(()).unwrap()
    }

    fn fixed(tokens: &[&str]) -> Arc<TokenFile> {
        let set = TokenSet::parse(tokens.join("\n").as_bytes(), "test").unwrap();
        Reloadable::fixed("test", set)
    }

    #[test]
    fn every_token_of_a_rotation_passes() {
        let both = fixed(&["old-token", "new-token"]);
        for right in ["Bearer old-token", "Bearer new-token"] {
            assert!(check(Some(&both), request(Some(right)).headers()).is_ok());
        }
        for wrong in [
            "Bearer old",
            "Bearer new-token2",
            "Bearer old-tokennew-token",
        ] {
            assert!(check(Some(&both), request(Some(wrong)).headers()).is_err());
        }
        assert_eq!(both.current().first(), "old-token");
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        assert!(
            check(None, request(None).headers()).is_ok(),
            "no token configured: open"
        );
        let s3cret = fixed(&["s3cret"]);
        for right in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "beaRer  s3cret",
        ] {
            assert!(
                check(Some(&s3cret), request(Some(right)).headers()).is_ok(),
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
            let refused = check(Some(&s3cret), request(wrong).headers()).unwrap_err();
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
    }

    #[test]
    fn the_token_header_is_accepted_where_authorization_is_taken() {
        let s3cret = fixed(&["s3cret"]);
        let with = |auth: Option<&str>, plain: &str| {
            let mut r = request(auth);
            r.headers_mut().insert(TOKEN_HEADER, plain.parse().unwrap());
            r
        };
        assert!(check(Some(&s3cret), with(None, "s3cret").headers()).is_ok());
        // Either header may carry it (a proxy may add its own Authorization).
        assert!(check(Some(&s3cret), with(Some("Bearer user"), "s3cret").headers()).is_ok());
        assert!(check(Some(&s3cret), with(Some("Bearer s3cret"), "nope").headers()).is_ok());
        for wrong in ["s3cre", "Bearer s3cret", " s3cret", "S3CRET"] {
            let refused = check(Some(&s3cret), with(None, wrong).headers()).unwrap_err();
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
            assert_eq!(refused.message, "invalid bearer token");
        }
        let refused = check(Some(&s3cret), request(None).headers()).unwrap_err();
        assert!(
            refused.message.contains("X-DistroCache-Token"),
            "{}",
            refused.message
        );
    }
}

//! Bounds on what a client (or a peer) may make the node hold, and the
//! checks that enforce them on keys, tags and values, wherever they arrive:
//! the REST API checks a client's request with these, and the peer server
//! checks what other nodes send with the same ones, since the peer API may
//! be reachable by more than the cache's own nodes.

use hyper::http::StatusCode;

use super::Failure;
use crate::json_text::{self, JsonError};

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_body_bytes: usize,
    pub max_tags: usize,
    pub max_tag_bytes: usize,
    /// Deepest nesting of objects and arrays in a write body, the body's own
    /// object counting as level 1 (so `{"value": {"a": [1]}}` is 3 deep).
    pub max_json_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 512,
            max_value_bytes: 1024 * 1024,
            max_body_bytes: 2 * 1024 * 1024,
            max_tags: 32,
            max_tag_bytes: 128,
            max_json_depth: 32,
        }
    }
}

impl Limits {
    /// A key: not empty, within `max_key_bytes` (414 beyond).
    pub fn check_key(&self, key: &str) -> Result<(), Failure> {
        if key.is_empty() {
            return Err(Failure::bad_request("key must not be empty"));
        }
        if key.len() > self.max_key_bytes {
            return Err(Failure::new(
                StatusCode::URI_TOO_LONG,
                format!(
                    "key is {} bytes; the limit is {}",
                    key.len(),
                    self.max_key_bytes
                ),
            ));
        }
        Ok(())
    }

    /// A tag: not empty, within `max_tag_bytes`.
    pub fn check_tag(&self, tag: &str) -> Result<(), Failure> {
        if tag.is_empty() {
            return Err(Failure::bad_request("tags must not be empty strings"));
        }
        if tag.len() > self.max_tag_bytes {
            return Err(Failure::bad_request(format!(
                "tag is {} bytes; the limit is {}",
                tag.len(),
                self.max_tag_bytes
            )));
        }
        Ok(())
    }

    /// A list of tags: each valid, at most `max_tags`.
    pub fn check_tags<'a>(
        &self,
        tags: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<(), Failure> {
        if tags.len() > self.max_tags {
            return Err(Failure::bad_request(format!(
                "{} tags given; the limit is {}",
                tags.len(),
                self.max_tags
            )));
        }
        for tag in tags {
            self.check_tag(tag)?;
        }
        Ok(())
    }

    /// A value of `len` bytes of JSON text: 413 past `max_value_bytes`.
    pub fn check_value_size(&self, len: usize) -> Result<(), Failure> {
        if len > self.max_value_bytes {
            return Err(Failure::too_large(format!(
                "value is {len} bytes; the limit is {}",
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// A value's JSON text: within `max_value_bytes` (413 beyond), nested no
    /// deeper than `max_json_depth`, and valid JSON.
    pub fn check_value(&self, value: &[u8]) -> Result<(), Failure> {
        self.check_value_size(value.len())?;
        let text = std::str::from_utf8(value).map_err(|e| {
            Failure::bad_request(format!(
                "value is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        json_text::validate(text, self.max_json_depth).map_err(|e| match e {
            JsonError::TooDeep { .. } => Failure::bad_request(e.to_string()),
            JsonError::Syntax { .. } => {
                Failure::bad_request(format!("value is not valid JSON: {e}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keys_and_tags_meet_their_limits() {
        let limits = Limits {
            max_key_bytes: 4,
            max_value_bytes: 10,
            max_tags: 2,
            max_tag_bytes: 3,
            max_json_depth: 2,
            ..Limits::default()
        };
        assert!(limits.check_key("abcd").is_ok());
        assert_eq!(
            limits.check_key("abcde").unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
        assert!(limits.check_key("").is_err());
        assert!(limits.check_value(b"[[1]]").is_ok());
        assert!(limits.check_value(b"[[[1]]]").is_err());
        assert!(limits.check_value(b"{oops}").is_err());
        assert_eq!(
            limits.check_value(b"\"0123456789\"").unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(limits.check_tags(["a", "b"].into_iter()).is_ok());
        assert!(limits.check_tags(["a", "b", "c"].into_iter()).is_err());
        assert!(limits.check_tags(["abcd"].into_iter()).is_err());
        assert!(limits.check_tags([""].into_iter()).is_err());
    }
}

//! Bounds on what a client (or a peer) may make the node hold, and the
//! checks that enforce them on keys, tags and values, wherever they arrive:
//! the REST API checks a client's request with these, and the peer server
//! checks what other nodes send with the same ones, since the peer API may
//! be reachable by more than the cache's own nodes.

use hyper::http::StatusCode;

use super::Failure;

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

    /// A value's JSON text: within `max_value_bytes` (413 beyond), nested no
    /// deeper than `max_json_depth`, and valid JSON.
    pub fn check_value(&self, value: &[u8]) -> Result<(), Failure> {
        if value.len() > self.max_value_bytes {
            return Err(Failure::too_large(format!(
                "value is {} bytes; the limit is {}",
                value.len(),
                self.max_value_bytes
            )));
        }
        if let Some(at) = nesting_exceeds(value, self.max_json_depth) {
            return Err(Failure::bad_request(format!(
                "JSON is nested deeper than {} levels (at byte {at})",
                self.max_json_depth
            )));
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(value)
            .map(|_| ())
            .map_err(|e| Failure::bad_request(format!("value is not valid JSON: {e}")))
    }
}

/// Where nesting of objects and arrays in `json` first goes deeper than
/// `max` levels, as a byte offset; `None` if it never does.
///
/// A single pass over the bytes that skips strings (a bracket inside a string,
/// or an escaped quote, counts for nothing), so it costs O(n) with no
/// allocation and no recursion whatever the input. It does not validate: for
/// valid JSON it measures exactly what the parser would, and invalid JSON is
/// refused by the parser afterwards anyway.
pub fn nesting_exceeds(json: &[u8], max: usize) -> Option<usize> {
    // Nesting never exceeds the number of opening brackets, which a loop
    // the compiler vectorises counts several times faster than the walk
    // below: most bodies (a string or a flat object as the value) stop here.
    let opening = json.iter().filter(|&&b| b == b'{' || b == b'[').count();
    if opening <= max {
        return None;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (at, &b) in json.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Some(at);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings_only() {
        assert_eq!(nesting_exceeds(b"{}", 1), None);
        assert_eq!(nesting_exceeds(b"{\"a\": []}", 1), Some(6));
        assert_eq!(nesting_exceeds(b"[[1], [2], [3]]", 2), None);
        // Brackets in strings, escaped quotes and escaped backslashes.
        assert_eq!(nesting_exceeds(br#"{"a": "[[[{{{"}"#, 1), None);
        assert_eq!(nesting_exceeds(br#"{"a": "\"[[[", "b": 1}"#, 1), None);
        assert_eq!(nesting_exceeds(br#"{"a": "\\", "b": [[1]]}"#, 2), Some(18));
        // Unbalanced closers never underflow.
        assert_eq!(nesting_exceeds(b"]]]]}}}}[", 1), None);
        // Exactly as many opening brackets as the limit: within it.
        assert_eq!(nesting_exceeds(b"[[[]]]", 3), None);
        assert_eq!(nesting_exceeds(b"[[[]]]", 2), Some(2));
    }

    proptest::proptest! {
        /// The bracket count that answers most inputs early never changes
        /// the answer: it matches a plain walk over the bytes, on inputs
        /// made of the bytes that matter (brackets, quotes, backslashes).
        #[test]
        fn the_early_answer_agrees_with_the_walk(
            json in proptest::collection::vec(
                proptest::sample::select(b"{}[]\"\\a ".to_vec()), 0..64),
            max in 0usize..8,
        ) {
            proptest::prop_assert_eq!(nesting_exceeds(&json, max), walk(&json, max));
        }
    }

    /// Where the nesting first exceeds `max`, by walking every byte.
    fn walk(json: &[u8], max: usize) -> Option<usize> {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (at, &b) in json.iter().enumerate() {
            match (in_string, escaped, b) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (true, false, b'"') => in_string = false,
                (true, ..) => {}
                (false, _, b'"') => in_string = true,
                (false, _, b'{' | b'[') => {
                    depth += 1;
                    if depth > max {
                        return Some(at);
                    }
                }
                (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        None
    }

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

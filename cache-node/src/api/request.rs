//! Turning an untrusted request's parts into validated inputs: a key or
//! tag from a path segment, the write body, and the query of the views.
//!
//! Every limit is configuration ([`Limits`]) and every violation is a
//! [`Failure`] with the status that names it: 414 for a key too long, 413 for
//! a body or value too large, 415 for a body that says it is not JSON, 400 for
//! anything malformed (including invalid UTF-8 and JSON nested deeper than
//! the configured depth).
//!
//! Limits on the connection itself (header bytes and count, the header, idle
//! and request timeouts) are enforced in `http.rs`, before a request exists.

use std::time::Duration;

use bytes::Bytes;
use hyper::http::{HeaderMap, StatusCode, header};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::exec::limits::nesting_exceeds;
use crate::exec::{Failure, Limits, Write};

/// serde_json refuses nesting deeper than this on its own (its recursion
/// limit), which is why `--max-json-depth` stops there.
#[cfg(test)]
const SERDE_JSON_DEPTH_LIMIT: usize = 128;

/// A path segment percent-decoded into a key, within limits (the key of
/// `/api/v1/cache/{key}`: `user%3A1` is `user:1`, `a%2Fb` is `a/b`).
pub fn key(segment: &str, limits: &Limits) -> Result<String, Failure> {
    let key = decode_segment(segment, "key")?;
    limits.check_key(&key)?;
    Ok(key)
}

/// A path segment percent-decoded into a tag, within limits.
pub fn tag(segment: &str, limits: &Limits) -> Result<String, Failure> {
    let tag = decode_segment(segment, "tag")?;
    limits.check_tag(&tag)?;
    Ok(tag)
}

fn decode_segment(segment: &str, what: &str) -> Result<String, Failure> {
    let decoded = percent_decode_str(segment).decode_utf8().map_err(|e| {
        Failure::bad_request(format!(
            "invalid {what} in path: not UTF-8 once decoded ({e})"
        ))
    })?;
    if decoded.is_empty() {
        return Err(Failure::bad_request(format!("{what} must not be empty")));
    }
    Ok(decoded.into_owned())
}

/// The fields of a query string, each at most once: a field given twice is
/// refused rather than one of its values picked silently. Unknown fields
/// are refused too, naming the ones the route takes.
pub fn query(
    query: Option<&str>,
    known: &[&'static str],
) -> Result<Vec<(&'static str, String)>, Failure> {
    let mut fields: Vec<(&'static str, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let Some(&known_name) = known.iter().find(|k| **k == name) else {
            return Err(Failure::bad_request(format!(
                "unknown query field {name:?}; this route takes {known:?}"
            )));
        };
        if fields.iter().any(|(n, _)| *n == known_name) {
            return Err(Failure::bad_request(format!(
                "query field {name:?} given more than once"
            )));
        }
        fields.push((known_name, value.into_owned()));
    }
    Ok(fields)
}

/// The body as sent. Unknown fields are ignored, not refused: the seed (Go's
/// `encoding/json`) ignored them and its clients may send extra metadata, so
/// `deny_unknown_fields` would break them. They still count towards the body
/// size and nesting limits. A field given twice is refused (serde's derive
/// reports duplicates), since which one would win is not obvious.
#[derive(Deserialize)]
struct SetBody<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    /// A JSON number, not `i64`: JSON Schema (and so the OpenAPI document)
    /// counts `300.0` as an integer, so it is taken as 300; `300.5` is not.
    ttl: Option<serde_json::Number>,
    /// Kept raw here and read by [`parse_tags`], which refuses the array at
    /// the first tag past a limit instead of collecting all of it first.
    #[serde(borrow)]
    tags: Option<&'a RawValue>,
}

/// A write body, `{"value": <any JSON>, "ttl": <seconds>, "tags": [...]}`:
/// validates the content type and parses and bounds the body.
pub fn write(headers: &HeaderMap, body: Bytes, limits: &Limits) -> Result<Write, Failure> {
    check_json_content_type(headers)?;
    // Both checks run before serde sees the body: a clear message for
    // each, and the depth bound holds whatever serde's own limit is.
    let text = std::str::from_utf8(&body).map_err(|e| {
        Failure::bad_request(format!(
            "body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if let Some(at) = nesting_exceeds(&body, limits.max_json_depth) {
        return Err(Failure::bad_request(format!(
            "JSON is nested deeper than {} levels (at byte {at})",
            limits.max_json_depth
        )));
    }
    // From the text just validated: serde's reader for `&str` does not
    // check the UTF-8 of every string (and of the raw value) again.
    let parsed: SetBody<'_> = serde_json::from_str(text)
        .map_err(|e| Failure::bad_request(format!("invalid JSON body: {e}")))?;

    let value = parsed
        .value
        .ok_or_else(|| Failure::bad_request("`value` is required and must not be null"))?;
    let value_text = value.get().as_bytes();
    if value_text.len() > limits.max_value_bytes {
        return Err(Failure::too_large(format!(
            "value is {} bytes; the limit is {}",
            value_text.len(),
            limits.max_value_bytes
        )));
    }

    let ttl = match parsed.ttl.as_ref().map(ttl_seconds).transpose()? {
        None | Some(0) => None,
        Some(s) if s < 0 => {
            return Err(Failure::bad_request(
                "`ttl` must be a whole number of seconds >= 0",
            ));
        }
        // The item reports its ttl in nanoseconds as Go's int64 Duration.
        Some(s) if s > i64::MAX / 1_000_000_000 => {
            return Err(Failure::bad_request(format!(
                "`ttl` must be at most {} seconds",
                i64::MAX / 1_000_000_000
            )));
        }
        Some(s) => Some(Duration::from_secs(s as u64)),
    };

    let tags = match parsed.tags {
        Some(raw) => parse_tags(raw.get(), limits)?,
        None => Vec::new(),
    };

    Ok(Write {
        value: body.slice_ref(value_text),
        ttl,
        tags,
    })
}

/// `ttl` as whole seconds: an integer, or a number with no fractional part
/// (`300.0`, `3e2`). Past i64 is clamped to it, which the bound check after
/// refuses with its own message.
fn ttl_seconds(n: &serde_json::Number) -> Result<i64, Failure> {
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    if n.is_u64() {
        return Ok(i64::MAX);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 => Ok(if f >= i64::MAX as f64 {
            i64::MAX
        } else if f <= i64::MIN as f64 {
            i64::MIN
        } else {
            f as i64
        }),
        _ => Err(Failure::bad_request(
            "`ttl` must be a whole number of seconds >= 0",
        )),
    }
}

/// Below this many distinct tags a duplicate is found by a linear scan (no
/// allocation, fastest for the usual handful); from it on, by a hash set.
const LINEAR_DEDUP_TAGS: usize = 8;

/// The `tags` array: distinct tags in the order first given, each checked as
/// it is read. Refused at the first tag that breaks a rule, so the cost is
/// O(elements read) whatever the body holds: a 2 MiB array of 300k short tags
/// stops at tag `max_tags + 1` instead of being collected and deduplicated
/// whole (which, with a linear duplicate check, was quadratic).
fn parse_tags(raw: &str, limits: &Limits) -> Result<Vec<String>, Failure> {
    let mut refusal = None;
    let mut de = serde_json::Deserializer::from_str(raw);
    let parsed = serde::Deserializer::deserialize_seq(
        &mut de,
        TagList {
            limits,
            refusal: &mut refusal,
        },
    );
    match (parsed, refusal) {
        // Our own refusal, not serde's rewording of it.
        (_, Some(refusal)) => Err(refusal),
        (Ok(tags), None) => Ok(tags),
        (Err(e), None) => Err(Failure::bad_request(format!("invalid `tags`: {e}"))),
    }
}

/// Reads the tags array for [`parse_tags`]; a limit broken is left in
/// `refusal` (the visitor can only return serde's error type).
struct TagList<'a> {
    limits: &'a Limits,
    refusal: &'a mut Option<Failure>,
}

impl<'de> serde::de::Visitor<'de> for TagList<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut tags: Vec<String> = Vec::new();
        let mut seen: Option<std::collections::HashSet<String>> = None;
        while let Some(tag) = seq.next_element::<String>()? {
            if let Err(e) = self.limits.check_tag(&tag) {
                *self.refusal = Some(e);
                return Err(serde::de::Error::custom("refused"));
            }
            let new = match &mut seen {
                Some(seen) => seen.insert(tag.clone()),
                None => !tags.contains(&tag),
            };
            if !new {
                continue;
            }
            if tags.len() == self.limits.max_tags {
                *self.refusal = Some(Failure::bad_request(format!(
                    "more than {0} distinct tags given; the limit is {0}",
                    self.limits.max_tags
                )));
                return Err(serde::de::Error::custom("refused"));
            }
            tags.push(tag);
            if seen.is_none() && tags.len() == LINEAR_DEDUP_TAGS {
                seen = Some(tags.iter().cloned().collect());
            }
        }
        Ok(tags)
    }
}

/// Which content types a write body may name. The seed (Go, gorilla/mux and
/// `encoding/json`) never looked at the header, so its clients may send
/// none, or the one `curl -d` picks by default; both keep working. The rule:
/// * absent: taken as JSON;
/// * `application/json`, and any `<type>/<subtype>+json` (RFC 6839): JSON,
///   as named;
/// * `application/x-www-form-urlencoded`: `curl -d` without `-H`, and other
///   HTTP clients' default for a body; the body must still be JSON (a real
///   form is a 400);
/// * anything else (`text/plain`, `multipart/form-data`, header bytes that
///   are not text): 415, since the client says it sent something other than
///   JSON.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), Failure> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    // What nearly every client sends, answered without building the
    // lowercased essence below.
    if value.as_bytes() == b"application/json" {
        return Ok(());
    }
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json_suffix = essence
        .split_once('/')
        .is_some_and(|(kind, subtype)| !kind.is_empty() && subtype.ends_with("+json"));
    if essence == "application/json"
        || json_suffix
        || essence == "application/x-www-form-urlencoded"
    {
        Ok(())
    } else {
        Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type must be application/json, not {essence:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Write, Failure> {
        parse_with(body, &Limits::default())
    }

    fn parse_with(body: &str, limits: &Limits) -> Result<Write, Failure> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        write(&headers, Bytes::copy_from_slice(body.as_bytes()), limits)
    }

    #[test]
    fn accepts_any_json_value_and_keeps_its_text() {
        let r = parse(r#"{"value": {"a": [1, 2]}, "ttl": 30, "tags": ["x", "y", "x"]}"#).unwrap();
        assert_eq!(&r.value[..], br#"{"a": [1, 2]}"#);
        assert_eq!(r.ttl, Some(Duration::from_secs(30)));
        assert_eq!(r.tags, ["x", "y"]);
        for v in ["1", "\"s\"", "true", "[]", "1.5e3"] {
            assert_eq!(
                &parse(&format!(r#"{{"value": {v}}}"#)).unwrap().value[..],
                v.as_bytes()
            );
        }
    }

    #[test]
    fn zero_or_absent_ttl_means_default() {
        assert_eq!(parse(r#"{"value": 1, "ttl": 0}"#).unwrap().ttl, None);
        assert_eq!(parse(r#"{"value": 1}"#).unwrap().ttl, None);
        assert_eq!(parse(r#"{"value": 1, "ttl": null}"#).unwrap().ttl, None);
        assert_eq!(parse(r#"{"value": 1, "ttl": 0.0}"#).unwrap().ttl, None);
    }

    /// JSON Schema's `integer` (the OpenAPI document's type for `ttl`)
    /// includes numbers written with a zero fraction; schemathesis sent
    /// `1048576.0` and the node refused it.
    #[test]
    fn a_ttl_with_a_zero_fraction_is_a_whole_number() {
        for (body, secs) in [
            (r#"{"value": 1, "ttl": 300.0}"#, 300),
            (r#"{"value": 1, "ttl": 3e2}"#, 300),
            (r#"{"value": 1, "ttl": 1048576.0}"#, 1_048_576),
        ] {
            assert_eq!(
                parse(body).unwrap().ttl,
                Some(Duration::from_secs(secs)),
                "{body}"
            );
        }
        for body in [
            r#"{"value": 1, "ttl": 1e300}"#,
            r#"{"value": 1, "ttl": 18446744073709551615}"#,
            r#"{"value": 1, "ttl": -1.0}"#,
            r#"{"value": 1, "ttl": 0.5}"#,
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "body {body:?}: {err}");
        }
    }

    #[test]
    fn rejects_bad_bodies_with_400() {
        for body in [
            "",
            "{",
            "[]",
            r#"{"ttl": 5}"#,
            r#"{"value": null}"#,
            r#"{"value": 1, "ttl": -1}"#,
            r#"{"value": 1, "ttl": "5"}"#,
            r#"{"value": 1, "ttl": 1.5}"#,
            r#"{"value": 1, "tags": "x"}"#,
            r#"{"value": 1, "tags": [1]}"#,
            r#"{"value": 1, "tags": [""]}"#,
            r#"{"value": 1, "value": 2}"#,
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "body {body:?}: {err}");
        }
    }

    #[test]
    fn enforces_value_and_tag_limits() {
        let limits = Limits {
            max_value_bytes: 10,
            max_tags: 2,
            max_tag_bytes: 3,
            ..Limits::default()
        };
        let err = parse_with(r#"{"value": "0123456789"}"#, &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        let err = parse_with(r#"{"value": 1, "tags": ["a", "b", "c"]}"#, &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let err = parse_with(r#"{"value": 1, "tags": ["abcd"]}"#, &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(parse_with(r#"{"value": 1, "tags": ["a", "a", "b"]}"#, &limits).is_ok());
    }

    #[test]
    fn tags_are_refused_at_the_first_one_past_a_limit() {
        let limits = Limits {
            max_tags: 2,
            max_tag_bytes: 3,
            ..Limits::default()
        };
        // The array is not read past the third distinct tag: what follows it
        // (here a wrong type) is never looked at.
        let err = parse_with(r#"{"value": 1, "tags": ["a", "b", "c", 1]}"#, &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("more than 2 distinct tags"), "{err}");
        let err = parse_with(r#"{"value": 1, "tags": ["abcd", 1]}"#, &limits).unwrap_err();
        assert!(err.message.contains("tag is 4 bytes"), "{err}");
        let err = parse_with(r#"{"value": 1, "tags": ["a", 1]}"#, &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("invalid `tags`"), "{err}");
        let r = parse_with(r#"{"value": 1, "tags": null}"#, &limits).unwrap();
        assert!(r.tags.is_empty());
    }

    #[test]
    fn many_tags_are_deduplicated_in_order() {
        let limits = Limits {
            max_tags: 1000,
            ..Limits::default()
        };
        // Past the linear-scan threshold, with duplicates of early and late
        // tags, then 100k repeats of one tag: all collapse.
        let mut given: Vec<String> = (0..600).map(|i| format!("t{i}")).collect();
        given.extend((0..600).rev().map(|i| format!("t{i}")));
        given.extend(std::iter::repeat_n("t0".to_owned(), 100_000));
        let body = serde_json::json!({"value": 1, "tags": given}).to_string();
        let r = parse_with(&body, &limits).unwrap();
        let expected: Vec<String> = (0..600).map(|i| format!("t{i}")).collect();
        assert_eq!(r.tags, expected);
        // 1001 distinct tags: refused.
        let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
        let body = serde_json::json!({"value": 1, "tags": many}).to_string();
        let err = parse_with(&body, &limits).unwrap_err();
        assert!(err.message.contains("more than 1000"), "{err}");
    }

    #[test]
    fn a_form_content_type_still_needs_a_json_body() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let limits = Limits::default();
        let err = write(&headers, Bytes::from_static(b"value=1"), &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn content_type_must_be_json_when_given() {
        let body = || Bytes::from_static(br#"{"value": 1}"#);
        let limits = Limits::default();
        assert!(write(&HeaderMap::new(), body(), &limits).is_ok());
        for (ct, ok) in [
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", true),
            ("application/vnd.acme.item+json; v=2", true),
            // curl -d's default, and what seed clients may send: still JSON.
            ("application/x-www-form-urlencoded", true),
            ("Application/X-WWW-Form-Urlencoded; charset=utf-8", true),
            ("text/plain", false),
            ("multipart/form-data; boundary=x", false),
            ("application/xml", false),
            ("+json", false),
            ("", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            let result = write(&headers, body(), &limits);
            assert_eq!(result.is_ok(), ok, "{ct}");
            if let Err(e) = result {
                assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            }
        }
    }

    #[test]
    fn json_deeper_than_the_limit_is_refused_before_parsing() {
        let nested = |levels: usize| {
            format!(
                r#"{{"value": {}1{}}}"#,
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        let limits = Limits {
            max_json_depth: 8,
            ..Limits::default()
        };
        assert!(parse_with(&nested(8), &limits).is_ok());
        let err = parse_with(&nested(9), &limits).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("nested deeper than 8"), "{err}");
        // The default, and far beyond serde's own recursion limit: our
        // message, no stack overflow.
        assert!(parse(&nested(32)).is_ok());
        for levels in [33, SERDE_JSON_DEPTH_LIMIT + 1, 1_000_000] {
            let err = parse(&nested(levels)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains("nested deeper than 32"), "{err}");
        }
        // Nesting in unknown fields counts too.
        let body = format!(
            r#"{{"value": 1, "extra": {}{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(parse(&body).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn invalid_utf8_anywhere_in_the_body_is_400() {
        for body in [
            &b"{\"value\": \"\xff\"}"[..],
            b"{\"value\": [\"\xc3\x28\"]}",
            b"{\"value\": 1, \"tags\": [\"\xe2\x82\"]}",
            b"{\"value\": 1, \"x\xf0\x9f\": 2}",
            b"\xef\xbb\xbf\xff",
        ] {
            let err = write(
                &HeaderMap::new(),
                Bytes::copy_from_slice(body),
                &Limits::default(),
            )
            .unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body:?}");
            assert!(err.message.contains("UTF-8"), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_duplicates_refused() {
        let r = parse(r#"{"value": 1, "owner": "x", "meta": {"a": [1]}, "ttl": 5}"#).unwrap();
        assert_eq!(&r.value[..], b"1");
        assert_eq!(r.ttl, Some(Duration::from_secs(5)));
        for body in [
            r#"{"value": 1, "ttl": 5, "ttl": 6}"#,
            r#"{"value": 1, "tags": [], "tags": ["a"]}"#,
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(err.message.contains("duplicate field"), "{err}");
        }
    }
}

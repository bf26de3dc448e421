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

use crate::exec::{Failure, Limits, Write};
use crate::json_text::{JsonError, Scanner};
use bytes::Bytes;
use hyper::http::{HeaderMap, StatusCode, header};
use percent_encoding::percent_decode_str;

/// The deepest `--max-json-depth` allows.
#[cfg(test)]
const MAX_JSON_DEPTH_CAP: usize = 127;

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

/// A write body, `{"value": <any JSON>, "ttl": <seconds>, "tags": [...]}`:
/// validates the content type, then reads the body in one pass (see
/// `json_text`), which checks it is JSON within the nesting bound, finds the
/// value's text, and reads the tags as it goes.
///
/// Unknown fields are ignored, not refused: the seed (Go's `encoding/json`)
/// ignored them and its clients may send extra metadata. They still count
/// towards the body size and nesting limits and must be JSON. A known field
/// given twice is refused, since which one would win is not obvious. The
/// body must be an object (serde's derive also took an array as the fields
/// in order; Go never did). A body that breaks two rules is refused for the
/// first one met in its text.
pub fn write(headers: &HeaderMap, body: Bytes, limits: &Limits) -> Result<Write, Failure> {
    check_json_content_type(headers)?;
    // First, for a clear message; the walk then reads text, not bytes.
    let text = std::str::from_utf8(&body).map_err(|e| {
        Failure::bad_request(format!(
            "body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let fields = set_body(text, limits)?;

    let value = fields
        .value
        .ok_or_else(|| Failure::bad_request("`value` is required and must not be null"))?;
    let ttl = match fields.ttl.map(ttl_seconds).transpose()? {
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

    Ok(Write {
        value: body.slice_ref(value.as_bytes()),
        ttl,
        tags: fields.tags,
    })
}

/// A write body's fields as found: the value's text (absent when null),
/// the ttl's number text (absent when null), the tags read.
#[derive(Default)]
struct SetBody<'a> {
    value: Option<&'a str>,
    ttl: Option<&'a str>,
    tags: Vec<String>,
}

fn invalid_json(e: JsonError) -> Failure {
    match e {
        JsonError::TooDeep { .. } => Failure::bad_request(e.to_string()),
        JsonError::Syntax { .. } => Failure::bad_request(format!("invalid JSON body: {e}")),
    }
}

const TTL_RULE: &str = "`ttl` must be a whole number of seconds >= 0";

/// The one pass over a write body.
fn set_body<'a>(text: &'a str, limits: &Limits) -> Result<SetBody<'a>, Failure> {
    let mut s = Scanner::new(text, limits.max_json_depth);
    match s.peek() {
        Some(b'{') => {}
        Some(_) => {
            return Err(Failure::bad_request(
                "the body must be a JSON object: {\"value\": ..., \"ttl\": ..., \"tags\": [...]}",
            ));
        }
        None => return Err(Failure::bad_request("the body is empty; it must be JSON")),
    }
    s.open(b'{', 0).map_err(invalid_json)?;
    let mut fields = SetBody::default();
    let mut seen = [false; 3];
    let mut once = |field: usize, name: &str, at: usize| {
        if std::mem::replace(&mut seen[field], true) {
            Err(Failure::bad_request(format!(
                "invalid JSON body: duplicate field `{name}` at byte {at}"
            )))
        } else {
            Ok(())
        }
    };
    if !s.eat(b'}') {
        loop {
            s.peek();
            let at = s.offset();
            // Decoded as serde's derive decoded them: `"v\u0061lue"` is
            // `value`, and a name that is no string (a lone surrogate) is
            // refused.
            let name = s
                .member_name()
                .map_err(invalid_json)?
                .decode()
                .map_err(|e| {
                    Failure::bad_request(format!("invalid JSON body: field name at byte {at}: {e}"))
                })?;
            if name == "value" {
                once(0, "value", at)?;
                let value = s.value(1).map_err(invalid_json)?;
                limits.check_value_size(value.len())?;
                fields.value = (value != "null").then_some(value);
            } else if name == "ttl" {
                once(1, "ttl", at)?;
                match s.peek() {
                    Some(b'-' | b'0'..=b'9') => {
                        fields.ttl = Some(s.number().map_err(invalid_json)?)
                    }
                    _ => {
                        if s.value(1).map_err(invalid_json)? != "null" {
                            return Err(Failure::bad_request(TTL_RULE));
                        }
                    }
                }
            } else if name == "tags" {
                once(2, "tags", at)?;
                fields.tags = tags(&mut s, limits)?;
            } else {
                s.value(1).map_err(invalid_json)?;
            }
            if !s.eat(b',') {
                s.expect(b'}', "expected `,` or `}`")
                    .map_err(invalid_json)?;
                break;
            }
        }
    }
    s.end().map_err(invalid_json)?;
    Ok(fields)
}

/// `ttl` as whole seconds: an integer, or a number with no fractional
/// part (`300.0`, `3e2`); past i64 clamped to it, which the bound check
/// after refuses with its own message.
fn ttl_seconds(number: &str) -> Result<i64, Failure> {
    if let Ok(i) = number.parse::<i64>() {
        return Ok(i);
    }
    match number.parse::<f64>() {
        Ok(f) if f.is_finite() && f.fract() == 0.0 => Ok(if f >= i64::MAX as f64 {
            i64::MAX
        } else if f <= i64::MIN as f64 {
            i64::MIN
        } else {
            f as i64
        }),
        _ => Err(Failure::bad_request(TTL_RULE)),
    }
}

/// Below this many distinct tags a duplicate is found by a linear scan (no
/// allocation, fastest for the usual handful); from it on, by a hash set.
const LINEAR_DEDUP_TAGS: usize = 8;

/// The `tags` array (or null): distinct tags in the order first given, each
/// checked as it is read. Refused at the first tag that breaks a rule, so
/// the cost is O(elements read) whatever the body holds: a 2 MiB array of
/// 300k short tags stops at tag `max_tags + 1` instead of being collected
/// and deduplicated whole (which, with a linear duplicate check, was
/// quadratic).
fn tags(s: &mut Scanner<'_>, limits: &Limits) -> Result<Vec<String>, Failure> {
    let not_strings = |at: usize| {
        Failure::bad_request(format!(
            "invalid `tags`: expected an array of strings (at byte {at})"
        ))
    };
    match s.peek() {
        Some(b'[') => {}
        Some(b'n') if s.value(1).map_err(invalid_json)? == "null" => return Ok(Vec::new()),
        _ => return Err(not_strings(s.offset())),
    }
    // Inside the body's object: one level down.
    s.open(b'[', 1).map_err(invalid_json)?;
    let mut tags: Vec<String> = Vec::new();
    if s.eat(b']') {
        return Ok(tags);
    }
    let mut seen: Option<std::collections::HashSet<String>> = None;
    loop {
        if s.peek() != Some(b'"') {
            return Err(not_strings(s.offset()));
        }
        let tag = s
            .string()
            .map_err(invalid_json)?
            .decode()
            .map_err(|e| Failure::bad_request(format!("invalid `tags`: {e}")))?;
        limits.check_tag(&tag)?;
        let new = match &mut seen {
            Some(seen) => !seen.contains(tag.as_ref()),
            None => !tags.iter().any(|t| *t == tag),
        };
        if new {
            if tags.len() == limits.max_tags {
                return Err(Failure::bad_request(format!(
                    "more than {0} distinct tags given; the limit is {0}",
                    limits.max_tags
                )));
            }
            let tag = tag.into_owned();
            if let Some(seen) = &mut seen {
                seen.insert(tag.clone());
            }
            tags.push(tag);
            if seen.is_none() && tags.len() == LINEAR_DEDUP_TAGS {
                seen = Some(tags.iter().cloned().collect());
            }
        }
        if !s.eat(b',') {
            s.expect(b']', "expected `,` or `]`")
                .map_err(invalid_json)?;
            return Ok(tags);
        }
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
    use proptest::prelude::*;

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

    /// A value a client could not read back is refused (400) rather than
    /// stored: a number past a double's range (serde_json and Go fail on
    /// it, and the seed refused it) or a lone surrogate escape (serde_json
    /// fails on it). A surrogate pair and a number that underflows to zero
    /// are read back, so taken.
    #[test]
    fn a_value_no_reader_could_read_back_is_refused() {
        for v in [
            "1e400",
            "[-2.5E+309]",
            r#"{"a": "x\ud800"}"#,
            r#""\udc00\ud800""#,
            &"9".repeat(400),
        ] {
            let err = parse(&format!(r#"{{"value": {v}}}"#)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "value {v}: {err}");
        }
        for v in [r#""\ud83d\ude00""#, "1e-400", "1.7976931348623157e308"] {
            let body = format!(r#"{{"value": {v}}}"#);
            assert_eq!(&parse(&body).unwrap().value[..], v.as_bytes());
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
    fn fields_and_tags_are_compared_decoded() {
        let r = parse(r#"{"v\u0061lue": 1, "tags": ["\u0061", "a", "b\n"]}"#).unwrap();
        assert_eq!(&r.value[..], b"1");
        assert_eq!(r.tags, ["a", "b\n"]);
        let err = parse(r#"{"value": 1, "tags": ["\ud800"]}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("lone surrogate"), "{err}");
        let err = parse(r#"{"value": 1, "v\u0061lue": 2}"#).unwrap_err();
        assert!(err.message.contains("duplicate field `value`"), "{err}");
        // A name that is no string, as serde's derive refused it (now as
        // the text is read: a lone surrogate is refused anywhere).
        let err = parse(r#"{"value": 1, "\ud800": 2}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("lone surrogate"), "{err}");
    }

    #[test]
    fn a_value_too_large_is_413_whatever_follows_it() {
        let limits = Limits {
            max_value_bytes: 10,
            max_tags: 1,
            ..Limits::default()
        };
        for body in [
            r#"{"value": "0123456789", "tags": ["a", "b"]}"#,
            r#"{"value": "0123456789", "tags": 5}"#,
            r#"{"value": "0123456789", "ttl": -1}"#,
        ] {
            let err = parse_with(body, &limits).unwrap_err();
            assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE, "{body}: {err}");
        }
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
        // The default, and far beyond the cap: our message, no stack
        // overflow.
        assert!(parse(&nested(32)).is_ok());
        for levels in [33, MAX_JSON_DEPTH_CAP + 1, 1_000_000] {
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

    /// The parser this one replaced, kept as the reference: serde's derive
    /// over the body, a raw value, and the tags read again. It takes a
    /// top-level array as the struct's fields in order (serde's sequence
    /// form), which the seed's Go never did, so bodies compared are objects.
    mod reference {
        use super::*;
        use serde::Deserialize;
        use serde_json::value::RawValue;

        #[derive(Deserialize)]
        struct Body<'a> {
            #[serde(borrow)]
            value: Option<&'a RawValue>,
            ttl: Option<serde_json::Number>,
            #[serde(borrow)]
            tags: Option<&'a RawValue>,
        }

        /// `(value, ttl, tags)`, or whether it was refused.
        pub fn write(
            body: &str,
            limits: &Limits,
        ) -> Option<(String, Option<Duration>, Vec<String>)> {
            let nesting = crate::json_text::validate(body, limits.max_json_depth);
            if matches!(nesting, Err(JsonError::TooDeep { .. })) {
                return None;
            }
            let parsed: Body<'_> = serde_json::from_str(body).ok()?;
            // Every part of the body readable as JSON values, unknown
            // fields too: what `RawValue` and skipped fields let through
            // unread (a number past a double's range, a lone surrogate) is
            // refused, since a client could not read such a value back.
            serde_json::from_str::<serde_json::Value>(body).ok()?;
            let value = parsed.value?.get().to_owned();
            if value.len() > limits.max_value_bytes {
                return None;
            }
            let ttl = match parsed.ttl {
                None => None,
                Some(n) => {
                    let s = if let Some(i) = n.as_i64() {
                        i
                    } else if n.is_u64() {
                        i64::MAX
                    } else {
                        let f = n.as_f64()?;
                        if f.fract() != 0.0 {
                            return None;
                        }
                        f.clamp(i64::MIN as f64, i64::MAX as f64) as i64
                    };
                    if !(0..=i64::MAX / 1_000_000_000).contains(&s) {
                        return None;
                    }
                    (s > 0).then(|| Duration::from_secs(s as u64))
                }
            };
            let tags = match parsed.tags {
                None => Vec::new(),
                Some(raw) => {
                    let all: Vec<String> = serde_json::from_str(raw.get()).ok()?;
                    let mut tags: Vec<String> = Vec::new();
                    for tag in all {
                        limits.check_tag(&tag).ok()?;
                        if !tags.contains(&tag) {
                            tags.push(tag);
                        }
                    }
                    if tags.len() > limits.max_tags {
                        return None;
                    }
                    tags
                }
            };
            Some((value, ttl, tags))
        }
    }

    /// Write bodies: the fields in any order, sometimes twice, with values
    /// of any shape (right or wrong for the field) and unknown fields.
    fn bodies() -> impl Strategy<Value = String> {
        use crate::json_text::strategies::json_text;
        let tag = prop_oneof![
            6 => "[a-d]{1,2}".prop_map(|t| serde_json::to_string(&t).unwrap()),
            1 => Just(r#""\u0061""#.to_owned()),
            1 => Just(r#""""#.to_owned()),
            1 => Just(r#""\ud800""#.to_owned()),
            1 => json_text(),
        ];
        let tags = prop_oneof![
            6 => prop::collection::vec(tag, 0..8).prop_map(|t| format!("[{}]", t.join(","))),
            1 => Just("null".to_owned()),
            1 => json_text(),
        ];
        let ttl = prop_oneof![
            4 => prop::sample::select(vec![
                "0", "30", "-1", "1.0", "1.5", "3e2", "1e300", "18446744073709551616",
                "9223372036854775807", "-0", "null", "\"5\"",
            ])
            .prop_map(str::to_owned),
            1 => json_text(),
        ];
        let field = prop_oneof![
            4 => json_text().prop_map(|v| format!(r#""value": {v}"#)),
            1 => json_text().prop_map(|v| format!(r#""v\u0061lue":{v}"#)),
            3 => ttl.prop_map(|t| format!(r#""ttl": {t}"#)),
            3 => tags.prop_map(|t| format!(r#""tags":{t}"#)),
            2 => json_text().prop_map(|v| format!(r#""other": {v}"#)),
            1 => json_text().prop_map(|v| format!(r#""\ud800": {v}"#)),
        ];
        // Most carry a value, so most are taken and their fields compared.
        let value = json_text().prop_map(|v| vec![format!(r#""value": {v}"#)]);
        (
            prop::option::weighted(0.9, value),
            prop::collection::vec(field, 0..4),
        )
            .prop_map(|(value, mut fields)| {
                fields.extend(value.into_iter().flatten());
                fields
            })
            .prop_shuffle()
            .prop_map(|f| format!("{{{}}}", f.join(", ")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The one-pass parser takes exactly the bodies the serde-based one
        /// took, with the same value text, ttl and tags; damaged bodies
        /// too (refusals may differ in which rule they name first).
        #[test]
        fn parses_as_the_serde_reference_did(
            body in prop_oneof![bodies(), crate::json_text::strategies::mutated(bodies())]
        ) {
            let limits = Limits { max_tags: 3, max_tag_bytes: 2, max_json_depth: 5, ..Limits::default() };
            let ours = parse_with(&body, &limits)
                .map(|w| (String::from_utf8(w.value.to_vec()).unwrap(), w.ttl, w.tags))
                .ok();
            let expected = if body.trim_start().starts_with('{') {
                reference::write(&body, &limits)
            } else {
                None
            };
            prop_assert_eq!(ours, expected, "{}", body);
        }
    }
}

//! JSON text checked in one pass, without building it: the grammar of
//! RFC 8259 (as strict as serde_json: no trailing commas, no leading zeros,
//! no control characters in strings) and the nesting bound, in the same
//! walk. It hands back spans of the text, so a write's value is stored as
//! the bytes the client sent and a field is found without a tree or a
//! second parse.
//!
//! Written by hand because it is the write path's parser: serde_json took
//! three passes over a SET's body (nesting, parse, then the tags again),
//! 283 ns for `bench/load.sh`'s body against 193 ns in this one pass, and
//! 114 against 46 ns to check a peer's 200-byte string value (`cargo bench
//! -p cache-node --bench request`; structure-heavy values cost about what
//! serde_json's took). The walk is iterative (a stack of the open
//! brackets, on the stack up to 16 levels), so depth costs no recursion
//! whatever the input; strings are skipped a word at a time, as serde_json
//! does. The text is `&str`: callers check UTF-8 first (one vectorised
//! pass, naming the offending byte), which serde_json checked only in the
//! strings it decoded.

use std::borrow::Cow;
use std::fmt;

use smallvec::SmallVec;

/// The code unit of the four hex digits at `at`, if they are four hex digits.
fn hex_unit(bytes: &[u8], at: usize) -> Option<u16> {
    let hex = bytes.get(at..at + 4)?;
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Why a text is refused, at which byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON: what was expected or found there.
    Syntax { at: usize, what: &'static str },
    /// An object or array opened deeper than `max` levels, at that bracket.
    TooDeep { at: usize, max: usize },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax { at, what } => write!(f, "{what} at byte {at}"),
            JsonError::TooDeep { at, max } => {
                write!(f, "JSON is nested deeper than {max} levels (at byte {at})")
            }
        }
    }
}

/// A JSON string as it is in the text: between its quotes, escapes and all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonStr<'a> {
    raw: &'a str,
    escaped: bool,
}

impl<'a> JsonStr<'a> {
    /// The string's characters: the text itself when it has no escapes (the
    /// usual key or tag), otherwise decoded by serde_json, which refuses a
    /// lone surrogate (`"\ud800"`) as any `String` would.
    pub fn decode(&self) -> Result<Cow<'a, str>, String> {
        if !self.escaped {
            return Ok(Cow::Borrowed(self.raw));
        }
        let quoted = format!("\"{}\"", self.raw);
        serde_json::from_str::<String>(&quoted)
            .map(Cow::Owned)
            .map_err(|e| e.to_string())
    }
}

/// A cursor over JSON text. Each method reads one piece at the cursor
/// (after any whitespace) and moves past it.
pub struct Scanner<'a> {
    text: &'a str,
    at: usize,
    max_depth: usize,
}

impl<'a> Scanner<'a> {
    /// Objects and arrays may nest `max_depth` levels, counted from the
    /// start of `text`.
    pub fn new(text: &'a str, max_depth: usize) -> Self {
        Self {
            text,
            at: 0,
            max_depth,
        }
    }

    /// The cursor's byte offset, for messages.
    pub fn offset(&self) -> usize {
        self.at
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn syntax(&self, what: &'static str) -> JsonError {
        JsonError::Syntax { at: self.at, what }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not taken.
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes().get(self.at).copied()
    }

    /// Takes `byte` if it comes next.
    pub fn eat(&mut self, byte: u8) -> bool {
        let next = self.peek() == Some(byte);
        self.at += usize::from(next);
        next
    }

    /// Takes `byte`, or refuses with `what`.
    pub fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), JsonError> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(self.syntax(what))
        }
    }

    /// Only whitespace is left.
    pub fn end(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.syntax("trailing characters")),
        }
    }

    /// Opens an object or array at nesting `depth` (the containers already
    /// open around it), refusing it past the bound.
    pub fn open(&mut self, bracket: u8, depth: usize) -> Result<(), JsonError> {
        self.skip_ws();
        let at = self.at;
        self.expect(
            bracket,
            if bracket == b'{' {
                "expected `{`"
            } else {
                "expected `[`"
            },
        )?;
        self.within_depth(at, depth)
    }

    /// A bracket at `at` opens one more level inside `depth` open ones:
    /// refused past the bound.
    fn within_depth(&self, at: usize, depth: usize) -> Result<(), JsonError> {
        if depth + 1 > self.max_depth {
            return Err(JsonError::TooDeep {
                at,
                max: self.max_depth,
            });
        }
        Ok(())
    }

    /// One string.
    pub fn string(&mut self) -> Result<JsonStr<'a>, JsonError> {
        self.expect(b'"', "expected a string")?;
        self.rest_of_string()
    }

    /// A string whose opening quote was just taken.
    fn rest_of_string(&mut self) -> Result<JsonStr<'a>, JsonError> {
        let start = self.at;
        let bytes = self.bytes();
        let mut escaped = false;
        loop {
            self.at = skip_plain(bytes, self.at);
            match bytes.get(self.at) {
                Some(b'"') => {
                    let raw = &self.text[start..self.at];
                    self.at += 1;
                    return Ok(JsonStr { raw, escaped });
                }
                Some(b'\\') => {
                    escaped = true;
                    self.at += 1;
                    match bytes.get(self.at) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.at += 1;
                        }
                        Some(b'u') => {
                            let Some(unit) = hex_unit(bytes, self.at + 1) else {
                                return Err(self.syntax("invalid \\u escape"));
                            };
                            self.at += 5;
                            // A surrogate must come as a pair (high, then
                            // low): alone it is no character, and a reader
                            // decoding the text (serde_json, Go's) fails on
                            // it, so the value could be stored but never
                            // read back.
                            match unit {
                                0xD800..=0xDBFF => {
                                    let low = (bytes.get(self.at..self.at + 2) == Some(b"\\u"))
                                        .then(|| hex_unit(bytes, self.at + 2))
                                        .flatten();
                                    if !low.is_some_and(|l| (0xDC00..=0xDFFF).contains(&l)) {
                                        return Err(self.syntax("lone surrogate in \\u escape"));
                                    }
                                    self.at += 6;
                                }
                                0xDC00..=0xDFFF => {
                                    return Err(self.syntax("lone surrogate in \\u escape"));
                                }
                                _ => {}
                            }
                        }
                        Some(_) => return Err(self.syntax("invalid escape")),
                        None => return Err(self.syntax("EOF while parsing a string")),
                    }
                }
                Some(_) => return Err(self.syntax("control character in a string")),
                None => return Err(self.syntax("EOF while parsing a string")),
            }
        }
    }

    /// One number, as its text.
    pub fn number(&mut self) -> Result<&'a str, JsonError> {
        self.skip_ws();
        let start = self.at;
        let bytes = self.bytes();
        let digits = |at: usize| {
            bytes[at..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        self.at += usize::from(bytes.get(self.at) == Some(&b'-'));
        match bytes.get(self.at) {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.at += digits(self.at),
            _ => return Err(self.syntax("invalid number")),
        }
        if bytes.get(self.at) == Some(&b'.') {
            let n = digits(self.at + 1);
            if n == 0 {
                self.at += 1;
                return Err(self.syntax("invalid number"));
            }
            self.at += 1 + n;
        }
        if let Some(b'e' | b'E') = bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = bytes.get(self.at) {
                self.at += 1;
            }
            let n = digits(self.at);
            if n == 0 {
                return Err(self.syntax("invalid number"));
            }
            self.at += n;
        }
        let text = &self.text[start..self.at];
        // Past the range of a double, readers fail on it (serde_json's
        // "number out of range", Go's too): a value could be stored but
        // never read back. Only a long number or one with an exponent can
        // be (the largest double has 309 digits), so the usual one is not
        // parsed.
        if (text.len() > 300 || text.bytes().any(|b| matches!(b, b'e' | b'E')))
            && !text.parse::<f64>().is_ok_and(f64::is_finite)
        {
            self.at = start;
            return Err(self.syntax("number out of range"));
        }
        Ok(text)
    }

    fn literal(&mut self, word: &'static str) -> Result<(), JsonError> {
        if self.bytes()[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.syntax("expected value"))
        }
    }

    /// One value of any kind inside `depth` open containers, checked whole
    /// (nested ones included); its text.
    pub fn value(&mut self, depth: usize) -> Result<&'a str, JsonError> {
        self.skip_ws();
        let start = self.at;
        // The closing bracket of each container open inside this value.
        let mut open: SmallVec<[u8; 16]> = SmallVec::new();
        loop {
            // A value is expected here, at the cursor (whitespace skipped).
            match self.bytes().get(self.at) {
                Some(&bracket @ (b'{' | b'[')) => {
                    self.within_depth(self.at, depth + open.len())?;
                    self.at += 1;
                    let close = if bracket == b'{' { b'}' } else { b']' };
                    if !self.eat(close) {
                        open.push(close);
                        if close == b'}' {
                            self.member_name()?;
                        }
                        self.skip_ws();
                        continue;
                    }
                }
                Some(b'"') => {
                    self.at += 1;
                    self.rest_of_string()?;
                }
                Some(b'-' | b'0'..=b'9') => {
                    self.number()?;
                }
                Some(b't') => self.literal("true")?,
                Some(b'f') => self.literal("false")?,
                Some(b'n') => self.literal("null")?,
                Some(_) => return Err(self.syntax("expected value")),
                None => return Err(self.syntax("EOF while parsing a value")),
            }
            // A value ended: close what it ends, up to the next one.
            loop {
                let Some(&close) = open.last() else {
                    return Ok(&self.text[start..self.at]);
                };
                match self.peek() {
                    Some(b',') => {
                        self.at += 1;
                        if close == b'}' {
                            self.member_name()?;
                        }
                        self.skip_ws();
                        break;
                    }
                    Some(b) if b == close => {
                        self.at += 1;
                        open.pop();
                    }
                    _ if close == b'}' => return Err(self.syntax("expected `,` or `}`")),
                    _ => return Err(self.syntax("expected `,` or `]`")),
                }
            }
        }
    }

    /// An object member's name and its colon.
    pub fn member_name(&mut self) -> Result<JsonStr<'a>, JsonError> {
        let name = self.string()?;
        self.expect(b':', "expected `:`")?;
        Ok(name)
    }
}

/// Whether `text` is one JSON value (whitespace around it allowed), nested
/// at most `max_depth` levels.
pub fn validate(text: &str, max_depth: usize) -> Result<(), JsonError> {
    let mut scanner = Scanner::new(text, max_depth);
    scanner.value(0)?;
    scanner.end()
}

/// The offset of the first byte from `at` that ends a run of plain string
/// characters: a quote, a backslash, a control character, or the end.
/// Eight bytes at a time while none is among them.
fn skip_plain(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero -> its high bit set here (a set bit can follow a
    // zero byte spuriously, never precede the first one).
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    while let Some(word) = bytes.get(at..at + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let special = zero_byte(x ^ (ONES * u64::from(b'"')))
            | zero_byte(x ^ (ONES * u64::from(b'\\')))
            // Bytes below 0x20 (control characters).
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGHS);
        if special != 0 {
            break;
        }
        at += 8;
    }
    while let Some(&b) = bytes.get(at) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        at += 1;
    }
    at
}

/// Generators of JSON text for property tests, here and in the parsers
/// built on this module.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    /// Any JSON value, printed with random whitespace.
    pub fn json_text() -> impl Strategy<Value = String> {
        let ws = prop::sample::select(vec!["", " ", "\n", "\t ", "\r\n"]);
        let leaf = prop_oneof![
            Just("null".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            ".{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(5, 48, 6, move |inner| {
            let ws = ws.clone();
            prop_oneof![
                (prop::collection::vec(inner.clone(), 0..6), ws.clone())
                    .prop_map(|(items, ws)| format!("[{ws}{}{ws}]", items.join(&format!(",{ws}")))),
                (prop::collection::vec(("[a-z\"\\\\]{0,4}", inner), 0..6), ws).prop_map(
                    |(members, ws)| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(k, v)| {
                                format!("{}{ws}:{ws}{v}", serde_json::to_string(&k).unwrap())
                            })
                            .collect();
                        format!("{{{ws}{}{ws}}}", members.join(","))
                    }
                ),
            ]
        })
    }

    /// `text` with one byte replaced, inserted or removed, kept UTF-8.
    pub fn mutated(text: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        (
            text,
            any::<prop::sample::Index>(),
            0..3u8,
            prop::sample::select(b"{}[],:\"\\0123456789.eE+-tfnul \x01x".to_vec()),
        )
            .prop_map(|(text, at, how, byte)| {
                let mut bytes = text.into_bytes();
                let at = at.index(bytes.len() + 1);
                match how {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, byte),
                }
                String::from_utf8(bytes).unwrap_or_default()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::{json_text, mutated};
    use super::*;
    use proptest::prelude::*;

    /// serde_json's verdict when it reads the text into values, the
    /// reference: a number out of a double's range or a lone surrogate is
    /// refused, as a client reading the value back would (skipping it as
    /// `IgnoredAny` takes both). Its nesting limit (128) is past what the
    /// texts compared nest.
    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(text).is_ok()
    }

    #[test]
    fn takes_what_serde_takes_and_refuses_what_it_refuses() {
        let cases = [
            "1",
            "-0",
            "0.5",
            "1e5",
            "1E+5",
            "-1.5e-3",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "\"\"",
            "\"a\\\"b\"",
            "\"\\u00e9\\ud83d\\ude00\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\\ud800x\"",
            "\"\\ude00\\ud83d\"",
            "1e400",
            "-1.5E+309",
            "1e-400",
            "1.7976931348623157e308",
            "\"\\x\"",
            "\"\\u12\"",
            "\"tab\there\"",
            "\"\u{7f}\"",
            "\"é😀\"",
            "true",
            "false",
            "null",
            "nul",
            "tru",
            "[]",
            "[1,2]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{}",
            "{\"a\":1}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":}",
            "[{\"a\":[{}]}]",
            " \n\t 1 \r\n",
            "1 2",
            "",
            "   ",
            "[",
            "{",
            "\"",
            "[\"a\",{\"b\":null}]",
            "{\"a\":1}}",
            "[[]]]",
        ];
        for text in cases {
            assert_eq!(
                validate(text, 128).is_ok(),
                serde_accepts(text),
                "{text:?}: {:?}",
                validate(text, 128)
            );
        }
    }

    #[test]
    fn depth_is_counted_from_the_start_and_refused_at_the_bracket() {
        assert!(validate("[[1]]", 2).is_ok());
        assert_eq!(
            validate("[[[1]]]", 2),
            Err(JsonError::TooDeep { at: 2, max: 2 })
        );
        assert_eq!(
            validate(r#"{"a": {"b": 1}}"#, 1),
            Err(JsonError::TooDeep { at: 6, max: 1 })
        );
        // A bracket inside a string is text, after an escaped quote or an
        // escaped backslash too.
        assert!(validate(r#"["[[[[", "\"[[["]"#, 1).is_ok());
        assert_eq!(
            validate(r#"{"a": "\\", "b": [[1]]}"#, 2),
            Err(JsonError::TooDeep { at: 18, max: 2 })
        );
        assert!(validate("[[[]]]", 3).is_ok());
        // A million levels: refused at the bound, no recursion.
        let deep = "[".repeat(1_000_000);
        assert_eq!(
            validate(&deep, 128),
            Err(JsonError::TooDeep { at: 128, max: 128 })
        );
    }

    #[test]
    fn strings_keep_their_text_and_decode_their_escapes() {
        let mut s = Scanner::new(r#""plain" "a\u0062c" "\ud83d\ude00" "\ud800""#, 8);
        let plain = s.string().unwrap();
        assert_eq!(plain.decode().unwrap(), "plain");
        assert!(matches!(plain.decode().unwrap(), Cow::Borrowed(_)));
        let escaped = s.string().unwrap();
        assert_eq!(escaped.decode().unwrap(), "abc");
        assert_eq!(s.string().unwrap().decode().unwrap(), "😀");
        // A lone surrogate is no character: refused as the text is read.
        assert!(s.string().is_err(), "a lone surrogate");
    }

    #[test]
    fn the_word_at_a_time_skip_stops_at_the_first_special_byte() {
        for len in 0..40 {
            for special in [b'"', b'\\', 0x00, 0x1f] {
                for at in 0..len {
                    let mut text = vec![b'a'; len];
                    text[at] = special;
                    assert_eq!(skip_plain(&text, 0), at, "{len} {special} {at}");
                }
            }
            assert_eq!(skip_plain(&vec![0x7f; len], 0), len);
            assert_eq!(skip_plain(&vec![0x20; len], 0), len);
            assert_eq!(skip_plain(&vec![0xe9; len], 0), len);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn valid_json_is_taken_whole(text in json_text()) {
            prop_assert_eq!(validate(&text, 128), Ok(()));
            let mut s = Scanner::new(&text, 128);
            prop_assert_eq!(s.value(0).unwrap(), text.trim_matches(|c| " \n\t\r".contains(c)));
        }

        #[test]
        fn agrees_with_serde_json_on_damaged_text(text in mutated(json_text())) {
            prop_assert_eq!(
                validate(&text, 128).is_ok(),
                serde_accepts(&text),
                "{:?}: {:?}", text, validate(&text, 128)
            );
        }
    }
}

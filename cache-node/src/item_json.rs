//! An item as the seed's JSON: the one encoder of an item for clients,
//! whether it comes straight from this node's store (borrowed under the
//! shard's lock) or from the record an owner sent (see `store::ItemView`).
//!
//! Written by hand because it is the GET hot path: the value is already JSON
//! text (validated when written) and is copied in verbatim rather than parsed
//! and re-encoded, and timestamps are formatted without allocating. The shape
//! is the seed's: `ttl` in nanoseconds (Go's `time.Duration`), times in RFC 3339
//! UTC formatted as Go's `time.RFC3339Nano` does (trailing zeros of the
//! fraction dropped), plus `expires_at`.

use crate::store::{ItemView, UnixNanos};

/// The item as JSON bytes, in a buffer sized for them up front.
pub fn item_to_vec(item: &impl ItemView) -> Vec<u8> {
    let mut out = Vec::with_capacity(max_len(item));
    write_item(&mut out, item);
    out
}

/// The most an item's JSON takes beside its key, value and tags: the field
/// names and punctuation, the key's quotes, three timestamps of at most 30
/// bytes and two integers of at most 20 digits.
const MOST_BESIDE_KEY_VALUE_AND_TAGS: usize = 231;

/// The most [`write_item`] writes for `item`, unless its key or a tag holds
/// a character JSON escapes (then the buffer grows once). A GET's answer
/// used to outgrow a smaller estimate (three nanosecond timestamps alone
/// take 90 bytes), and its move into a larger buffer was one of the
/// request's few allocations.
fn max_len(item: &impl ItemView) -> usize {
    // A tag takes its quotes and a comma.
    let tags: usize = item.tags().map(|tag| tag.len() + 3).sum();
    MOST_BESIDE_KEY_VALUE_AND_TAGS + item.key().len() + item.value().len() + tags
}

pub fn write_item(out: &mut Vec<u8>, item: &impl ItemView) {
    let mut int = itoa::Buffer::new();
    let meta = item.meta();
    out.extend_from_slice(b"{\"key\":");
    write_json_string(out, item.key());
    out.extend_from_slice(b",\"value\":");
    out.extend_from_slice(item.value());
    out.extend_from_slice(b",\"ttl\":");
    // 0 for a record claiming to expire before it was created (the store
    // refuses those from peers).
    let ttl = meta.expires_at.saturating_sub(meta.created_at);
    out.extend_from_slice(int.format(ttl).as_bytes());
    out.extend_from_slice(b",\"created_at\":\"");
    write_rfc3339(out, meta.created_at);
    out.extend_from_slice(b"\",\"accessed_at\":\"");
    write_rfc3339(out, meta.accessed_at);
    out.extend_from_slice(b"\",\"expires_at\":\"");
    write_rfc3339(out, meta.expires_at);
    out.extend_from_slice(b"\",\"access_count\":");
    out.extend_from_slice(int.format(meta.access_count).as_bytes());
    out.extend_from_slice(b",\"tags\":[");
    for (i, tag) in item.tags().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(out, tag);
    }
    out.extend_from_slice(b"]}");
}

/// A JSON string literal. Keys and tags seldom hold a character JSON must
/// escape (a control character, `"` or `\`, the only ones serde_json
/// escapes): those are copied between quotes as they are; the rest are
/// escaped by serde_json.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as Go's `time.RFC3339Nano` prints UTC.
///
/// Three of these are in every GET's answer, and formatted digit by digit
/// they were three quarters of the answer's encoding (about 50 ns each,
/// `cargo bench -p cache-node --bench request -- answer`): so the fields are
/// written two digits at a time from a table into a fixed template, and
/// copied out once.
pub fn write_rfc3339(out: &mut Vec<u8>, at: UnixNanos) {
    let secs = at / 1_000_000_000;
    let nanos = (at % 1_000_000_000) as u32;
    // u64 nanoseconds end in 2554: the days fit in 32 bits and the year
    // always has four digits.
    let (year, month, day) = civil_from_days((secs / 86_400) as u32);
    let sod = (secs % 86_400) as u32;
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    put_pair(&mut text[0..2], year / 100);
    put_pair(&mut text[2..4], year % 100);
    put_pair(&mut text[5..7], month);
    put_pair(&mut text[8..10], day);
    put_pair(&mut text[11..13], sod / 3600);
    put_pair(&mut text[14..16], sod / 60 % 60);
    put_pair(&mut text[17..19], sod % 60);
    let len = if nanos == 0 {
        text[19] = b'Z';
        20
    } else {
        text[20] = b'0' + (nanos / 100_000_000) as u8;
        let rest = nanos % 100_000_000;
        put_pair(&mut text[21..23], rest / 1_000_000);
        put_pair(&mut text[23..25], rest / 10_000 % 100);
        put_pair(&mut text[25..27], rest / 100 % 100);
        put_pair(&mut text[27..29], rest % 100);
        // Go drops the fraction's trailing zeros; it is not zero, so a
        // digit other than zero stops the scan after the point.
        let mut end = 29;
        while text[end - 1] == b'0' {
            end -= 1;
        }
        text[end] = b'Z';
        end + 1
    };
    out.extend_from_slice(&text[..len]);
}

/// "00" to "99", two bytes each.
const PAIRS: [u8; 200] = {
    let mut table = [0u8; 200];
    let mut n = 0;
    while n < 100 {
        table[2 * n] = b'0' + (n / 10) as u8;
        table[2 * n + 1] = b'0' + (n % 10) as u8;
        n += 1;
    }
    table
};

/// Writes `n` (below 100) as two digits into `dst` (two bytes long).
fn put_pair(dst: &mut [u8], n: u32) {
    let i = n as usize * 2;
    dst.copy_from_slice(&PAIRS[i..i + 2]);
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard
/// Hinnant's `civil_from_days`, in unsigned 32-bit arithmetic: the days of a
/// `u64` of nanoseconds are never negative and stay below 2^18, and the
/// divisions by constants are cheaper at that width.
fn civil_from_days(days: u32) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u32::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ItemMeta, StandInItem as Item};
    use chrono::{DateTime, SecondsFormat};

    fn format(at: UnixNanos) -> String {
        let mut out = Vec::new();
        write_rfc3339(&mut out, at);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn matches_chrono_across_three_centuries() {
        // A deterministic spread of instants, including leap days and zero fractions.
        let mut at: u64 = 0;
        for i in 0..200_000u64 {
            at = at
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407 + i)
                % 9_000_000_000_000_000_000; // chrono takes i64 nanoseconds: up to 2262
            let at = if i % 3 == 0 {
                at - at % 1_000_000_000
            } else {
                at
            };
            let expected = DateTime::from_timestamp_nanos(at as i64)
                .to_rfc3339_opts(SecondsFormat::AutoSi, true);
            // chrono pads the fraction to 3, 6 or 9 digits; Go trims every trailing zero.
            let expected = match expected.split_once('.') {
                Some((head, frac)) => {
                    let frac = frac.trim_end_matches('Z').trim_end_matches('0');
                    if frac.is_empty() {
                        format!("{head}Z")
                    } else {
                        format!("{head}.{frac}Z")
                    }
                }
                None => expected,
            };
            assert_eq!(format(at), expected, "at {at}");
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in [
            "bench:1",
            "",
            "caf\u{e9} \u{1f600}",
            "a\"b",
            "back\\slash",
            "tab\there",
            "nul\u{0}",
            "\u{1f}\u{7f}",
            "del\u{7f}",
            "</script>",
        ] {
            let mut out = Vec::new();
            write_json_string(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
            assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s);
        }
    }

    #[test]
    fn an_item_is_written_within_the_room_reserved_for_it() {
        // The longest timestamps (a full fraction), ttl and access count,
        // as far as one item holds them together: a ttl of 20 digits needs
        // a creation time of 0, whose timestamp is short.
        let full = 951_782_400_123_456_789; // 2000-02-29T00:00:00.123456789Z
        let items = [
            Item {
                key: "bench:1".into(),
                value: br#""v""#.to_vec(),
                meta: ItemMeta {
                    created_at: full,
                    accessed_at: full,
                    expires_at: full,
                    access_count: u64::MAX,
                },
                tags: vec![],
            },
            Item {
                key: String::new(),
                value: b"{}".to_vec(),
                meta: ItemMeta {
                    created_at: 0,
                    accessed_at: u64::MAX,
                    expires_at: u64::MAX,
                    access_count: u64::MAX,
                },
                tags: vec!["a".into(), "bench".into(), String::new()],
            },
        ];
        for item in &items {
            let mut out = Vec::new();
            write_item(&mut out, item);
            assert!(
                out.len() <= max_len(item),
                "{} bytes written, {} reserved: {}",
                out.len(),
                max_len(item),
                String::from_utf8_lossy(&out)
            );
            assert_eq!(item_to_vec(item), out);
        }
        // The first item's parts beside its key, value and tags are all at
        // their longest but the ttl (zero here): the reserve is exact for it
        // once the ttl's 19 missing digits are added.
        assert_eq!(item_to_vec(&items[0]).len() + 19, max_len(&items[0]));
    }

    #[test]
    fn go_style_fractions() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_500_000_000), "1970-01-01T00:00:01.5Z");
        assert_eq!(
            format(951_782_400_000_000_123),
            "2000-02-29T00:00:00.000000123Z"
        );
        // The last instant a u64 holds (beyond chrono's range): four-digit
        // year, a full fraction.
        assert_eq!(format(u64::MAX), "2554-07-21T23:34:33.709551615Z");
        assert_eq!(format(10_000_000_000), "1970-01-01T00:00:10Z");
    }
}

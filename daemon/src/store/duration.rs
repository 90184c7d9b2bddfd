//! Durations in stored records: text such as `"500ms"`, `"10s"` or `"90s"`.
//!
//! This is the spelling record version 1 has held since the first release
//! (the shortest one, units `h`, `m`, `s`, `ms`, each at most once, largest
//! first). It belongs to the store and is frozen with it: the spec's own
//! duration syntax may change without changing a byte on disk, and a record
//! written by this build reads back, byte for byte, in the release before it.
//!
//! Reading also accepts any other spelling of the same grammar and a bare
//! integer (seconds), which older builds accepted too.

use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Units from largest to smallest, with their size in milliseconds.
const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// The shortest text for `duration` (sub-millisecond parts are dropped):
/// `90s` rather than `1m30s`, `1m` rather than `60s`; ties go to larger units.
pub(super) fn format(duration: Duration) -> String {
    let total = duration.as_millis();
    if total == 0 {
        return "0s".to_owned();
    }
    // Each subset of units has one greedy spelling; the shortest wins. Subsets
    // are tried with larger units first, so ties go to larger units.
    let mut best: Option<String> = None;
    for mask in 1u8..16 {
        if let Some(text) = render(total, mask)
            && best.as_ref().is_none_or(|b| text.len() < b.len())
        {
            best = Some(text);
        }
    }
    best.unwrap_or_else(|| format!("{total}ms"))
}

/// Spells `total` milliseconds with exactly the units selected by `mask`
/// (bit 0 = hours), each with a non-zero count; `None` if that is impossible.
fn render(total: u128, mask: u8) -> Option<String> {
    let mut rest = total;
    let mut out = String::new();
    for (i, (unit, size)) in UNITS.iter().enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let size = u128::from(*size);
        let count = rest / size;
        if count == 0 {
            return None;
        }
        rest -= count * size;
        // Writing to a String cannot fail.
        let _ = write!(out, "{count}{unit}");
    }
    (rest == 0).then_some(out)
}

/// Reads `"1h2m3s4ms"`-style text (each unit optional, largest first) or a
/// bare integer of seconds.
pub(super) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .ok()
            .and_then(|secs| secs.checked_mul(1_000))
            .map(Duration::from_millis)
            .ok_or_else(|| format!("duration {text:?} is too large"));
    }
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_rank: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let letters = rest[digits..]
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let (number, unit) = (&rest[..digits], &rest[digits..digits + letters]);
        let rank = UNITS.iter().position(|(name, _)| *name == unit);
        let (Some(rank), false) = (rank, number.is_empty()) else {
            return Err(format!(
                "invalid duration {text:?}: expected a number and a unit (h, m, s or ms) at {rest:?}"
            ));
        };
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(format!(
                "invalid duration {text:?}: units must appear at most once each, largest first"
            ));
        }
        last_rank = Some(rank);
        total = number
            .parse::<u64>()
            .ok()
            .and_then(|count| count.checked_mul(UNITS[rank].1))
            .and_then(|millis| total.checked_add(millis))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
        rest = &rest[digits + letters..];
    }
    Ok(Duration::from_millis(total))
}

/// Serde adapter: `#[serde(with = "super::duration")]`.
pub(super) fn serialize<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

/// Serde adapter: `#[serde(with = "super::duration")]`.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"500ms\" or \"90s\", or a number of seconds")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        v.checked_mul(1_000)
            .map(Duration::from_millis)
            .ok_or_else(|| E::custom(format!("duration of {v} seconds is too large")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn formats_as_version_1_records_hold_them() {
        for (millis, text) in [
            (0, "0s"),
            (500, "500ms"),
            (1_000, "1s"),
            (1_500, "1500ms"),
            (10_000, "10s"),
            (60_000, "1m"),
            (90_000, "90s"),
            (3_600_000, "1h"),
            (3_660_000, "61m"),
            (3_723_004, "3723s4ms"),
        ] {
            assert_eq!(format(ms(millis)), text, "{millis} ms");
        }
    }

    #[test]
    fn parses_every_spelling_and_seconds() {
        assert_eq!(parse("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse("90s"), Ok(ms(90_000)));
        assert_eq!(parse("1h2m3s4ms"), Ok(ms(3_723_004)));
        assert_eq!(parse("10"), Ok(ms(10_000)));
        for n in [0, 1, 999, 1_000, 59_999, 60_000, 3_600_001, 86_400_000] {
            assert_eq!(parse(&format(ms(n))), Ok(ms(n)), "{n} ms");
        }
    }

    #[test]
    fn refuses_what_no_build_wrote() {
        for bad in [
            "",
            "s",
            "1.5s",
            "1m30",
            "5d",
            "30s1m",
            "1s1s",
            "99999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

//! Durations as people write them in specs: `"500ms"`, `"2s"`, `"1m30s"`, `"1h"`, or a
//! bare integer meaning seconds. Formatting gives back the shortest such string.

use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::de::{self, Visitor};

/// Units from largest to smallest, with their size in milliseconds. A written duration
/// uses each unit at most once, in this order.
const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum DurationError {
    /// Nothing but whitespace.
    #[error("it is empty")]
    Empty,
    /// A unit or other text where a number should be.
    #[error("expected a number at `{0}`")]
    ExpectedNumber(String),
    /// `1.5s`: only whole numbers of each unit.
    #[error("fractions are not supported (write e.g. 1s500ms or 1500ms)")]
    Fraction,
    /// `1m30`: a number with no unit after another component.
    #[error("missing unit after `{0}` (use h, m, s or ms)")]
    MissingUnit(String),
    /// `5d`, `2sec`.
    #[error("unknown unit `{0}` (use h, m, s or ms)")]
    UnknownUnit(String),
    /// `30s1m`, `1s1s`.
    #[error("units must appear at most once each, largest first (h, m, s, ms)")]
    Order,
    /// More milliseconds than fit in 64 bits.
    #[error("it is too large")]
    Overflow,
}

/// Parses `"1h2m3s500ms"`-style text (each unit optional, largest first) or a bare
/// integer meaning seconds.
pub(super) fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return seconds(text.parse().map_err(|_| DurationError::Overflow)?);
    }
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_rank: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::ExpectedNumber(rest.to_owned()));
        }
        let (number, after) = rest.split_at(digits);
        if after.starts_with('.') {
            return Err(DurationError::Fraction);
        }
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        if letters == 0 {
            return Err(DurationError::MissingUnit(number.to_owned()));
        }
        let (unit, after) = after.split_at(letters);
        let (rank, (_, size)) = UNITS
            .iter()
            .enumerate()
            .find(|(_, (name, _))| *name == unit)
            .ok_or_else(|| DurationError::UnknownUnit(unit.to_owned()))?;
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(DurationError::Order);
        }
        last_rank = Some(rank);
        let count: u64 = number.parse().map_err(|_| DurationError::Overflow)?;
        total = count
            .checked_mul(*size)
            .and_then(|millis| total.checked_add(millis))
            .ok_or(DurationError::Overflow)?;
        rest = after;
    }
    Ok(Duration::from_millis(total))
}

/// A whole number of seconds, refusing values whose milliseconds overflow `u64` so that
/// every parsed duration can be formatted and converted to milliseconds.
fn seconds(secs: u64) -> Result<Duration, DurationError> {
    secs.checked_mul(1_000)
        .map(Duration::from_millis)
        .ok_or(DurationError::Overflow)
}

/// Formats a duration as the shortest string [`parse`] reads back to the same value
/// (sub-millisecond parts are dropped): `90s` rather than `1m30s`, `1m` rather than `60s`.
pub(super) fn format(duration: Duration) -> String {
    let total = duration.as_millis();
    if total == 0 {
        return "0s".to_owned();
    }
    // Each subset of units has one greedy spelling; the shortest over all subsets wins.
    // Subsets are tried with larger units first, so ties go to larger units.
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

/// Spells `total` milliseconds with exactly the units selected by `mask` (bit 0 = hours),
/// each with a non-zero count; `None` if that is impossible.
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

/// Serde adapter for `#[serde(with = "duration::text")]`: durations as strings like
/// `"1m30s"`; an integer is read as seconds.
pub(super) mod text {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Writes the shortest string for `duration`.
    pub(in crate::spec) fn serialize<S: Serializer>(
        duration: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format(*duration))
    }

    /// Reads a duration string or a number of seconds.
    pub(in crate::spec) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(super::DurationVisitor)
    }
}

/// Errors are raised inside the visitor so that the YAML deserializer attaches the
/// position of the offending value.
struct DurationVisitor;

const EXPECTED: &str = "a duration such as \"500ms\", \"30s\" or \"1m30s\"";

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(|err| E::custom(format!("invalid duration {v:?}: {err}")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        seconds(v).map_err(|err| E::custom(format!("invalid duration {v}: {err}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("expected {EXPECTED}, found {v}"))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(format!("expected {EXPECTED}, found {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("500ms"), Ok(ms(500)));
        assert_eq!(parse("2s"), Ok(ms(2_000)));
        assert_eq!(parse("1m"), Ok(ms(60_000)));
        assert_eq!(parse("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse("1h2m3s4ms"), Ok(ms(3_723_004)));
        assert_eq!(parse("0s"), Ok(ms(0)));
        assert_eq!(parse(" 10s "), Ok(ms(10_000)));
    }

    #[test]
    fn bare_integer_is_seconds() {
        assert_eq!(parse("10"), Ok(ms(10_000)));
        assert_eq!(parse("0"), Ok(ms(0)));
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("   "), Err(DurationError::Empty));
        assert_eq!(parse("s"), Err(DurationError::ExpectedNumber("s".into())));
        assert_eq!(
            parse("-5s"),
            Err(DurationError::ExpectedNumber("-5s".into()))
        );
        assert_eq!(parse("1.5s"), Err(DurationError::Fraction));
        assert_eq!(parse("1m30"), Err(DurationError::MissingUnit("30".into())));
        assert_eq!(parse("5d"), Err(DurationError::UnknownUnit("d".into())));
        assert_eq!(parse("2sec"), Err(DurationError::UnknownUnit("sec".into())));
        assert_eq!(parse("30s1m"), Err(DurationError::Order));
        assert_eq!(parse("1s1s"), Err(DurationError::Order));
        assert_eq!(
            parse("1s 2ms"),
            Err(DurationError::ExpectedNumber(" 2ms".into()))
        );
        assert_eq!(parse("99999999999999999999h"), Err(DurationError::Overflow));
        assert_eq!(parse("9999999999999999h"), Err(DurationError::Overflow));
        assert_eq!(parse("99999999999999999"), Err(DurationError::Overflow));
    }

    #[test]
    fn formats_shortest() {
        assert_eq!(format(ms(0)), "0s");
        assert_eq!(format(ms(500)), "500ms");
        assert_eq!(format(ms(1_000)), "1s");
        assert_eq!(format(ms(1_500)), "1500ms");
        assert_eq!(format(ms(60_000)), "1m");
        assert_eq!(format(ms(90_000)), "90s");
        assert_eq!(format(ms(150_000)), "150s");
        assert_eq!(format(ms(3_600_000)), "1h");
        assert_eq!(format(ms(3_660_000)), "61m");
        assert_eq!(format(ms(3_723_004)), "3723s4ms");
        assert_eq!(format(ms(36_000_000)), "10h");
        assert_eq!(format(Duration::from_micros(2_000_900)), "2s");
    }

    #[test]
    fn format_then_parse_is_identity() {
        for n in [
            0, 1, 999, 1_000, 1_001, 59_999, 60_000, 61_000, 3_599_999, 3_600_001, 86_400_000,
        ] {
            assert_eq!(parse(&format(ms(n))), Ok(ms(n)), "{n} ms");
        }
    }
}

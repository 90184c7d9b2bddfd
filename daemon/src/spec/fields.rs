//! Field deserializers that give people's words for bad values ("expected a non-negative
//! integer, found -1") instead of serde's ("invalid value: integer `-1`, expected u32").
//!
//! Every error is raised inside a visitor method, while the YAML deserializer still holds
//! the offending value, so it attaches that value's line and column.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::API_VERSION;

/// Integer types read with [`int`] and [`opt_int`].
pub(super) trait Int: Sized + TryFrom<i128> {
    /// Smallest accepted value.
    const MIN: i128;
    /// Largest accepted value.
    const MAX: i128;
}

impl Int for u16 {
    const MIN: i128 = 0;
    const MAX: i128 = u16::MAX as i128;
}

impl Int for u32 {
    const MIN: i128 = 0;
    const MAX: i128 = u32::MAX as i128;
}

impl Int for i32 {
    const MIN: i128 = i32::MIN as i128;
    const MAX: i128 = i32::MAX as i128;
}

/// `#[serde(deserialize_with = "fields::int")]`.
pub(super) fn int<'de, D: Deserializer<'de>, T: Int>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_any(IntVisitor(PhantomData))
}

/// `#[serde(default, deserialize_with = "fields::opt_int")]`: absent or `null` is `None`.
pub(super) fn opt_int<'de, D: Deserializer<'de>, T: Int>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    deserializer.deserialize_option(OptIntVisitor(PhantomData))
}

fn expected<T: Int>() -> &'static str {
    if T::MIN == 0 {
        "a non-negative integer"
    } else {
        "an integer"
    }
}

struct IntVisitor<T>(PhantomData<T>);

impl<T: Int> IntVisitor<T> {
    fn found<E: de::Error>(found: impl fmt::Display) -> E {
        E::custom(format!("expected {}, found {found}", expected::<T>()))
    }

    fn check<E: de::Error>(v: i128) -> Result<T, E> {
        T::try_from(v).map_err(|_| {
            if T::MIN == 0 && v < 0 {
                Self::found(v)
            } else {
                E::custom(format!(
                    "expected an integer between {} and {}, found {v}",
                    T::MIN,
                    T::MAX
                ))
            }
        })
    }
}

impl<'de, T: Int> Visitor<'de> for IntVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(expected::<T>())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Self::check(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Self::check(i128::from(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
        Self::check(v)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
        Self::check(i128::try_from(v).unwrap_or(i128::MAX))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        Err(Self::found(v))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        Err(Self::found(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Err(Self::found(format_args!("{v:?}")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Err(Self::found("null"))
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Err(Self::found("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<T, A::Error> {
        Err(Self::found("a sequence"))
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<T, A::Error> {
        Err(Self::found("a mapping"))
    }
}

struct OptIntVisitor<T>(PhantomData<T>);

impl<'de, T: Int> Visitor<'de> for OptIntVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(expected::<T>())
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        int(deserializer).map(Some)
    }
}

/// The `apiVersion` field: only [`API_VERSION`] deserializes.
#[derive(Debug)]
pub(super) struct ApiVersion;

impl<'de> de::Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ApiVersionVisitor)
    }
}

struct ApiVersionVisitor;

impl Visitor<'_> for ApiVersionVisitor {
    type Value = ApiVersion;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the string {API_VERSION:?}")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ApiVersion, E> {
        if v == API_VERSION {
            Ok(ApiVersion)
        } else {
            Err(E::custom(format!(
                "unsupported apiVersion {v:?}, expected {API_VERSION:?}"
            )))
        }
    }
}

/// A mapping key read as text (`8080:` gives "8080"); keys that are sequences or
/// mappings read as `None`. Used where keys are compared with path segments.
pub(super) struct KeyText(pub(super) Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyTextVisitor)
    }
}

struct KeyTextVisitor;

impl KeyTextVisitor {
    fn text<E>(v: impl fmt::Display) -> Result<KeyText, E> {
        Ok(KeyText(Some(v.to_string())))
    }
}

impl<'de> Visitor<'de> for KeyTextVisitor {
    type Value = KeyText;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
        Self::text(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
        Self::text("null")
    }

    fn visit_none<E: de::Error>(self) -> Result<KeyText, E> {
        Self::text("null")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KeyText(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(KeyText(None))
    }
}

//! Finds the line and column of a value in the source text, for problems found after
//! deserialization (a duplicate port name, an unknown provider).
//!
//! serde_yaml_ng does not expose positions of values that deserialized fine, but it does
//! attach the position of the current event to every error. So the locator walks a
//! document along a [`FieldPath`] with serde and, on reaching the target, fails with a
//! marker error whose [`location`](serde_yaml_ng::Error::location) is the answer.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

use super::fields::KeyText;
use super::path::{FieldPath, Seg};

/// A 1-based position in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    /// Line, 1-based.
    pub(super) line: usize,
    /// Column, 1-based.
    pub(super) column: usize,
}

impl Location {
    /// The position serde_yaml_ng attached to `err`, if any.
    pub(super) fn of(err: &serde_yaml_ng::Error) -> Option<Self> {
        err.location().map(|l| Self {
            line: l.line(),
            column: l.column(),
        })
    }
}

/// The error message that means "found it". The NUL keeps it from matching anything a
/// document could make serde_yaml_ng say.
const MARKER: &str = "\u{0}skymirror-locator-found";

/// Positions of `requests`, each a 1-based document index and a path in that document;
/// `None` where the path does not exist (or the document does not).
///
/// One walk can find one path, and a document can only be walked by re-reading the text,
/// so this reads the text once per round, each round locating at most one path per
/// document.
pub(super) fn locate_all(content: &str, requests: &[(usize, &FieldPath)]) -> Vec<Option<Location>> {
    let mut results = vec![None; requests.len()];
    let mut by_document: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, (document, _)) in requests.iter().enumerate() {
        by_document.entry(*document).or_default().push(i);
    }
    let rounds = by_document.values().map(Vec::len).max().unwrap_or(0);
    let last = by_document.keys().next_back().copied().unwrap_or(0);
    for round in 0..rounds {
        // `take` also stops before any document past the last one asked for, so a
        // syntax error further on (after which the iterator repeats forever) is never read.
        for (i, document) in serde_yaml_ng::Deserializer::from_str(content)
            .enumerate()
            .take(last)
        {
            let Some(&request) = by_document.get(&(i + 1)).and_then(|r| r.get(round)) else {
                continue;
            };
            if let (Some(slot), Some((_, path))) = (results.get_mut(request), requests.get(request))
            {
                *slot = locate(document, path);
            }
        }
    }
    results
}

/// Position of the value at `path` in one document.
fn locate(document: serde_yaml_ng::Deserializer<'_>, path: &FieldPath) -> Option<Location> {
    match Seek(path.segments()).deserialize(document) {
        Err(err) if err.to_string().contains(MARKER) => Location::of(&err),
        _ => None,
    }
}

/// Walks to the value at the remaining path and fails there with [`MARKER`]; succeeds
/// (finding nothing) when the path leads nowhere.
struct Seek<'p>(&'p [Seg]);

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Seek<'_> {
    /// Reached the target, or ran into a scalar with path left (not found).
    fn leaf<E: de::Error>(self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(MARKER))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.leaf()
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.leaf()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        // A tagged value (`!tag ...`): it can be the target but is never walked into.
        self.leaf()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (first, rest) = match self.0.split_first() {
            None => return Err(de::Error::custom(MARKER)),
            Some((Seg::Index(index), rest)) => (*index, rest),
            Some((Seg::Key(_), _)) => return Ok(()),
        };
        for _ in 0..first {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Seek(rest)).map(|_| ())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (wanted, rest) = match self.0.split_first() {
            None => return Err(de::Error::custom(MARKER)),
            Some((Seg::Key(key), rest)) => (key, rest),
            Some((Seg::Index(_), _)) => return Ok(()),
        };
        while let Some(KeyText(key)) = map.next_key()? {
            if key.as_ref() == Some(wanted) {
                return map.next_value_seed(Seek(rest));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: hello}
spec:
  replicas: 2
  ports:
    - name: http
    - {name: admin, containerPort: 9000}
  env:
    8080: x
---
# an empty document
---
kind: Provider
spec:
  driver: process
";

    fn at(document: usize, path: &FieldPath) -> Option<(usize, usize)> {
        locate_all(TEXT, &[(document, path)])[0].map(|l| (l.line, l.column))
    }

    #[test]
    fn finds_block_and_flow_values() {
        assert_eq!(at(1, &FieldPath::default()), Some((1, 1)));
        assert_eq!(at(1, &FieldPath::of(&["kind"])), Some((2, 7)));
        assert_eq!(at(1, &FieldPath::of(&["metadata", "name"])), Some((3, 18)));
        assert_eq!(at(1, &FieldPath::of(&["spec", "replicas"])), Some((5, 13)));
        assert_eq!(at(1, &FieldPath::of(&["spec"])), Some((5, 3)));
        let port = FieldPath::of(&["spec", "ports"]).index(1);
        assert_eq!(at(1, &port), Some((8, 7)));
        assert_eq!(at(1, &port.clone().key("containerPort")), Some((8, 36)));
        assert_eq!(
            at(1, &FieldPath::of(&["spec", "ports"]).index(0).key("name")),
            Some((7, 13))
        );
        assert_eq!(
            at(1, &FieldPath::of(&["spec", "env", "8080"])),
            Some((10, 11))
        );
    }

    #[test]
    fn later_documents_count_empty_ones() {
        assert_eq!(at(3, &FieldPath::default()), Some((14, 1)));
        assert_eq!(at(3, &FieldPath::of(&["spec", "driver"])), Some((16, 11)));
    }

    #[test]
    fn missing_paths_are_none() {
        assert_eq!(at(1, &FieldPath::of(&["spec", "nope"])), None);
        assert_eq!(at(1, &FieldPath::of(&["spec", "ports"]).index(5)), None);
        assert_eq!(at(1, &FieldPath::of(&["kind", "deeper"])), None);
        assert_eq!(at(1, &FieldPath::of(&["spec"]).index(0)), None);
        assert_eq!(at(2, &FieldPath::of(&["kind"])), None);
        assert_eq!(at(9, &FieldPath::default()), None);
    }

    #[test]
    fn several_requests_per_document() {
        let a = FieldPath::of(&["kind"]);
        let b = FieldPath::of(&["spec", "replicas"]);
        let c = FieldPath::of(&["spec", "driver"]);
        let found = locate_all(TEXT, &[(1, &a), (3, &c), (1, &b), (1, &a)]);
        let found: Vec<_> = found
            .into_iter()
            .map(|l| l.map(|l| (l.line, l.column)))
            .collect();
        assert_eq!(
            found,
            vec![Some((2, 7)), Some((16, 11)), Some((5, 13)), Some((2, 7))]
        );
    }

    #[test]
    fn stops_before_a_syntax_error() {
        let text = "a: 1\n---\nb: [\n";
        assert_eq!(
            locate_all(text, &[(1, &FieldPath::of(&["a"]))])[0],
            Some(Location { line: 1, column: 4 })
        );
        // The broken document is still walked as far as it goes.
        assert_eq!(
            locate_all(text, &[(2, &FieldPath::of(&["b"]))])[0],
            Some(Location { line: 3, column: 4 })
        );
        assert_eq!(locate_all(text, &[(3, &FieldPath::default())])[0], None);
    }
}

//! From YAML text to validated documents.
//!
//! serde_yaml_ng hands out each document of a stream once, so the text is read in passes:
//!
//! 1. **shape**: every document is read loosely, to find syntax errors, skip empty
//!    documents and learn each one's `kind`;
//! 2. **typed**: documents of a known kind are deserialized through
//!    `serde_path_to_error` into their typed shape (unknown fields, wrong types and missing
//!    fields fail here, with path and position), then checked by [`validate`];
//! 3. **locate**: the problems found after deserialization are placed in the text with
//!    [`locate_all`], which also finds where each document starts.
//!
//! A syntax error ends the reading: after one, the YAML parser cannot resynchronise.

use std::fmt::{self, Write as _};

use serde::Deserialize;
use serde::de::{self, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde_path_to_error::Segment;
use serde_yaml_ng::Deserializer as YamlDocuments;

use super::error::{SpecError, SpecErrors};
use super::fields::KeyText;
use super::locate::{Location, locate_all};
use super::path::{FieldPath, Issue};
use super::types::{App, AppSpec, AppSpecWire, Document, DocumentWire, Provider, ProviderSpec};
use super::{Kind, MAX_DOCUMENTS, MAX_SOURCE_BYTES, ParsedDocument, validate};

/// See [`super::parse_documents`].
pub(super) fn parse_documents(
    source: &str,
    content: &str,
) -> Result<Vec<ParsedDocument>, SpecErrors> {
    if content.len() > MAX_SOURCE_BYTES {
        return Err(SpecErrors(vec![SpecError::whole(
            source,
            format!(
                "file is {} bytes, over the {MAX_SOURCE_BYTES}-byte limit",
                content.len()
            ),
        )]));
    }
    let mut errors = Vec::new();
    let shapes = shapes(source, content, &mut errors);

    // Documents that deserialized, each either valid or with its problems.
    let mut checked: Vec<(usize, Result<Document, Vec<Issue>>)> = Vec::new();
    for (i, (yaml, shape)) in YamlDocuments::from_str(content).zip(shapes).enumerate() {
        let index = i + 1;
        let outcome = match shape {
            Shape::Empty => continue,
            Shape::Invalid(issue) => Err(vec![issue]),
            Shape::Kind(Kind::Provider) => match serde_path_to_error::deserialize(yaml) {
                Ok(wire) => provider(wire),
                Err(err) => {
                    errors.push(serde_error(source, index, &err));
                    continue;
                }
            },
            Shape::Kind(Kind::App) => match serde_path_to_error::deserialize(yaml) {
                Ok(wire) => app(wire),
                Err(err) => {
                    errors.push(serde_error(source, index, &err));
                    continue;
                }
            },
        };
        checked.push((index, outcome));
    }

    let root = FieldPath::default();
    let found = {
        let mut requests = Vec::new();
        for (index, outcome) in &checked {
            requests.push((*index, &root));
            if let Err(issues) = outcome {
                requests.extend(issues.iter().map(|issue| (*index, &issue.path)));
            }
        }
        locate_all(content, &requests)
    };
    let mut found = found.into_iter();
    let mut documents = Vec::new();
    for (index, outcome) in checked {
        let start = found.next().flatten();
        match outcome {
            Ok(document) => documents.push(ParsedDocument {
                index,
                line: start.map_or(1, |l| l.line),
                document,
            }),
            Err(issues) => {
                for issue in issues {
                    let at = found.next().flatten().or(start);
                    errors.push(issue_error(source, index, at, issue));
                }
            }
        }
    }

    if errors.is_empty() && documents.is_empty() {
        errors.push(SpecError::whole(source, "no documents"));
    }
    if errors.is_empty() {
        Ok(documents)
    } else {
        errors.sort_by_key(|e| (e.document.unwrap_or(usize::MAX), e.line, e.column));
        Err(SpecErrors(errors))
    }
}

/// An [`Issue`] in document `index`, placed at `at`.
pub(super) fn issue_error(
    source: &str,
    index: usize,
    at: Option<Location>,
    issue: Issue,
) -> SpecError {
    SpecError {
        source: source.to_owned(),
        document: Some(index),
        line: at.map(|l| l.line),
        column: at.map(|l| l.column),
        path: issue.path.display(),
        message: issue.message,
    }
}

fn provider(wire: DocumentWire<ProviderSpec>) -> Result<Document, Vec<Issue>> {
    let provider = Provider {
        metadata: wire.metadata,
        spec: wire.spec,
    };
    let issues = validate::provider(&provider);
    if issues.is_empty() {
        Ok(Document::Provider(provider))
    } else {
        Err(issues)
    }
}

fn app(wire: DocumentWire<AppSpecWire>) -> Result<Document, Vec<Issue>> {
    let spec = AppSpec::try_from(wire.spec).map_err(|issue| vec![issue.under("spec")])?;
    let app = App {
        metadata: wire.metadata,
        spec,
    };
    let issues = validate::app(&app);
    if issues.is_empty() {
        Ok(Document::App(app))
    } else {
        Err(issues)
    }
}

/// What the first pass learned about one document.
enum Shape {
    /// Nothing but comments or `null`: skipped.
    Empty,
    /// A mapping of this kind.
    Kind(Kind),
    /// Not something the typed pass can read.
    Invalid(Issue),
}

/// Reads every document loosely. Stops at the first syntax error and after
/// [`MAX_DOCUMENTS`] non-empty documents, recording an error in both cases; the
/// documents before are returned.
fn shapes(source: &str, content: &str, errors: &mut Vec<SpecError>) -> Vec<Shape> {
    let mut shapes = Vec::new();
    let mut non_empty = 0;
    for (i, yaml) in YamlDocuments::from_str(content).enumerate() {
        let index = i + 1;
        let raw = match RawShape::deserialize(yaml) {
            Ok(raw) => raw,
            Err(err) => {
                let at = Location::of(&err);
                errors.push(SpecError {
                    source: source.to_owned(),
                    document: Some(index),
                    line: at.map(|l| l.line),
                    column: at.map(|l| l.column),
                    path: None,
                    message: format!("invalid YAML: {}", strip_position(&err.to_string(), at)),
                });
                break;
            }
        };
        let shape = raw.classify();
        if !matches!(shape, Shape::Empty) {
            non_empty += 1;
            if non_empty > MAX_DOCUMENTS {
                errors.push(SpecError {
                    document: Some(index),
                    ..SpecError::whole(
                        source,
                        format!("too many documents: at most {MAX_DOCUMENTS} are allowed"),
                    )
                });
                break;
            }
        }
        shapes.push(shape);
    }
    shapes
}

/// A document as the first pass sees it.
enum RawShape {
    Empty,
    Mapping { kind: Option<serde_yaml_ng::Value> },
    Other(&'static str),
}

impl RawShape {
    fn classify(self) -> Shape {
        let kinds = || Kind::ALL.map(Kind::as_str).join(", ");
        match self {
            Self::Empty => Shape::Empty,
            Self::Other(found) => Shape::Invalid(Issue::new(
                FieldPath::default(),
                format!(
                    "expected a mapping with apiVersion, kind, metadata and spec, found {found}"
                ),
            )),
            Self::Mapping { kind: None } => Shape::Invalid(Issue::new(
                FieldPath::default(),
                format!("missing field `kind` (one of: {})", kinds()),
            )),
            Self::Mapping {
                kind: Some(serde_yaml_ng::Value::String(name)),
            } => match Kind::ALL.into_iter().find(|k| k.as_str() == name) {
                Some(kind) => Shape::Kind(kind),
                None => Shape::Invalid(Issue::new(
                    FieldPath::of(&["kind"]),
                    format!("unknown kind {name:?}, expected one of: {}", kinds()),
                )),
            },
            Self::Mapping { kind: Some(_) } => Shape::Invalid(Issue::new(
                FieldPath::of(&["kind"]),
                format!("expected a string, one of: {}", kinds()),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for RawShape {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawShapeVisitor)
    }
}

/// Reads the whole document (so syntax errors anywhere in it surface), keeping only the
/// top-level `kind`.
struct RawShapeVisitor;

impl<'de> Visitor<'de> for RawShapeVisitor {
    type Value = RawShape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML document")
    }

    fn visit_unit<E: de::Error>(self) -> Result<RawShape, E> {
        Ok(RawShape::Empty)
    }

    fn visit_none<E: de::Error>(self) -> Result<RawShape, E> {
        Ok(RawShape::Empty)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawShape, E> {
        Ok(RawShape::Other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawShape, E> {
        Ok(RawShape::Other("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawShape, E> {
        Ok(RawShape::Other("a number"))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<RawShape, E> {
        Ok(RawShape::Other("a number"))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<RawShape, E> {
        Ok(RawShape::Other("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawShape, E> {
        Ok(RawShape::Other("a number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<RawShape, E> {
        Ok(RawShape::Other("a string"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawShape, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawShape::Other("a sequence"))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<RawShape, A::Error> {
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Ok(RawShape::Other("a tagged value"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawShape, A::Error> {
        let mut kind = None;
        while let Some(KeyText(key)) = map.next_key()? {
            if key.as_deref() == Some("kind") {
                kind = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(RawShape::Mapping { kind })
    }
}

/// A typed-pass failure: path from `serde_path_to_error`, position from serde_yaml_ng.
fn serde_error(
    source: &str,
    index: usize,
    err: &serde_path_to_error::Error<serde_yaml_ng::Error>,
) -> SpecError {
    let inner = err.inner();
    let at = Location::of(inner);
    let path = err.path();
    let message = strip_position(&inner.to_string(), at);
    SpecError {
        source: source.to_owned(),
        document: Some(index),
        line: at.map(|l| l.line),
        column: at.map(|l| l.column),
        path: Some(path.to_string()).filter(|p| p != "."),
        message: strip_path(&message, path).to_owned(),
    }
}

/// serde_yaml_ng's messages end with (or, for syntax errors, contain) " at line L column
/// C"; [`SpecError`] carries the position separately.
fn strip_position(message: &str, at: Option<Location>) -> String {
    match at {
        Some(l) => message.replacen(&format!(" at line {} column {}", l.line, l.column), "", 1),
        None => message.to_owned(),
    }
}

/// serde_yaml_ng's messages start with its own path to the value, which is the path
/// `serde_path_to_error` found or a prefix of it (for an unknown field, the mapping).
fn strip_path<'m>(message: &'m str, path: &serde_path_to_error::Path) -> &'m str {
    let mut prefixes = Vec::new();
    let mut text = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(text, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Segment::Unknown => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push('?');
            }
        }
        prefixes.push(text.clone());
    }
    prefixes
        .iter()
        .rev()
        .find_map(|prefix| message.strip_prefix(prefix.as_str())?.strip_prefix(": "))
        .unwrap_or(message)
}

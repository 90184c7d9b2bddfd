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
use super::types::{
    App, AppSpec, AppSpecWire, Document, DocumentWire, Provider, ProviderSpec, ProviderSpecWire,
};
use super::{Kind, MAX_DOCUMENTS, MAX_FLOW_DEPTH, MAX_SOURCE_BYTES, ParsedDocument, validate};

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
    if let Some(e) = too_deep(source, content) {
        return Err(SpecErrors(vec![e]));
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

/// Where flow collections nest deeper than [`MAX_FLOW_DEPTH`], if they do.
///
/// A conservative scan of the text, not a YAML parser: it follows quotes
/// and comments, skips the content of block scalars (`|`, `>`), and in block
/// context counts only a `[` or `{` that starts a value. It may count a
/// bracket YAML would read as text, never miss one that nests.
fn too_deep(source: &str, content: &str) -> Option<SpecError> {
    let mut depth = 0usize;
    let mut document = 1usize;
    let mut seen_content = false;
    // Indentation under which a block scalar's lines are text.
    let mut block_scalar: Option<usize> = None;
    for (n, line) in content.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let trimmed = line.trim();
        if let Some(parent) = block_scalar {
            if trimmed.is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        if depth == 0 && (line.starts_with("---") || line.starts_with("...")) {
            if seen_content {
                document += 1;
                seen_content = false;
            }
            continue;
        }
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            seen_content = true;
        }
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for (column, c) in line.chars().enumerate() {
            match quote {
                Some(q) => {
                    if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '#' if previous.is_whitespace() => break,
                    '"' | '\'' if depth > 0 || matches!(previous, ' ' | ':' | '-') => {
                        quote = Some(c);
                    }
                    '[' | '{' if depth > 0 || matches!(previous, ' ' | ':' | '-' | '?') => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Some(SpecError {
                                source: source.to_owned(),
                                document: Some(document),
                                line: Some(n + 1),
                                column: Some(column + 1),
                                path: None,
                                message: format!(
                                    "collections nest deeper than {MAX_FLOW_DEPTH} levels"
                                ),
                            });
                        }
                    }
                    ']' | '}' if depth > 0 => depth -= 1,
                    _ => {}
                },
            }
            previous = c;
        }
        let value_end = trimmed.split(" #").next().unwrap_or("").trim_end();
        if depth == 0
            && quote.is_none()
            && (value_end.ends_with('|')
                || value_end.ends_with('>')
                || value_end.ends_with("|-")
                || value_end.ends_with(">-")
                || value_end.ends_with("|+")
                || value_end.ends_with(">+"))
        {
            block_scalar = Some(indent);
        }
    }
    None
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

fn provider(wire: DocumentWire<ProviderSpecWire>) -> Result<Document, Vec<Issue>> {
    let spec = ProviderSpec::try_from(wire.spec).map_err(|issue| vec![issue.under("spec")])?;
    let provider = Provider {
        metadata: wire.metadata,
        spec,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::super::*;

    const FULL: &str = "\
# skymirror example
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: local-a, labels: {cloud: local}}
spec: {driver: process, priority: 10, capacity: 100, description: \"laptop\"}
---
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: hello}
spec:
  image: example/hello:1
  command: skymirror-example
  args: [\"--message\", \"hi\"]
  env: {GREETING: hello}
  workingDir: /tmp
  ports: [{name: http, containerPort: 8080, protocol: tcp}]
  resources: {cpuMillis: 500, memoryMiB: 128}
  stopGracePeriod: 10s
  replicas: 2
  placement:
    mode: mirror
    standbyReplicas: 0
    providers:
      - name: local-a
        weight: 1
        priority: 10
      - selector: {cloud: aws}
  health:
    http: {path: /healthz, port: http}
    interval: 2s
    timeout: 1s
    failureThreshold: 3
    successThreshold: 1
  failover: {spill: true, maxExtraReplicas: 0, failbackAfter: 30s, singleton: false}
  routing: {listen: \"127.0.0.1:8080\", hosts: [hello.local], port: http, protocol: http}
---
";

    /// An App document whose `spec:` is followed by `spec` (lines from 6 on).
    fn app(spec: &str) -> String {
        format!("apiVersion: skymirror.dev/v1\nkind: App\nmetadata:\n  name: hello\nspec:\n{spec}")
    }

    fn errors(content: &str) -> Vec<String> {
        match parse_documents("t.yaml", content) {
            Ok(docs) => panic!("expected errors, parsed {docs:?}"),
            Err(errs) => errs.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn error(content: &str) -> String {
        let errs = errors(content);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs.into_iter().next().unwrap_or_default()
    }

    fn parse_app(content: &str) -> App {
        let docs = parse_documents("t.yaml", content).unwrap();
        match &docs[0].document {
            Document::App(app) => app.clone(),
            other => panic!("not an app: {other:?}"),
        }
    }

    #[test]
    fn parses_the_full_example() {
        let docs = parse_documents("t.yaml", FULL).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].index, docs[0].line), (1, 2));
        assert_eq!((docs[1].index, docs[1].line), (2, 7));
        let Document::Provider(p) = &docs[0].document else {
            panic!()
        };
        assert_eq!(
            p.metadata.labels.get("cloud").map(String::as_str),
            Some("local")
        );
        assert_eq!(p.spec.driver, DriverKind::Process);
        assert_eq!((p.spec.priority, p.spec.capacity), (10, 100));
        let Document::App(a) = &docs[1].document else {
            panic!()
        };
        assert_eq!(docs[1].document.kind(), Kind::App);
        assert_eq!(docs[1].document.name(), "hello");
        let w = &a.spec.workload;
        assert_eq!(w.image.as_deref(), Some("example/hello:1"));
        assert_eq!(w.args, ["--message", "hi"]);
        assert_eq!(w.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(w.ports[0].container_port, Some(8080));
        assert_eq!(w.resources.memory_mib, Some(128));
        assert_eq!(a.spec.replicas, 2);
        assert_eq!(a.spec.placement.providers.len(), 2);
        assert_eq!(a.spec.placement.providers[0].priority, Some(10));
        assert_eq!(a.spec.placement.providers[1].weight, 1);
        let health = a.spec.health.as_ref().unwrap();
        assert_eq!(
            health.probe,
            Probe::Http {
                path: "/healthz".into(),
                port: "http".into()
            }
        );
        let routing = a.spec.routing.as_ref().unwrap();
        assert_eq!(routing.hosts, ["hello.local"]);
        assert_eq!(routing.protocol, RoutingProtocol::Http);
    }

    #[test]
    fn to_yaml_round_trips() {
        let docs = parse_documents("t.yaml", FULL).unwrap();
        let text: Vec<String> = docs.iter().map(|d| d.document.to_yaml()).collect();
        let again = parse_documents("again.yaml", &text.join("---\n")).unwrap();
        let first: Vec<_> = docs.into_iter().map(|d| d.document).collect();
        let second: Vec<_> = again.into_iter().map(|d| d.document).collect();
        assert_eq!(first, second);
        assert!(
            text[1].starts_with("apiVersion: skymirror.dev/v1\nkind: App\n"),
            "{}",
            text[1]
        );
    }

    #[test]
    fn documents_round_trip_through_json() {
        let docs = parse_documents("t.yaml", FULL).unwrap();
        for doc in docs {
            let json = serde_json::to_string(&doc.document).unwrap();
            let back: Document = serde_json::from_str(&json).unwrap();
            assert_eq!(back, doc.document);
        }
    }

    #[test]
    fn generic_deserialize_validates() {
        let bad = app("  command: x\n  replicas: 1\n  ports: [{name: a}, {name: a}]\n");
        let err = serde_yaml_ng::from_str::<Document>(&bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.ports[1].name: duplicate port name"),
            "{err}"
        );
        let bad = app("  command: x\n  replicas: 1\n  health: {interval: 1s}\n");
        let err = serde_yaml_ng::from_str::<Document>(&bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("health: set one of `http`, `tcp` or `exec`"),
            "{err}"
        );
    }

    #[test]
    fn defaults() {
        let a = parse_app(&app(
            "  command: run\n  replicas: 0\n  ports: [{name: http}]\n  placement: {providers: [{name: a}]}\n  health: {tcp: {port: http}}\n",
        ));
        assert_eq!(a.spec.replicas, 0);
        let w = &a.spec.workload;
        assert_eq!(w.image, None);
        assert_eq!(w.stop_grace_period, Duration::from_secs(10));
        assert_eq!(w.ports[0].protocol, Protocol::Tcp);
        assert_eq!(w.ports[0].container_port, None);
        assert_eq!(a.spec.placement.mode, PlacementMode::Mirror);
        assert_eq!(a.spec.placement.providers[0].weight, 1);
        assert_eq!(a.spec.placement.standby_replicas, 0);
        assert_eq!(
            a.spec.health,
            Some(HealthCheck::new(Probe::Tcp {
                port: "http".into()
            }))
        );
        assert_eq!(
            a.spec.health.as_ref().map(|h| h.interval),
            Some(Duration::from_secs(2))
        );
        assert_eq!(a.spec.failover, FailoverPolicy::default());
        assert!(a.spec.failover.spill);
        assert_eq!(a.spec.failover.failback_after, Duration::from_secs(30));
        assert_eq!(a.spec.routing, None);

        let docs = parse_documents("t.yaml", "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {name: p}\nspec: {driver: ec2}\n").unwrap();
        let Document::Provider(p) = &docs[0].document else {
            panic!()
        };
        assert_eq!(
            (
                p.spec.priority,
                p.spec.capacity,
                p.spec.description.as_str()
            ),
            (0, 0, "")
        );
    }

    #[test]
    fn durations_accept_integers_as_seconds() {
        let a = parse_app(&app(
            "  command: run\n  replicas: 1\n  stopGracePeriod: 15\n  failover: {failbackAfter: 1m30s}\n",
        ));
        assert_eq!(a.spec.workload.stop_grace_period, Duration::from_secs(15));
        assert_eq!(a.spec.failover.failback_after, Duration::from_secs(90));
    }

    #[test]
    fn syntax_error() {
        assert_eq!(
            error("apiVersion: skymirror.dev/v1\nkind: App\nmetadata: {name: x\nspec: {}\n"),
            "t.yaml: document 1, line 4, column 5: invalid YAML: did not find expected ',' or '}', while parsing a flow mapping at line 3 column 11"
        );
    }

    #[test]
    fn syntax_error_in_a_later_document_keeps_earlier_errors() {
        let text = format!("{}---\na: [\n", app("  replicas: -1\n  command: x\n"));
        assert_eq!(
            errors(&text),
            [
                "t.yaml: document 1, line 6, column 13: spec.replicas: expected a non-negative integer, found -1",
                "t.yaml: document 2, line 10, column 1: invalid YAML: did not find expected node content, while parsing a flow node",
            ]
        );
    }

    #[test]
    fn unknown_field() {
        assert_eq!(
            error(&app("  command: x\n  replica: 2\n")),
            "t.yaml: document 1, line 7, column 3: spec.replica: unknown field `replica`, expected one of `image`, `command`, `args`, `env`, `workingDir`, `ports`, `resources`, `stopGracePeriod`, `replicas`, `placement`, `health`, `failover`, `routing`"
        );
        assert_eq!(
            error(&app(
                "  command: x\n  replicas: 2\n  placement:\n    providers:\n      - name: a\n      - nmae: b\n"
            )),
            "t.yaml: document 1, line 11, column 9: spec.placement.providers[1].nmae: unknown field `nmae`, expected one of `name`, `selector`, `weight`, `priority`"
        );
    }

    #[test]
    fn wrong_types() {
        assert_eq!(
            error(&app("  command: x\n  replicas: -1\n")),
            "t.yaml: document 1, line 7, column 13: spec.replicas: expected a non-negative integer, found -1"
        );
        assert_eq!(
            error(&app("  command: x\n  replicas: two\n")),
            "t.yaml: document 1, line 7, column 13: spec.replicas: expected a non-negative integer, found \"two\""
        );
        assert_eq!(
            error(&app("  command: x\n  replicas: 1.5\n")),
            "t.yaml: document 1, line 7, column 13: spec.replicas: expected a non-negative integer, found 1.5"
        );
        assert_eq!(
            error(&app(
                "  command: x\n  replicas: 1\n  ports: [{name: a, containerPort: 70000}]\n"
            )),
            "t.yaml: document 1, line 8, column 36: spec.ports[0].containerPort: expected an integer between 0 and 65535, found 70000"
        );
        assert_eq!(
            error(&app("  command: x\n  replicas: 1\n  args: x\n")),
            "t.yaml: document 1, line 8, column 9: spec.args: invalid type: string \"x\", expected a sequence"
        );
        assert_eq!(
            error(&app("  command: x\n  replicas: 1\n  stopGracePeriod: 5x\n")),
            "t.yaml: document 1, line 8, column 20: spec.stopGracePeriod: invalid duration \"5x\": unknown unit `x` (use h, m, s or ms)"
        );
        assert_eq!(
            error(&app(
                "  command: x\n  replicas: 1\n  placement: {mode: active}\n"
            )),
            "t.yaml: document 1, line 8, column 21: spec.placement.mode: unknown variant `active`, expected one of `mirror`, `active-passive`, `spread`"
        );
    }

    #[test]
    fn missing_required_fields() {
        assert_eq!(
            error(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {name: p}\nspec:\n  priority: 1\n"
            ),
            "t.yaml: document 1, line 5, column 3: spec: missing field `driver`"
        );
        assert_eq!(
            error(&app("  command: x\n")),
            "t.yaml: document 1, line 6, column 3: spec: missing field `replicas`"
        );
        assert_eq!(
            error("apiVersion: skymirror.dev/v1\nkind: App\nmetadata: {name: x}\n"),
            "t.yaml: document 1, line 1, column 1: missing field `spec`"
        );
        assert_eq!(
            error("apiVersion: skymirror.dev/v1\nkind: App\nmetadata: {labels: {}}\nspec: {}\n"),
            "t.yaml: document 1, line 3, column 11: metadata: missing field `name`"
        );
        assert_eq!(
            error("kind: App\nmetadata: {name: x}\nspec: {command: x, replicas: 1}\n"),
            "t.yaml: document 1, line 1, column 1: missing field `apiVersion`"
        );
    }

    #[test]
    fn api_version_and_kind() {
        assert_eq!(
            error("apiVersion: v2\nkind: App\nmetadata: {name: x}\nspec: {}\n"),
            "t.yaml: document 1, line 1, column 13: apiVersion: unsupported apiVersion \"v2\", expected \"skymirror.dev/v1\""
        );
        assert_eq!(
            error("apiVersion: skymirror.dev/v1\nkind: Deployment\n"),
            "t.yaml: document 1, line 2, column 7: kind: unknown kind \"Deployment\", expected one of: Provider, App"
        );
        assert_eq!(
            error("apiVersion: skymirror.dev/v1\nkind: [App]\n"),
            "t.yaml: document 1, line 2, column 7: kind: expected a string, one of: Provider, App"
        );
        assert_eq!(
            error("apiVersion: skymirror.dev/v1\nmetadata: {name: x}\n"),
            "t.yaml: document 1, line 1, column 1: missing field `kind` (one of: Provider, App)"
        );
        assert_eq!(
            error("\n- a\n- b\n"),
            "t.yaml: document 1, line 2, column 1: expected a mapping with apiVersion, kind, metadata and spec, found a sequence"
        );
    }

    #[test]
    fn replicas_limit() {
        assert_eq!(
            error(&app("  command: x\n  replicas: 1001\n")),
            "t.yaml: document 1, line 7, column 13: spec.replicas: must be at most 1000, found 1001"
        );
    }

    #[test]
    fn names_and_labels() {
        let doc = |meta: &str| {
            format!(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata:\n{meta}spec: {{driver: docker}}\n"
            )
        };
        assert_eq!(
            error(&doc("  name: Local_A\n")),
            "t.yaml: document 1, line 4, column 9: metadata.name: \"Local_A\" contains 'L': names are 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
        assert_eq!(
            error(&doc("  name: -a\n")),
            "t.yaml: document 1, line 4, column 9: metadata.name: \"-a\" starts or ends with '-': names are 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
        assert_eq!(
            error(&doc(&format!("  name: {}\n", "a".repeat(64)))),
            "t.yaml: document 1, line 4, column 9: metadata.name: is 64 characters long: names are 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
        assert_eq!(
            error(&doc("  name: \"\"\n")),
            "t.yaml: document 1, line 4, column 9: metadata.name: must not be empty: names are 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
        assert_eq!(
            errors(&doc(&format!("  name: a\n  labels:\n    cloud: \"\"\n    {}: x\n", "k".repeat(64)))),
            [
                "t.yaml: document 1, line 6, column 12: metadata.labels.cloud: label values must not be empty",
                format!("t.yaml: document 1, line 7, column 71: metadata.labels.{}: label key is 64 characters long, at most 63 are allowed", "k".repeat(64)).as_str(),
            ]
        );
    }

    #[test]
    fn workload_checks() {
        assert_eq!(
            error(&app("  replicas: 1\n")),
            "t.yaml: document 1, line 6, column 3: spec: at least one of `image` or `command` is required"
        );
        assert_eq!(
            errors(&app(
                "  command: x\n  replicas: 1\n  env: {1BAD: x, GOOD_1: y}\n  ports:\n    - {name: http, containerPort: 0}\n    - {name: HTTP}\n    - {name: http}\n    - {name: a-very-long-port-name}\n"
            )),
            [
                "t.yaml: document 1, line 8, column 15: spec.env.1BAD: invalid environment variable name \"1BAD\": use letters, digits and '_', not starting with a digit",
                "t.yaml: document 1, line 10, column 35: spec.ports[0].containerPort: must be between 1 and 65535, found 0",
                "t.yaml: document 1, line 11, column 14: spec.ports[1].name: invalid port name \"HTTP\": use 1 to 15 lowercase letters, digits and '-'",
                "t.yaml: document 1, line 12, column 14: spec.ports[2].name: duplicate port name \"http\": already used by spec.ports[0]",
                "t.yaml: document 1, line 13, column 14: spec.ports[3].name: invalid port name \"a-very-long-port-name\": use 1 to 15 lowercase letters, digits and '-'",
            ]
        );
        assert_eq!(
            error(&app(
                "  command: x\n  replicas: 1\n  stopGracePeriod: 1500ms\n"
            )),
            "t.yaml: document 1, line 8, column 20: spec.stopGracePeriod: must be a whole number of seconds, found 1500ms"
        );
    }

    #[test]
    fn health_checks() {
        let base = "  command: x\n  replicas: 1\n  ports: [{name: http}]\n  health:\n";
        assert_eq!(
            error(&app(&format!("{base}    interval: 1s\n"))),
            "t.yaml: document 1, line 10, column 5: spec.health: set one of `http`, `tcp` or `exec` to say how to probe"
        );
        assert_eq!(
            error(&app(&format!(
                "{base}    http: {{path: /, port: http}}\n    tcp: {{port: http}}\n"
            ))),
            "t.yaml: document 1, line 11, column 10: spec.health.tcp: only one of `http`, `tcp` or `exec` may be set"
        );
        assert_eq!(
            errors(&app(&format!(
                "{base}    http: {{path: healthz, port: web}}\n    interval: 1s\n    timeout: 2s\n    failureThreshold: 0\n"
            ))),
            [
                "t.yaml: document 1, line 10, column 18: spec.health.http.path: must start with '/', found \"healthz\"",
                "t.yaml: document 1, line 10, column 33: spec.health.http.port: unknown port \"web\": the app's ports are http",
                "t.yaml: document 1, line 12, column 14: spec.health.timeout: must not be longer than the interval (1s), found 2s",
                "t.yaml: document 1, line 13, column 23: spec.health.failureThreshold: must be at least 1",
            ]
        );
        assert_eq!(
            errors(&app(&format!(
                "{base}    exec: {{command: []}}\n    interval: 0s\n    successThreshold: 0\n"
            ))),
            [
                "t.yaml: document 1, line 10, column 21: spec.health.exec.command: must not be empty",
                "t.yaml: document 1, line 11, column 15: spec.health.interval: must be greater than 0",
                "t.yaml: document 1, line 12, column 23: spec.health.successThreshold: must be at least 1",
            ]
        );
        assert_eq!(
            error(&app(
                "  command: x\n  replicas: 1\n  health: {tcp: {port: http}}\n"
            )),
            "t.yaml: document 1, line 8, column 24: spec.health.tcp.port: unknown port \"http\": the app declares no ports (spec.ports)"
        );
    }

    #[test]
    fn placement_checks() {
        assert_eq!(
            errors(&app(
                "  command: x\n  replicas: 1\n  placement:\n    providers:\n      - {name: a, selector: {cloud: aws}}\n      - {weight: 2}\n      - name: b\n        weight: 0\n      - name: b\n      - selector: {cloud: \"\"}\n"
            )),
            [
                "t.yaml: document 1, line 10, column 9: spec.placement.providers[0]: set either `name` or `selector`, not both",
                "t.yaml: document 1, line 11, column 9: spec.placement.providers[1]: set either `name` or `selector`",
                "t.yaml: document 1, line 13, column 17: spec.placement.providers[2].weight: must be at least 1",
                "t.yaml: document 1, line 14, column 15: spec.placement.providers[3].name: provider \"b\" is already listed at spec.placement.providers[2]",
                "t.yaml: document 1, line 15, column 27: spec.placement.providers[4].selector.cloud: selector values must not be empty",
            ]
        );
    }

    #[test]
    fn routing_checks() {
        assert_eq!(
            errors(&app(
                "  command: x\n  replicas: 1\n  ports: [{name: http}]\n  routing: {listen: \"localhost:80\", port: web}\n"
            )),
            [
                "t.yaml: document 1, line 9, column 21: spec.routing.listen: invalid listen address \"localhost:80\": expected an IP address and port such as 127.0.0.1:8080",
                "t.yaml: document 1, line 9, column 43: spec.routing.port: unknown port \"web\": the app's ports are http",
            ]
        );
    }

    #[test]
    fn routing_front_door_settings() {
        let docs = parse_documents(
            "t.yaml",
            &app("  command: x\n  replicas: 1\n  ports: [{name: http}]\n  routing: {listen: \"127.0.0.1:80\", port: http, responseTimeout: 2500ms, hedge: false, upstreamProtocol: h2c}\n"),
        )
        .unwrap();
        let Document::App(a) = &docs[0].document else {
            panic!("an app");
        };
        let r = a.spec.routing.as_ref().unwrap();
        assert_eq!(r.response_timeout, Duration::from_millis(2500));
        assert!(!r.hedge);
        assert_eq!(r.upstream_protocol, UpstreamProtocol::H2c);
        // Defaults, and they are not written back out.
        let docs = parse_documents(
            "t.yaml",
            &app("  command: x\n  replicas: 1\n  ports: [{name: http}]\n  routing: {listen: \"127.0.0.1:80\", port: http}\n"),
        )
        .unwrap();
        let Document::App(a) = &docs[0].document else {
            panic!("an app");
        };
        let r = a.spec.routing.as_ref().unwrap();
        assert_eq!(r.response_timeout, Duration::from_secs(15));
        assert!(r.hedge);
        assert_eq!(r.upstream_protocol, UpstreamProtocol::Http1);
        let yaml = docs[0].document.to_yaml();
        assert!(
            !yaml.contains("hedge")
                && !yaml.contains("responseTimeout")
                && !yaml.contains("upstreamProtocol"),
            "{yaml}"
        );

        assert_eq!(
            errors(&app(
                "  command: x\n  replicas: 1\n  ports: [{name: http}]\n  routing: {listen: \"127.0.0.1:80\", port: http, responseTimeout: 50ms}\n"
            )),
            [
                "t.yaml: document 1, line 9, column 66: spec.routing.responseTimeout: must be between 100ms and 1h, found 50ms"
            ]
        );
        assert_eq!(
            errors(&app(
                "  command: x\n  replicas: 1\n  ports: [{name: db}]\n  routing:\n    listen: \"127.0.0.1:5432\"\n    port: db\n    protocol: tcp\n    upstreamProtocol: h2c\n    hedge: false\n"
            )),
            [
                "t.yaml: document 1, line 13, column 23: spec.routing.upstreamProtocol: applies to HTTP routing only; a tcp route forwards bytes as they come",
                "t.yaml: document 1, line 14, column 12: spec.routing.hedge: applies to HTTP routing only; a tcp route is never hedged",
            ]
        );
        assert_eq!(
            errors(&app(
                "  command: x\n  replicas: 1\n  ports: [{name: http}]\n  routing: {listen: \"127.0.0.1:80\", port: http, upstreamProtocol: h3}\n"
            ))
            .len(),
            1
        );
    }

    #[test]
    fn size_and_document_limits() {
        let big = format!("# {}\n", "x".repeat(MAX_SOURCE_BYTES));
        assert_eq!(
            error(&big),
            format!(
                "t.yaml: file is {} bytes, over the 1048576-byte limit",
                MAX_SOURCE_BYTES + 3
            )
        );
        let provider = |i: usize| {
            format!(
                "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {{name: p{i}}}\nspec: {{driver: process}}\n"
            )
        };
        let many: Vec<String> = (0..=MAX_DOCUMENTS).map(provider).collect();
        assert_eq!(
            error(&many.join("---\n")),
            "t.yaml: document 1001: too many documents: at most 1000 are allowed"
        );
        let enough: Vec<String> = (0..MAX_DOCUMENTS).map(provider).collect();
        assert_eq!(
            parse_documents("t.yaml", &enough.join("---\n---\n"))
                .unwrap()
                .len(),
            MAX_DOCUMENTS
        );
    }

    #[test]
    fn empty_documents_are_skipped() {
        let text = format!(
            "# header\n---\n---\n{}\n---\n# trailing\n",
            FULL.trim_end_matches("---\n")
        );
        let docs = parse_documents("t.yaml", &text).unwrap();
        assert_eq!(
            docs.iter().map(|d| (d.index, d.line)).collect::<Vec<_>>(),
            [(2, 5), (3, 10)]
        );
        assert_eq!(error(""), "t.yaml: no documents");
        assert_eq!(error("# only a comment\n"), "t.yaml: no documents");
        assert_eq!(error("---\n---\n"), "t.yaml: no documents");
    }

    #[test]
    fn errors_are_collected_across_documents() {
        let text = format!(
            "{}---\n{}---\napiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {{name: ok}}\nspec: {{driver: process}}\n---\n{}",
            app("  replicas: 1\n  command: x\n  bogus: 1\n"),
            app("  replicas: 1\n"),
            app("  command: y\n  replicas: 1\n  ports: [{name: a}, {name: a}]\n"),
        );
        assert_eq!(
            errors(&text),
            [
                "t.yaml: document 1, line 8, column 3: spec.bogus: unknown field `bogus`, expected one of `image`, `command`, `args`, `env`, `workingDir`, `ports`, `resources`, `stopGracePeriod`, `replicas`, `placement`, `health`, `failover`, `routing`",
                "t.yaml: document 2, line 15, column 3: spec: at least one of `image` or `command` is required",
                "t.yaml: document 4, line 29, column 29: spec.ports[1].name: duplicate port name \"a\": already used by spec.ports[0]",
            ]
        );
    }

    #[test]
    fn references() {
        let text = format!(
            "{}---\n{}---\n{}",
            app(
                "  command: x\n  replicas: 1\n  placement:\n    providers: [{name: local-a}, {name: far}, {selector: {a: b}}]\n"
            ),
            "apiVersion: skymirror.dev/v1\nkind: Provider\nmetadata: {name: local-a}\nspec: {driver: process}\n",
            app("  command: x\n  replicas: 1\n"),
        );
        let docs = parse_documents("t.yaml", &text).unwrap();
        let none = BTreeSet::new();
        let err = validate_references("t.yaml", &text, &docs, &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.yaml: document 3, line 19, column 9: metadata.name: duplicate App \"hello\": already defined in document 1\n\
             t.yaml: document 1, line 9, column 41: spec.placement.providers[1].name: unknown provider \"far\": not in this input and not applied before"
        );
        let known: BTreeSet<String> = ["far".to_owned()].into();
        let err = validate_references("t.yaml", &text, &docs[..2], &known);
        assert_eq!(err, Ok(()));
    }

    #[test]
    fn kind_from_str() {
        for (text, kind) in [
            ("app", Kind::App),
            ("Apps", Kind::App),
            ("PROVIDER", Kind::Provider),
            ("providers", Kind::Provider),
        ] {
            assert_eq!(text.parse::<Kind>(), Ok(kind));
        }
        assert_eq!(
            "pods".parse::<Kind>().unwrap_err().to_string(),
            "unknown kind `pods`, expected one of: Provider, App"
        );
        assert_eq!(Kind::App.to_string(), "App");
    }
}

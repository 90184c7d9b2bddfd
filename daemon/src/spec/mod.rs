//! Declarative specs: Kubernetes-style YAML documents (`apiVersion: skymirror.dev/v1`,
//! `kind`, `metadata`, `spec`) parsed into validated domain types, and those types
//! converted to and from the protobuf API types.
//!
//! Errors are for people: each [`SpecError`] names the source, the document (1-based),
//! the line and column, and the field path (`spec.placement.providers[1].name`).
//!
//! Layout:
//! - `types`: the domain types ([`Document`], [`App`], [`Provider`], ...) and their YAML
//!   shape;
//! - `parse`: [`parse_documents`], YAML text to documents, in passes over the text;
//! - `validate`: checks serde's types cannot express, and [`validate_references`]'s
//!   cross-document checks;
//! - `locate`: finds the line and column of a field path, for problems found after
//!   deserialization;
//! - `fields`, `duration`, `path`: field deserializers with people's error messages,
//!   `"1m30s"` durations, field paths;
//! - `convert`: domain ↔ protobuf ([`workload_to_pb`], [`health_to_pb`],
//!   [`provider_settings_to_pb`], `From`/`TryFrom`).
//!
//! Boundary: nothing here stores or schedules; the daemon decides what a valid document
//! means for the running system.

use std::collections::BTreeSet;

mod convert;
mod duration;
mod error;
mod fields;
mod locate;
mod parse;
mod path;
#[cfg(test)]
mod properties;
mod types;
mod validate;

pub use convert::{ConvertError, health_to_pb, provider_settings_to_pb, workload_to_pb};
pub use error::{SpecError, SpecErrors};
pub use types::{
    App, AppSpec, DockerSettings, Document, DriverKind, Ec2Address, Ec2Settings, Expose,
    FailoverPolicy, HealthCheck, Kind, KubernetesSettings, ObjectMeta, Placement, PlacementMode,
    PlacementTarget, Port, Probe, Protocol, Provider, ProviderSpec, Resources, Routing,
    RoutingProtocol, ServiceType, TaintEffect, Toleration, TolerationOperator, UnknownKind,
    UpstreamProtocol, Workload,
};
pub use validate::name_problem;

/// Largest input [`parse_documents`] reads: 1 MiB.
pub const MAX_SOURCE_BYTES: usize = 1024 * 1024;
/// Most non-empty documents in one input.
pub const MAX_DOCUMENTS: usize = 1000;
/// Deepest nesting of flow collections (`[`, `{`) a spec may have; a spec
/// needs a handful. Checked before the YAML parser runs, whose work grows
/// faster than the depth (tens of thousands of `[` kept it busy for minutes).
pub const MAX_FLOW_DEPTH: usize = 64;
/// The only `apiVersion` accepted.
pub const API_VERSION: &str = "skymirror.dev/v1";
/// Most replicas an app may ask for (`spec.replicas`, `spec.placement.standbyReplicas`).
pub const MAX_REPLICAS: u32 = 1000;

/// A valid document and where it is in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDocument {
    /// 1-based index of the document in the source; empty documents count.
    pub index: usize,
    /// 1-based line where the document's content starts (its first key).
    pub line: usize,
    /// The document.
    pub document: Document,
}

/// Parses `content` (named `source` in errors) and validates everything that can be
/// checked from the text alone. Empty documents are skipped; errors of every document are
/// reported together.
pub fn parse_documents(source: &str, content: &str) -> Result<Vec<ParsedDocument>, SpecErrors> {
    parse::parse_documents(source, content)
}

/// Cross-document and store checks on the result of [`parse_documents`] for the same
/// `source` and `content`: no (kind, name) twice, and every placement target `name` is a
/// Provider in `docs` or in `known_providers`. The text is needed to place errors.
pub fn validate_references(
    source: &str,
    content: &str,
    docs: &[ParsedDocument],
    known_providers: &BTreeSet<String>,
) -> Result<(), SpecErrors> {
    let issues = validate::references(docs, known_providers);
    if issues.is_empty() {
        return Ok(());
    }
    let requests: Vec<_> = issues
        .iter()
        .map(|(index, issue)| (*index, &issue.path))
        .collect();
    let found = locate::locate_all(content, &requests);
    let errors = issues
        .into_iter()
        .zip(found)
        .map(|((index, issue), at)| {
            let mut error = parse::issue_error(source, index, at, issue);
            if error.line.is_none() {
                error.line = docs.iter().find(|d| d.index == index).map(|d| d.line);
            }
            error
        })
        .collect();
    Err(SpecErrors(errors))
}

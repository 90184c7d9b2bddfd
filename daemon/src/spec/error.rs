//! Errors in spec input, for people: each names the source, the document, the line and
//! column, and the field path.

use std::fmt;

/// One problem in a spec source.
///
/// Displays as `apps.yaml: document 2, line 14, column 7: spec.replicas: expected a
/// non-negative integer, found -1`, leaving out the parts that are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Name of the input, usually a file name.
    pub source: String,
    /// 1-based index of the document in the input (empty documents count).
    pub document: Option<usize>,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// Field path inside the document, e.g. `spec.placement.providers[1].name`.
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    /// An error about the input as a whole.
    pub(super) fn whole(source: &str, message: impl Into<String>) -> Self {
        Self {
            source: source.to_owned(),
            document: None,
            line: None,
            column: None,
            path: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        let place = [
            self.document.map(|d| format!("document {d}")),
            self.line.map(|l| format!("line {l}")),
            self.column.map(|c| format!("column {c}")),
        ];
        let mut separator = ": ";
        for part in place.iter().flatten() {
            write!(f, "{separator}{part}")?;
            separator = ", ";
        }
        if let Some(path) = &self.path {
            write!(f, ": {path}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a spec source (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct SpecErrors(pub Vec<SpecError>);

/// One line per error.
fn lines(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_leaves_out_missing_parts() {
        let mut err = SpecError {
            source: "apps.yaml".into(),
            document: Some(2),
            line: Some(14),
            column: Some(7),
            path: Some("spec.replicas".into()),
            message: "expected a non-negative integer, found -1".into(),
        };
        assert_eq!(
            err.to_string(),
            "apps.yaml: document 2, line 14, column 7: spec.replicas: expected a non-negative integer, found -1"
        );
        err.column = None;
        err.path = None;
        assert_eq!(
            err.to_string(),
            "apps.yaml: document 2, line 14: expected a non-negative integer, found -1"
        );
        let whole = SpecError::whole("x.yaml", "no documents");
        assert_eq!(whole.to_string(), "x.yaml: no documents");
        assert_eq!(
            SpecErrors(vec![whole.clone(), whole]).to_string(),
            "x.yaml: no documents\nx.yaml: no documents"
        );
    }
}

//! Field paths inside one document (`spec.placement.providers[1].name`) and the
//! problems found at them.

use std::fmt;

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index, 0-based.
    Index(usize),
}

/// Where a value sits in a document, in YAML terms (so an app's `image` is
/// `spec.image`, not `spec.workload.image`). The empty path is the document itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FieldPath(Vec<Seg>);

impl FieldPath {
    /// The path made of `keys`.
    pub(super) fn of(keys: &[&str]) -> Self {
        Self(keys.iter().map(|k| Seg::Key((*k).to_owned())).collect())
    }

    /// This path followed by mapping key `key`.
    pub(super) fn key(mut self, key: impl Into<String>) -> Self {
        self.0.push(Seg::Key(key.into()));
        self
    }

    /// This path followed by sequence index `index`.
    pub(super) fn index(mut self, index: usize) -> Self {
        self.0.push(Seg::Index(index));
        self
    }

    /// This path followed by all of `rest`.
    pub(super) fn join(mut self, rest: &FieldPath) -> Self {
        self.0.extend(rest.0.iter().cloned());
        self
    }

    /// The steps, outermost first.
    pub(super) fn segments(&self) -> &[Seg] {
        &self.0
    }

    /// The text form, or `None` for the document itself.
    pub(super) fn display(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.to_string())
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(key) if i == 0 => f.write_str(key)?,
                Seg::Key(key) => write!(f, ".{key}")?,
                Seg::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A problem with the value at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Issue {
    /// Where the problem is.
    pub(super) path: FieldPath,
    /// What is wrong, for people.
    pub(super) message: String,
}

impl Issue {
    /// An issue at `path`.
    pub(super) fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }

    /// The same issue seen from one level up, e.g. from `spec`.
    pub(super) fn under(self, parent: &str) -> Self {
        Self {
            path: FieldPath::of(&[parent]).join(&self.path),
            message: self.message,
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path.display() {
            Some(path) => write!(f, "{path}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_serde_path_to_error() {
        let path = FieldPath::of(&["spec", "placement", "providers"])
            .index(1)
            .key("name");
        assert_eq!(path.to_string(), "spec.placement.providers[1].name");
        assert_eq!(FieldPath::default().display(), None);
        let issue = Issue::new(FieldPath::of(&["health"]), "bad").under("spec");
        assert_eq!(issue.to_string(), "spec.health: bad");
    }
}

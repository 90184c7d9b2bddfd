//! The daemon's error type; its one mapping to gRPC status codes is in `api`.

use crate::spec::SpecErrors;
use crate::store::StoreError;

/// Why a daemon operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The caller's input is invalid; nothing was changed. Not retryable as is.
    #[error("{0}")]
    Invalid(#[from] SpecErrors),
    /// A bad request that is not a spec problem (a wrong kind, an empty name).
    #[error("{0}")]
    BadRequest(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The operation conflicts with the current state; nothing was changed.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller did not prove who it is: no token, an unknown, expired or
    /// revoked token or certificate. Not retryable as is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this (a token's role, a
    /// certificate naming another provider). Not retryable as is.
    #[error("{0}")]
    PermissionDenied(String),
    /// Someone else holds what the caller asked for (a live agent session of
    /// the provider). Retryable once it is released.
    #[error("{0}")]
    Conflict(String),
    /// The caller went away before the operation completed.
    #[error("{0}")]
    Cancelled(String),
    /// The store failed. Retryable when the cause is transient.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The OS gave no random bytes for an id or a secret. Not retryable.
    #[error("{0}")]
    Randomness(String),
    /// Certificates could not be issued, or TLS set up.
    #[error(transparent)]
    Pki(#[from] crate::security::PkiError),
    /// A server failed to start or stopped with an error.
    #[error("{0}")]
    Serve(String),
}

impl From<crate::RandomnessError> for DaemonError {
    fn from(e: crate::RandomnessError) -> Self {
        DaemonError::Randomness(e.to_string())
    }
}

impl From<crate::security::NoRandomness> for DaemonError {
    fn from(e: crate::security::NoRandomness) -> Self {
        DaemonError::Randomness(e.to_string())
    }
}

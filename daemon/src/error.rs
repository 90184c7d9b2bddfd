//! The daemon's error type and its single mapping to gRPC status codes.

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
    /// The agent is not admitted (wrong join token).
    #[error("{0}")]
    Unauthenticated(String),
    /// The store failed. Retryable when the cause is transient.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A server failed to start or stopped with an error.
    #[error("{0}")]
    Serve(String),
}

impl From<DaemonError> for tonic::Status {
    fn from(e: DaemonError) -> Self {
        let message = e.to_string();
        match e {
            DaemonError::Invalid(_) | DaemonError::BadRequest(_) => {
                tonic::Status::invalid_argument(message)
            }
            DaemonError::NotFound(_) => tonic::Status::not_found(message),
            DaemonError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            DaemonError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            DaemonError::Store(_) | DaemonError::Serve(_) => tonic::Status::internal(message),
        }
    }
}

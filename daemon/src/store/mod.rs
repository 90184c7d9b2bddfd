//! Desired and actual state, and the event log, behind the [`Store`] trait.
//!
//! Desired state is what users applied ([`DeclaredApp`], [`DeclaredProvider`]) and
//! what the scheduler decided ([`Assignment`]); actual state is what agents
//! last reported ([`ReportedReplica`]). Credentials are the tokens the daemon
//! issued ([`ApiToken`], the hash of their secret only) and the agents'
//! certificates ([`AgentCertificate`]), revocations included. Values are written as the store's own
//! records (`records`), each type versioned on its own inside an envelope
//! `{"v": N, "data": …}`: a stored byte string is a compatibility promise, so
//! records embed neither protobuf nor YAML types, and `records` documents how
//! they migrate. [`SCHEMA_VERSION`] versions the layout around them (trees,
//! keys, the envelope).
//!
//! Invariant: [`Store::commit`] is atomic and durable: when it returns, every
//! change of the batch is on disk, and no reader ever sees half of a batch.

pub mod backup;
mod duration;
mod front;
mod identity;
mod records;
mod sled_store;

use serde::{Deserialize, Serialize};

use crate::model::{
    Assignment, Controls, DeclaredApp, DeclaredProvider, Event, NewEvent, ReportedReplica,
};
use crate::security::{AgentCertificate, ApiToken};

pub use front::{MemoryFront, Opener, Writable};
pub use identity::StoreIdentity;
use records::Versioned;
pub use sled_store::{SledStore, Start};

/// Version of the store's layout: its trees, their keys and the record
/// envelope; checked on open. Record versions are separate (`records`).
pub const SCHEMA_VERSION: u32 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying database failed (I/O, corruption). Usually not retryable.
    #[error("store: {0}")]
    Backend(String),
    /// A stored record could not be decoded: the store was written by an
    /// incompatible version or is corrupt. Not retryable.
    #[error("store: cannot decode {what}: {reason}")]
    Decode {
        /// Which record.
        what: String,
        /// Why.
        reason: String,
    },
    /// The store is damaged, or is not the one its data directory held: the
    /// daemon refuses to serve from it. Not retryable: restore a backup or
    /// reset the store on purpose.
    #[error(
        "the store at {} is damaged: {reason}. The daemon does not serve from it. Restore it from a backup (`skymirror daemon --restore FILE`) or start a fresh store on purpose (`skymirror daemon --reset-store`); either keeps the damaged one aside",
        path.display()
    )]
    Damaged {
        /// The file or directory at fault.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The store cannot write now (a full disk, an I/O error). Retryable: the
    /// daemon serves reads from memory and resumes writing by itself.
    #[error(
        "the store cannot write: {0}; reads and routing go on from memory, and writes resume by themselves once it can"
    )]
    Unwritable(String),
    /// The store was written with another schema version. Not retryable.
    #[error(
        "store: schema version {found} is not supported (this build reads version {SCHEMA_VERSION})"
    )]
    Schema {
        /// Version found on disk.
        found: u32,
    },
}

/// A set of desired-state changes committed atomically.
#[derive(Debug, Default)]
pub struct Batch {
    /// Apps to create or replace.
    pub put_apps: Vec<DeclaredApp>,
    /// Apps to delete, by name.
    pub delete_apps: Vec<String>,
    /// Providers to create or replace.
    pub put_providers: Vec<DeclaredProvider>,
    /// Providers to delete, by name.
    pub delete_providers: Vec<String>,
    /// Assignments to replace.
    pub put_assignments: Vec<Assignment>,
    /// Operator controls to replace.
    pub controls: Option<Controls>,
    /// Tokens to create or replace (a revocation rewrites the token).
    pub put_tokens: Vec<ApiToken>,
    /// Tokens to forget, by id (long expired).
    pub delete_tokens: Vec<String>,
    /// Agent certificates to record or replace (a revocation rewrites them).
    pub put_certificates: Vec<AgentCertificate>,
    /// Agent certificates to forget, by serial (long expired).
    pub delete_certificates: Vec<String>,
    /// Events recorded with the change.
    pub events: Vec<NewEvent>,
}

impl Batch {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.put_apps.is_empty()
            && self.delete_apps.is_empty()
            && self.put_providers.is_empty()
            && self.delete_providers.is_empty()
            && self.put_assignments.is_empty()
            && self.controls.is_none()
            && self.put_tokens.is_empty()
            && self.delete_tokens.is_empty()
            && self.put_certificates.is_empty()
            && self.delete_certificates.is_empty()
            && self.events.is_empty()
    }
}

/// Persistence of desired state, actual state and events.
///
/// Methods are synchronous: the embedded implementation answers from memory or
/// its page cache in microseconds. [`Store::commit`] with `durable` waits for the
/// disk.
pub trait Store: Send + Sync + 'static {
    /// All apps, by name.
    fn apps(&self) -> Result<Vec<DeclaredApp>, StoreError>;
    /// One app.
    fn app(&self, name: &str) -> Result<Option<DeclaredApp>, StoreError>;
    /// All providers, by name.
    fn providers(&self) -> Result<Vec<DeclaredProvider>, StoreError>;
    /// All assignments, by provider.
    fn assignments(&self) -> Result<Vec<Assignment>, StoreError>;
    /// One provider's assignment (every agent report reads it).
    fn assignment(&self, provider: &str) -> Result<Option<Assignment>, StoreError> {
        Ok(self
            .assignments()?
            .into_iter()
            .find(|a| a.provider == provider))
    }
    /// Operator controls.
    fn controls(&self) -> Result<Controls, StoreError>;
    /// Every token, by id.
    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
    /// One token.
    fn token(&self, id: &str) -> Result<Option<ApiToken>, StoreError>;
    /// Every recorded agent certificate, by serial.
    fn certificates(&self) -> Result<Vec<AgentCertificate>, StoreError>;
    /// One agent certificate.
    fn certificate(&self, serial: &str) -> Result<Option<AgentCertificate>, StoreError>;
    /// Commits a batch atomically; with `durable`, returns only once it is on
    /// disk. Returns the stored events.
    fn commit(&self, batch: Batch, durable: bool) -> Result<Vec<Event>, StoreError>;

    /// All reported replicas, by provider, app and index.
    fn replicas(&self) -> Result<Vec<ReportedReplica>, StoreError>;
    /// Records reported replicas. With `replace_provider`, every other replica of
    /// that provider is removed (a full report).
    fn put_replicas(
        &self,
        replace_provider: Option<&str>,
        replicas: &[ReportedReplica],
    ) -> Result<(), StoreError>;
    /// Removes reported replicas of a provider, by app and index.
    fn delete_replicas(&self, provider: &str, keys: &[(String, u32)]) -> Result<(), StoreError>;

    /// Appends events (not flushed at once).
    fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError>;
    /// Up to `limit` events with a sequence number above `after`, oldest first.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// The newest `count` events, oldest first.
    fn last_events(&self, count: usize) -> Result<Vec<Event>, StoreError>;
    /// Sequence number of the newest event, 0 if none.
    fn last_event_seq(&self) -> Result<u64, StoreError>;

    /// Bytes on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
    /// Writes everything buffered to disk.
    fn flush(&self) -> Result<(), StoreError>;
    /// Proves the store can write durably now (after it could not).
    fn check_writable(&self) -> Result<(), StoreError> {
        self.flush()
    }
    /// Whether the store can write now; see [`MemoryFront`].
    fn writable(&self) -> Writable {
        Writable::Yes
    }
    /// Tries to make an unwritable store writable again; returns how long it
    /// was unwritable and why when it just recovered. See [`MemoryFront`].
    fn recover(&self) -> Option<(std::time::Duration, String)> {
        None
    }
}

/// Envelope that versions every stored value: `v` is the version of the
/// record type in `data`.
#[derive(Serialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

/// Only the version of an envelope; its data is read once the version says
/// which record type it holds.
#[derive(Deserialize)]
struct EnvelopeVersion {
    v: u32,
}

/// Encodes `value` as its current record.
fn encode<T: Versioned>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Envelope {
        v: T::VERSION,
        data: T::Record::from(value),
    })
    .map_err(|e| StoreError::Backend(format!("cannot encode {} record: {e}", T::RECORD)))
}

/// Decodes a record of any version this build reads; `what` names it in
/// errors, e.g. `app web`.
fn decode<T: Versioned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let EnvelopeVersion { v } = serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        what: what.to_string(),
        reason: format!("not a versioned record: {e}"),
    })?;
    T::read(what, v, bytes)?.try_into()
}

//! Desired and actual state, and the event log, behind the [`Store`] trait.
//!
//! Desired state is what users applied ([`StoredApp`], [`StoredProvider`]) and
//! what the scheduler decided ([`StoredAssignment`]); actual state is what agents
//! last reported ([`StoredReplica`]). Records are serialized as their own
//! versioned types: a stored byte string is a compatibility promise, so the
//! records never embed protobuf types.
//!
//! Invariant: [`Store::commit`] is atomic and durable: when it returns, every
//! change of the batch is on disk, and no reader ever sees half of a batch.

mod sled_store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::spec;

pub use sled_store::SledStore;

/// Schema version of the store layout; checked on open.
pub const SCHEMA_VERSION: u32 = 1;

/// Record version written into every stored value.
const RECORD_VERSION: u32 = 1;

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
    /// The store was written with another schema version. Not retryable.
    #[error(
        "store: schema version {found} is not supported (this build reads version {SCHEMA_VERSION})"
    )]
    Schema {
        /// Version found on disk.
        found: u32,
    },
}

/// An app as stored: the spec plus what the daemon tracks about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredApp {
    /// The app as applied.
    pub app: spec::App,
    /// Incremented on every spec change; 1 on creation.
    pub generation: u64,
    /// Generation at which the workload (what a replica runs) last changed.
    pub workload_generation: u64,
    /// First applied, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Spec last changed, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// A provider as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProvider {
    /// The provider as applied.
    pub provider: spec::Provider,
    /// Incremented on every spec change; 1 on creation.
    pub generation: u64,
    /// First applied, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Spec last changed, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// Lifecycle state of a replica, as its agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Assigned, not started.
    Pending,
    /// Started, health not yet established.
    Starting,
    /// Running; no health check, or not passed yet.
    Running,
    /// Passing its health check.
    Healthy,
    /// Failing its health check.
    Unhealthy,
    /// Exited; waiting out a restart backoff.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// Cannot be started.
    Failed,
}

impl ReplicaState {
    /// Name as shown to people and in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Starting => "starting",
            ReplicaState::Running => "running",
            ReplicaState::Healthy => "healthy",
            ReplicaState::Unhealthy => "unhealthy",
            ReplicaState::Backoff => "backoff",
            ReplicaState::Stopping => "stopping",
            ReplicaState::Stopped => "stopped",
            ReplicaState::Failed => "failed",
        }
    }
}

/// A replica as last reported by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReplica {
    /// Provider the replica runs on.
    pub provider: String,
    /// App name.
    pub app: String,
    /// Index within the app on the provider.
    pub index: u32,
    /// App generation the replica reflects.
    pub generation: u64,
    /// Workload generation the replica runs.
    pub workload_generation: u64,
    /// Reported state.
    pub state: ReplicaState,
    /// Whether the app's health check considers it ready to serve
    /// (healthy, or running when the app has no health check).
    pub ready: bool,
    /// `host:port` of the first port, if running.
    pub address: String,
    /// Host port per named port.
    pub ports: BTreeMap<String, u32>,
    /// Driver's id of the instance (pid, container id).
    pub instance_id: String,
    /// Unplanned restarts.
    pub restarts: u32,
    /// Keeps exiting shortly after starting.
    pub crash_looping: bool,
    /// Detail of the state.
    pub message: String,
    /// Instance start, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Last state change, ms since the Unix epoch.
    pub state_since_ms: i64,
}

impl StoredReplica {
    /// The replica's stable identity, `app/provider/index`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.app, self.provider, self.index)
    }
}

/// One app's share of a provider's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedApp {
    /// App name.
    pub app: String,
    /// App generation.
    pub generation: u64,
    /// Workload generation.
    pub workload_generation: u64,
    /// Replicas the provider runs.
    pub replicas: u32,
    /// Of those, replicas re-placed from lost providers (failover extras).
    #[serde(default)]
    pub extra: u32,
}

/// The complete desired set for one provider, as last decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAssignment {
    /// Provider name.
    pub provider: String,
    /// Increases with every change of `apps`.
    pub revision: u64,
    /// Apps, sorted by name.
    pub apps: Vec<AssignedApp>,
}

/// An event to append; the store gives it a sequence number and a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NewEvent {
    /// Machine-readable reason, e.g. `AppCreated`.
    pub reason: String,
    /// `App`, `Provider` or `Replica`.
    pub kind: String,
    /// Object name (`app/provider/index` for replicas).
    pub object: String,
    /// Human-readable description.
    pub message: String,
    /// App concerned, or empty.
    pub app: String,
    /// Provider concerned, or empty.
    pub provider: String,
    /// Whether it is a warning.
    pub warning: bool,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the log.
    pub seq: u64,
    /// ms since the Unix epoch.
    pub time_ms: i64,
    /// The event.
    #[serde(flatten)]
    pub event: NewEvent,
}

/// Operator controls: cordoned and draining providers, manual failovers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredControls {
    /// Providers that get no new replicas.
    pub cordoned: std::collections::BTreeSet<String>,
    /// Providers whose replicas are moved away.
    pub draining: std::collections::BTreeSet<String>,
    /// Manual failovers: app → the provider that serves it.
    pub pins: BTreeMap<String, String>,
}

/// A set of desired-state changes committed atomically.
#[derive(Debug, Default)]
pub struct Batch {
    /// Apps to create or replace.
    pub put_apps: Vec<StoredApp>,
    /// Apps to delete, by name.
    pub delete_apps: Vec<String>,
    /// Providers to create or replace.
    pub put_providers: Vec<StoredProvider>,
    /// Providers to delete, by name.
    pub delete_providers: Vec<String>,
    /// Assignments to replace.
    pub put_assignments: Vec<StoredAssignment>,
    /// Operator controls to replace.
    pub controls: Option<StoredControls>,
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
    fn apps(&self) -> Result<Vec<StoredApp>, StoreError>;
    /// One app.
    fn app(&self, name: &str) -> Result<Option<StoredApp>, StoreError>;
    /// All providers, by name.
    fn providers(&self) -> Result<Vec<StoredProvider>, StoreError>;
    /// All assignments, by provider.
    fn assignments(&self) -> Result<Vec<StoredAssignment>, StoreError>;
    /// Operator controls.
    fn controls(&self) -> Result<StoredControls, StoreError>;
    /// Commits a batch atomically; with `durable`, returns only once it is on
    /// disk. Returns the stored events.
    fn commit(&self, batch: Batch, durable: bool) -> Result<Vec<StoredEvent>, StoreError>;

    /// All reported replicas, by provider, app and index.
    fn replicas(&self) -> Result<Vec<StoredReplica>, StoreError>;
    /// Records reported replicas. With `replace_provider`, every other replica of
    /// that provider is removed (a full report).
    fn put_replicas(
        &self,
        replace_provider: Option<&str>,
        replicas: &[StoredReplica],
    ) -> Result<(), StoreError>;
    /// Removes reported replicas of a provider, by app and index.
    fn delete_replicas(&self, provider: &str, keys: &[(String, u32)]) -> Result<(), StoreError>;

    /// Appends events (not flushed at once).
    fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<StoredEvent>, StoreError>;
    /// Up to `limit` events with a sequence number above `after`, oldest first.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// The newest `count` events, oldest first.
    fn last_events(&self, count: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// Sequence number of the newest event, 0 if none.
    fn last_event_seq(&self) -> Result<u64, StoreError>;

    /// Bytes on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
    /// Writes everything buffered to disk.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Envelope that versions every stored value.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    data: T,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Envelope {
        v: RECORD_VERSION,
        data: value,
    })
    .map_err(|e| StoreError::Backend(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let envelope: Envelope<T> = serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    if envelope.v != RECORD_VERSION {
        return Err(StoreError::Decode {
            what: what.to_string(),
            reason: format!("record version {} is not supported", envelope.v),
        });
    }
    Ok(envelope.data)
}

/// Milliseconds since the Unix epoch, for timestamps in stored records.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

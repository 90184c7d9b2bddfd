//! The store's own record types: what is written to disk, versioned apart
//! from the domain types in [`crate::model`] and from the YAML and wire
//! formats, so that either can change without making a store undecodable.
//!
//! Every record is written inside an envelope `{"v": N, "data": …}`. Reading
//! accepts every version this build knows and upgrades it to the current
//! record, which then converts to the domain type.

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::{Event, EventReason, NewEvent};

/// Record version 1 of an event: the shape written since the first release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct EventV1 {
    /// Position in the log.
    pub seq: u64,
    /// ms since the Unix epoch.
    pub time_ms: i64,
    /// The reason's name, e.g. `AppCreated`.
    pub reason: String,
    /// `App`, `Provider`, `Replica` or `Daemon`; derived from the reason, kept
    /// so the record reads on its own.
    pub kind: String,
    /// Object name.
    pub object: String,
    /// Human-readable description.
    pub message: String,
    /// App concerned, or empty.
    #[serde(default)]
    pub app: String,
    /// Provider concerned, or empty.
    #[serde(default)]
    pub provider: String,
    /// Whether it is a warning; derived from the reason, kept like `kind`.
    #[serde(default)]
    pub warning: bool,
}

impl From<&Event> for EventV1 {
    fn from(e: &Event) -> Self {
        EventV1 {
            seq: e.seq,
            time_ms: e.time_ms,
            reason: e.event.reason.as_str().to_string(),
            kind: e.event.kind().as_str().to_string(),
            object: e.event.object.clone(),
            message: e.event.message.clone(),
            app: e.event.app.clone(),
            provider: e.event.provider.clone(),
            warning: e.event.warning(),
        }
    }
}

impl TryFrom<EventV1> for Event {
    type Error = StoreError;

    fn try_from(r: EventV1) -> Result<Self, StoreError> {
        let reason: EventReason = r.reason.parse().map_err(|e| StoreError::Decode {
            what: format!("event {}", r.seq),
            reason: format!("{e}"),
        })?;
        Ok(Event {
            seq: r.seq,
            time_ms: r.time_ms,
            event: NewEvent {
                reason,
                object: r.object,
                message: r.message,
                app: r.app,
                provider: r.provider,
            },
        })
    }
}

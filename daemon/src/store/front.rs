//! [`MemoryFront`]: a [`Store`] that answers reads from memory and keeps
//! serving them when the backend cannot write.
//!
//! Desired state (apps, providers, assignments, controls) and the newest
//! events are held in memory, loaded once and updated after every write the
//! backend accepted. When a write fails for a reason that may pass (a full
//! disk, an I/O error), the front marks the store unwritable, drops the
//! backend (sled stays failed after an I/O error until it is reopened) and
//! refuses writes with [`StoreError::Unwritable`] while reads, and so `get`,
//! `status` and the routing table, go on from memory. [`MemoryFront::recover`]
//! reopens the backend and proves it can write; the daemon calls it on a
//! timer, so the store recovers by itself when space returns.
//!
//! Invariant: memory only ever holds what the backend accepted; nothing is
//! acknowledged that is not stored.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{Batch, Store, StoreError};
use crate::model::{
    Assignment, Controls, DeclaredApp, DeclaredProvider, Event, NewEvent, ReportedReplica,
};
use crate::registry::lock;
use crate::security::{AgentCertificate, ApiToken};

/// Opens the backend (again).
pub type Opener = Box<dyn Fn() -> Result<Box<dyn Store>, StoreError> + Send + Sync>;

/// Least time between two attempts to reopen an unwritable backend.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Desired state and the newest events, as the backend holds them.
#[derive(Debug, Default)]
struct Memory {
    apps: BTreeMap<String, DeclaredApp>,
    providers: BTreeMap<String, DeclaredProvider>,
    assignments: BTreeMap<String, Assignment>,
    controls: Controls,
    /// Tokens by id: every authenticated call reads one.
    tokens: BTreeMap<String, ApiToken>,
    /// Agent certificates by serial: every agent session reads one.
    certificates: BTreeMap<String, AgentCertificate>,
    /// The newest events, oldest first, at most `retention`.
    events: VecDeque<Event>,
    /// Sequence number of the newest event.
    last_seq: u64,
}

/// Whether the backend can write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writable {
    /// It can.
    Yes,
    /// It could not since `since`; `error` says why.
    No {
        /// When the first write failed.
        since: Instant,
        /// The error.
        error: String,
    },
}

#[derive(Debug)]
struct Health {
    writable: Writable,
    /// Last attempt to reopen the backend.
    last_attempt: Option<Instant>,
}

/// See the module docs.
pub struct MemoryFront {
    opener: Opener,
    /// `None` while it was dropped after a failure and could not be reopened.
    backend: RwLock<Option<Box<dyn Store>>>,
    memory: RwLock<Memory>,
    /// Serializes commits and event appends, so memory takes them in the
    /// backend's order, without holding readers up while the disk syncs.
    writes: Mutex<()>,
    health: Mutex<Health>,
    /// Events kept in memory.
    retention: usize,
}

impl std::fmt::Debug for MemoryFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFront")
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

/// Whether an error of the backend may pass by itself (space returns, the
/// device recovers): those make the store unwritable rather than failing.
fn passes(e: &StoreError) -> bool {
    match e {
        StoreError::Backend(text) => {
            text.contains("IO error") || text.contains("No space") || text.contains("os error")
        }
        StoreError::Unwritable(_) => true,
        _ => false,
    }
}

impl MemoryFront {
    /// Loads memory from `first` (or, when `None`, a backend `opener` opens),
    /// keeping the newest `retention` events; `opener` reopens the backend
    /// after a failed write.
    pub fn open_with(
        first: Option<Box<dyn Store>>,
        opener: Opener,
        retention: usize,
    ) -> Result<Self, StoreError> {
        let backend = match first {
            Some(b) => b,
            None => opener()?,
        };
        let memory = Memory {
            apps: backend
                .apps()?
                .into_iter()
                .map(|a| (a.app.metadata.name.clone(), a))
                .collect(),
            providers: backend
                .providers()?
                .into_iter()
                .map(|p| (p.provider.metadata.name.clone(), p))
                .collect(),
            assignments: backend
                .assignments()?
                .into_iter()
                .map(|a| (a.provider.clone(), a))
                .collect(),
            controls: backend.controls()?,
            tokens: backend
                .tokens()?
                .into_iter()
                .map(|t| (t.id.clone(), t))
                .collect(),
            certificates: backend
                .certificates()?
                .into_iter()
                .map(|c| (c.serial.clone(), c))
                .collect(),
            events: backend.last_events(retention)?.into(),
            last_seq: backend.last_event_seq()?,
        };
        Ok(MemoryFront {
            opener,
            backend: RwLock::new(Some(backend)),
            memory: RwLock::new(memory),
            writes: Mutex::new(()),
            health: Mutex::new(Health {
                writable: Writable::Yes,
                last_attempt: None,
            }),
            retention,
        })
    }

    /// Tries to make an unwritable store writable again (at most once per
    /// second): reopens the backend and proves it can write. Returns how long
    /// it was unwritable and why, when it just recovered.
    fn try_recover(&self) -> Option<(Duration, String)> {
        let (since, error) = {
            let mut health = lock(&self.health);
            let Writable::No { since, error } = health.writable.clone() else {
                return None;
            };
            if health
                .last_attempt
                .is_some_and(|t| t.elapsed() < RETRY_EVERY)
            {
                return None;
            }
            health.last_attempt = Some(Instant::now());
            (since, error)
        };
        let mut backend = self
            .backend
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if backend.is_none() {
            match (self.opener)() {
                Ok(b) => *backend = Some(b),
                Err(e) => {
                    tracing::debug!(error = %e, "the store cannot be reopened yet");
                    return None;
                }
            }
        }
        let proof = backend.as_ref().map(|b| b.check_writable());
        match proof {
            Some(Ok(())) => {
                lock(&self.health).writable = Writable::Yes;
                Some((since.elapsed(), error))
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "the store cannot write yet");
                // A failed backend stays failed: reopen it on the next try.
                *backend = None;
                None
            }
            None => None,
        }
    }

    /// Runs a write on the backend, turning a failure that may pass into
    /// the unwritable state.
    fn write<R>(
        &self,
        op: impl FnOnce(&dyn Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if let Writable::No { error, .. } = &lock(&self.health).writable {
            return Err(StoreError::Unwritable(error.clone()));
        }
        let result = {
            let backend = self
                .backend
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(b) = backend.as_ref() else {
                return Err(StoreError::Unwritable("the store is not open".into()));
            };
            op(b.as_ref())
        };
        match result {
            Ok(r) => Ok(r),
            Err(e) if passes(&e) => {
                let error = e.to_string();
                tracing::error!(%error, "the store cannot write; serving reads from memory until it can");
                *self
                    .backend
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                let mut health = lock(&self.health);
                health.writable = Writable::No {
                    since: Instant::now(),
                    error: error.clone(),
                };
                health.last_attempt = Some(Instant::now());
                Err(StoreError::Unwritable(error))
            }
            Err(e) => Err(e),
        }
    }

    fn memory(&self) -> std::sync::RwLockReadGuard<'_, Memory> {
        self.memory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn memory_mut(&self) -> std::sync::RwLockWriteGuard<'_, Memory> {
        self.memory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember_events(&self, memory: &mut Memory, events: &[Event]) {
        for e in events {
            memory.last_seq = memory.last_seq.max(e.seq);
            memory.events.push_back(e.clone());
        }
        while memory.events.len() > self.retention {
            memory.events.pop_front();
        }
    }
}

impl Store for MemoryFront {
    fn apps(&self) -> Result<Vec<DeclaredApp>, StoreError> {
        Ok(self.memory().apps.values().cloned().collect())
    }

    fn app(&self, name: &str) -> Result<Option<DeclaredApp>, StoreError> {
        Ok(self.memory().apps.get(name).cloned())
    }

    fn providers(&self) -> Result<Vec<DeclaredProvider>, StoreError> {
        Ok(self.memory().providers.values().cloned().collect())
    }

    fn assignments(&self) -> Result<Vec<Assignment>, StoreError> {
        Ok(self.memory().assignments.values().cloned().collect())
    }

    fn controls(&self) -> Result<Controls, StoreError> {
        Ok(self.memory().controls.clone())
    }

    fn assignment(&self, provider: &str) -> Result<Option<Assignment>, StoreError> {
        Ok(self.memory().assignments.get(provider).cloned())
    }

    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        Ok(self.memory().tokens.values().cloned().collect())
    }

    fn token(&self, id: &str) -> Result<Option<ApiToken>, StoreError> {
        Ok(self.memory().tokens.get(id).cloned())
    }

    fn certificates(&self) -> Result<Vec<AgentCertificate>, StoreError> {
        Ok(self.memory().certificates.values().cloned().collect())
    }

    fn certificate(&self, serial: &str) -> Result<Option<AgentCertificate>, StoreError> {
        Ok(self.memory().certificates.get(serial).cloned())
    }

    fn commit(&self, batch: Batch, durable: bool) -> Result<Vec<Event>, StoreError> {
        let changes = Batch {
            events: Vec::new(),
            put_apps: batch.put_apps.clone(),
            delete_apps: batch.delete_apps.clone(),
            put_providers: batch.put_providers.clone(),
            delete_providers: batch.delete_providers.clone(),
            put_assignments: batch.put_assignments.clone(),
            controls: batch.controls.clone(),
            put_tokens: batch.put_tokens.clone(),
            delete_tokens: batch.delete_tokens.clone(),
            put_certificates: batch.put_certificates.clone(),
            delete_certificates: batch.delete_certificates.clone(),
        };
        // Memory changes after the backend accepted, so a reader never sees
        // what is not stored.
        let _order = lock(&self.writes);
        let events = self.write(|b| b.commit(batch, durable))?;
        let mut memory = self.memory_mut();
        for a in changes.put_apps {
            memory.apps.insert(a.app.metadata.name.clone(), a);
        }
        for name in &changes.delete_apps {
            memory.apps.remove(name);
        }
        for p in changes.put_providers {
            memory.providers.insert(p.provider.metadata.name.clone(), p);
        }
        for name in &changes.delete_providers {
            memory.providers.remove(name);
        }
        for a in changes.put_assignments {
            memory.assignments.insert(a.provider.clone(), a);
        }
        if let Some(c) = changes.controls {
            memory.controls = c;
        }
        for t in changes.put_tokens {
            memory.tokens.insert(t.id.clone(), t);
        }
        for id in &changes.delete_tokens {
            memory.tokens.remove(id);
        }
        for c in changes.put_certificates {
            memory.certificates.insert(c.serial.clone(), c);
        }
        for serial in &changes.delete_certificates {
            memory.certificates.remove(serial);
        }
        self.remember_events(&mut memory, &events);
        Ok(events)
    }

    fn replicas(&self) -> Result<Vec<ReportedReplica>, StoreError> {
        let backend = self
            .backend
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match backend.as_ref() {
            Some(b) => b.replicas(),
            None => Err(StoreError::Unwritable("the store is not open".into())),
        }
    }

    fn put_replicas(
        &self,
        replace_provider: Option<&str>,
        replicas: &[ReportedReplica],
    ) -> Result<(), StoreError> {
        self.write(|b| b.put_replicas(replace_provider, replicas))
    }

    fn delete_replicas(&self, provider: &str, keys: &[(String, u32)]) -> Result<(), StoreError> {
        self.write(|b| b.delete_replicas(provider, keys))
    }

    fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        let _order = lock(&self.writes);
        let stored = self.write(|b| b.append_events(events))?;
        self.remember_events(&mut self.memory_mut(), &stored);
        Ok(stored)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        Ok(self
            .memory()
            .events
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect())
    }

    fn last_events(&self, count: usize) -> Result<Vec<Event>, StoreError> {
        let memory = self.memory();
        let skip = memory.events.len().saturating_sub(count);
        Ok(memory.events.iter().skip(skip).cloned().collect())
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(self.memory().last_seq)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let backend = self
            .backend
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        backend.as_ref().map_or(Ok(0), |b| b.size_on_disk())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.write(|b| b.flush())
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        self.write(|b| b.check_writable())
    }

    fn writable(&self) -> Writable {
        lock(&self.health).writable.clone()
    }

    fn recover(&self) -> Option<(Duration, String)> {
        self.try_recover()
    }
}

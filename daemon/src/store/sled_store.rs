//! The embedded [`Store`]: one sled database in the daemon's data directory.
//!
//! Trees: `meta` (schema version, the store's identity and its count of
//! committed batches, see `super::identity`), `controls` (operator controls), `apps`,
//! `providers`, `assignments` (keyed by
//! name), `tokens` (keyed by id), `certificates` (keyed by serial),
//! `replicas` (keyed by `provider \0 app \0 index`), `events` (keyed by
//! the big-endian sequence number, so iteration is in log order). The event log
//! keeps the newest [`SledStore::EVENT_RETENTION`] entries. `tokens` and
//! `certificates` came after schema version 1 without changing it: a store of
//! an earlier release simply has them empty, and an earlier release ignores
//! them. Every value is a
//! versioned record (`super::records`); errors name it from its key
//! (`app web`, `replica web/aws/0`, `event 42`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::identity::{
    IdentityFile, IdentityFileV1, StoreIdentity, created_now, new_identity, next_epoch,
};
use super::records::Versioned;
use super::{Batch, SCHEMA_VERSION, Store, StoreError, decode, encode};
use crate::model::{
    Assignment, Controls, DeclaredApp, DeclaredProvider, Event, NewEvent, ReportedReplica, now_ms,
};
use crate::security::{AgentCertificate, ApiToken};

/// How a daemon starts on its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Serve from the store as it is; refuse a damaged one.
    Resume,
    /// Keep the store (if any) aside and start an empty one under a new epoch.
    Reset,
}

/// sled-backed [`Store`].
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    /// Schema version, identity, commit count.
    meta: sled::Tree,
    /// The identity file updated after every durable commit, with what it
    /// records besides the count; `None` for a store opened without one.
    identity_file: Option<(IdentityFile, IdentityFileV1)>,
    apps: sled::Tree,
    providers: sled::Tree,
    assignments: sled::Tree,
    /// Operator controls, one record under [`CONTROLS_KEY`].
    controls: sled::Tree,
    /// Tokens, by id.
    tokens: sled::Tree,
    /// Agent certificates, by serial.
    certificates: sled::Tree,
    replicas: sled::Tree,
    events: sled::Tree,
    /// Serializes event appends so sequence numbers are committed in order and a
    /// reader that has seen `seq` never later finds a smaller one appear. Holds
    /// the last sequence number handed out and how many events the log holds.
    event_lock: Mutex<EventLog>,
}

/// Position and size of the event log.
#[derive(Debug)]
struct EventLog {
    last_seq: u64,
    count: u64,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

const CONTROLS_KEY: &str = "controls";
/// Meta keys of the identity (see `super::identity`).
const STORE_ID_KEY: &str = "store_id";
const EPOCH_KEY: &str = "epoch";
const COMMITS_KEY: &str = "commits";
const PROBE_KEY: &str = "writable_probe";

fn u64_of(raw: Option<sled::IVec>) -> u64 {
    raw.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// Opens sled in `dir`, turning a panic of sled's on a corrupt file into an
/// error: nothing in a damaged data directory may crash the daemon.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(dir)
        // The working set is small (specs, a few thousand replica records);
        // sled's 1 GiB default cache would only inflate the daemon's memory.
        .cache_capacity(8 * 1024 * 1024)
        .flush_every_ms(Some(200));
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // The configuration is not used again after a panic.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()));
    std::panic::set_hook(quiet);
    let damaged = |reason: String| StoreError::Damaged {
        path: dir.to_path_buf(),
        reason,
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e))) if e.kind() == std::io::ErrorKind::WouldBlock => Err(
            StoreError::Backend(format!("cannot open {}: {e}", dir.display())),
        ),
        Ok(Err(e)) if e.to_string().contains("lock") => Err(StoreError::Backend(format!(
            "cannot open {}: {e}",
            dir.display()
        ))),
        Ok(Err(e)) => Err(damaged(format!("the database cannot be opened: {e}"))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "unreadable".into());
            Err(damaged(format!("the database is corrupt ({what})")))
        }
    }
}

/// Moves `path` aside as `<path>.<what>-<ms>`; returns where it went.
fn move_aside(path: &Path, what: &str) -> Result<PathBuf, StoreError> {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{what}-{}", now_ms()));
    let to = path.with_file_name(name);
    std::fs::rename(path, &to).map_err(|e| {
        StoreError::Backend(format!(
            "cannot move {} aside to {}: {e}",
            path.display(),
            to.display()
        ))
    })?;
    Ok(to)
}

fn replica_key(provider: &str, app: &str, index: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(provider.len() + app.len() + 6);
    key.extend_from_slice(provider.as_bytes());
    key.push(0);
    key.extend_from_slice(app.as_bytes());
    key.push(0);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn provider_prefix(provider: &str) -> Vec<u8> {
    let mut key = provider.as_bytes().to_vec();
    key.push(0);
    key
}

impl SledStore {
    /// Events kept in the log; older ones are dropped as new ones arrive.
    pub const EVENT_RETENTION: u64 = 10_000;

    /// Opens (or creates) the store in `dir` as it is, without checking its
    /// identity (tests, tools); daemons use [`SledStore::open_checked`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = open_db(dir)?;
        let meta = db.open_tree("meta").map_err(backend)?;
        match meta.get("schema_version").map_err(backend)? {
            Some(raw) => {
                let found = std::str::from_utf8(&raw)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema { found });
                }
            }
            None => {
                meta.insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())
                    .map_err(backend)?;
                db.flush().map_err(backend)?;
            }
        }
        let events = db.open_tree("events").map_err(backend)?;
        let last_seq = match events.last().map_err(backend)? {
            Some((key, _)) => seq_from_key(&key)?,
            None => 0,
        };
        // One scan at start-up; afterwards the count is kept as events come and go.
        let count = events.len() as u64;
        Ok(SledStore {
            meta,
            identity_file: None,
            apps: db.open_tree("apps").map_err(backend)?,
            providers: db.open_tree("providers").map_err(backend)?,
            assignments: db.open_tree("assignments").map_err(backend)?,
            controls: db.open_tree("controls").map_err(backend)?,
            tokens: db.open_tree("tokens").map_err(backend)?,
            certificates: db.open_tree("certificates").map_err(backend)?,
            replicas: db.open_tree("replicas").map_err(backend)?,
            events,
            event_lock: Mutex::new(EventLog { last_seq, count }),
            db,
        })
    }

    /// Opens the store in `dir` for a daemon: checks it against its identity
    /// file and refuses a damaged one (see `super::identity`), creates a new
    /// store where there was none, or, with [`Start::Reset`], keeps the old
    /// one aside and starts an empty one under the next epoch. Returns the
    /// store and its identity.
    pub fn open_checked(dir: &Path, start: Start) -> Result<(Self, StoreIdentity), StoreError> {
        let file = IdentityFile::of(dir);
        if start == Start::Reset {
            // The identity to continue: the file's, or else the old store's
            // own, when either can still be read.
            let previous = file
                .read()
                .ok()
                .flatten()
                .map(|f| f.identity())
                .or_else(|| {
                    if !dir.join("db").exists() {
                        return None;
                    }
                    let old = Self::open(dir).ok()?;
                    old.meta_identity()
                        .ok()
                        .flatten()
                        .map(|(identity, _)| identity)
                });
            if dir.exists() {
                let aside = move_aside(dir, "reset")?;
                tracing::warn!(store = %dir.display(), kept = %aside.display(), "store reset on purpose; the old one is kept aside");
            }
            if file.path().exists() {
                move_aside(file.path(), "reset")?;
            }
            let identity = match previous {
                Some(p) => StoreIdentity {
                    store_id: p.store_id,
                    epoch: next_epoch(p.epoch),
                },
                None => new_identity(next_epoch(0))?,
            };
            return Self::create(dir, &file, identity);
        }
        let recorded = file.read()?;
        let has_db = dir.join("db").exists();
        let Some(recorded) = recorded else {
            if !has_db {
                return Self::create(dir, &file, new_identity(1)?);
            }
            // A store of a release before identities, or one whose identity
            // file was lost: the store's own record is authoritative.
            let mut store = Self::open(dir)?;
            let identity = match store.meta_identity()? {
                Some((identity, _)) => identity,
                None => {
                    let identity = new_identity(1)?;
                    store.set_identity(&identity)?;
                    identity
                }
            };
            let commits = store.commits()?;
            let f = IdentityFileV1::new(&identity, commits, created_now());
            file.write(&f)?;
            store.identity_file = Some((file, f));
            return Ok((store, identity));
        };
        let expected = format!(
            "store {} (epoch {}) with at least {} committed changes, as {} says",
            recorded.store_id,
            recorded.epoch,
            recorded.commits,
            file.path().display()
        );
        let damaged = |reason: String| StoreError::Damaged {
            path: dir.join("db"),
            reason,
        };
        if !has_db {
            return Err(damaged(format!("it is missing; expected {expected}")));
        }
        let mut store = Self::open(dir)?;
        let Some((identity, commits)) = store.meta_identity()? else {
            return Err(damaged(format!(
                "it holds no store: it was deleted, truncated or replaced; expected {expected}"
            )));
        };
        if identity.store_id != recorded.store_id {
            return Err(damaged(format!(
                "it holds store {}, not the one expected: {expected}",
                identity.store_id
            )));
        }
        if commits < recorded.commits || identity.epoch < recorded.epoch {
            return Err(damaged(format!(
                "it holds {commits} committed changes in epoch {}: it lost acknowledged data (truncated or rolled back); expected {expected}",
                identity.epoch
            )));
        }
        // The store may be ahead of its file (a stop between a commit and
        // the file's update): the file catches up.
        let f = IdentityFileV1::new(&identity, commits, recorded.created_at_ms);
        if f != recorded {
            file.write(&f)?;
        }
        store.identity_file = Some((file, f));
        Ok((store, identity))
    }

    /// Creates an empty store of `identity` in `dir` to restore a backup
    /// into, keeping the store that was there (and its identity file) aside.
    pub(super) fn create_restored(dir: &Path, identity: StoreIdentity) -> Result<Self, StoreError> {
        let file = IdentityFile::of(dir);
        if dir.exists() {
            let aside = move_aside(dir, "before-restore")?;
            tracing::warn!(store = %dir.display(), kept = %aside.display(), "the store being replaced by a restore is kept aside");
        }
        if file.path().exists() {
            move_aside(file.path(), "before-restore")?;
        }
        Self::create(dir, &file, identity).map(|(store, _)| store)
    }

    /// Writes events of a backup under their own sequence numbers; later
    /// events continue after the last of them.
    pub(super) fn import_events(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut log = self
            .event_lock
            .lock()
            .map_err(|_| StoreError::Backend("event lock poisoned".into()))?;
        let mut batch = sled::Batch::default();
        for e in events {
            batch.insert(&e.seq.to_be_bytes(), encode(e)?);
            log.last_seq = log.last_seq.max(e.seq);
        }
        self.events.apply_batch(batch).map_err(backend)?;
        log.count = self.events.len() as u64;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Creates a store with `identity` in `dir`, which holds none.
    fn create(
        dir: &Path,
        file: &IdentityFile,
        identity: StoreIdentity,
    ) -> Result<(Self, StoreIdentity), StoreError> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", parent.display())))?;
        }
        let mut store = Self::open(dir)?;
        store.set_identity(&identity)?;
        let f = IdentityFileV1::new(&identity, store.commits()?, created_now());
        file.write(&f)?;
        store.identity_file = Some((file.clone(), f));
        tracing::info!(store = %dir.display(), store_id = %identity.store_id, epoch = identity.epoch, "created a store");
        Ok((store, identity))
    }

    /// The identity and commit count the store itself holds.
    fn meta_identity(&self) -> Result<Option<(StoreIdentity, u64)>, StoreError> {
        let Some(id) = self.meta.get(STORE_ID_KEY).map_err(backend)? else {
            return Ok(None);
        };
        let identity = StoreIdentity {
            store_id: String::from_utf8_lossy(&id).into_owned(),
            epoch: u64_of(self.meta.get(EPOCH_KEY).map_err(backend)?),
        };
        Ok(Some((identity, self.commits()?)))
    }

    /// Batches committed so far.
    fn commits(&self) -> Result<u64, StoreError> {
        Ok(u64_of(self.meta.get(COMMITS_KEY).map_err(backend)?))
    }

    /// Records `identity` in the store, durably.
    fn set_identity(&self, identity: &StoreIdentity) -> Result<(), StoreError> {
        self.meta
            .insert(STORE_ID_KEY, identity.store_id.as_bytes())
            .map_err(backend)?;
        self.meta
            .insert(EPOCH_KEY, &identity.epoch.to_be_bytes())
            .map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Every record of `tree`, each named in errors by `name` from its key.
    fn values<T: Versioned>(
        tree: &sled::Tree,
        name: impl Fn(&[u8]) -> String,
    ) -> Result<Vec<T>, StoreError> {
        tree.iter()
            .map(|entry| {
                let (key, value) = entry.map_err(backend)?;
                decode(&name(&key), &value)
            })
            .collect()
    }

    /// Assigns sequence numbers to `events`, runs `write` with the encoded
    /// entries while holding the event lock, and trims the log.
    fn with_events<R>(
        &self,
        events: Vec<NewEvent>,
        write: impl FnOnce(&[(u64, Vec<u8>)]) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<Event>), StoreError> {
        let mut log = self
            .event_lock
            .lock()
            .map_err(|_| StoreError::Backend("event lock poisoned".into()))?;
        let time_ms = now_ms();
        let mut stored = Vec::with_capacity(events.len());
        let mut encoded = Vec::with_capacity(events.len());
        let mut seq = log.last_seq;
        for event in events {
            // sled's id generator survives crashes without ever handing out an
            // id twice (it skips ahead after an unclean stop), so an event seen
            // by a client before a `kill -9` never has its number reused, even
            // if the event itself had not reached the disk.
            seq = self.db.generate_id().map_err(backend)?.max(seq) + 1;
            let event = Event {
                seq,
                time_ms,
                event,
            };
            encoded.push((seq, encode(&event)?));
            stored.push(event);
        }
        let result = write(&encoded)?;
        log.last_seq = seq;
        log.count += encoded.len() as u64;
        // Trim in batches so the log is not trimmed on every append.
        if log.count > Self::EVENT_RETENTION + Self::EVENT_RETENTION / 10 {
            let excess = usize::try_from(log.count - Self::EVENT_RETENTION).unwrap_or(usize::MAX);
            let old: Vec<_> = self
                .events
                .iter()
                .keys()
                .take(excess)
                .filter_map(Result::ok)
                .collect();
            // Trimming is housekeeping: a failure leaves a longer log, not a wrong one.
            for key in old {
                if matches!(self.events.remove(key), Ok(Some(_))) {
                    log.count -= 1;
                }
            }
        }
        Ok((result, stored))
    }
}

/// How a record keyed by its object's name is named in errors: `app web`.
fn named<T: Versioned>(key: &[u8]) -> String {
    format!("{} {}", T::RECORD, String::from_utf8_lossy(key))
}

/// How a replica is named in errors, from its key: `replica web/aws/0`.
fn replica_name(key: &[u8]) -> String {
    let mut parts = key.splitn(3, |b| *b == 0);
    match (
        parts.next(),
        parts.next(),
        parts.next().map(<[u8; 4]>::try_from),
    ) {
        (Some(provider), Some(app), Some(Ok(index))) => format!(
            "replica {}/{}/{}",
            String::from_utf8_lossy(app),
            String::from_utf8_lossy(provider),
            u32::from_be_bytes(index)
        ),
        _ => format!("replica with key {key:?}"),
    }
}

/// How an event is named in errors, from its key: `event 42`.
fn event_name(key: &[u8]) -> String {
    match <[u8; 8]>::try_from(key) {
        Ok(seq) => format!("event {}", u64::from_be_bytes(seq)),
        Err(_) => format!("event with key {key:?}"),
    }
}

fn decode_event(key: &[u8], bytes: &[u8]) -> Result<Event, StoreError> {
    decode(&event_name(key), bytes)
}

fn seq_from_key(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StoreError::Decode {
        what: "event key".into(),
        reason: format!("expected 8 bytes, found {}", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl Store for SledStore {
    fn apps(&self) -> Result<Vec<DeclaredApp>, StoreError> {
        Self::values(&self.apps, named::<DeclaredApp>)
    }

    fn app(&self, name: &str) -> Result<Option<DeclaredApp>, StoreError> {
        self.apps
            .get(name)
            .map_err(backend)?
            .map(|v| decode(&named::<DeclaredApp>(name.as_bytes()), &v))
            .transpose()
    }

    fn providers(&self) -> Result<Vec<DeclaredProvider>, StoreError> {
        Self::values(&self.providers, named::<DeclaredProvider>)
    }

    fn assignments(&self) -> Result<Vec<Assignment>, StoreError> {
        Self::values(&self.assignments, named::<Assignment>)
    }

    fn controls(&self) -> Result<Controls, StoreError> {
        Ok(self
            .controls
            .get(CONTROLS_KEY)
            .map_err(backend)?
            .map(|v| decode("controls", &v))
            .transpose()?
            .unwrap_or_default())
    }

    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        Self::values(&self.tokens, named::<ApiToken>)
    }

    fn token(&self, id: &str) -> Result<Option<ApiToken>, StoreError> {
        self.tokens
            .get(id)
            .map_err(backend)?
            .map(|v| decode(&named::<ApiToken>(id.as_bytes()), &v))
            .transpose()
    }

    fn certificates(&self) -> Result<Vec<AgentCertificate>, StoreError> {
        Self::values(&self.certificates, named::<AgentCertificate>)
    }

    fn certificate(&self, serial: &str) -> Result<Option<AgentCertificate>, StoreError> {
        self.certificates
            .get(serial)
            .map_err(backend)?
            .map(|v| decode(&named::<AgentCertificate>(serial.as_bytes()), &v))
            .transpose()
    }

    fn commit(&self, batch: Batch, durable: bool) -> Result<Vec<Event>, StoreError> {
        let mut apps = Vec::new();
        for app in &batch.put_apps {
            apps.push((app.app.metadata.name.clone(), encode(app)?));
        }
        let mut providers = Vec::new();
        for p in &batch.put_providers {
            providers.push((p.provider.metadata.name.clone(), encode(p)?));
        }
        let mut assignments = Vec::new();
        for a in &batch.put_assignments {
            assignments.push((a.provider.clone(), encode(a)?));
        }
        let controls = batch.controls.as_ref().map(encode).transpose()?;
        let mut tokens = Vec::new();
        for t in &batch.put_tokens {
            tokens.push((t.id.clone(), encode(t)?));
        }
        let mut certificates = Vec::new();
        for c in &batch.put_certificates {
            certificates.push((c.serial.clone(), encode(c)?));
        }
        let (commits, stored) = self.with_events(batch.events, |events| {
            (
                &self.apps,
                &self.providers,
                &self.assignments,
                &self.controls,
                &self.events,
                &self.meta,
                &self.tokens,
                &self.certificates,
            )
                .transaction(
                    |(
                        t_apps,
                        t_providers,
                        t_assignments,
                        t_controls,
                        t_events,
                        t_meta,
                        t_tokens,
                        t_certificates,
                    )| {
                        let commits = u64_of(t_meta.get(COMMITS_KEY)?) + 1;
                        t_meta.insert(COMMITS_KEY, &commits.to_be_bytes())?;
                        if let Some(c) = &controls {
                            t_controls.insert(CONTROLS_KEY, c.as_slice())?;
                        }
                        for (name, value) in &apps {
                            t_apps.insert(name.as_bytes(), value.as_slice())?;
                        }
                        for name in &batch.delete_apps {
                            t_apps.remove(name.as_bytes())?;
                        }
                        for (name, value) in &providers {
                            t_providers.insert(name.as_bytes(), value.as_slice())?;
                        }
                        for name in &batch.delete_providers {
                            t_providers.remove(name.as_bytes())?;
                        }
                        for (name, value) in &assignments {
                            t_assignments.insert(name.as_bytes(), value.as_slice())?;
                        }
                        for (id, value) in &tokens {
                            t_tokens.insert(id.as_bytes(), value.as_slice())?;
                        }
                        for id in &batch.delete_tokens {
                            t_tokens.remove(id.as_bytes())?;
                        }
                        for (serial, value) in &certificates {
                            t_certificates.insert(serial.as_bytes(), value.as_slice())?;
                        }
                        for serial in &batch.delete_certificates {
                            t_certificates.remove(serial.as_bytes())?;
                        }
                        for (seq, value) in events {
                            t_events.insert(&seq.to_be_bytes(), value.as_slice())?;
                        }
                        Ok::<u64, ConflictableTransactionError<()>>(commits)
                    },
                )
                .map_err(|e| match e {
                    TransactionError::Storage(e) => backend(e),
                    TransactionError::Abort(()) => {
                        StoreError::Backend("transaction aborted".into())
                    }
                })
        })?;
        if durable {
            self.db.flush().map_err(backend)?;
            if let Some((file, f)) = &self.identity_file {
                // A lower bound: failing to raise it only weakens the check
                // of a later start, never the commit that just succeeded.
                let next = IdentityFileV1::new(&f.identity(), commits, f.created_at_ms);
                if let Err(e) = file.write(&next) {
                    tracing::warn!(error = %e, "cannot update the store's identity file");
                }
            }
        }
        Ok(stored)
    }

    fn replicas(&self) -> Result<Vec<ReportedReplica>, StoreError> {
        Self::values(&self.replicas, replica_name)
    }

    fn put_replicas(
        &self,
        replace_provider: Option<&str>,
        replicas: &[ReportedReplica],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        if let Some(provider) = replace_provider {
            for key in self.replicas.scan_prefix(provider_prefix(provider)).keys() {
                batch.remove(key.map_err(backend)?);
            }
        }
        for r in replicas {
            batch.insert(replica_key(&r.provider, &r.app, r.index), encode(r)?);
        }
        self.replicas.apply_batch(batch).map_err(backend)
    }

    fn delete_replicas(&self, provider: &str, keys: &[(String, u32)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (app, index) in keys {
            batch.remove(replica_key(provider, app, *index));
        }
        self.replicas.apply_batch(batch).map_err(backend)
    }

    fn append_events(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let ((), stored) = self.with_events(events, |encoded| {
            let mut batch = sled::Batch::default();
            for (seq, value) in encoded {
                batch.insert(&seq.to_be_bytes(), value.as_slice());
            }
            self.events.apply_batch(batch).map_err(backend)
        })?;
        Ok(stored)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        self.events
            .range(start..)
            .take(limit)
            .map(|entry| {
                let (key, value) = entry.map_err(backend)?;
                decode_event(&key, &value)
            })
            .collect()
    }

    fn last_events(&self, count: usize) -> Result<Vec<Event>, StoreError> {
        let mut events: Vec<Event> = self
            .events
            .iter()
            .rev()
            .take(count)
            .map(|entry| {
                let (key, value) = entry.map_err(backend)?;
                decode_event(&key, &value)
            })
            .collect::<Result<_, _>>()?;
        events.reverse();
        Ok(events)
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.event_lock
            .lock()
            .map(|log| log.last_seq)
            .map_err(|_| StoreError::Backend("event lock poisoned".into()))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(backend)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        self.meta
            .insert(PROBE_KEY, &now_ms().to_be_bytes())
            .map_err(backend)?;
        self.db.flush().map(|_| ()).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reopens a store dropped a moment ago: sled's background flusher may
    /// hold the file lock briefly after the last handle is gone.
    fn reopen(dir: &Path) -> Result<SledStore, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match SledStore::open(dir) {
                Err(StoreError::Backend(e))
                    if e.contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// An event told apart from others by its message.
    fn event(message: &str) -> NewEvent {
        NewEvent::app(
            crate::model::EventReason::AppConfigured,
            "web",
            message.into(),
        )
    }

    fn replica(provider: &str, app: &str, index: u32) -> ReportedReplica {
        ReportedReplica {
            provider: provider.into(),
            app: app.into(),
            index,
            generation: 1,
            workload_generation: 1,
            state: crate::model::ReplicaState::Healthy,
            ready: true,
            address: "127.0.0.1:1".into(),
            ports: Default::default(),
            instance_id: "1".into(),
            restarts: 0,
            crash_looping: false,
            message: String::new(),
            started_at_ms: 0,
            state_since_ms: 0,
        }
    }

    #[test]
    fn events_are_ordered_retained_and_survive_reopen() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        {
            let store = SledStore::open(dir.path())?;
            let stored = store.append_events(vec![event("A"), event("B")])?;
            assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
            store.commit(
                Batch {
                    events: vec![event("C")],
                    ..Batch::default()
                },
                true,
            )?;
            assert_eq!(store.events_after(1, 10)?.len(), 2);
            assert_eq!(store.last_events(1)?[0].event.message, "C");
        }
        let store = reopen(dir.path())?;
        assert_eq!(store.last_event_seq()?, 3);
        let next = store.append_events(vec![event("D")])?;
        assert!(next[0].seq > 3, "sequence numbers never go back");
        Ok(())
    }

    #[test]
    fn retention_counts_events_not_sequence_numbers() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = SledStore::open(dir.path())?;
        let total = SledStore::EVENT_RETENTION + SledStore::EVENT_RETENTION / 5;
        for chunk in 0..total / 100 {
            store.append_events(
                (0..100)
                    .map(|i| event(&format!("E{}", chunk * 100 + i)))
                    .collect(),
            )?;
        }
        let kept = store.events_after(0, usize::MAX)?;
        assert!(kept.len() as u64 >= SledStore::EVENT_RETENTION);
        assert!(
            (kept.len() as u64) <= SledStore::EVENT_RETENTION + SledStore::EVENT_RETENTION / 10
        );
        assert_eq!(
            kept.last().map(|e| e.event.message.clone()),
            Some(format!("E{}", total - 1))
        );
        Ok(())
    }

    #[test]
    fn full_report_replaces_only_that_provider() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = SledStore::open(dir.path())?;
        store.put_replicas(
            None,
            &[
                replica("a", "web", 0),
                replica("a", "web", 1),
                replica("ab", "web", 0),
            ],
        )?;
        store.put_replicas(Some("a"), &[replica("a", "web", 1)])?;
        let ids: Vec<_> = store.replicas()?.iter().map(ReportedReplica::id).collect();
        assert_eq!(ids, vec!["web/a/1", "web/ab/0"]);
        store.delete_replicas("a", &[("web".into(), 1)])?;
        assert_eq!(store.replicas()?.len(), 1);
        Ok(())
    }

    #[test]
    fn records_of_an_unknown_version_are_refused_by_name() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = SledStore::open(dir.path())?;
        store.put_replicas(None, &[replica("aws", "web", 3)])?;
        let newer = |tree: &sled::Tree, key: &[u8]| -> Result<(), StoreError> {
            tree.insert(key, r#"{"v":7,"data":{"whatever":true}}"#)
                .map_err(backend)?;
            Ok(())
        };
        newer(&store.replicas, &replica_key("aws", "web", 3))?;
        newer(&store.apps, b"web")?;
        newer(&store.events, &9u64.to_be_bytes())?;
        let refused = |result: Result<(), StoreError>| match result {
            Err(StoreError::Decode { what, reason }) => format!("{what}: {reason}"),
            other => format!("not refused: {other:?}"),
        };
        let replicas = refused(store.replicas().map(drop));
        assert!(
            replicas.starts_with("replica web/aws/3: record version 7 is not supported"),
            "{replicas}"
        );
        assert!(refused(store.apps().map(drop)).starts_with("app web: record version 7"));
        assert!(refused(store.app("web").map(drop)).starts_with("app web: record version 7"));
        assert!(
            refused(store.events_after(0, 10).map(drop)).starts_with("event 9: record version 7")
        );
        Ok(())
    }

    #[test]
    fn rejects_other_schema_versions() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        {
            let db = sled::open(dir.path()).map_err(backend)?;
            db.open_tree("meta")
                .map_err(backend)?
                .insert("schema_version", "99")
                .map_err(backend)?;
            db.flush().map_err(backend)?;
        }
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::Schema { found: 99 })
        ));
        Ok(())
    }
}

//! Backups of a store, and restoring a store from one.
//!
//! A backup is one file: a header line (JSON: what it is, the store's
//! identity, when it was taken, the length and CRC-32 of the body) and the
//! body, a JSON document of the store's own records (`super::records`, in
//! their versioned envelopes): apps, providers, assignments, the operator
//! controls, the tokens (their hashes, never a secret) and the agents'
//! certificates with their revocations, and the event log. Reported replicas
//! are not in it: agents report what they run when they reconnect. Nor is
//! the daemon's CA (`DATA_DIR/pki`): its key is a file of its own, backed up
//! with the data directory; a daemon restored without it creates a new CA,
//! and every agent joins again.
//!
//! Restoring moves the current store (if any) aside, creates a store from the
//! backup under the backup's store id and a new epoch (above both the
//! backup's and the replaced store's), so agents accept its assignments, and
//! the new assignments alone decide what runs.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::identity::{IdentityFile, StoreIdentity};
use super::sled_store::SledStore;
use super::{Batch, Store, StoreError, decode, encode};
use crate::model::{Assignment, Controls, DeclaredApp, DeclaredProvider, Event, now_ms};
use crate::security::{AgentCertificate, ApiToken};

/// What the header calls a backup.
const KIND: &str = "skymirror-backup";
/// The largest body a backup may have.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// The header line of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    /// Always `skymirror-backup`.
    kind: String,
    /// Format version, 1.
    v: u32,
    /// The store's id.
    store_id: String,
    /// Its epoch when the backup was taken.
    epoch: u64,
    /// When, ms since the Unix epoch.
    taken_at_ms: i64,
    /// Bytes of the body.
    length: usize,
    /// CRC-32 of the body.
    crc32: u32,
}

/// The body of a backup: records in their envelopes. A backup taken before
/// tokens and certificates existed has neither; it restores without them.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Body {
    apps: Vec<Value>,
    providers: Vec<Value>,
    assignments: Vec<Value>,
    controls: Option<Value>,
    #[serde(default)]
    tokens: Vec<Value>,
    #[serde(default)]
    certificates: Vec<Value>,
    events: Vec<Value>,
}

/// What a backup holds, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The store it was taken of.
    pub identity: StoreIdentity,
    /// When, ms since the Unix epoch.
    pub taken_at_ms: i64,
    /// Declared apps.
    pub apps: Vec<DeclaredApp>,
    /// Declared providers.
    pub providers: Vec<DeclaredProvider>,
    /// Assignments.
    pub assignments: Vec<Assignment>,
    /// Operator controls.
    pub controls: Controls,
    /// Tokens.
    pub tokens: Vec<ApiToken>,
    /// Agent certificates.
    pub certificates: Vec<AgentCertificate>,
    /// The event log, oldest first.
    pub events: Vec<Event>,
}

fn record<T: super::records::Versioned>(value: &T) -> Result<Value, StoreError> {
    serde_json::from_slice(&encode(value)?)
        .map_err(|e| StoreError::Backend(format!("cannot encode a backup record: {e}")))
}

/// Writes a backup of `store` (whose identity is `identity`) as bytes.
pub fn export(store: &dyn Store, identity: &StoreIdentity) -> Result<Vec<u8>, StoreError> {
    let body = Body {
        apps: store.apps()?.iter().map(record).collect::<Result<_, _>>()?,
        providers: store
            .providers()?
            .iter()
            .map(record)
            .collect::<Result<_, _>>()?,
        assignments: store
            .assignments()?
            .iter()
            .map(record)
            .collect::<Result<_, _>>()?,
        controls: Some(record(&store.controls()?)?),
        tokens: store
            .tokens()?
            .iter()
            .map(record)
            .collect::<Result<_, _>>()?,
        certificates: store
            .certificates()?
            .iter()
            .map(record)
            .collect::<Result<_, _>>()?,
        events: store
            .last_events(usize::MAX)?
            .iter()
            .map(record)
            .collect::<Result<_, _>>()?,
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| StoreError::Backend(format!("cannot encode the backup: {e}")))?;
    let header = Header {
        kind: KIND.into(),
        v: 1,
        store_id: identity.store_id.clone(),
        epoch: identity.epoch,
        taken_at_ms: now_ms(),
        length: body.len(),
        crc32: crc32fast::hash(&body),
    };
    let mut out = serde_json::to_vec(&header)
        .map_err(|e| StoreError::Backend(format!("cannot encode the backup: {e}")))?;
    out.push(b'\n');
    out.extend(body);
    Ok(out)
}

/// Reads a backup; `source` names it in errors.
pub fn read(source: &str, bytes: &[u8]) -> Result<Snapshot, StoreError> {
    let bad = |reason: String| StoreError::Decode {
        what: format!("backup {source}"),
        reason,
    };
    let split = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad(format!("no header line in {} bytes", bytes.len())))?;
    let (head, body) = (&bytes[..split], &bytes[split + 1..]);
    let header: Header =
        serde_json::from_slice(head).map_err(|e| bad(format!("not a skymirror backup: {e}")))?;
    if header.kind != KIND || header.v != 1 {
        return Err(bad(format!(
            "a {:?} of version {}, not a skymirror backup of version 1",
            header.kind, header.v
        )));
    }
    if header.length > MAX_BODY || body.len() != header.length {
        return Err(bad(format!(
            "truncated or padded: the header says {} bytes, the file has {}",
            header.length,
            body.len()
        )));
    }
    if crc32fast::hash(body) != header.crc32 {
        return Err(bad(
            "its checksum does not match: the file is damaged".into()
        ));
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    fn all<T: super::records::Versioned>(values: Vec<Value>) -> Result<Vec<T>, StoreError> {
        values
            .into_iter()
            .map(|v| decode(T::RECORD, v.to_string().as_bytes()))
            .collect()
    }
    Ok(Snapshot {
        identity: StoreIdentity {
            store_id: header.store_id,
            epoch: header.epoch,
        },
        taken_at_ms: header.taken_at_ms,
        apps: all(body.apps)?,
        providers: all(body.providers)?,
        assignments: all(body.assignments)?,
        controls: match body.controls {
            Some(v) => decode("controls", v.to_string().as_bytes())?,
            None => Controls::default(),
        },
        tokens: all(body.tokens)?,
        certificates: all(body.certificates)?,
        events: all(body.events)?,
    })
}

/// Replaces the store in `dir` with the one in the backup file `file`,
/// keeping the replaced one aside. Refuses a damaged backup before touching
/// anything.
pub fn restore(dir: &Path, file: &Path) -> Result<StoreIdentity, StoreError> {
    let bytes = std::fs::read(file)
        .map_err(|e| StoreError::Backend(format!("cannot read {}: {e}", file.display())))?;
    let snapshot = read(&file.display().to_string(), &bytes)?;
    let previous_epoch = IdentityFile::of(dir)
        .read()
        .ok()
        .flatten()
        .map_or(0, |f| f.epoch);
    let identity = StoreIdentity {
        store_id: snapshot.identity.store_id.clone(),
        epoch: super::identity::next_epoch(snapshot.identity.epoch.max(previous_epoch)),
    };
    let store = SledStore::create_restored(dir, identity.clone())?;
    store.import_events(&snapshot.events)?;
    store.commit(
        Batch {
            put_apps: snapshot.apps,
            put_providers: snapshot.providers,
            put_assignments: snapshot.assignments,
            controls: Some(snapshot.controls),
            put_tokens: snapshot.tokens,
            put_certificates: snapshot.certificates,
            ..Batch::default()
        },
        true,
    )?;
    tracing::info!(backup = %file.display(), store_id = %identity.store_id, epoch = identity.epoch, "store restored from a backup");
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventReason, NewEvent};

    fn store_with_data(dir: &Path) -> (SledStore, StoreIdentity) {
        let (store, identity) =
            SledStore::open_checked(dir, super::super::Start::Resume).expect("a new store");
        let text = "
apiVersion: skymirror.dev/v1
kind: Provider
metadata: {name: a}
spec: {driver: process}
---
apiVersion: skymirror.dev/v1
kind: App
metadata: {name: web}
spec: {command: server, replicas: 2}
";
        let (apps, providers) = crate::model::testing::declared(text);
        let mut batch = Batch {
            put_apps: apps,
            put_providers: providers,
            ..Batch::default()
        };
        batch.put_apps[0].generation = 2;
        batch.events.push(NewEvent::app(
            EventReason::AppCreated,
            "web",
            "web created".into(),
        ));
        batch.controls = Some(Controls {
            cordoned: ["a".to_string()].into(),
            ..Controls::default()
        });
        let (token, _) = crate::security::tokens::new_token(
            crate::security::Role::Viewer,
            None,
            "",
            "dashboards",
            1,
        )
        .expect("randomness");
        batch.put_tokens.push(token);
        batch.put_certificates.push(AgentCertificate {
            serial: "01ab".into(),
            provider: "a".into(),
            agent_id: "agent-a".into(),
            not_before_ms: 1,
            not_after_ms: 2,
            revoked_at_ms: 3,
            issued_by: "join token 0123456789abcdef".into(),
        });
        store.commit(batch, true).expect("committed");
        (store, identity)
    }

    #[test]
    fn a_backup_restores_the_same_state_under_a_new_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let (store, identity) = store_with_data(&path);
        let bytes = export(&store, &identity).expect("exported");
        drop(store);
        let file = dir.path().join("backup");
        std::fs::write(&file, &bytes).expect("written");

        let restored = loop {
            match restore(&path, &file) {
                Err(StoreError::Backend(e)) if e.contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.expect("restored"),
            }
        };
        assert_eq!(restored.store_id, identity.store_id);
        assert!(
            restored.epoch > identity.epoch,
            "a restore starts a later epoch"
        );
        let (store, opened) =
            SledStore::open_checked(&path, super::super::Start::Resume).expect("it opens");
        assert_eq!(opened, restored);
        assert_eq!(store.apps().expect("apps")[0].generation, 2);
        assert_eq!(store.providers().expect("providers").len(), 1);
        assert!(store.controls().expect("controls").cordoned.contains("a"));
        assert_eq!(store.tokens().expect("tokens")[0].description, "dashboards");
        let cert = store.certificate("01ab").expect("read").expect("restored");
        assert_eq!(cert.revoked_at_ms, 3, "revocations survive a restore");
        let events = store.last_events(10).expect("events");
        assert_eq!(events[0].event.message, "web created");
        let aside = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("store.before-restore-")
            })
            .count();
        assert_eq!(aside, 1, "the replaced store is kept aside");
    }

    #[test]
    fn a_damaged_backup_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let (store, identity) = store_with_data(&path);
        let bytes = export(&store, &identity).expect("exported");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "no header line"),
            ("truncated", bytes[..bytes.len() - 10].to_vec(), "truncated"),
            (
                "not a backup",
                b"{\"kind\":\"x\",\"v\":1}\n{}".to_vec(),
                "not a skymirror backup",
            ),
            (
                "flipped",
                {
                    let mut b = bytes.clone();
                    let last = b.len() - 5;
                    b[last] ^= 0x20;
                    b
                },
                "checksum",
            ),
        ];
        for (what, data, message) in cases {
            let err = read("b", &data).expect_err(what);
            assert!(err.to_string().contains(message), "{what}: {err}");
        }
        let file = dir.path().join("backup");
        std::fs::write(&file, b"garbage").expect("written");
        assert!(restore(&path, &file).is_err());
        assert_eq!(store.apps().expect("untouched").len(), 1);
    }
}

//! Who a store is, and the guard that refuses to serve from a damaged one.
//!
//! Every store has an identity: an id fixed when it is created and an epoch
//! that changes when it is restored from a backup or reset on purpose. Agents
//! receive both with every assignment and order revisions only within one
//! epoch, so a restored or fresh store can take over its fleet.
//!
//! The identity lives twice: in the store itself (sled's `meta` tree, with a
//! counter of committed batches that every commit increments in the same
//! transaction) and in a small checksummed file beside the store directory
//! (`<store>.identity`), rewritten after durable commits. On start the two
//! must agree: a store whose database was deleted, truncated, rolled back or
//! replaced no longer holds the identity, or holds fewer commits than the
//! file saw acknowledged, and the daemon refuses it with one error naming the
//! file and what is wrong, instead of serving an empty or partial state.
//!
//! Ways out, both explicit: `--restore FILE` (a backup) or `--reset-store`
//! (start fresh on purpose); either keeps the damaged store aside.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::now_ms;

/// A store's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreIdentity {
    /// Fixed when the store is created; kept across restores and resets, so
    /// agents know it is the same control plane.
    pub store_id: String,
    /// Changes on every restore and deliberate reset.
    pub epoch: u64,
}

/// The identity file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct IdentityFileV1 {
    /// Always 1.
    pub v: u32,
    /// The store's id.
    pub store_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// A lower bound of the batches the store has committed durably: the
    /// store must hold at least this many.
    pub commits: u64,
    /// When the store was created, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// CRC-32 of the fields above, so a damaged file is told from a valid one.
    pub crc32: u32,
}

impl IdentityFileV1 {
    /// A file for `identity` with `commits` committed batches.
    pub fn new(identity: &StoreIdentity, commits: u64, created_at_ms: i64) -> Self {
        let mut f = IdentityFileV1 {
            v: 1,
            store_id: identity.store_id.clone(),
            epoch: identity.epoch,
            commits,
            created_at_ms,
            crc32: 0,
        };
        f.crc32 = f.checksum();
        f
    }

    fn checksum(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.v.to_be_bytes());
        h.update(self.store_id.as_bytes());
        h.update(&self.epoch.to_be_bytes());
        h.update(&self.commits.to_be_bytes());
        h.update(&self.created_at_ms.to_be_bytes());
        h.finalize()
    }

    /// The identity it records.
    pub fn identity(&self) -> StoreIdentity {
        StoreIdentity {
            store_id: self.store_id.clone(),
            epoch: self.epoch,
        }
    }
}

/// The identity file beside a store directory.
#[derive(Debug, Clone)]
pub(super) struct IdentityFile {
    path: PathBuf,
}

impl IdentityFile {
    /// The file of the store in `dir`: `<dir>.identity`.
    pub fn of(dir: &Path) -> Self {
        let mut name = dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".identity");
        IdentityFile {
            path: dir.with_file_name(name),
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads it; `None` when there is none.
    pub fn read(&self) -> Result<Option<IdentityFileV1>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Damaged {
                    path: self.path.clone(),
                    reason: format!("cannot read it: {e}"),
                });
            }
        };
        let damaged = |reason: String| StoreError::Damaged {
            path: self.path.clone(),
            reason,
        };
        let f: IdentityFileV1 = serde_json::from_slice(&bytes).map_err(|e| {
            damaged(format!(
                "it is not a store identity ({} bytes): {e}",
                bytes.len()
            ))
        })?;
        if f.v != 1 {
            return Err(damaged(format!(
                "identity version {} is not supported (this build reads version 1)",
                f.v
            )));
        }
        if f.checksum() != f.crc32 {
            return Err(damaged("its checksum does not match its content".into()));
        }
        Ok(Some(f))
    }

    /// Replaces it atomically (a temporary file, synced, renamed, and the
    /// directory synced), readable by its owner only.
    pub fn write(&self, f: &IdentityFileV1) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", self.path.display()));
        let bytes = serde_json::to_vec(f)
            .map_err(|e| StoreError::Backend(format!("cannot encode the store identity: {e}")))?;
        let tmp = self.path.with_extension("identity.tmp");
        {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(parent) = self.path.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}

/// The epoch a restore or a reset starts: above every epoch it follows, and
/// at least the wall clock in ms, so two restores of one backup (or into an
/// emptied data dir, which keeps no record of the last epoch) never share an
/// epoch that agents would order revisions across.
pub(super) fn next_epoch(after: u64) -> u64 {
    after
        .saturating_add(1)
        .max(u64::try_from(now_ms()).unwrap_or(0))
}

/// A new identity from the OS CSPRNG.
pub(super) fn new_identity(epoch: u64) -> Result<StoreIdentity, StoreError> {
    Ok(StoreIdentity {
        store_id: crate::random_id().map_err(|e| StoreError::Backend(e.to_string()))?,
        epoch,
    })
}

/// Creation time for a new identity file.
pub(super) fn created_now() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = IdentityFile::of(&dir.path().join("store"));
        assert_eq!(file.path(), dir.path().join("store.identity"));
        assert!(file.read().expect("absent is fine").is_none());
        let id = StoreIdentity {
            store_id: "s".into(),
            epoch: 3,
        };
        let written = IdentityFileV1::new(&id, 41, 7);
        file.write(&written).expect("written");
        assert_eq!(file.read().expect("reads"), Some(written.clone()));

        let mut tampered = written;
        tampered.commits = 1;
        std::fs::write(file.path(), serde_json::to_vec(&tampered).expect("json")).expect("write");
        let err = file.read().expect_err("checksum");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(err.to_string().contains("store.identity"), "{err}");

        std::fs::write(file.path(), b"").expect("truncate");
        let err = file.read().expect_err("empty");
        assert!(err.to_string().contains("0 bytes"), "{err}");
    }
}

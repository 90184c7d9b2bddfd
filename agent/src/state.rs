//! What the agent keeps in its state directory so that it survives its own
//! restart and an unreachable daemon (static stability).
//!
//! Layout: `agent-id` (stable id of this installation), `assignment.pb` (the
//! last assignment received, as the daemon sent it), `replicas.json` (the
//! handle of every replica instance, versioned), `replicas/` (the driver's).
//! Every file is replaced atomically (write, fsync, rename).

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use skymirror_proto::v1 as pb;

use crate::driver::{Handle, ReplicaKey};

/// Version of `replicas.json`.
const REPLICAS_VERSION: u32 = 1;

/// Why reading or writing state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File system error. Usually not retryable (permissions, full disk).
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A state file is corrupt or from an incompatible version.
    #[error("{path}: {reason}")]
    Corrupt {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No randomness for a new agent id. Not retryable.
    #[error("creating the agent id")]
    Randomness(#[from] crate::random::NoRandomness),
}

/// One replica instance as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedReplica {
    /// Which replica.
    pub key: ReplicaKey,
    /// The driver's handle of the running instance.
    pub handle: Handle,
    /// App generation the replica reflected.
    pub generation: u64,
    /// Workload generation it runs.
    pub workload_generation: u64,
    /// Unplanned restarts so far.
    pub restarts: u32,
}

#[derive(Serialize, Deserialize)]
struct ReplicasFile {
    v: u32,
    replicas: Vec<PersistedReplica>,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `bytes` atomically.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

impl StateDir {
    /// Opens (creating if needed) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The installation's stable agent id, created on first use: a random
    /// UUID from the OS CSPRNG.
    pub fn agent_id(&self) -> Result<String, StateError> {
        let path = self.dir.join("agent-id");
        if let Some(raw) = read_optional(&path)? {
            let id = String::from_utf8_lossy(&raw).trim().to_string();
            if !id.is_empty() {
                return Ok(id);
            }
        }
        let id = crate::random::uuid_v4()?;
        write_atomic(&path, id.as_bytes())?;
        Ok(id)
    }

    /// The last assignment received, if any.
    pub fn load_assignment(&self) -> Result<Option<pb::Assignment>, StateError> {
        let path = self.dir.join("assignment.pb");
        read_optional(&path)?
            .map(|raw| {
                pb::Assignment::decode(raw.as_slice()).map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// Persists the assignment being converged to.
    pub fn save_assignment(&self, a: &pb::Assignment) -> Result<(), StateError> {
        write_atomic(&self.dir.join("assignment.pb"), &a.encode_to_vec())
    }

    /// The lease deadline on singletons, ms since the Unix epoch, if persisted.
    pub fn load_lease(&self) -> Result<Option<i64>, StateError> {
        let path = self.dir.join("lease");
        Ok(read_optional(&path)?.and_then(|raw| String::from_utf8_lossy(&raw).trim().parse().ok()))
    }

    /// Persists the lease deadline so a restarted agent keeps, and no longer
    /// than, the lease it had.
    pub fn save_lease(&self, deadline_ms: i64) -> Result<(), StateError> {
        write_atomic(&self.dir.join("lease"), deadline_ms.to_string().as_bytes())
    }

    /// The persisted replica handles.
    pub fn load_replicas(&self) -> Result<Vec<PersistedReplica>, StateError> {
        let path = self.dir.join("replicas.json");
        let Some(raw) = read_optional(&path)? else {
            return Ok(Vec::new());
        };
        let file: ReplicasFile = serde_json::from_slice(&raw).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.v != REPLICAS_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!("version {} is not supported", file.v),
            });
        }
        Ok(file.replicas)
    }

    /// Persists the replica handles.
    pub fn save_replicas(&self, replicas: Vec<PersistedReplica>) -> Result<(), StateError> {
        let path = self.dir.join("replicas.json");
        let raw = serde_json::to_vec(&ReplicasFile {
            v: REPLICAS_VERSION,
            replicas,
        })
        .map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_the_agent_id() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        let id = state.agent_id()?;
        assert_eq!(StateDir::open(dir.path())?.agent_id()?, id);
        assert!(state.load_assignment()?.is_none());
        let a = pb::Assignment {
            provider: "p".into(),
            revision: 7,
            apps: vec![],
            ..Default::default()
        };
        state.save_assignment(&a)?;
        assert_eq!(state.load_assignment()?, Some(a));
        let r = PersistedReplica {
            key: ReplicaKey {
                app: "web".into(),
                index: 1,
            },
            handle: Handle {
                driver: "process".into(),
                instance_id: "42".into(),
                address: None,
                ports: Default::default(),
                started_at_ms: 1,
                data: serde_json::Value::Null,
            },
            generation: 2,
            workload_generation: 1,
            restarts: 0,
        };
        state.save_replicas(vec![r.clone()])?;
        assert_eq!(state.load_replicas()?, vec![r]);
        std::fs::write(
            dir.path().join("replicas.json"),
            b"{\"v\":9,\"replicas\":[]}",
        )?;
        assert!(matches!(
            state.load_replicas(),
            Err(StateError::Corrupt { .. })
        ));
        Ok(())
    }
}

//! What the agent keeps in its state directory so that it survives its own
//! restart and an unreachable daemon (static stability).
//!
//! Layout: `agent-id` (stable id of this installation), `assignment.pb` (the
//! last assignment received, as the daemon sent it, with the daemon store's
//! id and epoch), `replicas.json` (the handle of every replica instance),
//! `lease` (when the lease on singletons ends), `replicas/` (the driver's).
//! Every file is a checked file ([`crate::checked`]: a format version, the
//! payload's length and a CRC-32), replaced atomically, mode 0600.
//!
//! A damaged file is never read as "nothing": its reader gets
//! [`StateError::Corrupt`] naming the file and what is wrong, and decides
//! (see [`crate::supervisor`]): a damaged assignment leaves every replica as
//! it is until the daemon sends its assignment again; damaged handles are
//! replaced by what the driver finds running; a damaged lease is no lease (the
//! safe side: singletons wait for the daemon's renewal); a damaged agent id is
//! replaced by a new one, the damaged file kept aside.
//!
//! Files written by releases before checked files (no header) are still read,
//! when they look like what that release wrote, and rewritten checked at
//! once.

use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use skymirror_proto::v1 as pb;

use crate::checked::{self, Damage, Opened};
use crate::driver::{Handle, ReplicaKey};

/// Version of the record inside `replicas.json`.
const REPLICAS_VERSION: u32 = 1;

/// The files, and the kind each one's header names.
const AGENT_ID: (&str, &str) = ("agent-id", "agent-id");
const ASSIGNMENT: (&str, &str) = ("assignment.pb", "assignment");
const REPLICAS: (&str, &str) = ("replicas.json", "replicas");
const LEASE: (&str, &str) = ("lease", "lease");

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
    /// A state file is damaged, of a format version this agent cannot read,
    /// or holds something it cannot use. Not retryable: the file stays as it
    /// is until the agent writes it again.
    #[error("{path}: {reason}")]
    Corrupt {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: Damage,
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

/// The record inside `replicas.json`.
#[derive(Serialize, Deserialize)]
struct ReplicasFile {
    /// Version of this record, [`REPLICAS_VERSION`].
    v: u32,
    /// Every replica with a running instance.
    replicas: Vec<PersistedReplica>,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// Where the files are.
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Whether `id` looks like the agent ids releases before checked files wrote:
/// a UUID in its usual text form.
fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
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

    /// Writes `payload` as the checked file `name` holding `kind`.
    fn write(&self, (name, kind): (&str, &str), payload: &[u8]) -> Result<(), StateError> {
        let path = self.dir.join(name);
        checked::write_atomic(&path, &checked::seal(kind, payload)).map_err(io(&path))
    }

    /// Reads the checked file `name` holding `kind` through `decode`; `None`
    /// when there is no such file. A file of an earlier release (no header)
    /// is taken when `decode` takes it (told it is one: `true`, so it can ask
    /// for what that release always wrote), and rewritten checked at once.
    fn read<T>(
        &self,
        (name, kind): (&str, &'static str),
        decode: impl Fn(&[u8], bool) -> Result<T, String>,
    ) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        let Some(raw) = read_optional(&path)? else {
            return Ok(None);
        };
        let corrupt = |reason| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        match checked::open(&raw, kind).map_err(corrupt)? {
            Opened::Checked(payload) => decode(payload, false)
                .map(Some)
                .map_err(|why| corrupt(Damage::Content(format!("damaged: {why}")))),
            Opened::Legacy(whole) => {
                let value = decode(whole, true).map_err(|why| {
                    corrupt(Damage::Content(format!(
                        "damaged: it has no header of this release, and is not a readable {kind} \
                         file of an earlier one: {why}"
                    )))
                })?;
                tracing::info!(file = %path.display(), "state file of an earlier release read; rewriting it with a version and a checksum");
                self.write((name, kind), whole)?;
                Ok(Some(value))
            }
        }
    }

    /// The installation's stable agent id, created on first use: a random
    /// UUID from the OS CSPRNG. A damaged id file is kept aside as
    /// `agent-id.damaged` and replaced by a new id, with a warning: the id
    /// only names the installation to the daemon, so a new one changes
    /// nothing that runs.
    pub fn agent_id(&self) -> Result<String, StateError> {
        let decode = |raw: &[u8], _| {
            let id = String::from_utf8_lossy(raw).trim().to_string();
            if is_uuid(&id) {
                Ok(id)
            } else {
                Err(format!(
                    "{:?} is not an agent id",
                    id.chars().take(40).collect::<String>()
                ))
            }
        };
        match self.read(AGENT_ID, decode) {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => {}
            Err(damaged @ StateError::Corrupt { .. }) => {
                let path = self.dir.join(AGENT_ID.0);
                let aside = self.dir.join("agent-id.damaged");
                std::fs::rename(&path, &aside).map_err(io(&path))?;
                tracing::warn!(error = %damaged, kept = %aside.display(), "the agent id is damaged: this agent takes a new id, and the daemon will see it as a new installation of its provider");
            }
            Err(e) => return Err(e),
        }
        let id = crate::random::uuid_v4()?;
        self.write(AGENT_ID, id.as_bytes())?;
        Ok(id)
    }

    /// The last assignment received, if any. One for another provider than
    /// `provider` (a state directory reused with another `--provider`) is
    /// unusable like a damaged one.
    pub fn load_assignment(&self, provider: &str) -> Result<Option<pb::Assignment>, StateError> {
        self.read(ASSIGNMENT, |raw, legacy| {
            let a = pb::Assignment::decode(raw).map_err(|e| e.to_string())?;
            // Without a checksum, only what the daemon always sent is taken
            // for an assignment: its provider named, a revision counted from
            // 1. Arbitrary bytes often decode as an empty message, which
            // would stop every replica.
            if legacy && (a.provider.is_empty() || a.revision == 0) {
                return Err("it names no provider or no revision".into());
            }
            if !a.provider.is_empty() && a.provider != provider {
                return Err(format!(
                    "it holds the assignment of provider {:?}; this agent runs provider {provider:?}",
                    a.provider
                ));
            }
            Ok(a)
        })
    }

    /// Persists the assignment being converged to.
    pub fn save_assignment(&self, a: &pb::Assignment) -> Result<(), StateError> {
        self.write(ASSIGNMENT, &a.encode_to_vec())
    }

    /// The lease deadline on singletons, ms since the Unix epoch, if persisted.
    pub fn load_lease(&self) -> Result<Option<i64>, StateError> {
        self.read(LEASE, |raw, _| {
            let text = String::from_utf8_lossy(raw);
            text.trim().parse().map_err(|_| {
                format!(
                    "{:?} is not a time",
                    text.chars().take(40).collect::<String>()
                )
            })
        })
    }

    /// Persists the lease deadline so a restarted agent keeps, and no longer
    /// than, the lease it had.
    pub fn save_lease(&self, deadline_ms: i64) -> Result<(), StateError> {
        self.write(LEASE, deadline_ms.to_string().as_bytes())
    }

    /// The persisted replica handles; empty when none were ever persisted.
    pub fn load_replicas(&self) -> Result<Vec<PersistedReplica>, StateError> {
        let replicas = self.read(REPLICAS, |raw, _| {
            let file: ReplicasFile = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
            if file.v != REPLICAS_VERSION {
                return Err(format!(
                    "record version {} is not supported (this agent reads {REPLICAS_VERSION})",
                    file.v
                ));
            }
            Ok(file.replicas)
        })?;
        Ok(replicas.unwrap_or_default())
    }

    /// Persists the replica handles.
    pub fn save_replicas(&self, replicas: Vec<PersistedReplica>) -> Result<(), StateError> {
        let raw = serde_json::to_vec(&ReplicasFile {
            v: REPLICAS_VERSION,
            replicas,
        })
        .map_err(|e| StateError::Corrupt {
            path: self.dir.join(REPLICAS.0),
            reason: Damage::Content(format!("cannot encode the replica handles: {e}")),
        })?;
        self.write(REPLICAS, &raw)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn replica() -> PersistedReplica {
        PersistedReplica {
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
        }
    }

    fn assignment() -> pb::Assignment {
        pb::Assignment {
            provider: "p".into(),
            revision: 7,
            store_id: "s1".into(),
            epoch: 2,
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_and_keeps_the_agent_id() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        let id = state.agent_id()?;
        assert_eq!(StateDir::open(dir.path())?.agent_id()?, id);
        assert!(state.load_assignment("p")?.is_none());
        let a = pb::Assignment {
            provider: "p".into(),
            revision: 7,
            apps: vec![],
            ..Default::default()
        };
        state.save_assignment(&a)?;
        assert_eq!(state.load_assignment("p")?, Some(a));
        let r = replica();
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

    #[test]
    fn every_file_is_checked_and_private() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        state.agent_id()?;
        state.save_assignment(&assignment())?;
        state.save_replicas(vec![replica()])?;
        state.save_lease(1234)?;
        for (name, kind) in [
            ("agent-id", "agent-id"),
            ("assignment.pb", "assignment"),
            ("replicas.json", "replicas"),
            ("lease", "lease"),
        ] {
            let path = dir.path().join(name);
            let raw = std::fs::read(&path)?;
            assert!(
                matches!(checked::open(&raw, kind), Ok(Opened::Checked(_))),
                "{name} is not a checked file"
            );
            let mode = std::fs::metadata(&path)?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{name} mode {mode:o}");
        }
        assert_eq!(state.load_lease()?, Some(1234));
        Ok(())
    }

    /// Turns a good file's bytes into damaged ones.
    type Damager = dyn Fn(&[u8]) -> Vec<u8>;

    /// Damages `name` in each way and expects the reader to say so, naming
    /// the file.
    fn each_damage_is_an_error(
        name: &str,
        write: impl Fn(&StateDir),
        read: impl Fn(&StateDir) -> Result<(), StateError>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("state");
        let path = dir.path().join(name);
        let damages: [(&str, &Damager, &str); 5] = [
            ("emptied", &|_| Vec::new(), "it is empty (0 bytes)"),
            ("truncated", &|b| b[..b.len() - 3].to_vec(), "truncated"),
            (
                "overwritten at the start",
                &|b| {
                    let mut b = b.to_vec();
                    b[..8].copy_from_slice(b"\x9e\x37\x79\xb9\x01\x02\x03\x04");
                    b
                },
                "damaged",
            ),
            (
                "flipped in the payload",
                &|b| {
                    let mut b = b.to_vec();
                    let last = b.len() - 1;
                    b[last] ^= 0x01;
                    b
                },
                "checksum does not match",
            ),
            (
                "from a newer release",
                &|b| {
                    String::from_utf8_lossy(b)
                        .replacen(" 1 ", " 2 ", 1)
                        .into_bytes()
                },
                "format version 2",
            ),
        ];
        for (how, damage, expected) in damages {
            write(&state);
            let good = std::fs::read(&path).expect("read");
            std::fs::write(&path, damage(&good)).expect("damage");
            match read(&state) {
                Err(e @ StateError::Corrupt { .. }) => {
                    let message = e.to_string();
                    assert!(
                        message.starts_with(&path.display().to_string())
                            && message.contains(expected),
                        "{name} {how}: {message}"
                    );
                }
                other => panic!("{name} {how}: read as {other:?}"),
            }
        }
    }

    #[test]
    fn a_damaged_assignment_handle_or_lease_file_is_an_error_naming_it() {
        each_damage_is_an_error(
            "assignment.pb",
            |s| s.save_assignment(&assignment()).expect("save"),
            |s| s.load_assignment("p").map(|_| ()),
        );
        each_damage_is_an_error(
            "replicas.json",
            |s| s.save_replicas(vec![replica()]).expect("save"),
            |s| s.load_replicas().map(|_| ()),
        );
        each_damage_is_an_error(
            "lease",
            |s| s.save_lease(1_700_000_000_000).expect("save"),
            |s| s.load_lease().map(|_| ()),
        );
    }

    #[test]
    fn an_assignment_of_another_provider_is_unusable() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        state.save_assignment(&assignment())?;
        let err = state.load_assignment("q").expect_err("another provider's");
        assert!(
            err.to_string().contains(
                "it holds the assignment of provider \"p\"; this agent runs provider \"q\""
            ),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn files_of_an_earlier_release_are_read_and_rewritten_checked()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        // As the release before checked files wrote them.
        let id = "6f1c1a9e-1d2b-4c3d-8e4f-0123456789ab";
        let old_assignment = pb::Assignment {
            provider: "p".into(),
            revision: 5,
            ..Default::default()
        };
        let old_replicas = serde_json::to_vec(&ReplicasFile {
            v: 1,
            replicas: vec![replica()],
        })?;
        std::fs::write(dir.path().join("agent-id"), id)?;
        std::fs::write(
            dir.path().join("assignment.pb"),
            old_assignment.encode_to_vec(),
        )?;
        std::fs::write(dir.path().join("replicas.json"), &old_replicas)?;
        std::fs::write(dir.path().join("lease"), "1700000000000")?;

        let state = StateDir::open(dir.path())?;
        assert_eq!(state.agent_id()?, id);
        assert_eq!(state.load_assignment("p")?, Some(old_assignment.clone()));
        assert_eq!(state.load_replicas()?, vec![replica()]);
        assert_eq!(state.load_lease()?, Some(1_700_000_000_000));
        for (name, kind) in [
            ("agent-id", "agent-id"),
            ("assignment.pb", "assignment"),
            ("replicas.json", "replicas"),
            ("lease", "lease"),
        ] {
            let raw = std::fs::read(dir.path().join(name))?;
            assert!(
                matches!(checked::open(&raw, kind), Ok(Opened::Checked(_))),
                "{name} was not rewritten checked"
            );
        }
        // And read the same afterwards.
        assert_eq!(state.agent_id()?, id);
        assert_eq!(state.load_assignment("p")?, Some(old_assignment));
        Ok(())
    }

    #[test]
    fn old_files_that_do_not_look_like_the_old_release_are_damaged()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        let cut = pb::Assignment {
            provider: "p".into(),
            revision: 5,
            apps: vec![pb::AppAssignment {
                app: "web".into(),
                replicas: 2,
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        // An old assignment cut inside a field, and random bytes.
        for bytes in [&cut[..cut.len() - 2], b"\xff\xfe\xfd\xfc garbage"] {
            std::fs::write(dir.path().join("assignment.pb"), bytes)?;
            let err = state.load_assignment("p").expect_err("damaged");
            assert!(
                err.to_string()
                    .contains("not a readable assignment file of an earlier one"),
                "{err}"
            );
        }
        std::fs::write(
            dir.path().join("replicas.json"),
            b"{\"v\":1,\"replicas\":[{\"key\"",
        )?;
        assert!(matches!(
            state.load_replicas(),
            Err(StateError::Corrupt { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_damaged_agent_id_is_replaced_and_kept_aside() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::open(dir.path())?;
        let first = state.agent_id()?;
        for damage in [
            &b""[..],
            b"6f1c1a9e-1d2b",
            b"skymirror-agent-state 1 agent-id 36 0000",
        ] {
            std::fs::write(dir.path().join("agent-id"), damage)?;
            let next = state.agent_id()?;
            assert!(is_uuid(&next) && next != first, "{next}");
            assert_eq!(std::fs::read(dir.path().join("agent-id.damaged"))?, damage);
            assert_eq!(state.agent_id()?, next, "the new id is kept");
        }
        Ok(())
    }
}

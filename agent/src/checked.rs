//! Checked files: the envelope around every file the agent keeps (the files
//! of its state directory, and the process driver's handle of each replica),
//! so that a damaged file is told apart from a good one instead of being read
//! as "nothing".
//!
//! A checked file is one header line, then the payload:
//!
//! ```text
//! skymirror-agent-state 1 assignment 1234 0a1b2c3d
//! <1234 bytes of payload>
//! ```
//!
//! The format version, what the file holds, the payload's length in bytes and
//! its CRC-32 (IEEE, in hex). A file that is empty, shorter or longer than its
//! header says, whose checksum does not match, that holds something else, or
//! whose header cannot be read is damaged ([`Damage`]); a file of another
//! format version is refused the same way. A file that does not begin with
//! the header was written by a release before checked files (or is not the
//! agent's at all): [`open`] hands it back as [`Opened::Legacy`], and its
//! reader decides whether it can take it.
//!
//! [`write_atomic`] replaces a file whole (a temporary file, fsync, rename,
//! fsync of the directory) with mode 0600: the files name the host's
//! processes, and an assignment holds the apps' environments.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The envelope's format version, the first field of the header.
pub const FORMAT_VERSION: u32 = 1;

/// How every checked file begins.
const MAGIC: &[u8] = b"skymirror-agent-state ";

/// Longest header line read: the magic, the version, a kind, a length and a
/// checksum fit with room to spare.
const MAX_HEADER: usize = 160;

/// What is wrong with a checked file. Not retryable: the file stays as it is
/// until the agent writes it again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// Nothing in it (a crash or a full disk between creating and writing a
    /// file, by a tool other than the agent).
    #[error("damaged: it is empty (0 bytes)")]
    Empty,
    /// The header line is cut or garbled.
    #[error("damaged: its header cannot be read ({0})")]
    Header(String),
    /// It holds another kind of state than its name says.
    #[error("damaged: it holds `{found}`, not `{expected}`")]
    Kind {
        /// What its header says it holds.
        found: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// Shorter than its header announces.
    #[error("damaged: truncated: its header announces {expected} bytes, {found} follow")]
    Truncated {
        /// Bytes announced.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// Longer than its header announces.
    #[error("damaged: {extra} bytes follow the {expected} its header announces")]
    Trailing {
        /// Bytes announced.
        expected: u64,
        /// Bytes beyond them.
        extra: u64,
    },
    /// The payload is not what was written.
    #[error(
        "damaged: its checksum does not match (crc32 {recorded:08x} recorded, {computed:08x} computed)"
    )]
    Checksum {
        /// The checksum in the header.
        recorded: u32,
        /// The checksum of the payload as read.
        computed: u32,
    },
    /// A format version this agent cannot read.
    #[error(
        "format version {found}, which this agent cannot read (it reads version {FORMAT_VERSION}; \
         was it written by a newer release?)"
    )]
    Version {
        /// The version in the header.
        found: u32,
    },
    /// The envelope is sound (or there is none) but what it holds cannot be
    /// used; the reason names the content.
    #[error("{0}")]
    Content(String),
}

/// A file's bytes as [`open`] found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened<'a> {
    /// A sound checked file: its payload.
    Checked(&'a [u8]),
    /// No envelope: written by an earlier release, or not the agent's; the
    /// whole file.
    Legacy(&'a [u8]),
}

/// The bytes of a checked file holding `kind` with `payload`.
pub fn seal(kind: &str, payload: &[u8]) -> Vec<u8> {
    let header = format!(
        "{}{FORMAT_VERSION} {kind} {} {:08x}\n",
        String::from_utf8_lossy(MAGIC),
        payload.len(),
        crc32fast::hash(payload)
    );
    let mut out = Vec::with_capacity(header.len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the bytes of a file that should hold `kind`.
pub fn open<'a>(bytes: &'a [u8], kind: &'static str) -> Result<Opened<'a>, Damage> {
    if bytes.is_empty() {
        return Err(Damage::Empty);
    }
    // A file cut inside the magic itself is a checked file too.
    if !bytes.starts_with(MAGIC) && !MAGIC.starts_with(bytes) {
        return Ok(Opened::Legacy(bytes));
    }
    let end = bytes
        .iter()
        .take(MAX_HEADER)
        .position(|b| *b == b'\n')
        .ok_or_else(|| Damage::Header("no end of line within its first bytes".into()))?;
    let line = std::str::from_utf8(&bytes[MAGIC.len().min(end)..end])
        .map_err(|_| Damage::Header("not text".into()))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [version, found_kind, len, crc] = fields.as_slice() else {
        return Err(Damage::Header(format!(
            "{} fields where 4 belong",
            fields.len()
        )));
    };
    let version: u32 = version
        .parse()
        .map_err(|_| Damage::Header(format!("version {version:?}")))?;
    if version != FORMAT_VERSION {
        return Err(Damage::Version { found: version });
    }
    if *found_kind != kind {
        return Err(Damage::Kind {
            found: (*found_kind).to_string(),
            expected: kind,
        });
    }
    let expected: u64 = len
        .parse()
        .map_err(|_| Damage::Header(format!("length {len:?}")))?;
    let recorded = u32::from_str_radix(crc, 16)
        .ok()
        .filter(|_| crc.len() == 8)
        .ok_or_else(|| Damage::Header(format!("checksum {crc:?}")))?;
    let payload = &bytes[end + 1..];
    let found = payload.len() as u64;
    if found < expected {
        return Err(Damage::Truncated { expected, found });
    }
    if found > expected {
        return Err(Damage::Trailing {
            expected,
            extra: found - expected,
        });
    }
    let computed = crc32fast::hash(payload);
    if computed != recorded {
        return Err(Damage::Checksum { recorded, computed });
    }
    Ok(Opened::Checked(payload))
}

/// Replaces `path` with `bytes` atomically, mode 0600: a reader sees the old
/// file or the new one, and after a crash the new one only once it is whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, true)
}

/// [`write_atomic`] without waiting for the disk: for files that matter only
/// while the machine stays up (what they describe dies with it), where the
/// syncs would only slow every write. A reader still sees the old file or the
/// new one; after a machine crash the file may be damaged, which a checked
/// read reports.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, false)
}

fn replace(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A temporary file left by an earlier run keeps its mode: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is.
    if durable && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_payload_opens_as_it_was() {
        for payload in [&b""[..], b"x", b"line one\nline two\n", &[0u8, 255, 10, 13]] {
            let sealed = seal("lease", payload);
            assert_eq!(open(&sealed, "lease"), Ok(Opened::Checked(payload)));
        }
        let sealed = seal("assignment", b"abc");
        assert!(String::from_utf8_lossy(&sealed).starts_with(&format!(
            "skymirror-agent-state 1 assignment 3 {:08x}\n",
            crc32fast::hash(b"abc")
        )),);
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let sealed = seal("replicas", b"{\"v\":1,\"replicas\":[]}");
        let header_len = sealed.iter().position(|b| *b == b'\n').expect("header") + 1;
        assert_eq!(open(b"", "replicas"), Err(Damage::Empty));
        // Cut anywhere: in the magic, in the header, in the payload.
        for cut in [1, 5, MAGIC.len() + 3, header_len - 1] {
            assert!(
                matches!(open(&sealed[..cut], "replicas"), Err(Damage::Header(_))),
                "cut at {cut}: {:?}",
                open(&sealed[..cut], "replicas")
            );
        }
        assert_eq!(
            open(&sealed[..header_len + 4], "replicas"),
            Err(Damage::Truncated {
                expected: 21,
                found: 4
            })
        );
        let mut longer = sealed.clone();
        longer.extend_from_slice(b"xyz");
        assert_eq!(
            open(&longer, "replicas"),
            Err(Damage::Trailing {
                expected: 21,
                extra: 3
            })
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        assert!(matches!(
            open(&flipped, "replicas"),
            Err(Damage::Checksum { .. })
        ));
        assert_eq!(
            open(&sealed, "lease"),
            Err(Damage::Kind {
                found: "replicas".into(),
                expected: "lease"
            })
        );
        let newer = String::from_utf8_lossy(&sealed).replacen(" 1 ", " 7 ", 1);
        let refused = open(newer.as_bytes(), "replicas");
        assert_eq!(refused, Err(Damage::Version { found: 7 }));
        assert!(
            refused
                .expect_err("refused")
                .to_string()
                .contains("format version 7, which this agent cannot read")
        );
        let garbled = String::from_utf8_lossy(&sealed).replacen(" 21 ", " 2x ", 1);
        assert!(matches!(
            open(garbled.as_bytes(), "replicas"),
            Err(Damage::Header(_))
        ));
    }

    #[test]
    fn a_file_without_the_envelope_is_handed_back_whole() {
        let old = b"{\"v\":1,\"replicas\":[]}";
        assert_eq!(open(old, "replicas"), Ok(Opened::Legacy(&old[..])));
        assert_eq!(
            open(b"\x08\x07", "assignment"),
            Ok(Opened::Legacy(&b"\x08\x07"[..]))
        );
    }

    #[test]
    fn writes_replace_the_file_whole_and_private() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("lease");
        // A temporary file left by an earlier run, readable by everyone.
        std::fs::write(dir.path().join("lease.tmp"), b"old")?;
        std::fs::set_permissions(
            dir.path().join("lease.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )?;
        write_atomic(&path, b"one")?;
        write_atomic(&path, b"two")?;
        assert_eq!(std::fs::read(&path)?, b"two");
        let mode = std::fs::metadata(&path)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("lease.tmp").exists());
        Ok(())
    }
}

//! skymirror's control plane and command line.
//!
//! Layout: [`spec`] parses and validates the YAML documents; [`model`] holds
//! the domain (declared objects, assignments, reported replicas, typed
//! events); [`store`] persists it as versioned records (sled behind the
//! `Store` trait); [`scheduler`] and [`liveness`] are pure decisions, and
//! [`pass`] turns them into a reconcile plan; [`daemon`] is the context of
//! parts ([`registry`] of agents, event fan-out, routes, reconciler) whose
//! behaviour lives beside each concern: [`apply`], [`controls`],
//! [`reconciler`], [`monitor`], [`explain`], [`reports`], [`summary`],
//! [`logs`]; [`api`] is the gRPC layer (the only place for protobuf and
//! `tonic::Status`); [`cli`] and [`dev`] are the `skymirror` command's verbs
//! and all-in-one mode. The front door (`skymirror edge`) is the
//! `skymirror-edge` crate.

pub mod api;
pub mod apply;
pub mod cli;
pub mod controls;
pub mod daemon;
pub mod dev;
pub mod error;
pub mod explain;
pub mod liveness;
pub mod logs;
pub mod model;
pub mod monitor;
pub mod pass;
pub mod reconciler;
pub mod registry;
pub mod reports;
pub mod scheduler;
pub mod spec;
pub mod store;
pub mod summary;

/// The operating system could not give random bytes.
#[derive(Debug, thiserror::Error)]
#[error("the operating system gave no random bytes: {0}")]
pub struct RandomnessError(String);

fn random_bytes<const N: usize>() -> Result<[u8; N], RandomnessError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| RandomnessError(e.to_string()))?;
    Ok(buf)
}

/// A secret from the OS CSPRNG (128 bits, hex), for join tokens.
pub fn random_token() -> Result<String, RandomnessError> {
    Ok(random_bytes::<16>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A random version-4 UUID from the OS CSPRNG, for instance ids.
pub fn random_id() -> Result<String, RandomnessError> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

pub use skymirror_agent::shutdown_signal;

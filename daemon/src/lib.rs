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
//! [`logs`], [`access`] (tokens, joins, agents' admission, revocation);
//! [`security`] holds the pure parts of who may do what (the PKI, tokens
//! and roles, rates, sanitizing); [`api`] is the gRPC layer (the only place
//! for protobuf and `tonic::Status`, with TLS and the authentication layer);
//! [`cli`] and [`dev`] are the `skymirror` command's verbs and all-in-one
//! mode. The front door (`skymirror edge`) is the
//! `skymirror-edge` crate.

pub mod access;
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
pub mod security;
pub mod spec;
pub mod store;
pub mod summary;

/// The operating system could not give random bytes.
pub use skymirror_agent::random::NoRandomness as RandomnessError;

/// A secret from the OS CSPRNG (a random UUID, 122 random bits), for join
/// tokens.
pub fn random_token() -> Result<String, RandomnessError> {
    skymirror_agent::random::uuid_v4()
}

/// A random UUID from the OS CSPRNG, for instance and store ids.
pub fn random_id() -> Result<String, RandomnessError> {
    skymirror_agent::random::uuid_v4()
}

pub use skymirror_agent::shutdown_signal;

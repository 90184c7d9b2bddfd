//! skymirror's control plane and command line.
//!
//! Layout: [`spec`] parses and validates the YAML documents; [`store`] keeps
//! desired state, actual state and events (sled behind the `Store` trait);
//! [`scheduler`] decides placement (pure); [`daemon`] owns the context, the
//! apply path and the reconcile loop; [`control`] and [`agents`] are the two
//! gRPC services; [`convert`] maps stored records to wire types; [`cli`] and
//! [`dev`] are the `skymirror` command's verbs and all-in-one mode; [`logs`]
//! reads replica output through the agents for `ControlService.Logs`. The
//! front door (`skymirror edge`) is the `skymirror-edge` crate.

pub mod agents;
pub mod cli;
pub mod control;
pub mod convert;
pub mod daemon;
pub mod dev;
pub mod error;
pub mod liveness;
pub mod logs;
pub mod scheduler;
pub mod spec;
pub mod store;

/// A random token (a v4 UUID from the kernel), for join tokens.
pub fn random_token() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{:x}-{}", store::now_ms(), std::process::id()))
}

pub use skymirror_agent::shutdown_signal;

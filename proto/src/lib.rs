//! The skymirror gRPC API, package `skymirror.v1`, generated from the `.proto`
//! files beside this crate.
//!
//! Layout: `skymirror/v1/types.proto` (objects, replica status, events),
//! `control.proto` (`ControlService`, used by the CLI) and `agent.proto`
//! (`AgentService`, one stream per agent). [`FILE_DESCRIPTOR_SET`] feeds server
//! reflection so stock gRPC tools work against the daemon.

/// Generated types and services of `skymirror.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("skymirror.v1");
}

/// Encoded `FileDescriptorSet` of every skymirror proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/skymirror_descriptor.bin"));

//! The in-sandbox agent protocol, `opensandbox.agent.v1`, as generated Rust:
//! the host uses the client, the agent the server. The contract itself is
//! `proto/opensandbox/agent/v1/agent.proto`.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("opensandbox.agent.v1");
}

/// The protocol's major version: the `v1` in the package name.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Grows with each backward-compatible addition to v1.
pub const PROTOCOL_MINOR: u32 = 0;
/// Where the agent listens inside the sandbox, and the folder the host
/// mounts there (one per sandbox).
pub const SOCKET_DIR_IN_SANDBOX: &str = "/.opensandbox/run";
/// The socket's file name inside that folder.
pub const SOCKET_NAME: &str = "agent.sock";
/// Where the host mounts the agent binary (read-only) inside the sandbox.
pub const BINARY_IN_SANDBOX: &str = "/.opensandbox/agent";

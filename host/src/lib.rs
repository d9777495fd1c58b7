//! The OpenSandbox host as a library: each module is one part of the host
//! with a narrow interface. The `opensandbox` binary (main.rs) wires them.
//!
//! - [`config`]: command line and environment variables
//! - [`api`]: HTTP routes, extractors and the error mapping
//! - [`auth`]: API key generation and verification
//! - [`store`]: SQLite persistence of keys, sandboxes and snapshots
//! - [`sandbox`]: sandbox lifecycle, snapshots, restore, fork, recovery
//! - [`runtimes`]: what runs sandboxes (Docker)
//! - [`btrfs`]: subvolume and snapshot ioctls
//! - [`plugins`]: the Wasm plugin platform (policies and command hooks)
//! - [`names`]: validation of names that reach paths and commands
//! - [`s3`]: the S3 client for exported snapshots
//! - [`transfer`]: snapshot export and import jobs

pub mod agent;
pub mod api;
pub mod auth;
pub mod btrfs;
pub mod config;
pub mod names;
pub mod plugins;
pub mod runtimes;
pub mod s3;
pub mod sandbox;
pub mod store;
pub mod transfer;

//! Domain types of the store and their decoding from rows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::{parse_time, parse_uuid, Result, StoreError};

/// An API key as the service sees it (never its secret).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: Option<String>,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
}

impl ApiKey {
    pub(super) fn new(name: Option<&str>, admin: bool) -> Self {
        Self {
            id: Uuid::new_v4(),
            name: name.map(str::to_string),
            admin,
            created_at: Utc::now(),
        }
    }
}

/// Lifecycle of a sandbox. The transitional states are written before the
/// work starts so that a crash leaves a record of what to finish or undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    Creating,
    Running,
    Stopped,
    Restoring,
    Deleting,
    /// The runtime lost the sandbox (its container vanished) or a repair failed.
    Error,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Stopped => "stopped",
            SandboxState::Restoring => "restoring",
            SandboxState::Deleting => "deleting",
            SandboxState::Error => "error",
        }
    }
}

impl FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "stopped" => SandboxState::Stopped,
            "restoring" => SandboxState::Restoring,
            "deleting" => SandboxState::Deleting,
            "error" => SandboxState::Error,
            other => return Err(format!("unknown state {other:?}")),
        })
    }
}

/// The snapshot a sandbox was forked from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkSource {
    pub vm: String,
    pub snapshot: String,
}

/// What the caller provides to reserve a sandbox.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub owner_key_id: Uuid,
    pub name: String,
    pub image: String,
    pub runtime: String,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub forked_from: Option<ForkSource>,
}

#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: Uuid,
    pub owner_key_id: Uuid,
    pub name: String,
    pub image: String,
    pub runtime: String,
    pub state: SandboxState,
    /// Snapshot being restored while `state` is `Restoring`.
    pub pending_restore: Option<String>,
    pub container_id: Option<String>,
    /// The Btrfs subvolume that is the sandbox's writable root filesystem.
    pub rootfs_path: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub forked_from: Option<ForkSource>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub(super) fn key_from_row(row: &SqliteRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: parse_uuid("api_keys", row, "id")?,
        name: row.try_get("name")?,
        admin: row.try_get("admin")?,
        created_at: parse_time("api_keys", row, "created_at")?,
    })
}

pub(super) fn sandbox_from_row(row: &SqliteRow) -> Result<Sandbox> {
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "sandboxes",
        detail,
    };
    let state: String = row.try_get("state")?;
    let env: String = row.try_get("env")?;
    let labels: String = row.try_get("labels")?;
    let fork_vm: Option<String> = row.try_get("forked_from_vm")?;
    let fork_snapshot: Option<String> = row.try_get("forked_from_snapshot")?;
    let rootfs: Option<String> = row.try_get("rootfs_path")?;
    Ok(Sandbox {
        id: parse_uuid("sandboxes", row, "id")?,
        owner_key_id: parse_uuid("sandboxes", row, "owner_key_id")?,
        name: row.try_get("name")?,
        image: row.try_get("image")?,
        runtime: row.try_get("runtime")?,
        state: state.parse().map_err(corrupt)?,
        pending_restore: row.try_get("pending_restore")?,
        container_id: row.try_get("container_id")?,
        rootfs_path: rootfs.map(PathBuf::from),
        env: serde_json::from_str(&env).map_err(|e| corrupt(format!("env: {e}")))?,
        labels: serde_json::from_str(&labels).map_err(|e| corrupt(format!("labels: {e}")))?,
        forked_from: fork_vm
            .zip(fork_snapshot)
            .map(|(vm, snapshot)| ForkSource { vm, snapshot }),
        created_at: parse_time("sandboxes", row, "created_at")?,
    })
}

pub(super) fn snapshot_from_row(row: &SqliteRow) -> Result<Snapshot> {
    Ok(Snapshot {
        name: row.try_get("name")?,
        created_at: parse_time("snapshots", row, "created_at")?,
    })
}

//! Host capabilities of runtime plugins (the `btrfs` and `process` WIT
//! imports; the state folder is a WASI preopen). Each is granted per plugin
//! in the plugins file and checked on every call: a plugin without the
//! grant gets `not-granted`, whatever it asks.
//!
//! Every call of a runtime plugin also keeps a journal of the subvolumes
//! and processes it made, so that the host can undo a `create` that
//! failed, trapped or timed out without trusting the plugin to clean up.

pub mod btrfs;
pub mod cgroups;
pub mod process;
pub mod spares;
pub mod userns;
mod wit_host;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use btrfs::BtrfsRoot;
use process::ProcessTable;

/// Why a capability refused or failed a call (mirrors the WIT variant).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CapabilityError {
    #[error("not granted: {0}")]
    NotGranted(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("exists: {0}")]
    Exists(String),
    #[error("failed: {0}")]
    Failed(String),
}

/// The capabilities one runtime plugin was granted, shared by its calls.
pub struct RuntimeCapabilities {
    pub btrfs: Option<BtrfsRoot>,
    pub processes: Option<ProcessTable>,
    /// Its state folder on the host (preopened at `/state`), when granted.
    pub state_dir: Option<PathBuf>,
}

/// What one call made, for undoing it.
#[derive(Debug, Default, Clone)]
pub struct CallJournal {
    pub subvolumes: Vec<String>,
    pub processes: Vec<String>,
    /// Writable subvolumes this call made as snapshots of a shared image
    /// (name, image host path), still untouched by this call since.
    pub image_copies: Vec<(String, PathBuf)>,
}

impl CallJournal {
    /// The image `subvolume` is an untouched copy of, when this call made it
    /// so and started no process that could have written to it.
    pub fn pristine_copy_of(&self, subvolume: &str) -> Option<&Path> {
        if !self.processes.is_empty() {
            return None;
        }
        self.image_copies
            .iter()
            .find(|(name, _)| name == subvolume)
            .map(|(_, image)| image.as_path())
    }
}

/// The runtime part of a call's store data.
pub struct RuntimeCallContext {
    pub caps: Arc<RuntimeCapabilities>,
    pub journal: CallJournal,
    /// When the call began.
    pub started: Instant,
    /// Time spent inside capability calls (Btrfs ioctls, spawns, waits):
    /// it does not count against the plugin's timeout, which bounds the
    /// plugin's own computing.
    pub host_time: std::time::Duration,
    /// The longest one `process.wait` may block: the plugin's timeout.
    pub max_wait: std::time::Duration,
}

impl RuntimeCallContext {
    /// The plugin's own time in this call so far (wall time less host time).
    pub fn plugin_time(&self) -> std::time::Duration {
        self.started.elapsed().saturating_sub(self.host_time)
    }
}

impl RuntimeCapabilities {
    pub fn btrfs(&self) -> Result<&BtrfsRoot, CapabilityError> {
        self.btrfs.as_ref().ok_or_else(|| {
            CapabilityError::NotGranted("this plugin has no btrfs grant".to_string())
        })
    }

    pub fn processes(&self) -> Result<&ProcessTable, CapabilityError> {
        self.processes.as_ref().ok_or_else(|| {
            CapabilityError::NotGranted("this plugin has no process grant".to_string())
        })
    }

    /// Undoes what a failed call made: its processes are killed (with
    /// their trees) and forgotten, its subvolumes deleted, newest first.
    pub fn undo(&self, plugin: &str, journal: &CallJournal) {
        if let Ok(processes) = self.processes() {
            for id in journal.processes.iter().rev() {
                if let Err(e) = processes.release(id) {
                    tracing::warn!(plugin, id, error = %e, "cannot undo a process of a failed call");
                }
            }
        }
        if let Ok(btrfs) = self.btrfs() {
            for name in journal.subvolumes.iter().rev() {
                if let Err(e) = btrfs.delete(name) {
                    tracing::warn!(plugin, name, error = %e, "cannot undo a subvolume of a failed call");
                }
            }
        }
    }
}

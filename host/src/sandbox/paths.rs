//! Where a host keeps its snapshots on the Btrfs filesystem:
//! `<DOCKER_BTRFS_PATH>/opensandbox/hosts/<host id>/sandboxes/<sandbox id>/snapshots/<name>`,
//! imports being received under `.../hosts/<host id>/staging/<job id>`, and
//! runtime plugins' subvolumes under `.../hosts/<host id>/runtimes/<plugin>`.
//! The host id keeps several hosts sharing one filesystem out of each other's
//! way; names reaching these paths are validated before they get here.

use std::path::{Path, PathBuf};

use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct SnapshotPaths {
    sandboxes: PathBuf,
    staging: PathBuf,
    runtimes: PathBuf,
}

impl SnapshotPaths {
    pub fn new(btrfs_root: &Path, host_id: Uuid) -> Self {
        let host = btrfs_root
            .join("opensandbox/hosts")
            .join(host_id.to_string());
        Self {
            sandboxes: host.join("sandboxes"),
            staging: host.join("staging"),
            runtimes: host.join("runtimes"),
        }
    }

    /// Where runtime plugins keep this host's subvolumes, one folder each.
    pub fn runtimes_root(&self) -> &Path {
        &self.runtimes
    }

    /// The folder holding every sandbox of this host.
    pub fn root(&self) -> &Path {
        &self.sandboxes
    }

    pub fn sandbox_dir(&self, sandbox: Uuid) -> PathBuf {
        self.sandboxes.join(sandbox.to_string())
    }

    pub fn snapshots_dir(&self, sandbox: Uuid) -> PathBuf {
        self.sandbox_dir(sandbox).join("snapshots")
    }

    pub fn snapshot(&self, sandbox: Uuid, name: &str) -> PathBuf {
        self.snapshots_dir(sandbox).join(name)
    }

    /// The folder of every import in progress (`staging/<job id>`).
    pub fn staging_root(&self) -> &Path {
        &self.staging
    }

    /// Where an import job receives its stream chain before anything is visible.
    pub fn staging(&self, job: Uuid) -> PathBuf {
        self.staging.join(job.to_string())
    }
}

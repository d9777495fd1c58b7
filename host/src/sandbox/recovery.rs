//! Start-up reconciliation of the store with what the runtime and the Btrfs
//! filesystem hold, after a clean restart or a crash: running sandboxes keep
//! working, stopped ones are started, interrupted restores and deletes are
//! finished, half-made sandboxes and anything no row points to are removed.

use std::collections::HashSet;

use tracing::{info, warn};
use uuid::Uuid;

use super::{remove_snapshot_dir, Result, Sandboxes};
use crate::btrfs;
use crate::runtimes::InstanceStatus;
use crate::store::{Sandbox, SandboxState};

/// What a reconciliation did, for the start-up log.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub kept: usize,
    pub restarted: usize,
    pub restores_finished: usize,
    pub removed_half_made: usize,
    pub marked_lost: usize,
    pub orphan_instances: usize,
    pub orphan_snapshots: usize,
    pub orphan_agent_dirs: usize,
}

impl Sandboxes {
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        let sandboxes = self.store.list_all_sandboxes().await?;
        for sandbox in &sandboxes {
            if let Err(err) = self.recover_one(sandbox, &mut report).await {
                warn!(id = %sandbox.id, error = %err, "could not recover sandbox; marking it as error");
                self.store
                    .set_state(sandbox.id, SandboxState::Error, None)
                    .await?;
            }
        }
        let known: HashSet<Uuid> = self
            .store
            .list_all_sandboxes()
            .await?
            .iter()
            .map(|s| s.id)
            .collect();
        self.remove_orphan_instances(&known, &mut report).await?;
        self.remove_orphan_snapshots(&known, &mut report).await?;
        report.orphan_agent_dirs = self.agents.remove_orphans(&known).await?;
        info!(?report, "recovery done");
        Ok(report)
    }

    async fn recover_one(&self, sandbox: &Sandbox, report: &mut RecoveryReport) -> Result<()> {
        match sandbox.state {
            SandboxState::Creating | SandboxState::Deleting => {
                self.destroy(sandbox).await?;
                report.removed_half_made += 1;
            }
            SandboxState::Restoring => {
                let snapshot = sandbox.pending_restore.clone().unwrap_or_default();
                if self
                    .store
                    .get_snapshot(sandbox.id, &snapshot)
                    .await?
                    .is_some()
                {
                    self.finish_restore(sandbox, &snapshot).await?;
                    report.restores_finished += 1;
                } else {
                    self.store
                        .set_state(sandbox.id, SandboxState::Error, None)
                        .await?;
                    report.marked_lost += 1;
                }
            }
            SandboxState::Running | SandboxState::Stopped | SandboxState::Error => {
                let runtime = self.runtime_of(sandbox)?;
                let status = match &sandbox.container_id {
                    Some(container) => runtime.status(container).await?,
                    None => InstanceStatus::Missing,
                };
                let rootfs_ok = match &sandbox.rootfs_path {
                    Some(rootfs) => btrfs::is_subvolume_async(rootfs.clone())
                        .await
                        .unwrap_or(false),
                    None => false,
                };
                match (status, rootfs_ok, &sandbox.container_id) {
                    (InstanceStatus::Running, true, _) => {
                        self.store
                            .set_state(sandbox.id, SandboxState::Running, None)
                            .await?;
                        report.kept += 1;
                    }
                    (InstanceStatus::Stopped, true, Some(container)) => {
                        if let Some(rootfs) = &sandbox.rootfs_path {
                            super::mount_points::secure_async(rootfs).await?;
                        }
                        runtime.start(container).await?;
                        if self.agents.has_agent(sandbox.id).await {
                            self.agents
                                .wait_ready(sandbox.id, super::AGENT_READY_TIMEOUT)
                                .await
                                .map_err(super::SandboxError::Agent)?;
                        }
                        self.store
                            .set_state(sandbox.id, SandboxState::Running, None)
                            .await?;
                        report.restarted += 1;
                    }
                    _ => {
                        warn!(id = %sandbox.id, ?status, rootfs_ok, "sandbox lost its instance or root filesystem");
                        self.store
                            .set_state(sandbox.id, SandboxState::Error, None)
                            .await?;
                        report.marked_lost += 1;
                    }
                }
            }
        }
        Ok(())
    }

    async fn remove_orphan_instances(
        &self,
        known: &HashSet<Uuid>,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        // One runtime failing (a broken plugin) must not keep the host, and
        // the other runtimes' sandboxes, from starting: it is logged and skipped.
        for runtime in self.runtimes.iter() {
            let instances = match runtime.list_managed().await {
                Ok(instances) => instances,
                Err(err) => {
                    warn!(runtime = runtime.name(), error = %err, "cannot list the runtime's instances; orphans stay until the next start");
                    continue;
                }
            };
            for instance in instances {
                if instance.sandbox_id.is_some_and(|id| known.contains(&id)) {
                    continue;
                }
                info!(runtime = runtime.name(), instance = %instance.id, "removing an instance no sandbox owns");
                match runtime.remove(&instance.id).await {
                    Ok(()) => report.orphan_instances += 1,
                    Err(err) => {
                        warn!(runtime = runtime.name(), instance = %instance.id, error = %err, "cannot remove an orphan instance")
                    }
                }
            }
        }
        Ok(())
    }

    async fn remove_orphan_snapshots(
        &self,
        known: &HashSet<Uuid>,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let root = self.paths.root().to_path_buf();
        let mut entries = match tokio::fs::read_dir(&root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = entries.next_entry().await? {
            let id = entry
                .file_name()
                .to_str()
                .and_then(|s| Uuid::parse_str(s).ok());
            match id {
                Some(id) if known.contains(&id) => {
                    report.orphan_snapshots += self.remove_unlisted_snapshots(id).await?;
                }
                _ => {
                    info!(path = %entry.path().display(), "removing snapshots no sandbox owns");
                    remove_snapshot_dir(&entry.path()).await?;
                    report.orphan_snapshots += 1;
                }
            }
        }
        Ok(())
    }

    /// Snapshot subvolumes of a known sandbox that have no row (a crash
    /// between the Btrfs snapshot and the insert).
    async fn remove_unlisted_snapshots(&self, sandbox: Uuid) -> Result<usize> {
        let listed: HashSet<String> = self
            .store
            .list_snapshots(sandbox)
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect();
        let mut removed = 0;
        let mut entries = match tokio::fs::read_dir(self.paths.snapshots_dir(sandbox)).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !listed.contains(&name) {
                btrfs::delete_subvolume_if_exists_async(entry.path()).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

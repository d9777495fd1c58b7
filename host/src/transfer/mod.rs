//! Snapshot export to and import from S3, as background jobs. The API starts
//! a job ([`Transfers::start_export`], [`Transfers::start_import`]) and gets
//! its id at once; the pipelines ([`export`], [`import`]) run on their own
//! task and record state and progress in the store; [`Transfers::recover`]
//! fails what a stopped host left running and aborts its multipart uploads.

mod export;
mod import;
pub mod manifest;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use uuid::Uuid;

use crate::btrfs;
use crate::names;
use crate::s3::{ObjectStore, S3Error};
use crate::sandbox::{SandboxError, Sandboxes};
use crate::store::{Job, JobKind, JobState, Store, StoreError};

/// Errors a job-starting call answers with (failures of a running job are
/// recorded in the job instead, as a [`JobFailure`]).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("snapshot export and import need S3: set S3_BUCKET (and S3_REGION, S3_PREFIX, S3_ENDPOINT for an S3-compatible server) and the AWS credentials")]
    NotConfigured,
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("store error: {0}")]
    Store(#[from] StoreError),
}

/// Why a job failed: a stable code and a message, recorded in the job.
#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    S3(#[from] S3Error),
    #[error("the object is not an importable snapshot: {0}")]
    Foreign(String),
    #[error("the object is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Stream(String),
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("filesystem error: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot storage error: {0}")]
    Storage(#[from] btrfs::BtrfsError),
    #[error("the API key that started this job has been revoked")]
    KeyRevoked,
}

impl JobFailure {
    pub fn code(&self) -> &'static str {
        match self {
            JobFailure::Sandbox(SandboxError::VmExists(_)) => "vm_exists",
            JobFailure::Sandbox(SandboxError::VmNotFound(_)) => "vm_not_found",
            JobFailure::Sandbox(SandboxError::SnapshotNotFound(_)) => "snapshot_not_found",
            JobFailure::Sandbox(SandboxError::ImageUnavailable { .. }) => "image_unavailable",
            JobFailure::Sandbox(SandboxError::RejectedByPolicy { .. }) => "rejected_by_policy",
            JobFailure::Sandbox(SandboxError::RuntimeUnavailable { .. }) => "runtime_unavailable",
            JobFailure::KeyRevoked => "key_revoked",
            JobFailure::S3(S3Error::NotFound(_)) => "object_not_found",
            JobFailure::S3(_) => "s3_error",
            JobFailure::Foreign(_) => "foreign_object",
            JobFailure::Corrupt(_) => "corrupt_object",
            JobFailure::Stream(_) => "stream_failed",
            _ => "internal",
        }
    }
}

/// The transfer service; one per host.
pub struct Transfers {
    store: Store,
    sandboxes: Arc<Sandboxes>,
    s3: Option<ObjectStore>,
}

impl Transfers {
    pub fn new(store: Store, sandboxes: Arc<Sandboxes>, s3: Option<ObjectStore>) -> Self {
        Self {
            store,
            sandboxes,
            s3,
        }
    }

    fn s3(&self) -> Result<&ObjectStore, TransferError> {
        self.s3.as_ref().ok_or(TransferError::NotConfigured)
    }

    /// Starts exporting one of the owner's snapshots; the job is queued.
    pub async fn start_export(
        self: &Arc<Self>,
        owner: Uuid,
        vm: &str,
        snapshot: &str,
    ) -> Result<Job, TransferError> {
        self.s3()?;
        names::validate_resource_name("snapshot", snapshot).map_err(SandboxError::from)?;
        let sandbox = self.sandboxes.get(owner, vm).await?;
        if self
            .store
            .get_snapshot(sandbox.id, snapshot)
            .await?
            .is_none()
        {
            return Err(SandboxError::SnapshotNotFound(snapshot.to_string()).into());
        }
        let mut job = Job::new(owner, JobKind::Export, vm);
        job.snapshot = Some(snapshot.to_string());
        job.sandbox_id = Some(sandbox.id);
        self.store.insert_job(&job).await?;
        let this = Arc::clone(self);
        let started = job.clone();
        tokio::spawn(async move { this.run(started).await });
        Ok(job)
    }

    /// Starts importing the export at `key` as a new sandbox `name`.
    pub async fn start_import(
        self: &Arc<Self>,
        owner: Uuid,
        key: &str,
        name: &str,
    ) -> Result<Job, TransferError> {
        self.s3()?;
        if key.is_empty() || key.len() > 1024 || key.contains('\0') {
            return Err(TransferError::InvalidRequest(
                "key must be the object key an export gave (1 to 1024 characters)".into(),
            ));
        }
        self.sandboxes.check_import(owner, name).await?;
        let mut job = Job::new(owner, JobKind::Import, name);
        job.object_key = Some(key.to_string());
        self.store.insert_job(&job).await?;
        let this = Arc::clone(self);
        let started = job.clone();
        tokio::spawn(async move { this.run(started).await });
        Ok(job)
    }

    pub async fn get_job(&self, owner: Uuid, id: &str) -> Result<Job, TransferError> {
        let not_found = || TransferError::JobNotFound(id.to_string());
        let id = Uuid::parse_str(id).map_err(|_| not_found())?;
        self.store.get_job(owner, id).await?.ok_or_else(not_found)
    }

    /// Runs a job to its end and records the outcome.
    async fn run(self: Arc<Self>, mut job: Job) {
        let Some(s3) = self.s3.clone() else {
            return;
        };
        job.state = JobState::Running;
        if let Err(err) = self.store.save_job(&job).await {
            warn!(job = %job.id, error = %err, "cannot record the job as running");
        }
        let progress = Arc::new(AtomicU64::new(0));
        let ticker = tokio::spawn(report_progress(
            self.store.clone(),
            job.id,
            Arc::clone(&progress),
        ));
        let outcome = match job.kind {
            JobKind::Export => export::run(&self, &s3, &mut job, &progress).await,
            JobKind::Import => import::run(&self, &s3, &mut job, &progress).await,
        };
        ticker.abort();
        job.bytes_done = progress.load(Ordering::Relaxed);
        job.upload_key = None;
        job.upload_id = None;
        match outcome {
            Ok(()) => {
                job.state = JobState::Succeeded;
                info!(job = %job.id, kind = job.kind.as_str(), bytes = job.bytes_done, "job succeeded");
            }
            Err(err) => {
                warn!(job = %job.id, kind = job.kind.as_str(), error = %err, "job failed");
                job.state = JobState::Failed;
                job.error = Some(format!("{}: {err}", err.code()));
            }
        }
        if let Err(err) = self.store.save_job(&job).await {
            warn!(job = %job.id, error = %err, "cannot record the job's outcome");
        }
    }

    /// Marks the jobs a stopped host left unfinished as failed, aborts their
    /// multipart uploads and removes what imports left in staging.
    pub async fn recover(&self) -> Result<(), TransferError> {
        for mut job in self.store.unfinished_jobs().await? {
            if let (Some(key), Some(upload_id)) = (&job.upload_key, &job.upload_id) {
                match &self.s3 {
                    Some(s3) => {
                        if let Err(err) = s3.abort_upload(key, upload_id).await {
                            warn!(job = %job.id, error = %err, "cannot abort the multipart upload of an interrupted export");
                        }
                    }
                    None => {
                        warn!(job = %job.id, "an interrupted export's multipart upload cannot be aborted: S3 is no longer configured")
                    }
                }
            }
            job.error = Some(format!(
                "interrupted: the host stopped while the job was {}",
                job.state.as_str()
            ));
            job.state = JobState::Failed;
            job.upload_key = None;
            job.upload_id = None;
            self.store.save_job(&job).await?;
            info!(job = %job.id, "interrupted job marked failed");
        }
        let staging = self.sandboxes.paths().staging_root().to_path_buf();
        if let Err(err) = stream::remove_staging(&staging).await {
            warn!(error = %err, "cannot clean the import staging folder");
        }
        Ok(())
    }
}

/// Writes a running job's byte count to the store twice a second.
async fn report_progress(store: Store, job: Uuid, progress: Arc<AtomicU64>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = progress.load(Ordering::Relaxed);
        if now != last {
            last = now;
            let _ = store.set_job_progress(job, now).await;
        }
    }
}

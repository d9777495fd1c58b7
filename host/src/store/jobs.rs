//! Export and import jobs in the store: one row per job, written as the job
//! moves through its states, so a restart can see what was in flight.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::{fmt_time, parse_time, parse_uuid, Result, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Export,
    Import,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Export => "export",
            JobKind::Import => "import",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            other => return Err(format!("unknown job state {other:?}")),
        })
    }
}

/// One export or import.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Uuid,
    pub owner_key_id: Uuid,
    pub kind: JobKind,
    pub state: JobState,
    /// Export: the source sandbox's name; import: the new sandbox's name.
    pub vm: String,
    /// Export: the snapshot sent; import: the snapshot received.
    pub snapshot: Option<String>,
    /// Export: the source sandbox; import: the sandbox created, once it exists.
    pub sandbox_id: Option<Uuid>,
    /// Export: the key written (set on success); import: the key read.
    pub object_key: Option<String>,
    /// The multipart upload in flight, to abort if the host stops.
    pub upload_key: Option<String>,
    pub upload_id: Option<String>,
    /// Export: the manifest written (JSON), the base of later incremental exports.
    pub manifest: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Job {
    pub fn new(owner: Uuid, kind: JobKind, vm: &str) -> Self {
        let now = Utc::now();
        Self {
            id: Uuid::new_v4(),
            owner_key_id: owner,
            kind,
            state: JobState::Queued,
            vm: vm.to_string(),
            snapshot: None,
            sandbox_id: None,
            object_key: None,
            upload_key: None,
            upload_id: None,
            manifest: None,
            bytes_done: 0,
            bytes_total: None,
            error: None,
            created_at: now,
            updated_at: now,
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    pub async fn insert_job(&self, job: &Job) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, owner_key_id, kind, state, vm, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id.to_string())
        .bind(job.owner_key_id.to_string())
        .bind(job.kind.as_str())
        .bind(job.state.as_str())
        .bind(&job.vm)
        .bind(fmt_time(job.created_at))
        .bind(fmt_time(job.updated_at))
        .execute(&self.pool)
        .await?;
        self.save_job(job).await
    }

    /// Writes every mutable field of the job.
    pub async fn save_job(&self, job: &Job) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = ?, snapshot = ?, sandbox_id = ?, object_key = ?,
                    upload_key = ?, upload_id = ?, manifest = ?, bytes_done = ?,
                    bytes_total = ?, error = ?, updated_at = ?
             WHERE id = ?",
        )
        .bind(job.state.as_str())
        .bind(&job.snapshot)
        .bind(job.sandbox_id.map(|id| id.to_string()))
        .bind(&job.object_key)
        .bind(&job.upload_key)
        .bind(&job.upload_id)
        .bind(&job.manifest)
        .bind(to_i64(job.bytes_done))
        .bind(job.bytes_total.map(to_i64))
        .bind(&job.error)
        .bind(fmt_time(Utc::now()))
        .bind(job.id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Updates only the byte count of a job that has not ended (a late
    /// progress write never overwrites the final count).
    pub async fn set_job_progress(&self, id: Uuid, done: u64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET bytes_done = ?, updated_at = ?
             WHERE id = ? AND state IN ('queued', 'running')",
        )
        .bind(to_i64(done))
        .bind(fmt_time(Utc::now()))
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The owner's job; `None` for another key's.
    pub async fn get_job(&self, owner: Uuid, id: Uuid) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ? AND owner_key_id = ?")
            .bind(id.to_string())
            .bind(owner.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs a previous run left queued or running.
    pub async fn unfinished_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE state IN ('queued', 'running')")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Succeeded exports of a sandbox, newest first.
    pub async fn exports_of(&self, sandbox_id: Uuid) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE sandbox_id = ? AND kind = 'export' AND state = 'succeeded'
             ORDER BY updated_at DESC",
        )
        .bind(sandbox_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }
}

fn job_from_row(row: &SqliteRow) -> Result<Job> {
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "jobs",
        detail,
    };
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    let sandbox_id: Option<String> = row.try_get("sandbox_id")?;
    let done: i64 = row.try_get("bytes_done")?;
    let total: Option<i64> = row.try_get("bytes_total")?;
    Ok(Job {
        id: parse_uuid("jobs", row, "id")?,
        owner_key_id: parse_uuid("jobs", row, "owner_key_id")?,
        kind: match kind.as_str() {
            "export" => JobKind::Export,
            "import" => JobKind::Import,
            other => return Err(corrupt(format!("unknown kind {other:?}"))),
        },
        state: state.parse().map_err(corrupt)?,
        vm: row.try_get("vm")?,
        snapshot: row.try_get("snapshot")?,
        sandbox_id: sandbox_id
            .map(|s| Uuid::from_str(&s))
            .transpose()
            .map_err(|e| corrupt(format!("sandbox_id: {e}")))?,
        object_key: row.try_get("object_key")?,
        upload_key: row.try_get("upload_key")?,
        upload_id: row.try_get("upload_id")?,
        manifest: row.try_get("manifest")?,
        bytes_done: u64::try_from(done).unwrap_or(0),
        bytes_total: total.and_then(|t| u64::try_from(t).ok()),
        error: row.try_get("error")?,
        created_at: parse_time("jobs", row, "created_at")?,
        updated_at: parse_time("jobs", row, "updated_at")?,
    })
}

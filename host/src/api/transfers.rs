//! Snapshot transfer endpoints: export a snapshot to S3, import one as a new
//! sandbox, and follow either through its job (`/jobs/{id}`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorDetail};
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::store::{Job, JobKind, JobState};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    /// The `object_key` an export job gave (its manifest).
    pub key: String,
    /// Name of the new sandbox; `^[a-z0-9][a-z0-9-]{0,62}$`, not taken.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    /// `export` or `import`.
    pub kind: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub state: String,
    /// Export: the source sandbox; import: the sandbox created.
    pub vm: String,
    pub snapshot: Option<String>,
    /// Export: the manifest key written (once succeeded); import: the key read.
    pub object_key: Option<String>,
    /// Import: the id of the sandbox created (once succeeded).
    pub sandbox_id: Option<Uuid>,
    /// Bytes of compressed stream uploaded or downloaded so far.
    pub bytes_done: u64,
    /// Total compressed bytes, once known.
    pub bytes_total: Option<u64>,
    pub error: Option<ErrorDetail>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        let error = job.error.map(|text| match text.split_once(": ") {
            Some((code, message)) if !code.contains(' ') => ErrorDetail {
                code: code.to_string(),
                message: message.to_string(),
            },
            _ => ErrorDetail {
                code: "interrupted".to_string(),
                message: text,
            },
        });
        Self {
            id: job.id,
            kind: match job.kind {
                JobKind::Export => "export",
                JobKind::Import => "import",
            }
            .to_string(),
            state: job.state.as_str().to_string(),
            vm: job.vm,
            snapshot: job.snapshot,
            object_key: job.object_key,
            sandbox_id: match (job.kind, job.state) {
                (JobKind::Import, JobState::Succeeded) => job.sandbox_id,
                _ => None,
            },
            bytes_done: job.bytes_done,
            bytes_total: job.bytes_total,
            error,
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}

/// Exports a snapshot to S3 (only the difference from an earlier export of
/// the same sandbox when there is one); answers at once with the job.
#[utoipa::path(post, path = "/vms/{name}/snapshots/{snapshot}/export",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 202, body = JobView), (status = 404, body = ErrorBody),
    (status = 503, body = ErrorBody)), security(("api_key" = [])))]
pub async fn export(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let job = state
        .transfers
        .start_export(key.id, &name, &snapshot)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

/// Imports an exported snapshot as a new sandbox of the caller; answers at
/// once with the job.
#[utoipa::path(post, path = "/snapshots/import", request_body = ImportBody,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)), security(("api_key" = [])))]
pub async fn import(
    State(state): State<AppState>,
    Caller(key): Caller,
    ApiJson(body): ApiJson<ImportBody>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let job = state
        .transfers
        .start_import(key.id, &body.key, &body.name)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

/// A job of the caller's; another key's is 404.
#[utoipa::path(get, path = "/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_job(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.transfers.get_job(key.id, &id).await?.into()))
}

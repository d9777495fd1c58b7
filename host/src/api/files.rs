//! File endpoints (`/vms/{name}/files`): streamed download (`GET`) and upload
//! (`PUT`, raw body; no size limit, never held whole in memory), stat, list,
//! mkdir -p, move and remove. Paths are absolute paths inside the sandbox,
//! resolved there by its agent.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::agent::pb;
use crate::sandbox::FileUpload;
use axum::extract::Path;

#[derive(Debug, Serialize, ToSchema)]
pub struct FileView {
    pub path: String,
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits as octal text, e.g. `"0644"`.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub modified_at: Option<DateTime<Utc>>,
    /// Where a symlink points (not followed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

impl From<pb::FileInfo> for FileView {
    fn from(f: pb::FileInfo) -> Self {
        let kind = match pb::FileType::try_from(f.r#type) {
            Ok(pb::FileType::File) => "file",
            Ok(pb::FileType::Dir) => "dir",
            Ok(pb::FileType::Symlink) => "symlink",
            _ => "other",
        };
        Self {
            path: f.path,
            name: f.name,
            kind,
            size: f.size,
            mode: format!("{:04o}", f.mode),
            uid: f.uid,
            gid: f.gid,
            modified_at: DateTime::from_timestamp_millis(f.modified_ms),
            symlink_target: (!f.symlink_target.is_empty()).then_some(f.symlink_target),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DirView {
    pub entries: Vec<FileView>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PathQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct UploadQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Octal permission bits, e.g. `0755` (default 0644).
    pub mode: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Replace an existing file (default true).
    pub overwrite: Option<bool>,
    /// Create missing parent directories (default true).
    pub parents: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RemoveQuery {
    pub path: String,
    /// Remove a directory with everything in it.
    pub recursive: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    pub path: String,
    /// Octal permission bits (default `0755`).
    pub mode: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    pub from: String,
    pub to: String,
    /// Replace an existing `to` (default false: 409 path_exists).
    #[serde(default)]
    pub overwrite: bool,
}

fn parse_mode(mode: Option<&str>) -> Result<Option<u32>, ApiError> {
    mode.map(|m| {
        u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "mode {m:?} must be octal permission bits, e.g. 0644"
                ))
            })
    })
    .transpose()
}

/// Downloads a regular file as a stream of bytes. Its metadata is in the
/// headers `X-File-Size`, `X-File-Mode`, `X-File-Uid`, `X-File-Gid`.
#[utoipa::path(get, path = "/vms/{name}/files", params(("name" = String, Path), PathQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn download(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let (info, bytes) = state.sandboxes.download(key.id, &name, &query.path).await?;
    let mut response = Body::from_stream(bytes.map_err(axum::Error::new)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("x-file-size", info.size.to_string());
    set("x-file-mode", format!("{:04o}", info.mode));
    set("x-file-uid", info.uid.to_string());
    set("x-file-gid", info.gid.to_string());
    Ok(response)
}

/// Uploads the raw request body as a file. It appears only once the whole
/// body has arrived; a broken upload leaves nothing.
#[utoipa::path(put, path = "/vms/{name}/files", params(("name" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = FileView), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn upload(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    Query(query): Query<UploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<FileView>), ApiError> {
    let upload = FileUpload {
        path: query.path,
        mode: parse_mode(query.mode.as_deref())?,
        uid: query.uid,
        gid: query.gid,
        overwrite: query.overwrite.unwrap_or(true),
        make_parents: query.parents.unwrap_or(true),
    };
    let info = state
        .sandboxes
        .upload(key.id, &name, upload, body.into_data_stream())
        .await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

#[utoipa::path(get, path = "/vms/{name}/files/stat", params(("name" = String, Path), PathQuery),
    responses((status = 200, body = FileView), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn stat(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Json<FileView>, ApiError> {
    Ok(Json(
        state
            .sandboxes
            .stat_file(key.id, &name, &query.path)
            .await?
            .into(),
    ))
}

#[utoipa::path(get, path = "/vms/{name}/files/list", params(("name" = String, Path), PathQuery),
    responses((status = 200, body = DirView), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Json<DirView>, ApiError> {
    let entries = state.sandboxes.list_dir(key.id, &name, &query.path).await?;
    Ok(Json(DirView {
        entries: entries.into_iter().map(Into::into).collect(),
    }))
}

/// `mkdir -p`.
#[utoipa::path(post, path = "/vms/{name}/files/mkdir", params(("name" = String, Path)),
    request_body = MkdirBody, responses((status = 201, body = FileView), (status = 400, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn mkdir(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<MkdirBody>,
) -> Result<(StatusCode, Json<FileView>), ApiError> {
    let mode = parse_mode(body.mode.as_deref())?;
    let info = state
        .sandboxes
        .make_dir(key.id, &name, &body.path, mode, body.uid, body.gid)
        .await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

#[utoipa::path(post, path = "/vms/{name}/files/move", params(("name" = String, Path)),
    request_body = MoveBody, responses((status = 200, body = FileView), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn move_path(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<MoveBody>,
) -> Result<Json<FileView>, ApiError> {
    let info = state
        .sandboxes
        .move_path(key.id, &name, &body.from, &body.to, body.overwrite)
        .await?;
    Ok(Json(info.into()))
}

#[utoipa::path(delete, path = "/vms/{name}/files", params(("name" = String, Path), RemoveQuery),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn remove(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    state
        .sandboxes
        .remove_path(key.id, &name, &query.path, query.recursive.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

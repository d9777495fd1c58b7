//! Sandbox endpoints (`/vms`): create and fork, list, get, delete, run a
//! command, and the snapshot calls (list, take, delete, restore).

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::sandbox::{AgentStatus, CreateSandbox, RunCommand, RunResult, RunVia};
use crate::store::{ForkSource, Sandbox, Snapshot};

/// A snapshot to fork from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// Name of one of the caller's sandboxes.
    pub vm: String,
    /// Name of one of its snapshots.
    pub snapshot: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmBody {
    /// Unique per key; `^[a-z0-9][a-z0-9-]{0,62}$`.
    pub name: String,
    /// Image; defaults to the host's DOCKER_IMAGE (a fork uses its source's).
    pub image: Option<String>,
    /// Environment of every command in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Runtime; only `docker` is available.
    pub runtime: Option<String>,
    /// Create the sandbox from a snapshot of another of the caller's sandboxes.
    pub from: Option<SnapshotRef>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub image: String,
    pub runtime: String,
    /// `creating`, `running`, `stopped`, `restoring` or `error`.
    pub state: String,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub forked_from: Option<SnapshotRef>,
    /// The in-sandbox agent (only on `GET /vms/{name}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentView>,
}

/// The agent's health as the host sees it now.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    /// `ready`, `unreachable` (it died and the engine is restarting it, or it
    /// hangs), `stopped` (the sandbox is not running) or `absent` (sandbox
    /// made by an older host: only `run` works, through the engine).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Since the agent (re)started; small after a crash and restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<AgentStatus> for AgentView {
    fn from(status: AgentStatus) -> Self {
        let bare = |status| AgentView {
            status,
            version: None,
            protocol: None,
            uptime_ms: None,
            processes: None,
            error: None,
        };
        match status {
            AgentStatus::Ready(info) => AgentView {
                version: Some(info.agent_version),
                protocol: Some(format!("v{}.{}", info.protocol_major, info.protocol_minor)),
                uptime_ms: Some(info.uptime_ms),
                processes: Some(info.processes),
                ..bare("ready")
            },
            AgentStatus::Unreachable(error) => AgentView {
                error: Some(error),
                ..bare("unreachable")
            },
            AgentStatus::Stopped => bare("stopped"),
            AgentStatus::Absent => bare("absent"),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// Shell command, run as `/bin/sh -c <command>`.
    pub command: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory inside the sandbox.
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid` (default root).
    pub user: Option<String>,
    /// Kill the command after this many milliseconds (default: RUN_TIMEOUT_MS).
    pub timeout_ms: Option<u64>,
    /// `agent` (default) or `engine` (Docker's exec API; slower, for
    /// comparison or when the agent is down).
    pub via: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunResponse {
    pub stdout: String,
    pub stderr: String,
    /// Null when the command was killed by its timeout.
    pub exit_code: Option<i64>,
    pub duration_ms: u64,
    pub timed_out: bool,
    /// True when either stream was cut at the output limit.
    pub truncated: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// `^[a-z0-9][a-z0-9-]{0,62}$`, unique per sandbox.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotView {
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    pub snapshot: String,
    /// Start the background processes that were running again after the
    /// restore (default true).
    pub restart_processes: Option<bool>,
}

/// A background process the restore started again.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestartedProcess {
    /// Its pid before the restore.
    pub previous_pid: u32,
    /// The process now running in its place.
    pub process: super::processes::ProcessView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RestoreResponse {
    pub vm: VmView,
    pub snapshot: String,
    /// The sandbox was restarted: processes running before the restore are gone.
    pub restarted: bool,
    /// Background processes that were running and were started again.
    pub restarted_processes: Vec<RestartedProcess>,
    /// Processes that were running and are gone (terminals, one-shot runs,
    /// or all of them with `restart_processes: false`).
    pub stopped_processes: Vec<super::processes::ProcessView>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// `key=value`; repeat to require several labels.
    #[allow(dead_code)]
    pub label: Option<Vec<String>>,
}

impl From<Sandbox> for VmView {
    fn from(s: Sandbox) -> Self {
        Self {
            id: s.id,
            name: s.name,
            image: s.image,
            runtime: s.runtime,
            state: s.state.as_str().to_string(),
            env: s.env,
            labels: s.labels,
            created_at: s.created_at,
            forked_from: s.forked_from.map(|f| SnapshotRef {
                vm: f.vm,
                snapshot: f.snapshot,
            }),
            agent: None,
        }
    }
}

impl From<Snapshot> for SnapshotView {
    fn from(s: Snapshot) -> Self {
        Self {
            name: s.name,
            created_at: s.created_at,
        }
    }
}

impl From<RunResult> for RunResponse {
    fn from(r: RunResult) -> Self {
        let o = r.outcome;
        Self {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            exit_code: o.exit_code,
            duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
            timed_out: o.timed_out,
            truncated: o.stdout_truncated || o.stderr_truncated,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
        }
    }
}

/// Creates a sandbox (or forks one from a snapshot) and takes its `initial` snapshot.
#[utoipa::path(post, path = "/vms", request_body = CreateVmBody, responses(
    (status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Caller(key): Caller,
    ApiJson(body): ApiJson<CreateVmBody>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let request = CreateSandbox {
        name: body.name,
        image: body.image,
        env: body.env,
        labels: body.labels,
        runtime: body.runtime,
        from: body.from.map(|f| ForkSource {
            vm: f.vm,
            snapshot: f.snapshot,
        }),
    };
    let sandbox = state.sandboxes.create(&key, request).await?;
    Ok((StatusCode::CREATED, Json(sandbox.into())))
}

/// Lists the caller's sandboxes, optionally only those with every given label.
#[utoipa::path(get, path = "/vms", params(ListQuery), responses(
    (status = 200, body = VmList), (status = 400, body = ErrorBody)), security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Caller(key): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<VmList>, ApiError> {
    let labels = label_filters(query.as_deref().unwrap_or(""))?;
    let vms = state.sandboxes.list(key.id, &labels).await?;
    Ok(Json(VmList {
        vms: vms.into_iter().map(VmView::from).collect(),
    }))
}

/// Parses repeated `label=key=value` query parameters.
fn label_filters(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(param, _)| param == "label")
        .map(|(_, filter)| {
            filter
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    ApiError::invalid_request(format!("label filter {filter:?} must be key=value"))
                })
        })
        .collect()
}

#[utoipa::path(get, path = "/vms/{name}", params(("name" = String, Path)), responses(
    (status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    let sandbox = state.sandboxes.get(key.id, &name).await?;
    let agent = state.sandboxes.agent_status(&sandbox).await;
    let mut view = VmView::from(sandbox);
    view.agent = Some(agent.into());
    Ok(Json(view))
}

/// Deletes a sandbox with its container, root filesystem and snapshots.
#[utoipa::path(delete, path = "/vms/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ErrorBody),
    (status = 409, description = "snapshot_busy: an export is running", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.sandboxes.delete(key.id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a command under `/bin/sh -c` and returns its output and exit code.
#[utoipa::path(post, path = "/vms/{name}/run", params(("name" = String, Path)), request_body = RunBody,
    responses((status = 200, body = RunResponse), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn run(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<RunBody>,
) -> Result<Json<RunResponse>, ApiError> {
    let via = match body.via.as_deref() {
        None | Some("agent") => RunVia::Agent,
        Some("engine") => RunVia::Engine,
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "via {other:?} must be \"agent\" or \"engine\""
            )))
        }
    };
    let command = RunCommand {
        command: body.command,
        env: body.env,
        cwd: body.cwd,
        user: body.user,
        timeout_ms: body.timeout_ms,
        via,
    };
    let result = state.sandboxes.run(&key, &name, command).await?;
    Ok(Json(result.into()))
}

#[utoipa::path(get, path = "/vms/{name}/snapshots", params(("name" = String, Path)), responses(
    (status = 200, body = SnapshotList), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn list_snapshots(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
) -> Result<Json<SnapshotList>, ApiError> {
    let snapshots = state.sandboxes.list_snapshots(key.id, &name).await?;
    Ok(Json(SnapshotList {
        snapshots: snapshots.into_iter().map(SnapshotView::from).collect(),
    }))
}

/// Takes an instant, read-only snapshot of the sandbox's whole root filesystem.
#[utoipa::path(post, path = "/vms/{name}/snapshots", params(("name" = String, Path)), request_body = SnapshotBody,
    responses((status = 201, body = SnapshotView), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn create_snapshot(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<SnapshotBody>,
) -> Result<(StatusCode, Json<SnapshotView>), ApiError> {
    let snapshot = state
        .sandboxes
        .create_snapshot(key.id, &name, &body.name)
        .await?;
    Ok((StatusCode::CREATED, Json(snapshot.into())))
}

#[utoipa::path(delete, path = "/vms/{name}/snapshots/{snapshot}",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "snapshot_busy: an export is reading it", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_snapshot(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .sandboxes
        .delete_snapshot(key.id, &name, &snapshot)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Restores the whole root filesystem to a snapshot and restarts the sandbox.
#[utoipa::path(post, path = "/vms/{name}/restore", params(("name" = String, Path)), request_body = RestoreBody,
    responses((status = 200, body = RestoreResponse), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn restore(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<RestoreBody>,
) -> Result<Json<RestoreResponse>, ApiError> {
    let (sandbox, processes) = state
        .sandboxes
        .restore(
            key.id,
            &name,
            &body.snapshot,
            body.restart_processes.unwrap_or(true),
        )
        .await?;
    Ok(Json(RestoreResponse {
        vm: sandbox.into(),
        snapshot: body.snapshot,
        restarted: true,
        restarted_processes: processes
            .restarted
            .into_iter()
            .map(|(previous_pid, process)| RestartedProcess {
                previous_pid,
                process: process.into(),
            })
            .collect(),
        stopped_processes: processes.stopped.into_iter().map(Into::into).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_filters_parse_repeated_pairs() {
        let got = label_filters("label=team%3Da&label=env=prod&other=x").unwrap();
        assert_eq!(
            got,
            vec![("team".into(), "a".into()), ("env".into(), "prod".into())]
        );
        assert!(label_filters("label=novalue").is_err());
        assert!(label_filters("").unwrap().is_empty());
    }
}

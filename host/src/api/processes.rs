//! Process endpoints (`/vms/{name}/processes`): start (returning at once, or
//! streaming as Server-Sent Events), list, inspect, attach with replay from
//! an offset (SSE or WebSocket), stdin, signals and terminal resize.
//!
//! Output events carry the stream, the offset of their first byte in the
//! process's combined output, and the data; SSE carries data base64-encoded
//! in JSON, WebSocket as binary frames `[stream u8][offset u64 BE][data]`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tracing::debug;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::agent::pb;
use crate::sandbox::{EventStream, StartProcess};
use crate::store::ApiKey;

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u32,
    pub rows: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// Shell command, run as `/bin/sh -c <command>`. Give this or `argv`.
    pub command: Option<String>,
    /// Program and arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid` (default root).
    pub user: Option<String>,
    /// Kill the process group after this long (default: no limit).
    pub timeout_ms: Option<u64>,
    /// Keep stdin open for writes (default: stdin is /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Run on a terminal of this size; output arrives as stream `pty`.
    pub pty: Option<PtySize>,
}

impl From<StartBody> for StartProcess {
    fn from(body: StartBody) -> Self {
        Self {
            command: body.command,
            argv: body.argv,
            env: body.env,
            cwd: body.cwd,
            user: body.user,
            timeout_ms: body.timeout_ms,
            stdin: body.stdin,
            pty: body.pty.map(|p| (p.cols, p.rows)),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessView {
    /// The process id inside the sandbox.
    pub pid: u32,
    /// The command as started (argv shown shell-quoted).
    pub command: String,
    pub argv: Vec<String>,
    pub running: bool,
    /// Set when it exited normally.
    pub exit_code: Option<i32>,
    /// Set when a signal ended it.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub pty: bool,
    pub stdin_open: bool,
    /// Output produced so far (bytes, all streams), and the oldest offset
    /// still buffered for replay.
    pub output_end: u64,
    pub output_start: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub user: String,
}

impl From<pb::ProcessInfo> for ProcessView {
    fn from(p: pb::ProcessInfo) -> Self {
        let (exit_code, signal) = exit_parts(p.exit.as_ref());
        Self {
            pid: p.pid,
            command: p.tag,
            argv: p.argv,
            running: p.running,
            exit_code,
            signal,
            timed_out: p.timed_out,
            pty: p.pty,
            stdin_open: p.stdin_open,
            output_end: p.output_end,
            output_start: p.output_start,
            started_at: DateTime::from_timestamp_millis(p.started_at_ms),
            user: p.user,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessView>,
}

fn exit_parts(exit: Option<&pb::Exit>) -> (Option<i32>, Option<i32>) {
    match exit.and_then(|e| e.how) {
        Some(pb::exit::How::Code(code)) => (Some(code), None),
        Some(pb::exit::How::Signal(signal)) => (None, Some(signal)),
        None => (None, None),
    }
}

fn stream_name(stream: i32) -> &'static str {
    match pb::Stream::try_from(stream) {
        Ok(pb::Stream::Stdout) => "stdout",
        Ok(pb::Stream::Stderr) => "stderr",
        Ok(pb::Stream::Pty) => "pty",
        _ => "unknown",
    }
}

/// A process event as JSON (SSE data, WebSocket text frames).
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventView {
    Started {
        pid: u32,
    },
    Output {
        stream: &'static str,
        offset: u64,
        /// Base64 of the bytes.
        data: String,
    },
    Lost {
        from_offset: u64,
        to_offset: u64,
    },
    Exited {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        end_offset: u64,
    },
    Error {
        code: &'static str,
        message: String,
    },
}

fn event_view(event: pb::ProcessEvent) -> Option<(EventView, Option<u64>)> {
    use pb::process_event::Event as E;
    Some(match event.event? {
        E::Started(s) => (EventView::Started { pid: s.pid }, None),
        E::Output(o) => {
            let next = o.offset + o.data.len() as u64;
            (
                EventView::Output {
                    stream: stream_name(o.stream),
                    offset: o.offset,
                    data: base64::engine::general_purpose::STANDARD.encode(&o.data),
                },
                Some(next),
            )
        }
        E::Lost(l) => (
            EventView::Lost {
                from_offset: l.from_offset,
                to_offset: l.to_offset,
            },
            Some(l.to_offset),
        ),
        E::Exited(x) => {
            let (exit_code, signal) = exit_parts(x.exit.as_ref());
            (
                EventView::Exited {
                    exit_code,
                    signal,
                    timed_out: x.timed_out,
                    end_offset: x.end_offset,
                },
                Some(x.end_offset),
            )
        }
    })
}

fn event_name(view: &EventView) -> &'static str {
    match view {
        EventView::Started { .. } => "started",
        EventView::Output { .. } => "output",
        EventView::Lost { .. } => "lost",
        EventView::Exited { .. } => "exited",
        EventView::Error { .. } => "error",
    }
}

/// Events as SSE: `event:` names the kind, `id:` is the offset to resume
/// from (send it back as `Last-Event-ID` or `?from=`).
fn sse(events: EventStream) -> Response {
    let stream = events.filter_map(|event| async move {
        let (view, id) = match event {
            Ok(event) => event_view(event)?,
            Err(err) => (
                EventView::Error {
                    code: "agent_error",
                    message: err.to_string(),
                },
                None,
            ),
        };
        let mut sse = Event::default().event(event_name(&view));
        if let Some(id) = id {
            sse = sse.id(id.to_string());
        }
        Some(sse.json_data(&view).map_err(axum::Error::new))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Starts a process. With `Accept: text/event-stream` the reply is its event
/// stream (started, output, exited); otherwise 201 with the process at once.
#[utoipa::path(post, path = "/vms/{name}/processes", params(("name" = String, Path)),
    request_body = StartBody, responses((status = 201, body = ProcessView),
    (status = 200, description = "text/event-stream of process events"),
    (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("api_key" = [])))]
pub async fn start(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<Response, ApiError> {
    if wants_sse(&headers) {
        let events = state
            .sandboxes
            .exec_process(&key, &name, body.into())
            .await?;
        return Ok(sse(events));
    }
    let process = state
        .sandboxes
        .start_process(&key, &name, body.into())
        .await?;
    Ok((StatusCode::CREATED, Json(ProcessView::from(process))).into_response())
}

#[utoipa::path(get, path = "/vms/{name}/processes", params(("name" = String, Path)),
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let processes = state.sandboxes.list_processes(key.id, &name).await?;
    Ok(Json(ProcessList {
        processes: processes.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(get, path = "/vms/{name}/processes/{pid}",
    params(("name" = String, Path), ("pid" = u32, Path)),
    responses((status = 200, body = ProcessView), (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, pid)): Path<(String, u32)>,
) -> Result<Json<ProcessView>, ApiError> {
    Ok(Json(
        state
            .sandboxes
            .get_process(key.id, &name, pid)
            .await?
            .into(),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct OutputQuery {
    /// Replay from this offset (default 0: everything still buffered).
    pub from: Option<u64>,
    /// Keep streaming until the process exits (default true).
    pub follow: Option<bool>,
}

/// The process's output as Server-Sent Events, replayed from `from` (or the
/// `Last-Event-ID` header), then live until it exits.
#[utoipa::path(get, path = "/vms/{name}/processes/{pid}/output",
    params(("name" = String, Path), ("pid" = u32, Path), OutputQuery),
    responses((status = 200, description = "text/event-stream of process events"),
    (status = 404, body = ErrorBody)), security(("api_key" = [])))]
pub async fn output(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, pid)): Path<(String, u32)>,
    Query(query): Query<OutputQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let from = resume.or(query.from).unwrap_or(0);
    let events = state
        .sandboxes
        .attach_process(key.id, &name, pid, from, query.follow.unwrap_or(true))
        .await?;
    Ok(sse(events))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct StdinQuery {
    /// Close stdin after this write.
    pub close: Option<bool>,
}

/// Writes the raw request body to the process's stdin.
#[utoipa::path(post, path = "/vms/{name}/processes/{pid}/stdin",
    params(("name" = String, Path), ("pid" = u32, Path), StdinQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn stdin(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, pid)): Path<(String, u32)>,
    Query(query): Query<StdinQuery>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    state
        .sandboxes
        .write_stdin(key.id, &name, pid, body, query.close.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A signal by number (15) or name (`TERM`, `SIGTERM`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SignalSpec {
    Number(i32),
    Name(String),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    pub signal: SignalSpec,
}

fn signal_number(spec: &SignalSpec) -> Result<i32, ApiError> {
    match spec {
        SignalSpec::Number(n) => Ok(*n),
        SignalSpec::Name(name) => {
            let bare = name.trim_start_matches("SIG");
            let n = match bare {
                "HUP" => 1,
                "INT" => 2,
                "QUIT" => 3,
                "KILL" => 9,
                "USR1" => 10,
                "USR2" => 12,
                "PIPE" => 13,
                "ALRM" => 14,
                "TERM" => 15,
                "CONT" => 18,
                "STOP" => 19,
                "TSTP" => 20,
                "WINCH" => 28,
                _ => {
                    return Err(ApiError::invalid_request(format!(
                        "unknown signal {name:?}; use a number or a name such as TERM, KILL, INT"
                    )))
                }
            };
            Ok(n)
        }
    }
}

#[utoipa::path(post, path = "/vms/{name}/processes/{pid}/signal",
    params(("name" = String, Path), ("pid" = u32, Path)), request_body = SignalBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn signal(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, pid)): Path<(String, u32)>,
    ApiJson(body): ApiJson<SignalBody>,
) -> Result<StatusCode, ApiError> {
    let signal = signal_number(&body.signal)?;
    state
        .sandboxes
        .signal_process(key.id, &name, pid, signal)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/vms/{name}/processes/{pid}/resize",
    params(("name" = String, Path), ("pid" = u32, Path)), request_body = PtySize,
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn resize(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, pid)): Path<(String, u32)>,
    ApiJson(size): ApiJson<PtySize>,
) -> Result<StatusCode, ApiError> {
    state
        .sandboxes
        .resize_process(key.id, &name, pid, size.cols, size.rows)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What a WebSocket client may send: binary frames are stdin bytes; text
/// frames are these JSON messages.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Stdin { data: String },
    CloseStdin,
    Resize { cols: u32, rows: u32 },
    Signal { signal: SignalSpec },
}

/// Attaches to a process over WebSocket: output from `from` (binary frames),
/// started/lost/exited as JSON text frames; stdin, resize and signals back.
#[utoipa::path(get, path = "/vms/{name}/processes/{pid}/ws",
    params(("name" = String, Path), ("pid" = u32, Path), OutputQuery),
    responses((status = 101, description = "WebSocket"), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn attach_ws(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path((name, pid)): Path<(String, u32)>,
    Query(query): Query<OutputQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let events = state
        .sandboxes
        .attach_process(
            key.id,
            &name,
            pid,
            query.from.unwrap_or(0),
            query.follow.unwrap_or(true),
        )
        .await?;
    Ok(upgrade.on_upgrade(move |socket| serve_ws(socket, state, key, name, Some(pid), events)))
}

/// Starts a process over WebSocket: the client's first text frame is the
/// start request (as for `POST /vms/{name}/processes`); then as `attach`.
#[utoipa::path(get, path = "/vms/{name}/processes/ws", params(("name" = String, Path)),
    responses((status = 101, description = "WebSocket"), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn start_ws(
    State(state): State<AppState>,
    Caller(key): Caller,
    Path(name): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Fail before the upgrade when the sandbox is not there.
    state.sandboxes.get(key.id, &name).await?;
    Ok(upgrade.on_upgrade(move |mut socket| async move {
        let first = match socket.recv().await {
            Some(Ok(Message::Text(text))) => text,
            _ => return,
        };
        let started = match serde_json::from_str::<StartBody>(first.as_str()) {
            Ok(body) => state
                .sandboxes
                .exec_process(&key, &name, body.into())
                .await
                .map_err(ApiError::from),
            Err(err) => Err(ApiError::invalid_request(format!("start request: {err}"))),
        };
        match started {
            Ok(events) => serve_ws(socket, state, key, name, None, events).await,
            Err(err) => {
                let view = EventView::Error {
                    code: err.code,
                    message: err.message,
                };
                let _ = send_json(&mut socket, &view).await;
                let _ = socket.close().await;
            }
        }
    }))
}

async fn send_json(socket: &mut WebSocket, view: &EventView) -> Result<(), axum::Error> {
    let text = serde_json::to_string(view).unwrap_or_default();
    socket.send(Message::Text(text.into())).await
}

/// Pumps events out and client messages in until the process ends or the
/// client goes away.
async fn serve_ws(
    socket: WebSocket,
    state: AppState,
    key: ApiKey,
    name: String,
    pid: Option<u32>,
    mut events: EventStream,
) {
    let (mut sink, mut incoming) = socket.split();
    let (pid_tx, pid_rx) = tokio::sync::watch::channel(pid);
    let outbound = async move {
        while let Some(event) = events.next().await {
            let message = match event {
                Ok(pb::ProcessEvent {
                    event: Some(pb::process_event::Event::Output(out)),
                }) => {
                    let stream = pb::Stream::try_from(out.stream).map_or(0, |s| s as u8);
                    let mut frame = Vec::with_capacity(9 + out.data.len());
                    frame.push(stream);
                    frame.extend_from_slice(&out.offset.to_be_bytes());
                    frame.extend_from_slice(&out.data);
                    Message::Binary(frame.into())
                }
                Ok(event) => {
                    if let Some(pb::process_event::Event::Started(s)) = &event.event {
                        let _ = pid_tx.send(Some(s.pid));
                    }
                    let Some((view, _)) = event_view(event) else {
                        continue;
                    };
                    Message::Text(serde_json::to_string(&view).unwrap_or_default().into())
                }
                Err(err) => {
                    let view = EventView::Error {
                        code: "agent_error",
                        message: err.to_string(),
                    };
                    Message::Text(serde_json::to_string(&view).unwrap_or_default().into())
                }
            };
            if sink.send(message).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    // Client frames are read continuously (so a departing client is seen at
    // once) and applied in order by a separate writer, whose calls may block
    // on a process that does not read its stdin.
    let (to_writer, mut requests) = tokio::sync::mpsc::channel::<Message>(16);
    let inbound = async move {
        while let Some(Ok(message)) = incoming.next().await {
            if matches!(message, Message::Close(_)) || to_writer.send(message).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        let mut pid_rx = pid_rx;
        while let Some(message) = requests.recv().await {
            // Frames sent right after a start wait for its pid, not dropped.
            let pid = match pid_rx.wait_for(Option::is_some).await {
                Ok(pid) => pid.unwrap_or_default(),
                Err(_) => return,
            };
            let result = match message {
                Message::Binary(data) => {
                    state
                        .sandboxes
                        .write_stdin(key.id, &name, pid, data, false)
                        .await
                }
                Message::Text(text) => match serde_json::from_str::<ClientMessage>(text.as_str()) {
                    Ok(ClientMessage::Stdin { data }) => {
                        state
                            .sandboxes
                            .write_stdin(key.id, &name, pid, Bytes::from(data), false)
                            .await
                    }
                    Ok(ClientMessage::CloseStdin) => {
                        state
                            .sandboxes
                            .write_stdin(key.id, &name, pid, Bytes::new(), true)
                            .await
                    }
                    Ok(ClientMessage::Resize { cols, rows }) => {
                        state
                            .sandboxes
                            .resize_process(key.id, &name, pid, cols, rows)
                            .await
                    }
                    Ok(ClientMessage::Signal { signal }) => match signal_number(&signal) {
                        Ok(n) => state.sandboxes.signal_process(key.id, &name, pid, n).await,
                        Err(err) => {
                            debug!(error = %err.message, "bad signal over websocket");
                            Ok(())
                        }
                    },
                    Err(err) => {
                        debug!(error = %err, "unreadable websocket message");
                        Ok(())
                    }
                },
                _ => Ok(()),
            };
            if let Err(err) = result {
                debug!(error = %err, "websocket request failed");
            }
        }
        // The client is gone; wait here so that only the other two end it.
        std::future::pending::<()>().await;
    };
    // Either side ends it: the process exited, or the client left (which
    // detaches; the process goes on).
    tokio::select! {
        () = outbound => {}
        () = inbound => {}
        () = writer => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number(&SignalSpec::Number(9)).unwrap(), 9);
        assert_eq!(signal_number(&SignalSpec::Name("TERM".into())).unwrap(), 15);
        assert_eq!(
            signal_number(&SignalSpec::Name("SIGINT".into())).unwrap(),
            2
        );
        assert!(signal_number(&SignalSpec::Name("BOGUS".into())).is_err());
    }
}

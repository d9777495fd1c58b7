//! Client helpers for the streaming parts of the API: process output as Server-Sent
//! Events and the WebSocket attach/start endpoints (see docs/API.md, "Processes").
//!
//! - [`SseStream`] sends a request and parses its `text/event-stream` body incrementally
//!   into [`SseEvent`]s (events may be split across chunks; `:` keep-alive comments are
//!   skipped).
//! - [`collect_output`] reads a process's SSE stream up to `exited`, decoding the base64
//!   `output` events, checking that offsets are contiguous and in order, and hashing the
//!   bytes as they come (optionally keeping them).
//! - [`Ws`] is a small WebSocket client: binary frames `[stream u8][offset u64 BE][data]`
//!   become [`WsEvent::Output`], text frames [`WsEvent::Json`].

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::{enc, Host};

// ---------------------------------------------------------------------------
// SSE
// ---------------------------------------------------------------------------

/// One Server-Sent Event. `data` is the event's data parsed as JSON (a string when it is
/// not JSON).
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// An open `text/event-stream` response, read event by event.
pub struct SseStream {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    /// Bytes received and not yet split into lines.
    buf: Vec<u8>,
    /// Start of the first line in `buf` not handled yet.
    pos: usize,
    /// Where the scan for the next `\n` in `buf` starts.
    scanned: usize,
    /// The event being assembled.
    event: Option<String>,
    id: Option<String>,
    data: Vec<u8>,
    has_data: bool,
    done: bool,
}

impl SseStream {
    /// Sends `rb` and expects 200 with `content-type: text/event-stream`; otherwise fails
    /// with the status and the body.
    pub async fn send(rb: reqwest::RequestBuilder) -> Result<Self> {
        let resp = rb.send().await.context("SSE request failed")?;
        let status = resp.status();
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status != reqwest::StatusCode::OK || !ct.starts_with("text/event-stream") {
            let body = resp.text().await.unwrap_or_default();
            bail!("expected 200 text/event-stream, got {status} ({ct}): {body}");
        }
        Ok(Self::from_response(resp))
    }

    /// Sends `rb` and returns the response as is when it is not an event stream (for
    /// error tests): `Ok(Err((status, body)))`.
    pub async fn send_or_error(
        rb: reqwest::RequestBuilder,
    ) -> Result<std::result::Result<Self, crate::Resp>> {
        let resp = rb.send().await.context("SSE request failed")?;
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if resp.status() == reqwest::StatusCode::OK && is_sse {
            return Ok(Ok(Self::from_response(resp)));
        }
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Err((status, body)))
    }

    fn from_response(resp: reqwest::Response) -> Self {
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            event: None,
            id: None,
            data: Vec::new(),
            has_data: false,
            done: false,
        }
    }

    /// The next event, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>> {
        loop {
            // Complete lines already buffered (`buf[pos..]` is not consumed yet).
            while let Some(nl) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + nl;
                let mut line_end = end;
                if line_end > self.pos && self.buf[line_end - 1] == b'\r' {
                    line_end -= 1;
                }
                let ev = self.line(self.pos, line_end)?;
                self.pos = end + 1;
                self.scanned = self.pos;
                if let Some(ev) = ev {
                    return Ok(Some(ev));
                }
            }
            // Keep only the partial line, then read more.
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.scanned = self.buf.len();
            if self.done {
                return Ok(None);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(anyhow!(e).context("reading the event stream")),
                None => self.done = true,
            }
        }
    }

    /// Handles the line `buf[start..end]`; returns an event when the line is blank and
    /// one was assembled.
    fn line(&mut self, start: usize, end: usize) -> Result<Option<SseEvent>> {
        let line = &self.buf[start..end];
        if line.is_empty() {
            if !self.has_data && self.event.is_none() {
                self.id = None;
                return Ok(None);
            }
            let data = std::mem::take(&mut self.data);
            self.has_data = false;
            let data = serde_json::from_slice(&data)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&data).into_owned()));
            return Ok(Some(SseEvent {
                event: self.event.take().unwrap_or_else(|| "message".into()),
                id: self.id.take(),
                data,
            }));
        }
        if line[0] == b':' {
            return Ok(None); // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"id" => self.id = Some(String::from_utf8_lossy(value).into_owned()),
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            _ => {} // retry and unknown fields
        }
        Ok(None)
    }

    /// The next event within `timeout` (fails on timeout or end of stream).
    pub async fn next_within(&mut self, timeout: Duration) -> Result<SseEvent> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(Ok(Some(ev))) => Ok(ev),
            Ok(Ok(None)) => bail!("the event stream ended"),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("no event within {timeout:?}"),
        }
    }
}

/// A GET/POST with the `x-api-key` and `Accept: text/event-stream` headers.
pub fn sse_request(
    host: &Host,
    method: reqwest::Method,
    path: &str,
    key: &str,
) -> reqwest::RequestBuilder {
    host.client()
        .request(method, host.url(path))
        .header("x-api-key", key)
        .header(reqwest::header::ACCEPT, "text/event-stream")
}

/// `GET /vms/{vm}/processes/{pid}/output[?from=N]` as an event stream.
pub async fn attach(
    host: &Host,
    key: &str,
    vm: &str,
    pid: u64,
    from: Option<u64>,
) -> Result<SseStream> {
    let mut path = format!("/vms/{}/processes/{pid}/output", enc(vm));
    if let Some(from) = from {
        path.push_str(&format!("?from={from}"));
    }
    SseStream::send(sse_request(host, reqwest::Method::GET, &path, key))
        .await
        .with_context(|| format!("GET {path}"))
}

/// `POST /vms/{vm}/processes` with `Accept: text/event-stream`: the process's events from
/// its start.
pub async fn start_streaming(host: &Host, key: &str, vm: &str, body: Value) -> Result<SseStream> {
    let path = format!("/vms/{}/processes", enc(vm));
    SseStream::send(sse_request(host, reqwest::Method::POST, &path, key).json(&body))
        .await
        .with_context(|| format!("POST {path} {body} (Accept: text/event-stream)"))
}

/// What [`collect_output`] saw.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// The decoded bytes of all streams in offset order (empty unless kept).
    pub bytes: Vec<u8>,
    /// Hex SHA-256 of all decoded bytes received.
    pub sha256: String,
    /// Number of decoded bytes received.
    pub len: u64,
    /// Offset of the first byte received (or of the first `lost`), if any.
    pub first_offset: Option<u64>,
    /// The offset after the last byte received.
    pub next_offset: u64,
    /// Offsets (of the first byte) of each `output` event, with its stream and length.
    pub chunks: Vec<(u64, String, usize)>,
    /// `lost` events as `(from_offset, to_offset)`.
    pub lost: Vec<(u64, u64)>,
    /// The `exited` event's data, if it came.
    pub exited: Option<Value>,
    /// The pid of a `started` event, if one came.
    pub started_pid: Option<u64>,
    /// Names of all events in order, outputs collapsed (for messages).
    pub kinds: Vec<String>,
    /// The SSE `id` of the last event.
    pub last_id: Option<String>,
}

impl Output {
    /// The kept bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// `exited.exit_code`.
    pub fn exit_code(&self) -> Option<i64> {
        self.exited.as_ref()?.get("exit_code")?.as_i64()
    }

    /// `exited.signal`.
    pub fn signal(&self) -> Option<i64> {
        self.exited.as_ref()?.get("signal")?.as_i64()
    }

    /// `exited.end_offset`.
    pub fn end_offset(&self) -> Option<u64> {
        self.exited.as_ref()?.get("end_offset")?.as_u64()
    }

    /// A short description for assertion messages.
    pub fn brief(&self) -> String {
        let text = self.text();
        let cut: String = text.chars().take(1000).collect();
        format!(
            "len={} first_offset={:?} next_offset={} lost={:?} exited={:?} started_pid={:?} events={:?} text={:?}",
            self.len,
            self.first_offset,
            self.next_offset,
            self.lost,
            self.exited,
            self.started_pid,
            self.kinds.iter().take(40).collect::<Vec<_>>(),
            cut
        )
    }
}

/// Hex of a SHA-256 digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Reads `stream` until its `exited` event (or its end), within `timeout`. Decodes the
/// `output` events, requires each to start where the previous one (or a `lost`) ended,
/// hashes every byte and keeps them when `keep`. An `error` event fails.
pub async fn collect_output(
    stream: &mut SseStream,
    keep: bool,
    timeout: Duration,
) -> Result<Output> {
    let deadline = Instant::now() + timeout;
    let mut out = Output::default();
    let mut hasher = Sha256::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match tokio::time::timeout(left, stream.next()).await {
            Ok(r) => r?,
            Err(_) => bail!(
                "no exited event within {timeout:?}; so far: {}",
                out.brief()
            ),
        };
        let Some(ev) = ev else { break };
        if ev.id.is_some() {
            out.last_id = ev.id.clone();
        }
        if ev.event != "output" || out.kinds.last().map(String::as_str) != Some("output") {
            out.kinds.push(ev.event.clone());
        }
        match ev.event.as_str() {
            "started" => out.started_pid = ev.data.get("pid").and_then(Value::as_u64),
            "output" => {
                let offset = ev.data["offset"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("output event without offset: {}", ev.data))?;
                let data = b64
                    .decode(ev.data["data"].as_str().unwrap_or_default())
                    .with_context(|| format!("output data is not base64 (offset {offset})"))?;
                match out.first_offset {
                    None => out.first_offset = Some(offset),
                    Some(_) if offset != out.next_offset => bail!(
                        "output at offset {offset}, expected {} (not contiguous); so far: {}",
                        out.next_offset,
                        out.brief()
                    ),
                    Some(_) => {}
                }
                if let Some(id) = &ev.id {
                    let want = (offset + data.len() as u64).to_string();
                    if *id != want {
                        bail!(
                            "output event at {offset} (+{}) has id {id}, expected {want}",
                            data.len()
                        );
                    }
                }
                out.next_offset = offset + data.len() as u64;
                out.len += data.len() as u64;
                let stream_name = ev.data["stream"].as_str().unwrap_or("").to_string();
                if out.chunks.len() < 100_000 {
                    out.chunks.push((offset, stream_name, data.len()));
                }
                hasher.update(&data);
                if keep {
                    out.bytes.extend_from_slice(&data);
                }
            }
            "lost" => {
                let from = ev.data["from_offset"].as_u64().unwrap_or(0);
                let to = ev.data["to_offset"].as_u64().unwrap_or(0);
                if out.first_offset.is_some() && from != out.next_offset {
                    bail!(
                        "lost from {from}, expected {}; so far: {}",
                        out.next_offset,
                        out.brief()
                    );
                }
                out.first_offset.get_or_insert(from);
                out.lost.push((from, to));
                out.next_offset = to;
            }
            "exited" => {
                out.exited = Some(ev.data);
                break;
            }
            "error" => bail!("error event: {}; so far: {}", ev.data, out.brief()),
            _ => {}
        }
    }
    out.sha256 = hex(&hasher.finalize());
    Ok(out)
}

// ---------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------

/// A frame from the server.
#[derive(Debug, Clone)]
pub enum WsEvent {
    /// A binary frame: stream (1 stdout, 2 stderr, 3 pty), offset, bytes.
    Output {
        stream: u8,
        offset: u64,
        data: Vec<u8>,
    },
    /// A text frame (`{"type": "started"|"lost"|"exited"|"error", ...}`).
    Json(Value),
    /// The server closed the socket (or the connection ended).
    Closed,
}

type WsInner =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket connection to the host with the `x-api-key` header.
pub struct Ws {
    inner: WsInner,
}

impl Ws {
    /// Connects to `ws://127.0.0.1:PORT{path}`; fails with the HTTP status and body when
    /// the server refuses the upgrade.
    pub async fn connect(host: &Host, key: &str, path: &str) -> Result<Self> {
        let url = format!("ws://127.0.0.1:{}{}", host.port(), path);
        let mut req = url.as_str().into_client_request()?;
        req.headers_mut()
            .insert("x-api-key", HeaderValue::from_str(key)?);
        match tokio_tungstenite::connect_async(req).await {
            Ok((inner, _)) => Ok(Self { inner }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                bail!("WebSocket {path}: HTTP {}: {body}", resp.status())
            }
            Err(e) => Err(anyhow!(e).context(format!("WebSocket {path}"))),
        }
    }

    /// `/vms/{vm}/processes/{pid}/ws[?from=N]`.
    pub async fn attach(
        host: &Host,
        key: &str,
        vm: &str,
        pid: u64,
        from: Option<u64>,
    ) -> Result<Self> {
        let mut path = format!("/vms/{}/processes/{pid}/ws", enc(vm));
        if let Some(from) = from {
            path.push_str(&format!("?from={from}"));
        }
        Self::connect(host, key, &path).await
    }

    /// `/vms/{vm}/processes/ws`, then sends `start` (the start body) as the first frame.
    pub async fn start(host: &Host, key: &str, vm: &str, start: &Value) -> Result<Self> {
        let mut ws = Self::connect(host, key, &format!("/vms/{}/processes/ws", enc(vm))).await?;
        ws.send_json(start).await?;
        Ok(ws)
    }

    /// Sends a JSON text frame.
    pub async fn send_json(&mut self, v: &Value) -> Result<()> {
        self.inner
            .send(Message::text(v.to_string()))
            .await
            .context("sending a WebSocket text frame")
    }

    /// Sends a binary frame (stdin bytes).
    pub async fn send_binary(&mut self, data: &[u8]) -> Result<()> {
        self.inner
            .send(Message::binary(data.to_vec()))
            .await
            .context("sending a WebSocket binary frame")
    }

    /// Closes the socket (detaches; the process goes on).
    pub async fn close(mut self) -> Result<()> {
        let _ = self.inner.close(None).await;
        Ok(())
    }

    /// The next frame within `timeout` (pings and pongs skipped).
    pub async fn next_within(&mut self, timeout: Duration) -> Result<WsEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, self.inner.next()).await {
                Err(_) => bail!("no WebSocket frame within {timeout:?}"),
                Ok(None) => return Ok(WsEvent::Closed),
                Ok(Some(Err(e))) => {
                    use tokio_tungstenite::tungstenite::Error as E;
                    return match e {
                        E::ConnectionClosed | E::AlreadyClosed | E::Protocol(_) => {
                            Ok(WsEvent::Closed)
                        }
                        e => Err(anyhow!(e).context("reading a WebSocket frame")),
                    };
                }
                Ok(Some(Ok(m))) => m,
            };
            return Ok(match msg {
                Message::Binary(b) => {
                    if b.len() < 9 {
                        bail!(
                            "binary frame of {} bytes, shorter than its 9-byte header",
                            b.len()
                        );
                    }
                    let mut off = [0u8; 8];
                    off.copy_from_slice(&b[1..9]);
                    WsEvent::Output {
                        stream: b[0],
                        offset: u64::from_be_bytes(off),
                        data: b[9..].to_vec(),
                    }
                }
                Message::Text(t) => WsEvent::Json(
                    serde_json::from_str(t.as_str())
                        .with_context(|| format!("text frame is not JSON: {}", t.as_str()))?,
                ),
                Message::Close(_) => WsEvent::Closed,
                _ => continue,
            });
        }
    }
}

/// What [`WsOutput::read_until`] accumulated.
#[derive(Debug, Default, Clone)]
pub struct WsOutput {
    /// All output bytes received, in order.
    pub bytes: Vec<u8>,
    /// The offset after the last byte received (None before any).
    pub next_offset: Option<u64>,
    /// Streams seen.
    pub streams: Vec<u8>,
    /// Text frames received.
    pub events: Vec<Value>,
    /// The `exited` frame, once seen.
    pub exited: Option<Value>,
    /// Whether the socket closed.
    pub closed: bool,
}

impl WsOutput {
    /// The bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Reads frames from `ws` until `done(self)` holds, the socket closes or `timeout`
    /// passes (an error naming what was received). Output offsets must be contiguous;
    /// an `error` frame fails.
    pub async fn read_until(
        &mut self,
        ws: &mut Ws,
        timeout: Duration,
        mut done: impl FnMut(&WsOutput) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if self.closed {
                bail!("the WebSocket closed first; received: {}", self.brief());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "condition not met within {timeout:?}; received: {}",
                    self.brief()
                );
            }
            let ev = match ws.next_within(left).await {
                Ok(ev) => ev,
                Err(e) => bail!("{e:#}; received: {}", self.brief()),
            };
            match ev {
                WsEvent::Output {
                    stream,
                    offset,
                    data,
                } => {
                    if let Some(next) = self.next_offset {
                        if offset != next {
                            bail!(
                                "frame at offset {offset}, expected {next}; received: {}",
                                self.brief()
                            );
                        }
                    }
                    self.next_offset = Some(offset + data.len() as u64);
                    if !self.streams.contains(&stream) {
                        self.streams.push(stream);
                    }
                    self.bytes.extend_from_slice(&data);
                }
                WsEvent::Json(v) => {
                    match v.get("type").and_then(Value::as_str) {
                        Some("exited") => self.exited = Some(v.clone()),
                        Some("error") => bail!("error frame {v}; received: {}", self.brief()),
                        Some("lost") => {
                            self.next_offset = v.get("to_offset").and_then(Value::as_u64);
                        }
                        _ => {}
                    }
                    self.events.push(v);
                }
                WsEvent::Closed => self.closed = true,
            }
        }
        Ok(())
    }

    /// A short description for messages.
    pub fn brief(&self) -> String {
        let text = self.text();
        let start = text.len().saturating_sub(2000);
        let mut i = start;
        while !text.is_char_boundary(i) {
            i += 1;
        }
        format!(
            "{} bytes (streams {:?}), events {:?}, closed {}, tail {:?}",
            self.bytes.len(),
            self.streams,
            self.events,
            self.closed,
            &text[i..]
        )
    }
}

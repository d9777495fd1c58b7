//! The agent part of the benchmark: `run` through the agent against the
//! engine's exec path, and stdout streaming, upload and download throughput
//! of 1 GiB, each beside a docker CLI baseline measured in the same run.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use opensandbox_e2e::{docker_host, enc, json, Host};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::{ms, progress, Row};

pub const GIB: u64 = 1024 * 1024 * 1024;

/// A throughput figure: bytes moved in a time.
pub struct Rate {
    pub op: String,
    pub mib_s: Vec<f64>,
    pub target_mib_s: Option<f64>,
}

impl Rate {
    pub fn median(&self) -> f64 {
        let mut v = self.mib_s.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

fn mib_s(bytes: u64, elapsed_ms: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / (elapsed_ms / 1000.0)
}

/// `run echo hello` through the agent and through the engine's exec.
pub async fn run_rows(host: &Host, key: &str, vm: &str, n: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (label, via, target) in [
        ("run `echo hello` (agent)", "agent", Some(5.0)),
        ("run `echo hello` (engine exec via bollard)", "engine", None),
    ] {
        progress(label);
        let body = json!({"command": "echo hello", "via": via});
        for _ in 0..3 {
            host.run_with(key, vm, body.clone()).await?;
        }
        let mut s = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = host.run_with(key, vm, body.clone()).await?;
            s.push(ms(t.elapsed()));
            if r.stdout != "hello\n" || r.exit_code != Some(0) {
                bail!("run echo hello via {via} gave {}", r.brief());
            }
        }
        rows.push(Row::new(label, s, target));
    }
    Ok(rows)
}

/// Streams `head -c BYTES /dev/zero` over SSE; returns the decoded byte count.
async fn stream_sse(host: &Host, key: &str, vm: &str, bytes: u64) -> Result<u64> {
    let resp = host
        .client()
        .post(host.url(&format!("/vms/{}/processes", enc(vm))))
        .header("x-api-key", key)
        .header("accept", "text/event-stream")
        .json(&json!({"argv": ["head", "-c", bytes.to_string(), "/dev/zero"]}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("SSE start: {}", resp.status());
    }
    let mut body = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut got = 0u64;
    let engine = base64::engine::general_purpose::STANDARD;
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk?);
        // Events end with a blank line; only `data:` lines matter here.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            for line in event.split(|b| *b == b'\n') {
                let Some(data) = line.strip_prefix(b"data: ") else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_slice(data)?;
                match v["type"].as_str() {
                    Some("output") => {
                        let text = v["data"].as_str().unwrap_or_default();
                        got += engine.decode(text)?.len() as u64;
                    }
                    Some("exited") => return Ok(got),
                    Some("error") => bail!("stream error: {v}"),
                    _ => {}
                }
            }
        }
    }
    bail!("SSE stream ended before the process exited ({got} bytes)")
}

/// Streams `head -c BYTES /dev/zero` over the WebSocket start endpoint.
async fn stream_ws(host: &Host, key: &str, vm: &str, bytes: u64) -> Result<u64> {
    let url = format!(
        "ws://127.0.0.1:{}/vms/{}/processes/ws",
        host.port(),
        enc(vm)
    );
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("x-api-key", key.parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let start = json!({"argv": ["head", "-c", bytes.to_string(), "/dev/zero"]});
    socket.send(Message::Text(start.to_string().into())).await?;
    let mut got = 0u64;
    while let Some(message) = socket.next().await {
        match message? {
            Message::Binary(frame) => got += frame.len().saturating_sub(9) as u64,
            Message::Text(text) => {
                let v: serde_json::Value = serde_json::from_str(text.as_str())?;
                match v["type"].as_str() {
                    Some("exited") => return Ok(got),
                    Some("error") => bail!("stream error: {v}"),
                    _ => {}
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    bail!("WebSocket closed before the process exited ({got} bytes)")
}

/// Uploads BYTES of a repeated 1 MiB pattern to `path`.
async fn upload(host: &Host, key: &str, vm: &str, path: &str, bytes: u64) -> Result<()> {
    let chunk = bytes::Bytes::from(
        (0..1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    );
    let count = bytes / chunk.len() as u64;
    let body =
        futures_util::stream::iter((0..count).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = host
        .client()
        .put(host.url(&format!("/vms/{}/files?path={}", enc(vm), enc(path))))
        .header("x-api-key", key)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("upload: {} {}", resp.status(), resp.text().await?);
    }
    Ok(())
}

async fn download(host: &Host, key: &str, vm: &str, path: &str) -> Result<u64> {
    let resp = host
        .client()
        .get(host.url(&format!("/vms/{}/files?path={}", enc(vm), enc(path))))
        .header("x-api-key", key)
        .send()
        .await?;
    if resp.status() != 200 {
        bail!("download: {}", resp.status());
    }
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        got += chunk?.len() as u64;
    }
    Ok(got)
}

/// Runs a docker CLI command and counts its stdout bytes.
async fn docker_count(args: &[&str]) -> Result<u64> {
    let mut child = tokio::process::Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("docker {args:?}"))?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 1024 * 1024];
    let mut got = 0u64;
    loop {
        let n = out.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let status = child.wait().await?;
    if !status.success() {
        bail!("docker {args:?} failed: {status}");
    }
    Ok(got)
}

/// Throughput of 1 GiB: stdout streaming (SSE, WebSocket), upload, download,
/// and the docker CLI doing the same (exec stdout, cp in and out).
pub async fn throughput(
    host: &Host,
    key: &str,
    vm: &str,
    container: &str,
    runs: usize,
) -> Result<Vec<Rate>> {
    let bytes = GIB;
    let mut rates = Vec::new();
    let mut measure = |op: &str, target: Option<f64>| {
        rates.push(Rate {
            op: op.to_string(),
            mib_s: Vec::new(),
            target_mib_s: target,
        });
        rates.len() - 1
    };
    let sse = measure("stdout stream 1 GiB (SSE, base64 JSON events)", Some(500.0));
    let ws = measure("stdout stream 1 GiB (WebSocket binary frames)", Some(500.0));
    let up = measure("upload 1 GiB (PUT /files)", Some(300.0));
    let down = measure("download 1 GiB (GET /files)", Some(300.0));
    let exec_cli = measure(
        "baseline: `docker exec C head -c 1G /dev/zero` stdout",
        None,
    );
    let cp_in = measure("baseline: `docker cp` 1 GiB file into C", None);
    let cp_out = measure(
        "baseline: `docker cp` 1 GiB file out of C (tar to stdout)",
        None,
    );

    let host_file = std::env::temp_dir().join("opensandbox-bench-1g");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&host_file)?;
        let block = vec![7u8; 1024 * 1024];
        for _ in 0..1024 {
            f.write_all(&block)?;
        }
    }
    let host_file_arg = host_file.display().to_string();
    let result = async {
        for i in 0..runs {
            progress(&format!("throughput run {}/{runs}", i + 1));
            let t = Instant::now();
            let got = stream_sse(host, key, vm, bytes).await?;
            if got != bytes {
                bail!("SSE delivered {got} of {bytes} bytes");
            }
            rates[sse].mib_s.push(mib_s(got, ms(t.elapsed())));

            let t = Instant::now();
            let got = stream_ws(host, key, vm, bytes).await?;
            if got != bytes {
                bail!("WebSocket delivered {got} of {bytes} bytes");
            }
            rates[ws].mib_s.push(mib_s(got, ms(t.elapsed())));

            let t = Instant::now();
            upload(host, key, vm, "/root/bench-1g", bytes).await?;
            rates[up].mib_s.push(mib_s(bytes, ms(t.elapsed())));

            let t = Instant::now();
            let got = download(host, key, vm, "/root/bench-1g").await?;
            if got != bytes {
                bail!("download delivered {got} of {bytes} bytes");
            }
            rates[down].mib_s.push(mib_s(got, ms(t.elapsed())));

            let t = Instant::now();
            let got =
                docker_count(&["exec", container, "head", "-c", "1073741824", "/dev/zero"]).await?;
            rates[exec_cli].mib_s.push(mib_s(got, ms(t.elapsed())));

            let t = Instant::now();
            docker_count(&["cp", &host_file_arg, &format!("{container}:/root/cp-1g")]).await?;
            rates[cp_in].mib_s.push(mib_s(bytes, ms(t.elapsed())));

            let t = Instant::now();
            docker_count(&["cp", &format!("{container}:/root/cp-1g"), "-"]).await?;
            rates[cp_out].mib_s.push(mib_s(bytes, ms(t.elapsed())));
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_file(&host_file);
    result?;
    Ok(rates)
}

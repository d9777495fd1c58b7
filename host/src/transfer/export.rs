//! The export pipeline: `btrfs send` (with `-p` when an older snapshot of the
//! same sandbox was exported and is still here) -> zstd -> SHA-256 -> S3
//! multipart parts, uploaded while the stream is produced (one part in
//! memory, one in flight). A failure aborts the upload; the manifest goes up
//! last, so a visible manifest means a complete export.

use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_compression::tokio::bufread::ZstdEncoder;
use bytes::Bytes;
use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, BufReader};
use tracing::{info, warn};

use super::manifest::{Manifest, StreamEntry, FORMAT, VERSION};
use super::stream::{spawn_btrfs, wait_btrfs, CountingReader};
use super::{JobFailure, Transfers};
use crate::s3::{ObjectStore, Upload};
use crate::sandbox::SandboxError;
use crate::store::Job;

/// Size of one multipart part (S3 wants at least 5 MiB but for the last).
const PART_SIZE: usize = 16 * 1024 * 1024;

/// An earlier export this one can be a difference from.
struct Base {
    manifest_key: String,
    manifest: Manifest,
    path: std::path::PathBuf,
}

pub async fn run(
    transfers: &Transfers,
    s3: &ObjectStore,
    job: &mut Job,
    progress: &Arc<AtomicU64>,
) -> Result<(), JobFailure> {
    let snapshot = job.snapshot.clone().unwrap_or_default();
    // The lock keeps the snapshots (ours and the base) in place while they are read.
    let (sandbox, path, _guard) = transfers
        .sandboxes
        .snapshot_for_export(job.owner_key_id, &job.vm, &snapshot)
        .await?;
    let taken = transfers
        .store
        .get_snapshot(sandbox.id, &snapshot)
        .await?
        .ok_or_else(|| SandboxError::SnapshotNotFound(snapshot.clone()))?;
    let base = find_base(transfers, sandbox.id, &snapshot).await?;

    let stem = format!("{}/{}-{}", sandbox.id, snapshot, job.id);
    let stream_key = s3.full_key(&format!("{stem}.btrfs.zst"));
    let manifest_key = s3.full_key(&format!("{stem}.manifest.json"));
    let upload = s3.start_upload(&stream_key).await?;
    job.upload_key = Some(upload.key.clone());
    job.upload_id = Some(upload.upload_id.clone());
    transfers.store.save_job(job).await?;

    let sent = match send(s3, &upload, &path, base.as_ref(), progress).await {
        Ok(sent) => sent,
        Err(err) => {
            if let Err(abort) = s3.abort_upload(&upload.key, &upload.upload_id).await {
                warn!(job = %job.id, error = %abort, "cannot abort the multipart upload");
            }
            return Err(err);
        }
    };
    let entry = StreamEntry {
        key: stream_key,
        snapshot: snapshot.clone(),
        parent_snapshot: base.as_ref().map(|b| b.manifest.snapshot.clone()),
        compressed_bytes: sent.compressed,
        stream_bytes: sent.stream,
        sha256: sent.sha256,
    };
    let mut chain = base
        .as_ref()
        .map(|b| b.manifest.chain.clone())
        .unwrap_or_default();
    chain.push(entry.clone());
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        runtime: sandbox.runtime.clone(),
        image: sandbox.image.clone(),
        vm: sandbox.name.clone(),
        sandbox_id: sandbox.id.to_string(),
        snapshot: snapshot.clone(),
        snapshot_created_at: taken.created_at,
        exported_at: Utc::now(),
        stream: entry,
        parent: base.as_ref().map(|b| b.manifest_key.clone()),
        chain,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| JobFailure::Stream(format!("cannot encode the manifest: {e}")))?;
    s3.put(&manifest_key, json.clone(), "application/json")
        .await?;
    info!(job = %job.id, key = %manifest_key, bytes = sent.compressed,
        incremental = base.is_some(), "snapshot exported");
    job.object_key = Some(manifest_key);
    job.manifest = Some(String::from_utf8_lossy(&json).into_owned());
    job.bytes_total = Some(sent.compressed);
    Ok(())
}

/// The newest earlier export of this sandbox whose snapshot is still the
/// same subvolume here (same name and creation time) and is not this one.
async fn find_base(
    transfers: &Transfers,
    sandbox: uuid::Uuid,
    snapshot: &str,
) -> Result<Option<Base>, JobFailure> {
    for job in transfers.store.exports_of(sandbox).await? {
        let (Some(key), Some(text)) = (job.object_key, job.manifest) else {
            continue;
        };
        let Ok(manifest) = serde_json::from_str::<Manifest>(&text) else {
            continue;
        };
        if manifest.snapshot == snapshot {
            continue;
        }
        let Some(here) = transfers
            .store
            .get_snapshot(sandbox, &manifest.snapshot)
            .await?
        else {
            continue;
        };
        if here.created_at != manifest.snapshot_created_at {
            continue;
        }
        let path = transfers
            .sandboxes
            .snapshot_path(sandbox, &manifest.snapshot);
        return Ok(Some(Base {
            manifest_key: key,
            manifest,
            path,
        }));
    }
    Ok(None)
}

struct Sent {
    compressed: u64,
    stream: u64,
    sha256: String,
}

/// Streams `btrfs send` through zstd into the upload's parts and completes it.
async fn send(
    s3: &ObjectStore,
    upload: &Upload,
    path: &std::path::Path,
    base: Option<&Base>,
    progress: &Arc<AtomicU64>,
) -> Result<Sent, JobFailure> {
    let mut args: Vec<&OsStr> = vec![OsStr::new("send"), OsStr::new("-q")];
    if let Some(base) = base {
        args.push(OsStr::new("-p"));
        args.push(base.path.as_os_str());
    }
    args.push(path.as_os_str());
    let (mut child, stderr) = spawn_btrfs(&args, Stdio::null(), Stdio::piped())?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| JobFailure::Stream("btrfs send has no stdout".into()))?;
    let stream_bytes = Arc::new(AtomicU64::new(0));
    let counted = CountingReader::new(stdout, Arc::clone(&stream_bytes));
    let mut encoder = ZstdEncoder::new(BufReader::with_capacity(1024 * 1024, counted));

    let mut hasher = Sha256::new();
    let mut parts = Vec::new();
    let mut in_flight: Option<tokio::task::JoinHandle<crate::s3::Result<_>>> = None;
    let mut number = 0i32;
    let mut compressed = 0u64;
    loop {
        let mut buf = Vec::with_capacity(PART_SIZE);
        (&mut encoder)
            .take(PART_SIZE as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| JobFailure::Stream(format!("reading the send stream: {e}")))?;
        let last = buf.len() < PART_SIZE;
        if buf.is_empty() && number > 0 {
            break;
        }
        hasher.update(&buf);
        compressed += buf.len() as u64;
        number += 1;
        if let Some(previous) = in_flight.take() {
            parts.push(join_part(previous).await?);
        }
        let s3 = s3.clone();
        let upload = upload.clone();
        let data = Bytes::from(buf);
        let n = number;
        in_flight = Some(tokio::spawn(async move {
            s3.upload_part(&upload, n, data).await
        }));
        progress.store(compressed, Ordering::Relaxed);
        if last {
            break;
        }
    }
    if let Some(previous) = in_flight.take() {
        parts.push(join_part(previous).await?);
    }
    drop(encoder);
    wait_btrfs("btrfs send", child, stderr).await?;
    s3.complete_upload(upload, parts).await?;
    Ok(Sent {
        compressed,
        stream: stream_bytes.load(Ordering::Relaxed),
        sha256: hex::encode(hasher.finalize()),
    })
}

async fn join_part(
    handle: tokio::task::JoinHandle<crate::s3::Result<aws_sdk_s3::types::CompletedPart>>,
) -> Result<aws_sdk_s3::types::CompletedPart, JobFailure> {
    match handle.await {
        Ok(part) => Ok(part?),
        Err(e) => Err(JobFailure::Stream(format!("part upload task failed: {e}"))),
    }
}

//! The import pipeline: read and check the manifest, then for every stream of
//! its chain, in order: download -> SHA-256 and size check -> zstd -> `btrfs
//! receive` into this job's staging folder (invisible to every sandbox).
//! Only when every stream was received and matched its checksum does the
//! sandbox service create the sandbox from the last one. The staging folder
//! is removed whatever happens.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use async_compression::tokio::bufread::ZstdDecoder;
use tokio::io::{AsyncWriteExt, BufReader};
use tracing::{info, warn};

use super::manifest::{Manifest, StreamEntry, MAX_BYTES};
use super::stream::{remove_staging, spawn_btrfs, wait_btrfs, HashingReader};
use super::{JobFailure, Transfers};
use crate::btrfs;
use crate::s3::{ObjectStore, S3Error};
use crate::store::Job;

/// Suffix of manifest keys; a key given without it is taken as the stem.
const MANIFEST_SUFFIX: &str = ".manifest.json";

pub async fn run(
    transfers: &Transfers,
    s3: &ObjectStore,
    job: &mut Job,
    progress: &Arc<AtomicU64>,
) -> Result<(), JobFailure> {
    let key = job.object_key.clone().unwrap_or_default();
    let manifest_key = if key.ends_with(MANIFEST_SUFFIX) {
        key
    } else {
        format!("{key}{MANIFEST_SUFFIX}")
    };
    let data = s3.get_small(&manifest_key, MAX_BYTES).await?;
    let runtimes = transfers.sandboxes.runtimes().names();
    let manifest = Manifest::parse(&data, &runtimes).map_err(|e| JobFailure::Foreign(e.0))?;
    // The key that asked, for the policy chain (a key revoked since owns nothing new).
    let caller = transfers
        .store
        .get_key(job.owner_key_id)
        .await?
        .ok_or(JobFailure::KeyRevoked)?;
    let admitted = transfers
        .sandboxes
        .admit_import(&caller, &job.vm, &manifest.image, &manifest.runtime)
        .await?;
    job.snapshot = Some(manifest.snapshot.clone());
    job.bytes_total = Some(manifest.chain.iter().map(|e| e.compressed_bytes).sum());
    transfers.store.save_job(job).await?;

    let staging = transfers.sandboxes.paths().staging(job.id);
    let outcome = async {
        tokio::fs::create_dir_all(&staging).await?;
        let received = receive_chain(s3, &manifest, &staging, progress).await?;
        let sandbox = transfers
            .sandboxes
            .import(admitted, &manifest.snapshot, &received)
            .await?;
        Ok::<_, JobFailure>(sandbox)
    }
    .await;
    if let Err(err) = remove_staging(&staging).await {
        warn!(job = %job.id, error = %err, "cannot remove the staging folder; the next start retries");
    }
    let sandbox = outcome?;
    info!(job = %job.id, sandbox = %sandbox.id, streams = manifest.chain.len(), "snapshot imported");
    job.sandbox_id = Some(sandbox.id);
    Ok(())
}

/// Receives every stream of the chain, in order, each into its own folder;
/// returns the last received subvolume.
async fn receive_chain(
    s3: &ObjectStore,
    manifest: &Manifest,
    staging: &Path,
    progress: &Arc<AtomicU64>,
) -> Result<PathBuf, JobFailure> {
    let mut last = None;
    for (i, entry) in manifest.chain.iter().enumerate() {
        let dir = staging.join(i.to_string());
        tokio::fs::create_dir(&dir).await?;
        receive_one(s3, entry, &dir, progress).await?;
        let received = dir.join(&entry.snapshot);
        if !btrfs::is_subvolume_async(received.clone()).await? {
            return Err(JobFailure::Corrupt(format!(
                "stream {} did not carry snapshot {:?}",
                entry.key, entry.snapshot
            )));
        }
        last = Some(received);
    }
    last.ok_or_else(|| JobFailure::Foreign("the chain is empty".into()))
}

async fn receive_one(
    s3: &ObjectStore,
    entry: &StreamEntry,
    dir: &Path,
    progress: &Arc<AtomicU64>,
) -> Result<(), JobFailure> {
    let (len, body) = s3.get_stream(&entry.key).await.map_err(|e| match e {
        S3Error::NotFound(key) => {
            JobFailure::Corrupt(format!("stream {key:?} of the chain is missing"))
        }
        other => other.into(),
    })?;
    if let Some(len) = len {
        if len != entry.compressed_bytes {
            return Err(JobFailure::Corrupt(format!(
                "stream {:?} has {len} bytes; the manifest says {}",
                entry.key, entry.compressed_bytes
            )));
        }
    }
    let args = [OsStr::new("receive"), OsStr::new("-e"), dir.as_os_str()];
    let (mut child, stderr) = spawn_btrfs(&args, Stdio::piped(), Stdio::null())?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| JobFailure::Stream("btrfs receive has no stdin".into()))?;
    let hashing = HashingReader::new(body, Arc::clone(progress));
    let mut decoder = ZstdDecoder::new(BufReader::new(hashing));
    let copied = tokio::io::copy(&mut decoder, &mut stdin).await;
    let shutdown = stdin.shutdown().await;
    drop(stdin);
    // Read whatever the decoder left, so the checksum covers the whole object.
    let mut rest = decoder.into_inner();
    let drained = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await;
    let (sha256, count) = rest.into_inner().finish();
    if drained.is_err() || count != entry.compressed_bytes || sha256 != entry.sha256 {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(JobFailure::Corrupt(format!(
            "stream {:?}: {count} bytes with SHA-256 {sha256}; the manifest says {} bytes with {}",
            entry.key, entry.compressed_bytes, entry.sha256
        )));
    }
    if let Err(e) = copied {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let detail = stderr.await.unwrap_or_default();
        return Err(JobFailure::Stream(format!(
            "receiving stream {:?}: {e} {detail}",
            entry.key
        )));
    }
    if let Err(e) = shutdown {
        warn!(error = %e, "closing btrfs receive's input");
    }
    wait_btrfs("btrfs receive", child, stderr).await
}

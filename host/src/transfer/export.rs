//! The export pipeline: `btrfs send` (with `-p` when an older snapshot of the
//! same sandbox was exported and is still here) -> zstd -> SHA-256 -> S3
//! multipart parts, uploaded while the stream is produced (one part being
//! filled, up to [`PARTS_IN_FLIGHT`] uploading). A failure aborts the upload;
//! the manifest goes up last, so a visible manifest means a complete export.

use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::manifest::{Manifest, StreamEntry, FORMAT, VERSION};
use super::stream::{spawn_btrfs, wait_btrfs};
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
    // Under the sandbox's lock the base is chosen and both snapshots are pinned;
    // the pin, not the lock, keeps them in place while they are read.
    let (sandbox, path, lock) = transfers
        .sandboxes
        .snapshot_for_export(job.owner_key_id, &job.vm, &snapshot)
        .await?;
    let taken = transfers
        .store
        .get_snapshot(sandbox.id, &snapshot)
        .await?
        .ok_or_else(|| SandboxError::SnapshotNotFound(snapshot.clone()))?;
    let base = find_base(transfers, sandbox.id, &snapshot).await?;
    let mut pinned = vec![snapshot.clone()];
    pinned.extend(base.as_ref().map(|b| b.manifest.snapshot.clone()));
    let _pin = transfers.sandboxes.pin_for_export(sandbox.id, pinned, lock);

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
        incremental = base.is_some(), produce_ms = sent.produce_ms,
        upload_wait_ms = sent.upload_wait_ms, "snapshot exported");
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
    /// Time spent producing parts (btrfs send, zstd, SHA-256).
    produce_ms: u128,
    /// Time spent waiting for a free upload slot and for the last parts.
    upload_wait_ms: u128,
}

/// Streams `btrfs send` through zstd into the upload's parts and completes it.
///
/// A blocking thread ([`produce_parts`]) reads, compresses and hashes the
/// stream into [`PART_SIZE`] buffers, so that this CPU work never holds one of
/// the runtime's threads; each full buffer is uploaded on a task of its own,
/// at most [`PARTS_IN_FLIGHT`] at a time, while the next ones are produced.
/// Memory is bounded by `(PARTS_IN_FLIGHT + 3) * PART_SIZE`, 112 MiB (64 MiB
/// uploading, one part waiting for a slot, one in the channel, one being
/// filled). A failure stops the part uploads still running before it is
/// returned, so the caller's abort of the upload is the last request for it;
/// the producer stops at its next part (the channel is closed) or at once
/// (`btrfs send` is killed when its child handle is dropped).
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
    // Blocking again (tokio's conversion clears O_NONBLOCK), for the producer's thread.
    let stdout = std::fs::File::from(stdout.into_owned_fd()?);
    let (parts_tx, mut parts_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let producer = tokio::task::spawn_blocking(move || produce_parts(stdout, parts_tx));

    let mut parts = PartsInFlight::new(PARTS_IN_FLIGHT);
    let mut number = 0i32;
    let mut compressed = 0u64;
    let mut upload_wait = std::time::Duration::ZERO;
    let result: Result<(), JobFailure> = async {
        while let Some(buf) = parts_rx.recv().await {
            compressed += buf.len() as u64;
            number += 1;
            let waited = std::time::Instant::now();
            parts.wait_for_slot().await?;
            upload_wait += waited.elapsed();
            let s3 = s3.clone();
            let upload = upload.clone();
            let data = Bytes::from(buf);
            let n = number;
            parts.start(n, async move { s3.upload_part(&upload, n, data).await });
            progress.store(compressed, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    drop(parts_rx);
    if let Err(err) = result {
        parts.stop().await;
        return Err(err);
    }
    let produced = match producer.await {
        Ok(Ok(produced)) => produced,
        Ok(Err(err)) => {
            parts.stop().await;
            return Err(err);
        }
        Err(e) => {
            parts.stop().await;
            return Err(JobFailure::Stream(format!(
                "the stream producer failed: {e}"
            )));
        }
    };
    let waited = std::time::Instant::now();
    let parts = parts.finish().await?;
    upload_wait += waited.elapsed();
    wait_btrfs("btrfs send", child, stderr).await?;
    s3.complete_upload(upload, parts).await?;
    Ok(Sent {
        compressed,
        stream: produced.stream,
        sha256: produced.sha256,
        produce_ms: produced.busy.as_millis(),
        upload_wait_ms: upload_wait.as_millis(),
    })
}

/// What [`produce_parts`] made of a whole stream.
struct Produced {
    /// Bytes `btrfs send` wrote (before compression).
    stream: u64,
    /// Hex SHA-256 of the compressed stream (every part, in order).
    sha256: String,
    /// Time spent reading, compressing and hashing.
    busy: std::time::Duration,
}

/// Reads the send stream, compresses it with zstd (level 3, as the `zstd`
/// CLI) and hashes the result, handing [`PART_SIZE`] parts to `parts` (the
/// last one shorter; at least one, possibly empty). Runs on a blocking thread.
fn produce_parts(
    stream: std::fs::File,
    parts: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<Produced, JobFailure> {
    let read = |e: std::io::Error| JobFailure::Stream(format!("reading the send stream: {e}"));
    let counted = CountingRead {
        inner: stream,
        count: 0,
    };
    let mut encoder = zstd::stream::read::Encoder::with_buffer(
        std::io::BufReader::with_capacity(1024 * 1024, counted),
        3,
    )
    .map_err(read)?;
    let mut hasher = Sha256::new();
    let mut busy = std::time::Duration::ZERO;
    let mut sent_any = false;
    loop {
        let started = std::time::Instant::now();
        let mut buf = Vec::with_capacity(PART_SIZE);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut encoder, PART_SIZE as u64),
            &mut buf,
        )
        .map_err(read)?;
        let last = buf.len() < PART_SIZE;
        if buf.is_empty() && sent_any {
            break;
        }
        hasher.update(&buf);
        busy += started.elapsed();
        if parts.blocking_send(buf).is_err() {
            // The uploader stopped (it failed); it reports why.
            return Err(JobFailure::Stream("the upload stopped".into()));
        }
        sent_any = true;
        if last {
            break;
        }
    }
    let stream = encoder.get_ref().get_ref().count;
    Ok(Produced {
        stream,
        sha256: hex::encode(hasher.finalize()),
        busy,
    })
}

/// Counts the bytes read through it (the uncompressed size of a send stream).
struct CountingRead<R> {
    inner: R,
    count: u64,
}

impl<R: std::io::Read> std::io::Read for CountingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// How many parts upload at once: enough to keep an S3 server that handles
/// requests concurrently busy while the next part is compressed.
const PARTS_IN_FLIGHT: usize = 4;

/// The part uploads of one multipart upload that are running, at most
/// `limit` at a time, and the parts they completed. The completed parts come
/// back in part-number order whatever order they finished in, as
/// CompleteMultipartUpload wants them.
struct PartsInFlight<T> {
    limit: usize,
    running: tokio::task::JoinSet<Result<(i32, T), JobFailure>>,
    done: Vec<(i32, T)>,
}

impl<T: Send + 'static> PartsInFlight<T> {
    fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            running: tokio::task::JoinSet::new(),
            done: Vec::new(),
        }
    }

    /// Waits until fewer than `limit` uploads run, failing with the first
    /// upload that failed.
    async fn wait_for_slot(&mut self) -> Result<(), JobFailure> {
        while self.running.len() >= self.limit {
            self.join_one().await?;
        }
        Ok(())
    }

    /// Starts uploading part `number`; call [`Self::wait_for_slot`] first.
    fn start<F, E>(&mut self, number: i32, upload: F)
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        E: Into<JobFailure>,
    {
        debug_assert!(self.running.len() < self.limit);
        self.running
            .spawn(async move { upload.await.map(|part| (number, part)).map_err(Into::into) });
    }

    async fn join_one(&mut self) -> Result<(), JobFailure> {
        match self.running.join_next().await {
            Some(Ok(Ok(part))) => {
                self.done.push(part);
                Ok(())
            }
            Some(Ok(Err(err))) => Err(err),
            Some(Err(e)) => Err(JobFailure::Stream(format!("part upload task failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits for every upload; the completed parts in part-number order.
    async fn finish(mut self) -> Result<Vec<T>, JobFailure> {
        while !self.running.is_empty() {
            if let Err(err) = self.join_one().await {
                self.stop().await;
                return Err(err);
            }
        }
        self.done.sort_by_key(|(number, _)| *number);
        Ok(self.done.into_iter().map(|(_, part)| part).collect())
    }

    /// Cancels the uploads still running and waits until they are gone.
    async fn stop(&mut self) {
        self.running.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test]
    async fn parts_come_back_in_order_with_at_most_the_limit_running() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut parts = PartsInFlight::new(3);
        for n in 1..=10i32 {
            parts.wait_for_slot().await.unwrap();
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            parts.start(n, async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Later parts finish first.
                tokio::time::sleep(Duration::from_millis(5 * (11 - n as u64))).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, JobFailure>(format!("etag-{n}"))
            });
        }
        let done = parts.finish().await.unwrap();
        let want: Vec<String> = (1..=10).map(|n| format!("etag-{n}")).collect();
        assert_eq!(done, want);
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_part_fails_and_stops_the_others() {
        let finished = Arc::new(AtomicUsize::new(0));
        let mut parts = PartsInFlight::new(4);
        for n in 1..=3i32 {
            let finished = Arc::clone(&finished);
            parts.start(n, async move {
                if n == 2 {
                    return Err(JobFailure::Stream("part 2 refused".into()));
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(n)
            });
        }
        let err = parts.finish().await.unwrap_err();
        assert!(err.to_string().contains("part 2 refused"), "{err}");
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }
}

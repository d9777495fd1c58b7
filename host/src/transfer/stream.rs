//! Stream plumbing shared by the pipelines: a reader that hashes and counts
//! what passes through it, the `btrfs` child processes, and the removal of
//! staging folders (which hold received subvolumes).

use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinHandle;

use super::JobFailure;
use crate::btrfs;

/// Passes bytes through, feeding a SHA-256 and a shared counter.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: Arc<AtomicU64>,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R, progress: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
            progress,
        }
    }

    /// The hex SHA-256 and count of everything read so far.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.count)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        poll_observed(&mut this.inner, cx, buf, |new| {
            this.hasher.update(new);
            this.count += new.len() as u64;
            this.progress.fetch_add(new.len() as u64, Ordering::Relaxed);
        })
    }
}

/// Reads from `inner` into `buf` and hands the bytes this read added to `observe`.
fn poll_observed<R: AsyncRead + Unpin>(
    inner: &mut R,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    observe: impl FnOnce(&[u8]),
) -> Poll<std::io::Result<()>> {
    let before = buf.filled().len();
    let poll = Pin::new(inner).poll_read(cx, buf);
    if let Poll::Ready(Ok(())) = &poll {
        observe(&buf.filled()[before..]);
    }
    poll
}

/// Starts `btrfs <args>` with the given stdin/stdout, collecting stderr.
pub fn spawn_btrfs(
    args: &[&std::ffi::OsStr],
    stdin: Stdio,
    stdout: Stdio,
) -> Result<(Child, JoinHandle<String>), JobFailure> {
    let mut child = Command::new("btrfs")
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| JobFailure::Stream(format!("cannot run btrfs: {e}")))?;
    if let Some(stdout) = &child.stdout {
        widen_pipe(stdout);
    }
    if let Some(stdin) = &child.stdin {
        widen_pipe(stdin);
    }
    let stderr = child.stderr.take();
    let collector = tokio::spawn(collect_stderr(stderr));
    Ok((child, collector))
}

/// Size asked for the pipes to and from `btrfs`: the default 64 KiB makes
/// the stream move in many small reads and wake-ups.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Enlarges a pipe to [`PIPE_SIZE`]; a refusal (a lower
/// /proc/sys/fs/pipe-max-size for an unprivileged host) keeps the default.
fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a descriptor we own only changes its capacity.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
    }
}

async fn collect_stderr(stderr: Option<ChildStderr>) -> String {
    let Some(stderr) = stderr else {
        return String::new();
    };
    let mut text = Vec::new();
    let _ = stderr.take(64 * 1024).read_to_end(&mut text).await;
    String::from_utf8_lossy(&text).trim().to_string()
}

/// Waits for a btrfs child and turns a failure into an error naming it.
pub async fn wait_btrfs(
    what: &str,
    mut child: Child,
    stderr: JoinHandle<String>,
) -> Result<(), JobFailure> {
    let status = child.wait().await?;
    let stderr = stderr.await.unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(JobFailure::Stream(format!(
            "{what} failed ({status}): {stderr}"
        )))
    }
}

/// Removes a staging folder: every subvolume up to two levels below it
/// (`<job>/<n>/<snapshot>`), then the folders.
pub async fn remove_staging(dir: &Path) -> Result<(), JobFailure> {
    remove_subvolumes_below(dir, 3).await?;
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn remove_subvolumes_below(dir: &Path, depth: u32) -> Result<(), JobFailure> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if !entry.file_type().await?.is_dir() {
            continue;
        }
        if btrfs::is_subvolume_async(path.clone()).await? {
            btrfs::delete_subvolume_if_exists_async(path).await?;
        } else if depth > 1 {
            Box::pin(remove_subvolumes_below(&path, depth - 1)).await?;
        }
    }
    Ok(())
}

//! Files in a sandbox, through its agent: streamed upload and download (a
//! large file never sits whole in the host's memory), stat, list, mkdir -p,
//! move and remove. The agent resolves every path inside the sandbox's own
//! root; the host only checks the shape of a path.

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tracing::instrument;

use super::{Result, SandboxError, Sandboxes};
use crate::agent::{pb, AgentError};

/// Upload chunks are gathered up to this size: fewer, larger messages.
const UPLOAD_CHUNK: usize = 512 * 1024;

/// Where and how an uploaded file is written.
#[derive(Debug, Clone, Default)]
pub struct FileUpload {
    pub path: String,
    /// Permission bits; None means 0644.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub overwrite: bool,
    pub make_parents: bool,
}

/// A download: the file's metadata, then its bytes.
pub type FileBytes =
    std::pin::Pin<Box<dyn Stream<Item = std::result::Result<Bytes, AgentError>> + Send>>;

/// Checks the shape of a sandbox path: absolute, no NUL, bounded.
pub fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(SandboxError::InvalidRequest(format!(
            "path {path:?} must be absolute (start with /), without NUL, at most 4096 bytes"
        )));
    }
    Ok(())
}

fn file_error(err: AgentError) -> SandboxError {
    match err.code() {
        Some(tonic::Code::NotFound) => SandboxError::PathNotFound(err.to_string()),
        Some(tonic::Code::AlreadyExists) => SandboxError::PathExists(err.to_string()),
        Some(tonic::Code::PermissionDenied) => SandboxError::PathRefused(err.to_string()),
        Some(tonic::Code::ResourceExhausted) => SandboxError::AgentBusy(err.to_string()),
        Some(tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition) => {
            SandboxError::InvalidRequest(err.to_string())
        }
        _ => SandboxError::Agent(err),
    }
}

fn status_error(status: tonic::Status) -> SandboxError {
    file_error(status.into())
}

impl Sandboxes {
    pub async fn stat_file(&self, owner: uuid::Uuid, vm: &str, path: &str) -> Result<pb::FileInfo> {
        check_path(path)?;
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let request = pb::PathRequest { path: path.into() };
        Ok(client
            .stat(request)
            .await
            .map_err(status_error)?
            .into_inner())
    }

    pub async fn list_dir(
        &self,
        owner: uuid::Uuid,
        vm: &str,
        path: &str,
    ) -> Result<Vec<pb::FileInfo>> {
        check_path(path)?;
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let request = pb::PathRequest { path: path.into() };
        Ok(client
            .list_dir(request)
            .await
            .map_err(status_error)?
            .into_inner()
            .entries)
    }

    pub async fn make_dir(
        &self,
        owner: uuid::Uuid,
        vm: &str,
        path: &str,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<pb::FileInfo> {
        check_path(path)?;
        check_mode(mode)?;
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let request = pb::MakeDirRequest {
            path: path.into(),
            mode: mode.unwrap_or(0),
            uid,
            gid,
        };
        Ok(client
            .make_dir(request)
            .await
            .map_err(status_error)?
            .into_inner())
    }

    pub async fn move_path(
        &self,
        owner: uuid::Uuid,
        vm: &str,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<pb::FileInfo> {
        check_path(from)?;
        check_path(to)?;
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let request = pb::MoveRequest {
            from: from.into(),
            to: to.into(),
            overwrite,
        };
        Ok(client
            .r#move(request)
            .await
            .map_err(status_error)?
            .into_inner())
    }

    pub async fn remove_path(
        &self,
        owner: uuid::Uuid,
        vm: &str,
        path: &str,
        recursive: bool,
    ) -> Result<()> {
        check_path(path)?;
        if path.trim_end_matches('/').is_empty() {
            return Err(SandboxError::InvalidRequest("refusing to remove /".into()));
        }
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let request = pb::RemoveRequest {
            path: path.into(),
            recursive,
        };
        client.remove(request).await.map_err(status_error)?;
        Ok(())
    }

    /// The file's metadata and a stream of its bytes.
    #[instrument(skip(self, owner))]
    pub async fn download(
        &self,
        owner: uuid::Uuid,
        vm: &str,
        path: &str,
    ) -> Result<(pb::FileInfo, FileBytes)> {
        check_path(path)?;
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let mut chunks = client
            .read_file(pb::ReadFileRequest { path: path.into() })
            .await
            .map_err(status_error)?
            .into_inner();
        let first = chunks.message().await.map_err(status_error)?;
        let Some(pb::FileChunk {
            chunk: Some(pb::file_chunk::Chunk::Info(info)),
        }) = first
        else {
            return Err(SandboxError::Agent(AgentError::Status {
                code: tonic::Code::Internal,
                message: "the agent sent file data before the file's metadata".into(),
            }));
        };
        let bytes = chunks.filter_map(|chunk| async move {
            match chunk {
                Ok(pb::FileChunk {
                    chunk: Some(pb::file_chunk::Chunk::Data(data)),
                }) => Some(Ok(data)),
                Ok(_) => None,
                Err(status) => Some(Err(AgentError::from(status))),
            }
        });
        Ok((info, Box::pin(bytes)))
    }

    /// Streams `body` into a file. The file appears only when the whole body
    /// arrived: a body that breaks off cancels the call, and the agent then
    /// removes what it had written.
    #[instrument(skip(self, owner, body), fields(path = %upload.path))]
    pub async fn upload<B, E>(
        &self,
        owner: uuid::Uuid,
        vm: &str,
        upload: FileUpload,
        body: B,
    ) -> Result<pb::FileInfo>
    where
        B: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        check_path(&upload.path)?;
        check_mode(upload.mode)?;
        let (_, mut client) = self.agent_of(owner, vm).await?;
        let header = pb::WriteFileRequest {
            part: Some(pb::write_file_request::Part::Header(pb::WriteHeader {
                path: upload.path,
                mode: upload.mode.unwrap_or(0),
                uid: upload.uid,
                gid: upload.gid,
                make_parents: upload.make_parents,
                overwrite: upload.overwrite,
            })),
        };
        // A body that breaks off ends the stream with `abort`, never with a
        // clean end (which would commit a partial file).
        let data = futures_util::stream::unfold(Some(body), |body| async move {
            let mut body = body?;
            let mut buf = BytesMut::new();
            loop {
                match body.next().await {
                    Some(Ok(bytes)) => {
                        buf.extend_from_slice(&bytes);
                        if buf.len() >= UPLOAD_CHUNK {
                            return Some((data_part(buf.freeze()), Some(body)));
                        }
                    }
                    Some(Err(err)) => {
                        let abort = pb::write_file_request::Part::Abort(pb::Abort {
                            reason: err.to_string(),
                        });
                        return Some((pb::WriteFileRequest { part: Some(abort) }, None));
                    }
                    None if buf.is_empty() => return None,
                    None => return Some((data_part(buf.freeze()), None)),
                }
            }
        });
        let requests = futures_util::stream::once(async move { header }).chain(data);
        match client.write_file(requests).await {
            Ok(reply) => Ok(reply.into_inner()),
            Err(status) if status.code() == tonic::Code::Aborted => {
                Err(SandboxError::InvalidRequest(format!(
                    "the upload broke off before its end; nothing was written ({})",
                    status.message()
                )))
            }
            Err(status) => Err(status_error(status)),
        }
    }
}

fn data_part(data: Bytes) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        part: Some(pb::write_file_request::Part::Data(data)),
    }
}

fn check_mode(mode: Option<u32>) -> Result<()> {
    match mode {
        Some(mode) if mode > 0o7777 => Err(SandboxError::InvalidRequest(format!(
            "mode {mode:o} is not a permission mode (at most 7777 octal)"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_clean_of_nul() {
        assert!(check_path("/tmp/x").is_ok());
        assert!(check_path("tmp/x").is_err());
        assert!(check_path("").is_err());
        assert!(check_path("/a\0b").is_err());
        assert!(check_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}

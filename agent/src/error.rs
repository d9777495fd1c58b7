//! The agent's one error type and its single mapping to gRPC statuses (the
//! table at the end of `agent.proto`).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `what` (usually a path), classified by its kind.
    pub fn io(what: impl std::fmt::Display, e: io::Error) -> Self {
        let msg = format!("{what}: {e}");
        match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(msg),
            io::ErrorKind::PermissionDenied => Error::PermissionDenied(msg),
            io::ErrorKind::AlreadyExists => Error::AlreadyExists(msg),
            io::ErrorKind::InvalidInput => Error::InvalidArgument(msg),
            // The request does not fit the file system's state; INTERNAL
            // would wrongly suggest an agent fault.
            io::ErrorKind::NotADirectory
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::DirectoryNotEmpty => Error::FailedPrecondition(msg),
            _ => match e.raw_os_error() {
                Some(libc::EROFS) => Error::PermissionDenied(msg),
                // A symlink loop or an over-long name: the request's path is unusable.
                Some(libc::ELOOP) | Some(libc::ENAMETOOLONG) => Error::InvalidArgument(msg),
                Some(libc::ENOTEMPTY) | Some(libc::EXDEV) => Error::FailedPrecondition(msg),
                _ => Error::Internal(msg),
            },
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::AlreadyExists(m) => tonic::Status::already_exists(m),
            Error::PermissionDenied(m) => tonic::Status::permission_denied(m),
            Error::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            Error::Internal(m) => tonic::Status::internal(m),
        }
    }
}

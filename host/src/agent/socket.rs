//! Connecting to an agent's Unix socket without trusting the folder it is in.
//!
//! The socket lives in a per-sandbox host folder that is mounted writable
//! into the sandbox, so whoever is root in the sandbox can replace
//! `agent.sock` with a symlink to any socket on the host (the Docker
//! engine's, say). We open the path with `O_PATH | O_NOFOLLOW`, check that
//! what we hold is a socket, and connect through `/proc/self/fd/N`: the
//! connection goes to exactly the inode we checked, with no window for a swap.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::net::UnixStream;

pub async fn connect(path: &Path) -> io::Result<UnixStream> {
    let held = open_socket_inode(path)?;
    let via_fd = format!("/proc/self/fd/{}", held.as_raw_fd());
    let stream = UnixStream::connect(via_fd).await;
    drop(held);
    stream
}

fn open_socket_inode(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path contains NUL"))?;
    // SAFETY: c_path is a valid NUL-terminated string; the fd, if any, is ours.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fd is open; stat points to writable memory of the right size.
    if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so the struct is initialized.
    let mode = unsafe { stat.assume_init() }.st_mode;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a socket", path.display()),
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_to_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        connect(&path).await.unwrap();
        accept.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn refuses_a_symlink_to_another_socket() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("engine.sock");
        let _listener = tokio::net::UnixListener::bind(&real).unwrap();
        let planted = dir.path().join("agent.sock");
        std::os::unix::fs::symlink(&real, &planted).unwrap();
        // O_PATH | O_NOFOLLOW holds the link itself, which is no socket.
        let err = connect(&planted).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn refuses_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = connect(&path).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}

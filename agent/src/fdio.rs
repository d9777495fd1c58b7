//! Async reads and writes on raw pipe and terminal fds, registered with
//! tokio's reactor. One type for both, because tokio's pipe types refuse a
//! terminal master.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use bytes::BytesMut;
use tokio::io::unix::AsyncFd;
pub use tokio::io::Interest;

pub struct Fd {
    inner: AsyncFd<OwnedFd>,
}

impl Fd {
    /// Takes `fd` over, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: the OwnedFd stays open and the same for the AsyncFd's life.
        let inner = unsafe { AsyncFd::register_with_interest(fd, interest) }?;
        Ok(Self { inner })
    }

    pub fn raw(&self) -> i32 {
        self.inner.get_ref().as_raw_fd()
    }

    /// Reads up to `max` bytes, appending to `buf`. Ok(0) is end of file; a
    /// terminal master's EIO (its last slave closed) counts as end of file.
    pub async fn read_buf(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| read_into(fd.as_raw_fd(), buf, max)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Like `read_buf` but never waits (WouldBlock when nothing is there).
    pub fn try_read_buf(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        read_into(self.raw(), buf, max)
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.inner.writable().await?;
            match guard.try_io(|fd| {
                // SAFETY: valid fd and a readable buffer of that length.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

fn read_into(fd: i32, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let n = spare.len().min(max);
    loop {
        // SAFETY: reading into the spare capacity, at most its length.
        let r = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), n) };
        if r >= 0 {
            // SAFETY: the kernel initialized r bytes.
            unsafe { buf.set_len(buf.len() + r as usize) };
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EIO) => return Ok(0),
            _ => return Err(e),
        }
    }
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a valid fd with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

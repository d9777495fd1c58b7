//! Starting a runtime plugin's process in a new user namespace whose id
//! mappings the host writes. A process cannot map more than its own id into
//! a namespace it made itself; its privileged parent can. So the child,
//! between fork and exec, unshares its user namespace, tells a host thread
//! its pid and waits; the thread writes `/proc/<pid>/{uid,gid}_map` and
//! lets it go on; the child then becomes uid/gid 0 of its namespace and
//! execs. If anything fails the child never execs and the spawn fails.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;

use super::CapabilityError;

/// Most ranges one mapping may have (the kernel allows 340; runtimes need one or two).
const MAX_RANGES: usize = 8;

/// One mapped range (mirrors the WIT record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// The mapping as the kernel reads it, after checking the ranges.
pub fn map_text(ranges: &[IdRange]) -> Result<String, CapabilityError> {
    if ranges.is_empty() || ranges.len() > MAX_RANGES {
        return Err(CapabilityError::Invalid(format!(
            "a user namespace needs 1 to {MAX_RANGES} id ranges"
        )));
    }
    let mut text = String::new();
    for r in ranges {
        let fits = r.count > 0
            && u64::from(r.outside) + u64::from(r.count) <= 1 << 31
            && u64::from(r.inside) + u64::from(r.count) <= u64::from(u32::MAX);
        if !fits {
            return Err(CapabilityError::Invalid(format!(
                "id range {r:?}: count must be positive and host ids below 2^31"
            )));
        }
        text.push_str(&format!("{} {} {}\n", r.inside, r.outside, r.count));
    }
    // The kernel refuses overlapping ranges; refusing them here gives the
    // plugin a clear error instead of a failed start.
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            let overlap = |x: u32, y: u32| {
                let (x, y) = (u64::from(x), u64::from(y));
                x < y + u64::from(b.count) && y < x + u64::from(a.count)
            };
            if overlap(a.inside, b.inside) || overlap(a.outside, b.outside) {
                return Err(CapabilityError::Invalid(format!(
                    "id ranges {a:?} and {b:?} overlap"
                )));
            }
        }
    }
    Ok(text)
}

/// The parent's half: the thread that writes the maps.
pub struct MapWriter {
    thread: JoinHandle<Result<(), String>>,
    /// The child's ends, closed in the parent once the child has them.
    child_ends: Option<(OwnedFd, OwnedFd)>,
}

/// The child's half: raw fds used between fork and exec.
#[derive(Clone, Copy)]
pub struct ChildEnds {
    ready_write: i32,
    go_read: i32,
    /// The parent's ends, which the child closes first.
    ready_read: i32,
    go_write: i32,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), CapabilityError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CapabilityError::Failed(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl MapWriter {
    /// Prepares the pipes and starts the thread that will write `map`.
    pub fn start(map: String) -> Result<(Self, ChildEnds), CapabilityError> {
        let (ready_read, ready_write) = pipe()?;
        let (go_read, go_write) = pipe()?;
        let ends = ChildEnds {
            ready_write: ready_write.as_raw_fd(),
            go_read: go_read.as_raw_fd(),
            ready_read: ready_read.as_raw_fd(),
            go_write: go_write.as_raw_fd(),
        };
        let thread = std::thread::Builder::new()
            .name("userns-map".into())
            .spawn(move || write_maps(ready_read, go_write, &map))
            .map_err(|e| CapabilityError::Failed(format!("cannot start a thread: {e}")))?;
        Ok((
            Self {
                thread,
                child_ends: Some((ready_write, go_read)),
            },
            ends,
        ))
    }

    /// After the spawn returned (the child exec'd or failed): closes the
    /// parent's copies of the child's ends, so the thread sees the end of
    /// a child that died early, and collects the thread's verdict.
    pub fn finish(mut self) -> Result<(), String> {
        drop(self.child_ends.take());
        self.thread
            .join()
            .map_err(|_| "the id-map thread panicked".to_string())?
    }
}

/// Writes the maps and always answers the child: `1` to go on, `0` to give
/// up. Never relying on the end of the pipe matters: a child forked
/// meanwhile by a concurrent spawn holds a copy of this write end until it
/// execs, and may itself be waiting on us.
fn write_maps(ready_read: OwnedFd, go_write: OwnedFd, map: &str) -> Result<(), String> {
    let mut go = fs::File::from(go_write);
    let result = write_maps_for_child(ready_read, map);
    let answer: &[u8] = if result.is_ok() { b"1" } else { b"0" };
    // A child that already died does not read: EPIPE is fine.
    let _ = go.write_all(answer);
    result
}

fn write_maps_for_child(ready_read: OwnedFd, map: &str) -> Result<(), String> {
    let mut ready = fs::File::from(ready_read);
    let mut pid = [0u8; 4];
    ready
        .read_exact(&mut pid)
        .map_err(|e| format!("the child never said it was ready: {e}"))?;
    let pid = i32::from_ne_bytes(pid);
    // gid_map first: writing uid_map first would not matter to the kernel,
    // but both must be in place before the child changes ids.
    for file in ["gid_map", "uid_map"] {
        fs::write(format!("/proc/{pid}/{file}"), map)
            .map_err(|e| format!("writing /proc/{pid}/{file}: {e}"))?;
    }
    Ok(())
}

/// In the child, between fork and exec: new user namespace, wait for the
/// maps, become root of it. Raw syscalls only.
pub fn enter_in_child(ends: ChildEnds) -> std::io::Result<()> {
    // SAFETY: close, unshare, getpid, write, read and set*id are raw
    // syscalls on fds and memory this function owns.
    unsafe {
        libc::close(ends.ready_read);
        libc::close(ends.go_write);
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(ends.ready_write, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let mut go = [0u8; 1];
        let read = loop {
            let n = libc::read(ends.go_read, go.as_mut_ptr().cast(), 1);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break n;
        };
        if read != 1 || go[0] != b'1' {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        libc::close(ends.ready_write);
        libc::close(ends.go_read);
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_checked() {
        let identity = IdRange {
            inside: 0,
            outside: 0,
            count: 65536,
        };
        assert_eq!(map_text(&[identity]).unwrap(), "0 0 65536\n");
        assert!(map_text(&[]).is_err());
        assert!(map_text(&[IdRange {
            count: 0,
            ..identity
        }])
        .is_err());
        assert!(map_text(&[IdRange {
            outside: u32::MAX - 1,
            ..identity
        }])
        .is_err());
        assert!(map_text(&[identity; 9]).is_err());
        let low = IdRange {
            inside: 0,
            outside: 100_000,
            count: 1000,
        };
        let high = IdRange {
            inside: 1000,
            outside: 200_000,
            count: 1000,
        };
        assert!(map_text(&[low, high]).is_ok());
        assert!(map_text(&[
            low,
            IdRange {
                inside: 999,
                ..high
            }
        ])
        .is_err());
        assert!(map_text(&[
            low,
            IdRange {
                outside: 100_500,
                ..high
            }
        ])
        .is_err());
    }
}

//! The file operations: path checks, stat/list, mkdir -p, move, remove,
//! streamed reads, and atomic uploads (temp file + rename).
//!
//! The agent runs in the sandbox's mount namespace, so ordinary path
//! resolution already stays inside the sandbox. The checks here only refuse
//! malformed paths and the agent's own mounts under `/.opensandbox`.

use std::ffi::CString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use opensandbox_agent_proto::v1::{FileInfo, FileType, WriteHeader};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

const MAX_PATH: usize = 4096;
const AGENT_DIR: &str = "/.opensandbox";
/// Size of the pieces a file is read in.
pub const READ_CHUNK: usize = 512 * 1024;

/// Checks a path from a request: absolute, no NUL, not too long, and not
/// one of the agent's own mounts.
pub fn check_path(path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(Error::InvalidArgument("path is empty".into()));
    }
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "path must be absolute: {path}"
        )));
    }
    if path.contains('\0') {
        return Err(Error::InvalidArgument("path contains NUL".into()));
    }
    if path.len() > MAX_PATH {
        return Err(Error::InvalidArgument(format!(
            "path longer than {MAX_PATH} bytes"
        )));
    }
    // A trailing `/` (or `/.`) makes the kernel follow a final symlink even
    // for lstat and O_NOFOLLOW: `/tmp/link-to-root/` would act on `/`. The
    // operations here act on the named entry itself, so drop it.
    let mut trimmed = path;
    loop {
        let shorter = trimmed
            .strip_suffix("/.")
            .or_else(|| trimmed.strip_suffix('/'))
            .filter(|s| !s.is_empty());
        match shorter {
            Some(s) => trimmed = s,
            None => break,
        }
    }
    let normal = normalize(Path::new(trimmed));
    if normal.starts_with(AGENT_DIR) || resolves_into_agent_dir(Path::new(trimmed)) {
        return Err(Error::PermissionDenied(format!(
            "{path}: the agent's own files are off limits"
        )));
    }
    Ok(PathBuf::from(trimmed))
}

/// Whether the path, with its symlinks followed, lands under `/.opensandbox`
/// (e.g. through a link `/tmp/os -> /.opensandbox`). The deepest existing
/// ancestor is resolved and the rest appended. A process in the sandbox
/// could swap a link after this check; it gains nothing by it, since root
/// in the sandbox can reach its own `/.opensandbox/run` anyway: the check
/// keeps the files API to its contract, it is not the isolation boundary
/// (the sandbox's mount namespace is).
fn resolves_into_agent_dir(path: &Path) -> bool {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match fs::canonicalize(&existing) {
            Ok(real) => {
                let full = rest.iter().rev().fold(real, |p: PathBuf, c| p.join(c));
                return normalize(&full).starts_with(AGENT_DIR);
            }
            Err(_) => match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_owned());
                    existing = parent.to_path_buf();
                }
                _ => return false,
            },
        }
    }
}

/// Resolves `.` and `..` lexically (only for the `/.opensandbox` check; the
/// kernel does the real resolution).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

pub fn file_info(path: &Path, md: &Metadata) -> FileInfo {
    let ft = md.file_type();
    let (kind, target) = if ft.is_symlink() {
        let target = fs::read_link(path)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        (FileType::Symlink, target)
    } else if ft.is_dir() {
        (FileType::Dir, String::new())
    } else if ft.is_file() {
        (FileType::File, String::new())
    } else {
        (FileType::Other, String::new())
    };
    FileInfo {
        path: display(path),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        r#type: kind as i32,
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        modified_ms: md.mtime() * 1000 + md.mtime_nsec() / 1_000_000,
        symlink_target: target,
    }
}

pub fn stat(path: &str) -> Result<FileInfo> {
    let p = check_path(path)?;
    let md = fs::symlink_metadata(&p).map_err(|e| Error::io(path, e))?;
    Ok(file_info(&p, &md))
}

pub fn list_dir(path: &str) -> Result<Vec<FileInfo>> {
    let p = check_path(path)?;
    let mut entries = Vec::new();
    for entry in fs::read_dir(&p).map_err(|e| Error::io(path, e))? {
        let entry = entry.map_err(|e| Error::io(path, e))?;
        let child = p.join(entry.file_name());
        // An entry removed meanwhile is simply not listed.
        if let Ok(md) = fs::symlink_metadata(&child) {
            entries.push((entry.file_name(), file_info(&child, &md)));
        }
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(entries.into_iter().map(|(_, i)| i).collect())
}

/// mkdir -p. Directories it creates get `mode` (exactly: not masked by the
/// umask) and the owner, if given; existing ones are left alone.
pub fn make_dir(path: &str, mode: u32, uid: Option<u32>, gid: Option<u32>) -> Result<FileInfo> {
    let p = check_path(path)?;
    let mode = if mode == 0 { 0o755 } else { mode & 0o7777 };
    make_dirs(&p, mode, uid, gid)?;
    let md = fs::symlink_metadata(&p).map_err(|e| Error::io(path, e))?;
    Ok(file_info(&p, &md))
}

fn make_dirs(p: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    let mut cur = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => cur.push(n),
            Component::ParentDir => {
                cur.pop();
                continue;
            }
            _ => continue,
        }
        match fs::create_dir(&cur) {
            Ok(()) => {
                fs::set_permissions(&cur, fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io(display(&cur), e))?;
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::lchown(&cur, uid, gid)
                        .map_err(|e| Error::io(display(&cur), e))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !cur.is_dir() {
                    return Err(Error::AlreadyExists(format!(
                        "{}: exists and is not a directory",
                        display(&cur)
                    )));
                }
            }
            Err(e) => return Err(Error::io(display(&cur), e)),
        }
    }
    Ok(())
}

/// rename(2), refusing to replace an existing `to` unless `overwrite`.
fn rename(from: &Path, to: &Path, overwrite: bool) -> io::Result<()> {
    if overwrite {
        return fs::rename(from, to);
    }
    let f = CString::new(from.as_os_str().as_bytes())?;
    let t = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; renameat2 by number because musl's libc may
    // not expose the wrapper.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // The file system (or kernel) cannot do it atomically: check, then
        // rename, accepting the small race.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
        _ => Err(e),
    }
}

pub fn move_path(from: &str, to: &str, overwrite: bool) -> Result<FileInfo> {
    let f = check_path(from)?;
    let t = check_path(to)?;
    rename(&f, &t, overwrite).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => Error::AlreadyExists(format!("{to}: already exists")),
        _ => Error::io(format!("move {from} to {to}"), e),
    })?;
    let md = fs::symlink_metadata(&t).map_err(|e| Error::io(to, e))?;
    Ok(file_info(&t, &md))
}

pub fn remove(path: &str, recursive: bool) -> Result<()> {
    let p = check_path(path)?;
    let resolved = fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
    if normalize(&p) == Path::new("/") || (resolved == Path::new("/") && !is_symlink(&p)) {
        return Err(Error::PermissionDenied("refusing to remove /".into()));
    }
    let md = fs::symlink_metadata(&p).map_err(|e| Error::io(path, e))?;
    let r = if md.is_dir() {
        if recursive {
            // std's remove_dir_all never follows symlinks.
            fs::remove_dir_all(&p)
        } else {
            fs::remove_dir(&p)
        }
    } else {
        fs::remove_file(&p)
    };
    r.map_err(|e| Error::io(path, e))
}

/// Opens a regular file for reading and describes it.
pub fn open_for_read(path: &str) -> Result<(File, FileInfo)> {
    let p = check_path(path)?;
    // O_NONBLOCK so that opening a FIFO does not hang; it is refused below.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&p)
        .map_err(|e| Error::io(path, e))?;
    let md = file.metadata().map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(Error::FailedPrecondition(format!(
            "{path}: not a regular file"
        )));
    }
    Ok((file, file_info(&p, &md)))
}

/// Streams a file's content in pieces into `tx` (runs on a blocking thread;
/// stops when the receiver is gone).
pub fn read_into(mut file: File, path: &str, tx: mpsc::Sender<Result<Bytes>>) {
    loop {
        let mut buf = BytesMut::zeroed(READ_CHUNK);
        let n = match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(Error::io(path, e)));
                return;
            }
        };
        buf.truncate(n);
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            return;
        }
    }
}

/// An upload in progress: a temp file next to the target, renamed into
/// place by `commit`, removed if dropped before.
pub struct Upload {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    overwrite: bool,
    committed: bool,
}

static UPLOAD_SEQ: AtomicU64 = AtomicU64::new(0);

impl Upload {
    pub fn begin(h: &WriteHeader) -> Result<Self> {
        let target = check_path(&h.path)?;
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(Error::InvalidArgument(format!(
                "{}: not a file path",
                h.path
            )));
        };
        if !h.overwrite && fs::symlink_metadata(&target).is_ok() {
            return Err(Error::AlreadyExists(format!("{}: already exists", h.path)));
        }
        if h.make_parents {
            make_dirs(dir, 0o755, None, None)?;
        }
        let mode = if h.mode == 0 { 0o644 } else { h.mode & 0o7777 };
        let (temp, file) = loop {
            let temp = dir.join(format!(
                ".{}.opensandbox-upload-{}",
                name.to_string_lossy(),
                unique_suffix()
            ));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
            {
                Ok(f) => break (temp, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&h.path, e)),
            }
        };
        let mut up = Upload {
            target,
            temp,
            file: Some(file),
            overwrite: h.overwrite,
            committed: false,
        };
        up.setup(mode, h.uid, h.gid)?;
        Ok(up)
    }

    fn setup(&mut self, mode: u32, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let path = display(&self.target);
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(file, uid, gid).map_err(|e| Error::io(&path, e))?;
        }
        // After chown, which clears setuid/setgid bits.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(&path, e))?;
        Ok(())
    }

    /// Takes the open file out, for a writer thread; give it back with
    /// `commit`.
    pub fn take_file(&mut self) -> Option<File> {
        self.file.take()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn commit(mut self) -> Result<FileInfo> {
        self.file.take();
        let path = display(&self.target);
        rename(&self.temp, &self.target, self.overwrite).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => Error::AlreadyExists(format!("{path}: already exists")),
            _ => Error::io(&path, e),
        })?;
        self.committed = true;
        let md = fs::symlink_metadata(&self.target).map_err(|e| Error::io(&path, e))?;
        Ok(file_info(&self.target, &md))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Writes pieces from `rx` into `file` until the channel closes (runs on a
/// blocking thread).
pub fn write_from(mut file: File, mut rx: mpsc::Receiver<Bytes>) -> io::Result<()> {
    while let Some(data) = rx.blocking_recv() {
        file.write_all(&data)?;
    }
    Ok(())
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seq = UPLOAD_SEQ.fetch_add(1, Ordering::Relaxed);
    // Not secret, only unlikely to collide; create_new catches the rest.
    let x = (u64::from(std::process::id()) << 40) ^ (seq << 20) ^ nanos;
    format!("{:016x}", x.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_validation() {
        assert!(check_path("/tmp/x").is_ok());
        assert!(check_path("/").is_ok());
        assert!(matches!(check_path(""), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            check_path("tmp/x"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            check_path("/tmp/a\0b"),
            Err(Error::InvalidArgument(_))
        ));
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert!(matches!(check_path(&long), Err(Error::InvalidArgument(_))));
        for p in [
            "/.opensandbox",
            "/.opensandbox/",
            "/.opensandbox/run/agent.sock",
            "/tmp/../.opensandbox/agent",
            "//.opensandbox/./run",
        ] {
            assert!(
                matches!(check_path(p), Err(Error::PermissionDenied(_))),
                "{p}"
            );
        }
        assert!(check_path("/.opensandboxx").is_ok());
        assert_eq!(check_path("/tmp/l/").unwrap(), PathBuf::from("/tmp/l"));
        assert_eq!(check_path("/tmp/l/./").unwrap(), PathBuf::from("/tmp/l"));
        assert_eq!(check_path("/").unwrap(), PathBuf::from("/"));
        assert!(check_path("/tmp/.opensandbox").is_ok());
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), Path::new("/a/c"));
        assert_eq!(normalize(Path::new("/../..")), Path::new("/"));
    }

    #[test]
    fn upload_dropped_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.txt");
        let h = WriteHeader {
            path: target.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let up = Upload::begin(&h).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(up);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

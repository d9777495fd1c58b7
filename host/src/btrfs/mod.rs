//! Btrfs subvolume operations: detection, creation, snapshots and deletion.
//!
//! Docker runs with `--storage-driver btrfs`, so each container's writable
//! layer is a subvolume and a snapshot of it is an instant copy-on-write
//! checkpoint. This module owns every Btrfs call the host makes; it talks to
//! the kernel through ioctls on directory fds instead of running `btrfs`, so a
//! snapshot costs a syscall rather than a process. The calls block, so async
//! code uses the `*_async` wrappers, which move them onto tokio's blocking
//! pool.

mod ioctl;

use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ioctl::{BTRFS_PATH_NAME_MAX, BTRFS_SUBVOL_NAME_MAX, BTRFS_SUBVOL_RDONLY};

/// Linux's limit on one path component; any longer name fails in the kernel
/// anyway, so rejecting it up front gives a clearer error.
const NAME_MAX: usize = 255;

/// Flags for every directory fd we open.
const DIR_FLAGS: libc::c_int = libc::O_DIRECTORY | libc::O_CLOEXEC;

/// Errors from Btrfs operations; each carries the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    #[error("{path} is not on a Btrfs filesystem")]
    NotBtrfs { path: PathBuf },
    #[error("{path} is not a Btrfs subvolume")]
    NotSubvolume { path: PathBuf },
    #[error("{path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("invalid subvolume name in {path}: {reason}")]
    InvalidName { path: PathBuf, reason: &'static str },
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blocking Btrfs task failed")]
    TaskFailed(#[from] tokio::task::JoinError),
}

/// Result of Btrfs operations.
pub type Result<T> = std::result::Result<T, BtrfsError>;

/// Reports whether `path` lies on a Btrfs filesystem.
pub fn is_btrfs(path: &Path) -> Result<bool> {
    // O_PATH: works for any file type and needs no read permission.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening", path))?;
    fd_is_btrfs(&file, path)
}

/// Reports whether `path` itself (not a symlink to it) is a subvolume root.
pub fn is_subvolume(path: &Path) -> Result<bool> {
    match open_dir(path, libc::O_NOFOLLOW) {
        Ok(dir) => fd_is_subvolume(&dir, path),
        Err(e) if is_not_dir(&e) => Ok(false),
        Err(e) => Err(io_err("opening", path)(e)),
    }
}

/// Creates an empty subvolume at `path`, whose parent must exist.
pub fn create_subvolume(path: &Path) -> Result<()> {
    let (parent, name) = open_parent(path, BTRFS_PATH_NAME_MAX)?;
    ioctl::subvol_create(&parent, name).map_err(create_err("creating subvolume", path))?;
    tracing::debug!(path = %path.display(), "created btrfs subvolume");
    Ok(())
}

/// Snapshots the subvolume `source` to the new path `dest`, read-only if
/// `readonly`; `dest`'s parent must exist on the same filesystem.
pub fn snapshot(source: &Path, dest: &Path, readonly: bool) -> Result<()> {
    let (parent, name) = open_parent(dest, BTRFS_SUBVOL_NAME_MAX)?;
    // The kernel snapshots whatever subvolume contains the fd, so a plain
    // directory would silently snapshot its enclosing subvolume: check first.
    let source_dir = open_subvolume(source)?;
    let flags = if readonly { BTRFS_SUBVOL_RDONLY } else { 0 };
    ioctl::snap_create_v2(&parent, &source_dir, name, flags)
        .map_err(create_err("creating snapshot", dest))?;
    tracing::debug!(
        source = %source.display(),
        dest = %dest.display(),
        readonly,
        "created btrfs snapshot"
    );
    Ok(())
}

/// Who a subvolume is and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubvolumeInfo {
    /// Unique on the filesystem and never reused: a rebuilt image has a new one.
    pub uuid: [u8; 16],
    /// The uuid of the subvolume this one is a snapshot of (zero for none).
    pub parent_uuid: [u8; 16],
    /// The transaction that last changed it.
    pub ctransid: u64,
    pub read_only: bool,
}

/// What the kernel tells about the subvolume root at `path`.
pub fn subvolume_info(path: &Path) -> Result<SubvolumeInfo> {
    let dir = open_subvolume(path)?;
    let info = ioctl::get_subvol_info(&dir).map_err(io_err("reading subvolume info of", path))?;
    Ok(SubvolumeInfo {
        uuid: info.uuid,
        parent_uuid: info.parent_uuid,
        ctransid: info.ctransid,
        read_only: info.flags & ioctl::BTRFS_ROOT_SUBVOL_RDONLY != 0,
    })
}

/// Moves the subvolume at `from` to the new path `to` on the same
/// filesystem, never over an existing entry. A rename, unlike a snapshot,
/// does not commit a transaction: it costs what any rename costs. The kernel
/// refuses (EROFS) to move a read-only one to another folder.
pub fn rename_subvolume(from: &Path, to: &Path) -> Result<()> {
    // Only subvolumes: a plain folder moved into place would pass for one.
    open_subvolume(from)?;
    let c = |path: &Path| {
        CString::new(path.as_os_str().as_bytes()).map_err(|_| BtrfsError::InvalidName {
            path: path.to_path_buf(),
            reason: "the path contains a NUL byte",
        })
    };
    let (old, new) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            old.as_ptr(),
            libc::AT_FDCWD,
            new.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::AlreadyExists {
            return Err(BtrfsError::AlreadyExists {
                path: to.to_path_buf(),
            });
        }
        return Err(io_err("moving subvolume to", to)(err));
    }
    tracing::debug!(from = %from.display(), to = %to.display(), "moved btrfs subvolume");
    Ok(())
}

/// Makes the subvolume at `path` read-only (a transaction commit, but a
/// small one: 2 ms here against 4-10 ms for a snapshot of an image).
pub fn make_read_only(path: &Path) -> Result<()> {
    let subvol = open_subvolume(path)?;
    let flags = ioctl::subvol_getflags(&subvol).map_err(io_err("reading flags of", path))?;
    ioctl::subvol_setflags(&subvol, flags | BTRFS_SUBVOL_RDONLY)
        .map_err(io_err("making read-only", path))
}

/// Deletes the subvolume (or snapshot, read-only included) at `path`.
pub fn delete_subvolume(path: &Path) -> Result<()> {
    let (parent, name) = open_parent(path, BTRFS_PATH_NAME_MAX)?;
    // Refuse plain directories and symlinks ourselves rather than relying on
    // the kernel's bare EINVAL.
    drop(open_subvolume_at(&parent, name, path)?);
    match ioctl::snap_destroy(&parent, name) {
        Err(e) if is_readonly_refusal(&e) => {
            delete_after_clearing_readonly(&parent, name, path, e)?
        }
        other => other.map_err(io_err("deleting subvolume", path))?,
    }
    tracing::debug!(path = %path.display(), "deleted btrfs subvolume");
    Ok(())
}

/// Deletes the subvolume at `path`; `Ok(false)` when nothing is there.
pub fn delete_subvolume_if_exists(path: &Path) -> Result<bool> {
    match delete_subvolume(path) {
        Ok(()) => Ok(true),
        Err(BtrfsError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`snapshot`] on the blocking pool.
pub async fn snapshot_async(source: PathBuf, dest: PathBuf, readonly: bool) -> Result<()> {
    blocking(move || snapshot(&source, &dest, readonly)).await
}

/// [`delete_subvolume`] on the blocking pool.
pub async fn delete_subvolume_async(path: PathBuf) -> Result<()> {
    blocking(move || delete_subvolume(&path)).await
}

/// [`delete_subvolume_if_exists`] on the blocking pool.
pub async fn delete_subvolume_if_exists_async(path: PathBuf) -> Result<bool> {
    blocking(move || delete_subvolume_if_exists(&path)).await
}

/// [`is_btrfs`] on the blocking pool.
pub async fn is_btrfs_async(path: PathBuf) -> Result<bool> {
    blocking(move || is_btrfs(&path)).await
}

/// [`is_subvolume`] on the blocking pool.
pub async fn is_subvolume_async(path: PathBuf) -> Result<bool> {
    blocking(move || is_subvolume(&path)).await
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

/// The kernel may refuse to delete a read-only subvolume (EPERM/EROFS); if
/// that is why, make it writable and try once more, restoring the flag if
/// the deletion still fails so a failed delete never unfreezes a snapshot.
fn delete_after_clearing_readonly(
    parent: &File,
    name: &[u8],
    path: &Path,
    first: io::Error,
) -> Result<()> {
    let subvol = open_subvolume_at(parent, name, path)?;
    let flags = ioctl::subvol_getflags(&subvol).map_err(io_err("reading flags of", path))?;
    if flags & BTRFS_SUBVOL_RDONLY == 0 {
        return Err(io_err("deleting subvolume", path)(first));
    }
    tracing::warn!(path = %path.display(), error = %first, "clearing read-only flag to delete subvolume");
    ioctl::subvol_setflags(&subvol, flags & !BTRFS_SUBVOL_RDONLY)
        .map_err(io_err("clearing read-only flag of", path))?;
    let retry = ioctl::snap_destroy(parent, name);
    if retry.is_err() {
        if let Err(e) = ioctl::subvol_setflags(&subvol, flags) {
            tracing::warn!(path = %path.display(), error = %e, "could not restore read-only flag");
        }
    }
    retry.map_err(io_err("deleting subvolume", path))
}

fn is_readonly_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EROFS))
}

/// Opens `path`'s parent directory and returns it with the validated final
/// component, the form every name-based Btrfs ioctl takes.
fn open_parent(path: &Path, capacity: usize) -> Result<(File, &[u8])> {
    let (parent_path, name) = split_parent(path);
    validate_name(path, name, capacity)?;
    let parent = open_dir(parent_path, 0).map_err(io_err("opening directory", parent_path))?;
    if !fd_is_btrfs(&parent, parent_path)? {
        return Err(BtrfsError::NotBtrfs {
            path: parent_path.to_path_buf(),
        });
    }
    Ok((parent, name))
}

/// Splits on the last `/` by hand because `Path::file_name` silently drops a
/// trailing `.`, which would turn `snap/.` into `snap`.
fn split_parent(path: &Path) -> (&Path, &[u8]) {
    let bytes = path.as_os_str().as_bytes();
    let end = bytes.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
    let trimmed = &bytes[..end];
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(0) => (Path::new("/"), &trimmed[1..]),
        Some(i) => (
            Path::new(OsStr::from_bytes(&trimmed[..i])),
            &trimmed[i + 1..],
        ),
        None => (Path::new("."), trimmed),
    }
}

fn validate_name(path: &Path, name: &[u8], capacity: usize) -> Result<()> {
    let reason = if name.is_empty() {
        "the final component is empty"
    } else if name == b"." || name == b".." {
        "the final component is . or .."
    } else if name.contains(&b'/') {
        "the final component contains /"
    } else if name.contains(&0) {
        "the final component contains a NUL byte"
    } else if name.len() > capacity {
        "the final component does not fit the kernel's name buffer"
    } else if name.len() > NAME_MAX {
        "the final component is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(BtrfsError::InvalidName {
        path: path.to_path_buf(),
        reason,
    })
}

fn open_dir(path: &Path, extra_flags: libc::c_int) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(DIR_FLAGS | extra_flags)
        .open(path)
}

/// Opens the subvolume root at `path` without following a final symlink.
fn open_subvolume(path: &Path) -> Result<File> {
    let dir = open_dir(path, libc::O_NOFOLLOW).map_err(not_dir_or_io(path))?;
    ensure_subvolume(dir, path)
}

/// Opens the subvolume root `name` inside `parent` without following a
/// symlink, relative to the fd so the parent cannot be swapped underneath.
fn open_subvolume_at(parent: &File, name: &[u8], path: &Path) -> Result<File> {
    let dir = openat_dir(parent, name).map_err(not_dir_or_io(path))?;
    ensure_subvolume(dir, path)
}

fn openat_dir(parent: &File, name: &[u8]) -> io::Result<File> {
    let name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `parent` is a live fd and `name` a NUL-terminated string that
    // outlives the call.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | DIR_FLAGS | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this fd and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn ensure_subvolume(dir: File, path: &Path) -> Result<File> {
    if !fd_is_btrfs(&dir, path)? {
        return Err(BtrfsError::NotBtrfs {
            path: path.to_path_buf(),
        });
    }
    if !fd_is_subvolume(&dir, path)? {
        return Err(BtrfsError::NotSubvolume {
            path: path.to_path_buf(),
        });
    }
    Ok(dir)
}

/// Every subvolume's root directory has the same inode number, which is
/// how `btrfs-progs` recognises one too.
fn fd_is_subvolume(dir: &File, path: &Path) -> Result<bool> {
    let ino = dir
        .metadata()
        .map_err(io_err("reading metadata of", path))?
        .ino();
    Ok(ino == ioctl::BTRFS_FIRST_FREE_OBJECTID && fd_is_btrfs(dir, path)?)
}

fn fd_is_btrfs(file: &File, path: &Path) -> Result<bool> {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `file` is a live fd and `stat` is writable memory of the type
    // fstatfs fills.
    if unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) } < 0 {
        return Err(io_err("reading filesystem type of", path)(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: fstatfs succeeded, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    // f_type's width varies by platform; filesystem magics are 32-bit.
    Ok(stat.f_type as u32 == ioctl::BTRFS_SUPER_MAGIC)
}

/// O_NOFOLLOW|O_DIRECTORY on a symlink or non-directory.
fn is_not_dir(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BtrfsError + 'a {
    move |source| BtrfsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn not_dir_or_io(path: &Path) -> impl FnOnce(io::Error) -> BtrfsError + '_ {
    move |e| {
        if is_not_dir(&e) {
            BtrfsError::NotSubvolume {
                path: path.to_path_buf(),
            }
        } else {
            io_err("opening", path)(e)
        }
    }
}

fn create_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BtrfsError + 'a {
    move |e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            BtrfsError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            io_err(op, path)(e)
        }
    }
}

/// A scratch folder on the real Btrfs filesystem, for tests here and in
/// other modules that drive subvolumes.
#[cfg(test)]
pub(crate) mod scratch {
    use super::*;
    use std::fs;

    const DEFAULT_BTRFS_PATH: &str = "/var/lib/sandbox-btrfs";

    /// A unique folder under `<DOCKER_BTRFS_PATH>/opensandbox-test/`. Drop
    /// deletes the subvolumes in it (and in its plain folders) first, since
    /// read-only ones cannot be emptied file by file.
    pub(crate) struct Scratch {
        pub(crate) dir: tempfile::TempDir,
    }

    impl Scratch {
        pub(crate) fn new() -> Self {
            let base = std::env::var_os("DOCKER_BTRFS_PATH")
                .map_or_else(|| PathBuf::from(DEFAULT_BTRFS_PATH), PathBuf::from);
            assert!(
                is_btrfs(&base).unwrap_or(false),
                "{} is not a mounted Btrfs filesystem: run scripts/setup.sh \
                 (or point DOCKER_BTRFS_PATH at a Btrfs mount)",
                base.display()
            );
            let root = base.join("opensandbox-test");
            fs::create_dir_all(&root).unwrap();
            let dir = tempfile::Builder::new().tempdir_in(&root).unwrap();
            Self { dir }
        }

        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        pub(crate) fn subvolume(&self, name: &str) -> PathBuf {
            let path = self.path(name);
            create_subvolume(&path).unwrap();
            path
        }
    }

    fn delete_subvolumes_in(dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for path in entries.flatten().map(|entry| entry.path()) {
            if is_subvolume(&path).unwrap_or(false) {
                if let Err(e) = delete_subvolume(&path) {
                    eprintln!("cleanup of {}: {e}", path.display());
                }
            } else if path.is_dir() {
                delete_subvolumes_in(&path);
            }
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            delete_subvolumes_in(self.dir.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::scratch::Scratch;
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;
    use std::process::Command;

    /// Every directory and file under `root`, with file contents.
    fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                if path.is_dir() {
                    out.insert(rel, None);
                    stack.push(path);
                } else {
                    out.insert(rel, Some(fs::read(&path).unwrap()));
                }
            }
        }
        out
    }

    fn populate(vol: &Path) {
        fs::create_dir_all(vol.join("etc/app")).unwrap();
        fs::write(vol.join("etc/hostname"), "sandbox\n").unwrap();
        fs::write(vol.join("etc/app/config.json"), r#"{"a":1}"#).unwrap();
        fs::write(vol.join("data.bin"), vec![0xa5u8; 4 << 20]).unwrap();
    }

    fn is_readonly(path: &Path) -> bool {
        let dir = File::open(path).unwrap();
        ioctl::subvol_getflags(&dir).unwrap() & BTRFS_SUBVOL_RDONLY != 0
    }

    fn cli_flags(path: &Path) -> String {
        let out = Command::new("btrfs")
            .args(["subvolume", "show"])
            .arg(path)
            .output()
            .expect("btrfs-progs must be installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "btrfs subvolume show: {out:?}");
        stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix("Flags:"))
            .map(|flags| flags.trim().to_owned())
            .unwrap_or_else(|| panic!("no Flags line in:\n{stdout}"))
    }

    fn errno(result: io::Result<impl std::fmt::Debug>) -> Option<i32> {
        result.unwrap_err().raw_os_error()
    }

    #[test]
    fn detects_btrfs_and_other_filesystems() {
        let scratch = Scratch::new();
        assert!(is_btrfs(scratch.dir.path()).unwrap());
        assert!(!is_btrfs(Path::new("/proc")).unwrap());
        assert!(!is_btrfs(Path::new("/dev/shm")).unwrap());
        assert!(matches!(
            is_btrfs(&scratch.path("missing")),
            Err(BtrfsError::Io { .. })
        ));
    }

    #[test]
    fn creates_and_recognises_subvolumes() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        assert!(is_subvolume(&vol).unwrap());

        let plain = scratch.path("plain");
        fs::create_dir(&plain).unwrap();
        fs::write(scratch.path("file"), "x").unwrap();
        let link = scratch.path("link");
        std::os::unix::fs::symlink(&vol, &link).unwrap();
        assert!(!is_subvolume(&plain).unwrap());
        assert!(!is_subvolume(&scratch.path("file")).unwrap());
        assert!(!is_subvolume(&link).unwrap());
        assert!(!is_subvolume(Path::new("/dev/shm")).unwrap());

        assert!(matches!(
            create_subvolume(&vol),
            Err(BtrfsError::AlreadyExists { .. })
        ));
        assert!(matches!(
            create_subvolume(&scratch.path("missing/vol")),
            Err(BtrfsError::Io { .. })
        ));
        assert!(matches!(
            create_subvolume(Path::new("/dev/shm/opensandbox-not-btrfs")),
            Err(BtrfsError::NotBtrfs { .. })
        ));
    }

    #[test]
    fn readonly_snapshot_is_a_frozen_copy() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        populate(&vol);
        let before = tree(&vol);

        let snap = scratch.path("snap");
        snapshot(&vol, &snap, true).unwrap();
        assert!(is_subvolume(&snap).unwrap());
        assert!(is_readonly(&snap));
        assert_eq!(tree(&snap), before);

        assert_eq!(errno(fs::write(snap.join("new"), "x")), Some(libc::EROFS));
        let append = OpenOptions::new()
            .append(true)
            .open(snap.join("etc/hostname"));
        assert_eq!(errno(append), Some(libc::EROFS));
        assert_eq!(
            errno(fs::remove_file(snap.join("data.bin"))),
            Some(libc::EROFS)
        );

        fs::write(vol.join("etc/hostname"), "changed\n").unwrap();
        fs::remove_file(vol.join("data.bin")).unwrap();
        fs::write(vol.join("later"), "later").unwrap();
        assert_ne!(tree(&vol), before);
        assert_eq!(tree(&snap), before);
    }

    #[test]
    fn info_tells_lineage_and_rename_moves_without_replacing() {
        let scratch = Scratch::new();
        let image = scratch.subvolume("image");
        populate(&image);
        let copy = scratch.path("copy");
        snapshot(&image, &copy, true).unwrap();
        let (image_info, copy_info) = (
            subvolume_info(&image).unwrap(),
            subvolume_info(&copy).unwrap(),
        );
        assert_eq!(copy_info.parent_uuid, image_info.uuid);
        assert_ne!(copy_info.uuid, image_info.uuid);
        assert!(copy_info.read_only && !image_info.read_only);

        let moved = scratch.path("moved");
        rename_subvolume(&copy, &moved).unwrap();
        assert!(!copy.exists());
        assert_eq!(subvolume_info(&moved).unwrap(), copy_info);
        assert_eq!(tree(&moved), tree(&image));
        // Never over an existing entry, and never a plain folder.
        assert!(matches!(
            rename_subvolume(&moved, &image),
            Err(BtrfsError::AlreadyExists { .. })
        ));
        fs::create_dir(scratch.path("plain")).unwrap();
        assert!(matches!(
            rename_subvolume(&scratch.path("plain"), &scratch.path("elsewhere")),
            Err(BtrfsError::NotSubvolume { .. })
        ));
    }

    #[test]
    fn writable_snapshot_of_readonly_snapshot_restores() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        populate(&vol);
        let snap = scratch.path("snap");
        snapshot(&vol, &snap, true).unwrap();
        fs::write(vol.join("etc/hostname"), "changed\n").unwrap();

        let restored = scratch.path("restored");
        snapshot(&snap, &restored, false).unwrap();
        assert!(is_subvolume(&restored).unwrap());
        assert!(!is_readonly(&restored));
        assert_eq!(tree(&restored), tree(&snap));

        fs::write(restored.join("etc/hostname"), "restored\n").unwrap();
        assert_eq!(fs::read(snap.join("etc/hostname")).unwrap(), b"sandbox\n");
    }

    #[test]
    fn btrfs_cli_agrees_on_flags() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        let snap = scratch.path("snap");
        snapshot(&vol, &snap, true).unwrap();
        let rw = scratch.path("rw");
        snapshot(&snap, &rw, false).unwrap();
        assert_eq!(cli_flags(&snap), "readonly");
        assert_eq!(cli_flags(&rw), "-");
    }

    #[test]
    fn snapshot_rejects_bad_sources_and_destinations() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        let plain = vol.join("plain");
        fs::create_dir(&plain).unwrap();
        let link = scratch.path("link");
        std::os::unix::fs::symlink(&vol, &link).unwrap();

        let not_subvolume = |r| matches!(r, Err(BtrfsError::NotSubvolume { .. }));
        assert!(not_subvolume(snapshot(&plain, &scratch.path("a"), true)));
        assert!(not_subvolume(snapshot(&link, &scratch.path("b"), true)));
        assert!(matches!(
            snapshot(&vol, &vol, true),
            Err(BtrfsError::AlreadyExists { .. })
        ));
        assert!(matches!(
            snapshot(&vol, &scratch.path("missing/snap"), true),
            Err(BtrfsError::Io { .. })
        ));
        assert!(!scratch.path("a").exists() && !scratch.path("b").exists());
    }

    #[test]
    fn deletes_readonly_snapshots_and_only_subvolumes() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        populate(&vol);
        let snap = scratch.path("snap");
        snapshot(&vol, &snap, true).unwrap();

        delete_subvolume(&snap).unwrap();
        assert!(!snap.exists());
        assert!(!delete_subvolume_if_exists(&snap).unwrap());
        assert!(!delete_subvolume_if_exists(&scratch.path("missing/deeper")).unwrap());
        assert!(matches!(
            delete_subvolume(&snap),
            Err(BtrfsError::Io { .. })
        ));

        let plain = scratch.path("plain");
        fs::create_dir(&plain).unwrap();
        let link = scratch.path("link");
        std::os::unix::fs::symlink(&vol, &link).unwrap();
        let not_subvolume = |r| matches!(r, Err(BtrfsError::NotSubvolume { .. }));
        assert!(not_subvolume(delete_subvolume(&plain)));
        assert!(not_subvolume(delete_subvolume(&link)));
        assert!(is_subvolume(&vol).unwrap());

        assert!(delete_subvolume_if_exists(&vol).unwrap());
        assert!(!vol.exists());
    }

    #[test]
    fn setflags_round_trip() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        let snap = scratch.path("snap");
        snapshot(&vol, &snap, true).unwrap();
        let dir = File::open(&snap).unwrap();
        let flags = ioctl::subvol_getflags(&dir).unwrap();
        ioctl::subvol_setflags(&dir, flags & !BTRFS_SUBVOL_RDONLY).unwrap();
        fs::write(snap.join("now-writable"), "x").unwrap();
        ioctl::subvol_setflags(&dir, flags).unwrap();
        assert!(is_readonly(&snap));
    }

    #[test]
    fn rejects_invalid_names() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        let dir = scratch.dir.path();
        let long = "x".repeat(NAME_MAX + 1);
        let huge = "x".repeat(BTRFS_PATH_NAME_MAX + 1);
        let bad: Vec<PathBuf> = vec![
            PathBuf::new(),
            PathBuf::from("/"),
            dir.join("."),
            dir.join(".."),
            dir.join("vol/."),
            PathBuf::from(OsStr::from_bytes(b"/tmp/nul\0name")),
            dir.join(&long),
            dir.join(&huge),
        ];
        let invalid = |r: Result<()>| matches!(r, Err(BtrfsError::InvalidName { .. }));
        for path in &bad {
            assert!(invalid(create_subvolume(path)), "create {path:?}");
            assert!(invalid(snapshot(&vol, path, true)), "snapshot {path:?}");
            assert!(invalid(delete_subvolume(path)), "delete {path:?}");
        }
        assert!(is_subvolume(&vol).unwrap());

        // A trailing slash still names the same final component.
        let slashed = dir.join("slashed/");
        create_subvolume(&slashed).unwrap();
        assert!(is_subvolume(&scratch.path("slashed")).unwrap());
    }

    #[test]
    fn splits_parent_and_name() {
        let split = |p: &str| {
            let (parent, name) = split_parent(Path::new(p));
            (parent.to_str().unwrap().to_owned(), name.to_vec())
        };
        assert_eq!(split("/a/b"), ("/a".into(), b"b".to_vec()));
        assert_eq!(split("/a/b//"), ("/a".into(), b"b".to_vec()));
        assert_eq!(split("/b"), ("/".into(), b"b".to_vec()));
        assert_eq!(split("b"), (".".into(), b"b".to_vec()));
        assert_eq!(split("a/."), ("a".into(), b".".to_vec()));
        assert_eq!(split("/"), (".".into(), Vec::new()));
    }

    #[tokio::test]
    async fn async_wrappers_work() {
        let scratch = Scratch::new();
        let vol = scratch.subvolume("vol");
        let snap = scratch.path("snap");
        assert!(is_btrfs_async(vol.clone()).await.unwrap());
        snapshot_async(vol.clone(), snap.clone(), true)
            .await
            .unwrap();
        assert!(is_readonly(&snap));
        delete_subvolume_async(snap.clone()).await.unwrap();
        assert!(!delete_subvolume_if_exists_async(snap).await.unwrap());
        assert!(delete_subvolume_if_exists_async(vol).await.unwrap());
    }
}

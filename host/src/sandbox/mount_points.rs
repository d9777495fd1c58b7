//! The places in a sandbox's root where runtimes mount things at start
//! (the agent and its socket folder, `/proc`, `/dev`) must be what they
//! look like. The root is written by the sandbox: left alone, a sandbox
//! could turn `/.opensandbox` into a symlink to a host path and have the
//! next start mount over it, or create files there as root (a runtime
//! such as bubblewrap resolves mount targets before it changes root).
//! Before every start, while nothing in the sandbox runs, each of them is
//! checked without following symlinks and replaced when it is anything
//! else than the right kind of file.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Dir,
    File,
}

/// Parents before children, so each is checked under a verified folder.
const MOUNT_POINTS: [(&str, Kind); 5] = [
    (".opensandbox", Kind::Dir),
    (".opensandbox/run", Kind::Dir),
    (".opensandbox/agent", Kind::File),
    ("proc", Kind::Dir),
    ("dev", Kind::Dir),
];

/// Makes every mount point under `root` the right kind; returns how many
/// had to be replaced.
pub fn secure(root: &Path) -> io::Result<usize> {
    let mut replaced = 0;
    for (relative, kind) in MOUNT_POINTS {
        let path = root.join(relative);
        let found = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => Some(false),
            Ok(meta) if kind == Kind::Dir => Some(meta.is_dir()),
            Ok(meta) => Some(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        match found {
            Some(true) => continue,
            Some(false) => {
                // remove_dir_all does not follow symlinks inside what it removes.
                let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                if is_dir {
                    fs::remove_dir_all(&path)?;
                } else {
                    fs::remove_file(&path)?;
                }
                replaced += 1;
                tracing::warn!(path = %path.display(), "replaced a mount point the sandbox had changed");
            }
            None => {}
        }
        match kind {
            Kind::Dir => fs::DirBuilder::new().mode(0o755).create(&path)?,
            Kind::File => drop(
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)?,
            ),
        }
    }
    Ok(replaced)
}

/// [`secure`] on the blocking pool.
pub async fn secure_async(root: &Path) -> io::Result<usize> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || secure(&root))
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinked_and_wrong_kinds_are_replaced() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), root.path().join(".opensandbox")).unwrap();
        fs::write(root.path().join("proc"), b"not a folder").unwrap();
        fs::create_dir(root.path().join("dev")).unwrap();
        assert_eq!(secure(root.path()).unwrap(), 2);
        let meta = fs::symlink_metadata(root.path().join(".opensandbox")).unwrap();
        assert!(meta.is_dir() && !meta.file_type().is_symlink());
        assert!(root.path().join(".opensandbox/agent").is_file());
        assert!(root.path().join(".opensandbox/run").is_dir());
        assert!(root.path().join("proc").is_dir());
        // Nothing was created through the symlink.
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // A folder where the agent's file goes, holding a symlink out.
        fs::remove_file(root.path().join(".opensandbox/agent")).unwrap();
        fs::create_dir(root.path().join(".opensandbox/agent")).unwrap();
        symlink(outside.path(), root.path().join(".opensandbox/agent/x")).unwrap();
        assert_eq!(secure(root.path()).unwrap(), 1);
        assert!(root.path().join(".opensandbox/agent").is_file());
        assert!(outside.path().exists());
        assert_eq!(secure(root.path()).unwrap(), 0, "idempotent");
    }
}

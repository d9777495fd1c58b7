//! The `btrfs` capability: subvolumes under one plugin's own root on this
//! host (`<DOCKER_BTRFS_PATH>/opensandbox/hosts/<host id>/runtimes/<plugin>/`,
//! so hosts sharing a filesystem never see each other's), plus the machine's
//! shared base images under `images/` (`<DOCKER_BTRFS_PATH>/runtimes/<plugin>/images/`,
//! prepared by the operator: read-only to the plugin, which may snapshot and
//! list them but not create or delete them). A name is 1 to 4 segments of
//! `[A-Za-z0-9_][A-Za-z0-9._-]*`; every folder above a name must be a plain
//! folder the host made (never a subvolume, never a symlink), so no name can
//! reach into a sandbox's root filesystem, where the sandbox could plant
//! symlinks, or anywhere outside the plugin's root.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::spares::Spares;
use super::CapabilityError;
use crate::btrfs::{self, BtrfsError};

const MAX_SEGMENTS: usize = 4;
const MAX_SEGMENT_LEN: usize = 128;
/// Btrfs gives every subvolume root this inode number.
const SUBVOLUME_ROOT_INODE: u64 = 256;

/// The first segment of the shared, read-only image names.
const SHARED_PREFIX: &str = "images";
/// The folder of spare snapshots inside the plugin's own root: a name with a
/// leading `.` is not one a plugin can say.
const SPARES_DIR: &str = ".spares";

/// One plugin's Btrfs roots.
#[derive(Debug, Clone)]
pub struct BtrfsRoot {
    /// This host's subvolumes of the plugin.
    own: PathBuf,
    /// The machine's folder of the plugin, whose `images/` is shared.
    shared: PathBuf,
    /// Snapshots of the shared images made ahead of time.
    spares: Arc<Spares>,
}

impl BtrfsRoot {
    /// Creates the plugin's own folder if needed; both must be on Btrfs.
    /// `spares` snapshots of each shared image are kept ready (see [`Spares`]).
    pub fn open(own: PathBuf, shared: PathBuf, spares: usize) -> Result<Self, String> {
        for dir in [&own, &shared] {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            match btrfs::is_btrfs(dir) {
                Ok(true) => {}
                Ok(false) => return Err(format!("{} is not on a Btrfs filesystem", dir.display())),
                Err(e) => return Err(e.to_string()),
            }
        }
        let spares = Spares::open(own.join(SPARES_DIR), spares)?;
        Ok(Self {
            own,
            shared,
            spares,
        })
    }

    /// The spare snapshots of the shared images.
    pub fn spares(&self) -> &Arc<Spares> {
        &self.spares
    }

    /// Whether `name` is one of the shared images (which never change while
    /// they are read-only).
    pub fn is_shared_image(&self, name: &str) -> bool {
        parse_name(name).is_ok_and(|segments| !self.base(&segments).1)
    }

    /// The folder a name lives under, and whether it may be changed.
    fn base(&self, segments: &[&str]) -> (&Path, bool) {
        if segments[0] == SHARED_PREFIX {
            (&self.shared, false)
        } else {
            (&self.own, true)
        }
    }

    /// The host path of a valid name, whether or not it exists.
    pub fn host_path(&self, name: &str) -> Result<PathBuf, CapabilityError> {
        let segments = parse_name(name)?;
        let (base, _) = self.base(&segments);
        Ok(segments.iter().fold(base.to_path_buf(), |p, s| p.join(s)))
    }

    /// Refuses changes to the shared images.
    fn writable(&self, name: &str) -> Result<(), CapabilityError> {
        let segments = parse_name(name)?;
        if self.base(&segments).1 {
            Ok(())
        } else {
            Err(CapabilityError::NotGranted(format!(
                "{name:?}: {SHARED_PREFIX}/ holds the machine's shared base images, read-only \
                 to plugins (scripts/build-rootfs.sh prepares them)"
            )))
        }
    }

    /// Checks the folders above `name` (creating missing ones when `create`)
    /// and returns its host path.
    fn resolve(&self, name: &str, create: bool) -> Result<PathBuf, CapabilityError> {
        let segments = parse_name(name)?;
        let mut path = self.base(&segments).0.to_path_buf();
        for segment in &segments[..segments.len() - 1] {
            path.push(segment);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() && meta.ino() != SUBVOLUME_ROOT_INODE => {}
                Ok(_) => {
                    return Err(CapabilityError::Invalid(format!(
                        "{name:?}: {segment:?} is a subvolume or not a folder; names cannot reach inside one"
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    fs::create_dir(&path).map_err(|e| failed(&path, e))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CapabilityError::NotFound(name.to_string()))
                }
                Err(e) => return Err(failed(&path, e)),
            }
        }
        Ok(path.join(segments[segments.len() - 1]))
    }

    pub fn exists(&self, name: &str) -> Result<bool, CapabilityError> {
        let path = match self.resolve(name, false) {
            Ok(path) => path,
            Err(CapabilityError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        is_subvolume(&path)
    }

    pub fn create(&self, name: &str) -> Result<PathBuf, CapabilityError> {
        self.writable(name)?;
        let path = self.resolve(name, true)?;
        if fs::symlink_metadata(&path).is_ok() {
            return Err(CapabilityError::Exists(name.to_string()));
        }
        btrfs::create_subvolume(&path).map_err(from_btrfs)?;
        Ok(path)
    }

    pub fn snapshot(
        &self,
        source: &str,
        target: &str,
        read_only: bool,
    ) -> Result<PathBuf, CapabilityError> {
        let from = self.resolve(source, false)?;
        if !is_subvolume(&from)? {
            return Err(CapabilityError::NotFound(source.to_string()));
        }
        self.writable(target)?;
        let to = self.resolve(target, true)?;
        if fs::symlink_metadata(&to).is_ok() {
            return Err(CapabilityError::Exists(target.to_string()));
        }
        if self.is_shared_image(source) && self.spares.take(&from, read_only, &to) {
            return Ok(to);
        }
        btrfs::snapshot(&from, &to, read_only).map_err(from_btrfs)?;
        Ok(to)
    }

    /// Deletes a subvolume; a missing one is fine. One with subvolumes
    /// inside is refused by the kernel and reported as failed.
    pub fn delete(&self, name: &str) -> Result<(), CapabilityError> {
        self.writable(name)?;
        let path = match self.resolve(name, false) {
            Ok(path) => path,
            Err(CapabilityError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failed(&path, e)),
            Ok(meta) if meta.ino() != SUBVOLUME_ROOT_INODE || !meta.is_dir() => {
                return Err(CapabilityError::Invalid(format!(
                    "{name:?} is not a subvolume"
                )))
            }
            Ok(_) => {}
        }
        btrfs::delete_subvolume_if_exists(&path)
            .map(|_| ())
            .map_err(from_btrfs)
    }

    /// Every subvolume under the root, by name, sorted; plain folders are
    /// walked (up to the name depth), subvolumes are not entered.
    pub fn list(&self) -> Result<Vec<String>, CapabilityError> {
        let mut found = Vec::new();
        self.walk(&self.own, "", 0, &mut found)?;
        // The own root may hold an `images` folder of its own: it is unreachable
        // by name (images/ means the shared one), so it is not listed.
        found.retain(|name| name.split('/').next() != Some(SHARED_PREFIX));
        let shared = self.shared.join(SHARED_PREFIX);
        if shared.is_dir() {
            self.walk(&shared, SHARED_PREFIX, 1, &mut found)?;
        }
        found.sort();
        Ok(found)
    }

    fn walk(
        &self,
        dir: &Path,
        prefix: &str,
        depth: usize,
        found: &mut Vec<String>,
    ) -> Result<(), CapabilityError> {
        if depth == MAX_SEGMENTS {
            return Ok(());
        }
        let entries = fs::read_dir(dir).map_err(|e| failed(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| failed(dir, e))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_segment(&file_name).is_err() {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) if meta.is_dir() => meta,
                _ => continue,
            };
            let name = if prefix.is_empty() {
                file_name
            } else {
                format!("{prefix}/{file_name}")
            };
            if meta.ino() == SUBVOLUME_ROOT_INODE {
                found.push(name);
            } else {
                self.walk(&entry.path(), &name, depth + 1, found)?;
            }
        }
        Ok(())
    }
}

/// Whether `path` itself (never a symlink's target) is a subvolume.
fn is_subvolume(path: &Path) -> Result<bool, CapabilityError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(meta.is_dir() && meta.ino() == SUBVOLUME_ROOT_INODE),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(failed(path, e)),
    }
}

/// Splits and checks a name; see the module's doc for the rule.
pub fn parse_name(name: &str) -> Result<Vec<&str>, CapabilityError> {
    let segments: Vec<&str> = name.split('/').collect();
    if name.is_empty() || segments.len() > MAX_SEGMENTS {
        return Err(CapabilityError::Invalid(format!(
            "subvolume name {name:?}: 1 to {MAX_SEGMENTS} segments separated by /"
        )));
    }
    for segment in &segments {
        check_segment(segment).map_err(|why| {
            CapabilityError::Invalid(format!(
                "subvolume name {name:?}: segment {segment:?} {why}"
            ))
        })?;
    }
    Ok(segments)
}

fn check_segment(segment: &str) -> Result<(), &'static str> {
    let mut bytes = segment.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok {
        return Err("must start with a letter, a digit or _");
    }
    if segment.len() > MAX_SEGMENT_LEN {
        return Err("is longer than 128 characters");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn failed(path: &Path, err: std::io::Error) -> CapabilityError {
    CapabilityError::Failed(format!("{}: {err}", path.display()))
}

fn from_btrfs(err: BtrfsError) -> CapabilityError {
    CapabilityError::Failed(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_the_root() {
        for good in [
            "images/ubuntu_22.04",
            "a",
            "sandboxes/0b6c-ff",
            "a/b/c/d",
            "_x.y-z",
        ] {
            assert!(parse_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc",
            "a/../../x",
            "a//b",
            "a/",
            "/",
            "a/b/c/d/e",
            "x\n",
            "a\0b",
            ".hidden",
            "-flag",
            "a b",
            &long,
        ] {
            assert!(
                matches!(parse_name(bad), Err(CapabilityError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}

//! Btrfs subvolumes under the plugin's own root on this host
//! (`<DOCKER_BTRFS_PATH>/opensandbox/hosts/<host id>/runtimes/<plugin>/`), and the machine's
//! shared base images, named `images/...` (`<DOCKER_BTRFS_PATH>/runtimes/<plugin>/images/`,
//! prepared by the operator; read-only: they can be snapshotted and listed, not created or
//! deleted). Runtime plugins only; needs the `btrfs` grant.
//!
//! A name is a relative path of 1 to 4 segments (`images/ubuntu_22.04`, `sandboxes/<id>`),
//! each from `[A-Za-z0-9_][A-Za-z0-9._-]*` and at most 128 characters ([`is_valid_name`]);
//! the host refuses anything else with [`CapabilityError::Invalid`], so nothing outside the
//! root can be named. The plain folders above a subvolume are created as needed.
//!
//! On targets other than `wasm32` these functions work on an in-memory fake, see
//! [`testing`](crate::testing).

use crate::CapabilityError;

/// Most segments in a name.
pub const MAX_SEGMENTS: usize = 4;
/// Most characters in one segment.
pub const MAX_SEGMENT_LEN: usize = 128;

/// The host path of the subvolume `name` (whether or not it exists), to hand to a granted
/// program (`--bind <path> /`).
pub fn host_path(name: &str) -> Result<String, CapabilityError> {
    imp::host_path(name)
}

/// Whether a subvolume named `name` exists.
pub fn exists(name: &str) -> Result<bool, CapabilityError> {
    imp::exists(name)
}

/// Creates an empty subvolume (and the plain folders above it);
/// [`CapabilityError::Exists`] if it is there already.
pub fn create_subvolume(name: &str) -> Result<(), CapabilityError> {
    imp::create_subvolume(name)
}

/// Snapshots `source` as `target` in O(1); `read_only` makes the snapshot immutable.
pub fn snapshot(source: &str, target: &str, read_only: bool) -> Result<(), CapabilityError> {
    imp::snapshot(source, target, read_only)
}

/// Deletes a subvolume (and the subvolumes nested in it); a missing one is not an error.
pub fn delete_subvolume(name: &str) -> Result<(), CapabilityError> {
    imp::delete_subvolume(name)
}

/// Every subvolume under the plugin's root, by name, sorted.
pub fn list_subvolumes() -> Result<Vec<String>, CapabilityError> {
    imp::list_subvolumes()
}

/// Whether the host accepts `name` as a subvolume name (see the module's documentation).
///
/// ```
/// use opensandbox_plugin_sdk::btrfs::is_valid_name;
/// assert!(is_valid_name("sandboxes/5f0c-11"));
/// assert!(!is_valid_name("../etc"));
/// assert!(!is_valid_name("a//b"));
/// assert!(!is_valid_name("a/b/c/d/e"));
/// ```
pub fn is_valid_name(name: &str) -> bool {
    let segments: Vec<&str> = name.split('/').collect();
    segments.len() <= MAX_SEGMENTS && segments.iter().all(|s| is_valid_segment(s))
}

/// Whether `segment` is acceptable as one segment of a name (an id, an image slug, ...):
/// 1 to 128 characters from `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn is_valid_segment(segment: &str) -> bool {
    let mut chars = segment.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    segment.len() <= MAX_SEGMENT_LEN
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::__private::capability_error as err;
    use crate::__private::imports::btrfs;
    use crate::CapabilityError;

    pub fn host_path(name: &str) -> Result<String, CapabilityError> {
        btrfs::host_path(name).map_err(err)
    }

    pub fn exists(name: &str) -> Result<bool, CapabilityError> {
        btrfs::exists(name).map_err(err)
    }

    pub fn create_subvolume(name: &str) -> Result<(), CapabilityError> {
        btrfs::create_subvolume(name).map_err(err)
    }

    pub fn snapshot(source: &str, target: &str, read_only: bool) -> Result<(), CapabilityError> {
        btrfs::snapshot(source, target, read_only).map_err(err)
    }

    pub fn delete_subvolume(name: &str) -> Result<(), CapabilityError> {
        btrfs::delete_subvolume(name).map_err(err)
    }

    pub fn list_subvolumes() -> Result<Vec<String>, CapabilityError> {
        btrfs::list_subvolumes().map_err(err)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub use crate::testing::fake_btrfs::{
        create_subvolume, delete_subvolume, exists, host_path, list_subvolumes, snapshot,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in [
            "a",
            "images/ubuntu_22.04",
            "a/b/c/d",
            "_x",
            "9-.x",
            &"x".repeat(128),
        ] {
            assert!(is_valid_name(good), "{good:?}");
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
            "a/b/c/d/e",
            "-x",
            ".x",
            "a\0b",
            "x\n",
            "a b",
            "é",
            &long,
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}

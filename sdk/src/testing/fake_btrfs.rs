//! The in-memory stand-in for the host's `btrfs` capability: a per-thread table of subvolume
//! names that checks names and grants the way the host does.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::btrfs::is_valid_name;
use crate::CapabilityError;

/// The host folder that [`btrfs::host_path`](crate::btrfs::host_path) puts names under in tests.
pub const BTRFS_ROOT: &str = "/var/lib/sandbox-btrfs/runtimes/test";

/// One subvolume of the fake, as [`subvolume`](crate::testing::subvolume) shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeSubvolume {
    /// Made read-only by [`snapshot`](crate::btrfs::snapshot).
    pub read_only: bool,
    /// The subvolume it is a snapshot of, if it is one.
    pub snapshot_of: Option<String>,
}

struct Fake {
    granted: bool,
    subvolumes: BTreeMap<String, FakeSubvolume>,
    fail_next: Option<CapabilityError>,
}

thread_local! {
    static FAKE: RefCell<Fake> = const {
        RefCell::new(Fake { granted: true, subvolumes: BTreeMap::new(), fail_next: None })
    };
}

/// Runs one capability call: the injected failure first, then the grant, then the names.
fn call<T>(
    names: &[&str],
    f: impl FnOnce(&mut BTreeMap<String, FakeSubvolume>) -> Result<T, CapabilityError>,
) -> Result<T, CapabilityError> {
    FAKE.with(|fake| {
        let mut fake = fake.borrow_mut();
        if let Some(e) = fake.fail_next.take() {
            return Err(e);
        }
        if !fake.granted {
            return Err(CapabilityError::NotGranted("btrfs".to_string()));
        }
        for name in names {
            if !is_valid_name(name) {
                return Err(CapabilityError::Invalid(format!(
                    "subvolume name {name:?}: 1 to 4 segments of [A-Za-z0-9_][A-Za-z0-9._-]*"
                )));
            }
        }
        f(&mut fake.subvolumes)
    })
}

/// Whether `name` is inside the subvolume `parent` (deleted with it).
fn nested_in(name: &str, parent: &str) -> bool {
    name.strip_prefix(parent)
        .is_some_and(|rest| rest.starts_with('/'))
}

pub fn host_path(name: &str) -> Result<String, CapabilityError> {
    call(&[name], |_| Ok(format!("{BTRFS_ROOT}/{name}")))
}

pub fn exists(name: &str) -> Result<bool, CapabilityError> {
    call(&[name], |subvolumes| Ok(subvolumes.contains_key(name)))
}

pub fn create_subvolume(name: &str) -> Result<(), CapabilityError> {
    call(&[name], |subvolumes| {
        if subvolumes.contains_key(name) {
            return Err(CapabilityError::Exists(name.to_string()));
        }
        subvolumes.insert(name.to_string(), FakeSubvolume::default());
        Ok(())
    })
}

pub fn snapshot(source: &str, target: &str, read_only: bool) -> Result<(), CapabilityError> {
    call(&[source, target], |subvolumes| {
        if !subvolumes.contains_key(source) {
            return Err(CapabilityError::NotFound(source.to_string()));
        }
        if subvolumes.contains_key(target) {
            return Err(CapabilityError::Exists(target.to_string()));
        }
        let snapshot = FakeSubvolume {
            read_only,
            snapshot_of: Some(source.to_string()),
        };
        subvolumes.insert(target.to_string(), snapshot);
        Ok(())
    })
}

pub fn delete_subvolume(name: &str) -> Result<(), CapabilityError> {
    call(&[name], |subvolumes| {
        subvolumes.retain(|n, _| n != name && !nested_in(n, name));
        Ok(())
    })
}

pub fn list_subvolumes() -> Result<Vec<String>, CapabilityError> {
    call(&[], |subvolumes| Ok(subvolumes.keys().cloned().collect()))
}

pub(crate) fn set_granted(granted: bool) {
    FAKE.with(|f| f.borrow_mut().granted = granted);
}

pub(crate) fn fail_next(error: CapabilityError) {
    FAKE.with(|f| f.borrow_mut().fail_next = Some(error));
}

pub(crate) fn add(name: &str) {
    FAKE.with(|f| {
        f.borrow_mut()
            .subvolumes
            .insert(name.to_string(), FakeSubvolume::default())
    });
}

pub(crate) fn get(name: &str) -> Option<FakeSubvolume> {
    FAKE.with(|f| f.borrow().subvolumes.get(name).cloned())
}

pub(crate) fn names() -> Vec<String> {
    FAKE.with(|f| f.borrow().subvolumes.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{btrfs, testing};

    #[test]
    fn behaves_like_the_host() {
        btrfs::create_subvolume("a/b").unwrap();
        assert!(matches!(
            btrfs::create_subvolume("a/b"),
            Err(CapabilityError::Exists(_))
        ));
        assert!(matches!(
            btrfs::snapshot("x", "y", false),
            Err(CapabilityError::NotFound(_))
        ));
        btrfs::snapshot("a/b", "a/b/c", true).unwrap();
        assert_eq!(testing::subvolume("a/b/c").map(|s| s.read_only), Some(true));
        assert_eq!(btrfs::host_path("a/b"), Ok(format!("{BTRFS_ROOT}/a/b")));
        // Nested subvolumes go with their parent; a missing one is not an error.
        btrfs::delete_subvolume("a/b").unwrap();
        btrfs::delete_subvolume("a/b").unwrap();
        assert_eq!(btrfs::list_subvolumes(), Ok(vec![]));
        assert!(matches!(
            btrfs::exists("../a"),
            Err(CapabilityError::Invalid(_))
        ));
        testing::fail_next_btrfs_call(CapabilityError::Failed("disk full".into()));
        assert!(matches!(
            btrfs::exists("a"),
            Err(CapabilityError::Failed(_))
        ));
        assert_eq!(btrfs::exists("a"), Ok(false));
        testing::set_btrfs_granted(false);
        assert!(matches!(
            btrfs::exists("a"),
            Err(CapabilityError::NotGranted(_))
        ));
    }
}

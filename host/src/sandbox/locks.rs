//! Per-sandbox locks that serialize lifecycle operations (create, snapshot,
//! restore, fork from, delete) on one sandbox while leaving others free, and
//! pins that keep snapshots in place while a long read (an export) uses them
//! without holding the sandbox's lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use uuid::Uuid;

#[derive(Default)]
pub struct LockTable {
    locks: Mutex<HashMap<Uuid, Arc<AsyncMutex<()>>>>,
}

impl LockTable {
    pub async fn lock(&self, id: Uuid) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            locks.entry(id).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Drops the entry of a deleted sandbox so the table does not grow forever.
    pub fn forget(&self, id: Uuid) {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Snapshots that must not be deleted yet, counted per (sandbox, snapshot).
/// Taken under the sandbox's lock and checked under it by whatever deletes
/// snapshots, so a pin holds a snapshot without blocking the sandbox's other
/// operations for as long as an export runs.
#[derive(Default)]
pub struct SnapshotPins {
    pins: Mutex<HashMap<(Uuid, String), usize>>,
}

impl SnapshotPins {
    /// Pins `names` of `sandbox` until the returned pin is dropped.
    pub fn pin(self: &Arc<Self>, sandbox: Uuid, names: Vec<String>) -> SnapshotPin {
        let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
        for name in &names {
            *pins.entry((sandbox, name.clone())).or_default() += 1;
        }
        SnapshotPin {
            table: Arc::clone(self),
            sandbox,
            names,
        }
    }

    /// Whether `snapshot` of `sandbox` is pinned.
    pub fn is_pinned(&self, sandbox: Uuid, snapshot: &str) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&(sandbox, snapshot.to_string()))
    }

    /// One pinned snapshot of `sandbox`, if any.
    pub fn any_pinned(&self, sandbox: Uuid) -> Option<String> {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .find(|(id, _)| *id == sandbox)
            .map(|(_, name)| name.clone())
    }
}

/// Keeps some snapshots of one sandbox pinned; unpins them when dropped.
pub struct SnapshotPin {
    table: Arc<SnapshotPins>,
    sandbox: Uuid,
    names: Vec<String>,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        let mut pins = self
            .table
            .pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for name in self.names.drain(..) {
            let key = (self.sandbox, name);
            if let Some(count) = pins.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    pins.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pins_count_and_release_per_snapshot() {
        let table = Arc::new(SnapshotPins::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = table.pin(a, vec!["s1".into(), "base".into()]);
        let second = table.pin(a, vec!["s1".into()]);
        assert!(table.is_pinned(a, "s1") && table.is_pinned(a, "base"));
        assert!(!table.is_pinned(a, "other") && !table.is_pinned(b, "s1"));
        assert_eq!(table.any_pinned(b), None);
        drop(first);
        assert!(table.is_pinned(a, "s1"), "still pinned by the second");
        assert!(!table.is_pinned(a, "base"));
        drop(second);
        assert_eq!(table.any_pinned(a), None);
    }

    #[tokio::test]
    async fn one_sandbox_at_a_time_others_free() {
        let table = Arc::new(LockTable::default());
        let a = Uuid::new_v4();
        let guard = table.lock(a).await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), table.lock(a)).await;
        assert!(
            blocked.is_err(),
            "second lock on the same sandbox must wait"
        );
        let other =
            tokio::time::timeout(Duration::from_millis(50), table.lock(Uuid::new_v4())).await;
        assert!(other.is_ok(), "another sandbox is not blocked");
        drop(guard);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), table.lock(a))
                .await
                .is_ok()
        );
    }
}

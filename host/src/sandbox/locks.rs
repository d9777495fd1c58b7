//! Per-sandbox locks that serialize lifecycle operations (create, snapshot,
//! restore, fork from, delete) on one sandbox while leaving others free.

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

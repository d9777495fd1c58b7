//! The store: API keys, sandboxes, snapshots and transfer jobs in SQLite through sqlx, with
//! embedded migrations. Callers see only the domain types below and
//! [`StoreError`], never SQL or sqlx types, so a PostgreSQL store can later
//! implement the same methods without touching the API layer.

mod jobs;
mod models;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

pub use jobs::{Job, JobKind, JobState};
pub use models::{ApiKey, ForkSource, NewSandbox, Sandbox, SandboxState, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (a name already taken).
    #[error("already exists")]
    Conflict,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) `opensandbox.db` under `data_dir` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("opensandbox.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL survives a crash of the host (not a power cut)
            // and saves an fsync per write on the snapshot path.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    // ---- API keys -------------------------------------------------------

    /// Inserts the very first key, as admin, only if no active key exists.
    /// Returns `None` when a key already exists (the caller must then authenticate).
    pub async fn insert_first_key(
        &self,
        name: Option<&str>,
        key_hash: &str,
    ) -> Result<Option<ApiKey>> {
        let key = ApiKey::new(name, true);
        let done = sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, admin, created_at)
             SELECT ?, ?, ?, 1, ? WHERE NOT EXISTS
               (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)",
        )
        .bind(key.id.to_string())
        .bind(&key.name)
        .bind(key_hash)
        .bind(fmt_time(key.created_at))
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then_some(key))
    }

    pub async fn insert_key(
        &self,
        name: Option<&str>,
        admin: bool,
        key_hash: &str,
    ) -> Result<ApiKey> {
        let key = ApiKey::new(name, admin);
        sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, admin, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(key.id.to_string())
        .bind(&key.name)
        .bind(key_hash)
        .bind(admin)
        .bind(fmt_time(key.created_at))
        .execute(&self.pool)
        .await
        .map_err(map_conflict)?;
        Ok(key)
    }

    /// Finds an active key by the hash of its secret; returns the key and the stored hash.
    pub async fn find_key_by_hash(&self, key_hash: &str) -> Result<Option<(ApiKey, String)>> {
        let row = sqlx::query(
            "SELECT id, name, key_hash, admin, created_at FROM api_keys
             WHERE key_hash = ? AND revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((models::key_from_row(&row)?, row.try_get("key_hash")?)))
            .transpose()
    }

    /// An active key by its id.
    pub async fn get_key(&self, id: Uuid) -> Result<Option<ApiKey>> {
        sqlx::query(
            "SELECT id, name, admin, created_at FROM api_keys
             WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(models::key_from_row)
        .transpose()
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        sqlx::query(
            "SELECT id, name, admin, created_at FROM api_keys
             WHERE revoked_at IS NULL ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(models::key_from_row)
        .collect()
    }

    /// Revokes an active key. Refuses (Conflict) to revoke the last active admin key,
    /// which would lock every admin out. Returns false when no such active key exists.
    pub async fn revoke_key(&self, id: Uuid) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let target: Option<bool> =
            sqlx::query_scalar("SELECT admin FROM api_keys WHERE id = ? AND revoked_at IS NULL")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(is_admin) = target else {
            return Ok(false);
        };
        if is_admin {
            let admins: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM api_keys WHERE admin = 1 AND revoked_at IS NULL",
            )
            .fetch_one(&mut *tx)
            .await?;
            if admins <= 1 {
                return Err(StoreError::Conflict);
            }
        }
        sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ?")
            .bind(fmt_time(Utc::now()))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    // ---- sandboxes ------------------------------------------------------

    /// Reserves the name in state `creating`; Conflict when the owner already uses it.
    pub async fn insert_sandbox(&self, new: &NewSandbox) -> Result<Sandbox> {
        let sandbox = Sandbox {
            id: Uuid::new_v4(),
            owner_key_id: new.owner_key_id,
            name: new.name.clone(),
            image: new.image.clone(),
            runtime: new.runtime.clone(),
            state: SandboxState::Creating,
            pending_restore: None,
            container_id: None,
            rootfs_path: None,
            env: new.env.clone(),
            labels: new.labels.clone(),
            forked_from: new.forked_from.clone(),
            created_at: Utc::now(),
        };
        sqlx::query(
            "INSERT INTO sandboxes (id, owner_key_id, name, image, runtime, state, env, labels,
                                    forked_from_vm, forked_from_snapshot, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(sandbox.id.to_string())
        .bind(sandbox.owner_key_id.to_string())
        .bind(&sandbox.name)
        .bind(&sandbox.image)
        .bind(&sandbox.runtime)
        .bind(sandbox.state.as_str())
        .bind(to_json(&sandbox.env))
        .bind(to_json(&sandbox.labels))
        .bind(sandbox.forked_from.as_ref().map(|f| f.vm.clone()))
        .bind(sandbox.forked_from.as_ref().map(|f| f.snapshot.clone()))
        .bind(fmt_time(sandbox.created_at))
        .execute(&self.pool)
        .await
        .map_err(map_conflict)?;
        Ok(sandbox)
    }

    pub async fn get_sandbox(&self, owner: Uuid, name: &str) -> Result<Option<Sandbox>> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE owner_key_id = ? AND name = ?")
            .bind(owner.to_string())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(models::sandbox_from_row).transpose()
    }

    pub async fn list_sandboxes(&self, owner: Uuid) -> Result<Vec<Sandbox>> {
        let rows =
            sqlx::query("SELECT * FROM sandboxes WHERE owner_key_id = ? ORDER BY created_at, name")
                .bind(owner.to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(models::sandbox_from_row).collect()
    }

    /// Every sandbox of every key, for start-up reconciliation.
    pub async fn list_all_sandboxes(&self) -> Result<Vec<Sandbox>> {
        let rows = sqlx::query("SELECT * FROM sandboxes ORDER BY created_at")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(models::sandbox_from_row).collect()
    }

    /// How many sandboxes each runtime holds: the load policies see.
    pub async fn count_by_runtime(&self) -> Result<BTreeMap<String, u32>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT runtime, COUNT(*) FROM sandboxes GROUP BY runtime")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(runtime, n)| (runtime, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect())
    }

    /// Records the runtime's handles once the container exists.
    pub async fn set_instance(&self, id: Uuid, container_id: &str, rootfs: &Path) -> Result<()> {
        sqlx::query("UPDATE sandboxes SET container_id = ?, rootfs_path = ? WHERE id = ?")
            .bind(container_id)
            .bind(rootfs.to_string_lossy().into_owned())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_state(
        &self,
        id: Uuid,
        state: SandboxState,
        pending_restore: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE sandboxes SET state = ?, pending_restore = ? WHERE id = ?")
            .bind(state.as_str())
            .bind(pending_restore)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes the sandbox row and, by cascade, its snapshot rows.
    pub async fn delete_sandbox(&self, id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM sandboxes WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- snapshots ------------------------------------------------------

    pub async fn insert_snapshot(&self, sandbox_id: Uuid, name: &str) -> Result<Snapshot> {
        let snapshot = Snapshot {
            name: name.to_string(),
            created_at: Utc::now(),
        };
        sqlx::query("INSERT INTO snapshots (sandbox_id, name, created_at) VALUES (?, ?, ?)")
            .bind(sandbox_id.to_string())
            .bind(name)
            .bind(fmt_time(snapshot.created_at))
            .execute(&self.pool)
            .await
            .map_err(map_conflict)?;
        Ok(snapshot)
    }

    pub async fn get_snapshot(&self, sandbox_id: Uuid, name: &str) -> Result<Option<Snapshot>> {
        let row =
            sqlx::query("SELECT name, created_at FROM snapshots WHERE sandbox_id = ? AND name = ?")
                .bind(sandbox_id.to_string())
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(models::snapshot_from_row).transpose()
    }

    pub async fn list_snapshots(&self, sandbox_id: Uuid) -> Result<Vec<Snapshot>> {
        let rows = sqlx::query(
            "SELECT name, created_at FROM snapshots WHERE sandbox_id = ? ORDER BY created_at, name",
        )
        .bind(sandbox_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(models::snapshot_from_row).collect()
    }

    pub async fn delete_snapshot(&self, sandbox_id: Uuid, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM snapshots WHERE sandbox_id = ? AND name = ?")
            .bind(sandbox_id.to_string())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn map_conflict(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Database(err),
    }
}

fn to_json(map: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes.
    serde_json::to_string(map).unwrap_or_else(|_| "{}".to_string())
}

/// Fixed-width timestamps, so that ORDER BY on the text is chronological.
fn fmt_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_time(table: &'static str, row: &SqliteRow, column: &str) -> Result<DateTime<Utc>> {
    let text: String = row.try_get(column)?;
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt {
            table,
            detail: format!("{column}: {e}"),
        })
}

fn parse_uuid(table: &'static str, row: &SqliteRow, column: &str) -> Result<Uuid> {
    let text: String = row.try_get(column)?;
    Uuid::from_str(&text).map_err(|e| StoreError::Corrupt {
        table,
        detail: format!("{column}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn first_key_is_created_only_once() {
        let (_dir, store) = store().await;
        let first = store.insert_first_key(Some("a"), "h1").await.unwrap();
        assert!(first.as_ref().is_some_and(|k| k.admin));
        assert!(store.insert_first_key(None, "h2").await.unwrap().is_none());
        let (found, hash) = store.find_key_by_hash("h1").await.unwrap().unwrap();
        assert_eq!(found.id, first.unwrap().id);
        assert_eq!(hash, "h1");
    }

    #[tokio::test]
    async fn the_last_admin_key_cannot_be_revoked() {
        let (_dir, store) = store().await;
        let admin = store.insert_first_key(None, "h1").await.unwrap().unwrap();
        let user = store.insert_key(None, false, "h2").await.unwrap();
        assert!(matches!(
            store.revoke_key(admin.id).await,
            Err(StoreError::Conflict)
        ));
        assert!(store.revoke_key(user.id).await.unwrap());
        assert!(!store.revoke_key(user.id).await.unwrap());
        assert!(store.find_key_by_hash("h2").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn sandbox_names_are_unique_per_owner_and_snapshots_cascade() {
        let (_dir, store) = store().await;
        let a = store.insert_first_key(None, "h1").await.unwrap().unwrap();
        let b = store.insert_key(None, false, "h2").await.unwrap();
        let new = |owner| NewSandbox {
            owner_key_id: owner,
            name: "x".into(),
            image: "img".into(),
            runtime: "docker".into(),
            env: BTreeMap::from([("K".into(), "V".into())]),
            labels: BTreeMap::new(),
            forked_from: None,
        };
        let sa = store.insert_sandbox(&new(a.id)).await.unwrap();
        assert!(matches!(
            store.insert_sandbox(&new(a.id)).await,
            Err(StoreError::Conflict)
        ));
        store.insert_sandbox(&new(b.id)).await.unwrap();
        store.insert_snapshot(sa.id, "initial").await.unwrap();
        assert!(matches!(
            store.insert_snapshot(sa.id, "initial").await,
            Err(StoreError::Conflict)
        ));
        let got = store.get_sandbox(a.id, "x").await.unwrap().unwrap();
        assert_eq!(got.env.get("K").map(String::as_str), Some("V"));
        assert_eq!(got.state, SandboxState::Creating);
        store.delete_sandbox(sa.id).await.unwrap();
        assert!(store.list_snapshots(sa.id).await.unwrap().is_empty());
        assert_eq!(store.list_all_sandboxes().await.unwrap().len(), 1);
    }
}

//! Spare snapshots of the shared base images, made ahead of time.
//!
//! A Btrfs snapshot commits a transaction: 4-5 ms for an image's root
//! filesystem on our loop-mounted filesystem when it is quiet, 15-20 ms while
//! the cleaner works off deleted subvolumes (measured), and a sandbox on a
//! runtime plugin needs two at creation (its root, and the host's `initial`
//! snapshot of it). Moving a spare that was made earlier into place is a
//! rename instead (0.1 ms), plus making it read-only where that is wanted
//! (2 ms: the kernel does not move read-only subvolumes between folders, so
//! spares are kept writable). The pool keeps `keep` spares per image and
//! tops itself up on a background thread once takes pause for a moment (a
//! snapshot's commit stalls every other Btrfs change while it runs, so
//! refilling in the middle of a create would cost that create what the spare
//! saved). It hands out nothing it cannot vouch
//! for: a spare is used only while its image is still read-only, still the
//! same subvolume (rebuilding an image makes a new one, with a new uuid) and
//! unchanged since (the same last-changed transaction). Nothing writes to a
//! spare: they live in a folder plugins cannot name (a leading `.`), and
//! leftovers of an earlier run are deleted at start.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::btrfs;

/// How long takes must pause before a spare is made: about the rest of a
/// create after its take (the sandbox's start, 10-15 ms), so that the refill
/// does not stall it, and short enough that a pool drained by a burst is
/// full again a moment after.
const QUIET_BEFORE_REFILL: Duration = Duration::from_millis(25);

/// An image's host path.
type Key = PathBuf;

struct Spare {
    path: PathBuf,
    /// The image it was made from: its uuid and last-changed transaction.
    image: ([u8; 16], u64),
}

#[derive(Default)]
struct Pool {
    ready: HashMap<Key, Vec<Spare>>,
    /// When a spare was last asked for.
    last_take: Option<Instant>,
    /// Images whose spares a background thread is topping up now.
    filling: HashSet<Key>,
}

/// One plugin's spare snapshots.
pub struct Spares {
    dir: PathBuf,
    keep: usize,
    pool: Mutex<Pool>,
    next: AtomicU64,
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares")
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl Spares {
    /// Opens the folder of spares (on the same filesystem as the plugin's
    /// root, so that a spare moves by rename) and deletes what an earlier
    /// run left there. `keep` 0 turns the pool off.
    pub fn open(dir: PathBuf, keep: usize) -> Result<Arc<Self>, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if let Err(e) = btrfs::delete_subvolume_if_exists(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a spare snapshot of an earlier run");
            }
        }
        Ok(Arc::new(Self {
            dir,
            keep,
            pool: Mutex::new(Pool::default()),
            next: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Every change to the pool is one push, pop or set update: a panic
        // cannot leave it half-changed.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves a spare snapshot of `image` to `dest`, which must not exist,
    /// and makes it read-only when asked. `false` when there is none it can
    /// vouch for: the caller then snapshots as usual. Either way the pool of
    /// that image is topped up in the background.
    pub fn take(self: &Arc<Self>, image: &Path, read_only: bool, dest: &Path) -> bool {
        if self.keep == 0 {
            return false;
        }
        let key = image.to_path_buf();
        self.lock().last_take = Some(Instant::now());
        let taken = self.take_checked(&key, dest);
        self.top_up(key);
        if taken && read_only {
            if let Err(e) = btrfs::make_read_only(dest) {
                tracing::warn!(dest = %dest.display(), error = %e, "cannot make a spare snapshot read-only");
                let _ = btrfs::delete_subvolume_if_exists(dest);
                return false;
            }
        }
        taken
    }

    fn take_checked(&self, key: &Key, dest: &Path) -> bool {
        let spare = match self.lock().ready.get_mut(key).and_then(Vec::pop) {
            Some(spare) => spare,
            None => return false,
        };
        let current = match btrfs::subvolume_info(key) {
            Ok(info) => info.read_only && (info.uuid, info.ctransid) == spare.image,
            Err(e) => {
                tracing::debug!(image = %key.display(), error = %e, "image unreadable; spare dropped");
                false
            }
        };
        if !current {
            // The image was rebuilt or made writable: every spare of it is stale.
            let stale: Vec<Spare> = self.lock().ready.remove(key).unwrap_or_default();
            for old in stale.iter().chain(std::iter::once(&spare)) {
                let _ = btrfs::delete_subvolume_if_exists(&old.path);
            }
            return false;
        }
        match btrfs::rename_subvolume(&spare.path, dest) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(spare = %spare.path.display(), dest = %dest.display(), error = %e, "cannot move a spare snapshot into place");
                let _ = btrfs::delete_subvolume_if_exists(&spare.path);
                false
            }
        }
    }

    /// Starts a thread that brings `key`'s spares back to `keep`, unless one
    /// is at it already.
    fn top_up(self: &Arc<Self>, key: Key) {
        {
            let mut pool = self.lock();
            let have = pool.ready.get(&key).map_or(0, Vec::len);
            if have >= self.keep || !pool.filling.insert(key.clone()) {
                return;
            }
        }
        let this = Arc::clone(self);
        let filled = key.clone();
        let spawned = std::thread::Builder::new()
            .name("spare-snapshots".into())
            .spawn(move || this.fill(&filled));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread for spare snapshots");
            // Nothing fills it: let the next take try again.
            self.lock().filling.remove(&key);
        }
    }

    /// Makes spares of `image` until there are `keep`. It takes `image` off
    /// `filling` under the same lock as its last look at the pool, so a take
    /// that finds the pool short after that look starts a thread of its own
    /// instead of counting on this one, which is ending.
    fn fill(&self, image: &Key) {
        loop {
            let last_take = {
                let mut pool = self.lock();
                if pool.ready.get(image).map_or(0, Vec::len) >= self.keep {
                    pool.filling.remove(image);
                    return;
                }
                pool.last_take
            };
            let quiet = last_take.map_or(Duration::MAX, |t| t.elapsed());
            if quiet < QUIET_BEFORE_REFILL {
                std::thread::sleep(QUIET_BEFORE_REFILL - quiet);
                continue;
            }
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(n.to_string());
            let made = btrfs::subvolume_info(image).and_then(|source| {
                btrfs::snapshot(image, &path, false)?;
                Ok((source, btrfs::subvolume_info(&path)?))
            });
            match made {
                // The spare's parent must be the image looked at before: a
                // rebuild in between would otherwise pass for the old one.
                Ok((source, spare)) if source.read_only && spare.parent_uuid == source.uuid => self
                    .lock()
                    .ready
                    .entry(image.clone())
                    .or_default()
                    .push(Spare {
                        path,
                        image: (source.uuid, source.ctransid),
                    }),
                Ok(_) => {
                    let _ = btrfs::delete_subvolume_if_exists(&path);
                    self.lock().filling.remove(image);
                    return;
                }
                Err(e) => {
                    tracing::warn!(image = %image.display(), error = %e, "cannot make a spare snapshot");
                    let _ = btrfs::delete_subvolume_if_exists(&path);
                    self.lock().filling.remove(image);
                    return;
                }
            }
        }
    }

    /// How many spares of `image` are ready now.
    pub fn ready(&self, image: &Path) -> usize {
        self.lock().ready.get(image).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btrfs::scratch::Scratch;
    use std::time::{Duration, Instant};

    /// A read-only image holding `hostname` with `content`.
    fn image(scratch: &Scratch, name: &str, content: &str) -> PathBuf {
        let work = scratch.subvolume(&format!("{name}.work"));
        std::fs::write(work.join("hostname"), content).unwrap();
        let image = scratch.path(name);
        btrfs::snapshot(&work, &image, true).unwrap();
        btrfs::delete_subvolume(&work).unwrap();
        image
    }

    fn set_read_only(path: &Path, on: bool) {
        let status = std::process::Command::new("btrfs")
            .args(["property", "set", "-ts"])
            .arg(path)
            .args(["ro", if on { "true" } else { "false" }])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_ready(spares: &Spares, image: &Path, want: usize) {
        let until = Instant::now() + Duration::from_secs(20);
        while spares.ready(image) < want {
            assert!(Instant::now() < until, "the pool never reached {want}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn spares_are_taken_by_rename_and_topped_up() {
        let scratch = Scratch::new();
        let image = image(&scratch, "image", "one");
        let spares = Spares::open(scratch.path("spares"), 2).unwrap();

        // None yet: the caller snapshots; the pool starts filling.
        assert!(!spares.take(&image, false, &scratch.path("first")));
        assert!(!scratch.path("first").exists());
        wait_ready(&spares, &image, 2);

        let root = scratch.path("root");
        assert!(spares.take(&image, false, &root));
        let info = btrfs::subvolume_info(&root).unwrap();
        assert!(!info.read_only);
        assert_eq!(
            info.parent_uuid,
            btrfs::subvolume_info(&image).unwrap().uuid
        );
        assert_eq!(
            std::fs::read_to_string(root.join("hostname")).unwrap(),
            "one"
        );
        std::fs::write(root.join("hostname"), "written").unwrap();
        wait_ready(&spares, &image, 2);

        // Read-only where asked (moved first, then made read-only).
        let initial = scratch.path("initial");
        assert!(spares.take(&image, true, &initial));
        assert!(btrfs::subvolume_info(&initial).unwrap().read_only);
        assert_eq!(
            std::fs::read_to_string(initial.join("hostname")).unwrap(),
            "one"
        );

        // Never onto an existing entry: the caller gets false and snapshots.
        assert!(!spares.take(&image, false, &root));
        assert_eq!(
            std::fs::read_to_string(root.join("hostname")).unwrap(),
            "written"
        );
    }

    #[test]
    fn a_rebuilt_or_changed_image_makes_its_spares_stale() {
        let scratch = Scratch::new();
        let path = image(&scratch, "image", "old");
        let spares = Spares::open(scratch.path("spares"), 2).unwrap();
        spares.take(&path, false, &scratch.path("warm"));
        wait_ready(&spares, &path, 2);

        // Rebuilt: a new subvolume at the same path.
        btrfs::delete_subvolume(&path).unwrap();
        let path = image(&scratch, "image", "new");
        assert!(!spares.take(&path, false, &scratch.path("a")));
        assert!(!scratch.path("a").exists());
        wait_ready(&spares, &path, 2);
        assert!(spares.take(&path, false, &scratch.path("b")));
        assert_eq!(
            std::fs::read_to_string(scratch.path("b/hostname")).unwrap(),
            "new"
        );

        // Made writable: nothing is vouched for while it may change.
        wait_ready(&spares, &path, 2);
        set_read_only(&path, false);
        assert!(!spares.take(&path, false, &scratch.path("c")));
        set_read_only(&path, true);
    }

    #[test]
    fn leftovers_of_an_earlier_run_are_deleted() {
        let scratch = Scratch::new();
        let image = image(&scratch, "image", "x");
        let dir = scratch.path("spares");
        std::fs::create_dir(&dir).unwrap();
        btrfs::snapshot(&image, &dir.join("7"), false).unwrap();
        let spares = Spares::open(dir.clone(), 2).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(spares.ready(&image), 0);
        // keep 0: never a spare, never a thread.
        let off = Spares::open(scratch.path("off"), 0).unwrap();
        assert!(!off.take(&image, true, &scratch.path("y")));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(off.ready(&image), 0);
    }
}

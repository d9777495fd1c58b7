//! Native stand-ins for the host, to unit-test a plugin with `cargo test` (only on targets other
//! than `wasm32`).
//!
//! [`config`](crate::config) reads a per-thread table set with [`set_config`] (empty until
//! then), and [`log`](crate::log) appends to a per-thread list that [`take_logs`] drains. Each
//! test runs on its own thread, so tests do not see each other's settings.
//!
//! ```
//! use opensandbox_plugin_sdk::{config, log, testing};
//!
//! testing::set_config([("level", "warn"), ("deny", "a\nb")]);
//! assert_eq!(config::list("deny"), vec!["a", "b"]);
//! log::warn!("{} rules", 2);
//! assert_eq!(testing::take_logs(), vec![(log::Level::Warn, "2 rules".to_string())]);
//! ```
//!
//! For runtimes, the host capabilities are per-thread fakes too, so a driver's logic runs
//! natively from `create` to `destroy`:
//!
//! - [`btrfs`](crate::btrfs) works on an in-memory table of subvolume names, checked as the
//!   host checks them; [`add_subvolume`] puts one there (a base image, say), [`subvolumes`]
//!   and [`subvolume`] show them, [`set_btrfs_granted`] and [`fail_next_btrfs_call`] make calls
//!   fail.
//! - [`process`](crate::process) records spawns without running anything: every process stays
//!   running until the plugin kills it or the test ends it with [`set_process_state`];
//!   [`processes`] shows them (program, arguments, options, signals received),
//!   [`set_spawn_outcome`] makes new ones fail at once, and [`set_granted_programs`] and
//!   [`fail_next_process_call`] make calls fail.
//! - [`state`](crate::state) uses a fresh temporary folder per thread ([`state_dir`]), removed
//!   when the thread ends.
//!
//! ```
//! use opensandbox_plugin_sdk::process::{self, ProcessState, SpawnOptions};
//! use opensandbox_plugin_sdk::{btrfs, testing};
//!
//! testing::add_subvolume("images/base");
//! btrfs::snapshot("images/base", "sandboxes/a", false).unwrap();
//! assert_eq!(testing::subvolumes(), vec!["images/base", "sandboxes/a"]);
//! assert!(btrfs::snapshot("images/base", "../a", false).is_err());
//!
//! let id = process::spawn("/usr/bin/sleep", &["9"], &SpawnOptions::default()).unwrap();
//! assert_eq!(testing::processes()[0].args, vec!["9"]);
//! testing::set_process_state(&id, ProcessState::Exited(0));
//! assert_eq!(process::state(&id), Ok(ProcessState::Exited(0)));
//! ```

pub(crate) mod fake_btrfs;
pub(crate) mod fake_process;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::log::Level;
use crate::process::{CapturedOutput, ProcessState};
use crate::CapabilityError;

pub use fake_btrfs::{FakeSubvolume, BTRFS_ROOT};
pub use fake_process::FakeProcess;

thread_local! {
    static CONFIG: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static STATE_DIR: StateDir = const { StateDir(RefCell::new(None)) };
}

/// This thread's state folder, made on first use and removed with the thread.
struct StateDir(RefCell<Option<PathBuf>>);

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.get_mut() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Replaces this thread's configuration with `entries` (values as the host would pass them:
/// arrays joined with `"\n"`).
pub fn set_config<K, V>(entries: impl IntoIterator<Item = (K, V)>)
where
    K: Into<String>,
    V: Into<String>,
{
    let map = entries
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    CONFIG.with(|c| *c.borrow_mut() = map);
}

/// Returns and forgets the lines this thread logged so far.
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

pub(crate) fn config_get(key: &str) -> Option<String> {
    CONFIG.with(|c| c.borrow().get(key).cloned())
}

pub(crate) fn config_entries() -> Vec<(String, String)> {
    CONFIG.with(|c| {
        c.borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
}

pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
}

/// The folder that [`state`](crate::state) uses on this thread: a fresh temporary folder, made
/// on first use and removed when the thread ends.
///
/// # Panics
///
/// If the folder cannot be made (a test can do nothing useful then).
pub fn state_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    STATE_DIR.with(|s| {
        s.0.borrow_mut()
            .get_or_insert_with(|| {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let dir = std::env::temp_dir().join(format!(
                    "opensandbox-plugin-state-{}-{n}",
                    std::process::id()
                ));
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    panic!(
                        "testing: cannot make the state folder {}: {e}",
                        dir.display()
                    );
                }
                dir
            })
            .clone()
    })
}

/// Puts the subvolume `name` in this thread's fake Btrfs root, as if it existed already (a
/// base image prepared by the operator, say). Any name is accepted.
pub fn add_subvolume(name: &str) {
    fake_btrfs::add(name)
}

/// Every subvolume of this thread's fake Btrfs root, sorted.
pub fn subvolumes() -> Vec<String> {
    fake_btrfs::names()
}

/// The subvolume `name` of this thread's fake Btrfs root, if it exists.
pub fn subvolume(name: &str) -> Option<FakeSubvolume> {
    fake_btrfs::get(name)
}

/// Whether this thread's plugin has the `btrfs` grant (it has until this is called): without
/// it every [`btrfs`](crate::btrfs) call fails with [`CapabilityError::NotGranted`].
pub fn set_btrfs_granted(granted: bool) {
    fake_btrfs::set_granted(granted)
}

/// Makes the next [`btrfs`](crate::btrfs) call on this thread fail with `error`.
pub fn fail_next_btrfs_call(error: CapabilityError) {
    fake_btrfs::fail_next(error)
}

/// The programs this thread's `process` grant lists. Until this is called every absolute path
/// is granted; others fail [`process::spawn`](crate::process::spawn) with
/// [`CapabilityError::NotGranted`].
pub fn set_granted_programs<S: Into<String>>(programs: impl IntoIterator<Item = S>) {
    fake_process::set_granted(Some(programs.into_iter().map(Into::into).collect()))
}

/// Makes the next [`process`](crate::process) call on this thread (other than `list`) fail with
/// `error`.
pub fn fail_next_process_call(error: CapabilityError) {
    fake_process::fail_next(error)
}

/// Every process this thread spawned, released ones included, in spawn order.
pub fn processes() -> Vec<FakeProcess> {
    fake_process::all()
}

/// Ends (or revives) the process `id`, as if it had exited or been killed; `false` if no
/// process has that id.
pub fn set_process_state(id: &str, state: ProcessState) -> bool {
    fake_process::update(id, |p| p.state = state)
}

/// Makes every process spawned on this thread from now on start in `state` with `output`, as
/// a program that fails at once would be found by the plugin's next call (`None`: running, no
/// output, the default).
pub fn set_spawn_outcome(outcome: Option<(ProcessState, CapturedOutput)>) {
    fake_process::spawn_as(outcome)
}

/// Sets what [`process::output`](crate::process::output) returns for `id`; `false` if no
/// process has that id.
pub fn set_process_output(id: &str, output: CapturedOutput) -> bool {
    fake_process::update(id, |p| p.output = output)
}

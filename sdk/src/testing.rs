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

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::log::Level;

thread_local! {
    static CONFIG: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
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

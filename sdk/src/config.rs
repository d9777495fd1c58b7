//! The plugin's own configuration: the `config` table of its entry in the plugins file.
//!
//! The host passes every value as a string: strings as they are, numbers and booleans as their
//! text (`3`, `true`), and arrays of scalars as their elements joined with `"\n"` (read them
//! with [`list`]). Keys of nested tables are not passed. Check the configuration in
//! `validate_config` so that a mistake stops the host at start-up rather than failing calls.

use std::str::FromStr;

/// The value of `key`, if the operator set it.
pub fn get(key: &str) -> Option<String> {
    imp::get(key)
}

/// Every key and value, sorted by key.
pub fn entries() -> Vec<(String, String)> {
    imp::entries()
}

/// The value of `key` parsed as a `T` (`u32`, `bool`, `f64`, ...): `Ok(None)` when it is not
/// set, and an error naming the key and the value when it does not parse.
///
/// ```
/// # use opensandbox_plugin_sdk::{config, testing};
/// # testing::set_config([("max", "3"), ("bad", "three")]);
/// assert_eq!(config::parse::<u32>("max"), Ok(Some(3)));
/// assert_eq!(config::parse::<u32>("unset"), Ok(None));
/// assert!(config::parse::<u32>("bad").unwrap_err().starts_with("bad: "));
/// ```
pub fn parse<T>(key: &str) -> Result<Option<T>, String>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match get(key) {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|e| format!("{key}: invalid value {text:?}: {e}")),
    }
}

/// The elements of the array `key` (a string value is a list of one; an empty or unset value
/// an empty list).
///
/// ```
/// # use opensandbox_plugin_sdk::{config, testing};
/// # testing::set_config([("deny", "rm -rf *\nshutdown*")]);
/// assert_eq!(config::list("deny"), vec!["rm -rf *", "shutdown*"]);
/// assert!(config::list("allow").is_empty());
/// ```
pub fn list(key: &str) -> Vec<String> {
    match get(key) {
        Some(value) if !value.is_empty() => value.split('\n').map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::__private::imports::config;

    pub fn get(key: &str) -> Option<String> {
        config::get(key)
    }

    pub fn entries() -> Vec<(String, String)> {
        config::entries()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub fn get(key: &str) -> Option<String> {
        crate::testing::config_get(key)
    }

    pub fn entries() -> Vec<(String, String)> {
        crate::testing::config_entries()
    }
}

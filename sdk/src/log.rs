//! Writing to the host's log: one line per call, tagged by the host with the plugin's name.
//!
//! Use the functions, `log::info("text")` ([`info()`], [`warn()`], ...), or the macros of the
//! same names, which take `format!` arguments: `log::info!("{} commands", n)`.

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected, handled.
    Warn,
    /// Something failed.
    Error,
}

/// Writes `message` to the host's log at `level`.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// Writes `message` at [`Level::Trace`].
pub fn trace(message: &str) {
    log(Level::Trace, message)
}

/// Writes `message` at [`Level::Debug`].
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// Writes `message` at [`Level::Info`].
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// Writes `message` at [`Level::Warn`].
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// Writes `message` at [`Level::Error`].
pub fn error(message: &str) {
    log(Level::Error, message)
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_trace {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Trace, &::std::format!($($arg)+)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Debug, &::std::format!($($arg)+)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __log_info {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Info, &::std::format!($($arg)+)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Warn, &::std::format!($($arg)+)) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __log_error {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Error, &::std::format!($($arg)+)) };
}

/// `debug!("...", args)`: [`debug()`] with `format!` arguments.
#[doc(inline)]
pub use crate::__log_debug as debug;
/// `error!("...", args)`: [`error()`] with `format!` arguments.
#[doc(inline)]
pub use crate::__log_error as error;
/// `info!("...", args)`: [`info()`] with `format!` arguments.
#[doc(inline)]
pub use crate::__log_info as info;
/// `trace!("...", args)`: [`trace()`] with `format!` arguments.
#[doc(inline)]
pub use crate::__log_trace as trace;
/// `warn!("...", args)`: [`warn()`] with `format!` arguments.
#[doc(inline)]
pub use crate::__log_warn as warn;

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Level;
    use crate::__private::imports::host::{self, LogLevel};

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        host::log(level, message);
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::Level;

    pub fn log(level: Level, message: &str) {
        crate::testing::record_log(level, message);
    }
}

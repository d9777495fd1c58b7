//! Host processes (runtime plugins only; needs the `process` grant, which lists the programs
//! the plugin may start).
//!
//! A process is started directly (no shell) from an absolute path the grant lists, with only
//! the variables given, stdin empty, in its own session, and is named by the id [`spawn`]
//! returns: stable across host restarts and valid only for this plugin, so keep it (in
//! [`state`](crate::state)) to reach the process in a later call. A process lives on after
//! the call that started it, until it ends or is [killed](kill); [`release`] makes the host
//! forget an ended one.
//!
//! ```
//! use opensandbox_plugin_sdk::process::{self, ResourceLimits, Signal, SpawnOptions};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), opensandbox_plugin_sdk::CapabilityError> {
//! let options = SpawnOptions::default()
//!     .env("LANG", "C")
//!     .capture_output(true)
//!     .limits(ResourceLimits { memory_bytes: Some(256 << 20), ..ResourceLimits::default() });
//! let id = process::spawn("/usr/bin/sleep", &["1000"], &options)?;
//! assert!(process::state(&id)?.is_running());
//! process::kill(&id, Signal::Kill, true)?;
//! let ended = process::wait(&id, Duration::from_secs(2))?;
//! process::release(&id)?;
//! # let _ = ended;
//! # Ok(())
//! # }
//! ```
//!
//! On targets other than `wasm32` these functions work on an in-memory fake, see
//! [`testing`](crate::testing).

use std::time::Duration;

use crate::CapabilityError;

/// Resource limits for a process and everything it starts (Linux cgroups). A limit the host
/// cannot enforce fails the spawn, unless `best_effort` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ResourceLimits {
    /// Memory (RAM) cap in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU cap in thousandths of a core (1000 = one core).
    pub cpu_millicores: Option<u32>,
    /// Most processes and threads at once.
    pub max_processes: Option<u32>,
    /// Skip (and log) the limits the host cannot enforce instead of failing.
    pub best_effort: bool,
}

/// One range of a user namespace's id mapping (applied to user and group ids alike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IdRange {
    /// First id inside the namespace.
    pub inside: u32,
    /// The host id it stands for.
    pub outside: u32,
    /// How many consecutive ids the range maps (at least 1).
    pub count: u32,
}

/// Most ranges in one mapping.
pub const MAX_ID_RANGES: usize = 8;

/// How to start a process: [`Default`] is no variable, output discarded, no limits, the host's
/// user namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SpawnOptions {
    /// The process's whole environment, as `(name, value)` (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Keep the first bytes of stdout and stderr (the grant's bound) for [`output`];
    /// otherwise they are discarded.
    pub capture_output: bool,
    /// Cgroup limits, if any.
    pub limits: Option<ResourceLimits>,
    /// Start the program in a new user namespace with these mappings (1 to
    /// [`MAX_ID_RANGES`] ranges, host ids below 2^31), as uid and gid 0 inside. The host
    /// writes the mappings, so ranges of many ids work (unlike an unprivileged program's own
    /// one-id mapping): every user of a sandbox exists, and root inside has no capability
    /// over the host.
    pub user_namespace: Option<Vec<IdRange>>,
}

impl SpawnOptions {
    /// Adds the variable `name=value`.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Sets whether the output is kept for [`output`].
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture_output = capture;
        self
    }

    /// Sets the limits.
    pub fn limits(mut self, limits: ResourceLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Starts the process in a new user namespace with these id mappings.
    pub fn user_namespace(mut self, ranges: Vec<IdRange>) -> Self {
        self.user_namespace = Some(ranges);
        self
    }
}

/// A process's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcessState {
    /// Still running.
    Running,
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl ProcessState {
    /// Whether the process is still running.
    pub fn is_running(self) -> bool {
        self == ProcessState::Running
    }
}

/// The signals a plugin may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// SIGTERM: ask to stop.
    Term,
    /// SIGKILL: stop at once.
    Kill,
    /// SIGINT.
    Interrupt,
    /// SIGHUP.
    Hangup,
}

impl Signal {
    /// The signal's Linux number (SIGTERM is 15, ...), as [`ProcessState::Signaled`] reports it.
    pub fn number(self) -> i32 {
        match self {
            Signal::Term => 15,
            Signal::Kill => 9,
            Signal::Interrupt => 2,
            Signal::Hangup => 1,
        }
    }
}

/// The captured output of a process (see [`SpawnOptions::capture_output`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CapturedOutput {
    /// The first bytes of stdout.
    pub stdout: Vec<u8>,
    /// The first bytes of stderr.
    pub stderr: Vec<u8>,
    /// True when either stream had more than the bound.
    pub truncated: bool,
}

/// Starts `program` (an absolute path the grant lists) with `args` (after argv\[0\]);
/// returns the process's id.
pub fn spawn<S: AsRef<str>>(
    program: &str,
    args: &[S],
    options: &SpawnOptions,
) -> Result<String, CapabilityError> {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    imp::spawn(program, &args, options)
}

/// The process's state now.
pub fn state(id: &str) -> Result<ProcessState, CapabilityError> {
    imp::state(id)
}

/// Waits up to `timeout` (at most `u32::MAX` ms, and never past the call's own deadline) for
/// the process to end; returns its state then, [`Running`](ProcessState::Running) if it did
/// not end in time.
pub fn wait(id: &str, timeout: Duration) -> Result<ProcessState, CapabilityError> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    imp::wait(id, ms)
}

/// Sends `signal` to the process, or with `whole_tree` to it and every process under it.
pub fn kill(id: &str, signal: Signal, whole_tree: bool) -> Result<(), CapabilityError> {
    imp::kill(id, signal, whole_tree)
}

/// The captured output so far.
pub fn output(id: &str) -> Result<CapturedOutput, CapabilityError> {
    imp::output(id)
}

/// Forgets an ended process (a running one is killed with its tree first).
pub fn release(id: &str) -> Result<(), CapabilityError> {
    imp::release(id)
}

/// Every process of this plugin the host still knows (running or ended, not released), by id.
pub fn list() -> Vec<String> {
    imp::list()
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{CapturedOutput, ProcessState, Signal, SpawnOptions};
    use crate::__private::capability_error as err;
    use crate::__private::imports::process as p;
    use crate::CapabilityError;

    fn state_from(s: p::ProcessState) -> ProcessState {
        match s {
            p::ProcessState::Running => ProcessState::Running,
            p::ProcessState::Exited(code) => ProcessState::Exited(code),
            p::ProcessState::Signaled(signal) => ProcessState::Signaled(signal),
        }
    }

    pub fn spawn(
        program: &str,
        args: &[String],
        options: &SpawnOptions,
    ) -> Result<String, CapabilityError> {
        let options = p::SpawnOptions {
            env: options.env.clone(),
            capture_output: options.capture_output,
            limits: options.limits.as_ref().map(|l| p::ResourceLimits {
                memory_bytes: l.memory_bytes,
                cpu_millicores: l.cpu_millicores,
                max_processes: l.max_processes,
                best_effort: l.best_effort,
            }),
            user_namespace: options.user_namespace.as_ref().map(|ranges| {
                ranges
                    .iter()
                    .map(|r| p::IdRange {
                        inside: r.inside,
                        outside: r.outside,
                        count: r.count,
                    })
                    .collect()
            }),
        };
        p::spawn(program, args, &options).map_err(err)
    }

    pub fn state(id: &str) -> Result<ProcessState, CapabilityError> {
        p::state(id).map(state_from).map_err(err)
    }

    pub fn wait(id: &str, timeout_ms: u32) -> Result<ProcessState, CapabilityError> {
        p::wait(id, timeout_ms).map(state_from).map_err(err)
    }

    pub fn kill(id: &str, signal: Signal, whole_tree: bool) -> Result<(), CapabilityError> {
        let signal = match signal {
            Signal::Term => p::Signal::Term,
            Signal::Kill => p::Signal::Kill,
            Signal::Interrupt => p::Signal::Interrupt,
            Signal::Hangup => p::Signal::Hangup,
        };
        p::kill(id, signal, whole_tree).map_err(err)
    }

    pub fn output(id: &str) -> Result<CapturedOutput, CapabilityError> {
        p::output(id)
            .map(|o| CapturedOutput {
                stdout: o.stdout,
                stderr: o.stderr,
                truncated: o.truncated,
            })
            .map_err(err)
    }

    pub fn release(id: &str) -> Result<(), CapabilityError> {
        p::release(id).map_err(err)
    }

    pub fn list() -> Vec<String> {
        p::list_processes()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub use crate::testing::fake_process::{kill, list, output, release, spawn, state, wait};
}

//! The records and variants of the WIT interface `types`, as plain Rust types.

/// Who is calling the REST API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Stable id (a UUID) of the caller's API key; never the key itself.
    pub key_id: String,
    /// Whether that key is an admin key.
    pub admin: bool,
}

/// A sandbox creation request, as the client sent it (after validation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CreateRequest {
    /// The sandbox's name, unique per key.
    pub name: String,
    /// The image the sandbox will be created from.
    pub image: String,
    /// The labels the client set, as `(key, value)`, sorted by key.
    pub labels: Vec<(String, String)>,
    /// The runtime the client asked for, if it named one.
    pub requested_runtime: Option<String>,
    /// True when the sandbox is forked from a snapshot of another one.
    pub is_fork: bool,
}

impl CreateRequest {
    /// The value of the label `key`, if the client set it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One runtime that could run the new sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RuntimeCandidate {
    /// The runtime's name, as clients see it (`docker`, ...).
    pub name: String,
    /// Whether the runtime answered its last health check.
    pub healthy: bool,
    /// How many sandboxes (of every key) run on it now: its load.
    pub sandboxes: u32,
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuntimeDecision {
    /// Run the sandbox on this runtime; must be one of the candidates' names.
    Select(String),
    /// No opinion: the next policy decides, or the host's `SANDBOX_RUNTIME`.
    Abstain,
    /// Refuse the creation; the reason is shown to the client (HTTP 403).
    Reject(String),
}

/// A command about to run in a sandbox (or that ran, in [`Hook::after_command`](crate::Hook::after_command)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Command {
    /// The sandbox's name.
    pub sandbox: String,
    /// The sandbox's id (a UUID), stable across renames and restarts.
    pub sandbox_id: String,
    /// The command line; the host runs it as `/bin/sh -c <command>`.
    pub command: String,
    /// Variables set for this command only, as `(name, value)`, sorted by name.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox, if the client set one.
    pub cwd: Option<String>,
    /// The command's timeout in milliseconds.
    pub timeout_ms: u64,
}

/// What a hook may change in a command: the command line and its variables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CommandRewrite {
    /// The command line to run instead.
    pub command: String,
    /// The variables to use instead (replaces the list, not merged): pass
    /// `command.env.clone()` to keep them.
    pub env: Vec<(String, String)>,
}

/// A hook's answer before a command runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CommandDecision {
    /// Let the command run as it is (or as an earlier hook rewrote it).
    Allow,
    /// Refuse it; the reason is shown to the client (HTTP 403) and it never runs.
    Deny(String),
    /// Run this instead; later hooks see the rewritten command.
    Rewrite(CommandRewrite),
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CommandOutcome {
    /// The exit code; `None` when the command was killed by its timeout.
    pub exit_code: Option<i64>,
    /// True when the timeout killed the command.
    pub timed_out: bool,
    /// Wall time of the command in milliseconds.
    pub duration_ms: u64,
    /// Bytes of stdout kept (at most the host's output limit).
    pub stdout_bytes: u64,
    /// Bytes of stderr kept (at most the host's output limit).
    pub stderr_bytes: u64,
}

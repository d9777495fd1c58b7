//! The plugin platform's host side: loads the Wasm components listed in the
//! plugins file (`PLUGINS_CONFIG`) at start-up and runs them as chains.
//!
//! - policies decide the runtime of a new sandbox: in order, the first
//!   `select` or `reject` wins; if all abstain the host's SANDBOX_RUNTIME is used;
//! - hooks see every command: in order, a `deny` stops it, a `rewrite` replaces
//!   it for the hooks after and for the run; after it ran, every hook sees the
//!   outcome.
//!
//! - runtimes run sandboxes: each becomes a runtime beside `docker`, with
//!   the host capabilities its grants allow ([`capabilities`]); the adapter
//!   is `crate::runtimes::plugin`.
//!
//! A policy or hook that fails (trap, timeout, memory cap, nonsense answer)
//! follows its failure mode: `closed` denies/rejects, `open` is skipped and
//! logged. A runtime's failure fails the sandbox operation.

mod bindings;
pub mod capabilities;
pub mod config;
mod engine;
mod loaded;
mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use bindings::runtime::exports::opensandbox::plugin::driver::Guest as DriverGuest;
pub use bindings::types;
use capabilities::btrfs::BtrfsRoot;
use capabilities::process::ProcessTable;
use capabilities::RuntimeCapabilities;
use config::{FailureMode, PluginKind, PluginSpec};
use engine::PluginEngine;
pub use loaded::{driver_types, CallError, LoadedPlugin};
pub use state::PluginState;

/// Where plugins keep what outlives a call.
#[derive(Debug, Clone)]
pub struct PluginDirs {
    /// Compiled components (DATA_DIR/plugin-cache).
    pub cache: PathBuf,
    /// Runtime plugins' state folders, one per plugin (DATA_DIR/plugin-state).
    pub state: PathBuf,
    /// Ledgers of runtime plugins' processes (DATA_DIR/plugin-processes).
    pub process_ledgers: PathBuf,
    /// This host's subvolumes of runtime plugins, one folder per plugin
    /// (DOCKER_BTRFS_PATH/opensandbox/hosts/<host id>/runtimes).
    pub btrfs_own: PathBuf,
    /// The machine's shared base images of runtime plugins, under
    /// `<plugin>/images` (DOCKER_BTRFS_PATH/runtimes).
    pub btrfs_shared: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("PLUGINS_CONFIG={path}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },
    #[error("plugin {plugin:?}: cannot read {file}: {reason}")]
    File {
        plugin: String,
        file: PathBuf,
        reason: String,
    },
    #[error(
        "plugin {plugin:?}: sha256 of {file} is {actual}, but the plugins file pins {expected}"
    )]
    Pin {
        plugin: String,
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("plugin {plugin:?}: not a valid component: {reason}")]
    Compile { plugin: String, reason: String },
    #[error("plugin {plugin:?}: does not implement world {world}: {reason}")]
    Link {
        plugin: String,
        world: &'static str,
        reason: String,
    },
    #[error("plugin {plugin:?}: grant refused: {reason}")]
    Grant { plugin: String, reason: String },
    #[error("plugin {plugin:?}: rejected its configuration: {reason}")]
    InvalidConfig { plugin: String, reason: String },
    #[error("plugin {plugin:?}: failed while checking its configuration: {reason}")]
    ValidateFailed { plugin: String, reason: String },
    #[error("plugin engine: {0}")]
    Engine(String),
}

/// Who calls, as plugins see it.
#[derive(Debug, Clone)]
pub struct CallerInfo {
    pub key_id: String,
    pub admin: bool,
}

/// The outcome of the policy chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeChoice {
    Selected {
        runtime: String,
        plugin: String,
    },
    /// Every policy abstained (or there is none): use SANDBOX_RUNTIME.
    Fallback,
    Rejected {
        plugin: String,
        reason: String,
    },
}

/// The outcome of the before-command hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandVerdict {
    /// Run `command` (after any rewrites, named in `rewritten_by`).
    Allowed {
        command: String,
        env: BTreeMap<String, String>,
        rewritten_by: Vec<String>,
    },
    Denied {
        plugin: String,
        reason: String,
    },
}

/// Every loaded plugin, in the order they run.
#[derive(Default)]
pub struct PluginChain {
    policies: Vec<LoadedPlugin>,
    hooks: Vec<LoadedPlugin>,
    runtimes: Vec<Arc<LoadedPlugin>>,
}

impl PluginChain {
    /// No plugins: every policy decision falls back, every command is allowed.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads, compiles (or takes from the cache), links and validates every
    /// plugin of the file; any failure names the plugin and stops start-up.
    /// Runtime plugins need `handle` (their processes are reaped on it).
    pub fn load(
        config_path: &Path,
        dirs: &PluginDirs,
        handle: &tokio::runtime::Handle,
    ) -> Result<Self, PluginError> {
        let specs = config::load(config_path)?;
        let max_memory = specs
            .iter()
            .map(|s| s.memory_limit_bytes)
            .max()
            .unwrap_or(0);
        let engine = PluginEngine::new(dirs.cache.clone(), max_memory.max(1024 * 1024))?;
        let mut chain = Self::default();
        for spec in &specs {
            let wasm = std::fs::read(&spec.file).map_err(|e| PluginError::File {
                plugin: spec.name.clone(),
                file: spec.file.clone(),
                reason: e.to_string(),
            })?;
            if let Some(expected) = &spec.sha256 {
                let actual = hex::encode(Sha256::digest(&wasm));
                if &actual != expected {
                    return Err(PluginError::Pin {
                        plugin: spec.name.clone(),
                        file: spec.file.clone(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            let capabilities = match spec.kind {
                PluginKind::Runtime => Some(Arc::new(runtime_capabilities(spec, dirs, handle)?)),
                _ => None,
            };
            let plugin = LoadedPlugin::load(&engine, spec, &wasm, capabilities)?;
            match plugin.validate_config() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return Err(PluginError::InvalidConfig {
                        plugin: spec.name.clone(),
                        reason,
                    })
                }
                Err(e) => {
                    return Err(PluginError::ValidateFailed {
                        plugin: spec.name.clone(),
                        reason: e.0,
                    })
                }
            }
            info!(plugin = %spec.name, kind = ?spec.kind, order = spec.order, pooling = engine.pooling, "plugin loaded");
            match spec.kind {
                PluginKind::Policy => chain.policies.push(plugin),
                PluginKind::Hook => chain.hooks.push(plugin),
                PluginKind::Runtime => chain.runtimes.push(Arc::new(plugin)),
            }
        }
        Ok(chain)
    }

    /// No policies and no hooks (runtimes do not take part in decisions).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.hooks.is_empty()
    }

    /// The runtime plugins, in load order.
    pub fn runtimes(&self) -> &[Arc<LoadedPlugin>] {
        &self.runtimes
    }

    pub fn has_hooks(&self) -> bool {
        !self.hooks.is_empty()
    }

    /// Runs the policy chain for one creation.
    pub fn select_runtime(
        &self,
        request: &types::CreateRequest,
        caller: &CallerInfo,
        candidates: &[types::RuntimeCandidate],
    ) -> RuntimeChoice {
        let caller = wit_caller(caller);
        for policy in &self.policies {
            let failure = match policy.select_runtime(request, &caller, candidates) {
                Ok(types::RuntimeDecision::Abstain) => continue,
                Ok(types::RuntimeDecision::Reject(reason)) => {
                    return RuntimeChoice::Rejected {
                        plugin: policy.name.clone(),
                        reason,
                    }
                }
                Ok(types::RuntimeDecision::Select(runtime)) => {
                    if candidates.iter().any(|c| c.name == runtime) {
                        return RuntimeChoice::Selected {
                            runtime,
                            plugin: policy.name.clone(),
                        };
                    }
                    format!("selected {runtime:?}, which is not a candidate")
                }
                Err(e) => e.0,
            };
            match policy.failure {
                FailureMode::Closed => {
                    warn!(plugin = %policy.name, error = %failure, "policy failed; rejecting (failure = closed)");
                    return RuntimeChoice::Rejected {
                        plugin: policy.name.clone(),
                        reason: format!("policy plugin {:?} failed: {failure}", policy.name),
                    };
                }
                FailureMode::Open => {
                    warn!(plugin = %policy.name, error = %failure, "policy failed; skipped (failure = open)")
                }
            }
        }
        RuntimeChoice::Fallback
    }

    /// Runs the before-command hooks.
    pub fn before_command(&self, command: &types::Command, caller: &CallerInfo) -> CommandVerdict {
        let caller = wit_caller(caller);
        let mut current = command.clone();
        let mut rewritten_by = Vec::new();
        for hook in &self.hooks {
            let failure = match hook.before_command(&current, &caller) {
                Ok(types::CommandDecision::Allow) => continue,
                Ok(types::CommandDecision::Deny(reason)) => {
                    return CommandVerdict::Denied {
                        plugin: hook.name.clone(),
                        reason,
                    }
                }
                Ok(types::CommandDecision::Rewrite(rewrite)) => {
                    if rewrite.command.trim().is_empty() || rewrite.command.contains('\0') {
                        "rewrote the command to an empty or NUL-containing one".to_string()
                    } else {
                        info!(plugin = %hook.name, from = %current.command, to = %rewrite.command, "command rewritten by hook");
                        current.command = rewrite.command;
                        current.env = rewrite.env;
                        rewritten_by.push(hook.name.clone());
                        continue;
                    }
                }
                Err(e) => e.0,
            };
            match hook.failure {
                FailureMode::Closed => {
                    warn!(plugin = %hook.name, error = %failure, "hook failed; denying (failure = closed)");
                    return CommandVerdict::Denied {
                        plugin: hook.name.clone(),
                        reason: format!("hook plugin {:?} failed: {failure}", hook.name),
                    };
                }
                FailureMode::Open => {
                    warn!(plugin = %hook.name, error = %failure, "hook failed; skipped (failure = open)")
                }
            }
        }
        CommandVerdict::Allowed {
            command: current.command,
            env: current.env.into_iter().collect(),
            rewritten_by,
        }
    }

    /// Tells every hook how a command ended; failures are only logged.
    pub fn after_command(
        &self,
        command: &types::Command,
        caller: &CallerInfo,
        outcome: &types::CommandOutcome,
    ) {
        let caller = wit_caller(caller);
        for hook in &self.hooks {
            if let Err(e) = hook.after_command(command, &caller, outcome) {
                warn!(plugin = %hook.name, error = %e, "after-command hook failed");
            }
        }
    }
}

/// Opens what a runtime plugin was granted: its Btrfs root, its process
/// table (adopting processes of an earlier run), its state folder.
fn runtime_capabilities(
    spec: &PluginSpec,
    dirs: &PluginDirs,
    handle: &tokio::runtime::Handle,
) -> Result<RuntimeCapabilities, PluginError> {
    let grant_err = |reason: String| PluginError::Grant {
        plugin: spec.name.clone(),
        reason,
    };
    let btrfs = if spec.grants.btrfs {
        Some(
            BtrfsRoot::open(
                dirs.btrfs_own.join(&spec.name),
                dirs.btrfs_shared.join(&spec.name),
                spec.grants.spare_snapshots,
            )
            .map_err(|e| {
                grant_err(format!(
                    "btrfs: its folders under DOCKER_BTRFS_PATH are unusable: {e}"
                ))
            })?,
        )
    } else {
        None
    };
    let processes = if spec.grants.process.is_empty() {
        None
    } else {
        Some(
            ProcessTable::open(
                spec.name.as_str().into(),
                spec.grants.process.clone(),
                spec.grants.max_processes,
                spec.grants.output_limit_bytes,
                dirs.process_ledgers.join(&spec.name),
                handle.clone(),
            )
            .map_err(|e| grant_err(format!("process: {e}")))?,
        )
    };
    let state_dir = if spec.grants.state {
        let dir = dirs.state.join(&spec.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| grant_err(format!("state {}: {e}", dir.display())))?;
        Some(dir)
    } else {
        None
    };
    Ok(RuntimeCapabilities {
        btrfs,
        processes,
        state_dir,
    })
}

fn wit_caller(caller: &CallerInfo) -> types::Caller {
    types::Caller {
        key_id: caller.key_id.clone(),
        admin: caller.admin,
    }
}

/// Shared handle used by the sandbox service.
pub type SharedPlugins = Arc<PluginChain>;

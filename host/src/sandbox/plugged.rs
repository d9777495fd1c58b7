//! Where sandbox operations meet the plugin chains: the runtime of a new
//! sandbox comes from the policy chain, every command passes the hook chain
//! before it runs, and the hooks hear how it ended.
//!
//! Plugin calls run on tokio's blocking pool: they are CPU work bounded by
//! their deadlines, and WASI's synchronous host calls (a plugin writing to
//! stderr, say) block on the runtime, which a runtime worker may not do.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::{CreateSandbox, Result, SandboxError, Sandboxes};
use crate::plugins::{types, CallerInfo, CommandVerdict, RuntimeChoice};
use crate::runtimes::{ExecOutcome, ExecRequest};
use crate::store::{ApiKey, Sandbox};

fn caller_info(caller: &ApiKey) -> CallerInfo {
    CallerInfo {
        key_id: caller.id.to_string(),
        admin: caller.admin,
    }
}

impl Sandboxes {
    /// Asks the policy chain; falls back to the requested runtime or the
    /// host's default. Returns the runtime's name; only runtimes this host
    /// has are ever chosen.
    pub(super) async fn choose_runtime(
        &self,
        caller: &ApiKey,
        request: &CreateSandbox,
        image: &str,
    ) -> Result<String> {
        let choice = if self.plugins.is_empty() {
            RuntimeChoice::Fallback
        } else {
            let load = self.store.count_by_runtime().await?;
            let mut candidates = Vec::new();
            for runtime in self.runtimes.iter() {
                candidates.push(types::RuntimeCandidate {
                    name: runtime.name().to_string(),
                    healthy: runtime.healthy().await,
                    sandboxes: load.get(runtime.name()).copied().unwrap_or(0),
                });
            }
            let wit_request = types::CreateRequest {
                name: request.name.clone(),
                image: image.to_string(),
                labels: request.labels.clone().into_iter().collect(),
                requested_runtime: request.runtime.clone(),
                is_fork: request.from.is_some(),
            };
            let plugins = Arc::clone(&self.plugins);
            let caller = caller_info(caller);
            tokio::task::spawn_blocking(move || {
                plugins.select_runtime(&wit_request, &caller, &candidates)
            })
            .await
            .map_err(|e| SandboxError::Plugin(format!("policy chain panicked: {e}")))?
        };
        match choice {
            RuntimeChoice::Rejected { plugin, reason } => {
                Err(SandboxError::RejectedByPolicy { plugin, reason })
            }
            RuntimeChoice::Selected { runtime, plugin } => {
                info!(%plugin, %runtime, "runtime chosen by policy");
                Ok(runtime)
            }
            RuntimeChoice::Fallback => match &request.runtime {
                Some(runtime) => Ok(self.runtime_named(runtime)?.name().to_string()),
                None => Ok(self.runtimes.default_runtime().name().to_string()),
            },
        }
    }

    /// Passes a command through the before-command hooks, applying rewrites
    /// to `exec`. Returns the command as it will run, for the after hooks
    /// (None when there are no hooks).
    pub(super) async fn vet_command(
        &self,
        caller: &ApiKey,
        sandbox: &Sandbox,
        exec: &mut ExecRequest,
    ) -> Result<Option<types::Command>> {
        if !self.plugins.has_hooks() {
            return Ok(None);
        }
        let mut command = types::Command {
            sandbox: sandbox.name.clone(),
            sandbox_id: sandbox.id.to_string(),
            command: exec.command.clone(),
            env: exec.env.clone().into_iter().collect(),
            cwd: exec.cwd.clone(),
            timeout_ms: u64::try_from(exec.timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let plugins = Arc::clone(&self.plugins);
        let (probe, info) = (command.clone(), caller_info(caller));
        let verdict = tokio::task::spawn_blocking(move || plugins.before_command(&probe, &info))
            .await
            .map_err(|e| SandboxError::Plugin(format!("hook chain panicked: {e}")))?;
        match verdict {
            CommandVerdict::Denied { plugin, reason } => {
                info!(%plugin, %reason, "command denied by hook");
                Err(SandboxError::DeniedByHook { plugin, reason })
            }
            CommandVerdict::Allowed {
                command: line,
                env,
                rewritten_by,
            } => {
                if !rewritten_by.is_empty() {
                    crate::names::validate_env(&env)?;
                    info!(from = %exec.command, to = %line, by = ?rewritten_by, "running the rewritten command");
                    exec.command = line.clone();
                    exec.env = env.clone();
                    command.command = line;
                    command.env = env.into_iter().collect();
                }
                Ok(Some(command))
            }
        }
    }

    /// Hands the outcome to the after-command hooks off the request path.
    pub(super) fn report_outcome(
        &self,
        caller: &ApiKey,
        command: types::Command,
        outcome: &ExecOutcome,
        duration: Duration,
    ) {
        (self.outcome_reporter(caller, command))(HookOutcome {
            exit_code: outcome.exit_code,
            timed_out: outcome.timed_out,
            duration,
            stdout_bytes: outcome.stdout.len() as u64,
            stderr_bytes: outcome.stderr.len() as u64,
        });
    }

    /// A one-shot reporter for a command whose end comes later (a stream).
    pub(super) fn outcome_reporter(
        &self,
        caller: &ApiKey,
        command: types::Command,
    ) -> impl FnOnce(HookOutcome) + Send + 'static {
        let plugins = Arc::clone(&self.plugins);
        let caller = caller_info(caller);
        move |seen: HookOutcome| {
            let outcome = types::CommandOutcome {
                exit_code: seen.exit_code,
                timed_out: seen.timed_out,
                duration_ms: u64::try_from(seen.duration.as_millis()).unwrap_or(u64::MAX),
                stdout_bytes: seen.stdout_bytes,
                stderr_bytes: seen.stderr_bytes,
            };
            tokio::task::spawn_blocking(move || plugins.after_command(&command, &caller, &outcome));
        }
    }
}

/// How a command ended, for the after-command hooks.
pub(super) struct HookOutcome {
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub duration: Duration,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

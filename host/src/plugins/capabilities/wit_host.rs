//! The runtime world's imports (`btrfs`, `process`, `runtime-types`) as
//! implemented for a plugin call's store: WIT types in, checks and the
//! capability types, WIT types out. Every call first checks the grant.

use std::time::{Duration, Instant};

use super::cgroups::Limits;
use super::process::{Signal, SpawnOptions, State};
use super::userns::IdRange;
use super::{CapabilityError, RuntimeCallContext};
use crate::plugins::bindings::runtime::opensandbox::plugin::{
    btrfs as wit_btrfs, process as wit_process, runtime_types,
};
use crate::plugins::state::PluginState;

type WitResult<T> = Result<T, runtime_types::CapabilityError>;

impl From<CapabilityError> for runtime_types::CapabilityError {
    fn from(err: CapabilityError) -> Self {
        use runtime_types::CapabilityError as Wit;
        match err {
            CapabilityError::NotGranted(m) => Wit::NotGranted(m),
            CapabilityError::Invalid(m) => Wit::Invalid(m),
            CapabilityError::NotFound(m) => Wit::NotFound(m),
            CapabilityError::Exists(m) => Wit::Exists(m),
            CapabilityError::Failed(m) => Wit::Failed(m),
        }
    }
}

impl PluginState {
    /// Runs one capability call, adding its duration to the call's host
    /// time (which the plugin's timeout does not count).
    fn with_call<T>(
        &mut self,
        f: impl FnOnce(&mut RuntimeCallContext) -> Result<T, CapabilityError>,
    ) -> WitResult<T> {
        let call = self
            .runtime
            .as_mut()
            .ok_or_else(|| CapabilityError::NotGranted("only runtime plugins".to_string()))?;
        let started = Instant::now();
        let result = f(call);
        call.host_time += started.elapsed();
        Ok(result?)
    }
}

impl runtime_types::Host for PluginState {}

impl wit_btrfs::Host for PluginState {
    fn host_path(&mut self, name: String) -> WitResult<String> {
        self.with_call(|call| {
            let path = call.caps.btrfs()?.host_path(&name)?;
            Ok(path.to_string_lossy().into_owned())
        })
    }

    fn exists(&mut self, name: String) -> WitResult<bool> {
        self.with_call(|call| call.caps.btrfs()?.exists(&name))
    }

    fn create_subvolume(&mut self, name: String) -> WitResult<()> {
        self.with_call(|call| {
            call.caps.btrfs()?.create(&name)?;
            call.journal.subvolumes.push(name);
            Ok(())
        })
    }

    fn snapshot(&mut self, source: String, target: String, read_only: bool) -> WitResult<()> {
        self.with_call(|call| {
            let btrfs = call.caps.btrfs()?;
            btrfs.snapshot(&source, &target, read_only)?;
            if !read_only && btrfs.is_shared_image(&source) {
                let image = btrfs.host_path(&source)?;
                call.journal.image_copies.push((target.clone(), image));
            }
            call.journal.subvolumes.push(target);
            Ok(())
        })
    }

    fn delete_subvolume(&mut self, name: String) -> WitResult<()> {
        self.with_call(|call| {
            call.caps.btrfs()?.delete(&name)?;
            // Whatever is made under that name next is another subvolume.
            call.journal.image_copies.retain(|(copy, _)| copy != &name);
            Ok(())
        })
    }

    fn list_subvolumes(&mut self) -> WitResult<Vec<String>> {
        self.with_call(|call| call.caps.btrfs()?.list())
    }
}

fn wit_state(state: State) -> wit_process::ProcessState {
    match state {
        State::Running => wit_process::ProcessState::Running,
        State::Exited(code) => wit_process::ProcessState::Exited(code),
        State::Signaled(signal) => wit_process::ProcessState::Signaled(signal),
    }
}

impl wit_process::Host for PluginState {
    fn spawn(
        &mut self,
        program: String,
        args: Vec<String>,
        options: wit_process::SpawnOptions,
    ) -> WitResult<String> {
        let options = SpawnOptions {
            env: options.env,
            capture_output: options.capture_output,
            limits: options.limits.map(|l| Limits {
                memory_bytes: l.memory_bytes,
                cpu_millicores: l.cpu_millicores,
                max_processes: l.max_processes,
                best_effort: l.best_effort,
            }),
            user_namespace: options.user_namespace.map(|ranges| {
                ranges
                    .into_iter()
                    .map(|r| IdRange {
                        inside: r.inside,
                        outside: r.outside,
                        count: r.count,
                    })
                    .collect()
            }),
        };
        self.with_call(|call| {
            let id = call.caps.processes()?.spawn(&program, &args, &options)?;
            call.journal.processes.push(id.clone());
            Ok(id)
        })
    }

    fn state(&mut self, id: String) -> WitResult<wit_process::ProcessState> {
        self.with_call(|call| Ok(wit_state(call.caps.processes()?.state(&id)?)))
    }

    fn wait(&mut self, id: String, timeout_ms: u32) -> WitResult<wit_process::ProcessState> {
        self.with_call(|call| {
            let wait = Duration::from_millis(u64::from(timeout_ms)).min(call.max_wait);
            let state = call.caps.processes()?.wait(&id, Instant::now() + wait)?;
            Ok(wit_state(state))
        })
    }

    fn kill(&mut self, id: String, signal: wit_process::Signal, whole_tree: bool) -> WitResult<()> {
        let signal = match signal {
            wit_process::Signal::Term => Signal::Term,
            wit_process::Signal::Kill => Signal::Kill,
            wit_process::Signal::Interrupt => Signal::Interrupt,
            wit_process::Signal::Hangup => Signal::Hangup,
        };
        self.with_call(|call| call.caps.processes()?.kill(&id, signal, whole_tree))
    }

    fn output(&mut self, id: String) -> WitResult<wit_process::CapturedOutput> {
        self.with_call(|call| {
            let captured = call.caps.processes()?.output(&id)?;
            Ok(wit_process::CapturedOutput {
                stdout: captured.stdout,
                stderr: captured.stderr,
                truncated: captured.truncated,
            })
        })
    }

    fn release(&mut self, id: String) -> WitResult<()> {
        self.with_call(|call| call.caps.processes()?.release(&id))
    }

    fn list_processes(&mut self) -> Vec<String> {
        self.with_call(|call| Ok(call.caps.processes()?.list()))
            .unwrap_or_default()
    }
}

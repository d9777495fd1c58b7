//! One loaded plugin: its pre-instantiated component and the calls into it.
//! Every call gets a fresh store (and so a fresh instance) with the plugin's
//! memory cap and an epoch deadline, so a plugin that loops, traps or grows
//! without bound costs that one call and nothing else.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::Store;

use super::bindings::{hook, policy, runtime, types};
use super::capabilities::{CallJournal, RuntimeCapabilities};
use super::config::{FailureMode, PluginKind, PluginSpec};
use super::engine::PluginEngine;
use super::state::{PluginIdentity, PluginState};
use super::PluginError;

enum Pre {
    Policy(policy::PolicyPluginPre<PluginState>),
    Hook(hook::HookPluginPre<PluginState>),
    Runtime(runtime::RuntimePluginPre<PluginState>),
}

/// The driver's types, as the runtime adapter uses them.
pub use runtime::opensandbox::plugin::runtime_types as driver_types;

pub struct LoadedPlugin {
    pub name: String,
    pub failure: FailureMode,
    identity: PluginIdentity,
    timeout_ticks: u64,
    pre: Pre,
}

/// Why one call failed; the chain applies the plugin's failure mode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallError(pub String);

impl LoadedPlugin {
    pub fn load(
        engine: &PluginEngine,
        spec: &PluginSpec,
        wasm: &[u8],
        capabilities: Option<Arc<RuntimeCapabilities>>,
    ) -> Result<Self, PluginError> {
        let component = engine.component(&spec.name, wasm)?;
        let mut linker: Linker<PluginState> = Linker::new(&engine.engine);
        let link_err = |e: wasmtime::Error| PluginError::Link {
            plugin: spec.name.clone(),
            world: spec.kind.world(),
            reason: format!("{e:#}"),
        };
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link_err)?;
        let pre = match spec.kind {
            PluginKind::Policy => {
                policy::PolicyPlugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
                    .map_err(link_err)?;
                let instance_pre = linker.instantiate_pre(&component).map_err(link_err)?;
                Pre::Policy(policy::PolicyPluginPre::new(instance_pre).map_err(link_err)?)
            }
            PluginKind::Hook => {
                hook::HookPlugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
                    .map_err(link_err)?;
                let instance_pre = linker.instantiate_pre(&component).map_err(link_err)?;
                Pre::Hook(hook::HookPluginPre::new(instance_pre).map_err(link_err)?)
            }
            PluginKind::Runtime => {
                runtime::RuntimePlugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
                    .map_err(link_err)?;
                let instance_pre = linker.instantiate_pre(&component).map_err(link_err)?;
                Pre::Runtime(runtime::RuntimePluginPre::new(instance_pre).map_err(link_err)?)
            }
        };
        Ok(Self {
            name: spec.name.clone(),
            failure: spec.failure,
            identity: PluginIdentity::new(spec, capabilities),
            timeout_ticks: super::engine::ticks(Duration::from_millis(spec.timeout_ms)),
            pre,
        })
    }

    fn store(&self) -> Result<Store<PluginState>, CallError> {
        let engine = match &self.pre {
            Pre::Policy(pre) => pre.engine(),
            Pre::Hook(pre) => pre.engine(),
            Pre::Runtime(pre) => pre.engine(),
        };
        let state = PluginState::new(&self.identity).map_err(|e| CallError(e.to_string()))?;
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limits);
        // +1: the tick in progress may be almost over.
        store.set_epoch_deadline(self.timeout_ticks + 1);
        if self.identity.runtime.is_some() {
            // A runtime's timeout bounds its own computing, not the host's
            // work it asked for (a Btrfs commit under load, a process that
            // takes a while to die): at the deadline, the time spent in
            // capability calls is given back, until the plugin has used its
            // own share.
            let timeout = self.identity.timeout;
            store.epoch_deadline_callback(move |store| {
                let used = store
                    .data()
                    .runtime_call()
                    .map_or(timeout, |call| call.plugin_time());
                match timeout.checked_sub(used) {
                    Some(left) if !left.is_zero() => Ok(wasmtime::UpdateDeadline::Continue(
                        super::engine::ticks(left),
                    )),
                    _ => Err(wasmtime::Trap::Interrupt.into()),
                }
            });
        } else {
            store.epoch_deadline_trap();
        }
        Ok(store)
    }

    /// Instantiates a policy in a fresh store and runs `call` on it.
    fn with_policy<T>(
        &self,
        call: impl FnOnce(&mut Store<PluginState>, &policy::PolicyPlugin) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let Pre::Policy(pre) = &self.pre else {
            return Err(CallError("not a policy".into()));
        };
        let mut store = self.store()?;
        let plugin = pre.instantiate(&mut store).map_err(trap)?;
        call(&mut store, &plugin).map_err(trap)
    }

    /// Instantiates a hook in a fresh store and runs `call` on it.
    fn with_hook<T>(
        &self,
        call: impl FnOnce(&mut Store<PluginState>, &hook::HookPlugin) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let Pre::Hook(pre) = &self.pre else {
            return Err(CallError("not a hook".into()));
        };
        let mut store = self.store()?;
        let plugin = pre.instantiate(&mut store).map_err(trap)?;
        call(&mut store, &plugin).map_err(trap)
    }

    /// Instantiates a runtime in a fresh store and runs `call` on its
    /// driver; also returns what the call made (subvolumes, processes),
    /// whether it succeeded or not.
    pub fn with_driver<T>(
        &self,
        call: impl FnOnce(
            &mut Store<PluginState>,
            &runtime::exports::opensandbox::plugin::driver::Guest,
        ) -> wasmtime::Result<T>,
    ) -> (Result<T, CallError>, CallJournal) {
        let Pre::Runtime(pre) = &self.pre else {
            return (
                Err(CallError("not a runtime".into())),
                CallJournal::default(),
            );
        };
        let began = std::time::Instant::now();
        let mut store = match self.store() {
            Ok(store) => store,
            Err(e) => return (Err(e), CallJournal::default()),
        };
        let result = pre.instantiate(&mut store).and_then(|plugin| {
            let ready = began.elapsed();
            let answer = call(&mut store, plugin.opensandbox_plugin_driver());
            let data = store.data();
            let host = data
                .runtime
                .as_ref()
                .map(|c| c.host_time)
                .unwrap_or_default();
            // Where a driver call's time goes: making its instance, the
            // plugin's own code, the host's capabilities.
            tracing::debug!(
                plugin = %self.name,
                instantiate_ms = ready.as_secs_f64() * 1000.0,
                total_ms = began.elapsed().as_secs_f64() * 1000.0,
                capabilities_ms = host.as_secs_f64() * 1000.0,
                "driver call"
            );
            answer
        });
        let result = result.map_err(trap);
        let journal = store.data_mut().take_journal();
        (result, journal)
    }

    /// The capabilities of a runtime plugin (None for other kinds).
    pub fn capabilities(&self) -> Option<&Arc<RuntimeCapabilities>> {
        self.identity.runtime.as_ref()
    }

    /// The plugin's own check of its configuration, run once at start-up.
    pub fn validate_config(&self) -> Result<Result<(), String>, CallError> {
        match &self.pre {
            Pre::Policy(_) => self.with_policy(|store, plugin| {
                plugin
                    .opensandbox_plugin_policy()
                    .call_validate_config(store)
            }),
            Pre::Hook(_) => self.with_hook(|store, plugin| {
                plugin.opensandbox_plugin_hook().call_validate_config(store)
            }),
            Pre::Runtime(_) => {
                self.with_driver(|store, driver| driver.call_validate_config(store))
                    .0
            }
        }
    }

    pub fn select_runtime(
        &self,
        request: &types::CreateRequest,
        caller: &types::Caller,
        candidates: &[types::RuntimeCandidate],
    ) -> Result<types::RuntimeDecision, CallError> {
        self.with_policy(|store, plugin| {
            plugin
                .opensandbox_plugin_policy()
                .call_select_runtime(store, request, caller, candidates)
        })
    }

    pub fn before_command(
        &self,
        command: &types::Command,
        caller: &types::Caller,
    ) -> Result<types::CommandDecision, CallError> {
        self.with_hook(|store, plugin| {
            plugin
                .opensandbox_plugin_hook()
                .call_before_command(store, command, caller)
        })
    }

    pub fn after_command(
        &self,
        command: &types::Command,
        caller: &types::Caller,
        outcome: &types::CommandOutcome,
    ) -> Result<(), CallError> {
        self.with_hook(|store, plugin| {
            plugin
                .opensandbox_plugin_hook()
                .call_after_command(store, command, caller, *outcome)
        })
    }
}

/// Names the usual traps plainly: a timeout or the memory cap, else the trap.
fn trap(err: wasmtime::Error) -> CallError {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => CallError("timed out".into()),
        Some(other) => CallError(format!("trapped: {other}")),
        // Clients see one line; the wasm backtrace that follows stays out.
        None => CallError(
            err.root_cause()
                .to_string()
                .lines()
                .next()
                .unwrap_or("failed")
                .to_string(),
        ),
    }
}

//! # OpenSandbox plugin SDK
//!
//! Everything needed to write an OpenSandbox plugin in Rust: a WebAssembly component that the
//! host loads at start-up and calls for every decision of its kind. Three kinds exist, one per
//! world of the WIT package `opensandbox:plugin@0.1.1` (bundled with this crate, see
//! `wit/plugin/types.wit` in the repository):
//!
//! | kind | trait | export macro | called |
//! |---|---|---|---|
//! | runtime policy | [`Policy`] | [`export_policy!`] | on every sandbox creation: choose its runtime, abstain or reject |
//! | command hook | [`Hook`] | [`export_hook!`] | before every command (allow, deny, rewrite) and after it (observe) |
//! | custom runtime | [`Driver`] | [`export_runtime!`] | to create, start, stop, inspect and destroy the sandboxes of the runtime it is named as |
//!
//! A plugin is a `cdylib` crate that implements one trait on a unit struct and exports it with
//! the matching macro: one kind per plugin. Policies and hooks have a default for every
//! function, so a plugin only writes what it decides. The plugin reads its own settings with
//! [`config`] (the `config` table of its entry in the plugins file, as strings) and writes to
//! the host's log with [`log`]. It gets nothing else: no files, no environment, no network, no
//! clock it should rely on; stdout and stderr go nowhere. Each call runs in a fresh instance,
//! so a plugin keeps no state between calls, and a call that runs past the host's time or
//! memory limit is trapped (the host then treats the plugin as failed for that call).
//!
//! A runtime also gets, as far as its entry's grants allow, the host capabilities of its
//! world: [`btrfs`] (subvolumes under its own Btrfs root), [`process`] (the host programs the
//! grant lists) and [`state`] (its own folder, to remember instances between calls). Each
//! fails with a [`CapabilityError`] when the grant is missing or the host refuses.
//!
//! The crate has no features and no other dependency to add; `wit-bindgen` is an internal
//! detail and none of its types appears in this API.
//!
//! ## Example: a policy
//!
//! Sends sandboxes whose image starts with `gpu/` to the runtime named by the config key
//! `gpu_runtime`, and abstains otherwise (the next policy, or the host's default, decides).
//!
//! ```
//! use opensandbox_plugin_sdk::{
//!     config, export_policy, log, Caller, CreateRequest, Policy, RuntimeCandidate,
//!     RuntimeDecision,
//! };
//!
//! struct GpuPolicy;
//!
//! impl Policy for GpuPolicy {
//!     fn validate_config() -> Result<(), String> {
//!         match config::get("gpu_runtime") {
//!             Some(runtime) if !runtime.is_empty() => Ok(()),
//!             _ => Err("gpu_runtime: required, the name of a runtime".to_string()),
//!         }
//!     }
//!
//!     fn select_runtime(
//!         request: &CreateRequest,
//!         _caller: &Caller,
//!         candidates: &[RuntimeCandidate],
//!     ) -> RuntimeDecision {
//!         if !request.image.starts_with("gpu/") {
//!             return RuntimeDecision::Abstain;
//!         }
//!         let wanted = config::get("gpu_runtime").unwrap_or_default();
//!         match candidates.iter().find(|c| c.name == wanted) {
//!             Some(c) if c.healthy => RuntimeDecision::Select(c.name.clone()),
//!             _ => {
//!                 log::warn!("runtime {wanted} is not available for {}", request.name);
//!                 RuntimeDecision::Reject(format!("GPU runtime {wanted} is not available"))
//!             }
//!         }
//!     }
//! }
//!
//! export_policy!(GpuPolicy);
//! # fn main() {}
//! ```
//!
//! ## Example: a hook
//!
//! Refuses `rm -rf /`, adds `--quiet` to `apt-get install`, and logs every command's exit code.
//!
//! ```
//! use opensandbox_plugin_sdk::{
//!     export_hook, log, Caller, Command, CommandDecision, CommandOutcome, CommandRewrite, Hook,
//! };
//!
//! struct Tidy;
//!
//! impl Hook for Tidy {
//!     fn before_command(command: &Command, _caller: &Caller) -> CommandDecision {
//!         if command.command.trim() == "rm -rf /" {
//!             return CommandDecision::Deny("not on my watch".to_string());
//!         }
//!         if let Some(rest) = command.command.strip_prefix("apt-get install ") {
//!             return CommandDecision::Rewrite(CommandRewrite {
//!                 command: format!("apt-get install --quiet {rest}"),
//!                 env: command.env.clone(),
//!             });
//!         }
//!         CommandDecision::Allow
//!     }
//!
//!     fn after_command(command: &Command, caller: &Caller, outcome: &CommandOutcome) {
//!         log::info!(
//!             "{} ran {:?} for key {}: exit {:?}",
//!             command.sandbox,
//!             command.command,
//!             caller.key_id,
//!             outcome.exit_code
//!         );
//!     }
//! }
//!
//! export_hook!(Tidy);
//! # fn main() {}
//! ```
//!
//! ## Example: a runtime
//!
//! Runs each sandbox as a process of the host program named by the config key `launcher`
//! (granted to the plugin) on a writable snapshot of a prepared base subvolume, and remembers
//! the process in its state folder. `plugins/namespaces` in the repository is a complete one.
//!
//! ```
//! use opensandbox_plugin_sdk::process::{self, Signal, SpawnOptions};
//! use opensandbox_plugin_sdk::{
//!     btrfs, config, export_runtime, state, CapabilityError, Driver, DriverError, DriverInfo,
//!     Instance, InstanceSpec, InstanceState,
//! };
//! use std::time::Duration;
//!
//! struct Launcher;
//!
//! fn root(id: &str) -> String {
//!     format!("sandboxes/{id}")
//! }
//!
//! /// The state file of an instance holds its process id once started.
//! fn file(id: &str) -> String {
//!     format!("{id}.pid")
//! }
//!
//! fn io(e: std::io::Error) -> DriverError {
//!     DriverError::Failed(e.to_string())
//! }
//!
//! impl Driver for Launcher {
//!     fn capabilities() -> DriverInfo {
//!         DriverInfo {
//!             description: "one launcher process per sandbox".into(),
//!             ..DriverInfo::default()
//!         }
//!     }
//!
//!     fn create(spec: &InstanceSpec) -> Result<Instance, DriverError> {
//!         if !btrfs::exists("images/base")? {
//!             return Err(DriverError::ImageUnavailable("no base image".into()));
//!         }
//!         btrfs::snapshot("images/base", &root(&spec.sandbox_id), false)?;
//!         state::write(&file(&spec.sandbox_id), "").map_err(io)?;
//!         Ok(Instance { id: spec.sandbox_id.clone(), root_subvolume: root(&spec.sandbox_id) })
//!     }
//!
//!     fn start(id: &str) -> Result<(), DriverError> {
//!         let launcher = config::get("launcher").unwrap_or_default();
//!         let path = btrfs::host_path(&root(id))?;
//!         let pid = process::spawn(&launcher, &[path], &SpawnOptions::default())?;
//!         state::write(&file(id), pid).map_err(io)
//!     }
//!
//!     fn stop(id: &str) -> Result<(), DriverError> {
//!         let pid = state::read_to_string(&file(id)).map_err(io)?.unwrap_or_default();
//!         if pid.is_empty() {
//!             return Ok(());
//!         }
//!         match process::kill(&pid, Signal::Kill, true) {
//!             Ok(()) | Err(CapabilityError::NotFound(_)) => {}
//!             Err(e) => return Err(e.into()),
//!         }
//!         let _ = process::wait(&pid, Duration::from_secs(2));
//!         let _ = process::release(&pid);
//!         state::write(&file(id), "").map_err(io)
//!     }
//!
//!     fn destroy(id: &str) -> Result<(), DriverError> {
//!         Self::stop(id)?;
//!         btrfs::delete_subvolume(&root(id))?;
//!         state::remove(&file(id)).map_err(io)?;
//!         Ok(())
//!     }
//!
//!     fn inspect(id: &str) -> Result<InstanceState, DriverError> {
//!         let Some(pid) = state::read_to_string(&file(id)).map_err(io)? else {
//!             return Ok(InstanceState::Missing);
//!         };
//!         match process::state(&pid) {
//!             Ok(s) if s.is_running() => Ok(InstanceState::Running),
//!             _ => Ok(InstanceState::Stopped),
//!         }
//!     }
//! }
//!
//! export_runtime!(Launcher);
//! # fn main() {
//! #     use opensandbox_plugin_sdk::testing;
//! #     testing::add_subvolume("images/base");
//! #     testing::set_config([("launcher", "/usr/bin/launcher")]);
//! #     let spec = InstanceSpec { sandbox_id: "a1".into(), ..InstanceSpec::default() };
//! #     let instance = Launcher::create(&spec).unwrap();
//! #     assert_eq!(instance.root_subvolume, "sandboxes/a1");
//! #     assert_eq!(Launcher::inspect("a1"), Ok(InstanceState::Stopped));
//! #     Launcher::start("a1").unwrap();
//! #     assert_eq!(Launcher::inspect("a1"), Ok(InstanceState::Running));
//! #     Launcher::destroy("a1").unwrap();
//! #     assert_eq!(Launcher::inspect("a1"), Ok(InstanceState::Missing));
//! #     assert_eq!(testing::subvolumes(), vec!["images/base"]);
//! # }
//! ```
//!
//! ## Building and loading
//!
//! ```toml
//! # Cargo.toml of the plugin
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! opensandbox-plugin-sdk = { path = "../sdk" }
//! ```
//!
//! ```sh
//! rustup target add wasm32-wasip2
//! cargo build --release --target wasm32-wasip2
//! # -> target/wasm32-wasip2/release/<crate_name>.wasm, a WebAssembly component
//! ```
//!
//! The host loads it from an entry of its plugins file (the TOML file named by
//! `PLUGINS_CONFIG`), with the plugin's settings in the entry's `config` table; values reach the
//! plugin as strings, see [`config`]:
//!
//! ```toml
//! [[plugin]]
//! name = "gpu"                          # unique; shown in logs and errors
//! kind = "policy"                       # "hook" or "runtime": the macro the crate uses
//! file = "plugins/gpu_policy.wasm"      # relative to the plugins file
//! [plugin.config]
//! gpu_runtime = "kata"
//! ```
//!
//! ## Testing
//!
//! On any target but `wasm32`, [`config`] reads a per-thread table that tests fill with
//! [`testing::set_config`], and [`log`] records lines that [`testing::take_logs`] returns, so the
//! trait functions of a plugin can be unit-tested natively with `cargo test`. The runtime
//! capabilities ([`btrfs`], [`process`], [`state`]) work on per-thread fakes there, which
//! [`testing`] sets up and shows.

#![warn(missing_docs)]

pub mod btrfs;
pub mod config;
mod driver;
pub mod glob;
pub mod log;
pub mod process;
mod runtime_types;
pub mod state;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;

pub use driver::Driver;
pub use runtime_types::{
    AgentMount, CapabilityError, DriverError, DriverInfo, Instance, InstanceSpec, InstanceState,
    ManagedInstance,
};
pub use types::{
    Caller, Command, CommandDecision, CommandOutcome, CommandRewrite, CreateRequest,
    RuntimeCandidate, RuntimeDecision,
};

/// A runtime-selection policy: implement it on a unit struct and export it with
/// [`export_policy!`].
///
/// The host asks its policies in the order of the plugins file; the first that does not
/// [abstain](RuntimeDecision::Abstain) decides. If all abstain, the host's default runtime
/// (`SANDBOX_RUNTIME`) is used.
pub trait Policy {
    /// Checks the plugin's configuration, once, when the host starts. An `Err` stops the host
    /// with a message naming the plugin and this text: name the offending key in it.
    ///
    /// The default accepts any configuration.
    fn validate_config() -> Result<(), String> {
        Ok(())
    }

    /// Chooses the runtime of a new sandbox among `candidates` (every runtime the host could
    /// use, in the host's order), abstains, or rejects the creation (the reason is shown to
    /// the client, with HTTP 403). A [`Select`](RuntimeDecision::Select) must name one of the
    /// candidates.
    ///
    /// The default abstains.
    fn select_runtime(
        request: &CreateRequest,
        caller: &Caller,
        candidates: &[RuntimeCandidate],
    ) -> RuntimeDecision {
        let _ = (request, caller, candidates);
        RuntimeDecision::Abstain
    }
}

/// A command hook: implement it on a unit struct and export it with [`export_hook!`].
///
/// The host calls its hooks in the order of the plugins file: `before_command` for every
/// command about to run (a later hook sees the command as earlier hooks rewrote it; the first
/// [deny](CommandDecision::Deny) stops it), and `after_command` for every command that ran.
pub trait Hook {
    /// Checks the plugin's configuration, once, when the host starts. An `Err` stops the host
    /// with a message naming the plugin and this text: name the offending key in it.
    ///
    /// The default accepts any configuration.
    fn validate_config() -> Result<(), String> {
        Ok(())
    }

    /// Called before a command runs: let it run, refuse it (the reason is shown to the client,
    /// with HTTP 403), or run another command line or environment instead.
    ///
    /// The default allows everything.
    fn before_command(command: &Command, caller: &Caller) -> CommandDecision {
        let _ = (command, caller);
        CommandDecision::Allow
    }

    /// Called after a command ran (as it ran, after rewrites), with how it ended. It cannot
    /// change anything; it is for logging and accounting.
    ///
    /// The default does nothing.
    fn after_command(command: &Command, caller: &Caller, outcome: &CommandOutcome) {
        let _ = (command, caller, outcome);
    }
}

/// Exports a [`Policy`] implementation as this crate's plugin: `export_policy!(MyPolicy);`,
/// once, at the top level of a `cdylib` crate.
///
/// A crate exports one plugin: use one of this macro, [`export_hook!`] and
/// [`export_runtime!`], once.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        struct __opensandbox_policy_export;

        // Defined by every export macro: a second export in one crate is a compile error.
        #[doc(hidden)]
        #[allow(non_upper_case_globals, dead_code)]
        const __opensandbox_plugin_one_export_per_crate: () = ();

        impl $crate::__private::policy::exports::opensandbox::plugin::policy::Guest
            for __opensandbox_policy_export
        {
            fn validate_config() -> ::core::result::Result<(), $crate::__private::String> {
                <$ty as $crate::Policy>::validate_config()
            }

            fn select_runtime(
                request: $crate::__private::policy::exports::opensandbox::plugin::policy::CreateRequest,
                caller: $crate::__private::policy::exports::opensandbox::plugin::policy::Caller,
                candidates: $crate::__private::Vec<
                    $crate::__private::policy::exports::opensandbox::plugin::policy::RuntimeCandidate,
                >,
            ) -> $crate::__private::policy::exports::opensandbox::plugin::policy::RuntimeDecision {
                $crate::__private::select_runtime::<$ty>(request, caller, candidates)
            }
        }

        $crate::__private::policy::__export_policy_plugin!(
            __opensandbox_policy_export with_types_in $crate::__private::policy
        );
    };
}

/// Exports a [`Hook`] implementation as this crate's plugin: `export_hook!(MyHook);`, once,
/// at the top level of a `cdylib` crate.
///
/// A crate exports one plugin: use one of this macro, [`export_policy!`] and
/// [`export_runtime!`], once.
#[macro_export]
macro_rules! export_hook {
    ($ty:ty) => {
        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        struct __opensandbox_hook_export;

        // Defined by every export macro: a second export in one crate is a compile error.
        #[doc(hidden)]
        #[allow(non_upper_case_globals, dead_code)]
        const __opensandbox_plugin_one_export_per_crate: () = ();

        impl $crate::__private::hook::exports::opensandbox::plugin::hook::Guest
            for __opensandbox_hook_export
        {
            fn validate_config() -> ::core::result::Result<(), $crate::__private::String> {
                <$ty as $crate::Hook>::validate_config()
            }

            fn before_command(
                command: $crate::__private::hook::exports::opensandbox::plugin::hook::Command,
                caller: $crate::__private::hook::exports::opensandbox::plugin::hook::Caller,
            ) -> $crate::__private::hook::exports::opensandbox::plugin::hook::CommandDecision {
                $crate::__private::before_command::<$ty>(command, caller)
            }

            fn after_command(
                command: $crate::__private::hook::exports::opensandbox::plugin::hook::Command,
                caller: $crate::__private::hook::exports::opensandbox::plugin::hook::Caller,
                outcome: $crate::__private::hook::exports::opensandbox::plugin::hook::CommandOutcome,
            ) {
                $crate::__private::after_command::<$ty>(command, caller, outcome)
            }
        }

        $crate::__private::hook::__export_hook_plugin!(
            __opensandbox_hook_export with_types_in $crate::__private::hook
        );
    };
}

/// Bindings and glue used by the export macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use std::string::String;
    pub use std::vec::Vec;

    use crate::{Hook, Policy};

    /// Bindings of the `policy-plugin` world.
    #[allow(missing_docs, clippy::all)]
    pub mod policy {
        wit_bindgen::generate!({
            world: "policy-plugin",
            path: "../wit/plugin",
            pub_export_macro: true,
            export_macro_name: "__export_policy_plugin",
            default_bindings_module: "opensandbox_plugin_sdk::__private::policy",
        });
    }

    /// Bindings of the `hook-plugin` world.
    #[allow(missing_docs, clippy::all)]
    pub mod hook {
        wit_bindgen::generate!({
            world: "hook-plugin",
            path: "../wit/plugin",
            pub_export_macro: true,
            export_macro_name: "__export_hook_plugin",
            default_bindings_module: "opensandbox_plugin_sdk::__private::hook",
        });
    }

    /// Bindings of the `runtime-plugin` world.
    #[allow(missing_docs, clippy::all)]
    pub mod runtime {
        wit_bindgen::generate!({
            world: "runtime-plugin",
            path: "../wit/plugin",
            pub_export_macro: true,
            export_macro_name: "__export_runtime_plugin",
            default_bindings_module: "opensandbox_plugin_sdk::__private::runtime",
        });
    }

    pub use crate::driver::glue::*;

    use hook::opensandbox::plugin::types as ht;
    use policy::opensandbox::plugin::types as pt;

    pub fn select_runtime<T: Policy>(
        request: pt::CreateRequest,
        caller: pt::Caller,
        candidates: Vec<pt::RuntimeCandidate>,
    ) -> pt::RuntimeDecision {
        let request = crate::CreateRequest {
            name: request.name,
            image: request.image,
            labels: request.labels,
            requested_runtime: request.requested_runtime,
            is_fork: request.is_fork,
        };
        let caller = crate::Caller {
            key_id: caller.key_id,
            admin: caller.admin,
        };
        let candidates: Vec<crate::RuntimeCandidate> = candidates
            .into_iter()
            .map(|c| crate::RuntimeCandidate {
                name: c.name,
                healthy: c.healthy,
                sandboxes: c.sandboxes,
            })
            .collect();
        match T::select_runtime(&request, &caller, &candidates) {
            crate::RuntimeDecision::Select(name) => pt::RuntimeDecision::Select(name),
            crate::RuntimeDecision::Abstain => pt::RuntimeDecision::Abstain,
            crate::RuntimeDecision::Reject(reason) => pt::RuntimeDecision::Reject(reason),
        }
    }

    fn command(c: ht::Command) -> crate::Command {
        crate::Command {
            sandbox: c.sandbox,
            sandbox_id: c.sandbox_id,
            command: c.command,
            env: c.env,
            cwd: c.cwd,
            timeout_ms: c.timeout_ms,
        }
    }

    fn caller(c: ht::Caller) -> crate::Caller {
        crate::Caller {
            key_id: c.key_id,
            admin: c.admin,
        }
    }

    pub fn before_command<T: Hook>(c: ht::Command, k: ht::Caller) -> ht::CommandDecision {
        match T::before_command(&command(c), &caller(k)) {
            crate::CommandDecision::Allow => ht::CommandDecision::Allow,
            crate::CommandDecision::Deny(reason) => ht::CommandDecision::Deny(reason),
            crate::CommandDecision::Rewrite(r) => {
                ht::CommandDecision::Rewrite(ht::CommandRewrite {
                    command: r.command,
                    env: r.env,
                })
            }
        }
    }

    pub fn after_command<T: Hook>(c: ht::Command, k: ht::Caller, o: ht::CommandOutcome) {
        let outcome = crate::CommandOutcome {
            exit_code: o.exit_code,
            timed_out: o.timed_out,
            duration_ms: o.duration_ms,
            stdout_bytes: o.stdout_bytes,
            stderr_bytes: o.stderr_bytes,
        };
        T::after_command(&command(c), &caller(k), &outcome)
    }

    /// The host's imports, through one of the worlds' bindings (every world imports the same
    /// `host` and `config` interfaces; only the runtime world imports `btrfs` and `process`).
    #[cfg(target_arch = "wasm32")]
    pub(crate) mod imports {
        pub use super::policy::opensandbox::plugin::config;
        pub use super::policy::opensandbox::plugin::host;
        pub use super::runtime::opensandbox::plugin::{btrfs, process};
    }
}

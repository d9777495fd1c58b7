//! Custom runtimes: the [`Driver`] trait, its export macro `export_runtime!`, and the glue
//! between the trait and the bindings of the `runtime-plugin` world.

use crate::{DriverError, DriverInfo, Instance, InstanceSpec, InstanceState, ManagedInstance};

/// A custom runtime: implement it on a unit struct and export it with
/// [`export_runtime!`](crate::export_runtime).
///
/// The host calls it to run the sandboxes of the runtime the plugin is named as. The host does
/// the rest itself, the same way for every runtime: snapshots, restore and fork on the
/// instance's [`root_subvolume`](Instance::root_subvolume), processes and files through its
/// agent (the instance's init), hooks and policies. A driver makes the root filesystem (with
/// [`btrfs`](crate::btrfs)), starts and stops the agent in it (with
/// [`process`](crate::process)), and remembers what a later call needs (with
/// [`state`](crate::state)): every call runs in a fresh instance of the plugin.
pub trait Driver {
    /// Checks the plugin's configuration, once, when the host starts. An `Err` stops the host
    /// with a message naming the plugin and this text: name the offending key in it.
    ///
    /// The default accepts any configuration.
    fn validate_config() -> Result<(), String> {
        Ok(())
    }

    /// What the runtime offers, shown to operators and to policies.
    ///
    /// The default claims nothing: no description, no network, no resource limits.
    fn capabilities() -> DriverInfo {
        DriverInfo::default()
    }

    /// Whether the runtime can create sandboxes now; the error says why not (policies see it).
    ///
    /// The default is always healthy.
    fn health() -> Result<(), String> {
        Ok(())
    }

    /// Creates an instance (its root filesystem included) without starting it. On an error, a
    /// trap or a timeout the host removes every subvolume and process this call made.
    fn create(spec: &InstanceSpec) -> Result<Instance, DriverError>;

    /// Starts the instance's init (the agent, see [`InstanceSpec::agent`]); returns once it is
    /// started (the host then waits for the agent to answer).
    fn start(id: &str) -> Result<(), DriverError>;

    /// Stops the instance at once; every process in it is gone when this returns.
    fn stop(id: &str) -> Result<(), DriverError>;

    /// Removes the instance and its root subvolume; a missing instance is not an error.
    fn destroy(id: &str) -> Result<(), DriverError>;

    /// The instance's state, also after a host restart (recovery calls this for every
    /// sandbox).
    fn inspect(id: &str) -> Result<InstanceState, DriverError>;

    /// Every instance the runtime manages, including half-made ones, so that the host can
    /// find those it no longer knows.
    ///
    /// The default lists none (the host then finds no orphans).
    fn list_instances() -> Result<Vec<ManagedInstance>, DriverError> {
        Ok(Vec::new())
    }
}

/// Exports a [`Driver`] implementation as this crate's plugin: `export_runtime!(MyRuntime);`,
/// once, at the top level of a `cdylib` crate.
///
/// A crate exports one plugin: use one of this macro,
/// [`export_policy!`](crate::export_policy) and [`export_hook!`](crate::export_hook), once.
#[macro_export]
macro_rules! export_runtime {
    ($ty:ty) => {
        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        struct __opensandbox_runtime_export;

        // Defined by every export macro: a second export in one crate is a compile error.
        #[doc(hidden)]
        #[allow(non_upper_case_globals, dead_code)]
        const __opensandbox_plugin_one_export_per_crate: () = ();

        impl $crate::__private::runtime::exports::opensandbox::plugin::driver::Guest
            for __opensandbox_runtime_export
        {
            fn validate_config() -> ::core::result::Result<(), $crate::__private::String> {
                <$ty as $crate::Driver>::validate_config()
            }

            fn capabilities(
            ) -> $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverInfo {
                $crate::__private::driver_capabilities::<$ty>()
            }

            fn health() -> ::core::result::Result<(), $crate::__private::String> {
                <$ty as $crate::Driver>::health()
            }

            fn create(
                spec: $crate::__private::runtime::exports::opensandbox::plugin::driver::InstanceSpec,
            ) -> ::core::result::Result<
                $crate::__private::runtime::exports::opensandbox::plugin::driver::Instance,
                $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverError,
            > {
                $crate::__private::driver_create::<$ty>(spec)
            }

            fn start(
                id: $crate::__private::String,
            ) -> ::core::result::Result<
                (),
                $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverError,
            > {
                $crate::__private::driver_unit(<$ty as $crate::Driver>::start(&id))
            }

            fn stop(
                id: $crate::__private::String,
            ) -> ::core::result::Result<
                (),
                $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverError,
            > {
                $crate::__private::driver_unit(<$ty as $crate::Driver>::stop(&id))
            }

            fn destroy(
                id: $crate::__private::String,
            ) -> ::core::result::Result<
                (),
                $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverError,
            > {
                $crate::__private::driver_unit(<$ty as $crate::Driver>::destroy(&id))
            }

            fn inspect(
                id: $crate::__private::String,
            ) -> ::core::result::Result<
                $crate::__private::runtime::exports::opensandbox::plugin::driver::InstanceState,
                $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverError,
            > {
                $crate::__private::driver_inspect::<$ty>(&id)
            }

            fn list_instances() -> ::core::result::Result<
                $crate::__private::Vec<
                    $crate::__private::runtime::exports::opensandbox::plugin::driver::ManagedInstance,
                >,
                $crate::__private::runtime::exports::opensandbox::plugin::driver::DriverError,
            > {
                $crate::__private::driver_list_instances::<$ty>()
            }
        }

        $crate::__private::runtime::__export_runtime_plugin!(
            __opensandbox_runtime_export with_types_in $crate::__private::runtime
        );
    };
}

/// Conversions between the SDK's types and the `runtime-plugin` bindings, for
/// [`export_runtime!`]; not part of the API.
#[doc(hidden)]
pub mod glue {
    use super::Driver;
    use crate::__private::runtime::opensandbox::plugin::runtime_types as rt;

    fn error(e: crate::DriverError) -> rt::DriverError {
        match e {
            crate::DriverError::ImageUnavailable(m) => rt::DriverError::ImageUnavailable(m),
            crate::DriverError::NotFound(m) => rt::DriverError::NotFound(m),
            crate::DriverError::Failed(m) => rt::DriverError::Failed(m),
        }
    }

    pub fn driver_capabilities<T: Driver>() -> rt::DriverInfo {
        let info = T::capabilities();
        rt::DriverInfo {
            description: info.description,
            network: info.network,
            resource_limits: info.resource_limits,
        }
    }

    pub fn driver_create<T: Driver>(
        spec: rt::InstanceSpec,
    ) -> Result<rt::Instance, rt::DriverError> {
        let spec = crate::InstanceSpec {
            sandbox_id: spec.sandbox_id,
            hostname: spec.hostname,
            image: spec.image,
            env: spec.env,
            agent: crate::AgentMount {
                binary: spec.agent.binary,
                socket_dir: spec.agent.socket_dir,
                args: spec.agent.args,
            },
        };
        T::create(&spec)
            .map(|i| rt::Instance {
                id: i.id,
                root_subvolume: i.root_subvolume,
            })
            .map_err(error)
    }

    pub fn driver_unit(result: Result<(), crate::DriverError>) -> Result<(), rt::DriverError> {
        result.map_err(error)
    }

    pub fn driver_inspect<T: Driver>(id: &str) -> Result<rt::InstanceState, rt::DriverError> {
        T::inspect(id)
            .map(|s| match s {
                crate::InstanceState::Running => rt::InstanceState::Running,
                crate::InstanceState::Stopped => rt::InstanceState::Stopped,
                crate::InstanceState::Missing => rt::InstanceState::Missing,
            })
            .map_err(error)
    }

    pub fn driver_list_instances<T: Driver>() -> Result<Vec<rt::ManagedInstance>, rt::DriverError> {
        T::list_instances()
            .map(|list| {
                list.into_iter()
                    .map(|i| rt::ManagedInstance {
                        id: i.id,
                        sandbox_id: i.sandbox_id,
                    })
                    .collect()
            })
            .map_err(error)
    }

    /// A capability's error, from the bindings' type to the SDK's.
    #[cfg(target_arch = "wasm32")]
    pub fn capability_error(e: rt::CapabilityError) -> crate::CapabilityError {
        match e {
            rt::CapabilityError::NotGranted(m) => crate::CapabilityError::NotGranted(m),
            rt::CapabilityError::Invalid(m) => crate::CapabilityError::Invalid(m),
            rt::CapabilityError::NotFound(m) => crate::CapabilityError::NotFound(m),
            rt::CapabilityError::Exists(m) => crate::CapabilityError::Exists(m),
            rt::CapabilityError::Failed(m) => crate::CapabilityError::Failed(m),
        }
    }
}

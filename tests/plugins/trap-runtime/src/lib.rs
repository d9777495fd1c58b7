//! Test fixture: `create` makes the subvolume `sandboxes/<sandbox id>` and starts
//! `/usr/bin/sleep 1000`, then panics, so the call traps with both made: the host must remove
//! them from the call's journal. Every other call answers as if nothing exists.

use opensandbox_plugin_sdk::process::{self, SpawnOptions};
use opensandbox_plugin_sdk::{
    btrfs, export_runtime, Driver, DriverError, Instance, InstanceSpec, InstanceState,
};

struct TrapRuntime;

impl Driver for TrapRuntime {
    fn create(spec: &InstanceSpec) -> Result<Instance, DriverError> {
        btrfs::create_subvolume(&format!("sandboxes/{}", spec.sandbox_id))?;
        let pid = process::spawn("/usr/bin/sleep", &["1000"], &SpawnOptions::default())?;
        panic!("trap-runtime: deliberate panic in create, leaving process {pid} behind")
    }

    fn start(id: &str) -> Result<(), DriverError> {
        Err(DriverError::NotFound(id.to_string()))
    }

    fn stop(id: &str) -> Result<(), DriverError> {
        Err(DriverError::NotFound(id.to_string()))
    }

    fn destroy(_id: &str) -> Result<(), DriverError> {
        Ok(())
    }

    fn inspect(_id: &str) -> Result<InstanceState, DriverError> {
        Ok(InstanceState::Missing)
    }
}

export_runtime!(TrapRuntime);

//! Test fixture: `create` makes the subvolume `sandboxes/<sandbox id>` and starts
//! `/usr/bin/sleep 1000`, then never returns: the host's time limit must trap the call and
//! remove both from its journal. Every other call answers as if nothing exists.

use opensandbox_plugin_sdk::process::{self, SpawnOptions};
use opensandbox_plugin_sdk::{
    btrfs, export_runtime, Driver, DriverError, Instance, InstanceSpec, InstanceState,
};

struct LoopRuntime;

impl Driver for LoopRuntime {
    fn create(spec: &InstanceSpec) -> Result<Instance, DriverError> {
        btrfs::create_subvolume(&format!("sandboxes/{}", spec.sandbox_id))?;
        process::spawn("/usr/bin/sleep", &["1000"], &SpawnOptions::default())?;
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
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

export_runtime!(LoopRuntime);

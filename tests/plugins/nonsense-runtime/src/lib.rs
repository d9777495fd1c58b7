//! Test fixture: `create` returns an instance that makes no sense, chosen by the spec's
//! variable `NONSENSE`:
//!
//! | `NONSENSE` | returned instance |
//! |---|---|
//! | `missing-root` (the default) | the sandbox's id, root subvolume `sandboxes/<id>-missing`, which does not exist |
//! | `escape-root` | the sandbox's id, root subvolume `../../etc` |
//! | `bad-id` | id `"../x y"`, a real root subvolume `sandboxes/<id>` (made by this call) |
//! | `empty-id` | id `""`, a real root subvolume `sandboxes/<id>` (made by this call) |
//! | `slow-host` | nothing: waits 3 s for a host process (longer than its timeout in the tests), then fails saying so; the host's time must not count against the plugin's timeout |
//! | `image-root` | the sandbox's id, root subvolume `images/ubuntu_22.04`: the machine's shared, read-only base image |
//!
//! The host must refuse each and remove what the call made. Every other call answers as if
//! nothing exists.

use std::time::Duration;

use opensandbox_plugin_sdk::process::{self, SpawnOptions};
use opensandbox_plugin_sdk::{
    btrfs, export_runtime, Driver, DriverError, Instance, InstanceSpec, InstanceState,
};

struct NonsenseRuntime;

/// Waits on the host for longer than the plugin's own timeout (a `sleep 3`,
/// in waits the host bounds by that timeout), computing almost nothing: the
/// host's time is not the plugin's, so the call must not time out.
fn slow_host() -> Result<Instance, DriverError> {
    let sleep = process::spawn("/usr/bin/sleep", &["3"], &SpawnOptions::default())?;
    while process::wait(&sleep, Duration::from_secs(10))?.is_running() {}
    let _ = process::release(&sleep);
    Err(DriverError::Failed(
        "slow-host waited 3 s on the host".to_string(),
    ))
}

impl Driver for NonsenseRuntime {
    fn create(spec: &InstanceSpec) -> Result<Instance, DriverError> {
        let id = spec.sandbox_id.clone();
        let real_root = || -> Result<String, DriverError> {
            let root = format!("sandboxes/{id}");
            btrfs::create_subvolume(&root)?;
            Ok(root)
        };
        let (id, root_subvolume) = match spec.env_var("NONSENSE").unwrap_or("missing-root") {
            "missing-root" => (id.clone(), format!("sandboxes/{id}-missing")),
            "escape-root" => (id.clone(), "../../etc".to_string()),
            "bad-id" => ("../x y".to_string(), real_root()?),
            "empty-id" => (String::new(), real_root()?),
            "image-root" => (id.clone(), "images/ubuntu_22.04".to_string()),
            "slow-host" => return slow_host(),
            other => {
                return Err(DriverError::Failed(format!(
                    "NONSENSE={other:?}: want missing-root, escape-root, bad-id, empty-id, image-root or slow-host"
                )))
            }
        };
        Ok(Instance { id, root_subvolume })
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

export_runtime!(NonsenseRuntime);

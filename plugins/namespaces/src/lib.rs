//! `namespaces`: a custom runtime that runs each sandbox in Linux namespaces under bubblewrap,
//! on a writable Btrfs snapshot of a prepared root filesystem. The host does the rest as for
//! every runtime (snapshots, restore and fork of the root subvolume, commands and files
//! through the agent, hooks and policies).
//!
//! - Base root filesystems are the subvolumes `images/<slug>` under the plugin's Btrfs root
//!   (`<DOCKER_BTRFS_PATH>/runtimes/<plugin name>/`), made from Docker images by
//!   `scripts/build-rootfs.sh <image>`; see [`slug`] for the name.
//! - `create` snapshots the image's base as `sandboxes/<sandbox id>` (the instance's id is the
//!   sandbox's id) and writes the instance's record, `/state/<id>.json` (see [`record`]).
//! - `start` runs bwrap on that subvolume with the host's agent as PID 1 (see [`bwrap`]) and
//!   records the process; `stop` kills its whole tree; `destroy` also deletes the subvolume
//!   and the record. Sandboxes have no network (loopback only).
//!
//! ```toml
//! [[plugin]]
//! name = "namespaces"                   # the runtime's name for clients
//! kind = "runtime"
//! file = "target/plugins/namespaces.wasm"
//! [plugin.grants]
//! btrfs = true
//! state = true
//! process = ["/usr/bin/bwrap"]          # the same path as `bwrap` below
//! [plugin.config]                       # every key optional
//! bwrap = "/usr/bin/bwrap"
//! memory_limit_mib = 1024               # per sandbox (cgroup limits; none by default)
//! cpu_millicores = 2000
//! max_processes = 512
//! limits_best_effort = true             # skip limits the host cannot enforce (default true)
//! user_namespace = true                 # false: none (real root, as in Docker)
//! id_map = ["0:0:65536"]                # the host makes the user namespace with these
//!                                       # inside:outside:count ranges (this is the default)
//! ```
//!
//! Root in a sandbox has Docker's default capabilities in every mode (never `CAP_SYS_ADMIN`),
//! and bwrap sets no-new-privileges, so setuid programs (`sudo`) do not elevate. The root
//! filesystems keep the image's owners, so an `id_map` must map them as they are (the
//! identity, `0:0:65536`); a shifted map needs shifted files.

pub mod bwrap;
pub mod record;
pub mod settings;
pub mod slug;

use std::time::Duration;

use opensandbox_plugin_sdk::process::{self, ProcessState, Signal, SpawnOptions};
use opensandbox_plugin_sdk::{
    btrfs, export_runtime, log, CapabilityError, Driver, DriverError, DriverInfo, Instance,
    InstanceSpec, InstanceState, ManagedInstance,
};

use record::Record;

/// Where instances' root subvolumes live under the plugin's Btrfs root.
const SANDBOXES: &str = "sandboxes";
/// How long `stop` waits for a killed sandbox to be gone.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The root subvolume of instance `id`.
pub fn root_subvolume(id: &str) -> String {
    format!("{SANDBOXES}/{id}")
}

/// Whether `id` can be one of ours: a plain name segment (ids are the host's sandbox ids).
fn plausible_id(id: &str) -> bool {
    btrfs::is_valid_segment(id)
}

fn not_found(id: &str) -> DriverError {
    DriverError::NotFound(format!("no instance {id:?}"))
}

/// Checks what bwrap will be handed: the kernel and bwrap refuse NULs and `=` in names, and
/// sethostname takes at most 64 bytes.
fn check_spec(spec: &InstanceSpec) -> Result<(), DriverError> {
    if !plausible_id(&spec.sandbox_id) {
        return Err(DriverError::Failed(format!(
            "sandbox id {:?} is not a plain name",
            spec.sandbox_id
        )));
    }
    if spec.hostname.is_empty() || spec.hostname.len() > 64 || spec.hostname.contains('\0') {
        return Err(DriverError::Failed(format!(
            "hostname {:?}: want 1 to 64 bytes",
            spec.hostname
        )));
    }
    for (name, value) in &spec.env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(DriverError::Failed(format!(
                "variable {name:?} is malformed"
            )));
        }
    }
    let agent = &spec.agent;
    for path in [&agent.binary, &agent.socket_dir] {
        if !path.starts_with('/') || path.contains('\0') {
            return Err(DriverError::Failed(format!(
                "agent path {path:?} is not absolute"
            )));
        }
    }
    Ok(())
}

/// Kills a recorded bwrap process with everything under it and forgets it. A process that is
/// gone already (ended, released, unknown after a host change) is not an error.
fn end_process(pid: &str) -> Result<(), DriverError> {
    match process::kill(pid, Signal::Kill, true) {
        Ok(()) | Err(CapabilityError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match process::wait(pid, STOP_WAIT) {
        Ok(ProcessState::Running) => {
            return Err(DriverError::Failed(format!(
                "process {pid} still runs {STOP_WAIT:?} after SIGKILL"
            )))
        }
        Ok(_) | Err(CapabilityError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match process::release(pid) {
        Ok(()) | Err(CapabilityError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Why bwrap ended at once. Its stderr is not captured (see `start`), so the message says
/// how to see it.
fn early_exit(pid: &str, ended: ProcessState, root: &str) -> DriverError {
    let _ = process::release(pid);
    DriverError::Failed(format!(
        "bwrap ended at once ({ended:?}); run its command line by hand to see why \
         (plugins/README.md, namespaces), on a snapshot of {root}"
    ))
}

struct Namespaces;

impl Driver for Namespaces {
    fn validate_config() -> Result<(), String> {
        settings::load().map(|_| ())
    }

    fn capabilities() -> DriverInfo {
        DriverInfo {
            description: "Linux namespaces under bubblewrap on a Btrfs snapshot; no network"
                .to_string(),
            network: false,
            resource_limits: settings::load().is_ok_and(|s| s.limits.is_some()),
        }
    }

    fn health() -> Result<(), String> {
        settings::load()?;
        btrfs::list_subvolumes().map_err(|e| format!("btrfs: {e}"))?;
        Ok(())
    }

    fn create(spec: &InstanceSpec) -> Result<Instance, DriverError> {
        check_spec(spec)?;
        let image = slug::image_subvolume(&spec.image);
        let available = btrfs::is_valid_name(&image) && btrfs::exists(&image)?;
        if !available {
            return Err(DriverError::ImageUnavailable(format!(
                "image {} has no root filesystem for this runtime; the operator runs \
                 scripts/build-rootfs.sh {} to make one",
                spec.image, spec.image
            )));
        }
        let id = spec.sandbox_id.clone();
        let root = root_subvolume(&id);
        match btrfs::snapshot(&image, &root, false) {
            Ok(()) => {}
            Err(CapabilityError::Exists(_)) => {
                return Err(DriverError::Failed(format!("instance {id} exists already")))
            }
            Err(e) => return Err(e.into()),
        }
        let record = Record {
            sandbox_id: id.clone(),
            image: spec.image.clone(),
            hostname: spec.hostname.clone(),
            env: spec.env.clone(),
            agent: (&spec.agent).into(),
            process: None,
        };
        if let Err(e) = record::save(&id, &record) {
            // The host undoes the snapshot too; this covers a host that does not.
            let _ = btrfs::delete_subvolume(&root);
            return Err(e);
        }
        log::info!("created {id} from {image}");
        Ok(Instance {
            id,
            root_subvolume: root,
        })
    }

    fn start(id: &str) -> Result<(), DriverError> {
        let settings = settings::load().map_err(DriverError::Failed)?;
        if !plausible_id(id) {
            return Err(not_found(id));
        }
        let mut record = record::load(id)?.ok_or_else(|| not_found(id))?;
        if let Some(pid) = record.process.take() {
            match process::state(&pid) {
                Ok(ProcessState::Running) => return Ok(()),
                Ok(_) => {
                    let _ = process::release(&pid);
                }
                Err(CapabilityError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let root = root_subvolume(id);
        if !btrfs::exists(&root)? {
            return Err(DriverError::NotFound(format!(
                "instance {id} has no root subvolume {root}"
            )));
        }
        let root_path = btrfs::host_path(&root)?;
        let agent = (&record.agent).into();
        let args = bwrap::argv(&bwrap::Launch {
            root: &root_path,
            hostname: &record.hostname,
            env: &record.env,
            agent: &agent,
        });
        let options = SpawnOptions {
            env: Vec::new(),
            // Not captured: the agent outlives the host, and once a host restart has closed
            // the pipes its next log line would fail with EPIPE (eprintln! then panics).
            capture_output: false,
            limits: settings.limits.clone(),
            user_namespace: (!settings.id_map.is_empty()).then(|| settings.id_map.clone()),
        };
        let pid = process::spawn(&settings.bwrap, &args, &options)?;
        // Recorded before anything else can fail, so that stop and destroy find it.
        record.process = Some(pid.clone());
        record::save(id, &record)?;
        // No waiting here: a bwrap that fails a moment later (a bad flag, a missing mount
        // source) is seen by the host, which watches `inspect` while it waits for the agent.
        match process::state(&pid) {
            Ok(ProcessState::Running) => {
                log::info!("started {id} (process {pid})");
                Ok(())
            }
            Ok(ended) => {
                record.process = None;
                let _ = record::save(id, &record);
                Err(early_exit(&pid, ended, &root))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn stop(id: &str) -> Result<(), DriverError> {
        if !plausible_id(id) {
            return Err(not_found(id));
        }
        let mut record = record::load(id)?.ok_or_else(|| not_found(id))?;
        if let Some(pid) = record.process.take() {
            end_process(&pid)?;
            record::save(id, &record)?;
            log::info!("stopped {id}");
        }
        Ok(())
    }

    fn destroy(id: &str) -> Result<(), DriverError> {
        if !plausible_id(id) {
            return Ok(());
        }
        if let Some(record) = record::load(id)? {
            if let Some(pid) = &record.process {
                end_process(pid)?;
            }
        }
        btrfs::delete_subvolume(&root_subvolume(id))?;
        record::remove(id)?;
        log::info!("destroyed {id}");
        Ok(())
    }

    fn inspect(id: &str) -> Result<InstanceState, DriverError> {
        if !plausible_id(id) {
            return Ok(InstanceState::Missing);
        }
        let Some(record) = record::load(id)? else {
            return Ok(InstanceState::Missing);
        };
        if !btrfs::exists(&root_subvolume(id))? {
            return Ok(InstanceState::Missing);
        }
        let running = match &record.process {
            None => false,
            Some(pid) => match process::state(pid) {
                Ok(state) => state.is_running(),
                Err(CapabilityError::NotFound(_)) => false,
                Err(e) => return Err(e.into()),
            },
        };
        Ok(if running {
            InstanceState::Running
        } else {
            InstanceState::Stopped
        })
    }

    /// The records, and the root subvolumes without one (a create cut short between the
    /// snapshot and the record).
    fn list_instances() -> Result<Vec<ManagedInstance>, DriverError> {
        let mut instances: Vec<ManagedInstance> = Vec::new();
        for id in record::ids()? {
            let sandbox_id = match record::load(&id) {
                Ok(Some(record)) => record.sandbox_id,
                _ => id.clone(),
            };
            instances.push(ManagedInstance {
                id,
                sandbox_id: Some(sandbox_id),
            });
        }
        let prefix = format!("{SANDBOXES}/");
        for name in btrfs::list_subvolumes()? {
            let Some(id) = name.strip_prefix(&prefix) else {
                continue;
            };
            if plausible_id(id) && !instances.iter().any(|i| i.id == id) {
                instances.push(ManagedInstance {
                    id: id.to_string(),
                    sandbox_id: Some(id.to_string()),
                });
            }
        }
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(instances)
    }
}

export_runtime!(Namespaces);

#[cfg(test)]
mod tests;

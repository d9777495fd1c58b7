//! A runtime shipped as a Wasm component (the `runtime-plugin` world): the
//! adapter between the [`Runtime`] trait and the plugin's driver. Every
//! call runs on the blocking pool in a fresh instance with the plugin's
//! time and memory limits. What the plugin answers is checked here: an id
//! or a root subvolume that makes no sense is an error, never a path the
//! host would act on. A `create` or `start` that fails, traps or times out
//! is undone from the call's journal (its subvolumes and processes), so a
//! broken plugin leaves nothing behind.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    ExecOutcome, ExecRequest, Instance, InstanceSpec, InstanceStatus, ManagedInstance, Result,
    Runtime, RuntimeError,
};
use crate::plugins::capabilities::CallJournal;
use crate::plugins::driver_types as wit;
use crate::plugins::{CallError, DriverGuest, LoadedPlugin, PluginState};

#[derive(Clone)]
pub struct PluginRuntime {
    name: String,
    plugin: Arc<LoadedPlugin>,
}

/// One driver call's outcome: the plugin failed (trap, timeout) or answered.
type Answer<T> = std::result::Result<std::result::Result<T, wit::DriverError>, CallError>;

impl PluginRuntime {
    pub fn new(plugin: Arc<LoadedPlugin>) -> Self {
        Self {
            name: plugin.name.clone(),
            plugin,
        }
    }

    /// What the plugin says it offers.
    pub async fn info(&self) -> std::result::Result<wit::DriverInfo, String> {
        let (answer, _) = self
            .call(|plugin| plugin.with_driver(|store, driver| driver.call_capabilities(store)))
            .await?;
        answer.map_err(|e| e.0)
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LoadedPlugin) -> (std::result::Result<T, CallError>, CallJournal)
            + Send
            + 'static,
    ) -> std::result::Result<(std::result::Result<T, CallError>, CallJournal), String> {
        let plugin = Arc::clone(&self.plugin);
        tokio::task::spawn_blocking(move || f(&plugin))
            .await
            .map_err(|e| format!("runtime plugin {:?} panicked: {e}", self.name))
    }

    /// Runs one driver call; on failure undoes what it made when `undo`.
    async fn driver<T: Send + 'static>(
        &self,
        op: &'static str,
        undo: bool,
        f: impl FnOnce(
                &mut wasmtime::Store<PluginState>,
                &DriverGuest,
            ) -> wasmtime::Result<std::result::Result<T, wit::DriverError>>
            + Send
            + 'static,
    ) -> Result<(T, CallJournal)> {
        let (answer, journal): (Answer<T>, CallJournal) = self
            .call(move |plugin| plugin.with_driver(f))
            .await
            .map_err(|detail| RuntimeError::Engine { op, detail })?;
        let failure = match answer {
            Ok(Ok(value)) => return Ok((value, journal)),
            Ok(Err(err)) => self.driver_error(op, err),
            Err(CallError(reason)) => RuntimeError::Engine {
                op,
                detail: format!("runtime plugin {:?} failed: {reason}", self.name),
            },
        };
        if undo {
            self.undo(journal).await;
        }
        Err(failure)
    }

    fn driver_error(&self, op: &'static str, err: wit::DriverError) -> RuntimeError {
        match err {
            wit::DriverError::ImageUnavailable(reason) => RuntimeError::ImageUnavailable {
                image: String::new(),
                reason,
            },
            wit::DriverError::NotFound(id) => RuntimeError::NotFound(id),
            wit::DriverError::Failed(detail) => RuntimeError::Engine {
                op,
                detail: format!("runtime {:?}: {detail}", self.name),
            },
        }
    }

    async fn undo(&self, journal: CallJournal) {
        if journal.subvolumes.is_empty() && journal.processes.is_empty() {
            return;
        }
        let plugin = Arc::clone(&self.plugin);
        let name = self.name.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(caps) = plugin.capabilities() {
                tracing::info!(plugin = %name, subvolumes = ?journal.subvolumes, processes = ?journal.processes, "undoing a failed runtime call");
                caps.undo(&name, &journal);
            }
        })
        .await;
    }

    /// Runs on its own task (see `create` in the [`Runtime`] impl): a client that
    /// goes away must not cancel the undo of a failed call.
    async fn create_owned(self, spec: InstanceSpec) -> Result<Instance> {
        let wit_spec = wit::InstanceSpec {
            sandbox_id: spec.sandbox_id.to_string(),
            hostname: spec.hostname.clone(),
            image: spec.image.clone(),
            env: spec.env.clone().into_iter().collect(),
            agent: wit::AgentMount {
                binary: spec.agent.binary.to_string_lossy().into_owned(),
                socket_dir: spec.agent.socket_dir.to_string_lossy().into_owned(),
                args: spec.agent.args.clone(),
            },
        };
        let image = spec.image.clone();
        let created = self
            .driver("create", true, move |store, driver| {
                driver.call_create(store, &wit_spec)
            })
            .await;
        let (instance, journal) = match created {
            Ok(made) => made,
            Err(RuntimeError::ImageUnavailable { reason, .. }) => {
                return Err(RuntimeError::ImageUnavailable { image, reason })
            }
            Err(other) => return Err(other),
        };
        match self.check_instance(&instance, &journal) {
            Ok(checked) => Ok(checked),
            Err(why) => {
                tracing::warn!(plugin = %self.name, %why, "runtime plugin returned a nonsense instance; undoing its create");
                self.undo(journal).await;
                Err(RuntimeError::Engine {
                    op: "create",
                    detail: format!("runtime plugin {:?} returned nonsense: {why}", self.name),
                })
            }
        }
    }

    /// Checks what `create` returned and resolves the root's host path. The
    /// root must be a subvolume this very call made: never a shared image,
    /// another sandbox's root or anything the host would then overwrite or
    /// delete on the plugin's word.
    fn check_instance(
        &self,
        instance: &wit::Instance,
        journal: &CallJournal,
    ) -> std::result::Result<Instance, String> {
        check_instance_id(&instance.id)?;
        if !journal.subvolumes.contains(&instance.root_subvolume) {
            return Err(format!(
                "root subvolume {:?} was not made by this create call",
                instance.root_subvolume
            ));
        }
        let caps = self
            .plugin
            .capabilities()
            .ok_or("the plugin has no capabilities")?;
        let btrfs = caps
            .btrfs()
            .map_err(|_| "it returned a root subvolume but has no btrfs grant".to_string())?;
        let exists = btrfs
            .exists(&instance.root_subvolume)
            .map_err(|e| format!("root subvolume {:?}: {e}", instance.root_subvolume))?;
        if !exists {
            return Err(format!(
                "root subvolume {:?} does not exist",
                instance.root_subvolume
            ));
        }
        let rootfs = btrfs
            .host_path(&instance.root_subvolume)
            .map_err(|e| e.to_string())?;
        Ok(Instance {
            id: instance.id.clone(),
            rootfs,
            copy_of_image: journal
                .pristine_copy_of(&instance.root_subvolume)
                .map(Path::to_path_buf),
        })
    }
}

/// An instance id the host will store and pass back: 1 to 128 characters
/// of `[A-Za-z0-9._-]`, not `.` or `..`.
fn check_instance_id(id: &str) -> std::result::Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance id {id:?} is not 1-128 characters of [A-Za-z0-9._-]"
        ))
    }
}

#[async_trait]
impl Runtime for PluginRuntime {
    fn name(&self) -> &str {
        &self.name
    }

    async fn healthy(&self) -> bool {
        self.health().await.is_ok()
    }

    async fn health(&self) -> std::result::Result<(), String> {
        let answer = self
            .call(|plugin| plugin.with_driver(|store, driver| driver.call_health(store)))
            .await?;
        match answer.0 {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(reason),
            Err(CallError(reason)) => Err(format!("health check failed: {reason}")),
        }
    }

    /// The driver's `create` says whether it has the image; nothing to do before.
    async fn ensure_image(&self, _image: &str) -> Result<()> {
        Ok(())
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance> {
        tokio::spawn(self.clone().create_owned(spec.clone()))
            .await
            .map_err(|e| RuntimeError::Engine {
                op: "create",
                detail: format!("runtime plugin {:?}: {e}", self.name),
            })?
    }

    async fn start(&self, id: &str) -> Result<()> {
        let this = self.clone();
        let id = id.to_string();
        // Its own task, as create: the undo of a failed start must run.
        tokio::spawn(async move {
            this.driver("start", true, move |store, driver| {
                driver.call_start(store, &id)
            })
            .await
            .map(|_| ())
        })
        .await
        .map_err(|e| RuntimeError::Engine {
            op: "start",
            detail: format!("runtime plugin {:?}: {e}", self.name),
        })?
    }

    async fn stop(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.driver("stop", false, move |store, driver| {
            driver.call_stop(store, &id)
        })
        .await
        .map(|_| ())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        match self
            .driver("destroy", false, move |store, driver| {
                driver.call_destroy(store, &id)
            })
            .await
        {
            Ok(_) | Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn status(&self, id: &str) -> Result<InstanceStatus> {
        let id = id.to_string();
        let (state, _) = self
            .driver("inspect", false, move |store, driver| {
                driver.call_inspect(store, &id)
            })
            .await?;
        Ok(match state {
            wit::InstanceState::Running => InstanceStatus::Running,
            wit::InstanceState::Stopped => InstanceStatus::Stopped,
            wit::InstanceState::Missing => InstanceStatus::Missing,
        })
    }

    async fn exec(&self, _id: &str, _request: &ExecRequest) -> Result<ExecOutcome> {
        Err(RuntimeError::NotStarted(format!(
            "runtime {:?} has no exec of its own; commands run through the sandbox's agent (omit \"via\")",
            self.name
        )))
    }

    /// A read-only spare of the image (see `capabilities::spares`).
    async fn snapshot_image(&self, image: &Path, dest: &Path) -> bool {
        let plugin = Arc::clone(&self.plugin);
        let (image, dest) = (image.to_path_buf(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || {
            plugin
                .capabilities()
                .and_then(|caps| caps.btrfs().ok())
                .is_some_and(|btrfs| btrfs.spares().take(&image, true, &dest))
        })
        .await
        .unwrap_or(false)
    }

    async fn list_managed(&self) -> Result<Vec<ManagedInstance>> {
        let (instances, _) = self
            .driver("list-instances", false, |store, driver| {
                driver.call_list_instances(store)
            })
            .await?;
        Ok(instances
            .into_iter()
            .filter(|i| check_instance_id(&i.id).is_ok())
            .map(|i| ManagedInstance {
                sandbox_id: i.sandbox_id.and_then(|s| Uuid::parse_str(&s).ok()),
                id: i.id,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_plain() {
        assert!(check_instance_id("0b6c8f2e-1d2a-4c7e-9f00-112233445566").is_ok());
        for bad in ["", ".", "..", "../x", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_instance_id(bad).is_err(), "{bad:?}");
        }
    }
}

//! The sandbox service: owns the lifecycle of sandboxes and their snapshots.
//! It ties the store (what exists), the runtime (what runs) and Btrfs (the
//! root filesystems and their snapshots) together, serializes lifecycle
//! operations per sandbox, and records transitional states first so that a
//! crash can be finished or undone at the next start ([`recovery`]).

mod files;
mod locks;
mod mount_points;
mod paths;
mod plugged;
mod processes;
pub mod recovery;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, instrument, warn};
use uuid::Uuid;

use crate::agent::{pb, AgentError, Agents};
use crate::btrfs::{self, BtrfsError};
use crate::names::{self, NameError};
use crate::plugins::PluginChain;
use crate::runtimes::{
    AgentMount, ExecOutcome, ExecRequest, InstanceSpec, InstanceStatus, Runtime, RuntimeError,
    Runtimes,
};
use crate::store::{
    ApiKey, ForkSource, NewSandbox, Sandbox, SandboxState, Snapshot, Store, StoreError,
};

pub use files::FileUpload;
pub use locks::SnapshotPin;
use locks::{LockTable, SnapshotPins};
pub use paths::SnapshotPaths;
pub use processes::{EventStream, StartProcess};

/// The snapshot every sandbox gets at creation.
pub const INITIAL_SNAPSHOT: &str = "initial";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("sandbox {0:?} not found")]
    VmNotFound(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("a sandbox named {0:?} already exists")]
    VmExists(String),
    #[error("a snapshot named {0:?} already exists")]
    SnapshotExists(String),
    #[error("snapshot {0:?} is being exported; try again when the export job has finished")]
    SnapshotBusy(String),
    #[error("sandbox {name:?} is {state}, not running")]
    NotRunning { name: String, state: &'static str },
    #[error("rejected by policy plugin {plugin:?}: {reason}")]
    RejectedByPolicy { plugin: String, reason: String },
    #[error("denied by hook plugin {plugin:?}: {reason}")]
    DeniedByHook { plugin: String, reason: String },
    #[error("plugin error: {0}")]
    Plugin(String),
    #[error("runtime {runtime:?} is not available; this host offers: {offered}")]
    RuntimeUnavailable { runtime: String, offered: String },
    #[error("image {image:?} is not available: {reason}")]
    ImageUnavailable { image: String, reason: String },
    #[error("{0}")]
    CommandNotStarted(String),
    #[error("runtime error: {0}")]
    Runtime(RuntimeError),
    #[error(
        "sandbox {0:?} has no agent (it was created by an older host); only the run endpoint works"
    )]
    NoAgent(String),
    #[error(transparent)]
    Agent(AgentError),
    /// The agent's limits: running processes (4096) or file transfers (64) at once.
    #[error("{0}")]
    AgentBusy(String),
    #[error("process {0} not found")]
    ProcessNotFound(u32),
    /// The process cannot do that now (stdin closed, not a terminal).
    #[error("{0}")]
    ProcessState(String),
    #[error("{0}")]
    PathNotFound(String),
    #[error("{0}")]
    PathExists(String),
    #[error("{0}")]
    PathRefused(String),
    #[error("snapshot storage error: {0}")]
    Storage(#[from] BtrfsError),
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("filesystem error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<RuntimeError> for SandboxError {
    fn from(err: RuntimeError) -> Self {
        match err {
            RuntimeError::ImageUnavailable { image, reason } => {
                SandboxError::ImageUnavailable { image, reason }
            }
            RuntimeError::NotStarted(reason) => SandboxError::CommandNotStarted(reason),
            other => SandboxError::Runtime(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, SandboxError>;

/// The agent of a sandbox, as its status shows it.
#[derive(Debug, Clone)]
pub enum AgentStatus {
    Ready(pb::InfoResponse),
    /// Expected to answer, but does not (it may be restarting).
    Unreachable(String),
    /// The sandbox is not running.
    Stopped,
    /// Created by an older host, without an agent.
    Absent,
}

/// What a restore did to the processes that were running.
#[derive(Debug, Default)]
pub struct RestoredProcesses {
    /// (pid before, the process started again in its place).
    pub restarted: Vec<(u32, pb::ProcessInfo)>,
    /// Gone and not started again (terminals, one-shot runs, failed restarts).
    pub stopped: Vec<pb::ProcessInfo>,
}

/// Where a new sandbox's root filesystem comes from.
enum RootOrigin<'a> {
    /// The image, as the runtime creates it.
    Image,
    /// A snapshot of another of the caller's sandboxes.
    Fork {
        source: &'a Sandbox,
        snapshot: &'a str,
    },
    /// A subvolume received from elsewhere (an import), kept as `snapshot`.
    Received { path: &'a Path, snapshot: &'a str },
}

/// A request to create a sandbox, already decoded from the API.
#[derive(Debug, Clone, Default)]
pub struct CreateSandbox {
    pub name: String,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub runtime: Option<String>,
    pub from: Option<ForkSource>,
}

/// An import the policy chain admitted ([`Sandboxes::admit_import`]): the
/// sandbox it will create.
pub struct AdmittedImport(NewSandbox);

/// A command to run, already decoded from the API.
#[derive(Debug, Clone, Default)]
pub struct RunCommand {
    pub command: String,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub timeout_ms: Option<u64>,
    pub via: RunVia,
}

/// Which path a run takes into the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RunVia {
    /// The sandbox's agent (the engine's exec for sandboxes without one).
    #[default]
    Agent,
    /// The runtime's own exec (Docker's exec API): slower, kept for
    /// comparison and for sandboxes whose agent is down.
    Engine,
}

/// What a finished (or timed-out) command gave.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub outcome: ExecOutcome,
    pub duration: Duration,
}

/// Limits on commands, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub output_limit: usize,
    /// Replay buffer of each background process, in the agent.
    pub process_buffer: u64,
}

/// How long a freshly started sandbox's agent may take to answer.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sandboxes {
    store: Store,
    runtimes: Runtimes,
    paths: SnapshotPaths,
    locks: LockTable,
    /// Snapshots that running exports read (see [`Self::pin_for_export`]).
    pins: Arc<SnapshotPins>,
    default_image: String,
    limits: RunLimits,
    plugins: Arc<PluginChain>,
    agents: Arc<Agents>,
}

impl Sandboxes {
    pub fn new(
        store: Store,
        runtimes: Runtimes,
        paths: SnapshotPaths,
        default_image: String,
        limits: RunLimits,
        plugins: Arc<PluginChain>,
        agents: Arc<Agents>,
    ) -> Self {
        Self {
            store,
            runtimes,
            paths,
            locks: LockTable::default(),
            pins: Arc::default(),
            default_image,
            limits,
            plugins,
            agents,
        }
    }

    /// The agent's state in a sandbox, for its status.
    pub async fn agent_status(&self, sandbox: &Sandbox) -> AgentStatus {
        if !self.agents.has_agent(sandbox.id).await {
            return AgentStatus::Absent;
        }
        if sandbox.state != SandboxState::Running {
            return AgentStatus::Stopped;
        }
        match self.agents.info(sandbox.id).await {
            Ok(info) => AgentStatus::Ready(info),
            Err(err) => {
                // A fresh connection next time: the agent may have restarted.
                self.agents.forget(sandbox.id);
                AgentStatus::Unreachable(err.to_string())
            }
        }
    }

    pub async fn get(&self, owner: Uuid, name: &str) -> Result<Sandbox> {
        self.store
            .get_sandbox(owner, name)
            .await?
            .filter(|s| s.state != SandboxState::Deleting)
            .ok_or_else(|| SandboxError::VmNotFound(name.to_string()))
    }

    /// The owner's sandboxes carrying every one of `labels`.
    pub async fn list(&self, owner: Uuid, labels: &[(String, String)]) -> Result<Vec<Sandbox>> {
        let all = self.store.list_sandboxes(owner).await?;
        Ok(all
            .into_iter()
            .filter(|s| s.state != SandboxState::Deleting)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect())
    }

    #[instrument(skip_all, fields(sandbox = %request.name))]
    pub async fn create(&self, caller: &ApiKey, request: CreateSandbox) -> Result<Sandbox> {
        let owner = caller.id;
        names::validate_resource_name("sandbox", &request.name)?;
        names::validate_env(&request.env)?;
        names::validate_labels(&request.labels)?;
        // A fork keeps its source's image: its files come from that image.
        let source = match &request.from {
            Some(from) => Some(self.fork_source(owner, from).await?),
            None => None,
        };
        let image = match (&source, &request.image) {
            (Some((src, _)), Some(image)) if image != &src.image => {
                return Err(SandboxError::InvalidRequest(format!(
                    "a fork uses its source's image {:?}; omit image or pass that one",
                    src.image
                )))
            }
            (Some((src, _)), _) => src.image.clone(),
            (None, Some(image)) => image.clone(),
            (None, None) => self.default_image.clone(),
        };
        names::validate_image(&image)?;
        let runtime = self.choose_runtime(caller, &request, &image).await?;
        self.runtime_named(&runtime)?.ensure_image(&image).await?;

        let origin = match &source {
            Some((src, snapshot)) => RootOrigin::Fork {
                source: src,
                snapshot,
            },
            None => RootOrigin::Image,
        };
        let new = NewSandbox {
            owner_key_id: owner,
            name: request.name.clone(),
            image,
            runtime,
            env: request.env,
            labels: request.labels,
            forked_from: request.from,
        };
        self.materialize(new, origin).await
    }

    /// Reserves the name, builds the sandbox under its lock, and removes
    /// everything again if any step fails: a failed create leaves nothing.
    async fn materialize(&self, new: NewSandbox, origin: RootOrigin<'_>) -> Result<Sandbox> {
        let sandbox = self.store.insert_sandbox(&new).await.map_err(|e| match e {
            StoreError::Conflict => SandboxError::VmExists(new.name.clone()),
            other => other.into(),
        })?;
        let _guard = self.locks.lock(sandbox.id).await;
        let started = Instant::now();
        match self.build(&sandbox, origin).await {
            Ok(()) => {
                info!(id = %sandbox.id, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox created");
                self.get(new.owner_key_id, &new.name).await
            }
            Err(err) => {
                warn!(id = %sandbox.id, error = %err, "create failed, cleaning up");
                // The row as it is now: it names the instance if one was made.
                let current = self
                    .store
                    .get_sandbox(new.owner_key_id, &new.name)
                    .await
                    .ok()
                    .flatten()
                    .filter(|s| s.id == sandbox.id)
                    .unwrap_or(sandbox);
                if let Err(cleanup) = self.destroy(&current).await {
                    warn!(id = %current.id, error = %cleanup, "cleanup after failed create failed; recovery will retry");
                }
                Err(err)
            }
        }
    }

    /// Creates the instance, fills its root from its origin, takes the
    /// `initial` snapshot (unless the origin brings one) and starts it.
    async fn build(&self, sandbox: &Sandbox, origin: RootOrigin<'_>) -> Result<()> {
        let runtime = self.runtime_of(sandbox)?;
        let began = Instant::now();
        let socket_dir = self.agents.prepare(sandbox.id).await?;
        let instance = runtime
            .create(&InstanceSpec {
                sandbox_id: sandbox.id,
                hostname: sandbox.name.clone(),
                image: sandbox.image.clone(),
                env: sandbox.env.clone(),
                agent: AgentMount {
                    binary: self.agents.binary().to_path_buf(),
                    socket_dir,
                    args: vec![
                        "--output-buffer".into(),
                        self.limits.process_buffer.to_string(),
                    ],
                },
            })
            .await?;
        self.store
            .set_instance(sandbox.id, &instance.id, &instance.rootfs)
            .await?;
        let created = began.elapsed();
        tokio::fs::create_dir_all(self.paths.snapshots_dir(sandbox.id)).await?;
        let mut has_initial = false;
        // Until it starts, a root that is an untouched copy of an image is
        // that image: `initial` may come from a snapshot of the image made
        // ahead of time (a rename) instead of one of the root (a commit).
        let mut copy_of_image = None;
        match origin {
            RootOrigin::Image => copy_of_image = instance.copy_of_image.as_deref(),
            RootOrigin::Fork { source, snapshot } => {
                // Hold the source's lock so its snapshot cannot vanish mid-copy.
                let _src_guard = self.locks.lock(source.id).await;
                if self
                    .store
                    .get_snapshot(source.id, snapshot)
                    .await?
                    .is_none()
                {
                    return Err(SandboxError::SnapshotNotFound(snapshot.to_string()));
                }
                replace_rootfs(&instance.rootfs, &self.paths.snapshot(source.id, snapshot)).await?;
            }
            RootOrigin::Received { path, snapshot } => {
                // The received subvolume becomes a snapshot of this sandbox
                // and, as a writable copy, its root filesystem.
                let named = self.paths.snapshot(sandbox.id, snapshot);
                btrfs::snapshot_async(path.to_path_buf(), named.clone(), true).await?;
                self.store.insert_snapshot(sandbox.id, snapshot).await?;
                replace_rootfs(&instance.rootfs, &named).await?;
                has_initial = snapshot == INITIAL_SNAPSHOT;
            }
        }
        mount_points::secure_async(&instance.rootfs).await?;
        let prepared = began.elapsed();
        // The `initial` snapshot is taken while the instance starts: nothing
        // in a sandbox writes to its root before this call returns (its only
        // process is the agent, which writes to its socket folder), and the
        // snapshot is a few milliseconds of the create path.
        let initial = async {
            let dest = self.paths.snapshot(sandbox.id, INITIAL_SNAPSHOT);
            let ready_made = match copy_of_image {
                Some(image) => runtime.snapshot_image(image, &dest).await,
                None => false,
            };
            if ready_made {
                self.record_snapshot(sandbox.id, INITIAL_SNAPSHOT, dest)
                    .await?;
            } else if !has_initial {
                self.take_snapshot(sandbox.id, &instance.rootfs, INITIAL_SNAPSHOT)
                    .await?;
            }
            Ok::<_, SandboxError>((began.elapsed(), ready_made))
        };
        let started = async {
            runtime.start(&instance.id).await?;
            let started = began.elapsed();
            self.wait_started(sandbox, runtime, &instance.id).await?;
            Ok::<_, SandboxError>((started, began.elapsed()))
        };
        let (initial, started) = tokio::join!(initial, started);
        let ((initial, ready_made), (started, answered)) = (initial?, started?);
        // Where a create's time goes, for whoever tunes it.
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        debug!(
            id = %sandbox.id,
            created_ms = ms(created),
            prepared_ms = ms(prepared),
            started_ms = ms(started),
            agent_ms = ms(answered),
            initial_ms = ms(initial),
            initial_ready_made = ready_made,
            "sandbox built"
        );
        self.store
            .set_state(sandbox.id, SandboxState::Running, None)
            .await?;
        Ok(())
    }

    async fn fork_source(&self, owner: Uuid, from: &ForkSource) -> Result<(Sandbox, String)> {
        names::validate_resource_name("sandbox", &from.vm)?;
        names::validate_resource_name("snapshot", &from.snapshot)?;
        let src = self.get(owner, &from.vm).await?;
        if self
            .store
            .get_snapshot(src.id, &from.snapshot)
            .await?
            .is_none()
        {
            return Err(SandboxError::SnapshotNotFound(from.snapshot.clone()));
        }
        Ok((src, from.snapshot.clone()))
    }

    #[instrument(skip(self, owner))]
    pub async fn delete(&self, owner: Uuid, name: &str) -> Result<()> {
        let (sandbox, _guard) = self.lock(owner, name).await?;
        if let Some(snapshot) = self.pins.any_pinned(sandbox.id) {
            return Err(SandboxError::SnapshotBusy(snapshot));
        }
        self.store
            .set_state(sandbox.id, SandboxState::Deleting, None)
            .await?;
        self.destroy(&sandbox).await?;
        self.locks.forget(sandbox.id);
        info!(id = %sandbox.id, "sandbox deleted");
        Ok(())
    }

    /// Removes everything a sandbox has: instance, root filesystem, snapshots, row.
    async fn destroy(&self, sandbox: &Sandbox) -> Result<()> {
        if let Some(container) = &sandbox.container_id {
            self.runtime_of(sandbox)?.remove(container).await?;
        }
        // The engine removes the root filesystem with the instance; a swap that
        // crashed half-way may have left one the engine no longer knows.
        if let Some(rootfs) = &sandbox.rootfs_path {
            btrfs::delete_subvolume_if_exists_async(rootfs.clone()).await?;
        }
        remove_snapshot_dir(&self.paths.sandbox_dir(sandbox.id)).await?;
        self.agents.remove(sandbox.id).await?;
        self.store.delete_sandbox(sandbox.id).await?;
        Ok(())
    }

    #[instrument(skip(self, caller, request), fields(sandbox = %name))]
    pub async fn run(&self, caller: &ApiKey, name: &str, request: RunCommand) -> Result<RunResult> {
        let via = request.via;
        let mut exec = self.exec_request(request)?;
        let sandbox = self.get(caller.id, name).await?;
        let container = match (&sandbox.container_id, sandbox.state) {
            (Some(container), SandboxState::Running) => container.clone(),
            (_, state) => {
                return Err(SandboxError::NotRunning {
                    name: name.to_string(),
                    state: state.as_str(),
                })
            }
        };
        let vetted = self.vet_command(caller, &sandbox, &mut exec).await?;
        let started = Instant::now();
        let via_agent = via == RunVia::Agent && self.agents.has_agent(sandbox.id).await;
        let outcome = if via_agent {
            self.run_via_agent(&sandbox, &exec).await
        } else {
            self.runtime_of(&sandbox)?
                .exec(&container, &exec)
                .await
                .map_err(|e| match e {
                    RuntimeError::NotRunning | RuntimeError::NotFound(_) => {
                        SandboxError::NotRunning {
                            name: name.to_string(),
                            state: "stopped",
                        }
                    }
                    other => other.into(),
                })
        }?;
        let duration = started.elapsed();
        if let Some(command) = vetted {
            self.report_outcome(caller, command, &outcome, duration);
        }
        Ok(RunResult { outcome, duration })
    }

    fn exec_request(&self, request: RunCommand) -> Result<ExecRequest> {
        processes::check_command(&request.command)?;
        names::validate_env(&request.env)?;
        processes::check_cwd(request.cwd.as_deref())?;
        if let Some(user) = &request.user {
            processes::check_user(user)?;
        }
        let timeout = match request.timeout_ms {
            None => self.limits.default_timeout,
            Some(0) => {
                return Err(SandboxError::InvalidRequest(
                    "timeout_ms must be positive".into(),
                ))
            }
            Some(ms) if Duration::from_millis(ms) > self.limits.max_timeout => {
                return Err(SandboxError::InvalidRequest(format!(
                    "timeout_ms must not exceed {}",
                    self.limits.max_timeout.as_millis()
                )))
            }
            Some(ms) => Duration::from_millis(ms),
        };
        Ok(ExecRequest {
            command: request.command,
            env: request.env,
            cwd: request.cwd,
            user: request.user,
            timeout,
            output_limit: self.limits.output_limit,
        })
    }

    pub async fn list_snapshots(&self, owner: Uuid, vm: &str) -> Result<Vec<Snapshot>> {
        let sandbox = self.get(owner, vm).await?;
        Ok(self.store.list_snapshots(sandbox.id).await?)
    }

    #[instrument(skip(self, owner))]
    pub async fn create_snapshot(&self, owner: Uuid, vm: &str, snapshot: &str) -> Result<Snapshot> {
        names::validate_resource_name("snapshot", snapshot)?;
        let (sandbox, _guard) = self.lock(owner, vm).await?;
        let rootfs = self.rootfs_of(&sandbox)?;
        if self
            .store
            .get_snapshot(sandbox.id, snapshot)
            .await?
            .is_some()
        {
            return Err(SandboxError::SnapshotExists(snapshot.to_string()));
        }
        self.take_snapshot(sandbox.id, rootfs, snapshot).await
    }

    /// Read-only Btrfs snapshot of the root filesystem, then its row. A crash
    /// between the two leaves an unlisted subvolume that recovery removes.
    async fn take_snapshot(&self, sandbox: Uuid, rootfs: &Path, name: &str) -> Result<Snapshot> {
        let dest = self.paths.snapshot(sandbox, name);
        btrfs::snapshot_async(rootfs.to_path_buf(), dest.clone(), true).await?;
        self.record_snapshot(sandbox, name, dest).await
    }

    /// The row of a snapshot subvolume made at `dest`; without a row, the
    /// subvolume is deleted again.
    async fn record_snapshot(&self, sandbox: Uuid, name: &str, dest: PathBuf) -> Result<Snapshot> {
        match self.store.insert_snapshot(sandbox, name).await {
            Ok(snapshot) => Ok(snapshot),
            Err(err) => {
                let _ = btrfs::delete_subvolume_if_exists_async(dest).await;
                Err(match err {
                    StoreError::Conflict => SandboxError::SnapshotExists(name.to_string()),
                    other => other.into(),
                })
            }
        }
    }

    #[instrument(skip(self, owner))]
    pub async fn delete_snapshot(&self, owner: Uuid, vm: &str, snapshot: &str) -> Result<()> {
        names::validate_resource_name("snapshot", snapshot)?;
        let (sandbox, _guard) = self.lock(owner, vm).await?;
        if self.pins.is_pinned(sandbox.id, snapshot) {
            return Err(SandboxError::SnapshotBusy(snapshot.to_string()));
        }
        if !self.store.delete_snapshot(sandbox.id, snapshot).await? {
            return Err(SandboxError::SnapshotNotFound(snapshot.to_string()));
        }
        btrfs::delete_subvolume_if_exists_async(self.paths.snapshot(sandbox.id, snapshot)).await?;
        Ok(())
    }

    #[instrument(skip(self, owner))]
    /// Restores the root filesystem and restarts the sandbox. Background
    /// processes that were running are started again from their specs (with
    /// `restart_processes`); terminals and one-shot runs cannot be, and are
    /// reported as stopped.
    pub async fn restore(
        &self,
        owner: Uuid,
        vm: &str,
        snapshot: &str,
        restart_processes: bool,
    ) -> Result<(Sandbox, RestoredProcesses)> {
        let (sandbox, _guard) = self.lock_with_snapshot(owner, vm, snapshot).await?;
        self.rootfs_of(&sandbox)?;
        let running = self.running_processes(&sandbox).await;
        self.store
            .set_state(sandbox.id, SandboxState::Restoring, Some(snapshot))
            .await?;
        self.finish_restore(&sandbox, snapshot).await?;
        let processes = if restart_processes {
            self.restart_processes(&sandbox, running).await
        } else {
            RestoredProcesses {
                restarted: Vec::new(),
                stopped: running,
            }
        };
        Ok((self.get(owner, vm).await?, processes))
    }

    /// Stop, swap the root filesystem for a writable copy of the snapshot,
    /// start. Idempotent, so recovery can run it again after a crash.
    async fn finish_restore(&self, sandbox: &Sandbox, snapshot: &str) -> Result<()> {
        let (Some(container), Some(rootfs)) = (&sandbox.container_id, &sandbox.rootfs_path) else {
            return Err(SandboxError::NotRunning {
                name: sandbox.name.clone(),
                state: "error",
            });
        };
        let runtime = self.runtime_of(sandbox)?;
        let started = Instant::now();
        runtime.stop(container).await?;
        replace_rootfs(rootfs, &self.paths.snapshot(sandbox.id, snapshot)).await?;
        self.agents.forget(sandbox.id);
        mount_points::secure_async(rootfs).await?;
        runtime.start(container).await?;
        if self.agents.has_agent(sandbox.id).await {
            self.wait_started(sandbox, runtime, container).await?;
        }
        self.store
            .set_state(sandbox.id, SandboxState::Running, None)
            .await?;
        info!(id = %sandbox.id, snapshot, elapsed_ms = started.elapsed().as_millis() as u64, "restored");
        Ok(())
    }

    /// [`Self::lock`], then checks that `snapshot` exists under that lock.
    async fn lock_with_snapshot(
        &self,
        owner: Uuid,
        vm: &str,
        snapshot: &str,
    ) -> Result<(Sandbox, tokio::sync::OwnedMutexGuard<()>)> {
        names::validate_resource_name("snapshot", snapshot)?;
        let (sandbox, guard) = self.lock(owner, vm).await?;
        if self
            .store
            .get_snapshot(sandbox.id, snapshot)
            .await?
            .is_none()
        {
            return Err(SandboxError::SnapshotNotFound(snapshot.to_string()));
        }
        Ok((sandbox, guard))
    }

    /// Looks a sandbox up, takes its lock, and reads it again under the lock
    /// (it may have been deleted or changed while we waited).
    async fn lock(
        &self,
        owner: Uuid,
        name: &str,
    ) -> Result<(Sandbox, tokio::sync::OwnedMutexGuard<()>)> {
        let id = self.get(owner, name).await?.id;
        let guard = self.locks.lock(id).await;
        let sandbox = self
            .get(owner, name)
            .await
            .ok()
            .filter(|s| s.id == id)
            .ok_or_else(|| SandboxError::VmNotFound(name.to_string()))?;
        Ok((sandbox, guard))
    }

    /// The read-only subvolume of one of the owner's snapshots, with the
    /// sandbox's lock held until [`Self::pin_for_export`] trades it for a pin.
    pub async fn snapshot_for_export(
        &self,
        owner: Uuid,
        vm: &str,
        snapshot: &str,
    ) -> Result<(Sandbox, PathBuf, tokio::sync::OwnedMutexGuard<()>)> {
        let (sandbox, guard) = self.lock_with_snapshot(owner, vm, snapshot).await?;
        let path = self.paths.snapshot(sandbox.id, snapshot);
        Ok((sandbox, path, guard))
    }

    /// Pins the snapshots an export reads (its own and its base) and releases
    /// the sandbox's lock: while the export runs, the sandbox can be used,
    /// snapshotted and restored, and deleting a pinned snapshot (or the
    /// sandbox) answers `snapshot_busy` instead of waiting for the export.
    pub fn pin_for_export(
        &self,
        sandbox: Uuid,
        snapshots: Vec<String>,
        lock: tokio::sync::OwnedMutexGuard<()>,
    ) -> SnapshotPin {
        let pin = self.pins.pin(sandbox, snapshots);
        drop(lock);
        pin
    }

    /// Where a snapshot of a sandbox lives (whether or not it exists).
    pub fn snapshot_path(&self, sandbox: Uuid, snapshot: &str) -> PathBuf {
        self.paths.snapshot(sandbox, snapshot)
    }

    pub fn paths(&self) -> &SnapshotPaths {
        &self.paths
    }

    /// Checks that an import may create `name` with `image` before the
    /// transfer starts, so that the obvious refusals come back at once.
    pub async fn check_import(&self, owner: Uuid, name: &str) -> Result<()> {
        names::validate_resource_name("sandbox", name)?;
        if self.store.get_sandbox(owner, name).await?.is_some() {
            return Err(SandboxError::VmExists(name.to_string()));
        }
        Ok(())
    }

    /// Admits an import as a create would be admitted, before anything is
    /// downloaded: names and image are checked, the policy chain decides
    /// (asked for the snapshot's runtime, the only one its root fits) and the
    /// image is made available. [`Self::import`] then builds the sandbox.
    #[instrument(skip(self, caller), fields(sandbox = %name))]
    pub async fn admit_import(
        &self,
        caller: &ApiKey,
        name: &str,
        image: &str,
        runtime: &str,
    ) -> Result<AdmittedImport> {
        self.check_import(caller.id, name).await?;
        names::validate_image(image)?;
        let request = CreateSandbox {
            name: name.to_string(),
            image: Some(image.to_string()),
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            runtime: Some(runtime.to_string()),
            from: None,
        };
        let chosen = self.choose_runtime(caller, &request, image).await?;
        if chosen != runtime {
            return Err(SandboxError::RejectedByPolicy {
                plugin: "(policy chain)".into(),
                reason: format!(
                    "it chose runtime {chosen:?}, but the snapshot is of a {runtime:?} sandbox"
                ),
            });
        }
        self.runtime_named(&chosen)?.ensure_image(image).await?;
        Ok(AdmittedImport(NewSandbox {
            owner_key_id: caller.id,
            name: name.to_string(),
            image: image.to_string(),
            runtime: chosen,
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            forked_from: None,
        }))
    }

    /// Creates an admitted sandbox from a received, read-only subvolume: the
    /// instance is created from the image, its root is swapped for a writable
    /// snapshot of `received` before its first start, and the sandbox gets
    /// the snapshots `snapshot` (the received one) and `initial`. Undone on
    /// failure.
    #[instrument(skip(self, admitted, received))]
    pub async fn import(
        &self,
        admitted: AdmittedImport,
        snapshot: &str,
        received: &Path,
    ) -> Result<Sandbox> {
        names::validate_resource_name("snapshot", snapshot)?;
        self.materialize(
            admitted.0,
            RootOrigin::Received {
                path: received,
                snapshot,
            },
        )
        .await
    }

    /// Waits for a started instance's agent to answer. Meanwhile the runtime
    /// is asked now and then whether the instance still runs, so that one
    /// that failed to start (its init ended) is reported at once rather than
    /// after the whole timeout; twice in a row, since an engine restarting
    /// the instance shows it stopped for a moment.
    async fn wait_started(
        &self,
        sandbox: &Sandbox,
        runtime: &Arc<dyn Runtime>,
        instance: &str,
    ) -> Result<()> {
        const LOOK_EVERY: Duration = Duration::from_millis(250);
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        let mut stopped_before = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .agents
                .wait_ready(sandbox.id, left.min(LOOK_EVERY))
                .await
            {
                Ok(_) => return Ok(()),
                Err(AgentError::Unavailable(_)) if left > LOOK_EVERY => {
                    let stopped = runtime.status(instance).await? != InstanceStatus::Running;
                    if stopped && stopped_before {
                        return Err(SandboxError::Runtime(RuntimeError::Setup(format!(
                            "the {} instance stopped before its agent answered",
                            runtime.name()
                        ))));
                    }
                    stopped_before = stopped;
                }
                Err(err) => return Err(SandboxError::Agent(err)),
            }
        }
    }

    /// The runtime a sandbox runs on (a plugin dropped from the plugins
    /// file leaves its sandboxes without one).
    fn runtime_of(&self, sandbox: &Sandbox) -> Result<&Arc<dyn Runtime>> {
        self.runtime_named(&sandbox.runtime)
    }

    fn runtime_named(&self, name: &str) -> Result<&Arc<dyn Runtime>> {
        self.runtimes
            .get(name)
            .ok_or_else(|| SandboxError::RuntimeUnavailable {
                runtime: name.to_string(),
                offered: self.runtimes.names().join(", "),
            })
    }

    pub fn runtimes(&self) -> &Runtimes {
        &self.runtimes
    }

    fn rootfs_of<'a>(&self, sandbox: &'a Sandbox) -> Result<&'a Path> {
        match (&sandbox.rootfs_path, sandbox.state) {
            (Some(rootfs), SandboxState::Running | SandboxState::Stopped) => Ok(rootfs),
            (_, state) => Err(SandboxError::NotRunning {
                name: sandbox.name.clone(),
                state: state.as_str(),
            }),
        }
    }
}

/// Replaces the subvolume at `rootfs` with a writable snapshot of `source`.
async fn replace_rootfs(rootfs: &Path, source: &Path) -> Result<()> {
    btrfs::delete_subvolume_if_exists_async(rootfs.to_path_buf()).await?;
    btrfs::snapshot_async(source.to_path_buf(), rootfs.to_path_buf(), false).await?;
    Ok(())
}

/// Deletes every snapshot subvolume under a sandbox's folder, then the folder.
async fn remove_snapshot_dir(dir: &Path) -> Result<()> {
    let snapshots = dir.join("snapshots");
    match tokio::fs::read_dir(&snapshots).await {
        Ok(mut entries) => {
            while let Some(entry) = entries.next_entry().await? {
                btrfs::delete_subvolume_if_exists_async(entry.path()).await?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

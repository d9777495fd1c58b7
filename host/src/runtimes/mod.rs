//! Runtimes: what runs a sandbox. A runtime creates an instance whose root
//! filesystem is a Btrfs subvolume it names, starts and stops it, runs
//! commands in it and lists what it manages. Everything above (snapshots,
//! restore, fork, recovery) is done by the sandbox layer the same way for
//! every runtime, on that subvolume.

pub mod docker;
pub mod plugin;
pub(crate) mod process_tree;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image {image:?} is not present on the engine and could not be pulled: {reason}")]
    ImageUnavailable { image: String, reason: String },
    #[error("instance {0} does not exist")]
    NotFound(String),
    #[error("the sandbox is not running")]
    NotRunning,
    /// The runtime could not start the command at all (missing cwd, no
    /// `/bin/sh` in the image); its message says why.
    #[error("the command could not be started: {0}")]
    NotStarted(String),
    #[error("{0}")]
    Setup(String),
    #[error("engine error during {op}: {detail}")]
    Engine { op: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

/// What the sandbox layer asks a runtime to create.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub sandbox_id: Uuid,
    /// The sandbox's name, used as its hostname.
    pub hostname: String,
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// The agent the instance runs as its init.
    pub agent: AgentMount,
}

/// How a runtime puts the agent into an instance.
#[derive(Debug, Clone)]
pub struct AgentMount {
    /// The static agent binary on the host, mounted read-only.
    pub binary: PathBuf,
    /// The host folder for the agent's socket, mounted read-write.
    pub socket_dir: PathBuf,
    /// Arguments after the binary (e.g. its output buffer size).
    pub args: Vec<String>,
}

/// A created (not yet started) instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    /// The writable root filesystem: a Btrfs subvolume, replaced on restore.
    pub rootfs: PathBuf,
    /// The shared image this root is an untouched copy of, when the runtime
    /// knows it is: until the instance first starts, a snapshot of the image
    /// is a snapshot of the root (see [`Runtime::snapshot_image`]).
    pub copy_of_image: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    Running,
    Stopped,
    Missing,
}

/// An instance this host manages, as the runtime reports it.
#[derive(Debug, Clone)]
pub struct ManagedInstance {
    pub id: String,
    pub sandbox_id: Option<Uuid>,
}

/// One command to run in a sandbox.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Run as `/bin/sh -c <command>`.
    pub command: String,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`; None is the image's default user.
    pub user: Option<String>,
    pub timeout: Duration,
    /// Cap on each of stdout and stderr; the rest is read and dropped.
    pub output_limit: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `None` when the command was killed by the timeout.
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

#[async_trait]
pub trait Runtime: Send + Sync {
    /// The name clients see in a sandbox's `runtime` field.
    fn name(&self) -> &str;
    /// Whether the runtime answers now (its health, as policies see it).
    async fn healthy(&self) -> bool;
    /// [`Runtime::healthy`] with the reason when not.
    async fn health(&self) -> std::result::Result<(), String> {
        if self.healthy().await {
            Ok(())
        } else {
            Err(format!("runtime {:?} does not answer", self.name()))
        }
    }
    /// Fails fast with `ImageUnavailable` when the image cannot be had.
    async fn ensure_image(&self, image: &str) -> Result<()>;
    async fn create(&self, spec: &InstanceSpec) -> Result<Instance>;
    async fn start(&self, id: &str) -> Result<()>;
    /// Stops at once (no grace period): used before swapping the root filesystem.
    async fn stop(&self, id: &str) -> Result<()>;
    /// Removes the instance and its root filesystem; a missing one is not an error.
    async fn remove(&self, id: &str) -> Result<()>;
    async fn status(&self, id: &str) -> Result<InstanceStatus>;
    async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecOutcome>;
    /// Every instance this host created, including half-made ones.
    async fn list_managed(&self) -> Result<Vec<ManagedInstance>>;
    /// Puts a read-only snapshot of `image` (an [`Instance::copy_of_image`])
    /// at `dest` if the runtime has one ready for less than a snapshot costs;
    /// `false` when not, and then the caller snapshots the root itself.
    async fn snapshot_image(&self, _image: &Path, _dest: &Path) -> bool {
        false
    }
}

/// Every runtime this host offers, by name, and the one used when neither
/// the client nor a policy chooses (SANDBOX_RUNTIME).
pub struct Runtimes {
    by_name: BTreeMap<String, Arc<dyn Runtime>>,
    default: String,
}

impl Runtimes {
    /// Fails when two runtimes share a name or `default` is not among them.
    pub fn new(
        default: &str,
        runtimes: Vec<Arc<dyn Runtime>>,
    ) -> std::result::Result<Self, String> {
        let mut by_name = BTreeMap::new();
        for runtime in runtimes {
            let name = runtime.name().to_string();
            if by_name.insert(name.clone(), runtime).is_some() {
                return Err(format!("two runtimes are named {name:?}"));
            }
        }
        if !by_name.contains_key(default) {
            return Err(format!(
                "SANDBOX_RUNTIME={default}: no such runtime; this host offers: {}",
                by_name.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(Self {
            by_name,
            default: default.to_string(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Runtime>> {
        self.by_name.get(name)
    }

    pub fn default_runtime(&self) -> &Arc<dyn Runtime> {
        &self.by_name[&self.default]
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        self.by_name.values()
    }
}

//! The Docker runtime, through the Docker Engine API (bollard). It requires an
//! engine running with `--storage-driver btrfs` and its data root on the Btrfs
//! filesystem at `DOCKER_BTRFS_PATH`: a container's writable layer is then a
//! Btrfs subvolume holding its whole root filesystem, which the sandbox layer
//! snapshots and swaps.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::{
    Config, CreateContainerOptions, ListContainersOptions, LogOutput, RemoveContainerOptions,
    StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::image::CreateImageOptions;
use bollard::models::{
    HostConfig, Mount, MountBindOptions, MountTypeEnum, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::Docker;
use futures_util::StreamExt;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{
    process_tree, ExecOutcome, ExecRequest, Instance, InstanceSpec, InstanceStatus,
    ManagedInstance, Result, Runtime, RuntimeError,
};
use crate::btrfs;

pub const LABEL_MANAGED: &str = "org.opensandbox.managed";
pub const LABEL_HOST: &str = "org.opensandbox.host";
pub const LABEL_SANDBOX: &str = "org.opensandbox.sandbox";

/// How long a pull may take before the image counts as unavailable; there is
/// no registry on most of our machines, so this is a bound, not an estimate.
const PULL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for an exec to report its exit code after its output ends.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(2);

/// Settings of the Docker runtime, from the serve configuration.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    pub docker_host: Option<String>,
    pub btrfs_path: PathBuf,
    pub network: String,
    pub host_id: Uuid,
}

pub struct DockerRuntime {
    docker: Docker,
    settings: DockerSettings,
    /// The engine's data root, where its Btrfs subvolumes live.
    root_dir: PathBuf,
}

impl DockerRuntime {
    /// Connects and checks that the engine keeps its data on Btrfs under
    /// `DOCKER_BTRFS_PATH`; the error says what to do otherwise.
    pub async fn connect(settings: DockerSettings) -> Result<Self> {
        let btrfs_path = &settings.btrfs_path;
        let is_btrfs = btrfs::is_btrfs_async(btrfs_path.clone())
            .await
            .map_err(|e| {
                RuntimeError::Setup(format!("DOCKER_BTRFS_PATH={}: {e}", btrfs_path.display()))
            })?;
        if !is_btrfs {
            return Err(RuntimeError::Setup(format!(
                "DOCKER_BTRFS_PATH={} is not a Btrfs filesystem. Mount one there \
                 (e.g. truncate -s 40G img; mkfs.btrfs img; mount -o loop img {}) \
                 or run scripts/setup.sh, which does it",
                btrfs_path.display(),
                btrfs_path.display()
            )));
        }
        let endpoint = settings
            .docker_host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
        let unreachable = |e: BollardError| {
            RuntimeError::Setup(format!(
                "cannot reach the Docker engine at DOCKER_HOST={endpoint}: {e}. \
                 Start dockerd (scripts/setup.sh does) or set DOCKER_HOST"
            ))
        };
        let docker = connect(settings.docker_host.as_deref())
            .map_err(unreachable)?
            .negotiate_version()
            .await
            .map_err(unreachable)?;
        let info = docker.info().await.map_err(unreachable)?;
        let driver = info.driver.unwrap_or_default();
        let root_dir = PathBuf::from(info.docker_root_dir.unwrap_or_default());
        let canonical_btrfs = tokio::fs::canonicalize(btrfs_path).await.map_err(|e| {
            RuntimeError::Setup(format!("DOCKER_BTRFS_PATH={}: {e}", btrfs_path.display()))
        })?;
        if driver != "btrfs" || !root_dir.starts_with(&canonical_btrfs) {
            return Err(RuntimeError::Setup(format!(
                "the Docker engine at DOCKER_HOST={endpoint} uses storage driver {driver:?} with data \
                 root {}; sandboxes need it on Btrfs under DOCKER_BTRFS_PATH={}. Start dockerd with \
                 --storage-driver btrfs --data-root {}/docker (scripts/setup.sh does)",
                root_dir.display(),
                btrfs_path.display(),
                btrfs_path.display()
            )));
        }
        info!(engine = %endpoint, root = %root_dir.display(), "docker engine ready");
        Ok(Self {
            docker,
            settings,
            root_dir,
        })
    }

    /// The writable layer of a container: with the btrfs driver, the engine
    /// records the layer's id in layerdb and keeps it as a subvolume.
    async fn rootfs_of(&self, container_id: &str) -> Result<PathBuf> {
        let mount_id_file = self
            .root_dir
            .join("image/btrfs/layerdb/mounts")
            .join(container_id)
            .join("mount-id");
        let mount_id = tokio::fs::read_to_string(&mount_id_file)
            .await
            .map_err(|e| {
                RuntimeError::Setup(format!(
                    "cannot find the writable layer of container {container_id} ({}): {e}",
                    mount_id_file.display()
                ))
            })?;
        let mount_id = mount_id.trim();
        if mount_id.is_empty()
            || !mount_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(RuntimeError::Setup(format!(
                "unexpected layer id {mount_id:?} for container {container_id}"
            )));
        }
        Ok(self.root_dir.join("btrfs/subvolumes").join(mount_id))
    }

    async fn pull(&self, image: &str) -> std::result::Result<(), String> {
        let options = CreateImageOptions {
            from_image: image,
            ..Default::default()
        };
        let mut stream = self.docker.create_image(Some(options), None, None);
        let pull = async {
            while let Some(progress) = stream.next().await {
                progress.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(PULL_TIMEOUT, pull)
            .await
            .map_err(|_| format!("pull timed out after {}s", PULL_TIMEOUT.as_secs()))?
    }

    async fn wait_exit_code(&self, exec_id: &str) -> Result<Option<i64>> {
        let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
        loop {
            let inspect = self
                .docker
                .inspect_exec(exec_id)
                .await
                .map_err(|e| engine("inspect exec", e))?;
            if inspect.running != Some(true) || tokio::time::Instant::now() >= deadline {
                return Ok(inspect.exit_code);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn kill_exec(&self, exec_id: &str) {
        match self.docker.inspect_exec(exec_id).await {
            Ok(inspect) => {
                if let Some(pid) = inspect
                    .pid
                    .and_then(|p| i32::try_from(p).ok())
                    .filter(|p| *p > 1)
                {
                    let killed = tokio::task::spawn_blocking(move || process_tree::kill_tree(pid))
                        .await
                        .unwrap_or(0);
                    debug!(exec_id, pid, killed, "killed timed-out command");
                }
            }
            Err(e) => warn!(exec_id, error = %e, "cannot inspect timed-out exec"),
        }
    }
}

fn connect(endpoint: Option<&str>) -> std::result::Result<Docker, BollardError> {
    const TIMEOUT_SECS: u64 = 120;
    match endpoint {
        Some(unix) if unix.starts_with("unix://") => {
            Docker::connect_with_unix(unix, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        Some(http) => Docker::connect_with_http(http, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_local_defaults(),
    }
}

fn bind(source: &std::path::Path, target: &str, read_only: bool) -> Mount {
    Mount {
        target: Some(target.to_string()),
        source: Some(source.display().to_string()),
        typ: Some(MountTypeEnum::BIND),
        read_only: Some(read_only),
        bind_options: Some(MountBindOptions {
            // Mounts made later under the host folder must not leak in.
            propagation: Some(bollard::models::MountBindOptionsPropagationEnum::RPRIVATE),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn status_of(err: &BollardError) -> Option<u16> {
    match err {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn engine(op: &'static str, err: BollardError) -> RuntimeError {
    RuntimeError::Engine {
        op,
        detail: err.to_string(),
    }
}

/// When runc cannot start the process (bad cwd, no shell), the engine reports
/// it as exit code 126 with its own message on the output stream.
fn start_failure(outcome: &ExecOutcome) -> Option<String> {
    const MARKER: &[u8] = b"OCI runtime exec failed";
    if outcome.exit_code != Some(126) || !outcome.stdout.starts_with(MARKER) {
        return None;
    }
    let message = String::from_utf8_lossy(&outcome.stdout);
    // The interesting part follows runc's fixed prefixes.
    let reason = message
        .rsplit_once("unable to start container process: ")
        .map_or(message.as_ref(), |(_, rest)| rest)
        .trim_end_matches(|c: char| c.is_whitespace())
        .trim_end_matches(": unknown");
    Some(reason.to_string())
}

/// Appends to a capped buffer, remembering whether anything was dropped.
fn push_capped(buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8], limit: usize) {
    let room = limit.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn healthy(&self) -> bool {
        self.docker.ping().await.is_ok()
    }

    async fn ensure_image(&self, image: &str) -> Result<()> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => {
                info!(image, "image not present, trying to pull it");
                self.pull(image)
                    .await
                    .map_err(|reason| RuntimeError::ImageUnavailable {
                        image: image.to_string(),
                        reason,
                    })
            }
            Err(e) => Err(engine("inspect image", e)),
        }
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Instance> {
        let sandbox_id = spec.sandbox_id.to_string();
        let labels = [
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_HOST.to_string(), self.settings.host_id.to_string()),
            (LABEL_SANDBOX.to_string(), sandbox_id.clone()),
        ]
        .into_iter()
        .collect();
        let config = Config {
            image: Some(spec.image.clone()),
            hostname: Some(spec.hostname.clone()),
            // The agent is init: it reaps, forwards signals and serves the
            // host on its socket; the image's own entrypoint is not used.
            entrypoint: Some(vec![crate::agent::BINARY_IN_SANDBOX.to_string()]),
            cmd: Some(spec.agent.args.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            network_disabled: Some(self.settings.network == "none"),
            host_config: Some(HostConfig {
                network_mode: Some(self.settings.network.clone()),
                init: Some(false),
                mounts: Some(vec![
                    bind(&spec.agent.binary, crate::agent::BINARY_IN_SANDBOX, true),
                    bind(
                        &spec.agent.socket_dir,
                        crate::agent::SOCKET_DIR_IN_SANDBOX,
                        false,
                    ),
                ]),
                // An agent that crashes takes the sandbox down with it (it is
                // PID 1); the engine starts it again. Stops the host asks for
                // (restore) are not restarted.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ON_FAILURE),
                    maximum_retry_count: Some(10),
                }),
                privileged: Some(false),
                security_opt: Some(vec!["no-new-privileges".to_string()]),
                pids_limit: Some(4096),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: format!("opensandbox-{sandbox_id}"),
            platform: None,
        };
        let created = self
            .docker
            .create_container(Some(options), config)
            .await
            .map_err(|e| engine("create container", e))?;
        let rootfs = match self.rootfs_of(&created.id).await {
            Ok(rootfs) => rootfs,
            Err(e) => {
                // Never leave a container behind that no row points to.
                let _ = self.remove(&created.id).await;
                return Err(e);
            }
        };
        Ok(Instance {
            id: created.id,
            rootfs,
            copy_of_image: None,
        })
    }

    async fn start(&self, id: &str) -> Result<()> {
        match self.docker.start_container::<String>(id, None).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Err(RuntimeError::NotFound(id.to_string())),
            Err(e) => Err(engine("start container", e)),
        }
    }

    async fn stop(&self, id: &str) -> Result<()> {
        match self
            .docker
            .stop_container(id, Some(StopContainerOptions { t: 0 }))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Err(RuntimeError::NotFound(id.to_string())),
            Err(e) => Err(engine("stop container", e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(engine("remove container", e)),
        }
    }

    async fn status(&self, id: &str) -> Result<InstanceStatus> {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => {
                let running = inspect.state.and_then(|s| s.running).unwrap_or(false);
                Ok(if running {
                    InstanceStatus::Running
                } else {
                    InstanceStatus::Stopped
                })
            }
            Err(e) if status_of(&e) == Some(404) => Ok(InstanceStatus::Missing),
            Err(e) => Err(engine("inspect container", e)),
        }
    }

    async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecOutcome> {
        let options = CreateExecOptions {
            cmd: Some(vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                request.command.clone(),
            ]),
            env: Some(
                request
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            working_dir: request.cwd.clone(),
            user: request.user.clone(),
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            ..Default::default()
        };
        let exec = match self.docker.create_exec(id, options).await {
            Ok(exec) => exec,
            Err(e) if status_of(&e) == Some(409) => return Err(RuntimeError::NotRunning),
            Err(e) if status_of(&e) == Some(404) => {
                return Err(RuntimeError::NotFound(id.to_string()))
            }
            Err(e) => return Err(engine("create exec", e)),
        };
        let mut output = match self.docker.start_exec(&exec.id, None).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return Err(RuntimeError::Engine {
                    op: "start exec",
                    detail: "engine detached the exec".into(),
                })
            }
            Err(e) if status_of(&e) == Some(409) => return Err(RuntimeError::NotRunning),
            Err(e) => return Err(engine("start exec", e)),
        };

        let mut outcome = ExecOutcome::default();
        let limit = request.output_limit;
        let collect = async {
            while let Some(frame) = output.next().await {
                match frame.map_err(|e| engine("read exec output", e))? {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => push_capped(
                        &mut outcome.stdout,
                        &mut outcome.stdout_truncated,
                        &message,
                        limit,
                    ),
                    LogOutput::StdErr { message } => push_capped(
                        &mut outcome.stderr,
                        &mut outcome.stderr_truncated,
                        &message,
                        limit,
                    ),
                    LogOutput::StdIn { .. } => {}
                }
            }
            Ok::<(), RuntimeError>(())
        };
        let finished = tokio::time::timeout(request.timeout, collect).await;
        match finished {
            Ok(result) => {
                result?;
                outcome.exit_code = self.wait_exit_code(&exec.id).await?;
                if let Some(reason) = start_failure(&outcome) {
                    return Err(RuntimeError::NotStarted(reason));
                }
            }
            Err(_elapsed) => {
                self.kill_exec(&exec.id).await;
                outcome.timed_out = true;
            }
        }
        Ok(outcome)
    }

    async fn list_managed(&self) -> Result<Vec<ManagedInstance>> {
        let filters = [(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_HOST}={}", self.settings.host_id),
            ],
        )]
        .into_iter()
        .collect();
        let options = ListContainersOptions {
            all: true,
            filters,
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine("list containers", e))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let sandbox_id = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SANDBOX))
                    .and_then(|s| Uuid::parse_str(s).ok());
                c.id.map(|id| ManagedInstance { id, sandbox_id })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_start_failures_are_recognised() {
        let failed = ExecOutcome {
            stdout: b"OCI runtime exec failed: exec failed: unable to start container process: \
                      chdir to cwd (\"/nope\") set in config.json failed: no such file or directory: unknown\r\n"
                .to_vec(),
            exit_code: Some(126),
            ..Default::default()
        };
        let reason = start_failure(&failed).unwrap();
        assert!(reason.starts_with("chdir to cwd (\"/nope\")"), "{reason}");
        assert!(!reason.ends_with("unknown"), "{reason}");
        let ordinary = ExecOutcome {
            stdout: b"hi".to_vec(),
            exit_code: Some(126),
            ..Default::default()
        };
        assert!(start_failure(&ordinary).is_none());
    }

    #[test]
    fn capped_buffers_keep_the_head_and_flag_the_rest() {
        let mut buf = Vec::new();
        let mut truncated = false;
        push_capped(&mut buf, &mut truncated, b"hello", 8);
        assert!(!truncated);
        push_capped(&mut buf, &mut truncated, b" world", 8);
        assert_eq!(buf, b"hello wo");
        assert!(truncated);
        push_capped(&mut buf, &mut truncated, b"more", 8);
        assert_eq!(buf.len(), 8);
    }
}

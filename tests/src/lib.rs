//! End-to-end harness for the `opensandbox` host.
//!
//! [`Host`] spawns the real host binary (`opensandbox serve`) on a free port of
//! 127.0.0.1 with its own temporary `DATA_DIR`, waits for `GET /health`, and
//! offers a small typed client over the REST API (see `docs/API.md`).
//!
//! The binary is taken from `OPENSANDBOX_BIN`, else `<workspace>/target/debug/opensandbox`
//! (build it with `cargo build -p opensandbox`).
//!
//! Dropping a [`Host`] deletes every sandbox it made (through the API while the
//! process runs, then `docker rm -f` by the host's label and a removal of the host's
//! Btrfs folder as a last resort), kills the process and removes the data dir.
//! On drop the tail of the host's log is printed to stderr (which the test harness shows
//! only for failing tests); see [`Host::set_log_on_drop`].

pub mod stream;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use aws_sdk_s3::error::DisplayErrorContext;
pub use reqwest::{Method, StatusCode};
use serde::Deserialize;
pub use serde_json::{json, Value};

/// Default engine socket when `DOCKER_HOST` is unset.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///run/opensandbox/docker.sock";
/// Default Btrfs mount when `DOCKER_BTRFS_PATH` is unset.
pub const DEFAULT_BTRFS_PATH: &str = "/var/lib/sandbox-btrfs";
/// Default base image when `DOCKER_IMAGE` is unset.
pub const DEFAULT_IMAGE: &str = "ubuntu:22.04";

/// How long `start()`/`restart()` wait for `GET /health` to answer 200.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `try_start_expect_failure` waits for the process to exit.
pub const FAILURE_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Configuration variables of the host that the harness controls; any value of these in
/// the test process's environment is removed before the harness sets its own.
const HOST_CONFIG_VARS: &[&str] = &[
    "HOST",
    "PORT",
    "DATA_DIR",
    "SANDBOX_RUNTIME",
    "DOCKER_IMAGE",
    "DOCKER_BTRFS_PATH",
    "DOCKER_NETWORK",
    "DOCKER_HOST",
    "RUN_OUTPUT_LIMIT_BYTES",
    "RUN_TIMEOUT_MS",
    "RUN_MAX_TIMEOUT_MS",
    "RUST_LOG",
    "S3_BUCKET",
    "S3_REGION",
    "S3_PREFIX",
    "S3_ENDPOINT",
    "AGENT_BINARY",
    "PROCESS_OUTPUT_BUFFER_BYTES",
];

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => default.to_string(),
    }
}

/// `DOCKER_HOST`, or `unix:///run/opensandbox/docker.sock`.
pub fn docker_host() -> String {
    env_or("DOCKER_HOST", DEFAULT_DOCKER_HOST)
}

/// `DOCKER_BTRFS_PATH`, or `/var/lib/sandbox-btrfs`.
pub fn btrfs_path() -> PathBuf {
    PathBuf::from(env_or("DOCKER_BTRFS_PATH", DEFAULT_BTRFS_PATH))
}

/// `DOCKER_IMAGE`, or `ubuntu:22.04`.
pub fn docker_image() -> String {
    env_or("DOCKER_IMAGE", DEFAULT_IMAGE)
}

/// The Cargo workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent folder")
        .to_path_buf()
}

/// The host binary: `OPENSANDBOX_BIN`, else `<workspace>/target/debug/opensandbox`.
pub fn default_host_bin() -> PathBuf {
    match std::env::var_os("OPENSANDBOX_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/debug/opensandbox"),
    }
}

/// The static agent: `AGENT_BINARY`, else `<workspace>/target/agent/opensandbox-agent`
/// (where scripts/build-agent.sh puts it).
pub fn agent_binary() -> PathBuf {
    match std::env::var_os("AGENT_BINARY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/agent/opensandbox-agent"),
    }
}

/// The runtime the end-to-end suites run against: `OPENSANDBOX_TEST_RUNTIME`
/// (`docker`, the default, or `namespaces`, the first-party runtime plugin).
pub fn test_runtime() -> String {
    env_or("OPENSANDBOX_TEST_RUNTIME", "docker")
}

/// True when the suites run against Docker (tests of Docker-only behaviour
/// return early otherwise, saying so).
pub fn on_docker() -> bool {
    test_runtime() == "docker"
}

/// Skips the rest of a test (returning Ok) unless the suites run against Docker.
#[macro_export]
macro_rules! docker_only {
    ($why:expr) => {
        if !$crate::on_docker() {
            eprintln!("skipped on runtime {}: {}", $crate::test_runtime(), $why);
            return Ok(());
        }
    };
}

/// Makes a Docker image usable by the runtime under test: nothing for
/// Docker; for the namespaces runtime, its base root filesystem
/// (scripts/build-rootfs.sh, which skips an image it already has).
pub fn prepare_image_for_runtime(image: &str) -> Result<()> {
    if on_docker() {
        return Ok(());
    }
    let status = Command::new(workspace_root().join("scripts/build-rootfs.sh"))
        .arg(image)
        .env("DOCKER_HOST", docker_host())
        .env("DOCKER_BTRFS_PATH", btrfs_path())
        .stdout(Stdio::null())
        .status()
        .context("running scripts/build-rootfs.sh")?;
    if !status.success() {
        bail!("scripts/build-rootfs.sh {image} failed: {status}");
    }
    Ok(())
}

/// A built Wasm plugin: `<workspace>/target/plugins/<name>.wasm` (scripts/build-plugins.sh).
pub fn plugin_wasm(name: &str) -> PathBuf {
    workspace_root().join(format!("target/plugins/{name}.wasm"))
}

/// The plugins-file entry of the first-party namespaces runtime, with the
/// grants it needs.
pub fn namespaces_plugin_entry() -> String {
    format!(
        r#"
[[plugin]]
name = "namespaces"
kind = "runtime"
file = "{}"
[plugin.grants]
state = true
btrfs = true
process = ["/usr/bin/bwrap"]
"#,
        plugin_wasm("namespaces").display()
    )
}

/// The host environment for the runtime under test: for a plugin runtime,
/// SANDBOX_RUNTIME and a plugins file that loads it (merged with the test's
/// own plugins file, if it has one).
fn runtime_env(data_dir: &Path, extra: &[(String, String)]) -> Vec<(String, String)> {
    let runtime = test_runtime();
    if runtime == "docker" {
        return Vec::new();
    }
    let own = extra
        .iter()
        .rev()
        .find(|(k, _)| k == "PLUGINS_CONFIG")
        .map(|(_, v)| PathBuf::from(v));
    let mut text = match &own {
        Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
        None => String::new(),
    };
    if !text.contains("kind = \"runtime\"") || !text.contains("name = \"namespaces\"") {
        text.push_str(&namespaces_plugin_entry());
    }
    // Beside the test's own file, so that its relative paths still resolve.
    let merged = match &own {
        Some(path) => path.with_extension("with-runtime.toml"),
        None => data_dir.join("plugins-runtime.toml"),
    };
    if let Err(e) = std::fs::write(&merged, text) {
        eprintln!("cannot write {}: {e}", merged.display());
    }
    let mut env = vec![("PLUGINS_CONFIG".to_string(), merged.display().to_string())];
    if !extra.iter().any(|(k, _)| k == "SANDBOX_RUNTIME") {
        env.push(("SANDBOX_RUNTIME".to_string(), runtime));
    }
    env
}

fn check_bin(bin: &Path) -> Result<()> {
    if !agent_binary().is_file() {
        bail!(
            "agent binary not found at {}: build it with scripts/build-agent.sh \
             (or set AGENT_BINARY to its path)",
            agent_binary().display()
        );
    }
    if !bin.is_file() {
        bail!(
            "opensandbox host binary not found at {}: build it with `cargo build -p opensandbox` \
             (or set OPENSANDBOX_BIN to its path)",
            bin.display()
        );
    }
    Ok(())
}

/// The folder where the host keeps a sandbox's snapshots (per docs/API.md).
pub fn sandbox_dir(host_id: &str, sandbox_id: &str) -> PathBuf {
    btrfs_path()
        .join("opensandbox/hosts")
        .join(host_id)
        .join("sandboxes")
        .join(sandbox_id)
}

/// Picks a free TCP port on 127.0.0.1 (binds port 0 and releases it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

// ---------------------------------------------------------------------------
// docker / btrfs CLI helpers
// ---------------------------------------------------------------------------

/// A `docker` command with `DOCKER_HOST` set.
pub fn docker_cmd() -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", docker_host());
    c
}

/// Runs `docker ARGS`, returns its stdout; fails with stderr when it exits non-zero.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = docker_cmd()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running docker {args:?} (is the docker CLI on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "docker {:?} failed ({}): {}{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ids of all containers (running or not) with the given label (`key` or `key=value`).
/// Panics when the docker CLI fails.
pub fn docker_containers_with_label(label: &str) -> Vec<String> {
    let filter = format!("label={label}");
    docker(&["ps", "-a", "-q", "--no-trunc", "--filter", &filter])
        .unwrap_or_else(|e| panic!("listing containers with label {label}: {e:#}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The container of a sandbox (by label `org.opensandbox.sandbox=<id>`), if exactly one.
pub fn container_of_sandbox(sandbox_id: &str) -> Result<String> {
    let ids = docker_containers_with_label(&format!("org.opensandbox.sandbox={sandbox_id}"));
    match ids.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected exactly one container labelled org.opensandbox.sandbox={sandbox_id}, found {ids:?}"),
    }
}

/// `docker inspect -f {{.State.Running}}` of a container.
pub fn container_running(container: &str) -> Result<bool> {
    Ok(docker(&["inspect", "-f", "{{.State.Running}}", container])?.trim() == "true")
}

/// Lines of `btrfs subvolume list $DOCKER_BTRFS_PATH` that contain `needle`.
pub fn btrfs_subvolumes_containing(needle: &str) -> Result<Vec<String>> {
    let root = btrfs_path();
    let out = Command::new("btrfs")
        .args(["subvolume", "list"])
        .arg(&root)
        .output()
        .context("running btrfs subvolume list (is btrfs-progs installed?)")?;
    if !out.status.success() {
        bail!(
            "btrfs subvolume list {} failed: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect())
}

/// Filesystem type name of a path as `stat -f -c %T` prints it (e.g. `btrfs`, `tmpfs`).
pub fn fs_type(path: &Path) -> Result<String> {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .context("running stat -f")?;
    if !out.status.success() {
        bail!(
            "stat -f {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Best-effort removal of a folder tree on Btrfs that may hold subvolumes (deepest first).
fn remove_btrfs_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let mut subvols = Vec::new();
    collect_subvolumes(dir, &mut subvols);
    // Deepest first: a subvolume holding nested subvolumes cannot be deleted before them.
    subvols.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for sv in subvols {
        let _ = Command::new("btrfs")
            .args(["property", "set", "-ts"])
            .arg(&sv)
            .args(["ro", "false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&sv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn collect_subvolumes(dir: &Path, out: &mut Vec<PathBuf>) {
    // On Btrfs the root directory of a subvolume has inode number 256.
    if let Ok(md) = std::fs::symlink_metadata(dir) {
        if !md.is_dir() {
            return;
        }
        if md.ino() == 256 {
            out.push(dir.to_path_buf());
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_subvolumes(&e.path(), out);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// Polls `f` every `every` until it returns `Ok(true)` or `timeout` passes; returns whether
/// it became true. Errors from `f` count as "not yet" (the last one is returned on timeout).
pub async fn wait_until<F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = f().await;
        if let Ok(true) = last {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return match last {
                Err(e) => Err(e),
                _ => Ok(false),
            };
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------
// API types and assertions
// ---------------------------------------------------------------------------

/// Result of `POST /vms/{name}/run`.
#[derive(Debug, Clone, Deserialize)]
pub struct RunResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i64>,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub truncated: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl RunResult {
    /// A short description for assertion messages (streams cut to 2000 chars).
    pub fn brief(&self) -> String {
        format!(
            "exit_code={:?} timed_out={} truncated={} (stdout {} / stderr {}) duration_ms={}\n\
             stdout ({} bytes): {:?}\nstderr ({} bytes): {:?}",
            self.exit_code,
            self.timed_out,
            self.truncated,
            self.stdout_truncated,
            self.stderr_truncated,
            self.duration_ms,
            self.stdout.len(),
            cut(&self.stdout, 2000),
            self.stderr.len(),
            cut(&self.stderr, 2000),
        )
    }
}

fn cut(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = n;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// A response as `(status, JSON body)`. An empty body is `Value::Null`; a body that is not
/// JSON is `Value::String(text)`.
pub type Resp = (StatusCode, Value);

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 4000 {
        format!("{}… ({} chars)", cut(&s, 4000), s.len())
    } else {
        s
    }
}

/// Asserts that `resp` is an error with the given status and `error.code`, shaped as
/// `{"error": {"code": ..., "message": <non-empty string>}}`.
#[track_caller]
pub fn assert_error(resp: &Resp, status: u16, code: &str) {
    let (st, body) = resp;
    assert_eq!(
        st.as_u16(),
        status,
        "expected HTTP {status} with error code {code:?}, got {st}: {}",
        show(body)
    );
    let err = body.get("error").unwrap_or_else(|| {
        panic!(
            "expected an {{\"error\": ...}} body for HTTP {status}, got: {}",
            show(body)
        )
    });
    assert_eq!(
        err.get("code").and_then(Value::as_str),
        Some(code),
        "expected error code {code:?} (HTTP {status}), got: {}",
        show(body)
    );
    let msg = err.get("message").and_then(Value::as_str);
    assert!(
        msg.is_some_and(|m| !m.trim().is_empty()),
        "expected a non-empty error.message string, got: {}",
        show(body)
    );
}

/// Asserts the status of a response, showing the body otherwise.
#[track_caller]
pub fn assert_status(resp: &Resp, status: u16) {
    assert_eq!(
        resp.0.as_u16(),
        status,
        "expected HTTP {status}, got {}: {}",
        resp.0,
        show(&resp.1)
    );
}

fn expect(resp: Resp, status: u16, what: &str) -> Result<Value> {
    if resp.0.as_u16() != status {
        bail!(
            "{what}: expected HTTP {status}, got {}: {}",
            resp.0,
            show(&resp.1)
        );
    }
    Ok(resp.1)
}

/// Names of `{"snapshots": [{"name", ...}]}` in order.
/// The names in a `GET /vms` body.
pub fn vm_names(body: &Value) -> Vec<String> {
    body.get("vms")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn snapshot_names(body: &Value) -> Vec<String> {
    body.get("snapshots")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Percent-encodes a path segment or query value (RFC 3986 unreserved kept).
pub fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------

/// How to start a [`Host`].
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// Host binary; default [`default_host_bin`].
    pub bin: Option<PathBuf>,
    /// Extra environment for the host process (applied last, overriding the defaults).
    pub env: Vec<(String, String)>,
}

/// A running (or stopped) `opensandbox serve` process with its own data dir and port.
pub struct Host {
    bin: PathBuf,
    env: Vec<(String, String)>,
    data_dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
    client: reqwest::Client,
    admin: tokio::sync::Mutex<Option<String>>,
    /// Every key that the harness saw created (for cleanup on drop).
    keys: Mutex<Vec<String>>,
    host_id: Mutex<Option<String>>,
    log_on_drop: bool,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("bin", &self.bin)
            .field("data_dir", &self.data_dir.path())
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

/// Base environment of the host process, before `extra`.
fn base_env(port: u16, data_dir: &Path) -> Vec<(String, String)> {
    vec![
        ("HOST".into(), "127.0.0.1".into()),
        ("PORT".into(), port.to_string()),
        ("DATA_DIR".into(), data_dir.display().to_string()),
        ("DOCKER_HOST".into(), docker_host()),
        (
            "DOCKER_BTRFS_PATH".into(),
            btrfs_path().display().to_string(),
        ),
        ("DOCKER_IMAGE".into(), docker_image()),
        ("AGENT_BINARY".into(), agent_binary().display().to_string()),
        ("RUST_LOG".into(), "info".into()),
    ]
}

fn configure(cmd: &mut Command, port: u16, data_dir: &Path, extra: &[(String, String)]) {
    cmd.arg("serve");
    for v in HOST_CONFIG_VARS {
        cmd.env_remove(v);
    }
    let runtime = runtime_env(data_dir, extra);
    for (k, v) in base_env(port, data_dir).iter().chain(extra).chain(&runtime) {
        cmd.env(k, v);
    }
    // The host reads `.env` from its working directory: run it in the data dir so that
    // no `.env` of the developer's checkout leaks in.
    cmd.current_dir(data_dir);
    cmd.stdin(Stdio::null());
    // If the test process dies without running destructors, take the host down with it.
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn tail_of_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("building reqwest client")
}

impl Host {
    /// Starts a host with default options and waits until `GET /health` answers 200.
    pub async fn start() -> Result<Self> {
        Self::start_with(HostOptions::default()).await
    }

    /// Starts a host with extra environment variables.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(HostOptions {
            bin: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await
    }

    /// Starts a host with the given options.
    pub async fn start_with(opts: HostOptions) -> Result<Self> {
        let bin = opts.bin.unwrap_or_else(default_host_bin);
        check_bin(&bin)?;
        let data_dir = tempfile::Builder::new()
            .prefix("opensandbox-e2e-")
            .tempdir()
            .context("creating the host's data dir")?;
        let mut host = Host {
            bin,
            env: opts.env,
            data_dir,
            port: free_port()?,
            child: None,
            starts: 0,
            client: http_client(),
            admin: tokio::sync::Mutex::new(None),
            keys: Mutex::new(Vec::new()),
            host_id: Mutex::new(None),
            log_on_drop: true,
        };
        host.spawn_and_wait().await?;
        Ok(host)
    }

    /// Runs `opensandbox serve` with the harness's environment plus `extra_env`, expecting it
    /// to exit by itself (a start-up failure) within 30 s. Returns its exit status and its
    /// stdout+stderr. Fails if it is still running after 30 s (it is then killed).
    pub async fn try_start_expect_failure(
        extra_env: &[(&str, &str)],
    ) -> Result<(ExitStatus, String)> {
        let bin = default_host_bin();
        check_bin(&bin)?;
        let data_dir = tempfile::Builder::new()
            .prefix("opensandbox-e2e-fail-")
            .tempdir()?;
        let port = free_port()?;
        let extra: Vec<(String, String)> = extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut cmd = Command::new(&bin);
        configure(&mut cmd, port, data_dir.path(), &extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        match tokio::time::timeout(FAILURE_EXIT_TIMEOUT, child.wait_with_output()).await {
            Ok(out) => {
                let out = out?;
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                Ok((out.status, text))
            }
            Err(_) => bail!(
                "`opensandbox serve` with {extra_env:?} was still running after {:?}; \
                 expected it to refuse to start and exit non-zero",
                FAILURE_EXIT_TIMEOUT
            ),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("host.log")
    }

    /// The last `lines` lines of the host's log (stdout and stderr, all starts).
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of_file(&self.log_path(), lines)
    }

    /// Whether dropping the host prints the tail of its log to stderr (default true; the
    /// test harness only shows the stderr of failing tests). Always printed during a panic.
    pub fn set_log_on_drop(&mut self, on: bool) {
        self.log_on_drop = on;
    }

    /// The whole log of the host process (all starts).
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("host already running");
        }
        self.starts += 1;
        let log_path = self.log_path();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(
            log,
            "===== opensandbox-e2e: start #{} on port {} =====",
            self.starts, self.port
        )?;
        let mut cmd = Command::new(&self.bin);
        configure(&mut cmd, self.port, self.data_dir.path(), &self.env);
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} serve", self.bin.display()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_healthy().await {
            let tail = self.log_tail(40);
            return Err(e.context(format!("host did not become healthy; log tail:\n{tail}")));
        }
        Ok(())
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        let url = self.url("/health");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    self.child = None;
                    bail!("host process exited during start-up: {st}");
                }
            }
            let last = match self
                .client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) if r.status() == StatusCode::OK => return Ok(()),
                Ok(r) => format!("GET /health -> {}", r.status()),
                Err(e) => format!("GET /health: {e}"),
            };
            if Instant::now() >= deadline {
                bail!("GET /health did not answer 200 within {HEALTH_TIMEOUT:?} ({last})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the host process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Process id of the running host.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the host (a crash) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().context("waiting for the killed host")?;
        }
        Ok(())
    }

    /// SIGTERMs the host and waits up to 30 s for it to exit (then SIGKILLs it and fails).
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("host is not running");
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("host did not exit within 30 s of SIGTERM (killed it)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the host if it runs (SIGTERM), then starts it again on the same data dir and port.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        } else if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.spawn_and_wait().await
    }

    /// The host's data dir (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The port the host listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The host id read from `$DATA_DIR/host-id`.
    pub fn host_id(&self) -> Result<String> {
        let p = self.data_dir.path().join("host-id");
        let id = std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_string();
        if id.is_empty() {
            bail!("{} is empty", p.display());
        }
        *self.host_id.lock().unwrap() = Some(id.clone());
        Ok(id)
    }

    /// The reqwest client (no proxy) used by the harness.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    // -- generic requests ----------------------------------------------------

    /// Sends a request; `body` is sent as JSON (with `content-type: application/json`).
    pub async fn req(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<Resp> {
        let mut rb = self.client.request(method.clone(), self.url(path));
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("{method} {path}: request failed"))?;
        Self::read(resp).await
    }

    /// Sends raw bytes with an optional content type (for malformed-body tests).
    pub async fn req_raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Resp> {
        let mut rb = self.client.request(method.clone(), self.url(path));
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("{method} {path}: request failed"))?;
        Self::read(resp).await
    }

    async fn read(resp: reqwest::Response) -> Result<Resp> {
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading response body")?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, body))
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Result<Resp> {
        self.req(Method::GET, path, key, None).await
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: Value) -> Result<Resp> {
        self.req(Method::POST, path, key, Some(body)).await
    }

    pub async fn delete_req(&self, path: &str, key: Option<&str>) -> Result<Resp> {
        self.req(Method::DELETE, path, key, None).await
    }

    // -- keys ----------------------------------------------------------------

    fn remember_key(&self, key: &str) {
        self.keys.lock().unwrap().push(key.to_string());
    }

    /// Registers a key created outside the typed client (for cleanup on drop).
    pub fn track_key(&self, key: &str) {
        self.remember_key(key)
    }

    /// The first (admin) key: `POST /api-keys` with no key and no body, done once.
    pub async fn admin_key(&self) -> Result<String> {
        let mut g = self.admin.lock().await;
        if let Some(k) = g.as_ref() {
            return Ok(k.clone());
        }
        let resp = self.req(Method::POST, "/api-keys", None, None).await?;
        let body = expect(resp, 201, "POST /api-keys (first key, no x-api-key)")?;
        let key = body
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("POST /api-keys: no \"key\" in {}", show(&body)))?
            .to_string();
        self.remember_key(&key);
        *g = Some(key.clone());
        Ok(key)
    }

    /// Creates a key with the admin key; `body` as for `POST /api-keys`. Returns the object.
    pub async fn create_key_with(&self, body: Value) -> Result<Value> {
        let admin = self.admin_key().await?;
        let resp = self.post("/api-keys", Some(&admin), body).await?;
        let body = expect(resp, 201, "POST /api-keys")?;
        let key = body
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("POST /api-keys: no \"key\" in {}", show(&body)))?;
        self.remember_key(key);
        Ok(body)
    }

    /// Creates a non-admin key and returns its secret.
    pub async fn create_key(&self) -> Result<String> {
        let body = self.create_key_with(json!({"name": "e2e"})).await?;
        Ok(body["key"].as_str().unwrap_or_default().to_string())
    }

    // -- sandboxes -----------------------------------------------------------

    /// `POST /vms` expecting 201; returns the sandbox object.
    pub async fn create_vm(&self, key: &str, body: Value) -> Result<Value> {
        let resp = self.post("/vms", Some(key), body.clone()).await?;
        expect(resp, 201, &format!("POST /vms {body}"))
    }

    /// `POST /vms {"name": name}` expecting 201.
    pub async fn create_vm_named(&self, key: &str, name: &str) -> Result<Value> {
        self.create_vm(key, json!({ "name": name })).await
    }

    /// `GET /vms/{name}` expecting 200.
    pub async fn get_vm(&self, key: &str, vm: &str) -> Result<Value> {
        let resp = self.get(&format!("/vms/{}", enc(vm)), Some(key)).await?;
        expect(resp, 200, &format!("GET /vms/{vm}"))
    }

    /// `GET /vms` expecting 200; returns the `vms` array.
    pub async fn list_vms(&self, key: &str) -> Result<Vec<Value>> {
        let resp = self.get("/vms", Some(key)).await?;
        let body = expect(resp, 200, "GET /vms")?;
        body.get("vms")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| anyhow!("GET /vms: no \"vms\" array in {}", show(&body)))
    }

    /// `POST /vms/{vm}/run {"command": cmd}` expecting 200.
    pub async fn run(&self, key: &str, vm: &str, cmd: &str) -> Result<RunResult> {
        self.run_with(key, vm, json!({ "command": cmd })).await
    }

    /// `POST /vms/{vm}/run` with a full body, expecting 200.
    pub async fn run_with(&self, key: &str, vm: &str, body: Value) -> Result<RunResult> {
        let resp = self
            .post(&format!("/vms/{}/run", enc(vm)), Some(key), body.clone())
            .await?;
        let v = expect(resp, 200, &format!("POST /vms/{vm}/run {}", show(&body)))?;
        serde_json::from_value(v.clone())
            .with_context(|| format!("run result of unexpected shape: {}", show(&v)))
    }

    /// Runs `cmd`, requires exit code 0 and returns stdout.
    pub async fn run_ok(&self, key: &str, vm: &str, cmd: &str) -> Result<String> {
        let r = self.run(key, vm, cmd).await?;
        if r.exit_code != Some(0) || r.timed_out {
            bail!("command {cmd:?} in {vm} did not succeed: {}", r.brief());
        }
        Ok(r.stdout)
    }

    /// `POST /vms/{vm}/snapshots {"name"}` expecting 201.
    pub async fn snapshot(&self, key: &str, vm: &str, name: &str) -> Result<Value> {
        let resp = self
            .post(
                &format!("/vms/{}/snapshots", enc(vm)),
                Some(key),
                json!({ "name": name }),
            )
            .await?;
        expect(resp, 201, &format!("POST /vms/{vm}/snapshots {name:?}"))
    }

    /// `GET /vms/{vm}/snapshots` expecting 200; returns the names in order.
    pub async fn snapshots(&self, key: &str, vm: &str) -> Result<Vec<String>> {
        let resp = self
            .get(&format!("/vms/{}/snapshots", enc(vm)), Some(key))
            .await?;
        let body = expect(resp, 200, &format!("GET /vms/{vm}/snapshots"))?;
        if body.get("snapshots").and_then(Value::as_array).is_none() {
            bail!(
                "GET /vms/{vm}/snapshots: no \"snapshots\" array in {}",
                show(&body)
            );
        }
        Ok(snapshot_names(&body))
    }

    /// `DELETE /vms/{vm}/snapshots/{name}` expecting 204.
    pub async fn delete_snapshot(&self, key: &str, vm: &str, name: &str) -> Result<()> {
        let resp = self
            .delete_req(
                &format!("/vms/{}/snapshots/{}", enc(vm), enc(name)),
                Some(key),
            )
            .await?;
        expect(resp, 204, &format!("DELETE /vms/{vm}/snapshots/{name}"))?;
        Ok(())
    }

    /// `POST /vms/{vm}/restore {"snapshot"}` expecting 200.
    pub async fn restore(&self, key: &str, vm: &str, snapshot: &str) -> Result<Value> {
        let resp = self
            .post(
                &format!("/vms/{}/restore", enc(vm)),
                Some(key),
                json!({ "snapshot": snapshot }),
            )
            .await?;
        expect(resp, 200, &format!("POST /vms/{vm}/restore {snapshot:?}"))
    }

    /// `DELETE /vms/{vm}` expecting 204.
    pub async fn delete(&self, key: &str, vm: &str) -> Result<()> {
        let resp = self
            .delete_req(&format!("/vms/{}", enc(vm)), Some(key))
            .await?;
        expect(resp, 204, &format!("DELETE /vms/{vm}"))?;
        Ok(())
    }

    // -- cleanup -------------------------------------------------------------

    /// Deletes (through the API) every sandbox of every key the harness knows.
    /// Returns the sandboxes it could not delete.
    pub async fn delete_all_vms(&self) -> Vec<String> {
        let keys: Vec<String> = self.keys.lock().unwrap().clone();
        let mut failed = Vec::new();
        for key in keys {
            let Ok((st, body)) = self.get("/vms", Some(&key)).await else {
                continue;
            };
            if st != StatusCode::OK {
                continue; // revoked key, etc.
            }
            let names = vm_names(&body);
            for name in names {
                if let Err(e) = self.delete(&key, &name).await {
                    failed.push(format!("{name}: {e:#}"));
                }
            }
        }
        failed
    }

    fn cleanup_blocking(&mut self) {
        let running = self.is_running();
        if running && !self.keys.lock().unwrap().is_empty() {
            // Delete through the API on a separate thread with its own runtime: we may be
            // inside (and blocking) the test's runtime here.
            let port = self.port;
            let keys = self.keys.lock().unwrap().clone();
            let h = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let shadow = ApiOnly {
                        port,
                        client: http_client(),
                    };
                    let _ =
                        tokio::time::timeout(Duration::from_secs(120), shadow.delete_all(&keys))
                            .await;
                });
            });
            let _ = h.join();
        }
        let _ = self.kill();
        // Last resort: anything still labelled with our host id, and our Btrfs folder.
        let cached = self.host_id.lock().unwrap().clone();
        let id = cached.or_else(|| self.host_id().ok());
        if let Some(id) = id {
            if uuid::Uuid::parse_str(&id).is_ok() {
                let left =
                    docker_containers_with_label_quiet(&format!("org.opensandbox.host={id}"));
                if !left.is_empty() {
                    let mut args = vec!["rm", "-f", "-v"];
                    args.extend(left.iter().map(String::as_str));
                    let _ = docker(&args);
                }
                remove_btrfs_tree(&btrfs_path().join("opensandbox/hosts").join(&id));
            }
        }
    }
}

fn docker_containers_with_label_quiet(label: &str) -> Vec<String> {
    let filter = format!("label={label}");
    docker(&["ps", "-a", "-q", "--no-trunc", "--filter", &filter])
        .map(|s| {
            s.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// A minimal client used from `Drop` (no access to `Host`).
struct ApiOnly {
    port: u16,
    client: reqwest::Client,
}

impl ApiOnly {
    async fn delete_all(&self, keys: &[String]) {
        for key in keys {
            let Ok(r) = self
                .client
                .get(format!("http://127.0.0.1:{}/vms", self.port))
                .header("x-api-key", key)
                .send()
                .await
            else {
                continue;
            };
            if r.status() != StatusCode::OK {
                continue;
            }
            let Ok(body) = r.json::<Value>().await else {
                continue;
            };
            let names = vm_names(&body);
            for n in names {
                let _ = self
                    .client
                    .delete(format!("http://127.0.0.1:{}/vms/{}", self.port, enc(&n)))
                    .header("x-api-key", key)
                    .send()
                    .await;
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Printed on every drop: the test harness shows a test's stderr only when it fails
        // (also when it fails by returning `Err`, where no panic is in flight).
        if self.log_on_drop || std::thread::panicking() {
            eprintln!(
                "----- opensandbox host log (tail), data dir {} -----\n{}\n----- end of host log -----",
                self.data_dir.path().display(),
                self.log_tail(80)
            );
        }
        self.cleanup_blocking();
    }
}

// ---------------------------------------------------------------------------
// Misc helpers for tests
// ---------------------------------------------------------------------------

/// Whether a program is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// All string values inside a JSON value (recursively).
pub fn json_strings(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(m) => m.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// Files under a folder, recursively (regular files only).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&p, out),
                    Ok(t) if t.is_file() => out.push(p),
                    _ => {}
                }
            }
        }
    }
    walk(dir, &mut out);
    out
}

/// Whether `haystack` contains `needle` as a byte substring.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A `{k: v}` JSON object from pairs.
pub fn obj(pairs: &[(&str, &str)]) -> Value {
    let m: BTreeMap<&str, &str> = pairs.iter().copied().collect();
    json!(m)
}

// ---------------------------------------------------------------------------
// S3-compatible server
// ---------------------------------------------------------------------------

/// Which S3-compatible server [`S3Server::start`] runs: `OPENSANDBOX_TEST_S3` = `moto`
/// (the default) or `s3s-fs`. `scripts/test.sh` runs the transfer suite against both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Kind {
    /// moto's `moto_server` (Python, objects in memory; `MOTO_SERVER`): the fullest API
    /// (ListMultipartUploads among it), but it accepts any signature.
    Moto,
    /// `s3s-fs` (Rust, objects in files under a temporary folder; `S3S_FS`): checks every
    /// request's SigV4 signature against the one access key it is given. The benchmark's
    /// default server; no faster than moto for exports on two cores (README, Benchmarks).
    S3sFs,
}

impl S3Kind {
    /// The kind `OPENSANDBOX_TEST_S3` names (default moto).
    pub fn from_env() -> Result<Self> {
        match env_or("OPENSANDBOX_TEST_S3", "moto").as_str() {
            "moto" => Ok(S3Kind::Moto),
            "s3s-fs" => Ok(S3Kind::S3sFs),
            other => bail!("OPENSANDBOX_TEST_S3={other:?}: expected moto or s3s-fs"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            S3Kind::Moto => "moto_server",
            S3Kind::S3sFs => "s3s-fs",
        }
    }
}

const S3_ACCESS_KEY: &str = "e2e";
const S3_SECRET_KEY: &str = "e2e-secret";

/// A throwaway S3-compatible server on 127.0.0.1 with one bucket, installed by
/// `scripts/setup.sh`, killed (and its files removed) on drop. The harness talks to it
/// through aws-sdk-s3 with the same credentials as the host, so its requests are signed.
pub struct S3Server {
    kind: S3Kind,
    child: Child,
    port: u16,
    bucket: String,
    client: aws_sdk_s3::Client,
    /// s3s-fs's object folder.
    root: Option<tempfile::TempDir>,
}

impl S3Server {
    /// Starts the server `OPENSANDBOX_TEST_S3` names and creates the bucket.
    pub async fn start() -> Result<Self> {
        Self::start_kind(S3Kind::from_env()?).await
    }

    /// Starts a server of `kind` and creates the bucket.
    pub async fn start_kind(kind: S3Kind) -> Result<Self> {
        let port = free_port()?;
        let (bin, root) = match kind {
            S3Kind::Moto => (env_or("MOTO_SERVER", "moto_server"), None),
            S3Kind::S3sFs => (
                env_or("S3S_FS", "s3s-fs"),
                Some(tempfile::Builder::new().prefix("e2e-s3s-fs-").tempdir()?),
            ),
        };
        let mut cmd = Command::new(&bin);
        match &root {
            None => cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]),
            Some(root) => cmd
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(root.path()),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {bin} (scripts/setup.sh installs it)"))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                S3_ACCESS_KEY,
                S3_SECRET_KEY,
                None,
                None,
                "e2e",
            ))
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .build();
        let server = S3Server {
            kind,
            child,
            port,
            bucket: format!("e2e-{}", uuid::Uuid::new_v4().simple()),
            client: aws_sdk_s3::Client::from_conf(config),
            root,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                bail!("{bin} did not listen on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // moto's listener can come up before its application answers: retry briefly.
        let mut tries = 0;
        loop {
            match server
                .client
                .create_bucket()
                .bucket(&server.bucket)
                .send()
                .await
            {
                Ok(_) => break,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!(
                    "creating bucket {}: {}",
                    server.bucket,
                    DisplayErrorContext(&e)
                ),
            }
        }
        Ok(server)
    }

    pub fn kind(&self) -> S3Kind {
        self.kind
    }

    /// The server's process id (the benchmark reads its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server's process (SIGSTOP): requests to it hang until [`Self::resume`],
    /// which holds a transfer at a known point without timing.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            bail!(
                "signalling the S3 server: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Environment for a host that exports to this server under `prefix`.
    pub fn host_env(&self, prefix: &str) -> Vec<(String, String)> {
        [
            ("S3_BUCKET", self.bucket.as_str()),
            ("S3_ENDPOINT", &self.endpoint()),
            ("S3_PREFIX", prefix),
            ("S3_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Keys of the visible objects under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| anyhow!("listing {prefix}: {}", DisplayErrorContext(&e)))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        Ok(keys)
    }

    /// Ids of the multipart uploads in progress. s3s-fs does not implement
    /// ListMultipartUploads: there they are its `.upload-<id>.json` files.
    pub async fn uploads(&self) -> Result<Vec<String>> {
        if let Some(root) = &self.root {
            let mut ids = Vec::new();
            for entry in std::fs::read_dir(root.path())? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if let Some(id) = name
                    .strip_prefix(".upload-")
                    .and_then(|rest| rest.strip_suffix(".json"))
                {
                    ids.push(id.to_string());
                }
            }
            return Ok(ids);
        }
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| anyhow!("listing uploads: {}", DisplayErrorContext(&e)))?;
        Ok(out
            .uploads()
            .iter()
            .filter_map(|u| u.upload_id().map(str::to_string))
            .collect())
    }

    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| anyhow!("GET {key}: {}", DisplayErrorContext(&e)))?;
        Ok(out.body.collect().await?.into_bytes().to_vec())
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(data.into())
            .send()
            .await
            .map_err(|e| anyhow!("PUT {key}: {}", DisplayErrorContext(&e)))?;
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The `process` capability: host processes a runtime plugin starts, only
//! from the programs its grant lists, without a shell, with only the
//! variables it passes, stdin empty, in their own session.
//!
//! A process's id is `<pid>-<start time>` (the start time from
//! /proc/<pid>/stat), so a reused pid never matches an old id. Each plugin
//! has its own table, and a ledger folder under DATA_DIR (out of the
//! plugin's reach) records what it started: after a host restart the
//! processes still alive are adopted again, which is how sandboxes outlive
//! the host. The host reaps its own children; adopted ones are watched
//! through /proc.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use super::cgroups::{self, Cgroups, Group, Limits};
use super::userns::{self, IdRange, MapWriter};
use super::CapabilityError;
use crate::runtimes::process_tree;

const MAX_ARGS: usize = 4096;
const MAX_ARG_BYTES: usize = 128 * 1024;
/// How long a whole-tree SIGKILL waits for every member to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How often a whole-tree kill looks whether the tree is gone (it usually
/// is within a millisecond or two).
const KILL_POLL: Duration = Duration::from_micros(500);
/// How often a wait on an adopted process (not our child) looks again.
const ADOPTED_POLL: Duration = Duration::from_millis(5);

/// A process's state (mirrors the WIT variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Exited(i32),
    Signaled(i32),
}

/// The signals a plugin may send.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Term,
    Kill,
    Interrupt,
    Hangup,
}

impl Signal {
    fn number(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Interrupt => libc::SIGINT,
            Signal::Hangup => libc::SIGHUP,
        }
    }
}

/// How to start a process.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    pub env: Vec<(String, String)>,
    pub capture_output: bool,
    pub limits: Option<Limits>,
    /// Id mappings of a new user namespace to start it in.
    pub user_namespace: Option<Vec<IdRange>>,
}

/// The captured output of a process.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
}

/// Where an exit status lands when our own child ends.
#[derive(Default)]
struct ExitSlot {
    state: Mutex<Option<State>>,
    ended: Condvar,
}

struct Entry {
    pid: i32,
    start_time: u64,
    /// Set for our own children (reaped by us); None for adopted ones.
    exit: Option<Arc<ExitSlot>>,
    output: Arc<Mutex<Captured>>,
    group: Option<Group>,
}

/// What the ledger keeps per process.
#[derive(serde::Serialize, serde::Deserialize)]
struct LedgerRecord {
    program: PathBuf,
    group: Option<Group>,
    /// The boot the process was started in: pids and start times repeat
    /// across reboots, DATA_DIR does not forget.
    #[serde(default)]
    boot_id: Option<String>,
}

/// One runtime plugin's processes.
pub struct ProcessTable {
    plugin: Arc<str>,
    programs: Vec<PathBuf>,
    max_processes: usize,
    output_limit: usize,
    ledger: PathBuf,
    cgroups: Option<Cgroups>,
    runtime: tokio::runtime::Handle,
    entries: Mutex<HashMap<String, Entry>>,
}

impl ProcessTable {
    /// Opens the plugin's ledger and adopts the processes it lists that
    /// are still alive; the rest are forgotten.
    pub fn open(
        plugin: Arc<str>,
        programs: Vec<PathBuf>,
        max_processes: usize,
        output_limit: usize,
        ledger: PathBuf,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        fs::create_dir_all(&ledger).map_err(|e| format!("{}: {e}", ledger.display()))?;
        let table = Self {
            plugin,
            programs,
            max_processes,
            output_limit,
            cgroups: Cgroups::detect(),
            ledger,
            runtime,
            entries: Mutex::new(HashMap::new()),
        };
        table.adopt()?;
        Ok(table)
    }

    fn adopt(&self) -> Result<(), String> {
        let dir = fs::read_dir(&self.ledger).map_err(|e| e.to_string())?;
        let mut entries = self.lock();
        for file in dir.flatten() {
            let Some(id) = file.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let record: Option<LedgerRecord> = fs::read(file.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let this_boot = boot_id();
            let record = record.filter(|r| r.boot_id.is_some() && r.boot_id == this_boot);
            let alive = parse_id(&id).filter(|(pid, start)| is_alive(*pid, *start));
            match (alive, record) {
                (Some((pid, start_time)), Some(record)) => {
                    info!(plugin = %self.plugin, id, program = %record.program.display(), "adopted a process started before the restart");
                    entries.insert(
                        id,
                        Entry {
                            pid,
                            start_time,
                            exit: None,
                            output: Arc::default(),
                            group: record.group,
                        },
                    );
                }
                (_, record) => {
                    if let Some(group) = record.and_then(|r| r.group) {
                        group.remove();
                    }
                    let _ = fs::remove_file(file.path());
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves the map consistent (every
        // change is a single insert or remove), so a poisoned lock is usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cgroups(&self) -> Option<&'static str> {
        self.cgroups.as_ref().map(Cgroups::describe)
    }

    pub fn spawn(
        &self,
        program: &str,
        args: &[String],
        options: &SpawnOptions,
    ) -> Result<String, CapabilityError> {
        if !self.programs.iter().any(|p| p.as_os_str() == program) {
            return Err(CapabilityError::NotGranted(format!(
                "program {program:?} is not in this plugin's process grant"
            )));
        }
        check_args(args, &options.env)?;
        let began = Instant::now();
        // Ended processes count until released: each holds a ledger file, maybe
        // a cgroup and captured output.
        let known = self.lock().len();
        if known >= self.max_processes {
            return Err(CapabilityError::Failed(format!(
                "this plugin already has {known} processes (max_processes); release ended ones"
            )));
        }
        let group = match options.limits.filter(|l| !l.is_empty()) {
            None => None,
            Some(limits) => match &self.cgroups {
                Some(cgroups) => Some(
                    cgroups
                        .create(&self.plugin, &uuid::Uuid::new_v4().to_string(), &limits)
                        .map_err(CapabilityError::Failed)?,
                ),
                None if limits.best_effort => {
                    warn!(plugin = %self.plugin, "no cgroups on this machine; limits skipped (best effort)");
                    None
                }
                None => {
                    return Err(CapabilityError::Failed(
                        "resource limits need cgroups, which this machine does not mount".into(),
                    ))
                }
            },
        };
        let spawned = self.start(program, args, options, group.as_ref());
        let (pid, child) = match spawned {
            Ok(started) => started,
            Err(err) => {
                if let Some(group) = &group {
                    group.remove();
                }
                return Err(err);
            }
        };
        // A child that exited at once may already be reaped: it still has
        // an id, and its exit slot answers for it.
        let start_time = read_start_time(pid).unwrap_or(0);
        let id = format!("{pid}-{start_time}");
        let exit = Arc::new(ExitSlot::default());
        let output = Arc::new(Mutex::new(Captured::default()));
        self.watch(child, Arc::clone(&exit), Arc::clone(&output));
        let record = LedgerRecord {
            program: PathBuf::from(program),
            group: group.clone(),
            boot_id: boot_id(),
        };
        if let Err(e) = write_ledger(&self.ledger.join(&id), &record) {
            // Unrecorded, it would be lost at a restart while it runs on: a
            // runtime would then start its sandbox a second time.
            process_tree::kill_tree(pid);
            if let Some(group) = &group {
                group.remove();
            }
            return Err(CapabilityError::Failed(format!(
                "cannot record the process in the host's ledger: {e}"
            )));
        }
        debug!(plugin = %self.plugin, id, program, spawn_ms = began.elapsed().as_secs_f64() * 1000.0, "process started");
        self.lock().insert(
            id.clone(),
            Entry {
                pid,
                start_time,
                exit: Some(exit),
                output,
                group,
            },
        );
        Ok(id)
    }

    fn start(
        &self,
        program: &str,
        args: &[String],
        options: &SpawnOptions,
        group: Option<&Group>,
    ) -> Result<(i32, tokio::process::Child), CapabilityError> {
        let join_files = match group {
            Some(group) => group.join_files().map_err(CapabilityError::Failed)?,
            None => Vec::new(),
        };
        let join_fds = cgroups::raw_fds(&join_files);
        let userns = match &options.user_namespace {
            Some(ranges) => Some(MapWriter::start(userns::map_text(ranges)?)?),
            None => None,
        };
        let userns_ends = userns.as_ref().map(|(_, ends)| *ends);
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .kill_on_drop(false);
        if options.capture_output {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        // SAFETY: the closure runs between fork and exec and makes only
        // raw syscalls (setsid, write, unshare, read, set*id); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Join the cgroups first, while still root of the host's namespace.
                cgroups::join_in_child(&join_fds)?;
                match userns_ends {
                    Some(ends) => userns::enter_in_child(ends),
                    None => Ok(()),
                }
            });
        }
        let spawned = {
            let _guard = self.runtime.enter();
            command.spawn()
        };
        drop(join_files);
        let mapped = userns.map(|(writer, _)| writer.finish());
        let child = match (spawned, mapped) {
            (Ok(child), None | Some(Ok(()))) => child,
            (Ok(mut child), Some(Err(why))) => {
                // Cannot happen (the child execs only once released); kept strict.
                let _ = child.start_kill();
                return Err(CapabilityError::Failed(format!("user namespace: {why}")));
            }
            (Err(e), Some(Err(why))) => {
                return Err(CapabilityError::Failed(format!(
                    "cannot start {program} in a user namespace: {why} ({e})"
                )))
            }
            (Err(e), _) => {
                return Err(CapabilityError::Failed(format!(
                    "cannot start {program}: {e}"
                )))
            }
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| CapabilityError::Failed(format!("{program} ended at once")))?;
        Ok((pid, child))
    }

    /// Reaps the child and keeps its bounded output, on the async runtime.
    fn watch(
        &self,
        mut child: tokio::process::Child,
        exit: Arc<ExitSlot>,
        output: Arc<Mutex<Captured>>,
    ) {
        let limit = self.output_limit;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // The streams are read by their own tasks: a grandchild holding the
        // pipes must not delay the exit state (a stale "running" would let a
        // signal reach a reused pid).
        if let Some(stream) = stdout {
            let output = Arc::clone(&output);
            self.runtime
                .spawn(async move { collect(stream, &output, limit, true).await });
        }
        if let Some(stream) = stderr {
            let output = Arc::clone(&output);
            self.runtime
                .spawn(async move { collect(stream, &output, limit, false).await });
        }
        self.runtime.spawn(async move {
            let status = child.wait().await;
            let state = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => State::Exited(code),
                        (None, Some(signal)) => State::Signaled(signal),
                        (None, None) => State::Exited(-1),
                    }
                }
                Err(_) => State::Exited(-1),
            };
            let mut slot = exit.state.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(state);
            exit.ended.notify_all();
        });
    }

    fn state_of(&self, entry: &Entry) -> State {
        match &entry.exit {
            Some(slot) => slot
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(State::Running),
            // Not our child: its exit code is not ours to read.
            None if is_alive(entry.pid, entry.start_time) => State::Running,
            None => State::Exited(-1),
        }
    }

    fn with_entry<T>(&self, id: &str, f: impl FnOnce(&Entry) -> T) -> Result<T, CapabilityError> {
        let entries = self.lock();
        entries
            .get(id)
            .map(f)
            .ok_or_else(|| CapabilityError::NotFound(format!("process {id:?}")))
    }

    pub fn state(&self, id: &str) -> Result<State, CapabilityError> {
        self.with_entry(id, |entry| self.state_of(entry))
    }

    /// Waits until the process ends or `until`; returns its state then.
    pub fn wait(&self, id: &str, until: Instant) -> Result<State, CapabilityError> {
        let (exit, pid, start_time) =
            self.with_entry(id, |e| (e.exit.clone(), e.pid, e.start_time))?;
        match exit {
            Some(slot) => {
                let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(ended) = *state {
                        return Ok(ended);
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(State::Running);
                    }
                    state = slot
                        .ended
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            None => loop {
                if !is_alive(pid, start_time) {
                    return Ok(State::Exited(-1));
                }
                if Instant::now() >= until {
                    return Ok(State::Running);
                }
                std::thread::sleep(ADOPTED_POLL);
            },
        }
    }

    pub fn kill(&self, id: &str, signal: Signal, whole_tree: bool) -> Result<(), CapabilityError> {
        let (pid, start_time, state) =
            self.with_entry(id, |e| (e.pid, e.start_time, self.state_of(e)))?;
        // An ended process's pid may belong to someone else by now.
        if state != State::Running || (start_time != 0 && !is_alive(pid, start_time)) {
            return Ok(());
        }
        if whole_tree {
            let members = process_tree::signal_tree(pid, signal.number());
            if matches!(signal, Signal::Kill) {
                // Killed means gone: the caller may delete the filesystem the
                // tree had mounted, which the kernel holds until each member
                // has exited (zombies have let go of their namespaces).
                let until = Instant::now() + KILL_WAIT;
                while members.iter().any(|m| is_running_task(*m)) && Instant::now() < until {
                    std::thread::sleep(KILL_POLL);
                }
            }
        } else {
            // SAFETY: kill(2) with a plain pid and signal number.
            unsafe { libc::kill(pid, signal.number()) };
        }
        Ok(())
    }

    pub fn output(&self, id: &str) -> Result<Captured, CapabilityError> {
        self.with_entry(id, |e| {
            e.output.lock().unwrap_or_else(|p| p.into_inner()).clone()
        })
    }

    /// Forgets a process; a running one is killed with its tree first.
    pub fn release(&self, id: &str) -> Result<(), CapabilityError> {
        if self.state(id)? == State::Running {
            self.kill(id, Signal::Kill, true)?;
            self.wait(id, Instant::now() + Duration::from_secs(2))?;
        }
        let entry = self.lock().remove(id);
        if let Some(entry) = entry {
            if let Some(group) = &entry.group {
                group.remove();
            }
        }
        let _ = fs::remove_file(self.ledger.join(id));
        Ok(())
    }

    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}

async fn collect(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    output: &Mutex<Captured>,
    limit: usize,
    is_stdout: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut captured = output.lock().unwrap_or_else(|e| e.into_inner());
        let captured = &mut *captured;
        let target = if is_stdout {
            &mut captured.stdout
        } else {
            &mut captured.stderr
        };
        let room = limit.saturating_sub(target.len());
        // Past the bound the output is read and dropped, so the process never blocks on it.
        if n > room {
            captured.truncated = true;
        }
        target.extend_from_slice(&buf[..n.min(room)]);
    }
}

fn check_args(args: &[String], env: &[(String, String)]) -> Result<(), CapabilityError> {
    if args.len() > MAX_ARGS {
        return Err(CapabilityError::Invalid(format!(
            "at most {MAX_ARGS} arguments"
        )));
    }
    let total: usize = args.iter().map(String::len).sum::<usize>()
        + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if total > MAX_ARG_BYTES {
        return Err(CapabilityError::Invalid(format!(
            "arguments and environment exceed {MAX_ARG_BYTES} bytes"
        )));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(CapabilityError::Invalid("an argument holds a NUL".into()));
    }
    for (name, value) in env {
        let ok = !name.is_empty() && !name.contains(['=', '\0']) && !value.contains('\0');
        if !ok {
            return Err(CapabilityError::Invalid(format!(
                "environment variable {name:?}: no empty name, '=' in a name, or NUL"
            )));
        }
        if loader_variable(name) {
            return Err(CapabilityError::NotGranted(format!(
                "environment variable {name:?} changes how the program is loaded or linked \
                 (it would run the plugin's code as the host's user)"
            )));
        }
    }
    Ok(())
}

/// Variables with which a caller chooses code that a program runs: glibc
/// ignores them only for setuid programs, and ours start as root, so a
/// plugin passing `LD_PRELOAD` with a file it wrote would run its own code
/// as root. The list is glibc's set of unsecure variables, plus its tunables.
fn loader_variable(name: &str) -> bool {
    const PREFIXES: [&str; 2] = ["LD_", "MALLOC_"];
    const NAMES: [&str; 11] = [
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

fn parse_id(id: &str) -> Option<(i32, u64)> {
    let (pid, start) = id.split_once('-')?;
    let pid: i32 = pid.parse().ok().filter(|p| *p > 1)?;
    Some((pid, start.parse().ok()?))
}

/// The process's start time (clock ticks after boot), field 22 of its stat.
fn read_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3; start time is field 22.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// This boot's id (the kernel's random boot id).
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether `pid` exists and is not a zombie.
fn is_running_task(pid: i32) -> bool {
    read_start_time(pid).is_some()
}

/// Whether `pid` is alive and still the process that had `start_time`.
fn is_alive(pid: i32, start_time: u64) -> bool {
    read_start_time(pid).is_some_and(|t| t == start_time)
}

fn write_ledger(path: &Path, record: &LedgerRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let partial = path.with_extension("partial");
    fs::write(&partial, bytes)?;
    fs::rename(partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(dir: &Path, programs: &[&str]) -> ProcessTable {
        ProcessTable::open(
            "test".into(),
            programs.iter().map(PathBuf::from).collect(),
            8,
            16,
            dir.to_path_buf(),
            tokio::runtime::Handle::current(),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_granted_programs_start_and_ids_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let procs = table(dir.path(), &["/bin/sleep", "/bin/echo"]);
        let refused = procs.spawn(
            "/bin/sh",
            &["-c".into(), "true".into()],
            &SpawnOptions::default(),
        );
        assert!(matches!(refused, Err(CapabilityError::NotGranted(_))));
        let dotted = procs.spawn("/bin/../bin/sleep", &["1".into()], &SpawnOptions::default());
        assert!(matches!(dotted, Err(CapabilityError::NotGranted(_))));

        let options = SpawnOptions {
            capture_output: true,
            ..Default::default()
        };
        let echo = procs
            .spawn(
                "/bin/echo",
                &["a long line past the bound".into()],
                &options,
            )
            .unwrap();
        let state = procs
            .wait(&echo, Instant::now() + Duration::from_secs(5))
            .unwrap();
        assert_eq!(state, State::Exited(0));
        // The stream may finish a moment after the exit is seen.
        std::thread::sleep(Duration::from_millis(50));
        let out = procs.output(&echo).unwrap();
        assert_eq!(out.stdout, b"a long line past".to_vec());
        assert!(out.truncated);

        let sleep = procs
            .spawn("/bin/sleep", &["30".into()], &SpawnOptions::default())
            .unwrap();
        assert_eq!(procs.state(&sleep).unwrap(), State::Running);
        // A second table over the same ledger (a host restart) adopts it.
        let again = table(dir.path(), &["/bin/sleep"]);
        assert_eq!(again.state(&sleep).unwrap(), State::Running);
        assert!(matches!(
            again.state("1-1"),
            Err(CapabilityError::NotFound(_))
        ));
        again.kill(&sleep, Signal::Kill, true).unwrap();
        assert_eq!(
            procs
                .wait(&sleep, Instant::now() + Duration::from_secs(5))
                .unwrap(),
            State::Signaled(libc::SIGKILL)
        );
        again.release(&sleep).unwrap();
        procs.release(&echo).unwrap();
        assert!(table(dir.path(), &[]).list().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_user_namespace_maps_every_id_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let procs = ProcessTable::open(
            "test".into(),
            vec![PathBuf::from("/bin/cat")],
            8,
            4096,
            dir.path().to_path_buf(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let options = SpawnOptions {
            capture_output: true,
            user_namespace: Some(vec![IdRange {
                inside: 0,
                outside: 100_000,
                count: 65536,
            }]),
            ..Default::default()
        };
        let id = procs
            .spawn(
                "/bin/cat",
                &["/proc/self/uid_map".into(), "/proc/self/status".into()],
                &options,
            )
            .unwrap();
        let state = procs
            .wait(&id, Instant::now() + Duration::from_secs(5))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let out = procs.output(&id).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            state,
            State::Exited(0),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let map: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(map, ["0", "100000", "65536"]);
        // Root inside: uid 0 in the namespace.
        assert!(
            text.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loader_variables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let procs = table(dir.path(), &["/bin/sleep"]);
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "MALLOC_CHECK_",
        ] {
            let options = SpawnOptions {
                env: vec![(name.to_string(), "/state/evil.so".to_string())],
                ..Default::default()
            };
            let refused = procs.spawn("/bin/sleep", &["1".into()], &options);
            assert!(
                matches!(refused, Err(CapabilityError::NotGranted(_))),
                "{name}"
            );
        }
        assert!(procs.list().is_empty());
    }

    #[test]
    fn ids_parse_strictly() {
        assert_eq!(parse_id("123-456"), Some((123, 456)));
        for bad in ["1-1", "0-5", "-1-5", "x-1", "12", "../x", "12-3-4"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }
}

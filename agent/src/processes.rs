//! The process table and each process's lifecycle: starting, pumping its
//! output into its log (or a capped capture for `Run`), timeouts, stdin,
//! signals, and keeping recently finished processes for a while.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use opensandbox_agent_proto::v1::{exit, Exit, ProcessInfo, ProcessSpec, RunResponse};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::fdio::{Fd, Interest};
use crate::init::WaitStatus;
use crate::output::{OutputLog, Reader, StreamKind};
use crate::spawn::{self, Env};

/// Finished processes kept (with their output) for later Attach/GetProcess.
const KEEP_FINISHED: usize = 256;
const MAX_RUNNING: usize = 4096;
/// The most read from a pipe at once.
const READ_CHUNK: usize = 256 * 1024;
/// After a terminal's process exits, its last output can still be on its way
/// through the line discipline; wait this long for more before giving up
/// (when a background process keeps the terminal open).
const PTY_DRAIN_GRACE: Duration = Duration::from_millis(100);
/// After the process exits, its pipes are drained for at most this long and
/// this many bytes: a background child that keeps writing (`yes &`) must not
/// keep the process "running" forever.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
const DRAIN_BUDGET: usize = 16 * 1024 * 1024;

#[derive(Clone, Copy, Debug)]
pub enum State {
    Running,
    /// `status` is None only if the process could not be waited for.
    Exited {
        status: Option<WaitStatus>,
        timed_out: bool,
    },
}

pub struct Process {
    pub pid: u32,
    /// As started (kept whole so the host can start it again after a restore).
    spec: ProcessSpec,
    one_shot: bool,
    argv: Vec<String>,
    tag: String,
    user: String,
    pty: bool,
    started_at_ms: i64,
    /// None for `Run` processes, whose output goes to the reply instead.
    pub log: Option<Arc<OutputLog>>,
    /// Where WriteStdin writes: the stdin pipe, or the terminal's master.
    stdin: Mutex<Option<Arc<Fd>>>,
    /// Serializes writers so concurrent WriteStdin calls do not interleave.
    stdin_write: tokio::sync::Mutex<()>,
    pty_master: Option<Arc<Fd>>,
    timed_out: AtomicBool,
    /// Its status has been collected: the pid may belong to someone else now.
    reaped: AtomicBool,
    state: watch::Sender<State>,
}

impl Process {
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Waits until the process has exited and all its output is in.
    pub async fn wait(&self) -> State {
        let mut rx = self.state.subscribe();
        let r = rx
            .wait_for(|s| matches!(s, State::Exited { .. }))
            .await
            .map(|s| *s);
        r.unwrap_or(State::Exited {
            status: None,
            timed_out: false,
        })
    }

    pub fn info(&self) -> ProcessInfo {
        let (running, exit, timed_out) = match self.state() {
            State::Running => (true, None, self.timed_out.load(Ordering::Relaxed)),
            State::Exited { status, timed_out } => (false, status.map(to_exit), timed_out),
        };
        let (output_start, output_end) = self.log.as_ref().map_or((0, 0), |l| l.bounds());
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            tag: self.tag.clone(),
            running,
            exit,
            timed_out,
            pty: self.pty,
            output_end,
            output_start,
            started_at_ms: self.started_at_ms,
            user: self.user.clone(),
            stdin_open: self.lock_stdin().is_some(),
            spec: Some(self.spec.clone()),
            one_shot: self.one_shot,
        }
    }

    fn lock_stdin(&self) -> MutexGuard<'_, Option<Arc<Fd>>> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn to_exit(status: WaitStatus) -> Exit {
    let how = if libc::WIFSIGNALED(status) {
        exit::How::Signal(libc::WTERMSIG(status))
    } else {
        exit::How::Code(libc::WEXITSTATUS(status))
    };
    Exit { how: Some(how) }
}

#[derive(Default)]
struct Table {
    procs: HashMap<u32, Arc<Process>>,
    /// Finished pids, oldest first.
    finished: VecDeque<u32>,
    running: usize,
}

pub struct Processes {
    table: Mutex<Table>,
    output_buffer: usize,
    base_env: Env,
}

/// How a process's output is consumed.
enum Sink {
    Log,
    /// `Run`: capture up to this many bytes of each of stdout and stderr.
    Capture(usize),
}

impl Processes {
    pub fn new(output_buffer: usize, base_env: Env) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            output_buffer,
            base_env,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().procs.len()
    }

    pub fn running_count(&self) -> usize {
        self.lock().running
    }

    pub fn get(&self, pid: u32) -> Result<Arc<Process>> {
        self.lock()
            .procs
            .get(&pid)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no such process: {pid}")))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let procs: Vec<_> = self.lock().procs.values().cloned().collect();
        let mut infos: Vec<_> = procs.iter().map(|p| p.info()).collect();
        infos.sort_by_key(|i| (i.started_at_ms, i.pid));
        infos
    }

    /// Sends `sig` to every running process group; returns how many.
    pub fn signal_all(&self, sig: i32) -> usize {
        let procs: Vec<_> = self.lock().procs.values().cloned().collect();
        let mut n = 0;
        for p in procs {
            if !p.reaped.load(Ordering::Acquire) {
                kill_group(p.pid, sig);
                n += 1;
            }
        }
        n
    }

    /// Starts a process whose output goes to its log; with `attach`, also
    /// returns a reader from offset 0 attached before any output is read.
    pub fn start(
        self: &Arc<Self>,
        spec: ProcessSpec,
        attach: bool,
    ) -> Result<(Arc<Process>, Option<Reader>)> {
        let (proc, reader, _) = self.launch(spec, Sink::Log, attach)?;
        Ok((proc, reader))
    }

    /// Runs a process to completion, capturing its output.
    pub async fn run(self: &Arc<Self>, spec: ProcessSpec, limit: u64) -> Result<RunResponse> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let (_, _, done) = self.launch(spec, Sink::Capture(limit), false)?;
        match done {
            Some(rx) => rx
                .await
                .map_err(|_| Error::Internal("process supervisor vanished".into())),
            None => Err(Error::Internal("no run result".into())),
        }
    }

    #[allow(clippy::type_complexity)]
    fn launch(
        self: &Arc<Self>,
        spec: ProcessSpec,
        sink: Sink,
        attach: bool,
    ) -> Result<(
        Arc<Process>,
        Option<Reader>,
        Option<oneshot::Receiver<RunResponse>>,
    )> {
        {
            let mut t = self.lock();
            if t.running >= MAX_RUNNING {
                return Err(Error::ResourceExhausted(format!(
                    "too many running processes (limit {MAX_RUNNING})"
                )));
            }
            t.running += 1;
        }
        let t0 = Instant::now();
        // Forking (and reading /etc/passwd) blocks this thread for a moment:
        // let the runtime move other tasks elsewhere meanwhile.
        let spawned = match tokio::task::block_in_place(|| spawn::spawn(&spec, &self.base_env)) {
            Ok(s) => s,
            Err(e) => {
                self.lock().running -= 1;
                return Err(e);
            }
        };
        let pid = spawned.pid;
        let wrap = |fd: Option<std::os::fd::OwnedFd>, interest| -> Option<Arc<Fd>> {
            let fd = fd?;
            match Fd::new(fd, interest) {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    eprintln!("opensandbox-agent: pid {pid}: cannot watch a pipe: {e}");
                    None
                }
            }
        };
        let pty_master = wrap(spawned.pty_master, Interest::READABLE | Interest::WRITABLE);
        let stdin = if pty_master.is_some() {
            pty_master.clone()
        } else {
            wrap(spawned.stdin, Interest::WRITABLE)
        };
        let stdout = wrap(spawned.stdout, Interest::READABLE);
        let stderr = wrap(spawned.stderr, Interest::READABLE);

        let log = matches!(sink, Sink::Log).then(|| OutputLog::new(self.output_buffer));
        let reader = match (&log, attach) {
            (Some(l), true) => Some(l.attach(0)),
            _ => None,
        };
        let proc = Arc::new(Process {
            pid,
            spec: spec.clone(),
            one_shot: !matches!(sink, Sink::Log),
            argv: spec.argv.clone(),
            tag: spec.tag.clone(),
            user: spec.user.clone(),
            pty: spec.pty.is_some(),
            started_at_ms: now_ms(),
            log: log.clone(),
            stdin: Mutex::new(stdin),
            stdin_write: tokio::sync::Mutex::new(()),
            pty_master: pty_master.clone(),
            timed_out: AtomicBool::new(false),
            reaped: AtomicBool::new(false),
            state: watch::Sender::new(State::Running),
        });
        {
            let mut t = self.lock();
            // A kept finished entry whose pid was reused gives way.
            if t.procs.insert(pid, proc.clone()).is_some() {
                t.finished.retain(|p| *p != pid);
            }
        }

        let (exited_tx, exited_rx) = watch::channel(false);
        let timeout = Duration::from_millis(spec.timeout_ms);
        let exit_rx = spawned.exit;
        let this = self.clone();
        let p = proc.clone();
        match sink {
            Sink::Log => {
                let log = log.unwrap_or_else(|| OutputLog::new(1));
                let mut pumps: Vec<JoinHandle<()>> = Vec::new();
                let grace = pty_master.is_some().then_some(PTY_DRAIN_GRACE);
                for (fd, kind) in [
                    (pty_master, StreamKind::Pty),
                    (stdout, StreamKind::Stdout),
                    (stderr, StreamKind::Stderr),
                ] {
                    let Some(fd) = fd else { continue };
                    let log = log.clone();
                    let exited = exited_rx.clone();
                    pumps.push(tokio::spawn(async move {
                        let chunk = READ_CHUNK.min(log.max_chunk());
                        let mut src = Source::new(fd, exited, grace, chunk);
                        while let Some(data) = src.next().await {
                            log.append(kind, data).await;
                        }
                    }));
                }
                tokio::spawn(async move {
                    let status = wait_exit(exit_rx, timeout, &p).await;
                    let _ = exited_tx.send(true);
                    for pump in pumps {
                        let _ = pump.await;
                    }
                    log.close();
                    this.finish(&p, status, true);
                });
                Ok((proc, reader, None))
            }
            Sink::Capture(limit) => {
                let capture = |fd: Option<Arc<Fd>>, grace: Option<Duration>| {
                    let exited = exited_rx.clone();
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        let mut truncated = false;
                        let Some(fd) = fd else {
                            return (out, truncated);
                        };
                        let mut src = Source::new(fd, exited, grace, READ_CHUNK);
                        while let Some(data) = src.next().await {
                            let room = limit.saturating_sub(out.len());
                            if data.len() > room {
                                truncated = true;
                            }
                            out.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        (out, truncated)
                    })
                };
                // A terminal's merged output is reported as stdout.
                let out_task = match pty_master {
                    Some(m) => capture(Some(m), Some(PTY_DRAIN_GRACE)),
                    None => capture(stdout, None),
                };
                let err_task = capture(stderr, None);
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move {
                    let status = wait_exit(exit_rx, timeout, &p).await;
                    let _ = exited_tx.send(true);
                    let (stdout, stdout_truncated) = out_task.await.unwrap_or_default();
                    let (stderr, stderr_truncated) = err_task.await.unwrap_or_default();
                    let timed_out = p.timed_out.load(Ordering::Relaxed);
                    this.finish(&p, status, false);
                    let _ = tx.send(RunResponse {
                        stdout: stdout.into(),
                        stderr: stderr.into(),
                        stdout_truncated,
                        stderr_truncated,
                        exit: status.map(to_exit),
                        timed_out,
                        duration_us: t0.elapsed().as_micros() as u64,
                    });
                });
                Ok((proc, None, Some(rx)))
            }
        }
    }

    /// Records the end of a process; `keep` keeps it in the table for later
    /// queries (Run processes are dropped at once).
    fn finish(&self, p: &Arc<Process>, status: Option<WaitStatus>, keep: bool) {
        // Closing stdin lets nothing linger on a process that is gone.
        p.lock_stdin().take();
        p.state.send_replace(State::Exited {
            status,
            timed_out: p.timed_out.load(Ordering::Relaxed),
        });
        let mut t = self.lock();
        t.running -= 1;
        let ours = t.procs.get(&p.pid).is_some_and(|q| Arc::ptr_eq(q, p));
        if !ours {
            return;
        }
        if !keep {
            t.procs.remove(&p.pid);
            return;
        }
        t.finished.push_back(p.pid);
        while t.finished.len() > KEEP_FINISHED {
            if let Some(old) = t.finished.pop_front() {
                t.procs.remove(&old);
            }
        }
    }

    pub async fn write_stdin(&self, pid: u32, data: Bytes, close: bool) -> Result<()> {
        let p = self.get(pid)?;
        // One write at a time; a second caller is refused rather than queued
        // (each queued caller would hold its whole payload in memory).
        let _serial = p.stdin_write.try_lock().map_err(|_| {
            Error::FailedPrecondition(format!(
                "another write to the stdin of process {pid} is in progress"
            ))
        })?;
        let fd = p
            .lock_stdin()
            .clone()
            .ok_or_else(|| Error::FailedPrecondition(format!("process {pid} has no open stdin")))?;
        let mut res = fd.write_all(&data).await;
        if close && res.is_ok() {
            if p.pty {
                // A terminal has no "close" short of hanging up: send the
                // end-of-file character instead, as a user would.
                res = fd.write_all(b"\x04").await;
            } else {
                p.lock_stdin().take();
            }
        }
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                p.lock_stdin().take();
                Err(Error::FailedPrecondition(format!(
                    "process {pid} closed its stdin"
                )))
            }
            Err(e) => Err(Error::Internal(format!("writing stdin of {pid}: {e}"))),
        }
    }

    pub fn signal(&self, pid: u32, sig: i32) -> Result<()> {
        if !(1..=64).contains(&sig) {
            return Err(Error::InvalidArgument(format!("invalid signal: {sig}")));
        }
        let p = self.get(pid)?;
        // An exited process's pid may already be someone else's.
        if !p.reaped.load(Ordering::Acquire) {
            kill_group(pid, sig);
        }
        Ok(())
    }

    pub fn resize(&self, pid: u32, cols: u32, rows: u32) -> Result<()> {
        let p = self.get(pid)?;
        let fd = p
            .pty_master
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition(format!("process {pid} has no terminal")))?;
        spawn::set_winsize(fd.raw(), cols, rows)
            .map_err(|e| Error::Internal(format!("resize: {e}")))
    }
}

/// Waits for the exit status, killing the process group at the timeout.
async fn wait_exit(
    mut rx: oneshot::Receiver<WaitStatus>,
    timeout: Duration,
    p: &Process,
) -> Option<WaitStatus> {
    if !timeout.is_zero() {
        tokio::select! {
            r = &mut rx => {
                p.reaped.store(true, Ordering::Release);
                return r.ok();
            }
            _ = tokio::time::sleep(timeout) => {
                p.timed_out.store(true, Ordering::Relaxed);
                kill_group(p.pid, libc::SIGKILL);
            }
        }
    }
    let r = rx.await.ok();
    p.reaped.store(true, Ordering::Release);
    r
}

/// Signals the process group led by `pid`, or `pid` alone if the group is
/// gone (the leader may have left it... it cannot, but its group can empty).
fn kill_group(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill with integer arguments.
    unsafe {
        if libc::kill(-pid, sig) < 0 {
            libc::kill(pid, sig);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Reads pieces of output from one pipe or terminal until end of file or,
/// once the process has exited, until nothing more is waiting: a background
/// child that inherited the pipe must not keep the process "running" forever.
struct Source {
    fd: Arc<Fd>,
    exited_rx: watch::Receiver<bool>,
    exited: bool,
    /// After exit: how long to wait for more (None: take only what is there).
    grace: Option<Duration>,
    chunk: usize,
    buf: BytesMut,
    /// Set at the exit: the end of the drain.
    drain_until: Option<Instant>,
    drained: usize,
}

impl Source {
    fn new(
        fd: Arc<Fd>,
        exited_rx: watch::Receiver<bool>,
        grace: Option<Duration>,
        chunk: usize,
    ) -> Self {
        Self {
            fd,
            exited_rx,
            exited: false,
            grace,
            chunk: chunk.max(1),
            buf: BytesMut::new(),
            drain_until: None,
            drained: 0,
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            let r = if self.exited {
                let deadline = *self
                    .drain_until
                    .get_or_insert_with(|| Instant::now() + DRAIN_DEADLINE);
                if Instant::now() >= deadline || self.drained >= DRAIN_BUDGET {
                    return None;
                }
                match self.grace {
                    None => self.fd.try_read_buf(&mut self.buf, self.chunk),
                    Some(g) => {
                        match tokio::time::timeout(g, self.fd.read_buf(&mut self.buf, self.chunk))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => return None,
                        }
                    }
                }
            } else {
                tokio::select! {
                    biased;
                    r = self.fd.read_buf(&mut self.buf, self.chunk) => r,
                    _ = self.exited_rx.wait_for(|e| *e) => {
                        self.exited = true;
                        continue;
                    }
                }
            };
            return match r {
                Ok(0) => None,
                Ok(n) => {
                    if self.exited {
                        self.drained += n;
                    }
                    Some(self.buf.split().freeze())
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => None,
            };
        }
    }
}

//! The init duties: reaping every child (our own and orphans reparented to
//! us), handing exit statuses to whoever waits for them, and forwarding
//! termination signals to the running processes.
//!
//! Only this module calls `waitpid`, with `-1`: as init the agent must reap
//! orphans it never started, and a global reaper would steal statuses from
//! any other waiter. That is why processes are spawned with std (never
//! waited on) instead of tokio::process.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::processes::Processes;

/// A raw wait status, as `waitpid` reports it.
pub type WaitStatus = i32;

#[derive(Default)]
pub struct Reaper {
    /// Pids we started, waiting for their status.
    waiters: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

pub static REAPER: LazyLock<Reaper> = LazyLock::new(Reaper::default);

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<WaitStatus>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and registers its pid for its exit status.
    ///
    /// The lock is held across the fork: the reaper needs it to call
    /// `waitpid`, so a child that exits at once cannot be reaped (and its
    /// status discarded) before it is registered. It also keeps the reaper
    /// off the child while std waits for a failed exec itself.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reaps every child that has exited.
    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let mut status = 0;
            // SAFETY: plain syscall with a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                // 0: children left but none exited; -1: ECHILD (none) or EINTR
                // (the next SIGCHLD brings us back).
                break;
            }
            if let Some(tx) = waiters.remove(&pid) {
                let _ = tx.send(status);
            }
        }
    }
}

/// Starts the reaper task. Call before spawning anything.
pub fn start_reaper() -> io::Result<()> {
    if std::process::id() != 1 {
        // Not init: still collect our orphaned grandchildren, so they never
        // linger as zombies under whoever started us.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            REAPER.reap_all();
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(())
}

/// Forwards SIGTERM, SIGINT and SIGHUP to every running process group. On
/// SIGTERM or SIGINT the agent then exits, once its processes are gone or
/// after `grace`.
pub fn start_signal_forwarding(
    processes: Arc<Processes>,
    grace: Duration,
    on_exit: impl Fn() + Send + Sync + 'static,
) -> io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let (sig, shutdown) = tokio::select! {
                _ = term.recv() => (libc::SIGTERM, true),
                _ = int.recv() => (libc::SIGINT, true),
                _ = hup.recv() => (libc::SIGHUP, false),
            };
            let n = processes.signal_all(sig);
            eprintln!("opensandbox-agent: got signal {sig}, forwarded to {n} process groups");
            if shutdown {
                let deadline = tokio::time::Instant::now() + grace;
                while processes.running_count() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                eprintln!("opensandbox-agent: exiting");
                on_exit();
                std::process::exit(0);
            }
        }
    });
    Ok(())
}

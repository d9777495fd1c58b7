//! Processes in a sandbox, through its agent: the run endpoint's one-shot
//! command, and background processes that are started, streamed, fed stdin,
//! signalled, resized and reconnected to. Every path that starts a process
//! passes the hook chain first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tracing::{info, instrument, warn};

use super::plugged::HookOutcome;
use super::{RestoredProcesses, Result, SandboxError, Sandboxes};
use crate::agent::{pb, AgentError, Client};
use crate::names;
use crate::runtimes::{ExecOutcome, ExecRequest};
use crate::store::{ApiKey, Sandbox, SandboxState};

/// A process to start, already decoded from the API.
#[derive(Debug, Clone, Default)]
pub struct StartProcess {
    /// Run as `/bin/sh -c <command>`; exclusive with `argv`.
    pub command: Option<String>,
    /// Run without a shell.
    pub argv: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub timeout_ms: Option<u64>,
    pub stdin: bool,
    /// Terminal size (cols, rows): run on a PTY.
    pub pty: Option<(u32, u32)>,
}

/// Where a finished command's events go.
pub type EventStream =
    std::pin::Pin<Box<dyn Stream<Item = std::result::Result<pb::ProcessEvent, AgentError>> + Send>>;

impl Sandboxes {
    /// The running sandbox's agent connection.
    pub(super) async fn agent_of(
        &self,
        owner: uuid::Uuid,
        name: &str,
    ) -> Result<(Sandbox, Client)> {
        let sandbox = self.get(owner, name).await?;
        if sandbox.state != SandboxState::Running {
            return Err(SandboxError::NotRunning {
                name: name.to_string(),
                state: sandbox.state.as_str(),
            });
        }
        if !self.agents.has_agent(sandbox.id).await {
            return Err(SandboxError::NoAgent(name.to_string()));
        }
        let client = self.agents.client(sandbox.id);
        Ok((sandbox, client))
    }

    /// The run endpoint through the agent: one round trip.
    pub(super) async fn run_via_agent(
        &self,
        sandbox: &Sandbox,
        exec: &ExecRequest,
    ) -> Result<ExecOutcome> {
        let mut client = self.agents.client(sandbox.id);
        let spec = pb::ProcessSpec {
            argv: shell(&exec.command),
            env: exec.env.clone().into_iter().collect(),
            cwd: exec.cwd.clone().unwrap_or_default(),
            user: exec.user.clone().unwrap_or_default(),
            timeout_ms: u64::try_from(exec.timeout.as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        };
        let request = pb::RunRequest {
            spec: Some(spec),
            output_limit: exec.output_limit as u64,
        };
        let reply = client
            .run(request)
            .await
            .map_err(|s| start_error(AgentError::from(s)))?
            .into_inner();
        Ok(ExecOutcome {
            stdout: reply.stdout.to_vec(),
            stderr: reply.stderr.to_vec(),
            // A command killed by its timeout has no exit code (as with the
            // engine's exec); other signals read as 128 + n, like a shell.
            exit_code: match reply.exit.as_ref().and_then(|e| e.how) {
                Some(pb::exit::How::Signal(_)) if reply.timed_out => None,
                _ => exit_code(reply.exit.as_ref()),
            },
            timed_out: reply.timed_out,
            stdout_truncated: reply.stdout_truncated,
            stderr_truncated: reply.stderr_truncated,
        })
    }

    /// Vets and converts a process request into the agent's spec.
    async fn process_spec(
        &self,
        caller: &ApiKey,
        sandbox: &Sandbox,
        request: StartProcess,
    ) -> Result<(pb::ProcessSpec, Option<crate::plugins::types::Command>)> {
        let mut argv = match (request.command, request.argv) {
            (Some(command), None) => {
                check_command(&command)?;
                shell(&command)
            }
            (None, Some(argv)) if !argv.is_empty() && argv.iter().all(|a| !a.contains('\0')) => {
                argv
            }
            (None, Some(_)) => {
                return Err(SandboxError::InvalidRequest(
                    "argv must be a non-empty list of strings without NUL".into(),
                ))
            }
            _ => {
                return Err(SandboxError::InvalidRequest(
                    "give exactly one of command (run by /bin/sh -c) or argv".into(),
                ))
            }
        };
        names::validate_env(&request.env)?;
        check_cwd(request.cwd.as_deref())?;
        if let Some(user) = &request.user {
            check_user(user)?;
        }
        if let Some((cols, rows)) = request.pty {
            if cols == 0 || rows == 0 || cols > 1000 || rows > 1000 {
                return Err(SandboxError::InvalidRequest(
                    "pty cols and rows must be between 1 and 1000".into(),
                ));
            }
        }
        let timeout = match request.timeout_ms {
            Some(0) => {
                return Err(SandboxError::InvalidRequest(
                    "timeout_ms must be positive (omit it for none)".into(),
                ))
            }
            Some(ms) => Duration::from_millis(ms),
            None => Duration::ZERO,
        };
        // The hooks see the command as text; argv is shown shell-quoted.
        let mut exec = ExecRequest {
            command: display_command(&argv),
            env: request.env,
            cwd: request.cwd,
            user: request.user,
            timeout,
            output_limit: self.limits.output_limit,
        };
        let before = exec.command.clone();
        let vetted = self.vet_command(caller, sandbox, &mut exec).await?;
        if exec.command != before {
            argv = shell(&exec.command);
        }
        let spec = pb::ProcessSpec {
            argv,
            env: exec.env.into_iter().collect(),
            cwd: exec.cwd.unwrap_or_default(),
            user: exec.user.unwrap_or_default(),
            timeout_ms: u64::try_from(exec.timeout.as_millis()).unwrap_or(u64::MAX),
            stdin: request.stdin,
            pty: request.pty.map(|(cols, rows)| pb::Pty { cols, rows }),
            tag: exec.command,
        };
        Ok((spec, vetted))
    }

    /// Starts a background process; returns at once.
    #[instrument(skip(self, caller, request), fields(sandbox = %name))]
    pub async fn start_process(
        &self,
        caller: &ApiKey,
        name: &str,
        request: StartProcess,
    ) -> Result<pb::ProcessInfo> {
        let (sandbox, mut client) = self.agent_of(caller.id, name).await?;
        let (spec, _vetted) = self.process_spec(caller, &sandbox, request).await?;
        let started = client
            .start(spec)
            .await
            .map_err(|s| start_error(AgentError::from(s)))?
            .into_inner();
        info!(pid = started.pid, "process started");
        Ok(started)
    }

    /// Starts a process and streams its events (started, output, exited).
    /// The after-command hooks hear the outcome when the stream ends.
    #[instrument(skip(self, caller, request), fields(sandbox = %name))]
    pub async fn exec_process(
        &self,
        caller: &ApiKey,
        name: &str,
        request: StartProcess,
    ) -> Result<EventStream> {
        let (sandbox, mut client) = self.agent_of(caller.id, name).await?;
        let (spec, vetted) = self.process_spec(caller, &sandbox, request).await?;
        let events = client
            .exec(spec)
            .await
            .map_err(|s| start_error(AgentError::from(s)))?
            .into_inner();
        let Some(command) = vetted else {
            return Ok(Box::pin(events.map(|e| e.map_err(AgentError::from))));
        };
        // Count output and report the end to the hooks as it passes.
        let report = self.outcome_reporter(caller, command);
        let started = Instant::now();
        let (mut stdout_bytes, mut stderr_bytes) = (0u64, 0u64);
        let mut report = Some(report);
        let stream = events.map(move |event| {
            let event = event.map_err(AgentError::from)?;
            match &event.event {
                Some(pb::process_event::Event::Output(out)) => {
                    if out.stream == pb::Stream::Stderr as i32 {
                        stderr_bytes += out.data.len() as u64;
                    } else {
                        stdout_bytes += out.data.len() as u64;
                    }
                }
                Some(pb::process_event::Event::Exited(exited)) => {
                    if let Some(report) = report.take() {
                        report(HookOutcome {
                            exit_code: exit_code(exited.exit.as_ref()),
                            timed_out: exited.timed_out,
                            duration: started.elapsed(),
                            stdout_bytes,
                            stderr_bytes,
                        });
                    }
                }
                _ => {}
            }
            Ok(event)
        });
        Ok(Box::pin(stream))
    }

    /// Streams a running or finished process's output from `from_offset`.
    pub async fn attach_process(
        &self,
        owner: uuid::Uuid,
        name: &str,
        pid: u32,
        from_offset: u64,
        follow: bool,
    ) -> Result<EventStream> {
        let (_, mut client) = self.agent_of(owner, name).await?;
        let events = client
            .attach(pb::AttachRequest {
                pid,
                from_offset,
                follow,
            })
            .await
            .map_err(|s| process_error(pid, s))?
            .into_inner();
        Ok(Box::pin(events.map(|e| e.map_err(AgentError::from))))
    }

    pub async fn list_processes(
        &self,
        owner: uuid::Uuid,
        name: &str,
    ) -> Result<Vec<pb::ProcessInfo>> {
        let (_, mut client) = self.agent_of(owner, name).await?;
        let list = client
            .list_processes(pb::Empty {})
            .await
            .map_err(|s| SandboxError::Agent(s.into()))?
            .into_inner();
        Ok(list.processes)
    }

    pub async fn get_process(
        &self,
        owner: uuid::Uuid,
        name: &str,
        pid: u32,
    ) -> Result<pb::ProcessInfo> {
        let (_, mut client) = self.agent_of(owner, name).await?;
        Ok(client
            .get_process(pb::ProcessRef { pid })
            .await
            .map_err(|s| process_error(pid, s))?
            .into_inner())
    }

    pub async fn write_stdin(
        &self,
        owner: uuid::Uuid,
        name: &str,
        pid: u32,
        data: bytes::Bytes,
        close: bool,
    ) -> Result<()> {
        let (_, mut client) = self.agent_of(owner, name).await?;
        client
            .write_stdin(pb::StdinRequest { pid, data, close })
            .await
            .map_err(|s| process_error(pid, s))?;
        Ok(())
    }

    pub async fn signal_process(
        &self,
        owner: uuid::Uuid,
        name: &str,
        pid: u32,
        signal: i32,
    ) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(SandboxError::InvalidRequest(format!(
                "signal {signal} is not a Linux signal number (1-64)"
            )));
        }
        let (_, mut client) = self.agent_of(owner, name).await?;
        client
            .signal(pb::SignalRequest { pid, signal })
            .await
            .map_err(|s| process_error(pid, s))?;
        Ok(())
    }

    pub async fn resize_process(
        &self,
        owner: uuid::Uuid,
        name: &str,
        pid: u32,
        cols: u32,
        rows: u32,
    ) -> Result<()> {
        if cols == 0 || rows == 0 || cols > 1000 || rows > 1000 {
            return Err(SandboxError::InvalidRequest(
                "cols and rows must be between 1 and 1000".into(),
            ));
        }
        let (_, mut client) = self.agent_of(owner, name).await?;
        client
            .resize(pb::ResizeRequest { pid, cols, rows })
            .await
            .map_err(|s| process_error(pid, s))?;
        Ok(())
    }

    /// Starts again, from their specs, the background processes a restore
    /// stopped. Terminals (their client is gone) and one-shot runs (their
    /// caller got an error) are not restarted.
    pub(super) async fn restart_processes(
        &self,
        sandbox: &Sandbox,
        running: Vec<pb::ProcessInfo>,
    ) -> RestoredProcesses {
        let mut done = RestoredProcesses::default();
        let mut client = self.agents.client(sandbox.id);
        for process in running {
            let spec = match &process.spec {
                Some(spec) if !process.pty && !process.one_shot => spec.clone(),
                _ => {
                    done.stopped.push(process);
                    continue;
                }
            };
            match client.start(spec).await {
                Ok(started) => {
                    info!(
                        before = process.pid,
                        now = started.get_ref().pid,
                        "process restarted after restore"
                    );
                    done.restarted.push((process.pid, started.into_inner()));
                }
                Err(status) => {
                    warn!(pid = process.pid, error = %status.message(), "could not restart a process after restore");
                    done.stopped.push(process);
                }
            }
        }
        done
    }

    /// The processes running now (best effort: used to say what a restore stopped).
    pub(super) async fn running_processes(&self, sandbox: &Sandbox) -> Vec<pb::ProcessInfo> {
        if !self.agents.has_agent(sandbox.id).await {
            return Vec::new();
        }
        let mut client = self.agents.client(sandbox.id);
        let listed =
            tokio::time::timeout(Duration::from_secs(2), client.list_processes(pb::Empty {})).await;
        match listed {
            Ok(Ok(list)) => list
                .into_inner()
                .processes
                .into_iter()
                .filter(|p| p.running)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A process's end as the hooks see it: signals as 128 + n, like a shell.
pub(super) fn exit_code(exit: Option<&pb::Exit>) -> Option<i64> {
    match exit.and_then(|e| e.how) {
        Some(pb::exit::How::Code(code)) => Some(i64::from(code)),
        Some(pb::exit::How::Signal(signal)) => Some(128 + i64::from(signal)),
        None => None,
    }
}

fn shell(command: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), command.to_string()]
}

/// argv as one line a shell would split back into the same words.
fn display_command(argv: &[String]) -> String {
    if argv.len() == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
        return argv[2].clone();
    }
    argv.iter()
        .map(|word| {
            if !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn check_command(command: &str) -> Result<()> {
    if command.trim().is_empty() {
        return Err(SandboxError::InvalidRequest(
            "command must not be empty".into(),
        ));
    }
    if command.contains('\0') {
        return Err(SandboxError::InvalidRequest(
            "command must not contain NUL".into(),
        ));
    }
    Ok(())
}

pub(super) fn check_cwd(cwd: Option<&str>) -> Result<()> {
    match cwd {
        Some(cwd) if !cwd.starts_with('/') || cwd.contains('\0') || cwd.len() > 4096 => Err(
            SandboxError::InvalidRequest("cwd must be an absolute path inside the sandbox".into()),
        ),
        _ => Ok(()),
    }
}

/// `name`, `uid` or `uid:gid`, as the agent takes it.
pub(super) fn check_user(user: &str) -> Result<()> {
    let numeric = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match user.split_once(':') {
        Some((uid, gid)) => numeric(uid) && numeric(gid),
        None => {
            numeric(user)
                || (!user.is_empty()
                    && user.len() <= 32
                    && user
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidRequest(format!(
            "user {user:?} must be a user name, a uid, or uid:gid"
        )))
    }
}

/// A failure to start a process: the agent's FAILED_PRECONDITION means the
/// command itself could not start (missing binary, cwd or user).
fn start_error(err: AgentError) -> SandboxError {
    match err.code() {
        Some(tonic::Code::FailedPrecondition) => SandboxError::CommandNotStarted(err.to_string()),
        Some(tonic::Code::InvalidArgument) => SandboxError::InvalidRequest(err.to_string()),
        Some(tonic::Code::ResourceExhausted) => SandboxError::AgentBusy(err.to_string()),
        _ => SandboxError::Agent(err),
    }
}

fn process_error(pid: u32, status: tonic::Status) -> SandboxError {
    let err = AgentError::from(status);
    match err.code() {
        Some(tonic::Code::NotFound) => SandboxError::ProcessNotFound(pid),
        Some(tonic::Code::FailedPrecondition) => SandboxError::ProcessState(err.to_string()),
        Some(tonic::Code::InvalidArgument) => SandboxError::InvalidRequest(err.to_string()),
        _ => SandboxError::Agent(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_shown_shell_quoted() {
        let argv: Vec<String> = ["python3", "-c", "print('hi there')"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            display_command(&argv),
            r#"python3 -c 'print('\''hi there'\'')'"#
        );
        assert_eq!(display_command(&shell("echo $HOME")), "echo $HOME");
    }

    #[test]
    fn users_are_names_or_ids() {
        for good in ["root", "www-data", "1000", "1000:1000", "user.name"] {
            assert!(check_user(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "1000:", ":1", "x:y", "../etc", "root;id"] {
            assert!(check_user(bad).is_err(), "{bad}");
        }
    }
}

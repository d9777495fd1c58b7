//! Turning a `ProcessSpec` into a running child: environment, PATH lookup,
//! user lookup in the sandbox's /etc/passwd and /etc/group, terminals, and
//! the fork itself (through the reaper, which owns every child's status).
//!
//! Everything that can be checked is checked before the fork, so a missing
//! binary, directory or user is a clear FAILED_PRECONDITION.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use opensandbox_agent_proto::v1::ProcessSpec;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::init::{WaitStatus, REAPER};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Pipes are raised to this size (when allowed) so a fast writer makes fewer
/// round trips through the agent.
const PIPE_SIZE: i32 = 1 << 20;

pub type Env = BTreeMap<OsString, OsString>;

/// The environment every process starts from: sane defaults, overridden by
/// the agent's own environment (the container's, as Docker set it) except
/// the agent's own `AGENT_*` settings.
pub fn base_env() -> Env {
    let mut env = Env::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), "/root".into());
    for (k, v) in std::env::vars_os() {
        if !k.as_bytes().starts_with(b"AGENT_") {
            env.insert(k, v);
        }
    }
    env
}

/// A started child. Its fds are the agent's ends.
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The terminal's master side, for PTY processes (stdin and output).
    pub pty_master: Option<OwnedFd>,
    pub exit: oneshot::Receiver<WaitStatus>,
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (including `gid`).
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<String>,
}

pub fn spawn(spec: &ProcessSpec, base: &Env) -> Result<Spawned> {
    let argv0 = spec
        .argv
        .first()
        .ok_or_else(|| Error::InvalidArgument("argv is empty".into()))?;
    if argv0.is_empty() {
        return Err(Error::InvalidArgument("argv[0] is empty".into()));
    }
    let has_nul = spec.argv.iter().any(|a| a.contains('\0'))
        || spec.cwd.contains('\0')
        || spec
            .env
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains(['\0', '=']) || v.contains('\0'));
    if has_nul {
        return Err(Error::InvalidArgument(
            "argv, env and cwd must not contain NUL (nor env names '=')".into(),
        ));
    }

    let creds = if spec.user.is_empty() {
        None
    } else {
        let passwd = read_etc("/etc/passwd")?;
        let group = read_etc("/etc/group")?;
        Some(resolve_user(&spec.user, &passwd, &group)?)
    };

    let env = build_env(base, spec, creds.as_ref());

    let program = if argv0.contains('/') {
        PathBuf::from(argv0)
    } else {
        find_in_path(argv0, env.get(OsStr::new("PATH")).map(OsString::as_os_str))
            .ok_or_else(|| Error::FailedPrecondition(format!("no such command: {argv0}")))?
    };

    let cwd = if spec.cwd.is_empty() {
        PathBuf::from("/")
    } else {
        Path::new("/").join(&spec.cwd)
    };
    if !cwd.is_dir() {
        return Err(Error::FailedPrecondition(format!(
            "no such directory: {}",
            cwd.display()
        )));
    }

    let mut cmd = Command::new(&program);
    cmd.arg0(argv0)
        .args(&spec.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd);

    let pty = match &spec.pty {
        Some(size) => {
            let (master, slave) = open_pty(size.cols, size.rows)
                .map_err(|e| Error::Internal(format!("cannot open a terminal: {e}")))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| Error::Internal(format!("dup: {e}")))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            Some(master)
        }
        None => {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            None
        }
    };

    let is_pty = pty.is_some();
    let ids = creds.as_ref().map(|c| (c.uid, c.gid, c.groups.clone()));
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe syscalls; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Leave the agent's signal setup behind: as init it catches
            // signals that the child must see with default behaviour.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            // Its own session and process group, so signals and timeouts
            // reach everything it starts.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if is_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let (mut child, exit) = REAPER.spawn(&mut cmd).map_err(|e| {
        let msg = format!("cannot start {argv0}: {e}");
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOMEM) => Error::ResourceExhausted(msg),
            _ => Error::FailedPrecondition(msg),
        }
    })?;
    // Closes the parent's copies of the terminal's slave side, so reading
    // the master ends when the child's side is gone.
    drop(cmd);

    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    for fd in stdout.iter().chain(stderr.iter()) {
        // SAFETY: fcntl on a valid fd; failure (over the user's limit) is fine.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    Ok(Spawned {
        pid: child.id(),
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout,
        stderr,
        pty_master: pty,
        exit,
    })
}

fn read_etc(path: &str) -> Result<String> {
    match std::fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        // An image without /etc/group is not an error: numeric users work.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::Internal(format!("{path}: {e}"))),
    }
}

/// The final environment: base, then the user's HOME/USER/LOGNAME, TERM for
/// terminals, then the spec's own variables, which win.
pub fn build_env(base: &Env, spec: &ProcessSpec, creds: Option<&Creds>) -> Env {
    let mut env = base.clone();
    if let Some(c) = creds {
        if let Some(home) = &c.home {
            env.insert("HOME".into(), home.into());
        }
        if let Some(name) = &c.name {
            env.insert("USER".into(), name.into());
            env.insert("LOGNAME".into(), name.into());
        }
    }
    if spec.pty.is_some() {
        env.insert("TERM".into(), "xterm-256color".into());
    }
    for (k, v) in &spec.env {
        env.insert(k.into(), v.into());
    }
    env
}

/// Finds an executable regular file named `cmd` on `path`.
pub fn find_in_path(cmd: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    path.as_bytes()
        .split(|&b| b == b':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(OsStr::from_bytes(dir)).join(cmd))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses /etc/passwd (`name:pw:uid:gid:gecos:home:shell`), skipping
/// malformed lines and comments.
pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 6 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses /etc/group (`name:pw:gid:member,member`).
pub fn parse_group(content: &str) -> Vec<GroupEntry> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves "name", "uid", "name:group" or "uid:gid" against the sandbox's
/// passwd and group files.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<Creds> {
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user)
                .ok_or_else(|| Error::FailedPrecondition(format!("unknown user: {user}")))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user
            .parse::<u32>()
            .map_err(|_| Error::FailedPrecondition(format!("unknown user: {user}")))?,
    };
    let gid = match grp {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| Error::FailedPrecondition(format!("unknown group: {g}")))?,
        },
        // Like Docker: a uid missing from passwd runs with group 0.
        None => entry.map_or(0, |e| e.gid),
    };
    let mut sup = vec![gid];
    if let Some(e) = entry {
        for g in &groups {
            if g.members.contains(&e.name) && !sup.contains(&g.gid) {
                sup.push(g.gid);
            }
        }
    }
    Ok(Creds {
        uid,
        gid,
        groups: sup,
        name: entry.map(|e| e.name.clone()),
        home: entry.map(|e| e.home.clone()),
    })
}

/// Opens a terminal pair of the given size; both ends close on exec (the
/// child gets the slave through dup2 onto its stdio).
fn open_pty(cols: u32, rows: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    // SAFETY: into_raw_fd hands over ownership of a valid fd.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)?
        .into();
    set_winsize(master.as_raw_fd(), cols, rows)?;
    Ok((master, slave))
}

pub fn set_winsize(fd: i32, cols: u32, rows: u32) -> io::Result<()> {
    let clamp = |v: u32, default: u16| {
        if v == 0 {
            default
        } else {
            v.min(u16::MAX as u32) as u16
        }
    };
    let ws = libc::winsize {
        ws_row: clamp(rows, 24),
        ws_col: clamp(cols, 80),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh
bob:x:1001:100::/home/bob:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
users:x:100:alice
alice:x:1000:
docker:x:999:alice,bob
";

    #[test]
    fn parses_passwd_and_group() {
        let p = parse_passwd(PASSWD);
        assert_eq!(p.len(), 4);
        assert_eq!(
            p[2],
            PasswdEntry {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into()
            }
        );
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 4);
        assert_eq!(g[3].members, vec!["alice", "bob"]);
        assert!(g[0].members.is_empty());
    }

    #[test]
    fn resolves_named_user_with_supplementary_groups() {
        let c = resolve_user("alice", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(c.groups, vec![1000, 100, 999]);
        assert_eq!(c.home.as_deref(), Some("/home/alice"));
        assert_eq!(c.name.as_deref(), Some("alice"));
    }

    #[test]
    fn resolves_numeric_forms() {
        let c = resolve_user("1001", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (1001, 100));
        assert_eq!(c.name.as_deref(), Some("bob"));
        let c = resolve_user("4242", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid, c.groups.clone()), (4242, 0, vec![0]));
        assert_eq!(c.name, None);
        let c = resolve_user("4242:77", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (4242, 77));
        let c = resolve_user("alice:docker", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 999));
    }

    #[test]
    fn unknown_user_or_group_is_failed_precondition() {
        assert!(matches!(
            resolve_user("mallory", PASSWD, GROUP),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            resolve_user("alice:nogroup", PASSWD, GROUP),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn path_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("mytool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("notexec");
        std::fs::write(&plain, "").unwrap();
        std::fs::create_dir(dir.path().join("adir")).unwrap();
        let path = format!("/nonexistent::{}", dir.path().display());
        let path = OsStr::new(&path);
        assert_eq!(find_in_path("mytool", Some(path)), Some(exe));
        assert_eq!(find_in_path("notexec", Some(path)), None);
        assert_eq!(find_in_path("adir", Some(path)), None);
        assert_eq!(find_in_path("missing", Some(path)), None);
        assert!(find_in_path("sh", None).is_some());
    }

    #[test]
    fn env_layers() {
        let mut base = Env::new();
        base.insert("PATH".into(), "/bin".into());
        base.insert("HOME".into(), "/root".into());
        let mut spec = ProcessSpec::default();
        spec.env.insert("FOO".into(), "bar".into());
        spec.env.insert("USER".into(), "override".into());
        spec.pty = Some(Default::default());
        let creds = resolve_user("alice", PASSWD, GROUP).unwrap();
        let env = build_env(&base, &spec, Some(&creds));
        let get = |k: &str| env.get(OsStr::new(k)).and_then(|v| v.to_str());
        assert_eq!(get("HOME"), Some("/home/alice"));
        assert_eq!(get("USER"), Some("override"));
        assert_eq!(get("LOGNAME"), Some("alice"));
        assert_eq!(get("TERM"), Some("xterm-256color"));
        assert_eq!(get("FOO"), Some("bar"));
        assert_eq!(get("PATH"), Some("/bin"));
    }
}

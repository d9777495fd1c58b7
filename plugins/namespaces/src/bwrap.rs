//! The bubblewrap command line of a sandbox: a pure function of what `start` knows, so that
//! every flag is tested here and the same argv can be tried by hand (see the README).

use opensandbox_plugin_sdk::AgentMount;

/// Where the agent binary appears inside the sandbox (the host's contract).
pub const AGENT_PATH: &str = "/.opensandbox/agent";
/// Where the agent's socket folder appears inside the sandbox (the host's contract).
pub const RUN_DIR: &str = "/.opensandbox/run";

/// Variables every sandbox gets unless its spec sets them, as Docker's images usually do.
const DEFAULT_ENV: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
];

/// Docker's default capability set: all root in a sandbox keeps. Without `CAP_SYS_ADMIN` it
/// cannot undo bwrap's mounts: with it, root in bwrap's own user namespace (uid 0 mapped to
/// the host's root) could remount the agent's bind read-write and rewrite the host's file.
pub const DOCKER_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// What a sandbox's command line is made of.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// Host path of the instance's root subvolume.
    pub root: &'a str,
    /// The sandbox's hostname.
    pub hostname: &'a str,
    /// The spec's variables.
    pub env: &'a [(String, String)],
    /// The host's agent.
    pub agent: &'a AgentMount,
}

/// bwrap's arguments (after argv\[0\]) for `launch`.
///
/// No `--die-with-parent`: sandboxes outlive a host restart, as Docker's do. `--as-pid-1`
/// because the agent is a real init (it reaps orphans and forwards signals).
pub fn argv(launch: &Launch<'_>) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    // Every namespace but the user one, which the host makes (with every id of the image
    // mapped, see the settings' `id_map`) or which is left out on purpose (`user_namespace =
    // false`); bwrap's own maps only one id.
    push(&[
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]);
    // bwrap run by root keeps every capability unless told otherwise.
    push(&["--cap-drop", "ALL"]);
    for cap in DOCKER_CAPABILITIES {
        push(&["--cap-add", cap]);
    }
    push(&[
        "--as-pid-1",
        "--new-session",
        "--bind",
        launch.root,
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--ro-bind",
        &launch.agent.binary,
        AGENT_PATH,
        "--bind",
        &launch.agent.socket_dir,
        RUN_DIR,
        "--hostname",
        launch.hostname,
        "--chdir",
        "/",
        "--clearenv",
    ]);
    for (name, value) in DEFAULT_ENV {
        if !launch.env.iter().any(|(k, _)| k == name) {
            push(&["--setenv", name, value]);
        }
    }
    for (name, value) in launch.env {
        push(&["--setenv", name, value]);
    }
    push(&[AGENT_PATH]);
    args.extend(launch.agent.args.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentMount {
        AgentMount {
            binary: "/opt/agent".to_string(),
            socket_dir: "/run/os/5f0c".to_string(),
            args: vec!["--serve".to_string()],
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// How every command line starts: each namespace but the user's (the host
    /// makes that one), then every capability dropped.
    const NAMESPACES_AND_NO_CAPABILITIES: [&str; 7] = [
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-drop",
        "ALL",
    ];

    #[test]
    fn the_whole_command_line() {
        let agent = agent();
        let env = env(&[("LANG", "C.UTF-8"), ("X", "a b")]);
        let got = argv(&Launch {
            root: "/btrfs/runtimes/ns/sandboxes/5f0c",
            hostname: "web",
            env: &env,
            agent: &agent,
        });
        let mut want = NAMESPACES_AND_NO_CAPABILITIES.to_vec();
        for cap in DOCKER_CAPABILITIES {
            want.extend(["--cap-add", cap]);
        }
        want.extend([
            "--as-pid-1",
            "--new-session",
            "--bind",
            "/btrfs/runtimes/ns/sandboxes/5f0c",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--ro-bind",
            "/opt/agent",
            "/.opensandbox/agent",
            "--bind",
            "/run/os/5f0c",
            "/.opensandbox/run",
            "--hostname",
            "web",
            "--chdir",
            "/",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--setenv",
            "HOME",
            "/root",
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--setenv",
            "X",
            "a b",
            "/.opensandbox/agent",
            "--serve",
        ]);
        assert_eq!(got, want);
        assert!(!got.iter().any(|a| a == "--die-with-parent"));
    }

    #[test]
    fn bwrap_never_makes_the_user_namespace() {
        let agent = agent();
        let got = argv(&Launch {
            root: "/r",
            hostname: "h",
            env: &[],
            agent: &agent,
        });
        assert!(!got
            .iter()
            .any(|a| a.starts_with("--unshare-all") || a == "--unshare-user"));
        assert_eq!(got[..7], NAMESPACES_AND_NO_CAPABILITIES);
        assert!(!got.iter().any(|a| a == "CAP_SYS_ADMIN"));
        let added: Vec<&str> = got
            .windows(2)
            .filter(|w| w[0] == "--cap-add")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(added, DOCKER_CAPABILITIES);
        assert_eq!(got[got.len() - 2..], ["/.opensandbox/agent", "--serve"]);
    }

    #[test]
    fn the_spec_overrides_path_and_home() {
        let agent = AgentMount::default();
        let env = env(&[("HOME", "/home/me"), ("PATH", "/bin")]);
        let got = argv(&Launch {
            root: "/r",
            hostname: "h",
            env: &env,
            agent: &agent,
        });
        let set: Vec<(&str, &str)> = got
            .windows(3)
            .filter(|w| w[0] == "--setenv")
            .map(|w| (w[1].as_str(), w[2].as_str()))
            .collect();
        assert_eq!(set, [("HOME", "/home/me"), ("PATH", "/bin")]);
        assert_eq!(got.last().map(String::as_str), Some("/.opensandbox/agent"));
    }
}

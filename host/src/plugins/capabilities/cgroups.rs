//! Resource limits for runtime plugins' processes through Linux cgroups,
//! v2 (unified) or v1 (one hierarchy per controller), whichever the machine
//! mounts at /sys/fs/cgroup. Each limited process gets its own group under
//! `opensandbox/<plugin>/`; the child joins it between fork and exec, so
//! nothing it starts escapes the limits.

use std::fs::{self, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CPU quota period (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// What a spawn asks for (mirrors the WIT record).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millicores: Option<u32>,
    pub max_processes: Option<u32>,
    pub best_effort: bool,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpu_millicores.is_none() && self.max_processes.is_none()
    }
}

#[derive(Debug, Clone)]
enum Layout {
    V2,
    V1,
}

/// The machine's cgroup layout, found once.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
}

/// The group(s) of one process: removed when the process is gone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// None when no writable cgroup filesystem is mounted.
    pub fn detect() -> Option<Self> {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            return Some(Self { layout: Layout::V2 });
        }
        if root.join("memory/memory.limit_in_bytes").exists() {
            return Some(Self { layout: Layout::V1 });
        }
        None
    }

    pub fn describe(&self) -> &'static str {
        match self.layout {
            Layout::V2 => "cgroup v2",
            Layout::V1 => "cgroup v1",
        }
    }

    /// Makes the group `opensandbox/<plugin>/<name>` with `limits` set.
    /// A limit that cannot be set fails the call unless `best_effort`.
    pub fn create(&self, plugin: &str, name: &str, limits: &Limits) -> Result<Group, String> {
        let mut group = Group { dirs: Vec::new() };
        let result = match self.layout {
            Layout::V2 => self.create_v2(plugin, name, limits, &mut group),
            Layout::V1 => self.create_v1(plugin, name, limits, &mut group),
        };
        if let Err(err) = result {
            group.remove();
            return Err(err);
        }
        Ok(group)
    }

    fn create_v2(
        &self,
        plugin: &str,
        name: &str,
        limits: &Limits,
        group: &mut Group,
    ) -> Result<(), String> {
        let root = Path::new(CGROUP_ROOT);
        let parent = root.join("opensandbox").join(plugin);
        fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        // Controllers must be enabled on every level above the group.
        for dir in [root.to_path_buf(), root.join("opensandbox"), parent.clone()] {
            for controller in ["+memory", "+cpu", "+pids"] {
                let _ = fs::write(dir.join("cgroup.subtree_control"), controller);
            }
        }
        let dir = parent.join(name);
        fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        group.dirs.push(dir.clone());
        let mut settings = Vec::new();
        if let Some(bytes) = limits.memory_bytes {
            settings.push(("memory.max", bytes.to_string()));
        }
        if let Some(milli) = limits.cpu_millicores {
            let quota = u64::from(milli) * CPU_PERIOD_US / 1000;
            settings.push(("cpu.max", format!("{} {CPU_PERIOD_US}", quota.max(1000))));
        }
        if let Some(max) = limits.max_processes {
            settings.push(("pids.max", max.to_string()));
        }
        for (file, value) in settings {
            set(&dir, file, &value, limits.best_effort)?;
        }
        Ok(())
    }

    fn create_v1(
        &self,
        plugin: &str,
        name: &str,
        limits: &Limits,
        group: &mut Group,
    ) -> Result<(), String> {
        let mut wanted: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
        if let Some(bytes) = limits.memory_bytes {
            wanted.push((
                "memory",
                vec![
                    ("memory.limit_in_bytes", bytes.to_string()),
                    // Swap counts against the same cap where the kernel accounts it.
                    ("memory.memsw.limit_in_bytes", bytes.to_string()),
                ],
            ));
        }
        if let Some(milli) = limits.cpu_millicores {
            let quota = (u64::from(milli) * CPU_PERIOD_US / 1000).max(1000);
            wanted.push((
                "cpu",
                vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            ));
        }
        if let Some(max) = limits.max_processes {
            wanted.push(("pids", vec![("pids.max", max.to_string())]));
        }
        for (controller, settings) in wanted {
            let dir = Path::new(CGROUP_ROOT)
                .join(controller)
                .join("opensandbox")
                .join(plugin)
                .join(name);
            if let Err(e) = fs::create_dir_all(&dir) {
                let why = format!("{}: {e}", dir.display());
                if limits.best_effort {
                    tracing::warn!(plugin, %why, "cgroup limit skipped (best effort)");
                    continue;
                }
                return Err(why);
            }
            group.dirs.push(dir.clone());
            for (file, value) in settings {
                // memsw exists only with swap accounting: never required.
                let optional = file.starts_with("memory.memsw");
                set(&dir, file, &value, limits.best_effort || optional)?;
            }
        }
        Ok(())
    }
}

fn set(dir: &Path, file: &str, value: &str, best_effort: bool) -> Result<(), String> {
    match fs::write(dir.join(file), value) {
        Ok(()) => Ok(()),
        Err(e) if best_effort => {
            tracing::debug!(dir = %dir.display(), file, error = %e, "cgroup limit skipped");
            Ok(())
        }
        Err(e) => Err(format!(
            "cannot set {file}={value} in {}: {e}",
            dir.display()
        )),
    }
}

impl Group {
    /// Opens every `cgroup.procs` for the child to join (by writing "0")
    /// between fork and exec, where nothing may allocate.
    pub fn join_files(&self) -> Result<Vec<OwnedFd>, String> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .collect()
    }

    /// Removes the group(s); a group still holding processes stays (logged).
    pub fn remove(&self) {
        for dir in &self.dirs {
            if let Err(e) = fs::remove_dir(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!(dir = %dir.display(), error = %e, "cgroup not removed");
                }
            }
        }
    }
}

/// Writes "0" (the writing process itself) to each file: called in the
/// child after fork, so it only makes raw syscalls.
pub fn join_in_child(files: &[i32]) -> std::io::Result<()> {
    for fd in files {
        // SAFETY: write(2) on an fd we own, from a static buffer.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw fds of opened join files, for the pre-exec closure.
pub fn raw_fds(files: &[OwnedFd]) -> Vec<i32> {
    files.iter().map(AsRawFd::as_raw_fd).collect()
}

//! The plugins file (TOML, path in `PLUGINS_CONFIG`): which components to
//! load, in which order, with which limits, grants and configuration.
//!
//! ```toml
//! [[plugin]]
//! name = "guard"                      # unique; shown in logs and errors
//! kind = "hook"                       # "policy", "hook" or "runtime"
//! file = "../target/plugins/command-guard.wasm"  # relative to this file
//! sha256 = "..."                      # optional pin of the file's hash
//! order = 10                          # lower runs first (default 0; ties: file order)
//! timeout_ms = 10                     # per call (default 20; runtimes 5000)
//! memory_limit_mib = 16               # per call (default 32; runtimes 64)
//! failure = "closed"                  # closed: a failing hook denies, a failing policy rejects;
//!                                     # open: the plugin is skipped and logged
//! [plugin.config]                     # handed to the plugin as strings
//! deny = ["rm -rf /*", "shutdown*"]
//! [plugin.grants]                     # all off by default
//! stdio = false                       # plugin stdout/stderr into the host's stderr
//! clock = false                       # real clocks (else both read 0)
//! env = { LANG = "C" }                # environment variables
//! read_only_dirs = { "/etc/policy" = "/policy" }  # host dir -> guest path, read-only
//! # Runtime plugins only (see wit/README.md for what each grant allows):
//! state = false                       # its own folder DATA_DIR/plugin-state/<name> at /state
//! btrfs = false                       # subvolumes under DOCKER_BTRFS_PATH/runtimes/<name>/
//! process = []                        # absolute paths of the programs it may start
//! max_processes = 4096                # at most this many of its processes at once
//! output_limit_bytes = 65536          # bound on each captured stdout/stderr
//! spare_snapshots = 4                 # with btrfs: snapshots of each shared image made
//!                                     # ahead (see capabilities::spares); 0: none
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::PluginError;

const DEFAULT_TIMEOUT_MS: u64 = 20;
const DEFAULT_MEMORY_MIB: u64 = 32;
const MAX_TIMEOUT_MS: u64 = 10_000;
const MAX_MEMORY_MIB: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Policy,
    Hook,
    Runtime,
}

impl PluginKind {
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Policy => "opensandbox:plugin/policy-plugin@0.1.1",
            PluginKind::Hook => "opensandbox:plugin/hook-plugin@0.1.1",
            PluginKind::Runtime => "opensandbox:plugin/runtime-plugin@0.1.1",
        }
    }

    fn default_timeout_ms(self) -> u64 {
        match self {
            // A runtime's calls make subvolumes and start programs.
            PluginKind::Runtime => 5000,
            _ => DEFAULT_TIMEOUT_MS,
        }
    }

    fn default_memory_mib(self) -> u64 {
        match self {
            PluginKind::Runtime => 64,
            _ => DEFAULT_MEMORY_MIB,
        }
    }
}

/// What a failing plugin call means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// A failing hook denies the command; a failing policy rejects the creation.
    #[default]
    Closed,
    /// The plugin is skipped (logged), as if it had allowed or abstained.
    Open,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub stdio: bool,
    #[serde(default)]
    pub clock: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub read_only_dirs: BTreeMap<PathBuf, String>,
    /// Runtime plugins: a read-write folder of its own, at `/state`.
    #[serde(default)]
    pub state: bool,
    /// Runtime plugins: Btrfs subvolumes under its own root.
    #[serde(default)]
    pub btrfs: bool,
    /// Runtime plugins: the programs it may start (absolute, normalized paths).
    #[serde(default)]
    pub process: Vec<PathBuf>,
    /// Runtime plugins: most processes of its own at once.
    #[serde(default = "default_max_processes")]
    pub max_processes: usize,
    /// Runtime plugins: bound on each captured stdout and stderr.
    #[serde(default = "default_output_limit")]
    pub output_limit_bytes: usize,
    /// Runtime plugins with `btrfs`: snapshots of each shared image made
    /// ahead of time, per kind, so that snapshotting an image is a rename
    /// (see `capabilities::spares`).
    #[serde(default = "default_spare_snapshots")]
    pub spare_snapshots: usize,
}

fn default_spare_snapshots() -> usize {
    // A create on the namespaces runtime takes two (its root and its
    // `initial` snapshot); four covers a create arriving while the two
    // taken by the one before are still being replaced.
    4
}

/// More spares than this only cost disk metadata without making creates
/// faster: each is replaced right after it is taken.
const MAX_SPARE_SNAPSHOTS: usize = 64;

fn default_max_processes() -> usize {
    4096
}

fn default_output_limit() -> usize {
    64 * 1024
}

impl Default for Grants {
    fn default() -> Self {
        Self {
            stdio: false,
            clock: false,
            env: BTreeMap::new(),
            read_only_dirs: BTreeMap::new(),
            state: false,
            btrfs: false,
            process: Vec::new(),
            max_processes: default_max_processes(),
            output_limit_bytes: default_output_limit(),
            spare_snapshots: default_spare_snapshots(),
        }
    }
}

impl Grants {
    /// Grants only a runtime can use; a policy or hook asking for them is a
    /// mistake in the plugins file.
    fn runtime_only(&self) -> Option<&'static str> {
        if self.state {
            Some("state")
        } else if self.btrfs {
            Some("btrfs")
        } else if !self.process.is_empty() {
            Some("process")
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: String,
    kind: PluginKind,
    file: PathBuf,
    sha256: Option<String>,
    #[serde(default)]
    order: i64,
    timeout_ms: Option<u64>,
    memory_limit_mib: Option<u64>,
    #[serde(default)]
    failure: FailureMode,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    grants: Grants,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, rename = "plugin")]
    plugins: Vec<RawPlugin>,
}

/// One plugin entry, validated, with its file path resolved.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub name: String,
    pub kind: PluginKind,
    pub file: PathBuf,
    pub sha256: Option<String>,
    pub order: i64,
    pub timeout_ms: u64,
    pub memory_limit_bytes: usize,
    pub failure: FailureMode,
    /// The plugin's config, flattened to strings (see [`flatten`]).
    pub config: BTreeMap<String, String>,
    pub grants: Grants,
}

/// Reads and validates the plugins file; entries come back sorted by `order`.
pub fn load(path: &Path) -> Result<Vec<PluginSpec>, PluginError> {
    let text = std::fs::read_to_string(path).map_err(|e| PluginError::ConfigFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|reason| {
        PluginError::ConfigFile {
            path: path.to_path_buf(),
            reason,
        }
    })
}

fn parse(text: &str, base: &Path) -> Result<Vec<PluginSpec>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut seen = std::collections::HashSet::new();
    let mut specs = Vec::with_capacity(raw.plugins.len());
    for plugin in raw.plugins {
        let name = plugin.name;
        if crate::names::validate_resource_name("plugin", &name).is_err() {
            return Err(format!(
                "plugin name {name:?} must match ^[a-z0-9][a-z0-9-]{{0,62}}$"
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(format!("plugin {name:?} is listed twice"));
        }
        let timeout_ms = plugin
            .timeout_ms
            .unwrap_or(plugin.kind.default_timeout_ms());
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "plugin {name:?}: timeout_ms must be 1..={MAX_TIMEOUT_MS}"
            ));
        }
        let memory_mib = plugin
            .memory_limit_mib
            .unwrap_or(plugin.kind.default_memory_mib());
        if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
            return Err(format!(
                "plugin {name:?}: memory_limit_mib must be 1..={MAX_MEMORY_MIB}"
            ));
        }
        if let Some(pin) = &plugin.sha256 {
            if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("plugin {name:?}: sha256 must be 64 hex digits"));
            }
        }
        if plugin.kind != PluginKind::Runtime {
            if let Some(grant) = plugin.grants.runtime_only() {
                return Err(format!(
                    "plugin {name:?}: grant {grant:?} is only for runtime plugins"
                ));
            }
        }
        if plugin.grants.spare_snapshots > MAX_SPARE_SNAPSHOTS {
            return Err(format!(
                "plugin {name:?}: spare_snapshots is at most {MAX_SPARE_SNAPSHOTS}"
            ));
        }
        for program in &plugin.grants.process {
            check_program(program).map_err(|e| format!("plugin {name:?}: process grant {e}"))?;
        }
        let config = flatten(&plugin.config).map_err(|e| format!("plugin {name:?}: config {e}"))?;
        let file = if plugin.file.is_absolute() {
            plugin.file
        } else {
            base.join(plugin.file)
        };
        specs.push(PluginSpec {
            name,
            kind: plugin.kind,
            file,
            sha256: plugin.sha256.map(|s| s.to_ascii_lowercase()),
            order: plugin.order,
            timeout_ms,
            memory_limit_bytes: usize::try_from(memory_mib * 1024 * 1024).unwrap_or(usize::MAX),
            failure: plugin.failure,
            config,
            grants: plugin.grants,
        });
    }
    // A stable sort keeps file order among equal `order`s.
    specs.sort_by_key(|s| s.order);
    Ok(specs)
}

/// A granted program must be named exactly: absolute, with no `.`/`..` or
/// doubled slashes, so that the grant check is a plain comparison.
fn check_program(program: &Path) -> Result<(), String> {
    let text = program.to_str().ok_or("paths must be UTF-8")?;
    let normal = text.starts_with('/')
        && !text.ends_with('/')
        && text[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if normal {
        Ok(())
    } else {
        Err(format!(
            "{text:?}: must be an absolute path without ., .. or //"
        ))
    }
}

/// Plugins see their config as strings: strings as they are, numbers and
/// booleans as text, arrays of those joined with newlines. Nested tables are
/// refused, so what the operator wrote is what the plugin reads.
fn flatten(table: &toml::Table) -> Result<BTreeMap<String, String>, String> {
    fn scalar(key: &str, value: &toml::Value) -> Result<String, String> {
        match value {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            _ => Err(format!(
                "{key:?}: only strings, numbers, booleans and arrays of them"
            )),
        }
    }
    table
        .iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| scalar(key, item))
                    .collect::<Result<Vec<_>, _>>()?
                    .join("\n"),
                other => scalar(key, other)?,
            };
            Ok((key.clone(), text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_orders_and_flattens() {
        let specs = parse(
            r#"
            [[plugin]]
            name = "b"
            kind = "hook"
            file = "b.wasm"
            order = 5
            [plugin.config]
            deny = ["rm *", "reboot"]
            n = 3

            [[plugin]]
            name = "a"
            kind = "policy"
            file = "/abs/a.wasm"
            failure = "open"
            "#,
            Path::new("/etc/os"),
        )
        .unwrap();
        assert_eq!(specs[0].name, "a");
        assert_eq!(specs[0].file, PathBuf::from("/abs/a.wasm"));
        assert_eq!(specs[0].failure, FailureMode::Open);
        assert_eq!(specs[1].file, PathBuf::from("/etc/os/b.wasm"));
        assert_eq!(specs[1].config["deny"], "rm *\nreboot");
        assert_eq!(specs[1].config["n"], "3");
        assert_eq!(specs[1].timeout_ms, DEFAULT_TIMEOUT_MS);
    }

    #[test]
    fn rejects_bad_entries_with_the_plugin_name() {
        let base = Path::new(".");
        let dup = "[[plugin]]\nname='a'\nkind='hook'\nfile='x'\n[[plugin]]\nname='a'\nkind='hook'\nfile='y'";
        assert!(parse(dup, base).unwrap_err().contains("twice"));
        let kind = "[[plugin]]\nname='a'\nkind='vm'\nfile='x'";
        assert!(parse(kind, base).is_err());
        let timeout = "[[plugin]]\nname='a'\nkind='hook'\nfile='x'\ntimeout_ms=0";
        assert!(parse(timeout, base).unwrap_err().contains("\"a\""));
        let nested = "[[plugin]]\nname='a'\nkind='hook'\nfile='x'\n[plugin.config.t]\nk=1";
        assert!(parse(nested, base).unwrap_err().contains("config"));
        let unknown = "[[plugin]]\nname='a'\nkind='hook'\nfile='x'\ncolour='red'";
        assert!(parse(unknown, base).is_err());
        let misgranted = "[[plugin]]\nname='a'\nkind='hook'\nfile='x'\n[plugin.grants]\nbtrfs=true";
        assert!(parse(misgranted, base)
            .unwrap_err()
            .contains("only for runtime"));
        let relative =
            "[[plugin]]\nname='a'\nkind='runtime'\nfile='x'\n[plugin.grants]\nprocess=['bwrap']";
        assert!(parse(relative, base).unwrap_err().contains("absolute"));
        let dotted = "[[plugin]]\nname='a'\nkind='runtime'\nfile='x'\n[plugin.grants]\nprocess=['/usr/bin/../bin/sh']";
        assert!(parse(dotted, base).is_err());
    }

    #[test]
    fn runtimes_get_their_own_defaults() {
        let text = "[[plugin]]\nname='ns'\nkind='runtime'\nfile='x'\n[plugin.grants]\nbtrfs=true\nprocess=['/usr/bin/bwrap']";
        let specs = parse(text, Path::new(".")).unwrap();
        assert_eq!(specs[0].timeout_ms, 5000);
        assert_eq!(
            specs[0].grants.process,
            vec![PathBuf::from("/usr/bin/bwrap")]
        );
        assert_eq!(specs[0].grants.max_processes, 4096);
    }
}

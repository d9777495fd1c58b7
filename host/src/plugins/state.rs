//! The per-call store data of a plugin: its WASI context (built from its
//! grants, nothing else), its memory limits, and the host imports every
//! plugin gets: `log` into our tracing log and its own `config`. Runtime
//! plugins also carry their capabilities and the call's journal
//! ([`super::capabilities`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::{
    IoView, OutputStream, Pollable, StdoutStream, StreamResult, WasiCtx, WasiCtxBuilder, WasiView,
};
use wasmtime_wasi::{DirPerms, FilePerms, HostMonotonicClock, HostWallClock};

use super::bindings::{config, host};
use super::capabilities::{CallJournal, RuntimeCallContext, RuntimeCapabilities};
use super::config::{Grants, PluginSpec};
use super::PluginError;

/// What every call of one plugin shares; cheap to clone.
#[derive(Clone)]
pub struct PluginIdentity {
    pub name: Arc<str>,
    pub config: Arc<BTreeMap<String, String>>,
    pub grants: Arc<Grants>,
    pub memory_limit_bytes: usize,
    pub timeout: Duration,
    /// A runtime plugin's granted capabilities.
    pub runtime: Option<Arc<RuntimeCapabilities>>,
}

impl PluginIdentity {
    pub fn new(spec: &PluginSpec, runtime: Option<Arc<RuntimeCapabilities>>) -> Self {
        Self {
            name: spec.name.as_str().into(),
            config: Arc::new(spec.config.clone()),
            grants: Arc::new(spec.grants.clone()),
            memory_limit_bytes: spec.memory_limit_bytes,
            timeout: Duration::from_millis(spec.timeout_ms),
            runtime,
        }
    }
}

/// Longest line kept from a plugin's stdout or stderr.
const MAX_LINE: usize = 16 * 1024;

pub struct PluginState {
    identity: PluginIdentity,
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: StoreLimits,
    /// Runtime plugins: capabilities and what this call made.
    pub runtime: Option<RuntimeCallContext>,
}

impl PluginState {
    pub fn new(identity: &PluginIdentity) -> Result<Self, PluginError> {
        Ok(Self {
            wasi: wasi_context(
                &identity.name,
                &identity.grants,
                identity
                    .runtime
                    .as_ref()
                    .and_then(|r| r.state_dir.as_deref()),
            )
            .map_err(|reason| PluginError::Grant {
                plugin: identity.name.to_string(),
                reason,
            })?,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(identity.memory_limit_bytes)
                // A memory bomb traps at the limit instead of seeing a failed grow.
                .trap_on_grow_failure(true)
                .instances(64)
                .tables(64)
                .memories(16)
                .build(),
            runtime: identity.runtime.as_ref().map(|caps| RuntimeCallContext {
                caps: Arc::clone(caps),
                journal: CallJournal::default(),
                started: Instant::now(),
                host_time: Duration::ZERO,
                max_wait: identity.timeout,
            }),
            identity: identity.clone(),
        })
    }

    /// The runtime part of the call (None for policies and hooks).
    pub fn runtime_call(&self) -> Option<&RuntimeCallContext> {
        self.runtime.as_ref()
    }

    /// What this call made (runtime plugins), for undoing it.
    pub fn take_journal(&mut self) -> CallJournal {
        self.runtime
            .as_mut()
            .map(|r| std::mem::take(&mut r.journal))
            .unwrap_or_default()
    }
}

/// WASI with only what the grants allow: by default no files, no
/// environment, no arguments, no network, stdio discarded and clocks at zero.
fn wasi_context(
    plugin: &Arc<str>,
    grants: &Grants,
    state_dir: Option<&std::path::Path>,
) -> Result<WasiCtx, String> {
    let mut builder = WasiCtxBuilder::new();
    if grants.stdio {
        builder
            .stdout(LogStream {
                plugin: plugin.clone(),
                stream: "stdout",
            })
            .stderr(LogStream {
                plugin: plugin.clone(),
                stream: "stderr",
            });
    }
    for (key, value) in &grants.env {
        builder.env(key, value);
    }
    for (host_dir, guest_path) in &grants.read_only_dirs {
        builder
            .preopened_dir(host_dir, guest_path, DirPerms::READ, FilePerms::READ)
            .map_err(|e| format!("read_only_dirs {}: {e}", host_dir.display()))?;
    }
    if let Some(dir) = state_dir {
        builder
            .preopened_dir(dir, "/state", DirPerms::all(), FilePerms::all())
            .map_err(|e| format!("state folder {}: {e}", dir.display()))?;
    }
    if !grants.clock {
        builder.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
    }
    Ok(builder.build())
}

/// A plugin's stdout or stderr (with the `stdio` grant): every line becomes
/// an entry of the host's log tagged with the plugin's name.
struct LogStream {
    plugin: Arc<str>,
    stream: &'static str,
}

impl StdoutStream for LogStream {
    fn stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogWriter {
            plugin: self.plugin.clone(),
            stream: self.stream,
            pending: Vec::new(),
        })
    }

    fn isatty(&self) -> bool {
        false
    }
}

struct LogWriter {
    plugin: Arc<str>,
    stream: &'static str,
    pending: Vec<u8>,
}

impl LogWriter {
    fn emit(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if !text.is_empty() {
            tracing::info!(plugin = %self.plugin, stream = %self.stream, "{text}");
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogWriter {
    async fn ready(&mut self) {}
}

impl OutputStream for LogWriter {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.pending.extend_from_slice(&bytes);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line);
        }
        if self.pending.len() > MAX_LINE {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_LINE)
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The clock of a plugin without the `clock` grant: time stands still at 0.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl IoView for PluginState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> &mut WasiCtx {
        &mut self.wasi
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: host::LogLevel, message: String) {
        let plugin = &*self.identity.name;
        // Plugins cannot forge multi-line entries.
        let message = message.replace(['\n', '\r'], " ");
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            host::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            host::LogLevel::Info => tracing::info!(plugin, "{message}"),
            host::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            host::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl config::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.identity.config.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        self.identity
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl super::bindings::types::Host for PluginState {}

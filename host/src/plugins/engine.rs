//! The wasmtime engine all plugins share: component model, epoch-based
//! deadlines (a ticker thread advances the epoch every millisecond), the
//! pooling allocator where the machine allows it, and an on-disk cache of
//! compiled components keyed by the wasm's SHA-256 and the engine's
//! compatibility hash.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::PluginError;

/// One epoch tick; plugin timeouts are counted in these.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How many whole epoch ticks cover `time` (rounded up, at least one).
pub fn ticks(time: Duration) -> u64 {
    let tick = EPOCH_TICK.as_millis().max(1);
    u64::try_from(time.as_millis().div_ceil(tick))
        .unwrap_or(u64::MAX)
        .max(1)
}

pub struct PluginEngine {
    pub engine: Engine,
    cache_dir: PathBuf,
    pub pooling: bool,
}

impl PluginEngine {
    /// `max_memory_bytes` is the largest memory limit of any plugin: the
    /// pool's slots are sized for it.
    pub fn new(cache_dir: PathBuf, max_memory_bytes: usize) -> Result<Arc<Self>, PluginError> {
        let (engine, pooling) = match Engine::new(&config(Some(max_memory_bytes))) {
            Ok(engine) => (engine, true),
            Err(err) => {
                tracing::warn!(error = %err, "pooling allocator unavailable here; using on-demand allocation");
                let engine =
                    Engine::new(&config(None)).map_err(|e| PluginError::Engine(e.to_string()))?;
                (engine, false)
            }
        };
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Arc::new(Self {
            engine,
            cache_dir,
            pooling,
        }))
    }

    /// Compiles a component, or loads it from the cache when this exact wasm
    /// was compiled by a compatible engine before.
    pub fn component(&self, plugin: &str, wasm: &[u8]) -> Result<Component, PluginError> {
        let cached = self.cache_path(wasm);
        if cached.exists() {
            // SAFETY: the cache holds only artifacts this host serialized
            // itself, under DATA_DIR (as trusted as our binary), and the file
            // name carries the engine's compatibility hash.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok(component),
                Err(err) => {
                    tracing::warn!(plugin, error = %err, "stale compile cache entry; recompiling")
                }
            }
        }
        let component =
            Component::from_binary(&self.engine, wasm).map_err(|e| PluginError::Compile {
                plugin: plugin.to_string(),
                reason: format!("{e:#}"),
            })?;
        if let Err(err) = self.store_in_cache(&component, &cached) {
            tracing::warn!(plugin, error = %err, "cannot write the compile cache");
        }
        Ok(component)
    }

    fn cache_path(&self, wasm: &[u8]) -> PathBuf {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let digest = hex::encode(Sha256::digest(wasm));
        self.cache_dir
            .join(format!("{digest}-{:016x}.cwasm", hasher.finish()))
    }

    fn store_in_cache(&self, component: &Component, path: &Path) -> std::io::Result<()> {
        let bytes = component.serialize().map_err(std::io::Error::other)?;
        std::fs::create_dir_all(&self.cache_dir)?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, bytes)?;
        std::fs::rename(partial, path)
    }
}

fn config(pool_memory: Option<usize>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if let Some(max_memory) = pool_memory {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_core_instances(2048)
            .total_memories(512)
            .total_tables(512)
            // No fiber stacks: no call is async. The default reserves 1000
            // stacks with a guard page each, 2000 mappings that every fork of
            // the host then copies (3.5 ms per process a runtime plugin starts,
            // measured; the sandbox's create waits for it).
            .total_stacks(0)
            .max_memory_size(max_memory);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

//! `opensandbox`: the OpenSandbox host. `opensandbox serve` loads the
//! configuration, opens the store, connects the runtime, reconciles what a
//! previous run left, and serves the REST API until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing::{info, warn};
use uuid::Uuid;

use opensandbox::agent::Agents;
use opensandbox::config::{Cli, Command, ServeConfig};
use opensandbox::plugins::{PluginChain, PluginDirs};
use opensandbox::runtimes::docker::{DockerRuntime, DockerSettings};
use opensandbox::runtimes::plugin::PluginRuntime;
use opensandbox::runtimes::{Runtime, Runtimes};
use opensandbox::s3::ObjectStore;
use opensandbox::sandbox::{RunLimits, Sandboxes, SnapshotPaths};
use opensandbox::transfer::Transfers;
use opensandbox::{api, store};

fn main() -> ExitCode {
    // Variables already in the environment win over the .env file.
    if let Err(err) = dotenvy::dotenv() {
        if !err.not_found() {
            eprintln!("error: cannot read .env: {err}");
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            if let Err(err) = config.validate() {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
            init_tracing();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("error: cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .with_context(|| format!("DATA_DIR={}: cannot create it", config.data_dir.display()))?;
    let host_id = load_host_id(&config.data_dir).await?;
    let store = store::Store::open(&config.data_dir)
        .await
        .with_context(|| {
            format!(
                "DATA_DIR={}: cannot open the store",
                config.data_dir.display()
            )
        })?;

    let plugins = load_plugins(&config, host_id).await?;

    let docker = DockerRuntime::connect(DockerSettings {
        docker_host: config.docker_host.clone(),
        btrfs_path: config.docker_btrfs_path.clone(),
        network: config.docker_network.clone(),
        host_id,
    })
    .await?;
    if let Err(err) = docker.ensure_image(&config.docker_image).await {
        warn!(error = %err, "DOCKER_IMAGE is not available; creating sandboxes with the default image will fail until it is");
    }
    let mut offered: Vec<Arc<dyn Runtime>> = vec![Arc::new(docker)];
    for plugin in plugins.runtimes() {
        let runtime = PluginRuntime::new(Arc::clone(plugin));
        match runtime.info().await {
            Ok(info) => {
                info!(runtime = %plugin.name, description = %info.description, network = info.network, resource_limits = info.resource_limits, "runtime plugin ready")
            }
            Err(err) => anyhow::bail!(
                "runtime plugin {:?}: capabilities failed: {err}",
                plugin.name
            ),
        }
        offered.push(Arc::new(runtime));
    }
    let runtimes = Runtimes::new(&config.sandbox_runtime, offered).map_err(anyhow::Error::msg)?;
    let limits = RunLimits {
        default_timeout: config.default_timeout(),
        max_timeout: config.max_timeout(),
        output_limit: usize::try_from(config.run_output_limit_bytes).unwrap_or(usize::MAX),
        process_buffer: config.process_output_buffer_bytes,
    };
    let agents = Arc::new(
        Agents::open(&config.data_dir, config.agent_binary.clone())
            .await
            .context("the in-sandbox agent")?,
    );
    let sandboxes = Arc::new(Sandboxes::new(
        store.clone(),
        runtimes,
        SnapshotPaths::new(&config.docker_btrfs_path, host_id),
        config.docker_image.clone(),
        limits,
        plugins,
        agents,
    ));
    sandboxes
        .recover()
        .await
        .context("start-up recovery failed")?;

    let s3 = match config.s3() {
        Some(settings) => {
            info!(bucket = %settings.bucket, prefix = %settings.prefix, "snapshot export and import to S3 enabled");
            Some(ObjectStore::connect(&settings).await)
        }
        None => None,
    };
    let transfers = Arc::new(Transfers::new(store.clone(), Arc::clone(&sandboxes), s3));
    transfers
        .recover()
        .await
        .context("start-up recovery of transfer jobs failed")?;

    let app = api::router(api::AppState {
        store,
        sandboxes,
        transfers,
    });
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on HOST={} PORT={}", config.host, config.port))?;
    info!(%addr, %host_id, "opensandbox listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server error")?;
    info!("shut down");
    Ok(())
}

/// Loads the plugins file, if any; compiling is CPU work, so it runs on the
/// blocking pool. Any failure stops start-up, naming the plugin.
async fn load_plugins(config: &ServeConfig, host_id: Uuid) -> anyhow::Result<Arc<PluginChain>> {
    let Some(path) = config.plugins_config.clone() else {
        return Ok(Arc::new(PluginChain::empty()));
    };
    let dirs = PluginDirs {
        cache: config.data_dir.join("plugin-cache"),
        state: config.data_dir.join("plugin-state"),
        process_ledgers: config.data_dir.join("plugin-processes"),
        btrfs_own: SnapshotPaths::new(&config.docker_btrfs_path, host_id)
            .runtimes_root()
            .to_path_buf(),
        btrfs_shared: config.docker_btrfs_path.join("runtimes"),
    };
    let handle = tokio::runtime::Handle::current();
    let chain = tokio::task::spawn_blocking(move || PluginChain::load(&path, &dirs, &handle))
        .await
        .context("plugin loading panicked")??;
    Ok(Arc::new(chain))
}

/// The host's identity, kept in DATA_DIR: it marks the containers and
/// snapshots this host owns, so hosts sharing an engine never touch each other's.
async fn load_host_id(data_dir: &Path) -> anyhow::Result<Uuid> {
    let path = data_dir.join("host-id");
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => Uuid::parse_str(text.trim())
            .with_context(|| format!("{} is corrupt; it must hold a UUID", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let id = Uuid::new_v4();
            let partial = data_dir.join("host-id.partial");
            tokio::fs::write(&partial, id.to_string()).await?;
            tokio::fs::rename(&partial, &path).await?;
            Ok(id)
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

//! Command line and configuration: every setting is an environment variable
//! (also read from `.env` in the working directory) with a matching flag, so
//! `opensandbox --help` and `opensandbox serve --help` document them all.
//! Parsing errors name the variable, and `serve` refuses to start on them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The runtimes a sandbox can run on.
/// The runtimes built into the host (runtime plugins come on top).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Containers through the Docker Engine API, with Btrfs snapshots.
    Docker,
    /// VirtualBox VMs (not available in this build).
    Virtualbox,
    /// Firecracker microVMs (not available in this build).
    Firecracker,
}

impl RuntimeKind {
    /// The built-in runtime of that name that this build lacks, if it is one.
    pub fn unbuilt(name: &str) -> Option<Self> {
        match name {
            "virtualbox" => Some(RuntimeKind::Virtualbox),
            "firecracker" => Some(RuntimeKind::Firecracker),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Virtualbox => "virtualbox",
            RuntimeKind::Firecracker => "firecracker",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "opensandbox",
    version,
    about = "Self-hosted sandbox orchestrator: isolated sandboxes behind a REST API, with instant Btrfs snapshots",
    after_help = "Every option of `serve` can also be set by the environment variable shown beside it,\n\
                  or in a .env file in the working directory (the environment wins).\n\
                  Run `opensandbox serve --help` for the full list."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the REST API service in the foreground.
    Serve(ServeConfig),
}

/// Settings of `opensandbox serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on. The default keeps the API on this machine.
    #[arg(long, env = "HOST", value_name = "HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// HTTP port.
    #[arg(long, env = "PORT", value_name = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Folder for the store (SQLite file) and the host id; created on first start.
    #[arg(
        long,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "/var/lib/opensandbox"
    )]
    pub data_dir: PathBuf,

    /// Runtime for new sandboxes when no policy chooses: `docker`, or the name of a
    /// runtime plugin loaded from PLUGINS_CONFIG (e.g. `namespaces`).
    #[arg(
        long,
        env = "SANDBOX_RUNTIME",
        value_name = "SANDBOX_RUNTIME",
        default_value = "docker",
        value_parser = parse_runtime_name
    )]
    pub sandbox_runtime: String,

    /// Default image of new Docker sandboxes (must exist in the engine or be pullable).
    #[arg(
        long,
        env = "DOCKER_IMAGE",
        value_name = "DOCKER_IMAGE",
        default_value = "ubuntu:22.04"
    )]
    pub docker_image: String,

    /// Btrfs filesystem holding the engine's data root (dockerd --data-root under it,
    /// --storage-driver btrfs) and the sandboxes' snapshots.
    #[arg(
        long,
        env = "DOCKER_BTRFS_PATH",
        value_name = "DOCKER_BTRFS_PATH",
        default_value = "/var/lib/sandbox-btrfs"
    )]
    pub docker_btrfs_path: PathBuf,

    /// Docker network mode of sandboxes; `none` gives them no network at all.
    #[arg(
        long,
        env = "DOCKER_NETWORK",
        value_name = "DOCKER_NETWORK",
        default_value = "none",
        value_parser = parse_network
    )]
    pub docker_network: String,

    /// Docker Engine endpoint, e.g. unix:///run/opensandbox/docker.sock
    /// (default: the engine's usual unix:///var/run/docker.sock).
    #[arg(long, env = "DOCKER_HOST", value_name = "DOCKER_HOST")]
    pub docker_host: Option<String>,

    /// Plugins file (TOML) listing the Wasm policy and hook plugins to load;
    /// none by default. See plugins/README.md.
    #[arg(long, env = "PLUGINS_CONFIG", value_name = "PLUGINS_CONFIG")]
    pub plugins_config: Option<PathBuf>,

    /// Cap on each of stdout and stderr of one command, in bytes.
    #[arg(
        long,
        env = "RUN_OUTPUT_LIMIT_BYTES",
        value_name = "RUN_OUTPUT_LIMIT_BYTES",
        default_value_t = 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1..=64 * 1024 * 1024)
    )]
    pub run_output_limit_bytes: u64,

    /// Replay buffer of each background process in the agent: the most
    /// recent output kept for clients that attach later.
    #[arg(
        long,
        env = "PROCESS_OUTPUT_BUFFER_BYTES",
        value_name = "PROCESS_OUTPUT_BUFFER_BYTES",
        default_value_t = 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(4096..=256 * 1024 * 1024)
    )]
    pub process_output_buffer_bytes: u64,

    /// The static in-sandbox agent (built by scripts/build-agent.sh into
    /// target/agent/opensandbox-agent); it is mounted into every sandbox.
    #[arg(
        long,
        env = "AGENT_BINARY",
        value_name = "AGENT_BINARY",
        default_value = "/usr/local/lib/opensandbox/opensandbox-agent"
    )]
    pub agent_binary: PathBuf,

    /// Timeout of a command that gives none, in milliseconds.
    #[arg(
        long,
        env = "RUN_TIMEOUT_MS",
        value_name = "RUN_TIMEOUT_MS",
        default_value_t = 60_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub run_timeout_ms: u64,

    /// Largest timeout a command may ask for, in milliseconds.
    #[arg(
        long,
        env = "RUN_MAX_TIMEOUT_MS",
        value_name = "RUN_MAX_TIMEOUT_MS",
        default_value_t = 3_600_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub run_max_timeout_ms: u64,

    /// S3 bucket for snapshot export and import; unset turns those endpoints off
    /// (they answer 503 `s3_not_configured`). Credentials come from the standard
    /// AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, instance roles).
    #[arg(long, env = "S3_BUCKET", value_name = "S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Region of S3_BUCKET.
    #[arg(
        long,
        env = "S3_REGION",
        value_name = "S3_REGION",
        default_value = "us-east-1"
    )]
    pub s3_region: String,

    /// Prefix of every object this host writes to S3_BUCKET.
    #[arg(
        long,
        env = "S3_PREFIX",
        value_name = "S3_PREFIX",
        default_value = "snapshots/"
    )]
    pub s3_prefix: String,

    /// Endpoint of an S3-compatible server (e.g. http://127.0.0.1:9000); when set,
    /// requests use path-style addressing.
    #[arg(long, env = "S3_ENDPOINT", value_name = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
}

/// A configuration that parsed but cannot be served; names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("RUN_TIMEOUT_MS ({default}) must not exceed RUN_MAX_TIMEOUT_MS ({max})")]
    TimeoutAboveMax { default: u64, max: u64 },
    #[error("SANDBOX_RUNTIME={0}: this runtime is not available in this build; use docker or a runtime plugin")]
    RuntimeUnavailable(&'static str),
    #[error("DOCKER_IMAGE={0:?} is not a valid image reference")]
    InvalidImage(String),
    #[error("S3_BUCKET={0:?} is not a valid bucket name")]
    InvalidBucket(String),
    #[error("S3_ENDPOINT={0:?} must start with http:// or https://")]
    InvalidEndpoint(String),
}

impl ServeConfig {
    /// Checks the relations between settings that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.run_timeout_ms > self.run_max_timeout_ms {
            return Err(ConfigError::TimeoutAboveMax {
                default: self.run_timeout_ms,
                max: self.run_max_timeout_ms,
            });
        }
        if let Some(kind) = RuntimeKind::unbuilt(&self.sandbox_runtime) {
            return Err(ConfigError::RuntimeUnavailable(kind.as_str()));
        }
        if crate::names::validate_image(&self.docker_image).is_err() {
            return Err(ConfigError::InvalidImage(self.docker_image.clone()));
        }
        if let Some(bucket) = &self.s3_bucket {
            let ok = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !ok {
                return Err(ConfigError::InvalidBucket(bucket.clone()));
            }
        }
        if let Some(endpoint) = &self.s3_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::InvalidEndpoint(endpoint.clone()));
            }
        }
        Ok(())
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.run_timeout_ms)
    }

    pub fn max_timeout(&self) -> Duration {
        Duration::from_millis(self.run_max_timeout_ms)
    }

    /// The S3 settings, when S3_BUCKET is set.
    pub fn s3(&self) -> Option<crate::s3::S3Settings> {
        self.s3_bucket.as_ref().map(|bucket| crate::s3::S3Settings {
            bucket: bucket.clone(),
            region: self.s3_region.clone(),
            prefix: self.s3_prefix.clone(),
            endpoint: self.s3_endpoint.clone(),
        })
    }
}

/// Docker network modes and network names: no path or shell metacharacters.
fn parse_network(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(value.to_string())
    } else {
        Err("expected a Docker network mode such as none, host or a network name".to_string())
    }
}

fn parse_runtime_name(value: &str) -> Result<String, String> {
    crate::names::validate_resource_name("runtime", value)
        .map(|()| value.to_string())
        .map_err(|_| "expected docker or a runtime plugin's name ([a-z0-9-])".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["opensandbox", "serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
    }

    fn serve(cli: Cli) -> ServeConfig {
        match cli.command {
            Command::Serve(config) => config,
        }
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = parse(&["--sandbox-runtime", "Not A Name"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SANDBOX_RUNTIME"), "{err}");
        let err = parse(&["--port", "99999"]).unwrap_err().to_string();
        assert!(err.contains("PORT"), "{err}");
        let err = parse(&["--docker-network", "a;b"]).unwrap_err().to_string();
        assert!(err.contains("DOCKER_NETWORK"), "{err}");
    }

    #[test]
    fn unavailable_runtime_is_refused_by_name() {
        let config = serve(parse(&["--sandbox-runtime", "virtualbox"]).unwrap());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("SANDBOX_RUNTIME=virtualbox"), "{err}");
    }

    #[test]
    fn default_timeout_may_not_exceed_the_maximum() {
        let config =
            serve(parse(&["--run-timeout-ms", "10", "--run-max-timeout-ms", "5"]).unwrap());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("RUN_MAX_TIMEOUT_MS"), "{err}");
    }
}

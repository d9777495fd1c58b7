//! The host's side of the in-sandbox agent: where each sandbox's socket
//! folder lives, one multiplexed gRPC connection per sandbox (made lazily,
//! remade after the agent restarts), readiness and health checks, and the
//! agent binary every sandbox mounts. The protocol is
//! `proto/opensandbox/agent/v1/agent.proto`.

mod binary;
mod socket;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use opensandbox_agent_proto::v1::agent_client::AgentClient;
use opensandbox_agent_proto::v1::{InfoRequest, InfoResponse};
use opensandbox_agent_proto::{PROTOCOL_MAJOR, SOCKET_NAME};
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

pub use opensandbox_agent_proto::v1 as pb;
pub use opensandbox_agent_proto::{BINARY_IN_SANDBOX, SOCKET_DIR_IN_SANDBOX};

/// A connection to one sandbox's agent.
pub type Client = AgentClient<Channel>;

/// How long a health probe may take before the agent counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Output and file chunks are large; the default 4 MiB cap is enough, but
/// windows sized for a fast local stream keep throughput up.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent binary is missing or unusable (start-up only).
    #[error("{0}")]
    Binary(String),
    #[error("the sandbox's agent is not reachable: {0}")]
    Unavailable(String),
    /// The agent answered with an error status.
    #[error("{message}")]
    Status { code: tonic::Code, message: String },
    #[error("the sandbox's agent speaks protocol v{0}; this host speaks v{PROTOCOL_MAJOR}")]
    Protocol(u32),
}

impl From<tonic::Status> for AgentError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            // Connection failures surface as Unavailable (or Unknown for a
            // stream cut mid-way by a dying agent).
            tonic::Code::Unavailable => AgentError::Unavailable(status.message().to_string()),
            code => AgentError::Status {
                code,
                message: status.message().to_string(),
            },
        }
    }
}

impl AgentError {
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AgentError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// The agents of this host's sandboxes.
pub struct Agents {
    /// DATA_DIR/agents: one folder per sandbox, mounted at
    /// [`SOCKET_DIR_IN_SANDBOX`].
    root: PathBuf,
    /// The installed agent binary, mounted read-only at [`BINARY_IN_SANDBOX`].
    binary: PathBuf,
    clients: Mutex<HashMap<Uuid, Client>>,
}

impl Agents {
    /// Checks and installs the agent binary under `data_dir`.
    pub async fn open(data_dir: &Path, agent_binary: PathBuf) -> Result<Self> {
        let binary = binary::install(agent_binary, data_dir.join("agent-bin")).await?;
        let root = data_dir.join("agents");
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| AgentError::Binary(format!("{}: {e}", root.display())))?;
        Ok(Self {
            root,
            binary,
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The host folder holding a sandbox's agent socket.
    pub fn socket_dir(&self, sandbox: Uuid) -> PathBuf {
        self.root.join(sandbox.to_string())
    }

    /// Whether the sandbox was created with an agent (older ones were not).
    pub async fn has_agent(&self, sandbox: Uuid) -> bool {
        tokio::fs::metadata(self.socket_dir(sandbox)).await.is_ok()
    }

    /// Creates the sandbox's socket folder (owner only).
    pub async fn prepare(&self, sandbox: Uuid) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.socket_dir(sandbox);
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).await?;
        Ok(dir)
    }

    /// Drops the connection and removes the socket folder.
    pub async fn remove(&self, sandbox: Uuid) -> std::io::Result<()> {
        self.forget(sandbox);
        match tokio::fs::remove_dir_all(self.socket_dir(sandbox)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the socket folders of sandboxes that no longer exist (deleted
    /// while the host was down); returns how many.
    pub async fn remove_orphans(
        &self,
        known: &std::collections::HashSet<Uuid>,
    ) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(&self.root).await?;
        while let Some(entry) = entries.next_entry().await? {
            let id = entry
                .file_name()
                .to_str()
                .and_then(|s| Uuid::parse_str(s).ok());
            if id.is_some_and(|id| known.contains(&id)) {
                continue;
            }
            tokio::fs::remove_dir_all(entry.path()).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Drops the cached connection (the agent restarted with its sandbox).
    pub fn forget(&self, sandbox: Uuid) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&sandbox);
        }
    }

    /// The sandbox's connection; made on first use.
    pub fn client(&self, sandbox: Uuid) -> Client {
        let mut clients = match self.clients.lock() {
            Ok(clients) => clients,
            Err(poisoned) => poisoned.into_inner(),
        };
        clients
            .entry(sandbox)
            .or_insert_with(|| self.connect(sandbox))
            .clone()
    }

    fn connect(&self, sandbox: Uuid) -> Client {
        let path = self.socket_dir(sandbox).join(SOCKET_NAME);
        // The URI is a placeholder: the connector decides where bytes go.
        let channel = Endpoint::from_static("http://agent.invalid")
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect_timeout(Duration::from_secs(2))
            // A frozen or vanished agent fails calls instead of hanging them.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move { socket::connect(&path).await.map(TokioIo::new) }
            }));
        AgentClient::new(channel)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024)
    }

    /// Asks the agent who it is, within a short deadline.
    pub async fn info(&self, sandbox: Uuid) -> Result<InfoResponse> {
        let mut client = self.client(sandbox);
        let reply = tokio::time::timeout(PROBE_TIMEOUT, client.info(InfoRequest {}))
            .await
            .map_err(|_| AgentError::Unavailable("no answer to a health probe".into()))??
            .into_inner();
        if reply.protocol_major != PROTOCOL_MAJOR {
            return Err(AgentError::Protocol(reply.protocol_major));
        }
        Ok(reply)
    }

    /// Waits until a freshly started agent answers.
    pub async fn wait_ready(&self, sandbox: Uuid, within: Duration) -> Result<InfoResponse> {
        let started = tokio::time::Instant::now();
        let deadline = started + within;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.info(sandbox).await {
                Ok(info) => return Ok(info),
                Err(AgentError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                    // A failed connect poisons nothing, but start afresh so the
                    // next try dials again at once.
                    self.forget(sandbox);
                    tokio::time::sleep(pause).await;
                    // Millisecond steps while an agent may be about to answer
                    // (a namespaces sandbox is up in a few), then longer ones.
                    if started.elapsed() > Duration::from_millis(100) {
                        pause = Duration::from_millis(10);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }
}

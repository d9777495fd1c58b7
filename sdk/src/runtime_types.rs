//! The records and variants of the WIT interface `runtime-types` (custom runtimes and the host
//! capabilities they import), as plain Rust types.

use std::fmt;

/// Why a host capability ([`btrfs`](crate::btrfs), [`process`](crate::process)) refused or
/// failed a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CapabilityError {
    /// The plugin's grants do not allow this call; the text names the missing grant.
    NotGranted(String),
    /// A name or an argument is not acceptable; the text says which and why.
    Invalid(String),
    /// The named subvolume or process does not exist (or is not this plugin's).
    NotFound(String),
    /// The named subvolume exists already.
    Exists(String),
    /// The host tried and failed (an I/O error, a limit reached); the text says why.
    Failed(String),
}

impl CapabilityError {
    /// The host's explanation, whatever the case.
    pub fn message(&self) -> &str {
        match self {
            CapabilityError::NotGranted(m)
            | CapabilityError::Invalid(m)
            | CapabilityError::NotFound(m)
            | CapabilityError::Exists(m)
            | CapabilityError::Failed(m) => m,
        }
    }
}

impl fmt::Display for CapabilityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            CapabilityError::NotGranted(_) => "not granted",
            CapabilityError::Invalid(_) => "invalid",
            CapabilityError::NotFound(_) => "not found",
            CapabilityError::Exists(_) => "exists",
            CapabilityError::Failed(_) => "failed",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for CapabilityError {}

/// How the host puts its agent (the sandbox's init) into an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AgentMount {
    /// Host path of the static agent binary; mount it read-only at `/.opensandbox/agent`.
    pub binary: String,
    /// Host folder for the agent's socket; mount it read-write at `/.opensandbox/run`.
    pub socket_dir: String,
    /// Arguments to pass to the agent after its path.
    pub args: Vec<String>,
}

/// What the host asks a runtime to create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct InstanceSpec {
    /// The sandbox's id (a UUID): stable, unique on this host, safe in names.
    pub sandbox_id: String,
    /// The sandbox's name, for use as its hostname.
    pub hostname: String,
    /// The image the client asked for (for example `ubuntu:22.04`).
    pub image: String,
    /// Variables for every process of the sandbox, as `(name, value)`, sorted by name.
    pub env: Vec<(String, String)>,
    /// The agent the instance must run as its init (PID 1).
    pub agent: AgentMount,
}

impl InstanceSpec {
    /// The value of the variable `name`, if the spec sets it.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A created (not yet started) instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Instance {
    /// The runtime's own id of the instance; the host passes it back to every later call.
    /// At most 128 characters from `[A-Za-z0-9._-]`.
    pub id: String,
    /// The Btrfs subvolume (a name under the plugin's Btrfs root, see [`btrfs`](crate::btrfs))
    /// holding the instance's whole root filesystem. The host snapshots it, and on restore
    /// replaces it while the instance is stopped, so the instance must read its root from
    /// there at every start.
    pub root_subvolume: String,
}

/// What an instance is doing, as [`Driver::inspect`](crate::Driver::inspect) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Started and its init is alive.
    Running,
    /// Created or stopped; `start` can run it again.
    Stopped,
    /// The runtime has no such instance.
    Missing,
}

/// One instance the runtime manages, for reconciliation after a host restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ManagedInstance {
    /// The instance's id, as `create` returned it.
    pub id: String,
    /// The sandbox it was created for, if the runtime knows it.
    pub sandbox_id: Option<String>,
}

/// What the runtime offers, shown to operators and to policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct DriverInfo {
    /// One line describing the runtime.
    pub description: String,
    /// Whether sandboxes of this runtime can reach a network (false: loopback only).
    pub network: bool,
    /// Whether memory and CPU limits are enforced on this host.
    pub resource_limits: bool,
}

/// Why a driver call failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DriverError {
    /// The image cannot be had on this host; the client sees this (HTTP 400).
    ImageUnavailable(String),
    /// No instance with this id.
    NotFound(String),
    /// The runtime cannot work on this host or with this input; the text says why.
    Failed(String),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::ImageUnavailable(m) => write!(f, "image unavailable: {m}"),
            DriverError::NotFound(m) => write!(f, "not found: {m}"),
            DriverError::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

impl std::error::Error for DriverError {}

/// A capability's failure fails the driver call, so that `?` works in a driver; match the
/// [`CapabilityError`] first where a case (say `NotFound`) is not a failure.
impl From<CapabilityError> for DriverError {
    fn from(e: CapabilityError) -> Self {
        DriverError::Failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_well() {
        let e = CapabilityError::NotGranted("btrfs".to_string());
        assert_eq!(e.to_string(), "not granted: btrfs");
        assert_eq!(
            DriverError::from(e),
            DriverError::Failed("not granted: btrfs".to_string())
        );
        let spec = InstanceSpec {
            env: vec![("A".to_string(), "1".to_string())],
            ..InstanceSpec::default()
        };
        assert_eq!(spec.env_var("A"), Some("1"));
        assert_eq!(spec.env_var("B"), None);
    }
}

//! The instance records in the state folder: one JSON file per instance,
//! `/state/<instance-id>.json`, holding what `start` needs (every call runs in a fresh
//! instance of the plugin) and the id of the running bwrap process.

use opensandbox_plugin_sdk::{state, AgentMount, DriverError};
use serde::{Deserialize, Serialize};

/// One instance, as its state file holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The sandbox it was created for (also its instance id).
    pub sandbox_id: String,
    /// The image it was made from, for operators reading the file.
    pub image: String,
    pub hostname: String,
    /// The spec's variables, sorted by name.
    pub env: Vec<(String, String)>,
    pub agent: Agent,
    /// The bwrap process's id (the host's), while started.
    #[serde(default)]
    pub process: Option<String>,
}

/// [`AgentMount`], serializable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub binary: String,
    pub socket_dir: String,
    pub args: Vec<String>,
}

impl From<&AgentMount> for Agent {
    fn from(a: &AgentMount) -> Self {
        Agent {
            binary: a.binary.clone(),
            socket_dir: a.socket_dir.clone(),
            args: a.args.clone(),
        }
    }
}

impl From<&Agent> for AgentMount {
    fn from(a: &Agent) -> Self {
        AgentMount {
            binary: a.binary.clone(),
            socket_dir: a.socket_dir.clone(),
            args: a.args.clone(),
        }
    }
}

const SUFFIX: &str = ".json";

fn file(id: &str) -> String {
    format!("{id}{SUFFIX}")
}

fn failed(what: &str, id: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Failed(format!("{what} the state of instance {id}: {e}"))
}

/// The record of instance `id`, `None` when it has none.
pub fn load(id: &str) -> Result<Option<Record>, DriverError> {
    match state::read(&file(id)).map_err(|e| failed("reading", id, e))? {
        None => Ok(None),
        Some(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| failed("parsing", id, e)),
    }
}

/// Writes the record of instance `id` (atomically: a crash keeps the old one).
pub fn save(id: &str, record: &Record) -> Result<(), DriverError> {
    let data = serde_json::to_vec_pretty(record).map_err(|e| failed("encoding", id, e))?;
    state::write(&file(id), data).map_err(|e| failed("writing", id, e))
}

/// Removes the record of instance `id`; a missing one is not an error.
pub fn remove(id: &str) -> Result<(), DriverError> {
    state::remove(&file(id))
        .map(|_| ())
        .map_err(|e| failed("removing", id, e))
}

/// The ids of every instance with a record, sorted.
pub fn ids() -> Result<Vec<String>, DriverError> {
    let names =
        state::list().map_err(|e| DriverError::Failed(format!("listing the state folder: {e}")))?;
    Ok(names
        .iter()
        .filter_map(|n| n.strip_suffix(SUFFIX))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let record = Record {
            sandbox_id: "a".to_string(),
            hostname: "web".to_string(),
            env: vec![("A".to_string(), "1".to_string())],
            process: Some("7".to_string()),
            ..Record::default()
        };
        assert_eq!(load("a"), Ok(None));
        save("a", &record).unwrap();
        assert_eq!(load("a"), Ok(Some(record)));
        assert_eq!(ids(), Ok(vec!["a".to_string()]));
        state::write("b.json", "{").unwrap();
        assert!(matches!(load("b"), Err(DriverError::Failed(m)) if m.contains("parsing")));
        remove("a").unwrap();
        remove("a").unwrap();
        assert_eq!(ids(), Ok(vec!["b".to_string()]));
    }
}

//! The manifest written beside every exported stream: what the stream is,
//! where it came from, and the chain of streams (a full one, then
//! incrementals) that rebuilds the snapshot, each with its size and SHA-256.
//! Uploaded last, so a visible manifest means a complete export.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::names;

/// The `format` of every manifest we write.
pub const FORMAT: &str = "opensandbox-snapshot";
/// The manifest version this host writes and reads.
pub const VERSION: u32 = 1;
/// Largest manifest we read; a real one is a few KiB.
pub const MAX_BYTES: usize = 1024 * 1024;
/// Longest chain we accept: a bound on what a foreign manifest can make us fetch.
pub const MAX_CHAIN: usize = 1000;

/// One `btrfs send` stream, zstd-compressed, in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamEntry {
    /// Object key (bucket-relative, prefix included) of the compressed stream.
    pub key: String,
    /// Name of the snapshot the stream carries (also its subvolume's name).
    pub snapshot: String,
    /// The snapshot it is a difference from (`btrfs send -p`); none for a full stream.
    pub parent_snapshot: Option<String>,
    /// Size of the object (compressed).
    pub compressed_bytes: u64,
    /// Size of the `btrfs send` stream before compression.
    pub stream_bytes: u64,
    /// SHA-256 of the object (the compressed stream), lowercase hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Runtime of the exported sandbox (`docker`).
    pub runtime: String,
    /// Image the sandbox was created from; an import creates its container from it.
    pub image: String,
    /// The exported sandbox's name and id on its host.
    pub vm: String,
    pub sandbox_id: String,
    /// The snapshot exported.
    pub snapshot: String,
    /// When the snapshot was taken.
    pub snapshot_created_at: DateTime<Utc>,
    pub exported_at: DateTime<Utc>,
    /// This export's own stream (the chain's last entry).
    pub stream: StreamEntry,
    /// Manifest key of the export this one is a difference from, if any.
    pub parent: Option<String>,
    /// Every stream to receive, in order: a full one first, then differences.
    pub chain: Vec<StreamEntry>,
}

/// Why a manifest is not one we can import.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ForeignManifest(pub String);

impl Manifest {
    /// Parses and checks a manifest read from the bucket.
    /// Parses and checks a manifest; `runtimes` are the runtimes this host has.
    pub fn parse(data: &[u8], runtimes: &[&str]) -> Result<Self, ForeignManifest> {
        let manifest: Manifest = serde_json::from_slice(data)
            .map_err(|e| ForeignManifest(format!("not an OpenSandbox snapshot manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(ForeignManifest(format!(
                "not an OpenSandbox snapshot manifest (format {:?})",
                manifest.format
            )));
        }
        if manifest.version != VERSION {
            return Err(ForeignManifest(format!(
                "manifest version {} is not supported (this host reads version {VERSION})",
                manifest.version
            )));
        }
        if !runtimes.contains(&manifest.runtime.as_str()) {
            return Err(ForeignManifest(format!(
                "the snapshot is of a {:?} sandbox; this host has the runtimes {}",
                manifest.runtime,
                runtimes.join(", ")
            )));
        }
        if manifest.chain.is_empty() || manifest.chain.len() > MAX_CHAIN {
            return Err(ForeignManifest(format!(
                "the chain has {} streams; it must have 1 to {MAX_CHAIN}",
                manifest.chain.len()
            )));
        }
        if manifest.chain.last() != Some(&manifest.stream) {
            return Err(ForeignManifest(
                "the chain does not end with the manifest's own stream".into(),
            ));
        }
        if manifest.chain[0].parent_snapshot.is_some() {
            return Err(ForeignManifest(
                "the chain does not start with a full stream".into(),
            ));
        }
        names::validate_image(&manifest.image)
            .map_err(|e| ForeignManifest(format!("image: {e}")))?;
        for entry in &manifest.chain {
            names::validate_resource_name("snapshot", &entry.snapshot)
                .map_err(|e| ForeignManifest(format!("chain: {e}")))?;
            let hex_ok = entry.sha256.len() == 64
                && entry
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex_ok {
                return Err(ForeignManifest(format!(
                    "chain: {:?} is not a SHA-256",
                    entry.sha256
                )));
            }
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(snapshot: &str, parent: Option<&str>) -> StreamEntry {
        StreamEntry {
            key: format!("p/{snapshot}.btrfs.zst"),
            snapshot: snapshot.into(),
            parent_snapshot: parent.map(str::to_string),
            compressed_bytes: 10,
            stream_bytes: 20,
            sha256: "a".repeat(64),
        }
    }

    fn manifest() -> Manifest {
        let chain = vec![entry("s1", None), entry("s2", Some("s1"))];
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            runtime: "docker".into(),
            image: "ubuntu:22.04".into(),
            vm: "a".into(),
            sandbox_id: "x".into(),
            snapshot: "s2".into(),
            snapshot_created_at: Utc::now(),
            exported_at: Utc::now(),
            stream: chain[1].clone(),
            parent: Some("p/s1.manifest.json".into()),
            chain,
        }
    }

    #[test]
    fn a_manifest_round_trips() {
        let data = serde_json::to_vec(&manifest()).unwrap();
        let parsed = Manifest::parse(&data, &["docker"]).unwrap();
        assert_eq!(parsed.chain.len(), 2);
        assert!(Manifest::parse(&data, &["namespaces", "docker"]).is_ok());
    }

    #[test]
    fn foreign_and_inconsistent_manifests_are_refused() {
        assert!(Manifest::parse(b"hello", &["docker"]).is_err());
        assert!(Manifest::parse(b"{\"format\":\"x\"}", &["docker"]).is_err());
        let data = serde_json::to_vec(&manifest()).unwrap();
        assert!(Manifest::parse(&data, &["namespaces", "firecracker"]).is_err());
        let mut m = manifest();
        m.chain.pop();
        assert!(Manifest::parse(&serde_json::to_vec(&m).unwrap(), &["docker"]).is_err());
        let mut m = manifest();
        m.chain[0].sha256 = "zz".into();
        assert!(Manifest::parse(&serde_json::to_vec(&m).unwrap(), &["docker"]).is_err());
        let mut m = manifest();
        m.chain[1].snapshot = "../x".into();
        m.stream = m.chain[1].clone();
        assert!(Manifest::parse(&serde_json::to_vec(&m).unwrap(), &["docker"]).is_err());
    }
}

//! The agent binary the host mounts into every sandbox: checked once at
//! start-up (an ELF executable with no program interpreter, so it runs in
//! any image, with or without a libc) and copied into DATA_DIR under its
//! content hash, so rebuilding it never changes a file a running sandbox has
//! mounted.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::AgentError;

const PT_INTERP: u32 = 3;

/// Validates `source` and installs it as `dir/opensandbox-agent-<hash>`.
pub async fn install(source: PathBuf, dir: PathBuf) -> Result<PathBuf, AgentError> {
    tokio::task::spawn_blocking(move || install_blocking(&source, &dir))
        .await
        .map_err(|e| AgentError::Binary(format!("install task failed: {e}")))?
}

fn install_blocking(source: &Path, dir: &Path) -> Result<PathBuf, AgentError> {
    let hint = "build it with scripts/build-agent.sh or set AGENT_BINARY";
    let bytes = std::fs::read(source).map_err(|e| {
        AgentError::Binary(format!("AGENT_BINARY={}: {e}; {hint}", source.display()))
    })?;
    check_static_elf(&bytes).map_err(|why| {
        AgentError::Binary(format!("AGENT_BINARY={}: {why}; {hint}", source.display()))
    })?;
    let hash = hex::encode(Sha256::digest(&bytes));
    let target = dir.join(format!("opensandbox-agent-{}", &hash[..16]));
    if target.exists() {
        return Ok(target);
    }
    let io = |e: std::io::Error| AgentError::Binary(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let partial = dir.join(format!(".partial-{}", &hash[..16]));
    std::fs::write(&partial, &bytes).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o555)).map_err(io)?;
    std::fs::rename(&partial, &target).map_err(io)?;
    Ok(target)
}

/// A 64-bit little-endian ELF executable without a PT_INTERP header (that
/// header names the dynamic loader, which an image may not have).
fn check_static_elf(bytes: &[u8]) -> Result<(), String> {
    let field = |at: usize, len: usize| -> Result<u64, String> {
        let slice = bytes
            .get(at..at + len)
            .ok_or_else(|| "truncated ELF file".to_string())?;
        let mut value = 0u64;
        for (i, b) in slice.iter().enumerate() {
            value |= u64::from(*b) << (8 * i);
        }
        Ok(value)
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF executable".into());
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let phoff = usize::try_from(field(0x20, 8)?).map_err(|e| e.to_string())?;
    let phentsize = field(0x36, 2)? as usize;
    let phnum = field(0x38, 2)? as usize;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if field(at, 4)? as u32 == PT_INTERP {
            return Err(
                "dynamically linked (it names a program interpreter); the agent must be a \
                 static binary (x86_64-unknown-linux-musl)"
                    .into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_refused() {
        // The test binary itself is dynamically linked against glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_static_elf(&me).unwrap_err();
        assert!(err.contains("dynamically linked"), "{err}");
    }

    #[test]
    fn non_elf_and_truncated_files_are_refused() {
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        assert!(check_static_elf(b"\x7fELF\x02\x01").is_err());
    }
}

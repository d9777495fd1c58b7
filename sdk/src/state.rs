//! The plugin's own folder, for what it must remember between calls and across host restarts
//! (runtime plugins only; needs the `state` grant).
//!
//! Every call runs in a fresh instance, so a runtime keeps what a later call needs (its
//! instances, the ids of their processes) in files. The host preopens the folder
//! `DATA_DIR/plugin-state/<plugin>` at [`DIR`] (`/state`) through WASI, so `std::fs` works on
//! it too; these helpers add flat, checked file names and atomic writes (a crash leaves the
//! old file or the new one, never half of one).
//!
//! ```
//! use opensandbox_plugin_sdk::state;
//!
//! # fn main() -> std::io::Result<()> {
//! state::write("5f0c.json", br#"{"process":"7"}"#)?;
//! assert_eq!(state::list()?, vec!["5f0c.json"]);
//! assert_eq!(state::read_to_string("5f0c.json")?.as_deref(), Some(r#"{"process":"7"}"#));
//! assert!(state::remove("5f0c.json")?);
//! assert_eq!(state::read("5f0c.json")?, None);
//! # Ok(())
//! # }
//! ```
//!
//! On targets other than `wasm32` the folder is a per-thread temporary folder, see
//! [`testing::state_dir`](crate::testing::state_dir).

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::path::PathBuf;

/// Where the host mounts the folder in the plugin.
pub const DIR: &str = "/state";

/// The folder: [`DIR`] in a plugin, a temporary folder in native tests.
pub fn dir() -> PathBuf {
    imp::dir()
}

/// Whether `name` is acceptable as a file name here: 1 to 255 bytes, no `/` or NUL, not
/// starting with `.` (those are the temporary files of [`write()`]).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.starts_with('.') && !name.contains(['/', '\0'])
}

fn path(name: &str) -> io::Result<PathBuf> {
    if is_valid_name(name) {
        Ok(dir().join(name))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("state file name {name:?}: want 1 to 255 bytes, no '/', not starting with '.'"),
        ))
    }
}

/// Names the path in an I/O error, which otherwise says only what went wrong.
fn context(e: io::Error, what: &str, path: &std::path::Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The contents of the file `name`, `None` when there is no such file.
pub fn read(name: &str) -> io::Result<Option<Vec<u8>>> {
    let path = path(name)?;
    match fs::read(&path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(context(e, "reading", &path)),
    }
}

/// The contents of the file `name` as UTF-8 text, `None` when there is no such file.
pub fn read_to_string(name: &str) -> io::Result<Option<String>> {
    match read(name)? {
        None => Ok(None),
        Some(data) => String::from_utf8(data).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("state file {name}: {e}"),
            )
        }),
    }
}

/// Replaces the file `name` with `data` atomically: written to a temporary file, then renamed
/// over it, so a crash of the plugin or the host never leaves half a file. Not synced to disk:
/// like the host's own store it survives a crash of the host, not of the machine (after a
/// power cut no sandbox is running anyway); a runtime that needs more calls [`sync`] after.
pub fn write(name: &str, data: impl AsRef<[u8]>) -> io::Result<()> {
    let path = path(name)?;
    // A random suffix: two calls writing the same name at once must not share a temp file.
    let nonce = RandomState::new().hash_one(name);
    let temp = dir().join(format!(".{name}.{nonce:016x}.tmp"));
    let written = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(data.as_ref())?;
        fs::rename(&temp, &path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(context(e, "writing", &path));
    }
    Ok(())
}

/// Flushes the file `name` to disk (and the rename that made it): for state that must
/// survive a power cut.
pub fn sync(name: &str) -> io::Result<()> {
    let path = path(name)?;
    fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| context(e, "syncing", &path))?;
    fs::File::open(dir())
        .and_then(|d| d.sync_all())
        .map_err(|e| context(e, "syncing the folder of", &path))
}

/// Removes the file `name`; `false` when there was none.
pub fn remove(name: &str) -> io::Result<bool> {
    let path = path(name)?;
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(context(e, "removing", &path)),
    }
}

/// The names of the files in the folder, sorted (temporary files left by an interrupted
/// [`write()`] are skipped).
pub fn list() -> io::Result<Vec<String>> {
    let dir = dir();
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| context(e, "listing", &dir))? {
        let entry = entry.map_err(|e| context(e, "listing", &dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if is_valid_name(name) && entry.file_type().is_ok_and(|t| t.is_file()) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(target_arch = "wasm32")]
mod imp {
    pub fn dir() -> std::path::PathBuf {
        std::path::PathBuf::from(super::DIR)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub fn dir() -> std::path::PathBuf {
        crate::testing::state_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_names_are_checked() {
        assert_eq!(list().unwrap(), Vec::<String>::new());
        write("a.json", "1").unwrap();
        write("a.json", "22").unwrap();
        write("b", [0u8, 1]).unwrap();
        // An interrupted write's leftover is not a file of the plugin.
        fs::write(dir().join(".b.1.tmp"), "x").unwrap();
        fs::create_dir(dir().join("sub")).unwrap();
        assert_eq!(list().unwrap(), vec!["a.json", "b"]);
        assert_eq!(read_to_string("a.json").unwrap().as_deref(), Some("22"));
        assert_eq!(read("b").unwrap(), Some(vec![0, 1]));
        assert!(read_to_string("b").is_ok());
        assert_eq!(read("c").unwrap(), None);
        assert!(remove("a.json").unwrap());
        assert!(!remove("a.json").unwrap());
        for bad in ["", ".x", "../x", "a/b", "a\0", &"x".repeat(256)] {
            assert_eq!(
                write(bad, "x").unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }
}

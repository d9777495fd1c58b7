//! Validation of every user-supplied name that reaches a path, a container or
//! a command line: sandbox and snapshot names, environment variable names,
//! labels and image references.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

/// Sandbox and snapshot names: they become path components and container
/// labels, so the alphabet is deliberately small.
static RESOURCE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9-]{0,62}$").expect("static regex"));
static ENV_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$").expect("static regex"));
static LABEL_KEY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$").expect("static regex"));
/// Docker image references: `[registry/]repo[:tag][@digest]`.
static IMAGE_REF: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9][a-z0-9._/:-]{0,254}(@sha256:[a-f0-9]{64})?$").expect("static regex")
});

const MAX_LABEL_VALUE: usize = 256;
const MAX_ENV_VALUE: usize = 32 * 1024;
const MAX_ENTRIES: usize = 128;

/// Why a name was refused; the message is shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);

/// Checks a sandbox or snapshot name; `what` says which, for the message.
pub fn validate_resource_name(what: &str, name: &str) -> Result<(), NameError> {
    if RESOURCE_NAME.is_match(name) {
        Ok(())
    } else {
        Err(NameError(format!(
            "invalid {what} name {name:?}: must match ^[a-z0-9][a-z0-9-]{{0,62}}$"
        )))
    }
}

/// Checks the variables passed to a sandbox or to one command.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), NameError> {
    if env.len() > MAX_ENTRIES {
        return Err(NameError(format!("at most {MAX_ENTRIES} env entries")));
    }
    for (key, value) in env {
        if !ENV_NAME.is_match(key) {
            return Err(NameError(format!(
                "invalid env name {key:?}: must match ^[A-Za-z_][A-Za-z0-9_]*$"
            )));
        }
        if value.len() > MAX_ENV_VALUE || value.contains('\0') {
            return Err(NameError(format!(
                "env value of {key} must be under {MAX_ENV_VALUE} bytes without NUL"
            )));
        }
    }
    Ok(())
}

/// Checks user labels; keys may not use our reserved `org.opensandbox.` prefix.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), NameError> {
    if labels.len() > MAX_ENTRIES {
        return Err(NameError(format!("at most {MAX_ENTRIES} labels")));
    }
    for (key, value) in labels {
        if !LABEL_KEY.is_match(key) || key.starts_with("org.opensandbox.") {
            return Err(NameError(format!(
                "invalid label key {key:?}: must match ^[A-Za-z0-9][A-Za-z0-9._/-]{{0,127}}$ \
                 and not start with org.opensandbox."
            )));
        }
        if value.len() > MAX_LABEL_VALUE || value.contains('\0') {
            return Err(NameError(format!(
                "label value of {key} must be under {MAX_LABEL_VALUE} bytes without NUL"
            )));
        }
    }
    Ok(())
}

/// Checks an image reference before it is sent to the engine.
pub fn validate_image(image: &str) -> Result<(), NameError> {
    if IMAGE_REF.is_match(image) && !image.contains("..") && !image.contains("//") {
        Ok(())
    } else {
        Err(NameError(format!("invalid image reference {image:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_documented_pattern() {
        for ok in ["a", "my-sandbox", "0", "a-", &"a".repeat(63)] {
            assert!(validate_resource_name("vm", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "My-VM",
            "a_b",
            "../x",
            "a/b",
            "a.b",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(validate_resource_name("vm", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_names_are_shell_identifiers() {
        let mut env = BTreeMap::new();
        env.insert("PATH_2".to_string(), "x=y".to_string());
        assert!(validate_env(&env).is_ok());
        for bad in ["", "1A", "A=B", "A B", "A-B"] {
            let env = BTreeMap::from([(bad.to_string(), String::new())]);
            assert!(validate_env(&env).is_err(), "{bad}");
        }
        let env = BTreeMap::from([("A".to_string(), "a\0b".to_string())]);
        assert!(validate_env(&env).is_err());
    }

    #[test]
    fn labels_cannot_use_the_reserved_prefix() {
        let ok = BTreeMap::from([("team".to_string(), "a".to_string())]);
        assert!(validate_labels(&ok).is_ok());
        let reserved = BTreeMap::from([("org.opensandbox.host".to_string(), "x".to_string())]);
        assert!(validate_labels(&reserved).is_err());
    }

    #[test]
    fn image_references() {
        for ok in [
            "ubuntu:22.04",
            "debian",
            "reg.local:5000/a/b:c",
            "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(validate_image(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Ubuntu", "-x", "a b", "a/../b", "a;rm"] {
            assert!(validate_image(bad).is_err(), "{bad}");
        }
    }
}

//! Test fixture: `validate-config` always returns an error, so the host must refuse to start.

use opensandbox_plugin_sdk::{export_policy, Policy};

struct BadConfig;

impl Policy for BadConfig {
    fn validate_config() -> Result<(), String> {
        Err("badconfig-policy always rejects its configuration (test fixture)".to_string())
    }
}

export_policy!(BadConfig);

//! Test fixture: `health` tries every escape this plugin can think of and returns
//! `Err(report)`, one line per attempt:
//!
//! - `<name>=refused`: the host (or WASI) refused it, as it must;
//! - `<name>=ALLOWED:<detail>`: it worked: a hole;
//! - `<name>=allowed`: a control that must work with the test's grants (`btrfs = true`,
//!   `process = ["/usr/bin/sleep"]`, `state = true`), to show the refusals are not only a
//!   missing grant; `<name>=FAILED:<detail>` when a control did not work.
//!
//! The attempts are in [`btrfs_attempts`], [`process_attempts`] and [`wasi_attempts`].
//! `validate-config` accepts anything; `create` refuses; every other call answers as if
//! nothing exists.

mod btrfs_attempts;
mod process_attempts;
mod wasi_attempts;

use std::fmt::Debug;

use opensandbox_plugin_sdk::{
    export_runtime, Driver, DriverError, Instance, InstanceSpec, InstanceState,
};

/// The lines of the report.
#[derive(Default)]
pub struct Report(Vec<String>);

impl Report {
    /// An escape attempt: an error is the expected refusal.
    pub fn escape<T: Debug, E>(&mut self, name: &str, result: Result<T, E>) -> bool {
        match result {
            Err(_) => {
                self.0.push(format!("{name}=refused"));
                false
            }
            Ok(value) => {
                self.0.push(format!("{name}=ALLOWED:{}", one_line(&value)));
                true
            }
        }
    }

    /// A control that must work.
    pub fn control<T, E: Debug>(&mut self, name: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(value) => {
                self.0.push(format!("{name}=allowed"));
                Some(value)
            }
            Err(e) => {
                self.0.push(format!("{name}=FAILED:{}", one_line(&e)));
                None
            }
        }
    }
}

/// `{value:?}` on one line, bounded.
fn one_line(value: &impl Debug) -> String {
    let text = format!("{value:?}").replace(['\n', '\r'], " ");
    text.chars().take(200).collect()
}

struct HostileRuntime;

impl Driver for HostileRuntime {
    fn health() -> Result<(), String> {
        let mut report = Report::default();
        btrfs_attempts::run(&mut report);
        process_attempts::run(&mut report);
        wasi_attempts::run(&mut report);
        Err(report.0.join("\n"))
    }

    fn create(_spec: &InstanceSpec) -> Result<Instance, DriverError> {
        Err(DriverError::Failed(
            "hostile-runtime makes no instances".to_string(),
        ))
    }

    fn start(id: &str) -> Result<(), DriverError> {
        Err(DriverError::NotFound(id.to_string()))
    }

    fn stop(id: &str) -> Result<(), DriverError> {
        Err(DriverError::NotFound(id.to_string()))
    }

    fn destroy(_id: &str) -> Result<(), DriverError> {
        Ok(())
    }

    fn inspect(_id: &str) -> Result<InstanceState, DriverError> {
        Ok(InstanceState::Missing)
    }
}

export_runtime!(HostileRuntime);

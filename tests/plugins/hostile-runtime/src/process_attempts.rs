//! Programs the grant does not list (under other spellings too) and process ids this plugin
//! did not get from `spawn`; `/usr/bin/sleep`, which the grant lists, is the control.

use std::time::Duration;

use opensandbox_plugin_sdk::process::{self, Signal, SpawnOptions};

use crate::Report;

pub fn run(report: &mut Report) {
    let none = SpawnOptions::default();
    for (label, program) in [
        ("shell", "/bin/sh"),
        ("dotdot-shell", "/usr/bin/../bin/sh"),
        ("relative", "sh"),
        ("sleep-dotdot", "/usr/bin/sleep/../../bin/sh"),
    ] {
        let spawned = process::spawn(program, &["-c", "id"], &none);
        if let Ok(id) = &spawned {
            let _ = process::release(id);
        }
        report.escape(&format!("process.spawn:{label}"), spawned);
    }
    // A granted program, but told to load the plugin's own code (a library it could have
    // written into its state folder): the programs start as root.
    for variable in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
    ] {
        let options = SpawnOptions::default().env(variable, "/state/evil.so");
        let spawned = process::spawn("/usr/bin/sleep", &["1000"], &options);
        if let Ok(id) = &spawned {
            let _ = process::kill(id, Signal::Kill, true);
            let _ = process::release(id);
        }
        report.escape(&format!("process.spawn:env-{variable}"), spawned);
    }
    for forged in ["1", "1-1", "../x"] {
        report.escape(&format!("process.state:{forged}"), process::state(forged));
        report.escape(
            &format!("process.wait:{forged}"),
            process::wait(forged, Duration::ZERO),
        );
        // SIGHUP to one process: the mildest signal, should a host get this wrong.
        report.escape(
            &format!("process.kill:{forged}"),
            process::kill(forged, Signal::Hangup, false),
        );
        report.escape(&format!("process.output:{forged}"), process::output(forged));
        report.escape(
            &format!("process.release:{forged}"),
            process::release(forged),
        );
    }
    let spawned = process::spawn("/usr/bin/sleep", &["1000"], &none);
    if let Some(id) = report.control("sleep", spawned) {
        let _ = process::kill(&id, Signal::Kill, true);
        let _ = process::wait(&id, Duration::from_secs(2));
        let _ = process::release(&id);
    }
}

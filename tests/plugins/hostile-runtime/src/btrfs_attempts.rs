//! Btrfs names that must not reach outside the plugin's root, tried with every call that
//! takes a name (`btrfs.<call>:<label>`), and a snapshot of Docker's data (`../../docker`).

use opensandbox_plugin_sdk::btrfs;

use crate::Report;

/// A valid subvolume of this plugin, the source and target of the snapshot attempts.
const SOURCE: &str = "hostile/source";
const TARGET: &str = "hostile/target";

/// `(label, name)`: every way out or around the naming rule.
fn bad_names() -> Vec<(&'static str, String)> {
    vec![
        ("dotdot-prefix", "../x".to_string()),
        ("absolute", "/etc".to_string()),
        ("dotdot-inside", "a/../../x".to_string()),
        ("dot", ".".to_string()),
        ("dotdot", "..".to_string()),
        ("double-slash", "a//b".to_string()),
        ("empty", String::new()),
        ("five-segments", "a/b/c/d/e".to_string()),
        ("long-segment", "x".repeat(200)),
        ("nul", "a\0b".to_string()),
        ("newline", "x\n".to_string()),
    ]
}

pub fn run(report: &mut Report) {
    report.control("btrfs.setup", btrfs::create_subvolume(SOURCE));
    for (label, name) in bad_names() {
        report.escape(&format!("btrfs.host-path:{label}"), btrfs::host_path(&name));
        report.escape(&format!("btrfs.exists:{label}"), btrfs::exists(&name));
        if report.escape(
            &format!("btrfs.create:{label}"),
            btrfs::create_subvolume(&name),
        ) {
            let _ = btrfs::delete_subvolume(&name);
        }
        if report.escape(
            &format!("btrfs.snapshot-target:{label}"),
            btrfs::snapshot(SOURCE, &name, false),
        ) {
            let _ = btrfs::delete_subvolume(&name);
        }
        if report.escape(
            &format!("btrfs.snapshot-source:{label}"),
            btrfs::snapshot(&name, TARGET, true),
        ) {
            let _ = btrfs::delete_subvolume(TARGET);
        }
        // Last: a hole here could delete what the other calls made.
        report.escape(
            &format!("btrfs.delete:{label}"),
            btrfs::delete_subvolume(&name),
        );
    }
    if report.escape(
        "btrfs.snapshot-source:docker",
        btrfs::snapshot("../../docker", TARGET, true),
    ) {
        let _ = btrfs::delete_subvolume(TARGET);
    }
    report.control("btrfs.cleanup", btrfs::delete_subvolume(SOURCE));
}

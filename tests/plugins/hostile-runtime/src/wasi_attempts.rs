//! What WASI must not give: files outside `/state`, the host's environment and a real clock
//! (the test grants neither `read_only_dirs`, `env` nor `clock`); `/state`, which it grants,
//! is the control.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::Report;

pub fn run(report: &mut Report) {
    report.escape(
        "wasi.read:/etc/passwd",
        std::fs::read("/etc/passwd").map(|d| d.len()),
    );
    report.escape(
        "wasi.read:/state/../etc/passwd",
        std::fs::read("/state/../etc/passwd").map(|d| d.len()),
    );
    report.escape(
        "wasi.list:/",
        std::fs::read_dir("/").map(|d| d.filter_map(Result::ok).count()),
    );
    report.escape("wasi.env:PATH", std::env::var("PATH"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    report.escape("wasi.clock", if now > 0 { Ok(now) } else { Err(()) });
    report.control(
        "state",
        std::fs::write("/state/hostile-probe", b"x")
            .and_then(|()| std::fs::remove_file("/state/hostile-probe")),
    );
}

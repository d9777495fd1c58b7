//! `--runtimes`: Docker and the namespaces runtime plugin side by side in
//! one host and one run (create, `run echo hello`, snapshot, restore, fork),
//! then how many idle namespaces sandboxes this machine's memory holds:
//! `--idle N` of them are created and left idle, the memory they took is
//! read from /proc/meminfo, and the capacity is the memory that was
//! available divided by the cost of one.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use opensandbox_e2e::{json, namespaces_plugin_entry, Host, HostOptions};

use super::{ms, print_rows, progress, Row};

/// Rows per runtime, in the table's order.
async fn measure_runtime(host: &Host, key: &str, runtime: &str, n: usize) -> Result<Vec<Row>> {
    let create_target = (runtime == "namespaces").then_some(15.0);
    let run_target = (runtime == "namespaces").then_some(5.0);
    let restore_target = (runtime == "namespaces").then_some(30.0);
    let label = |op: &str| format!("{runtime}: {op}");
    let mut rows = Vec::new();

    // Creates one at a time with a pause between them (what a client making
    // sandboxes as it needs them sees), then back to back (the sustained
    // rate: on this machine Btrfs commits and the spare snapshots' refills
    // share two cores with the creates).
    progress(&format!("{runtime}: create, 100 ms apart"));
    let s = creates(host, key, runtime, "spaced", n, Duration::from_millis(100)).await?;
    rows.push(Row::new(&label("create (100 ms apart)"), s, create_target));
    progress(&format!("{runtime}: create, back to back"));
    let s = creates(host, key, runtime, "burst", n, Duration::ZERO).await?;
    rows.push(Row::new(&label("create (back to back)"), s, create_target));

    let vm = format!("rt-{runtime}");
    host.create_vm(key, json!({"name": vm, "runtime": runtime}))
        .await?;
    progress(&format!("{runtime}: run echo hello"));
    for _ in 0..3 {
        host.run_ok(key, &vm, "echo hello").await?;
    }
    let mut s = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = host.run_ok(key, &vm, "echo hello").await?;
        s.push(ms(t.elapsed()));
        if out != "hello\n" {
            bail!("echo hello printed {out:?}");
        }
    }
    rows.push(Row::new(&label("run `echo hello`"), s, run_target));

    progress(&format!("{runtime}: snapshot"));
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        host.run_ok(key, &vm, "head -c 1048576 /dev/urandom > /root/one-mib")
            .await?;
        let name = format!("s{i}");
        let t = Instant::now();
        host.snapshot(key, &vm, &name).await?;
        s.push(ms(t.elapsed()));
        host.delete_snapshot(key, &vm, &name).await?;
    }
    rows.push(Row::new(&label("snapshot (1 MiB written)"), s, None));

    progress(&format!("{runtime}: restore"));
    host.run_ok(key, &vm, "echo base > /root/base").await?;
    host.snapshot(key, &vm, "base").await?;
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        host.run_ok(
            key,
            &vm,
            &format!("echo {i} > /root/changed; rm -f /root/base"),
        )
        .await?;
        let t = Instant::now();
        host.restore(key, &vm, "base").await?;
        s.push(ms(t.elapsed()));
    }
    if host.run_ok(key, &vm, "cat /root/base").await? != "base\n" {
        bail!("{runtime}: restore did not bring /root/base back");
    }
    rows.push(Row::new(&label("restore"), s, restore_target));

    progress(&format!("{runtime}: fork"));
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("rt-{runtime}-fork-{i}");
        let t = Instant::now();
        host.create_vm(
            key,
            json!({"name": name, "runtime": runtime, "from": {"vm": vm, "snapshot": "base"}}),
        )
        .await?;
        s.push(ms(t.elapsed()));
        host.delete(key, &name).await?;
    }
    rows.push(Row::new(&label("fork"), s, None));
    host.delete(key, &vm).await?;
    Ok(rows)
}

/// `n` creates, each deleted again before the pause and the next one; the
/// milliseconds each create took.
async fn creates(
    host: &Host,
    key: &str,
    runtime: &str,
    tag: &str,
    n: usize,
    pause: Duration,
) -> Result<Vec<f64>> {
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("rt-{runtime}-{tag}-{i}");
        let t = Instant::now();
        host.create_vm(key, json!({"name": name, "runtime": runtime}))
            .await?;
        s.push(ms(t.elapsed()));
        host.delete(key, &name).await?;
        tokio::time::sleep(pause).await;
    }
    Ok(s)
}

fn mem_available_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("MemAvailable in /proc/meminfo")
}

/// Creates `count` idle namespaces sandboxes; returns (MiB per sandbox,
/// MiB available before, how many would fit, seconds to create them).
async fn idle_capacity(host: &Host, key: &str, count: usize) -> Result<(f64, f64, f64, f64)> {
    progress(&format!("idle: creating {count} namespaces sandboxes"));
    let before = mem_available_kib()?;
    let t = Instant::now();
    for i in 0..count {
        host.create_vm(
            key,
            json!({"name": format!("idle-{i}"), "runtime": "namespaces"}),
        )
        .await?;
        if (i + 1) % 100 == 0 {
            progress(&format!("idle: {} created", i + 1));
        }
    }
    let created_s = t.elapsed().as_secs_f64();
    // Let the page cache and the agents settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = mem_available_kib()?;
    // Every one of them still answers.
    for i in (0..count).step_by((count / 10).max(1)) {
        host.run_ok(key, &format!("idle-{i}"), "true").await?;
    }
    let per_mib = (before.saturating_sub(after)) as f64 / 1024.0 / count as f64;
    let before_mib = before as f64 / 1024.0;
    progress("idle: deleting");
    for i in 0..count {
        host.delete(key, &format!("idle-{i}")).await?;
    }
    Ok((
        per_mib,
        before_mib,
        before_mib / per_mib.max(0.001),
        created_s,
    ))
}

pub async fn bench(bin: std::path::PathBuf, n: usize, idle: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins.toml");
    std::fs::write(&plugins, namespaces_plugin_entry())?;
    progress("starting the host (docker + namespaces)");
    let mut host = Host::start_with(HostOptions {
        bin: Some(bin),
        env: vec![
            ("PLUGINS_CONFIG".into(), plugins.display().to_string()),
            ("SANDBOX_RUNTIME".into(), "docker".into()),
            ("RUST_LOG".into(), "warn".into()),
        ],
    })
    .await?;
    host.set_log_on_drop(false);
    let key = host.admin_key().await?;
    let measured = async {
        let mut rows = measure_runtime(&host, &key, "docker", n).await?;
        rows.extend(measure_runtime(&host, &key, "namespaces", n).await?);
        let idle = if idle > 0 {
            Some(idle_capacity(&host, &key, idle).await?)
        } else {
            None
        };
        Ok::<_, anyhow::Error>((rows, idle))
    }
    .await;
    let leftover = host.delete_all_vms().await;
    if !leftover.is_empty() {
        eprintln!("warning: could not delete: {leftover:?}");
    }
    if measured.is_err() {
        eprintln!("----- host log (tail) -----\n{}", host.log_tail(60));
    }
    drop(host);
    let (rows, idle_result) = measured?;
    print_rows(&rows);
    if let Some((per, before, fit, secs)) = idle_result {
        println!();
        println!(
            "Idle namespaces sandboxes: {idle} created in {secs:.1} s and all answering; \
             {per:.2} MiB of memory each (MemAvailable before: {before:.0} MiB), so about \
             {fit:.0} fit (target >= 1000: {}).",
            if fit >= 1000.0 && idle >= 1000 {
                "met"
            } else if fit >= 1000.0 {
                "met by extrapolation"
            } else {
                "not met"
            }
        );
    }
    Ok(())
}

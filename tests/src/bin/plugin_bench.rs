//! Plugin overhead benchmark.
//!
//! ```text
//! scripts/build-plugins.sh
//! cargo build --release -p opensandbox -p opensandbox-e2e
//! ./target/release/opensandbox-plugin-bench [--calls N] [--runs M]
//! ```
//!
//! 1. In process, on a warm chain (the host's own loader): N policy decisions
//!    of the first-party default policy, and N hook pairs (before + after) of
//!    the first-party command guard and audit hooks; p50 and p99 in µs.
//! 2. Over HTTP: M `run echo hello` calls against two hosts started side by
//!    side, one with those hooks and one without, interleaved; p50 of each
//!    and the difference (the hooks' added latency). Docker's exec dominates
//!    the run time, so the difference carries its noise; the in-process
//!    figures above are the hooks' own cost.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use opensandbox::plugins::{types, CallerInfo, PluginChain};
use opensandbox_e2e::{json, workspace_root, Host, HostOptions};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

fn plugin(name: &str) -> Result<String> {
    let path = workspace_root()
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/build-plugins.sh",
            path.display()
        );
    }
    Ok(path.display().to_string())
}

fn plugins_toml() -> Result<String> {
    Ok(format!(
        r#"
[[plugin]]
name = "policy"
kind = "policy"
file = "{}"

[[plugin]]
name = "guard"
kind = "hook"
file = "{}"
[plugin.config]
deny = ["rm -rf /*", "shutdown*", "reboot*"]

[[plugin]]
name = "audit"
kind = "hook"
file = "{}"
order = 10
"#,
        plugin("default-policy")?,
        plugin("command-guard")?,
        plugin("audit")?,
    ))
}

fn in_process(calls: usize, config: &std::path::Path, cache: std::path::PathBuf) -> Result<()> {
    // Policies and hooks only: nothing here needs the runtime folders or a tokio runtime.
    let dirs = opensandbox::plugins::PluginDirs {
        state: cache.join("state"),
        process_ledgers: cache.join("processes"),
        btrfs_own: cache.join("btrfs"),
        btrfs_shared: cache.join("btrfs-shared"),
        cache,
    };
    let tokio = tokio::runtime::Runtime::new()?;
    let chain = PluginChain::load(config, &dirs, tokio.handle())?;
    let caller = CallerInfo {
        key_id: uuid::Uuid::new_v4().to_string(),
        admin: false,
    };
    let request = types::CreateRequest {
        name: "bench".into(),
        image: "ubuntu:22.04".into(),
        labels: vec![("team".into(), "a".into())],
        requested_runtime: None,
        is_fork: false,
    };
    let candidates = vec![types::RuntimeCandidate {
        name: "docker".into(),
        healthy: true,
        sandboxes: 3,
    }];
    let command = types::Command {
        sandbox: "bench".into(),
        sandbox_id: uuid::Uuid::new_v4().to_string(),
        command: "echo hello".into(),
        env: vec![],
        cwd: None,
        timeout_ms: 60_000,
    };
    let outcome = types::CommandOutcome {
        exit_code: Some(0),
        timed_out: false,
        duration_ms: 50,
        stdout_bytes: 6,
        stderr_bytes: 0,
    };
    // Warm-up: the first calls touch fresh pool slots.
    for _ in 0..200 {
        chain.select_runtime(&request, &caller, &candidates);
        chain.before_command(&command, &caller);
    }
    let mut policy = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        std::hint::black_box(chain.select_runtime(&request, &caller, &candidates));
        policy.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut pair = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        std::hint::black_box(chain.before_command(&command, &caller));
        chain.after_command(&command, &caller, &outcome);
        pair.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p99) = summary(policy);
    println!(
        "| policy decision (default-policy) | {p50:.1} | {p99:.1} | {calls} | p50 <= 20 µs | {} |",
        if p50 <= 20.0 { "yes" } else { "no" }
    );
    let (p50, p99) = summary(pair);
    println!("| hook pair (guard + audit, before + after) | {p50:.1} | {p99:.1} | {calls} | p99 <= 100 µs | {} |", if p99 <= 100.0 { "yes" } else { "no" });
    Ok(())
}

async fn over_http(runs: usize, config: &str) -> Result<()> {
    let bin = workspace_root().join("target/release/opensandbox");
    let with = Host::start_with(HostOptions {
        bin: Some(bin.clone()),
        env: vec![("PLUGINS_CONFIG".into(), config.into())],
    })
    .await?;
    let without = Host::start_with(HostOptions {
        bin: Some(bin),
        env: vec![],
    })
    .await?;
    let (kw, ko) = (with.admin_key().await?, without.admin_key().await?);
    with.create_vm_named(&kw, "bench").await?;
    without.create_vm_named(&ko, "bench").await?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..runs + 5 {
        for (host, key, samples) in [(&with, &kw, &mut on), (&without, &ko, &mut off)] {
            let t = Instant::now();
            let r = host
                .run_with(key, "bench", json!({"command": "echo hello"}))
                .await?;
            if r.stdout != "hello\n" {
                bail!("unexpected output {}", r.brief());
            }
            if i >= 5 {
                samples.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (on50, _) = summary(on);
    let (off50, _) = summary(off);
    println!();
    println!("run `echo hello` over HTTP, {runs} interleaved runs each: hooks on p50 {on50:.2} ms, off p50 {off50:.2} ms, difference {:.2} ms (target <= 1 ms)", on50 - off50);
    Ok(())
}

fn main() -> Result<()> {
    let mut calls = 10_000usize;
    let mut runs = 100usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().context("flags take a value")?;
        match arg.as_str() {
            "--calls" => calls = value.parse()?,
            "--runs" => runs = value.parse()?,
            other => bail!("unknown flag {other}; use --calls N --runs M"),
        }
    }
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("plugins.toml");
    std::fs::write(&config, plugins_toml()?)?;
    println!("| operation | p50 µs | p99 µs | calls | target | met? |");
    println!("|---|---:|---:|---:|---|:---:|");
    in_process(calls, &config, dir.path().join("cache"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(over_http(runs, &config.display().to_string()))
}

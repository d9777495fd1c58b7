//! OpenSandbox benchmark.
//!
//! ```text
//! cargo build --release -p opensandbox
//! cargo run --release -p opensandbox-e2e --bin opensandbox-bench -- [--runs N]
//! ```
//!
//! Starts its own host through the e2e harness (binary: `OPENSANDBOX_BIN`, else
//! `target/release/opensandbox` when it exists and is not older than `target/debug/opensandbox`,
//! else the debug build, with a warning), measures each operation N times (default 50)
//! client-side over HTTP on 127.0.0.1, compares with the docker CLI, prints a markdown table,
//! and removes everything it created.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use opensandbox_e2e::{
    btrfs_path, docker, docker_host, docker_image, json, sandbox_dir, workspace_root, Host,
    HostOptions, S3Kind, S3Server, Value,
};

mod agent;
mod runtimes;

const DEFAULT_RUNS: usize = 50;

struct Args {
    runs: usize,
    /// Also measure snapshot export/import through S3 (a local server).
    transfer: bool,
    /// The S3 server of the transfer rows.
    s3: S3Kind,
    /// Only the transfer rows.
    transfer_only: bool,
    /// Docker beside the namespaces runtime plugin (and nothing else).
    runtimes: bool,
    /// With --runtimes: how many idle namespaces sandboxes to create.
    idle: usize,
}

fn usage() -> &'static str {
    "usage: opensandbox-bench [--runs N] [--transfer | --transfer-only [--s3 KIND] | --runtimes [--idle N]]\n\
     \n\
     Measures create, run, snapshot (1 MiB and 1 GiB written), restore and fork of an\n\
     opensandbox host it starts itself, plus docker CLI baselines, N times each (default 50).\n\
     Host binary: OPENSANDBOX_BIN, else target/release/opensandbox (build it first with\n\
     `cargo build --release -p opensandbox`), else target/debug/opensandbox.\n\
     --transfer adds export/import through S3 of a 1 GiB snapshot (min(N, 3) runs, against a\n\
     local S3-compatible server) next to `btrfs send | zstd > /dev/null`. --s3 s3s-fs (the\n\
     default; S3S_FS, scripts/install-s3s-fs.sh) or moto (MOTO_SERVER, scripts/setup.sh).\n\
     --runtimes measures Docker and the namespaces runtime plugin side by side instead, then\n\
     creates --idle N (default 1000) idle namespaces sandboxes to measure their memory.\n\
     Environment: DOCKER_HOST, DOCKER_BTRFS_PATH, DOCKER_IMAGE as for the host."
}

fn parse_args() -> Result<Args> {
    let mut runs = DEFAULT_RUNS;
    let mut transfer = false;
    let mut transfer_only = false;
    let mut runtimes = false;
    let mut idle = 1000;
    let mut s3 = S3Kind::S3sFs;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" | "-n" => {
                let v = it.next().context("--runs needs a value")?;
                runs = v
                    .parse()
                    .with_context(|| format!("--runs {v:?} is not a number"))?;
            }
            s if s.starts_with("--runs=") => {
                let v = &s["--runs=".len()..];
                runs = v
                    .parse()
                    .with_context(|| format!("--runs {v:?} is not a number"))?;
            }
            "--transfer" => transfer = true,
            "--runtimes" => runtimes = true,
            "--idle" => {
                let v = it.next().context("--idle needs a value")?;
                idle = v
                    .parse()
                    .with_context(|| format!("--idle {v:?} is not a number"))?;
            }
            "--s3" => {
                s3 = match it.next().as_deref() {
                    Some("s3s-fs") => S3Kind::S3sFs,
                    Some("moto") => S3Kind::Moto,
                    other => bail!("--s3 {other:?}: expected s3s-fs or moto"),
                };
            }
            "--transfer-only" => {
                transfer = true;
                transfer_only = true;
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(Args {
        runs,
        transfer,
        s3,
        transfer_only,
        runtimes,
        idle,
    })
}

fn pick_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OPENSANDBOX_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let root = workspace_root();
    let release = root.join("target/release/opensandbox");
    let debug = root.join("target/debug/opensandbox");
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&release), mtime(&debug)) {
        (Some(r), Some(d)) if r >= d => Ok(release),
        (Some(_), None) => Ok(release),
        (Some(_), Some(_)) => {
            eprintln!(
                "warning: {} is older than {}; benchmarking the debug build. \
                 Run `cargo build --release -p opensandbox` for meaningful numbers.",
                release.display(),
                debug.display()
            );
            Ok(debug)
        }
        (None, Some(_)) => {
            eprintln!(
                "warning: no release build at {}; benchmarking the debug build. \
                 Run `cargo build --release -p opensandbox` for meaningful numbers.",
                release.display()
            );
            Ok(debug)
        }
        (None, None) => bail!(
            "no opensandbox binary: build it with `cargo build --release -p opensandbox` \
             (or set OPENSANDBOX_BIN)"
        ),
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Row {
    op: String,
    samples: Vec<f64>,
    target_ms: Option<f64>,
}

impl Row {
    fn new(op: &str, mut samples: Vec<f64>, target_ms: Option<f64>) -> Self {
        samples.sort_by(|a, b| a.total_cmp(b));
        Row {
            op: op.to_string(),
            samples,
            target_ms,
        }
    }
    fn p50(&self) -> f64 {
        percentile(&self.samples, 50.0)
    }
    fn p95(&self) -> f64 {
        percentile(&self.samples, 95.0)
    }
}

/// Prints rows as the markdown table of latencies.
fn print_rows(rows: &[Row]) {
    println!("| operation | p50 ms | p95 ms | runs | target (p50) | met? |");
    println!("|---|---:|---:|---:|---:|:---:|");
    for r in rows {
        let (target, met) = match r.target_ms {
            Some(t) => (
                format!("<= {t:.0}"),
                if r.p50() <= t { "yes" } else { "no" }.to_string(),
            ),
            None => ("—".to_string(), "—".to_string()),
        };
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {} |",
            r.op,
            r.p50(),
            r.p95(),
            r.samples.len(),
            target,
            met
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn progress(what: &str) {
    eprintln!("[bench] {what}");
}

async fn docker_async(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running docker {args:?}"))?;
    if !out.status.success() {
        bail!(
            "docker {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes the baseline container however the benchmark ends.
struct ContainerGuard(Option<String>);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = docker(&["rm", "-f", &c]);
        }
    }
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// Runs every measurement; returns the rows, our run p50 and the docker exec p50.
async fn measure(
    host: &Host,
    n: usize,
    image: &str,
    rates: &mut Vec<agent::Rate>,
) -> Result<(Vec<Row>, f64, f64)> {
    let key = host.admin_key().await?;
    let mut rows = Vec::new();

    // create
    progress("create");
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("bench-create-{i}");
        let t = Instant::now();
        host.create_vm_named(&key, &name).await?;
        s.push(ms(t.elapsed()));
        host.delete(&key, &name).await?;
    }
    rows.push(Row::new("create (POST /vms)", s, Some(300.0)));

    // run: through the agent, and through the engine's exec
    host.create_vm_named(&key, "bench").await?;
    let run_rows = agent::run_rows(host, &key, "bench", n).await?;
    let run_p50 = run_rows[0].p50();
    rows.extend(run_rows);

    // snapshot with 1 MiB written
    progress("snapshot (1 MiB written)");
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        host.run_ok(
            &key,
            "bench",
            "dd if=/dev/urandom of=/root/one-mib bs=1M count=1 conv=fsync status=none",
        )
        .await?;
        let name = format!("m{i}");
        let t = Instant::now();
        host.snapshot(&key, "bench", &name).await?;
        s.push(ms(t.elapsed()));
        host.delete_snapshot(&key, "bench", &name).await?;
    }
    rows.push(Row::new("snapshot (1 MiB written)", s, Some(15.0)));

    // snapshot with 1 GiB written
    progress("snapshot (1 GiB written): writing 1 GiB");
    host.create_vm_named(&key, "bench-big").await?;
    let t = Instant::now();
    host.run_ok(
        &key,
        "bench-big",
        "dd if=/dev/zero of=/root/one-gib bs=1M count=1024 conv=fsync status=none",
    )
    .await?;
    progress(&format!(
        "wrote 1 GiB in {:.0} ms; snapshotting",
        ms(t.elapsed())
    ));
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("g{i}");
        let t = Instant::now();
        host.snapshot(&key, "bench-big", &name).await?;
        s.push(ms(t.elapsed()));
        host.delete_snapshot(&key, "bench-big", &name).await?;
    }
    rows.push(Row::new("snapshot (1 GiB written)", s, Some(15.0)));
    host.delete(&key, "bench-big").await?;

    // restore
    progress("restore");
    host.run_ok(&key, "bench", "echo base > /root/base").await?;
    host.snapshot(&key, "bench", "base").await?;
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        host.run_ok(
            &key,
            "bench",
            &format!("echo {i} > /root/changed && rm -f /root/base"),
        )
        .await?;
        let t = Instant::now();
        host.restore(&key, "bench", "base").await?;
        s.push(ms(t.elapsed()));
    }
    let check = host.run_ok(&key, "bench", "cat /root/base").await?;
    if check != "base\n" {
        bail!("restore did not bring back /root/base: {check:?}");
    }
    rows.push(Row::new("restore", s, Some(300.0)));

    // fork
    progress("fork");
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("bench-fork-{i}");
        let t = Instant::now();
        host.create_vm(
            &key,
            json!({"name": name, "from": {"vm": "bench", "snapshot": "base"}}),
        )
        .await?;
        s.push(ms(t.elapsed()));
        host.delete(&key, &name).await?;
    }
    rows.push(Row::new("fork (POST /vms with from)", s, Some(300.0)));
    host.delete(&key, "bench").await?;

    // docker CLI baselines
    progress("baseline: docker run --rm");
    let mut s = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        docker_async(&["run", "--rm", "--network", "none", image, "true"]).await?;
        s.push(ms(t.elapsed()));
    }
    rows.push(Row::new(
        "baseline: `docker run --rm --network none IMAGE true`",
        s,
        None,
    ));

    progress("baseline: docker exec");
    let c = docker_async(&["run", "-d", "--network", "none", image, "sleep", "infinity"])
        .await?
        .trim()
        .to_string();
    let guard = ContainerGuard(Some(c.clone()));
    for _ in 0..3 {
        docker_async(&["exec", &c, "echo", "hello"]).await?;
    }
    let mut s = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = docker_async(&["exec", &c, "echo", "hello"]).await?;
        s.push(ms(t.elapsed()));
        if out != "hello\n" {
            bail!("docker exec echo hello printed {out:?}");
        }
    }
    let exec_row = Row::new("baseline: `docker exec C echo hello`", s, None);
    let exec_p50 = exec_row.p50();
    rows.push(exec_row);

    // throughput through the agent, with the docker CLI on the same container kind
    host.create_vm_named(&key, "bench-stream").await?;
    rates.extend(agent::throughput(host, &key, "bench-stream", &c, n.clamp(1, 3)).await?);
    host.delete(&key, "bench-stream").await?;
    drop(guard);

    progress("baseline: btrfs subvolume snapshot -r");
    rows.push(Row::new(
        "baseline: `btrfs subvolume snapshot -r` (1 MiB written)",
        btrfs_cli_snapshots(n).await?,
        None,
    ));
    Ok((rows, run_p50, exec_p50))
}

/// Polls a job until it ends; fails unless it succeeded.
async fn wait_job(host: &Host, key: &str, job: &Value) -> Result<Value> {
    let id = job["id"].as_str().context("job id")?;
    loop {
        let (_, body) = host.get(&format!("/jobs/{id}"), Some(key)).await?;
        match body["state"].as_str() {
            Some("succeeded") => return Ok(body),
            Some("failed") => bail!("job failed: {body}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn timed_job(host: &Host, key: &str, path: &str, body: Value) -> Result<(f64, Value)> {
    let t = Instant::now();
    let (status, job) = host.post(path, Some(key), body).await?;
    if status.as_u16() != 202 {
        bail!("POST {path}: {status} {job}");
    }
    let done = wait_job(host, key, &job).await?;
    Ok((ms(t.elapsed()), done))
}

fn mib_per_s(bytes: f64, ms: f64) -> f64 {
    bytes / (1024.0 * 1024.0) / (ms / 1000.0)
}

/// CPU seconds a process has used, with those of its children it has
/// reaped (`btrfs send` is reaped by the host before its export ends).
fn process_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name, which may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14-17 of stat(5), 12-15 here.
    let ticks: f64 = fields
        .get(11..15)
        .context("short /proc/<pid>/stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// CPU seconds of this process's reaped children (the baseline's pipe).
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0)
}

/// Export and import of a sandbox holding 1 GiB more than its image, the
/// `btrfs send | zstd` pipe on the same snapshot, and incremental exports
/// after a 1 MiB change. Beside wall time, the CPU time each side used: on
/// this machine the S3 server shares the cores with the host.
async fn measure_transfer(host: &Host, s3: &S3Server, n: usize) -> Result<Vec<Row>> {
    let host_pid = host.pid().context("the host is not running")?;
    let key = host.admin_key().await?;
    let mut rows = Vec::new();
    progress("transfer: writing 1 GiB");
    let vm = host.create_vm_named(&key, "bench-xfer").await?;
    host.run_ok(
        &key,
        "bench-xfer",
        "mkdir -p /data && head -c 1073741824 /dev/urandom > /data/big && sync",
    )
    .await?;
    host.snapshot(&key, "bench-xfer", "full").await?;
    let snap =
        sandbox_dir(&host.host_id()?, vm["id"].as_str().unwrap_or_default()).join("snapshots/full");

    progress("transfer: btrfs send piped into zstd");
    let mut s = Vec::new();
    let mut baseline_cpu = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let cpu = children_cpu_s();
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "btrfs send -q '{}' | zstd -q > /dev/null",
                snap.display()
            ))
            .status()
            .await?;
        if !out.success() {
            bail!("btrfs send | zstd failed: {out}");
        }
        s.push(ms(t.elapsed()));
        baseline_cpu.push(children_cpu_s() - cpu);
    }
    let baseline = Row::new("", s, None);

    progress("transfer: export");
    let mut s = Vec::new();
    let mut last = Value::Null;
    let (mut host_cpu, mut server_cpu) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (host_before, server_before) = (process_cpu_s(host_pid)?, process_cpu_s(s3.pid())?);
        let (t, done) = timed_job(
            host,
            &key,
            "/vms/bench-xfer/snapshots/full/export",
            json!({}),
        )
        .await?;
        s.push(t);
        host_cpu.push(process_cpu_s(host_pid)? - host_before);
        server_cpu.push(process_cpu_s(s3.pid())? - server_before);
        last = done;
    }
    let export = Row::new("", s, None);
    let object_key = last["object_key"].as_str().unwrap_or_default().to_string();
    let compressed = last["bytes_total"].as_f64().unwrap_or(f64::NAN);

    progress("transfer: import");
    let mut s = Vec::new();
    for i in 0..n {
        let name = format!("bench-xfer-imp-{i}");
        let (t, _) = timed_job(
            host,
            &key,
            "/snapshots/import",
            json!({"key": object_key, "name": name}),
        )
        .await?;
        s.push(t);
        host.delete(&key, &name).await?;
    }
    let import = Row::new("", s, None);

    progress("transfer: incremental export after 1 MiB");
    let mut s = Vec::new();
    let mut sizes = Vec::new();
    for i in 0..n {
        host.run_ok(
            &key,
            "bench-xfer",
            "head -c 1048576 /dev/urandom > /data/small && sync",
        )
        .await?;
        let snap = format!("incr-{i}");
        host.snapshot(&key, "bench-xfer", &snap).await?;
        let (t, done) = timed_job(
            host,
            &key,
            &format!("/vms/bench-xfer/snapshots/{snap}/export"),
            json!({}),
        )
        .await?;
        s.push(t);
        sizes.push(done["bytes_total"].as_f64().unwrap_or(f64::NAN));
    }
    let incr = Row::new("", s, None);
    host.delete(&key, "bench-xfer").await?;

    let gib = 1024.0 * 1024.0 * 1024.0;
    rows.push(Row {
        op: format!(
            "export 1 GiB snapshot to S3 (p50 {:.0} MiB/s; object {:.0} MiB; CPU p50: host {:.1} s, S3 server {:.1} s)",
            mib_per_s(gib, export.p50()),
            compressed / (1024.0 * 1024.0),
            median(host_cpu),
            median(server_cpu)
        ),
        ..export
    });
    rows.push(Row {
        op: format!(
            "import 1 GiB snapshot from S3 (p50 {:.0} MiB/s)",
            mib_per_s(gib, import.p50())
        ),
        ..import
    });
    rows.push(Row {
        op: format!(
            "baseline: `btrfs send` piped into `zstd > /dev/null` (p50 {:.0} MiB/s; CPU p50 {:.1} s)",
            mib_per_s(gib, baseline.p50()),
            median(baseline_cpu)
        ),
        ..baseline
    });
    sizes.sort_by(|a, b| a.total_cmp(b));
    rows.push(Row {
        op: format!(
            "incremental export after 1 MiB (object p50 {:.2} MiB)",
            sizes.get(sizes.len() / 2).copied().unwrap_or(f64::NAN) / (1024.0 * 1024.0)
        ),
        ..incr
    });
    Ok(rows)
}

async fn btrfs(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("btrfs")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running btrfs {args:?}"))?;
    if !out.status.success() {
        bail!(
            "btrfs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The btrfs CLI's own snapshot time on the same filesystem, for the same
/// change per snapshot as our 1 MiB row: what our snapshot call is compared to.
async fn btrfs_cli_snapshots(n: usize) -> Result<Vec<f64>> {
    let dir = btrfs_path().join(format!("opensandbox-bench-{}", std::process::id()));
    tokio::fs::create_dir_all(&dir).await?;
    let src = dir.join("src");
    let src_str = src.to_string_lossy().into_owned();
    let result = async {
        btrfs(&["subvolume", "create", &src_str]).await?;
        let mut s = Vec::with_capacity(n);
        for i in 0..n {
            let data: Vec<u8> = (0..1024 * 1024).map(|b: usize| (b ^ i) as u8).collect();
            let file = src.join("one-mib");
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(file)?;
                f.write_all(&data)?;
                f.sync_all()
            })
            .await??;
            let dest = dir.join(format!("snap-{i}")).to_string_lossy().into_owned();
            let t = Instant::now();
            btrfs(&["subvolume", "snapshot", "-r", &src_str, &dest]).await?;
            s.push(ms(t.elapsed()));
            btrfs(&["subvolume", "delete", &dest]).await?;
        }
        Ok::<_, anyhow::Error>(s)
    }
    .await;
    let _ = btrfs(&["subvolume", "delete", &src_str]).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn bench(args: Args) -> Result<()> {
    let n = args.runs;
    let bin = pick_bin()?;
    let image = docker_image();

    println!("## OpenSandbox benchmark\n");
    println!("- runs per operation: {n}");
    println!("- nproc: {}", command_line("nproc", &[]));
    println!("- kernel: {}", command_line("uname", &["-r"]));
    println!(
        "- docker engine: {} (storage driver {})",
        docker(&["version", "-f", "{{.Server.Version}}"])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into()),
        docker(&["info", "-f", "{{.Driver}}"])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    );
    println!("- image: {image}");
    println!("- host binary: {}", bin.display());
    println!();
    if args.runtimes {
        return runtimes::bench(bin, n, args.idle).await;
    }

    progress("starting the host");
    let s3 = if args.transfer {
        let s3 = S3Server::start_kind(args.s3).await?;
        println!("- S3 server: {} on 127.0.0.1", args.s3.name());
        Some(s3)
    } else {
        None
    };
    let mut host = Host::start_with(HostOptions {
        bin: Some(bin),
        env: s3
            .as_ref()
            .map(|s| s.host_env("bench/"))
            .unwrap_or_default(),
    })
    .await?;
    host.set_log_on_drop(false);
    let mut rates = Vec::new();
    let measured = async {
        let (mut rows, run_p50, exec_p50) = if args.transfer_only {
            (Vec::new(), f64::NAN, f64::NAN)
        } else {
            measure(&host, n, &image, &mut rates).await?
        };
        if args.transfer {
            let s3 = s3.as_ref().context("no S3 server")?;
            rows.extend(measure_transfer(&host, s3, n.min(3)).await?);
        }
        Ok::<_, anyhow::Error>((rows, run_p50, exec_p50))
    }
    .await;
    let leftover = host.delete_all_vms().await;
    if !leftover.is_empty() {
        eprintln!("warning: could not delete: {leftover:?}");
    }
    if measured.is_err() {
        eprintln!(
            "----- opensandbox host log (tail) -----\n{}\n----- end of host log -----",
            host.log_tail(60)
        );
    }
    drop(host);
    let (rows, run_p50, exec_p50) = measured?;

    print_rows(&rows);
    println!();
    if !rates.is_empty() {
        println!("| throughput (1 GiB) | median MiB/s | runs | target | met? |");
        println!("|---|---:|---:|---:|:---:|");
        for r in &rates {
            let (target, met) = match r.target_mib_s {
                Some(t) => (
                    format!(">= {t:.0}"),
                    if r.median() >= t { "yes" } else { "no" }.to_string(),
                ),
                None => ("—".to_string(), "—".to_string()),
            };
            println!(
                "| {} | {:.0} | {} | {} | {} |",
                r.op,
                r.median(),
                r.mib_s.len(),
                target,
                met
            );
        }
        println!();
    }
    if !args.transfer_only {
        println!(
            "docker exec (CLI) p50 / our run p50 = {:.1} / {:.1} = {:.2}x",
            exec_p50,
            run_p50,
            exec_p50 / run_p50
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(bench(args))
}

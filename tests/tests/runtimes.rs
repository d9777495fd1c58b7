//! Runtime plugins end to end: the first-party `namespaces` runtime beside
//! Docker in one host (routing by the client, by a policy built against the
//! older 0.1.0 contract, snapshots/restore/fork on its Btrfs root, recovery
//! after the host is killed), and faulty or hostile runtime plugins, which
//! must leave nothing behind and reach nothing they were not granted.
//! Components come from scripts/build-plugins.sh; base root filesystems
//! from scripts/build-rootfs.sh.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use opensandbox_e2e::{
    assert_error, btrfs_path, json, namespaces_plugin_entry, plugin_wasm, sandbox_dir, wait_until,
    Host,
};

/// A host with the namespaces runtime (default stays docker) plus `more`
/// plugins-file text; `{name}` stands for a built component's path.
async fn host_with(more: &str) -> Result<(tempfile::TempDir, Host)> {
    let dir = tempfile::tempdir()?;
    let mut text = namespaces_plugin_entry();
    let mut more = more.to_string();
    for name in [
        "legacy-policy",
        "trap-runtime",
        "loop-runtime",
        "nonsense-runtime",
        "hostile-runtime",
    ] {
        let placeholder = format!("{{{name}}}");
        if more.contains(&placeholder) {
            let wasm = plugin_wasm(name);
            ensure!(
                wasm.exists(),
                "{} missing: run scripts/build-plugins.sh",
                wasm.display()
            );
            more = more.replace(&placeholder, &wasm.display().to_string());
        }
    }
    text.push_str(&more);
    let path = dir.path().join("plugins.toml");
    std::fs::write(&path, text)?;
    let host = Host::start_with_env(&[
        ("PLUGINS_CONFIG", &path.display().to_string()),
        ("SANDBOX_RUNTIME", "docker"),
    ])
    .await?;
    Ok((dir, host))
}

/// This host's folder of a runtime plugin's subvolumes.
fn plugin_root(host: &Host, plugin: &str) -> Result<PathBuf> {
    Ok(btrfs_path()
        .join("opensandbox/hosts")
        .join(host.host_id()?)
        .join("runtimes")
        .join(plugin))
}

/// The subvolumes (and anything else) left under a runtime plugin's `sandboxes/`.
fn leftovers(host: &Host, plugin: &str) -> Result<Vec<String>> {
    let dir = plugin_root(host, plugin)?.join("sandboxes");
    Ok(match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    })
}

/// Host processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn sandbox_root(host: &Host, id: &str) -> Result<PathBuf> {
    Ok(plugin_root(host, "namespaces")?.join("sandboxes").join(id))
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_runtime_runs_snapshots_restores_and_forks() -> Result<()> {
    let (_dir, host) = host_with("").await?;
    let key = host.create_key().await?;

    let runtimes = host.get("/runtimes", Some(&key)).await?;
    let names: Vec<&str> = runtimes.1["runtimes"]
        .as_array()
        .context("runtimes list")?
        .iter()
        .filter(|r| r["healthy"] == true)
        .filter_map(|r| r["name"].as_str())
        .collect();
    ensure!(
        names == ["docker", "namespaces"],
        "healthy runtimes: {}",
        runtimes.1
    );

    let vm = host
        .create_vm(
            &key,
            json!({"name": "ns", "runtime": "namespaces", "env": {"GREETING": "hi"}}),
        )
        .await?;
    ensure!(vm["runtime"] == "namespaces", "{vm}");
    let id = vm["id"].as_str().context("id")?.to_string();
    ensure!(
        sandbox_root(&host, &id)?.is_dir(),
        "its root is a subvolume of the plugin"
    );

    // Our agent is PID 1; the sandbox has its own hostname, env and no network.
    let out = host
        .run_ok(&key, "ns", "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; echo $GREETING; grep -c : /proc/net/dev")
        .await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines[0].starts_with("/.opensandbox/agent"), "pid 1: {out}");
    ensure!(lines[1] == "ns" && lines[2] == "hi", "{out}");
    ensure!(lines[3] == "1", "only loopback: {out}");
    // The host's processes are not visible.
    let count = host
        .run_ok(&key, "ns", "ls /proc | grep -c '^[0-9]'")
        .await?;
    ensure!(count.trim().parse::<u32>()? < 10, "sees {count} processes");

    host.run_ok(&key, "ns", "echo one > /root/state").await?;
    host.snapshot(&key, "ns", "one").await?;
    host.run_ok(&key, "ns", "echo two > /root/state; touch /root/extra")
        .await?;
    host.restore(&key, "ns", "one").await?;
    let after = host.run_ok(&key, "ns", "cat /root/state; ls /root").await?;
    ensure!(after == "one\nstate\n", "after restore: {after:?}");

    let fork = host
        .create_vm(&key, json!({"name": "ns-fork", "from": {"vm": "ns", "snapshot": "one"}, "runtime": "namespaces"}))
        .await?;
    ensure!(fork["runtime"] == "namespaces", "{fork}");
    ensure!(host.run_ok(&key, "ns-fork", "cat /root/state").await? == "one\n");
    host.run_ok(&key, "ns-fork", "echo forked > /root/state")
        .await?;
    ensure!(
        host.run_ok(&key, "ns", "cat /root/state").await? == "one\n",
        "fork is independent"
    );

    // Commands run only through the agent on this runtime.
    let engine = host
        .post(
            "/vms/ns/run",
            Some(&key),
            json!({"command": "true", "via": "engine"}),
        )
        .await?;
    ensure!(engine.0.is_client_error(), "via engine: {engine:?}");

    host.delete(&key, "ns-fork").await?;
    host.delete(&key, "ns").await?;
    ensure!(
        !sandbox_root(&host, &id)?.exists(),
        "root removed with the sandbox"
    );
    ensure!(
        processes_with(&format!("runtimes/namespaces/sandboxes/{id}")).is_empty(),
        "no bwrap left for {id}"
    );
    Ok(())
}

/// One field of `btrfs subvolume show` (the CLI, not the host's own ioctls,
/// is the judge here), e.g. "UUID:" or "Parent UUID:".
fn subvolume_field(path: &std::path::Path, field: &str) -> Result<String> {
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "show"])
        .arg(path)
        .output()?;
    ensure!(
        out.status.success(),
        "btrfs subvolume show {}",
        path.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix(field))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("{field} in btrfs subvolume show {}", path.display()))
}

/// A subvolume's parent uuid and whether it is read-only.
fn lineage(path: &std::path::Path) -> Result<(String, bool)> {
    Ok((
        subvolume_field(path, "Parent UUID:")?,
        subvolume_field(path, "Flags:")? == "readonly",
    ))
}

/// Waits until the plugin's pool holds `want` spares.
async fn pool_holds(spares: &std::path::Path, want: usize) -> Result<()> {
    let count = || std::fs::read_dir(spares).map_or(0, |d| d.count());
    let full = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        let n = count();
        async move { Ok(n >= want) }
    })
    .await?;
    ensure!(full, "the pool holds {} spares, not {want}", count());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn spare_snapshots_make_roots_and_initial_snapshots_with_the_image_files() -> Result<()> {
    let (_dir, host) = host_with("").await?;
    let key = host.create_key().await?;
    let spares = plugin_root(&host, "namespaces")?.join(".spares");
    // The first create finds no spare and starts the pool (4 by default).
    host.create_vm(&key, json!({"name": "warm", "runtime": "namespaces"}))
        .await?;
    pool_holds(&spares, 4).await?;

    let vm = host
        .create_vm(&key, json!({"name": "a", "runtime": "namespaces"}))
        .await?;
    let id = vm["id"].as_str().context("id")?.to_string();
    let images = btrfs_path().join("runtimes/namespaces/images");
    let (root_parent, root_ro) = lineage(&sandbox_root(&host, &id)?)?;
    let initial = sandbox_dir(&host.host_id()?, &id).join("snapshots/initial");
    let (initial_parent, initial_ro) = lineage(&initial)?;
    let image = std::fs::read_dir(&images)?
        .flatten()
        .map(|e| e.path())
        .find(|p| subvolume_field(p, "UUID:").is_ok_and(|u| u == root_parent))
        .context("the root is a snapshot of one of the images")?;
    ensure!(!root_ro && initial_ro, "root writable, initial read-only");
    ensure!(
        initial_parent == root_parent,
        "initial is a snapshot of {} too",
        image.display()
    );
    // Both moved out of the pool, which fills up again.
    pool_holds(&spares, 4).await?;

    // `initial` holds what the sandbox started with.
    let before = host
        .run_ok(&key, "a", "cat /etc/os-release | head -1; ls /root | wc -l")
        .await?;
    host.run_ok(&key, "a", "echo x > /root/x; rm /etc/os-release")
        .await?;
    host.restore(&key, "a", "initial").await?;
    let after = host
        .run_ok(&key, "a", "cat /etc/os-release | head -1; ls /root | wc -l")
        .await?;
    ensure!(
        after == before,
        "after restore {after:?}, before {before:?}"
    );
    // A fork of it is a namespaces sandbox with the same files.
    host.create_vm(
        &key,
        json!({"name": "a-fork", "runtime": "namespaces", "from": {"vm": "a", "snapshot": "initial"}}),
    )
    .await?;
    let files = host.run_ok(&key, "a-fork", "ls /root | wc -l").await?;
    ensure!(before.ends_with(&files), "fork has {files:?} in /root");
    for name in ["a-fork", "a", "warm"] {
        host.delete(&key, name).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_built_against_0_1_0_loads_and_routes_to_the_plugin_runtime() -> Result<()> {
    let (_dir, host) = host_with(
        r#"
[[plugin]]
name = "legacy-policy"
kind = "policy"
file = "{legacy-policy}"
"#,
    )
    .await?;
    let key = host.create_key().await?;
    let routed = host
        .create_vm(
            &key,
            json!({"name": "routed", "labels": {"runtime": "namespaces"}}),
        )
        .await?;
    ensure!(routed["runtime"] == "namespaces", "{routed}");
    let plain = host.create_vm(&key, json!({"name": "plain"})).await?;
    ensure!(plain["runtime"] == "docker", "{plain}");
    let refused = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "nowhere", "labels": {"runtime": "vbox"}}),
        )
        .await?;
    assert_error(&refused, 403, "rejected_by_policy");
    host.delete(&key, "routed").await?;
    host.delete(&key, "plain").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_sandboxes_outlive_a_killed_host() -> Result<()> {
    let (_dir, mut host) = host_with("").await?;
    let key = host.create_key().await?;
    host.create_vm(&key, json!({"name": "keeper", "runtime": "namespaces"}))
        .await?;
    host.run_ok(&key, "keeper", "echo kept > /root/file")
        .await?;
    let started = host
        .post(
            "/vms/keeper/processes",
            Some(&key),
            json!({"command": "sleep 300"}),
        )
        .await?;
    ensure!(started.0.as_u16() == 201, "{started:?}");
    let pid = started.1["pid"].as_u64().context("pid")?;

    host.kill()?;
    host.restart().await?;
    let vm = host.get_vm(&key, "keeper").await?;
    ensure!(vm["state"] == "running", "recovered through inspect: {vm}");
    ensure!(host.run_ok(&key, "keeper", "cat /root/file").await? == "kept\n");
    let process = host
        .get(&format!("/vms/keeper/processes/{pid}"), Some(&key))
        .await?;
    ensure!(
        process.1["running"] == true,
        "the sandbox kept running: {}",
        process.1
    );
    host.delete(&key, "keeper").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_runtime_plugins_leave_nothing_behind() -> Result<()> {
    let grants = r#"
[plugin.grants]
state = true
btrfs = true
process = ["/usr/bin/sleep"]
"#;
    let mut more = String::new();
    for (name, timeout) in [
        ("trap-runtime", 2000),
        ("loop-runtime", 500),
        ("nonsense-runtime", 2000),
    ] {
        more.push_str(&format!(
            "\n[[plugin]]\nname = \"{name}\"\nkind = \"runtime\"\nfile = \"{{{name}}}\"\ntimeout_ms = {timeout}\n{grants}"
        ));
    }
    let (_dir, host) = host_with(&more).await?;
    let key = host.create_key().await?;
    let sleeps_before = processes_with("sleep 1000").len();

    let trapped = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "t", "runtime": "trap-runtime"}),
        )
        .await?;
    ensure!(trapped.0.is_server_error(), "trap: {trapped:?}");
    ensure!(
        trapped.1.to_string().contains("trap-runtime"),
        "names the plugin: {}",
        trapped.1
    );

    let looped = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "l", "runtime": "loop-runtime"}),
        )
        .await?;
    ensure!(looped.0.is_server_error(), "loop: {looped:?}");
    ensure!(
        looped.1.to_string().contains("timed out"),
        "says it timed out: {}",
        looped.1
    );

    // image-root names a shared base image that exists: the host must still
    // refuse it (it would write into it, and replace it on restore).
    let shared = btrfs_path().join("runtimes/nonsense-runtime/images");
    std::fs::create_dir_all(&shared)?;
    let image = shared.join("ubuntu_22.04");
    if !image.exists() {
        let made = std::process::Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(&image)
            .status()?;
        ensure!(made.success(), "btrfs subvolume create {}", image.display());
    }
    for nonsense in [
        "missing-root",
        "escape-root",
        "bad-id",
        "empty-id",
        "image-root",
    ] {
        let resp = host
            .post(
                "/vms",
                Some(&key),
                json!({"name": "n", "runtime": "nonsense-runtime", "env": {"NONSENSE": nonsense}}),
            )
            .await?;
        ensure!(resp.0.is_server_error(), "{nonsense}: {resp:?}");
        ensure!(
            resp.1.to_string().contains("nonsense"),
            "{nonsense}: {}",
            resp.1
        );
    }

    ensure!(image.is_dir(), "the shared image is still there");

    // Time the plugin spends waiting on the host is not its own: 3 s of
    // process.wait in a plugin with a 2 s timeout is not a timeout.
    let slow = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "s", "runtime": "nonsense-runtime", "env": {"NONSENSE": "slow-host"}}),
        )
        .await?;
    ensure!(
        slow.1.to_string().contains("waited 3 s on the host"),
        "slow-host: {slow:?}"
    );
    for plugin in ["trap-runtime", "loop-runtime", "nonsense-runtime"] {
        let left = leftovers(&host, plugin)?;
        ensure!(left.is_empty(), "{plugin} left subvolumes: {left:?}");
        let ledger = host.data_dir().join("plugin-processes").join(plugin);
        let procs: Vec<_> = std::fs::read_dir(&ledger)
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        ensure!(
            procs.is_empty(),
            "{plugin} left processes in its ledger: {procs:?}"
        );
    }
    let settled = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { Ok(processes_with("sleep 1000").len() <= sleeps_before) },
    )
    .await?;
    ensure!(
        settled,
        "sleep processes left: {:?}",
        processes_with("sleep 1000")
    );
    ensure!(
        host.list_vms(&key).await?.is_empty(),
        "no sandbox rows left"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_runtime_plugin_reaches_nothing_it_was_not_granted() -> Result<()> {
    let (_dir, host) = host_with(
        r#"
[[plugin]]
name = "hostile-runtime"
kind = "runtime"
file = "{hostile-runtime}"
[plugin.grants]
state = true
btrfs = true
process = ["/usr/bin/sleep"]
"#,
    )
    .await?;
    let key = host.create_key().await?;
    let runtimes = host.get("/runtimes", Some(&key)).await?;
    let hostile = runtimes.1["runtimes"]
        .as_array()
        .context("runtimes")?
        .iter()
        .find(|r| r["name"] == "hostile-runtime")
        .context("hostile-runtime listed")?
        .clone();
    let report = hostile["error"].as_str().context("its health report")?;
    let lines: Vec<&str> = report.lines().collect();
    ensure!(lines.len() >= 10, "report too short: {report}");
    ensure!(
        lines.contains(&"sleep=allowed"),
        "control line missing: {report}"
    );
    let allowed: Vec<&&str> = lines.iter().filter(|l| l.contains("=ALLOWED")).collect();
    ensure!(
        allowed.is_empty(),
        "escapes that worked: {allowed:?}\n{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_limits_hold_through_cgroups() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = namespaces_plugin_entry()
        + "[plugin.config]\nmemory_limit_mib = 64\nmax_processes = 50\nlimits_best_effort = false\n";
    let path = dir.path().join("plugins.toml");
    std::fs::write(&path, text)?;
    let host = Host::start_with_env(&[
        ("PLUGINS_CONFIG", &path.display().to_string()),
        ("SANDBOX_RUNTIME", "namespaces"),
    ])
    .await?;
    let key = host.create_key().await?;
    host.create_vm(&key, json!({"name": "small"})).await?;
    // On the host, the sandbox is a group of its own with the limit (inside, a
    // cgroup namespace shows it as the root).
    let limited = ["memory/opensandbox/namespaces", "opensandbox/namespaces"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(format!("/sys/fs/cgroup/{dir}"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .any(|group| {
            let limit = ["memory.limit_in_bytes", "memory.max"]
                .iter()
                .find_map(|f| std::fs::read_to_string(group.path().join(f)).ok())
                .unwrap_or_default();
            let procs =
                std::fs::read_to_string(group.path().join("cgroup.procs")).unwrap_or_default();
            limit.trim() == (64u64 << 20).to_string() && !procs.trim().is_empty()
        });
    ensure!(
        limited,
        "no populated 64 MiB group under opensandbox/namespaces"
    );
    // 200 MiB touched in a 64 MiB sandbox: the kernel stops it.
    let hog = host
        .run(
            &key,
            "small",
            "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'",
        )
        .await?;
    ensure!(
        hog.exit_code != Some(0) && !hog.stdout.contains("209715200"),
        "200 MiB fit in a 64 MiB sandbox: {}",
        hog.brief()
    );
    // More than 50 processes at once: fork fails.
    let forks = host
        .run(
            &key,
            "small",
            "for i in $(seq 80); do sleep 5 & done 2>/dev/null; jobs -p | wc -l",
        )
        .await?;
    let started: u32 = forks.stdout.trim().parse().unwrap_or(0);
    ensure!(
        started < 80,
        "80 processes started under max_processes = 50: {}",
        forks.brief()
    );
    // The sandbox still works afterwards.
    ensure!(host.run_ok(&key, "small", "echo alive").await? == "alive\n");
    host.delete(&key, "small").await?;
    Ok(())
}

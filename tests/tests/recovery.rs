//! Crash/restart recovery, orphan reconciliation and leak checks.

use std::time::Duration;

use anyhow::{Context as _, Result};
use opensandbox_e2e::{
    btrfs_subvolumes_containing, container_of_sandbox, container_running, docker,
    docker_containers_with_label, docker_image, json, sandbox_dir, wait_until, Host,
};

#[tokio::test(flavor = "multi_thread")]
async fn restart_after_crash_keeps_sandboxes() -> Result<()> {
    let mut host = Host::start().await?;
    let key = host.admin_key().await?;
    let vm = host
        .create_vm(&key, json!({"name": "a", "labels": {"k": "v"}}))
        .await?;
    host.run_ok(&key, "a", "echo survived > /root/file").await?;
    host.snapshot(&key, "a", "s1").await?;
    host.run_ok(&key, "a", "echo later > /root/later").await?;
    let host_id = host.host_id()?;

    host.kill()?;
    host.restart().await?;
    assert_eq!(
        host.host_id()?,
        host_id,
        "the host id is kept across restarts"
    );

    let vms = host.list_vms(&key).await?;
    assert_eq!(
        vms.len(),
        1,
        "a should be listed after the restart: {vms:?}"
    );
    assert_eq!(vms[0]["name"], "a", "{vms:?}");
    assert_eq!(vms[0]["id"], vm["id"], "{vms:?}");
    assert_eq!(vms[0]["labels"], json!({"k": "v"}), "{vms:?}");
    let got = host.get_vm(&key, "a").await?;
    assert_eq!(got["state"], "running", "{got}");

    assert_eq!(
        host.run_ok(&key, "a", "cat /root/file").await?,
        "survived\n"
    );
    assert_eq!(host.run_ok(&key, "a", "cat /root/later").await?, "later\n");
    assert_eq!(host.snapshots(&key, "a").await?, vec!["initial", "s1"]);

    host.restore(&key, "a", "s1").await?;
    assert_eq!(
        host.run_ok(&key, "a", "cat /root/file").await?,
        "survived\n"
    );
    let r = host.run(&key, "a", "test -e /root/later").await?;
    assert_eq!(r.exit_code, Some(1), "{}", r.brief());

    // A graceful stop/start keeps everything too.
    host.restart().await?;
    assert_eq!(
        host.run_ok(&key, "a", "cat /root/file").await?,
        "survived\n"
    );

    host.delete(&key, "a").await?;
    Ok(())
}

/// Starts a look-alike sandbox container with the docker CLI; returns its id.
fn start_labelled_container(host_id: &str, sandbox_id: &str) -> Result<String> {
    let out = docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        "org.opensandbox.managed=true",
        "--label",
        &format!("org.opensandbox.host={host_id}"),
        "--label",
        &format!("org.opensandbox.sandbox={sandbox_id}"),
        &docker_image(),
        "sleep",
        "infinity",
    ])?;
    Ok(out.trim().to_string())
}

/// Removes containers on drop (for containers a test made with the docker CLI).
struct ContainerGuard(Vec<String>);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = docker(&["rm", "-f", c]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn orphan_containers_are_removed_on_start() -> Result<()> {
    let mut host = Host::start().await?;
    let key = host.admin_key().await?;
    let known = host.create_vm_named(&key, "known").await?;
    let known_id = known["id"].as_str().context("sandbox id")?.to_string();
    let host_id = host.host_id()?;

    host.kill()?;
    let orphan_id = uuid::Uuid::new_v4().to_string();
    let orphan = start_labelled_container(&host_id, &orphan_id)?;
    // A container of another host (same labels scheme) must be left alone.
    let foreign_host = uuid::Uuid::new_v4().to_string();
    let foreign = start_labelled_container(&foreign_host, &uuid::Uuid::new_v4().to_string())?;
    let _guard = ContainerGuard(vec![orphan.clone(), foreign.clone()]);

    host.restart().await?;
    let label = format!("org.opensandbox.sandbox={orphan_id}");
    let gone = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(250),
        || async { Ok(docker_containers_with_label(&label).is_empty()) },
    )
    .await?;
    assert!(
        gone,
        "orphan container {orphan} (label {label}) still exists 10 s after the restart"
    );

    assert!(
        container_running(&foreign)?,
        "a container of another host id ({foreign_host}) was touched"
    );
    // The known sandbox is untouched.
    let kc = container_of_sandbox(&known_id)?;
    assert!(
        container_running(&kc)?,
        "the known sandbox's container {kc} should still run"
    );
    assert_eq!(host.run_ok(&key, "known", "echo ok").await?, "ok\n");
    assert_eq!(host.list_vms(&key).await?.len(), 1);

    host.delete(&key, "known").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_container_is_started_again_on_start() -> Result<()> {
    let mut host = Host::start().await?;
    let key = host.admin_key().await?;
    let vm = host.create_vm_named(&key, "s").await?;
    let id = vm["id"].as_str().context("sandbox id")?.to_string();
    host.run_ok(&key, "s", "echo kept > /root/kept").await?;

    host.stop().await?;
    let c = container_of_sandbox(&id)?;
    docker(&["stop", "-t", "1", &c])?;
    assert!(
        !container_running(&c)?,
        "docker stop should have stopped {c}"
    );

    host.restart().await?;
    let running = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(250),
        || async {
            let c = container_of_sandbox(&id)?;
            container_running(&c)
        },
    )
    .await?;
    assert!(
        running,
        "the stopped container of sandbox {id} is not running 10 s after the restart"
    );
    let got = host.get_vm(&key, "s").await?;
    assert_eq!(got["state"], "running", "{got}");
    assert_eq!(host.run_ok(&key, "s", "cat /root/kept").await?, "kept\n");

    host.delete(&key, "s").await?;
    Ok(())
}

fn assert_no_leaks(host_id: &str, sandbox_id: &str) -> Result<()> {
    let left = docker_containers_with_label(&format!("org.opensandbox.sandbox={sandbox_id}"));
    assert!(
        left.is_empty(),
        "containers of deleted sandbox {sandbox_id} remain: {left:?}"
    );
    let dir = sandbox_dir(host_id, sandbox_id);
    assert!(
        !dir.exists(),
        "folder of deleted sandbox remains: {}",
        dir.display()
    );
    let subvols = btrfs_subvolumes_containing(sandbox_id)?;
    assert!(
        subvols.is_empty(),
        "subvolumes of deleted sandbox {sandbox_id} remain: {subvols:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_leaves_nothing_behind() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    let host_id = host.host_id()?;

    let a = host.create_vm_named(&key, "a").await?;
    let a_id = a["id"].as_str().context("sandbox id")?.to_string();
    host.run_ok(
        &key,
        "a",
        "dd if=/dev/urandom of=/root/f bs=1M count=4 status=none",
    )
    .await?;
    host.snapshot(&key, "a", "s1").await?;
    host.snapshot(&key, "a", "s2").await?;
    let b = host
        .create_vm(
            &key,
            json!({"name": "b", "from": {"vm": "a", "snapshot": "s1"}}),
        )
        .await?;
    let b_id = b["id"].as_str().context("sandbox id")?.to_string();

    // Sanity: the layout of docs/API.md is there before the delete.
    for (id, snaps) in [
        (&a_id, &["initial", "s1", "s2"][..]),
        (&b_id, &["initial"][..]),
    ] {
        let dir = sandbox_dir(&host_id, id);
        assert!(
            dir.is_dir(),
            "expected the sandbox folder {}",
            dir.display()
        );
        for s in snaps {
            let p = dir.join("snapshots").join(s);
            assert!(p.exists(), "expected snapshot {}", p.display());
        }
        assert_eq!(
            docker_containers_with_label(&format!("org.opensandbox.sandbox={id}")).len(),
            1
        );
    }

    // Deleting the source of a fork leaves the fork working.
    host.delete(&key, "a").await?;
    assert_error_404(&host, &key, "a").await?;
    assert_no_leaks(&host_id, &a_id)?;
    assert_eq!(
        host.run_ok(&key, "b", "stat -c %s /root/f").await?,
        "4194304\n"
    );
    host.restore(&key, "b", "initial").await?;

    host.delete(&key, "b").await?;
    assert_no_leaks(&host_id, &b_id)?;
    assert!(host.list_vms(&key).await?.is_empty());
    Ok(())
}

async fn assert_error_404(host: &Host, key: &str, vm: &str) -> Result<()> {
    let resp = host.get(&format!("/vms/{vm}"), Some(key)).await?;
    opensandbox_e2e::assert_error(&resp, 404, "vm_not_found");
    Ok(())
}

/// Simulates crashes in the middle of a create and of a restore (after the
/// old root was deleted, before the new one was in place) by editing the
/// store while the host is down; the restart must undo the create and finish
/// the restore.
#[tokio::test(flavor = "multi_thread")]
async fn interrupted_create_and_restore_are_undone_and_finished() -> Result<()> {
    let mut host = Host::start().await?;
    let key = host.admin_key().await?;
    let half = host.create_vm_named(&key, "half").await?;
    let half_id = half["id"].as_str().context("id")?.to_string();
    host.create_vm_named(&key, "mid").await?;
    host.run_ok(&key, "mid", "echo a > /root/a").await?;
    host.snapshot(&key, "mid", "s1").await?;
    host.run_ok(&key, "mid", "echo b > /root/b && rm /root/a")
        .await?;
    let host_id = host.host_id()?;
    host.stop().await?;

    let db = host.data_dir().join("opensandbox.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
    sqlx::query("UPDATE sandboxes SET state = 'creating' WHERE name = 'half'")
        .execute(&pool)
        .await?;
    sqlx::query(
        "UPDATE sandboxes SET state = 'restoring', pending_restore = 's1' WHERE name = 'mid'",
    )
    .execute(&pool)
    .await?;
    let (container, rootfs): (String, String) =
        sqlx::query_as("SELECT container_id, rootfs_path FROM sandboxes WHERE name = 'mid'")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    // The crash hit after the old root filesystem was deleted.
    docker(&["stop", "-t", "0", &container])?;
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "delete", &rootfs])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    host.restart().await?;
    let names: Vec<String> = host
        .list_vms(&key)
        .await?
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, vec!["mid"], "the half-made sandbox is gone");
    assert!(
        docker_containers_with_label(&format!("org.opensandbox.sandbox={half_id}")).is_empty(),
        "the half-made sandbox's container is removed"
    );
    assert!(
        !sandbox_dir(&host_id, &half_id).exists(),
        "its snapshots are removed"
    );

    let mid = host.get_vm(&key, "mid").await?;
    assert_eq!(mid["state"], "running", "{mid}");
    assert_eq!(host.run_ok(&key, "mid", "cat /root/a").await?, "a\n");
    let r = host.run(&key, "mid", "test -e /root/b").await?;
    assert_eq!(
        r.exit_code,
        Some(1),
        "the restore was finished: {}",
        r.brief()
    );
    Ok(())
}

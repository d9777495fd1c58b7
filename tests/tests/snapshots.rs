//! Whole-filesystem snapshot / restore / fork semantics.

use anyhow::Result;
use opensandbox_e2e::{assert_error, assert_status, json, Host};

/// Prints `path=<content>` or `path=<absent>` for each path, one a line.
fn probe(paths: &[&str]) -> String {
    paths
        .iter()
        .map(|p| {
            format!(
                "if [ -e {p} ]; then printf '%s=' {p}; cat {p}; echo; else echo {p}='<absent>'; fi"
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// sha256 of files of the image that the test deletes or changes.
const IMAGE_FILES: &str = "/etc/issue /etc/issue.net /etc/motd /usr/bin/env";

#[tokio::test(flavor = "multi_thread")]
async fn restore_reverts_the_whole_root_filesystem() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;

    let pristine_sums = host
        .run_ok(&key, "a", &format!("sha256sum {IMAGE_FILES}"))
        .await?;

    // State at s1: new files in /root, /etc, /opt; an image file deleted; one changed.
    host.run_ok(
        &key,
        "a",
        "echo root-s1 > /root/a.txt && echo etc-s1 > /etc/a.conf && mkdir -p /opt/app \
         && echo opt-s1 > /opt/app/data && rm /etc/issue && echo motd-s1 > /etc/motd",
    )
    .await?;
    let paths = [
        "/root/a.txt",
        "/etc/a.conf",
        "/opt/app/data",
        "/etc/issue",
        "/etc/motd",
        "/root/b.txt",
        "/etc/b.conf",
        "/opt/app/later",
        "/etc/issue.net",
    ];
    let at_s1 = host.run_ok(&key, "a", &probe(&paths)).await?;
    assert!(at_s1.contains("/etc/issue=<absent>"), "{at_s1}");
    let sums_s1 = host
        .run_ok(&key, "a", "sha256sum /etc/issue.net /usr/bin/env")
        .await?;
    host.snapshot(&key, "a", "s1").await?;

    // After s1: more writes, deletes (of files made before s1 and of image files), changes.
    host.run_ok(
        &key,
        "a",
        "echo root-later > /root/b.txt && echo etc-later > /etc/b.conf \
         && echo opt-later > /opt/app/later && rm /root/a.txt /etc/a.conf /etc/issue.net \
         && echo opt-changed > /opt/app/data && echo motd-later > /etc/motd && rm /usr/bin/env",
    )
    .await?;
    let changed = host.run_ok(&key, "a", &probe(&paths)).await?;
    assert_ne!(
        changed, at_s1,
        "the writes after s1 should be visible before the restore"
    );

    let restored = host.restore(&key, "a", "s1").await?;
    assert_eq!(restored["snapshot"], "s1", "{restored}");
    assert_eq!(restored["restarted"], true, "{restored}");
    assert_eq!(restored["vm"]["state"], "running", "{restored}");

    let after = host.run_ok(&key, "a", &probe(&paths)).await?;
    assert_eq!(
        after, at_s1,
        "after restoring s1 the files should be as they were at s1\n--- at s1:\n{at_s1}\n--- after restore:\n{after}"
    );
    let sums_after = host
        .run_ok(&key, "a", "sha256sum /etc/issue.net /usr/bin/env")
        .await?;
    assert_eq!(
        sums_after, sums_s1,
        "image files deleted after s1 should be back with their content"
    );
    let r = host.run(&key, "a", "/usr/bin/env true").await?;
    assert_eq!(
        r.exit_code,
        Some(0),
        "/usr/bin/env should be back and executable: {}",
        r.brief()
    );

    let vm = host.get_vm(&key, "a").await?;
    assert_eq!(vm["state"], "running", "{vm}");

    // Restoring `initial` brings back the pristine image.
    host.restore(&key, "a", "initial").await?;
    let initial = host.run_ok(&key, "a", &probe(&paths)).await?;
    for p in [
        "/root/a.txt",
        "/etc/a.conf",
        "/opt/app/data",
        "/root/b.txt",
        "/etc/b.conf",
        "/opt/app/later",
    ] {
        assert!(
            initial.contains(&format!("{p}=<absent>")),
            "{p} should not exist after restoring initial:\n{initial}"
        );
    }
    let r = host.run(&key, "a", "test -e /opt/app").await?;
    assert_eq!(
        r.exit_code,
        Some(1),
        "/opt/app should be gone after restoring initial: {}",
        r.brief()
    );
    let sums_initial = host
        .run_ok(&key, "a", &format!("sha256sum {IMAGE_FILES}"))
        .await?;
    assert_eq!(
        sums_initial, pristine_sums,
        "image files should be pristine after restoring initial"
    );

    // Snapshots survive restores.
    let names = host.snapshots(&key, "a").await?;
    assert_eq!(names, vec!["initial", "s1"], "snapshots after restores");

    host.delete(&key, "a").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn large_file_keeps_its_checksum_across_restore() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "big").await?;

    host.run_ok(
        &key,
        "big",
        "dd if=/dev/urandom of=/root/big bs=1M count=64 status=none conv=fsync",
    )
    .await?;
    let sum = host.run_ok(&key, "big", "sha256sum /root/big").await?;
    let size = host.run_ok(&key, "big", "stat -c %s /root/big").await?;
    assert_eq!(size.trim(), (64 * 1024 * 1024).to_string());
    host.snapshot(&key, "big", "s1").await?;

    // Overwrite part of it in place, then replace it entirely.
    host.run_ok(
        &key,
        "big",
        "dd if=/dev/zero of=/root/big bs=1M count=8 seek=4 conv=notrunc,fsync status=none",
    )
    .await?;
    let changed = host.run_ok(&key, "big", "sha256sum /root/big").await?;
    assert_ne!(
        changed, sum,
        "the in-place overwrite should change the checksum"
    );
    host.run_ok(
        &key,
        "big",
        "rm /root/big && head -c 1000 /dev/urandom > /root/big",
    )
    .await?;

    host.restore(&key, "big", "s1").await?;
    let after = host.run_ok(&key, "big", "sha256sum /root/big").await?;
    assert_eq!(
        after, sum,
        "64 MiB file should have its s1 checksum after restore"
    );

    host.delete(&key, "big").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_from_a_snapshot() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    let a = host
        .create_vm(&key, json!({"name": "a", "env": {"ORIGIN": "a"}}))
        .await?;

    host.run_ok(
        &key,
        "a",
        "echo a-s1 > /root/f && mkdir -p /opt/o && echo o > /opt/o/x",
    )
    .await?;
    host.snapshot(&key, "a", "s1").await?;
    host.run_ok(
        &key,
        "a",
        "echo after > /root/after && echo a-later > /root/f",
    )
    .await?;

    let b = host
        .create_vm(
            &key,
            json!({"name": "b", "from": {"vm": "a", "snapshot": "s1"}}),
        )
        .await?;
    assert_eq!(b["name"], "b", "{b}");
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(
        b["image"], a["image"],
        "fork should have the source's image: {b}"
    );
    assert_eq!(
        b["forked_from"],
        json!({"vm": "a", "snapshot": "s1"}),
        "{b}"
    );
    assert_ne!(b["id"], a["id"], "{b}");

    // The fork has a's files as they were at s1.
    assert_eq!(host.run_ok(&key, "b", "cat /root/f").await?, "a-s1\n");
    assert_eq!(host.run_ok(&key, "b", "cat /opt/o/x").await?, "o\n");
    let r = host.run(&key, "b", "test -e /root/after").await?;
    assert_eq!(
        r.exit_code,
        Some(1),
        "/root/after was written after s1: {}",
        r.brief()
    );

    // Independent from then on, both ways.
    host.run_ok(&key, "b", "echo fork > /root/fork-only && echo b > /root/f")
        .await?;
    host.run_ok(&key, "a", "echo a > /root/a-only").await?;
    let r = host.run(&key, "a", "test -e /root/fork-only").await?;
    assert_eq!(
        r.exit_code,
        Some(1),
        "fork's write visible in a: {}",
        r.brief()
    );
    let r = host.run(&key, "b", "test -e /root/a-only").await?;
    assert_eq!(
        r.exit_code,
        Some(1),
        "a's write visible in the fork: {}",
        r.brief()
    );
    assert_eq!(host.run_ok(&key, "a", "cat /root/f").await?, "a-later\n");

    // The fork has its own `initial`, taken when it was made (with a's s1 files).
    assert_eq!(
        host.snapshots(&key, "b").await?,
        vec!["initial"],
        "fork's snapshots"
    );
    assert_eq!(
        host.snapshots(&key, "a").await?,
        vec!["initial", "s1"],
        "a's snapshots"
    );
    host.restore(&key, "b", "initial").await?;
    assert_eq!(host.run_ok(&key, "b", "cat /root/f").await?, "a-s1\n");
    let r = host.run(&key, "b", "test -e /root/fork-only").await?;
    assert_eq!(r.exit_code, Some(1), "{}", r.brief());

    // Forking from another key's vm: 404 vm_not_found; unknown snapshot: snapshot_not_found.
    let other = host.create_key().await?;
    let resp = host
        .post(
            "/vms",
            Some(&other),
            json!({"name": "c", "from": {"vm": "a", "snapshot": "s1"}}),
        )
        .await?;
    assert_error(&resp, 404, "vm_not_found");
    let resp = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "c", "from": {"vm": "a", "snapshot": "nope"}}),
        )
        .await?;
    assert_error(&resp, 404, "snapshot_not_found");
    let resp = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "c", "from": {"vm": "nope", "snapshot": "s1"}}),
        )
        .await?;
    assert_error(&resp, 404, "vm_not_found");

    // Deleting the source leaves the fork intact.
    host.delete(&key, "a").await?;
    assert_eq!(host.run_ok(&key, "b", "cat /root/f").await?, "a-s1\n");
    host.restore(&key, "b", "initial").await?;
    assert_eq!(host.run_ok(&key, "b", "cat /opt/o/x").await?, "o\n");
    host.delete(&key, "b").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_lifecycle_and_errors() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;

    let s = host.snapshot(&key, "a", "s1").await?;
    assert_eq!(s["name"], "s1", "{s}");
    assert!(s["created_at"].is_string(), "{s}");

    let resp = host
        .post("/vms/a/snapshots", Some(&key), json!({"name": "s1"}))
        .await?;
    assert_error(&resp, 409, "snapshot_exists");
    let resp = host
        .post("/vms/a/snapshots", Some(&key), json!({"name": "initial"}))
        .await?;
    assert_error(&resp, 409, "snapshot_exists");

    host.snapshot(&key, "a", "s2").await?;
    assert_eq!(
        host.snapshots(&key, "a").await?,
        vec!["initial", "s1", "s2"],
        "oldest first"
    );

    let resp = host.delete_req("/vms/a/snapshots/s1", Some(&key)).await?;
    assert_status(&resp, 204);
    assert_eq!(host.snapshots(&key, "a").await?, vec!["initial", "s2"]);

    let resp = host
        .post("/vms/a/restore", Some(&key), json!({"snapshot": "s1"}))
        .await?;
    assert_error(&resp, 404, "snapshot_not_found");
    let resp = host.delete_req("/vms/a/snapshots/s1", Some(&key)).await?;
    assert_error(&resp, 404, "snapshot_not_found");

    // The name is free again.
    host.run_ok(&key, "a", "echo again > /root/x").await?;
    host.snapshot(&key, "a", "s1").await?;
    host.run_ok(&key, "a", "rm /root/x").await?;
    host.restore(&key, "a", "s1").await?;
    assert_eq!(host.run_ok(&key, "a", "cat /root/x").await?, "again\n");

    // Unknown vm.
    let resp = host
        .post("/vms/nope/snapshots", Some(&key), json!({"name": "s"}))
        .await?;
    assert_error(&resp, 404, "vm_not_found");
    let resp = host.get("/vms/nope/snapshots", Some(&key)).await?;
    assert_error(&resp, 404, "vm_not_found");

    host.delete(&key, "a").await?;
    Ok(())
}

//! `POST /vms/{name}/run`: exit codes, streams, env, cwd, shell semantics, timeouts,
//! output caps and the sandbox's lack of network.

use std::time::{Duration, Instant};

use anyhow::Result;
use opensandbox_e2e::{assert_error, json, wait_until, Host};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn command_semantics() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm(&key, json!({"name": "r", "env": {"VM_VAR": "from-vm"}}))
        .await?;

    let r = host.run(&key, "r", "exit 3").await?;
    assert_eq!(r.exit_code, Some(3), "{}", r.brief());
    assert!(!r.timed_out, "{}", r.brief());

    let r = host.run(&key, "r", "echo out; echo err >&2").await?;
    assert_eq!(r.stdout, "out\n", "{}", r.brief());
    assert_eq!(r.stderr, "err\n", "{}", r.brief());
    assert_eq!(r.exit_code, Some(0), "{}", r.brief());
    assert!(
        !r.truncated && !r.stdout_truncated && !r.stderr_truncated,
        "{}",
        r.brief()
    );

    let r = host.run(&key, "r", "echo oops >&2; exit 7").await?;
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str(), r.exit_code),
        ("", "oops\n", Some(7)),
        "{}",
        r.brief()
    );

    let r = host
        .run_with(
            &key,
            "r",
            json!({"command": "echo \"$FOO-$BAR\"", "env": {"FOO": "foo", "BAR": "b a r"}}),
        )
        .await?;
    assert_eq!(r.stdout, "foo-b a r\n", "per-run env: {}", r.brief());

    let r = host.run(&key, "r", "echo $VM_VAR").await?;
    assert_eq!(
        r.stdout,
        "from-vm\n",
        "sandbox env from POST /vms: {}",
        r.brief()
    );

    let r = host
        .run_with(&key, "r", json!({"command": "pwd", "cwd": "/tmp"}))
        .await?;
    assert_eq!(r.stdout, "/tmp\n", "cwd: {}", r.brief());
    host.run_ok(&key, "r", "mkdir -p /opt/work && echo w > /opt/work/f")
        .await?;
    let r = host
        .run_with(
            &key,
            "r",
            json!({"command": "cat f && pwd", "cwd": "/opt/work"}),
        )
        .await?;
    assert_eq!(r.stdout, "w\n/opt/work\n", "cwd: {}", r.brief());
    // A cwd that does not exist: the command never starts, and the answer says why.
    let resp = host
        .post(
            "/vms/r/run",
            Some(&key),
            json!({"command": "echo never", "cwd": "/no/such/dir"}),
        )
        .await?;
    assert_error(&resp, 400, "command_not_started");
    assert!(resp.1.to_string().contains("/no/such/dir"), "{}", resp.1);

    // /bin/sh -c semantics.
    let r = host.run(&key, "r", "echo abc | tr a-z A-Z").await?;
    assert_eq!(r.stdout, "ABC\n", "pipe: {}", r.brief());
    let r = host.run(&key, "r", "true && echo yes || echo no").await?;
    assert_eq!(r.stdout, "yes\n", "&&: {}", r.brief());
    let r = host.run(&key, "r", "false && echo yes || echo no").await?;
    assert_eq!(r.stdout, "no\n", "||: {}", r.brief());
    let r = host
        .run(
            &key,
            "r",
            "for i in 1 2 3; do printf $i; done; echo; x=$((6*7)); echo $x",
        )
        .await?;
    assert_eq!(r.stdout, "123\n42\n", "shell syntax: {}", r.brief());
    let r = host
        .run(&key, "r", "echo 'single quoted $HOME' \"double $((1+1))\"")
        .await?;
    assert_eq!(
        r.stdout,
        "single quoted $HOME double 2\n",
        "quoting: {}",
        r.brief()
    );

    // State persists between runs.
    host.run_ok(&key, "r", "echo persisted > /root/p").await?;
    assert_eq!(host.run_ok(&key, "r", "cat /root/p").await?, "persisted\n");

    // Control characters come back as they are.
    let r = host.run(&key, "r", "printf 'tab\\there\\n'").await?;
    assert_eq!(r.stdout, "tab\there\n", "{}", r.brief());

    // No network by default: only the loopback interface (read from /proc,
    // which every runtime mounts; /sys is not mounted by every runtime).
    let r = host
        .run(
            &key,
            "r",
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
        )
        .await?;
    assert_eq!(
        r.stdout,
        "lo\n",
        "the sandbox should have only lo: {}",
        r.brief()
    );

    host.delete(&key, "r").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_the_command() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "t").await?;

    let t0 = Instant::now();
    let r = host
        .run_with(
            &key,
            "t",
            json!({"command": "echo started; sleep 30", "timeout_ms": 1000}),
        )
        .await?;
    let took = t0.elapsed();
    assert!(
        r.timed_out,
        "sleep 30 with timeout_ms 1000 should time out: {}",
        r.brief()
    );
    assert_eq!(
        r.exit_code,
        None,
        "timed-out command has exit_code null: {}",
        r.brief()
    );
    assert!(
        took < Duration::from_secs(20),
        "run returned after {took:?}: {}",
        r.brief()
    );

    // The sleep is gone (allow a few seconds for the kill to land).
    let gone = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(250),
        || async {
            // Only our `sleep 30`: the container's own keep-alive process may be a sleep too.
            let r = host
                .run(&key, "t", "ps -eo args | grep -E '^sleep 30$' || true")
                .await?;
            Ok(r.stdout.trim().is_empty())
        },
    )
    .await?;
    let ps = host.run(&key, "t", "ps -eo pid,ppid,comm").await?;
    assert!(
        gone,
        "a `sleep` process survived the timeout:\n{}",
        ps.stdout
    );

    // Commands still work afterwards.
    assert_eq!(host.run_ok(&key, "t", "echo ok").await?, "ok\n");
    host.delete(&key, "t").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_background_children_too() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "tc").await?;

    let r = host
        .run_with(
            &key,
            "tc",
            json!({"command": "sleep 28 & sleep 29 & sleep 30; wait", "timeout_ms": 1000}),
        )
        .await?;
    assert!(r.timed_out, "{}", r.brief());
    assert_eq!(r.exit_code, None, "{}", r.brief());

    let gone = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(250),
        || async {
            let r = host
                .run(
                    &key,
                    "tc",
                    "ps -eo args | grep -E '^sleep (28|29|30)$' || true",
                )
                .await?;
            Ok(r.stdout.trim().is_empty())
        },
    )
    .await?;
    let ps = host.run(&key, "tc", "ps -eo pid,ppid,args").await?;
    assert!(
        gone,
        "background `sleep` processes of a timed-out command survived:\n{}",
        ps.stdout
    );

    host.delete(&key, "tc").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_capped_per_stream() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "o").await?;

    let r = host
        .run(&key, "o", "head -c 3000000 /dev/zero | tr '\\0' a")
        .await?;
    assert!(!r.timed_out, "{}", r.brief());
    assert_eq!(
        r.stdout.len(),
        MIB,
        "stdout should be capped at 1 MiB: {}",
        r.brief()
    );
    assert!(
        r.stdout.bytes().all(|b| b == b'a'),
        "stdout should be all 'a'"
    );
    assert!(r.truncated && r.stdout_truncated, "{}", r.brief());
    assert!(!r.stderr_truncated, "{}", r.brief());

    let r = host
        .run(
            &key,
            "o",
            "head -c 2000000 /dev/zero | tr '\\0' b >&2; echo small",
        )
        .await?;
    assert!(!r.timed_out, "{}", r.brief());
    assert_eq!(
        r.stderr.len(),
        MIB,
        "stderr should be capped at 1 MiB: {}",
        r.brief()
    );
    assert_eq!(r.stdout, "small\n", "{}", r.brief());
    assert!(
        r.truncated && r.stderr_truncated && !r.stdout_truncated,
        "{}",
        r.brief()
    );
    assert_eq!(r.exit_code, Some(0), "{}", r.brief());

    host.delete(&key, "o").await?;
    Ok(())
}

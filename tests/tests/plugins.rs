//! The Wasm plugin platform end to end: first-party policy and hook plugins
//! loaded by a real host from a plugins file, and faulty plugins that must
//! cost one call (or stop start-up, naming themselves) while the host serves.
//! The components come from `scripts/build-plugins.sh` (target/plugins/).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use opensandbox_e2e::{assert_error, json, workspace_root, Host};

/// Path of a built plugin component.
fn plugin(name: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("target/plugins");
    [name.to_string(), name.replace('-', "_")]
        .iter()
        .map(|n| dir.join(format!("{n}.wasm")))
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{name}.wasm is not in {}: run scripts/build-plugins.sh",
                dir.display()
            )
        })
}

/// Writes a plugins file into a fresh folder; `{name}` placeholders in
/// `file = "{name}"` become the built component's path.
fn plugins_file(toml: &str) -> Result<(tempfile::TempDir, String)> {
    let dir = tempfile::tempdir()?;
    let mut text = toml.to_string();
    for name in [
        "default-policy",
        "command-guard",
        "audit",
        "loop-hook",
        "trap-hook",
        "membomb-hook",
        "badconfig-policy",
        "wrong-world",
        "garbage-policy",
        "rewrite-hook",
    ] {
        let placeholder = format!("{{{name}}}");
        if text.contains(&placeholder) {
            text = text.replace(&placeholder, &plugin(name)?.display().to_string());
        }
    }
    let path = dir.path().join("plugins.toml");
    std::fs::write(&path, text)?;
    let path = path.display().to_string();
    Ok((dir, path))
}

async fn host_with(toml: &str) -> Result<(tempfile::TempDir, Host)> {
    let (dir, path) = plugins_file(toml)?;
    let host = Host::start_with_env(&[("PLUGINS_CONFIG", &path)]).await?;
    Ok((dir, host))
}

#[tokio::test(flavor = "multi_thread")]
async fn command_guard_denies_rewrites_and_audit_logs() -> Result<()> {
    let (_dir, host) = host_with(
        r#"
        [[plugin]]
        name = "guard"
        kind = "hook"
        file = "{command-guard}"
        [plugin.config]
        deny = ["*touch /root/denied*", "shutdown*"]
        rewrite = ["pip install * => echo pip is disabled here: {0}"]

        [[plugin]]
        name = "audit"
        kind = "hook"
        file = "{audit}"
        order = 10
        "#,
    )
    .await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "g").await?;

    let denied = host
        .post(
            "/vms/g/run",
            Some(&key),
            json!({"command": "touch /root/denied"}),
        )
        .await?;
    assert_error(&denied, 403, "denied_by_hook");
    assert!(
        denied.1.to_string().contains("touch /root/denied"),
        "the reason names the pattern: {}",
        denied.1
    );
    let r = host.run(&key, "g", "test -e /root/denied").await?;
    assert_eq!(
        r.exit_code,
        Some(1),
        "a denied command never runs: {}",
        r.brief()
    );

    let rewritten = host.run_ok(&key, "g", "pip install requests").await?;
    assert_eq!(rewritten, "pip is disabled here: pip install requests\n");

    assert_eq!(host.run_ok(&key, "g", "echo allowed").await?, "allowed\n");
    // The audit hook runs after the response; give it a moment.
    let mut audited = false;
    for _ in 0..50 {
        let log = host.log();
        if log.contains("plugin=audit") && log.contains("echo allowed") {
            audited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        audited,
        "the audit hook logged the command:\n{}",
        host.log_tail(40)
    );
    assert!(
        host.log().contains("command rewritten by hook"),
        "the rewrite is logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewrite_is_what_runs() -> Result<()> {
    let (_dir, host) = host_with(
        r#"
        [[plugin]]
        name = "rewriter"
        kind = "hook"
        file = "{rewrite-hook}"
        "#,
    )
    .await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "w").await?;
    assert_eq!(
        host.run_ok(&key, "w", "echo hi").await?,
        "rewritten: echo hi\n"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn default_policy_caps_and_rejects() -> Result<()> {
    let (_dir, host) = host_with(
        r#"
        [[plugin]]
        name = "policy"
        kind = "policy"
        file = "{default-policy}"
        [plugin.config]
        "cap.docker" = 1
        "#,
    )
    .await?;
    let key = host.admin_key().await?;
    let first = host.create_vm_named(&key, "p1").await?;
    assert_eq!(
        first["runtime"], "docker",
        "the policy's choice is the sandbox's runtime: {first}"
    );
    let capped = host.post("/vms", Some(&key), json!({"name": "p2"})).await?;
    assert_error(&capped, 403, "rejected_by_policy");
    let asked = host
        .post(
            "/vms",
            Some(&key),
            json!({"name": "p3", "runtime": "firecracker"}),
        )
        .await?;
    assert_error(&asked, 403, "rejected_by_policy");
    host.delete(&key, "p1").await?;
    let second = host.create_vm_named(&key, "p2").await?;
    assert_eq!(second["runtime"], "docker");
    Ok(())
}

/// A faulty hook costs its call: closed denies, open skips; the host serves on.
#[tokio::test(flavor = "multi_thread")]
async fn faulty_hooks_cost_one_call() -> Result<()> {
    // The trapping hook runs first and is skipped (open); the looping one
    // then times out and denies (closed).
    let (_dir, host) = host_with(
        r#"
        [[plugin]]
        name = "trapper"
        kind = "hook"
        file = "{trap-hook}"
        failure = "open"

        [[plugin]]
        name = "looper"
        kind = "hook"
        file = "{loop-hook}"
        timeout_ms = 50
        order = 1
        "#,
    )
    .await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "f").await?;
    for _ in 0..3 {
        let resp = host
            .post("/vms/f/run", Some(&key), json!({"command": "echo x"}))
            .await?;
        assert_error(&resp, 403, "denied_by_hook");
        let body = resp.1.to_string();
        assert!(
            body.contains("looper") && body.contains("timed out"),
            "{body}"
        );
    }
    assert!(
        host.log().contains("hook failed; skipped"),
        "the open failure is logged"
    );
    assert_eq!(host.get("/health", None).await?.0, 200);
    drop(host);

    for (entry, culprit, expected) in [
        (
            "name = \"bomb\"\nfile = \"{membomb-hook}\"\nmemory_limit_mib = 16\ntimeout_ms = 5000",
            "bomb",
            "memory",
        ),
        (
            "name = \"trapper\"\nfile = \"{trap-hook}\"",
            "trapper",
            "trapped",
        ),
    ] {
        let (_dir, host) = host_with(&format!("[[plugin]]\nkind = \"hook\"\n{entry}\n")).await?;
        let key = host.admin_key().await?;
        host.create_vm_named(&key, "m").await?;
        let resp = host
            .post("/vms/m/run", Some(&key), json!({"command": "echo x"}))
            .await?;
        assert_error(&resp, 403, "denied_by_hook");
        let body = resp.1.to_string();
        assert!(body.contains(culprit) && body.contains(expected), "{body}");
        assert_eq!(host.get("/health", None).await?.0, 200);
    }

    // Open: a failing hook is skipped and the command runs. With the stdio
    // grant, what the plugin printed (its panic message) reaches the host's
    // log under its name; without it, it goes nowhere.
    let (_dir, host) = host_with(
        "[[plugin]]\nname = \"trapper\"\nkind = \"hook\"\nfile = \"{trap-hook}\"\nfailure = \"open\"\n\
         [plugin.grants]\nstdio = true\n",
    )
    .await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "o").await?;
    assert_eq!(host.run_ok(&key, "o", "echo ran").await?, "ran\n");
    let log = host.log();
    assert!(
        log.lines().any(|l| l.contains("plugin=trapper")
            && l.contains("stream=stderr")
            && l.contains("deliberate panic")),
        "the plugin's stderr is in the host log under its name:\n{}",
        host.log_tail(20)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_policy_answers_follow_the_failure_mode() -> Result<()> {
    let (_dir, host) = host_with(
        r#"
        [[plugin]]
        name = "garbage"
        kind = "policy"
        file = "{garbage-policy}"
        "#,
    )
    .await?;
    let key = host.admin_key().await?;
    let resp = host.post("/vms", Some(&key), json!({"name": "g"})).await?;
    assert_error(&resp, 403, "rejected_by_policy");
    assert!(resp.1.to_string().contains("not a candidate"), "{}", resp.1);
    drop(host);

    let (_dir2, host) = host_with(
        r#"
        [[plugin]]
        name = "garbage"
        kind = "policy"
        file = "{garbage-policy}"
        failure = "open"
        "#,
    )
    .await?;
    let key = host.admin_key().await?;
    let vm = host.create_vm_named(&key, "g").await?;
    assert_eq!(
        vm["runtime"], "docker",
        "open: skipped, SANDBOX_RUNTIME decides"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_plugins_stop_start_up_naming_themselves() -> Result<()> {
    let cases = [
        ("kind = \"policy\"\nfile = \"{badconfig-policy}\"", "rejected its configuration"),
        ("kind = \"hook\"\nfile = \"{wrong-world}\"", "does not implement world"),
        ("kind = \"policy\"\nfile = \"{command-guard}\"", "does not implement world"),
        ("kind = \"hook\"\nfile = \"/no/such/plugin.wasm\"", "cannot read"),
        (
            "kind = \"hook\"\nfile = \"{audit}\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"",
            "sha256",
        ),
    ];
    for (entry, expected) in cases {
        let (_dir, path) = plugins_file(&format!("[[plugin]]\nname = \"culprit\"\n{entry}\n"))?;
        let (status, output) = Host::try_start_expect_failure(&[("PLUGINS_CONFIG", &path)]).await?;
        assert!(!status.success(), "{entry}: the host must refuse to start");
        assert!(
            output.contains("culprit"),
            "{entry}: the plugin is named: {output}"
        );
        assert!(
            output.contains(expected),
            "{entry}: expected {expected:?} in: {output}"
        );
    }
    Ok(())
}

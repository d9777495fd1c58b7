//! Snapshot export to and import from S3 (a real S3-compatible server on
//! 127.0.0.1, see `S3Server`): round trips, incremental exports, corrupt and
//! foreign objects, a host killed mid-export, and a second host importing.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use opensandbox_e2e::{
    assert_error, assert_status, btrfs_path, json, plugin_wasm, test_runtime, Host, HostOptions,
    S3Kind, S3Server, Value,
};

const PREFIX: &str = "e2e/";

async fn s3_host(s3: &S3Server) -> Result<Host> {
    Host::start_with(HostOptions {
        bin: None,
        env: s3.host_env(PREFIX),
    })
    .await
}

async fn export(host: &Host, key: &str, vm: &str, snapshot: &str) -> Result<Value> {
    let resp = host
        .post(
            &format!("/vms/{vm}/snapshots/{snapshot}/export"),
            Some(key),
            json!({}),
        )
        .await?;
    assert_status(&resp, 202);
    assert_eq!(resp.1["kind"], "export", "{}", resp.1);
    Ok(resp.1)
}

async fn import(host: &Host, key: &str, object_key: &str, name: &str) -> Result<Value> {
    let resp = host
        .post(
            "/snapshots/import",
            Some(key),
            json!({"key": object_key, "name": name}),
        )
        .await?;
    assert_status(&resp, 202);
    Ok(resp.1)
}

/// Polls `GET /jobs/{id}` until the job has ended.
async fn wait_job(host: &Host, key: &str, job: &Value) -> Result<Value> {
    let id = job["id"].as_str().context("job id")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, body) = host.get(&format!("/jobs/{id}"), Some(key)).await?;
        if status.as_u16() != 200 {
            bail!("GET /jobs/{id}: {status} {body}");
        }
        match body["state"].as_str() {
            Some("succeeded" | "failed") => return Ok(body),
            Some("queued" | "running") => {}
            other => bail!("unexpected job state {other:?}: {body}"),
        }
        if Instant::now() > deadline {
            bail!("job {id} did not end within 300 s: {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `GET /jobs/{id}` until `ready` holds for the job's view, which it
/// returns; fails as soon as the job is anything but queued or running (it
/// ended too soon), or after `timeout`.
async fn wait_job_until(
    host: &Host,
    key: &str,
    job: &Value,
    timeout: Duration,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let id = job["id"].as_str().context("job id")?;
    let deadline = Instant::now() + timeout;
    loop {
        let (_, body) = host.get(&format!("/jobs/{id}"), Some(key)).await?;
        if ready(&body) {
            return Ok(body);
        }
        if !matches!(body["state"].as_str(), Some("queued" | "running")) {
            bail!("job {id} ended too soon: {body}");
        }
        if Instant::now() > deadline {
            bail!("job {id} did not get there within {timeout:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn export_ok(host: &Host, key: &str, vm: &str, snapshot: &str) -> Result<Value> {
    let job = export(host, key, vm, snapshot).await?;
    let done = wait_job(host, key, &job).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    Ok(done)
}

async fn import_ok(host: &Host, key: &str, object_key: &str, name: &str) -> Result<Value> {
    let job = import(host, key, object_key, name).await?;
    let done = wait_job(host, key, &job).await?;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", host.log_tail(30));
    Ok(done)
}

/// SHA-256 of every file under /data, with names, sorted.
async fn data_sums(host: &Host, key: &str, vm: &str) -> Result<String> {
    host.run_ok(
        key,
        vm,
        "cd /data && find . -type f -exec sha256sum {} + | sort && find . | sort | xargs ls -ld --time-style=+ | awk '{print $1, $NF}'",
    )
    .await
}

fn staging_entries(host: &Host) -> Result<usize> {
    let dir = btrfs_path()
        .join("opensandbox/hosts")
        .join(host.host_id()?)
        .join("staging");
    Ok(std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn without_s3_the_transfer_endpoints_answer_503() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    let resp = host
        .post("/vms/a/snapshots/initial/export", Some(&key), json!({}))
        .await?;
    assert_error(&resp, 503, "s3_not_configured");
    let message = resp.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("S3_BUCKET"), "{message}");
    let resp = host
        .post(
            "/snapshots/import",
            Some(&key),
            json!({"key": "x", "name": "b"}),
        )
        .await?;
    assert_error(&resp, 503, "s3_not_configured");
    let resp = host
        .get("/jobs/00000000-0000-0000-0000-000000000000", Some(&key))
        .await?;
    assert_error(&resp, 404, "job_not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_restores_files_exactly_on_this_and_another_host() -> Result<()> {
    let s3 = S3Server::start().await?;
    let host = s3_host(&s3).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "src").await?;
    host.run_ok(
        &key,
        "src",
        "mkdir -p /data/sub && head -c 3000000 /dev/urandom > /data/random.bin && \
         echo hello > /data/sub/hello.txt && chmod 600 /data/sub/hello.txt && \
         ln -s sub/hello.txt /data/link && : > /data/empty",
    )
    .await?;
    let want = data_sums(&host, &key, "src").await?;
    host.snapshot(&key, "src", "s1").await?;

    let done = export_ok(&host, &key, "src", "s1").await?;
    let object_key = done["object_key"]
        .as_str()
        .context("object_key")?
        .to_string();
    assert!(object_key.starts_with(PREFIX), "{done}");
    assert!(done["bytes_done"].as_u64().unwrap_or(0) > 0, "{done}");
    let keys = s3.keys(PREFIX).await?;
    assert_eq!(keys.len(), 2, "a stream and its manifest: {keys:?}");
    let manifest: Value = serde_json::from_slice(&s3.get(&object_key).await?)?;
    assert_eq!(manifest["format"], "opensandbox-snapshot", "{manifest}");
    assert_eq!(manifest["snapshot"], "s1");
    assert_eq!(manifest["runtime"], test_runtime().as_str());
    assert!(manifest["parent"].is_null(), "{manifest}");
    assert_eq!(manifest["chain"].as_array().map(Vec::len), Some(1));

    // Jobs are private to their key.
    let other = host.create_key().await?;
    let id = done["id"].as_str().unwrap_or_default();
    assert_error(
        &host.get(&format!("/jobs/{id}"), Some(&other)).await?,
        404,
        "job_not_found",
    );

    // Import as a new sandbox of the caller on the same host.
    let imported = import_ok(&host, &key, &object_key, "copy").await?;
    assert!(imported["sandbox_id"].is_string(), "{imported}");
    assert_eq!(data_sums(&host, &key, "copy").await?, want);
    let vm = host.get_vm(&key, "copy").await?;
    assert_eq!(vm["state"], "running", "{vm}");
    let mut snaps = host.snapshots(&key, "copy").await?;
    snaps.sort();
    assert_eq!(snaps, vec!["initial", "s1"]);
    // The copy is a full sandbox: it can change and restore.
    host.run_ok(&key, "copy", "rm -rf /data").await?;
    host.restore(&key, "copy", "s1").await?;
    assert_eq!(data_sums(&host, &key, "copy").await?, want);
    assert_eq!(staging_entries(&host)?, 0);

    // A taken name is refused at once.
    let resp = host
        .post(
            "/snapshots/import",
            Some(&key),
            json!({"key": object_key, "name": "copy"}),
        )
        .await?;
    assert_error(&resp, 409, "vm_exists");

    // A second host process with its own DATA_DIR (so its own host id).
    let second = s3_host(&s3).await?;
    assert_ne!(second.host_id()?, host.host_id()?);
    let key2 = second.admin_key().await?;
    import_ok(&second, &key2, &object_key, "elsewhere").await?;
    assert_eq!(data_sums(&second, &key2, "elsewhere").await?, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_export_sends_only_the_difference() -> Result<()> {
    let s3 = S3Server::start().await?;
    let host = s3_host(&s3).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    host.run_ok(
        &key,
        "a",
        "mkdir -p /data && head -c 16000000 /dev/urandom > /data/big",
    )
    .await?;
    host.snapshot(&key, "a", "s1").await?;
    let full = export_ok(&host, &key, "a", "s1").await?;

    host.run_ok(&key, "a", "head -c 1048576 /dev/urandom > /data/small")
        .await?;
    host.snapshot(&key, "a", "s2").await?;
    let want = data_sums(&host, &key, "a").await?;
    let incr = export_ok(&host, &key, "a", "s2").await?;

    let full_size = full["bytes_total"].as_u64().context("full size")?;
    let incr_size = incr["bytes_total"].as_u64().context("incremental size")?;
    println!("full export {full_size} bytes, incremental after 1 MiB {incr_size} bytes");
    assert!(
        incr_size * 10 < full_size,
        "incremental {incr_size} is not a small fraction of full {full_size}"
    );
    assert!(
        incr_size > 1_000_000,
        "the 1 MiB must be in it: {incr_size}"
    );
    let manifest: Value = serde_json::from_slice(
        &s3.get(incr["object_key"].as_str().unwrap_or_default())
            .await?,
    )?;
    assert_eq!(manifest["parent"], full["object_key"], "{manifest}");
    let chain = manifest["chain"].as_array().context("chain")?;
    assert_eq!(chain.len(), 2, "{manifest}");
    assert_eq!(chain[1]["parent_snapshot"], "s1");

    // The import receives the chain in order.
    let object_key = incr["object_key"].as_str().unwrap_or_default();
    import_ok(&host, &key, object_key, "b").await?;
    assert_eq!(data_sums(&host, &key, "b").await?, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_truncated_and_foreign_objects_are_rejected_leaving_nothing() -> Result<()> {
    let s3 = S3Server::start().await?;
    let host = s3_host(&s3).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    host.run_ok(&key, "a", "mkdir -p /data && echo x > /data/x")
        .await?;
    let done = export_ok(&host, &key, "a", "initial").await?;
    let object_key = done["object_key"]
        .as_str()
        .context("object_key")?
        .to_string();
    let manifest: Value = serde_json::from_slice(&s3.get(&object_key).await?)?;
    let stream_key = manifest["stream"]["key"].as_str().context("stream key")?;
    let original = s3.get(stream_key).await?;

    let expect_failure = |name: &'static str, code: &'static str| {
        let host = &host;
        let key = &key;
        let object_key = object_key.clone();
        async move {
            let job = import(host, key, &object_key, name).await?;
            let done = wait_job(host, key, &job).await?;
            assert_eq!(done["state"], "failed", "{done}");
            assert_eq!(done["error"]["code"], code, "{done}");
            let vms = host.list_vms(key).await?;
            assert!(
                vms.iter().all(|v| v["name"] != name),
                "{name} must not exist: {vms:?}"
            );
            assert_eq!(staging_entries(host)?, 0, "staging must be empty");
            Ok::<Value, anyhow::Error>(done)
        }
    };

    // Bytes flipped in the middle, same size.
    let mut corrupt = original.clone();
    let mid = corrupt.len() / 2;
    let end = mid + 64.min(corrupt.len() - mid);
    for b in &mut corrupt[mid..end] {
        *b ^= 0x5a;
    }
    s3.put(stream_key, corrupt).await?;
    expect_failure("c1", "corrupt_object").await?;

    // Truncated.
    s3.put(stream_key, original[..original.len() / 2].to_vec())
        .await?;
    expect_failure("c2", "corrupt_object").await?;

    // The intact object still imports.
    s3.put(stream_key, original).await?;
    import_ok(&host, &key, &object_key, "ok").await?;

    // Not our manifest at all, and no object.
    s3.put("e2e/foreign.manifest.json", b"{\"hello\": 1}".to_vec())
        .await?;
    let job = import(&host, &key, "e2e/foreign.manifest.json", "f").await?;
    let failed = wait_job(&host, &key, &job).await?;
    assert_eq!(failed["error"]["code"], "foreign_object", "{failed}");
    let job = import(&host, &key, "e2e/nothing-here", "g").await?;
    let failed = wait_job(&host, &key, &job).await?;
    assert_eq!(failed["error"]["code"], "object_not_found", "{failed}");
    let names: Vec<Value> = host
        .list_vms(&key)
        .await?
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("a"), json!("ok")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn export_interrupted_by_a_killed_host_leaves_no_object() -> Result<()> {
    let s3 = S3Server::start().await?;
    let mut host = s3_host(&s3).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    host.run_ok(
        &key,
        "a",
        "mkdir -p /data && head -c 400000000 /dev/urandom > /data/big",
    )
    .await?;
    host.snapshot(&key, "a", "s1").await?;
    let job = export(&host, &key, "a", "s1").await?;
    let id = job["id"].as_str().context("id")?.to_string();
    // Kill it once the upload is under way.
    wait_job_until(&host, &key, &job, Duration::from_secs(120), |body| {
        body["state"] == "running" && body["bytes_done"].as_u64().unwrap_or(0) > 0
    })
    .await?;
    // Held where it is (the server stopped), so it cannot finish before the kill.
    s3.pause()?;
    host.kill()?;
    s3.resume()?;
    assert_eq!(s3.keys(PREFIX).await?, Vec::<String>::new());
    assert_eq!(s3.uploads().await?.len(), 1, "one upload in progress");

    host.restart().await?;
    let (_, body) = host.get(&format!("/jobs/{id}"), Some(&key)).await?;
    assert_eq!(body["state"], "failed", "{body}");
    assert_eq!(body["error"]["code"], "interrupted", "{body}");
    assert_eq!(
        s3.uploads().await?,
        Vec::<String>::new(),
        "aborted at start-up"
    );
    assert_eq!(s3.keys(PREFIX).await?, Vec::<String>::new());

    // The next export works.
    export_ok(&host, &key, "a", "initial").await?;
    assert_eq!(s3.keys(PREFIX).await?.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_export_pins_its_snapshots_without_blocking_the_sandbox() -> Result<()> {
    let s3 = S3Server::start().await?;
    let host = s3_host(&s3).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    host.run_ok(&key, "a", "mkdir -p /data && echo one > /data/f")
        .await?;
    host.snapshot(&key, "a", "s1").await?;
    export_ok(&host, &key, "a", "s1").await?;
    host.run_ok(&key, "a", "echo two > /data/f").await?;
    host.snapshot(&key, "a", "s2").await?;
    host.snapshot(&key, "a", "spare").await?;

    // A stopped server holds the export (incremental: s2 with base s1) in its first request.
    s3.pause()?;
    let job = export(&host, &key, "a", "s2").await?;
    let id = job["id"].as_str().context("id")?.to_string();
    wait_job_until(&host, &key, &job, Duration::from_secs(60), |body| {
        body["state"] == "running"
    })
    .await?;
    // The job pins its snapshots right after it turns running; give it ample time.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The sandbox is not blocked by the export: it runs, snapshots and restores at once.
    let lifecycle = async {
        host.run_ok(&key, "a", "echo three > /data/f").await?;
        host.snapshot(&key, "a", "s3").await?;
        host.restore(&key, "a", "spare").await?;
        host.delete_snapshot(&key, "a", "spare").await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), lifecycle)
        .await
        .context("the sandbox's lifecycle waited for the export")??;
    // Neither snapshot it reads, nor the sandbox, can go while it runs.
    for path in ["/vms/a/snapshots/s2", "/vms/a/snapshots/s1", "/vms/a"] {
        let resp = host.delete_req(path, Some(&key)).await?;
        assert_error(&resp, 409, "snapshot_busy");
    }
    let (_, body) = host.get(&format!("/jobs/{id}"), Some(&key)).await?;
    assert_eq!(
        body["state"], "running",
        "still held by the stopped server: {body}"
    );

    s3.resume()?;
    let done = wait_job(&host, &key, &job).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    host.delete_snapshot(&key, "a", "s1").await?;
    host.delete(&key, "a").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_pass_the_policy_chain_as_creates_do() -> Result<()> {
    let s3 = S3Server::start().await?;
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins.toml");
    std::fs::write(
        &plugins,
        format!(
            // A generous deadline: this suite runs two hosts' exports at once on
            // two cores, and the policy's 20 ms default was once exceeded by its
            // start-up check (the host then refuses to start); timing is not what
            // this test is about.
            "[[plugin]]\nname = \"policy\"\nkind = \"policy\"\nfile = \"{}\"\n\
             timeout_ms = 2000\n[plugin.config]\n\"cap.docker\" = 1\n",
            plugin_wasm("default-policy").display()
        ),
    )?;
    let mut env = s3.host_env(PREFIX);
    env.push(("PLUGINS_CONFIG".into(), plugins.display().to_string()));
    let host = Host::start_with(HostOptions { bin: None, env }).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    let done = export_ok(&host, &key, "a", "initial").await?;
    let object_key = done["object_key"].as_str().context("object_key")?;

    // The policy's cap (one Docker sandbox) holds for an import as for a create.
    let job = import(&host, &key, object_key, "b").await?;
    let failed = wait_job(&host, &key, &job).await?;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "rejected_by_policy", "{failed}");
    assert_eq!(
        host.list_vms(&key).await?.len(),
        1,
        "nothing left by the refusal"
    );
    assert_eq!(staging_entries(&host)?, 0);

    host.delete(&key, "a").await?;
    import_ok(&host, &key, object_key, "b").await?;
    assert_eq!(host.get_vm(&key, "b").await?["runtime"], "docker");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_fails_the_export_where_signatures_are_checked() -> Result<()> {
    let s3 = S3Server::start().await?;
    if s3.kind() != S3Kind::S3sFs {
        eprintln!("skipped: {} accepts any signature", s3.kind().name());
        return Ok(());
    }
    let mut env = s3.host_env(PREFIX);
    for (name, value) in env.iter_mut() {
        if name == "AWS_SECRET_ACCESS_KEY" {
            *value = "not-the-secret".into();
        }
    }
    let host = Host::start_with(HostOptions { bin: None, env }).await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "a").await?;
    let job = export(&host, &key, "a", "initial").await?;
    let failed = wait_job(&host, &key, &job).await?;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "s3_error", "{failed}");
    assert_eq!(s3.keys(PREFIX).await?, Vec::<String>::new());
    assert_eq!(s3.uploads().await?, Vec::<String>::new());
    Ok(())
}

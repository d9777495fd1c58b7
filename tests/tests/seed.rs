//! The "API Usage" curl sequence of the original service's README must work as written.

use std::process::Stdio;

use anyhow::{bail, Context as _, Result};
use opensandbox_e2e::{on_path, snapshot_names, Host, Value};

#[tokio::test(flavor = "multi_thread")]
async fn readme_sequence_with_reqwest() -> Result<()> {
    let host = Host::start().await?;
    let c = host.client();

    // curl -X POST http://localhost:4000/api-keys
    let r = c.post(host.url("/api-keys")).send().await?;
    let st = r.status();
    let body: Value = r.json().await.context("POST /api-keys body is not JSON")?;
    assert_eq!(st.as_u16(), 201, "POST /api-keys (no key, no body): {body}");
    let key = body["key"].as_str().unwrap_or_default().to_string();
    assert!(
        key.starts_with("osk_"),
        "key should start with osk_: {body}"
    );
    host.track_key(&key);

    // curl -X POST http://localhost:4000/vms -H "x-api-key: YOUR_KEY" -H "Content-Type: application/json" -d '{"name": "my-sandbox"}'
    let r = c
        .post(host.url("/vms"))
        .header("x-api-key", &key)
        .header("Content-Type", "application/json")
        .body(r#"{"name": "my-sandbox"}"#)
        .send()
        .await?;
    let st = r.status();
    let vm: Value = r.json().await.context("POST /vms body is not JSON")?;
    assert_eq!(st.as_u16(), 201, "POST /vms: {vm}");
    assert_eq!(vm["name"], "my-sandbox", "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");

    // curl -X POST http://localhost:4000/vms/my-sandbox/run ... -d '{"command": "echo hello"}'
    let r = c
        .post(host.url("/vms/my-sandbox/run"))
        .header("x-api-key", &key)
        .header("Content-Type", "application/json")
        .body(r#"{"command": "echo hello"}"#)
        .send()
        .await?;
    let st = r.status();
    let run: Value = r.json().await.context("run body is not JSON")?;
    assert_eq!(st.as_u16(), 200, "run: {run}");
    assert_eq!(run["stdout"], "hello\n", "run: {run}");
    assert_eq!(run["exit_code"], 0, "run: {run}");

    // curl http://localhost:4000/vms/my-sandbox/snapshots -H "x-api-key: YOUR_KEY"
    let r = c
        .get(host.url("/vms/my-sandbox/snapshots"))
        .header("x-api-key", &key)
        .send()
        .await?;
    let st = r.status();
    let snaps: Value = r.json().await.context("snapshots body is not JSON")?;
    assert_eq!(st.as_u16(), 200, "snapshots: {snaps}");
    assert!(
        snapshot_names(&snaps).contains(&"initial".to_string()),
        "snapshot list should contain initial: {snaps}"
    );

    // curl -X POST http://localhost:4000/vms/my-sandbox/restore ... -d '{"snapshot": "initial"}'
    let r = c
        .post(host.url("/vms/my-sandbox/restore"))
        .header("x-api-key", &key)
        .header("Content-Type", "application/json")
        .body(r#"{"snapshot": "initial"}"#)
        .send()
        .await?;
    let st = r.status();
    let restored: Value = r.json().await.context("restore body is not JSON")?;
    assert_eq!(st.as_u16(), 200, "restore: {restored}");
    assert_eq!(restored["snapshot"], "initial", "restore: {restored}");
    assert_eq!(restored["vm"]["name"], "my-sandbox", "restore: {restored}");

    // Still usable afterwards.
    let r = host.run(&key, "my-sandbox", "echo hello").await?;
    assert_eq!(r.stdout, "hello\n", "{}", r.brief());

    host.delete(&key, "my-sandbox").await?;
    Ok(())
}

/// Runs curl with the given args plus `-sS -w '\n%{http_code}'`; returns (status, body).
async fn curl(args: &[&str]) -> Result<(u16, Value)> {
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "curl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            text
        );
    }
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let code: u16 = code
        .trim()
        .parse()
        .with_context(|| format!("curl printed no status: {text:?}"))?;
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()))
    };
    Ok((code, body))
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_sequence_with_curl() -> Result<()> {
    if !on_path("curl") {
        eprintln!("curl is not on PATH; skipping the curl variant");
        return Ok(());
    }
    let host = Host::start().await?;
    // As in the README, but on our port.
    let base = format!("http://localhost:{}", host.port());
    let u = |p: &str| format!("{base}{p}");

    let (st, body) = curl(&["-X", "POST", &u("/api-keys")]).await?;
    assert_eq!(st, 201, "curl POST /api-keys: {body}");
    let key = body["key"].as_str().unwrap_or_default().to_string();
    assert!(key.starts_with("osk_"), "{body}");
    host.track_key(&key);
    let hdr = format!("x-api-key: {key}");

    let (st, body) = curl(&[
        "-X",
        "POST",
        &u("/vms"),
        "-H",
        &hdr,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"name": "my-sandbox"}"#,
    ])
    .await?;
    assert_eq!(st, 201, "curl POST /vms: {body}");

    let (st, body) = curl(&[
        "-X",
        "POST",
        &u("/vms/my-sandbox/run"),
        "-H",
        &hdr,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"command": "echo hello"}"#,
    ])
    .await?;
    assert_eq!(st, 200, "curl run: {body}");
    assert_eq!(body["stdout"], "hello\n", "{body}");
    assert_eq!(body["exit_code"], 0, "{body}");

    let (st, body) = curl(&[&u("/vms/my-sandbox/snapshots"), "-H", &hdr]).await?;
    assert_eq!(st, 200, "curl snapshots: {body}");
    assert!(
        snapshot_names(&body).contains(&"initial".to_string()),
        "snapshot list should contain initial: {body}"
    );

    let (st, body) = curl(&[
        "-X",
        "POST",
        &u("/vms/my-sandbox/restore"),
        "-H",
        &hdr,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"snapshot": "initial"}"#,
    ])
    .await?;
    assert_eq!(st, 200, "curl restore: {body}");

    let (st, body) = curl(&["-X", "DELETE", &u("/vms/my-sandbox"), "-H", &hdr]).await?;
    assert_eq!(st, 204, "curl DELETE /vms/my-sandbox: {body}");
    Ok(())
}

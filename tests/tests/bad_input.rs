//! Validation, error shapes, routing, the OpenAPI document, label filters and start-up
//! configuration errors.

use std::time::{Duration, Instant};

use anyhow::Result;
use opensandbox_e2e::{assert_error, assert_status, enc, fs_type, json, Host, Method, Value};

fn bad_names() -> Vec<String> {
    vec![
        "My-VM".into(),
        "-a".into(),
        "a_b".into(),
        "a".repeat(64),
        String::new(),
        "../x".into(),
        "a.b".into(),
        "a b".into(),
        "A".into(),
        "é".into(),
        "a/b".into(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_vm_names() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    for name in bad_names() {
        let resp = host
            .post("/vms", Some(&key), json!({ "name": name }))
            .await?;
        assert!(
            resp.0.as_u16() == 400,
            "name {name:?}: expected 400 invalid_name, got {}: {}",
            resp.0,
            resp.1
        );
        assert_error(&resp, 400, "invalid_name");
    }
    assert!(
        host.list_vms(&key).await?.is_empty(),
        "no vm should have been made"
    );

    // The longest valid name (63 chars) is accepted.
    let longest = format!("a{}", "-9".repeat(31));
    assert_eq!(longest.len(), 63);
    let vm = host.create_vm_named(&key, &longest).await?;
    assert_eq!(vm["name"], longest.as_str(), "{vm}");
    assert_eq!(host.run_ok(&key, &longest, "echo ok").await?, "ok\n");
    host.delete(&key, &longest).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_request_validation() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    host.create_vm_named(&key, "v").await?;

    // Snapshot names follow the same rule.
    for name in bad_names() {
        let resp = host
            .post("/vms/v/snapshots", Some(&key), json!({ "name": name }))
            .await?;
        assert!(
            resp.0.as_u16() == 400,
            "snapshot name {name:?}: expected 400 invalid_name, got {}: {}",
            resp.0,
            resp.1
        );
        assert_error(&resp, 400, "invalid_name");
    }
    assert_eq!(host.snapshots(&key, "v").await?, vec!["initial"]);

    // Duplicate name.
    assert_error(
        &host.post("/vms", Some(&key), json!({"name": "v"})).await?,
        409,
        "vm_exists",
    );

    // Body problems.
    let raw = |ct: Option<&'static str>, body: &'static str| {
        host.req_raw(
            Method::POST,
            "/vms",
            Some(&key),
            ct,
            Some(body.as_bytes().to_vec()),
        )
    };
    assert_error(
        &raw(Some("application/json"), r#"{"name":"#).await?,
        400,
        "malformed_json",
    );
    assert_error(
        &raw(Some("application/json"), "not json").await?,
        400,
        "malformed_json",
    );
    assert_error(
        &raw(None, r#"{"name": "nct"}"#).await?,
        415,
        "unsupported_media_type",
    );
    assert_error(
        &raw(Some("text/plain"), r#"{"name": "nct"}"#).await?,
        415,
        "unsupported_media_type",
    );
    assert_error(
        &raw(Some("application/json"), r#"{"name": 5}"#).await?,
        422,
        "invalid_request",
    );
    assert_error(
        &raw(Some("application/json"), r#"{}"#).await?,
        422,
        "invalid_request",
    );
    assert_error(
        &raw(Some("application/json"), r#"["v"]"#).await?,
        422,
        "invalid_request",
    );
    assert_error(
        &raw(
            Some("application/json"),
            r#"{"name": "w", "env": {"A": 1}}"#,
        )
        .await?,
        422,
        "invalid_request",
    );
    assert_error(
        &host
            .req_raw(
                Method::POST,
                "/vms/v/run",
                Some(&key),
                Some("application/json"),
                Some(b"{\"command\": ".to_vec()),
            )
            .await?,
        400,
        "malformed_json",
    );

    // Run validation.
    let run = |body: Value| host.post("/vms/v/run", Some(&key), body);
    assert_error(&run(json!({"command": ""})).await?, 400, "invalid_request");
    assert_error(
        &run(json!({"command": "true", "timeout_ms": 0})).await?,
        400,
        "invalid_request",
    );
    assert_error(
        &run(json!({"command": "true", "timeout_ms": 3_600_001u64})).await?,
        400,
        "invalid_request",
    );
    assert_error(&run(json!({})).await?, 422, "invalid_request");
    assert_error(&run(json!({"command": 5})).await?, 422, "invalid_request");
    assert_error(
        &host
            .post("/vms/nope/run", Some(&key), json!({"command": "true"}))
            .await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host.get("/vms/nope", Some(&key)).await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host.delete_req("/vms/nope", Some(&key)).await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host
            .post("/vms/v/restore", Some(&key), json!({"snapshot": "nope"}))
            .await?,
        404,
        "snapshot_not_found",
    );

    // The sandbox is fine after all that.
    assert_eq!(host.run_ok(&key, "v", "echo fine").await?, "fine\n");
    let names: Vec<Value> = host
        .list_vms(&key)
        .await?
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("v")], "only v should exist");
    host.delete(&key, "v").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_image_is_rejected_quickly() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    let image = "opensandbox-e2e-no-such-image:does-not-exist";
    let t0 = Instant::now();
    let resp = host
        .post("/vms", Some(&key), json!({"name": "img", "image": image}))
        .await?;
    let took = t0.elapsed();
    assert_error(&resp, 400, "image_unavailable");
    let msg = resp.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(image),
        "the message should name the image: {}",
        resp.1
    );
    assert!(
        took < Duration::from_secs(30),
        "image_unavailable took {took:?}"
    );
    assert!(
        host.list_vms(&key).await?.is_empty(),
        "no vm should have been made"
    );
    assert_error(
        &host.get("/vms/img", Some(&key)).await?,
        404,
        "vm_not_found",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_and_openapi() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;

    let (st, health) = host.get("/health", None).await?;
    assert_eq!(st.as_u16(), 200, "{health}");
    assert_eq!(health, json!({"status": "ok"}));

    assert_error(&host.get("/nope", None).await?, 404, "route_not_found");
    assert_error(
        &host.get("/nope", Some(&key)).await?,
        404,
        "route_not_found",
    );
    assert_error(
        &host.get("/vms/a/b/c/d", Some(&key)).await?,
        404,
        "route_not_found",
    );
    assert_error(
        &host
            .req(Method::PUT, "/vms", Some(&key), Some(json!({})))
            .await?,
        405,
        "method_not_allowed",
    );
    assert_error(
        &host.req(Method::DELETE, "/health", None, None).await?,
        405,
        "method_not_allowed",
    );
    assert_error(
        &host
            .req(Method::GET, "/vms/a/run", Some(&key), None)
            .await?,
        405,
        "method_not_allowed",
    );

    let (st, doc) = host.get("/openapi.json", None).await?;
    assert_eq!(st.as_u16(), 200, "{doc}");
    assert!(
        doc.is_object(),
        "openapi.json should be a JSON object: {doc}"
    );
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')),
        "openapi version 3.x expected: {}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    for p in ["/vms", "/vms/{name}/run", "/api-keys", "/health"] {
        assert!(
            paths.contains_key(p),
            "openapi paths lack {p}: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn label_filter() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    let l1 = host
        .create_vm(
            &key,
            json!({"name": "x1", "labels": {"team": "a", "env": "prod"}}),
        )
        .await?;
    assert_eq!(l1["labels"], json!({"team": "a", "env": "prod"}), "{l1}");
    host.create_vm(&key, json!({"name": "x2", "labels": {"team": "b"}}))
        .await?;
    host.create_vm(&key, json!({"name": "x3", "labels": {"team": "a"}}))
        .await?;

    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["vms"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    };
    let q = |query: String| {
        let key = key.clone();
        let host = &host;
        async move { host.get(&format!("/vms{query}"), Some(&key)).await }
    };

    let (st, all) = q(String::new()).await?;
    assert_eq!(st.as_u16(), 200, "{all}");
    assert_eq!(names(&all), vec!["x1", "x2", "x3"], "{all}");

    let (st, a) = q(format!("?label={}", enc("team=a"))).await?;
    assert_eq!(st.as_u16(), 200, "{a}");
    assert_eq!(names(&a), vec!["x1", "x3"], "label=team=a: {a}");

    let (_, a_raw) = q("?label=team=a".to_string()).await?;
    assert_eq!(
        names(&a_raw),
        vec!["x1", "x3"],
        "unencoded label=team=a: {a_raw}"
    );

    let (_, both) = q(format!(
        "?label={}&label={}",
        enc("team=a"),
        enc("env=prod")
    ))
    .await?;
    assert_eq!(names(&both), vec!["x1"], "all labels must match: {both}");

    let (_, b) = q("?label=team=b".to_string()).await?;
    assert_eq!(names(&b), vec!["x2"], "{b}");

    let (_, none) = q("?label=team=c".to_string()).await?;
    assert_eq!(names(&none), Vec::<String>::new(), "{none}");

    for n in ["x1", "x2", "x3"] {
        host.delete(&key, n).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_runtime_refuses_to_start() -> Result<()> {
    let (status, output) = Host::try_start_expect_failure(&[("SANDBOX_RUNTIME", "bogus")]).await?;
    assert!(
        !status.success(),
        "serve with SANDBOX_RUNTIME=bogus exited {status}; output:\n{output}"
    );
    assert!(
        output.contains("SANDBOX_RUNTIME"),
        "the error should name SANDBOX_RUNTIME; output:\n{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn non_btrfs_storage_path_refuses_to_start() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("opensandbox-e2e-notbtrfs-")
        .tempdir_in("/dev/shm")?;
    let fs = fs_type(dir.path())?;
    assert_ne!(
        fs,
        "btrfs",
        "{} should not be on Btrfs for this test",
        dir.path().display()
    );
    let path = dir.path().display().to_string();
    let (status, output) = Host::try_start_expect_failure(&[("DOCKER_BTRFS_PATH", &path)]).await?;
    assert!(
        !status.success(),
        "serve with DOCKER_BTRFS_PATH={path} ({fs}) exited {status}; output:\n{output}"
    );
    assert!(
        output.contains("DOCKER_BTRFS_PATH"),
        "the error should name DOCKER_BTRFS_PATH; output:\n{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_request_validation() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    let resp = host
        .req_raw(
            Method::POST,
            "/api-keys",
            Some(&key),
            Some("application/json"),
            Some(b"{".to_vec()),
        )
        .await?;
    assert_error(&resp, 400, "malformed_json");
    assert_error(
        &host
            .post("/api-keys", Some(&key), json!({"admin": "yes"}))
            .await?,
        422,
        "invalid_request",
    );
    assert_status(&host.post("/api-keys", Some(&key), json!({})).await?, 201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_is_413() -> Result<()> {
    let host = Host::start().await?;
    let key = host.admin_key().await?;
    // A server that answers before reading a large body closes the connection afterwards;
    // use a connection of its own so that no later request picks it from the pool.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()?;
    let big = "x".repeat(2 * 1024 * 1024);
    let r = client
        .post(host.url("/vms"))
        .header("x-api-key", &key)
        .json(&json!({"name": "big", "labels": {"k": big}}))
        .send()
        .await?;
    let status = r.status();
    let text = r.text().await?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    assert_error(&(status, body), 413, "payload_too_large");
    assert!(
        host.list_vms(&key).await?.is_empty(),
        "no vm should have been made"
    );
    Ok(())
}

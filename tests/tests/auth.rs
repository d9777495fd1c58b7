//! API keys: authentication, admin rights, revocation, per-key isolation, storage.

use anyhow::Result;
use opensandbox_e2e::{
    assert_error, assert_status, contains_bytes, files_under, json, json_strings, Host, Method,
    Value,
};

#[tokio::test(flavor = "multi_thread")]
async fn missing_and_wrong_keys_are_401() -> Result<()> {
    let host = Host::start().await?;

    // Before any key exists the open endpoints work and /vms still needs a key.
    let resp = host.get("/health", None).await?;
    assert_status(&resp, 200);
    assert_error(&host.get("/vms", None).await?, 401, "unauthorized");

    let admin = host.admin_key().await?;
    assert!(
        admin.starts_with("osk_") && admin.len() == 4 + 64,
        "key format osk_<64 hex>: {admin}"
    );
    assert!(
        admin[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "key format osk_<64 hex>: {admin}"
    );

    assert_error(&host.get("/vms", None).await?, 401, "unauthorized");
    let wrong = format!("osk_{}", "0".repeat(64));
    assert_error(&host.get("/vms", Some(&wrong)).await?, 401, "unauthorized");
    assert_error(
        &host.get("/vms", Some("garbage")).await?,
        401,
        "unauthorized",
    );
    // A near miss of the real key.
    let mut near = admin.clone();
    let last = near.pop().unwrap();
    near.push(if last == '0' { '1' } else { '0' });
    assert_error(&host.get("/vms", Some(&near)).await?, 401, "unauthorized");
    assert_error(
        &host
            .post("/vms", Some(&wrong), json!({"name": "x"}))
            .await?,
        401,
        "unauthorized",
    );
    assert_error(&host.get("/vms/x", None).await?, 401, "unauthorized");
    assert_error(
        &host
            .post("/vms/x/run", None, json!({"command": "true"}))
            .await?,
        401,
        "unauthorized",
    );

    // Once a key exists, creating keys needs one.
    assert_error(
        &host.req(Method::POST, "/api-keys", None, None).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &host.post("/api-keys", None, json!({"admin": true})).await?,
        401,
        "unauthorized",
    );
    assert_error(&host.get("/api-keys", None).await?, 401, "unauthorized");
    assert_error(
        &host
            .post("/api-keys", Some(&wrong), json!({"name": "x"}))
            .await?,
        401,
        "unauthorized",
    );

    assert_status(&host.get("/vms", Some(&admin)).await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_and_non_admin_keys() -> Result<()> {
    let host = Host::start().await?;
    let admin = host.admin_key().await?;

    let user_obj = host.create_key_with(json!({"name": "user"})).await?;
    assert_eq!(
        user_obj["admin"], false,
        "keys are not admin unless asked: {user_obj}"
    );
    assert_eq!(user_obj["name"], "user", "{user_obj}");
    let user = user_obj["key"].as_str().unwrap().to_string();
    let user_id = user_obj["id"].as_str().unwrap().to_string();
    assert_ne!(user, admin);

    // Non-admin: 403 on key management, fine on sandboxes.
    assert_error(
        &host.post("/api-keys", Some(&user), json!({})).await?,
        403,
        "forbidden",
    );
    assert_error(
        &host
            .post("/api-keys", Some(&user), json!({"admin": true}))
            .await?,
        403,
        "forbidden",
    );
    assert_error(&host.get("/api-keys", Some(&user)).await?, 403, "forbidden");
    assert_error(
        &host
            .delete_req(&format!("/api-keys/{user_id}"), Some(&user))
            .await?,
        403,
        "forbidden",
    );
    assert_status(&host.get("/vms", Some(&user)).await?, 200);

    // Admin listing: ids, no secrets.
    let admin2_obj = host
        .create_key_with(json!({"name": "second admin", "admin": true}))
        .await?;
    assert_eq!(admin2_obj["admin"], true, "{admin2_obj}");
    let admin2 = admin2_obj["key"].as_str().unwrap().to_string();
    let (st, listing) = host.get("/api-keys", Some(&admin)).await?;
    assert_eq!(st.as_u16(), 200, "{listing}");
    let keys = listing["api_keys"].as_array().cloned().unwrap_or_default();
    assert_eq!(keys.len(), 3, "three keys expected: {listing}");
    let secrets = [&admin, &user, &admin2];
    for s in json_strings(&listing) {
        for secret in secrets {
            assert!(
                !s.contains(secret.as_str()),
                "the listing shows a key's secret: {listing}"
            );
        }
    }
    let raw = listing.to_string();
    for secret in secrets {
        assert!(
            !raw.contains(&secret[4..]),
            "the listing contains a key's hex: {listing}"
        );
    }
    for k in &keys {
        for f in ["id", "admin", "created_at"] {
            assert!(k.get(f).is_some(), "listed key lacks {f}: {k}");
        }
    }
    assert!(
        keys.iter().any(|k| k["id"] == user_id.as_str()),
        "{listing}"
    );

    // Revocation.
    let resp = host
        .delete_req(&format!("/api-keys/{user_id}"), Some(&admin))
        .await?;
    assert_status(&resp, 204);
    assert_error(&host.get("/vms", Some(&user)).await?, 401, "unauthorized");
    let (_, listing) = host.get("/api-keys", Some(&admin)).await?;
    assert!(
        !listing["api_keys"]
            .as_array()
            .is_some_and(|a| a.iter().any(|k| k["id"] == user_id.as_str())),
        "revoked keys are not listed: {listing}"
    );
    let resp = host
        .delete_req(&format!("/api-keys/{user_id}"), Some(&admin))
        .await?;
    assert_error(&resp, 404, "api_key_not_found");
    let resp = host
        .delete_req(&format!("/api-keys/{}", uuid::Uuid::new_v4()), Some(&admin))
        .await?;
    assert_error(&resp, 404, "api_key_not_found");

    // Revoking an admin while another admin remains is fine; the last one is refused.
    let admin_id = keys
        .iter()
        .find(|k| k["admin"] == true && k["id"] != admin2_obj["id"])
        .and_then(|k| k["id"].as_str())
        .map(str::to_string)
        .expect("first admin key in the listing");
    let resp = host
        .delete_req(&format!("/api-keys/{admin_id}"), Some(&admin2))
        .await?;
    assert_status(&resp, 204);
    assert_error(&host.get("/vms", Some(&admin)).await?, 401, "unauthorized");
    let admin2_id = admin2_obj["id"].as_str().unwrap();
    let resp = host
        .delete_req(&format!("/api-keys/{admin2_id}"), Some(&admin2))
        .await?;
    assert_error(&resp, 409, "last_admin_key");
    assert_status(&host.get("/api-keys", Some(&admin2)).await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_see_only_their_own_sandboxes() -> Result<()> {
    let host = Host::start().await?;
    let a = host.admin_key().await?;
    let b = host.create_key().await?;

    let vm_a = host.create_vm_named(&a, "same").await?;
    host.run_ok(&a, "same", "echo mine > /root/owner").await?;

    // Key B cannot see or touch A's sandbox.
    assert_error(&host.get("/vms/same", Some(&b)).await?, 404, "vm_not_found");
    assert_error(
        &host
            .post("/vms/same/run", Some(&b), json!({"command": "echo hi"}))
            .await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host
            .post("/vms/same/snapshots", Some(&b), json!({"name": "x"}))
            .await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host.get("/vms/same/snapshots", Some(&b)).await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host
            .post(
                "/vms/same/restore",
                Some(&b),
                json!({"snapshot": "initial"}),
            )
            .await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host
            .delete_req("/vms/same/snapshots/initial", Some(&b))
            .await?,
        404,
        "vm_not_found",
    );
    assert_error(
        &host.delete_req("/vms/same", Some(&b)).await?,
        404,
        "vm_not_found",
    );
    let listed = host.list_vms(&b).await?;
    assert!(listed.is_empty(), "B should list no vms: {listed:?}");

    // A's sandbox is untouched.
    assert_eq!(host.run_ok(&a, "same", "cat /root/owner").await?, "mine\n");
    assert_eq!(host.snapshots(&a, "same").await?, vec!["initial"]);

    // Both keys may own a sandbox of the same name.
    let vm_b = host.create_vm_named(&b, "same").await?;
    assert_ne!(vm_a["id"], vm_b["id"], "distinct sandboxes: {vm_a} {vm_b}");
    assert_eq!(host.get_vm(&a, "same").await?["id"], vm_a["id"]);
    assert_eq!(host.get_vm(&b, "same").await?["id"], vm_b["id"]);
    let r = host.run(&b, "same", "cat /root/owner").await?;
    assert_ne!(
        r.exit_code,
        Some(0),
        "B's sandbox must not have A's file: {}",
        r.brief()
    );
    let names = |v: &[Value]| -> Vec<String> {
        v.iter()
            .filter_map(|x| x["name"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(names(&host.list_vms(&a).await?), vec!["same"]);
    assert_eq!(names(&host.list_vms(&b).await?), vec!["same"]);

    host.delete(&b, "same").await?;
    assert_eq!(host.run_ok(&a, "same", "cat /root/owner").await?, "mine\n");
    host.delete(&a, "same").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_not_stored_in_clear() -> Result<()> {
    let mut host = Host::start().await?;
    let admin = host.admin_key().await?;
    let user = host.create_key().await?;
    // Use them so that any request logging has seen them.
    assert_status(&host.get("/vms", Some(&admin)).await?, 200);
    assert_status(&host.get("/vms", Some(&user)).await?, 200);
    // Stop the host so that the database is flushed (WAL checkpointed) as well.
    host.stop().await?;

    let files = files_under(host.data_dir());
    assert!(
        !files.is_empty(),
        "the data dir should hold the host's files"
    );
    for f in &files {
        let bytes = std::fs::read(f)?;
        for key in [&admin, &user] {
            assert!(
                !contains_bytes(&bytes, key.as_bytes())
                    && !contains_bytes(&bytes, &key.as_bytes()[4..]),
                "{} contains an API key in clear",
                f.display()
            );
        }
    }

    // Keys still work after a restart (they are stored, only not in clear).
    host.restart().await?;
    assert_status(&host.get("/vms", Some(&admin)).await?, 200);
    assert_status(&host.get("/vms", Some(&user)).await?, 200);
    Ok(())
}

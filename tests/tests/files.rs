//! Files through the in-sandbox agent (docs/API.md, "Files"): streamed upload and
//! download of any size, metadata, directories, moves and removals, and paths that try to
//! leave the sandbox's root.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures_util::StreamExt as _;
use opensandbox_e2e::stream::{hex, sha256_hex};
use opensandbox_e2e::{
    assert_error, assert_status, enc, json, wait_until, Host, Method, Resp, Value,
};
use sha2::{Digest as _, Sha256};

const MIB: usize = 1024 * 1024;

async fn setup(vm: &str) -> Result<(Host, String)> {
    let host = Host::start().await?;
    let key = host.create_key().await?;
    host.create_vm_named(&key, vm).await?;
    Ok((host, key))
}

/// Deterministic pseudo-random bytes (xorshift64*), `len` of them from `seed`.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut g = Gen::new(seed);
    let mut v = vec![0u8; len];
    g.fill(&mut v);
    v
}

struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Self {
        Gen(seed | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

/// `PUT /vms/{vm}/files?path=P&{query}` with a raw body.
async fn put(
    host: &Host,
    key: &str,
    vm: &str,
    path: &str,
    query: &str,
    body: Vec<u8>,
) -> Result<Resp> {
    let mut url = format!("/vms/{vm}/files?path={}", enc(path));
    if !query.is_empty() {
        url.push('&');
        url.push_str(query);
    }
    host.req_raw(
        Method::PUT,
        &url,
        Some(key),
        Some("application/octet-stream"),
        Some(body),
    )
    .await
}

/// `GET /vms/{vm}/files?path=P`: status, headers and the whole body.
async fn download(
    host: &Host,
    key: &str,
    vm: &str,
    path: &str,
) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
    let r = host
        .client()
        .get(host.url(&format!("/vms/{vm}/files?path={}", enc(path))))
        .header("x-api-key", key)
        .send()
        .await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Ok((status, headers, r.bytes().await?.to_vec()))
}

/// The download's bytes, requiring 200.
async fn read(host: &Host, key: &str, vm: &str, path: &str) -> Result<Vec<u8>> {
    let (st, _, body) = download(host, key, vm, path).await?;
    if st != 200 {
        bail!("GET file {path}: {st}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// `GET /vms/{vm}/files?path=P` as a JSON response (for error cases).
async fn get_file(host: &Host, key: &str, vm: &str, path: &str) -> Result<Resp> {
    host.get(&format!("/vms/{vm}/files?path={}", enc(path)), Some(key))
        .await
}

async fn stat(host: &Host, key: &str, vm: &str, path: &str) -> Result<Resp> {
    host.get(
        &format!("/vms/{vm}/files/stat?path={}", enc(path)),
        Some(key),
    )
    .await
}

async fn list(host: &Host, key: &str, vm: &str, path: &str) -> Result<Resp> {
    host.get(
        &format!("/vms/{vm}/files/list?path={}", enc(path)),
        Some(key),
    )
    .await
}

fn names(list: &Value) -> Vec<String> {
    let mut n: Vec<String> = list["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

async fn remove(host: &Host, key: &str, vm: &str, path: &str, recursive: bool) -> Result<Resp> {
    host.delete_req(
        &format!("/vms/{vm}/files?path={}&recursive={recursive}", enc(path)),
        Some(key),
    )
    .await
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

// 1 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn binary_round_trip_with_metadata() -> Result<()> {
    let (host, key) = setup("f").await?;
    let data = pseudo_random(42, 10 * MIB);
    let resp = put(
        &host,
        &key,
        "f",
        "/data/blob.bin",
        "mode=0640&uid=1000&gid=1000",
        data.clone(),
    )
    .await?;
    assert_status(&resp, 201);
    let v = &resp.1;
    assert_eq!(
        (
            v["type"].as_str(),
            v["size"].as_u64(),
            v["mode"].as_str(),
            v["uid"].as_u64(),
            v["gid"].as_u64()
        ),
        (
            Some("file"),
            Some(data.len() as u64),
            Some("0640"),
            Some(1000),
            Some(1000)
        ),
        "{v}"
    );
    assert_eq!(v["path"], "/data/blob.bin", "{v}");
    assert_eq!(v["name"], "blob.bin", "{v}");

    let (st, h, body) = download(&host, &key, "f", "/data/blob.bin").await?;
    assert_eq!(st, 200);
    assert!(
        body == data,
        "downloaded bytes differ ({} bytes)",
        body.len()
    );
    assert_eq!(header(&h, "x-file-size"), data.len().to_string());
    assert_eq!(header(&h, "x-file-mode"), "0640");
    assert_eq!(header(&h, "x-file-uid"), "1000");
    assert_eq!(header(&h, "x-file-gid"), "1000");

    let s = stat(&host, &key, "f", "/data/blob.bin").await?;
    assert_status(&s, 200);
    assert_eq!(
        (
            s.1["size"].as_u64(),
            s.1["mode"].as_str(),
            s.1["uid"].as_u64(),
            s.1["gid"].as_u64()
        ),
        (
            Some(data.len() as u64),
            Some("0640"),
            Some(1000),
            Some(1000)
        ),
        "{}",
        s.1
    );
    assert!(s.1["modified_at"].is_string(), "{}", s.1);
    let inside = host
        .run_ok(
            &key,
            "f",
            "sha256sum /data/blob.bin; stat -c '%a %u %g' /data/blob.bin",
        )
        .await?;
    assert_eq!(
        inside,
        format!("{}  /data/blob.bin\n640 1000 1000\n", sha256_hex(&data)),
        "seen from inside"
    );

    // A file written inside is read back as written; defaults are 0644 root.
    host.run_ok(&key, "f", "printf 'a\\0b' > /tmp/nul && chmod 600 /tmp/nul")
        .await?;
    let (st, h, body) = download(&host, &key, "f", "/tmp/nul").await?;
    assert_eq!((st, body.as_slice()), (200, &b"a\0b"[..]));
    assert_eq!(header(&h, "x-file-mode"), "0600");
    let resp = put(&host, &key, "f", "/tmp/plain", "", b"x".to_vec()).await?;
    assert_status(&resp, 201);
    assert_eq!(
        (resp.1["mode"].as_str(), resp.1["uid"].as_u64()),
        (Some("0644"), Some(0)),
        "{}",
        resp.1
    );
    // Empty file.
    assert_status(
        &put(&host, &key, "f", "/tmp/empty", "", Vec::new()).await?,
        201,
    );
    assert_eq!(read(&host, &key, "f", "/tmp/empty").await?, b"");
    // overwrite=false on an existing file.
    let resp = put(
        &host,
        &key,
        "f",
        "/tmp/plain",
        "overwrite=false",
        b"y".to_vec(),
    )
    .await?;
    assert_error(&resp, 409, "path_exists");
    assert_eq!(read(&host, &key, "f", "/tmp/plain").await?, b"x");
    // parents=false without the parent.
    let resp = put(
        &host,
        &key,
        "f",
        "/no/such/dir/f",
        "parents=false",
        b"y".to_vec(),
    )
    .await?;
    assert_error(&resp, 404, "path_not_found");
    // A bad mode.
    let resp = put(&host, &key, "f", "/tmp/m", "mode=999", b"y".to_vec()).await?;
    assert_error(&resp, 400, "invalid_request");
    Ok(())
}

// 2 -------------------------------------------------------------------------

/// 1 GiB, streamed both ways; never held in memory.
const LARGE: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread")]
async fn a_gibibyte_streamed_both_ways() -> Result<()> {
    let (host, key) = setup("f").await?;
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let h2 = hasher.clone();
    let chunks = (LARGE as usize).div_ceil(MIB);
    let mut gen = Gen::new(7);
    let body = futures_util::stream::iter(0..chunks).map(move |i| {
        let len = (LARGE as usize - i * MIB).min(MIB);
        let mut buf = vec![0u8; len];
        gen.fill(&mut buf);
        h2.lock().unwrap().update(&buf);
        Ok::<_, std::io::Error>(bytes::Bytes::from(buf))
    });
    let t0 = Instant::now();
    let r = host
        .client()
        .put(host.url("/vms/f/files?path=%2Fbig%2Ffile.bin"))
        .header("x-api-key", &key)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    let status = r.status();
    let view: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status.as_u16(), 201, "{view}");
    assert_eq!(view["size"].as_u64(), Some(LARGE), "{view}");
    let sent = hex(&hasher.lock().unwrap().clone().finalize());
    eprintln!("uploaded {LARGE} bytes in {:?}", t0.elapsed());

    let t1 = Instant::now();
    let r = host
        .client()
        .get(host.url("/vms/f/files?path=%2Fbig%2Ffile.bin"))
        .header("x-api-key", &key)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(r.headers(), "x-file-size"), LARGE.to_string());
    let mut stream = r.bytes_stream();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("download stream")?;
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    eprintln!("downloaded {n} bytes in {:?}", t1.elapsed());
    assert_eq!(n, LARGE);
    assert_eq!(hex(&h.finalize()), sent, "sha256 of the download");
    let inside = host
        .run_with(
            &key,
            "f",
            json!({"command": "sha256sum /big/file.bin", "timeout_ms": 300000}),
        )
        .await?;
    assert_eq!(
        inside.stdout.split_whitespace().next(),
        Some(sent.as_str()),
        "{}",
        inside.brief()
    );
    Ok(())
}

// 3 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn directories_moves_and_removals() -> Result<()> {
    let (host, key) = setup("f").await?;
    let resp = host
        .post("/vms/f/files/mkdir", Some(&key), json!({"path": "/a/b/c"}))
        .await?;
    assert_status(&resp, 201);
    assert_eq!(resp.1["type"], "dir", "{}", resp.1);
    // mkdir -p of an existing directory is fine.
    assert_status(
        &host
            .post("/vms/f/files/mkdir", Some(&key), json!({"path": "/a/b/c"}))
            .await?,
        201,
    );
    let resp = host
        .post(
            "/vms/f/files/mkdir",
            Some(&key),
            json!({"path": "/a/m", "mode": "0700", "uid": 1000, "gid": 1000}),
        )
        .await?;
    assert_status(&resp, 201);
    assert_eq!(
        (resp.1["mode"].as_str(), resp.1["uid"].as_u64()),
        (Some("0700"), Some(1000)),
        "{}",
        resp.1
    );

    let l = list(&host, &key, "f", "/a/b").await?;
    assert_status(&l, 200);
    let entries = l.1["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 1, "{}", l.1);
    assert_eq!(
        (entries[0]["name"].as_str(), entries[0]["type"].as_str()),
        (Some("c"), Some("dir")),
        "{}",
        l.1
    );

    assert_status(
        &put(&host, &key, "f", "/a/b/c/one", "", b"1".to_vec()).await?,
        201,
    );
    assert_status(
        &put(&host, &key, "f", "/a/two", "", b"2".to_vec()).await?,
        201,
    );
    host.run_ok(&key, "f", "ln -s /a/two /a/link").await?;
    let s = stat(&host, &key, "f", "/a/link").await?;
    assert_status(&s, 200);
    assert_eq!(
        (s.1["type"].as_str(), s.1["symlink_target"].as_str()),
        (Some("symlink"), Some("/a/two")),
        "{}",
        s.1
    );
    assert_eq!(
        names(&list(&host, &key, "f", "/a").await?.1),
        ["b", "link", "m", "two"]
    );

    // Move without overwrite onto an existing file: 409, nothing changes.
    let resp = host
        .post(
            "/vms/f/files/move",
            Some(&key),
            json!({"from": "/a/b/c/one", "to": "/a/two"}),
        )
        .await?;
    assert_error(&resp, 409, "path_exists");
    assert_eq!(read(&host, &key, "f", "/a/two").await?, b"2");
    let resp = host
        .post(
            "/vms/f/files/move",
            Some(&key),
            json!({"from": "/a/b/c/one", "to": "/a/two", "overwrite": true}),
        )
        .await?;
    assert_status(&resp, 200);
    assert_eq!(read(&host, &key, "f", "/a/two").await?, b"1");
    assert_error(
        &stat(&host, &key, "f", "/a/b/c/one").await?,
        404,
        "path_not_found",
    );
    let resp = host
        .post(
            "/vms/f/files/move",
            Some(&key),
            json!({"from": "/a/two", "to": "/a/b/three"}),
        )
        .await?;
    assert_status(&resp, 200);
    assert_eq!(resp.1["path"], "/a/b/three", "{}", resp.1);
    let resp = host
        .post(
            "/vms/f/files/move",
            Some(&key),
            json!({"from": "/a/nothing", "to": "/a/x"}),
        )
        .await?;
    assert_error(&resp, 404, "path_not_found");

    // Removal: a non-empty directory needs recursive.
    let resp = remove(&host, &key, "f", "/a/b", false).await?;
    assert!(
        resp.0.is_client_error(),
        "non-recursive removal of a non-empty dir: {} {}",
        resp.0,
        resp.1
    );
    assert_status(&stat(&host, &key, "f", "/a/b/three").await?, 200);
    assert_status(&remove(&host, &key, "f", "/a/b", true).await?, 204);
    assert_error(
        &stat(&host, &key, "f", "/a/b").await?,
        404,
        "path_not_found",
    );
    assert_status(&remove(&host, &key, "f", "/a/m", false).await?, 204); // empty dir
                                                                         // Removing the symlink removes the link, not its target.
    assert_status(
        &put(&host, &key, "f", "/a/target", "", b"t".to_vec()).await?,
        201,
    );
    host.run_ok(&key, "f", "ln -sf /a/target /a/link").await?;
    assert_status(&remove(&host, &key, "f", "/a/link", false).await?, 204);
    assert_eq!(read(&host, &key, "f", "/a/target").await?, b"t");
    assert_error(
        &remove(&host, &key, "f", "/a/nothing", false).await?,
        404,
        "path_not_found",
    );

    // Errors.
    assert_error(
        &get_file(&host, &key, "f", "/no/such/file").await?,
        404,
        "path_not_found",
    );
    assert_error(
        &stat(&host, &key, "f", "/no/such/file").await?,
        404,
        "path_not_found",
    );
    assert_error(
        &list(&host, &key, "f", "/no/such/dir").await?,
        404,
        "path_not_found",
    );
    assert_error(
        &get_file(&host, &key, "f", "etc/hostname").await?,
        400,
        "invalid_request",
    );
    assert_error(
        &stat(&host, &key, "f", "relative").await?,
        400,
        "invalid_request",
    );
    assert_error(
        &put(&host, &key, "f", "rel/x", "", b"x".to_vec()).await?,
        400,
        "invalid_request",
    );
    assert_error(
        &get_file(&host, &key, "f", "/tmp/a\0b").await?,
        400,
        "invalid_request",
    );
    // A directory where a file is needed.
    assert_error(
        &get_file(&host, &key, "f", "/a").await?,
        400,
        "invalid_request",
    );
    // Another key's view: the sandbox does not exist.
    let other = host.create_key().await?;
    assert_error(
        &get_file(&host, &other, "f", "/a/target").await?,
        404,
        "vm_not_found",
    );
    Ok(())
}

// 4 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn paths_cannot_leave_the_sandbox() -> Result<()> {
    let (host, key) = setup("esc").await?;
    let sandbox_hostname = host.run_ok(&key, "esc", "cat /etc/hostname").await?;
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();

    for path in [
        "/../../etc/hostname",
        "/etc/../../../etc/hostname",
        "/./etc//hostname",
    ] {
        let body = read(&host, &key, "esc", path).await?;
        assert_eq!(String::from_utf8_lossy(&body), sandbox_hostname, "{path}");
    }
    if host_hostname != sandbox_hostname {
        assert_ne!(
            String::from_utf8_lossy(&read(&host, &key, "esc", "/../../etc/hostname").await?),
            host_hostname
        );
    }

    // Symlinks made inside resolve inside.
    let data_dir = host.data_dir().display().to_string();
    host.run_ok(
        &key,
        "esc",
        &format!(
            "ln -s / /tmp/root && ln -s ../../../../../etc/shadow /tmp/s && ln -s {data_dir} /tmp/d"
        ),
    )
    .await?;
    let via_root = read(&host, &key, "esc", "/tmp/root/etc/hostname").await?;
    assert_eq!(String::from_utf8_lossy(&via_root), sandbox_hostname);
    let shadow_inside = host.run_ok(&key, "esc", "cat /etc/shadow").await?;
    let via_s = read(&host, &key, "esc", "/tmp/s").await?;
    assert_eq!(String::from_utf8_lossy(&via_s), shadow_inside);
    if let Ok(host_shadow) = std::fs::read_to_string("/etc/shadow") {
        if host_shadow != shadow_inside {
            assert_ne!(String::from_utf8_lossy(&via_s), host_shadow);
        }
    }
    // The host's data dir does not exist inside the sandbox.
    assert_error(
        &get_file(&host, &key, "esc", "/tmp/d/host-id").await?,
        404,
        "path_not_found",
    );
    assert_error(
        &get_file(&host, &key, "esc", &format!("{data_dir}/host-id")).await?,
        404,
        "path_not_found",
    );
    assert_error(
        &list(&host, &key, "esc", "/tmp/d").await?,
        404,
        "path_not_found",
    );
    // Writes through a symlink land inside too.
    let marker = format!("opensandbox-escape-{}", uuid::Uuid::new_v4().simple());
    let resp = put(
        &host,
        &key,
        "esc",
        &format!("/tmp/root/tmp/../../etc/{marker}"),
        "",
        b"in".to_vec(),
    )
    .await?;
    assert_status(&resp, 201);
    assert_eq!(
        host.run_ok(&key, "esc", &format!("cat /etc/{marker}"))
            .await?,
        "in"
    );
    assert!(
        !std::path::Path::new(&format!("/etc/{marker}")).exists(),
        "written on the host!"
    );
    let resp = put(
        &host,
        &key,
        "esc",
        &format!("/tmp/d/{marker}"),
        "",
        b"in".to_vec(),
    )
    .await?;
    assert!(
        !host.data_dir().join(&marker).exists(),
        "an upload through a symlink reached the host's data dir: {} {}",
        resp.0,
        resp.1
    );

    // The agent's own folder is refused, directly or through a symlink.
    assert_error(
        &get_file(&host, &key, "esc", "/.opensandbox/agent").await?,
        403,
        "path_refused",
    );
    assert_error(
        &stat(&host, &key, "esc", "/.opensandbox").await?,
        403,
        "path_refused",
    );
    assert_error(
        &list(&host, &key, "esc", "/.opensandbox/run").await?,
        403,
        "path_refused",
    );
    assert_error(
        &put(&host, &key, "esc", "/.opensandbox/run/x", "", b"x".to_vec()).await?,
        403,
        "path_refused",
    );
    assert_error(
        &put(
            &host,
            &key,
            "esc",
            "/tmp/../.opensandbox/run/x",
            "",
            b"x".to_vec(),
        )
        .await?,
        403,
        "path_refused",
    );
    assert_error(
        &remove(&host, &key, "esc", "/.opensandbox", true).await?,
        403,
        "path_refused",
    );
    let resp = host
        .post("/vms/esc/files/move", Some(&key), json!({"from": "/etc/hostname", "to": "/.opensandbox/run/agent.sock", "overwrite": true}))
        .await?;
    assert_error(&resp, 403, "path_refused");

    // Replacing the agent's socket from inside must not point the host elsewhere.
    let docker_sock = opensandbox_e2e::docker_host()
        .trim_start_matches("unix://")
        .to_string();
    let r = host
        .run(
            &key,
            "esc",
            &format!("rm -f /.opensandbox/run/agent.sock; ln -s {docker_sock} /.opensandbox/run/agent.sock; echo done"),
        )
        .await?;
    eprintln!("socket replacement from inside: {}", r.brief());
    for _ in 0..3 {
        let vm = host.get("/vms/esc", Some(&key)).await?;
        assert_status(&vm, 200);
        eprintln!("agent after the socket swap: {}", vm.1["agent"]);
        let resp = host
            .post("/vms/esc/run", Some(&key), json!({"command": "echo still"}))
            .await?;
        assert!(
            resp.0.as_u16() == 200
                || (resp.0.as_u16() == 503 && resp.1["error"]["code"] == "agent_unavailable"),
            "after the socket swap: {} {}",
            resp.0,
            resp.1
        );
        let resp = get_file(&host, &key, "esc", "/etc/hostname").await?;
        assert!(
            resp.0.as_u16() == 200
                || (resp.0.as_u16() == 503 && resp.1["error"]["code"] == "agent_unavailable"),
            "after the socket swap: {} {}",
            resp.0,
            resp.1
        );
    }
    let health = host.get("/health", None).await?;
    assert_status(&health, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_loop_is_a_client_error() -> Result<()> {
    let (host, key) = setup("f").await?;
    host.run_ok(
        &key,
        "f",
        "ln -s /tmp/loop2 /tmp/loop1 && ln -s /tmp/loop1 /tmp/loop2",
    )
    .await?;
    for resp in [
        get_file(&host, &key, "f", "/tmp/loop1").await?,
        list(&host, &key, "f", "/tmp/loop1/x").await?,
        put(&host, &key, "f", "/tmp/loop1/x", "", b"x".to_vec()).await?,
    ] {
        assert!(
            resp.0.is_client_error(),
            "symlink loop: {} {}",
            resp.0,
            resp.1
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_into_the_agent_folder_are_refused() -> Result<()> {
    let (host, key) = setup("f").await?;
    host.run_ok(&key, "f", "ln -s /.opensandbox /tmp/os")
        .await?;
    let resp = get_file(&host, &key, "f", "/tmp/os/agent").await?;
    let get_status = resp.0;
    let resp = list(&host, &key, "f", "/tmp/os/run").await?;
    let list_status = resp.0;
    let resp = put(&host, &key, "f", "/tmp/os/run/x", "", b"x".to_vec()).await?;
    let put_status = resp.0;
    let id = host.get_vm(&key, "f").await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let on_host = host.data_dir().join("agents").join(&id).join("x");
    assert!(
        !get_status.is_success() && !list_status.is_success() && !put_status.is_success(),
        "through /tmp/os -> /.opensandbox: download {get_status}, list {list_status}, \
         upload {put_status} (file on the host at {}: {})",
        on_host.display(),
        on_host.exists()
    );
    Ok(())
}

// 5 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_upload_leaves_nothing() -> Result<()> {
    let (host, key) = setup("f").await?;
    assert_status(
        &host
            .post("/vms/f/files/mkdir", Some(&key), json!({"path": "/up"}))
            .await?,
        201,
    );
    let sent = Arc::new(Mutex::new(0usize));
    let sent2 = sent.clone();
    let body = futures_util::stream::iter(0..4).then(move |i| {
        let sent = sent2.clone();
        async move {
            if i < 2 {
                *sent.lock().unwrap() += MIB / 2;
                Ok(bytes::Bytes::from(vec![1u8; MIB / 2]))
            } else {
                // Give the host time to start writing before the body breaks.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Err(std::io::Error::other("client gave up"))
            }
        }
    });
    let r = host
        .client()
        .put(host.url("/vms/f/files?path=%2Fup%2Fbroken.bin"))
        .header("x-api-key", &key)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    match &r {
        Ok(resp) => assert!(
            !resp.status().is_success(),
            "a broken upload succeeded: {}",
            resp.status()
        ),
        Err(e) => eprintln!("broken upload: {e}"),
    }
    assert_eq!(
        *sent.lock().unwrap(),
        MIB,
        "1 MiB was sent before the error"
    );

    // Nothing appears, not even a temporary file (give the host a moment to clean up).
    let empty = wait_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || async {
            let l = list(&host, &key, "f", "/up").await?;
            let inside = host.run_ok(&key, "f", "ls -A /up").await?;
            Ok(l.0.as_u16() == 200 && names(&l.1).is_empty() && inside.is_empty())
        },
    )
    .await?;
    let l = list(&host, &key, "f", "/up").await?;
    let inside = host.run_ok(&key, "f", "ls -lA /up").await?;
    assert!(empty, "/up after a broken upload: {} / ls: {inside}", l.1);
    assert_error(
        &stat(&host, &key, "f", "/up/broken.bin").await?,
        404,
        "path_not_found",
    );

    // A file that existed is untouched by a broken replacement.
    assert_status(
        &put(&host, &key, "f", "/up/keep.bin", "", b"original".to_vec()).await?,
        201,
    );
    let body = futures_util::stream::iter(0..2).then(|i| async move {
        if i == 0 {
            Ok(bytes::Bytes::from(vec![2u8; MIB]))
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Err(std::io::Error::other("client gave up"))
        }
    });
    let _ = host
        .client()
        .put(host.url("/vms/f/files?path=%2Fup%2Fkeep.bin"))
        .header("x-api-key", &key)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    let ok = wait_until(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || async {
            let l = list(&host, &key, "f", "/up").await?;
            Ok(names(&l.1) == ["keep.bin"])
        },
    )
    .await?;
    assert!(
        ok,
        "only keep.bin in /up: {}",
        list(&host, &key, "f", "/up").await?.1
    );
    assert_eq!(read(&host, &key, "f", "/up/keep.bin").await?, b"original");
    Ok(())
}

/// A trailing slash makes the kernel follow a final symlink even for lstat:
/// removing `/tmp/l/` where `/tmp/l -> /` must remove the link, not the root.
#[tokio::test(flavor = "multi_thread")]
async fn a_trailing_slash_never_removes_through_a_symlink() -> Result<()> {
    let (host, key) = setup("f").await?;
    host.run_ok(&key, "f", "ln -s / /tmp/l && ln -s /etc /tmp/e")
        .await?;
    for path in ["%2Ftmp%2Fl%2F", "%2Ftmp%2Fe%2F.%2F"] {
        let resp = host
            .delete_req(
                &format!("/vms/f/files?path={path}&recursive=true"),
                Some(&key),
            )
            .await?;
        assert_status(&resp, 204);
    }
    assert_eq!(
        host.run_ok(
            &key,
            "f",
            "test -e /etc/passwd && test ! -e /tmp/l && test ! -e /tmp/e && echo intact"
        )
        .await?,
        "intact\n"
    );
    Ok(())
}

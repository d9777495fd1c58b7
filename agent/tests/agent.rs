//! Drives the real agent binary over its Unix socket with the generated
//! client, as the host does. The agent runs as a normal (non-PID-1) process
//! on this machine, so file tests stay under temp folders.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use opensandbox_agent_proto::v1::{
    agent_client::AgentClient, exit, file_chunk, process_event, write_file_request, AttachRequest,
    Exit, FileType, InfoRequest, MakeDirRequest, MoveRequest, PathRequest, ProcessEvent,
    ProcessRef, ProcessSpec, Pty, ReadFileRequest, RemoveRequest, ResizeRequest, RunRequest,
    SignalRequest, StdinRequest, Stream, WriteFileRequest, WriteHeader,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

type Client = AgentClient<Channel>;

/// The agent under test: this build's, or another (e.g. the static musl
/// build of scripts/build-agent.sh) named by OPENSANDBOX_TEST_AGENT_BIN.
fn agent_bin() -> PathBuf {
    std::env::var_os("OPENSANDBOX_TEST_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_opensandbox-agent")))
}

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(extra: &[&str]) -> Agent {
        Self::start_with(Command::new(agent_bin()), extra)
    }

    fn start_with(mut cmd: Command, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .spawn()
            .expect("start agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        connect(self.socket.clone()).await
    }
}

async fn connect(path: PathBuf) -> Client {
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect");
    AgentClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn spec(argv: &[&str]) -> ProcessSpec {
    ProcessSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn code(c: i32) -> Option<Exit> {
    Some(Exit {
        how: Some(exit::How::Code(c)),
    })
}

fn signal(s: i32) -> Option<Exit> {
    Some(Exit {
        how: Some(exit::How::Signal(s)),
    })
}

/// Everything a stream of process events said.
#[derive(Default, Debug)]
struct Events {
    started: Option<u32>,
    data: Vec<u8>,
    stderr: Vec<u8>,
    lost: Vec<(u64, u64)>,
    exit: Option<Exit>,
    timed_out: bool,
    end_offset: Option<u64>,
    first_offset: Option<u64>,
}

async fn collect(mut s: tonic::Streaming<ProcessEvent>) -> Events {
    let mut ev = Events::default();
    let mut next_offset: Option<u64> = None;
    while let Some(msg) = s.message().await.expect("stream") {
        match msg.event.expect("event") {
            process_event::Event::Started(st) => ev.started = Some(st.pid),
            process_event::Event::Output(o) => {
                if let Some(n) = next_offset {
                    assert_eq!(o.offset, n, "offsets must be contiguous");
                }
                ev.first_offset.get_or_insert(o.offset);
                next_offset = Some(o.offset + o.data.len() as u64);
                ev.data.extend_from_slice(&o.data);
                if o.stream == Stream::Stderr as i32 {
                    ev.stderr.extend_from_slice(&o.data);
                }
            }
            process_event::Event::Lost(l) => {
                ev.lost.push((l.from_offset, l.to_offset));
                next_offset = Some(l.to_offset);
            }
            process_event::Event::Exited(x) => {
                ev.exit = x.exit;
                ev.timed_out = x.timed_out;
                ev.end_offset = Some(x.end_offset);
            }
        }
    }
    ev
}

async fn run(c: &mut Client, s: ProcessSpec) -> opensandbox_agent_proto::v1::RunResponse {
    c.run(RunRequest {
        spec: Some(s),
        output_limit: 1 << 20,
    })
    .await
    .expect("run")
    .into_inner()
}

#[tokio::test]
async fn info_and_run() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let info = c.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.protocol_major, 1);
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));

    let r = run(&mut c, spec(&["/bin/sh", "-c", "echo hello"])).await;
    assert_eq!(r.exit, code(0));
    assert_eq!(&r.stdout[..], b"hello\n");
    assert!(!r.timed_out);

    // PATH lookup, stderr, exit code, env and cwd.
    let mut s = spec(&["sh", "-c", "echo $FOO; pwd; echo oops >&2; exit 3"]);
    s.env.insert("FOO".into(), "bar".into());
    s.cwd = "/tmp".into();
    let r = run(&mut c, s).await;
    assert_eq!(r.exit, code(3));
    assert_eq!(&r.stdout[..], b"bar\n/tmp\n");
    assert_eq!(&r.stderr[..], b"oops\n");

    // Output limit.
    let r = c
        .run(RunRequest {
            spec: Some(spec(&["head", "-c", "100000", "/dev/zero"])),
            output_limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated);
    assert_eq!(r.exit, code(0));

    // Round trip timing (printed, not asserted: the machine is shared).
    let t = Instant::now();
    let mut inside = 0;
    for _ in 0..50 {
        inside += run(&mut c, spec(&["/bin/sh", "-c", "echo hello"]))
            .await
            .duration_us;
    }
    eprintln!(
        "Run echo hello: {:?} per call, {} us inside the agent",
        t.elapsed() / 50,
        inside / 50
    );

    // Errors before the fork.
    let e = c
        .run(RunRequest {
            spec: Some(spec(&["no-such-command-xyz"])),
            output_limit: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no such command"), "{}", e.message());
    let mut s = spec(&["true"]);
    s.cwd = "/no/such/dir".into();
    let e = c.start(s).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let mut s = spec(&["true"]);
    s.user = "no-such-user-xyz".into();
    let e = c.start(s).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c.start(spec(&[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.start(spec(&["/etc/passwd"])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Named user from /etc/passwd, with its HOME and USER.
    let mut s = spec(&["sh", "-c", "id -un; echo $USER $HOME"]);
    s.user = "nobody".into();
    let r = run(&mut c, s).await;
    assert_eq!(r.exit, code(0), "{:?}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("nobody\nnobody /"), "{out:?}");

    // Numeric user.
    let mut s = spec(&["id", "-u"]);
    s.user = "4242:4343".into();
    let r = run(&mut c, s).await;
    assert_eq!(&r.stdout[..], b"4242\n");
}

#[tokio::test]
async fn run_timeout() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let mut s = spec(&["sh", "-c", "echo before; sleep 10"]);
    s.timeout_ms = 200;
    let t = Instant::now();
    let r = run(&mut c, s).await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(r.timed_out);
    assert_eq!(r.exit, signal(9));
    assert_eq!(&r.stdout[..], b"before\n");
}

#[tokio::test]
async fn exec_streams_everything_in_order() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let s = c
        .exec(spec(&["head", "-c", "50000000", "/dev/zero"]))
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert!(ev.started.is_some());
    assert_eq!(ev.data.len(), 50_000_000);
    assert!(ev.data.iter().all(|&b| b == 0));
    assert!(ev.lost.is_empty());
    assert_eq!(ev.exit, code(0));
    assert_eq!(ev.end_offset, Some(50_000_000));

    // Mixed streams share one offset sequence (checked by `collect`); their
    // relative order is whatever order the agent read the two pipes in.
    let s = c
        .exec(spec(&["sh", "-c", "echo a; echo b >&2; echo c"]))
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert_eq!(ev.stderr, b"b\n");
    assert_eq!(ev.data.len(), 6);
    assert_eq!(ev.end_offset, Some(6));
}

#[tokio::test]
async fn stdin_attach_signal_and_replay() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;

    let mut s = spec(&["cat"]);
    s.stdin = true;
    s.tag = "the cat".into();
    let info = c.start(s).await.unwrap().into_inner();
    assert!(info.running && info.stdin_open);
    let pid = info.pid;
    let attach = c
        .attach(AttachRequest {
            pid,
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    c.write_stdin(StdinRequest {
        pid,
        data: Bytes::from_static(b"hello "),
        close: false,
    })
    .await
    .unwrap();
    c.write_stdin(StdinRequest {
        pid,
        data: Bytes::from_static(b"world"),
        close: true,
    })
    .await
    .unwrap();
    let ev = collect(attach).await;
    assert_eq!(ev.data, b"hello world");
    assert_eq!(ev.exit, code(0));
    let e = c
        .write_stdin(StdinRequest {
            pid,
            data: Bytes::new(),
            close: false,
        })
        .await
        .unwrap_err();
    assert!(matches!(e.code(), Code::FailedPrecondition), "{e:?}");

    // Replay from 0 twice gives the same bytes; from the middle, the tail.
    for _ in 0..2 {
        let s = c
            .attach(AttachRequest {
                pid,
                from_offset: 0,
                follow: true,
            })
            .await
            .unwrap()
            .into_inner();
        let ev = collect(s).await;
        assert_eq!(ev.data, b"hello world");
        assert_eq!(ev.exit, code(0));
    }
    let s = c
        .attach(AttachRequest {
            pid,
            from_offset: 6,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert_eq!(ev.data, b"world");
    assert_eq!(ev.first_offset, Some(6));
    let info = c
        .get_process(ProcessRef { pid })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.running);
    assert_eq!(info.tag, "the cat");
    assert_eq!(info.output_end, 11);

    // Signal.
    let info = c.start(spec(&["sleep", "30"])).await.unwrap().into_inner();
    c.signal(SignalRequest {
        pid: info.pid,
        signal: 15,
    })
    .await
    .unwrap();
    let s = c
        .attach(AttachRequest {
            pid: info.pid,
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert_eq!(ev.exit, signal(15));
    let e = c
        .signal(SignalRequest {
            pid: info.pid,
            signal: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Unknown pid.
    for e in [
        c.get_process(ProcessRef { pid: 999_999_999 })
            .await
            .unwrap_err(),
        c.signal(SignalRequest {
            pid: 999_999_999,
            signal: 15,
        })
        .await
        .unwrap_err(),
        c.attach(AttachRequest {
            pid: 999_999_999,
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound);
    }
    let list = c
        .list_processes(opensandbox_agent_proto::v1::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.processes.iter().any(|p| p.pid == pid));
}

#[tokio::test]
async fn start_timeout_is_recorded() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let mut s = spec(&["sleep", "30"]);
    s.timeout_ms = 100;
    let info = c.start(s).await.unwrap().into_inner();
    let s = c
        .attach(AttachRequest {
            pid: info.pid,
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert!(ev.timed_out);
    assert_eq!(ev.exit, signal(9));
}

#[tokio::test]
async fn lost_when_buffer_overflowed_without_reader() {
    let agent = Agent::start(&["--output-buffer", "65536"]);
    let mut c = agent.client().await;
    let info = c
        .start(spec(&["head", "-c", "1000000", "/dev/zero"]))
        .await
        .unwrap()
        .into_inner();
    // Nobody reads: the process must not stall.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i = c
            .get_process(ProcessRef { pid: info.pid })
            .await
            .unwrap()
            .into_inner();
        if !i.running {
            assert_eq!(i.output_end, 1_000_000);
            assert_eq!(i.output_start, 1_000_000 - 65536);
            break;
        }
        assert!(Instant::now() < deadline, "detached process stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = c
        .attach(AttachRequest {
            pid: info.pid,
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert_eq!(ev.lost, vec![(0, 1_000_000 - 65536)]);
    assert_eq!(ev.data.len(), 65536);
    assert_eq!(ev.end_offset, Some(1_000_000));

    // With a reader attached the buffer never drops: a 1 MB Exec through a
    // 64 KiB buffer arrives whole.
    let s = c
        .exec(spec(&["head", "-c", "1000000", "/dev/urandom"]))
        .await
        .unwrap()
        .into_inner();
    let ev = collect(s).await;
    assert!(ev.lost.is_empty());
    assert_eq!(ev.data.len(), 1_000_000);
}

#[tokio::test]
async fn pty() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let mut s = spec(&["sh", "-c", "tty; echo TERM=$TERM"]);
    s.pty = Some(Pty {
        cols: 100,
        rows: 30,
    });
    let ev = collect(c.exec(s).await.unwrap().into_inner()).await;
    let out = String::from_utf8_lossy(&ev.data);
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("TERM=xterm-256color"), "{out:?}");
    assert_eq!(ev.exit, code(0));

    // Run on a terminal: its output comes back as stdout.
    let mut s = spec(&["sh", "-c", "stty size"]);
    s.pty = Some(Pty { cols: 90, rows: 20 });
    let r = run(&mut c, s).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "20 90");

    // Resize, then `stty size` (read when told to, via stdin).
    let mut s = spec(&["sh", "-c", "read x; stty size"]);
    s.pty = Some(Pty { cols: 80, rows: 24 });
    let info = c.start(s).await.unwrap().into_inner();
    assert!(info.pty);
    c.resize(ResizeRequest {
        pid: info.pid,
        cols: 132,
        rows: 43,
    })
    .await
    .unwrap();
    c.write_stdin(StdinRequest {
        pid: info.pid,
        data: Bytes::from_static(b"go\n"),
        close: false,
    })
    .await
    .unwrap();
    let ev = collect(
        c.attach(AttachRequest {
            pid: info.pid,
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    let out = String::from_utf8_lossy(&ev.data);
    assert!(out.contains("43 132"), "{out:?}");

    // Resize of a non-terminal process.
    let info = c.start(spec(&["sleep", "5"])).await.unwrap().into_inner();
    let e = c
        .resize(ResizeRequest {
            pid: info.pid,
            cols: 1,
            rows: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.signal(SignalRequest {
        pid: info.pid,
        signal: 9,
    })
    .await
    .unwrap();
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn upload(
    c: &mut Client,
    header: WriteHeader,
    data: &[u8],
) -> Result<opensandbox_agent_proto::v1::FileInfo, tonic::Status> {
    let mut msgs = vec![WriteFileRequest {
        part: Some(write_file_request::Part::Header(header)),
    }];
    for chunk in data.chunks(1 << 20) {
        msgs.push(WriteFileRequest {
            part: Some(write_file_request::Part::Data(Bytes::copy_from_slice(
                chunk,
            ))),
        });
    }
    c.write_file(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn download(c: &mut Client, path: &Path) -> Result<Vec<u8>, tonic::Status> {
    let mut s = c
        .read_file(ReadFileRequest {
            path: path.to_string_lossy().into(),
        })
        .await?
        .into_inner();
    let first = s.message().await?.expect("info");
    assert!(matches!(first.chunk, Some(file_chunk::Chunk::Info(_))));
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        match m.chunk {
            Some(file_chunk::Chunk::Data(d)) => out.extend_from_slice(&d),
            other => panic!("unexpected {other:?}"),
        }
    }
    Ok(out)
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn files() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Upload 20 MiB, read it back.
    let data = pseudo_random(20 << 20);
    let target = d.join("sub/dir/file.bin");
    let info = upload(
        &mut c,
        WriteHeader {
            path: p(&target),
            mode: 0o640,
            uid: Some(1234),
            gid: Some(5678),
            make_parents: true,
            overwrite: false,
        },
        &data,
    )
    .await
    .unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.mode, 0o640);
    assert_eq!((info.uid, info.gid), (1234, 5678));
    assert_eq!(info.r#type, FileType::File as i32);
    assert_eq!(info.name, "file.bin");
    assert!(download(&mut c, &target).await.unwrap() == data);
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1);

    // Overwrite refused, then allowed.
    let h = |overwrite| WriteHeader {
        path: p(&target),
        overwrite,
        ..Default::default()
    };
    let e = upload(&mut c, h(false), b"x").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let info = upload(&mut c, h(true), b"small").await.unwrap();
    assert_eq!((info.size, info.mode), (5, 0o644));

    // Header must come first.
    let e = c
        .write_file(tokio_stream::iter(vec![WriteFileRequest {
            part: Some(write_file_request::Part::Data(Bytes::from_static(b"x"))),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A second header aborts an upload: nothing appears.
    let aborted = d.join("aborted.bin");
    let hdr = || WriteFileRequest {
        part: Some(write_file_request::Part::Header(WriteHeader {
            path: p(&aborted),
            ..Default::default()
        })),
    };
    let data = WriteFileRequest {
        part: Some(write_file_request::Part::Data(Bytes::from_static(b"abc"))),
    };
    let e = c
        .write_file(tokio_stream::iter(vec![hdr(), data, hdr()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(!aborted.exists());

    // Reading a directory.
    let e = download(&mut c, d).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // mkdir -p, list, stat of a symlink.
    let deep = d.join("a/b/c");
    let info = c
        .make_dir(MakeDirRequest {
            path: p(&deep),
            mode: 0o700,
            uid: None,
            gid: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.r#type, info.mode), (FileType::Dir as i32, 0o700));
    c.make_dir(MakeDirRequest {
        path: p(&deep),
        ..Default::default()
    })
    .await
    .unwrap();
    std::os::unix::fs::symlink("a/b", d.join("link")).unwrap();
    std::fs::write(d.join("zz.txt"), "z").unwrap();
    let list = c
        .list_dir(PathRequest { path: p(d) })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["a", "link", "sub", "zz.txt"]);
    assert_eq!(list.entries[1].path, p(&d.join("link")));
    assert_eq!(list.entries[1].r#type, FileType::Symlink as i32);
    assert_eq!(list.entries[1].symlink_target, "a/b");
    let st = c
        .stat(PathRequest {
            path: p(&d.join("link")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.r#type, FileType::Symlink as i32);

    // Move with and without overwrite.
    let mv = |from: &Path, to: &Path, overwrite| MoveRequest {
        from: p(from),
        to: p(to),
        overwrite,
    };
    std::fs::write(d.join("m1"), "one").unwrap();
    std::fs::write(d.join("m2"), "two").unwrap();
    let e = c
        .r#move(mv(&d.join("m1"), &d.join("m2"), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    c.r#move(mv(&d.join("m1"), &d.join("m2"), true))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(d.join("m2")).unwrap(), "one");
    let info = c
        .r#move(mv(&d.join("m2"), &d.join("m3"), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "m3");

    // Remove: a non-empty dir needs recursive; the symlink's target survives.
    let e = c
        .remove(RemoveRequest {
            path: p(&d.join("a")),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    c.remove(RemoveRequest {
        path: p(&d.join("link")),
        recursive: true,
    })
    .await
    .unwrap();
    assert!(deep.exists());
    c.remove(RemoveRequest {
        path: p(&d.join("a")),
        recursive: true,
    })
    .await
    .unwrap();
    assert!(!d.join("a").exists());
    let e = c
        .stat(PathRequest {
            path: p(&d.join("a")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Bad paths.
    for (path, want) in [
        ("relative/path", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        ("/.opensandbox/run", Code::PermissionDenied),
    ] {
        let e = c.stat(PathRequest { path: path.into() }).await.unwrap_err();
        assert_eq!(e.code(), want, "{path}");
    }
}

#[tokio::test]
async fn broken_upload_leaves_nothing() {
    let agent = Agent::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("partial.bin");
    // The upload runs on its own runtime, dropped mid-stream: its connection
    // closes without the stream's end, as when a host dies. (Aborting a call
    // is not enough: the client keeps piping the body in the background.)
    let socket = agent.socket.clone();
    let path = p(&target);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, _call) = rt.block_on(async move {
            let mut c = connect(socket).await;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let call = tokio::spawn(async move {
                c.write_file(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            tx.send(WriteFileRequest {
                part: Some(write_file_request::Part::Header(WriteHeader {
                    path,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            tx.send(WriteFileRequest {
                part: Some(write_file_request::Part::Data(Bytes::from(vec![
                    1u8;
                    100_000
                ]))),
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            (tx, call)
        });
        drop(rt);
        drop(tx);
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The agent is fine.
    let mut c = agent.client().await;
    c.info(InfoRequest {}).await.unwrap();
}

#[tokio::test]
async fn many_concurrent_runs_on_one_connection() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = run(&mut c, spec(&["sh", "-c", &format!("echo {i}")])).await;
            assert_eq!(r.exit, code(0));
            assert_eq!(r.stdout, format!("{i}\n").into_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c;
    let info = c.info(InfoRequest {}).await.unwrap().into_inner();
    // Run processes are not kept.
    assert_eq!(info.processes, 0);
}

#[tokio::test]
async fn sigterm_is_forwarded_then_the_agent_exits() {
    let mut agent = Agent::start(&[]);
    let mut c = agent.client().await;
    c.start(spec(&["sleep", "30"])).await.unwrap();
    // SAFETY: kill with integer arguments.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(8), "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    // Well under the 5 s grace: the sleep got the SIGTERM and died.
    assert!(t.elapsed() < Duration::from_secs(3));
}

/// As init (PID 1 of a new pid namespace, as in a container): orphans are
/// reaped. Skipped where `unshare` cannot make a pid namespace.
#[tokio::test]
async fn as_pid1_reaps_orphans() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: unshare --pid is not available");
        return;
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(agent_bin());
    let agent = Agent::start_with(cmd, &[]);
    let mut c = agent.client().await;
    let info = c.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.pid, 1);

    // The shell exits at once, orphaning two sleeps that keep its stdout:
    // Run must not wait for them, and they must not stay zombies.
    let t = Instant::now();
    let r = run(&mut c, spec(&["sh", "-c", "sleep 1 & sleep 1.5 & echo $$"])).await;
    assert_eq!(r.exit, code(0));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let r = run(
        &mut c,
        spec(&[
            "sh",
            "-c",
            "for f in /proc/[0-9]*/stat; do cat $f; echo; done",
        ]),
    )
    .await;
    let stats = String::from_utf8_lossy(&r.stdout);
    let zombies: Vec<_> = stats.lines().filter(|l| l.contains(") Z ")).collect();
    assert!(zombies.is_empty(), "{zombies:?}");
    assert!(!stats.contains("(sleep)"), "{stats}");
}

/// Throughput of a 1 GiB Exec through the gRPC stream (release:
/// `cargo test --release -p opensandbox-agent --test agent -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn throughput_exec_1g() {
    let agent = Agent::start(&[]);
    let mut c = agent.client().await;
    let t = Instant::now();
    let mut s = c
        .exec(spec(&["head", "-c", "1G", "/dev/zero"]))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0usize;
    while let Some(m) = s.message().await.unwrap() {
        if let Some(process_event::Event::Output(o)) = m.event {
            assert_eq!(o.stream, Stream::Stdout as i32);
            n += o.data.len();
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(n, 1 << 30);
    eprintln!(
        "Exec 1 GiB: {:.2}s, {:.0} MiB/s",
        secs,
        (n as f64 / (1 << 20) as f64) / secs
    );
}

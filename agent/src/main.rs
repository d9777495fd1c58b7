//! The in-sandbox agent: runs as the sandbox's init (PID 1), supervises the
//! processes the host starts, and serves files, all over gRPC on a Unix
//! socket (`proto/opensandbox/agent/v1/agent.proto`).
//!
//! This file owns the command line, the socket and the server.

mod error;
mod fdio;
mod files;
mod init;
mod output;
mod processes;
mod service;
mod spawn;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use opensandbox_agent_proto::v1::agent_server::AgentServer;
use opensandbox_agent_proto::{SOCKET_DIR_IN_SANDBOX, SOCKET_NAME};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

const DEFAULT_OUTPUT_BUFFER: usize = 1 << 20;
/// How long a SIGTERM'd agent waits for its processes before exiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Large HTTP/2 windows: with the default 64 KiB a 1 GiB stream crawls.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_STREAMS: u32 = 8192;
/// Requests (upload chunks) up to this size are accepted.
const MAX_MESSAGE: usize = 64 << 20;

struct Args {
    socket: PathBuf,
    output_buffer: usize,
}

const USAGE: &str = "usage: opensandbox-agent [--socket PATH] [--output-buffer BYTES] [--version]";

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => {
            let mult = match s[i..].trim().to_ascii_lowercase().as_str() {
                "k" | "kib" => 1 << 10,
                "m" | "mib" => 1 << 20,
                "g" | "gib" => 1 << 30,
                _ => return None,
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

fn parse_args() -> Result<Args, String> {
    let mut socket = PathBuf::from(SOCKET_DIR_IN_SANDBOX).join(SOCKET_NAME);
    let mut output_buffer = match std::env::var("AGENT_OUTPUT_BUFFER") {
        Ok(v) => parse_size(&v).ok_or(format!("bad AGENT_OUTPUT_BUFFER: {v}"))?,
        Err(_) => DEFAULT_OUTPUT_BUFFER,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match name.as_str() {
            "--socket" => socket = PathBuf::from(value()?),
            "--output-buffer" => {
                let v = value()?;
                output_buffer = parse_size(&v).ok_or(format!("bad --output-buffer: {v}"))?;
            }
            "--version" | "-V" => {
                println!("opensandbox-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument: {arg}")),
        }
    }
    if output_buffer < 4096 {
        return Err("--output-buffer must be at least 4096".into());
    }
    Ok(Args {
        socket,
        output_buffer,
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("opensandbox-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("opensandbox-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(args)) {
        eprintln!("opensandbox-agent: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // The reaper first: nothing may be spawned before SIGCHLD is handled.
    init::start_reaper()?;
    let processes = processes::Processes::new(args.output_buffer, spawn::base_env());

    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(&args.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove stale {}: {e}", args.socket.display()).into()),
    }
    let listener = UnixListener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;

    let socket = args.socket.clone();
    init::start_signal_forwarding(processes.clone(), SHUTDOWN_GRACE, move || {
        let _ = std::fs::remove_file(&socket);
    })?;

    eprintln!(
        "opensandbox-agent {} listening on {} (pid {})",
        env!("CARGO_PKG_VERSION"),
        args.socket.display(),
        std::process::id()
    );
    let svc = AgentServer::new(service::AgentService::new(processes))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(usize::MAX);
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        // Every attached process holds a stream; hyper's default of 200
        // would queue the rest.
        .max_concurrent_streams(MAX_STREAMS)
        .add_service(svc)
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("2kib"), Some(2048));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1T"), None);
    }
}

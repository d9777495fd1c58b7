//! The gRPC `Agent` service: decodes requests, calls into the process table
//! and the file operations, and turns results into replies and streams.

// tonic's API is built on `Result<_, Status>`; boxing it would only add
// conversions at every call.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use opensandbox_agent_proto::v1::{
    self as pb, agent_server::Agent, file_chunk, process_event, write_file_request,
};
use opensandbox_agent_proto::{PROTOCOL_MAJOR, PROTOCOL_MINOR};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::files;
use crate::output::{Item, Reader, StreamKind};
use crate::processes::{to_exit, Process, Processes, State};

/// Events in flight per stream: small, so HTTP/2 flow control reaches the
/// process (through the output log's backpressure) quickly.
const EVENT_QUEUE: usize = 8;

/// File transfers at once. Each holds a blocking-pool thread for its whole
/// length (paced by the client), so stalled clients must not use up the pool.
const MAX_TRANSFERS: usize = 64;

pub struct AgentService {
    processes: Arc<Processes>,
    started: Instant,
    transfers: Arc<tokio::sync::Semaphore>,
}

impl AgentService {
    fn transfer_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.transfers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many file transfers at once (at most {MAX_TRANSFERS})"
            ))
        })
    }

    pub fn new(processes: Arc<Processes>) -> Self {
        Self {
            processes,
            started: Instant::now(),
            transfers: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ProcessEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::FileChunk, Status>> + Send>>;

fn event(e: process_event::Event) -> Result<pb::ProcessEvent, Status> {
    Ok(pb::ProcessEvent { event: Some(e) })
}

/// Feeds a process's output from `reader` into a reply stream, then its exit.
async fn stream_events(
    proc: Arc<Process>,
    mut reader: Reader,
    follow: bool,
    tx: mpsc::Sender<Result<pb::ProcessEvent, Status>>,
) {
    loop {
        let item = tokio::select! {
            item = reader.next(follow) => item,
            () = tx.closed() => return,
        };
        let Some(item) = item else { break };
        let ev = match item {
            Item::Data {
                stream,
                offset,
                data,
            } => process_event::Event::Output(pb::Output {
                stream: match stream {
                    StreamKind::Stdout => pb::Stream::Stdout,
                    StreamKind::Stderr => pb::Stream::Stderr,
                    StreamKind::Pty => pb::Stream::Pty,
                } as i32,
                offset,
                data,
            }),
            Item::Lost { from, to } => process_event::Event::Lost(pb::Lost {
                from_offset: from,
                to_offset: to,
            }),
        };
        if tx.send(event(ev)).await.is_err() {
            return; // The client went away; dropping the reader detaches it.
        }
    }
    drop(reader);
    let state = if follow {
        // A client that leaves while a silent process runs on must not keep
        // this task waiting for the exit.
        tokio::select! {
            state = proc.wait() => state,
            () = tx.closed() => return,
        }
    } else {
        proc.state()
    };
    if let State::Exited { status, timed_out } = state {
        let end_offset = proc.log.as_ref().map_or(0, |l| l.bounds().1);
        let _ = tx
            .send(event(process_event::Event::Exited(pb::Exited {
                exit: status.map(to_exit),
                timed_out,
                end_offset,
            })))
            .await;
    }
}

fn spawn_events(proc: Arc<Process>, reader: Reader, follow: bool, started: bool) -> EventStream {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    tokio::spawn(async move {
        if started {
            let ev = process_event::Event::Started(pb::Started { pid: proc.pid });
            if tx.send(event(ev)).await.is_err() {
                return;
            }
        }
        stream_events(proc, reader, follow, tx).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(pb::InfoResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_major: PROTOCOL_MAJOR,
            protocol_minor: PROTOCOL_MINOR,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            processes: self.processes.count() as u32,
        }))
    }

    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<pb::RunResponse>, Status> {
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Error::InvalidArgument("spec is missing".into()))?;
        Ok(Response::new(
            self.processes.run(spec, req.output_limit).await?,
        ))
    }

    type ExecStream = EventStream;

    async fn exec(&self, req: Request<pb::ProcessSpec>) -> Result<Response<EventStream>, Status> {
        let (proc, reader) = self.processes.start(req.into_inner(), true)?;
        let reader = reader.ok_or_else(|| Error::Internal("no reader".into()))?;
        Ok(Response::new(spawn_events(proc, reader, true, true)))
    }

    async fn start(
        &self,
        req: Request<pb::ProcessSpec>,
    ) -> Result<Response<pb::ProcessInfo>, Status> {
        let (proc, _) = self.processes.start(req.into_inner(), false)?;
        Ok(Response::new(proc.info()))
    }

    type AttachStream = EventStream;

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = req.into_inner();
        let proc = self.processes.get(req.pid)?;
        let log = proc.log.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "process {} was started by Run; its output is in the Run reply",
                req.pid
            ))
        })?;
        let reader = log.attach(req.from_offset);
        Ok(Response::new(spawn_events(proc, reader, req.follow, false)))
    }

    async fn write_stdin(
        &self,
        req: Request<pb::StdinRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        self.processes
            .write_stdin(req.pid, req.data, req.close)
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn signal(&self, req: Request<pb::SignalRequest>) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        self.processes.signal(req.pid, req.signal)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn resize(&self, req: Request<pb::ResizeRequest>) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        self.processes.resize(req.pid, req.cols, req.rows)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_processes(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::ProcessList>, Status> {
        Ok(Response::new(pb::ProcessList {
            processes: self.processes.list(),
        }))
    }

    async fn get_process(
        &self,
        req: Request<pb::ProcessRef>,
    ) -> Result<Response<pb::ProcessInfo>, Status> {
        Ok(Response::new(
            self.processes.get(req.into_inner().pid)?.info(),
        ))
    }

    async fn stat(&self, req: Request<pb::PathRequest>) -> Result<Response<pb::FileInfo>, Status> {
        let path = req.into_inner().path;
        Ok(Response::new(blocking(move || files::stat(&path)).await?))
    }

    async fn list_dir(
        &self,
        req: Request<pb::PathRequest>,
    ) -> Result<Response<pb::DirListing>, Status> {
        let path = req.into_inner().path;
        let entries = blocking(move || files::list_dir(&path)).await?;
        Ok(Response::new(pb::DirListing { entries }))
    }

    async fn make_dir(
        &self,
        req: Request<pb::MakeDirRequest>,
    ) -> Result<Response<pb::FileInfo>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            blocking(move || files::make_dir(&r.path, r.mode, r.uid, r.gid)).await?,
        ))
    }

    async fn r#move(
        &self,
        req: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::FileInfo>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            blocking(move || files::move_path(&r.from, &r.to, r.overwrite)).await?,
        ))
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        blocking(move || files::remove(&r.path, r.recursive)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    type ReadFileStream = ChunkStream;

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let permit = self.transfer_permit()?;
        let path = req.into_inner().path;
        let p = path.clone();
        let (file, info) = blocking(move || files::open_for_read(&p)).await?;
        let (data_tx, mut data_rx) = mpsc::channel::<crate::error::Result<Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            files::read_into(file, &path, data_tx);
            drop(permit);
        });
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let chunk = |c| Ok(pb::FileChunk { chunk: Some(c) });
            if tx.send(chunk(file_chunk::Chunk::Info(info))).await.is_err() {
                return;
            }
            while let Some(r) = data_rx.recv().await {
                let msg = match r {
                    Ok(data) => chunk(file_chunk::Chunk::Data(data)),
                    Err(e) => Err(Status::from(e)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::FileInfo>, Status> {
        let _permit = self.transfer_permit()?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::WriteFileRequest {
                part: Some(write_file_request::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Error::InvalidArgument(
                    "the first WriteFile message must be the header".into(),
                )
                .into())
            }
        };
        let mut upload = blocking(move || files::Upload::begin(&header)).await?;
        let file = upload
            .take_file()
            .ok_or_else(|| Error::Internal("upload has no file".into()))?;
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let writer = tokio::task::spawn_blocking(move || files::write_from(file, rx));
        // On any early return below, `upload` is dropped and its temp file
        // removed; the writer stops when `tx` goes. A broken connection or a
        // reset stream arrives as an Err; a client that wants to abort on a
        // live connection sends `abort` (tonic's client streams cannot carry
        // an error, and dropping the call does not reset them).
        let received: Result<(), Status> = async {
            while let Some(msg) = stream.message().await? {
                match msg.part {
                    Some(write_file_request::Part::Data(d)) => {
                        if tx.send(d).await.is_err() {
                            // The writer failed; its error is reported below.
                            break;
                        }
                    }
                    Some(write_file_request::Part::Abort(abort)) => {
                        return Err(Status::aborted(format!(
                            "upload aborted by the client: {}",
                            abort.reason
                        )))
                    }
                    _ => {
                        return Err(Error::InvalidArgument(
                            "only data may follow the WriteFile header".into(),
                        )
                        .into())
                    }
                }
            }
            Ok(())
        }
        .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::Internal(format!("writer thread: {e}")))?;
        received?;
        let target = upload.target().to_string_lossy().into_owned();
        written.map_err(|e| Error::io(&target, e))?;
        Ok(Response::new(blocking(move || upload.commit()).await?))
    }
}

/// Runs file system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> crate::error::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker thread: {e}")))?
}

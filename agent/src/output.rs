//! The output log of one process: every byte it wrote to stdout, stderr or its
//! terminal, in one sequence with global offsets, of which the most recent
//! `capacity` bytes are kept for replay.
//!
//! Backpressure rule: bytes that an attached reader has not taken yet are
//! never dropped. When making room would drop such bytes, the writer (the
//! pipe pump) waits, so the process blocks on its full pipe: a slow reader
//! slows the process instead of growing memory. With no reader attached the
//! oldest bytes are dropped, so a detached background process never stalls;
//! a later reader asking for dropped bytes is told so with a `Lost` item.

use std::collections::{BTreeMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

/// Which stream a piece of output came from (mirrors the proto's `Stream`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
    Pty,
}

/// A piece of output, or the notice that some fell out of the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Data {
        stream: StreamKind,
        offset: u64,
        data: Bytes,
    },
    Lost {
        from: u64,
        to: u64,
    },
}

/// Several small pieces are merged into one message up to this size, so a
/// process writing line by line does not cost one gRPC message per line.
const MERGE_LIMIT: usize = 256 * 1024;

struct Chunk {
    stream: StreamKind,
    offset: u64,
    data: Bytes,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

struct State {
    chunks: VecDeque<Chunk>,
    /// Oldest offset still buffered.
    start: u64,
    /// Total bytes written so far.
    end: u64,
    /// The writer is done: no more output will come.
    closed: bool,
    /// Attached readers and the offset each has taken up to.
    readers: BTreeMap<u64, u64>,
    next_reader: u64,
}

impl State {
    fn buffered(&self) -> u64 {
        self.end - self.start
    }

    /// The oldest offset an attached reader still needs; everything below
    /// it may be dropped.
    fn droppable_up_to(&self) -> u64 {
        self.readers.values().copied().min().unwrap_or(self.end)
    }

    /// Drops `n` bytes from the front (slicing a chunk if needed).
    fn drop_front(&mut self, mut n: u64) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let len = front.data.len() as u64;
            if len <= n {
                n -= len;
                self.start = front.end();
                self.chunks.pop_front();
            } else {
                front.data = front.data.slice(n as usize..);
                front.offset += n;
                self.start = front.offset;
                n = 0;
            }
        }
        if self.chunks.is_empty() {
            self.start = self.end;
        }
    }
}

/// The bounded, replayable output of one process. Shared between its pumps
/// (writers) and any number of readers.
pub struct OutputLog {
    capacity: usize,
    state: Mutex<State>,
    /// Woken when data is appended or the log closes (readers wait on it).
    appended: Notify,
    /// Woken when a reader takes data or detaches (a blocked writer waits on it).
    consumed: Notify,
}

impl OutputLog {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                start: 0,
                end: 0,
                closed: false,
                readers: BTreeMap::new(),
                next_reader: 0,
            }),
            appended: Notify::new(),
            consumed: Notify::new(),
        })
    }

    /// The largest piece a writer should append at once: a piece never has
    /// to be bigger than the whole buffer.
    pub fn max_chunk(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the state itself is
        // always left consistent, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (oldest buffered offset, total written)
    pub fn bounds(&self) -> (u64, u64) {
        let s = self.lock();
        (s.start, s.end)
    }

    /// Appends a piece of output, waiting while room can only be made by
    /// dropping bytes an attached reader has not taken yet.
    pub async fn append(&self, stream: StreamKind, mut data: Bytes) {
        // Only pieces up to the capacity can ever fit; split larger ones.
        while data.len() > self.capacity {
            let head = data.split_to(self.capacity);
            self.append_piece(stream, head).await;
        }
        if !data.is_empty() {
            self.append_piece(stream, data).await;
        }
    }

    async fn append_piece(&self, stream: StreamKind, data: Bytes) {
        let len = data.len() as u64;
        loop {
            let mut consumed = pin!(self.consumed.notified());
            consumed.as_mut().enable();
            {
                let mut s = self.lock();
                let excess = (s.buffered() + len).saturating_sub(self.capacity as u64);
                let droppable = s.droppable_up_to().saturating_sub(s.start);
                if droppable >= excess {
                    s.drop_front(excess);
                    let offset = s.end;
                    s.end += len;
                    s.chunks.push_back(Chunk {
                        stream,
                        offset,
                        data,
                    });
                    drop(s);
                    self.appended.notify_waiters();
                    return;
                }
            }
            consumed.await;
        }
    }

    /// Marks the end of the output: readers finish once they reach it.
    pub fn close(&self) {
        self.lock().closed = true;
        self.appended.notify_waiters();
    }

    /// Attaches a reader from `from` (clamped to what exists). Until it is
    /// dropped, it holds back dropping of the bytes it has not taken.
    pub fn attach(self: &Arc<Self>, from: u64) -> Reader {
        let mut s = self.lock();
        let from = from.min(s.end);
        let (pos, lost) = if from < s.start {
            (s.start, Some((from, s.start)))
        } else {
            (from, None)
        };
        let id = s.next_reader;
        s.next_reader += 1;
        s.readers.insert(id, pos);
        let stop_at = s.end;
        drop(s);
        Reader {
            log: self.clone(),
            id,
            pos,
            lost,
            stop_at,
        }
    }
}

/// One attached reader. Dropping it detaches it.
pub struct Reader {
    log: Arc<OutputLog>,
    id: u64,
    pos: u64,
    lost: Option<(u64, u64)>,
    /// The end of the log when attached: where a non-following reader stops.
    stop_at: u64,
}

impl Reader {
    /// The next item, or None at the end: for a following reader when the
    /// log is closed and fully read, otherwise where the log ended at attach
    /// time.
    pub async fn next(&mut self, follow: bool) -> Option<Item> {
        if let Some((from, to)) = self.lost.take() {
            return Some(Item::Lost { from, to });
        }
        loop {
            let mut appended = pin!(self.log.appended.notified());
            appended.as_mut().enable();
            {
                let mut s = self.log.lock();
                if !follow && self.pos >= self.stop_at {
                    return None;
                }
                if self.pos < s.end {
                    let item = self.take(&s, follow);
                    if let Some(Item::Data { offset, data, .. }) = &item {
                        self.pos = offset + data.len() as u64;
                        s.readers.insert(self.id, self.pos);
                        drop(s);
                        self.log.consumed.notify_waiters();
                    }
                    return item;
                }
                if s.closed {
                    return None;
                }
            }
            appended.await;
        }
    }

    /// Takes the data from `self.pos`, merging consecutive pieces of the same
    /// stream. Our own registration keeps `self.pos` buffered.
    fn take(&self, s: &State, follow: bool) -> Option<Item> {
        let limit = if follow {
            s.end
        } else {
            self.stop_at.min(s.end)
        };
        // Chunks are sorted by offset; find the one holding `pos`.
        let idx = s
            .chunks
            .partition_point(|c| c.end() <= self.pos)
            .min(s.chunks.len());
        let first = s.chunks.get(idx)?;
        let skip = (self.pos - first.offset) as usize;
        let mut data = first.data.slice(skip..);
        trim_to(&mut data, self.pos, limit);
        let stream = first.stream;
        let mut merged: Option<BytesMut> = None;
        let mut next_off = self.pos + data.len() as u64;
        for c in s.chunks.iter().skip(idx + 1) {
            let total = merged.as_ref().map_or(data.len(), |m| m.len());
            if c.stream != stream || next_off >= limit || total + c.data.len() > MERGE_LIMIT {
                break;
            }
            let mut more = c.data.clone();
            trim_to(&mut more, c.offset, limit);
            let m = merged.get_or_insert_with(|| {
                let mut m = BytesMut::with_capacity(MERGE_LIMIT.min(total + more.len() * 4));
                m.extend_from_slice(&data);
                m
            });
            m.extend_from_slice(&more);
            next_off += more.len() as u64;
        }
        let data = merged.map_or(data, BytesMut::freeze);
        Some(Item::Data {
            stream,
            offset: self.pos,
            data,
        })
    }
}

fn trim_to(data: &mut Bytes, offset: u64, limit: u64) {
    let room = limit.saturating_sub(offset) as usize;
    if data.len() > room {
        data.truncate(room);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.log.lock().readers.remove(&self.id);
        self.log.consumed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    async fn collect(r: &mut Reader, follow: bool) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(i) = r.next(follow).await {
            out.push(i);
        }
        out
    }

    fn bytes_of(items: &[Item]) -> Vec<u8> {
        let mut v = Vec::new();
        for i in items {
            if let Item::Data { data, .. } = i {
                v.extend_from_slice(data);
            }
        }
        v
    }

    #[tokio::test]
    async fn offsets_are_global_across_streams() {
        let log = OutputLog::new(1024);
        log.append(StreamKind::Stdout, b("abc")).await;
        log.append(StreamKind::Stderr, b("de")).await;
        log.append(StreamKind::Stdout, b("f")).await;
        log.close();
        let mut r = log.attach(0);
        let items = collect(&mut r, true).await;
        assert_eq!(
            items,
            vec![
                Item::Data {
                    stream: StreamKind::Stdout,
                    offset: 0,
                    data: b("abc")
                },
                Item::Data {
                    stream: StreamKind::Stderr,
                    offset: 3,
                    data: b("de")
                },
                Item::Data {
                    stream: StreamKind::Stdout,
                    offset: 5,
                    data: b("f")
                },
            ]
        );
        // From a middle offset: exactly what followed it.
        let mut r = log.attach(4);
        assert_eq!(bytes_of(&collect(&mut r, true).await), b"ef");
    }

    #[tokio::test]
    async fn same_stream_pieces_are_merged() {
        let log = OutputLog::new(1024);
        for _ in 0..10 {
            log.append(StreamKind::Stdout, b("xy")).await;
        }
        log.close();
        let mut r = log.attach(1);
        let items = collect(&mut r, true).await;
        assert_eq!(items.len(), 1);
        assert_eq!(bytes_of(&items).len(), 19);
    }

    #[tokio::test]
    async fn without_reader_oldest_is_dropped_and_reported_lost() {
        let log = OutputLog::new(10);
        log.append(StreamKind::Stdout, b("0123456")).await;
        log.append(StreamKind::Stdout, b("789ab")).await;
        log.append(StreamKind::Stdout, b("cdef")).await;
        assert_eq!(log.bounds(), (6, 16));
        log.close();
        let mut r = log.attach(0);
        let items = collect(&mut r, true).await;
        assert_eq!(items[0], Item::Lost { from: 0, to: 6 });
        assert_eq!(bytes_of(&items), b"6789abcdef");
        // A reader from inside the buffer sees no loss.
        let mut r = log.attach(8);
        let items = collect(&mut r, true).await;
        assert_eq!(bytes_of(&items), b"89abcdef");
        assert!(!items.iter().any(|i| matches!(i, Item::Lost { .. })));
    }

    #[tokio::test]
    async fn oversized_piece_is_split() {
        let log = OutputLog::new(4);
        log.append(StreamKind::Stdout, b("0123456789")).await;
        assert_eq!(log.bounds(), (6, 10));
    }

    #[tokio::test]
    async fn writer_blocks_while_attached_reader_lags() {
        let log = OutputLog::new(8);
        let mut r = log.attach(0);
        log.append(StreamKind::Stdout, b("aaaa")).await;
        log.append(StreamKind::Stdout, b("bbbb")).await;
        // The buffer is full of bytes the reader has not taken: must wait.
        let w = {
            let log = log.clone();
            tokio::spawn(async move { log.append(StreamKind::Stdout, b("cccc")).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!w.is_finished(), "writer should wait for the reader");
        // Taking data frees room and lets the writer go on.
        let first = r.next(true).await.unwrap();
        assert_eq!(bytes_of(&[first]), b"aaaabbbb");
        tokio::time::timeout(Duration::from_secs(1), w)
            .await
            .unwrap()
            .unwrap();
        log.close();
        assert_eq!(bytes_of(&collect(&mut r, true).await), b"cccc");
    }

    #[tokio::test]
    async fn detaching_releases_a_blocked_writer() {
        let log = OutputLog::new(4);
        let r = log.attach(0);
        log.append(StreamKind::Stdout, b("aaaa")).await;
        let w = {
            let log = log.clone();
            tokio::spawn(async move { log.append(StreamKind::Stdout, b("bb")).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        drop(r);
        tokio::time::timeout(Duration::from_secs(1), w)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(log.bounds(), (2, 6));
    }

    #[tokio::test]
    async fn non_following_reader_stops_at_attach_time_end() {
        let log = OutputLog::new(64);
        log.append(StreamKind::Stdout, b("abc")).await;
        let mut r = log.attach(0);
        log.append(StreamKind::Stdout, b("def")).await;
        let items = collect(&mut r, false).await;
        assert_eq!(bytes_of(&items), b"abc");
    }

    #[tokio::test]
    async fn following_reader_gets_live_data_then_ends_on_close() {
        let log = OutputLog::new(64);
        let mut r = log.attach(0);
        let l2 = log.clone();
        tokio::spawn(async move {
            for i in 0..5u8 {
                l2.append(StreamKind::Stderr, Bytes::from(vec![b'0' + i]))
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            l2.close();
        });
        let items = collect(&mut r, true).await;
        assert_eq!(bytes_of(&items), b"01234");
    }

    #[tokio::test]
    async fn attach_beyond_end_is_clamped() {
        let log = OutputLog::new(64);
        log.append(StreamKind::Stdout, b("abc")).await;
        log.close();
        let mut r = log.attach(100);
        assert!(collect(&mut r, true).await.is_empty());
    }
}

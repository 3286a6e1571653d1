//! An agent link's small writes, gathered while its worker thread has other
//! tasks to run and written in one system call.
//!
//! Why: h2 writes whenever it flushes, and it flushes at the end of every
//! poll of its connection and before taking any DATA frame of more than
//! 256 bytes after another one (it holds one such frame at a time). With
//! many tunnels on a link, a dial's few small packets (DIAL_REQ, a KiB of
//! DATA, CLOSE_REQ) each became their own TLS record and write. On loopback
//! a write is charged the whole receive path too: the TCP segment, the
//! peer's softirq and often a wake-up of a parked peer thread. Gathering
//! those writes is what a tunnel over one connection can do that one
//! connection per dial cannot (see docs/tunnel-benchmarks.md).
//!
//! How: a write smaller than `DIRECT_WRITE` is copied into a buffer. The
//! first flush after it asks tokio to wake the task once the worker has run
//! out of ready tasks (the deferred wake `tokio::task::yield_now` uses) and
//! returns; the buffer is written, in one call, by the first flush after
//! that wake, or by the first flush `MAX_WAIT` or more after its oldest
//! byte, whichever comes first. The bound keeps a busy worker from holding
//! back a packet the peer could already work on: without it, dials/s did
//! not rise although each dial cost less, because the other CPU sat idle
//! while the batch grew. A flush that comes earlier leaves the buffer to
//! those, which is sound for a caller that polls again when woken (h2
//! does: every poll of its connection ends in a flush). Shutdown writes the
//! buffer first; a buffer that would pass `MAX_BUFFERED` is written before
//! it takes more; a large write goes straight through, in one vectored
//! write with whatever is buffered ahead of it, so bulk transfers are
//! neither copied nor held. And while large writes go (one in the last
//! `STREAMING`), small ones are written at their flush: holding the small
//! reads of a stream that outruns its backend cost one stream's
//! throughput more than gathering saved (measured: 0.87x of the TLS floor
//! against 1.16x without holding, alternating runs).

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A write at least this large is not copied or held: it goes to the
/// socket at once, with whatever is buffered ahead of it. Above a dial's
/// packets (a KiB of data in one HTTP/2 frame is 1050 bytes), below what a
/// streaming backend's reads bring.
const DIRECT_WRITE: usize = 4 * 1024;
/// Buffered bytes, at most, before they are written regardless.
const MAX_BUFFERED: usize = 64 * 1024;
/// How long, at most, a flush leaves bytes to the deferred wake.
const MAX_WAIT: Duration = Duration::from_micros(20);
/// A large write less than this long ago means a stream is moving bulk
/// data this way: small writes are then written at their flush, not held.
const STREAMING: Duration = Duration::from_millis(1);

pub(crate) struct IdleFlush<T> {
    io: T,
    buf: BytesMut,
    /// When the oldest buffered byte came.
    since: Instant,
    max_wait: Duration,
    /// When the last large write went.
    last_large: Option<Instant>,
    /// The buffer's deferred wake, once asked for.
    wake: Option<Arc<Fired>>,
}

/// The waker handed to tokio's deferred list: notes the wake, then passes
/// it to the task.
struct Fired {
    fired: AtomicBool,
    task: Waker,
}

impl Wake for Fired {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<T> IdleFlush<T> {
    pub(crate) fn new(io: T) -> Self {
        Self::with_max_wait(io, MAX_WAIT)
    }

    fn with_max_wait(io: T, max_wait: Duration) -> Self {
        IdleFlush {
            io,
            buf: BytesMut::new(),
            since: Instant::now(),
            max_wait,
            last_large: None,
            wake: None,
        }
    }

    /// Whether the buffer's deferred wake has fired; asks for it first if
    /// nobody has, or if it would wake another task than this one (the
    /// agent hands its connection from the handshake's task to another).
    fn idle_yet(&mut self, cx: &mut Context<'_>) -> bool {
        match &self.wake {
            Some(w) if w.fired.load(Ordering::Acquire) => return true,
            Some(w) if w.task.will_wake(cx.waker()) => return false,
            _ => {}
        }
        let fired = Arc::new(Fired {
            fired: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        // tokio's yield keeps the waker its first poll is given until the
        // worker runs out of ready tasks (outside a runtime it wakes at
        // once); that first poll is always pending.
        let waker = Waker::from(fired.clone());
        let _ = std::pin::pin!(tokio::task::yield_now()).poll(&mut Context::from_waker(&waker));
        let now = fired.fired.load(Ordering::Acquire);
        self.wake = Some(fired);
        now
    }
}

impl<T: AsyncWrite + Unpin> IdleFlush<T> {
    /// Writes `bufs` straight to the socket, in the same call as whatever
    /// is buffered ahead of them (one vectored write, no copy).
    fn poll_write_behind_buffer(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.last_large = Some(Instant::now());
        while !self.buf.is_empty() {
            let all: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&self.buf))
                .chain(bufs.iter().map(|b| IoSlice::new(b)))
                .collect();
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &all))?;
            let buffered = self.buf.len();
            self.took(n.min(buffered))?;
            if n > buffered {
                return Poll::Ready(Ok(n - buffered));
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    /// Writes the whole buffer.
    fn poll_write_buffer(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf))?;
            self.took(n)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Drops the `n` buffered bytes the socket took; an empty buffer needs
    /// its wake no more. A socket that takes nothing has ended.
    fn took(&mut self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.buf.advance(n);
        if self.buf.is_empty() {
            self.wake = None;
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleFlush<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleFlush<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len >= DIRECT_WRITE {
            return this.poll_write_behind_buffer(cx, bufs);
        }
        if this.buf.len() + len > MAX_BUFFERED {
            ready!(this.poll_write_buffer(cx))?;
        }
        if this.buf.is_empty() {
            this.since = Instant::now();
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            let now = Instant::now();
            let streaming = this.last_large.is_some_and(|t| now - t < STREAMING);
            if !streaming && now - this.since < this.max_wait && !this.idle_yet(cx) {
                // Written by a later flush: the wake brings one.
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_write_buffer(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_write_buffer(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    /// What the socket under the wrapper saw: each write call's bytes, and
    /// its shutdown. Takes at most `per_call` bytes a call.
    #[derive(Default)]
    struct Log {
        writes: Vec<Vec<u8>>,
        shut_after: Option<usize>,
    }

    #[derive(Clone)]
    struct Recorder {
        log: Arc<Mutex<Log>>,
        per_call: usize,
    }

    impl Recorder {
        fn new(per_call: usize) -> Self {
            Recorder {
                log: Arc::default(),
                per_call,
            }
        }
        fn writes(&self) -> Vec<Vec<u8>> {
            self.log.lock().unwrap().writes.clone()
        }
        fn bytes(&self) -> Vec<u8> {
            self.writes().concat()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.per_call);
            self.log.lock().unwrap().writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len().min(self.per_call);
            self.log.lock().unwrap().writes.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let mut log = self.log.lock().unwrap();
            log.shut_after = Some(log.writes.len());
            Poll::Ready(Ok(()))
        }
    }

    /// Small writes and flushes within one poll reach the socket as one
    /// write, once the worker has nothing else to run; the deferred wake
    /// alone brings the task back to write them, also when the connection
    /// has moved to another task since the wake was asked for (as the
    /// agent's does after its handshake).
    #[tokio::test]
    async fn small_writes_of_a_busy_worker_go_out_as_one_write_when_it_idles() {
        let rec = Recorder::new(usize::MAX);
        // No time bound: only the wake may bring the write.
        let mut io = IdleFlush::with_max_wait(rec.clone(), Duration::from_secs(3600));
        let parts: [&[u8]; 3] = [b"dial request", &[7u8; 1100], b"close request"];
        std::future::poll_fn(|cx| {
            for p in parts {
                let mut pinned = Pin::new(&mut io);
                let wrote = pinned.as_mut().poll_write(cx, p);
                assert!(matches!(wrote, Poll::Ready(Ok(n)) if n == p.len()));
                // h2 flushes between DATA frames; each flush here is early.
                assert!(pinned.poll_flush(cx).is_ready());
            }
            Poll::Ready(())
        })
        .await;
        assert!(rec.writes().is_empty(), "written before the worker idled");
        // Another task, woken by nothing but the wake asked for: if that
        // never comes, the timeout here fails the test.
        let rec2 = rec.clone();
        let writer = tokio::spawn(std::future::poll_fn(move |cx| {
            assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
            if rec2.writes().is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }));
        let waited = tokio::time::timeout(Duration::from_secs(5), writer).await;
        assert!(waited.is_ok(), "the deferred wake never came");
        assert_eq!(rec.writes(), vec![parts.concat()]);
    }

    /// A flush `MAX_WAIT` after the oldest buffered byte writes, even
    /// before the worker idles.
    #[tokio::test]
    async fn a_flush_past_the_wait_bound_writes() {
        let rec = Recorder::new(usize::MAX);
        let mut io = IdleFlush::new(rec.clone());
        std::future::poll_fn(|cx| {
            let mut pinned = Pin::new(&mut io);
            assert!(pinned.as_mut().poll_write(cx, b"early").is_ready());
            assert!(pinned.as_mut().poll_flush(cx).is_ready());
            assert!(rec.writes().is_empty());
            // Same poll, no yield: only the clock has moved.
            std::thread::sleep(MAX_WAIT * 2);
            assert!(pinned.poll_flush(cx).is_ready());
            Poll::Ready(())
        })
        .await;
        assert_eq!(rec.writes(), vec![b"early".to_vec()]);
    }

    /// Shutdown writes what is buffered, then shuts the socket.
    #[tokio::test]
    async fn shutdown_writes_the_buffer_first() {
        let rec = Recorder::new(usize::MAX);
        let mut io = IdleFlush::new(rec.clone());
        io.write_all(b"goaway").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(rec.writes(), vec![b"goaway".to_vec()]);
        assert_eq!(rec.log.lock().unwrap().shut_after, Some(1));
    }

    /// A large write goes to the socket at once, uncopied: alone, or in
    /// one vectored write behind what was buffered, in order, also when
    /// the socket takes part of it.
    #[tokio::test]
    async fn large_writes_go_at_once_behind_the_buffer() {
        let rec = Recorder::new(usize::MAX);
        let mut io = IdleFlush::new(rec.clone());
        let big = vec![1u8; DIRECT_WRITE];
        io.write_all(&big).await.unwrap();
        assert_eq!(rec.writes(), vec![big.clone()]);
        io.write_all(b"small").await.unwrap();
        assert_eq!(rec.writes().len(), 1, "the small write was held");
        io.write_all(&big).await.unwrap();
        assert_eq!(
            rec.writes(),
            vec![big.clone(), [b"small", big.as_slice()].concat()]
        );
        assert!(io.buf.is_empty());

        let rec = Recorder::new(2);
        let mut io = IdleFlush::new(rec.clone());
        io.write_all(b"abc").await.unwrap();
        io.write_all(&big).await.unwrap();
        // The tail of `big` after a partial write is small: buffered.
        io.shutdown().await.unwrap();
        assert_eq!(rec.bytes(), [b"abc", big.as_slice()].concat());
    }

    /// Right after a large write, a small one is written at its flush:
    /// a stream moving bulk data is not held up by the gathering.
    #[tokio::test]
    async fn small_writes_of_a_streaming_link_are_not_held() {
        let rec = Recorder::new(usize::MAX);
        let mut io = IdleFlush::with_max_wait(rec.clone(), Duration::from_secs(3600));
        io.write_all(&[3u8; DIRECT_WRITE]).await.unwrap();
        std::future::poll_fn(|cx| {
            let mut pinned = Pin::new(&mut io);
            assert!(pinned.as_mut().poll_write(cx, b"tail").is_ready());
            assert!(pinned.poll_flush(cx).is_ready());
            Poll::Ready(())
        })
        .await;
        assert_eq!(rec.writes().len(), 2);
        assert_eq!(rec.writes()[1], b"tail");
    }

    /// The buffer never passes `MAX_BUFFERED`: a write that would take it
    /// past writes the buffer first.
    #[tokio::test]
    async fn a_full_buffer_is_written_before_it_takes_more() {
        let rec = Recorder::new(usize::MAX);
        let mut io = IdleFlush::new(rec.clone());
        let piece = vec![2u8; 1024];
        for _ in 0..MAX_BUFFERED / piece.len() {
            io.write_all(&piece).await.unwrap();
        }
        assert!(rec.writes().is_empty());
        io.write_all(&piece).await.unwrap();
        assert_eq!(rec.writes().len(), 1);
        assert_eq!(rec.bytes().len(), MAX_BUFFERED);
        assert_eq!(io.buf.len(), piece.len());
    }

    /// A socket that takes a few bytes a call gets the buffer in order.
    #[tokio::test]
    async fn partial_writes_keep_the_order() {
        let rec = Recorder::new(3);
        let mut io = IdleFlush::new(rec.clone());
        io.write_all(b"0123456789").await.unwrap();
        io.write_all(b"abcdef").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(rec.bytes(), b"0123456789abcdef");
        assert!(rec.writes().iter().all(|w| w.len() <= 3));
    }
}

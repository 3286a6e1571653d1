//! The gRPC frontend (`/ProxyService/Proxy`) on an HTTP/2 server of our own.
//!
//! Why not tonic and hyper here: kube-apiserver's konnectivity client opens
//! one HTTP/2 connection per dial, so whatever a connection holds, every
//! tunnelled connection holds. hyper's h2 allocates a 16 KiB write buffer,
//! an 8 KiB read buffer and a 4 KiB HPACK buffer per connection up front,
//! tonic adds its per-stream machinery, and none of it is sizeable through
//! their APIs: the server held 25.7 KiB per idle gRPC tunnel on them, 7.9 KiB
//! on this (tunnel bench, same-day A/B). This server holds no I/O buffer while
//! a connection is idle: reads land in a buffer that is let go once parsed,
//! writes in one that is let go once flushed.
//!
//! One task per connection does everything: frames in, client packets to the
//! server state (one in flight per stream, so a stream waiting for agent
//! credit only holds up itself), queued packets out under HTTP/2 flow
//! control, keepalive pings, GOAWAY on shutdown. It speaks what a gRPC
//! server needs and nothing more: no push, priorities ignored, no message
//! compression (we advertise none; a compressed message ends its call with
//! UNIMPLEMENTED). Frame-level rules follow RFC 9113; a violation ends the
//! connection with GOAWAY and is counted as `bad_input_total{kind="h2_..."}`.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::connect::StreamEnd;
use super::state::{Frontend, MovedClientReader, Shared};
use crate::h2::{self, ConnError, Head, code, conn_error, flag, kind, setting};
use crate::proto::Packet;
use crate::queue::{Charge, QueuedBytes};

/// The one method this server has.
const PROXY_PATH: &str = "/ProxyService/Proxy";
/// Receive windows we offer: a stream, and the connection as a whole.
const STREAM_WINDOW: i64 = 4 << 20;
const CONN_WINDOW: i64 = 8 << 20;
/// Window granted ahead of consumption so that a message larger than what
/// the windows leave can arrive whole (see `open_for_message`), over all
/// streams of a connection at once.
const MAX_ADVANCE: i64 = CONN_WINDOW;
/// A header block (HEADERS + CONTINUATION) larger than this ends the
/// connection: the Proxy call's headers are a few hundred bytes.
const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Output queued beyond this stops reading (a peer that sends PINGs or
/// SETTINGS but never reads cannot make us buffer without bound).
const OUT_HIGH_WATER: usize = 1 << 20;
/// Time to receive the preface and first SETTINGS, and to answer a ping.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Time the last frames get to leave before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a header block (HEADERS and its CONTINUATIONs) has to be
/// finished: an unfinished one holds up to 64 KiB and blocks every other
/// frame of the connection.
const HEADER_BLOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames that move nothing forward (empty DATA or CONTINUATION, PRIORITY,
/// PINGs, SETTINGS after the first, unknown types) a client may send per
/// `NO_PROGRESS_PERIOD`; past that the connection ends with GOAWAY
/// ENHANCE_YOUR_CALM, as grpc-go and nghttp2 answer such floods. A client
/// pinging every second uses 1% of it.
const NO_PROGRESS_BUDGET: u32 = 1000;
const NO_PROGRESS_PERIOD: Duration = Duration::from_secs(10);
/// DATA payloads shorter than this are copied into the stream's own buffer
/// instead of kept as slices of the 64 KiB read buffer they arrived in, so
/// what a stream holds is what the client sent (and the connection window
/// bounds), not one read buffer per tiny frame.
const COPY_BELOW: usize = 16 << 10;
/// Sent with our keepalive pings, so their ACKs can be told apart.
const KEEPALIVE_OPAQUE: [u8; 8] = *b"pxctl-ka";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Serves one client connection (TCP, TLS or unix socket) until it ends.
/// `keepalive`: the server pings every so often and drops a client that
/// does not answer within 20 s (zero: no pings). `end`: whether the
/// stream is shut down before it is dropped (TLS: close_notify) or only
/// dropped (a bare socket's close says the same, one system call fewer
/// per connection, as on the HTTP-CONNECT frontend).
///
/// An uploading connection (a read that filled half its buffer) is moved,
/// as an uploading HTTP-CONNECT client's reads are (see
/// [`MovedClientReader`]), into the task of the agent stream its first
/// tunnel uses: there each read is framed, encrypted and written toward the
/// agent before the next. This task waits; it takes the connection back
/// when that stream's task ends (the connection's other calls go on) and
/// ends it when the connection is done.
pub(crate) async fn serve<S>(sh: Arc<Shared>, io: S, keepalive: Duration, end: StreamEnd)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Connection::new(sh, io, keepalive, end);
    while let Some(place) = std::future::poll_fn(|cx| conn.poll_or_move(cx)).await {
        let (back, returned) = tokio::sync::oneshot::channel();
        conn.moved = true;
        place.run_there(|place| {
            Box::pin(MovedConnection {
                conn: Some(conn),
                back: Some(back),
                _place: place,
            })
        });
        // Always answered: `MovedConnection` sends the connection back
        // when it is done or dropped.
        let Ok((back_here, done)) = returned.await else {
            return;
        };
        conn = back_here;
        conn.moved = false;
        if done {
            break;
        }
    }
    conn.end_all_streams();
}

/// A connection run in an agent stream's task (see [`serve`]), holding its
/// place there; it goes back to its own task when done (`true`) or dropped
/// with that stream's task (`false`), and ends here if its own task is gone.
struct MovedConnection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    conn: Option<Connection<S>>,
    back: Option<tokio::sync::oneshot::Sender<(Connection<S>, bool)>>,
    _place: MovedClientReader,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MovedConnection<S> {
    fn send_back(&mut self, done: bool) {
        if let (Some(conn), Some(back)) = (self.conn.take(), self.back.take())
            && let Err((mut conn, _)) = back.send((conn, done))
        {
            conn.end_all_streams();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for MovedConnection<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let (Some(conn), Some(back)) = (&mut this.conn, &mut this.back) else {
            return Poll::Ready(());
        };
        if back.poll_closed(cx).is_ready() {
            conn.end_all_streams();
            this.conn = None;
            return Poll::Ready(());
        }
        ready!(conn.poll(cx));
        this.send_back(true);
        Poll::Ready(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for MovedConnection<S> {
    fn drop(&mut self) {
        self.send_back(false);
    }
}

use crate::grpc_wire::status;

/// One Proxy call.
struct Stream {
    id: u32,
    fe: Arc<Frontend>,
    /// Received message bytes not yet decoded (DATA payloads, unsplit).
    inbox: Inbox,
    /// The client's packet being handled; the next waits for it.
    processing: Option<BoxFuture<bool>>,
    /// No more client packets will be handled (the frontend is released).
    inbound_done: bool,
    /// The client will send nothing more (END_STREAM, reset, or we reset).
    recv_closed: bool,
    /// How much more the client may send, and what we consumed but have
    /// not yet given back with WINDOW_UPDATE.
    recv_window: i64,
    recv_unacked: i64,
    /// Window granted (to the stream and the connection) for message
    /// bytes not yet consumed; consumption pays it off before it counts
    /// toward `recv_unacked`.
    recv_advance: i64,
    /// How much more we may send (the client's window for this stream).
    send_window: i64,
    /// The encoded message being sent, when the windows held it up.
    pending: Option<OutMessage>,
    pop: Option<BoxFuture<Option<(Packet, Charge)>>>,
    /// Trailers sent (or the stream was reset): nothing more goes out.
    send_done: bool,
    /// The response head went out. It is sent with the first message, as
    /// grpc-go's server does, not when the call opens: the client then
    /// reads it together with DIAL_RSP (one wake-up fewer per dial), and a
    /// call ended before any message gets a Trailers-Only response.
    head_sent: bool,
}

/// DATA payloads of one stream, as received: large ones as they came,
/// small ones copied together into `small` (which follows `chunks`).
/// `len` is charged to the server's [`QueuedBytes`] (when `held` is set)
/// while the bytes wait here: a stream whose agent or backend does not take
/// its data holds them.
#[derive(Default)]
struct Inbox {
    chunks: VecDeque<Bytes>,
    small: BytesMut,
    len: usize,
    held: Option<Arc<QueuedBytes>>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if let Some(h) = &self.held {
            h.release(self.len);
        }
    }
}

/// Why a call ends before its queue does.
struct CallError {
    status: u32,
    message: String,
}

impl Inbox {
    fn charged_to(held: Arc<QueuedBytes>) -> Self {
        let mut inbox = Inbox::default();
        inbox.held = Some(held);
        inbox
    }

    fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if let Some(h) = &self.held {
            h.charge(b.len());
        }
        if b.len() < COPY_BELOW {
            self.small.extend_from_slice(&b);
        } else {
            self.seal();
            self.chunks.push_back(b);
        }
    }

    /// Moves the copied small payloads behind the chunks.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push_back(self.small.split().freeze());
        }
        if self.small.capacity() == 0 {
            self.small = BytesMut::new();
        }
    }

    fn peek_prefix(&self) -> Option<[u8; 5]> {
        crate::grpc_wire::peek_prefix(&self.chunks, self.len)
    }

    /// Takes `n` bytes: a slice of one chunk when they lie in one (the
    /// usual case: one message per DATA frame), else a copy.
    fn take(&mut self, n: usize) -> Bytes {
        debug_assert!(n <= self.len);
        self.len -= n;
        if let Some(h) = &self.held {
            h.release(n);
        }
        if n == 0 {
            return Bytes::new();
        }
        let front = self.chunks.front_mut().expect("len counts the chunks");
        if front.len() >= n {
            let out = front.split_to(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return out;
        }
        crate::grpc_wire::gather(&mut self.chunks, n)
    }

    /// A short partial message left waiting keeps only its own bytes, not
    /// the 64 KiB read buffers its pieces are slices of (a client that
    /// sends a few bytes and stops must not pin a read buffer).
    fn compact(&mut self) {
        self.seal();
        if self.len == 0 || self.len > 4096 {
            return;
        }
        let mut own = Vec::with_capacity(self.len);
        for c in &self.chunks {
            own.extend_from_slice(c);
        }
        self.chunks.clear();
        self.chunks.push_back(Bytes::from(own));
    }

    /// Bytes still to come before the next message is whole (its prefix
    /// first, when that has not all come).
    fn missing(&self) -> usize {
        match self.peek_prefix() {
            None => 5 - self.len,
            Some(p) => {
                let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
                (5 + len).saturating_sub(self.len)
            }
        }
    }

    /// The next complete gRPC message as a packet, with the bytes it took.
    fn next_packet(&mut self) -> Result<Option<(Packet, usize)>, CallError> {
        self.seal();
        let Some(prefix) = self.peek_prefix() else {
            return Ok(None);
        };
        let len = crate::grpc_wire::check_prefix(prefix).map_err(|e| CallError {
            status: e.code(),
            message: e.to_string(),
        })?;
        if self.len < 5 + len {
            return Ok(None);
        }
        self.take(5);
        let body = self.take(len);
        match Packet::decode(body) {
            Ok(p) => Ok(Some((p, 5 + len))),
            Err(e) => Err(CallError {
                status: status::INTERNAL,
                message: format!("failed to decode Packet: {e}"),
            }),
        }
    }
}

/// Frames waiting for the socket: small frames gather in `tail`, DATA
/// payloads are queued as they are (no copy).
#[derive(Default)]
struct Out {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    /// Bytes ever queued in `chunks`, and ever written from them (their
    /// difference is what `chunks` holds).
    appended: u64,
    written: u64,
    /// Each message's charge (its packet's bytes in the server's
    /// `queued_bytes`) with the `appended` count its last byte reaches:
    /// a message is counted until the socket took all of it, not only
    /// until it left its queue, so the cap sees what waits here (up to
    /// `OUT_HIGH_WATER` per connection).
    charges: VecDeque<(u64, Charge)>,
}

impl Out {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            let b = self.tail.split().freeze();
            self.queue(b);
        }
    }

    fn queue(&mut self, b: Bytes) {
        self.appended += b.len() as u64;
        self.chunks.push_back(b);
    }

    /// One DATA frame carrying the next `n` bytes of `message`.
    fn data(&mut self, stream: u32, message: &mut OutMessage, n: usize) {
        Head {
            len: n,
            kind: kind::DATA,
            flags: 0,
            stream,
        }
        .write(&mut self.tail);
        self.seal();
        let mut left = n;
        while left > 0 {
            let part = message.parts.front_mut().expect("n within the message");
            let chunk = if part.len() <= left {
                message.parts.pop_front().expect("front exists")
            } else {
                part.split_to(left)
            };
            left -= chunk.len();
            message.len -= chunk.len();
            self.queue(chunk);
        }
        if message.len == 0 {
            let charge = std::mem::replace(&mut message.charge, Charge::none());
            self.charges.push_back((self.appended, charge));
        }
    }

    fn len(&self) -> usize {
        (self.appended - self.written) as usize + self.tail.len()
    }

    /// Writes everything queued; Ready once the socket took it all.
    fn poll_write<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        self.seal();
        while !self.chunks.is_empty() {
            let slices: Vec<io::IoSlice<'_>> = self
                .chunks
                .iter()
                .take(32)
                .map(|c| io::IoSlice::new(c))
                .collect();
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n as u64;
            while self
                .charges
                .front()
                .is_some_and(|(end, _)| *end <= self.written)
            {
                self.charges.pop_front();
            }
            while n > 0 {
                let front = self.chunks.front_mut().expect("wrote queued bytes");
                if n >= front.len() {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        // Idle connections keep no buffer.
        self.chunks = VecDeque::new();
        self.charges = VecDeque::new();
        self.tail = BytesMut::new();
        Pin::new(&mut *io).poll_flush(cx)
    }
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
struct PartialHeaders {
    stream: u32,
    end_stream: bool,
    block: BytesMut,
}

enum Timer {
    /// Until the preface and first SETTINGS arrive.
    Handshake,
    /// Quiet until the next keepalive ping.
    Keepalive,
    /// A keepalive ping is out; its ACK is due.
    PingDue,
    /// The last frames are being flushed before the connection closes.
    Closing,
}

/// What RFC 9113 8.2-8.3 asks of a request's field block, gathered while
/// it is decoded: the first rule broken, if any.
#[derive(Default)]
struct FieldCheck {
    broken: Option<&'static str>,
    regular_seen: bool,
    method: bool,
    scheme: bool,
    path: bool,
    authority: bool,
}

impl FieldCheck {
    fn see(&mut self, name: &[u8], value: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        self.broken = self.rule(name, value);
    }

    fn rule(&mut self, name: &[u8], value: &[u8]) -> Option<&'static str> {
        if name.iter().any(u8::is_ascii_uppercase) {
            return Some("uppercase field name");
        }
        if name.first() == Some(&b':') {
            if self.regular_seen {
                return Some("pseudo-header after a regular field");
            }
            let seen = match name {
                b":method" => &mut self.method,
                b":scheme" => &mut self.scheme,
                b":authority" => &mut self.authority,
                b":path" if value.is_empty() => return Some("empty :path"),
                b":path" => &mut self.path,
                _ => return Some("unknown or response pseudo-header"),
            };
            if std::mem::replace(seen, true) {
                return Some("duplicated pseudo-header");
            }
            return None;
        }
        self.regular_seen = true;
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => Some("connection-specific field"),
            b"te" if value != b"trailers" => Some("TE other than trailers"),
            _ => None,
        }
    }

    /// The rule broken; a request (not a trailer block) must also carry
    /// :method, :scheme and :path.
    fn malformed(&self, request: bool) -> Option<&'static str> {
        if self.broken.is_some() {
            return self.broken;
        }
        if !request {
            return (self.method || self.scheme || self.path || self.authority)
                .then_some("pseudo-header in trailers");
        }
        (!(self.method && self.scheme && self.path)).then_some("missing pseudo-header")
    }
}

struct Connection<S> {
    sh: Arc<Shared>,
    io: S,
    end: StreamEnd,
    rbuf: BytesMut,
    out: Out,
    hpack: h2::HeaderDecoder,
    partial: Option<PartialHeaders>,
    streams: Vec<Stream>,
    /// Highest stream id the client opened.
    last_stream: u32,
    preface_done: bool,
    settings_seen: bool,
    read_closed: bool,
    /// A read since this was last looked at brought half a read buffer or
    /// more: an upload.
    bulk_read: bool,
    /// Polled in an agent stream's task ([`MovedConnection`]): after a
    /// bulk read it lets that task write what the read sent before reading
    /// again, while the bytes are still in cache.
    moved: bool,
    /// The window the client gives every new stream, and its frame limit.
    peer_initial_window: i64,
    peer_max_frame: usize,
    conn_send_window: i64,
    conn_recv_window: i64,
    conn_recv_unacked: i64,
    /// Window granted ahead over all streams, and the part of it left by
    /// streams that ended before their bytes came (paid off by whatever
    /// still arrives for ended streams).
    conn_advance: i64,
    orphan_advance: i64,
    keepalive: Duration,
    timer: Option<(Timer, Pin<Box<Sleep>>)>,
    stopped: BoxFuture<()>,
    /// GOAWAY sent: no new streams; the connection ends when the last does.
    goaway_sent: bool,
    /// The client sent GOAWAY: it opens no new streams.
    peer_goaway: bool,
    /// Set when the connection must end (error, EOF): flush, then close.
    ending: bool,
    /// When the unfinished header block in `partial` must be finished.
    header_deadline: Option<Pin<Box<Sleep>>>,
    /// Frames without progress in the current period, and when it began.
    no_progress: u32,
    no_progress_since: tokio::time::Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection<S> {
    fn new(sh: Arc<Shared>, io: S, keepalive: Duration, end: StreamEnd) -> Self {
        let mut out = Out::default();
        h2::settings(
            out.buf(),
            &[
                (
                    setting::MAX_CONCURRENT_STREAMS,
                    sh.opts.max_concurrent_streams.min(u32::MAX as usize) as u32,
                ),
                (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
                (setting::MAX_FRAME_SIZE, crate::H2_MAX_FRAME),
                (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK as u32),
            ],
        );
        h2::window_update(out.buf(), 0, (CONN_WINDOW - h2::DEFAULT_WINDOW) as u32);
        let stop = sh.stop.clone();
        Connection {
            sh,
            io,
            end,
            rbuf: BytesMut::new(),
            out,
            hpack: h2::HeaderDecoder::default(),
            partial: None,
            streams: Vec::new(),
            last_stream: 0,
            preface_done: false,
            settings_seen: false,
            read_closed: false,
            bulk_read: false,
            moved: false,
            peer_initial_window: h2::DEFAULT_WINDOW,
            peer_max_frame: h2::DEFAULT_MAX_FRAME,
            conn_send_window: h2::DEFAULT_WINDOW,
            conn_recv_window: CONN_WINDOW,
            conn_recv_unacked: 0,
            conn_advance: 0,
            orphan_advance: 0,
            keepalive,
            timer: Some((
                Timer::Handshake,
                Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
            )),
            stopped: Box::pin(async move { stop.cancelled().await }),
            goaway_sent: false,
            peer_goaway: false,
            ending: false,
            header_deadline: None,
            no_progress: 0,
            no_progress_since: tokio::time::Instant::now(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Once per wake-up: a shutdown wakes the task itself.
        if !self.goaway_sent && self.stopped.as_mut().poll(cx).is_ready() {
            // Server shutdown: no new calls; running ones end as their
            // frontends are released.
            self.send_goaway(code::NO_ERROR);
            for i in 0..self.streams.len() {
                self.end_inbound(i);
            }
        }
        loop {
            if self.poll_timer(cx).is_err() {
                return Poll::Ready(());
            }
            if let Some(deadline) = &mut self.header_deadline
                && deadline.as_mut().poll(cx).is_ready()
            {
                self.header_deadline = None;
                self.sh.metrics.bad("h2_header_block_timeout");
                tracing::info!(
                    "gRPC frontend connection closed: header block not finished in time"
                );
                self.send_goaway(code::ENHANCE_YOUR_CALM);
                self.ending = true;
            }
            let mut progress = false;
            if !self.closing() && self.out.len() < OUT_HIGH_WATER {
                match self.poll_read_frames(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => {
                        self.sh.metrics.bad(conn_error_metric(&e));
                        tracing::info!(error = %e, "gRPC frontend connection closed for a protocol error");
                        self.send_goaway(e.code);
                        self.ending = true;
                    }
                    Poll::Pending => {}
                }
            }
            if !self.ending && !self.read_closed {
                progress |= self.drive_streams(cx);
            }
            let queued = self.out.len();
            if let Poll::Ready(Err(_)) = self.out.poll_write(&mut self.io, cx) {
                return Poll::Ready(());
            }
            // Output that fell below the high-water mark reopens reading and
            // popping, both skipped above it (so no read wake-up is
            // registered): go round again rather than wait.
            progress |= queued >= OUT_HIGH_WATER && self.out.len() < OUT_HIGH_WATER;
            if self.closing() {
                if self.out.len() == 0 {
                    if self.end == StreamEnd::Shutdown {
                        let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    }
                    return Poll::Ready(());
                }
                // The last frames (GOAWAY, trailers) are still on their way;
                // a peer that never reads gets a deadline.
                if !matches!(self.timer, Some((Timer::Closing, _))) {
                    self.timer =
                        Some((Timer::Closing, Box::pin(tokio::time::sleep(CLOSE_TIMEOUT))));
                    continue;
                }
                return Poll::Pending;
            }
            if !progress {
                return Poll::Pending;
            }
            if self.moved && self.bulk_read {
                // `absorb_self_wakes` polls the agent stream's task again
                // at once, after its link has written.
                self.bulk_read = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// Polls in the connection's own task. Ready(None): the connection is
    /// done; Ready(Some): it uploads and has a place in the task of the
    /// agent stream its first tunnel uses, to be run there.
    fn poll_or_move(&mut self, cx: &mut Context<'_>) -> Poll<Option<MovedClientReader>> {
        if self.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        if std::mem::take(&mut self.bulk_read)
            && let Some(place) = self
                .streams
                .iter()
                .filter(|s| !s.inbound_done)
                .find_map(|s| s.fe.backend())
                .and_then(|backend| MovedClientReader::claim(&self.sh, &backend))
        {
            return Poll::Ready(Some(place));
        }
        Poll::Pending
    }

    /// Nothing more will be read: an error, the peer's EOF, or a GOAWAY
    /// (either side's) after the last stream ended.
    fn closing(&self) -> bool {
        self.ending
            || self.read_closed
            || ((self.goaway_sent || self.peer_goaway) && self.streams.is_empty())
    }

    /// Handshake deadline and keepalive pings. Err: the peer is gone.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Result<(), ()> {
        let Some((what, sleep)) = &mut self.timer else {
            return Ok(());
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        match what {
            Timer::Handshake => {
                self.sh.metrics.bad("h2_handshake_timeout");
                Err(())
            }
            Timer::PingDue => {
                self.sh.metrics.bad("h2_ping_timeout");
                Err(())
            }
            Timer::Closing => Err(()),
            Timer::Keepalive => {
                h2::ping(self.out.buf(), false, KEEPALIVE_OPAQUE);
                *what = Timer::PingDue;
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + PING_TIMEOUT);
                let _ = sleep.as_mut().poll(cx);
                Ok(())
            }
        }
    }

    /// Restarts the quiet period before the next keepalive ping.
    fn arm_keepalive(&mut self) {
        if self.keepalive.is_zero() {
            self.timer = None;
            return;
        }
        let at = tokio::time::Instant::now() + self.keepalive;
        match &mut self.timer {
            Some((what @ Timer::Keepalive, sleep)) | Some((what @ Timer::Handshake, sleep)) => {
                *what = Timer::Keepalive;
                sleep.as_mut().reset(at);
            }
            Some((Timer::PingDue | Timer::Closing, _)) => {}
            None => self.timer = Some((Timer::Keepalive, Box::pin(tokio::time::sleep_until(at)))),
        }
    }

    fn send_goaway(&mut self, error: u32) {
        if !self.goaway_sent {
            h2::goaway(self.out.buf(), self.last_stream, error);
            self.goaway_sent = true;
        }
    }

    /// Reads once and handles every complete frame. Ready(Ok): bytes came
    /// (or EOF); Pending: nothing to read.
    fn poll_read_frames(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        let read = if self.rbuf.is_empty() {
            // Most reads start on a frame boundary: the thread's spare
            // buffer, not one of its own (see `poll_read_pooled`).
            crate::poll_read_pooled(Pin::new(&mut self.io), cx, crate::READ_CHUNK).map_ok(|b| {
                self.rbuf = b;
                self.rbuf.len()
            })
        } else {
            // A partial frame: read on behind it.
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(crate::READ_CHUNK);
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
        };
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                self.read_closed = true;
                return Poll::Ready(Ok(()));
            }
            // Kept until looked at: the read that ends a burst is often short.
            Poll::Ready(Ok(n)) => self.bulk_read |= n >= crate::READ_CHUNK / 2,
        }
        let r = self.handle_input();
        // An idle connection keeps no read buffer; a partial frame is kept
        // in one of its own size.
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        } else if self.rbuf.len() < 4096 && self.rbuf.capacity() > 4 * 4096 {
            self.rbuf = BytesMut::from(&self.rbuf[..]);
        }
        Poll::Ready(r)
    }

    fn handle_input(&mut self) -> Result<(), ConnError> {
        if !self.preface_done {
            let n = self.rbuf.len().min(h2::PREFACE.len());
            if self.rbuf[..n] != h2::PREFACE[..n] {
                return Err(conn_error(
                    code::PROTOCOL_ERROR,
                    "not an HTTP/2 client preface",
                ));
            }
            if n < h2::PREFACE.len() {
                return Ok(());
            }
            self.rbuf.advance(h2::PREFACE.len());
            self.preface_done = true;
        }
        while let Some(head) = Head::parse(&self.rbuf) {
            if head.len > crate::H2_MAX_FRAME as usize {
                return Err(conn_error(
                    code::FRAME_SIZE_ERROR,
                    "frame over our MAX_FRAME_SIZE",
                ));
            }
            if self.rbuf.len() < h2::HEAD_LEN + head.len {
                break;
            }
            let mut frame = self.rbuf.split_to(h2::HEAD_LEN + head.len).freeze();
            frame.advance(h2::HEAD_LEN);
            if !self.settings_seen && head.kind != kind::SETTINGS {
                return Err(conn_error(
                    code::PROTOCOL_ERROR,
                    "first frame is not SETTINGS",
                ));
            }
            self.handle_frame(head, frame)?;
        }
        Ok(())
    }

    fn stream_index(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    fn handle_frame(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if self.partial.is_some() && head.kind != kind::CONTINUATION {
            return Err(conn_error(code::PROTOCOL_ERROR, "header block interrupted"));
        }
        let no_progress = match head.kind {
            kind::DATA => head.len == 0 && head.flags & flag::END_STREAM == 0,
            kind::HEADERS | kind::CONTINUATION => {
                head.len == 0 && head.flags & flag::END_HEADERS == 0
            }
            kind::PRIORITY => true,
            kind::PING | kind::SETTINGS => head.flags & flag::ACK == 0 && self.settings_seen,
            kind::RST_STREAM | kind::GOAWAY | kind::WINDOW_UPDATE | kind::PUSH_PROMISE => false,
            _ => true,
        };
        if no_progress {
            self.charge_no_progress()?;
        }
        let connection_only = matches!(head.kind, kind::SETTINGS | kind::PING | kind::GOAWAY);
        if connection_only && head.stream != 0 {
            return Err(conn_error(
                code::PROTOCOL_ERROR,
                "connection frame on a stream",
            ));
        }
        let stream_only = matches!(
            head.kind,
            kind::DATA | kind::HEADERS | kind::PRIORITY | kind::RST_STREAM | kind::CONTINUATION
        );
        if stream_only && head.stream == 0 {
            return Err(conn_error(code::PROTOCOL_ERROR, "stream frame on stream 0"));
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload),
            kind::HEADERS => {
                if head.stream.is_multiple_of(2) {
                    return Err(conn_error(
                        code::PROTOCOL_ERROR,
                        "even stream id from a client",
                    ));
                }
                let fragment = h2::header_fragment(head.flags, payload)?;
                let partial = PartialHeaders {
                    stream: head.stream,
                    end_stream: head.flags & flag::END_STREAM != 0,
                    block: BytesMut::from(&fragment[..]),
                };
                self.gather_headers(partial, head.flags)
            }
            kind::CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(conn_error(
                        code::PROTOCOL_ERROR,
                        "CONTINUATION without HEADERS",
                    ));
                };
                if partial.stream != head.stream {
                    return Err(conn_error(
                        code::PROTOCOL_ERROR,
                        "CONTINUATION on another stream",
                    ));
                }
                partial.block.put_slice(&payload);
                self.gather_headers(partial, head.flags)
            }
            kind::PRIORITY if head.len != 5 => Err(conn_error(
                code::FRAME_SIZE_ERROR,
                "PRIORITY of the wrong size",
            )),
            kind::PRIORITY => Ok(()),
            kind::RST_STREAM => {
                if head.len != 4 {
                    return Err(conn_error(
                        code::FRAME_SIZE_ERROR,
                        "RST_STREAM of the wrong size",
                    ));
                }
                if head.stream > self.last_stream {
                    return Err(conn_error(
                        code::PROTOCOL_ERROR,
                        "RST_STREAM on an idle stream",
                    ));
                }
                if let Some(i) = self.stream_index(head.stream) {
                    let s = &mut self.streams[i];
                    s.recv_closed = true;
                    s.send_done = true;
                    s.pending = None;
                    s.pop = None;
                    self.end_inbound(i);
                }
                Ok(())
            }
            kind::SETTINGS => self.on_settings(head, &payload),
            kind::PUSH_PROMISE => Err(conn_error(
                code::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => {
                if head.len != 8 {
                    return Err(conn_error(code::FRAME_SIZE_ERROR, "PING of the wrong size"));
                }
                let opaque: [u8; 8] = payload[..8].try_into().expect("length checked");
                if head.flags & flag::ACK == 0 {
                    h2::ping(self.out.buf(), true, opaque);
                } else if opaque == KEEPALIVE_OPAQUE
                    && matches!(self.timer, Some((Timer::PingDue, _)))
                {
                    self.timer = None;
                    self.arm_keepalive();
                }
                Ok(())
            }
            kind::GOAWAY => {
                if head.len < 8 {
                    return Err(conn_error(code::FRAME_SIZE_ERROR, "GOAWAY too short"));
                }
                self.peer_goaway = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => {
                if head.len != 4 {
                    return Err(conn_error(
                        code::FRAME_SIZE_ERROR,
                        "WINDOW_UPDATE of the wrong size",
                    ));
                }
                let inc =
                    i64::from(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff);
                if head.stream == 0 {
                    if inc == 0 {
                        return Err(conn_error(code::PROTOCOL_ERROR, "zero WINDOW_UPDATE"));
                    }
                    self.conn_send_window += inc;
                    if self.conn_send_window > h2::MAX_WINDOW {
                        return Err(conn_error(
                            code::FLOW_CONTROL_ERROR,
                            "connection window overflow",
                        ));
                    }
                } else if let Some(i) = self.stream_index(head.stream) {
                    let s = &mut self.streams[i];
                    s.send_window += inc;
                    if inc == 0 || s.send_window > h2::MAX_WINDOW {
                        self.reset_stream(
                            i,
                            if inc == 0 {
                                code::PROTOCOL_ERROR
                            } else {
                                code::FLOW_CONTROL_ERROR
                            },
                        );
                    }
                } else if head.stream > self.last_stream {
                    return Err(conn_error(
                        code::PROTOCOL_ERROR,
                        "WINDOW_UPDATE on an idle stream",
                    ));
                }
                Ok(())
            }
            // Unknown frame types are ignored (RFC 9113 section 4.1).
            _ => Ok(()),
        }
    }

    /// Counts one frame that moved nothing forward against the budget.
    fn charge_no_progress(&mut self) -> Result<(), ConnError> {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.no_progress_since) >= NO_PROGRESS_PERIOD {
            self.no_progress_since = now;
            self.no_progress = 0;
        }
        self.no_progress += 1;
        if self.no_progress > NO_PROGRESS_BUDGET {
            return Err(conn_error(
                code::ENHANCE_YOUR_CALM,
                "too many frames without progress",
            ));
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.flags & flag::ACK != 0 {
            if head.len != 0 {
                return Err(conn_error(
                    code::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        let settings = h2::parse_settings(payload)?;
        if let Some(w) = settings.initial_window {
            let delta = i64::from(w) - self.peer_initial_window;
            self.peer_initial_window = i64::from(w);
            for s in &mut self.streams {
                s.send_window += delta;
                if s.send_window > h2::MAX_WINDOW {
                    return Err(conn_error(
                        code::FLOW_CONTROL_ERROR,
                        "stream window overflow",
                    ));
                }
            }
        }
        if let Some(f) = settings.max_frame {
            self.peer_max_frame = f as usize;
        }
        h2::settings_ack(self.out.buf());
        if !self.settings_seen {
            self.settings_seen = true;
            self.timer = None;
            self.arm_keepalive();
        }
        Ok(())
    }

    fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let len = head.len as i64;
        if len > self.conn_recv_window {
            return Err(conn_error(
                code::FLOW_CONTROL_ERROR,
                "DATA over the connection window",
            ));
        }
        self.conn_recv_window -= len;
        // Bad padding is a connection error whatever the stream's state
        // (RFC 9113 6.1), so it is checked before the stream is looked up.
        let data = h2::unpad(head.flags, payload)?;
        let Some(i) = self.stream_index(head.stream) else {
            if head.stream > self.last_stream {
                return Err(conn_error(code::PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream that ended: frames in flight still count against the
            // connection window, which we give back.
            self.credit_dropped(len);
            return Ok(());
        };
        let s = &mut self.streams[i];
        if s.recv_closed {
            let send_done = s.send_done;
            self.credit_dropped(len);
            if !send_done {
                self.reset_stream(i, code::STREAM_CLOSED);
            }
            return Ok(());
        }
        if len > s.recv_window {
            self.credit_dropped(len);
            self.reset_stream(i, code::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        s.recv_window -= len;
        if s.inbound_done {
            // Nobody reads this call's messages any more: the bytes are
            // dropped and both windows credited at once.
            s.recv_unacked += len;
            if head.flags & flag::END_STREAM != 0 {
                s.recv_closed = true;
            }
            self.credit_dropped(len);
            return Ok(());
        }
        let padding_only = data.is_empty() && head.flags & flag::END_STREAM == 0 && len > 0;
        // Padding is consumed at once.
        let padding = len - data.len() as i64;
        s.recv_unacked += padding;
        self.conn_recv_unacked += padding;
        s.inbox.push(data);
        if head.flags & flag::END_STREAM != 0 {
            s.recv_closed = true;
        }
        if padding_only {
            // Padding alone carries nothing.
            self.charge_no_progress()?;
        }
        Ok(())
    }

    fn gather_headers(&mut self, mut partial: PartialHeaders, flags: u8) -> Result<(), ConnError> {
        if partial.block.len() > MAX_HEADER_BLOCK {
            return Err(conn_error(
                code::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        if flags & flag::END_HEADERS == 0 {
            self.partial = Some(partial);
            if self.header_deadline.is_none() {
                self.header_deadline = Some(Box::pin(tokio::time::sleep(HEADER_BLOCK_TIMEOUT)));
            }
            return Ok(());
        }
        self.header_deadline = None;
        let block = std::mem::take(&mut partial.block);
        self.on_header_block(partial.stream, partial.end_stream, &block)
    }

    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), ConnError> {
        // Every block is decoded, even one we refuse: the HPACK dynamic
        // table must stay in step with the client's.
        let mut method_post = false;
        let mut path_ok = false;
        let mut path = String::new();
        let mut grpc_content = false;
        let mut user_agent = String::new();
        let mut fields = FieldCheck::default();
        self.hpack.decode(block, |name, value| {
            fields.see(name, value);
            match name {
                b":method" => method_post = value == b"POST",
                b":path" => {
                    path_ok = value == PROXY_PATH.as_bytes();
                    path = String::from_utf8_lossy(value).into_owned();
                }
                b"content-type" => {
                    grpc_content = value == b"application/grpc"
                        || (value.starts_with(b"application/grpc")
                            && matches!(value[16], b'+' | b';'));
                }
                b"user-agent" => user_agent = String::from_utf8_lossy(value).into_owned(),
                _ => {}
            }
        })?;
        // A malformed request or trailer block is a stream error
        // (RFC 9113 8.1.1), answered before anything else is read from it.
        let malformed = fields.malformed(self.stream_index(id).is_none());

        if let Some(i) = self.stream_index(id) {
            if malformed.is_some() {
                self.sh.metrics.bad("h2_malformed");
                self.reset_stream(i, code::PROTOCOL_ERROR);
                return Ok(());
            }
            // Trailers from the client: gRPC has none, but they end its side.
            if !end_stream {
                return Err(conn_error(
                    code::PROTOCOL_ERROR,
                    "second HEADERS without END_STREAM",
                ));
            }
            self.streams[i].recv_closed = true;
            return Ok(());
        }
        if id <= self.last_stream {
            return Err(conn_error(
                code::STREAM_CLOSED,
                "HEADERS on a closed stream",
            ));
        }
        self.last_stream = id;
        if let Some(why) = malformed {
            tracing::debug!(stream = id, why, "malformed request headers");
            self.sh.metrics.bad("h2_malformed");
            h2::rst_stream(self.out.buf(), id, code::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.goaway_sent || self.streams.len() >= self.sh.opts.max_concurrent_streams {
            h2::rst_stream(self.out.buf(), id, code::REFUSED_STREAM);
            return Ok(());
        }
        if !method_post {
            h2::http_status(self.out.buf(), id, 405);
            self.refused_call("h2_not_post", id, end_stream);
            return Ok(());
        }
        if !grpc_content {
            h2::http_status(self.out.buf(), id, 415);
            self.refused_call("h2_not_grpc", id, end_stream);
            return Ok(());
        }
        if !path_ok {
            h2::grpc_trailers(
                self.out.buf(),
                id,
                true,
                status::UNIMPLEMENTED,
                &format!("unknown method {path}"),
            );
            self.refused_call("grpc_unknown_method", id, end_stream);
            return Ok(());
        }
        let fe = self.sh.new_frontend();
        tracing::debug!(%user_agent, stream = fe.uid, "proxy stream opened");
        self.sh
            .metrics
            .grpc_connections
            .with_label_values(&[PROXY_PATH])
            .inc();
        self.streams.push(Stream {
            id,
            fe,
            inbox: Inbox::charged_to(self.sh.queued.clone()),
            processing: None,
            inbound_done: false,
            recv_closed: end_stream,
            recv_window: STREAM_WINDOW,
            recv_unacked: 0,
            recv_advance: 0,
            send_window: self.peer_initial_window,
            pending: None,
            pop: None,
            send_done: false,
            head_sent: false,
        });
        Ok(())
    }

    /// A call answered without a stream of ours: counted, and the client's
    /// side reset if it is still open.
    fn refused_call(&mut self, metric: &'static str, id: u32, end_stream: bool) {
        self.sh.metrics.bad(metric);
        if !end_stream {
            h2::rst_stream(self.out.buf(), id, code::NO_ERROR);
        }
    }

    /// Ends one stream with RST_STREAM (a stream error).
    fn reset_stream(&mut self, i: usize, error: u32) {
        let s = &mut self.streams[i];
        if !s.send_done {
            h2::rst_stream(self.out.buf(), s.id, error);
        }
        s.send_done = true;
        s.recv_closed = true;
        s.pending = None;
        s.pop = None;
        if error != code::NO_ERROR {
            self.sh.metrics.bad(h2_metric(error));
        }
        self.end_inbound(i);
    }

    /// No more client packets for this stream: its frontend is released
    /// (its queue closes once drained), after a packet still in flight.
    fn end_inbound(&mut self, i: usize) {
        let s = &mut self.streams[i];
        if s.inbound_done {
            return;
        }
        s.inbound_done = true;
        // Bytes received but never to be read still count against both
        // windows: credit them, or a client cancelling calls with data in
        // flight would see its connection window shrink for good.
        // (The inbox dropped here gives its bytes back to the server's count.)
        let dropped = std::mem::take(&mut s.inbox).len as i64;
        self.consumed(i, dropped);
        // Window granted ahead for bytes that have not come: whatever
        // still arrives for this stream pays it off.
        let s = &mut self.streams[i];
        self.orphan_advance += std::mem::take(&mut s.recv_advance);
        let (sh, fe) = (self.sh.clone(), s.fe.clone());
        match s.processing.take() {
            // The packet in flight is delivered before the agent hears of
            // the end, unless it waits longer than DRAIN_AFTER_CLOSE (for
            // flow-control credit from a backend that never reads): the
            // client is gone, and a wait for ever would keep the tunnel
            // and its bytes for good.
            Some(p) => {
                tokio::spawn(async move {
                    if tokio::time::timeout(crate::DRAIN_AFTER_CLOSE, p)
                        .await
                        .is_err()
                    {
                        sh.metrics.drain_timeouts_total.inc();
                    }
                    release(&sh, &fe);
                });
            }
            None => release(&sh, &fe),
        }
    }

    /// Moves every stream on as far as it can go. True if anything moved.
    fn drive_streams(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut i = 0;
        while i < self.streams.len() {
            progress |= self.drive_inbound(i, cx);
            progress |= self.drive_outbound(i, cx);
            let s = &self.streams[i];
            if s.send_done && s.inbound_done {
                self.streams.swap_remove(i);
                progress = true;
            } else {
                i += 1;
            }
        }
        progress | self.give_back_windows()
    }

    fn drive_inbound(&mut self, i: usize, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            let s = &mut self.streams[i];
            if s.inbound_done {
                return progress;
            }
            if let Some(p) = &mut s.processing {
                match p.as_mut().poll(cx) {
                    Poll::Pending => return progress,
                    Poll::Ready(keep) => {
                        s.processing = None;
                        progress = true;
                        if !keep {
                            self.end_inbound(i);
                            return true;
                        }
                    }
                }
            }
            match s.inbox.next_packet() {
                Ok(Some((packet, consumed))) => {
                    self.consumed(i, consumed as i64);
                    let s = &mut self.streams[i];
                    let (sh, fe) = (self.sh.clone(), s.fe.clone());
                    s.processing = Some(Box::pin(async move {
                        sh.handle_frontend_packet(&fe, packet).await
                    }));
                    progress = true;
                }
                Ok(None) => {
                    s.inbox.compact();
                    if s.recv_closed {
                        if s.inbox.len > 0 {
                            tracing::debug!(stream = s.id, "client stream ended inside a message");
                        }
                        self.end_inbound(i);
                        return true;
                    }
                    return self.open_for_message(i) | progress;
                }
                Err(e) => {
                    self.sh.metrics.bad("grpc_bad_message");
                    tracing::info!(status = e.status, message = %e.message, "gRPC call refused");
                    let s = &mut self.streams[i];
                    if !s.send_done {
                        h2::grpc_trailers(self.out.buf(), s.id, !s.head_sent, e.status, &e.message);
                        s.send_done = true;
                        s.pending = None;
                        s.pop = None;
                    }
                    if !s.recv_closed {
                        h2::rst_stream(self.out.buf(), s.id, code::NO_ERROR);
                        s.recv_closed = true;
                    }
                    self.end_inbound(i);
                    return true;
                }
            }
        }
    }

    fn drive_outbound(&mut self, i: usize, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            let s = &mut self.streams[i];
            if s.send_done {
                return progress;
            }
            if let Some(message) = &mut s.pending {
                let n = (message.len as i64)
                    .min(s.send_window)
                    .min(self.conn_send_window)
                    .min(self.peer_max_frame as i64);
                if n <= 0 {
                    return progress;
                }
                self.out.data(s.id, message, n as usize);
                if message.len == 0 {
                    s.pending = None;
                }
                s.send_window -= n;
                self.conn_send_window -= n;
                progress = true;
                continue;
            }
            if self.out.len() >= OUT_HIGH_WATER {
                return progress;
            }
            let pop = s.pop.get_or_insert_with(|| {
                let fe = s.fe.clone();
                Box::pin(async move { fe.queue.pop_charged().await })
            });
            match pop.as_mut().poll(cx) {
                Poll::Pending => return progress,
                Poll::Ready(Some((packet, charge))) => {
                    s.pop = None;
                    if let Some(crate::proto::Payload::Data(d)) = &packet.payload {
                        self.sh.delivered(&s.fe, d.connect_id, d.data.len());
                    }
                    if !s.head_sent {
                        h2::grpc_response_headers(self.out.buf(), s.id);
                        s.head_sent = true;
                    }
                    s.pending = Some(encode_message(&packet, charge));
                    progress = true;
                }
                Poll::Ready(None) => {
                    s.pop = None;
                    s.send_done = true;
                    h2::grpc_trailers(self.out.buf(), s.id, !s.head_sent, status::OK, "");
                    if !s.recv_closed {
                        // The call is over; the client need not finish sending.
                        h2::rst_stream(self.out.buf(), s.id, code::NO_ERROR);
                        s.recv_closed = true;
                    }
                    self.end_inbound(i);
                    return true;
                }
            }
        }
    }

    /// `n` bytes of stream `i` were consumed (decoded, or dropped with its
    /// inbox): what was granted ahead for them is paid off, the rest is
    /// given back with the next WINDOW_UPDATEs.
    fn consumed(&mut self, i: usize, n: i64) {
        let s = &mut self.streams[i];
        let paid = n.min(s.recv_advance);
        s.recv_advance -= paid;
        self.conn_advance -= paid;
        s.recv_unacked += n - paid;
        self.conn_recv_unacked += n - paid;
    }

    /// `n` bytes arrived for a stream that reads nothing more: they count
    /// against the connection window only, which is given back (after
    /// paying off what ended streams were granted ahead).
    fn credit_dropped(&mut self, n: i64) {
        let paid = n.min(self.orphan_advance);
        self.orphan_advance -= paid;
        self.conn_advance -= paid;
        self.conn_recv_unacked += n - paid;
    }

    /// Stream `i` waits for the rest of a message. Window is given back
    /// in quarter-window batches, so up to a quarter of each window can be
    /// consumed and not yet returned, and the message bytes already here
    /// are not consumed until it is whole: a message larger than what the
    /// windows still allow would never arrive (a 4 MiB write stalled that
    /// way). As grpc-go's receive window does for a large message, this
    /// returns what was consumed and, if that is not enough, grants the
    /// shortfall ahead (bounded per connection by `MAX_ADVANCE`).
    fn open_for_message(&mut self, i: usize) -> bool {
        let s = &mut self.streams[i];
        let need = s.inbox.missing() as i64;
        if need <= s.recv_window.min(self.conn_recv_window) {
            return false;
        }
        let stream_open = s.recv_window + s.recv_unacked;
        let conn_open = self.conn_recv_window + self.conn_recv_unacked;
        let mut ahead = (need - stream_open.min(conn_open)).max(0);
        if self.conn_advance + ahead > MAX_ADVANCE {
            ahead = 0;
        }
        let stream_inc = s.recv_unacked + ahead;
        let conn_inc = self.conn_recv_unacked + ahead;
        if stream_inc > 0 {
            h2::window_update(self.out.buf(), s.id, stream_inc as u32);
            s.recv_window += stream_inc;
            s.recv_unacked = 0;
            s.recv_advance += ahead;
        }
        if conn_inc > 0 {
            h2::window_update(self.out.buf(), 0, conn_inc as u32);
            self.conn_recv_window += conn_inc;
            self.conn_recv_unacked = 0;
            self.conn_advance += ahead;
        }
        stream_inc > 0 || conn_inc > 0
    }

    /// WINDOW_UPDATEs for what was consumed, once a quarter window gathered.
    fn give_back_windows(&mut self) -> bool {
        let mut sent = false;
        for s in &mut self.streams {
            if !s.recv_closed && s.recv_unacked >= STREAM_WINDOW / 4 {
                h2::window_update(self.out.buf(), s.id, s.recv_unacked as u32);
                s.recv_window += s.recv_unacked;
                s.recv_unacked = 0;
                sent = true;
            }
        }
        if self.conn_recv_unacked >= CONN_WINDOW / 4 {
            h2::window_update(self.out.buf(), 0, self.conn_recv_unacked as u32);
            self.conn_recv_window += self.conn_recv_unacked;
            self.conn_recv_unacked = 0;
            sent = true;
        }
        sent
    }

    /// The connection is over: every stream's frontend is released.
    fn end_all_streams(&mut self) {
        for i in 0..self.streams.len() {
            self.end_inbound(i);
        }
        self.streams.clear();
    }
}

fn release(sh: &Shared, fe: &Frontend) {
    sh.frontend_gone(fe);
    sh.metrics
        .grpc_connections
        .with_label_values(&[PROXY_PATH])
        .dec();
}

/// One gRPC message on its way out, in parts: DATA payloads are not
/// copied into the encoding, they follow its head.
struct OutMessage {
    parts: VecDeque<Bytes>,
    len: usize,
    /// The packet's bytes stay counted in the server's queued bytes while
    /// the client's windows hold the message here, then in [`Out`] until
    /// written.
    charge: Charge,
}

/// A packet as a gRPC message, its DATA payload not copied.
fn encode_message(p: &Packet, charge: Charge) -> OutMessage {
    let e = crate::grpc_wire::encode(p);
    let len = e.len();
    let mut parts = VecDeque::with_capacity(2);
    parts.push_back(e.head);
    if !e.payload.is_empty() {
        parts.push_back(e.payload);
    }
    OutMessage { parts, len, charge }
}

/// The `bad_input_total` kind of a connection error: ENHANCE_YOUR_CALM
/// covers several limits, told apart by their reason.
fn conn_error_metric(e: &ConnError) -> &'static str {
    match e.reason {
        "header block too large" => "h2_header_block_too_large",
        "decoded header list over SETTINGS_MAX_HEADER_LIST_SIZE" => "h2_header_list_too_large",
        "too many frames without progress" => "h2_no_progress_flood",
        _ => h2_metric(e.code),
    }
}

fn h2_metric(error: u32) -> &'static str {
    match error {
        code::PROTOCOL_ERROR => "h2_protocol_error",
        code::FLOW_CONTROL_ERROR => "h2_flow_control_error",
        code::FRAME_SIZE_ERROR => "h2_frame_size_error",
        code::COMPRESSION_ERROR => "h2_compression_error",
        code::STREAM_CLOSED => "h2_stream_closed",
        code::ENHANCE_YOUR_CALM => "h2_enhance_your_calm",
        _ => "h2_error",
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::{Backend, Identifiers};
    use super::*;
    use crate::h2::HEAD_LEN;
    use crate::proto::Checked;
    use crate::server::ProxyServer;
    use crate::server::fuzzing::{grpc_call_start, grpc_message, small_options};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::mpsc;

    /// The client end of one connection to an in-process server whose one
    /// agent answers every dial with connectID 7 and echoes DATA.
    struct Client {
        io: DuplexStream,
        buf: Vec<u8>,
        sh: Arc<Shared>,
        agent: Arc<Backend>,
        /// How long a read may wait for the server.
        patience: Duration,
    }

    fn connect() -> Client {
        connect_with(small_options(0, 0))
    }

    fn connect_with(opts: crate::server::ServerOptions) -> Client {
        connect_keepalive(opts, Duration::ZERO)
    }

    fn connect_keepalive(opts: crate::server::ServerOptions, keepalive: Duration) -> Client {
        let sh = ProxyServer::new(opts).shared;
        let (tx, mut rx) = mpsc::channel::<Packet>(64);
        let agent = Arc::new(Backend::new(
            &sh,
            "agent".into(),
            Identifiers::default(),
            tx,
            0,
        ));
        sh.add_backend(agent.clone());
        let (sh2, agent2) = (sh.clone(), agent.clone());
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let answer = match p.checked() {
                    Ok(Checked::DialReq(d)) => Packet::dial_rsp(d.random, 7, ""),
                    Ok(Checked::Data(d)) => Packet::data(7, d.data),
                    Ok(Checked::CloseReq(_)) => Packet::close_rsp(7, ""),
                    _ => continue,
                };
                sh2.handle_agent_packet(&agent2, answer);
            }
        });
        // A socket buffer smaller than the server's output high-water mark.
        let (io, server) = tokio::io::duplex(64 << 10);
        tokio::spawn(serve(sh.clone(), server, keepalive, StreamEnd::Shutdown));
        Client {
            io,
            buf: Vec::new(),
            sh,
            agent,
            patience: Duration::from_secs(5),
        }
    }

    impl Client {
        async fn send(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
        }

        async fn send_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let mut out = BytesMut::new();
            Head {
                len: payload.len(),
                kind,
                flags,
                stream,
            }
            .write(&mut out);
            out.put_slice(payload);
            self.send(&out).await;
        }

        /// The next frame; None once the server closed the connection.
        async fn frame(&mut self) -> Option<(Head, Vec<u8>)> {
            loop {
                if let Some(h) = Head::parse(&self.buf)
                    && self.buf.len() >= HEAD_LEN + h.len
                {
                    let payload = self.buf[HEAD_LEN..HEAD_LEN + h.len].to_vec();
                    self.buf.drain(..HEAD_LEN + h.len);
                    return Some((h, payload));
                }
                let mut tmp = vec![0u8; 1 << 16];
                let n = tokio::time::timeout(self.patience, self.io.read(&mut tmp))
                    .await
                    .expect("the server answers in time")
                    .unwrap_or(0);
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&tmp[..n]);
            }
        }

        /// Frames up to the first of `kind`, which is returned.
        async fn until(&mut self, kind: u8) -> (Head, Vec<u8>) {
            loop {
                let f = self.frame().await.expect("connection open");
                if f.0.kind == kind {
                    return f;
                }
            }
        }

        /// The packets carried by DATA frames on `stream` until `n` came.
        async fn packets(&mut self, stream: u32, n: usize) -> Vec<Checked> {
            let mut bytes = Vec::new();
            let mut out = Vec::new();
            while out.len() < n {
                let (h, p) = self.until(kind::DATA).await;
                assert_eq!(h.stream, stream);
                bytes.extend_from_slice(&p);
                while bytes.len() >= 5 {
                    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
                    if bytes.len() < 5 + len {
                        break;
                    }
                    let packet = Packet::decode(&bytes[5..5 + len]).unwrap();
                    out.push(packet.checked().unwrap());
                    bytes.drain(..5 + len);
                }
            }
            out
        }

        async fn trailers(&mut self) -> Vec<(String, String)> {
            loop {
                let (h, p) = self.until(kind::HEADERS).await;
                if h.flags & flag::END_STREAM != 0 {
                    return crate::h2::tests::decode(&p);
                }
            }
        }
    }

    impl Client {
        /// A second client connection to the same server.
        fn another(&self) -> Client {
            let (io, server) = tokio::io::duplex(64 << 10);
            tokio::spawn(serve(
                self.sh.clone(),
                server,
                Duration::ZERO,
                StreamEnd::Shutdown,
            ));
            Client {
                io,
                buf: Vec::new(),
                sh: self.sh.clone(),
                agent: self.agent.clone(),
                patience: self.patience,
            }
        }

        fn bad(&self, kind: &str) -> u64 {
            self.sh
                .metrics
                .bad_input_total
                .with_label_values(&[kind])
                .get()
        }

        /// The GOAWAY's error code; the connection must close after it.
        async fn goaway_code(&mut self) -> u32 {
            let (_, p) = self.until(kind::GOAWAY).await;
            assert!(
                self.frame().await.is_none(),
                "connection closed after GOAWAY"
            );
            u32::from_be_bytes(p[4..8].try_into().unwrap())
        }
    }

    /// A legitimate call on a fresh connection: dial, answer, close.
    async fn a_call_still_works(c: &Client) {
        let mut ok = c.another();
        ok.send(&grpc_call_start(1)).await;
        ok.send_frame(
            kind::DATA,
            0,
            1,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 5)),
        )
        .await;
        match &ok.packets(1, 1).await[..] {
            [Checked::DialRsp(r)] => assert_eq!((r.random, r.connect_id), (5, 7)),
            other => panic!("{other:?}"),
        }
    }

    fn headers_frame(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        Head {
            len: block.len(),
            kind: kind::HEADERS,
            flags,
            stream,
        }
        .write(&mut out);
        out.put_slice(block);
        out.to_vec()
    }

    /// An HPACK integer (RFC 7541 section 5.1) after `first`'s flag bits.
    fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut v: usize) {
        let max = (1usize << prefix_bits) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn status_of(trailers: &[(String, String)]) -> &str {
        &trailers
            .iter()
            .find(|(n, _)| n == "grpc-status")
            .expect("grpc-status")
            .1
    }

    #[test]
    fn a_waiting_partial_message_does_not_pin_the_read_buffer() {
        let read_buffer = Bytes::from(vec![0u8; 64 << 10]);
        let message = grpc_message(&Packet::data(7, Bytes::from_static(b"hello")));
        let mut inbox = Inbox::default();
        // Three bytes of a message, as two slices of one big read.
        inbox.push(read_buffer.slice(100..102));
        inbox.push(Bytes::copy_from_slice(&message[..1]));
        assert!(matches!(inbox.next_packet(), Ok(None)));
        inbox.compact();
        let big = read_buffer.as_ptr_range();
        assert_eq!(inbox.chunks.len(), 1);
        assert!(
            !big.contains(&inbox.chunks[0].as_ptr()),
            "still a slice of the read buffer"
        );
        assert_eq!(inbox.len, 3);
        // Large partial messages are left as they are.
        let mut inbox = Inbox::default();
        inbox.push(read_buffer.slice(..COPY_BELOW));
        inbox.compact();
        assert!(big.contains(&inbox.chunks[0].as_ptr()));
    }

    /// A socket that records whether it was shut down.
    struct ShutdownSeen<S> {
        io: S,
        seen: Arc<std::sync::atomic::AtomicBool>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for ShutdownSeen<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for ShutdownSeen<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.seen.store(true, std::sync::atomic::Ordering::SeqCst);
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// On a bare socket (`StreamEnd::Close`) the connection ends by being
    /// dropped, with no shutdown of its own; with `StreamEnd::Shutdown`
    /// (TLS) it is shut down first. Either way a client that says all it
    /// had to say and half-closes gets the server's frames, then EOF.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_bare_socket_ends_with_eof_after_the_frames() {
        for (end, shut) in [(StreamEnd::Close, false), (StreamEnd::Shutdown, true)] {
            let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let got = end_after_half_close(end, seen.clone()).await;
            assert_eq!(
                seen.load(std::sync::atomic::Ordering::SeqCst),
                shut,
                "{end:?}: shutdown called"
            );
            // SETTINGS, WINDOW_UPDATE and the SETTINGS ACK came before the EOF.
            let kinds: Vec<u8> = {
                let mut at = 0;
                let mut kinds = Vec::new();
                while at + 9 <= got.len() {
                    let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                    kinds.push(got[at + 3]);
                    at += 9 + len;
                }
                assert_eq!(at, got.len(), "whole frames");
                kinds
            };
            assert_eq!(
                kinds,
                [kind::SETTINGS, kind::WINDOW_UPDATE, kind::SETTINGS],
                "{got:?}"
            );
        }
    }

    /// What a client that sends the preface and SETTINGS, then half-closes,
    /// reads until EOF from a connection ended with `end`.
    #[cfg(unix)]
    async fn end_after_half_close(
        end: StreamEnd,
        seen: Arc<std::sync::atomic::AtomicBool>,
    ) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sh = ProxyServer::new(small_options(0, 0)).shared;
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let server = ShutdownSeen { io: server, seen };
        let task = tokio::spawn(serve(sh, server, Duration::ZERO, end));
        let mut start = BytesMut::from(&crate::h2::PREFACE[..]);
        crate::h2::settings(&mut start, &[]);
        client.write_all(&start).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the server never ended the connection")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        got
    }

    #[tokio::test]
    async fn a_call_ended_before_any_message_gets_a_trailers_only_response() {
        let mut c = connect();
        c.send(&crate::h2::PREFACE[..]).await;
        let mut settings = BytesMut::new();
        crate::h2::settings(&mut settings, &[]);
        c.send(&settings).await;
        let block = crate::h2::request_block(b"/ProxyService/Proxy");
        c.send(&headers_frame(
            1,
            flag::END_HEADERS | flag::END_STREAM,
            &block,
        ))
        .await;
        let (h, block) = c.until(kind::HEADERS).await;
        assert_eq!(h.stream, 1);
        assert_eq!(
            h.flags & flag::END_STREAM,
            flag::END_STREAM,
            "the only HEADERS of the call ends it"
        );
        let fields = crate::h2::tests::decode(&block);
        assert_eq!(fields[0], (":status".into(), "200".into()));
        assert!(
            fields.contains(&("content-type".into(), "application/grpc".into())),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("grpc-status".into(), "0".into())),
            "{fields:?}"
        );
        let streams =
            c.sh.metrics
                .grpc_connections
                .with_label_values(&[PROXY_PATH]);
        until_true("the call's count is released", || streams.get() == 0).await;
    }

    #[tokio::test]
    async fn a_call_dials_echoes_closes_and_releases_everything() {
        let mut c = connect();
        c.send(&grpc_call_start(1)).await;
        let (h, _) = c.frame().await.unwrap();
        assert_eq!(h.kind, kind::SETTINGS);
        c.send_frame(
            kind::DATA,
            0,
            1,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 42)),
        )
        .await;
        // The response head comes with the first message, as grpc-go's.
        let (h, block) = c.until(kind::HEADERS).await;
        assert_eq!((h.stream, h.flags & flag::END_STREAM), (1, 0));
        assert_eq!(
            crate::h2::tests::decode(&block)[0],
            (":status".into(), "200".into())
        );
        match &c.packets(1, 1).await[..] {
            [Checked::DialRsp(r)] => assert_eq!((r.random, r.connect_id), (42, 7)),
            other => panic!("{other:?}"),
        }
        // A message split over two frames, then one frame with two messages.
        let m = grpc_message(&Packet::data(7, Bytes::from_static(b"one")));
        c.send_frame(kind::DATA, 0, 1, &m[..3]).await;
        c.send_frame(kind::DATA, 0, 1, &m[3..]).await;
        let two = [
            grpc_message(&Packet::data(7, "two".into())),
            grpc_message(&Packet::data(7, "three".into())),
        ]
        .concat();
        c.send_frame(kind::DATA, 0, 1, &two).await;
        let echoed: Vec<_> = c
            .packets(1, 3)
            .await
            .into_iter()
            .map(|p| match p {
                Checked::Data(d) => String::from_utf8(d.data.to_vec()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(echoed, ["one", "two", "three"]);
        assert_eq!(c.sh.metrics.established_connections.get(), 1);

        c.send_frame(kind::DATA, 0, 1, &grpc_message(&Packet::close_req(7)))
            .await;
        assert!(matches!(&c.packets(1, 1).await[..], [Checked::CloseRsp(_)]));
        assert_eq!(status_of(&c.trailers().await), "0");
        // The call is over before the client half-closed: it is told so.
        let (h, p) = c.until(kind::RST_STREAM).await;
        assert_eq!((h.stream, &p[..]), (1, &[0, 0, 0, 0][..]));
        assert_eq!(c.sh.metrics.established_connections.get(), 0);
        let streams =
            c.sh.metrics
                .grpc_connections
                .with_label_values(&[PROXY_PATH]);
        assert_eq!(streams.get(), 0);
        assert_eq!(c.sh.metrics.pending_backend_dials.get(), 0);
        drop(c.agent);
    }

    /// A client that sends only inside the windows we give (as grpc-go
    /// and hyper do) and writes a message of nearly the 4 MiB limit after
    /// a small one. The small one's bytes are consumed but, under a
    /// quarter window, not given back, and the large one is consumed only
    /// once whole: without the window opened for it, the client waits for
    /// a WINDOW_UPDATE that never comes. Time is paused, so a stall ends
    /// the read's patience at once.
    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_window_left_arrives_whole() {
        let mut c = connect();
        c.send(&grpc_call_start(1)).await;
        // The client's send windows: our SETTINGS give each stream
        // STREAM_WINDOW; the connection gets our opening WINDOW_UPDATE.
        let (mut stream_win, mut conn_win) = (STREAM_WINDOW, h2::DEFAULT_WINDOW);
        let credit = |h: &Head, p: &[u8], stream_win: &mut i64, conn_win: &mut i64| {
            if h.kind == kind::WINDOW_UPDATE {
                let inc = i64::from(u32::from_be_bytes(p[..4].try_into().unwrap()));
                match h.stream {
                    0 => *conn_win += inc,
                    _ => *stream_win += inc,
                }
            }
        };
        let small = [
            grpc_message(&Packet::dial_req("tcp", "x:1", 42)),
            grpc_message(&Packet::data(7, vec![1; 71].into())),
        ];
        // Each answered (DIAL_RSP, then the echo) before the next goes.
        for m in &small {
            stream_win -= m.len() as i64;
            conn_win -= m.len() as i64;
            c.send_frame(kind::DATA, 0, 1, m).await;
            loop {
                let (h, p) = c.frame().await.expect("connection open");
                credit(&h, &p, &mut stream_win, &mut conn_win);
                if h.kind == kind::DATA {
                    break;
                }
            }
        }
        let big = grpc_message(&Packet::data(
            7,
            vec![7; crate::MAX_MESSAGE_BYTES - 64].into(),
        ));
        assert!(big.len() > (STREAM_WINDOW - STREAM_WINDOW / 4) as usize);
        let mut sent = 0;
        while sent < big.len() {
            let n = (big.len() - sent)
                .min(16 << 10)
                .min(stream_win.min(conn_win).max(0) as usize);
            if n == 0 {
                let (h, p) = c
                    .frame()
                    .await
                    .expect("a WINDOW_UPDATE for the rest of the message");
                credit(&h, &p, &mut stream_win, &mut conn_win);
                continue;
            }
            c.send_frame(kind::DATA, 0, 1, &big[sent..sent + n]).await;
            stream_win -= n as i64;
            conn_win -= n as i64;
            sent += n;
        }
        // The server took it whole and passed it on in pieces, which the
        // agent echoes: the first piece's message starts coming back.
        let (h, p) = c.until(kind::DATA).await;
        assert_eq!(h.stream, 1);
        let piece = grpc_message(&Packet::data(7, vec![7; crate::MAX_DATA_PIECE].into()));
        assert_eq!(
            u32::from_be_bytes(p[1..5].try_into().unwrap()) as usize,
            piece.len() - 5
        );
    }

    #[tokio::test]
    async fn what_we_send_stays_inside_the_client_windows() {
        let mut c = connect();
        // A 10-byte window for every stream of this client.
        let mut settings = BytesMut::new();
        h2::settings(&mut settings, &[(setting::INITIAL_WINDOW_SIZE, 10)]);
        let start = grpc_call_start(1);
        let settings_end = h2::PREFACE.len() + HEAD_LEN;
        c.send(&start[..h2::PREFACE.len()]).await;
        c.send(&settings).await;
        c.send(&start[settings_end..]).await;
        c.send_frame(
            kind::DATA,
            0,
            1,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 1)),
        )
        .await;
        let mut got = Vec::new();
        while got.len() < 10 {
            let (h, p) = c.frame().await.unwrap();
            if h.kind == kind::DATA {
                got.extend_from_slice(&p);
            }
        }
        assert_eq!(got.len(), 10, "sent past a 10-byte window");
        // Nothing more until the window opens.
        let more = tokio::time::timeout(Duration::from_millis(200), c.frame()).await;
        assert!(more.is_err(), "a frame past the window: {more:?}");
        let mut inc = BytesMut::new();
        h2::window_update(&mut inc, 1, 1000);
        c.send(&inc).await;
        let (h, p) = c.until(kind::DATA).await;
        assert_eq!(h.stream, 1);
        got.extend_from_slice(&p);
        let packet = Packet::decode(&got[5..]).unwrap();
        match packet.checked().unwrap() {
            Checked::DialRsp(r) => assert_eq!((r.random, r.connect_id), (1, 7)),
            other => panic!("{other:?}"),
        }
    }

    /// A call on stream 1 with 4 MiB stream and 16 MiB connection windows
    /// from the client, dialled (the agent's connectID is 7).
    async fn download_call() -> Client {
        let mut c = connect_with(crate::server::ServerOptions {
            connection_queue_bytes: 64 << 20,
            ..small_options(0, 0)
        });
        let mut start = BytesMut::new();
        start.put_slice(h2::PREFACE);
        h2::settings(&mut start, &[(setting::INITIAL_WINDOW_SIZE, 4 << 20)]);
        h2::window_update(&mut start, 0, 16 << 20);
        c.send(&start).await;
        let call = grpc_call_start(1);
        c.send(&call[h2::PREFACE.len() + HEAD_LEN..]).await;
        c.send_frame(
            kind::DATA,
            0,
            1,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 1)),
        )
        .await;
        assert!(matches!(&c.packets(1, 1).await[..], [Checked::DialRsp(_)]));
        c
    }

    impl Client {
        /// Reads stream 1's DATA until `expected` bytes came, giving the
        /// window back each time `ack_every` were used; returns the bytes.
        async fn read_download(&mut self, expected: usize, ack_every: usize) -> usize {
            let (mut got, mut unacked) = (0usize, 0usize);
            while got < expected {
                let (h, p) = self.until(kind::DATA).await;
                assert_eq!(h.stream, 1);
                got += p.len();
                unacked += p.len();
                if unacked >= ack_every {
                    let mut inc = BytesMut::new();
                    h2::window_update(&mut inc, 1, unacked as u32);
                    self.send(&inc).await;
                    unacked = 0;
                }
            }
            got
        }
    }

    /// More than the output high-water mark in flight: the server must keep
    /// reading the client's WINDOW_UPDATEs once its output drains.
    #[tokio::test]
    async fn a_download_larger_than_the_output_buffer_completes() {
        let mut c = download_call().await;
        // 12 MiB from the agent, in 64 KiB packets, queued at once.
        const TOTAL: usize = 12 << 20;
        let chunk = Bytes::from(vec![5u8; 64 << 10]);
        for _ in 0..TOTAL / chunk.len() {
            c.sh.handle_agent_packet(&c.agent, Packet::data(7, chunk.clone()));
        }
        // The client gives window back only once all of it is used.
        let per_message = encode_message(&Packet::data(7, chunk.clone()), Charge::none()).len;
        let expected = per_message * (TOTAL / chunk.len());
        // Every message whole, nothing lost, nothing extra.
        assert_eq!(
            c.read_download(expected, (4 << 20) - (64 << 10)).await,
            expected
        );
    }

    /// Messages in the output buffer, waiting for a client that does not
    /// read, stay counted in the server's queued bytes until the socket
    /// takes them (the cap sees them), and are given back once it does.
    #[tokio::test]
    async fn output_waiting_for_the_client_socket_stays_counted() {
        let mut c = download_call().await;
        // 3 MiB from the agent in 32 KiB packets; the client reads nothing,
        // and its socket (64 KiB) takes about two of them.
        const TOTAL: usize = 3 << 20;
        const PIECE: usize = 32 << 10;
        let chunk = Bytes::from(vec![6u8; PIECE]);
        for _ in 0..TOTAL / PIECE {
            c.sh.handle_agent_packet(&c.agent, Packet::data(7, chunk.clone()));
        }
        let sh = c.sh.clone();
        until_true("the socket took some", || sh.queued.held() < TOTAL).await;
        // Time for the server to fill its output buffer (1 MiB) too.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let held = sh.queued.held();
        assert!(
            held >= TOTAL - 3 * PIECE,
            "only {held} of the {TOTAL} bytes the client has not taken are counted"
        );
        // The client reads it all: everything is given back.
        let per_message = encode_message(&Packet::data(7, chunk), Charge::none()).len;
        let expected = per_message * (TOTAL / PIECE);
        c.read_download(expected, 1 << 20).await;
        until_true("every byte given back", || sh.queued.held() == 0).await;
    }

    #[tokio::test]
    async fn refused_calls_get_grpc_statuses_and_leave_the_connection_open() {
        let mut c = connect();
        c.send(&grpc_call_start(1)).await;
        // A compressed message ends only its call.
        c.send_frame(kind::DATA, 0, 1, &[1, 0, 0, 0, 1, 0]).await;
        let t = c.trailers().await;
        assert_eq!(status_of(&t), "12", "{t:?}");
        // So does one over the 4 MiB limit (refused from its prefix).
        let mut again = grpc_call_start(3);
        again.drain(..h2::PREFACE.len() + HEAD_LEN);
        c.send(&again).await;
        c.send_frame(kind::DATA, 0, 3, &[0, 0x7f, 0, 0, 0]).await;
        assert_eq!(status_of(&c.trailers().await), "8");
        // An undecodable packet.
        let mut again = grpc_call_start(5);
        again.drain(..h2::PREFACE.len() + HEAD_LEN);
        c.send(&again).await;
        c.send_frame(kind::DATA, 0, 5, &[0, 0, 0, 0, 2, 0xff, 0xff])
            .await;
        assert_eq!(status_of(&c.trailers().await), "13");
        // An unknown method (path is literal, name from the static table).
        let block = h2::request_block(b"/x/y");
        c.send_frame(
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            7,
            &block,
        )
        .await;
        let t = c.trailers().await;
        assert_eq!(status_of(&t), "12");
        assert!(
            t.iter()
                .any(|(n, v)| n == "grpc-message" && v.contains("/x/y"))
        );
        // Still serving: a ping is answered.
        c.send_frame(kind::PING, 0, 0, b"12345678").await;
        let (h, p) = c.until(kind::PING).await;
        assert_eq!((h.flags, &p[..]), (flag::ACK, &b"12345678"[..]));
        let streams =
            c.sh.metrics
                .grpc_connections
                .with_label_values(&[PROXY_PATH]);
        assert_eq!(streams.get(), 0);
    }

    /// Time is paused: the runtime jumps to each deadline once idle.
    #[tokio::test(start_paused = true)]
    async fn silent_clients_are_dropped_and_answering_ones_kept() {
        // No preface within the handshake deadline.
        let mut c = connect();
        c.patience = Duration::from_secs(86_400);
        let t0 = tokio::time::Instant::now();
        assert_eq!(c.frame().await.unwrap().0.kind, kind::SETTINGS);
        while c.frame().await.is_some() {}
        assert!(t0.elapsed() >= HANDSHAKE_TIMEOUT);
        assert_eq!(
            c.sh.metrics
                .bad_input_total
                .with_label_values(&["h2_handshake_timeout"])
                .get(),
            1
        );

        // Keepalive every 30 s: a client that answers stays for hours.
        let mut c = connect_keepalive(small_options(0, 0), Duration::from_secs(30));
        c.patience = Duration::from_secs(86_400);
        c.send(&grpc_call_start(1)).await;
        for _ in 0..200 {
            let (h, p) = c.until(kind::PING).await;
            assert_eq!(h.flags, 0);
            c.send_frame(kind::PING, flag::ACK, 0, &p).await;
        }
        assert!(t0.elapsed() >= Duration::from_secs(200 * 30));
        // One that stops answering is dropped 20 s after the next ping.
        c.until(kind::PING).await;
        let silent = tokio::time::Instant::now();
        while c.frame().await.is_some() {}
        assert!(silent.elapsed() >= PING_TIMEOUT);
        assert_eq!(
            c.sh.metrics
                .bad_input_total
                .with_label_values(&["h2_ping_timeout"])
                .get(),
            1
        );
        let streams =
            c.sh.metrics
                .grpc_connections
                .with_label_values(&[PROXY_PATH]);
        assert_eq!(
            streams.get(),
            0,
            "the dropped connection's call is released"
        );
    }

    #[tokio::test]
    async fn protocol_errors_end_the_connection_with_goaway() {
        let cases: [(&[u8], u32); 5] = [
            (b"GET / HTTP/1.1\r\n\r\n", code::PROTOCOL_ERROR),
            // DATA on stream 0.
            (&[0, 0, 1, 0, 0, 0, 0, 0, 0, 0], code::PROTOCOL_ERROR),
            // A PING of 3 bytes.
            (
                &[0, 0, 3, 6, 0, 0, 0, 0, 0, 1, 2, 3],
                code::FRAME_SIZE_ERROR,
            ),
            // HEADERS whose block is not HPACK (index 0 is invalid).
            (&[0, 0, 1, 1, 4, 0, 0, 0, 9, 0x80], code::COMPRESSION_ERROR),
            // A frame over our MAX_FRAME_SIZE.
            (
                &[0x7f, 0xff, 0xff, 0, 0, 0, 0, 0, 1],
                code::FRAME_SIZE_ERROR,
            ),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            let mut c = connect();
            if i > 0 {
                c.send(h2::PREFACE).await;
                c.send_frame(kind::SETTINGS, 0, 0, &[]).await;
            }
            c.send(bytes).await;
            let (_, p) = c.until(kind::GOAWAY).await;
            assert_eq!(
                u32::from_be_bytes(p[4..8].try_into().unwrap()),
                want,
                "case {i}"
            );
            assert!(c.frame().await.is_none(), "case {i}: connection closed");
        }
    }

    #[test]
    fn tiny_data_frames_are_copied_not_kept_as_slices_of_read_buffers() {
        let mut inbox = Inbox::default();
        let mut buffers = Vec::new();
        for i in 0..1000 {
            let read_buffer = Bytes::from(vec![i as u8; 64 << 10]);
            inbox.push(read_buffer.slice(7..8));
            buffers.push(read_buffer);
        }
        assert_eq!(inbox.len, 1000);
        assert!(
            inbox.chunks.is_empty(),
            "small payloads gathered in one buffer"
        );
        assert!(
            inbox.small.capacity() < 4096,
            "holds what came, not 1000 read buffers"
        );
        for b in &buffers {
            assert!(!b.as_ptr_range().contains(&inbox.small.as_ptr()));
        }
        // Order is kept across small and large payloads.
        let mut inbox = Inbox::default();
        let m = grpc_message(&Packet::data(7, Bytes::from(vec![9u8; 2 * COPY_BELOW])));
        inbox.push(Bytes::copy_from_slice(&m[..3]));
        inbox.push(Bytes::copy_from_slice(&m[3..3 + COPY_BELOW]));
        inbox.push(Bytes::copy_from_slice(&m[3 + COPY_BELOW..])); // small again
        let (p, used) = inbox.next_packet().ok().flatten().expect("one packet");
        assert_eq!(used, m.len());
        assert_eq!(p, Packet::data(7, Bytes::from(vec![9u8; 2 * COPY_BELOW])));
    }

    #[test]
    fn a_block_naming_a_large_entry_many_times_is_refused_without_expanding() {
        // One 4000-byte entry inserted, then named 60,000 times: 64 KB on
        // the wire, 240 MB decoded.
        let mut block = vec![0x40, 5];
        block.extend_from_slice(b"x-big");
        hpack_int(&mut block, 0, 7, 4000);
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend(std::iter::repeat_n(0x80 | 62, 60_000));
        let mut dec = h2::HeaderDecoder::default();
        let mut calls = 0;
        let mut decoded = 0;
        let r = dec.decode(&block, |n, v| {
            calls += 1;
            decoded += n.len() + v.len();
        });
        assert_eq!(
            r.unwrap_err().code,
            code::ENHANCE_YOUR_CALM,
            "refused as over SETTINGS_MAX_HEADER_LIST_SIZE"
        );
        assert!(
            decoded <= h2::MAX_HEADER_LIST,
            "expanded {decoded} bytes first"
        );
        assert!(calls <= 16, "{calls} fields handed out before the refusal");
    }

    #[tokio::test]
    async fn hpack_amplification_ends_the_connection_and_others_are_served() {
        let mut c = connect();
        let mut block = vec![0x40, 5];
        block.extend_from_slice(b"x-big");
        hpack_int(&mut block, 0, 7, 4000);
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend(std::iter::repeat_n(0x80 | 62, 60_000));
        let start = grpc_call_start(1);
        c.send(&start[..h2::PREFACE.len() + HEAD_LEN]).await;
        c.send(&headers_frame(1, flag::END_HEADERS, &block)).await;
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
        assert_eq!(c.bad("h2_header_list_too_large"), 1);
        a_call_still_works(&c).await;
    }

    #[tokio::test]
    async fn cancelled_calls_with_data_in_flight_give_the_connection_window_back() {
        let mut c = connect();
        let start = grpc_call_start(1);
        c.send(&start[..h2::PREFACE.len() + HEAD_LEN]).await;
        // What the server lets this client send on the connection: the
        // default, plus its opening WINDOW_UPDATE.
        let mut window: i64 = 0;
        let frame = vec![0u8; 64 << 10];
        let block = h2::request_block(PROXY_PATH.as_bytes());
        // 12 calls of 1 MiB each, all cancelled mid-message: 12 MiB through
        // an 8 MiB connection window.
        for call in 0..12u32 {
            let id = 1 + 2 * call;
            c.send(&headers_frame(id, flag::END_HEADERS, &block)).await;
            // A message announcing 4 MiB - 1 bytes, of which 1 MiB comes.
            c.send_frame(kind::DATA, 0, id, &[0, 0, 0x3f, 0xff, 0xff])
                .await;
            window -= 5;
            for _ in 0..16 {
                while window < frame.len() as i64 {
                    // A well-behaved client waits for credit.
                    let (h, p) = c.frame().await.expect("connection open");
                    if h.kind == kind::WINDOW_UPDATE && h.stream == 0 {
                        window += i64::from(u32::from_be_bytes(p[..4].try_into().unwrap()));
                    }
                    if h.kind == kind::SETTINGS && h.flags & flag::ACK == 0 {
                        window += h2::DEFAULT_WINDOW;
                    }
                    assert!(h.kind != kind::GOAWAY, "GOAWAY {p:?}");
                    assert!(window <= CONN_WINDOW, "credited more than was sent");
                }
                c.send_frame(kind::DATA, 0, id, &frame).await;
                window -= frame.len() as i64;
            }
            let mut rst = BytesMut::new();
            h2::rst_stream(&mut rst, id, code::CANCEL);
            c.send(&rst).await;
        }
        // The same connection still carries a call.
        c.send(&headers_frame(25, flag::END_HEADERS, &block)).await;
        c.send_frame(
            kind::DATA,
            0,
            25,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 3)),
        )
        .await;
        match &c.packets(25, 1).await[..] {
            [Checked::DialRsp(r)] => assert_eq!((r.random, r.connect_id), (3, 7)),
            other => panic!("{other:?}"),
        }
    }

    /// Waits (in the test's own runtime) until `f` holds.
    async fn until_true(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never true: {what}");
    }

    #[tokio::test]
    async fn bytes_a_call_holds_count_toward_the_cap_and_dials_past_it_are_refused() {
        let mut c = connect_with(crate::server::ServerOptions {
            max_queued_bytes: 32 << 10,
            ..small_options(0, 0)
        });
        c.send(&grpc_call_start(1)).await;
        // 60 KiB of a message announced as 1 MiB: it waits in the call.
        let mut partial = vec![0u8, 0, 0x10, 0, 0];
        partial.resize(60 << 10, 0);
        c.send_frame(kind::DATA, 0, 1, &partial).await;
        let sh = c.sh.clone();
        until_true("the partial message is counted", || {
            sh.queued.held() == 60 << 10
        })
        .await;
        let block = h2::request_block(PROXY_PATH.as_bytes());
        c.send(&headers_frame(3, flag::END_HEADERS, &block)).await;
        c.send_frame(
            kind::DATA,
            0,
            3,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 3)),
        )
        .await;
        match &c.packets(3, 1).await[..] {
            [Checked::DialRsp(r)] => {
                assert_eq!((r.random, r.connect_id), (3, 0));
                assert!(r.error.contains("too many bytes queued"), "{}", r.error);
            }
            other => panic!("{other:?}"),
        }
        let refused = sh
            .metrics
            .dials_refused_total
            .with_label_values(&["queued_bytes_cap"]);
        assert_eq!(refused.get(), 1);
        // The call that held them ends: they are given back, and dials
        // are served again.
        let mut rst = BytesMut::new();
        h2::rst_stream(&mut rst, 1, code::CANCEL);
        c.send(&rst).await;
        until_true("the partial message is given back", || {
            sh.queued.held() == 0
        })
        .await;
        c.send(&headers_frame(5, flag::END_HEADERS, &block)).await;
        c.send_frame(
            kind::DATA,
            0,
            5,
            &grpc_message(&Packet::dial_req("tcp", "x:1", 5)),
        )
        .await;
        match &c.packets(5, 1).await[..] {
            [Checked::DialRsp(r)] => assert_eq!((r.random, r.connect_id), (5, 7)),
            other => panic!("{other:?}"),
        }
        assert_eq!(refused.get(), 1);
    }

    #[tokio::test]
    async fn a_flood_of_frames_without_progress_gets_enhance_your_calm() {
        // Empty CONTINUATIONs that never finish the block.
        let mut c = connect();
        let start = grpc_call_start(1);
        c.send(&start[..h2::PREFACE.len() + HEAD_LEN]).await;
        c.send(&headers_frame(1, 0, &h2::request_block(b"/x")[..2]))
            .await;
        let mut flood = BytesMut::new();
        for _ in 0..=NO_PROGRESS_BUDGET {
            Head {
                len: 0,
                kind: kind::CONTINUATION,
                flags: 0,
                stream: 1,
            }
            .write(&mut flood);
        }
        c.send(&flood).await;
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
        assert_eq!(c.bad("h2_no_progress_flood"), 1);

        // PINGs, empty DATA and unknown frames count alike.
        let mut c = c.another();
        c.send(&grpc_call_start(1)).await;
        let mut flood = BytesMut::new();
        for i in 0..=NO_PROGRESS_BUDGET {
            match i % 3 {
                0 => h2::ping(&mut flood, false, [1; 8]),
                1 => Head {
                    len: 0,
                    kind: kind::DATA,
                    flags: 0,
                    stream: 1,
                }
                .write(&mut flood),
                _ => Head {
                    len: 0,
                    kind: 0x42,
                    flags: 0,
                    stream: 0,
                }
                .write(&mut flood),
            }
        }
        c.send(&flood).await;
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
        assert_eq!(c.bad("h2_no_progress_flood"), 2);
        a_call_still_works(&c).await;
    }

    #[tokio::test(start_paused = true)]
    async fn pings_at_a_steady_rate_are_no_flood() {
        let mut c = connect();
        c.send(&grpc_call_start(1)).await;
        // 50 pings a second for a minute: 3000 in all, 500 per period.
        for _ in 0..60 {
            let mut pings = BytesMut::new();
            for _ in 0..50 {
                h2::ping(&mut pings, false, [2; 8]);
            }
            c.send(&pings).await;
            for _ in 0..50 {
                let (h, _) = c.until(kind::PING).await;
                assert_eq!(h.flags, flag::ACK);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(c.bad("h2_no_progress_flood"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_header_block_times_out() {
        let mut c = connect();
        c.patience = 2 * HEADER_BLOCK_TIMEOUT;
        let start = grpc_call_start(1);
        c.send(&start[..h2::PREFACE.len() + HEAD_LEN]).await;
        c.send(&headers_frame(1, 0, &h2::request_block(b"/x")[..2]))
            .await;
        let t0 = tokio::time::Instant::now();
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
        assert!(t0.elapsed() >= HEADER_BLOCK_TIMEOUT);
        assert_eq!(c.bad("h2_header_block_timeout"), 1);
    }
}

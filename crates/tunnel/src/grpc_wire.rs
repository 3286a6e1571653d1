//! gRPC message framing of Packets without copying payloads.
//!
//! Both tunnel links carry `Packet`s as gRPC messages (a 5-byte prefix:
//! compressed flag and big-endian length, then the protobuf). prost and
//! tonic's codec would copy each DATA payload twice on the way: into an
//! encode buffer when sending, and from the HTTP/2 frames into a message
//! buffer when receiving. Here a DATA message is sent as two parts (a small
//! head, then the payload `Bytes` as it is) and received as slices of the
//! frames it came in, so the only copy left is the one TLS makes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::buf::Chain;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame};
use prost::Message;

use crate::proto::{Packet, Payload};

/// DATA payloads at least this long are sent from their own buffer; shorter
/// ones are cheaper to copy into the head than to send as a second part.
const SPLIT_FROM: usize = 1024;

/// Messages shorter than this are decoded from the frame's bytes rather
/// than from a slice of it, so a small payload waiting in a queue holds its
/// own bytes, not the HTTP/2 read buffer it would be a slice of.
const COPY_BELOW: usize = 1024;

/// gRPC status codes used here.
pub(crate) mod status {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
}

/// One packet as a gRPC message: `head` (prefix, and the protobuf up to a
/// DATA payload), then `payload` (empty unless split off).
#[derive(Debug)]
pub(crate) struct Encoded {
    pub head: Bytes,
    pub payload: Bytes,
}

/// What an HTTP/2 body sends as one frame: encoded messages, then at most
/// one large payload (h2 writes the two parts with one vectored write, no
/// copy).
pub(crate) type WireBuf = Chain<Bytes, Bytes>;

impl Encoded {
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }
}

/// A packet as a gRPC message.
pub(crate) fn encode(p: &Packet) -> Encoded {
    let mut head = BytesMut::new();
    let payload = encode_into(p, &mut head).unwrap_or_default();
    Encoded {
        head: head.freeze(),
        payload,
    }
}

/// Appends a packet as a gRPC message to `head`: all of it, or, for a
/// DATA packet with a large payload, all but that payload, which is
/// returned to be sent right after `head`.
///
/// DATA packets are framed by hand so their payload (up to 64 KiB a
/// packet) is sent from the buffer it was read into instead of being copied
/// into an encode buffer as prost would. The fields keep prost's order and
/// proto3's omission of defaults; a test compares the result with prost's.
pub(crate) fn encode_into(p: &Packet, head: &mut BytesMut) -> Option<Bytes> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    match &p.payload {
        Some(Payload::Data(d)) if d.data.len() >= SPLIT_FROM => {
            let id = d.connect_id as u64;
            let mut inner = 0;
            if id != 0 {
                inner += 1 + encoded_len_varint(id);
            }
            if !d.error.is_empty() {
                inner += 1 + encoded_len_varint(d.error.len() as u64) + d.error.len();
            }
            inner += 1 + encoded_len_varint(d.data.len() as u64) + d.data.len();
            let mut outer = 1 + encoded_len_varint(inner as u64) + inner;
            if p.r#type != 0 {
                outer += 1 + encoded_len_varint(p.r#type as u64);
            }
            head.reserve(32 + d.error.len());
            head.put_u8(0);
            head.put_u32(outer as u32);
            if p.r#type != 0 {
                head.put_u8(0x08);
                encode_varint(p.r#type as u64, head);
            }
            head.put_u8(0x22); // field 4 (data), length-delimited
            encode_varint(inner as u64, head);
            if id != 0 {
                head.put_u8(0x08);
                encode_varint(id, head);
            }
            if !d.error.is_empty() {
                head.put_u8(0x12);
                encode_varint(d.error.len() as u64, head);
                head.put_slice(d.error.as_bytes());
            }
            head.put_u8(0x1a);
            encode_varint(d.data.len() as u64, head);
            Some(d.data.clone())
        }
        _ => {
            let len = p.encoded_len();
            head.reserve(5 + len);
            head.put_u8(0);
            head.put_u32(len as u32);
            p.encode(head).expect("buffer sized by encoded_len");
            None
        }
    }
}

/// Why a message could not be taken; `code` is the gRPC status it ends
/// the call with (tonic's and grpc-go's choices).
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("compressed messages are not supported (no grpc-encoding is accepted)")]
    Compressed,
    #[error("invalid compression flag {0} in message prefix")]
    BadFlag(u8),
    #[error("grpc: received message larger than max ({0} vs. {max})", max = crate::MAX_MESSAGE_BYTES)]
    TooLarge(usize),
    #[error("failed to decode Packet: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream ended inside a message ({0} bytes of it unread)")]
    Truncated(usize),
}

impl WireError {
    pub fn code(&self) -> u32 {
        match self {
            WireError::Compressed => status::UNIMPLEMENTED,
            WireError::TooLarge(_) => status::RESOURCE_EXHAUSTED,
            WireError::BadFlag(_) | WireError::Decode(_) | WireError::Truncated(_) => {
                status::INTERNAL
            }
        }
    }
}

/// The length a message prefix announces, once its flag and size pass.
pub(crate) fn check_prefix(prefix: [u8; 5]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    match prefix[0] {
        0 => {}
        1 => return Err(WireError::Compressed),
        other => return Err(WireError::BadFlag(other)),
    }
    if len > crate::MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Takes the first `n` bytes of `chunks` (which hold at least that many)
/// into one buffer: a copy, for a message spread over several frames.
pub(crate) fn gather(chunks: &mut VecDeque<Bytes>, n: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(n);
    while out.len() < n {
        let front = chunks.front_mut().expect("the chunks hold n bytes");
        let k = (n - out.len()).min(front.len());
        out.put_slice(&front[..k]);
        front.advance(k);
        if front.is_empty() {
            chunks.pop_front();
        }
    }
    out.freeze()
}

/// The 5-byte gRPC message prefix at the front of `chunks` (`len` bytes in
/// all), wherever the chunk boundaries fall; None until 5 bytes are there.
pub(crate) fn peek_prefix(chunks: &VecDeque<Bytes>, len: usize) -> Option<[u8; 5]> {
    if len < 5 {
        return None;
    }
    let mut prefix = [0u8; 5];
    let mut filled = 0;
    for c in chunks {
        let n = (5 - filled).min(c.len());
        prefix[filled..filled + n].copy_from_slice(&c[..n]);
        filled += n;
        if filled == 5 {
            break;
        }
    }
    Some(prefix)
}

/// Received bytes of one gRPC stream, as the frames brought them, cut
/// into packets. A message that lies in one frame (the usual case: senders
/// put one message per DATA frame) is decoded from a slice of it, so a
/// DATA packet's payload is that frame's memory; one spread over frames is
/// gathered first.
#[derive(Default)]
pub(crate) struct Decoder {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Decoder {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    fn peek_prefix(&self) -> Option<[u8; 5]> {
        peek_prefix(&self.chunks, self.len)
    }

    /// Drops `n` buffered bytes (a message prefix).
    fn skip(&mut self, mut n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("len counts the chunks");
            let k = n.min(front.len());
            front.advance(k);
            n -= k;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }

    /// Decodes the next `n` buffered bytes as a packet. When they lie in
    /// one chunk, a large message is decoded from a slice of it (its DATA
    /// payload is that chunk's memory), a small one straight from the
    /// chunk's bytes (the payload is copied out, so it does not pin the
    /// frame); a message spread over chunks is gathered first.
    fn decode(&mut self, n: usize) -> Result<Packet, prost::DecodeError> {
        debug_assert!(n <= self.len);
        if n == 0 {
            return Packet::decode(&[][..]);
        }
        self.len -= n;
        let front = self.chunks.front_mut().expect("len counts the chunks");
        if front.len() >= n {
            let p = if n < COPY_BELOW {
                Packet::decode(&front[..n])
            } else {
                Packet::decode(front.slice(..n))
            };
            front.advance(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return p;
        }
        Packet::decode(gather(&mut self.chunks, n))
    }

    /// The next complete message as a packet, None until one is whole. An
    /// error is final: the stream is broken from there on.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, WireError> {
        let Some(prefix) = self.peek_prefix() else {
            return Ok(None);
        };
        let len = check_prefix(prefix)?;
        if self.len < 5 + len {
            return Ok(None);
        }
        self.skip(5);
        Ok(Some(self.decode(len)?))
    }

    /// The stream ended: what is left must not be part of a message.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.len {
            0 => Ok(()),
            n => Err(WireError::Truncated(n)),
        }
    }
}

/// [`read_packets_then`] with a handler that never waits.
#[cfg(test)]
pub(crate) async fn read_packets<B>(
    body: B,
    mut handle: impl FnMut(Packet),
) -> Result<Option<hyper::HeaderMap>, (tonic::Code, String)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: StreamErrorCode + std::fmt::Display,
{
    read_packets_then(body, |p| {
        handle(p);
        None::<std::future::Ready<()>>
    })
    .await
}

/// Reads a stream's messages until its body ends, handing each packet to
/// `handle`: the trailers when it ends with them, None at END_STREAM
/// without them, or the gRPC code and why when the stream breaks (a reset,
/// the connection's end, a malformed or truncated message). When `handle`
/// returns a future, it runs to its end before the next packet is decoded
/// or more of the stream read (HTTP/2 flow control then holds the sender
/// back).
pub(crate) async fn read_packets_then<B, F>(
    mut body: B,
    mut handle: impl FnMut(Packet) -> Option<F>,
) -> Result<Option<hyper::HeaderMap>, (tonic::Code, String)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: StreamErrorCode + std::fmt::Display,
    F: std::future::Future<Output = ()>,
{
    use http_body_util::BodyExt;
    let mut decoder = Decoder::default();
    let wire = |e: WireError| (tonic::Code::from_i32(e.code() as i32), e.to_string());
    loop {
        let frame = match body.frame().await {
            None => return decoder.finish().map(|()| None).map_err(wire),
            Some(Err(e)) => return Err((e.grpc_code(), e.to_string())),
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                decoder.push(data);
                while let Some(p) = decoder.next_packet().map_err(wire)? {
                    if let Some(wait) = handle(p) {
                        wait.await;
                    }
                }
            }
            Err(f) => {
                if let Ok(trailers) = f.into_trailers() {
                    decoder.finish().map_err(wire)?;
                    return Ok(Some(trailers));
                }
            }
        }
    }
}

/// The gRPC code a failed stream read ends with, as tonic maps it (the
/// `stream_errors_total` label).
pub(crate) trait StreamErrorCode {
    fn grpc_code(&self) -> tonic::Code;
}

/// hyper's: keepalive timeout UNAVAILABLE, a dropped caller CANCELLED, else
/// the h2 error's.
impl StreamErrorCode for hyper::Error {
    fn grpc_code(&self) -> tonic::Code {
        if self.is_timeout() {
            return tonic::Code::Unavailable;
        }
        if self.is_canceled() {
            return tonic::Code::Cancelled;
        }
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            if let Some(h2e) = s.downcast_ref::<::h2::Error>() {
                return h2e.grpc_code();
            }
            source = s.source();
        }
        tonic::Code::Unknown
    }
}

/// RST_STREAM and GOAWAY codes per gRPC's HTTP/2 mapping; a broken
/// connection (no reason) is Unknown, as tonic reports it.
impl StreamErrorCode for ::h2::Error {
    fn grpc_code(&self) -> tonic::Code {
        match self.reason() {
            Some(::h2::Reason::REFUSED_STREAM) => tonic::Code::Unavailable,
            Some(::h2::Reason::CANCEL) => tonic::Code::Cancelled,
            Some(::h2::Reason::ENHANCE_YOUR_CALM) => tonic::Code::ResourceExhausted,
            Some(::h2::Reason::INADEQUATE_SECURITY) => tonic::Code::PermissionDenied,
            Some(
                ::h2::Reason::NO_ERROR
                | ::h2::Reason::PROTOCOL_ERROR
                | ::h2::Reason::INTERNAL_ERROR
                | ::h2::Reason::FLOW_CONTROL_ERROR
                | ::h2::Reason::SETTINGS_TIMEOUT
                | ::h2::Reason::FRAME_SIZE_ERROR
                | ::h2::Reason::COMPRESSION_ERROR
                | ::h2::Reason::CONNECT_ERROR,
            ) => tonic::Code::Internal,
            _ => tonic::Code::Unknown,
        }
    }
}

/// An h2 `RecvStream` as a body. Each DATA frame's bytes go back to the
/// flow-control windows as soon as they are read, as hyper's body does:
/// what bounds memory is the reader's own queues, not the window.
pub(crate) struct H2Body {
    recv: ::h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    pub fn new(recv: ::h2::RecvStream) -> Self {
        H2Body {
            recv,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = ::h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ::h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Tests' agents send with it; the product writes its streams with
/// `StreamSender`.
#[cfg(test)]
pub(crate) use packet_body::PacketBody;

#[cfg(test)]
mod packet_body {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::{Buf, Bytes, BytesMut};
    use hyper::body::{Body, Frame, SizeHint};
    use prometheus::IntCounterVec;
    use tokio::sync::mpsc;
    use tokio_util::sync::WaitForCancellationFutureOwned;

    use super::{WireBuf, encode_into, grpc_status_trailers, status};
    use crate::proto::Packet;

    /// At most this many bytes of small messages, or this many packets, are
    /// gathered into one HTTP/2 frame of a [`PacketBody`].
    const COALESCE_BYTES: usize = 16 << 10;
    const COALESCE_PACKETS: usize = 64;

    /// An HTTP/2 body sending the packets of a channel: each frame carries the
    /// packets waiting at the time, up to and including the first one with a
    /// large payload (sent from its own buffer after the others' bytes). Each
    /// packet is counted in `stream_packets_total{segment}` as it leaves. The
    /// body ends when the channel closes or `stop` fires; with `trailers` (a
    /// server's response) it ends with `grpc-status: 0`.
    pub(crate) struct PacketBody {
        rx: mpsc::Receiver<Packet>,
        stop: Pin<Box<WaitForCancellationFutureOwned>>,
        sent: Option<IntCounterVec>,
        segment: &'static str,
        trailers: bool,
        done: bool,
    }

    impl PacketBody {
        pub fn new(
            rx: mpsc::Receiver<Packet>,
            stop: tokio_util::sync::CancellationToken,
            sent: IntCounterVec,
            segment: &'static str,
            trailers: bool,
        ) -> Self {
            PacketBody {
                rx,
                stop: Box::pin(stop.cancelled_owned()),
                sent: Some(sent),
                segment,
                trailers,
                done: false,
            }
        }
    }

    impl PacketBody {
        /// Counts a packet as leaving and appends it to `head` (see
        /// [`encode_into`]).
        fn add(&self, p: &Packet, head: &mut BytesMut) -> Option<Bytes> {
            if let Some(sent) = &self.sent {
                sent.with_label_values(&[self.segment, &p.kind_name()])
                    .inc();
            }
            encode_into(p, head)
        }
    }

    /// An empty body (what a request that sends nothing carries).
    impl Default for PacketBody {
        fn default() -> Self {
            let (_, rx) = mpsc::channel(1);
            PacketBody {
                rx,
                stop: Box::pin(tokio_util::sync::CancellationToken::new().cancelled_owned()),
                sent: None,
                segment: "",
                trailers: false,
                done: true,
            }
        }
    }

    impl Body for PacketBody {
        type Data = WireBuf;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<WireBuf>, Infallible>>> {
            let this = &mut *self;
            if this.done {
                return Poll::Ready(None);
            }
            let packet = if this.stop.as_mut().poll(cx).is_ready() {
                None
            } else {
                match this.rx.poll_recv(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(p) => p,
                }
            };
            match packet {
                Some(p) => {
                    // Packets already waiting go in the same frame, up to the
                    // first large payload: many small control packets (dials,
                    // closes, acks) cost one HTTP/2 frame, not one each, as
                    // tonic's encoder batched them.
                    let mut head = BytesMut::new();
                    let mut payload = this.add(&p, &mut head);
                    let mut n = 1;
                    while payload.is_none() && head.len() < COALESCE_BYTES && n < COALESCE_PACKETS {
                        match this.rx.poll_recv(cx) {
                            Poll::Ready(Some(p)) => {
                                payload = this.add(&p, &mut head);
                                n += 1;
                            }
                            _ => break,
                        }
                    }
                    let buf = head.freeze().chain(payload.unwrap_or_default());
                    Poll::Ready(Some(Ok(Frame::data(buf))))
                }
                None => {
                    this.done = true;
                    this.rx.close();
                    if this.trailers {
                        Poll::Ready(Some(Ok(Frame::trailers(grpc_status_trailers(
                            status::OK,
                            "",
                        )))))
                    } else {
                        Poll::Ready(None)
                    }
                }
            }
        }

        fn is_end_stream(&self) -> bool {
            self.done
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::default()
        }
    }
}

/// `grpc-status` (and `grpc-message`, percent-encoded as gRPC asks) headers.
pub(crate) fn grpc_status_trailers(code: u32, message: &str) -> hyper::HeaderMap {
    let mut h = hyper::HeaderMap::new();
    h.insert("grpc-status", code.into());
    if !message.is_empty() {
        let mut enc = String::with_capacity(message.len());
        for b in message.bytes() {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        if let Ok(v) = enc.parse() {
            h.insert("grpc-message", v);
        }
    }
    h
}

/// The `grpc-message` of a status, percent-decoded.
pub(crate) fn grpc_message(h: &hyper::HeaderMap) -> String {
    let Some(raw) = h.get("grpc-message") else {
        return String::new();
    };
    let raw = raw.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `grpc-status` of a header block, when it has one.
pub(crate) fn grpc_status(h: &hyper::HeaderMap) -> Option<tonic::Code> {
    let v = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Data, PacketType};
    use prometheus::IntCounterVec;
    use tokio::sync::mpsc;

    fn wire(p: &Packet) -> Vec<u8> {
        let e = encode(p);
        let mut v = e.head.to_vec();
        v.extend_from_slice(&e.payload);
        v
    }

    fn every_kind(payload: Bytes) -> Vec<Packet> {
        vec![
            Packet::dial_req("tcp", "10.0.0.1:443", 77),
            Packet::dial_rsp(5, 6, "refused"),
            Packet::dial_rsp(5, 6, ""),
            Packet::close_req(9),
            Packet::close_rsp(9, "gone"),
            Packet::dial_cls(12),
            Packet::data_ack(3, 65536),
            Packet::drain(),
            Packet::data(7, payload.clone()),
            Packet::data(-3, payload.clone()),
            Packet::data(0, payload.clone()),
            Packet {
                r#type: PacketType::Data as i32,
                payload: Some(Payload::Data(Data {
                    connect_id: 9,
                    error: "broken pipe".into(),
                    data: payload,
                })),
            },
        ]
    }

    const SIZES: [usize; 8] = [0, 1, 100, 1023, 1024, 5000, 65536, 70_000];

    #[test]
    fn encoding_matches_prost_and_decodes_back() {
        let big = Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<_>>());
        for n in SIZES {
            for p in every_kind(big.slice(..n)) {
                let bytes = wire(&p);
                let mut prost_framed = vec![0u8];
                prost_framed.extend_from_slice(&(p.encoded_len() as u32).to_be_bytes());
                prost_framed.extend_from_slice(&p.encode_to_vec());
                assert_eq!(bytes, prost_framed, "same bytes as prost for {p:?}");
                assert_eq!(encode(&p).len(), bytes.len());
                let mut d = Decoder::default();
                d.push(Bytes::from(bytes));
                assert_eq!(d.next_packet().unwrap().as_ref(), Some(&p));
                assert!(d.next_packet().unwrap().is_none());
                d.finish().unwrap();
            }
        }
    }

    #[test]
    fn large_data_payloads_are_sent_from_their_own_buffer() {
        let payload = Bytes::from(vec![1u8; 4096]);
        let e = encode(&Packet::data(1, payload.clone()));
        assert_eq!(e.payload.as_ptr(), payload.as_ptr());
        assert!(e.head.len() < 16);
        let mut head = BytesMut::from(&b"before"[..]);
        let split = encode_into(&Packet::data(1, payload.clone()), &mut head).unwrap();
        assert_eq!(split.as_ptr(), payload.as_ptr());
        assert_eq!(&head[..6], b"before");
        assert_eq!(head.len(), 6 + e.head.len());
    }

    #[test]
    fn messages_split_over_chunks_at_every_boundary_decode() {
        let packets = vec![
            Packet::data(7, Bytes::from(vec![9u8; 1500])),
            Packet::dial_req("tcp", "x:1", 2),
            Packet::data(8, Bytes::from_static(b"tiny")),
        ];
        let stream: Vec<u8> = packets.iter().flat_map(wire).collect();
        for cut in 0..=stream.len() {
            let mut d = Decoder::default();
            let mut got = vec![];
            d.push(Bytes::copy_from_slice(&stream[..cut]));
            while let Some(p) = d.next_packet().unwrap() {
                got.push(p);
            }
            d.push(Bytes::copy_from_slice(&stream[cut..]));
            while let Some(p) = d.next_packet().unwrap() {
                got.push(p);
            }
            assert_eq!(got, packets, "cut at {cut}");
            d.finish().unwrap();
        }
        // One byte a chunk.
        let mut d = Decoder::default();
        let mut got = vec![];
        for b in &stream {
            d.push(Bytes::copy_from_slice(&[*b]));
            while let Some(p) = d.next_packet().unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got, packets);
    }

    #[test]
    fn a_payload_in_one_chunk_is_a_slice_of_it() {
        let first = Packet::data(1, Bytes::from(vec![3u8; 20_000]));
        let second = Packet::data(2, Bytes::from(vec![4u8; 2000]));
        let mut bytes = wire(&first);
        bytes.extend(wire(&second));
        let chunk = Bytes::from(bytes);
        let range = chunk.as_ptr_range();
        let mut d = Decoder::default();
        d.push(chunk.clone());
        for want in [first, second] {
            let p = d.next_packet().unwrap().unwrap();
            let Some(Payload::Data(data)) = &p.payload else {
                panic!("not DATA: {p:?}");
            };
            assert!(range.contains(&data.data.as_ptr()), "payload was copied");
            assert_eq!(p, want);
        }
        // A small message is copied out (it must not pin the frame).
        let small = Packet::data(3, Bytes::from_static(b"hello"));
        let mut bytes = wire(&small);
        bytes.extend(wire(&Packet::data(4, Bytes::from(vec![5u8; 3000]))));
        let chunk = Bytes::from(bytes);
        let range = chunk.as_ptr_range();
        d.push(chunk);
        let p = d.next_packet().unwrap().unwrap();
        let Some(Payload::Data(data)) = &p.payload else {
            panic!("not DATA");
        };
        assert!(!range.contains(&data.data.as_ptr()));
        assert_eq!(p, small);
    }

    #[test]
    fn oversized_compressed_and_bad_flags_are_refused() {
        let mut d = Decoder::default();
        let mut m = vec![0u8];
        m.extend_from_slice(&((crate::MAX_MESSAGE_BYTES + 1) as u32).to_be_bytes());
        d.push(Bytes::from(m));
        let e = d.next_packet().unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e}");
        assert_eq!(e.code(), status::RESOURCE_EXHAUSTED);
        assert!(e.to_string().contains("larger than max"), "{e}");

        let mut d = Decoder::default();
        let mut m = wire(&Packet::drain());
        m[0] = 1;
        d.push(Bytes::from(m));
        let e = d.next_packet().unwrap_err();
        assert!(matches!(e, WireError::Compressed));
        assert_eq!(e.code(), status::UNIMPLEMENTED);

        let mut d = Decoder::default();
        let mut m = wire(&Packet::drain());
        m[0] = 7;
        d.push(Bytes::from(m));
        assert_eq!(d.next_packet().unwrap_err().code(), status::INTERNAL);

        // A length of exactly the maximum is allowed (waits for the rest).
        let mut d = Decoder::default();
        let mut m = vec![0u8];
        m.extend_from_slice(&(crate::MAX_MESSAGE_BYTES as u32).to_be_bytes());
        d.push(Bytes::from(m));
        assert!(d.next_packet().unwrap().is_none());
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let mut d = Decoder::default();
        d.push(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]));
        let e = d.next_packet().unwrap_err();
        assert!(matches!(e, WireError::Decode(_)), "{e}");

        let m = wire(&Packet::data(7, Bytes::from(vec![1u8; 3000])));
        for cut in [1, 4, 5, 100, m.len() - 1] {
            let mut d = Decoder::default();
            d.push(Bytes::copy_from_slice(&m[..cut]));
            assert!(d.next_packet().unwrap().is_none());
            let e = d.finish().unwrap_err();
            assert!(matches!(e, WireError::Truncated(n) if n == cut), "{e}");
        }
    }

    #[tokio::test]
    async fn a_body_frame_carries_the_waiting_packets_up_to_one_large_payload() {
        use http_body_util::BodyExt;
        let metrics =
            IntCounterVec::new(prometheus::Opts::new("t", "t"), &["segment", "kind"]).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let stop = tokio_util::sync::CancellationToken::new();
        let mut body = PacketBody::new(rx, stop.clone(), metrics.clone(), "to_agent", true);
        let big = Bytes::from(vec![7u8; 8192]);
        let sent = vec![
            Packet::dial_req("tcp", "a:1", 1),
            Packet::data(2, Bytes::from_static(b"small")),
            Packet::data(3, big.clone()),
            Packet::close_req(4),
        ];
        for p in &sent {
            tx.send(p.clone()).await.unwrap();
        }
        let mut d = Decoder::default();
        let mut got = vec![];
        let mut frames = 0;
        while got.len() < sent.len() {
            let mut buf = body.frame().await.unwrap().unwrap().into_data().unwrap();
            frames += 1;
            if frames == 1 {
                // The first three packets, the large payload as its own part.
                assert_eq!(buf.last_ref().as_ptr(), big.as_ptr());
            }
            d.push(buf.copy_to_bytes(buf.remaining()));
            while let Some(p) = d.next_packet().unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got, sent);
        assert_eq!(frames, 2);
        assert_eq!(metrics.with_label_values(&["to_agent", "DATA"]).get(), 2);
        // Stopped: the trailers, then the end.
        stop.cancel();
        let t = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(grpc_status(&t), Some(tonic::Code::Ok));
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[test]
    fn grpc_messages_are_percent_encoded_both_ways() {
        let msg = "bad token: 100% wrong\nnext – line";
        let h = grpc_status_trailers(status::UNKNOWN, msg);
        assert_eq!(h["grpc-status"], "2");
        assert!(h["grpc-message"].to_str().unwrap().is_ascii());
        assert_eq!(grpc_message(&h), msg);
        assert_eq!(grpc_status(&h), Some(tonic::Code::Unknown));
    }
}

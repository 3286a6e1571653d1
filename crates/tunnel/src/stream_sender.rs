//! The sending half of one long-lived gRPC stream (the agent's
//! `AgentService/Connect`), written to straight from the tasks that have
//! packets for it.
//!
//! Why not an HTTP body fed by a channel (what hyper needs): hyper polls a
//! request body in a task of its own, so every DATA packet crossed two task
//! hand-offs before the connection task wrote it (reader -> channel -> body
//! task -> connection task). On 2 CPUs each hand-off is a wake-up and a
//! cache-cold packet on another thread. Here the reading task puts the
//! encoded message into h2's send queue itself, and only the connection
//! task's write remains.
//!
//! HTTP/2 flow control is kept as hyper keeps it: a sender waits until the
//! stream has send capacity, so at most one message per sender is buffered
//! beyond the peer's window. The stream is behind an async mutex: one
//! waiter at a time polls for capacity (h2 keeps one waker per stream).
//!
//! Control packets (dial answers, closes, acks) never wait on a reader:
//! sent at once when the stream is free and has capacity, else queued (at
//! most `MAX_DEFERRED_CONTROL`; a peer that stops reading while more pile
//! up is one to leave) and flushed in order by the next data sender or by a
//! flusher task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ::h2::SendStream;
use bytes::{Bytes, BytesMut};
use prometheus::{IntCounter, IntCounterVec};
use tokio_util::sync::CancellationToken;

use crate::grpc_wire::{WireBuf, encode_into};
use crate::proto::{Packet, PacketType};

/// Too many control packets queued behind a stream that does not drain.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Overflow;

pub(crate) struct StreamSender {
    stream: tokio::sync::Mutex<SendStream<WireBuf>>,
    controls: Mutex<Controls>,
    /// Whether `controls` holds any: spares data senders its lock.
    controls_queued: AtomicBool,
    /// `stream_packets_total`, labelled with `segment` and the packet kind;
    /// its DATA series looked up once (DATA is the per-read packet).
    sent: IntCounterVec,
    sent_data: IntCounter,
    segment: &'static str,
    /// The stream's end: waiting senders give up, and nothing more is sent.
    stop: CancellationToken,
    max_deferred: usize,
}

#[derive(Default)]
struct Controls {
    queue: VecDeque<Packet>,
    flusher: bool,
}

impl StreamSender {
    pub fn new(
        stream: SendStream<WireBuf>,
        stop: CancellationToken,
        sent: IntCounterVec,
        segment: &'static str,
        max_deferred: usize,
    ) -> Arc<Self> {
        Arc::new(StreamSender {
            stream: tokio::sync::Mutex::new(stream),
            controls: Mutex::new(Controls::default()),
            controls_queued: AtomicBool::new(false),
            sent_data: sent.with_label_values(&[segment, PacketType::Data.as_str_name()]),
            sent,
            segment,
            stop,
            max_deferred,
        })
    }

    /// Sends `packet` once the stream has room; false when the stream has
    /// ended (or `stop` fired) first.
    pub async fn send(&self, packet: Packet) -> bool {
        self.send_noting_stall(packet, None).await
    }

    /// As [`send`](Self::send); `stalls` is counted when the send has to
    /// wait for the peer's flow-control window.
    pub async fn send_noting_stall(&self, packet: Packet, stalls: Option<&IntCounter>) -> bool {
        let Some(mut stream) = self.lock_with_capacity(stalls).await else {
            return false;
        };
        self.flush_controls(&mut stream) && self.put(&mut stream, &packet)
    }

    /// Sends a control packet without waiting (see the module doc).
    pub fn send_control(self: &Arc<Self>, packet: Packet) -> Result<(), Overflow> {
        if self.stop.is_cancelled() {
            return Ok(());
        }
        let mut c = self.controls.lock().unwrap();
        if c.queue.is_empty()
            && !c.flusher
            && let Ok(mut stream) = self.stream.try_lock()
            && stream.capacity() > 0
        {
            drop(c);
            self.put(&mut stream, &packet);
            return Ok(());
        }
        if c.queue.len() >= self.max_deferred {
            return Err(Overflow);
        }
        c.queue.push_back(packet);
        self.controls_queued.store(true, Ordering::Release);
        if !c.flusher {
            c.flusher = true;
            let this = self.clone();
            tokio::spawn(async move { this.flusher().await });
        }
        Ok(())
    }

    /// Ends the stream (END_STREAM) once the packets already taken have
    /// been queued; later sends are dropped.
    pub async fn finish(&self) {
        self.stop.cancel();
        let mut stream = self.stream.lock().await;
        let _ = stream.send_data(bytes::Buf::chain(Bytes::new(), Bytes::new()), true);
    }

    /// As [`finish`](Self::finish), ending with `trailers` (a server's
    /// response: its grpc-status).
    pub async fn finish_with_trailers(&self, trailers: hyper::HeaderMap) {
        self.stop.cancel();
        let mut stream = self.stream.lock().await;
        let _ = stream.send_trailers(trailers);
    }

    async fn flusher(self: Arc<Self>) {
        let stream = self.lock_with_capacity(None).await;
        let mut c = self.controls.lock().unwrap();
        if let Some(mut stream) = stream {
            while let Some(p) = c.queue.pop_front() {
                self.put(&mut stream, &p);
            }
        } else {
            c.queue.clear();
        }
        self.controls_queued.store(false, Ordering::Release);
        c.flusher = false;
    }

    /// Control packets queued meanwhile go out ahead of the caller's.
    fn flush_controls(&self, stream: &mut SendStream<WireBuf>) -> bool {
        if !self.controls_queued.load(Ordering::Acquire) {
            return true;
        }
        let mut c = self.controls.lock().unwrap();
        while let Some(p) = c.queue.pop_front() {
            if !self.put(stream, &p) {
                return false;
            }
        }
        self.controls_queued.store(false, Ordering::Release);
        true
    }

    async fn lock_with_capacity(
        &self,
        stalls: Option<&IntCounter>,
    ) -> Option<tokio::sync::MutexGuard<'_, SendStream<WireBuf>>> {
        // The operation first (`biased`): `stop` is then polled, and a
        // waiter registered, only when the operation must wait; a stream
        // stopped meanwhile is caught by `put`.
        let mut stream = tokio::select! {
            biased;
            s = self.stream.lock() => s,
            _ = self.stop.cancelled() => return None,
        };
        // As hyper's body pipe: ask for one byte beyond what is buffered,
        // and send the whole message once any is granted.
        if stream.capacity() == 0 {
            stream.reserve_capacity(1);
            let mut stalls = stalls;
            loop {
                let granted = tokio::select! {
                    biased;
                    g = std::future::poll_fn(|cx| {
                        let g = stream.poll_capacity(cx);
                        if g.is_pending() && let Some(s) = stalls.take() {
                            s.inc();
                        }
                        g
                    }) => g,
                    _ = self.stop.cancelled() => return None,
                };
                match granted {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    Some(Err(_)) | None => return None,
                }
            }
        }
        Some(stream)
    }

    fn put(&self, stream: &mut SendStream<WireBuf>, packet: &Packet) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        if packet.r#type == PacketType::Data as i32 {
            self.sent_data.inc();
        } else {
            self.sent
                .with_label_values(&[self.segment, &packet.kind_name()])
                .inc();
        }
        let mut head = BytesMut::new();
        let payload = encode_into(packet, &mut head).unwrap_or_default();
        let buf: WireBuf = bytes::Buf::chain(head.freeze(), payload);
        stream.send_data(buf, false).is_ok()
    }
}

/// Over a real h2 client and server on an in-memory pipe.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc_wire::{Decoder, H2Body};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const WINDOW: u32 = 64 << 10;

    struct Link {
        sender: Arc<StreamSender>,
        /// The server's side of the stream, not read until a test says.
        recv: ::h2::RecvStream,
        metrics: IntCounterVec,
        stop: CancellationToken,
        _driven: Vec<tokio::task::JoinHandle<()>>,
    }

    /// A server that offers a `WINDOW`-byte stream window and a stream
    /// open to it, its sending half in a `StreamSender`.
    async fn link(max_deferred: usize) -> Link {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = ::h2::server::Builder::new()
                .initial_window_size(WINDOW)
                .initial_connection_window_size(1 << 20)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (req, _respond) = conn.accept().await.unwrap().unwrap();
            let driven = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (req.into_body(), _respond, driven)
        });
        let (mut send, conn) = ::h2::client::Builder::new()
            .handshake::<_, WireBuf>(client_io)
            .await
            .unwrap();
        let client_driven = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::post("http://t/s").body(()).unwrap();
        let (_response, stream) = send.send_request(req, false).unwrap();
        let metrics =
            IntCounterVec::new(prometheus::Opts::new("t", "t"), &["segment", "kind"]).unwrap();
        let stop = CancellationToken::new();
        let sender = StreamSender::new(stream, stop.clone(), metrics.clone(), "out", max_deferred);
        let (recv, respond, server_driven) = server.await.unwrap();
        std::mem::forget(respond);
        Link {
            sender,
            recv,
            metrics,
            stop,
            _driven: vec![client_driven, server_driven],
        }
    }

    /// Reads until `got` holds `n` packets (what `d` already holds first),
    /// giving the window back.
    async fn read_into(
        recv: &mut ::h2::RecvStream,
        d: &mut Decoder,
        got: &mut Vec<Packet>,
        n: usize,
    ) {
        loop {
            while let Some(p) = d.next_packet().unwrap() {
                got.push(p);
            }
            if got.len() >= n {
                return;
            }
            let data = std::future::poll_fn(|cx| recv.poll_data(cx))
                .await
                .unwrap()
                .unwrap();
            let _ = recv.flow_control().release_capacity(data.len());
            d.push(data);
        }
    }

    async fn read(mut recv: ::h2::RecvStream, n: usize) -> Vec<Packet> {
        let mut got = vec![];
        read_into(&mut recv, &mut Decoder::default(), &mut got, n).await;
        got
    }

    #[tokio::test]
    async fn packets_and_controls_arrive_in_order_and_are_counted() {
        let l = link(16).await;
        let big = Bytes::from(vec![9u8; 100_000]);
        assert!(
            l.sender
                .send(Packet::data(1, Bytes::from_static(b"a")))
                .await
        );
        l.sender.send_control(Packet::close_rsp(1, "")).unwrap();
        assert!(l.sender.send(Packet::data(2, big.clone())).await);
        let got = read(l.recv, 3).await;
        assert_eq!(
            got,
            vec![
                Packet::data(1, Bytes::from_static(b"a")),
                Packet::close_rsp(1, ""),
                Packet::data(2, big),
            ]
        );
        assert_eq!(l.metrics.with_label_values(&["out", "DATA"]).get(), 2);
        assert_eq!(l.metrics.with_label_values(&["out", "CLOSE_RSP"]).get(), 1);
    }

    /// Flow control holds the senders back: with the window full and
    /// nothing read, at most one message beyond it is taken, however long
    /// the senders try; once read, every message arrives.
    #[tokio::test]
    async fn a_peer_that_does_not_read_holds_senders_back() {
        let l = link(16).await;
        const N: usize = 40;
        let taken = Arc::new(AtomicUsize::new(0));
        let (sender, t) = (l.sender.clone(), taken.clone());
        let senders = tokio::spawn(async move {
            for i in 0..N {
                assert!(
                    sender
                        .send(Packet::data(
                            i as i64 + 1,
                            Bytes::from(vec![i as u8; 16 << 10])
                        ))
                        .await
                );
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        // Wait until the window (64 KiB: 4 messages) is on the server's
        // side, then let the client run as much as it will.
        let mut recv = l.recv;
        let mut d = Decoder::default();
        let mut held = 0;
        while held < WINDOW as usize {
            let data = std::future::poll_fn(|cx| recv.poll_data(cx))
                .await
                .unwrap()
                .unwrap();
            held += data.len();
            d.push(data);
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let taken_now = taken.load(Ordering::SeqCst);
        assert!(
            taken_now <= 6,
            "{taken_now} of {N} messages taken with the window shut"
        );
        let _ = recv.flow_control().release_capacity(held);
        let mut got = vec![];
        read_into(&mut recv, &mut d, &mut got, N).await;
        for (i, p) in got.iter().enumerate() {
            assert_eq!(
                *p,
                Packet::data(i as i64 + 1, Bytes::from(vec![i as u8; 16 << 10]))
            );
        }
        senders.await.unwrap();
        assert_eq!(taken.load(Ordering::SeqCst), N);
    }

    /// Control packets queue behind a shut window up to the cap, then are
    /// refused; the queued ones go out in order once the peer reads.
    #[tokio::test]
    async fn controls_behind_a_shut_window_are_capped_then_flushed_in_order() {
        let l = link(3).await;
        // Fill the window and one message more.
        let fill = Bytes::from(vec![1u8; WINDOW as usize]);
        assert!(l.sender.send(Packet::data(1, fill.clone())).await);
        for id in 2..5 {
            l.sender.send_control(Packet::close_rsp(id, "")).unwrap();
        }
        assert_eq!(
            l.sender.send_control(Packet::close_rsp(5, "")),
            Err(Overflow)
        );
        let got = read(l.recv, 4).await;
        assert_eq!(got[0], Packet::data(1, fill));
        assert_eq!(
            got[1..],
            [
                Packet::close_rsp(2, ""),
                Packet::close_rsp(3, ""),
                Packet::close_rsp(4, "")
            ]
        );
    }

    #[tokio::test]
    async fn finish_ends_the_stream_and_later_sends_fail() {
        let l = link(16).await;
        assert!(
            l.sender
                .send(Packet::data(1, Bytes::from_static(b"x")))
                .await
        );
        l.sender.finish().await;
        assert!(l.stop.is_cancelled());
        assert!(
            !l.sender
                .send(Packet::data(1, Bytes::from_static(b"y")))
                .await
        );
        let mut body = H2Body::new(l.recv);
        let mut got = vec![];
        let end = crate::grpc_wire::read_packets(&mut body, |p| got.push(p)).await;
        assert_eq!(end.unwrap(), None, "END_STREAM without trailers");
        assert_eq!(got, vec![Packet::data(1, Bytes::from_static(b"x"))]);
    }
}

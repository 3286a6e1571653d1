//! The per-connection packet queue: the flow-control point that keeps one
//! slow reader from stalling every other connection on a shared agent stream.
//!
//! The reader of a shared stream pushes into a connection's queue and moves
//! on. A queue holds at most `limit` bytes of DATA. When a push would exceed
//! that, the push fails with [`PushError::Overflow`] and the caller closes
//! *that* connection (upstream's CLOSE_REQ / CLOSE_RSP with an error); every
//! other connection carries on. On a link without the flow-control
//! extension, whose sender does not hold back for one connection, the
//! reader first waits for room ([`PacketQueue::wait_room`]) for up to
//! [`crate::READER_STALL_LIMIT`]: a reader only scheduled late then costs
//! its connection nothing.
//! Control packets (dial response, close) are always accepted: each
//! connection gets at most a handful.
//!
//! Every queue of a process also charges its bytes to one shared
//! [`QueuedBytes`]: per-connection limits bound one stalled connection, the
//! shared count bounds how many more a process takes on. Past its cap new
//! dials are refused (existing connections keep their own limits), so a
//! crowd of connections whose readers never read cannot grow the process
//! without bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::proto::Packet;

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Overflow,
    Closed,
}

#[derive(Default)]
struct State {
    packets: VecDeque<Packet>,
    bytes: usize,
    closed: bool,
}

/// Bytes held in the queues of every connection of one process (a
/// gauge, so /metrics shows it), and the cap past which new dials are
/// refused. Queues of readers that keep up are near empty, so what this
/// counts is, in practice, memory held for readers that do not read.
#[derive(Debug)]
pub struct QueuedBytes {
    held: prometheus::IntGauge,
    cap: usize,
}

impl QueuedBytes {
    /// `cap` 0: no cap. `held` is the gauge that carries the count.
    pub fn new(held: prometheus::IntGauge, cap: usize) -> Arc<Self> {
        Arc::new(QueuedBytes { held, cap })
    }
    pub fn held(&self) -> usize {
        self.held.get().max(0) as usize
    }
    pub fn cap(&self) -> usize {
        self.cap
    }
    /// True when no new connection should be taken on.
    pub fn over_cap(&self) -> bool {
        self.cap > 0 && self.held() >= self.cap
    }
    pub fn charge(&self, n: usize) {
        self.held.add(n as i64);
    }
    pub fn release(&self, n: usize) {
        self.held.sub(n as i64);
    }
}

pub struct PacketQueue {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when bytes leave (or the queue closes): see `wait_room`.
    room: Notify,
    /// Raised (never lowered) when a connection's flow-control window may
    /// grow past it: see [`PacketQueue::raise_limit`].
    limit: AtomicUsize,
    shared: Option<Arc<QueuedBytes>>,
}

impl PacketQueue {
    pub fn new(limit: usize) -> Self {
        PacketQueue {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            room: Notify::new(),
            limit: AtomicUsize::new(limit),
            shared: None,
        }
    }

    /// A queue whose bytes are also charged to `shared`.
    pub fn with_shared(limit: usize, shared: Arc<QueuedBytes>) -> Self {
        let mut q = Self::new(limit);
        q.shared = Some(shared);
        q
    }

    /// Lets the queue hold `limit` bytes if it held fewer: a connection
    /// under the flow-control extension holds at most its window, which may
    /// grow past the limit the queue was made with.
    pub fn raise_limit(&self, limit: usize) {
        self.limit.fetch_max(limit, Ordering::Relaxed);
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    fn charge(&self, n: usize) {
        if let Some(s) = &self.shared {
            s.charge(n);
        }
    }

    /// Queues a DATA packet unless that would pass the byte limit.
    pub fn push_data(&self, packet: Packet) -> Result<(), PushError> {
        self.try_push_data(packet).map_err(|(e, _)| e)
    }

    /// [`push_data`](Self::push_data), giving the packet back when refused.
    pub fn try_push_data(&self, packet: Packet) -> Result<(), (PushError, Packet)> {
        let weight = packet.weight();
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return Err((PushError::Closed, packet));
        }
        if st.bytes + weight > self.limit() && !st.packets.is_empty() {
            return Err((PushError::Overflow, packet));
        }
        st.bytes += weight;
        st.packets.push_back(packet);
        drop(st);
        self.charge(weight);
        self.notify.notify_one();
        Ok(())
    }

    /// Queues a control packet (never refused for size).
    pub fn push_control(&self, packet: Packet) -> Result<(), PushError> {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return Err(PushError::Closed);
        }
        let weight = packet.weight();
        st.bytes += weight;
        st.packets.push_back(packet);
        drop(st);
        self.charge(weight);
        self.notify.notify_one();
        Ok(())
    }

    /// No more pushes; `pop` returns what is queued, then `None`.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.notify.notify_one();
        self.room.notify_waiters();
    }

    /// Pushes a DATA packet this queue refused as full, with `push` (the
    /// caller's [`try_push_data`](Self::try_push_data), counted as it
    /// counts), once there is room: Err(Overflow) when none came within
    /// `limit` of waiting, Err(Closed) when the queue closed first.
    pub async fn push_data_when_room(
        &self,
        mut data: Packet,
        limit: std::time::Duration,
        push: impl Fn(Packet) -> Result<(), (PushError, Packet)>,
    ) -> Result<(), PushError> {
        let weight = data.weight();
        loop {
            if tokio::time::timeout(limit, self.wait_room(weight))
                .await
                .is_err()
            {
                return Err(PushError::Overflow);
            }
            match push(data) {
                Err((PushError::Overflow, back)) => data = back,
                r => return r.map_err(|(e, _)| e),
            }
        }
    }

    /// Waits until a DATA packet of `weight` bytes would be taken (see
    /// [`push_data`](Self::push_data)) or the queue is closed.
    pub async fn wait_room(&self, weight: usize) {
        loop {
            let freed = self.room.notified();
            tokio::pin!(freed);
            // Registered before the check: a pop in between still wakes it.
            freed.as_mut().enable();
            {
                let st = self.state.lock().unwrap();
                if st.closed || st.packets.is_empty() || st.bytes + weight <= self.limit() {
                    return;
                }
            }
            freed.await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    pub fn queued_bytes(&self) -> usize {
        self.state.lock().unwrap().bytes
    }

    /// The next packet, waiting if none is queued; `None` once closed and
    /// empty. Its bytes leave the shared count at once; a caller that goes
    /// on to write them to a reader takes [`PacketQueue::pop_charged`].
    pub async fn pop(&self) -> Option<Packet> {
        self.pop_charged()
            .await
            .map(|(packet, _released_here)| packet)
    }

    /// [`PacketQueue::pop`], with the packet's bytes still charged to the
    /// shared count until the returned [`Charge`] is dropped: a write to a
    /// reader that does not read holds its packet (up to
    /// [`crate::MAX_DATA_PIECE`]) for as long as it waits, and the cap
    /// must see that memory, or a crowd of such writers holds it unseen.
    pub async fn pop_charged(&self) -> Option<(Packet, Charge)> {
        loop {
            {
                let mut st = self.state.lock().unwrap();
                if let Some(p) = st.packets.pop_front() {
                    let weight = p.weight();
                    st.bytes -= weight;
                    if st.packets.is_empty() {
                        // Give back a queue that grew under a burst.
                        st.packets.shrink_to(4);
                    }
                    drop(st);
                    self.room.notify_waiters();
                    let charge = Charge(self.shared.clone().map(|s| (s, weight)));
                    return Some((p, charge));
                }
                if st.closed {
                    return None;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// A popped packet's bytes, still counted in the process's
/// [`QueuedBytes`] until this is dropped.
#[must_use = "dropping the charge releases the packet's bytes at once"]
pub struct Charge(Option<(Arc<QueuedBytes>, usize)>);

impl Charge {
    /// Bytes counted nowhere.
    pub fn none() -> Self {
        Charge(None)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((shared, bytes)) = self.0.take() {
            shared.release(bytes);
        }
    }
}

impl Drop for PacketQueue {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            s.release(self.state.get_mut().map(|st| st.bytes).unwrap_or(0));
        }
    }
}

/// The flow-control window of one connection under the extension: the
/// window both sides start with, and the most the receiver may grow it to
/// (equal: the window stays fixed). Off (0): the link has no extension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowWindow {
    pub initial: usize,
    pub max: usize,
}

impl FlowWindow {
    pub const OFF: FlowWindow = FlowWindow { initial: 0, max: 0 };

    pub fn fixed(window: usize) -> Self {
        FlowWindow {
            initial: window,
            max: window,
        }
    }

    /// `max` below `initial` means no growth.
    pub fn growing(initial: usize, max: usize) -> Self {
        FlowWindow {
            initial,
            max: max.max(initial),
        }
    }

    pub fn is_on(&self) -> bool {
        self.initial > 0
    }

    /// What `self`, offered here, and the peer's offer in `headers` come to:
    /// the smaller initial window and the smaller maximum; off unless both
    /// offered a window. A peer that offers no maximum gets a fixed window.
    pub fn agree(self, headers: &hyper::HeaderMap) -> FlowWindow {
        let theirs = |key: &str| {
            headers
                .get(key)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
        };
        let Some(initial) = theirs(crate::proto::headers::FLOW_WINDOW) else {
            return FlowWindow::OFF;
        };
        let initial = initial.min(self.initial);
        if initial == 0 {
            return FlowWindow::OFF;
        }
        let max =
            theirs(crate::proto::headers::FLOW_WINDOW_MAX).map_or(initial, |m| m.min(self.max));
        FlowWindow::growing(initial, max)
    }

    /// Offers (or answers) this window in `headers`.
    pub fn offer(&self, headers: &mut hyper::HeaderMap) {
        if !self.is_on() {
            return;
        }
        headers.insert(crate::proto::headers::FLOW_WINDOW, self.initial.into());
        if self.max > self.initial {
            headers.insert(crate::proto::headers::FLOW_WINDOW_MAX, self.max.into());
        }
    }

    /// Credit for one direction of a connection, when the extension is on.
    pub fn credit(&self) -> Option<Credit> {
        self.is_on().then(|| Credit::new(*self))
    }
}

/// A DATA_ACK of `bytes` for a connection whose credit toward the peer is
/// `sending` and whose credit for the peer's data is `receiving`, with
/// `queued()` bytes of the peer's data waiting for the reader here: credit
/// given back, or (0 bytes: the peer ran out of credit) the window's
/// growth to grant the peer, if any (see [`Credit`]). `queued` is asked
/// only for the 0-byte hint: counting takes the queue's lock, and acks
/// that give credit back come about four per window.
pub fn on_data_ack(
    bytes: i64,
    sending: Option<&Credit>,
    receiving: Option<&Credit>,
    queued: impl FnOnce() -> usize,
) -> Option<usize> {
    if bytes > 0 {
        if let Some(cr) = sending {
            cr.give(bytes as usize);
        }
        return None;
    }
    receiving?.sender_blocked(queued())
}

/// Send credit of one connection under the flow-control extension: the
/// sender takes credit before each DATA, the receiver returns it (DATA_ACK)
/// as the data leaves toward its reader. At most the window's bytes of one
/// connection are ever in flight, so its queue on the other side never
/// overflows and a slow reader only slows itself.
///
/// The window starts at [`FlowWindow::initial`] and may grow, doubling up
/// to [`FlowWindow::max`]. A sender that runs out of credit says so (a
/// DATA_ACK of 0 bytes, which a peer without growth takes as no credit);
/// if the receiver's reader has caught up by then (under half the window
/// still queued for it) and has taken two windows since the window last
/// grew, the window, not the reader, is what limits the connection, and
/// the receiver grants the growth as credit (a 1 MiB window cut one 2-CPU
/// upload to about 0.8x of what no window gives, docs/tunnel-benchmarks.md).
/// A reader that falls behind never grows it (socket buffers that fill,
/// though, look like a reader that keeps up); any connection holds at most
/// `max`.
pub struct Credit {
    sem: tokio::sync::Semaphore,
    /// The initial window: what pieces are sized by (see [`Credit::piece`]).
    window: usize,
    /// The most credit the sender holds, however much the receiver grants.
    max: usize,
    /// Receiver: delivered and not yet acknowledged.
    delivered: AtomicUsize,
    /// Receiver: the window now granted, and what the reader has taken
    /// since it last grew.
    current: AtomicUsize,
    since_growth: AtomicUsize,
}

impl Credit {
    pub fn new(w: FlowWindow) -> Self {
        Credit {
            sem: tokio::sync::Semaphore::new(w.initial),
            window: w.initial,
            max: w.max.max(w.initial),
            delivered: AtomicUsize::new(0),
            current: AtomicUsize::new(w.initial),
            since_growth: AtomicUsize::new(0),
        }
    }
    /// The most one DATA packet may carry under this credit. The receiver
    /// acknowledges in batches of a quarter of its current window (never
    /// less than the initial one), so up to that less one byte can be
    /// delivered and never acknowledged while the connection is quiet; a
    /// packet needing more than the rest would wait for credit that never
    /// comes (a single large client write stalled forever that way).
    /// Senders split larger data into pieces of this size, each of which
    /// the window is sure to cover once what is in flight has been
    /// delivered.
    pub fn piece(&self) -> usize {
        (self.window / 4).max(1)
    }
    /// True when `take(n)` would have to wait for credit now.
    pub fn would_wait(&self, n: usize) -> bool {
        self.sem.available_permits() < n.clamp(1, self.window)
    }
    /// Whether the window may grow: a sender out of credit then tells the
    /// receiver (see the type's doc).
    pub fn may_grow(&self) -> bool {
        self.max > self.window
    }
    /// Waits for `n` bytes of credit (false once the connection closed).
    pub async fn take(&self, n: usize) -> bool {
        let n = n.clamp(1, self.window) as u32;
        match self.sem.acquire_many(n).await {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }
    /// Credit returned by the peer (the sender never holds more than the
    /// largest window).
    pub fn give(&self, n: usize) {
        let room = self.max.saturating_sub(self.sem.available_permits());
        self.sem.add_permits(n.min(room));
    }
    /// Counts delivered bytes; returns the amount to acknowledge once a
    /// quarter window has gathered (fewer, larger acks).
    pub fn delivered(&self, n: usize) -> Option<usize> {
        self.since_growth.fetch_add(n, Ordering::Relaxed);
        let total = self.delivered.fetch_add(n, Ordering::AcqRel) + n;
        if total >= self.current.load(Ordering::Relaxed) / 4 {
            let t = self.delivered.swap(0, Ordering::AcqRel);
            (t > 0).then_some(t)
        } else {
            None
        }
    }
    /// The sender ran out of credit while `queued` bytes wait here for the
    /// reader: the window's growth to grant (as credit), if it may grow,
    /// the reader has caught up, and it has taken twice the window since
    /// the window last grew (socket buffers that fill take the first
    /// bytes of a reader that never reads as if it read them).
    pub fn sender_blocked(&self, queued: usize) -> Option<usize> {
        let current = self.current.load(Ordering::Relaxed);
        if queued >= current / 2 || self.since_growth.load(Ordering::Relaxed) < 2 * current {
            return None;
        }
        let grow = current.min(self.max.saturating_sub(current));
        if grow == 0 {
            return None;
        }
        self.current.store(current + grow, Ordering::Relaxed);
        self.since_growth.store(0, Ordering::Relaxed);
        Some(grow)
    }
    /// The window the receiver grants now.
    #[cfg(test)]
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
    /// Wakes every waiter with failure.
    pub fn close(&self) {
        self.sem.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn overflow_refuses_data_but_not_control() {
        let q = PacketQueue::new(1000);
        q.push_data(Packet::data(1, Bytes::from(vec![0; 800])))
            .unwrap();
        assert_eq!(
            q.push_data(Packet::data(1, Bytes::from(vec![0; 800]))),
            Err(PushError::Overflow)
        );
        q.push_control(Packet::close_rsp(1, "x")).unwrap();
        q.close();
        assert!(q.push_control(Packet::close_rsp(1, "")).is_err());
        assert!(q.pop().await.is_some());
        assert!(q.pop().await.is_some());
        assert!(q.pop().await.is_none());
        assert_eq!(q.queued_bytes(), 0);
    }

    /// A refused packet comes back; `wait_room` waits until a pop makes
    /// room for it (or the queue closes), not before.
    #[tokio::test]
    async fn a_refused_packet_waits_for_room() {
        use futures_util::FutureExt;
        let q = Arc::new(PacketQueue::new(1000));
        q.push_data(Packet::data(1, Bytes::from(vec![0; 800])))
            .unwrap();
        let refused = Packet::data(1, Bytes::from(vec![1; 800]));
        let (e, back) = q.try_push_data(refused.clone()).unwrap_err();
        assert_eq!((e, &back), (PushError::Overflow, &refused));
        let weight = back.weight();
        let mut waiting = Box::pin(q.wait_room(weight));
        assert!(waiting.as_mut().now_or_never().is_none());
        assert!(q.pop().await.is_some());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("room after the pop");
        q.try_push_data(back).unwrap();
        let again = Box::pin(q.wait_room(weight));
        let q2 = q.clone();
        let closer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            q2.close();
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), again)
            .await
            .expect("a closed queue ends the wait");
        closer.await.unwrap();
    }

    /// A refused packet is pushed once a pop makes room; with no pop it
    /// is refused again after the limit. Time is paused.
    #[tokio::test(start_paused = true)]
    async fn push_data_when_room_waits_at_most_its_limit() {
        use std::time::Duration;
        let q = Arc::new(PacketQueue::new(1000));
        let full = |q: &PacketQueue| {
            q.push_data(Packet::data(1, Bytes::from(vec![0; 800])))
                .unwrap()
        };
        full(&q);
        let start = tokio::time::Instant::now();
        let data = Packet::data(1, Bytes::from(vec![1; 800]));
        let r = q
            .push_data_when_room(data.clone(), Duration::from_secs(1), |p| q.try_push_data(p))
            .await;
        assert_eq!(r, Err(PushError::Overflow));
        assert_eq!(start.elapsed(), Duration::from_secs(1));

        let q2 = q.clone();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            q2.pop().await
        });
        let r = q
            .push_data_when_room(data.clone(), Duration::from_secs(1), |p| q.try_push_data(p))
            .await;
        assert_eq!(r, Ok(()));
        assert!(reader.await.unwrap().is_some());
        assert_eq!(q.pop().await, Some(data));
    }

    #[tokio::test]
    async fn queues_charge_the_shared_count_and_give_it_back() {
        let gauge = prometheus::IntGauge::new("queued", "test").unwrap();
        let shared = QueuedBytes::new(gauge.clone(), 1500);
        let a = PacketQueue::with_shared(1 << 20, shared.clone());
        let b = PacketQueue::with_shared(1 << 20, shared.clone());
        a.push_data(Packet::data(1, Bytes::from(vec![0; 800])))
            .unwrap();
        assert!(!shared.over_cap());
        b.push_data(Packet::data(2, Bytes::from(vec![0; 800])))
            .unwrap();
        b.push_data(Packet::data(2, Bytes::from(vec![0; 100])))
            .unwrap();
        assert!(shared.over_cap(), "{} bytes held", shared.held());
        assert_eq!(gauge.get() as usize, shared.held());
        // A packet popped to be written stays charged until its write is
        // over (its charge dropped); a plain pop gives its bytes back at
        // once, and a dropped queue gives back the rest.
        let before = shared.held();
        let (_, charge) = a.pop_charged().await.unwrap();
        assert_eq!(shared.held(), before);
        assert!(shared.over_cap());
        drop(charge);
        assert!(!shared.over_cap());
        let before = shared.held();
        b.pop().await.unwrap();
        assert!(shared.held() < before);
        assert!(shared.held() > 0);
        drop(b);
        assert_eq!(shared.held(), 0);
        // No cap: never over it.
        let uncapped = QueuedBytes::new(prometheus::IntGauge::new("q2", "t").unwrap(), 0);
        uncapped.charge(1 << 40);
        assert!(!uncapped.over_cap());
    }

    const MIB: usize = 1 << 20;

    /// One connection's sender and receiver: the sender sends pieces while
    /// it has credit, says so when it has none, and the reader leaves
    /// `queued` bytes behind; `rounds` stalls of the sender. Returns the
    /// receiver's window after each.
    fn stall_rounds(w: FlowWindow, rounds: usize, queued: usize) -> (Credit, Vec<usize>) {
        let (sender, receiver) = (w.credit().unwrap(), w.credit().unwrap());
        let piece = sender.piece();
        let mut windows = Vec::new();
        for _ in 0..rounds {
            // The sender spends all its credit; the acks are on their way.
            let mut sent = 0;
            while !sender.would_wait(piece) {
                sender.sem.try_acquire_many(piece as u32).unwrap().forget();
                sent += 1;
            }
            assert_eq!(sender.may_grow(), w.max > w.initial);
            if let Some(grow) = receiver.sender_blocked(queued) {
                sender.give(grow);
            }
            for _ in 0..sent {
                if let Some(n) = receiver.delivered(piece) {
                    sender.give(n);
                }
            }
            windows.push(receiver.current());
        }
        (sender, windows)
    }

    #[test]
    fn a_blocked_sender_whose_reader_keeps_up_grows_the_window_to_its_max() {
        let w = FlowWindow::growing(MIB, 8 * MIB);
        // The window doubles, each time after the reader took at least two
        // windows since it last grew, and stops at the max.
        let (sender, windows) = stall_rounds(w, 12, 0);
        assert_eq!(windows[..2], [MIB, MIB], "one window taken is not enough");
        for pair in windows.windows(2) {
            assert!(pair[1] == pair[0] || pair[1] == 2 * pair[0], "{windows:?}");
        }
        assert_eq!(windows.last(), Some(&(8 * MIB)), "{windows:?}");
        assert_eq!(
            sender.piece(),
            MIB / 4,
            "pieces keep the initial window's size"
        );
        // The sender holds up to the grown window, never past the max.
        sender.give(64 * MIB);
        assert_eq!(sender.sem.available_permits(), 8 * MIB);
        // A max that is not a doubling of the window is reached exactly.
        let (_, windows) = stall_rounds(FlowWindow::growing(MIB, 3 * MIB), 8, 0);
        assert_eq!(windows.last(), Some(&(3 * MIB)), "{windows:?}");
        assert!(windows.iter().all(|&w| w <= 3 * MIB));
    }

    #[test]
    fn a_reader_that_falls_behind_keeps_the_window() {
        // Half the window waiting for the reader: the reader, not the
        // window, limits this connection.
        let (_, windows) = stall_rounds(FlowWindow::growing(MIB, 8 * MIB), 8, MIB / 2);
        assert_eq!(windows, vec![MIB; 8]);
        // A fixed window never grows, and its sender never holds more.
        let (sender, windows) = stall_rounds(FlowWindow::fixed(MIB), 4, 0);
        assert_eq!(windows, vec![MIB; 4]);
        assert!(!sender.may_grow());
        sender.give(8 * MIB);
        assert_eq!(sender.sem.available_permits(), MIB);
    }

    #[test]
    fn acks_come_in_quarters_of_the_current_window() {
        let w = FlowWindow::growing(MIB, 8 * MIB);
        let receiver = w.credit().unwrap();
        let acks: Vec<usize> = (0..1024).filter_map(|_| receiver.delivered(1024)).collect();
        assert_eq!(acks, vec![MIB / 4; 4]);
        // One window taken: too little to grow; two: it doubles.
        assert_eq!(receiver.sender_blocked(0), None);
        let more = (0..1024).filter_map(|_| receiver.delivered(1024)).count();
        assert_eq!(more, 4);
        assert_eq!(receiver.sender_blocked(0), Some(MIB));
        let acks: Vec<usize> = (0..2048).filter_map(|_| receiver.delivered(1024)).collect();
        assert_eq!(acks, vec![MIB / 2; 4]);
    }

    #[test]
    fn an_ack_gives_credit_and_an_empty_one_may_grow_the_window() {
        let w = FlowWindow::growing(MIB, 8 * MIB);
        let (sending, receiving) = (w.credit().unwrap(), w.credit().unwrap());
        sending.sem.try_acquire_many(MIB as u32).unwrap().forget();
        // An ack that gives credit back never counts the queue (its lock).
        let uncounted = || -> usize { panic!("queue counted for an ack with bytes") };
        assert_eq!(
            on_data_ack(4096, Some(&sending), Some(&receiving), uncounted),
            None
        );
        assert_eq!(sending.sem.available_permits(), 4096);
        // The peer is out of credit, but the reader here took too little.
        assert_eq!(on_data_ack(0, Some(&sending), Some(&receiving), || 0), None);
        let acks = (0..2048).filter_map(|_| receiving.delivered(1024)).count();
        assert_eq!(acks, 8);
        // Too much still queued for the reader: no growth.
        assert_eq!(
            on_data_ack(0, Some(&sending), Some(&receiving), || MIB / 2),
            None
        );
        assert_eq!(
            on_data_ack(0, Some(&sending), Some(&receiving), || 0),
            Some(MIB)
        );
        // Without the extension there is nothing to give or grow.
        assert_eq!(on_data_ack(0, None, None, || 0), None);
        assert_eq!(on_data_ack(4096, None, None, || 0), None);
    }

    #[test]
    fn both_sides_agree_on_the_smaller_window_and_maximum() {
        let headers = |w: Option<&str>, max: Option<&str>| {
            let mut h = hyper::HeaderMap::new();
            if let Some(w) = w {
                h.insert(crate::proto::headers::FLOW_WINDOW, w.parse().unwrap());
            }
            if let Some(m) = max {
                h.insert(crate::proto::headers::FLOW_WINDOW_MAX, m.parse().unwrap());
            }
            h
        };
        let ours = FlowWindow::growing(MIB, 8 * MIB);
        // An upstream peer offers nothing: off.
        assert_eq!(ours.agree(&headers(None, None)), FlowWindow::OFF);
        assert_eq!(ours.agree(&headers(Some("0"), None)), FlowWindow::OFF);
        // A peer without growth: fixed at the smaller window.
        assert_eq!(
            ours.agree(&headers(Some("524288"), None)),
            FlowWindow::fixed(MIB / 2)
        );
        assert_eq!(
            ours.agree(&headers(Some("4194304"), Some("4194304"))),
            FlowWindow::growing(MIB, 4 * MIB)
        );
        assert_eq!(
            ours.agree(&headers(Some("1048576"), Some("67108864"))),
            FlowWindow::growing(MIB, 8 * MIB)
        );
        // Garbage is no offer.
        assert_eq!(ours.agree(&headers(Some("lots"), None)), FlowWindow::OFF);
        // Off here: off whatever the peer offers, and nothing offered.
        assert_eq!(
            FlowWindow::OFF.agree(&headers(Some("1048576"), Some("8388608"))),
            FlowWindow::OFF
        );
        let mut offered = hyper::HeaderMap::new();
        FlowWindow::OFF.offer(&mut offered);
        assert!(offered.is_empty());
        // What one side offers, the other agrees to as is.
        ours.offer(&mut offered);
        assert_eq!(ours.agree(&offered), ours);
        let mut fixed = hyper::HeaderMap::new();
        FlowWindow::fixed(MIB).offer(&mut fixed);
        assert!(fixed.get(crate::proto::headers::FLOW_WINDOW_MAX).is_none());
        assert_eq!(ours.agree(&fixed), FlowWindow::fixed(MIB));
    }
}

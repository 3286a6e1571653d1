//! `konnectivity`: a wire-compatible implementation of Kubernetes
//! apiserver-network-proxy (Konnectivity).
//!
//! - [`proto`]: the upstream protos (no `package` line, so the gRPC paths are
//!   `/ProxyService/Proxy` and `/AgentService/Connect`) and packet helpers.
//! - [`server`]: the proxy server (gRPC and HTTP-CONNECT frontends, agent
//!   listener, backend selection, pending dials, DRAIN).
//! - [`agent`]: the agent that dials back to one or more servers.
//! - [`client`]: the client side (one Proxy stream per dial, or HTTP-CONNECT).
//! - [`certs`]: the certificate tree upstream's `make certs` writes.
//! - [`lease`], [`tokenreview`]: what the server and agent ask the Kubernetes
//!   API (server-count Leases, agent TokenReviews); [`kube`]: the client
//!   they ask it with (kubeconfig, in-cluster, exec plugins).
//! - [`h2`]: the HTTP/2 frame layer of the gRPC frontend's own server.
//! - [`tls`], [`queue`], [`metrics`], [`http`], [`duration`], [`net`]: shared plumbing.

pub mod agent;
pub mod certs;
pub mod client;
pub mod duration;
pub(crate) mod grpc_wire;
pub mod h2;
pub mod http;
pub(crate) mod idle_flush;
pub(crate) mod keepalive;
pub mod kube;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod queue;
pub(crate) mod self_wake;
pub mod server;
pub(crate) mod stream_sender;
pub mod tls;
pub mod tokenreview;

/// Keeps glibc's malloc from handing freed read buffers back to the kernel.
///
/// The data paths allocate a buffer per socket read and free it once the
/// bytes are written on. With glibc's defaults (trim above 128 KiB of free
/// top, mmap above 128 KiB) every burst ended in `madvise`/`munmap` and the
/// next one faulted the pages back in: the tunnel bench showed page faults
/// and page clearing near the top of the profile. Raising both thresholds
/// cut the server's and agent's CPU per streamed GiB by about a quarter
/// (`cargo bench -p konnectivity --bench tunnel`, cpu ms/GiB column).
/// mimalloc did not lower CPU in the same A/B and raised the resident
/// memory per idle connection (by 13-43% over the idle rows), so the
/// system allocator stays.
/// Call once at start-up, before other threads exist. No-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread allocates.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// The runtime for proxy-server and proxy-agent: one worker thread per CPU,
/// or `GOMAXPROCS` threads when that is set — the variable operators of
/// upstream's Go binaries already use to bound their CPU use, so existing
/// manifests keep their meaning.
///
/// Fewer workers can be faster: a packet crosses several tasks, and with
/// more workers than free cores those hand-offs become cross-thread
/// wake-ups. On 2 cores shared by server, agent, client and backend,
/// GOMAXPROCS=1 cut server+agent CPU per streamed GiB by 3-30% (mostly
/// 10-30%) in four runs of the tunnel bench.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = gomaxprocs(std::env::var("GOMAXPROCS").ok().as_deref()) {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}

/// GOMAXPROCS as Go reads it: a positive integer, anything else ignored.
fn gomaxprocs(value: Option<&str>) -> Option<usize> {
    value?.trim().parse::<usize>().ok().filter(|n| *n > 0)
}

/// The default most a connection's flow-control window grows to
/// (`--flow-window-max-bytes`, server and agent): enough that one upload
/// on 2 CPUs is no longer held back by credit (docs/tunnel-benchmarks.md).
pub const DEFAULT_FLOW_WINDOW_MAX: usize = 8 << 20;

/// Read size for sockets (upstream: 4 KiB on the agent, 32 KiB on the
/// HTTP-CONNECT side). Bigger reads mean fewer packets per byte. An idle
/// connection holds no read buffer (see [`poll_read_pooled`]).
pub const READ_CHUNK: usize = 64 * 1024;

/// HTTP/2 SETTINGS_MAX_FRAME_SIZE we advertise: one DATA packet (a
/// `BULK_READ_CHUNK` read plus the gRPC and proto headers) fits one frame
/// instead of a full frame and a tiny one.
pub const H2_MAX_FRAME: u32 = 2 * BULK_READ_CHUNK as u32;

/// Read size for a peer that streams while its reads fill their buffer
/// (the agent's reader of a backend, once moved, see
/// `agent::read_endpoint`; the server's reader of an HTTP-CONNECT client):
/// what the floor's relays read. Four times fewer packets, frames and backend
/// wake-ups per byte than `READ_CHUNK` (docs/tunnel-benchmarks.md).
pub const BULK_READ_CHUNK: usize = 4 * READ_CHUNK;

/// The most client data the server puts in one DATA packet toward an
/// agent. konnectivity-client sends each write as one packet (up to the
/// 4 MiB message limit); forwarded whole, it would hold the agent stream,
/// which every connection of that agent shares, for the length of one
/// message. Pieces let other connections' packets in between.
pub const MAX_DATA_PIECE: usize = 4 * READ_CHUNK;

/// How long data still on its way to a reader gets once the other end of
/// its tunnel has gone (the client left, or CLOSE_REQ came): long enough
/// for a reader that is slow but reading, while a reader that never reads
/// cannot keep the tunnel, and the bytes it holds, for good.
pub const DRAIN_AFTER_CLOSE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a shared stream's reader waits for a connection whose queue is
/// full, on a link without the flow-control extension: the stream goes on
/// at the pace of a reader that takes bytes (as upstream's does), and one
/// that takes none for this long has its connection closed.
pub const READER_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// gRPC's default maximum message size, which upstream keeps.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Reads once from `reader` and returns the bytes read (empty at EOF).
///
/// See [`poll_read_pooled`]: an idle connection holds no buffer; large reads
/// keep theirs (no copy); small ones are copied into a right-sized one, so a
/// queued packet never pins much more memory than the bytes it carries
/// (queues count bytes).
pub async fn read_chunk<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<bytes::Bytes> {
    read_chunk_of(reader, READ_CHUNK).await
}

/// [`read_chunk`] with reads of up to `size` bytes.
pub async fn read_chunk_of<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    size: usize,
) -> std::io::Result<bytes::Bytes> {
    std::future::poll_fn(|cx| {
        poll_read_pooled(std::pin::Pin::new(&mut *reader), cx, size).map_ok(|b| b.freeze())
    })
    .await
}

thread_local! {
    /// This thread's spare read buffers, one for each pooled size
    /// ([`READ_CHUNK`], [`BULK_READ_CHUNK`]), empty between polls.
    static SPARE_READ_BUFFERS: std::cell::RefCell<[bytes::BytesMut; 2]> =
        std::cell::RefCell::new([bytes::BytesMut::new(), bytes::BytesMut::new()]);
}

/// Polls one read of up to `size` bytes from `reader`.
///
/// Why a pool: most reads of a short connection find nothing (`Pending`)
/// or a few bytes, and a buffer allocated per poll is a `size` malloc and
/// free each time, which glibc serves from its shared heap, not its
/// per-thread cache (64 KiB and up). Here each thread keeps one spare
/// buffer per pooled size: a poll that reads little copies the bytes into
/// a right-sized buffer and keeps the spare; one that reads a quarter of
/// `size` or more takes it along (no copy), and the next poll allocates a
/// fresh one. Other sizes get a buffer per poll.
pub fn poll_read_pooled<R: tokio::io::AsyncRead + ?Sized>(
    reader: std::pin::Pin<&mut R>,
    cx: &mut std::task::Context<'_>,
    size: usize,
) -> std::task::Poll<std::io::Result<bytes::BytesMut>> {
    use std::task::Poll;
    let slot = match size {
        READ_CHUNK => Some(0),
        BULK_READ_CHUNK => Some(1),
        _ => None,
    };
    // Taken out for the read: nothing borrows the pool while `reader` runs.
    let mut buf = slot
        .map(|i| SPARE_READ_BUFFERS.with(|p| std::mem::take(&mut p.borrow_mut()[i])))
        .unwrap_or_default();
    if buf.capacity() < size {
        buf = bytes::BytesMut::with_capacity(size);
    }
    let read = tokio_util::io::poll_read_buf(reader, cx, &mut buf);
    let out = match read {
        Poll::Ready(Ok(n)) if n >= size / 4 => return Poll::Ready(Ok(buf)),
        Poll::Ready(Ok(_)) => Poll::Ready(Ok(bytes::BytesMut::from(&buf[..]))),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    };
    if let Some(i) = slot {
        buf.clear();
        SPARE_READ_BUFFERS.with(|p| p.borrow_mut()[i] = buf);
    }
    out
}

#[cfg(test)]
mod runtime_tests {
    #[test]
    fn gomaxprocs_is_read_like_go() {
        use super::gomaxprocs;
        assert_eq!(gomaxprocs(Some("1")), Some(1));
        assert_eq!(gomaxprocs(Some(" 4 ")), Some(4));
        assert_eq!(gomaxprocs(Some("0")), None);
        assert_eq!(gomaxprocs(Some("-2")), None);
        assert_eq!(gomaxprocs(Some("two")), None);
        assert_eq!(gomaxprocs(None), None);
    }

    #[tokio::test]
    async fn reads_are_bounded_by_the_size_asked_for() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(&vec![7u8; 300 * 1024]).await.unwrap();
        let big = super::read_chunk_of(&mut b, super::BULK_READ_CHUNK)
            .await
            .unwrap();
        assert_eq!(big.len(), super::BULK_READ_CHUNK);
        let small = super::read_chunk(&mut b).await.unwrap();
        assert_eq!(small.len(), super::READ_CHUNK.min(300 * 1024 - big.len()));
        drop(a);
        let rest = super::read_chunk(&mut b).await.unwrap();
        assert_eq!(big.len() + small.len() + rest.len(), 300 * 1024);
        assert!(super::read_chunk(&mut b).await.unwrap().is_empty(), "EOF");
    }

    /// The thread's spare buffer survives reads that find nothing or a
    /// little, and leaves with a large read instead of being copied.
    #[test]
    fn small_reads_keep_the_spare_buffer_and_large_ones_take_it() {
        use super::{READ_CHUNK, SPARE_READ_BUFFERS, poll_read_pooled};
        use std::io::Write;
        use std::pin::Pin;
        use std::task::{Context, Waker};
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let mut rd = {
            let _in_rt = rt.enter();
            tokio::net::UnixStream::from_std(b).unwrap()
        };
        let spare =
            || SPARE_READ_BUFFERS.with(|p| (p.borrow()[0].as_ptr(), p.borrow()[0].capacity()));

        let mut cx = Context::from_waker(Waker::noop());
        let first = {
            let _in_rt = rt.enter();
            poll_read_pooled(Pin::new(&mut rd), &mut cx, READ_CHUNK)
        };
        assert!(first.is_pending(), "nothing written yet");
        let (kept, cap) = spare();
        assert_eq!(cap, READ_CHUNK, "a poll that read nothing keeps its buffer");
        // The runtime sees the socket turn readable.
        let mut read = || {
            rt.block_on(std::future::poll_fn(|cx| {
                poll_read_pooled(Pin::new(&mut rd), cx, READ_CHUNK)
            }))
            .unwrap()
        };
        (&a).write_all(&[5u8; 100]).unwrap();
        let small = read();
        assert_eq!(&small[..], &[5u8; 100][..]);
        assert!(small.capacity() < 4096, "copied into a right-sized buffer");
        assert_eq!(spare(), (kept, READ_CHUNK), "the same spare stays");
        (&a).write_all(&vec![6u8; READ_CHUNK / 2]).unwrap();
        let large = read();
        assert_eq!(large.len(), READ_CHUNK / 2);
        assert_eq!(
            (large.as_ptr(), large.capacity()),
            (kept, READ_CHUNK),
            "no copy"
        );
        assert_eq!(spare().1, 0, "the spare left with the read");
        drop(a);
        assert!(read().is_empty(), "EOF");
        assert_eq!(spare().1, READ_CHUNK, "a fresh spare after the EOF poll");
    }
}

//! The client side: a gRPC tunnel (one `ProxyService/Proxy` stream per dial,
//! like konnectivity-client's single-use tunnel) and HTTP-CONNECT, over TCP
//! with mTLS or over a unix socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;

use crate::proto::proxy_service_client::ProxyServiceClient;
use crate::proto::{Checked, Packet};

/// Where the proxy server's frontend listens.
#[derive(Clone)]
pub enum ProxyAddr {
    Tcp {
        host: String,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    Uds(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the proxy: {0}")]
    Connect(String),
    #[error("dial failed: {0}")]
    Dial(String),
    #[error("proxy answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Anything the tunnel hands back.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw stream to the proxy (TLS with ALPN h2 or http/1.1, or UDS).
pub async fn raw_connect(addr: &ProxyAddr, alpn_h2: bool) -> Result<Box<dyn Io>, ClientError> {
    match addr {
        #[cfg(unix)]
        ProxyAddr::Uds(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        // Unix sockets exist on unix only (tokio has no AF_UNIX on Windows).
        #[cfg(not(unix))]
        ProxyAddr::Uds(path) => Err(ClientError::Connect(format!(
            "{}: unix sockets are not supported on this platform",
            path.display()
        ))),
        ProxyAddr::Tcp { host, port, tls } => {
            let tcp = TcpStream::connect((host.as_str(), *port)).await?;
            tcp.set_nodelay(true)?;
            match tls {
                None => Ok(Box::new(tcp)),
                Some(cfg) => {
                    let mut cfg = (**cfg).clone();
                    cfg.alpn_protocols = if alpn_h2 {
                        vec![b"h2".to_vec()]
                    } else {
                        vec![b"http/1.1".to_vec()]
                    };
                    let name = crate::tls::server_name(host)
                        .map_err(|e| ClientError::Connect(e.to_string()))?;
                    let conn = TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
                    Ok(Box::new(conn))
                }
            }
        }
    }
}

/// One HTTP/2 connection to the proxy, usable as the transport of the
/// generated gRPC clients (`ProxyServiceClient::new(conn)`); clones share
/// the connection, which closes once every clone and stream is gone.
///
/// Why not tonic's `Channel`: a channel per dial (kube-apiserver's way, and
/// so the bench's) also starts a buffer worker task, a reconnect wrapper
/// and a connector service; on 2 CPUs that bookkeeping was a visible part
/// of the client's CPU per dial. A dial needs only hyper's HTTP/2 client
/// connection plus the request origin, which is what this adds.
#[derive(Clone)]
pub struct GrpcConn {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    /// `http://<authority>`, prefixed to the generated clients' paths.
    origin: tonic::codegen::http::uri::Authority,
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for GrpcConn {
    type Response = tonic::codegen::http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(tonic::codegen::http::uri::Scheme::HTTP);
        parts.authority = Some(self.origin.clone());
        if let Ok(uri) = tonic::codegen::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        Box::pin(self.send.send_request(req))
    }
}

/// A gRPC connection to the proxy (one HTTP/2 connection, driven by its own
/// task until it closes).
pub async fn grpc_channel(addr: &ProxyAddr) -> Result<GrpcConn, ClientError> {
    let authority = match addr {
        ProxyAddr::Tcp { host, port, .. } if host.contains(':') => format!("[{host}]:{port}"),
        ProxyAddr::Tcp { host, port, .. } => format!("{host}:{port}"),
        ProxyAddr::Uds(_) => "localhost".into(),
    };
    let origin = authority
        .parse()
        .map_err(|e| ClientError::Connect(format!("{authority}: {e}")))?;
    let io = raw_connect(addr, true).await?;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(crate::H2_MAX_FRAME)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Connect(format!("HTTP/2 handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "gRPC connection to the proxy ended");
        }
    });
    Ok(GrpcConn { send, origin })
}

/// Dials `address` through the proxy on its own Proxy stream. The returned
/// stream carries the connection's bytes; shutting it down or dropping it
/// sends CLOSE_REQ, and the stream stays open until the server answers
/// with CLOSE_RSP (so the server sees the connection end, not a reset).
pub async fn grpc_dial(channel: GrpcConn, address: &str) -> Result<GrpcTunnel, ClientError> {
    let mut client = ProxyServiceClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<Packet>(64);
    let random = crate::server::random_dial_id();
    tx.send(Packet::dial_req("tcp", address, random))
        .await
        .map_err(|_| ClientError::Stream("closed".into()))?;
    let resp = client
        .proxy(ReceiverStream::new(rx))
        .await
        .map_err(|s| ClientError::Stream(s.to_string()))?;
    let mut inbound = resp.into_inner();
    let connect_id = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| ClientError::Dial("dial timeout, backstop".into()))?
            .map_err(|s| ClientError::Stream(s.to_string()))?
            .ok_or_else(|| ClientError::Stream("stream ended before DIAL_RSP".into()))?;
        match msg.checked() {
            Ok(Checked::DialRsp(r)) if r.random == random => {
                if !r.error.is_empty() {
                    return Err(ClientError::Dial(r.error));
                }
                break r.connect_id;
            }
            Ok(Checked::DialCls(_)) => {
                return Err(ClientError::Dial("dial closed by the server".into()));
            }
            _ => continue,
        }
    };
    let (to_reader, from_task) = mpsc::channel(TUNNEL_READ_AHEAD);
    let close_sent = Arc::new(AtomicBool::new(false));
    tokio::spawn(read_tunnel(
        inbound,
        connect_id,
        to_reader,
        tx.clone(),
        close_sent.clone(),
    ));
    Ok(GrpcTunnel {
        connect_id,
        from_task,
        unread: Bytes::new(),
        outbound: PollSender::new(tx),
        close_sent,
    })
}

/// DATA packets the tunnel's task reads ahead of its reader; with the
/// server's packets of up to `BULK_READ_CHUNK` bytes, at most 1 MiB.
const TUNNEL_READ_AHEAD: usize = 4;

/// One tunnel from [`grpc_dial`]: its bytes, read and written in place.
///
/// Why not a duplex pipe with a task on its far end (what this was): the
/// pipe copied every byte in and out once more, and each write crossed to
/// that task before it became a packet. Now writes become packets here,
/// and a task only decodes the server's packets and hands their payloads
/// over as they are.
pub struct GrpcTunnel {
    connect_id: i64,
    from_task: mpsc::Receiver<Bytes>,
    /// The rest of the last payload taken from the task.
    unread: Bytes,
    outbound: PollSender<Packet>,
    /// Set once nothing more may be sent: CLOSE_REQ has gone (from
    /// `poll_shutdown`, or from the task when the tunnel is dropped
    /// without it), or the task has seen the connection end.
    close_sent: Arc<AtomicBool>,
}

/// Reads the server's packets for one tunnel until CLOSE_RSP (or the
/// stream's end). When the tunnel is dropped without CLOSE_REQ, sends it
/// and keeps the request stream open (its `outbound` clone) until the
/// answer.
async fn read_tunnel(
    mut inbound: tonic::Streaming<Packet>,
    connect_id: i64,
    to_reader: mpsc::Sender<Bytes>,
    outbound: mpsc::Sender<Packet>,
    close_sent: Arc<AtomicBool>,
) {
    // Made once (a fresh one per packet would register a waiter each time).
    let watch = to_reader.clone();
    let reader_gone = watch.closed();
    tokio::pin!(reader_gone);
    // None once the tunnel is gone: what still comes is read and dropped.
    let mut to_reader = Some(to_reader);
    loop {
        let msg = tokio::select! {
            biased;
            _ = &mut reader_gone, if to_reader.is_some() => {
                to_reader = None;
                if !close_sent.swap(true, Ordering::AcqRel) {
                    let _ = outbound.send(Packet::close_req(connect_id)).await;
                }
                continue;
            }
            m = inbound.message() => m,
        };
        let Ok(Some(p)) = msg else { break };
        match p.checked() {
            // Fails only once the tunnel is gone, which the next turn sees.
            Ok(Checked::Data(d)) if d.connect_id == connect_id => {
                if let Some(reader) = &to_reader {
                    let _ = reader.send(d.data).await;
                }
            }
            Ok(Checked::CloseRsp(_)) => break,
            _ => {}
        }
    }
    // The connection is over: the tunnel's writes fail from now on.
    close_sent.store(true, Ordering::Release);
}

impl AsyncRead for GrpcTunnel {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match std::task::ready!(this.from_task.poll_recv(cx)) {
                Some(b) => this.unread = b,
                None => return std::task::Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.unread.len());
        buf.put_slice(&this.unread[..n]);
        bytes::Buf::advance(&mut this.unread, n);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GrpcTunnel {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent.load(Ordering::Acquire) {
            return std::task::Poll::Ready(Err(broken_pipe("the tunnel was shut down")));
        }
        if data.is_empty() {
            return std::task::Poll::Ready(Ok(0));
        }
        if std::task::ready!(this.outbound.poll_reserve(cx)).is_err() {
            return std::task::Poll::Ready(Err(broken_pipe("the tunnel's stream has ended")));
        }
        let n = data.len().min(crate::MAX_DATA_PIECE);
        let packet = Packet::data(this.connect_id, Bytes::copy_from_slice(&data[..n]));
        if this.outbound.send_item(packet).is_err() {
            return std::task::Poll::Ready(Err(broken_pipe("the tunnel's stream has ended")));
        }
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.close_sent.load(Ordering::Acquire) {
            return std::task::Poll::Ready(Ok(()));
        }
        if std::task::ready!(this.outbound.poll_reserve(cx)).is_ok()
            && !this.close_sent.swap(true, Ordering::AcqRel)
        {
            let _ = this.outbound.send_item(Packet::close_req(this.connect_id));
        }
        std::task::Poll::Ready(Ok(()))
    }
}

fn broken_pipe(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, why)
}

/// Opens an HTTP-CONNECT tunnel to `address`. Over TLS, a write that finds
/// the socket full leaves its last records in rustls' buffer: flush after
/// the last write before waiting for an answer to it.
pub async fn http_connect(
    addr: &ProxyAddr,
    address: &str,
    user_agent: &str,
) -> Result<Box<dyn Io>, ClientError> {
    let mut io = raw_connect(addr, false).await?;
    io.write_all(
        format!(
            "CONNECT {address} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: {user_agent}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    io.flush().await?;
    // Buffered, as kube-apiserver's Go dialer reads it (bufio): a byte at
    // a time cost a syscall per byte. Whatever follows the head is kept.
    let mut head = Vec::with_capacity(1024);
    // Only bytes not yet searched (and the three before them) can hold the
    // end: a head trickled a byte per read is not rescanned from the start.
    let mut searched: usize = 0;
    let head_end = loop {
        let from = searched.saturating_sub(3);
        if let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + end + 4;
        }
        searched = head.len();
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::Stream("response head too large".into()));
        }
        head.reserve(1024);
        if io.read_buf(&mut head).await? == 0 {
            return Err(ClientError::Refused {
                status: 0,
                body: String::from_utf8_lossy(&head).into_owned(),
            });
        }
    };
    let early = Bytes::copy_from_slice(&head[head_end..]);
    head.truncate(head_end);
    let text = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        let mut body = early.to_vec();
        let _ = tokio::time::timeout(Duration::from_secs(2), io.read_to_end(&mut body)).await;
        return Err(ClientError::Refused {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    if early.is_empty() {
        return Ok(io);
    }
    Ok(Box::new(Prefixed { early, io }))
}

/// The longest CONNECT answer head `http_connect` reads.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A tunnel whose first bytes came in the same read as the CONNECT answer.
struct Prefixed {
    early: Bytes,
    io: Box<dyn Io>,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.early.is_empty() {
            return std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.early.len().min(buf.remaining());
        let taken = self.early.split_to(n);
        buf.put_slice(&taken);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A minimal HTTP/1.1 GET (`Connection: close`) over an open tunnel:
/// returns the status code and body.
pub async fn http_get<S: Io + ?Sized>(
    io: &mut S,
    host: &str,
    path: &str,
) -> Result<(u16, Vec<u8>), ClientError> {
    io.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: proxy-test-client\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    io.flush().await?;
    let mut raw = Vec::new();
    io.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            ClientError::Stream(format!("no HTTP response (got {} bytes)", raw.len()))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[..eol])
                .unwrap_or("0")
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A proxy on a unix socket that sends `pieces` one write each after
    /// reading the CONNECT head, then echoes until EOF (`echo`) or closes.
    async fn proxy_answering(pieces: Vec<Vec<u8>>, echo: bool) -> (tempfile::TempDir, ProxyAddr) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap() == 0 {
                    return;
                }
                head.push(b[0]);
            }
            for piece in pieces {
                s.write_all(&piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !echo {
                return;
            }
            let (mut rd, mut wr) = s.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
        (dir, ProxyAddr::Uds(path))
    }

    /// Bytes that arrive in the same read as the 200 head are the
    /// tunnel's first bytes, not lost, and the tunnel then carries the rest.
    #[tokio::test]
    async fn bytes_behind_the_head_are_read_first() {
        let (_dir, addr) = proxy_answering(
            vec![b"HTTP/1.1 200 Connection Established\r\n\r\nearly".to_vec()],
            true,
        )
        .await;
        let mut io = http_connect(&addr, "10.0.0.1:80", "t").await.unwrap();
        let mut early = [0u8; 5];
        io.read_exact(&mut early).await.unwrap();
        assert_eq!(&early, b"early");
        io.write_all(b"echoed").await.unwrap();
        let mut back = [0u8; 6];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"echoed");
    }

    /// A head that trickles in, its final CRLFCRLF split over three reads
    /// (each read searches only the new bytes and the three before), is
    /// found.
    #[tokio::test]
    async fn a_head_in_pieces_is_found() {
        let (_dir, addr) = proxy_answering(
            vec![
                b"HTTP/1.1 200 OK\r\n".to_vec(),
                b"X: y\r".to_vec(),
                b"\n\r".to_vec(),
                b"\n".to_vec(),
            ],
            true,
        )
        .await;
        let mut io = tokio::time::timeout(
            Duration::from_secs(10),
            http_connect(&addr, "10.0.0.1:80", "t"),
        )
        .await
        .expect("the end of the head was missed")
        .unwrap();
        io.write_all(b"x").await.unwrap();
        let mut back = [0u8; 1];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"x");
    }

    /// A refusal carries its status and its whole body, including the part
    /// read with the head.
    #[tokio::test]
    async fn a_refusal_keeps_its_body() {
        let (_dir, addr) = proxy_answering(
            vec![
                b"HTTP/1.1 502 Bad Gateway\r\n\r\nconnection ".to_vec(),
                b"refused".to_vec(),
            ],
            false,
        )
        .await;
        let err = match http_connect(&addr, "10.0.0.1:80", "t").await {
            Err(e) => e,
            Ok(_) => panic!("a 502 was taken as a tunnel"),
        };
        match err {
            ClientError::Refused { status, body } => {
                assert_eq!(status, 502);
                assert_eq!(body, "connection refused");
            }
            e => panic!("{e}"),
        }
    }
}

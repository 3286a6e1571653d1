//! The HTTP-CONNECT frontend: one CONNECT per socket, then a raw relay.
//! Responses follow upstream byte for byte where clients look at them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::state::{Conn, DialError, MovedClientReader, Shared, random_id};
use crate::proto::Checked;
use crate::read_chunk;

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Client bytes held while the dial is pending.
const MAX_EARLY: usize = 64 * 1024;
/// The whole request head must arrive within this time (one deadline, not
/// one per read: a client trickling a byte at a time is cut off too).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

fn go_error(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Upstream's mapping of an agent's dial error to a status.
pub(crate) fn dial_error_status(err: &str) -> (u16, &'static str) {
    let e = err.to_lowercase();
    if e.contains("timeout") || e.contains("deadline exceeded") || e.contains("timed out") {
        (504, "Gateway Timeout")
    } else if e.contains("too many open files") {
        (503, "Service Unavailable")
    } else {
        (502, "Bad Gateway")
    }
}

/// How long a refusal may wait for a client that does not read it.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a refusal, how long the client's unread bytes are still read and
/// dropped, and how many at most. Closing a socket with unread bytes makes
/// the kernel answer with a reset instead of a FIN, and a client that sent
/// more behind its head (a pipelined request, early tunnel bytes) would
/// read the end of the refusal as an error; a body delimited by the close,
/// as the 500's is, would be cut off.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_DRAIN_MAX: usize = 1024 * 1024;

/// Sends a refusal and ends the client's side of the socket: flushed, so
/// a TLS stream's records leave rustls' buffer, and shut down, so a TLS
/// client gets close_notify (a rustls client reading a body delimited by
/// the close otherwise sees an unexpected EOF). Then what the client sent
/// and the server did not read is read and dropped, until its EOF or for
/// [`REFUSAL_LINGER`], so the socket closes with a FIN, not a reset.
/// Errors are ignored (the client may already be gone), and a client that
/// does not read gets [`REFUSAL_TIMEOUT`], not a task held for good.
async fn refuse<R, W>(rd: &mut R, wr: &mut W, reply: &[u8])
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ended = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        wr.write_all(reply).await.is_ok() && wr.flush().await.is_ok() && wr.shutdown().await.is_ok()
    })
    .await;
    if ended == Ok(true) {
        drain_unread(rd).await;
    }
}

/// Reads and drops what the client still sends; see [`REFUSAL_LINGER`].
async fn drain_unread<R: AsyncRead + Unpin>(rd: &mut R) {
    use tokio::io::AsyncReadExt;
    // On the heap and only here: a buffer in the future would be held by
    // every connection that is never refused.
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = REFUSAL_DRAIN_MAX;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while left > 0 {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

enum HeadError {
    Malformed,
    Method(String),
    NoTarget,
}

/// The CONNECT target of a complete request head.
///
/// A plain function, not inline in `serve`: httparse's header array (2 KiB)
/// would otherwise live in the connection's future for its whole life,
/// since that future's locals stay allocated across every later await.
fn parse_head(head: &[u8]) -> Result<String, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let (method, target) = match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => (req.method.unwrap_or(""), req.path.unwrap_or("")),
        _ => return Err(HeadError::Malformed),
    };
    if method != "CONNECT" {
        return Err(HeadError::Method(method.to_string()));
    }
    let address = if target.is_empty() {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .unwrap_or("")
    } else {
        target
    };
    if address.is_empty() {
        return Err(HeadError::NoTarget);
    }
    Ok(address.to_string())
}

/// Tells whether the client has hung up (FIN or reset) without reading
/// from its socket: a relay learns of a FIN only once it has read every
/// byte sent before it, and a tunnel waiting for a backend that never reads
/// never gets that far. The kernel knows at once (POLLRDHUP), for TCP and
/// unix sockets alike.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HangupProbe(#[cfg(unix)] Option<std::os::fd::RawFd>);

impl HangupProbe {
    /// A probe that never reports a hang-up (streams with no socket).
    pub(crate) fn none() -> Self {
        HangupProbe(
            #[cfg(unix)]
            None,
        )
    }

    /// A probe of `socket`, valid while the socket is open (the caller
    /// keeps it open for as long as it asks).
    #[cfg(unix)]
    pub(crate) fn of(socket: &impl std::os::fd::AsRawFd) -> Self {
        HangupProbe(Some(socket.as_raw_fd()))
    }

    /// Elsewhere the client's hang-up is seen only by reading its EOF.
    #[cfg(not(unix))]
    pub(crate) fn of<T>(_socket: &T) -> Self {
        Self::none()
    }

    fn hung_up(&self) -> bool {
        #[cfg(unix)]
        if let Some(fd) = self.0 {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one pollfd, read and written by poll only; timeout 0.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            return n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        }
        false
    }
}

/// How often a send that waits for credit checks whether its client left.
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// Sends client bytes toward the agent, watching the client while a send
/// waits (for credit, when the backend reads slowly or not at all). Once
/// the client has hung up, each send gets [`crate::DRAIN_AFTER_CLOSE`]: what
/// the client sent before leaving is still delivered to a backend that
/// reads, but one that never reads cannot keep the tunnel, and the bytes it
/// holds, for good.
struct ClientWatch {
    probe: HangupProbe,
    gone: bool,
    /// Made at the tunnel's first send that has to wait and re-armed at
    /// each later one: one timer per stalled tunnel, not one per send.
    check: Option<tokio::time::Interval>,
}

impl ClientWatch {
    fn new(probe: HangupProbe) -> Self {
        ClientWatch {
            probe,
            gone: false,
            check: None,
        }
    }

    /// False: the send failed or was given up (the tunnel ends).
    async fn send(&mut self, sh: &Shared, send: impl std::future::Future<Output = bool>) -> bool {
        use futures_util::FutureExt;
        tokio::pin!(send);
        // Most sends finish at once: no timer for them.
        if let Some(sent) = (&mut send).now_or_never() {
            return sent;
        }
        if !self.gone {
            let check = match &mut self.check {
                Some(check) => {
                    check.reset();
                    check
                }
                None => {
                    let start = tokio::time::Instant::now() + HANGUP_CHECK;
                    let mut check = tokio::time::interval_at(start, HANGUP_CHECK);
                    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    self.check.insert(check)
                }
            };
            loop {
                tokio::select! {
                    sent = &mut send => return sent,
                    _ = check.tick() => if self.probe.hung_up() {
                        self.gone = true;
                        break;
                    },
                }
            }
        }
        match tokio::time::timeout(crate::DRAIN_AFTER_CLOSE, send).await {
            Ok(sent) => sent,
            Err(_) => {
                sh.metrics.drain_timeouts_total.inc();
                false
            }
        }
    }
}

struct Guard<'a>(&'a Shared);
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.metrics.http_connections.dec();
    }
}

/// How a client connection whose download has ended is ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Closing the socket says it all: a bare TCP or unix socket's close
    /// sends the same FIN (or EOF) a shutdown would, one system call fewer
    /// per connection.
    Close,
    /// The stream writes its own end first (TLS: close_notify).
    Shutdown,
}

/// Serves one HTTP-CONNECT client socket to the end; `client` watches it
/// for a hang-up while its bytes wait for a backend, and `end` says how
/// the stream is ended once the agent has closed the connection.
pub(crate) async fn serve<S>(sh: Arc<Shared>, io: S, client: HangupProbe, end: StreamEnd)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    sh.metrics.http_connections.inc();
    let _guard = Guard(&sh);
    let (mut rd, mut wr) = tokio::io::split(io);

    // Read the request head.
    let mut head = BytesMut::new();
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let head_end = loop {
        let chunk = match tokio::time::timeout_at(deadline, read_chunk(&mut rd)).await {
            Ok(Ok(c)) if !c.is_empty() => c,
            Ok(_) => return,
            Err(_) => {
                sh.metrics.bad("http_head_timeout");
                refuse(
                    &mut rd,
                    &mut wr,
                    &go_error(408, "Request Timeout", "408 Request Timeout"),
                )
                .await;
                return;
            }
        };
        // Only the new bytes (and the three before them) can hold the end.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk);
        let end = head[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|pos| from + pos + 4);
        if let Some(end) = end
            && end <= MAX_HEAD
        {
            break end;
        }
        if head.len() > MAX_HEAD {
            sh.metrics.bad("http_head_too_large");
            refuse(
                &mut rd,
                &mut wr,
                &go_error(
                    431,
                    "Request Header Fields Too Large",
                    "431 Request Header Fields Too Large",
                ),
            )
            .await;
            return;
        }
    };
    let address = match parse_head(&head[..head_end]) {
        Ok(address) => address,
        Err(HeadError::Malformed) => {
            sh.metrics.bad("http_malformed");
            tracing::info!("malformed HTTP request on the HTTP-CONNECT port");
            refuse(&mut rd, &mut wr, b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request").await;
            return;
        }
        Err(HeadError::Method(method)) => {
            sh.metrics.bad("http_method");
            tracing::info!(method, "refused: only CONNECT is served");
            refuse(
                &mut rd,
                &mut wr,
                &go_error(
                    405,
                    "Method Not Allowed",
                    "this proxy only supports CONNECT passthrough\n",
                ),
            )
            .await;
            return;
        }
        Err(HeadError::NoTarget) => {
            sh.metrics.bad("http_no_target");
            refuse(&mut rd, &mut wr, b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request: missing CONNECT target").await;
            return;
        }
    };
    let mut early = BytesMut::from(&head[head_end..]);
    drop(head);

    let fe = sh.new_frontend();
    let random = random_id();
    if let Err(e) = sh.start_dial(&fe, "tcp", &address, random).await {
        tracing::info!(%address, error = %e, "CONNECT refused");
        let reply = match e {
            DialError::NoAgent => format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ncurrently no tunnels available: {e}"
            )
            .into_bytes(),
            DialError::Timeout => go_error(504, "Gateway Timeout", &format!("Failed to tunnel dial request: {e}\r\n")),
            DialError::Overloaded | DialError::QueuedBytesCap => go_error(503, "Service Unavailable", &format!("Failed to tunnel dial request: {e}\r\n")),
            _ => go_error(502, "Bad Gateway", &format!("Failed to tunnel dial request: {e}\r\n")),
        };
        refuse(&mut rd, &mut wr, &reply).await;
        sh.frontend_gone(&fe);
        return;
    }

    // Wait for the agent's answer; a client that hangs up cancels the dial.
    let connect_id = loop {
        tokio::select! {
            p = fe.queue.pop() => {
                let Some(p) = p.and_then(|p| p.checked().ok()) else {
                    sh.frontend_gone(&fe);
                    return;
                };
                match p {
                    Checked::DialRsp(r) if r.error.is_empty() => break r.connect_id,
                    Checked::DialRsp(r) => {
                        let (code, reason) = dial_error_status(&r.error);
                        refuse(&mut rd, &mut wr, &go_error(code, reason, &r.error)).await;
                        sh.frontend_gone(&fe);
                        return;
                    }
                    _ => {
                        sh.frontend_gone(&fe);
                        return;
                    }
                }
            }
            c = read_chunk(&mut rd) => {
                match c {
                    Ok(c) if !c.is_empty() && early.len() + c.len() <= MAX_EARLY => early.extend_from_slice(&c),
                    _ => {
                        sh.frontend_gone(&fe);
                        return;
                    }
                }
            }
        }
    };
    // Nothing else may share this write (newer kube-apiservers reject it).
    if wr
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
        || wr.flush().await.is_err()
    {
        sh.frontend_gone(&fe);
        return;
    }
    // The agent may have answered, sent everything and closed before this
    // task ran (DIAL_RSP, DATA and CLOSE_RSP in one read of the agent
    // link): the connection is then finished, but what it sent is queued
    // and still goes to the client; only the client's bytes have nowhere
    // to go.
    let conn = fe.conn(connect_id);

    let up = {
        let sh = sh.clone();
        let conn = conn.clone();
        async move {
            let Some(conn) = conn else {
                return std::future::pending().await;
            };
            let mut watch = ClientWatch::new(client);
            if !early.is_empty()
                && !watch
                    .send(&sh, sh.send_data_to_agent(&conn, early.freeze()))
                    .await
            {
                return;
            }
            let mut size = crate::READ_CHUNK;
            loop {
                match crate::read_chunk_of(&mut rd, size).await {
                    Ok(c) if !c.is_empty() => {
                        size = next_read_size(c.len(), size);
                        if !watch.send(&sh, sh.send_data_to_agent(&conn, c)).await {
                            return;
                        }
                        if size == crate::BULK_READ_CHUNK
                            && let Some(place) = MovedClientReader::claim(&sh, &conn.backend)
                        {
                            // The rest of the reads run in the agent stream's
                            // task; this one waits for them to end. A stream
                            // task already gone drops the reader, and the
                            // tunnel ends with its agent.
                            let (done, ended) = tokio::sync::oneshot::channel();
                            place.run_there(|place| {
                                Box::pin(read_client_moved(sh, conn, rd, watch, done, place))
                            });
                            let _ = ended.await;
                            return;
                        }
                    }
                    _ => return,
                }
            }
        }
    };
    let down = async {
        // The charge is held through the write: see `pop_charged`.
        while let Some((p, _charge)) = fe.queue.pop_charged().await {
            match p.checked() {
                Ok(Checked::Data(d)) => {
                    let data: Bytes = d.data;
                    // The flush matters under TLS: a write that filled the
                    // socket returns with records still in rustls' buffer,
                    // and if no packet follows they stay there (the
                    // client sees its download stop short).
                    if wr.write_all(&data).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                    sh.delivered(&fe, connect_id, data.len());
                }
                _ => break,
            }
        }
        // Returning drops the socket (after `frontend_gone`, no wait).
        if end == StreamEnd::Shutdown {
            let _ = wr.shutdown().await;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = sh.stop.cancelled() => {}
    }
    sh.frontend_gone(&fe);
}

/// The next read's buffer for an HTTP-CONNECT client whose last read
/// brought `read` bytes into `size`: a client whose reads fill their buffer
/// (an upload) is read as much at a time as the agent reads a streaming
/// backend; one that trickles goes back to small buffers (a packet keeps
/// its read's).
fn next_read_size(read: usize, size: usize) -> usize {
    if read >= size / 2 {
        crate::BULK_READ_CHUNK
    } else {
        crate::READ_CHUNK
    }
}

/// An uploading client's reads, in its agent stream's task (see
/// [`MovedClientReader`]): each read is framed and written into the stream
/// by the task that also encrypts it, as the agent does with a streaming
/// backend, instead of handed over to it. Ends as the reads in place would
/// (EOF, an error, a send that fails), or when the tunnel's own task no
/// longer waits for it (`done` closed); then `done` tells that task.
async fn read_client_moved<R: AsyncRead + Unpin>(
    sh: Arc<Shared>,
    conn: Arc<Conn>,
    mut rd: R,
    mut watch: ClientWatch,
    mut done: tokio::sync::oneshot::Sender<()>,
    _place: MovedClientReader,
) {
    let mut size = crate::BULK_READ_CHUNK;
    loop {
        let read = tokio::select! {
            _ = done.closed() => return,
            r = crate::read_chunk_of(&mut rd, size) => r,
        };
        match read {
            Ok(c) if !c.is_empty() => {
                size = next_read_size(c.len(), size);
                let sent = tokio::select! {
                    _ = done.closed() => return,
                    ok = watch.send(&sh, sh.send_data_to_agent(&conn, c)) => ok,
                };
                if !sent {
                    break;
                }
                // The task writes this read before the next one, while the
                // bytes are still in cache (as the agent's moved reader).
                crate::self_wake::repoll_task().await;
            }
            _ => break,
        }
    }
    let _ = done.send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_head_finds_the_target_or_says_why_not() {
        let ok = parse_head(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n");
        assert!(matches!(ok, Ok(a) if a == "10.0.0.1:443"));
        let get = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(get, Err(HeadError::Method(m)) if m == "GET"));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        ));
        assert!(matches!(
            parse_head(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n"),
            Err(HeadError::Malformed)
        ));
    }

    /// The server's answer to `head` sent in one write, read to EOF.
    async fn answer(sh: Arc<Shared>, head: Vec<u8>) -> String {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(serve(sh, server, HangupProbe::none(), StreamEnd::Shutdown));
        client.write_all(&head).await.unwrap();
        // The end of the request: a refusal's drain stops at it.
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn shared() -> Arc<Shared> {
        crate::server::ProxyServer::new(crate::server::fuzzing::small_options(0, 0)).shared
    }

    /// `serve` on a client socket that holds what is written until it is
    /// flushed, as a TLS stream holds records a full socket did not take;
    /// returns the client's end and the serving task.
    fn serve_holding(sh: &Arc<Shared>) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (rd, wr) = tokio::io::split(server);
        let holding = tokio::io::join(rd, tokio::io::BufWriter::new(wr));
        let task = tokio::spawn(serve(
            sh.clone(),
            holding,
            HangupProbe::none(),
            StreamEnd::Shutdown,
        ));
        (client, task)
    }

    /// Sends a CONNECT and returns the dial's random id, as the agent sees it.
    async fn connect_and_dial(
        client: &mut (impl AsyncWrite + Unpin),
        to_agent: &mut tokio::sync::mpsc::Receiver<crate::proto::Packet>,
    ) -> i64 {
        client
            .write_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n")
            .await
            .unwrap();
        loop {
            if let Ok(Checked::DialReq(d)) = to_agent.recv().await.unwrap().checked() {
                break d.random;
            }
        }
    }

    /// A client on a `socket_bytes` pipe with its CONNECT answered: the
    /// agent's DIAL_RSP (connection 7) given, the 200 head read. Returns
    /// the client's end, the serving task, the agent stream and what it
    /// is sent.
    async fn established(
        sh: &Arc<Shared>,
        socket_bytes: usize,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        Arc<super::super::state::Backend>,
        tokio::sync::mpsc::Receiver<crate::proto::Packet>,
    ) {
        use tokio::io::AsyncReadExt;
        let (backend, mut to_agent) = super::super::state::test_backend(sh);
        let (mut client, server) = tokio::io::duplex(socket_bytes);
        let task = tokio::spawn(serve(
            sh.clone(),
            server,
            HangupProbe::none(),
            StreamEnd::Shutdown,
        ));
        let random = connect_and_dial(&mut client, &mut to_agent).await;
        sh.handle_agent_packet(&backend, crate::proto::Packet::dial_rsp(random, 7, ""));
        let mut head = [0u8; 39];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(&head[..], b"HTTP/1.1 200 Connection Established\r\n\r\n");
        (client, task, backend, to_agent)
    }

    /// A packet with nothing after it must still reach a client whose
    /// socket holds writes until flushed. Without the flush after each
    /// write this times out.
    #[tokio::test]
    async fn a_packet_with_nothing_after_it_is_flushed_to_the_client() {
        use crate::proto::Packet;
        use tokio::io::AsyncReadExt;
        let sh = shared();
        let (backend, mut to_agent) = super::super::state::test_backend(&sh);
        let (mut client, task) = serve_holding(&sh);
        let random = connect_and_dial(&mut client, &mut to_agent).await;
        sh.handle_agent_packet(&backend, Packet::dial_rsp(random, 7, ""));
        let head = b"HTTP/1.1 200 Connection Established\r\n\r\n";
        let mut got = vec![0u8; head.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &head[..]);
        // One packet, and no close after it.
        sh.handle_agent_packet(&backend, Packet::data(7, "hello".into()));
        let mut hello = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut hello))
            .await
            .expect("the packet stayed in the writer's buffer")
            .unwrap();
        assert_eq!(&hello, b"hello");
        sh.handle_agent_packet(&backend, Packet::close_rsp(7, ""));
        drop(client);
        task.await.unwrap();
    }

    /// An uploading client (reads that fill their buffer) is read in bulk,
    /// as the agent reads a streaming backend: packets larger than
    /// `READ_CHUNK` reach the agent, every byte in order. Then one that
    /// trickles gets packets of what it wrote.
    #[tokio::test]
    async fn an_uploading_client_is_read_in_bulk() {
        use crate::proto::Packet;
        use tokio::io::AsyncReadExt;
        let sh = shared();
        let (client, task, backend, mut to_agent) = established(&sh, 1 << 20).await;
        let upload: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (mut rd, mut wr) = tokio::io::split(client);
        let sent = upload.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr
        });
        let (mut received, mut largest) = (Vec::new(), 0);
        while received.len() < upload.len() {
            if let Ok(Checked::Data(d)) = to_agent.recv().await.unwrap().checked() {
                assert_eq!(d.connect_id, 7);
                largest = largest.max(d.data.len());
                received.extend_from_slice(&d.data);
            }
        }
        assert!(received == upload, "the upload arrived changed");
        assert!(
            largest > crate::READ_CHUNK && largest <= crate::BULK_READ_CHUNK,
            "largest packet {largest} bytes"
        );
        let mut wr = writer.await.unwrap();
        for _ in 0..3 {
            wr.write_all(b"tick").await.unwrap();
            loop {
                if let Ok(Checked::Data(d)) = to_agent.recv().await.unwrap().checked() {
                    assert_eq!(&d.data[..], b"tick");
                    break;
                }
            }
        }
        sh.handle_agent_packet(&backend, Packet::close_rsp(7, ""));
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.unwrap();
        drop((rd, wr));
        task.await.unwrap();
    }

    /// A connection the agent answered, sent on and closed before the
    /// client's task saw its DIAL_RSP (all three in one read of the agent
    /// link, as a backend that speaks first and closes makes them) still
    /// delivers the data; it used to be dropped. And a bare socket's stream
    /// ends by its close alone (no shutdown): the client, still holding its
    /// end open, reads the data and then EOF.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_bare_socket_ends_with_eof_after_the_data() {
        use crate::proto::Packet;
        use tokio::io::AsyncReadExt;
        let sh = shared();
        let (backend, mut to_agent) = super::super::state::test_backend(&sh);
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let probe = HangupProbe::of(&server);
        let task = tokio::spawn(serve(sh.clone(), server, probe, StreamEnd::Close));
        let random = connect_and_dial(&mut client, &mut to_agent).await;
        sh.handle_agent_packet(&backend, Packet::dial_rsp(random, 7, ""));
        sh.handle_agent_packet(&backend, Packet::data(7, "hello".into()));
        sh.handle_agent_packet(&backend, Packet::close_rsp(7, ""));
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
            .await
            .expect("no EOF after the agent closed the connection")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 Connection Established\r\n\r\nhello"
        );
        task.await.unwrap();
    }

    /// A packet being written to a client that does not read still holds
    /// its memory, so it stays in the server's queued bytes (what the cap
    /// on new dials looks at) until the write is over; it used to leave
    /// the count when popped.
    #[tokio::test]
    async fn a_packet_stuck_in_a_write_stays_counted() {
        use crate::proto::Packet;
        use tokio::io::AsyncReadExt;
        let sh = shared();
        // A client socket that takes 1 KiB and is then not read.
        let (mut client, task, backend, _to_agent) = established(&sh, 1024).await;
        sh.handle_agent_packet(&backend, Packet::data(7, vec![7u8; 64 << 10].into()));
        // Its first byte arriving means the writer has taken the packet.
        let mut first = [0u8; 1];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(sh.metrics.queued_bytes.get(), (64 << 10) + 64);
        // Read the rest: the write ends and the bytes leave the count.
        let mut rest = vec![0u8; (64 << 10) - 1];
        client.read_exact(&mut rest).await.unwrap();
        sh.handle_agent_packet(&backend, Packet::close_rsp(7, ""));
        let mut end = Vec::new();
        client.read_to_end(&mut end).await.unwrap();
        task.await.unwrap();
        assert_eq!(sh.metrics.queued_bytes.get(), 0);
    }

    /// Refusals reach a client whose socket holds writes until flushed,
    /// and end its stream: a request that is not a CONNECT, and a dial the
    /// agent answers with an error. Without the flush after a refusal, the
    /// client reads nothing.
    #[tokio::test]
    async fn refusals_are_flushed_and_end_the_stream() {
        use crate::proto::Packet;
        use tokio::io::AsyncReadExt;
        let sh = shared();
        let read_all = |mut client: tokio::io::DuplexStream| async move {
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
                .await
                .expect("the refusal stayed in the writer's buffer")
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        };

        let (mut client, task) = serve_holding(&sh);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let got = read_all(client).await;
        assert!(
            got.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{got}"
        );
        assert!(
            got.ends_with("this proxy only supports CONNECT passthrough\n"),
            "{got}"
        );
        task.await.unwrap();

        let (backend, mut to_agent) = super::super::state::test_backend(&sh);
        let (mut client, task) = serve_holding(&sh);
        let random = connect_and_dial(&mut client, &mut to_agent).await;
        sh.handle_agent_packet(
            &backend,
            Packet::dial_rsp(
                random,
                0,
                "dial tcp 127.0.0.1:80: connect: connection refused",
            ),
        );
        let got = read_all(client).await;
        assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got}");
        assert!(got.ends_with("connect: connection refused"), "{got}");
        task.await.unwrap();
    }

    /// Over TLS, a refusal ends with close_notify: a rustls client reads
    /// the whole reply and a clean end. Without the shutdown, its read to
    /// the end fails with an unexpected EOF once the socket closes.
    #[tokio::test]
    async fn a_refusal_over_tls_ends_with_close_notify() {
        use tokio::io::AsyncReadExt;
        let (_dir, server_tls, client_tls) = crate::tls::test_mtls_configs();
        let sh = shared();
        let (client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(server_tls)
                .accept(server)
                .await
                .unwrap();
            serve(sh, tls, HangupProbe::none(), StreamEnd::Shutdown).await
        });
        let mut client = tokio_rustls::TlsConnector::from(client_tls)
            .connect(crate::tls::server_name("127.0.0.1").unwrap(), client)
            .await
            .unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        client.flush().await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
            .await
            .expect("no end of stream");
        task.await.unwrap();
        let got = String::from_utf8_lossy(&out);
        assert!(
            got.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{got}"
        );
        read.expect("the refusal ended without close_notify");
    }

    /// A client that sent more behind a refused head gets the refusal and a
    /// clean end (FIN), not a reset: the server reads and drops what it
    /// did not read before closing. Real loopback TCP, since the reset is
    /// the kernel's. Linux still lets the client read the reply and the
    /// FIN that came before a reset, but leaves the reset as the socket's
    /// pending error (what a client writing more, or another stack, sees);
    /// without the drain that error is ECONNRESET.
    #[tokio::test]
    async fn a_refused_client_that_sent_more_gets_a_clean_end() {
        use tokio::io::AsyncReadExt;
        let sh = shared();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let probe = HangupProbe::of(&socket);
            serve(sh, socket, probe, StreamEnd::Close).await
        });
        let (mut rd, mut wr) = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap()
            .into_split();
        // Several reads' worth behind the head, well under the drain's cap.
        let mut sent = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        sent.resize(sent.len() + 4 * crate::READ_CHUNK, b'x');
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&sent).await;
            let _ = wr.shutdown().await;
            wr
        });
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server did not close")
            .unwrap();
        let wr = writer.await.unwrap();
        // Loopback delivers a reset within the closing call; the pause
        // only makes a missed one less likely.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        let got = String::from_utf8_lossy(&out);
        assert!(
            got.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{got}"
        );
        let pending = rd.reunite(wr).unwrap().take_error().unwrap();
        assert!(pending.is_none(), "the refusal ended with {pending:?}");
    }

    /// A client that sends a bad request and never reads the refusal (a
    /// socket too small to take it) holds its connection for
    /// `REFUSAL_TIMEOUT`, not for good.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_nobody_reads_is_given_up() {
        let sh = shared();
        let (mut client, server) = tokio::io::duplex(8);
        let task = tokio::spawn(serve(
            sh.clone(),
            server,
            HangupProbe::none(),
            StreamEnd::Shutdown,
        ));
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let start = tokio::time::Instant::now();
        tokio::time::timeout(REFUSAL_TIMEOUT * 2, task)
            .await
            .expect("the refusal waited for ever")
            .unwrap();
        assert!(start.elapsed() >= REFUSAL_TIMEOUT, "{:?}", start.elapsed());
        assert_eq!(sh.metrics.http_connections.get(), 0);
        drop(client);
    }

    #[tokio::test]
    async fn a_head_over_16_kib_in_one_read_is_refused() {
        let sh = shared();
        let mut head = b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nX-Pad: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        head.extend_from_slice(b"\r\n\r\n");
        let got = answer(sh.clone(), head).await;
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        assert_eq!(
            sh.metrics
                .bad_input_total
                .with_label_values(&["http_head_too_large"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_trickled_a_byte_at_a_time_meets_one_deadline() {
        use tokio::io::AsyncReadExt;
        let sh = shared();
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(serve(
            sh.clone(),
            server,
            HangupProbe::none(),
            StreamEnd::Shutdown,
        ));
        let start = tokio::time::Instant::now();
        // One byte every 5 s: each read comes well within 30 s of the last.
        for b in b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n".iter() {
            if client.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            if task.is_finished() {
                break;
            }
        }
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        let took = start.elapsed();
        assert!(
            took >= HEAD_TIMEOUT && took <= HEAD_TIMEOUT + Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(
            sh.metrics
                .bad_input_total
                .with_label_values(&["http_head_timeout"])
                .get(),
            1
        );
    }
}

//! Load and lifecycle through real server and agent processes: 200
//! concurrent hash-checked connections, a stalled reader beside busy
//! connections, agent and server restarts, DRAIN, a frozen agent, and no
//! descriptor left behind after each.

mod tunnel_support;

use std::sync::Arc;
use std::time::Duration;

use konnectivity::client;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_support::*;

/// Echo `size` bytes of a per-connection pattern through an open tunnel
/// and compare hashes.
async fn echo_check<S: client::Io + ?Sized>(
    io: &mut S,
    seed: u64,
    size: usize,
) -> Result<(), String> {
    let payload: Vec<u8> = (0..size)
        .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8)
        .collect();
    let want = Sha256::digest(&payload);
    io.write_all(b"GET /echo HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = async {
        for chunk in payload.chunks(16 * 1024) {
            wr.write_all(chunk).await.map_err(|e| e.to_string())?;
        }
        // Over TLS a write that found the socket full leaves its records
        // in rustls' buffer, and only a flush (or a later write) sends
        // them: without it the last kilobytes of a large upload never
        // leave this process, and the echo waits for them forever.
        wr.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let reader = async {
        let mut got = vec![0u8; head.len() + size];
        rd.read_exact(&mut got)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if &got[..head.len()] != head {
            return Err("bad echo head".to_string());
        }
        Ok(Sha256::digest(&got[head.len()..]))
    };
    let (w, r) = tokio::join!(writer, reader);
    w?;
    if r? != want {
        return Err(format!("hash mismatch on connection {seed}"));
    }
    Ok(())
}

/// Runs `check(0..n)` all at once, 120 s each; panics with the first
/// failures and the stack's logs unless every one succeeds.
fn all_succeed<F>(st: &Stack, n: u64, check: impl Fn(u64) -> F)
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let rt = runtime();
    let failures = rt.block_on(async {
        let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(check(i))).collect();
        let mut failures = Vec::new();
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(120), t).await {
                Ok(Ok(Ok(()))) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
        failures
    });
    drop(rt);
    assert!(
        failures.is_empty(),
        "{} of {n} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        st.logs()
    );
}

/// A tunnel to `target` through the server's frontend at `addr`: a stream
/// of a gRPC connection of its own in mode "grpc", else an HTTP CONNECT
/// tunnel with `user_agent`.
async fn open(
    mode: &str,
    addr: &client::ProxyAddr,
    target: &str,
    user_agent: &str,
) -> Result<Box<dyn client::Io>, String> {
    if mode == "grpc" {
        let channel = client::grpc_channel(addr)
            .await
            .map_err(|e| e.to_string())?;
        let io = client::grpc_dial(channel, target)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Box::new(io))
    } else {
        client::http_connect(addr, target, user_agent)
            .await
            .map_err(|e| e.to_string())
    }
}

/// `n` tunnels to `target` at once through `st` in `mode` (see [`open`]);
/// tunnel `i` echoes the bytes of `load(i)` = (seed, size) and compares
/// hashes. Panics as [`all_succeed`] does.
fn echo_all(
    st: &Stack,
    mode: &str,
    target: &str,
    user_agent: &str,
    n: u64,
    load: impl Fn(u64) -> (u64, usize),
) {
    let addr = st.frontend();
    all_succeed(st, n, |i| {
        let (addr, mode) = (addr.clone(), mode.to_owned());
        let (target, user_agent) = (target.to_owned(), user_agent.to_owned());
        let (seed, size) = load(i);
        async move {
            let mut io = open(&mode, &addr, &target, &user_agent).await?;
            echo_check(&mut *io, seed, size).await
        }
    });
}

/// Neither the server nor the agent dropped data for a full queue.
fn assert_no_queue_overflow(st: &Stack) {
    assert_eq!(
        metric(
            st.ports.health,
            "konnectivity_network_proxy_server_queue_overflow_total"
        ),
        0.0
    );
    assert_eq!(
        metric(
            st.ports.agent_health,
            "konnectivity_network_proxy_agent_queue_overflow_total"
        ),
        0.0
    );
}

/// 200 tunnels at once in `mode`, each echoing its own data (see
/// [`echo_all`]); then both processes are back to their descriptors.
/// Returns the stack, still running, and the backend.
fn two_hundred_keep_their_data(
    mode: &str,
    load: impl Fn(u64) -> (u64, usize),
) -> (Stack, HttpServer) {
    let backend = HttpServer::start();
    let st = Stack::start(mode);
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    echo_all(&st, mode, &backend.target(), "load", 200, load);
    st.wait_settled(sfd, afd);
    (st, backend)
}

#[test]
fn two_hundred_concurrent_grpc_connections_keep_their_data() {
    two_hundred_keep_their_data("grpc", |i| (i + 1, 64 * 1024 + i as usize * 331));
}

/// A backend that speaks first and closes at once (a banner, an error
/// page): the agent's DIAL_RSP, DATA and CLOSE_RSP often reach the server
/// in one read, before the client's task has seen the DIAL_RSP. Every
/// client still gets the whole banner and then the end of the stream, in
/// both modes; over HTTP-CONNECT the banner used to be dropped.
#[test]
fn a_backend_that_speaks_first_and_closes_is_heard() {
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let banner: Vec<u8> = pattern(3000);
    let served = {
        let banner = banner.clone();
        rt.spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let banner = banner.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(&banner).await;
                });
            }
        })
    };
    for mode in ["http-connect", "grpc"] {
        let st = Stack::start(mode);
        let addr = st.frontend();
        all_succeed(&st, 100, |_| {
            let (addr, mode, target, banner) = (
                addr.clone(),
                mode.to_owned(),
                target.clone(),
                banner.clone(),
            );
            async move {
                let mut io = open(&mode, &addr, &target, "banner").await?;
                let mut got = Vec::new();
                io.read_to_end(&mut got)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if got != banner {
                    return Err(format!(
                        "{mode}: {} of {} banner bytes",
                        got.len(),
                        banner.len()
                    ));
                }
                Ok(())
            }
        });
    }
    served.abort();
}

/// A backend that answers, ends its sending side and goes on reading: once
/// the agent has read its EOF the dial is over, and the agent's side of the
/// socket closes too, with a FIN (the backend reads its end, not an error),
/// at once.
#[test]
fn a_backend_that_half_closes_sees_the_agent_close_cleanly() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"banner").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map(|_| rest)
    });
    let st = Stack::start("http-connect");
    let addr = st.frontend();
    let rt = runtime();
    let heard = rt.block_on(async {
        let mut io = client::http_connect(&addr, &format!("127.0.0.1:{port}"), "half")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut got))
            .await
            .map(|r| r.map(|_| got))
    });
    assert!(
        matches!(&heard, Ok(Ok(b)) if b == b"banner"),
        "the client heard {heard:?}\n{}",
        st.logs()
    );
    let seen = backend.join().unwrap();
    assert!(
        matches!(&seen, Ok(rest) if rest.is_empty()),
        "the backend saw {seen:?} instead of the agent's FIN within 10 s\n{}",
        st.logs()
    );
}

/// Backends that close at once without a byte, with a FIN or with a reset:
/// every client's stream ends (empty; after a reset also an error or a
/// failed dial) instead of hanging, in both modes, and both processes are
/// back to their descriptors afterwards.
#[test]
fn a_backend_that_closes_or_resets_at_once_ends_the_stream() {
    let rt = runtime();
    let mut targets = Vec::new();
    for reset in [false, true] {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        targets.push((listener.local_addr().unwrap().to_string(), reset));
        rt.spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                if reset {
                    let _ = s.set_zero_linger();
                }
                drop(s);
            }
        });
    }
    for mode in ["http-connect", "grpc"] {
        let st = Stack::start(mode);
        let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
        let addr = st.frontend();
        for (target, reset) in &targets {
            all_succeed(&st, 100, |_| {
                let (addr, mode, target, reset) =
                    (addr.clone(), mode.to_owned(), target.clone(), *reset);
                async move {
                    // A reset can beat the agent's connect to the news:
                    // then the dial fails (as upstream's agent's would).
                    let mut io = match open(&mode, &addr, &target, "closer").await {
                        Ok(io) => io,
                        Err(e) if reset && e.contains("reset") => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    let mut got = Vec::new();
                    let read =
                        tokio::time::timeout(Duration::from_secs(20), io.read_to_end(&mut got))
                            .await
                            .map_err(|_| {
                                format!("{mode}, reset {reset}: the stream did not end")
                            })?;
                    match read {
                        Ok(0) => Ok(()),
                        Ok(n) => Err(format!("{mode}, reset {reset}: {n} bytes from nowhere")),
                        Err(_) if reset => Ok(()),
                        Err(e) => Err(format!("{mode}: read after a clean close: {e}")),
                    }
                }
            });
        }
        st.wait_settled(sfd, afd);
    }
    drop(rt);
}

/// A server that says there are three servers (--server-count=3) while
/// it is the only one: the agent keeps dialling it for the other two,
/// every 20 ms, and each time closes the duplicate stream once it reads
/// the server's ID. Dials meanwhile must all reach the agent's first
/// stream; one sent down a duplicate failed with "backend connection
/// closed".
#[test]
fn dials_are_not_lost_to_an_agents_duplicate_streams() {
    let backend = HttpServer::start();
    let st = Stack::start_with(
        "grpc",
        &["--server-count=3"],
        &["--sync-interval=20ms", "--sync-interval-cap=20ms"],
    );
    let connects = || st.server.log_text().matches("agent connected").count();
    let before = connects();
    for round in 0..4u64 {
        echo_all(&st, "grpc", &backend.target(), "load", 50, |i| {
            (round * 100 + i + 1, 4096)
        });
    }
    // The duplicates did come while the dials ran.
    let duplicates = connects() - before;
    assert!(
        duplicates >= 5,
        "only {duplicates} agent streams opened during the dials\n{}",
        st.logs()
    );
}

/// Flow-control windows smaller than one socket read (64 KiB): every
/// DATA goes in pieces of a quarter window, so what sits delivered but not
/// yet acknowledged (under a quarter window) never leaves a read waiting
/// for credit that cannot come. 1 MiB echoes both ways, both frontends.
#[test]
fn a_flow_window_smaller_than_a_read_moves_data_both_ways() {
    let backend = HttpServer::start();
    for mode in ["http-connect", "grpc"] {
        let window = ["--flow-window-bytes=65536"];
        let st = Stack::start_with(mode, &window, &window);
        echo_all(&st, mode, &backend.target(), "small-window", 4, |i| {
            (i + 1, 1 << 20)
        });
        assert!(
            metric(
                st.ports.agent_health,
                "konnectivity_network_proxy_agent_flow_control_stalls_total"
            ) + metric(
                st.ports.health,
                "konnectivity_network_proxy_server_flow_control_stalls_total"
            ) >= 1.0,
            "{mode}: a 64 KiB window never made a side wait: the extension was off\n{}",
            st.logs()
        );
    }
}

#[test]
fn two_hundred_concurrent_http_connect_connections_keep_their_data() {
    // The stack stays up: the backend's sockets must close while it runs.
    let (_st, backend) =
        two_hundred_keep_their_data("http-connect", |i| (i + 7, 48 * 1024 + i as usize * 97));
    wait_for("backend sockets closed", Duration::from_secs(10), || {
        backend.open.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
}

/// One client that stops reading while its backend sends 64 MiB must not
/// stall the other connections on the same agent stream: they all finish.
/// With our agent (flow-control extension) the stalled connection is only
/// throttled: nothing overflows, and once it reads again every byte arrives.
#[test]
fn a_stalled_reader_does_not_stall_the_others() {
    let backend = HttpServer::start();
    let target = backend.target();
    let st = Stack::start_with(
        "http-connect",
        &["--max-connection-queue-bytes=2097152"],
        &[],
    );
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = st.frontend();
    let rt = runtime();
    rt.block_on(async {
        const BIG: usize = 64 << 20;
        // The stalled connection: asks for a lot, reads nothing for now.
        let mut stalled = client::http_connect(&addr, &target, "stalled")
            .await
            .unwrap();
        stalled
            .write_all(format!("GET /bytes/{BIG} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Meanwhile 20 others move 1 MiB each, both ways.
        let mut tasks = Vec::new();
        for i in 0..20u64 {
            let (addr, target) = (addr.clone(), target.clone());
            tasks.push(tokio::spawn(async move {
                let mut io = open("http-connect", &addr, &target, "busy").await?;
                echo_check(&mut *io, 1000 + i, 1 << 20).await
            }));
        }
        for t in tasks {
            let r = tokio::time::timeout(Duration::from_secs(60), t).await;
            assert!(
                matches!(r, Ok(Ok(Ok(())))),
                "a busy connection failed beside the stalled one: {r:?}\n{}",
                st.logs()
            );
        }
        // The agent runs out of credit for the stalled connection and says
        // so: once the client's socket buffers and a window that may have
        // grown meanwhile are full, which a loaded machine may reach only
        // after the busy connections are done (a CI run read 0 here then).
        wait_for(
            "the stalled connection to make the agent wait for credit",
            Duration::from_secs(30),
            || {
                metric(
                    st.ports.agent_health,
                    "konnectivity_network_proxy_agent_flow_control_stalls_total",
                ) >= 1.0
            },
        );
        // Nothing was cut: the stalled connection was throttled, not dropped.
        assert_no_queue_overflow(&st);
        // It reads now and gets every byte.
        let mut raw = Vec::with_capacity(BIG + 1024);
        let read =
            tokio::time::timeout(Duration::from_secs(120), stalled.read_to_end(&mut raw)).await;
        assert!(read.is_ok(), "the stalled connection never finished");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head")
            + 4;
        assert_eq!(
            raw.len() - split,
            BIG,
            "bytes lost on the stalled connection"
        );
        assert_eq!(
            Sha256::digest(&raw[split..]),
            Sha256::digest(pattern(BIG)),
            "data corrupted on the stalled connection"
        );
    });
    drop(rt);
    st.wait_settled(sfd, afd);
}

/// Bytes each of [`start_downloads`]' downloads brings.
const DOWNLOAD: usize = 16 << 20;

/// `n` HTTP-CONNECT downloads of [`DOWNLOAD`] bytes, each read up to its
/// first megabyte: every backend is streaming by then.
fn start_downloads(
    rt: &tokio::runtime::Runtime,
    addr: &client::ProxyAddr,
    target: &str,
    n: usize,
) -> Vec<(Box<dyn client::Io>, Vec<u8>)> {
    rt.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..n {
            let mut io = client::http_connect(addr, target, "streaming")
                .await
                .unwrap();
            io.write_all(format!("GET /bytes/{DOWNLOAD} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut first = vec![0u8; 1 << 20];
            io.read_exact(&mut first).await.unwrap();
            streams.push((io, first));
        }
        streams
    })
}

/// Reads [`start_downloads`]' downloads to their ends and checks every byte.
fn finish_downloads(rt: &tokio::runtime::Runtime, streams: &mut [(Box<dyn client::Io>, Vec<u8>)]) {
    rt.block_on(async {
        for (io, got) in streams.iter_mut() {
            io.read_to_end(got).await.unwrap();
            let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert_eq!(got.len() - split, DOWNLOAD, "bytes lost");
            assert_eq!(
                Sha256::digest(&got[split..]),
                Sha256::digest(pattern(DOWNLOAD)),
                "data corrupted"
            );
        }
    });
}

/// Streaming backends beside each other: one reader runs in the agent's
/// link task, the others in their own, and every byte of each arrives.
#[test]
fn one_streaming_reader_at_a_time_runs_in_the_link_task() {
    let backend = HttpServer::start();
    let target = backend.target();
    let st = Stack::start("http-connect");
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = st.frontend();
    let in_link_task = || {
        metric(
            st.ports.agent_health,
            "konnectivity_network_proxy_agent_link_task_readers",
        )
    };
    let rt = runtime();
    let mut streams = start_downloads(&rt, &addr, &target, 3);
    wait_for(
        "a streaming reader in the link task",
        Duration::from_secs(10),
        || in_link_task() >= 1.0,
    );
    assert_eq!(
        in_link_task(),
        1.0,
        "three streaming readers: exactly one runs in the link task\n{}",
        st.logs()
    );
    finish_downloads(&rt, &mut streams);
    drop(streams);
    drop(rt);
    wait_for(
        "the link task's reader to be counted out",
        Duration::from_secs(10),
        || in_link_task() == 0.0,
    );
    st.wait_settled(sfd, afd);
}

/// Uploading clients beside each other: the server reads one in its agent
/// stream's task, the others in their own, and every byte of each comes
/// back through the echo. Then a moved upload whose client leaves half-way
/// gives its place back and leaves nothing open.
#[test]
fn one_uploading_client_at_a_time_is_read_in_the_agent_stream_task() {
    uploads_beside_each_other("http-connect");
}

/// The same through the gRPC frontend: there the whole HTTP/2 connection
/// of the uploading call moves.
#[test]
fn one_uploading_grpc_connection_at_a_time_runs_in_the_agent_stream_task() {
    uploads_beside_each_other("grpc");
}

/// Echo uploads of `UPLOAD_TOTAL` bytes each, through `mode`'s frontend.
const UPLOAD_FIRST: usize = 1 << 20;
const UPLOAD_TOTAL: usize = 8 << 20;
const ECHO_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";

fn upload_payload(seed: u64) -> Vec<u8> {
    (0..UPLOAD_TOTAL)
        .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8)
        .collect()
}

/// Starts an echo upload of `data` on `io` and reads back its first
/// `UPLOAD_FIRST` bytes: from then on the upload streams.
async fn start_upload(io: &mut (dyn client::Io + '_), data: &[u8]) -> Vec<u8> {
    io.write_all(b"GET /echo HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    io.write_all(&data[..UPLOAD_FIRST]).await.unwrap();
    io.flush().await.unwrap();
    let mut got = vec![0u8; ECHO_HEAD.len() + UPLOAD_FIRST];
    io.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..ECHO_HEAD.len()], ECHO_HEAD);
    got.split_off(ECHO_HEAD.len())
}

/// Sends the rest of `data`, reads the rest of the echo after `got` and
/// compares hashes.
async fn finish_upload(io: &mut (dyn client::Io + '_), data: &[u8], mut got: Vec<u8>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = async {
        wr.write_all(&data[UPLOAD_FIRST..]).await.unwrap();
        wr.flush().await.unwrap();
    };
    let mut rest = vec![0u8; UPLOAD_TOTAL - UPLOAD_FIRST];
    let reader = rd.read_exact(&mut rest);
    let (_, r) = tokio::join!(writer, reader);
    r.unwrap();
    got.extend_from_slice(&rest);
    assert_eq!(
        Sha256::digest(&got[..]),
        Sha256::digest(data),
        "data corrupted"
    );
}

fn link_task_readers(st: &Stack) -> f64 {
    metric(
        st.ports.health,
        "konnectivity_network_proxy_server_link_task_readers",
    )
}

fn uploads_beside_each_other(mode: &str) {
    let backend = HttpServer::start();
    let target = backend.target();
    let st = Stack::start(mode);
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = st.frontend();
    let rt = runtime();
    // Each sends and gets back its first megabyte: all three stream now.
    let mut uploads = rt.block_on(async {
        let mut uploads = Vec::new();
        for seed in 1..=3u64 {
            let data = upload_payload(seed);
            let mut io = open(mode, &addr, &target, "uploads").await.unwrap();
            let got = start_upload(&mut *io, &data).await;
            uploads.push((io, data, got));
        }
        uploads
    });
    assert_eq!(
        link_task_readers(&st),
        1.0,
        "three uploading clients: exactly one is read in the agent stream's task\n{}",
        st.logs()
    );
    rt.block_on(async {
        for (io, data, got) in uploads.iter_mut() {
            finish_upload(&mut **io, data, std::mem::take(got)).await;
        }
    });
    drop(uploads);
    wait_for(
        "the moved reader to be counted out",
        Duration::from_secs(10),
        || link_task_readers(&st) == 0.0,
    );
    // A moved upload whose client goes away mid-way.
    rt.block_on(async {
        let data = upload_payload(9);
        let mut io = open(mode, &addr, &target, "leaves").await.unwrap();
        start_upload(&mut *io, &data).await;
        assert_eq!(
            link_task_readers(&st),
            1.0,
            "the upload was not moved\n{}",
            st.logs()
        );
    });
    drop(rt);
    wait_for(
        "the departed client's reader to be counted out",
        Duration::from_secs(10),
        || link_task_readers(&st) == 0.0,
    );
    st.wait_settled(sfd, afd);
}

/// A gRPC connection running in its agent stream's task serves other calls
/// there too, and goes back to its own task when that stream ends (the
/// agent restarts): the call on that agent ends, the connection stays open,
/// and a new call on it reaches the new agent and echoes every byte.
#[test]
fn a_moved_grpc_connection_outlives_its_agent_stream() {
    let backend = HttpServer::start();
    let target = backend.target();
    let mut st = Stack::start("grpc");
    let sfd = st.server.fd_count();
    let addr = st.frontend();
    let rt = runtime();
    let channel = rt.block_on(client::grpc_channel(&addr)).unwrap();
    let data = upload_payload(5);
    let mut first = rt.block_on(async {
        let mut io = client::grpc_dial(channel.clone(), &target).await.unwrap();
        start_upload(&mut io, &data).await;
        io
    });
    assert_eq!(
        link_task_readers(&st),
        1.0,
        "the upload was not moved\n{}",
        st.logs()
    );
    // The moved connection serves more calls at once beside the upload.
    rt.block_on(async {
        let calls: Vec<_> = (0..20u64)
            .map(|seed| {
                let (channel, target) = (channel.clone(), target.clone());
                tokio::spawn(async move {
                    let mut io = client::grpc_dial(channel, &target)
                        .await
                        .map_err(|e| e.to_string())?;
                    echo_check(&mut io, seed, 64 << 10).await
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().expect("a call beside the moved upload");
        }
    });
    assert_eq!(link_task_readers(&st), 1.0, "the connection moved back");
    st.restart_agent();
    wait_for(
        "the moved connection's place to be given back",
        Duration::from_secs(10),
        || link_task_readers(&st) == 0.0,
    );
    rt.block_on(async {
        // The call on the old agent ends: its read sees EOF.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut rest))
            .await
            .expect("the call on the restarted agent did not end")
            .unwrap();
    });
    drop(first);
    st.wait_ready();
    rt.block_on(async {
        let data = upload_payload(6);
        let mut io = client::grpc_dial(channel.clone(), &target)
            .await
            .expect("the moved connection did not survive its agent stream");
        let got = start_upload(&mut io, &data).await;
        finish_upload(&mut io, &data, got).await;
    });
    drop(channel);
    drop(rt);
    wait_for(
        "every place to be given back",
        Duration::from_secs(10),
        || link_task_readers(&st) == 0.0,
    );
    st.wait_settled(sfd, st.agent.fd_count());
}

/// `--links-per-server=2`: the agent keeps two connections to the server,
/// the server takes both as usable (not the second as a duplicate) and
/// both agree the moves extension: every dial goes over the first link,
/// and the agent moves streaming downloads' packets to the link with the
/// fewest streams. Four downloads started one after another: the first
/// is read in the first link's task, the second moves, the third stays
/// (a tie), the fourth moves; every byte arrives in order.
#[test]
fn an_agent_with_two_links_moves_streams_to_the_quieter_link() {
    let backend = HttpServer::start();
    let target = backend.target();
    let st = Stack::start_with("http-connect", &[], &["--links-per-server=2"]);
    let addr = st.frontend();
    let agent_metric = |name: &str| {
        metric(
            st.ports.agent_health,
            &format!("konnectivity_network_proxy_agent_{name}"),
        )
    };
    let server_metric = |name: &str| {
        metric(
            st.ports.health,
            &format!("konnectivity_network_proxy_server_{name}"),
        )
    };
    wait_for("two links", Duration::from_secs(10), || {
        agent_metric("server_links") == 2.0
    });
    // The baseline counts the second link's socket on both sides: taken
    // before it connected, the link would read as a leak.
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    assert_eq!(agent_metric("open_server_connections"), 1.0, "one server");
    // Both streams are the agent's Connect streams (no gRPC client here);
    // the agent counts once among ready backends, as upstream counts it.
    assert_eq!(
        server_metric("grpc_connections"),
        2.0,
        "the server holds both streams\n{}",
        st.logs()
    );
    assert_eq!(server_metric("ready_backend_connections"), 1.0);
    let rt = runtime();
    let mut streams = start_downloads(&rt, &addr, &target, 4);
    assert_eq!(
        (
            agent_metric("link_task_readers"),
            agent_metric("moved_streams_total")
        ),
        (1.0, 2.0),
        "four streams: one read in the first link's task, two moved\n{}",
        st.logs()
    );
    finish_downloads(&rt, &mut streams);
    drop(streams);
    drop(rt);
    assert_eq!(
        server_metric("moved_connections_total"),
        2.0,
        "the server took two connections' packets on the second link\n{}",
        st.logs()
    );
    st.wait_settled(sfd, afd);
    // Ended streams leave no count behind: a round after one lone stream
    // spreads as the first did.
    let rt = runtime();
    let mut streams = start_downloads(&rt, &addr, &target, 1);
    finish_downloads(&rt, &mut streams);
    drop(streams);
    st.wait_settled(sfd, afd);
    let mut streams = start_downloads(&rt, &addr, &target, 4);
    assert_eq!(
        agent_metric("moved_streams_total"),
        4.0,
        "four more streams after one: two moved\n{}",
        st.logs()
    );
    finish_downloads(&rt, &mut streams);
    drop(streams);
    drop(rt);
    st.wait_settled(sfd, afd);
}

/// The proxy-agent binary on its defaults keeps two links to our server
/// and moves a streaming tunnel to the second: a relay between agent and
/// server sees that tunnel's bytes on it. Cutting that link ends the
/// tunnels that moved there at once, an idle one too (what the agent had
/// sent on it may be lost), while a tunnel on the first link goes on to
/// its last byte; the agent links again, and the next stream moves to the
/// new link and ends with it in turn, mid-transfer. Both ends end an idle
/// moved tunnel on their own (checked: with neither, it outlives the cut;
/// with the agent's alone, this passes; the server's has a unit test).
#[test]
fn cutting_the_link_streams_moved_to_ends_only_their_tunnels() {
    const MIB: usize = 1 << 20;
    let backend = HttpServer::start();
    let target = backend.target();
    let max = "--flow-window-max-bytes=2097152";
    let mut relayed = None;
    let st = Stack::start_custom("http-connect", &[max], |ports| {
        let r = relay::Relay::start(ports.agent);
        let mut line = agent_args(ports);
        // The binary's own number of links, not the suite's pin.
        line.retain(|a| !a.starts_with("--links-per-server"));
        line.push(format!("--proxy-server-port={}", r.port()));
        line.push(max.into());
        relayed = Some(r);
        line
    });
    let relayed = relayed.unwrap();
    let addr = st.frontend();
    let agent_metric = |name: &str| {
        metric(
            st.ports.agent_health,
            &format!("konnectivity_network_proxy_agent_{name}"),
        )
    };
    let two_links = || {
        wait_for(
            "two links through the relay",
            Duration::from_secs(20),
            || agent_metric("server_links") == 2.0 && relayed.open().len() == 2,
        )
    };
    two_links();
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let rt = runtime();
    let get = |path: String| {
        rt.block_on(async {
            let mut io = client::http_connect(&addr, &target, "moves").await.unwrap();
            io.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
                .await
                .unwrap();
            io
        })
    };
    // The head `serve_http` sends before `n` bytes of the pattern.
    let head_of = |n: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n").len()
    };
    // Reads the head and the first `n` bytes of the body, which must be
    // the pattern's.
    let read_first = |io: &mut Box<dyn client::Io>, total: usize, n: usize| {
        let mut got = vec![0u8; head_of(total) + n];
        rt.block_on(io.read_exact(&mut got)).unwrap();
        assert!(
            got[head_of(total)..] == pattern(total)[..n],
            "data corrupted"
        );
    };
    // Reads to the end; the whole body must have come, in order.
    let read_all = |io: &mut Box<dyn client::Io>, total: usize| {
        let mut got = Vec::with_capacity(head_of(total) + total);
        rt.block_on(io.read_to_end(&mut got)).unwrap();
        assert_eq!(
            got.len(),
            head_of(total) + total,
            "bytes lost\n{}",
            st.logs()
        );
        assert!(
            got[head_of(total)..] == pattern(total)[..],
            "data corrupted"
        );
    };
    // A read that must end (EOF or error) within 10 s: the tunnel ended.
    let ended = |io: &mut Box<dyn client::Io>, what: &str| {
        let mut rest = Vec::new();
        let done = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await
        });
        assert!(
            done.is_ok(),
            "{what} did not end with its link\n{}",
            st.logs()
        );
        rest.len()
    };
    // Waits until no bytes cross the relay toward the server for 300 ms
    // (the stalled tunnel has used its credit), then notes each link's.
    let settled_counts = || {
        let total = || relayed.open().iter().map(|p| p.sent()).sum::<u64>();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let before = total();
            std::thread::sleep(Duration::from_millis(300));
            if total() == before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the links never went quiet"
            );
        }
        relayed
            .open()
            .into_iter()
            .map(|p| {
                let n = p.sent();
                (p, n)
            })
            .collect::<Vec<_>>()
    };
    // The link that carried at least `least` bytes toward the server
    // since `counts`; the others carried less than 1 MiB.
    let carrier = |counts: &[(Arc<relay::Piped>, u64)], least: usize| {
        let grown: Vec<_> = counts
            .iter()
            .map(|(p, n)| (p.clone(), p.sent() - n))
            .collect();
        let (busy, most) = grown.iter().max_by_key(|(_, g)| *g).cloned().unwrap();
        assert!(
            most >= least as u64,
            "no link carried the moved stream: {most} bytes at most\n{}",
            st.logs()
        );
        for (p, g) in &grown {
            assert!(
                Arc::ptr_eq(p, &busy) || *g < MIB as u64,
                "both links carried {g} and {most} bytes"
            );
        }
        busy
    };

    // A download whose client reads nothing for now, read in the first
    // link's task; then each link's byte count once it has stalled.
    const STALLED: usize = 32 * MIB;
    let stalled_on_the_first_link = || {
        let stalled = get(format!("/bytes/{STALLED}"));
        wait_for(
            "a streaming reader in the first link's task",
            Duration::from_secs(10),
            || agent_metric("link_task_readers") == 1.0,
        );
        (stalled, settled_counts())
    };

    // An idle tunnel on the second link.
    let (mut stalled, counts) = stalled_on_the_first_link();
    const HELD: usize = 4 * MIB;
    let mut idle = get(format!("/hold/{HELD}"));
    read_first(&mut idle, HELD, HELD);
    assert_eq!(agent_metric("moved_streams_total"), 1.0, "{}", st.logs());
    let second = carrier(&counts, 3 * MIB);
    second.cut();
    ended(&mut idle, "an idle tunnel moved to the cut link");
    wait_for(
        "the agent to close the idle tunnel's backend",
        Duration::from_secs(10),
        || backend.open.load(std::sync::atomic::Ordering::SeqCst) == 1,
    );
    two_links();
    read_all(&mut stalled, STALLED);
    drop((idle, stalled));

    // A tunnel cut mid-transfer on the new second link.
    wait_for(
        "the first link's task to be free",
        Duration::from_secs(10),
        || agent_metric("link_task_readers") == 0.0,
    );
    let (mut stalled, counts) = stalled_on_the_first_link();
    const BIG: usize = 64 * MIB;
    let mut streaming = get(format!("/bytes/{BIG}"));
    read_first(&mut streaming, BIG, 8 * MIB);
    assert_eq!(agent_metric("moved_streams_total"), 2.0, "{}", st.logs());
    let second = carrier(&counts, 6 * MIB);
    second.cut();
    let rest = ended(&mut streaming, "a streaming tunnel moved to the cut link");
    assert!(
        8 * MIB + rest < BIG,
        "the whole of a tunnel came through a cut link"
    );
    read_all(&mut stalled, STALLED);
    drop((streaming, stalled));
    assert_eq!(
        metric(
            st.ports.health,
            "konnectivity_network_proxy_server_moved_connections_total"
        ),
        2.0,
        "{}",
        st.logs()
    );
    two_links();
    drop(rt);
    st.wait_settled(sfd, afd);
}

/// The flow-control window grows where the window, not the reader, limits
/// a connection, and never past `--flow-window-max-bytes` (2 MiB here, from
/// 1 MiB): 32 MiB down to a client that reads grows the server's receiving
/// window, 32 MiB up grows the agent's, and a client that never reads
/// leaves at most the maximum queued for it.
/// (Its socket buffers take the first megabytes as if it read them, so
/// such a client may still grow its window once.)
#[test]
fn the_flow_window_grows_for_a_reader_that_keeps_up_and_no_further_than_its_max() {
    let backend = HttpServer::start();
    let target = backend.target();
    let max = ["--flow-window-max-bytes=2097152"];
    let st = Stack::start_with("http-connect", &max, &max);
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let addr = st.frontend();
    let growths = |port: u16, who: &str| {
        metric(
            port,
            &format!("konnectivity_network_proxy_{who}_flow_window_growths_total"),
        )
    };
    const BIG: usize = 32 << 20;
    let rt = runtime();
    // A client that keeps up: on a loaded machine one may not (a run of the
    // whole file read no growth), so up to three downloads, until one grew.
    for _ in 0..3 {
        let moved = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                let mut down = client::http_connect(&addr, &target, "down").await.unwrap();
                down.write_all(format!("GET /bytes/{BIG} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut got = Vec::with_capacity(BIG + 1024);
                down.read_to_end(&mut got).await.unwrap();
                got.len()
            })
            .await
        });
        let Ok(got) = moved else {
            panic!("32 MiB did not come down in 60 s\n{}", st.logs());
        };
        assert!(got > BIG, "{got} bytes came down");
        if growths(st.ports.health, "server") > 0.0 {
            break;
        }
    }
    assert_eq!(
        growths(st.ports.health, "server"),
        1.0,
        "32 MiB to a client that keeps up grows the server's receiving window from 1 MiB to 2 MiB, once (the downloads before it, none)\n{}",
        st.logs()
    );
    // The other way: 32 MiB up (echoed back) grows the agent's receiving
    // window, once, as well (up to three echoes, as above).
    let mut echoes = 0.0;
    while echoes < 3.0 && growths(st.ports.agent_health, "agent") == 0.0 {
        echoes += 1.0;
        let echoed = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                let mut up = client::http_connect(&addr, &target, "up")
                    .await
                    .map_err(|e| e.to_string())?;
                echo_check(&mut *up, 3, BIG).await
            })
            .await
        });
        match echoed {
            Ok(Ok(())) => {}
            other => panic!("32 MiB echo: {other:?}\n{}", st.logs()),
        }
    }
    assert_eq!(
        growths(st.ports.agent_health, "agent"),
        1.0,
        "32 MiB up from a client through a backend that keeps up grows the agent's receiving window from 1 MiB to 2 MiB, once\n{}",
        st.logs()
    );
    // Each tunnel has windows of its own: each echo's way down may have
    // grown the server's too (its pace is the upload's), once at most.
    let after_echo = growths(st.ports.health, "server");
    assert!(
        (1.0..=1.0 + echoes).contains(&after_echo),
        "{after_echo} after {echoes} echoes\n{}",
        st.logs()
    );
    let stalled = rt.block_on(async {
        let mut stalled = client::http_connect(&addr, &target, "stalled")
            .await
            .unwrap();
        stalled
            .write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .unwrap();
        stalled
    });
    let stalls = || {
        metric(
            st.ports.agent_health,
            "konnectivity_network_proxy_agent_flow_control_stalls_total",
        )
    };
    wait_for(
        "the agent to run out of credit toward the stalled client",
        Duration::from_secs(30),
        || stalls() >= 3.0,
    );
    // Once it has stalled, its window is held here but for what the
    // client's socket took and the server has not yet acknowledged (acks
    // go out per quarter window): at least three quarters of a window
    // that did not grow (1 MiB). Its socket buffers decide whether it grew
    // (a run where it did not, with 1 MiB awaited here, timed out).
    let queued = "konnectivity_network_proxy_server_queued_bytes";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(st.ports.health, queued);
        if now >= (3 << 18) as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled tunnel's window never filled: {now} bytes queued after 10 s, server window growths {}\n{}",
            growths(st.ports.health, "server"),
            st.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let held = metric(st.ports.health, queued);
    assert!(
        // Each queued packet weighs 64 bytes more than its data.
        held <= ((2 << 20) + (64 << 10)) as f64,
        "{held} bytes queued for a client that reads nothing: more than the 2 MiB maximum window\n{}",
        st.logs()
    );
    // Its socket buffers may have grown it once (see above); no more.
    assert!(growths(st.ports.health, "server") <= after_echo + 1.0);
    drop(stalled);
    drop(rt);
    assert_no_queue_overflow(&st);
    st.wait_settled(sfd, afd);
}

/// The other direction: a backend that stops reading while its client
/// uploads. The server runs out of credit toward the agent (counted as a
/// flow-control stall), the client's writes block instead of filling any
/// queue, and other connections on the same agent stream carry on.
#[test]
fn a_backend_that_stops_reading_throttles_only_its_uploader() {
    let backend = HttpServer::start();
    // Accepts connections and never reads them.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let held = std::thread::spawn(move || sink.accept().map(|(s, _)| s));
    let st = Stack::start("http-connect");
    let addr = st.frontend();
    let rt = runtime();
    rt.block_on(async {
        let stalls = "konnectivity_network_proxy_server_flow_control_stalls_total";
        let mut uploader = client::http_connect(&addr, &format!("127.0.0.1:{sink_port}"), "up")
            .await
            .unwrap();
        // Far more than socket buffers, agent queue and credit window hold.
        let chunk = vec![7u8; 1 << 20];
        let mut sent = 0usize;
        let blocked = tokio::time::timeout(Duration::from_secs(10), async {
            while sent < (256 << 20) {
                uploader.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
        })
        .await
        .is_err();
        assert!(
            blocked,
            "256 MiB went into a backend that reads nothing: nothing pushed back"
        );
        assert!(
            metric(st.ports.health, stalls) >= 1.0,
            "the server never waited for credit toward the agent ({sent} bytes sent)"
        );
        // The uploader is stuck; a neighbour on the same agent stream is not.
        let mut io = client::http_connect(&addr, &backend.target(), "busy")
            .await
            .unwrap();
        echo_check(&mut *io, 7, 1 << 20).await.unwrap();
        assert_no_queue_overflow(&st);
    });
    drop(rt);
    drop(held.join().unwrap());
}

fn one_request(st: &Stack, backend_port: u16) -> Result<(), String> {
    match test_client_request(st.dir.path(), st.ports.server, backend_port) {
        (true, out) if out.contains("success: hello") => Ok(()),
        (_, out) => Err(out),
    }
}

/// Waits until [`one_request`] succeeds.
fn wait_request(st: &Stack, backend_port: u16, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        one_request(st, backend_port).is_ok()
    });
}

#[test]
fn agent_restart_and_server_restart_are_survived() {
    let backend = HttpServer::start();
    let mut st = Stack::start("grpc");
    one_request(&st, backend.port).unwrap();

    st.restart_agent();
    st.wait_ready();
    wait_request(&st, backend.port, "a request after the agent restart");

    let agent_fds = st.agent.fd_count();
    st.restart_server("grpc");
    // The same agent process reconnects by itself (sync loop with backoff).
    st.wait_ready();
    wait_request(&st, backend.port, "a request after the server restart");
    // The agent did not keep descriptors of the dead server connection.
    let sfd = st.server.fd_count();
    st.wait_settled(sfd, agent_fds);
}

#[test]
fn drain_on_first_sigterm_exit_on_second() {
    let backend = HttpServer::start();
    let mut st = Stack::start("grpc");
    st.agent.signal(SIGTERM);
    wait_for("server saw DRAIN", Duration::from_secs(10), || {
        st.server.log_text().contains("agent is draining")
    });
    // Draining agents still serve when nothing else is there (upstream's fallback).
    one_request(&st, backend.port).unwrap();
    assert!(
        st.agent.alive(),
        "the first SIGTERM must not stop the agent"
    );
    st.agent.signal(SIGTERM);
    assert_eq!(
        st.agent.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        st.logs()
    );
    wait_for("server dropped the agent", Duration::from_secs(10), || {
        http_get(st.ports.health, "/readyz")
            .is_some_and(|(s, b)| s == 500 && b.contains("no connection to any proxy agent"))
    });
}

/// A frozen agent (SIGSTOP: its TCP connection stays open, nothing answers)
/// is dropped by the server's HTTP/2 pings within seconds, not an hour.
#[test]
fn a_frozen_agent_is_detected_in_seconds() {
    let st = Stack::start_with("grpc", &["--agent-liveness-interval=1s"], &[]);
    let started = std::time::Instant::now();
    st.agent.signal(19); // SIGSTOP
    wait_for(
        "server dropped the frozen agent",
        Duration::from_secs(15),
        || http_get(st.ports.health, "/readyz").is_some_and(|(s, _)| s == 500),
    );
    eprintln!("frozen agent dropped after {:?}", started.elapsed());
    st.agent.signal(18); // SIGCONT
    // Back to life: the agent notices its dead stream and reconnects.
    wait_for("agent back", Duration::from_secs(40), || {
        http_get(st.ports.health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
}

/// konnectivity-client's reusable tunnel: every dial of kube-apiserver as a
/// stream of one HTTP/2 connection. 1,000 dials are held open at once on
/// one connection (grpc-go sets no stream limit; ours used to refuse past
/// 100), all carry their own data, then all are released.
#[test]
fn a_thousand_concurrent_dials_on_one_connection() {
    const N: usize = 1000;
    let backend = HttpServer::start();
    let target = format!("127.0.0.1:{}", backend.port);
    let st = Stack::start("grpc");
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    let rt = runtime();
    let channel = rt.block_on(client::grpc_channel(&st.frontend())).unwrap();
    let _guard = rt.enter();
    let dials = async {
        let dials: Vec<_> = (0..N)
            .map(|_| {
                let (ch, target) = (channel.clone(), target.clone());
                tokio::spawn(async move { client::grpc_dial(ch, &target).await })
            })
            .collect();
        let mut open = Vec::new();
        for d in dials {
            open.push(d.await.unwrap().expect("dial on the shared connection"));
        }
        open
    };
    // A stream limit below N would leave the later dials waiting forever.
    let mut open = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), dials).await })
        .unwrap_or_else(|_| {
            panic!(
                "{N} dials did not all open on one connection\n{}",
                st.logs()
            )
        });
    // All open at once, on one frontend connection.
    wait_for("all established", Duration::from_secs(60), || {
        metric(
            st.ports.health,
            "konnectivity_network_proxy_server_established_connections",
        ) == N as f64
    });
    assert_eq!(
        metric(
            st.ports.health,
            "konnectivity_network_proxy_server_grpc_connections"
        ) - 1.0, // the agent's Connect
        N as f64
    );
    assert!(
        st.server.fd_count() < sfd + 10,
        "one client connection, not {N}: {} fds",
        st.server.fd_count()
    );
    let checks = rt.block_on(async {
        let tasks: Vec<_> = open
            .drain(..)
            .enumerate()
            .map(|(i, mut io)| {
                tokio::spawn(async move {
                    let r = echo_check(&mut io, i as u64 + 11, 2048 + i).await;
                    io.shutdown().await.ok();
                    r
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        out
    });
    let failed: Vec<_> = checks
        .into_iter()
        .map(|r| r.unwrap())
        .filter_map(Result::err)
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}\n{}",
        failed.len(),
        failed.first(),
        st.logs()
    );
    drop(channel);
    st.wait_settled(sfd, afd);
}

//! imds-proxy under attack, as a process: each attack comes from one
//! stand-in pod (a network namespace this test creates, served by a
//! listener the proxy binds inside it) while another pod keeps asking.
//! Each test asserts that the attack is cut off where the limits say, that
//! the other pod is served throughout, that a metric counts the attack,
//! and that the process stays under a stated memory and descriptor bound
//! (sampled from /proc while the attack runs). The last test runs the
//! process out of descriptors.
//!
//! Flags are set short so each test runs in seconds; waits are "eventually,
//! within a generous time", never a measured duration.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proxyctl_testkit::{LoggedChild, NetNs, require_root, wait_until};

mod imds_support;
use imds_support::{ADMIN, INSTANCE as GOOD, POD_LISTEN, ServeFiles, spawn_mock};

/// How much the proxy's resident memory may grow over its idle size while
/// attacked.
const RSS_GROWTH_KIB: u64 = 16 * 1024;

/// The proxy (and the metadata fake it forwards to) in a "node" namespace,
/// pods `a` (the attacker) and `b` (legitimate) in namespaces of their own.
struct Fixture {
    node: NetNs,
    a: NetNs,
    b: NetNs,
    proxy: LoggedChild,
    files: ServeFiles,
    _mock: LoggedChild,
}

impl Fixture {
    /// The fixture of `test`, the proxy started with `flags` (separated by
    /// spaces; namespaces named after `tag`); None where the test cannot
    /// run (not root).
    fn for_test(test: &str, tag: &str, flags: &str) -> Option<Fixture> {
        let flags: Vec<&str> = flags.split_whitespace().collect();
        require_root(test).then(|| Fixture::start(tag, &flags))
    }

    fn start(tag: &str, flags: &[&str]) -> Fixture {
        let node = NetNs::new(&format!("{tag}n"));
        let a = NetNs::new(&format!("{tag}a"));
        let b = NetNs::new(&format!("{tag}b"));
        let files = ServeFiles::new(&[("a", &a), ("b", &b)]);
        let mock = spawn_mock(&node);
        let proxy = files.spawn_serve(&node, &[&["--workers", "2"][..], flags].concat());
        let f = Fixture {
            node,
            a,
            b,
            proxy,
            files,
            _mock: mock,
        };
        f.wait_served(&f.b, "the proxy serving pod b");
        f.wait_served(&f.a, "pod a served");
        // `ip netns exec` execs the binary: the child's pid is the proxy's.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", f.pid())).unwrap();
        assert_eq!(comm.trim(), "imds-proxy");
        f
    }

    /// Waits until `pod`'s request is answered 200.
    fn wait_served(&self, pod: &NetNs, what: &str) {
        wait_until(what, Duration::from_secs(30), || {
            self.ask(pod, GOOD).is_ok_and(|(status, _)| status == 200)
        });
    }

    fn pid(&self) -> u32 {
        self.proxy.id()
    }

    /// A connection from inside `pod` to its listener. The socket stays in
    /// that namespace, so any thread may use it.
    fn connect(&self, pod: &NetNs) -> std::io::Result<TcpStream> {
        pod.enter(|| {
            let s =
                TcpStream::connect_timeout(&POD_LISTEN.parse().unwrap(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
    }

    /// One GET with `Metadata: true`: (status, body).
    fn ask(&self, pod: &NetNs, target: &str) -> std::io::Result<(u16, String)> {
        let mut s = self.connect(pod)?;
        s.write_all(request(target, true).as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no answer: {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((status, body))
    }

    /// Pod b's request is answered 200 with the instance document.
    fn b_is_served(&self) {
        let (status, body) = self.ask(&self.b, GOOD).expect("pod b's request");
        assert_eq!(status, 200, "{body}\n{}", self.proxy.log_text());
        assert!(body.contains("vmId"), "{body}");
    }

    /// /metrics from the admin listener (None if it refused us).
    fn try_metrics(&self) -> Option<String> {
        let addr: SocketAddr = ADMIN.parse().unwrap();
        self.node.enter(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.starts_with("HTTP/1.1 200").then_some(out)
        })
    }

    fn metrics(&self) -> String {
        self.try_metrics().expect("/metrics answered")
    }

    /// Waits until the sum of `name` samples whose labels contain every
    /// one of `labels` reaches `at_least`; returns it.
    fn wait_metric(&self, name: &str, labels: &[&str], at_least: u64) -> u64 {
        let mut seen = 0;
        wait_until(
            &format!("{name}{labels:?} >= {at_least}"),
            Duration::from_secs(30),
            || {
                seen = self
                    .try_metrics()
                    .map_or(0, |m| metric_sum(&m, name, labels));
                seen >= at_least
            },
        );
        seen
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.files.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}

fn request(target: &str, close: bool) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Sum of the samples of `name` whose label sets contain all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| labels.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The highest RSS and descriptor count of a process, sampled every 20 ms
/// on a thread of its own until `finish`.
struct Watermark {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize)>,
    idle: (u64, usize),
}

impl Watermark {
    fn start(pid: u32) -> Self {
        let idle = (rss_kib(pid), fd_count(pid));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rss, mut fds) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                rss = rss.max(rss_kib(pid));
                fds = fds.max(fd_count(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            (rss, fds)
        });
        Watermark { stop, thread, idle }
    }

    /// Asserts the highs stayed within the idle values plus `RSS_GROWTH_KIB`
    /// and `extra_fds`; returns (idle rss, max rss, idle fds, max fds).
    fn finish(self, what: &str, extra_fds: usize) -> (u64, u64, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let (rss, fds) = self.thread.join().unwrap();
        let (idle_rss, idle_fds) = self.idle;
        println!(
            "{what}: RSS {idle_rss} KiB idle, {rss} KiB at most; fds {idle_fds} idle, {fds} at most"
        );
        assert!(
            rss <= idle_rss + RSS_GROWTH_KIB,
            "{what}: RSS grew from {idle_rss} to {rss} KiB"
        );
        assert!(
            fds <= idle_fds + extra_fds,
            "{what}: descriptors grew from {idle_fds} to {fds} (bound +{extra_fds})"
        );
        (idle_rss, rss, idle_fds, fds)
    }
}

/// Whether the peer has closed `s` (EOF or reset), without waiting.
fn closed_by_peer(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 512];
    let closed = loop {
        match s.peek(&mut byte) {
            Ok(0) => break true,
            // Something was sent (an answer): look past it.
            Ok(_) => match (&*s).read(&mut byte) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// (a) A pod pipelines requests and never reads an answer: once the
/// answers fill the socket buffers the proxy's write waits, and after the
/// write timeout the connection is closed and counted.
#[test]
fn a_pod_that_never_reads_is_disconnected_after_the_write_timeout() {
    let test = "a_pod_that_never_reads_is_disconnected_after_the_write_timeout";
    // No rate limit: every answer is a 403 as long as its path, so the
    // buffers fill quickly.
    let flags = "--write-timeout-ms 500 --rate-limit 0";
    let Some(f) = Fixture::for_test(test, "imlw", flags) else {
        return;
    };
    let mark = Watermark::start(f.pid());
    let long_path = format!("/denied/{}", "x".repeat(8000));
    let one = request(&long_path, false).into_bytes();
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let mut s = f.connect(&f.a).expect("attacker connects");
            let one = one.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                // Writes until the proxy hangs up (reset or broken pipe).
                // The write timeout of the socket (10 s) is a fallback that
                // would show up as TimedOut/WouldBlock below.
                let err = loop {
                    match s.write_all(&one) {
                        Ok(()) => sent += 1,
                        Err(e) => break e,
                    }
                };
                (sent, err.kind())
            })
        })
        .collect();
    // Served meanwhile, while the attackers' writes are stuck.
    for _ in 0..5 {
        f.b_is_served();
    }
    for attacker in attackers {
        let (sent, kind) = attacker.join().unwrap();
        println!("attacker: {sent} requests sent, then {kind:?}");
        assert!(
            matches!(
                kind,
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            ),
            "the proxy must hang up on a client that does not read, not leave it stalled: {kind:?}"
        );
    }
    let timed_out = f.wait_metric(
        "imds_proxy_connections_refused_total",
        &[
            "listener=\"pod\"",
            "pod=\"default/a\"",
            "reason=\"write_timeout\"",
        ],
        4,
    );
    assert_eq!(timed_out, 4);
    f.b_is_served();
    // 4 attacker connections (each may hold an upstream connection) + slack.
    mark.finish(test, 16);
}

/// (b) One pod opens many connections: past --max-connections-per-pod
/// each one is answered 503 and closed; the other pod is served, and the
/// first pod again once its connections end.
#[test]
fn one_pod_cannot_take_more_than_its_connections() {
    let test = "one_pod_cannot_take_more_than_its_connections";
    let cap = 8;
    // Held connections send nothing: keep them for the test's life.
    let flags = format!("--max-connections-per-pod {cap} --header-timeout-ms 60000");
    let Some(f) = Fixture::for_test(test, "imlc", &flags) else {
        return;
    };
    let mark = Watermark::start(f.pid());
    let flood = 100;
    let held: Vec<TcpStream> = (0..flood)
        .map(|_| f.connect(&f.a).expect("the kernel accepts the connect"))
        .collect();
    let refused = f.wait_metric(
        "imds_proxy_connections_refused_total",
        &["pod=\"default/a\"", "reason=\"pod_connection_cap\""],
        (flood - cap) as u64,
    );
    assert_eq!(refused, (flood - cap) as u64);
    f.b_is_served();
    // Every connection past the cap was told why and closed ...
    let mut answer = String::new();
    let _ = (&held[flood - 1]).read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("Too many connections"),
        "{answer:?}"
    );
    // ... and `cap` hold their places: mostly the first ones, but not
    // always (a CI run saw the eighth refused and the ninth held: with 92
    // refused and 8 accepted, as counted above, the kernel had queued the
    // ninth connection for accept before the eighth).
    let open: Vec<bool> = held.iter().map(|s| !closed_by_peer(s)).collect();
    assert_eq!(open.iter().filter(|o| **o).count(), cap, "{open:?}");
    // At the cap, pod a's own new request is turned away too: the 503,
    // or a reset when its request arrived before the close (the kernel
    // then resets, and the 503 may be lost) ...
    match f.ask(&f.a, GOOD) {
        Ok((status, _)) => assert_eq!(status, 503),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    // 8 connections (each may hold an upstream one), the other pod's, slack.
    mark.finish(test, cap * 2 + 8);
    // ... and served once its connections are gone.
    drop(held);
    f.wait_served(&f.a, "pod a served again");
}

/// (c) A pod hammers paths it may not read: past its request rate it gets
/// 429 (refused requests spend the same bucket as allowed ones), and past
/// the audit rate its lines are dropped, counted and summed up, so the
/// audit log stays small.
#[test]
fn denied_requests_are_rate_limited_and_their_audit_lines_sampled() {
    let test = "denied_requests_are_rate_limited_and_their_audit_lines_sampled";
    let (rate, burst, audit_rate, audit_burst) = (5.0, 5u64, 5.0, 10u64);
    let flags = format!(
        "--rate-limit {rate} --burst {burst} \
         --audit-refused-per-sec {audit_rate} --audit-refused-burst {audit_burst}"
    );
    let Some(f) = Fixture::for_test(test, "imlr", &flags) else {
        return;
    };
    // The bucket the fixture's checks drew on refills first.
    std::thread::sleep(Duration::from_secs(2));
    let mark = Watermark::start(f.pid());
    let started = Instant::now();
    let batches = 30;
    let per_batch = 100;
    let (mut denied, mut limited) = (0u64, 0u64);
    for i in 0..batches {
        let mut s = f.connect(&f.a).expect("attacker connects");
        let mut batch = String::new();
        for j in 0..per_batch {
            batch.push_str(&request("/metadata/versions", j == per_batch - 1));
        }
        s.write_all(batch.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        denied += out.matches("HTTP/1.1 403").count() as u64;
        limited += out.matches("HTTP/1.1 429").count() as u64;
        if i % 10 == 0 {
            f.b_is_served();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    f.b_is_served();
    println!(
        "{} denied requests in {elapsed:.2} s: {denied} answered 403, {limited} 429",
        batches * per_batch
    );
    assert_eq!(denied + limited, (batches * per_batch) as u64);
    // What the bucket allows in that time, and no more.
    let allowed = burst + (rate * elapsed).ceil() as u64 + 1;
    assert!(
        denied <= allowed,
        "{denied} 403s, the bucket allows {allowed}"
    );
    assert!(limited > 0);

    let dropped = f.wait_metric(
        "imds_proxy_audit_lines_dropped_total",
        &["pod=\"default/a\""],
        1,
    );
    // Every refusal is either written or counted, and pod b's five
    // requests (one to start, four during the attack) are written: the
    // writer thread may still be on its way to the file with either.
    let b_allowed = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|l| l["pod"] == "default/b" && l["decision"] == "allowed")
            .count()
    };
    let mut lines = Vec::new();
    wait_until(
        "pod a's and pod b's audit lines written",
        Duration::from_secs(30),
        || {
            lines = f.audit_lines();
            let of_a = lines.iter().filter(|l| l["pod"] == "default/a").count() as u64;
            of_a + dropped >= (batches * per_batch) as u64 && b_allowed(&lines) >= 5
        },
    );
    let of_a: Vec<_> = lines.iter().filter(|l| l["pod"] == "default/a").collect();
    let summaries: Vec<_> = of_a
        .iter()
        .filter(|l| l["decision"] == "audit_lines_dropped")
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    // Burst + rate over the attack, a summary per 10 s, and pod a's lines
    // from the fixture's start.
    let bound = audit_burst + (audit_rate * elapsed).ceil() as u64 + (elapsed / 10.0) as u64 + 4;
    println!(
        "audit: {} lines of pod a ({} summaries), {dropped} dropped",
        of_a.len(),
        summaries.len()
    );
    assert!(
        (of_a.len() as u64) <= bound,
        "{} audit lines of pod a, bound {bound}",
        of_a.len()
    );
    assert!(!summaries.is_empty(), "no summary line");
    assert!(summaries[0]["dropped"].as_u64().unwrap() >= 1);
    // Pod b's requests are all there (checked by the wait above).
    assert!(b_allowed(&lines) >= 5);
    let size = std::fs::metadata(&f.files.audit).unwrap().len();
    assert!(
        size <= (bound + 64) * 400,
        "audit log of {size} bytes for a bounded number of lines"
    );
    let metrics = f.metrics();
    assert!(
        metric_sum(
            &metrics,
            "imds_proxy_requests_total",
            &["pod=\"default/a\"", "decision=\"rate_limited\""]
        ) == limited,
        "{metrics}"
    );
    mark.finish(test, 8);
}

/// (d) Slow-loris: a head sent a byte at a time, each byte well within the
/// head timeout of the previous one. The head's deadline is one for the
/// whole head: the connection closes before the head is done.
#[test]
fn a_head_sent_a_byte_at_a_time_is_cut_at_the_head_deadline() {
    let test = "a_head_sent_a_byte_at_a_time_is_cut_at_the_head_deadline";
    let Some(f) = Fixture::for_test(test, "imls", "--header-timeout-ms 1000") else {
        return;
    };
    let mark = Watermark::start(f.pid());
    // 300 bytes at one per 200 ms would take a minute.
    let head = format!(
        "GET {GOOD} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(200)
    )
    .into_bytes();
    let loris: Vec<_> = (0..6)
        .map(|_| {
            let mut s = f.connect(&f.a).expect("connect");
            let head = head.clone();
            std::thread::spawn(move || {
                for (i, byte) in head.iter().enumerate() {
                    if closed_by_peer(&s) || s.write_all(&[*byte]).is_err() {
                        return i;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                head.len()
            })
        })
        .collect();
    f.b_is_served();
    for l in loris {
        let sent = l.join().unwrap();
        println!("slow-loris: closed after {sent} of {} bytes", head.len());
        assert!(
            sent < head.len(),
            "the head's deadline must not be extended by each byte"
        );
    }
    f.wait_metric(
        "imds_proxy_connection_errors_total",
        &["kind=\"header_timeout\""],
        6,
    );
    f.b_is_served();
    mark.finish(test, 16);
}

/// (e) The admin listener holds --admin-max-connections; one more is
/// closed at once and counted, the pods are served meanwhile, and the held
/// connections end at the head timeout, after which /metrics answers.
#[test]
fn the_admin_listener_has_a_connection_cap() {
    let test = "the_admin_listener_has_a_connection_cap";
    let cap = 4;
    let flags = format!("--admin-max-connections {cap} --header-timeout-ms 3000");
    let Some(f) = Fixture::for_test(test, "imla", &flags) else {
        return;
    };
    let mark = Watermark::start(f.pid());
    let addr: SocketAddr = ADMIN.parse().unwrap();
    let extra = 100;
    let conns: Vec<TcpStream> = f.node.enter(move || {
        (0..cap + extra)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
            .collect()
    });
    // The extra ones are closed at once (long before the head timeout).
    for (i, s) in conns[cap..].iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        let got = (&*s).read(&mut buf);
        assert!(
            matches!(got, Ok(0))
                || got
                    .as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "connection {i} past the cap: {got:?}"
        );
    }
    f.b_is_served();
    // The held ones end at the head timeout; then /metrics answers again.
    for s in &conns[..cap] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut sink = Vec::new();
        let _ = (&*s).read_to_end(&mut sink);
    }
    let at_cap = f.wait_metric(
        "imds_proxy_connections_refused_total",
        &["listener=\"admin\"", "reason=\"connection_cap\""],
        extra as u64,
    );
    assert_eq!(at_cap, extra as u64);
    // Waited for: a held connection is closed as its task ends, a moment
    // before the task counts it (a CI run read 3 of 4 at once).
    f.wait_metric(
        "imds_proxy_connections_refused_total",
        &["listener=\"admin\"", "reason=\"timeout\""],
        cap as u64,
    );
    for s in &conns {
        let _ = s.shutdown(Shutdown::Both);
    }
    mark.finish(test, cap + 8);
}

/// User + system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after_comm` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// (f) Out of descriptors: accept fails at once, forever, until one is
/// freed. The accept loops pause (doubling up to a second) instead of
/// spinning, the pod listeners log one line among them all, and once the
/// flood's connections close the proxy serves again, the request made
/// meanwhile included.
#[test]
fn out_of_descriptors_the_accept_loops_back_off_and_log_once() {
    let test = "out_of_descriptors_the_accept_loops_back_off_and_log_once";
    // The flood's connections send nothing: keep them.
    let flags = "--header-timeout-ms 60000 --max-connections-per-pod 1000";
    let Some(f) = Fixture::for_test(test, "imle", flags) else {
        return;
    };
    let pid = f.pid();
    let limit = fd_count(pid) + 8;
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .expect("running prlimit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mark = Watermark::start(pid);
    let flood: Vec<TcpStream> = (0..40)
        .map(|_| f.connect(&f.a).expect("the kernel accepts the connect"))
        .collect();
    const LINE: &str = "accept failed (further failures";
    wait_until("an accept failure logged", Duration::from_secs(30), || {
        f.proxy.log_text().contains(LINE)
    });
    let since = Instant::now();
    // Pod b asks meanwhile: its listener fails the same way.
    let b = f.connect(&f.b).expect("the kernel accepts pod b's connect");
    let b_asks = std::thread::spawn(move || {
        let mut b = b;
        b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        b.write_all(request(GOOD, true).as_bytes()).unwrap();
        let mut out = String::new();
        let _ = b.read_to_string(&mut out);
        out
    });
    let cpu_before = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_secs(pid) - cpu_before;
    let window = since.elapsed().as_secs_f64();
    let lines = f.proxy.log_text().matches(LINE).count();
    println!("out of descriptors: {cpu:.2} s of CPU in {window:.1} s, {lines} log line(s)");
    // Spinning would take a core; pausing takes next to nothing.
    assert!(cpu < window / 4.0, "{cpu:.2} s of CPU in {window:.1} s");
    let allowed = 1 + (window / 10.0).ceil() as usize;
    assert!(
        lines <= allowed,
        "{lines} accept-failure lines in {window:.1} s:\n{}",
        f.proxy.log_text()
    );
    // Descriptors come free: everyone is served again.
    drop(flood);
    let answer = b_asks.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "pod b: {answer:?}");
    f.b_is_served();
    f.wait_served(&f.a, "pod a served again");
    f.wait_metric("imds_proxy_accept_errors_total", &["listener=\"pod\""], 1);
    // The limit is the bound: RLIMIT_NOFILE caps the numbers of new
    // descriptors (the process may have inherited some numbered above).
    let inherited_above = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|n| *n >= limit)
        .count();
    let extra = (limit + inherited_above).saturating_sub(mark.idle.1);
    mark.finish(test, extra);
}

//! A TCP relay on loopback between an agent and its server: the test sees
//! each connection through it (bytes each way) and can cut one of them, as
//! a network fault would, while the others carry on. haproxy can balance
//! but not tell which connection carried what, nor cut one of several.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One connection through the relay.
pub struct Piped {
    from: TcpStream,
    to: TcpStream,
    /// Bytes the dialler sent toward the target.
    sent: AtomicU64,
    /// Bytes the target sent back.
    received: AtomicU64,
    ended: AtomicBool,
}

impl Piped {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
    /// Both sockets shut both ways: each end reads EOF (or a reset on its
    /// next write), as when the path between them fails.
    pub fn cut(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let _ = self.from.shutdown(Shutdown::Both);
        let _ = self.to.shutdown(Shutdown::Both);
    }
}

pub struct Relay {
    port: u16,
    pipes: Arc<Mutex<Vec<Arc<Piped>>>>,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port; each connection is relayed to
    /// 127.0.0.1:`target`.
    pub fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pipes: Arc<Mutex<Vec<Arc<Piped>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (pipes2, stop2) = (pipes.clone(), stop.clone());
        let accepting = std::thread::spawn(move || {
            for from in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(from) = from else { continue };
                let Ok(to) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = (from.set_nodelay(true), to.set_nodelay(true));
                let pipe = Arc::new(Piped {
                    from,
                    to,
                    sent: AtomicU64::new(0),
                    received: AtomicU64::new(0),
                    ended: AtomicBool::new(false),
                });
                pipes2.lock().unwrap().push(pipe.clone());
                let way_back = pipe.clone();
                std::thread::spawn(move || copy(&pipe, &pipe.from, &pipe.to, &pipe.sent));
                std::thread::spawn(move || {
                    copy(&way_back, &way_back.to, &way_back.from, &way_back.received)
                });
            }
        });
        Relay {
            port,
            pipes,
            stop,
            accepting: Some(accepting),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections not ended, in the order they were accepted.
    pub fn open(&self) -> Vec<Arc<Piped>> {
        let pipes = self.pipes.lock().unwrap();
        pipes.iter().filter(|p| !p.ended()).cloned().collect()
    }
}

/// Copies until either side ends; then the connection ends both ways.
fn copy(pipe: &Piped, mut from: &TcpStream, mut to: &TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                count.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    pipe.cut();
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
        for pipe in self.pipes.lock().unwrap().iter() {
            pipe.cut();
        }
    }
}

//! Connection workers: a fixed set of threads, each running its own
//! single-threaded tokio runtime, onto which accepted connections are dealt
//! round-robin (nginx's worker-process model).
//!
//! Why not the work-stealing runtime: a proxied request is a chain of
//! short I/O waits (client -> proxy -> upstream -> proxy -> client). On the
//! multi-threaded scheduler every wake-up may also unpark an idle sibling
//! worker to steal, so each request costs extra futex wake-ups and context
//! switches, and the connection's task hops between cores. Measured on the
//! 2-core bench machine, that made imds-proxy ~25% slower than nginx at one
//! connection. A connection (and its upstream connection, driven by the
//! same task) stays on one thread here, and there is no cross-thread
//! traffic per request.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Where connection tasks are spawned. Cheap to share; spawning after the
/// workers stopped cancels the task at once.
pub(crate) struct Spawner {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Spawner {
    /// Runs `fut` on the next worker, or on the current runtime when there
    /// are no workers.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            tokio::spawn(fut);
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(fut);
    }
}

/// The worker threads. Dropping this stops them; each drops its runtime,
/// which cancels every connection it still serves.
pub(crate) struct Workers {
    _stops: Vec<oneshot::Sender<()>>,
}

/// Starts `n` workers (0: none, connections run on the caller's runtime).
///
/// Threads inherit the creating thread's network namespace, and upstream
/// connections are made from these threads: call this from the namespace
/// the proxy runs in.
pub(crate) fn start(n: usize) -> std::io::Result<(Workers, Spawner)> {
    let mut stops = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        std::thread::Builder::new()
            .name(format!("imds-conn-{i}"))
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
    }
    Ok((
        Workers { _stops: stops },
        Spawner {
            handles,
            next: AtomicUsize::new(0),
        },
    ))
}

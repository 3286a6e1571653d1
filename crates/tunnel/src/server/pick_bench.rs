//! Entry points for `benches/pick.rs` (not a stable API): the server's pick
//! of an agent stream for a dial, and an agent's connect and disconnect,
//! timed on in-process agent streams with many agents registered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Backend, Identifiers, ProxyServer, ServerOptions, Strategy};

/// What one setting cost, per operation.
pub struct PickCost {
    /// Registering one agent stream, over all of them.
    pub connect: Duration,
    /// One dial's pick of an agent stream (agent, then link).
    pub pick: Duration,
    /// Removing one agent stream, over all of them.
    pub disconnect: Duration,
}

/// `agents` agents of `links` streams each (every `draining_every`-th
/// agent draining; 0: none), picked for `picks` dials with `strategy`
/// ("default", "destHost": agent `i` announces host `h<i>`, dials go to
/// each in turn).
pub fn measure(
    strategy: &str,
    agents: usize,
    links: usize,
    draining_every: usize,
    picks: usize,
) -> PickCost {
    let strategy: Strategy = strategy.parse().expect("strategy");
    let sh = ProxyServer::new(ServerOptions {
        strategies: vec![strategy],
        ..ServerOptions::default()
    })
    .shared;
    // The receivers are kept so the streams look alive; nothing is sent.
    let mut receivers = Vec::new();
    let mut streams = Vec::new();
    let start = Instant::now();
    for link in 0..links {
        for a in 0..agents {
            let (tx, rx) = mpsc::channel(1);
            receivers.push(rx);
            let backend = Arc::new(Backend {
                links,
                ..Backend::new(
                    &sh,
                    format!("agent-{a}"),
                    Identifiers::parse(&format!("host=h{a}")),
                    tx,
                    0,
                )
            });
            if link == 0 && draining_every > 0 && a % draining_every == 0 {
                backend
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            sh.add_backend(backend.clone());
            streams.push(backend);
        }
    }
    let connect = start.elapsed() / (agents * links) as u32;
    let addresses: Vec<String> = (0..agents.min(1024)).map(|a| format!("h{a}:443")).collect();
    let start = Instant::now();
    for i in 0..picks {
        let picked = sh.select_backend(&addresses[i % addresses.len()]);
        std::hint::black_box(picked.expect("a stream was picked"));
    }
    let pick = start.elapsed() / picks as u32;
    let start = Instant::now();
    for backend in &streams {
        sh.remove_backend(backend);
    }
    let disconnect = start.elapsed() / streams.len() as u32;
    drop(receivers);
    PickCost {
        connect,
        pick,
        disconnect,
    }
}

//! The server's per-dial pick of an agent stream, and an agent stream's
//! connect and disconnect, as the number of agents grows: a table of time
//! per operation (in-process agent streams, no sockets). Upstream keeps its
//! agents in maps and picks in constant time; this shows whether ours does.
//!
//! `cargo bench -p konnectivity --bench pick` (`PICK_MAX_AGENTS`, default
//! 10000, caps the largest row).

use konnectivity::server::pick_bench::measure;

fn main() {
    let max: usize = std::env::var("PICK_MAX_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    println!(
        "{:<34} {:>7} {:>12} {:>12} {:>14}",
        "setting", "agents", "pick ns", "connect us", "disconnect us"
    );
    let settings: [(&str, &str, usize, usize); 4] = [
        ("default, one link", "default", 1, 0),
        ("default, two links", "default", 2, 0),
        ("default, one in two draining", "default", 1, 2),
        ("destHost, one link", "destHost", 1, 0),
    ];
    for (name, strategy, links, draining_every) in settings {
        for agents in [1usize, 10, 100, 1000, 10_000] {
            // One agent cannot be one in two draining.
            if agents > max || agents < draining_every {
                continue;
            }
            // The linear pick this replaced took 0.2-0.6 ms at 10,000 agents.
            let picks = if agents >= 1000 { 20_000 } else { 200_000 };
            let cost = measure(strategy, agents, links, draining_every, picks);
            println!(
                "{:<34} {:>7} {:>12} {:>12.1} {:>14.1}",
                name,
                agents,
                cost.pick.as_nanos(),
                cost.connect.as_nanos() as f64 / 1000.0,
                cost.disconnect.as_nanos() as f64 / 1000.0,
            );
        }
    }
}

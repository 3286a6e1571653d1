//! Test-only helpers shared by every crate's integration tests.
//!
//! Owns the rules from DEVELOPERS.md that every privileged test follows:
//! skip with a printed reason when not root outside CI, fail under
//! `CI=true`; and every namespace a test makes is removed by a Drop guard,
//! on success or failure. Also hands out free ports for test servers
//! ([`free_port`]) without races between tests running at once.

mod netns;
mod ports;
pub mod process;

pub use netns::{NetNs, in_netns};
pub use ports::{free_consecutive_ports, free_port};
pub use process::{LoggedChild, spawn_tied, wait_until, watch_log, watched_logs};

/// True when running under CI (`CI=true`): privileged tests must not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns true when the test may go on as root. Outside CI a non-root run
/// prints why the test is skipped and returns false; under CI it panics.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test}: needs root (network namespaces, nftables) and CI=true forbids skipping");
    }
    eprintln!(
        "SKIPPED {test}: needs root (network namespaces, nftables); run as root or under CI=true"
    );
    false
}

/// Returns true when `program` is on PATH; under CI a missing tool fails the test.
pub fn require_tool(test: &str, program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()));
    if !found {
        if in_ci() {
            panic!("{test}: needs `{program}` (scripts/test.sh installs it)");
        }
        eprintln!("SKIPPED {test}: `{program}` is not installed (scripts/test.sh installs it)");
    }
    found
}

#[cfg(feature = "containerd")]
pub mod containerd;

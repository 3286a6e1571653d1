//! `imds-proxy`: the metadata-service proxy for pods. Linux-only by nature
//! (a listener inside each pod's network namespace, through setns); on other
//! platforms the binary says so and exits 1.

#[cfg(target_os = "linux")]
#[path = "imds-proxy/linux.rs"]
mod linux;

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("imds-proxy: Linux-only (it listens inside pods' network namespaces)");
    std::process::ExitCode::FAILURE
}

//! `proxyctl-cni`: the CNI plugin that installs a pod's redirect policies
//! (nftables) before its containers start. Linux-only by nature; on other
//! platforms the binary says so and exits 1.

#[cfg(target_os = "linux")]
mod linux;

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("proxyctl-cni: Linux-only (it programs nftables in the pod's network namespace)");
    std::process::ExitCode::FAILURE
}

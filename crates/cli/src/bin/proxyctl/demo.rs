//! `proxyctl demo` (filled in next).
use std::process::ExitCode;
pub fn run() -> anyhow::Result<ExitCode> {
    anyhow::bail!("demo: not yet")
}

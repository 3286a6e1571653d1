//! Pieces the proxyctl binaries share: logging set-up and output formats.
//! All behaviour lives in the library crates; binaries only parse flags.

use std::io::IsTerminal;

/// Logs go to stderr so stdout stays machine-readable; `RUST_LOG` filters.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Raises the soft open-file limit to the hard one (servers hold a
/// descriptor per connection; a 1024 soft limit is soon reached). Logged,
/// never fatal.
pub fn raise_fd_limit() {
    match proxyctl_listen::raise_nofile_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(old, new, "raised the soft open-file limit (RLIMIT_NOFILE)")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// How list-like commands print their results (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML; tables are the caller's own.
pub fn print_structured<T: serde::Serialize>(
    format: OutputFormat,
    value: &T,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Yaml => print!("{}", serde_yaml::to_string(value)?),
        OutputFormat::Table => anyhow::bail!("table output is printed by the command itself"),
    }
    Ok(())
}

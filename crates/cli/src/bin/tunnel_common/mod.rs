//! Shared by proxy-server, proxy-agent and proxy-test-client: klog's logging
//! flags (accepted by name, mapped onto tracing), Go-style values, signals.

#![allow(dead_code)]

use std::io::IsTerminal;
use std::time::Duration;

/// klog's flags as upstream binaries expose them (underscores turned into
/// dashes; the underscore spellings are accepted too).
#[derive(clap::Args, Debug, Clone)]
pub struct KlogArgs {
    /// Log verbosity (klog -v). 0-1: info; 2-4: info; 5-6: debug; 7+: trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub v: Option<u32>,
    /// Write log files in this directory (the file is <dir>/<binary>.log).
    #[arg(long = "log-dir", alias = "log_dir", default_value = "")]
    pub log_dir: String,
    /// Write logs to this file.
    #[arg(long = "log-file", alias = "log_file", default_value = "")]
    pub log_file: String,
    /// Accepted for compatibility (MB); files are not rotated.
    #[arg(
        long = "log-file-max-size",
        alias = "log_file_max_size",
        default_value_t = 1800
    )]
    pub log_file_max_size: u64,
    /// Log to standard error instead of files.
    #[arg(long, default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub logtostderr: bool,
    /// Log to standard error as well as files.
    #[arg(long, default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub alsologtostderr: bool,
    #[arg(long = "add-dir-header", alias = "add_dir_header", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub add_dir_header: bool,
    #[arg(long = "skip-headers", alias = "skip_headers", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_headers: bool,
    #[arg(long = "skip-log-headers", alias = "skip_log_headers", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_log_headers: bool,
    #[arg(long = "one-output", alias = "one_output", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub one_output: bool,
    #[arg(long = "legacy-stderr-threshold-behavior", alias = "legacy_stderr_threshold_behavior", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub legacy_stderr_threshold_behavior: bool,
    #[arg(long, default_value = "2")]
    pub stderrthreshold: String,
    /// Per-module verbosity (accepted; RUST_LOG is the equivalent).
    #[arg(long, default_value = "")]
    pub vmodule: String,
    #[arg(
        long = "log-backtrace-at",
        alias = "log_backtrace_at",
        default_value = ""
    )]
    pub log_backtrace_at: String,
}

impl KlogArgs {
    /// Sets up tracing; `default_v` is the binary's klog default.
    pub fn init(&self, binary: &str, default_v: u32) {
        let v = self.v.unwrap_or(default_v);
        let level = match v {
            0..=4 => "info",
            5..=6 => "debug",
            _ => "trace",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "{level},h2=warn,hyper=warn,tower=warn,rustls=warn"
            ))
        });
        let file = if !self.log_file.is_empty() {
            Some(self.log_file.clone())
        } else if !self.log_dir.is_empty() {
            Some(format!(
                "{}/{binary}.log",
                self.log_dir.trim_end_matches('/')
            ))
        } else {
            None
        };
        let to_stderr = file.is_none() || self.logtostderr || self.alsologtostderr;
        let builder = tracing_subscriber::fmt().with_env_filter(filter);
        match file.and_then(|f| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .ok()
        }) {
            Some(f) if !to_stderr || !self.logtostderr => {
                let f = std::sync::Mutex::new(f);
                let _ = builder.with_ansi(false).with_writer(f).try_init();
            }
            _ => {
                let _ = builder
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr)
                    .try_init();
            }
        }
    }
}

/// Go duration flag values (`1h`, `30s`, `0`).
pub fn go_duration(s: &str) -> Result<Duration, String> {
    konnectivity::duration::parse_go_duration(s)
}

/// Bind address as Go reads `host:port`: empty is every interface over
/// IPv6 and IPv4, a host name resolves to one of its addresses.
pub fn bind(host: &str, port: u16) -> Result<std::net::SocketAddr, String> {
    konnectivity::net::bind_addr(host, port)
}

/// Exit code for bad flags (as clap's own).
pub const EXIT_BAD_INPUT: i32 = 2;

pub fn bad_flag(flag: &str, why: impl std::fmt::Display) -> ! {
    eprintln!("error: invalid value for {flag}: {why}");
    std::process::exit(EXIT_BAD_INPUT);
}

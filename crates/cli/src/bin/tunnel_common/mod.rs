//! Shared by proxy-server, proxy-agent and proxy-test-client: klog's logging
//! flags (accepted by name, mapped onto tracing), Go-style values, signals.

#![allow(dead_code)]

use std::io::IsTerminal;
use std::time::Duration;

/// klog's flags as upstream binaries expose them (underscores turned into
/// dashes; the underscore spellings are accepted too). Those a Rust service
/// cannot honour say so in --help.
#[derive(clap::Args, Debug, Clone)]
pub struct KlogArgs {
    /// Log verbosity (klog -v): 0-4 info, 5-6 adds debug, 7+ adds trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub v: Option<u32>,
    /// Write log files in this directory (the file is <dir>/<binary>.log; needs --logtostderr=false).
    #[arg(long = "log-dir", alias = "log_dir", default_value = "")]
    pub log_dir: String,
    /// Write logs to this file (needs --logtostderr=false).
    #[arg(long = "log-file", alias = "log_file", default_value = "")]
    pub log_file: String,
    /// Maximum size of the log file in megabytes; 0: unlimited. A full file
    /// is renamed to <file>.1 (replacing the previous one) and a new one begun.
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
    /// Accepted for compatibility, no effect (log lines carry no source path).
    #[arg(long = "add-dir-header", alias = "add_dir_header", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub add_dir_header: bool,
    /// Log lines without the time and level header.
    #[arg(long = "skip-headers", alias = "skip_headers", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_headers: bool,
    /// Accepted for compatibility, no effect (log files get no file header).
    #[arg(long = "skip-log-headers", alias = "skip_log_headers", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_log_headers: bool,
    /// Accepted for compatibility, no effect (there is one log file, not one per severity).
    #[arg(long = "one-output", alias = "one_output", default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub one_output: bool,
    /// With --logtostderr=true, --stderrthreshold has no effect unless this is false.
    #[arg(long = "legacy-stderr-threshold-behavior", alias = "legacy_stderr_threshold_behavior", default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub legacy_stderr_threshold_behavior: bool,
    /// Logs at or above this severity go to stderr too when logging to files
    /// (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL; or the names).
    #[arg(long, default_value = "2")]
    pub stderrthreshold: String,
    /// Accepted for compatibility, no effect: use RUST_LOG (per module levels).
    #[arg(long, default_value = "")]
    pub vmodule: String,
    /// Accepted for compatibility, no effect.
    #[arg(
        long = "log-backtrace-at",
        alias = "log_backtrace_at",
        default_value = ""
    )]
    pub log_backtrace_at: String,
}

/// klog severities as tracing levels: at or above `threshold`.
fn severity_filter(threshold: &str) -> Result<tracing::level_filters::LevelFilter, String> {
    use tracing::level_filters::LevelFilter;
    Ok(match threshold.to_ascii_uppercase().as_str() {
        "0" | "INFO" => LevelFilter::INFO,
        "1" | "WARNING" => LevelFilter::WARN,
        "2" | "ERROR" | "3" | "FATAL" => LevelFilter::ERROR,
        other => {
            return Err(format!(
                "--stderrthreshold {other:?}: want 0-3 or INFO/WARNING/ERROR/FATAL"
            ));
        }
    })
}

/// A log file rotated by size: past `max` bytes it becomes `<path>.1` and
/// a new file is begun. Without this a long-running server's file grows
/// without bound; klog bounds it the same way (`--log-file-max-size`).
pub struct RotatingFile {
    path: std::path::PathBuf,
    max: u64,
    file: std::fs::File,
    len: u64,
}

impl RotatingFile {
    pub fn open(path: &std::path::Path, max: u64) -> std::io::Result<RotatingFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max,
            file,
            len,
        })
    }
}

impl std::io::Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.max > 0 && self.len > 0 && self.len + buf.len() as u64 > self.max {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            *self = RotatingFile::open(&self.path, self.max)?;
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl KlogArgs {
    /// Sets up tracing; `default_v` is the binary's klog default. Exits 2
    /// on a bad value or a log file that cannot be opened.
    pub fn init(&self, binary: &str, default_v: u32) {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let v = self.v.unwrap_or(default_v);
        let level = match v {
            0..=4 => "info",
            5..=6 => "debug",
            _ => "trace",
        };
        let filter = || {
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!(
                    "{level},h2=warn,hyper=warn,tower=warn,rustls=warn"
                ))
            })
        };
        let threshold = severity_filter(&self.stderrthreshold)
            .unwrap_or_else(|e| bad_flag("--stderrthreshold", e));
        let path = if !self.log_file.is_empty() {
            Some(std::path::PathBuf::from(&self.log_file))
        } else if !self.log_dir.is_empty() {
            Some(std::path::Path::new(&self.log_dir).join(format!("{binary}.log")))
        } else {
            None
        };
        // As klog: files are written only with --logtostderr=false.
        let file = match (&path, self.logtostderr) {
            (Some(p), false) => Some(
                RotatingFile::open(p, self.log_file_max_size.saturating_mul(1 << 20))
                    .unwrap_or_else(|e| bad_flag("--log-file", format!("{}: {e}", p.display()))),
            ),
            _ => None,
        };
        // klog: with --logtostderr the threshold applies only once the
        // legacy behaviour is turned off.
        let all_to_stderr = if self.logtostderr {
            self.legacy_stderr_threshold_behavior
        } else {
            file.is_none() || self.alsologtostderr
        };
        let skip = self.skip_headers;
        let stderr = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal() && !skip)
            .with_writer(std::io::stderr)
            .with_level(!skip)
            .with_target(!skip);
        let stderr = if skip {
            stderr.without_time().boxed()
        } else {
            stderr.boxed()
        }
        .with_filter(filter())
        .with_filter(if all_to_stderr {
            tracing::level_filters::LevelFilter::TRACE
        } else {
            threshold
        });
        let file_layer = file.map(|f| {
            let f = std::sync::Mutex::new(f);
            let l = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(f)
                .with_level(!skip)
                .with_target(!skip);
            if skip {
                l.without_time().boxed()
            } else {
                l.boxed()
            }
            .with_filter(filter())
        });
        let _ = tracing_subscriber::registry()
            .with(stderr)
            .with(file_layer)
            .try_init();
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

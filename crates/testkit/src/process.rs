//! Child processes of a test and waiting on them: a test that times out
//! waiting for a process prints that process's log in its failure message.
//!
//! [`LoggedChild`] sends a child's stdout and stderr to a log file and
//! kills and reaps it on drop. Every child spawned on a test's thread is
//! remembered for that thread (tests run on threads of their own, so one
//! test never prints another's logs); [`wait_until`] fails at once, with
//! the log, when one of them has exited, and prints all their logs when
//! its time runs out. Helpers that own their children in another way can
//! add a log with [`watch_log`].
//!
//! [`spawn_tied`] starts a child that the kernel kills when the test
//! process dies, even by an abort (a stack overflow, say), where no Drop
//! guard runs: else its servers would outlive it, reparented to init.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// A log to print when a wait fails, and the process that writes it.
struct Watched {
    name: String,
    log: PathBuf,
    pid: Option<u32>,
    id: u64,
    // The test thread that watches it.
    thread: ThreadId,
}

// One list for all threads, so a guard dropped on another thread (a
// process handed to a helper thread) still removes its entry.
static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn watched() -> std::sync::MutexGuard<'static, Vec<Watched>> {
    WATCHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `log` (written by process `pid`, if known) on this thread's list
/// until the returned guard is dropped.
pub fn watch_log(name: &str, log: &Path, pid: Option<u32>) -> WatchGuard {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    watched().push(Watched {
        name: name.to_owned(),
        log: log.to_owned(),
        pid,
        id,
        thread: std::thread::current().id(),
    });
    WatchGuard { id }
}

/// Removes its log from the thread's list on drop.
pub struct WatchGuard {
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        watched().retain(|x| x.id != self.id);
    }
}

/// The logs of every process this thread watches, each under its name
/// (the last 200 lines of each).
pub fn watched_logs() -> String {
    let me = std::thread::current().id();
    let list: Vec<(String, PathBuf)> = watched()
        .iter()
        .filter(|x| x.thread == me)
        .map(|x| (x.name.clone(), x.log.clone()))
        .collect();
    {
        let mut out = String::new();
        for (name, log) in &list {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(200);
            let _ = writeln!(out, "--- log of {name} ({}) ---", log.display());
            for l in &lines[from..] {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }
}

/// The name of a watched process that is no longer running, if any (a
/// zombie counts as exited: its parent has not reaped it yet).
fn exited_process() -> Option<String> {
    let me = std::thread::current().id();
    let list = watched();
    {
        list.iter().filter(|x| x.thread == me).find_map(|x| {
            let pid = x.pid?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let running = stat.is_some_and(|s| {
                let state = s
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next());
                !matches!(state, Some("Z" | "X"))
            });
            (!running).then(|| x.name.clone())
        })
    }
}

/// Polls `ok` every 50 ms for up to `limit`. Panics with the logs of this
/// thread's watched processes when the time runs out, or at once when one
/// of them has exited (a server that failed to start is not waited for).
pub fn wait_until(what: &str, limit: Duration, ok: impl FnMut() -> bool) {
    wait_until_explained(what, limit, ok, String::new)
}

/// [`wait_until`], with `context()` (say, the last answer seen) added to the
/// failure message above the logs.
pub fn wait_until_explained(
    what: &str,
    limit: Duration,
    mut ok: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    loop {
        if ok() {
            return;
        }
        if let Some(name) = exited_process() {
            // One last look: it may have done its job and exited.
            if ok() {
                return;
            }
            panic!(
                "waiting for {what}: {name} exited\n{}\n{}",
                context(),
                watched_logs()
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}\n{}\n{}",
                context(),
                watched_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` with SIGKILL as its parent-death signal, so it dies with
/// this process however this process ends.
///
/// The kernel sends that signal when the *thread* that forked the child
/// exits, not the process; a test's thread ends with the test, and tests
/// hand children to other threads. So every child is forked by one
/// thread that lives as long as the process. The command is taken (`cmd`
/// is left as an empty one), so a builder chain can be passed as it is.
pub fn spawn_tied(cmd: &mut Command) -> std::io::Result<Child> {
    let mut cmd = std::mem::replace(cmd, Command::new("false"));
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: no signal then.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, answer) in rx {
                    let _ = answer.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    });
    let (answer, child) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, answer))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    child
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// A child process whose output goes to a log file, killed (SIGKILL) and
/// reaped on drop, and watched by [`wait_until`] on the thread that spawned it.
pub struct LoggedChild {
    child: Child,
    log: PathBuf,
    _watch: WatchGuard,
    // Owns the log's directory when the caller did not give one.
    _dir: Option<tempfile::TempDir>,
}

impl LoggedChild {
    /// Spawns `cmd` with stdin closed and stdout+stderr in `log` (a file in
    /// a new temp dir when `log` is None).
    pub fn spawn(mut cmd: Command, name: &str, log: Option<&Path>) -> std::io::Result<LoggedChild> {
        let (dir, log) = match log {
            Some(l) => (None, l.to_owned()),
            None => {
                let d = tempfile::tempdir()?;
                let l = d.path().join(format!("{name}.log"));
                (Some(d), l)
            }
        };
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_tied(&mut cmd)?;
        let watch = watch_log(name, &log, Some(child.id()));
        Ok(LoggedChild {
            child,
            log,
            _watch: watch,
            _dir: dir,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the copy of this test binary that plays the aborting parent.
    const ABORTING_PARENT: &str = "PROXYCTL_TESTKIT_ABORTING_PARENT";

    #[test]
    fn a_tied_child_dies_when_its_parent_aborts() {
        if std::env::var_os(ABORTING_PARENT).is_some() {
            let mut cmd = Command::new("sleep");
            // Not on our pipes, or the outer test's read waits for it.
            cmd.arg("60").stdout(Stdio::null()).stderr(Stdio::null());
            let child = spawn_tied(&mut cmd).unwrap();
            println!("child pid {}", child.id());
            // No unwinding, no Drop: what a stack overflow does.
            std::process::abort();
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "process::tests::a_tied_child_dies_when_its_parent_aborts",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ABORTING_PARENT, "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "the parent should have aborted");
        let text = String::from_utf8_lossy(&out.stdout);
        let pid: u32 = text
            .lines()
            .find_map(|l| l.split_once("child pid ").map(|(_, p)| p))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no child pid in: {text}"));
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                let state = s
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next());
                matches!(state, Some("Z" | "X"))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !gone() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("child {pid} outlived its aborted parent");
        }
    }

    #[test]
    fn a_wait_on_an_exited_process_fails_at_once_with_its_log() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo listening failed: address in use; exit 3"]);
        let _child = LoggedChild::spawn(cmd, "server", None).unwrap();
        let started = Instant::now();
        let err = std::panic::catch_unwind(|| {
            wait_until("server ready", Duration::from_secs(30), || false)
        })
        .unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("server exited"), "{msg}");
        assert!(msg.contains("address in use"), "{msg}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "waited the whole limit"
        );
    }

    #[test]
    fn a_timeout_prints_the_logs_of_running_processes() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo still starting; exec sleep 30"]);
        let child = LoggedChild::spawn(cmd, "slow", None).unwrap();
        // The shell has written its line once it has exec'd sleep.
        wait_until("the line", Duration::from_secs(10), || {
            child.log_text().contains("still starting")
        });
        let err =
            std::panic::catch_unwind(|| wait_until("never", Duration::from_millis(200), || false))
                .unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("timed out"), "{msg}");
        assert!(msg.contains("--- log of slow"), "{msg}");
        assert!(msg.contains("still starting"), "{msg}");
        drop(child);
        // Dropped: no longer watched.
        assert!(!watched_logs().contains("slow"));
    }
}

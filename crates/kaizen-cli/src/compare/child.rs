//! The training runs of `kaizen compare`: one `kaizen train` child process per method, its
//! output echoed with the method's name in front, its wall time and its peak RSS.
//!
//! Linux reports a child's peak RSS through `wait4`'s `ru_maxrss`, which includes the parent's
//! own peak when it started the child: keep this process small until training is done.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// What a finished `kaizen train` child left behind besides its directory.
pub struct Child {
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    /// stdout and stderr, for the trainable-parameter line.
    pub output: String,
}

/// Runs `kaizen <args>` as a child, echoing its output with the method's name in front. A failed
/// child is an error quoting its last stderr line.
pub fn train_child(name: &str, args: &[String], out: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("cannot find the kaizen executable to run")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start `kaizen train`")?;
    let stdout = drain(child.stdout.take(), Some(format!("    {name} | ")));
    let stderr = drain(child.stderr.take(), Some(format!("    {name} | ")));
    let start = Instant::now();
    let (status, peak_rss_bytes) = wait_with_peak_rss(&mut child)?;
    let wall_seconds = start.elapsed().as_secs_f64();
    let (stdout, stderr) = (join(stdout), join(stderr));
    if !status.success() {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let last = last.map_or("(no output)", |l| l.trim_start_matches("error: "));
        bail!(
            "{name}: `kaizen train` failed ({status}): {last}; finished runs are kept in {}",
            out.display()
        );
    }
    Ok(Child {
        wall_seconds,
        peak_rss_bytes,
        output: stdout + &stderr,
    })
}

/// Reads a child's pipe to the end on a thread (a full pipe would block it), echoing each line to
/// our stderr after `echo` when given.
fn drain(pipe: Option<impl Read + Send + 'static>, echo: Option<String>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let Some(pipe) = pipe else { return text };
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(prefix) = &echo {
                eprintln!("{prefix}{line}");
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    })
}

fn join(h: JoinHandle<String>) -> String {
    h.join().unwrap_or_default()
}

/// Waits for the child and returns its exit status and peak RSS in bytes (Linux: `wait4`'s
/// `ru_maxrss`, in KiB there).
#[cfg(target_os = "linux")]
fn wait_with_peak_rss(child: &mut std::process::Child) -> Result<(ExitStatus, Option<u64>)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 only writes to the two out-pointers, and `pid` is our
    // own child, not yet reaped (std's Child is never waited on after this).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waiting for `kaizen train`");
        }
    }
    let rss = u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024);
    Ok((ExitStatus::from_raw(status), rss))
}

#[cfg(not(target_os = "linux"))]
fn wait_with_peak_rss(child: &mut std::process::Child) -> Result<(ExitStatus, Option<u64>)> {
    Ok((child.wait().context("waiting for `kaizen train`")?, None))
}

/// This process's own peak RSS in bytes (Linux only).
#[cfg(target_os = "linux")]
pub fn self_peak_rss() -> Option<u64> {
    // SAFETY: as above; getrusage only writes to `usage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (r == 0)
        .then(|| u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024))
        .flatten()
}

#[cfg(not(target_os = "linux"))]
pub fn self_peak_rss() -> Option<u64> {
    None
}

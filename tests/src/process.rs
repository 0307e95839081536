//! Child processes and polling for the end-to-end tests of every crate: the one copy of
//! "spawn a binary with its log file", "stop it and see that it stops", "poll until".

use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::PATIENCE;

/// What the stack's Python (with DuckDB, from PyPI via `deploy/local/stack tools`) prints
/// for `script`: the independent reader the tests check Parquet files with.
pub fn python_output(script: &str) -> String {
    let python = std::env::var("PULSE_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/pulse/venv/bin/python")
    });
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    assert!(
        out.status.success(),
        "{python} failed (run deploy/local/stack tools): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `name` from the environment (as `deploy/local/stack env` exports it), else `default`.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Where a child's log goes: `target/test-logs/<name>.log`, so a failing test can be read.
pub fn log_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-logs")
        .join(format!("{name}.log"))
}

/// [`log_path`] opened for appending, as a child's stderr.
pub fn log_file(name: &str) -> Stdio {
    let path = log_path(name);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// A free local port (for a child's `--metrics-listen`, so the test can query it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends SIGTERM (graceful stop) and waits.
pub fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on a pid we own; no memory is shared.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// Sends SIGTERM and returns the exit status; panics when the process is still running
/// after PATIENCE (a stop that hangs is the defect this catches, not a slow one).
pub async fn terminate_in_time(child: &mut Child) -> ExitStatus {
    // SAFETY: kill(2) on a pid we own; no memory is shared.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    exit_within_patience(child, "SIGTERM did not stop the process").await
}

/// Waits for `child` to exit by itself; panics (after killing it) when it is still running
/// after PATIENCE.
pub async fn wait_exit(child: &mut Child) -> ExitStatus {
    exit_within_patience(child, "the process did not exit by itself").await
}

async fn exit_within_patience(child: &mut Child, failure: &str) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{failure}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `done` until it holds or PATIENCE ran out (the caller's assertions say what is
/// missing).
pub async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GETs `http://127.0.0.1:<port><path>` until `check` accepts (status, body); panics with
/// the last answer after PATIENCE.
pub async fn poll_until(port: u16, path: &str, check: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if check(status, &body) {
                return (status, body);
            }
            assert!(Instant::now() < deadline, "{url}: {status} {body}");
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of a counter in a Prometheus page (0 when absent).
pub fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

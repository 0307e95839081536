//! Poison records: a record that made the speed layer panic is dead-lettered on the restart
//! instead of crashing it again and again.
//!
//! The engine thread notes which record it is decoding or folding ([`working_on`], a
//! thread-local store per record). If that panics, the panic hook
//! ([`PoisonJournal::record_panic`]), which runs on the panicking thread, appends that record's
//! position and the panic message to a journal file before the process aborts. A panic on any
//! other thread (the flush task, the metrics endpoint), or on the engine thread between
//! records, journals nothing: it is not a record's fault. On the restart the engine reads the
//! journal and sends the record to `events.dlq` with the reason instead of handling it;
//! entries are dropped once their offset is committed, or after [`MAX_ENTRY_AGE`].
//!
//! The journal is a local file (`--state-dir`, one per replica): in Kubernetes put it on an
//! `emptyDir`, which survives container restarts. If the partition moves to another replica
//! meanwhile, that one panics on the record once, journals it, and skips it after its own
//! restart.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Entries older than this are dropped when the journal is read: their record was handled by
/// whichever replica owns its partition now, or the topic was recreated since.
pub const MAX_ENTRY_AGE_SECS: i64 = 7 * 86_400;

thread_local! {
    /// The record this thread is handling, if any.
    static CURRENT: Cell<Option<(i32, i64)>> = const { Cell::new(None) };
}

/// This thread is handling the record at `(partition, offset)`.
pub fn working_on(partition: i32, offset: i64) {
    CURRENT.with(|c| c.set(Some((partition, offset))));
}

/// This thread is between records (a panic now is not a record's fault).
pub fn idle() {
    CURRENT.with(|c| c.set(None));
}

/// One record that made the process panic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poison {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    /// When it was journaled, epoch seconds.
    #[serde(default)]
    pub at: i64,
}

/// The journal file of poison records for one topic and consumer group.
#[derive(Debug, Clone)]
pub struct PoisonJournal {
    path: PathBuf,
    topic: String,
}

impl PoisonJournal {
    pub fn new(state_dir: &Path, topic: &str, group: &str) -> Self {
        let name: String = format!("poison-{topic}-{group}.jsonl")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            path: state_dir.join(name),
            topic: topic.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From the panic hook: journals the record the panicking thread is handling, if any.
    /// Best effort, never panics (a panic inside a panic hook aborts without a word).
    pub fn record_panic(&self, reason: &str) {
        let Some((partition, offset)) = CURRENT.with(Cell::get) else {
            return;
        };
        let entry = Poison {
            topic: self.topic.clone(),
            partition,
            offset,
            reason: reason.chars().take(1000).collect(),
            at: chrono::Utc::now().timestamp(),
        };
        let Ok(line) = serde_json::to_string(&entry) else {
            return;
        };
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                writeln!(f, "{line}")?;
                f.sync_all()
            });
        match written {
            Ok(()) => eprintln!(
                "pulse-speed: record {}/{} offset {} journaled in {}; it goes to the dead-letter topic on restart",
                entry.topic,
                entry.partition,
                entry.offset,
                self.path.display()
            ),
            Err(e) => eprintln!("pulse-speed: could not journal the poison record: {e}"),
        }
    }

    fn entries(&self) -> Vec<Poison> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Vec::new();
        };
        let oldest = chrono::Utc::now().timestamp() - MAX_ENTRY_AGE_SECS;
        text.lines()
            .filter_map(|l| serde_json::from_str::<Poison>(l).ok())
            .filter(|p| p.topic == self.topic && p.at >= oldest)
            .collect()
    }

    /// The journaled records of this topic, by position. A missing or unreadable file is an
    /// empty journal (unreadable lines are skipped).
    pub fn load(&self) -> HashMap<(i32, i64), String> {
        self.entries()
            .into_iter()
            .map(|p| ((p.partition, p.offset), p.reason))
            .collect()
    }

    /// Removes every entry (the file).
    pub fn forget_all(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the entries at `done` (read again from the file, so entries journaled since
    /// this process started are kept); removes the file when nothing is left.
    pub fn forget(&self, done: &[(i32, i64)]) -> std::io::Result<()> {
        let left: Vec<Poison> = self
            .entries()
            .into_iter()
            .filter(|p| !done.contains(&(p.partition, p.offset)))
            .collect();
        if left.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let mut text = String::new();
        for entry in &left {
            text.push_str(&serde_json::to_string(entry).unwrap_or_default());
            text.push('\n');
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, &self.path)
    }
}

/// Test-only fault injection (the crash tests' failpoints): SIGKILL, as an operator's
/// `kill -9` or the OOM killer would, with the flush in flight and nothing of the process's
/// own cleanup run; after saying where on stderr.
pub(crate) fn kill_self(at: &str) -> ! {
    eprintln!("failpoint: SIGKILL at {at}");
    // SAFETY: getpid and kill take no pointers; SIGKILL ends the process here.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_the_record_in_hand_and_forgets_it() {
        let dir = std::env::temp_dir().join(format!("pulse-poison-{}", std::process::id()));
        let j = PoisonJournal::new(&dir, "events", "speed");
        idle();
        j.record_panic("not a record's fault");
        assert!(j.load().is_empty());
        working_on(7, 42);
        j.record_panic("attempt to add with overflow");
        idle();
        let loaded = j.load();
        assert_eq!(
            loaded.get(&(7, 42)).map(String::as_str),
            Some("attempt to add with overflow")
        );
        // Another topic's journal does not see it.
        assert!(PoisonJournal::new(&dir, "other", "speed").load().is_empty());
        // A panic on another thread is not this record's fault.
        working_on(7, 43);
        std::thread::scope(|s| {
            s.spawn(|| j.record_panic("flush task"));
        });
        idle();
        assert_eq!(j.load().len(), 1);
        j.forget(&[(7, 42)]).unwrap();
        assert!(j.load().is_empty() && !j.path().exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}

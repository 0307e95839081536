//! Poison records: a record that made the speed layer panic is dead-lettered on the restart
//! instead of crashing it again and again.
//!
//! The engine notes which record it is handling ([`working_on`], two relaxed atomic stores per
//! record). If handling it panics, the panic hook ([`PoisonJournal::record_panic`]) appends
//! that record's position and the panic message to a journal file before the process aborts.
//! On the restart the engine reads the journal and sends the record to `events.dlq` with the
//! reason instead of handling it; entries are dropped once their offset is committed.
//!
//! The journal is a local file (`--state-dir`): in Kubernetes put it on an `emptyDir`, which
//! survives container restarts. If the partition moves to another replica meanwhile, that one
//! panics on the record once, journals it, and skips it after its own restart.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};

use serde::{Deserialize, Serialize};

static PARTITION: AtomicI32 = AtomicI32::new(-1);
static OFFSET: AtomicI64 = AtomicI64::new(-1);

/// The engine is handling the record at `(partition, offset)`.
pub fn working_on(partition: i32, offset: i64) {
    PARTITION.store(partition, Ordering::Relaxed);
    OFFSET.store(offset, Ordering::Relaxed);
}

/// The engine is between records (a panic now is not a record's fault).
pub fn idle() {
    PARTITION.store(-1, Ordering::Relaxed);
}

/// One record that made the process panic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poison {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
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

    /// From the panic hook: journals the record being handled, if any. Best effort, never
    /// panics (a panic inside a panic hook aborts without a word).
    pub fn record_panic(&self, reason: &str) {
        let partition = PARTITION.load(Ordering::Relaxed);
        if partition < 0 {
            return;
        }
        let entry = Poison {
            topic: self.topic.clone(),
            partition,
            offset: OFFSET.load(Ordering::Relaxed),
            reason: reason.chars().take(1000).collect(),
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

    /// The journaled records of this topic, by position. A missing or unreadable file is an
    /// empty journal (unreadable lines are skipped).
    pub fn load(&self) -> HashMap<(i32, i64), String> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return HashMap::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str::<Poison>(l).ok())
            .filter(|p| p.topic == self.topic)
            .map(|p| ((p.partition, p.offset), p.reason))
            .collect()
    }

    /// Rewrites the journal with `left` (removing it when empty).
    pub fn keep_only(&self, left: &HashMap<(i32, i64), String>) -> std::io::Result<()> {
        if left.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let mut text = String::new();
        for ((partition, offset), reason) in left {
            let entry = Poison {
                topic: self.topic.clone(),
                partition: *partition,
                offset: *offset,
                reason: reason.clone(),
            };
            text.push_str(&serde_json::to_string(&entry).unwrap_or_default());
            text.push('\n');
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, &self.path)
    }
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
        j.keep_only(&HashMap::new()).unwrap();
        assert!(j.load().is_empty() && !j.path().exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}

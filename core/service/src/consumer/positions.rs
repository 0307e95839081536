//! How far a consumer got in each partition it owns: read, committed, and where a re-read
//! starts.

use std::collections::{HashMap, HashSet};

use rdkafka::error::KafkaError;

use super::Commit;

/// The owned partitions' positions. A position is the offset of the next record to read
/// (the last one handled + 1), which is also what Kafka stores as a commit.
#[derive(Debug, Default)]
pub struct Positions {
    owned: HashSet<i32>,
    next: HashMap<i32, i64>,
    /// Offset of the first record handled since the assignment: where a re-read starts when
    /// nothing was committed yet (librdkafka refuses to seek to "the stored offset").
    first: HashMap<i32, i64>,
    committed: HashMap<i32, i64>,
}

impl Positions {
    pub fn assign(&mut self, partitions: &[i32]) {
        self.owned.extend(partitions);
    }

    /// Forgets `partitions`: a later assignment starts again from the group's commit.
    pub fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.owned.remove(p);
            self.next.remove(p);
            self.first.remove(p);
            self.committed.remove(p);
        }
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.owned.contains(&partition)
    }

    /// The owned partitions, in no order.
    pub fn owned(&self) -> impl Iterator<Item = i32> + '_ {
        self.owned.iter().copied()
    }

    /// The record at `offset` of `partition` is handled (folded, buffered or dead-lettered).
    pub fn handled(&mut self, partition: i32, offset: i64) {
        // Called per record: `first` is looked at only when the partition starts being read.
        if self.next.insert(partition, offset + 1).is_none() {
            self.first.entry(partition).or_insert(offset);
        }
    }

    /// The partitions read since their assignment.
    pub fn read(&self) -> Vec<i32> {
        self.next.keys().copied().collect()
    }

    /// The positions of those of `partitions` that were read.
    pub fn of(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        partitions
            .iter()
            .filter_map(|p| self.next.get(p).map(|o| (*p, *o)))
            .collect()
    }

    pub fn committed(&self, partition: i32) -> Option<i64> {
        self.committed.get(&partition).copied()
    }

    /// Whether some partition was read past its last commit.
    pub fn has_uncommitted(&self) -> bool {
        self.next
            .iter()
            .any(|(p, o)| self.committed.get(p) != Some(o))
    }

    /// Commits those of `positions` that are owned and not committed already, and remembers
    /// them; returns how many were committed. A partition given away since is left out: its
    /// new owner's commits are the ones that count.
    pub fn commit(
        &mut self,
        commit: &dyn Commit,
        positions: &[(i32, i64)],
    ) -> Result<usize, KafkaError> {
        let todo: Vec<(i32, i64)> = positions
            .iter()
            .copied()
            .filter(|(p, next)| self.owns(*p) && self.committed.get(p) != Some(next))
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        commit.commit(&todo)?;
        self.committed.extend(todo.iter().copied());
        Ok(todo.len())
    }

    /// Where a re-read of `partition` starts, forgetting how far it was read: the last commit,
    /// else the first record handled since the assignment. `None` if it was never read.
    pub fn rewind(&mut self, partition: i32) -> Option<i64> {
        self.next.remove(&partition);
        self.committed(partition)
            .or_else(|| self.first.get(&partition).copied())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<Vec<(i32, i64)>>>);

    impl Commit for Recorder {
        fn commit(&self, positions: &[(i32, i64)]) -> Result<(), KafkaError> {
            self.0.borrow_mut().push(positions.to_vec());
            Ok(())
        }
    }

    #[test]
    fn commits_only_what_moved_on_owned_partitions() {
        let mut p = Positions::default();
        p.assign(&[0, 1]);
        p.handled(0, 10);
        p.handled(1, 4);
        assert!(p.has_uncommitted());
        let rec = Recorder::default();
        let positions = p.of(&[0, 1]);
        assert_eq!(p.commit(&rec, &positions).ok(), Some(2));
        assert!(!p.has_uncommitted());
        // Nothing moved: nothing is sent.
        assert_eq!(p.commit(&rec, &positions).ok(), Some(0));
        // A snapshot taken before partition 1 was given away commits only partition 0.
        p.handled(0, 11);
        p.handled(1, 5);
        let snapshot = p.of(&[0, 1]);
        p.revoke(&[1]);
        assert_eq!(p.commit(&rec, &snapshot).ok(), Some(1));
        assert_eq!(
            rec.0.into_inner(),
            vec![vec![(0, 11), (1, 5)], vec![(0, 12)]]
        );
    }

    #[test]
    fn a_re_read_starts_at_the_commit_or_else_at_the_first_record_since_the_assignment() {
        let mut p = Positions::default();
        p.assign(&[3]);
        assert_eq!(p.rewind(3), None);
        p.handled(3, 40);
        p.handled(3, 41);
        // Nothing committed yet: re-read from the first record this member handled.
        assert_eq!(p.rewind(3), Some(40));
        assert!(!p.has_uncommitted());
        p.handled(3, 40);
        p.handled(3, 41);
        let rec = Recorder::default();
        let positions = p.of(&[3]);
        assert_eq!(p.commit(&rec, &positions).ok(), Some(1));
        p.handled(3, 42);
        assert_eq!(p.rewind(3), Some(42));
        // A revocation forgets everything: the next assignment starts from the group's commit.
        p.revoke(&[3]);
        assert!(!p.owns(3));
        assert_eq!(p.rewind(3), None);
    }
}

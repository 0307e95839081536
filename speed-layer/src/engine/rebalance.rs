//! The speed engine as a group member: what it does when partitions come and go.
//!
//! A revocation runs inside `poll`, on the engine's thread, so the partitions' profiles are
//! flushed and their positions committed before the next owner starts from that commit. If
//! that cannot be done (the assignment is already lost, or the store refuses the flush), their
//! state is dropped uncommitted and the next owner re-reads from the last commit; the
//! watermarks in the stored documents keep that exact.

use pulse_service::consumer::{Commit, PartitionOwner};

use super::state::{Effects, ProfileState};
use super::Engine;
use crate::store::DocumentStore;

impl PartitionOwner for Engine {
    fn assigned(&mut self, partitions: &[i32]) {
        self.state.positions.assign(partitions);
    }

    fn revoking(&mut self, commit: &dyn Commit, partitions: &[i32], lost: bool) {
        let fx = self.outbox.effects(commit);
        self.state.give_up(&fx, partitions, lost);
        self.forget_committed_poison();
    }
}

/// Partitions leaving, and partitions re-read.
impl<S: DocumentStore> ProfileState<S> {
    /// `partitions` are being revoked: flush and commit them if possible, then forget them.
    /// If the assignment is already lost, or the store will not take the flush, their state
    /// is dropped uncommitted: the next owner re-reads from the last commit.
    pub fn give_up(&mut self, fx: &dyn Effects, partitions: &[i32], lost: bool) {
        self.finish_flush(fx, true);
        if !lost && !self.flush_now(fx, partitions, 5) {
            tracing::error!("could not flush revoked partitions; the next owner re-reads them");
        }
        self.forget(partitions);
    }

    /// Drops the profiles and positions of `partitions`.
    pub fn forget(&mut self, partitions: &[i32]) {
        let (dropped, dirty_dropped) = self.cache.forget(partitions);
        self.positions.revoke(partitions);
        for p in partitions {
            self.rewind.remove(p);
        }
        tracing::info!(dropped, dirty_dropped, "forgot revoked partitions");
    }

    /// The partitions to re-read and the offset each re-read starts at; their profiles are
    /// dropped, to be reloaded from the store when their events come again.
    pub fn take_rewinds(&mut self) -> Vec<(i32, Option<i64>)> {
        let partitions: Vec<i32> = self.rewind.drain().collect();
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            self.cache.forget(&[p]);
            out.push((p, self.positions.rewind(p)));
        }
        out
    }

    /// A re-read that could not start (the seek failed): the partition's records stay
    /// dropped, and the next [`ProfileState::take_rewinds`] tries again.
    pub fn rewind_later(&mut self, partition: i32) {
        self.rewind.insert(partition);
    }
}

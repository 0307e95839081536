//! Erasures recorded while the speed layer runs (`pulse_core::erasure`): the person's records
//! are passed over from then on (by the [`Unifier`](super::identity::Unifier)); this drops
//! what the replica already holds of them and deletes their documents from the live index.
//!
//! The profile leaves memory at once, so no later flush writes it. Its document is deleted
//! only while no flush is in flight: a `_bulk` already sent may still carry it, and would
//! write it back after the delete. `pulse-admin users erase` deletes the documents too (in
//! every index of the alias); this covers a replica that held the profile in memory when the
//! erasure came, whatever order the two run in.

use pulse_core::partitioner::partition_of;

use super::Engine;
use crate::metrics as m;

impl Engine {
    /// Acts on the erasures recorded since the last call: drops the profiles this replica
    /// holds or owns, and deletes their documents once no flush is in flight.
    pub(super) fn apply_erasures(&mut self) {
        let feed = self.erasures.clone();
        let erased = feed.read();
        for id in erased.since(self.erased_cursor) {
            let held = self.state.cache.remove(id);
            let owned = self
                .state
                .positions
                .owns(partition_of(id.as_bytes(), self.partitions));
            if held || owned {
                self.to_erase.push(id.clone());
            }
        }
        self.erased_cursor = erased.cursor();
        drop(erased);
        if self.to_erase.is_empty() || !self.state.flusher.is_idle() {
            return;
        }
        let ids = std::mem::take(&mut self.to_erase);
        let (store, retry) = (
            self.state.flusher.store().clone(),
            self.state.settings.policy.retry(),
        );
        for id in ids {
            let deleted = self.state.runtime.block_on(retry.run(
                &self.state.shutdown,
                "deleting an erased profile",
                |e: &crate::store::StoreError| e.is_retriable(),
                || store.delete(&id),
            ));
            match deleted {
                Ok(found) => {
                    metrics::counter!(m::PROFILES_ERASED).increment(u64::from(found));
                    tracing::info!(found, "erased profile deleted from the live index");
                }
                // Stopping, or refused for good: `pulse-admin users erase` deletes it (and
                // says so in its report).
                Err(e) => tracing::error!(error = %e, "deleting an erased profile failed"),
            }
        }
    }
}

//! The archive step's journal: each warehouse day is written into the requests' audit records
//! before the first file of that day is replaced, so a run killed half-way through the
//! rewrite still deletes that day from the warehouse when it is run again (the rewritten
//! file no longer shows the person, so the rerun's own scan would not name the day).

use chrono::NaiveDate;
use indicatif::ProgressBar;
use object_store::ObjectStore;
use pulse_archive::erase::{RewriteJournal, Rewritten};

use super::{save_all, Erasing};

pub(super) struct Journal<'a> {
    pub people: &'a mut [Erasing],
    pub archive: &'a dyn ObjectStore,
    pub dry_run: bool,
    pub bar: ProgressBar,
    /// The test hook `--failpoint-kill-after-files`.
    pub kill_after: Option<u64>,
}

impl RewriteJournal for Journal<'_> {
    async fn before_replace(&mut self, day: NaiveDate) -> Result<(), String> {
        if self.dry_run || self.people.iter().all(|e| e.audit.days.contains(&day)) {
            return Ok(());
        }
        for e in self.people.iter_mut() {
            e.audit.days.insert(day);
        }
        save_all(self.archive, self.people)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    fn progress(&mut self, r: &Rewritten) {
        if self.kill_after.is_some_and(|n| r.files_rewritten >= n) {
            std::process::abort();
        }
        self.bar.set_message(format!(
            "archive: {} files scanned, {} rewritten, {} rows removed",
            r.files_scanned, r.files_rewritten, r.rows_removed
        ));
        self.bar.tick();
    }
}

//! The profiles in memory: which partition each belongs to, which are dirty (folded since
//! their last write), and which may be evicted.
//!
//! A dirty profile is never evicted: it is not in the store yet, and dropping it would lose
//! the events folded into it since the last flush (the commit that would re-read them may
//! have moved on). Only a revocation or a re-read drops dirty profiles, together with the
//! positions, so that those events are read again.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use crate::profile::{Fold, Profile};

/// A profile with its bookkeeping, boxed: the table's slots stay one pointer wide, so its
/// growth by doubling (a table is between half and seven eighths full) costs pointers, not
/// whole profiles.
struct Entry {
    profile: Profile,
    partition: i32,
    /// Seconds since the cache's epoch (eviction needs no finer grain; half the bytes of an
    /// `Instant`).
    touched: u32,
    dirty: bool,
}

#[derive(Default)]
pub struct ProfileCache {
    /// Keyed by each profile's own id (held once, in the profile). Ids come from the
    /// outside: ahash is fast and keyed per process.
    entries: HashTable<Box<Entry>>,
    hasher: ahash::RandomState,
    /// What `touched` counts from: the first time the cache was told.
    epoch: Option<Instant>,
    dirty: usize,
}

impl ProfileCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many profiles wait for a flush.
    pub fn dirty(&self) -> usize {
        self.dirty
    }

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn find(&self, id: &str) -> Option<&Entry> {
        self.entries
            .find(self.hash(id), |e| e.profile.id() == id)
            .map(|e| &**e)
    }

    fn find_mut(&mut self, id: &str) -> Option<&mut Entry> {
        let hash = self.hash(id);
        self.entries
            .find_mut(hash, |e| e.profile.id() == id)
            .map(|e| &mut **e)
    }

    /// `now` in the cache's seconds.
    fn seconds(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        u32::try_from(now.saturating_duration_since(epoch).as_secs()).unwrap_or(u32::MAX)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    pub fn get(&self, id: &str) -> Option<&Profile> {
        self.find(id).map(|e| &e.profile)
    }

    /// The profile `id` to change outside a fold: the caller makes it dirty
    /// ([`Self::redirty`]) if it changed anything.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Profile> {
        self.find_mut(id).map(|e| &mut e.profile)
    }

    /// A profile read from the store: clean, of the partition of its watermark.
    pub fn insert_loaded(&mut self, profile: Profile, now: Instant) {
        let partition = profile.watermark.map_or(-1, |w| w.partition);
        let touched = self.seconds(now);
        let entry = Box::new(Entry {
            profile,
            partition,
            dirty: false,
            touched,
        });
        // Replaces one held (a dirty one it replaces stops counting as dirty).
        self.remove(entry.profile.id());
        let hasher = &self.hasher;
        let hash = hasher.hash_one(entry.profile.id());
        self.entries
            .insert_unique(hash, entry, |e| hasher.hash_one(e.profile.id()));
    }

    /// Folds into the profile `id` (made by `create` when it is new, with that id) with
    /// `fold`; an applied fold makes it dirty. The profile belongs to `partition` from now
    /// on: the one its events come from.
    pub fn fold(
        &mut self,
        id: &str,
        partition: i32,
        now: Instant,
        create: impl FnOnce() -> Profile,
        fold: impl FnOnce(&mut Profile) -> Fold,
    ) -> Fold {
        let touched = self.seconds(now);
        let hasher = &self.hasher;
        let hash = hasher.hash_one(id);
        let entry = match self.entries.entry(
            hash,
            |e| e.profile.id() == id,
            |e| hasher.hash_one(e.profile.id()),
        ) {
            hashbrown::hash_table::Entry::Occupied(o) => o.into_mut(),
            hashbrown::hash_table::Entry::Vacant(v) => {
                let profile = create();
                debug_assert_eq!(profile.id(), id, "a profile is kept under its own id");
                v.insert(Box::new(Entry {
                    profile,
                    partition,
                    dirty: false,
                    touched,
                }))
                .into_mut()
            }
        };
        entry.touched = touched;
        entry.partition = partition;
        let outcome = fold(&mut entry.profile);
        if outcome == Fold::Applied && !entry.dirty {
            entry.dirty = true;
            self.dirty += 1;
        }
        outcome
    }

    /// The dirty profiles of `partitions`, made clean, each turned into what `write` makes of
    /// it, with its partition.
    pub fn take_dirty<T>(
        &mut self,
        partitions: &HashSet<i32>,
        mut write: impl FnMut(&Profile) -> T,
    ) -> Vec<(T, i32)> {
        let mut out = Vec::new();
        for entry in self.entries.iter_mut() {
            if entry.dirty && partitions.contains(&entry.partition) {
                entry.dirty = false;
                out.push((write(&entry.profile), entry.partition));
            }
        }
        self.dirty -= out.len();
        out
    }

    /// Drops the profile `id`, dirty or not (an erased person's); whether it was held.
    pub fn remove(&mut self, id: &str) -> bool {
        let hash = self.hash(id);
        match self.entries.find_entry(hash, |e| e.profile.id() == id) {
            Ok(found) => {
                if found.get().dirty {
                    self.dirty -= 1;
                }
                found.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// A profile whose write failed: dirty again, so the next flush writes it.
    pub fn redirty(&mut self, id: &str) {
        if let Some(entry) = self.find_mut(id) {
            if !entry.dirty {
                entry.dirty = true;
                self.dirty += 1;
            }
        }
    }

    /// Drops every profile of `partitions`, dirty ones included; returns (dropped, dirty).
    pub fn forget(&mut self, partitions: &[i32]) -> (usize, usize) {
        let gone: HashSet<i32> = partitions.iter().copied().collect();
        let before = self.entries.len();
        let mut dirty_dropped = 0;
        self.entries.retain(|e| {
            let keep = !gone.contains(&e.partition);
            if !keep && e.dirty {
                dirty_dropped += 1;
            }
            keep
        });
        self.dirty -= dirty_dropped;
        // A replica that lost partitions gives their memory back.
        let hasher = &self.hasher;
        self.entries
            .shrink_to_fit(|e| hasher.hash_one(e.profile.id()));
        (before - self.entries.len(), dirty_dropped)
    }

    /// Evicts clean profiles untouched for `idle`, then the least recently touched clean ones
    /// beyond `max`; returns how many went. Dirty profiles stay, even beyond `max`.
    pub fn evict(&mut self, idle: Duration, max: usize, now: Instant) -> usize {
        let before = self.entries.len();
        let now = self.seconds(now);
        let idle = u32::try_from(idle.as_secs()).unwrap_or(u32::MAX);
        self.entries
            .retain(|e| e.dirty || now.saturating_sub(e.touched) < idle);
        let excess = self.entries.len().saturating_sub(max);
        let mut clean: Vec<u32> = match excess {
            0 => Vec::new(),
            _ => self
                .entries
                .iter()
                .filter(|e| !e.dirty)
                .map(|e| e.touched)
                .collect(),
        };
        if excess > 0 && !clean.is_empty() {
            // The `excess` least recently touched clean ones: all touched before the cutoff,
            // then as many touched at it as are still wanted.
            let nth = excess.min(clean.len()) - 1;
            let cutoff = *clean.select_nth_unstable(nth).1;
            let mut at_cutoff = nth + 1 - clean.iter().filter(|t| **t < cutoff).count();
            self.entries.retain(|e| {
                if e.dirty || e.touched > cutoff {
                    return true;
                }
                if e.touched < cutoff {
                    return false;
                }
                if at_cutoff > 0 {
                    at_cutoff -= 1;
                    return false;
                }
                true
            });
        }
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::DedupePolicy;
    use crate::profile::Watermark;
    use pulse_core::Event;

    fn event(user: &str) -> Event {
        let json = format!(r#"{{"event":"page_view","partner_id":"p1","user_id":"{user}"}}"#);
        pulse_core::parse_event(&json, &pulse_core::ParseContext::now()).expect("a valid event")
    }

    /// Folds one event of `user` at `offset` of `partition`, touched `at`.
    fn fold(cache: &mut ProfileCache, user: &str, partition: i32, offset: i64, at: Instant) {
        let e = event(user);
        let outcome = cache.fold(
            &e.partition_key(),
            partition,
            at,
            || Profile::new(&e, &[]),
            |p| {
                p.fold(
                    &e,
                    Watermark { partition, offset },
                    &DedupePolicy::default(),
                )
            },
        );
        assert_eq!(outcome, Fold::Applied);
    }

    #[test]
    fn a_dirty_profile_is_never_evicted_not_even_beyond_the_bound() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        fold(&mut cache, "a", 0, 1, t0);
        fold(&mut cache, "b", 0, 2, t0);
        fold(&mut cache, "c", 1, 3, t0);
        assert_eq!(cache.dirty(), 3);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(cache.evict(Duration::from_secs(1), 0, later), 0);
        assert_eq!(cache.len(), 3);
        // Once written (clean), the same profiles go.
        let taken = cache.take_dirty(&HashSet::from([0, 1]), |p| p.id().to_string());
        assert_eq!(taken.len(), 3);
        assert_eq!(cache.dirty(), 0);
        assert_eq!(cache.evict(Duration::from_secs(1), 0, later), 3);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn beyond_the_bound_the_least_recently_touched_clean_profiles_go_first() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        for (i, user) in ["old", "mid", "new"].iter().enumerate() {
            fold(
                &mut cache,
                user,
                0,
                i as i64,
                t0 + Duration::from_secs(i as u64),
            );
        }
        cache.take_dirty(&HashSet::from([0]), |_| ());
        fold(&mut cache, "dirty", 0, 9, t0);
        let idle = Duration::from_secs(3600);
        assert_eq!(cache.evict(idle, 2, t0 + Duration::from_secs(5)), 2);
        assert!(cache.contains("p1:new"));
        assert!(cache.contains("p1:dirty"));
    }

    #[test]
    fn a_failed_write_makes_the_profile_dirty_again_once() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        fold(&mut cache, "a", 0, 1, t0);
        cache.take_dirty(&HashSet::from([0]), |_| ());
        cache.redirty("p1:a");
        cache.redirty("p1:a");
        assert_eq!(cache.dirty(), 1);
        // Only the partitions asked for are taken.
        assert!(cache.take_dirty(&HashSet::from([1]), |_| ()).is_empty());
        assert_eq!(cache.dirty(), 1);
    }

    #[test]
    fn forgetting_a_partition_drops_its_dirty_profiles_and_their_count() {
        let t0 = Instant::now();
        let mut cache = ProfileCache::default();
        fold(&mut cache, "a", 0, 1, t0);
        fold(&mut cache, "b", 1, 2, t0);
        assert_eq!(cache.forget(&[1]), (1, 1));
        assert_eq!(cache.dirty(), 1);
        assert!(cache.contains("p1:a"));
    }
}

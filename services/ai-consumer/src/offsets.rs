//! Per-partition completion tracking for out-of-order work.
//!
//! Many messages of a partition are answered at once and finish in any order, but Kafka's
//! committed offset is a single number per partition: "everything below this is done". So the
//! offset stored is never past the lowest offset still in flight.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    highest_done: Option<i64>,
    stored: Option<i64>,
}

/// Tracks started and finished offsets of every partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionState>,
}

impl OffsetTracker {
    /// Records that work on `offset` began.
    pub fn start(&mut self, partition: i32, offset: i64) {
        self.partitions
            .entry(partition)
            .or_default()
            .in_flight
            .insert(offset);
    }

    /// Records that work on `offset` finished; returns the offset to store (the next one to
    /// read) when it moved forward.
    pub fn finish(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        let was_lowest = p.in_flight.first() == Some(&offset);
        if !p.in_flight.remove(&offset) {
            return None;
        }
        p.highest_done = Some(p.highest_done.map_or(offset, |h| h.max(offset)));
        if !was_lowest {
            // Something below is still in flight: the committable point has not moved.
            return None;
        }
        let next = match p.in_flight.first() {
            Some(&lowest) => lowest,
            None => p.highest_done? + 1,
        };
        if p.stored.is_some_and(|s| s >= next) {
            return None;
        }
        p.stored = Some(next);
        Some(next)
    }

    /// Keeps only the partitions `held` says are still ours (after a rebalance); late
    /// completions for the others are ignored, and their offsets are stored by their new owner.
    pub fn retain(&mut self, held: impl Fn(i32) -> bool) {
        self.partitions.retain(|p, _| held(*p));
    }

    /// Messages in flight across partitions.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stores_only_up_to_the_lowest_unfinished() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.start(0, o);
        }
        assert_eq!(t.finish(0, 12), None);
        assert_eq!(t.finish(0, 11), None);
        assert_eq!(t.finish(0, 10), Some(13));
        assert_eq!(t.finish(0, 14), None);
        assert_eq!(t.finish(0, 13), Some(15));
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut t = OffsetTracker::default();
        t.start(0, 1);
        t.start(1, 7);
        t.retain(|p| p == 1);
        assert_eq!(t.in_flight(), 1);
        assert_eq!(
            t.finish(0, 1),
            None,
            "a revoked partition's completion stores nothing"
        );
        assert_eq!(t.finish(1, 7), Some(8));
    }

    proptest! {
        /// Whatever the completion order, a stored offset never passes unfinished work, and
        /// once everything is done the stored offset is one past the highest.
        #[test]
        fn never_passes_unfinished_work(order in Just((0i64..40).collect::<Vec<_>>()).prop_shuffle()) {
            let mut t = OffsetTracker::default();
            for o in 0..40 { t.start(3, o); }
            let mut done = BTreeSet::new();
            let mut last = None;
            for o in order {
                done.insert(o);
                if let Some(s) = t.finish(3, o) {
                    prop_assert!((0..s).all(|x| done.contains(&x)), "stored {s} with unfinished below");
                    last = Some(s);
                }
            }
            prop_assert_eq!(last, Some(40));
            prop_assert_eq!(t.in_flight(), 0);
        }
    }
}

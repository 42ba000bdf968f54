//! Offset-gap detection for consumers (sans-IO).
//!
//! Producers here are idempotent and never transactional, so the offsets of a partition are
//! contiguous: a consumer that reads offset 5157 right after 5154 has been handed a short fetch.
//! tansu 0.6's memory engine does that in two ways (docs/storage.md, issue 11):
//!
//! - a fetch that starts *inside* a record batch returns the batches whose base offset is at or
//!   after the fetch offset, so the rest of the batch it starts in is skipped. librdkafka fetches
//!   from the middle of a batch after a partition is paused and resumed (it resumes at the
//!   application's position) and after a response cut short by its size limit; a seek back to
//!   the first missing offset asks for the middle of the same batch and is skipped again;
//! - a fetch that lands while another produce has raised the high watermark but not yet stored
//!   its batch returns the batches after it (transient: the batch is there a moment later).
//!
//! [`GapDetector`] says, for each record, whether it is the next one. On a jump the caller drops
//! the record and seeks to the offset the verdict names: first the missing offset itself (the
//! transient case), then further and further back (16, 32, 64, … records before it), so that
//! some fetch starts at or before the base of the batch that holds it; the records below the
//! missing offset that such a fetch hands out again are skipped, not processed twice. A gap
//! that persists after [`MAX_HEAL_ATTEMPTS`] seeks (records really gone, e.g. retention) is
//! accepted, loudly, so a consumer can never stall on it.

use std::collections::HashMap;

/// Seeks for the same missing offset before the gap is accepted as real (the last one goes
/// back 2,048 records before it).
pub const MAX_HEAL_ATTEMPTS: u32 = 9;

/// What a consumer should do with a record it just received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The expected next record (or the first one seen on this partition): process it.
    Process,
    /// A record below the missing offset being healed, handed out again because the seek went
    /// back further than the gap: already processed, drop it.
    Skip,
    /// Offsets `expected..got` are missing: drop this record and seek to `seek_to` (at or
    /// before `expected`).
    Gap {
        expected: i64,
        got: i64,
        seek_to: i64,
    },
    /// The same gap survived [`MAX_HEAL_ATTEMPTS`] seeks: process this record; `missing`
    /// records before it are lost to this consumer (log an error).
    GapAccepted { expected: i64, missing: i64 },
}

#[derive(Debug, Clone, Copy)]
struct PartitionState {
    next: i64,
    /// The missing offset being healed and how many seeks were made for it.
    healing: Option<(i64, u32)>,
    /// `next` at the last stall check that found records waiting below the high watermark.
    waiting_at: Option<i64>,
}

impl PartitionState {
    fn new(next: i64) -> Self {
        Self {
            next,
            healing: None,
            waiting_at: None,
        }
    }
}

/// What the client reports of a partition it reads (librdkafka's statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchState {
    /// The partition's high watermark.
    pub high_watermark: i64,
    /// The offset the client fetches next.
    pub position: i64,
    /// Records fetched and not yet handed to the application.
    pub queued: i64,
}

/// Next expected offset of every partition this consumer reads.
#[derive(Debug, Default)]
pub struct GapDetector {
    partitions: HashMap<i32, PartitionState>,
}

/// Where the `attempt`-th seek (from 0) for the missing offset `expected` goes.
fn seek_target(expected: i64, attempt: u32) -> i64 {
    if attempt == 0 {
        expected
    } else {
        expected.saturating_sub(1_i64 << (attempt + 3)).max(0)
    }
}

impl GapDetector {
    /// Judges the record at `offset` of `partition`.
    pub fn observe(&mut self, partition: i32, offset: i64) -> Verdict {
        let Some(state) = self.partitions.get_mut(&partition) else {
            self.partitions
                .insert(partition, PartitionState::new(offset + 1));
            return Verdict::Process;
        };
        if let Some((missing, _)) = state.healing
            && offset < missing
        {
            return Verdict::Skip;
        }
        if offset <= state.next {
            // The next record, or a rewind (a seek or a rebalance restarting from the
            // committed offset): at-least-once allows reading a record again.
            state.next = offset + 1;
            state.healing = None;
            return Verdict::Process;
        }
        let expected = state.next;
        let attempts = match state.healing {
            Some((missing, n)) if missing == expected => n,
            _ => 0,
        };
        if attempts >= MAX_HEAL_ATTEMPTS {
            state.next = offset + 1;
            state.healing = None;
            return Verdict::GapAccepted {
                expected,
                missing: offset - expected,
            };
        }
        state.healing = Some((expected, attempts + 1));
        Verdict::Gap {
            expected,
            got: offset,
            seek_to: seek_target(expected, attempts),
        }
    }

    /// Reading of `partition` starts at `next` (its committed offset): a first record further on
    /// is a gap too (a restart resumed inside a batch).
    pub fn expect(&mut self, partition: i32, next: i64) {
        self.partitions.insert(partition, PartitionState::new(next));
    }

    /// Called every few seconds with what the client reports of the partition: its high
    /// watermark, the offset it fetches next and how many records it holds fetched. Records are
    /// waiting (`next` below the high watermark), the client holds none and fetches nothing
    /// beyond `next`, and nothing was read since the last call: a fetch stuck inside a batch at
    /// the end of the log (nothing after it to reveal the gap). Returns the missing offset and
    /// where to seek, going further back on each call, like a gap. A consumer that is merely
    /// behind has records fetched ahead of `next`, and is left alone.
    pub fn stalled(&mut self, partition: i32, fetch: FetchState) -> Option<(i64, i64)> {
        let state = self.partitions.get_mut(&partition)?;
        if state.next >= fetch.high_watermark || fetch.queued > 0 || fetch.position > state.next {
            state.waiting_at = None;
            return None;
        }
        if state.waiting_at != Some(state.next) {
            state.waiting_at = Some(state.next);
            return None;
        }
        let expected = state.next;
        let attempts = match state.healing {
            Some((missing, n)) if missing == expected => n,
            _ => 0,
        };
        // A seek to the same offset fetches the same nothing: go back from the first try. A
        // stall is never given up (no later record would ever reveal it): past the last
        // attempt, every check seeks back the farthest again.
        let attempts = attempts.clamp(1, MAX_HEAL_ATTEMPTS - 1);
        state.healing = Some((expected, attempts + 1));
        Some((expected, seek_target(expected, attempts)))
    }

    /// The partitions being tracked.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    /// Forgets a partition (revoked, or about to be re-read from its committed offset).
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Forgets every partition (after a rebalance).
    pub fn clear(&mut self) {
        self.partitions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_jump_is_a_gap_and_the_missing_record_heals_it() {
        let mut g = GapDetector::default();
        assert_eq!(g.observe(1, 5153), Verdict::Process);
        assert_eq!(g.observe(1, 5154), Verdict::Process);
        // The fault seen at 2,000 msg/s: 5155 and 5156 skipped.
        assert_eq!(
            g.observe(1, 5157),
            Verdict::Gap {
                expected: 5155,
                got: 5157,
                seek_to: 5155
            }
        );
        // After the seek back, the missing records arrive and reading goes on.
        assert_eq!(g.observe(1, 5155), Verdict::Process);
        assert_eq!(g.observe(1, 5156), Verdict::Process);
        assert_eq!(g.observe(1, 5157), Verdict::Process);
    }

    #[test]
    fn a_gap_inside_a_batch_is_healed_by_seeking_further_back_and_skipping_what_was_read() {
        let mut g = GapDetector::default();
        // A batch 1590..=1594; the consumer had read 1590..=1592 when the partition was
        // paused; resumed at 1593, the broker answers from the next batch (1595).
        for o in 1590..=1592 {
            assert_eq!(g.observe(2, o), Verdict::Process);
        }
        assert_eq!(
            g.observe(2, 1595),
            Verdict::Gap {
                expected: 1593,
                got: 1595,
                seek_to: 1593
            }
        );
        // The seek to 1593 is in the same batch: skipped again. The next seek goes back 16.
        assert_eq!(
            g.observe(2, 1595),
            Verdict::Gap {
                expected: 1593,
                got: 1595,
                seek_to: 1577
            }
        );
        // From 1577 the whole batch comes again: what was processed is skipped, the rest is new.
        for o in 1577..1593 {
            assert_eq!(g.observe(2, o), Verdict::Skip, "{o}");
        }
        for o in 1593..=1600 {
            assert_eq!(g.observe(2, o), Verdict::Process, "{o}");
        }
    }

    #[test]
    fn seeks_go_back_further_each_time_and_never_below_zero() {
        assert_eq!(seek_target(100, 0), 100);
        assert_eq!(seek_target(100, 1), 84);
        assert_eq!(seek_target(100, 2), 68);
        assert_eq!(seek_target(100, 3), 36);
        assert_eq!(seek_target(100, 4), 0);
        assert_eq!(seek_target(10_000, MAX_HEAL_ATTEMPTS - 1), 10_000 - 2_048);
    }

    #[test]
    fn partitions_are_independent_and_rewinds_are_allowed() {
        let mut g = GapDetector::default();
        assert_eq!(g.observe(0, 10), Verdict::Process);
        assert_eq!(g.observe(1, 99), Verdict::Process);
        assert_eq!(g.observe(0, 11), Verdict::Process);
        assert_eq!(
            g.observe(0, 3),
            Verdict::Process,
            "rewind after a rebalance"
        );
        assert_eq!(g.observe(0, 4), Verdict::Process);
        g.forget(0);
        assert_eq!(
            g.observe(0, 50),
            Verdict::Process,
            "a forgotten partition starts anew"
        );
    }

    #[test]
    fn a_gap_that_persists_is_accepted_after_bounded_seeks() {
        let mut g = GapDetector::default();
        g.observe(2, 0);
        for attempt in 0..MAX_HEAL_ATTEMPTS {
            assert_eq!(
                g.observe(2, 3),
                Verdict::Gap {
                    expected: 1,
                    got: 3,
                    seek_to: seek_target(1, attempt)
                }
            );
        }
        assert_eq!(
            g.observe(2, 3),
            Verdict::GapAccepted {
                expected: 1,
                missing: 2
            }
        );
        assert_eq!(g.observe(2, 4), Verdict::Process);
    }

    /// One partition of a broker with tansu 0.6's fetch: records in batches; a fetch at `from`
    /// returns whole batches whose base offset is at or after `from` (so a fetch inside a batch
    /// skips the rest of it), minus the batches not yet visible (stored after their watermark
    /// was raised: each is missed by the first fetch that reaches it), at least one batch and
    /// then up to `max` records.
    struct Broker {
        bases: Vec<i64>,
        end: i64,
        late: std::collections::BTreeSet<i64>,
    }

    impl Broker {
        fn fetch(&mut self, from: i64, max: usize) -> Vec<i64> {
            let mut out = Vec::new();
            for (i, &base) in self.bases.iter().enumerate() {
                if base < from || self.late.remove(&base) {
                    continue;
                }
                if !out.is_empty() && out.len() >= max {
                    break;
                }
                let next = self.bases.get(i + 1).copied().unwrap_or(self.end);
                out.extend(base..next);
            }
            out
        }
    }

    proptest! {
        /// Against that broker, a consumer that may pause its partition after any record it
        /// processes (backpressure: librdkafka then resumes at the next offset, inside a batch)
        /// and seeks where the detector says processes every offset once, in order.
        #[test]
        fn every_offset_is_processed_once_in_order_against_tansus_fetch(
            sizes in proptest::collection::vec(1i64..16, 1..120),
            late in proptest::collection::vec(any::<bool>(), 120),
            pauses in proptest::collection::vec(any::<bool>(), 1..64),
            max in 1usize..40,
            start in 0i64..30,
        ) {
            let mut bases = Vec::new();
            let mut end = 0;
            for s in &sizes {
                bases.push(end);
                end += s;
            }
            let late = bases
                .iter()
                .zip(&late)
                .filter(|(b, l)| **l && **b > 0)
                .map(|(b, _)| *b)
                .collect();
            let mut broker = Broker { bases, end, late };
            // A restart resumes at a committed offset, anywhere (inside a batch too).
            let start = start.min(end - 1);
            let mut g = GapDetector::default();
            g.expect(0, start);
            let mut processed = Vec::new();
            let mut position = start;
            let mut pauses = pauses.iter().cycle();
            let mut fetches = 0;
            while position < end {
                fetches += 1;
                prop_assert!(fetches < 100_000, "no progress");
                let records = broker.fetch(position, max);
                if records.is_empty() {
                    // Stuck inside the last batch: the periodic stall check finds it.
                    let fetch = FetchState { high_watermark: end, position, queued: 0 };
                    if let Some((_, seek_to)) = g.stalled(0, fetch) {
                        position = seek_to;
                    }
                    continue;
                }
                for offset in records {
                    match g.observe(0, offset) {
                        Verdict::Process => {
                            processed.push(offset);
                            position = offset + 1;
                            if pauses.next().copied().unwrap_or(false) {
                                break;
                            }
                        }
                        Verdict::Skip => position = offset + 1,
                        Verdict::Gap { seek_to, .. } => {
                            position = seek_to;
                            break;
                        }
                        Verdict::GapAccepted { .. } => prop_assert!(false, "gap accepted"),
                    }
                }
            }
            prop_assert_eq!(processed, (start..end).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_fetch_stuck_inside_the_last_batch_is_found_by_the_stall_check() {
        let fetch = |high_watermark, position, queued| FetchState {
            high_watermark,
            position,
            queued,
        };
        let mut g = GapDetector::default();
        g.expect(0, 7);
        assert_eq!(g.stalled(0, fetch(7, 7, 0)), None, "nothing waiting");
        assert_eq!(
            g.stalled(0, fetch(10, 7, 0)),
            None,
            "first sight: maybe still fetching"
        );
        assert_eq!(
            g.stalled(0, fetch(10, 7, 0)),
            Some((7, 0)),
            "no progress since: seek back"
        );
        assert_eq!(g.observe(0, 3), Verdict::Skip);
        assert_eq!(g.observe(0, 7), Verdict::Process);
        assert_eq!(
            g.stalled(0, fetch(10, 8, 0)),
            None,
            "progress resets the check"
        );
        assert_eq!(g.stalled(0, fetch(8, 8, 0)), None);
    }

    #[test]
    fn a_stall_is_never_given_up() {
        // Nothing after the stuck batch will ever reveal the gap, so every check past the
        // last attempt seeks back the farthest again (CI saw a consumer abandon one for good).
        let mut g = GapDetector::default();
        g.expect(0, 5_000);
        let stuck = FetchState {
            high_watermark: 5_010,
            position: 5_000,
            queued: 0,
        };
        assert_eq!(g.stalled(0, stuck), None, "first sight");
        let seeks: Vec<i64> = (0..MAX_HEAL_ATTEMPTS + 5)
            .map(|_| g.stalled(0, stuck).expect("still healing").1)
            .collect();
        assert_eq!(seeks[0], 5_000 - 16);
        assert!(seeks.windows(2).all(|w| w[1] <= w[0]), "{seeks:?}");
        assert_eq!(*seeks.last().unwrap(), 5_000 - 2_048);
    }

    #[test]
    fn a_consumer_that_is_only_behind_is_not_stalled() {
        let fetch = |position, queued| FetchState {
            high_watermark: 20_000,
            position,
            queued,
        };
        let mut g = GapDetector::default();
        g.expect(1, 10_009);
        for _ in 0..5 {
            assert_eq!(g.stalled(1, fetch(12_000, 0)), None, "fetched ahead");
            assert_eq!(g.stalled(1, fetch(10_009, 500)), None, "records queued");
        }
    }

    #[test]
    fn a_restart_inside_a_batch_is_a_gap() {
        let mut g = GapDetector::default();
        g.expect(0, 1593);
        assert_eq!(
            g.observe(0, 1595),
            Verdict::Gap {
                expected: 1593,
                got: 1595,
                seek_to: 1593
            }
        );
    }
}

//! The send slots one replica holds for one Stripe account: a block reserved for every
//! replica at once ([`super::shared`]), handed to this replica's requests in order, each at
//! its own time.

use std::time::Duration;

use tokio::time::Instant;

/// How late a slot may still be used. Reserved slots are further apart than the rate asks
/// ([`interval`]); a request that goes out a little after its slot eats into that margin, one
/// that goes out much later could land next to another replica's slot, so such a slot is
/// dropped (unused slots only ever lower the rate).
pub const LATE: Duration = Duration::from_millis(10);

/// The time between two slots of an account allowed `rate` requests a second: 5% more than
/// 1/(rate - 1). The 5% keep every one-second span under the rate when a span starts exactly
/// at a slot and requests leave up to 50 ms after theirs; the slot held back absorbs one
/// request a second arriving later than that (a replica descheduled on a busy machine; seen
/// at 45 ms with three replicas on two cores). At 1,000/s that is 951 requests a second
/// (95.1%), at test mode's 25/s, 22.9.
pub fn interval(rate: u32) -> Duration {
    let per_second = rate.saturating_sub(1).max(1);
    Duration::from_secs_f64(1.05 / f64::from(per_second))
}

/// How many slots one reservation asks for: one per request of this replica waiting for the
/// account, at most a tenth of a second's worth, so a replica holds little of the rate ahead
/// of the others (and a replica that dies leaves little of it unused).
pub fn block_size(waiting: u32, rate: u32) -> u32 {
    waiting.clamp(1, (rate / 10).max(1))
}

/// A reserved block: `count` slots, the first at `first`, `interval` apart.
#[derive(Debug, Clone)]
pub struct Block {
    first: Instant,
    interval: Duration,
    count: u32,
    taken: u32,
}

impl Block {
    pub fn new(first: Instant, interval: Duration, count: u32) -> Self {
        Self {
            first,
            interval,
            count,
            taken: 0,
        }
    }

    /// Takes the next slot a request ready at `now` may use: the first not yet taken that is
    /// at most [`LATE`] behind `now` (older ones are dropped). `None` when the block is used up.
    pub fn take(&mut self, now: Instant) -> Option<Instant> {
        while self.taken < self.count {
            let at = self.first + self.interval * self.taken;
            self.taken += 1;
            if at + LATE >= now {
                return Some(at);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_one_second_span_holds_more_slots_than_the_rate() {
        for rate in [1, 2, 4, 25, 100, 1000] {
            let gap = interval(rate);
            // Slots in a span that starts at a slot, when every slot but the first leaves
            // `late` after its time, plus one request from before the span arriving in it.
            let in_span = |late: Duration| {
                (1..)
                    .take_while(|n| gap * *n + late < Duration::from_secs(1))
                    .count()
                    + 2
            };
            assert!(
                in_span(Duration::ZERO) <= rate.max(2) as usize,
                "rate {rate}"
            );
            assert!(
                in_span(Duration::from_millis(49)) <= rate.max(2) as usize,
                "rate {rate}, 49 ms late"
            );
        }
        // What that costs: a live account's rate to 95.1%.
        let per_second = 1.0 / interval(1000).as_secs_f64();
        assert!((950.0..952.0).contains(&per_second), "{per_second}");
    }

    #[test]
    fn blocks_follow_demand_up_to_a_tenth_of_a_second() {
        assert_eq!(block_size(0, 25), 1);
        assert_eq!(block_size(8, 25), 2);
        assert_eq!(block_size(8, 1000), 8);
        assert_eq!(block_size(500, 1000), 100);
        assert_eq!(block_size(3, 5), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_come_in_order_and_stale_ones_are_dropped() {
        let start = Instant::now();
        let gap = Duration::from_millis(40);
        let mut block = Block::new(start, gap, 4);
        assert_eq!(block.take(start), Some(start));
        assert_eq!(block.take(start), Some(start + gap), "a future slot");
        // 130 ms on: the slot at 80 ms is 50 ms stale, the one at 120 ms is 10 ms late.
        assert_eq!(block.take(start + gap * 3 + LATE), Some(start + gap * 3));
        assert_eq!(block.take(start), None, "used up");
    }
}

//! The sink's billing rules as plain functions: what a window owes Stripe next
//! ([`next_send`]: the whole number to send for a change of a window total, the running
//! total rounded and the rest carried, or a `last` meter's value), its timestamp inside the
//! window, whether Stripe can still take it, and whether Stripe holds an event in doubt. The identifier of each meter event is [`crate::identifier`].

pub use meterline_schemas::stripe_limits::event_timestamp;
use meterline_schemas::stripe_limits::{self, TimestampRefusal, MAX_VALUE};
use meterline_schemas::{Decimal, Window};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::RoundingStrategy;
use time::OffsetDateTime;

use crate::ledger::{Counts, Current};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsendable {
    #[error("the window is older than Stripe's 35 days")]
    Expired,
    #[error("the window ends in the future")]
    InFuture,
    #[error("value {0} has more than 15 digits")]
    TooLarge(String),
}

/// A meter event value and the carry it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounded {
    /// The whole number to send; 0 when the change is absorbed by the carry.
    pub value: i64,
    /// The customer and meter's carry after the event is accepted.
    pub carry: Decimal,
}

/// What to send for `change`, the part of a window's total that its accepted meter events do
/// not account for yet, when the customer and meter carry `carry`: the exact quantity
/// accounted for minus the whole numbers Stripe accepted, over all its windows.
///
/// Stripe takes whole numbers only. Rounding each window on its own drifts without bound
/// (0.4 an hour bills 0 for ever, 0.5 an hour twice the usage), so the running total is
/// rounded instead, half away from zero, and the rest carried: after every event the carry
/// is within half a unit, and so any run of events adds up to within 1 of the exact usage it
/// accounts for. Negative when a window went down (a late correction): sent as a negative
/// meter event, which Stripe documents for corrections.
pub fn round_with_carry(carry: Decimal, change: Decimal) -> Result<Rounded, Unsendable> {
    let exact = carry + change;
    let value = exact
        .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero)
        .to_i64()
        .filter(|v| v.abs() <= MAX_VALUE)
        .ok_or_else(|| Unsendable::TooLarge(exact.to_string()))?;
    Ok(Rounded {
        value,
        carry: exact - Decimal::from(value),
    })
}

/// What a window owes Stripe now, from what the ledger holds of it ([`Current`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing: every part of the total is accounted for.
    Settled,
    /// The change rounds to 0 with the carry: it goes into the carry, accounted for without
    /// a meter event.
    Carry(Decimal),
    /// A `last` window's new total rounds to the value Stripe already holds, or a newer
    /// window of its period already carries it: accounted for without a meter event.
    Unchanged(Decimal),
    /// A meter event of `value`, accounting for `accounted` of the total (the exact change
    /// for `sum`, the exact value for `last`).
    Send { value: i64, accounted: Decimal },
    /// A `sum` meter event that takes back, at `at` (their stamp, so in the period Stripe
    /// filed them in), the units of the window's accepted events that lie past the period
    /// the window is billed in now; what they accounted for is then owed again, and goes
    /// out stamped inside the window's period.
    Move {
        value: i64,
        accounted: Decimal,
        at: i64,
    },
}

/// The next step for a window with no meter event outstanding. For a `sum` meter
/// ([`Counts::Change`]): first, units Stripe filed past the window's billing period are
/// taken back where they were filed ([`Next::Move`]); then the change not yet accounted for,
/// rounded against the carry ([`round_with_carry`]). For a `last` meter ([`Counts::Value`]):
/// the total itself, rounded on its own (Stripe bills one value of the period, so nothing is
/// carried); a 0 is sent too, since it may be the period's last value. A `last` window superseded by a newer window of its
/// period sends nothing: whether Stripe's `last` goes by timestamp or by receipt, the period's
/// value is then the newer window's.
pub fn next_send(counts: Counts, current: &Current) -> Result<Next, Unsendable> {
    match counts {
        Counts::Change => {
            if let Some(at) = current.misplaced_at {
                if !current.misplaced_value.is_zero() || !current.misplaced_accounted.is_zero() {
                    let value = (-current.misplaced_value)
                        .to_i64()
                        .filter(|v| v.abs() <= MAX_VALUE)
                        .ok_or_else(|| Unsendable::TooLarge(current.misplaced_value.to_string()))?;
                    return Ok(Next::Move {
                        value,
                        accounted: -current.misplaced_accounted,
                        at,
                    });
                }
            }
            let change = current.total - current.accounted;
            if change.is_zero() {
                return Ok(Next::Settled);
            }
            match round_with_carry(current.carry, change)?.value {
                0 => Ok(Next::Carry(change)),
                value => Ok(Next::Send {
                    value,
                    accounted: change,
                }),
            }
        }
        Counts::Value => {
            if current.superseded {
                // A newer window of the period went to Stripe with the period to date, this
                // window's usage included: sent now, this value could become the period's
                // last one (Stripe's `last` is the period's last event).
                return Ok(if current.accounted == current.total {
                    Next::Settled
                } else {
                    Next::Unchanged(current.total)
                });
            }
            if current.sent && current.accounted == current.total {
                return Ok(Next::Settled);
            }
            let value = round_with_carry(Decimal::ZERO, current.total)?.value;
            if current.sent && Decimal::from(value) == current.synced {
                return Ok(Next::Unchanged(current.total));
            }
            Ok(Next::Send {
                value,
                accounted: current.total,
            })
        }
    }
}

/// The timestamp of a new meter event of `window`, billed in the period ending at
/// `period_end`: the second of the latest event it counts
/// ([`stripe_limits::event_timestamp_at`]), so usage never moves later than its last event,
/// nor past the period's end; but no older than Stripe takes at `now` (a window at the edge
/// of Stripe's 35 days is stamped later inside itself rather than refused).
pub fn stamp(
    window: &Window,
    last_event: Option<OffsetDateTime>,
    period_end: OffsetDateTime,
    now: OffsetDateTime,
) -> i64 {
    no_older_than_stripe_takes(
        stripe_limits::event_timestamp_at(window, last_event, period_end),
        now,
    )
    .min(stripe_limits::event_timestamp_in(window, period_end))
}

/// `at` (Unix seconds), or the oldest second Stripe takes at `now` with a minute to spare if
/// `at` is older.
pub fn no_older_than_stripe_takes(at: i64, now: OffsetDateTime) -> i64 {
    at.max((now - stripe_limits::MAX_EVENT_AGE).unix_timestamp() + 60)
}

/// Whether Stripe would accept a meter event for `window` at `now` ([`stripe_limits`]).
pub fn check_sendable(window: &Window, now: OffsetDateTime) -> Result<(), Unsendable> {
    stripe_limits::check_timestamp(event_timestamp(window), now).map_err(|refusal| match refusal {
        TimestampRefusal::TooOld => Unsendable::Expired,
        TimestampRefusal::InFuture => Unsendable::InFuture,
    })
}

/// What Stripe's meter event summaries say of a meter event in doubt (its attempts got no
/// certain answer), for a `sum` meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Recorded,
    NotRecorded,
    /// Neither: another writer of the meter, or Stripe still aggregating. A person decides.
    Unknown,
}

/// Whether Stripe holds a meter event of `value`, from its summary of the range the event is
/// stamped in and the whole units the ledger knows Stripe accepted in that range: the
/// summary is exactly those plus the event, or exactly those without it. The two never
/// coincide (a meter event's value is never 0), so the answer is certain when one of them
/// matches, as long as meterline is the only writer of the meter for the customer.
pub fn held_by_stripe(summary: f64, accepted: Decimal, value: Decimal) -> Held {
    let (Some(accepted), Some(value)) = (accepted.to_f64(), value.to_f64()) else {
        return Held::Unknown;
    };
    // Stripe sums whole numbers: the summary is exact well within f64's 15 digits.
    let is = |expected: f64| (summary - expected).abs() < 1e-6;
    if value != 0.0 && is(accepted + value) {
        Held::Recorded
    } else if value != 0.0 && is(accepted) {
        Held::NotRecorded
    } else {
        Held::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn sent(carry: &str, change: &str) -> (i64, Decimal) {
        let r = round_with_carry(d(carry), d(change)).unwrap();
        (r.value, r.carry)
    }

    #[test]
    fn the_running_total_is_rounded_half_away_from_zero() {
        assert_eq!(sent("0", "12.5"), (13, d("-0.5")));
        assert_eq!(sent("0", "12.49"), (12, d("0.49")));
        assert_eq!(sent("0", "-2.5"), (-3, d("0.5")));
        assert_eq!(sent("0", "0"), (0, d("0")));
        assert_eq!(sent("0.4", "0.4"), (1, d("-0.2")));
        assert_eq!(sent("-0.2", "0.4"), (0, d("0.2")));
        assert_eq!(sent("0.5", "-1"), (-1, d("0.5")));
        assert!(round_with_carry(d("0"), d("1000000000000000")).is_err());
        assert_eq!(sent("0", "999999999999999"), (999_999_999_999_999, d("0")));
    }

    /// 0.4 and 0.5 an hour for a month: rounded per window they billed 0 and 720.
    #[test]
    fn a_month_of_fractional_hours_bills_its_exact_total() {
        for (per_hour, expected) in [("0.4", 288), ("0.5", 360), ("0.333", 240)] {
            let mut carry = Decimal::ZERO;
            let mut billed = 0;
            for _ in 0..720 {
                let r = round_with_carry(carry, d(per_hour)).unwrap();
                billed += r.value;
                carry = r.carry;
            }
            assert_eq!(billed, expected, "{per_hour} an hour");
        }
    }

    /// Random windows of random fractional totals, revised up and down in any order, each
    /// change sent as it comes: after every send the whole numbers accepted are within half
    /// a unit of the exact total accounted for, and every run of sends within 1 of the exact
    /// change it covers.
    #[test]
    fn any_run_of_sends_adds_up_to_within_one_of_its_exact_total() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for _ in 0..200 {
            let mut windows = vec![Decimal::ZERO; rng.gen_range(1..40)];
            let (mut carry, mut exact, mut billed) = (Decimal::ZERO, Decimal::ZERO, 0i64);
            let mut runs = vec![(Decimal::ZERO, 0i64)];
            for _ in 0..rng.gen_range(1..120) {
                let w = rng.gen_range(0..windows.len());
                // A new total with up to 4 decimals, sometimes lower than before.
                let total = Decimal::new(rng.gen_range(-2_000..200_000), 4);
                let change = total - windows[w];
                windows[w] = total;
                let r = round_with_carry(carry, change).unwrap();
                carry = r.carry;
                exact += change;
                billed += r.value;
                assert!(carry.abs() <= d("0.5"), "carry {carry}");
                assert_eq!(Decimal::from(billed) + carry, exact);
                runs.push((exact, billed));
            }
            assert_eq!(exact, windows.iter().sum::<Decimal>());
            for (i, a) in runs.iter().enumerate() {
                for b in &runs[i..] {
                    let exact_run = b.0 - a.0;
                    let billed_run = Decimal::from(b.1 - a.1);
                    assert!((billed_run - exact_run).abs() <= Decimal::ONE);
                }
            }
        }
    }

    #[test]
    fn stripes_time_bounds() {
        let now = datetime!(2026-11-26 12:00 UTC);
        let w = Window::containing(datetime!(2026-11-26 10:30 UTC), 60).unwrap();
        assert_eq!(
            event_timestamp(&w),
            datetime!(2026-11-26 10:59:59 UTC).unix_timestamp()
        );
        assert_eq!(check_sendable(&w, now), Ok(()));
        let old = Window::containing(now - time::Duration::days(36), 60).unwrap();
        assert_eq!(check_sendable(&old, now), Err(Unsendable::Expired));
        let ahead = Window::containing(now + time::Duration::hours(2), 60).unwrap();
        assert_eq!(check_sendable(&ahead, now), Err(Unsendable::InFuture));
    }

    #[test]
    fn a_summary_tells_a_recorded_event_from_a_lost_one_or_says_it_cannot() {
        let d = |v: i64| Decimal::from(v);
        assert_eq!(held_by_stripe(12.0, d(7), d(5)), Held::Recorded);
        assert_eq!(held_by_stripe(7.0, d(7), d(5)), Held::NotRecorded);
        assert_eq!(
            held_by_stripe(9.0, d(7), d(5)),
            Held::Unknown,
            "another writer"
        );
        assert_eq!(
            held_by_stripe(4.0, d(7), d(-3)),
            Held::Recorded,
            "a correction"
        );
        assert_eq!(held_by_stripe(0.0, d(0), d(5)), Held::NotRecorded);
        assert_eq!(held_by_stripe(7.0, d(7), d(0)), Held::Unknown);
    }

    #[test]
    fn units_stripe_filed_past_the_windows_period_are_taken_back_where_they_were_filed() {
        let d = |v: i64| Decimal::from(v);
        // 7 calls were billed at 14:59, before Stripe named a period starting at 14:30;
        // the window now counts the 3 calls before 14:30.
        let mut current = Current {
            total: d(3),
            accounted: d(7),
            carry: Decimal::ZERO,
            synced: d(7),
            sent: true,
            superseded: false,
            last_event_at: None,
            period_end: OffsetDateTime::UNIX_EPOCH,
            misplaced_value: d(7),
            misplaced_accounted: d(7),
            misplaced_at: Some(1_700_000_340),
        };
        assert_eq!(
            next_send(Counts::Change, &current),
            Ok(Next::Move {
                value: -7,
                accounted: d(-7),
                at: 1_700_000_340
            })
        );
        // Once the move is accepted it is misplaced too, and the two cancel out: the 3 go
        // out inside the window's period.
        current.accounted = Decimal::ZERO;
        current.synced = Decimal::ZERO;
        current.misplaced_value = Decimal::ZERO;
        current.misplaced_accounted = Decimal::ZERO;
        assert_eq!(
            next_send(Counts::Change, &current),
            Ok(Next::Send {
                value: 3,
                accounted: d(3)
            })
        );
        // A `last` meter's value is absolute: nothing to move.
        current.misplaced_value = d(7);
        current.misplaced_accounted = d(7);
        assert!(matches!(
            next_send(Counts::Value, &current),
            Ok(Next::Send { value: 3, .. })
        ));
    }

    /// One customer and meter as the ledger and Stripe see them, moved exactly as the
    /// settle loop moves them ([`next_send`], then the ledger's `accepted`, `carried` or
    /// `unchanged_value`), every meter event accepted.
    #[derive(Default)]
    struct Simulation {
        windows: Vec<Current>,
        carry: Decimal,
        /// Stripe's accepted meter events: (window index as the timestamp, receipt order,
        /// value).
        stripe: Vec<(usize, usize, i64)>,
    }

    impl Simulation {
        fn new(windows: usize) -> Self {
            Self {
                windows: (0..windows)
                    .map(|_| Current {
                        total: Decimal::ZERO,
                        accounted: Decimal::ZERO,
                        carry: Decimal::ZERO,
                        synced: Decimal::ZERO,
                        sent: false,
                        superseded: false,
                        last_event_at: None,
                        period_end: OffsetDateTime::UNIX_EPOCH,
                        misplaced_value: Decimal::ZERO,
                        misplaced_accounted: Decimal::ZERO,
                        misplaced_at: None,
                    })
                    .collect(),
                ..Self::default()
            }
        }

        /// `revisions` (window, new total, settled at once) applied in order, then every
        /// window settled.
        fn run(counts: Counts, windows: usize, revisions: &[(usize, Decimal, bool)]) -> Self {
            let mut sim = Self::new(windows);
            for &(w, new_total, settle_now) in revisions {
                let w = w % windows;
                sim.windows[w].total = new_total;
                if settle_now {
                    sim.settle(counts, w);
                }
            }
            for w in 0..windows {
                sim.settle(counts, w);
            }
            sim
        }

        fn settle(&mut self, counts: Counts, w: usize) {
            for _ in 0..8 {
                let mut current = Current {
                    carry: self.carry,
                    superseded: counts == Counts::Value && self.stripe.iter().any(|e| e.0 > w),
                    ..self.windows[w]
                };
                match next_send(counts, &current).expect("sendable") {
                    Next::Settled => return,
                    Next::Carry(change) => {
                        current.accounted += change;
                        self.carry += change;
                    }
                    Next::Unchanged(total) => current.accounted = total,
                    // Every event is stamped inside its window's period here.
                    Next::Move { .. } => unreachable!("no period moves in the simulation"),
                    Next::Send { value, accounted } => {
                        let receipt = self.stripe.len();
                        self.stripe.push((w, receipt, value));
                        current.sent = true;
                        match counts {
                            Counts::Change => {
                                current.synced += Decimal::from(value);
                                current.accounted += accounted;
                                self.carry += accounted - Decimal::from(value);
                            }
                            Counts::Value => {
                                current.synced = Decimal::from(value);
                                current.accounted = accounted;
                            }
                        }
                    }
                }
                self.windows[w] = Current {
                    carry: Decimal::ZERO,
                    ..current
                };
            }
            panic!("window {w} did not settle");
        }

        /// Stripe's value for the period: the sum of every event, or the value of the
        /// event with the latest timestamp (the latest receipt among equal ones).
        fn stripe_value(&self, counts: Counts) -> i64 {
            match counts {
                Counts::Change => self.stripe.iter().map(|e| e.2).sum(),
                Counts::Value => self
                    .stripe
                    .iter()
                    .max_by_key(|e| (e.0, e.1))
                    .map_or(0, |e| e.2),
            }
        }

        /// A `last` meter's value if Stripe took the event received last instead.
        fn last_received(&self) -> i64 {
            self.stripe.last().map_or(0, |e| e.2)
        }
    }

    /// A window total with up to three decimals, in [0, 60).
    fn total() -> impl proptest::strategy::Strategy<Value = Decimal> {
        (0i64..60_000).prop_map(|milli| Decimal::new(milli, 3))
    }

    use proptest::prelude::*;

    proptest! {
        /// `sum`: random revisions (up and down: late events and corrections) of up to 12
        /// windows, settled in any order and at any time: Stripe's sum is the exact usage
        /// within the rounding rule (half a unit, the carry), and every window is settled.
        #[test]
        fn stripe_sums_the_exact_usage_within_half_a_unit(
            windows in 1usize..12,
            revisions in proptest::collection::vec((0usize..12, total(), any::<bool>()), 1..80),
        ) {
            let sim = Simulation::run(Counts::Change, windows, &revisions);
            let exact: Decimal = sim.windows.iter().map(|c| c.total).sum();
            let stripe = Decimal::from(sim.stripe_value(Counts::Change));
            prop_assert!((stripe - exact).abs() <= Decimal::new(5, 1), "stripe {stripe}, exact {exact}");
            prop_assert_eq!(stripe + sim.carry, exact, "the carry is exactly what is unbilled");
            for c in &sim.windows {
                prop_assert_eq!(c.accounted, c.total);
            }
        }

        /// `last`: each window carries the period to date; random revisions of any window,
        /// settled in any order: Stripe's value is the latest window's value, rounded, whether
        /// Stripe's `last` goes by timestamp or by receipt; every window is accounted for.
        #[test]
        fn stripe_holds_the_latest_windows_value_within_half_a_unit(
            windows in 1usize..12,
            revisions in proptest::collection::vec((0usize..12, total(), any::<bool>()), 1..80),
        ) {
            let sim = Simulation::run(Counts::Value, windows, &revisions);
            let latest = sim.windows[windows - 1].total;
            let stripe = Decimal::from(sim.stripe_value(Counts::Value));
            prop_assert!((stripe - latest).abs() <= Decimal::new(5, 1), "stripe {stripe}, latest {latest}");
            let received = Decimal::from(sim.last_received());
            prop_assert!((received - latest).abs() <= Decimal::new(5, 1), "last received {received}, latest {latest}");
            prop_assert!((sim.windows[windows - 1].synced - latest).abs() <= Decimal::new(5, 1));
            for c in &sim.windows {
                prop_assert_eq!(c.accounted, c.total);
            }
        }
    }
}

//! Billing periods and the Stripe meter formula each aggregation needs: what makes a
//! non-additive meter (MAX, LATEST, COUNT_UNIQUE) bill the right value.
//!
//! Rules kept here:
//! - `COUNT` and `SUM` add up over a billing period: each window's change goes to a Stripe
//!   meter with the `sum` formula. A maximum, a latest value or a distinct count does not add
//!   up: each window carries the value of the **billing period to date** (every event from the
//!   period's start to the window's end) and goes to a Stripe meter with the `last` formula,
//!   which bills the value of the period's last meter event, so Stripe's value for the period
//!   is the period's maximum, latest value or distinct count.
//! - The billing period is the customer's Stripe subscription period when Stripe told us of
//!   it (a [`PeriodCalendar`] built from `customer.subscription.*` webhooks), else the
//!   calendar month in UTC. Past the last period Stripe named, periods repeat with the last
//!   one's length until a webhook names the real next one (renewals are announced as they
//!   happen, so the guess covers minutes). Before the first, calendar months apply, cut at it.
//! - A window belongs to the period its start is in; a window that crosses a period's end
//!   counts only up to it, the rest counts in the next period's first window: for `COUNT`
//!   and `SUM` the window after it bills that rest ([`PeriodCalendar::additive_range`]), for
//!   the others it is in every next-period window's period to date.

use time::{Date, Month, OffsetDateTime, Time};

use crate::{Aggregation, Window};

/// The formulas of a Stripe meter's `default_aggregation.formula`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StripeFormula {
    /// Adds every event's value over the period.
    Sum,
    /// Counts events, ignoring their values.
    Count,
    /// Takes the value of the period's last event.
    Last,
}

impl StripeFormula {
    /// Stripe's name, as `default_aggregation.formula` writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Count => "count",
            Self::Last => "last",
        }
    }

    /// The formula Stripe names `name`; `None` for a name Stripe does not have.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sum" => Some(Self::Sum),
            "count" => Some(Self::Count),
            "last" => Some(Self::Last),
            _ => None,
        }
    }
}

impl std::fmt::Display for StripeFormula {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Aggregation {
    /// The Stripe meter formula that bills this aggregation correctly. Never `count`: one meter
    /// event carries a whole window, so counting events would bill the number of windows.
    pub fn stripe_formula(&self) -> StripeFormula {
        if self.bills_period_to_date() {
            StripeFormula::Last
        } else {
            StripeFormula::Sum
        }
    }

    /// Whether a window's value is the billing period to date (MAX, LATEST, COUNT_UNIQUE)
    /// rather than the window's own (COUNT, SUM, which add up).
    pub fn bills_period_to_date(&self) -> bool {
        matches!(self, Self::Max(_) | Self::Latest(_) | Self::CountUnique(_))
    }
}

/// A billing period, half-open `[start, end)`: a calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BillingPeriod {
    start: OffsetDateTime,
    end: OffsetDateTime,
}

impl BillingPeriod {
    /// The calendar month (UTC) that contains `at`.
    pub fn containing(at: OffsetDateTime) -> Self {
        let at = at.to_offset(time::UtcOffset::UTC);
        let first = |year: i32, month: Month| {
            // Day 1 exists in every month of every representable year but the last.
            Date::from_calendar_date(year, month, 1)
                .unwrap_or(Date::MAX)
                .with_time(Time::MIDNIGHT)
                .assume_utc()
        };
        let (year, month) = (at.year(), at.month());
        let next_year = if month == Month::December {
            year + 1
        } else {
            year
        };
        Self {
            start: first(year, month),
            end: first(next_year, month.next()),
        }
    }

    /// The period a window belongs to: the one its start is in.
    pub fn of_window(window: &Window) -> Self {
        Self::containing(window.start())
    }

    pub fn start(&self) -> OffsetDateTime {
        self.start
    }

    pub fn end(&self) -> OffsetDateTime {
        self.end
    }
}

/// One customer's billing periods: the starts and ends of the subscription periods Stripe
/// named (for the subscription that bills the meter), sorted. Empty: calendar months.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodCalendar {
    boundaries: Vec<OffsetDateTime>,
}

impl PeriodCalendar {
    /// No subscription period known: calendar months in UTC.
    pub fn calendar_months() -> Self {
        Self::default()
    }

    /// From subscription periods `[start, end)`; an empty or reversed one is ignored. Where two
    /// overlap (a billing anchor reset: Stripe names the new period, the old one was stored
    /// with its planned end), the later-starting one wins: a period ends where the next begins.
    pub fn from_periods(
        periods: impl IntoIterator<Item = (OffsetDateTime, OffsetDateTime)>,
    ) -> Self {
        let mut periods: Vec<_> = periods
            .into_iter()
            .filter(|(start, end)| start < end)
            .collect();
        periods.sort_unstable();
        let mut boundaries = Vec::with_capacity(periods.len() * 2);
        for (i, (start, end)) in periods.iter().enumerate() {
            let end = periods
                .get(i + 1)
                .map_or(*end, |(next, _)| (*end).min(*next));
            boundaries.push(*start);
            boundaries.push(end);
        }
        boundaries.sort_unstable();
        boundaries.dedup();
        Self { boundaries }
    }

    /// Whether a subscription period is known (else every period is a calendar month).
    pub fn is_known(&self) -> bool {
        !self.boundaries.is_empty()
    }

    /// The billing period that contains `at`.
    pub fn containing(&self, at: OffsetDateTime) -> BillingPeriod {
        let month = BillingPeriod::containing(at);
        let b = &self.boundaries;
        let known = b.partition_point(|boundary| *boundary <= at);
        if known == 0 {
            // Before the first period Stripe named (or none named): the calendar month, cut
            // where the subscription's first period starts.
            let end = b.first().map_or(month.end, |first| month.end.min(*first));
            return BillingPeriod {
                start: month.start,
                end,
            };
        }
        let start = b[known - 1];
        if let Some(end) = b.get(known) {
            return BillingPeriod { start, end: *end };
        }
        // Past the last boundary: periods of the last period's length. `from_periods` keeps
        // at least two boundaries once it keeps any, and they differ.
        let length = match b.len() {
            n if n >= 2 => b[n - 1] - b[n - 2],
            _ => time::Duration::days(30),
        };
        let skipped = ((at - start).whole_seconds() / length.whole_seconds().max(1)) as i32;
        let start = start + length * skipped;
        BillingPeriod {
            start,
            end: start + length,
        }
    }

    /// The period a window belongs to: the one its start is in.
    pub fn of_window(&self, window: &Window) -> BillingPeriod {
        self.containing(window.start())
    }

    /// The events a window's value covers for a meter that [bills the period to
    /// date](Aggregation::bills_period_to_date): from its period's start to the window's end,
    /// or to the period's end for a window that crosses it. Half-open.
    pub fn period_to_date(&self, window: &Window) -> (OffsetDateTime, OffsetDateTime) {
        let period = self.of_window(window);
        (period.start(), window.end().min(period.end()))
    }

    /// The events a window's value covers for a meter whose windows add up (COUNT, SUM):
    /// its own, cut at its period's end, plus the part of the window before it (`previous`,
    /// the window ending where this one starts) that lies past that window's period's end.
    /// So a window crossing a period boundary bills only up to it, and the next window bills
    /// the rest in the next period: consecutive windows' ranges tile time exactly (each ends
    /// where the next begins), and no usage moves across a boundary. Half-open.
    pub fn additive_range(
        &self,
        window: &Window,
        previous: &Window,
    ) -> (OffsetDateTime, OffsetDateTime) {
        let from = self.containing(previous.start()).end().min(window.start());
        (from, self.additive_end(window))
    }

    /// Where [`additive_range`](Self::additive_range) ends: the window's end, or its period's
    /// end for a window that crosses it (the rest goes to the window after it).
    pub fn additive_end(&self, window: &Window) -> OffsetDateTime {
        self.of_window(window).end().min(window.end())
    }

    /// Until when (exclusive, by window start) later windows include a change of `window` in
    /// their period-to-date value: the end of the period of the window's last instant, so the
    /// next period's windows are included when the window crosses into it.
    pub fn later_windows_affected_until(&self, window: &Window) -> OffsetDateTime {
        self.containing(window.end() - time::Duration::SECOND).end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PropertyName;
    use time::macros::datetime;

    #[test]
    fn a_period_is_the_calendar_month_in_utc() {
        let p = BillingPeriod::containing(datetime!(2026-12-31 23:59:59 UTC));
        assert_eq!(p.start(), datetime!(2026-12-01 00:00 UTC));
        assert_eq!(p.end(), datetime!(2027-01-01 00:00 UTC));
        let p = BillingPeriod::containing(datetime!(2028-02-01 00:00 UTC));
        assert_eq!(
            (p.start(), p.end()),
            (
                datetime!(2028-02-01 00:00 UTC),
                datetime!(2028-03-01 00:00 UTC)
            )
        );
        let p = BillingPeriod::containing(datetime!(2026-12-01 01:00 +02:00));
        assert_eq!(p.start(), datetime!(2026-11-01 00:00 UTC));
    }

    #[test]
    fn a_windows_value_covers_its_period_to_date() {
        let months = PeriodCalendar::calendar_months();
        let period_to_date = |w: &Window| months.period_to_date(w);
        let later_windows_affected_until = |w: &Window| months.later_windows_affected_until(w);
        let w = Window::containing(datetime!(2026-12-02 10:30 UTC), 60).unwrap();
        assert_eq!(
            period_to_date(&w),
            (
                datetime!(2026-12-01 00:00 UTC),
                datetime!(2026-12-02 11:00 UTC)
            )
        );
        assert_eq!(
            later_windows_affected_until(&w),
            datetime!(2027-01-01 00:00 UTC)
        );
        // 7-minute windows cross midnight: the crossing window counts up to the month's end,
        // and its changes reach the next month's windows.
        let crossing = Window::containing(datetime!(2026-11-30 23:59 UTC), 7).unwrap();
        assert!(crossing.end() > datetime!(2026-12-01 00:00 UTC));
        assert_eq!(period_to_date(&crossing).1, datetime!(2026-12-01 00:00 UTC));
        assert_eq!(
            later_windows_affected_until(&crossing),
            datetime!(2027-01-01 00:00 UTC)
        );
    }

    #[test]
    fn subscription_periods_replace_calendar_months_where_stripe_named_them() {
        let calendar = PeriodCalendar::from_periods([
            (
                datetime!(2026-11-14 09:17:33 UTC),
                datetime!(2026-12-14 09:17:33 UTC),
            ),
            // An empty period (a webhook's nonsense) names nothing.
            (
                datetime!(2026-12-20 00:00 UTC),
                datetime!(2026-12-20 00:00 UTC),
            ),
        ]);
        assert!(calendar.is_known());
        let p = calendar.containing(datetime!(2026-12-02 10:00 UTC));
        assert_eq!(p.start(), datetime!(2026-11-14 09:17:33 UTC));
        assert_eq!(p.end(), datetime!(2026-12-14 09:17:33 UTC));
        // Before the subscription: the calendar month, cut where its first period starts.
        let p = calendar.containing(datetime!(2026-11-03 00:00 UTC));
        assert_eq!(p.start(), datetime!(2026-11-01 00:00 UTC));
        assert_eq!(p.end(), datetime!(2026-11-14 09:17:33 UTC));
        // Past the last period named: the same length again, until a webhook names it.
        let p = calendar.containing(datetime!(2027-01-20 00:00 UTC));
        assert_eq!(p.start(), datetime!(2027-01-13 09:17:33 UTC));
        assert_eq!(p.end(), datetime!(2027-02-12 09:17:33 UTC));
        // An hour window across the boundary counts up to it; its change reaches the next
        // period's windows.
        let crossing = Window::containing(datetime!(2026-12-14 09:30 UTC), 60).unwrap();
        assert_eq!(
            calendar.period_to_date(&crossing),
            (
                datetime!(2026-11-14 09:17:33 UTC),
                datetime!(2026-12-14 09:17:33 UTC)
            )
        );
        assert_eq!(
            calendar.later_windows_affected_until(&crossing),
            datetime!(2027-01-13 09:17:33 UTC)
        );
        // An anchor reset: the new period's start ends the old one early.
        let reset = PeriodCalendar::from_periods([
            (
                datetime!(2026-11-14 09:17:33 UTC),
                datetime!(2026-12-14 09:17:33 UTC),
            ),
            (
                datetime!(2026-12-01 12:00 UTC),
                datetime!(2027-01-01 12:00 UTC),
            ),
        ]);
        let p = reset.containing(datetime!(2026-11-30 00:00 UTC));
        assert_eq!(p.end(), datetime!(2026-12-01 12:00 UTC));
        let p = reset.containing(datetime!(2026-12-20 00:00 UTC));
        assert_eq!(p.start(), datetime!(2026-12-01 12:00 UTC));
        assert_eq!(p.end(), datetime!(2027-01-01 12:00 UTC));
        // Nothing known: calendar months.
        assert_eq!(
            PeriodCalendar::calendar_months().containing(datetime!(2026-12-02 10:00 UTC)),
            BillingPeriod::containing(datetime!(2026-12-02 10:00 UTC))
        );
    }

    #[test]
    fn only_additive_aggregations_go_to_sum_meters() {
        let p = PropertyName::parse("seats").unwrap();
        assert_eq!(Aggregation::Count.stripe_formula(), StripeFormula::Sum);
        assert_eq!(
            Aggregation::Sum(p.clone()).stripe_formula(),
            StripeFormula::Sum
        );
        for a in [
            Aggregation::Max(p.clone()),
            Aggregation::Latest(p.clone()),
            Aggregation::CountUnique(p),
        ] {
            assert_eq!(a.stripe_formula(), StripeFormula::Last, "{}", a.kind());
        }
        for f in [
            StripeFormula::Sum,
            StripeFormula::Count,
            StripeFormula::Last,
        ] {
            assert_eq!(StripeFormula::parse(f.as_str()), Some(f));
        }
        assert_eq!(StripeFormula::parse("max"), None);
    }

    #[test]
    fn additive_windows_bill_each_instant_in_exactly_one_window_and_period() {
        // A subscription period starting mid-hour, one shorter than a day, and calendar
        // months before them; windows of 60, 7 and 1440 minutes, and a size change.
        let calendar = PeriodCalendar::from_periods([
            (
                datetime!(2026-11-03 14:30 UTC),
                datetime!(2026-11-05 02:10 UTC),
            ),
            (
                datetime!(2026-11-05 02:10 UTC),
                datetime!(2026-11-05 09:00 UTC),
            ),
        ]);
        for sizes in [[60, 60], [7, 7], [1440, 1440], [60, 15], [15, 60]] {
            let change = datetime!(2026-11-04 00:00 UTC);
            let mut window =
                Window::containing(datetime!(2026-10-31 20:00 UTC), sizes[0]).expect("a window");
            let mut covered = window.start();
            let mut previous =
                Window::containing(window.start() - time::Duration::SECOND, sizes[0])
                    .expect("a window");
            while window.start() < datetime!(2026-12-02 00:00 UTC) {
                let (from, to) = calendar.additive_range(&window, &previous);
                // Tiles: starts where the one before ended, never runs backwards.
                assert_eq!(from, covered, "{window:?} after {previous:?} ({sizes:?})");
                assert!(from <= to && to <= window.end(), "{window:?}");
                // Inside one period: the window's, but for a period shorter than a window.
                let period = calendar.of_window(&window);
                assert!(to <= period.end(), "{window:?}");
                if from < window.start() {
                    assert!(from >= previous.start() && to > window.start() - time::Duration::DAY);
                }
                covered = to;
                let size = if window.end() >= change {
                    sizes[1]
                } else {
                    sizes[0]
                };
                previous = window;
                window = Window::containing(window.end(), size).expect("a window");
            }
        }
        // The window crossing 14:30 bills up to it; the next bills from it.
        let crossing = Window::containing(datetime!(2026-11-03 14:00 UTC), 60).expect("a window");
        let before = Window::containing(datetime!(2026-11-03 13:00 UTC), 60).expect("a window");
        let after = Window::containing(datetime!(2026-11-03 15:00 UTC), 60).expect("a window");
        assert_eq!(
            calendar.additive_range(&crossing, &before),
            (
                datetime!(2026-11-03 14:00 UTC),
                datetime!(2026-11-03 14:30 UTC)
            )
        );
        assert_eq!(
            calendar.additive_range(&after, &crossing),
            (
                datetime!(2026-11-03 14:30 UTC),
                datetime!(2026-11-03 16:00 UTC)
            )
        );
        // Calendar months and hourly windows: nothing moves.
        let months = PeriodCalendar::calendar_months();
        assert_eq!(
            months.additive_range(&after, &crossing),
            (after.start(), after.end())
        );
    }
}

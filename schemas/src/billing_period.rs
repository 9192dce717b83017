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
//! - Until subscription periods are read from Stripe, the billing period is the calendar
//!   month in UTC. A window belongs to the period its start is in; a window that crosses a
//!   month's end (a size that does not divide a day) counts only up to the month's end, the
//!   rest counts in the next month's first window.

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

/// The events a window's value covers for a meter that [bills the period to
/// date](Aggregation::bills_period_to_date): from its period's start to the window's end, or
/// to the period's end for a window that crosses it. Half-open.
pub fn period_to_date(window: &Window) -> (OffsetDateTime, OffsetDateTime) {
    let period = BillingPeriod::of_window(window);
    (period.start(), window.end().min(period.end()))
}

/// Until when (exclusive, by window start) later windows include a change of `window` in their
/// period-to-date value: the end of the period of the window's last instant, so the next
/// month's windows are included when the window crosses into it.
pub fn later_windows_affected_until(window: &Window) -> OffsetDateTime {
    BillingPeriod::containing(window.end() - time::Duration::SECOND).end()
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
}

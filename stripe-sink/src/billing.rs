//! The sink's billing rules as plain functions: the whole-number value Stripe bills for a
//! window total, the difference still to send, its timestamp inside the window, and whether
//! Stripe can still take it. The identifier of each meter event is [`crate::identifier`].

pub use meterline_schemas::stripe_limits::event_timestamp;
use meterline_schemas::stripe_limits::{self, TimestampRefusal, MAX_VALUE};
use meterline_schemas::{Decimal, Window};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::RoundingStrategy;
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsendable {
    #[error("the window is older than Stripe's 35 days")]
    Expired,
    #[error("the window ends in the future")]
    InFuture,
    #[error("value {0} has more than 15 digits")]
    TooLarge(String),
}

/// The whole number Stripe bills for a window total: Stripe takes whole numbers only, so the
/// total is rounded half away from zero (12.5 -> 13).
pub fn billable(total: Decimal) -> Result<i64, Unsendable> {
    total
        .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero)
        .to_i64()
        .filter(|v| v.abs() <= MAX_VALUE)
        .ok_or_else(|| Unsendable::TooLarge(total.to_string()))
}

/// What is left to send: the billable total minus what Stripe accepted. Negative when the
/// window went down (a late correction or a deduplicated copy): sent as a negative meter
/// event, which Stripe documents for corrections. `None` when nothing is owed either way.
pub fn still_to_send(billable_total: i64, synced: i64) -> Option<i64> {
    let delta = billable_total - synced;
    (delta != 0).then_some(delta)
}

/// Whether Stripe would accept a meter event for `window` at `now` ([`stripe_limits`]).
pub fn check_sendable(window: &Window, now: OffsetDateTime) -> Result<(), Unsendable> {
    stripe_limits::check_timestamp(event_timestamp(window), now).map_err(|refusal| match refusal {
        TimestampRefusal::TooOld => Unsendable::Expired,
        TimestampRefusal::InFuture => Unsendable::InFuture,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn billable_rounds_half_away_from_zero() {
        assert_eq!(billable(d("12.5")), Ok(13));
        assert_eq!(billable(d("12.49")), Ok(12));
        assert_eq!(billable(d("-2.5")), Ok(-3));
        assert_eq!(billable(d("0")), Ok(0));
        assert!(billable(d("1000000000000000")).is_err());
        assert_eq!(billable(d("999999999999999")), Ok(999_999_999_999_999));
    }

    #[test]
    fn only_the_difference_is_sent() {
        assert_eq!(still_to_send(10, 0), Some(10));
        assert_eq!(still_to_send(10, 10), None);
        assert_eq!(still_to_send(12, 10), Some(2));
        assert_eq!(still_to_send(7, 10), Some(-3));
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
}

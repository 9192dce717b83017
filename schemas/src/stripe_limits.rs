//! Stripe's own limits on meter events, in one place: the aggregator (expired windows), the
//! sink (what it may still send), ingest (how far ahead an event may be) and retention (how
//! long anything must be kept) all read them from here.
//!
//! Sources: Stripe's API reference for `POST /v1/billing/meter_events` (see
//! `../shared/stripe-facts.md` in the project's workspace). Each limit is Stripe's, not ours:
//! change one only when Stripe does.

use time::OffsetDateTime;

use crate::{BillingPeriod, Window};

/// Stripe takes meter events whose timestamp lies within the past 35 calendar days.
pub const MAX_EVENT_AGE_DAYS: u32 = 35;
/// [`MAX_EVENT_AGE_DAYS`] as a duration.
pub const MAX_EVENT_AGE: time::Duration = time::Duration::days(MAX_EVENT_AGE_DAYS as i64);
/// ... and at most 5 minutes in the future.
pub const MAX_FUTURE: time::Duration = time::Duration::minutes(5);
/// A meter event's value has at most 15 significant digits; as a whole number, at most this.
pub const MAX_VALUE: i64 = 999_999_999_999_999;
/// A meter event's `identifier` has at most 100 characters.
pub const MAX_IDENTIFIER_CHARS: usize = 100;
/// A meter's `event_name` has at most 100 characters.
pub const MAX_EVENT_NAME_CHARS: usize = 100;

/// Why Stripe would refuse a meter event's timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampRefusal {
    #[error("the timestamp is older than Stripe's 35 days")]
    TooOld,
    #[error("the timestamp is more than 5 minutes in the future")]
    InFuture,
}

/// The timestamp (Unix seconds) of a window's meter events: its last second, inside
/// `[start, end)`, so Stripe files the usage in the window's own billing period; for a window
/// that crosses a calendar month's end, the month's last second
/// ([`billing_period`](crate::billing_period): the window counts in the month it starts in).
pub fn event_timestamp(window: &Window) -> i64 {
    event_timestamp_in(window, BillingPeriod::of_window(window).end())
}

/// [`event_timestamp`] for a window billed in a period ending at `period_end` (the
/// customer's subscription period): the window's last second before both ends, never
/// before the window's start.
pub fn event_timestamp_in(window: &Window, period_end: OffsetDateTime) -> i64 {
    (window.end().min(period_end).unix_timestamp() - 1).max(window.start().unix_timestamp())
}

/// The timestamp (Unix seconds) of a window's meter events when the latest event it counts is
/// known: that event's second, so usage is never moved later than the last event it counts
/// (and with it across a billing period boundary that falls inside the window after it), kept
/// inside the window and the window's period ending at `period_end` (no earlier than its
/// start, no later than [`event_timestamp_in`]). Without it, [`event_timestamp_in`].
pub fn event_timestamp_at(
    window: &Window,
    last_event: Option<OffsetDateTime>,
    period_end: OffsetDateTime,
) -> i64 {
    let latest = event_timestamp_in(window, period_end);
    last_event.map_or(latest, |at| {
        at.unix_timestamp()
            .clamp(window.start().unix_timestamp(), latest)
    })
}

/// Whether Stripe would take a meter event stamped `at` (Unix seconds, as sent) at `now`.
/// Compared in whole seconds, as Stripe sees them.
pub fn check_timestamp(at: i64, now: OffsetDateTime) -> Result<(), TimestampRefusal> {
    if at < (now - MAX_EVENT_AGE).unix_timestamp() {
        Err(TimestampRefusal::TooOld)
    } else if at > (now + MAX_FUTURE).unix_timestamp() {
        Err(TimestampRefusal::InFuture)
    } else {
        Ok(())
    }
}

/// A window is expired when Stripe would refuse its meter events as too old: not one second
/// of it is within the past 35 days any more. Its usage is stored and flagged, never sent.
pub fn window_expired(window: &Window, now: OffsetDateTime) -> bool {
    check_timestamp(event_timestamp(window), now) == Err(TimestampRefusal::TooOld)
}

/// Whether an event at `timestamp` is older than Stripe takes.
pub fn event_expired(timestamp: OffsetDateTime, now: OffsetDateTime) -> bool {
    timestamp < now - MAX_EVENT_AGE
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-27 12:00:00 UTC);

    #[test]
    fn a_timestamp_is_taken_from_35_days_back_to_5_minutes_ahead_inclusive() {
        let back = (NOW - MAX_EVENT_AGE).unix_timestamp();
        let ahead = (NOW + MAX_FUTURE).unix_timestamp();
        assert_eq!(check_timestamp(back, NOW), Ok(()));
        assert_eq!(
            check_timestamp(back - 1, NOW),
            Err(TimestampRefusal::TooOld)
        );
        assert_eq!(check_timestamp(ahead, NOW), Ok(()));
        assert_eq!(
            check_timestamp(ahead + 1, NOW),
            Err(TimestampRefusal::InFuture)
        );
    }

    #[test]
    fn a_window_expires_once_its_last_second_is_older_than_35_days() {
        let last_taken = Window::containing(NOW - MAX_EVENT_AGE, 60).unwrap();
        assert!(!window_expired(&last_taken, NOW));
        let earlier = Window::containing(last_taken.start() - time::Duration::SECOND, 60).unwrap();
        assert!(window_expired(&earlier, NOW));
    }

    #[test]
    fn the_limits_are_stripes() {
        assert_eq!(MAX_VALUE.to_string().len(), 15);
        assert_eq!(MAX_EVENT_AGE, time::Duration::days(35));
        assert_eq!(MAX_FUTURE, time::Duration::seconds(300));
    }

    #[test]
    fn a_window_is_stamped_at_its_last_event_never_outside_it() {
        let window = Window::new(
            datetime!(2026-11-27 10:00 UTC),
            datetime!(2026-11-27 11:00 UTC),
        )
        .unwrap();
        let end = datetime!(2026-11-27 10:59:59 UTC).unix_timestamp();
        let month_end = BillingPeriod::of_window(&window).end();
        assert_eq!(event_timestamp_at(&window, None, month_end), end);
        assert_eq!(
            event_timestamp_at(
                &window,
                Some(datetime!(2026-11-27 10:20:41.750 UTC)),
                month_end
            ),
            datetime!(2026-11-27 10:20:41 UTC).unix_timestamp(),
            "the second of the last event, not later"
        );
        assert_eq!(
            event_timestamp_at(&window, Some(datetime!(2026-11-27 09:59:59 UTC)), month_end),
            datetime!(2026-11-27 10:00 UTC).unix_timestamp(),
            "never before the window"
        );
        assert_eq!(
            event_timestamp_at(&window, Some(datetime!(2026-11-27 11:30 UTC)), month_end),
            end,
            "never after it"
        );
        // A window crossing a month's end: never past the month's last second.
        let crossing = Window::containing(datetime!(2026-11-30 23:59 UTC), 7).unwrap();
        assert_eq!(crossing.end(), datetime!(2026-12-01 00:03 UTC));
        assert_eq!(
            event_timestamp_at(
                &crossing,
                Some(datetime!(2026-12-01 00:02 UTC)),
                BillingPeriod::of_window(&crossing).end()
            ),
            datetime!(2026-11-30 23:59:59 UTC).unix_timestamp()
        );
        // A subscription period ending inside the window: never past its last second.
        let anchor = datetime!(2026-11-27 10:17:33 UTC);
        assert_eq!(
            event_timestamp_at(&window, Some(datetime!(2026-11-27 10:40 UTC)), anchor),
            datetime!(2026-11-27 10:17:32 UTC).unix_timestamp()
        );
        assert_eq!(
            event_timestamp_in(&window, anchor),
            datetime!(2026-11-27 10:17:32 UTC).unix_timestamp()
        );
    }
}

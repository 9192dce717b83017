//! When a window becomes due: at its end plus the grace period
//! (`STRIPE_SYNC_GRACE_PERIOD_MINUTES`), so that events still in flight at the end of the
//! window are in its first total.
//!
//! One rule for every place that asks: the marking stores [`due_at`] in each window's row
//! (`aggregation_windows.due_at`), the claims select the rows whose stored `due_at` has passed
//! (`crate::windows`), and the publish-lag metric measures from [`due_at`]. Changing the grace
//! period affects windows marked afterwards; windows already marked keep the due time they
//! were given.

use std::time::Duration;

use meterline_schemas::Window;
use time::OffsetDateTime;

/// When `window` is first published: its end plus the grace period.
pub fn due_at(window: &Window, grace: Duration) -> OffsetDateTime {
    window.end() + grace
}

/// How long after it was due a window's first total went out (negative if early, which the
/// claims never do).
pub fn publication_lag(window: &Window, grace: Duration, now: OffsetDateTime) -> time::Duration {
    now - due_at(window, grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_window_is_due_at_its_end_plus_the_grace_period() {
        let window = Window::containing(datetime!(2026-11-27 10:30 UTC), 60).unwrap();
        let grace = Duration::from_secs(300);
        assert_eq!(due_at(&window, grace), datetime!(2026-11-27 11:05 UTC));
        assert_eq!(
            publication_lag(&window, grace, datetime!(2026-11-27 11:05:03 UTC)),
            time::Duration::seconds(3)
        );
    }
}

//! Time intervals: the aggregation [`Window`] and the resync [`TimeRange`].
//!
//! Rule kept here: a window is half-open `[start, end)` in UTC, both bounds whole minutes,
//! `start < end`, and aligned: `start` is a multiple of the window size counted from the Unix
//! epoch. That makes windows tumbling and identical on every machine, so an event at exactly
//! `end` belongs to the next window and a window is named by its bounds alone.

use time::{Duration, OffsetDateTime};

use crate::error::SchemaError;
use crate::timestamp::Timestamp;

/// A tumbling, UTC-aligned aggregation window `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    start: Timestamp,
    end: Timestamp,
    // Derived from start and end; stored so `size_minutes` needs no fallible conversion.
    size_minutes: u32,
}

fn invalid(reason: impl Into<String>) -> SchemaError {
    SchemaError::invalid("window", reason)
}

impl Window {
    /// The window of `size_minutes` that contains `ts`: the one whose start is `ts` rounded down
    /// to a multiple of the size since the Unix epoch. Fails for a zero size, or when the window
    /// would reach past year 9999.
    pub fn containing(ts: OffsetDateTime, size_minutes: u32) -> Result<Self, SchemaError> {
        if size_minutes == 0 {
            return Err(invalid("size must be at least one minute"));
        }
        let size = i64::from(size_minutes);
        // Euclidean division floors towards minus infinity, so instants before 1970 align too.
        let minute = ts.unix_timestamp().div_euclid(60);
        let start_minute = minute - minute.rem_euclid(size);
        let start = unix_minute(start_minute)?;
        let end = unix_minute(start_minute + size)?;
        Self::new(start, end)
    }

    /// Validates a window given by its bounds: whole minutes, `start < end`, aligned to its size.
    pub fn new(start: OffsetDateTime, end: OffsetDateTime) -> Result<Self, SchemaError> {
        Self::from_bounds(Timestamp::new(start)?, Timestamp::new(end)?)
    }

    /// Like [`Window::new`], from wire timestamps.
    pub fn from_bounds(start: Timestamp, end: Timestamp) -> Result<Self, SchemaError> {
        let (s, e) = (start.as_offset_date_time(), end.as_offset_date_time());
        if s >= e {
            return Err(invalid("start must be before end"));
        }
        if s.second() != 0 || s.nanosecond() != 0 || e.second() != 0 || e.nanosecond() != 0 {
            return Err(invalid("start and end must be whole minutes"));
        }
        let size = (e - s).whole_minutes();
        let size_minutes =
            u32::try_from(size).map_err(|_| invalid("size must be at most 4294967295 minutes"))?;
        if (s.unix_timestamp() / 60).rem_euclid(size) != 0 {
            return Err(invalid(
                "start must be aligned to the window size (a multiple of it since 1970-01-01T00:00:00Z)",
            ));
        }
        Ok(Self {
            start,
            end,
            size_minutes,
        })
    }

    /// Inclusive start.
    pub fn start(&self) -> OffsetDateTime {
        self.start.as_offset_date_time()
    }

    /// Exclusive end.
    pub fn end(&self) -> OffsetDateTime {
        self.end.as_offset_date_time()
    }

    /// Inclusive start as a wire timestamp.
    pub fn start_timestamp(&self) -> Timestamp {
        self.start
    }

    /// Exclusive end as a wire timestamp.
    pub fn end_timestamp(&self) -> Timestamp {
        self.end
    }

    /// Whether `ts` falls in `[start, end)`.
    pub fn contains(&self, ts: OffsetDateTime) -> bool {
        self.start() <= ts && ts < self.end()
    }

    /// The window's length in minutes.
    pub fn size_minutes(&self) -> u32 {
        self.size_minutes
    }
}

fn unix_minute(minute: i64) -> Result<OffsetDateTime, SchemaError> {
    minute
        .checked_mul(60)
        .and_then(|seconds| OffsetDateTime::from_unix_timestamp(seconds).ok())
        .ok_or_else(|| invalid("bounds out of range"))
}

/// A half-open time range `[from, to)` with `from < to`, as a resync request names it.
/// Unlike a [`Window`] it need not be aligned or on whole minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeRange {
    from: Timestamp,
    to: Timestamp,
}

impl TimeRange {
    /// Validates `from < to`.
    pub fn new(from: Timestamp, to: Timestamp) -> Result<Self, SchemaError> {
        if from >= to {
            return Err(SchemaError::invalid(
                "time range",
                "time_from must be before time_to",
            ));
        }
        Ok(Self { from, to })
    }

    /// Inclusive start.
    pub fn from(&self) -> Timestamp {
        self.from
    }

    /// Exclusive end.
    pub fn to(&self) -> Timestamp {
        self.to
    }

    /// Whether `ts` falls in `[from, to)`.
    pub fn contains(&self, ts: OffsetDateTime) -> bool {
        self.from.as_offset_date_time() <= ts && ts < self.to.as_offset_date_time()
    }

    /// The range's length.
    pub fn duration(&self) -> Duration {
        self.to.as_offset_date_time() - self.from.as_offset_date_time()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn containing_table() {
        // (instant, size in minutes, expected start, expected end)
        let cases = [
            (
                datetime!(2024-05-01 12:34:56 UTC),
                60,
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 13:00 UTC),
            ),
            (
                datetime!(2024-05-01 12:00:00 UTC),
                60,
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 13:00 UTC),
            ),
            (
                datetime!(2024-05-01 12:59:59.999999999 UTC),
                60,
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 13:00 UTC),
            ),
            (
                datetime!(2024-05-01 12:34:56 UTC),
                1,
                datetime!(2024-05-01 12:34 UTC),
                datetime!(2024-05-01 12:35 UTC),
            ),
            (
                datetime!(2024-05-01 12:34:56 UTC),
                15,
                datetime!(2024-05-01 12:30 UTC),
                datetime!(2024-05-01 12:45 UTC),
            ),
            (
                datetime!(2024-05-01 23:59:59 UTC),
                1440,
                datetime!(2024-05-01 00:00 UTC),
                datetime!(2024-05-02 00:00 UTC),
            ),
            // An offset input lands in the UTC window.
            (
                datetime!(2024-05-01 14:34:56 +02:00),
                60,
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 13:00 UTC),
            ),
            // 7 does not divide a day: windows follow the epoch, not midnight.
            (
                datetime!(1970-01-01 00:13:00 UTC),
                7,
                datetime!(1970-01-01 00:07 UTC),
                datetime!(1970-01-01 00:14 UTC),
            ),
            (
                datetime!(2024-05-01 00:00:00 UTC),
                7,
                datetime!(2024-04-30 23:58 UTC),
                datetime!(2024-05-01 00:05 UTC),
            ),
            // Before the epoch the floor still rounds down, not towards zero.
            (
                datetime!(1969-12-31 23:59:30 UTC),
                60,
                datetime!(1969-12-31 23:00 UTC),
                datetime!(1970-01-01 00:00 UTC),
            ),
        ];
        for (ts, size, start, end) in cases {
            let window = Window::containing(ts, size).expect("valid window");
            assert_eq!(
                (window.start(), window.end()),
                (start, end),
                "{ts} size {size}"
            );
            assert_eq!(window.size_minutes(), size);
            assert!(window.contains(ts));
        }
    }

    #[test]
    fn an_event_at_end_belongs_to_the_next_window() {
        let window = Window::containing(datetime!(2024-05-01 12:10 UTC), 60).expect("valid");
        let at_end = datetime!(2024-05-01 13:00 UTC);
        assert!(!window.contains(at_end));
        assert!(window.contains(datetime!(2024-05-01 12:59:59.999999999 UTC)));
        assert!(window.contains(window.start()));
        let next = Window::containing(at_end, 60).expect("valid");
        assert_eq!(next.start(), window.end());
        assert!(next.contains(at_end));
        assert!(!window.contains(datetime!(2024-05-01 11:59:59.999999999 UTC)));
    }

    #[test]
    fn new_table() {
        let ok = [
            (
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 13:00 UTC),
                60,
            ),
            (
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 12:01 UTC),
                1,
            ),
            (
                datetime!(2024-04-30 23:58 UTC),
                datetime!(2024-05-01 00:05 UTC),
                7,
            ),
            (
                datetime!(2024-05-01 14:00 +02:00),
                datetime!(2024-05-01 15:00 +02:00),
                60,
            ),
        ];
        for (start, end, size) in ok {
            let window = Window::new(start, end).expect("valid");
            assert_eq!(window.size_minutes(), size);
            assert_eq!(Window::containing(start, size).expect("valid"), window);
        }
        let bad = [
            (
                datetime!(2024-05-01 13:00 UTC),
                datetime!(2024-05-01 12:00 UTC),
                "start must be before end",
            ),
            (
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 12:00 UTC),
                "start must be before end",
            ),
            (
                datetime!(2024-05-01 12:00:30 UTC),
                datetime!(2024-05-01 13:00:30 UTC),
                "whole minutes",
            ),
            (
                datetime!(2024-05-01 12:00 UTC),
                datetime!(2024-05-01 12:59:59.5 UTC),
                "whole minutes",
            ),
            (
                datetime!(2024-05-01 12:30 UTC),
                datetime!(2024-05-01 13:30 UTC),
                "aligned",
            ),
            (
                datetime!(2024-05-01 00:00 UTC),
                datetime!(2024-05-01 00:07 UTC),
                "aligned",
            ),
        ];
        for (start, end, reason) in bad {
            let err = Window::new(start, end).expect_err(reason).to_string();
            assert!(err.starts_with("invalid window: "), "{err}");
            assert!(err.contains(reason), "{start}..{end}: {err}");
        }
    }

    #[test]
    fn containing_refuses_zero_size_and_out_of_range() {
        assert!(Window::containing(datetime!(2024-05-01 12:00 UTC), 0).is_err());
        assert!(Window::containing(datetime!(9999-12-31 23:30 UTC), 60).is_err());
        assert!(Window::containing(datetime!(2024-05-01 12:00 UTC), u32::MAX).is_err());
    }

    #[test]
    fn time_range_needs_from_before_to() {
        let a = Timestamp::parse("2024-05-01T00:00:00Z").expect("valid");
        let b = Timestamp::parse("2024-05-01T00:00:00.5Z").expect("valid");
        let range = TimeRange::new(a, b).expect("valid");
        assert!(range.contains(a.as_offset_date_time()));
        assert!(!range.contains(b.as_offset_date_time()));
        assert_eq!(range.duration(), Duration::milliseconds(500));
        assert!(TimeRange::new(a, a).is_err());
        assert_eq!(
            TimeRange::new(b, a).expect_err("reversed").to_string(),
            "invalid time range: time_from must be before time_to"
        );
    }
}

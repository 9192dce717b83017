//! Stripe's meter-event rules as pure functions of their inputs and "now", so each one is
//! unit-tested here and the handlers only wire them to state. All "now" values come from the
//! stand-in's movable clock (see `state::Clock`), never from the system clock directly.

use serde::{Deserialize, Serialize};

/// Identifiers are unique per account for (at least) 24 h; after that a resent identifier is
/// counted again, which is exactly what a sink must guard against.
pub const IDENTIFIER_WINDOW_SECS: i64 = 24 * 3600;
/// A meter event may be cancelled only within 24 h of Stripe receiving it.
pub const CANCEL_WINDOW_SECS: i64 = 24 * 3600;
/// Event timestamps: at most 35 calendar days in the past ...
pub const MAX_PAST_SECS: i64 = 35 * 24 * 3600;
/// ... and at most 5 minutes in the future.
pub const MAX_FUTURE_SECS: i64 = 5 * 60;
/// A v2 meter event session token lives 15 minutes.
pub const SESSION_TTL_SECS: i64 = 15 * 60;
/// The v2 stream takes up to 100 events per request.
pub const MAX_STREAM_EVENTS: usize = 100;
/// Live mode: v1 meter events per second per account, outside the basic limit.
pub const LIVE_METER_EVENTS_PER_SEC: u32 = 1000;
/// Values with more significant digits than this are refused.
pub const MAX_VALUE_DIGITS: usize = 15;

/// True while an identifier first received at `received_at` still blocks a resend.
pub fn identifier_blocks(received_at: i64, now: i64) -> bool {
    now - received_at < IDENTIFIER_WINDOW_SECS
}

/// True while an event received at `received_at` may still be cancelled.
pub fn cancel_allowed(received_at: i64, now: i64) -> bool {
    now - received_at < CANCEL_WINDOW_SECS
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampError {
    TooFarInPast,
    InFuture,
}

impl TimestampError {
    /// The code Stripe uses for this problem in its error reports.
    pub fn code(self) -> &'static str {
        match self {
            TimestampError::TooFarInPast => "timestamp_too_far_in_past",
            TimestampError::InFuture => "timestamp_in_future",
        }
    }
}

/// Both bounds are inclusive: exactly 35 days ago and exactly 5 minutes ahead are accepted.
pub fn check_timestamp(timestamp: i64, now: i64) -> Result<(), TimestampError> {
    if timestamp < now - MAX_PAST_SECS {
        Err(TimestampError::TooFarInPast)
    } else if timestamp > now + MAX_FUTURE_SECS {
        Err(TimestampError::InFuture)
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueError {
    /// Not a whole number written as an integer string (`1.5`, `1e3`, `abc`, `+1`, empty).
    NotInteger,
    /// More than 15 significant digits.
    TooManyDigits,
}

impl ValueError {
    pub fn code(self) -> &'static str {
        match self {
            ValueError::NotInteger => "meter_event_invalid_value",
            ValueError::TooManyDigits => "meter_event_value_too_many_digits",
        }
    }
}

/// Parses a meter event value: an optional `-` then ASCII digits. Negative values are allowed
/// (they correct earlier usage). Leading zeros are not significant.
pub fn parse_value(raw: &str) -> Result<i64, ValueError> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::NotInteger);
    }
    let significant = digits.trim_start_matches('0').len();
    if significant > MAX_VALUE_DIGITS {
        return Err(ValueError::TooManyDigits);
    }
    // At most 15 digits always fits an i64.
    raw.parse::<i64>().map_err(|_| ValueError::NotInteger)
}

/// A meter's `default_aggregation.formula`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Formula {
    Sum,
    Count,
    Last,
}

impl Formula {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "sum" => Some(Formula::Sum),
            "count" => Some(Formula::Count),
            "last" => Some(Formula::Last),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Formula::Sum => "sum",
            Formula::Count => "count",
            Formula::Last => "last",
        }
    }
}

/// One counted event as the aggregation sees it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub timestamp: i64,
    /// Order of receipt, to break timestamp ties for `last`.
    pub seq: u64,
    pub value: i64,
}

/// Aggregates samples with the meter's formula; an empty set aggregates to 0.
pub fn aggregate(formula: Formula, samples: &[Sample]) -> i64 {
    match formula {
        Formula::Sum => samples.iter().map(|s| s.value).sum(),
        Formula::Count => samples.len() as i64,
        Formula::Last => samples
            .iter()
            .max_by_key(|s| (s.timestamp, s.seq))
            .map_or(0, |s| s.value),
    }
}

/// `value_grouping_window` of event summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    Hour,
    Day,
}

impl Grouping {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "hour" => Some(Grouping::Hour),
            "day" => Some(Grouping::Day),
            _ => None,
        }
    }

    fn secs(self) -> i64 {
        match self {
            Grouping::Hour => 3600,
            Grouping::Day => 86400,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// `start_time` or `end_time` not on a minute boundary (Stripe requires minute alignment).
    NotMinuteAligned(&'static str),
    /// `end_time` not after `start_time`.
    EmptyRange,
}

/// The half-open `[start, end)` periods a summary request covers: one period without grouping,
/// else one per hour or UTC day, cut at the boundaries and clipped to the requested range.
pub fn summary_windows(
    start: i64,
    end: i64,
    grouping: Option<Grouping>,
) -> Result<Vec<(i64, i64)>, WindowError> {
    if start.rem_euclid(60) != 0 {
        return Err(WindowError::NotMinuteAligned("start_time"));
    }
    if end.rem_euclid(60) != 0 {
        return Err(WindowError::NotMinuteAligned("end_time"));
    }
    if end <= start {
        return Err(WindowError::EmptyRange);
    }
    let Some(grouping) = grouping else {
        return Ok(vec![(start, end)]);
    };
    let step = grouping.secs();
    let mut windows = Vec::new();
    let mut from = start;
    while from < end {
        let next_boundary = (from.div_euclid(step) + 1) * step;
        let to = next_boundary.min(end);
        windows.push((from, to));
        from = to;
    }
    Ok(windows)
}

/// A fixed one-second window counter: the account-wide limiter. Stripe's limiter is a token
/// bucket we cannot see; a per-second count is the observable contract ("N per second").
#[derive(Debug, Default, Clone)]
pub struct SecondWindow {
    second: i64,
    count: u32,
}

impl SecondWindow {
    /// Counts a request at `now_ms`; false when it exceeds `limit` for the current second.
    pub fn admit(&mut self, now_ms: i64, limit: u32) -> bool {
        let second = now_ms.div_euclid(1000);
        if second != self.second {
            self.second = second;
            self.count = 0;
        }
        if self.count >= limit {
            return false;
        }
        self.count += 1;
        true
    }
}

/// The most of `times_ms` (in the order they happened) that fall within any one-second span
/// `[t, t + 1000)`: Stripe's "N per second" held over every second, not only the calendar's.
pub fn busiest_second(times_ms: &[i64]) -> usize {
    let mut sorted = times_ms.to_vec();
    sorted.sort_unstable();
    let mut first = 0;
    let mut busiest = 0;
    for (last, at) in sorted.iter().enumerate() {
        while sorted[first] + 1000 <= *at {
            first += 1;
        }
        busiest = busiest.max(last + 1 - first);
    }
    busiest
}

/// Unix seconds as RFC 3339 (the v2 API's timestamp format).
pub fn rfc3339(unix: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// RFC 3339 to Unix seconds (sub-second parts dropped); None when not a valid timestamp.
pub fn parse_rfc3339(raw: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(raw, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifier_window_is_24_hours() {
        assert!(identifier_blocks(1000, 1000));
        assert!(identifier_blocks(1000, 1000 + IDENTIFIER_WINDOW_SECS - 1));
        assert!(!identifier_blocks(1000, 1000 + IDENTIFIER_WINDOW_SECS));
    }

    #[test]
    fn cancel_window_is_24_hours() {
        assert!(cancel_allowed(0, CANCEL_WINDOW_SECS - 1));
        assert!(!cancel_allowed(0, CANCEL_WINDOW_SECS));
    }

    #[test]
    fn timestamp_bounds_both_ends() {
        let now = 10_000_000;
        assert_eq!(check_timestamp(now, now), Ok(()));
        assert_eq!(check_timestamp(now - MAX_PAST_SECS, now), Ok(()));
        assert_eq!(
            check_timestamp(now - MAX_PAST_SECS - 1, now),
            Err(TimestampError::TooFarInPast)
        );
        assert_eq!(check_timestamp(now + 300, now), Ok(()));
        assert_eq!(
            check_timestamp(now + 301, now),
            Err(TimestampError::InFuture)
        );
    }

    #[test]
    fn values_are_whole_integer_strings() {
        assert_eq!(parse_value("25"), Ok(25));
        assert_eq!(parse_value("-7"), Ok(-7));
        assert_eq!(parse_value("0"), Ok(0));
        assert_eq!(parse_value("000000000000000000001"), Ok(1));
        assert_eq!(parse_value("999999999999999"), Ok(999_999_999_999_999));
        assert_eq!(parse_value("-999999999999999"), Ok(-999_999_999_999_999));
        for bad in [
            "", "-", "1.5", "1.0", "1e3", "+1", " 1", "abc", "0x10", "--1",
        ] {
            assert_eq!(parse_value(bad), Err(ValueError::NotInteger), "{bad:?}");
        }
        assert_eq!(
            parse_value("1000000000000000"),
            Err(ValueError::TooManyDigits)
        );
        assert_eq!(
            parse_value("-1000000000000000"),
            Err(ValueError::TooManyDigits)
        );
    }

    #[test]
    fn formulas_aggregate() {
        let s = |timestamp, seq, value| Sample {
            timestamp,
            seq,
            value,
        };
        let samples = [s(10, 1, 5), s(30, 2, -2), s(20, 3, 9), s(30, 4, 4)];
        assert_eq!(aggregate(Formula::Sum, &samples), 16);
        assert_eq!(aggregate(Formula::Count, &samples), 4);
        // Latest timestamp wins; the tie at 30 goes to the later receipt.
        assert_eq!(aggregate(Formula::Last, &samples), 4);
        assert_eq!(aggregate(Formula::Last, &[]), 0);
        assert_eq!(aggregate(Formula::Sum, &[]), 0);
    }

    #[test]
    fn summary_windows_split_on_boundaries() {
        assert_eq!(summary_windows(0, 7200, None), Ok(vec![(0, 7200)]));
        assert_eq!(
            summary_windows(1800, 9000, Some(Grouping::Hour)),
            Ok(vec![(1800, 3600), (3600, 7200), (7200, 9000)])
        );
        assert_eq!(
            summary_windows(0, 2 * 86400, Some(Grouping::Day)),
            Ok(vec![(0, 86400), (86400, 2 * 86400)])
        );
        assert_eq!(
            summary_windows(30, 120, None),
            Err(WindowError::NotMinuteAligned("start_time"))
        );
        assert_eq!(
            summary_windows(120, 120, None),
            Err(WindowError::EmptyRange)
        );
    }

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2024-06-01T12:15:00.000Z"),
            Some(1_717_244_100)
        );
        assert_eq!(parse_rfc3339(&rfc3339(1_717_244_100)), Some(1_717_244_100));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn the_busiest_second_is_any_span_not_a_calendar_second() {
        assert_eq!(busiest_second(&[]), 0);
        // Two in the end of one calendar second and two in the start of the next: four
        // within 200 ms, though no calendar second holds more than two.
        assert_eq!(busiest_second(&[5_900, 5_950, 6_050, 6_100]), 4);
        assert_eq!(
            busiest_second(&[1_000, 2_000, 3_000]),
            1,
            "a span is half-open"
        );
        assert_eq!(busiest_second(&[3_000, 1_000, 1_999]), 2, "unordered input");
    }

    #[test]
    fn second_window_limits_per_second() {
        let mut w = SecondWindow::default();
        assert!(w.admit(5_000, 2));
        assert!(w.admit(5_500, 2));
        assert!(!w.admit(5_999, 2));
        assert!(w.admit(6_000, 2));
    }
}

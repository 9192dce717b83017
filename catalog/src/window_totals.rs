//! Window totals of one customer and meter, read from ClickHouse's `events_processed` exactly
//! as the sync computes them: the same deduplicated rows (`FINAL`), the same aggregates
//! ([`AGGREGATES_SQL`]), the same half-open, UTC-aligned windows of the tenant's sizes.
//!
//! Rule kept here: a total shown to a user and the total sent to Stripe come from one
//! definition. [`AGGREGATES_SQL`] and [`WindowAggregates::quantity`] are that definition;
//! anything that totals usage uses them rather than writing its own `sum()`.
//!
//! Quantities are `Decimal(38, 9)` in ClickHouse, read as integers scaled by 10^9.

use meterline_schemas::{Aggregation, CustomerId, Decimal, MeterId, TimeRange, Window};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::window_sizes::SizeHistory;
use meterline_common::auth::TenantScope;
use meterline_common::clickhouse::unix_millis;
use meterline_common::Error;

/// Decimal places of `qty_billable`.
pub const SCALE: u32 = 9;

/// The aggregates of a group of `events_processed` rows (read `FINAL`), named as
/// [`WindowAggregates`] reads them. LATEST breaks ties between equal timestamps by event id,
/// so the result does not depend on which part a row sits in.
pub const AGGREGATES_SQL: &str = "count() AS events,
        sum(qty_billable * sign) AS total,
        max(qty_billable) AS maximum,
        argMax(qty_billable, (timestamp, event_id)) AS latest,
        uniqExact(unique_key) AS unique";

/// A quantity as the scaled integer of `Decimal(38, 9)`; more than 9 decimals are rounded
/// (half to even), which no meter produces.
pub fn to_scaled(quantity: Decimal) -> Option<i128> {
    let rounded = quantity.round_dp(SCALE);
    let factor = 10i128.checked_pow(SCALE - rounded.scale())?;
    rounded.mantissa().checked_mul(factor)
}

/// The decimal of a scaled `Decimal(38, 9)` integer.
pub fn from_scaled(value: i128) -> Result<Decimal, Error> {
    Decimal::try_from_i128_with_scale(value, SCALE)
        .map(|d| d.normalize())
        .map_err(|e| Error::Corrupt(format!("{value}e-9 does not fit a decimal: {e}")))
}

/// A window's aggregates over its deduplicated events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowAggregates {
    pub events: u64,
    pub sum: Decimal,
    pub max: Decimal,
    pub latest: Decimal,
    pub unique: u64,
}

impl WindowAggregates {
    /// The aggregates as [`AGGREGATES_SQL`] reads them: counts, and quantities as scaled
    /// `Decimal(38, 9)` integers.
    pub fn from_scaled(
        events: u64,
        total: i128,
        maximum: i128,
        latest: i128,
        unique: u64,
    ) -> Result<Self, Error> {
        Ok(Self {
            events,
            sum: from_scaled(total)?,
            max: from_scaled(maximum)?,
            latest: from_scaled(latest)?,
            unique,
        })
    }

    /// The total the meter bills for the window.
    pub fn quantity(&self, aggregation: &Aggregation) -> Decimal {
        match aggregation {
            Aggregation::Count => Decimal::from(self.events),
            Aggregation::Sum(_) => self.sum,
            Aggregation::Max(_) => self.max,
            Aggregation::Latest(_) => self.latest,
            Aggregation::CountUnique(_) => Decimal::from(self.unique),
        }
        .normalize()
    }
}

/// Why windows could not be laid over a range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the range covers more than {max} windows")]
    TooManyWindows { max: usize },
    #[error("the range reaches past the last representable window")]
    OutOfBounds,
}

/// The consecutive windows that overlap a range: the first contains its start, the last
/// contains the instant before its end. Sizes may change between windows (a tenant's size
/// history), never inside one, and consecutive windows touch end to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPlan {
    windows: Vec<Window>,
}

impl WindowPlan {
    /// Windows of `size_of(ts)` minutes for each window start `ts`, over `range`; at most
    /// `max` of them.
    fn build(
        range: &TimeRange,
        max: usize,
        size_of: impl Fn(OffsetDateTime) -> u32,
    ) -> Result<Self, PlanError> {
        let to = range.to().as_offset_date_time();
        let mut at = range.from().as_offset_date_time();
        let mut windows = Vec::new();
        while at < to {
            if windows.len() == max {
                return Err(PlanError::TooManyWindows { max });
            }
            let window = Window::containing(at, size_of(at)).map_err(|_| PlanError::OutOfBounds)?;
            at = window.end();
            windows.push(window);
        }
        Ok(Self { windows })
    }

    /// Windows of one size (minutes, at least 1).
    pub fn fixed(range: &TimeRange, size_minutes: u32, max: usize) -> Result<Self, PlanError> {
        Self::build(range, max, |_| size_minutes)
    }

    /// The windows the aggregator uses: the size in force at each window's start. Sizes
    /// change only on boundaries of both sizes (see [`crate::window_sizes`]), so the window
    /// after one of the old size starts exactly where the new size begins.
    pub fn of_history(
        range: &TimeRange,
        history: &SizeHistory,
        max: usize,
    ) -> Result<Self, PlanError> {
        Self::build(range, max, |ts| history.size_at(ts))
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Runs of consecutive windows of one size: `(from, to, size_minutes)`.
    fn segments(&self) -> Vec<(OffsetDateTime, OffsetDateTime, u32)> {
        let mut segments: Vec<(OffsetDateTime, OffsetDateTime, u32)> = Vec::new();
        for w in &self.windows {
            match segments.last_mut() {
                Some((_, end, size)) if *size == w.size_minutes() && *end == w.start() => {
                    *end = w.end();
                }
                _ => segments.push((w.start(), w.end(), w.size_minutes())),
            }
        }
        segments
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct BucketRow {
    bucket: i64,
    events: u64,
    total: i128,
    maximum: i128,
    latest: i128,
    unique: u64,
}

/// The aggregates of every window of `plan` that has events of `customer` for `meter`, in
/// window order. One query per run of equal-sized windows (one, unless the tenant changed its
/// size inside the range).
pub async fn window_aggregates(
    client: &::clickhouse::Client,
    scope: &TenantScope,
    customer: &CustomerId,
    meter: &MeterId,
    plan: &WindowPlan,
) -> Result<Vec<(Window, WindowAggregates)>, Error> {
    let mut out = Vec::new();
    for (from, to, size_minutes) in plan.segments() {
        let step_ms = i64::from(size_minutes) * 60_000;
        // Windows are aligned to multiples of their size since the epoch, so the bucket of a
        // row is its Unix millisecond divided by the size; an event at exactly a window's end
        // falls in the next bucket, as in `Window::containing`.
        let rows: Vec<BucketRow> = client
            .query(&format!(
                "SELECT intDiv(toUnixTimestamp64Milli(timestamp), ?) AS bucket, {AGGREGATES_SQL}
                 FROM events_processed FINAL
                 WHERE tenant_id = ? AND environment_id = ? AND customer_id = ? AND meter_id = ?
                   AND timestamp >= fromUnixTimestamp64Milli(?, 'UTC')
                   AND timestamp < fromUnixTimestamp64Milli(?, 'UTC')
                 GROUP BY bucket
                 ORDER BY bucket"
            ))
            .bind(step_ms)
            .bind(scope.tenant_id.as_str())
            .bind(scope.environment_id.as_str())
            .bind(customer.as_str())
            .bind(meter.as_str())
            .bind(unix_millis(from))
            .bind(unix_millis(to))
            .fetch_all()
            .await
            .map_err(|source| Error::Clickhouse {
                context: "reading window totals".into(),
                source,
            })?;
        for row in rows {
            let start = row
                .bucket
                .checked_mul(step_ms / 1000)
                .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
                .ok_or_else(|| Error::Corrupt(format!("window bucket {}", row.bucket)))?;
            let window = Window::containing(start, size_minutes)
                .map_err(|e| Error::Corrupt(format!("window of bucket {}: {e}", row.bucket)))?;
            let aggregates = WindowAggregates::from_scaled(
                row.events,
                row.total,
                row.maximum,
                row.latest,
                row.unique,
            )?;
            out.push((window, aggregates));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::{PropertyName, Timestamp};
    use time::macros::datetime;

    fn range(from: &str, to: &str) -> TimeRange {
        TimeRange::new(
            Timestamp::parse(from).unwrap(),
            Timestamp::parse(to).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn quantities_round_trip_through_the_scaled_integer() {
        for text in [
            "0",
            "1",
            "12.5",
            "-3.25",
            "0.000000001",
            "123456789012345678.5",
        ] {
            let d: Decimal = text.parse().unwrap();
            let scaled = to_scaled(d).unwrap();
            assert_eq!(from_scaled(scaled).unwrap(), d.normalize(), "{text}");
        }
        assert_eq!(to_scaled("1.5".parse().unwrap()), Some(1_500_000_000));
    }

    #[test]
    fn quantities_per_aggregation() {
        let a = WindowAggregates {
            events: 4,
            sum: Decimal::new(1050, 2),
            max: Decimal::from(7),
            latest: Decimal::from(2),
            unique: 3,
        };
        let p = PropertyName::parse("p").unwrap();
        assert_eq!(a.quantity(&Aggregation::Count), Decimal::from(4));
        assert_eq!(a.quantity(&Aggregation::Sum(p.clone())).to_string(), "10.5");
        assert_eq!(a.quantity(&Aggregation::Max(p.clone())), Decimal::from(7));
        assert_eq!(
            a.quantity(&Aggregation::Latest(p.clone())),
            Decimal::from(2)
        );
        assert_eq!(a.quantity(&Aggregation::CountUnique(p)), Decimal::from(3));
    }

    #[test]
    fn a_plan_covers_every_window_overlapping_the_range() {
        let plan = WindowPlan::fixed(
            &range("2026-11-26T10:30:00Z", "2026-11-26T12:00:01Z"),
            60,
            10,
        )
        .unwrap();
        let starts: Vec<OffsetDateTime> = plan.windows().iter().map(Window::start).collect();
        assert_eq!(
            starts,
            vec![
                datetime!(2026-11-26 10:00 UTC),
                datetime!(2026-11-26 11:00 UTC),
                datetime!(2026-11-26 12:00 UTC),
            ]
        );
        assert_eq!(plan.segments().len(), 1);
    }

    #[test]
    fn a_plan_is_bounded() {
        let r = range("2026-11-26T00:00:00Z", "2026-11-27T00:00:00Z");
        assert_eq!(
            WindowPlan::fixed(&r, 5, 100),
            Err(PlanError::TooManyWindows { max: 100 })
        );
        assert_eq!(WindowPlan::fixed(&r, 5, 288).unwrap().windows().len(), 288);
    }

    #[test]
    fn a_size_change_splits_the_plan_into_touching_segments() {
        let history = SizeHistory::new(vec![(datetime!(2026-11-26 12:00 UTC), 15)]);
        let plan = WindowPlan::of_history(
            &range("2026-11-26T10:00:00Z", "2026-11-26T12:30:00Z"),
            &history,
            100,
        )
        .unwrap();
        let sizes: Vec<u32> = plan.windows().iter().map(Window::size_minutes).collect();
        assert_eq!(sizes, vec![60, 60, 15, 15]);
        for pair in plan.windows().windows(2) {
            assert_eq!(pair[0].end(), pair[1].start());
        }
        assert_eq!(
            plan.segments(),
            vec![
                (
                    datetime!(2026-11-26 10:00 UTC),
                    datetime!(2026-11-26 12:00 UTC),
                    60
                ),
                (
                    datetime!(2026-11-26 12:00 UTC),
                    datetime!(2026-11-26 12:30 UTC),
                    15
                ),
            ]
        );
    }
}

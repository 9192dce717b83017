//! [`Timestamp`]: an instant as every message carries it, an RFC 3339 string on the wire.
//!
//! Rule kept here: a `Timestamp` is always UTC and always within the years 0000..=9999 that
//! RFC 3339 can write, so turning one into text cannot fail; it is written with `Z` and the
//! fewest fractional digits that keep it exact (none for whole seconds). Parsing accepts any
//! RFC 3339 offset and converts to UTC.

use std::fmt;
use std::str::FromStr;

use schemars::{json_schema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::error::SchemaError;
use crate::json_schema::fixed_schema;

/// ECMA-262 pattern of an RFC 3339 date-time with a mandatory offset, as the schemas carry it
/// beside `"format": "date-time"` (validators treat `format` as an annotation unless told
/// otherwise; the pattern holds the shape even then).
pub const TIMESTAMP_PATTERN: &str =
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$";

/// Like [`TIMESTAMP_PATTERN`] but seconds (and any fraction) zero: a whole minute, since
/// RFC 3339 offsets are whole minutes too. Used for window bounds.
pub const WHOLE_MINUTE_PATTERN: &str =
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:00(\\.0{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$";

const SHAPE_REASON: &str = "must be an RFC 3339 date-time with offset, like 2024-05-01T12:00:00Z";

/// An instant in UTC, years 0000..=9999, nanosecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// The earliest instant RFC 3339 can write: `0000-01-01T00:00:00Z`.
    pub const MIN_YEAR: i32 = 0;
    /// The latest year RFC 3339 can write.
    pub const MAX_YEAR: i32 = 9999;

    /// Converts to UTC and checks the year is writable as RFC 3339.
    pub fn new(value: OffsetDateTime) -> Result<Self, SchemaError> {
        // `to_offset` panics when the UTC date leaves `time`'s own range (years -9999..=9999),
        // which a valid RFC 3339 text such as 9999-12-31T23:59:59-23:59 reaches (a usage_raw
        // fuzz seed, docs/fuzzing.md): the checked form refuses it like any year past 9999.
        value
            .checked_to_offset(UtcOffset::UTC)
            .filter(|utc| (Self::MIN_YEAR..=Self::MAX_YEAR).contains(&utc.year()))
            .map(Self)
            .ok_or_else(|| {
                SchemaError::invalid("timestamp", "year must be within 0000..=9999 in UTC")
            })
    }

    /// The current time.
    pub fn now() -> Self {
        // A system clock outside 0000..=9999 is not a case worth a `Result` at every call site;
        // clamping keeps this infallible without a panic path.
        let now = OffsetDateTime::now_utc();
        match Self::new(now) {
            Ok(ts) => ts,
            Err(_) if now.year() < Self::MIN_YEAR => Self(
                OffsetDateTime::UNIX_EPOCH
                    .replace_year(Self::MIN_YEAR)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            ),
            Err(_) => Self(
                OffsetDateTime::UNIX_EPOCH
                    .replace_year(Self::MAX_YEAR)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            ),
        }
    }

    /// Parses an RFC 3339 date-time (`T` and `Z` upper case, offset required) into UTC.
    pub fn parse(value: &str) -> Result<Self, SchemaError> {
        // The shape check mirrors TIMESTAMP_PATTERN so the Rust parser and the JSON Schema agree
        // on edge cases the `time` parser alone would allow (lowercase `t`/`z`).
        if !has_rfc3339_shape(value) {
            return Err(SchemaError::invalid("timestamp", SHAPE_REASON));
        }
        let parsed = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
            SchemaError::invalid("timestamp", "is not a real date and time (check ranges)")
        })?;
        Self::new(parsed)
    }

    /// Builds a timestamp from Unix seconds.
    pub fn from_unix_timestamp(seconds: i64) -> Result<Self, SchemaError> {
        let value = OffsetDateTime::from_unix_timestamp(seconds)
            .map_err(|_| SchemaError::invalid("timestamp", "unix seconds out of range"))?;
        Self::new(value)
    }

    /// The instant as a `time` value (offset UTC).
    pub fn as_offset_date_time(&self) -> OffsetDateTime {
        self.0
    }

    /// Seconds since the Unix epoch.
    pub fn unix_timestamp(&self) -> i64 {
        self.0.unix_timestamp()
    }
}

/// `DDDD-DD-DDTDD:DD:DD(.D{1,9})?(Z|±DD:DD)`, checked byte by byte.
fn has_rfc3339_shape(value: &str) -> bool {
    let bytes = value.as_bytes();
    let digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    let is = |i: usize, b: u8| bytes.get(i) == Some(&b);
    let head = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
        .into_iter()
        .all(digit)
        && is(4, b'-')
        && is(7, b'-')
        && is(10, b'T')
        && is(13, b':')
        && is(16, b':');
    if !head {
        return false;
    }
    let mut i = 19;
    if is(i, b'.') {
        let start = i + 1;
        i = start;
        while digit(i) {
            i += 1;
        }
        if !(1..=9).contains(&(i - start)) {
            return false;
        }
    }
    match bytes.get(i) {
        Some(b'Z') => i + 1 == bytes.len(),
        Some(b'+' | b'-') => {
            digit(i + 1)
                && digit(i + 2)
                && is(i + 3, b':')
                && digit(i + 4)
                && digit(i + 5)
                && i + 6 == bytes.len()
        }
        _ => false,
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written by hand rather than through `time`'s formatter: that one is fallible, and the
        // exact wire form (fraction digits, `Z`) is pinned here and by the golden files.
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )?;
        let nanos = t.nanosecond();
        if nanos != 0 {
            let digits = format!("{nanos:09}");
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

impl FromStr for Timestamp {
    type Err = SchemaError;

    fn from_str(value: &str) -> Result<Self, SchemaError> {
        Self::parse(value)
    }
}

impl TryFrom<String> for Timestamp {
    type Error = SchemaError;

    fn try_from(value: String) -> Result<Self, SchemaError> {
        Self::parse(&value)
    }
}

impl From<Timestamp> for String {
    fn from(value: Timestamp) -> String {
        value.to_string()
    }
}

impl TryFrom<OffsetDateTime> for Timestamp {
    type Error = SchemaError;

    fn try_from(value: OffsetDateTime) -> Result<Self, SchemaError> {
        Self::new(value)
    }
}

impl From<Timestamp> for OffsetDateTime {
    fn from(value: Timestamp) -> OffsetDateTime {
        value.0
    }
}

fixed_schema!(
    Timestamp,
    json_schema!({
        "description": "RFC 3339 date-time with an offset (upper-case T and Z), e.g. 2024-05-01T12:00:00Z or 2024-05-01T14:00:00.25+02:00. Written by meterline in UTC with Z.",
        "type": "string",
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
    })
);

/// Schema of a window bound: a timestamp on a whole minute.
pub(crate) fn whole_minute_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "RFC 3339 date-time on a whole minute (seconds 00), e.g. 2024-05-01T12:00:00Z.",
        "type": "string",
        "format": "date-time",
        "pattern": WHOLE_MINUTE_PATTERN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn writes_utc_with_z_and_minimal_fraction() {
        let cases = [
            (datetime!(2024-05-01 12:00:00 UTC), "2024-05-01T12:00:00Z"),
            (
                datetime!(2024-05-01 14:00:00 +02:00),
                "2024-05-01T12:00:00Z",
            ),
            (
                datetime!(2024-05-01 12:00:00.5 UTC),
                "2024-05-01T12:00:00.5Z",
            ),
            (
                datetime!(2024-05-01 12:00:00.123 UTC),
                "2024-05-01T12:00:00.123Z",
            ),
            (
                datetime!(2024-05-01 12:00:00.000000001 UTC),
                "2024-05-01T12:00:00.000000001Z",
            ),
            (datetime!(0000-01-01 00:00:00 UTC), "0000-01-01T00:00:00Z"),
            (
                datetime!(9999-12-31 23:59:59.999999999 UTC),
                "9999-12-31T23:59:59.999999999Z",
            ),
        ];
        for (value, text) in cases {
            let ts = Timestamp::new(value).expect("in range");
            assert_eq!(ts.to_string(), text);
            assert_eq!(Timestamp::parse(text).expect("parses"), ts);
        }
    }

    #[test]
    fn parses_offsets_into_utc() {
        let ts = Timestamp::parse("2024-05-01T00:30:00-01:00").expect("valid");
        assert_eq!(ts.as_offset_date_time(), datetime!(2024-05-01 01:30:00 UTC));
        assert_eq!(ts.as_offset_date_time().offset(), UtcOffset::UTC);
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in [
            "",
            "yesterday",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-05-01 12:00:00Z",
            "2024-05-01t12:00:00z",
            "2024-05-01T12:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00.1234567890Z",
            "2024-05-01T12:00:00+0200",
            "2024-05-01T12:00:00Z ",
            "+2024-05-01T12:00:00Z",
        ] {
            let err = Timestamp::parse(bad).expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!("invalid timestamp: {SHAPE_REASON}"),
                "{bad:?}"
            );
        }
        for bad in [
            "2024-13-01T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:60:00Z",
            "2024-05-01T12:00:00+24:00",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_years_rfc3339_cannot_write() {
        assert!(Timestamp::new(datetime!(-0001-12-31 23:59:59 UTC)).is_err());
        // 0000-01-01 00:30 at +01:00 is 31 December of year -1 in UTC.
        assert!(Timestamp::parse("0000-01-01T00:30:00+01:00").is_err());
        // Year 10000 in UTC is outside `time`'s range too: refused, not a panic.
        assert!(Timestamp::parse("9999-12-31T23:59:59-23:59").is_err());
        assert!(Timestamp::parse("9999-12-31T23:59:59-00:01").is_err());
        assert!(Timestamp::parse("9999-12-31T23:59:59+00:01").is_ok());
    }

    #[test]
    fn now_is_utc() {
        assert_eq!(
            Timestamp::now().as_offset_date_time().offset(),
            UtcOffset::UTC
        );
    }

    #[test]
    fn serde_roundtrip() {
        let ts = Timestamp::parse("2024-05-01T12:00:00.25Z").expect("valid");
        let json = serde_json::to_string(&ts).expect("serialise");
        assert_eq!(json, "\"2024-05-01T12:00:00.25Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).expect("parse"), ts);
    }
}

//! [`Aggregation`]: what quantity one matching event contributes to its meter, and the key a
//! `COUNT_UNIQUE` meter counts distinct values by.
//!
//! Rule kept here: evaluation is pure and total. An absent or `null` property feeds nothing
//! (`Ok(None)`), a value that is not a number or a decimal string is a [`QuantityError`] naming
//! the property, never a silent zero, and values equal under the meter's rules give one unique key.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::{number_to_decimal, PropertyName};
use crate::codec::decimal_string;
use crate::error::SchemaError;

/// How a meter turns matching events into a value. Every kind but `Count` reads one property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aggregation {
    /// Number of matching events.
    Count,
    /// Sum of the property.
    Sum(PropertyName),
    /// Largest value of the property.
    Max(PropertyName),
    /// Value of the property in the latest event (by event timestamp).
    Latest(PropertyName),
    /// Number of distinct values of the property (see [`Aggregation::unique_key`]).
    CountUnique(PropertyName),
}

/// The aggregation kinds as the API writes them.
pub const AGGREGATION_KINDS: [&str; 5] = ["COUNT", "SUM", "MAX", "LATEST", "COUNT_UNIQUE"];

impl Aggregation {
    /// Builds an aggregation from its kind (`COUNT`, `SUM`, `MAX`, `LATEST`, `COUNT_UNIQUE`,
    /// exactly as written) and property: `COUNT` takes none, every other kind needs one.
    pub fn parse(kind: &str, property: Option<&str>) -> Result<Self, SchemaError> {
        let wrap: fn(PropertyName) -> Aggregation = match kind {
            "COUNT" => {
                return match property {
                    None => Ok(Self::Count),
                    Some(_) => Err(SchemaError::invalid(
                        "property",
                        "must be absent for COUNT, which reads no property",
                    )),
                }
            }
            "SUM" => Self::Sum,
            "MAX" => Self::Max,
            "LATEST" => Self::Latest,
            "COUNT_UNIQUE" => Self::CountUnique,
            _ => {
                return Err(SchemaError::invalid(
                    "aggregation",
                    "must be one of COUNT, SUM, MAX, LATEST, COUNT_UNIQUE",
                ))
            }
        };
        let property = property
            .ok_or_else(|| SchemaError::invalid("property", format!("is required for {kind}")))?;
        Ok(wrap(PropertyName::parse(property)?))
    }

    /// The kind as the API and the `meters.aggregation` column write it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Count => "COUNT",
            Self::Sum(_) => "SUM",
            Self::Max(_) => "MAX",
            Self::Latest(_) => "LATEST",
            Self::CountUnique(_) => "COUNT_UNIQUE",
        }
    }

    /// The property the aggregation reads; `None` for `Count`.
    pub fn property(&self) -> Option<&PropertyName> {
        match self {
            Self::Count => None,
            Self::Sum(p) | Self::Max(p) | Self::Latest(p) | Self::CountUnique(p) => Some(p),
        }
    }

    /// What one matching event contributes:
    /// - `Count`: 1.
    /// - `Sum`, `Max`, `Latest`: the property as a decimal (a JSON number, or a string holding a
    ///   decimal such as `"12.5"`); any other value is an error naming the property.
    /// - `CountUnique`: 1; the distinct value itself is [`Aggregation::unique_key`].
    ///
    /// `Ok(None)` when the property is absent or `null`: the event matches the meter but does not
    /// feed its value (refusing it would lose the event for every other meter it feeds).
    pub fn quantity(
        &self,
        properties: &Map<String, Value>,
    ) -> Result<Option<Decimal>, QuantityError> {
        let property = match self {
            Self::Count => return Ok(Some(Decimal::ONE)),
            Self::CountUnique(p) => {
                return Ok(present(properties, p).map(|_| Decimal::ONE));
            }
            Self::Sum(p) | Self::Max(p) | Self::Latest(p) => p,
        };
        let Some(value) = present(properties, property) else {
            return Ok(None);
        };
        let not_numeric = |found| QuantityError::NotNumeric {
            property: property.clone(),
            found,
        };
        match value {
            Value::Number(n) => {
                number_to_decimal(n)
                    .map(Some)
                    .ok_or_else(|| QuantityError::OutOfRange {
                        property: property.clone(),
                    })
            }
            Value::String(s) => decimal_string::parse(s)
                .map(Some)
                .map_err(|_| not_numeric("a string that is not a decimal")),
            Value::Bool(_) => Err(not_numeric("a boolean")),
            Value::Array(_) => Err(not_numeric("an array")),
            Value::Object(_) => Err(not_numeric("an object")),
            Value::Null => Ok(None),
        }
    }

    /// For `CountUnique`, a canonical text of the property's value, so that values equal under
    /// the meter's rules give the same key: a string is its own text, a number its normalised
    /// decimal (`1`, `1.0` and `1e0` all give `"1"`), a boolean `true`/`false`, an array or
    /// object its compact JSON with object keys sorted. A string and a number of the same text
    /// (`"42"` and `42`) deliberately count as one value: producers send ids both ways.
    /// `None` for other aggregations and when the property is absent or `null`.
    pub fn unique_key(&self, properties: &Map<String, Value>) -> Option<String> {
        let Self::CountUnique(property) = self else {
            return None;
        };
        present(properties, property).map(|value| match value {
            Value::String(s) => s.clone(),
            other => canonical_json(other),
        })
    }
}

/// The property's value, treating JSON `null` as absent.
fn present<'a>(properties: &'a Map<String, Value>, property: &PropertyName) -> Option<&'a Value> {
    properties.get(property.as_str()).filter(|v| !v.is_null())
}

/// Compact JSON with numbers normalised and object keys sorted, so equal values give equal text
/// whatever order or notation the producer used.
fn canonical_json(value: &Value) -> String {
    fn normalise(value: &Value) -> Value {
        match value {
            // A float's shortest text is already canonical; only integral values need one
            // form, so that `1.0` and `1` agree.
            Value::Number(n) => match number_to_decimal(n).filter(|d| d.fract().is_zero()) {
                Some(d) => i64::try_from(d)
                    .map(Value::from)
                    .or_else(|_| u64::try_from(d).map(Value::from))
                    .unwrap_or_else(|_| Value::Number(n.clone())),
                None => Value::Number(n.clone()),
            },
            Value::Array(items) => Value::Array(items.iter().map(normalise).collect()),
            Value::Object(map) => {
                let sorted: BTreeMap<&String, Value> =
                    map.iter().map(|(k, v)| (k, normalise(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            other => other.clone(),
        }
    }
    match value {
        // Top-level scalars are written bare: `1.0` gives `1`, `true` gives `true`.
        Value::Number(n) => match number_to_decimal(n) {
            Some(d) => d.normalize().to_string(),
            None => n.to_string(),
        },
        other => normalise(other).to_string(),
    }
}

/// Why an event's property could not be read as a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The property holds something other than a number or a decimal string.
    #[error("property {property}: must be a number or a decimal string, found {found}")]
    NotNumeric {
        property: PropertyName,
        found: &'static str,
    },
    /// The property is a number too large or too precise for a decimal.
    #[error(
        "property {property}: number outside the decimal range \
         (28 significant digits, |value| < 7.9e28)"
    )]
    OutOfRange { property: PropertyName },
}

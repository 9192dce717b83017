//! Meter definitions: which usage events feed a meter ([`MeterDefinition::matches`]) and what
//! quantity each one contributes ([`Aggregation::quantity`]). Ingest stores them; the aggregator
//! evaluates them on every event.
//!
//! Rule kept here: a [`MeterDefinition`] can only be built valid, through [`MeterInput`] (the
//! flat JSON form of the HTTP API and of storage) and `TryFrom`, and every refusal is a
//! [`SchemaError`] naming the field. Evaluation is pure and total: it never panics, and a value
//! that cannot be read as a quantity is an error naming the property, never a silent zero.
//!
//! Property names are flat keys of the event's `properties` object: a dot is a plain character
//! (`"usage.tokens"` is one key), not a path, so a filter never reaches into nested objects.
//!
//! This module holds [`PropertyName`], [`MeterDefinition`] and its input form; [`Aggregation`]
//! lives in `aggregation.rs`, the filters in `filter.rs`, the unit tests in `tests.rs`, all
//! re-exported here.

use rust_decimal::Decimal;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

use crate::codec::MapOnly;
use crate::error::SchemaError;
use crate::ids::{text_conversions, EventName, MeterId};

use filter::parse_filters;

mod aggregation;
mod filter;
#[cfg(test)]
mod tests;

pub use aggregation::{Aggregation, QuantityError, AGGREGATION_KINDS};
pub use filter::{FilterValue, PropertyFilter};

/// Longest property name, in characters.
pub const PROPERTY_NAME_MAX_CHARS: usize = 128;

/// Most filters one meter may have.
pub const MAX_FILTERS: usize = 20;

/// Most values one filter may list.
pub const MAX_FILTER_VALUES: usize = 100;

/// ECMA-262 pattern of a property name.
pub const PROPERTY_NAME_PATTERN: &str = "^[A-Za-z0-9_.-]{1,128}$";

/// The name of an event property: 1..=128 of `[A-Za-z0-9_.-]`. A dot is part of the name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PropertyName(String);

impl PropertyName {
    /// Validates `value` as a property name.
    pub fn parse(value: &str) -> Result<Self, SchemaError> {
        Self::try_from(value.to_owned())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Gives back the owned text.
    pub fn into_string(self) -> String {
        self.0
    }

    fn check(value: &str) -> Result<(), &'static str> {
        if value.is_empty() {
            return Err("must not be empty");
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err("may contain only ASCII letters, digits, '_', '.' and '-'");
        }
        // All ASCII by now, so bytes are characters.
        if value.len() > PROPERTY_NAME_MAX_CHARS {
            return Err("must be at most 128 characters");
        }
        Ok(())
    }
}

impl TryFrom<String> for PropertyName {
    type Error = SchemaError;

    fn try_from(value: String) -> Result<Self, SchemaError> {
        match Self::check(&value) {
            Ok(()) => Ok(Self(value)),
            Err(reason) => Err(SchemaError::invalid("property", reason)),
        }
    }
}

text_conversions!(PropertyName);

/// A JSON number as a decimal, `None` when it is outside the decimal range (such as `1e300`).
/// Floats go through their shortest text form, so `0.1` becomes exactly 0.1, not the binary
/// double nearest to it.
fn number_to_decimal(n: &Number) -> Option<Decimal> {
    if let Some(i) = n.as_i64() {
        return Some(Decimal::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Some(Decimal::from(u));
    }
    let text = n.to_string();
    Decimal::from_str_exact(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .ok()
}

/// A meter: the events it selects (name and filters) and how it aggregates them.
///
/// Serialises as the flat JSON form [`MeterInput`] reads back:
/// `{"id", "event_name", "aggregation", "property" (absent for COUNT), "filters"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "MeterInput")]
pub struct MeterDefinition {
    pub id: MeterId,
    pub event_name: EventName,
    pub aggregation: Aggregation,
    /// 0..=20 filters, at most one per property.
    pub filters: Vec<PropertyFilter>,
}

impl MeterDefinition {
    /// Whether an event feeds this meter: same event name, and every filter matches.
    pub fn matches(&self, event_name: &EventName, properties: &Map<String, Value>) -> bool {
        self.event_name == *event_name && self.filters.iter().all(|f| f.matches(properties))
    }
}

impl Serialize for MeterDefinition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let property = self.aggregation.property();
        let fields = if property.is_some() { 5 } else { 4 };
        let mut s = serializer.serialize_struct("MeterDefinition", fields)?;
        s.serialize_field("id", &self.id)?;
        s.serialize_field("event_name", &self.event_name)?;
        s.serialize_field("aggregation", self.aggregation.kind())?;
        if let Some(property) = property {
            s.serialize_field("property", property)?;
        }
        s.serialize_field("filters", &self.filters)?;
        s.end()
    }
}

/// The flat JSON form of a meter, as a client sends it. Plain strings and JSON values so that
/// the conversion to [`MeterDefinition`] can name the field it refuses.
///
/// `id` is optional here because `PUT /v1/meters/{id}` takes it from the path; the conversion
/// refuses a missing id.
///
/// Only a JSON object is read: serde's derived form would also take an array of the field
/// values in order, which no client means to send.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterInput {
    pub id: Option<String>,
    pub event_name: String,
    pub aggregation: String,
    pub property: Option<String>,
    pub filters: Option<Vec<FilterInput>>,
}

/// One filter as a client sends it: `{"property": "model", "in": ["gpt-4", "gpt-4o"]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterInput {
    pub property: String,
    pub values: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(remote = "MeterInput", deny_unknown_fields, rename = "MeterInput")]
struct MeterInputWire {
    #[serde(default)]
    id: Option<String>,
    event_name: String,
    aggregation: String,
    #[serde(default)]
    property: Option<String>,
    #[serde(default)]
    filters: Option<Vec<FilterInput>>,
}

#[derive(Deserialize)]
#[serde(remote = "FilterInput", deny_unknown_fields, rename = "FilterInput")]
struct FilterInputWire {
    property: String,
    #[serde(rename = "in")]
    values: Vec<Value>,
}

impl<'de> Deserialize<'de> for MeterInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        MeterInputWire::deserialize(MapOnly(deserializer))
    }
}

impl<'de> Deserialize<'de> for FilterInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        FilterInputWire::deserialize(MapOnly(deserializer))
    }
}

impl TryFrom<MeterInput> for MeterDefinition {
    type Error = SchemaError;

    fn try_from(input: MeterInput) -> Result<Self, SchemaError> {
        let id = input
            .id
            .ok_or_else(|| SchemaError::invalid("id", "is required"))?;
        // MeterId names itself `meter_id`; the JSON field here is `id`.
        let id = MeterId::parse(&id).map_err(|e| match e {
            SchemaError::InvalidValue { reason, .. } => SchemaError::invalid("id", reason),
            other => other,
        })?;
        let event_name = EventName::parse(&input.event_name)?;
        let aggregation = Aggregation::parse(&input.aggregation, input.property.as_deref())?;
        let filters = parse_filters(input.filters.unwrap_or_default())?;
        Ok(Self {
            id,
            event_name,
            aggregation,
            filters,
        })
    }
}

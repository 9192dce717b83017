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

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

use crate::codec::{decimal_string, MapOnly};
use crate::error::SchemaError;
use crate::ids::{text_conversions, EventName, MeterId};

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

/// One value a filter accepts: a JSON string, number or boolean. Numbers compare by value, so a
/// filter on `1` matches an event carrying `1.0`; a string never equals a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterValue {
    String(String),
    Number(Decimal),
    Bool(bool),
}

impl FilterValue {
    /// Reads a filter value from JSON, refusing `null`, arrays, objects and numbers outside
    /// the decimal range.
    pub fn from_json(value: &Value) -> Result<Self, &'static str> {
        match value {
            Value::String(s) => Ok(Self::String(s.clone())),
            Value::Bool(b) => Ok(Self::Bool(*b)),
            Value::Number(n) => number_to_decimal(n)
                .map(Self::Number)
                .ok_or("number outside the decimal range"),
            Value::Null | Value::Array(_) | Value::Object(_) => {
                Err("must be a string, number or boolean")
            }
        }
    }

    /// Whether an event's property value equals this one.
    pub fn matches(&self, value: &Value) -> bool {
        match (self, value) {
            (Self::String(want), Value::String(got)) => want == got,
            (Self::Bool(want), Value::Bool(got)) => want == got,
            // Decimal equality is by value: 1 == 1.0.
            (Self::Number(want), Value::Number(got)) => number_to_decimal(got) == Some(*want),
            _ => false,
        }
    }
}

impl Serialize for FilterValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::String(s) => serializer.serialize_str(s),
            Self::Bool(b) => serializer.serialize_bool(*b),
            Self::Number(d) => {
                // Written as a JSON number again. Integers stay exact; a fraction goes through
                // the correctly rounded text-to-double conversion, which gives back the very
                // double the value was read from (it came in as a JSON number).
                if d.fract().is_zero() {
                    if let Ok(i) = i64::try_from(*d) {
                        return serializer.serialize_i64(i);
                    }
                    if let Ok(u) = u64::try_from(*d) {
                        return serializer.serialize_u64(u);
                    }
                }
                match f64::from_str(&d.to_string()) {
                    Ok(f) => serializer.serialize_f64(f),
                    // Decimal text always parses as a double; kept total all the same.
                    Err(_) => serializer.collect_str(d),
                }
            }
        }
    }
}

/// Events match only when their property equals one of `values`. An absent property never
/// matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyFilter {
    pub property: PropertyName,
    /// 1..=100 values.
    pub values: Vec<FilterValue>,
}

impl PropertyFilter {
    /// Whether the event's properties pass this filter.
    pub fn matches(&self, properties: &Map<String, Value>) -> bool {
        properties
            .get(self.property.as_str())
            .is_some_and(|value| self.values.iter().any(|want| want.matches(value)))
    }
}

impl Serialize for PropertyFilter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("PropertyFilter", 2)?;
        s.serialize_field("property", &self.property)?;
        s.serialize_field("in", &self.values)?;
        s.end()
    }
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

fn parse_filters(inputs: Vec<FilterInput>) -> Result<Vec<PropertyFilter>, SchemaError> {
    if inputs.len() > MAX_FILTERS {
        return Err(SchemaError::invalid(
            "filters",
            format!("at most {MAX_FILTERS} filters"),
        ));
    }
    let mut seen = HashSet::new();
    let mut filters = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let property = PropertyName::parse(&input.property).map_err(|e| match e {
            SchemaError::InvalidValue { reason, .. } => {
                SchemaError::invalid("filters", format!("filter {i} property {reason}"))
            }
            other => other,
        })?;
        if !seen.insert(property.clone()) {
            return Err(SchemaError::invalid(
                "filters",
                format!(
                    "filter {i}: property {property} already has a filter; \
                     list every accepted value in one filter"
                ),
            ));
        }
        if input.values.is_empty() || input.values.len() > MAX_FILTER_VALUES {
            return Err(SchemaError::invalid(
                "filters",
                format!("filter {i}: `in` must list 1 to {MAX_FILTER_VALUES} values"),
            ));
        }
        let values = input
            .values
            .iter()
            .enumerate()
            .map(|(j, v)| {
                FilterValue::from_json(v).map_err(|reason| {
                    SchemaError::invalid("filters", format!("filter {i} value {j}: {reason}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        filters.push(PropertyFilter { property, values });
    }
    Ok(filters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn meter(value: Value) -> Result<MeterDefinition, SchemaError> {
        let input: MeterInput = serde_json::from_value(value).expect("input shape");
        MeterDefinition::try_from(input)
    }

    fn tokens_meter() -> MeterDefinition {
        meter(json!({
            "id": "tokens",
            "event_name": "llm.completion",
            "aggregation": "SUM",
            "property": "tokens",
            "filters": [
                {"property": "model", "in": ["gpt-4", "gpt-4o"]},
                {"property": "tier", "in": [1, true]}
            ]
        }))
        .expect("valid meter")
    }

    #[test]
    fn property_names() {
        for ok in ["a", "tokens", "usage.tokens", "A-b_c.9", &"p".repeat(128)] {
            assert!(PropertyName::parse(ok).is_ok(), "{ok:?}");
        }
        for (bad, reason) in [
            ("", "must not be empty"),
            ("has space", "may contain only"),
            ("a/b", "may contain only"),
            ("ü", "may contain only"),
            (&"p".repeat(129), "at most 128"),
        ] {
            let err = PropertyName::parse(bad).expect_err(bad).to_string();
            assert!(err.starts_with("invalid property: "), "{err}");
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn aggregation_parse_table() {
        let p = |s: &str| PropertyName::parse(s).expect("valid");
        let cases: Vec<(&str, Option<&str>, Result<Aggregation, &str>)> = vec![
            ("COUNT", None, Ok(Aggregation::Count)),
            ("SUM", Some("t"), Ok(Aggregation::Sum(p("t")))),
            ("MAX", Some("t"), Ok(Aggregation::Max(p("t")))),
            ("LATEST", Some("t"), Ok(Aggregation::Latest(p("t")))),
            (
                "COUNT_UNIQUE",
                Some("u"),
                Ok(Aggregation::CountUnique(p("u"))),
            ),
            (
                "COUNT",
                Some("t"),
                Err("invalid property: must be absent for COUNT"),
            ),
            ("SUM", None, Err("invalid property: is required for SUM")),
            (
                "COUNT_UNIQUE",
                None,
                Err("invalid property: is required for COUNT_UNIQUE"),
            ),
            (
                "SUM",
                Some("bad name"),
                Err("invalid property: may contain only"),
            ),
            (
                "AVERAGE",
                Some("t"),
                Err("invalid aggregation: must be one of"),
            ),
            ("count", None, Err("invalid aggregation: must be one of")),
            ("", None, Err("invalid aggregation: must be one of")),
        ];
        for (kind, property, want) in cases {
            let got = Aggregation::parse(kind, property);
            match (got, want) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got, want);
                    assert_eq!(got.kind(), kind);
                    assert_eq!(got.property().map(PropertyName::as_str), property);
                }
                (Err(got), Err(want)) => {
                    assert!(
                        got.to_string().starts_with(want),
                        "{kind} {property:?}: {got}"
                    )
                }
                (got, want) => panic!("{kind} {property:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn matches_table() {
        let m = tokens_meter();
        let name = |s: &str| EventName::parse(s).expect("valid");
        let cases = [
            ("llm.completion", json!({"model": "gpt-4", "tier": 1}), true),
            (
                "llm.completion",
                json!({"model": "gpt-4o", "tier": 1.0}),
                true,
            ),
            (
                "llm.completion",
                json!({"model": "gpt-4o", "tier": true}),
                true,
            ),
            (
                "llm.completion",
                json!({"model": "gpt-4o", "tier": 1e0}),
                true,
            ),
            (
                "llm.completion",
                json!({"model": "gpt-3", "tier": 1}),
                false,
            ),
            (
                "llm.completion",
                json!({"model": "gpt-4", "tier": 2}),
                false,
            ),
            (
                "llm.completion",
                json!({"model": "gpt-4", "tier": "1"}),
                false,
            ),
            (
                "llm.completion",
                json!({"model": "gpt-4", "tier": false}),
                false,
            ),
            ("llm.completion", json!({"model": "gpt-4"}), false),
            (
                "llm.completion",
                json!({"model": "GPT-4", "tier": 1}),
                false,
            ),
            (
                "llm.completion",
                json!({"model": ["gpt-4"], "tier": 1}),
                false,
            ),
            ("llm.completion", json!({"model": null, "tier": 1}), false),
            ("llm.other", json!({"model": "gpt-4", "tier": 1}), false),
            // A dot is part of the name, not a path into nested objects.
            (
                "llm.completion",
                json!({"tier": 1, "m": {"model": "gpt-4"}}),
                false,
            ),
        ];
        for (event, properties, want) in cases {
            assert_eq!(
                m.matches(&name(event), &props(properties.clone())),
                want,
                "{event} {properties}"
            );
        }
        let unfiltered =
            meter(json!({"id": "c", "event_name": "e", "aggregation": "COUNT"})).expect("valid");
        assert!(unfiltered.matches(&name("e"), &Map::new()));
        assert!(!unfiltered.matches(&name("E"), &Map::new()));

        let dotted = meter(json!({
            "id": "d", "event_name": "e", "aggregation": "COUNT",
            "filters": [{"property": "a.b", "in": ["x"]}]
        }))
        .expect("valid");
        assert!(dotted.matches(&name("e"), &props(json!({"a.b": "x"}))));
        assert!(!dotted.matches(&name("e"), &props(json!({"a": {"b": "x"}}))));
    }

    #[test]
    fn quantity_table() {
        let p = |s: &str| PropertyName::parse(s).expect("valid");
        let d = |s: &str| Decimal::from_str_exact(s).expect("decimal");
        let sum = Aggregation::Sum(p("tokens"));
        type Case = (Aggregation, Value, Result<Option<Decimal>, &'static str>);
        let cases: Vec<Case> = vec![
            (Aggregation::Count, json!({}), Ok(Some(Decimal::ONE))),
            (Aggregation::Count, json!({"tokens": "x"}), Ok(Some(Decimal::ONE))),
            (sum.clone(), json!({"tokens": 42}), Ok(Some(d("42")))),
            (sum.clone(), json!({"tokens": -3}), Ok(Some(d("-3")))),
            (sum.clone(), json!({"tokens": 12.5}), Ok(Some(d("12.5")))),
            (sum.clone(), json!({"tokens": 0.1}), Ok(Some(d("0.1")))),
            (sum.clone(), json!({"tokens": u64::MAX}), Ok(Some(d("18446744073709551615")))),
            (sum.clone(), json!({"tokens": 1e20}), Ok(Some(d("100000000000000000000")))),
            (sum.clone(), json!({"tokens": "12.5"}), Ok(Some(d("12.5")))),
            (sum.clone(), json!({"tokens": "-0.25"}), Ok(Some(d("-0.25")))),
            (sum.clone(), json!({}), Ok(None)),
            (sum.clone(), json!({"tokens": null}), Ok(None)),
            (sum.clone(), json!({"other": 5}), Ok(None)),
            (sum.clone(), json!({"tokens": "abc"}), Err("property tokens: must be a number or a decimal string, found a string that is not a decimal")),
            (sum.clone(), json!({"tokens": "1e3"}), Err("found a string that is not a decimal")),
            (sum.clone(), json!({"tokens": " 1"}), Err("found a string that is not a decimal")),
            (sum.clone(), json!({"tokens": true}), Err("property tokens: must be a number or a decimal string, found a boolean")),
            (sum.clone(), json!({"tokens": [1]}), Err("found an array")),
            (sum.clone(), json!({"tokens": {"n": 1}}), Err("found an object")),
            (sum, json!({"tokens": 1e300}), Err("property tokens: number outside the decimal range")),
            (Aggregation::Max(p("v")), json!({"v": 7}), Ok(Some(d("7")))),
            (Aggregation::Latest(p("v")), json!({"v": "3.50"}), Ok(Some(d("3.50")))),
            (Aggregation::Latest(p("v")), json!({"v": false}), Err("property v:")),
            (Aggregation::CountUnique(p("user")), json!({"user": "u1"}), Ok(Some(Decimal::ONE))),
            (Aggregation::CountUnique(p("user")), json!({"user": {"a": 1}}), Ok(Some(Decimal::ONE))),
            (Aggregation::CountUnique(p("user")), json!({}), Ok(None)),
        ];
        for (aggregation, properties, want) in cases {
            let got = aggregation.quantity(&props(properties.clone()));
            match (&got, want) {
                (Ok(got), Ok(want)) => assert_eq!(*got, want, "{aggregation:?} {properties}"),
                (Err(got), Err(want)) => assert!(
                    got.to_string().contains(want),
                    "{aggregation:?} {properties}: {got}"
                ),
                (got, want) => panic!("{aggregation:?} {properties}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn unique_key_table() {
        let unique = Aggregation::CountUnique(PropertyName::parse("u").expect("valid"));
        let cases: Vec<(Value, Option<&str>)> = vec![
            (json!({"u": "user-1"}), Some("user-1")),
            (json!({"u": 42}), Some("42")),
            (json!({"u": "42"}), Some("42")),
            (json!({"u": 42.0}), Some("42")),
            (json!({"u": 1.50}), Some("1.5")),
            (json!({"u": 1e300}), Some("1e+300")),
            (json!({"u": true}), Some("true")),
            (json!({"u": [1.0, "a", 2.5]}), Some(r#"[1,"a",2.5]"#)),
            (json!({"u": {"b": 1, "a": 2}}), Some(r#"{"a":2,"b":1}"#)),
            (json!({"u": null}), None),
            (json!({}), None),
        ];
        for (properties, want) in cases {
            assert_eq!(
                unique.unique_key(&props(properties.clone())).as_deref(),
                want,
                "{properties}"
            );
        }
        // Key order does not change the key.
        let a = unique.unique_key(&props(json!({"u": {"x": 1, "y": 2}})));
        let b = unique.unique_key(&props(json!({"u": {"y": 2, "x": 1.0}})));
        assert_eq!(a, b);
        assert_eq!(Aggregation::Count.unique_key(&props(json!({"u": 1}))), None);
    }

    #[test]
    fn definition_refusals_name_the_field() {
        let base = json!({"id": "m", "event_name": "e", "aggregation": "COUNT"});
        let with = |key: &str, value: Value| {
            let mut v = base.clone();
            v[key] = value;
            v
        };
        let filter_values = |n: usize| json!([{"property": "p", "in": (0..n).map(|i| json!(i)).collect::<Vec<_>>()}]);
        let many_filters: Vec<Value> = (0..21)
            .map(|i| json!({"property": format!("p{i}"), "in": ["x"]}))
            .collect();
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"event_name": "e", "aggregation": "COUNT"}),
                "invalid id: is required",
            ),
            (with("id", json!("bad id")), "invalid id: may contain only"),
            (with("id", json!("")), "invalid id: must not be empty"),
            (
                with("id", json!("a".repeat(65))),
                "invalid id: must be at most 64",
            ),
            (
                with("event_name", json!("x".repeat(101))),
                "invalid event_name: must be at most 100",
            ),
            (
                with("event_name", json!(" ")),
                "invalid event_name: must not be only whitespace",
            ),
            (with("aggregation", json!("AVG")), "invalid aggregation"),
            (
                with("property", json!("p")),
                "invalid property: must be absent for COUNT",
            ),
            (
                with("filters", filter_values(0)),
                "invalid filters: filter 0: `in` must list 1 to 100",
            ),
            (
                with("filters", filter_values(101)),
                "invalid filters: filter 0: `in` must list 1 to 100",
            ),
            (
                with("filters", json!(many_filters)),
                "invalid filters: at most 20 filters",
            ),
            (
                with(
                    "filters",
                    json!([{"property": "p", "in": ["a"]}, {"property": "p", "in": ["b"]}]),
                ),
                "invalid filters: filter 1: property p already has a filter",
            ),
            (
                with("filters", json!([{"property": "a b", "in": ["a"]}])),
                "invalid filters: filter 0 property may contain only",
            ),
            (
                with("filters", json!([{"property": "p", "in": ["a", null]}])),
                "invalid filters: filter 0 value 1: must be a string, number or boolean",
            ),
            (
                with("filters", json!([{"property": "p", "in": [{"a": 1}]}])),
                "invalid filters: filter 0 value 0: must be a string, number or boolean",
            ),
            (
                with("filters", json!([{"property": "p", "in": [1e300]}])),
                "invalid filters: filter 0 value 0: number outside the decimal range",
            ),
        ];
        for (input, want) in cases {
            let err = meter(input.clone())
                .expect_err(&input.to_string())
                .to_string();
            assert!(err.starts_with(want), "{input}: {err}");
        }
        assert!(meter(with("filters", filter_values(100))).is_ok());
        assert!(meter(with("filters", json!(null))).is_ok());
    }

    #[test]
    fn input_shape_is_strict() {
        for bad in [
            json!({"id": "m", "event_name": "e", "aggregation": "COUNT", "extra": 1}),
            json!({"id": "m", "event_name": "e", "aggregation": "COUNT", "filters": [{"property": "p", "in": ["a"], "not": 1}]}),
            json!({"id": "m", "aggregation": "COUNT"}),
            json!({"id": 5, "event_name": "e", "aggregation": "COUNT"}),
            json!(["m", "e", "COUNT", null, null]),
            json!({"id": "m", "event_name": "e", "aggregation": "COUNT", "filters": [["p", ["a"]]]}),
        ] {
            assert!(
                serde_json::from_value::<MeterInput>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn serialises_flat_and_reads_back() {
        let m = tokens_meter();
        let value = serde_json::to_value(&m).expect("serialise");
        assert_eq!(
            value,
            json!({
                "id": "tokens",
                "event_name": "llm.completion",
                "aggregation": "SUM",
                "property": "tokens",
                "filters": [
                    {"property": "model", "in": ["gpt-4", "gpt-4o"]},
                    {"property": "tier", "in": [1, true]}
                ]
            })
        );
        assert_eq!(
            serde_json::from_value::<MeterDefinition>(value).expect("parse"),
            m
        );

        let count =
            meter(json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT"}))
                .expect("valid");
        let value = serde_json::to_value(&count).expect("serialise");
        assert_eq!(
            value,
            json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT", "filters": []})
        );
        assert_eq!(
            serde_json::from_value::<MeterDefinition>(value).expect("parse"),
            count
        );
    }

    #[test]
    fn filter_numbers_survive_a_round_trip() {
        let m = meter(json!({
            "id": "m", "event_name": "e", "aggregation": "COUNT",
            "filters": [{"property": "p", "in": [0.1, -2.5, 1.0, 18446744073709551615u64, -9007199254740993i64, 1e25]}]
        }))
        .expect("valid");
        let text = serde_json::to_string(&m).expect("serialise");
        let back: MeterDefinition = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, m, "{text}");
        assert!(
            text.contains("[0.1,-2.5,1,18446744073709551615,-9007199254740993,"),
            "{text}"
        );
    }
}

//! Property filters: [`PropertyFilter`] (a property and the [`FilterValue`]s it may equal) and
//! their validation from the client's [`FilterInput`].
//!
//! Rule kept here: a filter matches only a present property equal to one of its values (numbers
//! by value, never a string against a number); a meter has at most [`MAX_FILTERS`] filters, one
//! per property, each listing 1 to [`MAX_FILTER_VALUES`] values.

use std::collections::HashSet;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::{number_to_decimal, FilterInput, PropertyName, MAX_FILTERS, MAX_FILTER_VALUES};
use crate::error::SchemaError;

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

pub(super) fn parse_filters(inputs: Vec<FilterInput>) -> Result<Vec<PropertyFilter>, SchemaError> {
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

//! Meter versions (`meter_versions`): what a meter counted before its aggregation (or the
//! property it reads) changed, and until when.
//!
//! Rules kept here:
//! - A change of what a meter with usage counts never reaches back: it takes effect at the
//!   first window boundary at or after `now` plus the change lead (`INGEST_MAX_FUTURE_SECONDS`
//!   plus a minute of clock skew: an event that far ahead may already be counted under the
//!   old definition). Every window that starts before then keeps the old definition, for its
//!   late events too, so what was billed is never recomputed under the new one; every window
//!   from then on counts under the new one. An event is counted under the definition in
//!   force at its timestamp, so a window never mixes two. (A meter without usage changes at
//!   once: nothing was counted under the old definition.)
//! - A change still further ahead than the lead has counted nothing yet: a new edit replaces
//!   it and keeps its effective time. One nearer than that is fixed, and an edit then gets the
//!   next boundary after the lead.
//! - The Stripe meter's formula cannot change (`sum` for COUNT and SUM, `last` for MAX,
//!   LATEST and COUNT_UNIQUE), so an edit across formulas is refused: such a meter is a new
//!   meter with a new Stripe meter.
//! - For a meter that bills the period to date, the new definition counts from its effective
//!   time: after it, a window carries the new definition's value over the part of the period
//!   since the change (the old and the new values are not comparable, and Stripe's `last`
//!   bills the period's final value).

use std::collections::HashMap;

use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use meterline_schemas::{Aggregation, EnvironmentId, MeterId, TenantId};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use crate::meters::MeterStoreError;
use crate::scope_map::ScopeMap;

/// A definition a meter had before a change: in force until `until` (exclusive), from the
/// `until` of the version before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EarlierDefinition {
    #[serde(serialize_with = "kind")]
    pub aggregation: Aggregation,
    /// The property it read (none for COUNT).
    pub property: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

fn kind<S: serde::Serializer>(a: &Aggregation, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.kind())
}

/// A meter's earlier definitions, oldest first. Empty for a meter that never changed what it
/// counts: then its current aggregation holds at every instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AggregationHistory {
    earlier: Vec<EarlierDefinition>,
}

impl AggregationHistory {
    pub fn new(mut earlier: Vec<EarlierDefinition>) -> Self {
        earlier.sort_by_key(|d| d.until);
        Self { earlier }
    }

    pub fn earlier(&self) -> &[EarlierDefinition] {
        &self.earlier
    }

    /// The aggregation in force at `at` (`current` after every earlier one), and since when
    /// (`None`: since the meter was created).
    pub fn at<'a>(
        &'a self,
        current: &'a Aggregation,
        at: OffsetDateTime,
    ) -> (&'a Aggregation, Option<OffsetDateTime>) {
        let i = self.earlier.partition_point(|d| d.until <= at);
        let since = i.checked_sub(1).map(|p| self.earlier[p].until);
        match self.earlier.get(i) {
            Some(d) => (&d.aggregation, since),
            None => (current, since),
        }
    }
}

/// What an edit of a meter's aggregation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changes in what is counted.
    Unchanged,
    /// A pending change is replaced; it still takes effect at `effective_from`.
    Replace { effective_from: OffsetDateTime },
    /// The current definition is kept until `effective_from`, the new one after.
    Schedule { effective_from: OffsetDateTime },
}

/// Why an edit of what a meter counts is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{from} needs a Stripe meter whose formula is {from_formula}, {to} one whose formula is \
     {to_formula}"
)]
pub struct FormulaChange {
    pub from: &'static str,
    pub from_formula: &'static str,
    pub to: &'static str,
    pub to_formula: &'static str,
}

/// The rule of an edit from `current` to `new` for a meter with usage and `history`: `horizon`
/// is now plus the change lead, `boundary` the first window boundary at or after it.
pub fn plan(
    history: &AggregationHistory,
    current: &Aggregation,
    new: &Aggregation,
    horizon: OffsetDateTime,
    boundary: OffsetDateTime,
) -> Result<Plan, FormulaChange> {
    if current == new {
        return Ok(Plan::Unchanged);
    }
    let (from, to) = (current.stripe_formula(), new.stripe_formula());
    if from != to {
        return Err(FormulaChange {
            from: current.kind(),
            from_formula: from.as_str(),
            to: new.kind(),
            to_formula: to.as_str(),
        });
    }
    Ok(match history.earlier.last() {
        // The latest change has counted nothing yet: replace it.
        Some(pending) if pending.until > horizon => Plan::Replace {
            effective_from: pending.until,
        },
        _ => Plan::Schedule {
            effective_from: boundary,
        },
    })
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    tenant_id: String,
    environment_id: String,
    meter_id: String,
    aggregation: String,
    property: Option<String>,
    until: OffsetDateTime,
}

impl VersionRow {
    fn definition(&self) -> Result<EarlierDefinition, MeterStoreError> {
        let aggregation =
            Aggregation::parse(&self.aggregation, self.property.as_deref()).map_err(|e| {
                MeterStoreError::Corrupt(format!("meter {} version: {e}", self.meter_id))
            })?;
        Ok(EarlierDefinition {
            aggregation,
            property: self.property.clone(),
            until: self.until,
        })
    }
}

const COLUMNS: &str = "tenant_id, environment_id, meter_id, aggregation, property, until";

/// The history of one meter of `scope`.
pub async fn load(
    pool: &PgPool,
    scope: &TenantScope,
    meter: &MeterId,
) -> Result<AggregationHistory, MeterStoreError> {
    let rows: Vec<VersionRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM meter_versions
         WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3"
    ))
    .bind_scope(scope)
    .bind(meter.as_str())
    .fetch_all(pool)
    .await?;
    let earlier = rows
        .iter()
        .map(VersionRow::definition)
        .collect::<Result<_, _>>()?;
    Ok(AggregationHistory::new(earlier))
}

/// The histories of every meter that ever changed, of every tenant: the aggregator's read for
/// its meter cache (the table holds one row per change).
pub async fn load_all(
    pool: &PgPool,
) -> Result<ScopeMap<HashMap<MeterId, AggregationHistory>>, MeterStoreError> {
    let rows: Vec<VersionRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM meter_versions"))
        .fetch_all(pool)
        .await?;
    let mut grouped: HashMap<(TenantId, EnvironmentId), HashMap<MeterId, Vec<EarlierDefinition>>> =
        HashMap::new();
    for row in &rows {
        let corrupt = |e: meterline_schemas::SchemaError| {
            MeterStoreError::Corrupt(format!("meter {} version: {e}", row.meter_id))
        };
        let key = (
            TenantId::parse(&row.tenant_id).map_err(corrupt)?,
            EnvironmentId::parse(&row.environment_id).map_err(corrupt)?,
        );
        let meter = MeterId::parse(&row.meter_id).map_err(corrupt)?;
        grouped
            .entry(key)
            .or_default()
            .entry(meter)
            .or_default()
            .push(row.definition()?);
    }
    Ok(grouped
        .into_iter()
        .map(|(scope, meters)| {
            let meters = meters
                .into_iter()
                .map(|(id, earlier)| (id, AggregationHistory::new(earlier)))
                .collect();
            (scope, meters)
        })
        .collect())
}

/// Records that `meter` counted `aggregation` until `until`.
pub(crate) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    scope: &TenantScope,
    meter: &MeterId,
    aggregation: &Aggregation,
    until: OffsetDateTime,
) -> Result<(), MeterStoreError> {
    sqlx::query(
        "INSERT INTO meter_versions
             (tenant_id, environment_id, meter_id, aggregation, property, until)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind_scope(scope)
    .bind(meter.as_str())
    .bind(aggregation.kind())
    .bind(aggregation.property().map(|p| p.as_str()))
    .bind(until)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::PropertyName;
    use time::macros::datetime;

    fn sum(p: &str) -> Aggregation {
        Aggregation::Sum(PropertyName::parse(p).unwrap())
    }

    #[test]
    fn each_instant_counts_under_the_definition_in_force_then() {
        let history = AggregationHistory::new(vec![
            EarlierDefinition {
                aggregation: Aggregation::Count,
                property: None,
                until: datetime!(2026-12-04 12:00 UTC),
            },
            EarlierDefinition {
                aggregation: sum("tokens"),
                property: Some("tokens".into()),
                until: datetime!(2026-12-04 10:00 UTC),
            },
        ]);
        let current = sum("tokens_v2");
        let at = |t| history.at(&current, t);
        assert_eq!(at(datetime!(2026-12-04 09:59 UTC)), (&sum("tokens"), None));
        assert_eq!(
            at(datetime!(2026-12-04 10:00 UTC)),
            (&Aggregation::Count, Some(datetime!(2026-12-04 10:00 UTC)))
        );
        assert_eq!(
            at(datetime!(2026-12-04 12:30 UTC)),
            (&current, Some(datetime!(2026-12-04 12:00 UTC)))
        );
        let never_changed = AggregationHistory::default();
        assert_eq!(
            never_changed.at(&current, datetime!(2020-01-01 00:00 UTC)),
            (&current, None)
        );
    }

    #[test]
    fn a_change_waits_for_the_lead_and_never_crosses_formulas() {
        let horizon = datetime!(2026-12-04 10:06 UTC);
        let boundary = datetime!(2026-12-04 11:00 UTC);
        let none = AggregationHistory::default();
        assert_eq!(
            plan(&none, &sum("a"), &sum("a"), horizon, boundary),
            Ok(Plan::Unchanged)
        );
        assert_eq!(
            plan(&none, &sum("a"), &Aggregation::Count, horizon, boundary),
            Ok(Plan::Schedule {
                effective_from: boundary
            })
        );
        let seats = PropertyName::parse("seats").unwrap();
        let refused = plan(
            &none,
            &Aggregation::Count,
            &Aggregation::Max(seats.clone()),
            horizon,
            boundary,
        )
        .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "COUNT needs a Stripe meter whose formula is sum, MAX one whose formula is last"
        );
        assert_eq!(
            plan(
                &none,
                &Aggregation::Latest(seats.clone()),
                &Aggregation::Max(seats),
                horizon,
                boundary
            ),
            Ok(Plan::Schedule {
                effective_from: boundary
            })
        );
        // A pending change past the horizon is replaced, keeping its time; one within it is
        // fixed, and the next change follows it.
        let pending = |until| {
            AggregationHistory::new(vec![EarlierDefinition {
                aggregation: sum("a"),
                property: Some("a".into()),
                until,
            }])
        };
        let far = datetime!(2026-12-04 12:00 UTC);
        assert_eq!(
            plan(&pending(far), &sum("b"), &sum("c"), horizon, boundary),
            Ok(Plan::Replace {
                effective_from: far
            })
        );
        let near = datetime!(2026-12-04 10:05 UTC);
        assert_eq!(
            plan(&pending(near), &sum("b"), &sum("c"), horizon, boundary),
            Ok(Plan::Schedule {
                effective_from: boundary
            })
        );
    }
}

//! Stripe's asynchronous meter error reports (`stripe_meter_error_reports`):
//! `v1.billing.meter.error_report_triggered` and `v1.billing.meter.no_meter_found`, one row
//! per sample error, read back by meter event identifier.
//!
//! Rule kept here: a repeated delivery changes nothing, and the details fetched later for a
//! thin event replace the row without identifier its first delivery left.

use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use meterline_schemas::{EnvironmentId, StripeEventId, StripeEventType, TenantId};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::{MappingError, MappingStore};

/// One of Stripe's asynchronous meter event error reports, as the consumer parsed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReport {
    pub stripe_event_id: StripeEventId,
    /// `v1.billing.meter.error_report_triggered` or `v1.billing.meter.no_meter_found`.
    pub event_type: StripeEventType,
    pub occurred_at: OffsetDateTime,
    /// The meter (`mtr_...`) of the thin event's `related_object`, if it names one.
    pub stripe_meter_id: Option<String>,
    /// The event as received.
    pub raw: Value,
    /// One entry per sample error; empty for a thin event whose details (`data`) were not
    /// fetched, which is recorded as one row without identifier.
    pub entries: Vec<ErrorReportEntry>,
}

/// One sample error of a report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorReportEntry {
    /// The failed meter event's `identifier`.
    pub identifier: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub meter_event_name: Option<String>,
    pub provider_customer_id: Option<String>,
}

/// A stored error report row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredErrorReport {
    pub stripe_event_id: String,
    pub event_type: String,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub meter_event_name: Option<String>,
    pub stripe_meter_id: Option<String>,
    pub provider_customer_id: Option<String>,
    pub identifier: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
}

#[derive(sqlx::FromRow)]
struct ErrorReportRow {
    stripe_event_id: String,
    event_type: String,
    error_code: Option<String>,
    error_message: Option<String>,
    meter_event_name: Option<String>,
    stripe_meter_id: Option<String>,
    provider_customer_id: Option<String>,
    identifier: String,
    occurred_at: OffsetDateTime,
}

impl From<ErrorReportRow> for StoredErrorReport {
    fn from(row: ErrorReportRow) -> Self {
        Self {
            stripe_event_id: row.stripe_event_id,
            event_type: row.event_type,
            error_code: row.error_code,
            error_message: row.error_message,
            meter_event_name: row.meter_event_name,
            stripe_meter_id: row.stripe_meter_id,
            provider_customer_id: row.provider_customer_id,
            identifier: Some(row.identifier).filter(|i| !i.is_empty()),
            occurred_at: row.occurred_at,
        }
    }
}

impl MappingStore {
    /// Records an error report; a repeated delivery changes nothing. Returns the number of rows
    /// that were new. Details recorded later for the same event (after fetching it) replace the
    /// row without identifier that its thin delivery left.
    pub async fn record_error_report(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        report: &ErrorReport,
    ) -> Result<u32, MappingError> {
        let mut tx = self.pool.begin().await?;
        let placeholder = [ErrorReportEntry::default()];
        let entries: &[ErrorReportEntry] = if report.entries.is_empty() {
            &placeholder
        } else {
            sqlx::query(
                "DELETE FROM stripe_meter_error_reports
                 WHERE tenant_id = $1 AND environment_id = $2 AND stripe_event_id = $3
                   AND identifier = '' AND error_code IS NULL",
            )
            .bind(tenant.as_str())
            .bind(env.as_str())
            .bind(report.stripe_event_id.as_str())
            .execute(&mut *tx)
            .await?;
            &report.entries
        };
        let mut inserted = 0;
        for entry in entries {
            let new: bool = sqlx::query_scalar(
                "INSERT INTO stripe_meter_error_reports
                     (tenant_id, environment_id, stripe_event_id, event_type, error_code,
                      error_message, meter_event_name, stripe_meter_id, provider_customer_id,
                      identifier, occurred_at, raw)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (tenant_id, environment_id, stripe_event_id, identifier) DO UPDATE
                 SET error_code = COALESCE(stripe_meter_error_reports.error_code, EXCLUDED.error_code),
                     error_message =
                         COALESCE(stripe_meter_error_reports.error_message, EXCLUDED.error_message),
                     meter_event_name = COALESCE(stripe_meter_error_reports.meter_event_name,
                                                 EXCLUDED.meter_event_name),
                     provider_customer_id = COALESCE(stripe_meter_error_reports.provider_customer_id,
                                                     EXCLUDED.provider_customer_id)
                 RETURNING (xmax = 0)",
            )
            .bind(tenant.as_str())
            .bind(env.as_str())
            .bind(report.stripe_event_id.as_str())
            .bind(report.event_type.as_str())
            .bind(&entry.error_code)
            .bind(&entry.error_message)
            .bind(&entry.meter_event_name)
            .bind(&report.stripe_meter_id)
            .bind(&entry.provider_customer_id)
            .bind(entry.identifier.as_deref().unwrap_or(""))
            .bind(report.occurred_at)
            .bind(&report.raw)
            .fetch_one(&mut *tx)
            .await?;
            inserted += u32::from(new);
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// The error reports naming any of `identifiers` (meter event identifiers), newest first.
    pub async fn error_reports_for_identifiers(
        &self,
        scope: &TenantScope,
        identifiers: &[String],
    ) -> Result<Vec<StoredErrorReport>, MappingError> {
        if identifiers.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<ErrorReportRow> = sqlx::query_as(
            "SELECT stripe_event_id, event_type, error_code, error_message, meter_event_name,
                    stripe_meter_id, provider_customer_id, identifier, occurred_at
             FROM stripe_meter_error_reports
             WHERE tenant_id = $1 AND environment_id = $2 AND identifier = ANY($3)
             ORDER BY occurred_at DESC, stripe_event_id, identifier",
        )
        .bind_scope(scope)
        .bind(identifiers)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(StoredErrorReport::from).collect())
    }
}

//! The ledger as the sync API reads and asks it: manual sync jobs, the status and batches
//! views, retries of failed windows, and the sums the reconciliation report compares with
//! Stripe's.

use super::*;
use meterline_common::postgres::BindScope;

impl Ledger {
    /// Creates a manual sync job.
    pub async fn create_job(&self, scope: &TenantScope, job: &NewJob) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO sync_jobs (id, tenant_id, environment_id, entity_type, entity_id,
                 meter_id, time_from, time_to, force_rerun)
             VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(job.id.to_string())
        .bind_scope(scope)
        .bind(&job.entity_type)
        .bind(job.entity_id.as_ref().map(CustomerId::as_str))
        .bind(job.meter_id.as_ref().map(MeterId::as_str))
        .bind(job.from)
        .bind(job.to)
        .bind(job.force_rerun)
        .execute(&self.pool)
        .await
        .map_err(db("creating a sync job"))?;
        Ok(())
    }

    /// A job of `scope` and the states of the windows it covers.
    pub async fn job(&self, scope: &TenantScope, id: &JobId) -> Result<Option<JobView>, Error> {
        let row: Option<JobRow> = sqlx::query_as(
            "SELECT id::text AS id, entity_type, entity_id, meter_id, time_from, time_to,
                    force_rerun, created_at
             FROM sync_jobs WHERE id = $1::uuid AND tenant_id = $2 AND environment_id = $3",
        )
        .bind(id.to_string())
        .bind_scope(scope)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a sync job"))?;
        let Some(row) = row else { return Ok(None) };
        let counts: Vec<(String, i64)> = scoped(
            "SELECT sync_status, count(*) FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2
               AND ($3::text IS NULL OR entity_id = $3) AND ($4::text IS NULL OR meter_id = $4)
               AND window_start < $6 AND window_end > $5
             GROUP BY sync_status ORDER BY sync_status",
            scope,
        )
        .bind(&row.entity_id)
        .bind(&row.meter_id)
        .bind(row.time_from)
        .bind(row.time_to)
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting a job's windows"))?;
        let resynced: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2 AND last_job_id = $3::uuid",
        )
        .bind_scope(scope)
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(db("counting resynced windows"))?;
        Ok(Some(JobView {
            windows_by_status: counts.into_iter().collect(),
            windows_resynced: resynced,
            job: row,
        }))
    }

    /// Counts by status, the last success, the oldest window still owed, pending mappings.
    pub async fn status(&self, scope: &TenantScope) -> Result<StatusView, Error> {
        let counts: Vec<(String, i64)> = scoped(
            "SELECT sync_status, count(*) FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2 GROUP BY sync_status",
            scope,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting windows"))?;
        let (last_success, oldest_owed): (Option<OffsetDateTime>, Option<OffsetDateTime>) = scoped(
            "SELECT max(synced_at),
                    min(window_end) FILTER (WHERE sync_status IN
                        ('pending', 'in_flight', 'pending_mapping'))
             FROM stripe_sync_batches WHERE tenant_id = $1 AND environment_id = $2",
            scope,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading sync progress"))?;
        let now = OffsetDateTime::now_utc();
        let counts: std::collections::BTreeMap<String, i64> = counts.into_iter().collect();
        Ok(StatusView {
            pending_mappings: counts
                .get(LedgerState::PendingMapping.as_str())
                .copied()
                .unwrap_or(0),
            windows_by_status: counts,
            last_success_at: last_success,
            lag_seconds: oldest_owed.map(|t| (now - t).whole_seconds().max(0)),
        })
    }

    /// Windows of `scope`, newest first, filtered and paged by id.
    pub async fn batches(
        &self,
        scope: &TenantScope,
        f: &BatchFilter,
    ) -> Result<Vec<BatchView>, Error> {
        scoped(
            "SELECT id, entity_id, meter_id, window_start, window_end, aggregated_quantity,
                    event_count, window_revision, synced_quantity, accounted_quantity,
                    sync_status, attempts,
                    stripe_event_id, last_error, created_at, updated_at, synced_at
             FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2
               AND ($3::text IS NULL OR sync_status = $3)
               AND ($4::text IS NULL OR entity_id = $4)
               AND ($5::text IS NULL OR meter_id = $5)
               AND ($6::bigint IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $7",
            scope,
        )
        .bind(&f.status)
        .bind(f.customer_id.as_ref().map(CustomerId::as_str))
        .bind(f.meter_id.as_ref().map(MeterId::as_str))
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing windows"))
    }

    /// Re-opens failed (and needs-reconciliation, when asked) windows of `scope`; `ids`
    /// narrows it. Returns how many.
    pub async fn retry(
        &self,
        scope: &TenantScope,
        ids: Option<&[i64]>,
        include_reconciliation: bool,
    ) -> Result<u64, Error> {
        let done = sqlx::query(
            "UPDATE stripe_sync_batches
             SET sync_status = 'pending', next_attempt_at = now(), attempts = 0, updated_at = now()
             WHERE tenant_id = $1 AND environment_id = $2
               AND (sync_status = 'failed' OR ($4 AND sync_status = 'needs_reconciliation'))
               AND ($3::bigint[] IS NULL OR id = ANY($3))",
        )
        .bind_scope(scope)
        .bind(ids)
        .bind(include_reconciliation)
        .execute(&self.pool)
        .await
        .map_err(db("retrying windows"))?;
        Ok(done.rows_affected())
    }

    /// Per (customer, meter) of `scope` over `[from, to)`, for the reconciliation report: the
    /// whole numbers Stripe accepted, the exact quantity they account for, and the exact
    /// total of the latest window totals; for a meter mapped to a `last` Stripe meter, those
    /// of the range's latest window.
    pub async fn synced_totals(
        &self,
        scope: &TenantScope,
        customer: Option<&CustomerId>,
        meter: Option<&MeterId>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LedgerTotals>, Error> {
        // A `last` meter's windows carry the period to date and Stripe bills the last one:
        // its line is the range's latest window, not a sum.
        scoped(
            "WITH b AS (
                 SELECT b.entity_id, b.meter_id, b.window_start, b.synced_quantity,
                        b.accounted_quantity, b.aggregated_quantity,
                        COALESCE(m.formula = 'last', false) AS last
                 FROM stripe_sync_batches b
                 LEFT JOIN stripe_meter_mappings m
                   ON m.tenant_id = b.tenant_id AND m.environment_id = b.environment_id
                  AND m.meter_id = b.meter_id
                 WHERE b.tenant_id = $1 AND b.environment_id = $2
                   AND ($3::text IS NULL OR b.entity_id = $3)
                   AND ($4::text IS NULL OR b.meter_id = $4)
                   AND b.window_start >= $5 AND b.window_end <= $6),
             latest AS (
                 SELECT DISTINCT ON (entity_id, meter_id) * FROM b WHERE last
                 ORDER BY entity_id, meter_id, window_start DESC)
             SELECT entity_id, meter_id, sum(synced_quantity) AS synced,
                    sum(accounted_quantity) AS accounted, sum(aggregated_quantity) AS exact
             FROM b WHERE NOT last GROUP BY entity_id, meter_id
             UNION ALL
             SELECT entity_id, meter_id, synced_quantity, accounted_quantity,
                    aggregated_quantity
             FROM latest
             ORDER BY entity_id, meter_id",
            scope,
        )
        .bind(customer.map(CustomerId::as_str))
        .bind(meter.map(MeterId::as_str))
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(db("summing the ledger"))
    }
}

/// One line of [`Ledger::synced_totals`].
#[derive(Debug, sqlx::FromRow)]
pub struct LedgerTotals {
    pub entity_id: String,
    pub meter_id: String,
    /// Whole numbers Stripe accepted.
    pub synced: Decimal,
    /// The exact quantity those account for.
    pub accounted: Decimal,
    /// The exact total of the latest window totals.
    pub exact: Decimal,
}

/// A manual sync request.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub entity_type: String,
    pub entity_id: Option<CustomerId>,
    pub meter_id: Option<MeterId>,
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub force_rerun: bool,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub entity_type: String,
    pub entity_id: Option<String>,
    pub meter_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub time_from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub time_to: OffsetDateTime,
    pub force_rerun: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: JobRow,
    pub windows_by_status: std::collections::BTreeMap<String, i64>,
    pub windows_resynced: i64,
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub windows_by_status: std::collections::BTreeMap<String, i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// Seconds since the end of the oldest window still owed to Stripe.
    pub lag_seconds: Option<i64>,
    pub pending_mappings: i64,
}

#[derive(Debug, Default)]
pub struct BatchFilter {
    pub status: Option<String>,
    pub customer_id: Option<CustomerId>,
    pub meter_id: Option<MeterId>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct BatchView {
    pub id: i64,
    pub entity_id: String,
    pub meter_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub window_end: OffsetDateTime,
    pub aggregated_quantity: Decimal,
    pub event_count: i64,
    pub window_revision: i32,
    /// The whole numbers Stripe accepted for this window.
    pub synced_quantity: Decimal,
    /// The exact part of `aggregated_quantity` those account for; the two differ by what the
    /// customer and meter's rounding carried into or out of this window.
    pub accounted_quantity: Decimal,
    pub sync_status: String,
    pub attempts: i32,
    pub stripe_event_id: Option<String>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub synced_at: Option<OffsetDateTime>,
}

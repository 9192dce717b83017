//! The import jobs in PostgreSQL (`stripe_customer_imports`): creating, viewing, leasing, and
//! applying one page of customers with the job's cursor and counts in one transaction.
//!
//! Rule kept here: a worker writes to its job only while it holds the job's lease and the job
//! runs ([`HELD`]), so a sink that lost the job writes nothing.

use super::*;
use meterline_common::postgres::BindScope;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::Postgres;

/// The condition of a worker's writes to its job: `$1` is the job, `$2` the worker, which
/// still holds the lease (it did not expire to another sink) of the job still running.
const HELD: &str = "id = $1 AND lease_owner = $2 AND status = 'running'";

/// `sql`, an UPDATE of a job `WHERE {HELD}`, with the job and the worker bound as `$1`, `$2`.
fn held<'q>(sql: &'q str, job: &Job, owner: Uuid) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).bind(job.id.as_uuid()).bind(owner)
}

/// The PostgreSQL store of import jobs.
#[derive(Clone)]
pub struct ImportStore {
    pool: PgPool,
}

impl ImportStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Records a new running job for `scope`, unless one is running already.
    pub async fn start(&self, scope: &TenantScope) -> Result<Started, Error> {
        let id = JobId::generate();
        // ON CONFLICT DO NOTHING: the one-running-job index answers the race between two
        // requests, without matching error codes.
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "INSERT INTO stripe_customer_imports (id, tenant_id, environment_id, requested_by)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id.as_uuid())
        .bind_scope(scope)
        .bind(&scope.subject)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("starting an import"))?;
        if let Some(row) = row {
            return Ok(Started::Created(Box::new(row.try_into()?)));
        }
        let running: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM stripe_customer_imports
             WHERE tenant_id = $1 AND environment_id = $2 AND status = 'running'",
        )
        .bind_scope(scope)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading the running import"))?;
        match running {
            Some(id) => Ok(Started::AlreadyRunning(JobId::from(id))),
            // It finished in between: the caller may simply ask again.
            None => Err(Error::Task(
                "an import finished while another started".into(),
            )),
        }
    }

    /// The job `id` of `scope`; another tenant's job is not found.
    pub async fn view(&self, scope: &TenantScope, id: &JobId) -> Result<Option<ImportView>, Error> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM stripe_customer_imports
             WHERE id = $1 AND tenant_id = $2 AND environment_id = $3"
        ))
        .bind(id.as_uuid())
        .bind_scope(scope)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading an import"))?;
        row.map(ImportView::try_from).transpose()
    }

    /// Takes a running job whose lease is free or expired (the oldest first).
    pub(super) async fn claim(&self, owner: Uuid, lease: Duration) -> Result<Option<Job>, Error> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "UPDATE stripe_customer_imports
             SET lease_owner = $1, lease_until = now() + make_interval(secs => $2),
                 updated_at = now()
             WHERE id = (SELECT id FROM stripe_customer_imports
                         WHERE status = 'running'
                           AND (lease_until IS NULL OR lease_until < now())
                         ORDER BY created_at
                         LIMIT 1
                         FOR UPDATE SKIP LOCKED)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("claiming an import"))?;
        row.map(|r| r.job()).transpose()
    }

    /// Extends the lease; false when another sink holds the job now (or it ended).
    pub(super) async fn renew(
        &self,
        job: &Job,
        owner: Uuid,
        lease: Duration,
    ) -> Result<bool, Error> {
        let done = held(
            &format!(
                "UPDATE stripe_customer_imports
                 SET lease_until = now() + make_interval(secs => $3)
                 WHERE {HELD}"
            ),
            job,
            owner,
        )
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db("renewing an import lease"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Applies one page and moves the cursor past it, in one transaction; false (and nothing
    /// written) when the lease was lost.
    pub(super) async fn apply_page(
        &self,
        job: &mut Job,
        owner: Uuid,
        page: &CustomerPage,
        observed: i64,
        lease: Duration,
    ) -> Result<bool, Error> {
        let (t, e) = (job.tenant_id.as_str(), job.environment_id.as_str());
        let actor = job.actor();
        let writer = Writer {
            actor: &actor,
            source: MappingSource::Import,
        };
        let mut progress = job.progress.clone();
        let mut tx = mappings::begin_locked(&self.pool, (t, e))
            .await
            .map_err(db("locking the customer mappings"))?;
        for customer in &page.data {
            let imported = match snapshot(job, observed, customer) {
                Ok(event) => mappings::import_snapshot(&mut tx, (t, e), &event, &writer)
                    .await
                    .map_err(|e| Error::Task(format!("importing {}: {e}", customer.id)))?,
                Err(reason) => Imported::Conflict {
                    customer_id: String::new(),
                    reason,
                },
            };
            if matches!(imported, Imported::Created { .. }) {
                crate::metrics::customer_mappings_created("import", 1);
            }
            progress.count(customer, imported);
        }
        progress.pages += 1;
        if let Some(last) = page.data.last() {
            progress.cursor = Some(last.id.clone());
        }
        // An empty page ends the customers even if Stripe said has_more: there is no cursor
        // to go on. The subscriptions follow.
        progress.customers_done = !page.has_more || page.data.is_empty();
        let samples = |s: &Vec<Sample>| serde_json::to_value(s).unwrap_or_default();
        let updated = held(
            &format!(
                "UPDATE stripe_customer_imports
                 SET cursor = $3, pages = $4, customers_seen = $5, mapped_created = $6,
                     mapped_unchanged = $7, conflicts = $8, unmapped = $9, retired = $10,
                     conflict_sample = $11, unmapped_sample = $12, updated_at = now(),
                     customers_done = $13, lease_until = now() + make_interval(secs => $14)
                 WHERE {HELD}"
            ),
            job,
            owner,
        )
        .bind(&progress.cursor)
        .bind(progress.pages)
        .bind(progress.customers_seen)
        .bind(progress.mapped_created)
        .bind(progress.mapped_unchanged)
        .bind(progress.conflicts)
        .bind(progress.unmapped)
        .bind(progress.retired)
        .bind(samples(&progress.conflict_sample))
        .bind(samples(&progress.unmapped_sample))
        .bind(progress.customers_done)
        .bind(lease.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(db("recording an import page"))?;
        if updated.rows_affected() != 1 {
            // Another sink took the job over: everything of this page is rolled back.
            tx.rollback().await.map_err(db("rolling back a page"))?;
            return Ok(false);
        }
        tx.commit().await.map_err(db("committing an import page"))?;
        job.progress = progress;
        Ok(true)
    }

    /// Records the periods of one page of subscriptions and moves the subscriptions cursor
    /// past it; the last page completes the job. False when the lease was lost (periods
    /// recorded before it stay: each is recorded once whoever redoes the page).
    pub(super) async fn apply_subscription_page(
        &self,
        job: &mut Job,
        owner: Uuid,
        page: &SubscriptionPage,
        observed: i64,
        lease: Duration,
    ) -> Result<bool, Error> {
        let mut progress = job.progress.clone();
        for subscription in &page.data {
            let periods = match mappings::periods_of(subscription, observed) {
                Ok(periods) => periods,
                Err(reason) => {
                    let id = subscription.get("id").and_then(|i| i.as_str());
                    tracing::warn!(
                        job_id = %job.id,
                        subscription_id = id.unwrap_or("?"),
                        %reason,
                        "a listed subscription names no usable period"
                    );
                    continue;
                }
            };
            for period in &periods {
                let recorded = billing_periods::record(
                    &self.pool,
                    &job.tenant_id,
                    &job.environment_id,
                    period,
                )
                .await
                .map_err(db("recording a subscription period"))?;
                progress.subscription_periods += i32::from(recorded);
            }
        }
        progress.subscription_pages += 1;
        if let Some(last) = page
            .data
            .last()
            .and_then(|s| s.get("id"))
            .and_then(|i| i.as_str())
        {
            progress.subscriptions_cursor = Some(last.to_owned());
        }
        let done = !page.has_more || page.data.is_empty();
        let updated = held(
            &format!(
                "UPDATE stripe_customer_imports
                 SET subscriptions_cursor = $3, subscription_pages = $4,
                     subscription_periods = $5, updated_at = now(),
                     status = CASE WHEN $6 THEN 'completed' ELSE 'running' END,
                     finished_at = CASE WHEN $6 THEN now() END,
                     lease_until = CASE WHEN $6 THEN NULL
                                        ELSE now() + make_interval(secs => $7) END
                 WHERE {HELD}"
            ),
            job,
            owner,
        )
        .bind(&progress.subscriptions_cursor)
        .bind(progress.subscription_pages)
        .bind(progress.subscription_periods)
        .bind(done)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db("recording a page of subscriptions"))?;
        if updated.rows_affected() != 1 {
            return Ok(false);
        }
        job.progress = progress;
        Ok(true)
    }

    /// Counts a failed page request: the page is tried again, unless `fatal` (no retry can
    /// help: no configuration, a refused key), which ends the job as failed.
    pub(super) async fn record_failure(
        &self,
        job: &Job,
        owner: Uuid,
        error: &str,
        fatal: bool,
    ) -> Result<(), Error> {
        held(
            &format!(
                "UPDATE stripe_customer_imports
                 SET errors = errors + 1, last_error = $3, updated_at = now(),
                     status = CASE WHEN $4 THEN 'failed' ELSE status END,
                     finished_at = CASE WHEN $4 THEN now() END,
                     lease_until = CASE WHEN $4 THEN NULL ELSE lease_until END
                 WHERE {HELD}"
            ),
            job,
            owner,
        )
        .bind(error)
        .bind(fatal)
        .execute(&self.pool)
        .await
        .map_err(db("recording an import failure"))?;
        Ok(())
    }

    /// Gives the lease up at shutdown, so that the next sink resumes at once.
    pub(super) async fn release(&self, job: &Job, owner: Uuid) -> Result<(), Error> {
        sqlx::query(
            "UPDATE stripe_customer_imports SET lease_owner = NULL, lease_until = NULL
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(job.id.as_uuid())
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db("releasing an import"))?;
        Ok(())
    }
}

/// The snapshot event of a listed customer; an error names why it cannot be applied.
pub(super) fn snapshot(
    job: &Job,
    observed: i64,
    customer: &ListedCustomer,
) -> Result<CustomerEvent, String> {
    let id = StripeCustomerId::parse(&customer.id)
        .map_err(|e| format!("stripe listed an unusable customer id: {e}"))?;
    // The id orders snapshots of one job that tie on `observed` (two Stripe customers with
    // one external id): a hash of the customer keeps it short and deterministic.
    let tie = hex::encode(&Sha256::digest(customer.id.as_bytes())[..8]);
    CustomerEvent::snapshot(
        &format!("{}_{tie}", job.id.as_str()),
        observed,
        id,
        ExternalId::from_metadata(customer.metadata.get("external_id")),
        customer.email.clone(),
        customer.name.clone(),
        customer.livemode,
    )
    .map_err(|e| e.to_string())
}

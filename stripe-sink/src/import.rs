//! Imports of a Stripe account's existing customers (`POST /v1/stripe/migrate/customers`):
//! jobs in PostgreSQL (`stripe_customer_imports`) and the loop that runs them.
//!
//! Rules kept here:
//! - A job pages through `GET /v1/customers` (`limit=100`, `starting_after` = the last
//!   customer of the page before). Each page is applied in ONE transaction together with the
//!   job's cursor and counts, so after a crash the job resumes at the first page not applied:
//!   nothing is skipped, nothing counted twice, and the result is the one an uninterrupted run
//!   gives.
//! - A job is worked on by the replica holding its lease (renewed every page); a crashed
//!   replica's lease expires and any sink (a restarted one included) takes the job over. A
//!   page commit checks the lease, so a replica that lost it writes nothing.
//! - Customers are applied by the mapping rules of [`crate::mappings`] (a listed customer is a
//!   snapshot event), so imports and webhooks agree whatever their order.
//! - Requests are paced by the account's token bucket and circuit breaker, the very ones the
//!   sync uses ([`crate::pacing`]); the API key is decrypted through the audited path.

use std::sync::Arc;
use std::time::Duration;

use meterline_accounts::audit::{Actor, Purpose};
use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_common::auth::TenantScope;
use meterline_schemas::{EnvironmentId, JobId, TenantId};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::mappings::{
    self, CustomerEvent, ExternalId, Imported, MappingSource, StripeCustomerId, Writer,
};
use crate::pacing::{default_rate, Backoff, Pacer};
use crate::stripe::{CustomerPage, ErrorClass, ListedCustomer, StripeClient};
use crate::Error;

/// Customers per page: Stripe's largest.
pub const PAGE_SIZE: u32 = 100;
/// Conflicts and unmapped customers kept as examples in a job's status.
pub const SAMPLE_SIZE: usize = 20;
/// Jobs one sink works on at once.
const CONCURRENT_JOBS: usize = 4;
/// How often unclaimed jobs (new, or left by a crashed sink) are looked for.
const POLL: Duration = Duration::from_secs(2);
/// A listed customer's snapshot is dated this long before the list was requested: Stripe's
/// clock and ours may differ by a little, and an event dated inside the margin is applied
/// after the snapshot (harmless: events applied in order end in Stripe's latest state).
const SNAPSHOT_MARGIN_SECONDS: i64 = 5;

fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Postgres { context, source }
}

// ---------------------------------------------------------------------------------------------
// The job as stored and shown

/// A conflict or unmapped customer, as an example in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub provider_customer_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub reason: String,
}

/// The running counts of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    cursor: Option<String>,
    pages: i32,
    customers_seen: i32,
    mapped_created: i32,
    mapped_unchanged: i32,
    conflicts: i32,
    unmapped: i32,
    retired: i32,
    conflict_sample: Vec<Sample>,
    unmapped_sample: Vec<Sample>,
}

impl Progress {
    fn count(&mut self, customer: &ListedCustomer, imported: Imported) {
        self.customers_seen += 1;
        let sample = |customer_id: Option<String>, reason: String| Sample {
            provider_customer_id: customer.id.clone(),
            customer_id,
            email: customer.email.clone(),
            reason,
        };
        match imported {
            Imported::Created { retired } => {
                self.mapped_created += 1;
                self.retired += retired as i32;
            }
            Imported::Unchanged => self.mapped_unchanged += 1,
            Imported::Conflict {
                customer_id,
                reason,
            } => {
                self.conflicts += 1;
                if self.conflict_sample.len() < SAMPLE_SIZE {
                    self.conflict_sample.push(sample(Some(customer_id), reason));
                }
            }
            Imported::Unmapped { reason, retired } => {
                self.unmapped += 1;
                self.retired += retired as i32;
                if self.unmapped_sample.len() < SAMPLE_SIZE {
                    self.unmapped_sample.push(sample(None, reason.to_owned()));
                }
            }
        }
    }
}

/// A claimed job: what its worker needs.
#[derive(Debug, Clone)]
struct Job {
    id: JobId,
    tenant_id: TenantId,
    environment_id: EnvironmentId,
    requested_by: Option<String>,
    progress: Progress,
}

impl Job {
    fn actor(&self) -> Actor {
        Actor::Import {
            job_id: self.id.as_str().to_owned(),
            subject: self.requested_by.clone(),
        }
    }
}

const JOB_COLUMNS: &str = "id, tenant_id, environment_id, requested_by, status, cursor, pages, \
     customers_seen, mapped_created, mapped_unchanged, conflicts, unmapped, retired, \
     conflict_sample, unmapped_sample, errors, last_error, created_at, updated_at, finished_at";

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    tenant_id: String,
    environment_id: String,
    requested_by: Option<String>,
    status: String,
    cursor: Option<String>,
    pages: i32,
    customers_seen: i32,
    mapped_created: i32,
    mapped_unchanged: i32,
    conflicts: i32,
    unmapped: i32,
    retired: i32,
    conflict_sample: serde_json::Value,
    unmapped_sample: serde_json::Value,
    errors: i32,
    last_error: Option<String>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    finished_at: Option<OffsetDateTime>,
}

impl JobRow {
    fn progress(&self) -> Result<Progress, Error> {
        let samples = |value: &serde_json::Value| {
            serde_json::from_value::<Vec<Sample>>(value.clone())
                .map_err(|e| Error::Corrupt(format!("import {} samples: {e}", self.id)))
        };
        Ok(Progress {
            cursor: self.cursor.clone(),
            pages: self.pages,
            customers_seen: self.customers_seen,
            mapped_created: self.mapped_created,
            mapped_unchanged: self.mapped_unchanged,
            conflicts: self.conflicts,
            unmapped: self.unmapped,
            retired: self.retired,
            conflict_sample: samples(&self.conflict_sample)?,
            unmapped_sample: samples(&self.unmapped_sample)?,
        })
    }

    fn job(&self) -> Result<Job, Error> {
        let corrupt =
            |e: meterline_schemas::SchemaError| Error::Corrupt(format!("import {}: {e}", self.id));
        Ok(Job {
            id: JobId::from(self.id),
            tenant_id: TenantId::parse(&self.tenant_id).map_err(corrupt)?,
            environment_id: EnvironmentId::parse(&self.environment_id).map_err(corrupt)?,
            requested_by: self.requested_by.clone(),
            progress: self.progress()?,
        })
    }
}

/// `{"created", "unchanged"}` of the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MappedView {
    pub created: i32,
    pub unchanged: i32,
}

/// A count with its first examples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SampledView {
    pub count: i32,
    pub sample: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorsView {
    /// Failed page requests; each was retried.
    pub count: i32,
    pub last: Option<String>,
}

/// A job as `GET /v1/stripe/migrate/status/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImportView {
    pub id: JobId,
    /// `running`, `completed` or `failed`.
    pub status: String,
    pub requested_by: Option<String>,
    pub pages: i32,
    pub customers_seen: i32,
    /// Customers with an external id now mapped to them.
    pub mapped: MappedView,
    /// Customers with an external id the mapping rules left mapped elsewhere (or not at all).
    pub conflicts: SampledView,
    /// Customers without a usable external id; the full list is
    /// `GET /v1/stripe/customers/unmapped`.
    pub unmapped: SampledView,
    /// Earlier mappings retired because Stripe's metadata now says otherwise.
    pub retired: i32,
    pub errors: ErrorsView,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

impl TryFrom<JobRow> for ImportView {
    type Error = Error;

    fn try_from(row: JobRow) -> Result<Self, Error> {
        let progress = row.progress()?;
        Ok(Self {
            id: JobId::from(row.id),
            status: row.status,
            requested_by: row.requested_by,
            pages: progress.pages,
            customers_seen: progress.customers_seen,
            mapped: MappedView {
                created: progress.mapped_created,
                unchanged: progress.mapped_unchanged,
            },
            conflicts: SampledView {
                count: progress.conflicts,
                sample: progress.conflict_sample,
            },
            unmapped: SampledView {
                count: progress.unmapped,
                sample: progress.unmapped_sample,
            },
            retired: progress.retired,
            errors: ErrorsView {
                count: row.errors,
                last: row.last_error,
            },
            created_at: row.created_at,
            updated_at: row.updated_at,
            finished_at: row.finished_at,
        })
    }
}

/// What starting an import did.
#[derive(Debug)]
pub enum Started {
    Created(Box<ImportView>),
    /// The tenant environment already has a running import.
    AlreadyRunning(JobId),
}

// ---------------------------------------------------------------------------------------------
// The store

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
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
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
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
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
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading an import"))?;
        row.map(ImportView::try_from).transpose()
    }

    /// Takes a running job whose lease is free or expired (the oldest first).
    async fn claim(&self, owner: Uuid, lease: Duration) -> Result<Option<Job>, Error> {
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
    async fn renew(&self, job: &Job, owner: Uuid, lease: Duration) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE stripe_customer_imports
             SET lease_until = now() + make_interval(secs => $3)
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(job.id.as_uuid())
        .bind(owner)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db("renewing an import lease"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Applies one page and moves the cursor past it, in one transaction; false (and nothing
    /// written) when the lease was lost.
    async fn apply_page(
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
        // An empty page ends the job even if Stripe said has_more: there is no cursor to go on.
        let done = !page.has_more || page.data.is_empty();
        let samples = |s: &Vec<Sample>| serde_json::to_value(s).unwrap_or_default();
        let updated = sqlx::query(
            "UPDATE stripe_customer_imports
             SET cursor = $3, pages = $4, customers_seen = $5, mapped_created = $6,
                 mapped_unchanged = $7, conflicts = $8, unmapped = $9, retired = $10,
                 conflict_sample = $11, unmapped_sample = $12, updated_at = now(),
                 status = CASE WHEN $13 THEN 'completed' ELSE 'running' END,
                 finished_at = CASE WHEN $13 THEN now() END,
                 lease_until = CASE WHEN $13 THEN NULL
                                    ELSE now() + make_interval(secs => $14) END
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(job.id.as_uuid())
        .bind(owner)
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
        .bind(done)
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

    /// Counts a failed page request: the page is tried again, unless `fatal` (no retry can
    /// help: no configuration, a refused key), which ends the job as failed.
    async fn record_failure(
        &self,
        job: &Job,
        owner: Uuid,
        error: &str,
        fatal: bool,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE stripe_customer_imports
             SET errors = errors + 1, last_error = $3, updated_at = now(),
                 status = CASE WHEN $4 THEN 'failed' ELSE status END,
                 finished_at = CASE WHEN $4 THEN now() END,
                 lease_until = CASE WHEN $4 THEN NULL ELSE lease_until END
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(job.id.as_uuid())
        .bind(owner)
        .bind(error)
        .bind(fatal)
        .execute(&self.pool)
        .await
        .map_err(db("recording an import failure"))?;
        Ok(())
    }

    /// Gives the lease up at shutdown, so that the next sink resumes at once.
    async fn release(&self, job: &Job, owner: Uuid) -> Result<(), Error> {
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
fn snapshot(job: &Job, observed: i64, customer: &ListedCustomer) -> Result<CustomerEvent, String> {
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

// ---------------------------------------------------------------------------------------------
// The loop

/// Everything the import loop needs.
pub struct Importer {
    pub store: ImportStore,
    pub configs: StripeConfigStore,
    pub stripe: StripeClient,
    pub pacer: Arc<Pacer>,
    /// Between attempts of a failed page.
    pub backoff: Backoff,
    /// How long a claim holds a job without renewal: longer than one page request.
    pub lease: Duration,
    /// Woken when a job is created, so it starts without waiting for the next poll.
    pub wake: Arc<Notify>,
}

/// How one page went.
enum Step {
    More,
    Done,
    LostLease,
    /// Worth another attempt (Stripe 429/5xx/timeouts, our database).
    Retry(String, Option<Duration>),
    /// No attempt can succeed.
    Fatal(String),
}

/// Runs jobs until shutdown: claims free ones (new, or left by a crashed sink), works on up to
/// [`CONCURRENT_JOBS`] at a time. At shutdown each worker stops between pages and gives its
/// lease up.
pub async fn run(importer: Arc<Importer>, shutdown: CancellationToken) -> Result<(), Error> {
    let owner = Uuid::new_v4();
    let mut workers = JoinSet::new();
    loop {
        while workers.len() < CONCURRENT_JOBS {
            match importer.store.claim(owner, importer.lease).await {
                Ok(Some(job)) => {
                    tracing::info!(
                        job_id = %job.id,
                        tenant_id = %job.tenant_id,
                        environment_id = %job.environment_id,
                        pages_done = job.progress.pages,
                        "customer import claimed"
                    );
                    workers.spawn(work(importer.clone(), job, owner, shutdown.clone()));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming customer imports failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = importer.wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            Some(_) = workers.join_next(), if !workers.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    while workers.join_next().await.is_some() {}
    Ok(())
}

async fn work(importer: Arc<Importer>, mut job: Job, owner: Uuid, shutdown: CancellationToken) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut attempt = 0u32;
    loop {
        if shutdown.is_cancelled() {
            if let Err(e) = importer.store.release(&job, owner).await {
                tracing::warn!(job_id = %job.id, error = %e, "releasing an import failed");
            }
            return;
        }
        match page(&importer, &mut job, owner).await {
            Step::More => attempt = 0,
            Step::Done => {
                tracing::info!(
                    job_id = %job.id,
                    pages = job.progress.pages,
                    customers = job.progress.customers_seen,
                    created = job.progress.mapped_created,
                    unchanged = job.progress.mapped_unchanged,
                    conflicts = job.progress.conflicts,
                    unmapped = job.progress.unmapped,
                    "customer import completed"
                );
                return;
            }
            Step::LostLease => {
                tracing::warn!(job_id = %job.id, "customer import taken over by another sink");
                return;
            }
            Step::Fatal(error) => {
                tracing::warn!(job_id = %job.id, error = %error, "customer import failed");
                if let Err(e) = importer
                    .store
                    .record_failure(&job, owner, &error, true)
                    .await
                {
                    tracing::warn!(job_id = %job.id, error = %e, "recording a failed import");
                }
                return;
            }
            Step::Retry(error, retry_after) => {
                tracing::info!(job_id = %job.id, error = %error, attempt, "import page failed, retrying");
                if let Err(e) = importer
                    .store
                    .record_failure(&job, owner, &error, false)
                    .await
                {
                    tracing::warn!(job_id = %job.id, error = %e, "recording an import error");
                }
                let delay = importer.backoff.delay(attempt, retry_after, &mut rng);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
}

/// Fetches and applies the job's next page.
async fn page(importer: &Importer, job: &mut Job, owner: Uuid) -> Step {
    match importer.store.renew(job, owner, importer.lease).await {
        Ok(true) => {}
        Ok(false) => return Step::LostLease,
        Err(e) => return Step::Retry(e.to_string(), None),
    }
    let config = match importer
        .configs
        .for_sync(
            &job.tenant_id,
            &job.environment_id,
            &job.actor(),
            Purpose::CustomerImport,
        )
        .await
    {
        Ok(Some(config)) => config,
        Ok(None) => return Step::Fatal("stripe is not configured for this environment".into()),
        Err(e) => return Step::Retry(e.to_string(), None),
    };
    let account = importer.pacer.account(
        &crate::sync::account_of(config.api_key.expose()),
        config
            .rate_limit_per_second
            .unwrap_or_else(|| default_rate(config.api_key.livemode())),
    );
    if let Err(wait) = account.admit() {
        return Step::Retry("circuit open for this stripe account".into(), Some(wait));
    }
    account.until_ready().await;
    let observed = OffsetDateTime::now_utc().unix_timestamp() - SNAPSHOT_MARGIN_SECONDS;
    let result = importer
        .stripe
        .list_customers(&config.api_key, job.progress.cursor.as_deref(), PAGE_SIZE)
        .await;
    // The breaker counts as the sync's requests do: a 429 or a refusal means Stripe answered.
    account.record(result.as_ref().err().map(|e| e.class));
    let list = match result {
        Ok(list) => list,
        Err(e) if e.is_retriable() => return Step::Retry(e.to_string(), e.retry_after),
        Err(e) if e.class == ErrorClass::Authentication => {
            return Step::Fatal(format!(
                "stripe refused the api key ({e}); fix the stripe config, then start a new import"
            ))
        }
        Err(e) => {
            return Step::Fatal(format!(
                "stripe refused the customer list ({e}); start a new import"
            ))
        }
    };
    match importer
        .store
        .apply_page(job, owner, &list, observed, importer.lease)
        .await
    {
        Ok(true) if list.has_more && !list.data.is_empty() => Step::More,
        Ok(true) => Step::Done,
        Ok(false) => Step::LostLease,
        Err(e) => Step::Retry(e.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: &str, metadata: serde_json::Value) -> ListedCustomer {
        ListedCustomer {
            id: id.into(),
            email: Some(format!("{id}@example.com")),
            name: None,
            livemode: false,
            metadata: metadata.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn progress_counts_and_keeps_a_bounded_sample() {
        let mut p = Progress::default();
        p.count(
            &listed("cus_1", serde_json::json!({})),
            Imported::Created { retired: 1 },
        );
        p.count(&listed("cus_2", serde_json::json!({})), Imported::Unchanged);
        for i in 0..(SAMPLE_SIZE + 5) {
            p.count(
                &listed(&format!("cus_u{i}"), serde_json::json!({})),
                Imported::Unmapped {
                    reason: "missing_external_id",
                    retired: 0,
                },
            );
        }
        p.count(
            &listed("cus_3", serde_json::json!({})),
            Imported::Conflict {
                customer_id: "c1".into(),
                reason: "taken".into(),
            },
        );
        assert_eq!(p.customers_seen, 3 + SAMPLE_SIZE as i32 + 5);
        assert_eq!((p.mapped_created, p.mapped_unchanged, p.retired), (1, 1, 1));
        assert_eq!(p.unmapped, SAMPLE_SIZE as i32 + 5);
        assert_eq!(p.unmapped_sample.len(), SAMPLE_SIZE);
        assert_eq!(p.conflicts, 1);
        assert_eq!(p.conflict_sample[0].customer_id.as_deref(), Some("c1"));
        assert_eq!(
            p.unmapped_sample[0].email.as_deref(),
            Some("cus_u0@example.com")
        );
    }

    #[test]
    fn snapshots_read_the_external_id_and_tie_break_by_customer() {
        let job = Job {
            id: JobId::generate(),
            tenant_id: TenantId::parse("t").unwrap(),
            environment_id: EnvironmentId::parse("e").unwrap(),
            requested_by: None,
            progress: Progress::default(),
        };
        let a = snapshot(
            &job,
            100,
            &listed("cus_a", serde_json::json!({"external_id": "c-1"})),
        )
        .unwrap();
        let b = snapshot(
            &job,
            100,
            &listed("cus_b", serde_json::json!({"external_id": 7})),
        )
        .unwrap();
        assert_eq!(a.external_id, ExternalId::Present("c-1".parse().unwrap()));
        assert_eq!(b.external_id, ExternalId::Invalid);
        assert_eq!(a.created, 100);
        assert_ne!(a.order(), b.order());
        assert!(a.event_id.as_str().starts_with("import_"));
        assert!(snapshot(&job, 100, &listed("sub_1", serde_json::json!({}))).is_err());
    }
}

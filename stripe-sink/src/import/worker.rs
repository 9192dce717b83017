//! The loop that runs import jobs: takes leased jobs, pages through `GET /v1/customers` and
//! then `GET /v1/subscriptions` paced by the account's rate limit and breaker, and applies
//! each page through the store.

use super::*;

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
/// `CONCURRENT_JOBS` at a time. At shutdown each worker stops between pages and gives its
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
                    subscription_periods = job.progress.subscription_periods,
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
    let paced = paced_account(
        &importer.pacer,
        &importer.stripe,
        &config,
        &job.tenant_id,
        &job.environment_id,
    );
    let account = match paced.await {
        Ok(account) => account,
        Err(e) if e.class == ErrorClass::Authentication => {
            return Step::Fatal(format!(
                "stripe refused the api key when asked for its account ({e}); fix the \
                     stripe config, then start a new import"
            ))
        }
        Err(e) => return Step::Retry(e.to_string(), e.retry_after),
    };
    if let Err(not_ready) = account.ready().await {
        return Step::Retry(not_ready.why.into(), Some(not_ready.wait));
    }
    let observed = OffsetDateTime::now_utc().unix_timestamp() - SNAPSHOT_MARGIN_SECONDS;
    if job.progress.customers_done {
        let result = importer
            .stripe
            .list_subscriptions(
                &config.api_key,
                job.progress.subscriptions_cursor.as_deref(),
                PAGE_SIZE,
            )
            .await;
        account.record(result.as_ref().err().map(|e| e.class)).await;
        let list = match result {
            Ok(list) => list,
            Err(e) => return refused(e, "subscription list"),
        };
        return match importer
            .store
            .apply_subscription_page(job, owner, &list, observed, importer.lease)
            .await
        {
            Ok(true) if list.has_more && !list.data.is_empty() => Step::More,
            Ok(true) => Step::Done,
            Ok(false) => Step::LostLease,
            Err(e) => Step::Retry(e.to_string(), None),
        };
    }
    let result = importer
        .stripe
        .list_customers(&config.api_key, job.progress.cursor.as_deref(), PAGE_SIZE)
        .await;
    // The breaker counts as the sync's requests do: a 429 or a refusal means Stripe answered.
    account.record(result.as_ref().err().map(|e| e.class)).await;
    let list = match result {
        Ok(list) => list,
        Err(e) => return refused(e, "customer list"),
    };
    match importer
        .store
        .apply_page(job, owner, &list, observed, importer.lease)
        .await
    {
        // The subscriptions follow the last page of customers.
        Ok(true) => Step::More,
        Ok(false) => Step::LostLease,
        Err(e) => Step::Retry(e.to_string(), None),
    }
}

/// The step after Stripe failed a list request of `what`.
fn refused(e: crate::stripe::StripeError, what: &str) -> Step {
    if e.is_retriable() {
        Step::Retry(e.to_string(), e.retry_after)
    } else if e.class == ErrorClass::Authentication {
        Step::Fatal(format!(
            "stripe refused the api key ({e}); fix the stripe config, then start a new import"
        ))
    } else {
        Step::Fatal(format!(
            "stripe refused the {what} ({e}); start a new import"
        ))
    }
}

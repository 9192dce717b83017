//! Imports of a Stripe account's existing customers (`POST /v1/stripe/migrate/customers`):
//! the job's progress and views here, the jobs in PostgreSQL (`stripe_customer_imports`) in
//! `store.rs`, and the loop that runs them in `worker.rs`.
//!
//! Rules kept here:
//! - A job pages through `GET /v1/customers` (`limit=100`, `starting_after` = the last
//!   customer of the page before), then through `GET /v1/subscriptions?status=all`, recording
//!   each subscription's current period ([`crate::mappings::periods_of`]): billing periods
//!   that began before the webhook endpoint existed are known at once, and the aggregator
//!   recomputes the customers' period-to-date windows over them. Each page of customers is
//!   applied in ONE transaction together with the job's cursor and counts, so after a crash
//!   the job resumes at the first page not applied:
//!   nothing is skipped, nothing counted twice, and the result is the one an uninterrupted run
//!   gives.
//! - A job is worked on by the replica holding its lease (renewed every page); a crashed
//!   replica's lease expires and any sink (a restarted one included) takes the job over. A
//!   page commit checks the lease, so a replica that lost it writes nothing.
//! - Customers are applied by the mapping rules of [`crate::mappings`] (a listed customer is a
//!   snapshot event), so imports and webhooks agree whatever their order.
//! - Requests are paced by the account's rate limit and circuit breaker, the very ones the
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

use meterline_catalog::billing_periods;

use crate::error::db;
use crate::mappings::{
    self, CustomerEvent, ExternalId, Imported, MappingSource, StripeCustomerId, Writer,
};
use crate::pacing::{paced_account, Backoff, Pacer};
use crate::stripe::{CustomerPage, ErrorClass, ListedCustomer, StripeClient, SubscriptionPage};
use crate::Error;

mod store;
mod worker;

pub use store::ImportStore;
pub use worker::{run, Importer};

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
    /// The customers are all applied: the job pages through subscriptions.
    customers_done: bool,
    subscriptions_cursor: Option<String>,
    subscription_pages: i32,
    subscription_periods: i32,
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
     conflict_sample, unmapped_sample, errors, last_error, created_at, updated_at, finished_at, \
     customers_done, subscriptions_cursor, subscription_pages, subscription_periods";

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
    customers_done: bool,
    subscriptions_cursor: Option<String>,
    subscription_pages: i32,
    subscription_periods: i32,
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
            customers_done: self.customers_done,
            subscriptions_cursor: self.subscriptions_cursor.clone(),
            subscription_pages: self.subscription_pages,
            subscription_periods: self.subscription_periods,
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

/// `{"pages", "periods"}` of the status: the subscriptions read after the customers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionsView {
    pub pages: i32,
    /// Billing periods recorded (new or changed).
    pub periods: i32,
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
    /// The account's subscriptions, read once the customers are done.
    pub subscriptions: SubscriptionsView,
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
            subscriptions: SubscriptionsView {
                pages: progress.subscription_pages,
                periods: progress.subscription_periods,
            },
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

#[cfg(test)]
mod tests {
    use super::store::snapshot;
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

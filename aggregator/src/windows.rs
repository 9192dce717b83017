//! The window registry in PostgreSQL (`aggregation_windows`): every (customer, meter, window)
//! that has usage, whether it changed since it was last published, and what was published.
//!
//! Rules kept here:
//! - A window is marked dirty only AFTER its events are in ClickHouse, and the batch's Kafka
//!   offsets are committed only after that: a crash anywhere re-delivers, re-inserts (the
//!   copies deduplicate) and re-marks, so no change is ever missed.
//! - Publication claims rows with `FOR UPDATE SKIP LOCKED`: replicas never publish one window
//!   at once, and a window's revision only goes up. A marking that arrives while a window is
//!   being published waits for that publication and sets it dirty again afterwards.
//! - Claims lock rows in primary-key order; markings lock what is free at once and then wait
//!   for the rest. A deadlock (two markings of one window, only after a rebalance) is
//!   retried by the caller.

use std::collections::HashMap;
use std::time::Duration;

use meterline_catalog::billing_periods::{self, CustomerMeter};
use meterline_common::retention::PrunedTable;
use meterline_schemas::PeriodCalendar;
use meterline_schemas::{CustomerId, Decimal, EnvironmentId, MeterId, TenantId, Window};
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use crate::billing::{MeteredEvent, Published};
use crate::Error;

/// Binds the five key columns of a [`KeyColumns`] as `$1` to `$5`, the order of every
/// `UNNEST` of keys here. A macro: sqlx's `Query` and `QueryAs` share no bind trait.
macro_rules! bind_keys {
    ($query:expr, $keys:expr) => {
        $query
            .bind(&$keys.tenant)
            .bind(&$keys.environment)
            .bind(&$keys.customer)
            .bind(&$keys.meter)
            .bind(&$keys.start)
    };
}

/// One window of one customer and meter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub tenant_id: TenantId,
    pub environment_id: EnvironmentId,
    pub customer_id: CustomerId,
    pub meter_id: MeterId,
    pub window: Window,
}

/// A window key borrowed from a key or a row: (tenant, environment, customer, meter, window).
/// Hashing and comparing it copies nothing.
pub type WindowKeyRef<'a> = (&'a str, &'a str, &'a str, &'a str, Window);

impl WindowKey {
    /// The window `row` counts in.
    pub fn of(row: &MeteredEvent) -> Self {
        WindowKey {
            tenant_id: row.event.tenant_id.clone(),
            environment_id: row.event.environment_id.clone(),
            customer_id: row.event.customer_id.clone(),
            meter_id: row.meter_id.clone(),
            window: row.window,
        }
    }

    pub fn as_ref(&self) -> WindowKeyRef<'_> {
        (
            self.tenant_id.as_str(),
            self.environment_id.as_str(),
            self.customer_id.as_str(),
            self.meter_id.as_str(),
            self.window,
        )
    }
}

impl MeteredEvent {
    /// The window this row counts in, borrowed.
    pub fn window_key(&self) -> WindowKeyRef<'_> {
        (
            self.event.tenant_id.as_str(),
            self.event.environment_id.as_str(),
            self.event.customer_id.as_str(),
            self.meter_id.as_str(),
            self.window,
        )
    }
}

/// A claimed window: its key and what was last published for it.
#[derive(Debug, Clone)]
pub struct WindowState {
    pub key: WindowKey,
    pub published: Published,
}

/// What was published for a claimed window.
#[derive(Debug, Clone)]
pub struct Publication {
    pub key: WindowKey,
    pub revision: u32,
    pub quantity: Decimal,
    pub event_count: u64,
}

#[derive(Clone)]
pub struct WindowRegistry {
    pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct StateRow {
    tenant_id: String,
    environment_id: String,
    customer_id: String,
    meter_id: String,
    window_start: OffsetDateTime,
    window_end: OffsetDateTime,
    revision: i32,
    published_quantity: Option<Decimal>,
    published_event_count: Option<i64>,
}

impl TryFrom<StateRow> for WindowState {
    type Error = Error;

    fn try_from(row: StateRow) -> Result<Self, Error> {
        let corrupt = |e: meterline_schemas::SchemaError| Error::Corrupt(e.to_string());
        Ok(WindowState {
            key: WindowKey {
                tenant_id: TenantId::parse(&row.tenant_id).map_err(corrupt)?,
                environment_id: EnvironmentId::parse(&row.environment_id).map_err(corrupt)?,
                customer_id: CustomerId::parse(&row.customer_id).map_err(corrupt)?,
                meter_id: MeterId::parse(&row.meter_id).map_err(corrupt)?,
                window: Window::new(row.window_start, row.window_end).map_err(corrupt)?,
            },
            published: Published {
                revision: u32::try_from(row.revision).unwrap_or(0),
                quantity: row.published_quantity,
                event_count: row
                    .published_event_count
                    .and_then(|c| u64::try_from(c).ok()),
            },
        })
    }
}

/// What marking does to a window row: dirty, with its newest event now, dirty since now
/// unless it already was.
const MARK: &str = "dirty = true, last_event_at = now(),
                    dirty_since = CASE WHEN w.dirty THEN w.dirty_since ELSE now() END";

/// The window registry as retention prunes it (`RETENTION_WINDOWS_DAYS`, default 400, never
/// under the floor of [`meterline_common::retention`]): rows of windows that ended before the
/// cutoff and wait for nothing (not dirty). Older than Stripe's 35 days, such a window is
/// expired for good: a late event that brings it back starts a new row whose publication the
/// sink records as expired (its ledger keeps the highest revision), so nothing is sent twice.
/// One row per customer, meter and window would otherwise grow for ever.
pub const WINDOWS: PrunedTable = PrunedTable {
    records: "window registry",
    context: "pruning the window registry",
    var: "RETENTION_WINDOWS_DAYS",
    default_days: 400,
    delete: "DELETE FROM aggregation_windows
             WHERE (tenant_id, environment_id, customer_id, meter_id, window_start) IN (
                 SELECT tenant_id, environment_id, customer_id, meter_id, window_start
                 FROM aggregation_windows
                 WHERE NOT dirty AND window_end < $1
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
};

/// The state columns of an upserted row (`w`).
const RETURNED_STATE: &str = "w.tenant_id, w.environment_id, w.customer_id, w.meter_id, \
                              w.window_start, w.window_end, w.revision, \
                              w.published_quantity, w.published_event_count";

const STATE_COLUMNS: &str = "tenant_id, environment_id, customer_id, meter_id, window_start, \
                             window_end, revision, published_quantity, published_event_count";

/// Windows claimed for publication, locked until [`Claim::finish`] (or dropped, which
/// releases them unchanged).
pub struct Claim {
    tx: Transaction<'static, Postgres>,
    pub windows: Vec<WindowState>,
}

impl Claim {
    /// Records what was published, clears the dirty mark of every claimed window, and marks
    /// `successors` dirty (created when unknown, due at their end plus `grace`): the windows
    /// that bill the rest of a claimed window crossing its billing period's end. In the same
    /// transaction, so a recomputed crossing window never leaves its rest unbilled.
    pub async fn finish(
        mut self,
        published: &[Publication],
        successors: &[WindowKey],
        grace: Duration,
    ) -> Result<(), Error> {
        let keys = KeyColumns::of(self.windows.iter().map(|w| &w.key));
        bind_keys!(
            sqlx::query(
                "UPDATE aggregation_windows w SET dirty = false
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
                  AS k(tenant_id, environment_id, customer_id, meter_id, window_start)
             WHERE w.tenant_id = k.tenant_id AND w.environment_id = k.environment_id
               AND w.customer_id = k.customer_id AND w.meter_id = k.meter_id
               AND w.window_start = k.window_start",
            ),
            keys
        )
        .execute(&mut *self.tx)
        .await
        .map_err(db("clearing published windows"))?;
        if !published.is_empty() {
            let keys = KeyColumns::of(published.iter().map(|p| &p.key));
            let revisions: Vec<i32> = published
                .iter()
                .map(|p| i32::try_from(p.revision).unwrap_or(i32::MAX))
                .collect();
            let quantities: Vec<Decimal> = published.iter().map(|p| p.quantity).collect();
            let counts: Vec<i64> = published
                .iter()
                .map(|p| i64::try_from(p.event_count).unwrap_or(i64::MAX))
                .collect();
            bind_keys!(
                sqlx::query(
                    "UPDATE aggregation_windows w
                 SET revision = k.revision, published_quantity = k.quantity,
                     published_event_count = k.event_count, published_at = now()
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                             $6::int[], $7::numeric[], $8::bigint[])
                      AS k(tenant_id, environment_id, customer_id, meter_id, window_start,
                           revision, quantity, event_count)
                 WHERE w.tenant_id = k.tenant_id AND w.environment_id = k.environment_id
                   AND w.customer_id = k.customer_id AND w.meter_id = k.meter_id
                   AND w.window_start = k.window_start",
                ),
                keys
            )
            .bind(&revisions)
            .bind(&quantities)
            .bind(&counts)
            .execute(&mut *self.tx)
            .await
            .map_err(db("recording publications"))?;
        }
        if !successors.is_empty() {
            let successors: Vec<&WindowKey> = successors.iter().collect();
            upsert_marked(&mut self.tx, &successors, grace).await?;
        }
        self.tx
            .commit()
            .await
            .map_err(db("committing publications"))
    }
}

/// Marks `keys` dirty, inserting unknown windows due at their end plus `grace`; waits for
/// rows another transaction holds. Gives those that had been published before (revision > 0):
/// their new events are late.
async fn upsert_marked(
    tx: &mut Transaction<'static, Postgres>,
    keys: &[&WindowKey],
    grace: Duration,
) -> Result<Vec<WindowKey>, Error> {
    let r = KeyColumns::of(keys.iter().copied());
    let due: Vec<OffsetDateTime> = keys
        .iter()
        .map(|k| crate::due::due_at(&k.window, grace))
        .collect();
    let rows: Vec<StateRow> = bind_keys!(
        sqlx::query_as(&format!(
            "WITH marked AS (
             INSERT INTO aggregation_windows AS w
                 (tenant_id, environment_id, customer_id, meter_id, window_start,
                  window_end, due_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                                  $5::timestamptz[], $6::timestamptz[], $7::timestamptz[])
             ON CONFLICT (tenant_id, environment_id, customer_id, meter_id, window_start)
             DO UPDATE SET {MARK}
             RETURNING {RETURNED_STATE})
         SELECT * FROM marked WHERE revision > 0"
        )),
        r
    )
    .bind(&r.end)
    .bind(&due)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("marking new and held windows"))?;
    rows.into_iter()
        .map(|row| WindowState::try_from(row).map(|state| state.key))
        .collect()
}

/// Keys as parallel arrays, for `UNNEST`.
struct KeyColumns {
    tenant: Vec<String>,
    environment: Vec<String>,
    customer: Vec<String>,
    meter: Vec<String>,
    start: Vec<OffsetDateTime>,
    end: Vec<OffsetDateTime>,
}

impl KeyColumns {
    fn of<'a>(keys: impl Iterator<Item = &'a WindowKey>) -> Self {
        let mut c = KeyColumns {
            tenant: Vec::new(),
            environment: Vec::new(),
            customer: Vec::new(),
            meter: Vec::new(),
            start: Vec::new(),
            end: Vec::new(),
        };
        for k in keys {
            c.tenant.push(k.tenant_id.as_str().to_owned());
            c.environment.push(k.environment_id.as_str().to_owned());
            c.customer.push(k.customer_id.as_str().to_owned());
            c.meter.push(k.meter_id.as_str().to_owned());
            c.start.push(k.window.start());
            c.end.push(k.window.end());
        }
        c
    }
}

fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Postgres { context, source }
}

/// The billing periods of the customers and meters of some windows
/// ([`WindowRegistry::calendars`]).
pub struct Calendars(HashMap<CustomerMeter, PeriodCalendar>);

impl Calendars {
    /// The periods of `key`'s customer and meter: calendar months where none is known.
    pub fn of(&self, key: &WindowKey) -> PeriodCalendar {
        self.0
            .get(&(
                key.tenant_id.clone(),
                key.environment_id.clone(),
                key.customer_id.clone(),
                key.meter_id.clone(),
            ))
            .cloned()
            .unwrap_or_default()
    }
}

impl WindowRegistry {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The billing periods of the customers and meters of `keys`, in one query: each
    /// customer's Stripe subscription periods ([`billing_periods`]), else calendar months.
    pub async fn calendars(&self, keys: &[WindowKey]) -> Result<Calendars, Error> {
        let keys: Vec<CustomerMeter> = keys
            .iter()
            .map(|k| {
                (
                    k.tenant_id.clone(),
                    k.environment_id.clone(),
                    k.customer_id.clone(),
                    k.meter_id.clone(),
                )
            })
            .collect();
        let found = billing_periods::calendars(&self.pool, keys)
            .await
            .map_err(db("reading billing periods"))?;
        Ok(Calendars(found))
    }

    /// Marks `keys` dirty (creating unknown windows), due at their end plus `grace`, and
    /// returns those that had already been published: their events are late.
    /// `keys` must be sorted and free of duplicates.
    ///
    /// Two steps in one transaction, so that a batch waits only for the publications in
    /// flight when it marks, not for every publication after them: (1) every known window no
    /// publication holds is marked at once (`SKIP LOCKED`); (2) the rest, unknown windows and
    /// the few a publication holds, are inserted or marked, the held ones after their
    /// publication commits, which dirties them again. One statement locking row by row
    /// instead chased the publisher from claim to claim, and a batch with late events waited
    /// seconds behind a whole backlog's publication.
    pub async fn mark_dirty(
        &self,
        keys: &[WindowKey],
        grace: Duration,
    ) -> Result<Vec<WindowKey>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let c = KeyColumns::of(keys.iter());
        let mut tx = self.pool.begin().await.map_err(db("starting a marking"))?;
        // Answers the position (1-based) of each window it marked, and its revision.
        let free: Vec<(i64, i32)> = bind_keys!(
            sqlx::query_as(&format!(
                "WITH k AS (
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                                      $5::timestamptz[]) WITH ORDINALITY
                     AS k(tenant_id, environment_id, customer_id, meter_id, window_start, i)),
             free AS (
                 SELECT w.tenant_id, w.environment_id, w.customer_id, w.meter_id,
                        w.window_start, k.i
                 FROM aggregation_windows w
                 JOIN k USING (tenant_id, environment_id, customer_id, meter_id, window_start)
                 FOR UPDATE OF w SKIP LOCKED)
             UPDATE aggregation_windows w SET {MARK}
             FROM free
             WHERE w.tenant_id = free.tenant_id AND w.environment_id = free.environment_id
               AND w.customer_id = free.customer_id AND w.meter_id = free.meter_id
               AND w.window_start = free.window_start
             RETURNING free.i, w.revision"
            )),
            c
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db("marking windows dirty"))?;
        let mut marked = vec![false; keys.len()];
        let mut late = Vec::new();
        for (position, revision) in free {
            let index = usize::try_from(position - 1)
                .ok()
                .filter(|i| *i < keys.len())
                .ok_or_else(|| Error::Corrupt(format!("marked window position {position}")))?;
            marked[index] = true;
            if revision > 0 {
                late.push(keys[index].clone());
            }
        }

        let rest: Vec<&WindowKey> = keys
            .iter()
            .zip(&marked)
            .filter(|(_, marked)| !**marked)
            .map(|(key, _)| key)
            .collect();
        if !rest.is_empty() {
            late.extend(upsert_marked(&mut tx, &rest, grace).await?);
        }
        tx.commit().await.map_err(db("committing a marking"))?;
        Ok(late)
    }

    /// Marks dirty every window after each of `keys` (same customer and meter) whose value
    /// includes its events: those of a meter that bills the period to date, up to
    /// [`PeriodCalendar::later_windows_affected_until`] in the customer's periods. A late
    /// event in the first hour of a period changes the period-to-date maximum of every later
    /// hour, and the period's last window is the one Stripe's `last` formula bills. Unpublished windows are marked too: one being published
    /// now may have been computed before these events, and is marked again once its
    /// publication commits.
    pub async fn mark_later_in_period(&self, keys: &[WindowKey]) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let c = KeyColumns::of(keys.iter());
        let calendars = self.calendars(keys).await?;
        let until: Vec<OffsetDateTime> = keys
            .iter()
            .map(|k| calendars.of(k).later_windows_affected_until(&k.window))
            .collect();
        bind_keys!(
            sqlx::query(&format!(
                "UPDATE aggregation_windows w SET {MARK}
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                             $6::timestamptz[])
                      AS k(tenant_id, environment_id, customer_id, meter_id, window_start, until)
                 WHERE w.tenant_id = k.tenant_id AND w.environment_id = k.environment_id
                   AND w.customer_id = k.customer_id AND w.meter_id = k.meter_id
                   AND w.window_start > k.window_start AND w.window_start < k.until"
            )),
            c
        )
        .bind(&until)
        .execute(&self.pool)
        .await
        .map_err(db("marking later windows of the period"))?;
        Ok(())
    }

    /// Marks dirty the windows of customers whose subscription periods changed (up to
    /// `limit` changed periods at a time), from each period's start on: their values were
    /// computed over the periods believed before (calendar months, or a guessed renewal), and
    /// are recomputed and sent again over the ones Stripe named: a period-to-date value from
    /// the new start, a count or sum cut at a new boundary inside its window (the window
    /// after it is marked when the crossing one is published, [`Claim::finish`]). Windows
    /// whose value did not change publish nothing. A period of a
    /// customer not mapped yet waits until the mapping exists ([`billing_periods`]). The
    /// number of changed periods applied; 0 when none waits.
    pub async fn mark_period_changes(&self, limit: i64) -> Result<u64, Error> {
        let applied = sqlx::query(&format!(
            "WITH changed AS (
                 SELECT p.tenant_id, p.environment_id, p.subscription_id, p.period_start,
                        m.entity_id AS customer_id
                 FROM stripe_subscription_periods p
                 JOIN entity_integration_mappings m
                   ON m.tenant_id = p.tenant_id AND m.environment_id = p.environment_id
                  AND m.provider_type = 'stripe' AND m.entity_type = 'customer'
                  AND m.provider_entity_id = p.provider_customer_id AND m.status = 'active'
                 WHERE NOT p.windows_marked
                 ORDER BY p.updated_at
                 LIMIT $1
                 FOR UPDATE OF p SKIP LOCKED
             ), marked AS (
                 UPDATE aggregation_windows w SET {MARK}
                 FROM changed c
                 WHERE w.tenant_id = c.tenant_id AND w.environment_id = c.environment_id
                   AND w.customer_id = c.customer_id AND w.window_end > c.period_start
                 RETURNING 1
             )
             UPDATE stripe_subscription_periods p SET windows_marked = true
             FROM changed c
             WHERE p.tenant_id = c.tenant_id AND p.environment_id = c.environment_id
               AND p.subscription_id = c.subscription_id AND p.period_start = c.period_start"
        ))
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(db("marking windows of changed billing periods"))?;
        Ok(applied.rows_affected())
    }

    /// Claims up to `limit` dirty windows that are due at `now`, skipping windows another
    /// replica holds. A window still receiving events (within `quiet`) waits until they stop,
    /// but a change waits at most a minute from the later of its window's due time and the
    /// moment the window became dirty: while a backlog is replayed every batch touches the
    /// same due windows, and publishing each after every batch would recompute and resend
    /// them hundreds of times.
    ///
    /// The oldest due first, in the order of the partial index on `due_at` of dirty rows, so a
    /// claim reads about `limit` rows however many are due: ordering by the key instead sorted
    /// every due row on every claim, and a backlog's publication grew with its square.
    pub async fn claim_due(
        &self,
        now: OffsetDateTime,
        limit: i64,
        quiet: Duration,
    ) -> Result<Claim, Error> {
        let mut tx = self.pool.begin().await.map_err(db("starting a claim"))?;
        let rows: Vec<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM aggregation_windows
             WHERE dirty AND due_at <= $1
               AND (last_event_at <= $1 - make_interval(secs => $3)
                    OR GREATEST(dirty_since, due_at) <= $1 - interval '1 minute')
             ORDER BY due_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(now)
        .bind(limit)
        .bind(quiet.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claiming due windows"))?;
        let windows = rows
            .into_iter()
            .map(WindowState::try_from)
            .collect::<Result<_, _>>()?;
        Ok(Claim { tx, windows })
    }

    /// Claims the due windows of a tenant environment (optionally one customer and/or meter)
    /// that overlap `[from, to)`, waiting for windows another publication holds. At most
    /// `limit` windows after `after` (in key order), so large ranges go in chunks.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_range(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        customer: Option<&CustomerId>,
        meter: Option<&MeterId>,
        from: OffsetDateTime,
        to: OffsetDateTime,
        now: OffsetDateTime,
        after: Option<&WindowKey>,
        limit: i64,
    ) -> Result<Claim, Error> {
        let mut tx = self.pool.begin().await.map_err(db("starting a claim"))?;
        let (after_customer, after_meter, after_start) = match after {
            Some(k) => (
                Some(k.customer_id.as_str()),
                Some(k.meter_id.as_str()),
                Some(k.window.start()),
            ),
            None => (None, None, None),
        };
        let rows: Vec<StateRow> = sqlx::query_as(&format!(
            "SELECT {STATE_COLUMNS} FROM aggregation_windows
             WHERE tenant_id = $1 AND environment_id = $2
               AND ($3::text IS NULL OR customer_id = $3)
               AND ($4::text IS NULL OR meter_id = $4)
               AND window_start < $6 AND window_end > $5 AND due_at <= $7
               AND ($8::text IS NULL
                    OR (customer_id, meter_id, window_start) > ($8, $9, $10::timestamptz))
             ORDER BY tenant_id, environment_id, customer_id, meter_id, window_start
             LIMIT $11
             FOR UPDATE"
        ))
        .bind(tenant.as_str())
        .bind(environment.as_str())
        .bind(customer.map(CustomerId::as_str))
        .bind(meter.map(MeterId::as_str))
        .bind(from)
        .bind(to)
        .bind(now)
        .bind(after_customer)
        .bind(after_meter)
        .bind(after_start)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claiming windows to resync"))?;
        let windows = rows
            .into_iter()
            .map(WindowState::try_from)
            .collect::<Result<_, _>>()?;
        Ok(Claim { tx, windows })
    }
}

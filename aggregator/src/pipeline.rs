//! The aggregator's three loops.
//!
//! 1. [`consume_usage`]: `usage.raw` -> `events_processed`. A batch (bounded by count and
//!    time) is parsed, resolved against the meters, inserted into ClickHouse in one insert,
//!    its windows are marked dirty in PostgreSQL, bad messages go to `usage.raw.dlq`, and only
//!    then are its offsets committed. A crash at any point re-delivers the batch; re-inserted
//!    copies collapse in ClickHouse and re-marking is harmless, so nothing is lost or counted
//!    twice.
//! 2. [`publish_due`]: dirty windows whose end plus grace has passed are claimed, their totals
//!    recomputed from the deduplicated rows, and published to `usage.windows` with a new
//!    revision when they changed (the first publication is `due`, later ones `late`).
//! 3. [`consume_resync`]: `usage.resync` requests recompute every due window in their range
//!    and publish it with reason `resync` and the job id, changed or not.
//!
//! Every step that talks to another system is retried with backoff until it succeeds or the
//! service shuts down; a shutdown finishes the batch in hand first, or leaves it uncommitted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt};
use meterline_schemas::{
    CustomerId, DlqErrorKind, DlqHeaders, EnvironmentId, JobId, MeterId, RawUsageEvent,
    ResyncRequest, TenantId, Timestamp, Topic, Window, WindowReason, WindowTotal,
};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use time::OffsetDateTime;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::billing::{
    self, is_expired_window, next_revision, MeteredEvent, Trigger, WindowAggregates,
};
use crate::clickhouse::Warehouse;
use crate::config::BatchLimits;
use crate::kafka::Writer;
use crate::meter_cache::MeterCache;
use crate::metrics;
use crate::windows::{Claim, Publication, WindowKey, WindowKeyRef, WindowRegistry};
use crate::Error;
use meterline_common::kafka::DeadLetters;

const SERVICE: &str = "aggregator";

/// Windows claimed per publication round.
const CLAIM_LIMIT: i64 = 500;

/// Evaluates `$attempt` (an async expression giving `Result<T, Error>`) until it succeeds,
/// backing off from 100 ms to 10 s, and gives `Some(T)`; `None` when the service is shutting
/// down, and the caller then abandons the batch without committing it. A macro rather than a
/// function taking a closure: the attempt borrows the batch, which closures returning futures
/// cannot express without losing `Send`.
macro_rules! retry {
    ($step:literal, $shutdown:expr, $attempt:expr) => {{
        let mut delay = Duration::from_millis(100);
        loop {
            match $attempt.await {
                Ok(value) => break Some(value),
                Err(e) => {
                    ::metrics::counter!(metrics::BATCH_RETRIES, "step" => $step).increment(1);
                    tracing::warn!(
                        step = $step,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "step failed, retrying"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = $shutdown.cancelled() => break None,
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }};
}

/// Reads up to `limits.max_events` messages, waiting at most `limits.max_wait` after the
/// first. Empty only when shutdown began before any message arrived. The messages stay in
/// the consumer's buffers (borrowed): a batch is resolved where it was read, and only what
/// the later stages need is copied out of it.
async fn read_batch<'c>(
    consumer: &'c StreamConsumer,
    limits: BatchLimits,
    shutdown: &CancellationToken,
) -> Vec<BorrowedMessage<'c>> {
    let mut batch = Vec::new();
    let first = loop {
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(m) => break m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = shutdown.cancelled() => return batch,
        }
    };
    batch.push(first);
    // One timer for the whole batch: a timer per message cost a clock read and a timer
    // registration per event.
    let deadline = tokio::time::sleep(limits.max_wait);
    tokio::pin!(deadline);
    while batch.len() < limits.max_events {
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(m) => batch.push(m),
                Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
            },
            _ = &mut deadline => break,
        }
    }
    batch
}

/// Per topic and partition, the offset to commit once a batch is done: the one after its
/// last message (the committed offset names the next message to read). A batch spans a
/// handful of partitions, so a list searched by borrowed topic name costs no allocation per
/// message, where a map keyed by an owned name cost one.
#[derive(Debug, Default)]
struct NextOffsets(Vec<(String, i32, i64)>);

impl NextOffsets {
    fn of<'m, M: Message + 'm>(messages: impl IntoIterator<Item = &'m M>) -> Self {
        let mut next = NextOffsets::default();
        for m in messages {
            let after = m.offset() + 1;
            match next
                .0
                .iter_mut()
                .find(|(topic, partition, _)| *partition == m.partition() && topic == m.topic())
            {
                Some((_, _, offset)) => *offset = (*offset).max(after),
                None => next.0.push((m.topic().to_owned(), m.partition(), after)),
            }
        }
        next
    }
}

/// Commits `offsets`.
fn commit(consumer: &StreamConsumer, offsets: &NextOffsets) {
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in &offsets.0 {
        if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(%topic, partition, error = %e, "building the commit");
            return;
        }
    }
    // A failed commit (for example after a rebalance took the partitions) re-delivers the
    // batch to the new owner: duplicates, which deduplication absorbs, never a loss.
    if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
        tracing::warn!(error = %e, "committing offsets failed; the batch will be re-delivered");
    }
}

fn dlq_headers(m: &impl Message, error: String, kind: DlqErrorKind) -> DlqHeaders {
    DlqHeaders {
        error,
        error_kind: kind,
        source_topic: m.topic().to_owned(),
        source_partition: m.partition(),
        source_offset: m.offset(),
        service: SERVICE.to_owned(),
        failed_at: Timestamp::now(),
    }
}

/// A message bound for the dead-letter topic: its original key and bytes, and why.
struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: DlqHeaders,
}

impl DeadLetter {
    fn of(m: &impl Message, error: String, kind: DlqErrorKind) -> Self {
        DeadLetter {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers: dlq_headers(m, error, kind),
        }
    }
}

/// The dependencies the loops share.
pub struct Shared {
    pub warehouse: Warehouse,
    pub registry: WindowRegistry,
    pub writer: Writer,
    pub dead_letters: DeadLetters,
    pub pool: sqlx::PgPool,
    pub grace: Duration,
    /// How long a due window must go without new events before it is published (bounded:
    /// see `WindowRegistry::claim_due`).
    pub quiet: Duration,
    /// Woken after each batch, so windows that became due are published without waiting.
    pub batch_done: Notify,
}

/// A batch read from `usage.raw` and resolved against the meters: what the write stages need.
struct MeteredBatch {
    /// The rows in message order, as the runs the metering threads produced them. Not joined
    /// into one vector: that was a hundred thousand rows (15 MB) copied into freshly mapped
    /// memory per batch.
    runs: Vec<Vec<MeteredEvent>>,
    /// Every window the rows touch, sorted and without duplicates (rows are locked in this
    /// order when marked).
    windows: Vec<WindowKey>,
    dead: Vec<DeadLetter>,
    unmetered: u64,
    /// Committed once the batch is done.
    offsets: NextOffsets,
}

impl MeteredBatch {
    fn rows(&self) -> impl Iterator<Item = &MeteredEvent> + Send {
        self.runs.iter().flatten()
    }

    fn row_count(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }
}

/// Loop 1: `usage.raw` into ClickHouse, in three stages joined by channels of one batch, so
/// reading and metering the next batch, inserting this one and marking the previous one's
/// windows overlap instead of waiting on each other:
///
/// 1. read a batch and resolve it against the meters (CPU);
/// 2. insert its rows into ClickHouse (up to [`INSERTS_IN_FLIGHT`] batches at once);
/// 3. mark its windows dirty, dead-letter its bad messages, commit its offsets.
///
/// Each stage takes batches in order, so offsets are committed in order and only after the
/// batch's rows are in ClickHouse and its windows marked. A stage that stops (shutdown, or
/// shutdown in the middle of a retried step) drops its channel, and the stages before it
/// stop at their next hand-over: batches not committed are read again after a restart.
pub async fn consume_usage(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    limits: BatchLimits,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (metered_tx, metered_rx) = mpsc::channel(1);
    let (inserted_tx, inserted_rx) = mpsc::channel(1);
    let reading = tokio::spawn(read_and_meter(
        shared.clone(),
        consumer.clone(),
        limits,
        shutdown.clone(),
        metered_tx,
    ));
    let inserting = tokio::spawn(insert_batches(
        shared.clone(),
        metered_rx,
        shutdown.clone(),
        inserted_tx,
    ));
    record_batches(&shared, &consumer, inserted_rx, &shutdown).await;
    for stage in [reading, inserting] {
        stage.await.map_err(|e| Error::Task(e.to_string()))?;
    }
    Ok(())
}

/// The next batch from `rx`, or `None` when the stage before stopped or shutdown began: a
/// stage finishes the batch in hand but takes no new one after that.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, shutdown: &CancellationToken) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        batch = rx.recv() => batch,
    }
}

/// Stage 1: reads batches and resolves them against the meters.
async fn read_and_meter(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    limits: BatchLimits,
    shutdown: CancellationToken,
    tx: mpsc::Sender<MeteredBatch>,
) {
    let mut cache = MeterCache::new(shared.pool.clone());
    loop {
        let messages = read_batch(&consumer, limits, &shutdown).await;
        if messages.is_empty() {
            return;
        }
        ::metrics::counter!(metrics::EVENTS_CONSUMED).increment(messages.len() as u64);
        ::metrics::histogram!(metrics::BATCH_SIZE).record(messages.len() as f64);
        if retry!("refresh_meters", shutdown, cache.refresh()).is_none() {
            return;
        }
        // CPU work: other tasks move off this worker thread meanwhile.
        let batch = tokio::task::block_in_place(|| meter_batch(&cache, &messages));
        // Gives the messages back to the consumer's buffers before waiting on the next stage.
        drop(messages);
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// Parses every message of a batch and resolves it against the meters.
///
/// Parsing is most of a batch's CPU, and while it runs the other stages mostly wait on
/// ClickHouse and PostgreSQL: the messages are split over one thread per core, so a batch is
/// metered in about the time of its share rather than the whole.
fn meter_batch(cache: &MeterCache, messages: &[BorrowedMessage<'_>]) -> MeteredBatch {
    let now = OffsetDateTime::now_utc();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let chunk = messages.len().div_ceil(threads).max(1);
    let parts: Vec<MeteredPart> = std::thread::scope(|scope| {
        let running: Vec<_> = messages
            .chunks(chunk)
            .map(|part| scope.spawn(move || meter_messages(cache, part, now)))
            .collect();
        running
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut runs = Vec::with_capacity(parts.len());
    let mut windows = Vec::new();
    let mut dead = Vec::new();
    let mut unmetered = 0;
    // In message order: rows of the same event id keep their relative order.
    for part in parts {
        runs.push(part.rows);
        windows = merge_windows(windows, part.windows);
        dead.extend(part.dead);
        unmetered += part.unmetered;
    }
    MeteredBatch {
        runs,
        windows,
        dead,
        unmetered,
        offsets: NextOffsets::of(messages),
    }
}

/// What metering a run of messages produced.
struct MeteredPart {
    rows: Vec<MeteredEvent>,
    /// The windows of `rows`, sorted, each once (found on the metering thread, which leaves
    /// only a merge of a few sorted lists to the batch).
    windows: Vec<WindowKey>,
    dead: Vec<DeadLetter>,
    unmetered: u64,
}

fn meter_messages(
    cache: &MeterCache,
    messages: &[BorrowedMessage<'_>],
    now: OffsetDateTime,
) -> MeteredPart {
    let mut rows = Vec::with_capacity(messages.len() * 2);
    let mut dead = Vec::new();
    let mut unmetered = 0u64;
    for m in messages {
        let event = match RawUsageEvent::from_json_bytes(m.payload().unwrap_or_default()) {
            Ok(event) => Arc::new(event),
            Err(e) => {
                dead.push(DeadLetter::of(m, e.to_string(), e.dlq_error_kind()));
                continue;
            }
        };
        let timestamp = event.timestamp.as_offset_date_time();
        let window =
            match cache
                .sizes()
                .window_at(&event.tenant_id, &event.environment_id, timestamp)
            {
                Ok(w) => w,
                Err(e) => {
                    dead.push(DeadLetter::of(m, e.to_string(), DlqErrorKind::VALIDATION));
                    continue;
                }
            };
        // Direct producers leave ingested_at out: the broker's timestamp stands in for it.
        let ingested_at = event
            .ingested_at
            .map(|t| t.as_offset_date_time())
            .or_else(|| {
                m.timestamp().to_millis().and_then(|ms| {
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
                })
            })
            .unwrap_or(now);
        let metering = billing::meter_event(
            &event,
            cache.meters(&event.tenant_id, &event.environment_id),
            window,
            ingested_at,
            now,
            &mut rows,
        );
        if metering.fed == 0 && metering.failures.is_empty() {
            unmetered += 1;
        }
        if !metering.failures.is_empty() {
            let reasons: Vec<String> = metering
                .failures
                .iter()
                .map(|(meter, e)| format!("meter {meter}: {e}"))
                .collect();
            // The meters it fed correctly keep their rows; after a fix, a replay from the
            // dead-letter topic adds the rest and the copies of the others collapse.
            let kind = DlqErrorKind::parse("invalid_quantity").unwrap_or(DlqErrorKind::VALIDATION);
            dead.push(DeadLetter::of(m, reasons.join("; "), kind));
        }
    }
    MeteredPart {
        windows: distinct_windows(&rows),
        rows,
        dead,
        unmetered,
    }
}

/// The windows `rows` touch, sorted, each once. Deduplicated through borrowed keys first: a
/// batch has up to a hundred thousand rows but a few thousand windows, and owned keys would
/// copy four strings per row.
fn distinct_windows(rows: &[MeteredEvent]) -> Vec<WindowKey> {
    let mut first_row: HashMap<WindowKeyRef<'_>, &MeteredEvent, foldhash::fast::RandomState> =
        HashMap::default();
    for row in rows {
        first_row.entry(row.window_key()).or_insert(row);
    }
    let mut windows: Vec<WindowKey> = first_row.into_values().map(WindowKey::of).collect();
    windows.sort_unstable();
    windows
}

/// The union of two sorted lists of distinct windows, sorted, each once.
fn merge_windows(a: Vec<WindowKey>, b: Vec<WindowKey>) -> Vec<WindowKey> {
    if a.is_empty() {
        return b;
    }
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    b.next();
                    a.next()
                }
            },
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(window) => merged.push(window),
            None => return merged,
        }
    }
}

/// Inserts into ClickHouse in flight at once. One insert leaves ClickHouse's cores idle while
/// it parses and sorts a part on one of them; with two, a backlog's inserts overlap. Their
/// results are still handed on in batch order.
const INSERTS_IN_FLIGHT: usize = 2;

/// Stage 2: inserts each batch's rows into ClickHouse.
async fn insert_batches(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<MeteredBatch>,
    shutdown: CancellationToken,
    tx: mpsc::Sender<MeteredBatch>,
) {
    let mut in_flight = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            batch = next_batch(&mut rx, &shutdown), if open && in_flight.len() < INSERTS_IN_FLIGHT => {
                match batch {
                    Some(batch) => in_flight.push_back(insert_batch(&shared, batch, &shutdown)),
                    None => open = false,
                }
            }
            Some(inserted) = in_flight.next() => {
                // None: shutdown in the middle of a retried insert. The batches after it are
                // not handed on either, so no offset beyond an uninserted batch is committed.
                let Some(batch) = inserted else { return };
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
            else => return,
        }
    }
}

/// Inserts one batch's rows (retried); `None` when shutdown interrupted it.
async fn insert_batch(
    shared: &Shared,
    batch: MeteredBatch,
    shutdown: &CancellationToken,
) -> Option<MeteredBatch> {
    let started = Instant::now();
    retry!("clickhouse_insert", shutdown, {
        shared.warehouse.insert(batch.rows())
    })?;
    ::metrics::histogram!(metrics::INSERT_DURATION).record(started.elapsed().as_secs_f64());
    ::metrics::counter!(metrics::ROWS_INSERTED).increment(batch.row_count() as u64);
    Some(batch)
}

/// Stage 3: marks each inserted batch's windows dirty, dead-letters its bad messages and
/// commits its offsets.
async fn record_batches(
    shared: &Shared,
    consumer: &StreamConsumer,
    mut rx: mpsc::Receiver<MeteredBatch>,
    shutdown: &CancellationToken,
) {
    while let Some(batch) = next_batch(&mut rx, shutdown).await {
        if !record_batch(shared, &batch, shutdown).await {
            // Shutting down in the middle of a step: leave the batch uncommitted.
            return;
        }
        commit(consumer, &batch.offsets);
        shared.batch_done.notify_one();
    }
}

/// Everything after the insert but the commit. False when shutdown interrupted it.
async fn record_batch(shared: &Shared, batch: &MeteredBatch, shutdown: &CancellationToken) -> bool {
    let Some(late) = retry!("mark_windows", shutdown, {
        shared.registry.mark_dirty(&batch.windows, shared.grace)
    }) else {
        return false;
    };
    if !late.is_empty() {
        let late: HashSet<WindowKeyRef<'_>> = late.iter().map(WindowKey::as_ref).collect();
        let late_events: HashSet<&str> = batch
            .rows()
            .filter(|r| late.contains(&r.window_key()))
            .map(|r| r.event.id.as_str())
            .collect();
        ::metrics::counter!(metrics::LATE_EVENTS).increment(late_events.len() as u64);
    }
    let expired: HashSet<&str> = batch
        .rows()
        .filter(|r| r.expired)
        .map(|r| r.event.id.as_str())
        .collect();
    ::metrics::counter!(metrics::EXPIRED_EVENTS).increment(expired.len() as u64);
    ::metrics::counter!(metrics::EVENTS_UNMETERED).increment(batch.unmetered);

    for dead in &batch.dead {
        let headers = &dead.headers;
        let sent = retry!("dead_letter", shutdown, {
            shared
                .dead_letters
                .send(Topic::UsageRaw, dead.key.as_deref(), &dead.payload, headers)
        });
        if sent.is_none() {
            return false;
        }
        ::metrics::counter!(metrics::EVENTS_REJECTED, "reason" => headers.error_kind.as_str().to_owned())
            .increment(1);
        tracing::warn!(
            partition = headers.source_partition,
            offset = headers.source_offset,
            reason = %headers.error,
            "message sent to the dead-letter topic"
        );
    }
    true
}

/// Loop 2: publishes dirty windows once due.
pub async fn publish_due(
    shared: Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut cache = MeterCache::new(shared.pool.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.batch_done.notified() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        loop {
            let now = OffsetDateTime::now_utc();
            let Some(claim) = retry!("claim_due", &shutdown, {
                shared.registry.claim_due(now, CLAIM_LIMIT, shared.quiet)
            }) else {
                return Ok(());
            };
            if claim.windows.is_empty() {
                break;
            }
            let full = claim.windows.len() as i64 == CLAIM_LIMIT;
            if let Err(e) = publish_claim(&shared, &mut cache, claim, Trigger::Due, None).await {
                // The claim was rolled back: the windows stay dirty and are retried.
                tracing::warn!(error = %e, "publishing due windows failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                break;
            }
            if !full {
                break;
            }
        }
    }
}

/// Recomputes the claimed windows, publishes those that go out, records them, and releases
/// the claim. On error nothing is recorded (the claim rolls back).
async fn publish_claim(
    shared: &Shared,
    cache: &mut MeterCache,
    claim: Claim,
    trigger: Trigger,
    job: Option<&JobId>,
) -> Result<usize, Error> {
    cache.refresh().await?;
    let now = OffsetDateTime::now_utc();
    let computed_at = Timestamp::new(now).map_err(|e| Error::Corrupt(e.to_string()))?;

    // One query per (tenant, environment, meter, window), for all its customers.
    let mut groups: BTreeMap<(TenantId, EnvironmentId, MeterId, Window), Vec<CustomerId>> =
        BTreeMap::new();
    for w in &claim.windows {
        let k = &w.key;
        groups
            .entry((
                k.tenant_id.clone(),
                k.environment_id.clone(),
                k.meter_id.clone(),
                k.window,
            ))
            .or_default()
            .push(k.customer_id.clone());
    }
    let mut aggregates: HashMap<WindowKey, WindowAggregates> = HashMap::new();
    for ((tenant, environment, meter, window), customers) in groups {
        let found = shared
            .warehouse
            .window_aggregates(&tenant, &environment, &meter, &window, &customers)
            .await?;
        for (customer, a) in found {
            aggregates.insert(
                WindowKey {
                    tenant_id: tenant.clone(),
                    environment_id: environment.clone(),
                    customer_id: customer,
                    meter_id: meter.clone(),
                    window,
                },
                a,
            );
        }
    }

    let mut totals = Vec::new();
    let mut publications = Vec::new();
    let mut first_publication_lags = Vec::new();
    for state in &claim.windows {
        let key = &state.key;
        let Some(meter) = cache.meter(&key.tenant_id, &key.environment_id, &key.meter_id) else {
            tracing::error!(meter = %key.meter_id, "window of an unknown meter left unpublished");
            continue;
        };
        let a = aggregates.get(key).copied().unwrap_or_default();
        let quantity = a.quantity(&meter.aggregation);
        let Some(revision) = next_revision(&state.published, quantity, a.events, trigger) else {
            continue;
        };
        let reason = match (trigger, job) {
            (Trigger::Resync, Some(job_id)) => WindowReason::Resync {
                job_id: job_id.clone(),
            },
            _ if state.published.revision == 0 => WindowReason::Due,
            _ => WindowReason::Late,
        };
        if state.published.revision == 0 {
            first_publication_lags.push(now - billing::due_at(&key.window, shared.grace));
        }
        totals.push(WindowTotal {
            tenant_id: key.tenant_id.clone(),
            environment_id: key.environment_id.clone(),
            customer_id: key.customer_id.clone(),
            meter_id: key.meter_id.clone(),
            window: key.window,
            quantity,
            event_count: a.events,
            revision,
            reason,
            expired: is_expired_window(&key.window, now),
            computed_at,
        });
        publications.push(Publication {
            key: key.clone(),
            revision: revision.get(),
            quantity,
            event_count: a.events,
        });
    }
    shared.writer.publish_windows(&totals).await?;
    claim.finish(&publications).await?;
    for total in &totals {
        let reason = match total.reason {
            WindowReason::Due => "due",
            WindowReason::Late => "late",
            WindowReason::Resync { .. } => "resync",
        };
        ::metrics::counter!(metrics::WINDOWS_PUBLISHED, "reason" => reason).increment(1);
    }
    for lag in first_publication_lags {
        ::metrics::histogram!(metrics::PUBLISH_LAG).record(lag.as_seconds_f64().max(0.0));
    }
    Ok(totals.len())
}

/// Loop 3: resync requests.
pub async fn consume_resync(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut cache = MeterCache::new(shared.pool.clone());
    loop {
        let message = tokio::select! {
            received = consumer.recv() => match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        if !handle_resync(&shared, &mut cache, &message, &shutdown).await {
            return Ok(());
        }
        commit(&consumer, &NextOffsets::of([&message]));
    }
}

/// False when shutdown interrupted it (the request is then left uncommitted and redone).
async fn handle_resync(
    shared: &Shared,
    cache: &mut MeterCache,
    message: &BorrowedMessage<'_>,
    shutdown: &CancellationToken,
) -> bool {
    let payload = message.payload().unwrap_or_default();
    let request = match ResyncRequest::from_json_bytes(payload) {
        Ok(r) => r,
        Err(e) => {
            let headers = dlq_headers(message, e.to_string(), e.dlq_error_kind());
            let sent = retry!("dead_letter", shutdown, {
                shared
                    .dead_letters
                    .send(Topic::UsageResync, message.key(), payload, &headers)
            })
            .is_some();
            if sent {
                ::metrics::counter!(metrics::EVENTS_REJECTED, "reason" => headers.error_kind.as_str().to_owned())
                    .increment(1);
            }
            return sent;
        }
    };
    let mut after: Option<WindowKey> = None;
    let mut published = 0usize;
    loop {
        let now = OffsetDateTime::now_utc();
        let Some(claim) = retry!("claim_resync", shutdown, {
            shared.registry.claim_range(
                &request.tenant_id,
                &request.environment_id,
                request.customer_id.as_ref(),
                request.meter_id.as_ref(),
                request.range.from().as_offset_date_time(),
                request.range.to().as_offset_date_time(),
                now,
                after.as_ref(),
                CLAIM_LIMIT,
            )
        }) else {
            return false;
        };
        if claim.windows.is_empty() {
            break;
        }
        let last = claim.windows.last().map(|w| w.key.clone());
        let full = claim.windows.len() as i64 == CLAIM_LIMIT;
        match publish_claim(shared, cache, claim, Trigger::Resync, Some(&request.job_id)).await {
            Ok(n) => {
                published += n;
                after = last;
            }
            Err(e) => {
                tracing::warn!(job = %request.job_id, error = %e, "resync step failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return false,
                }
            }
        }
        if !full {
            break;
        }
    }
    ::metrics::counter!(metrics::RESYNCS).increment(1);
    tracing::info!(job = %request.job_id, windows = published, "resync published");
    true
}

/// Reports, every `every`, how far behind the end of each owned partition the group is.
pub async fn report_lag(
    consumer: Arc<StreamConsumer>,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let consumer = consumer.clone();
        let lags = tokio::task::spawn_blocking(move || -> Vec<(i32, i64)> {
            let Ok(assignment) = consumer.assignment() else {
                return Vec::new();
            };
            let Ok(positions) = consumer.position() else {
                return Vec::new();
            };
            assignment
                .elements()
                .iter()
                .filter_map(|tp| {
                    let (_, high) = consumer
                        .fetch_watermarks(tp.topic(), tp.partition(), Duration::from_secs(5))
                        .ok()?;
                    let position = positions
                        .find_partition(tp.topic(), tp.partition())
                        .and_then(|p| p.offset().to_raw())
                        .filter(|o| *o >= 0)
                        .unwrap_or(0);
                    Some((tp.partition(), (high - position).max(0)))
                })
                .collect()
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
        for (partition, lag) in lags {
            ::metrics::gauge!(metrics::CONSUMER_LAG, "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId};
    use time::macros::datetime;

    fn key(customer: &str, meter: &str, minute: i64) -> WindowKey {
        let at = datetime!(2026-11-27 10:00 UTC) + time::Duration::minutes(minute);
        WindowKey {
            tenant_id: TenantId::parse("t").unwrap(),
            environment_id: EnvironmentId::parse("e").unwrap(),
            customer_id: CustomerId::parse(customer).unwrap(),
            meter_id: MeterId::parse(meter).unwrap(),
            window: Window::containing(at, 1).unwrap(),
        }
    }

    #[test]
    fn the_windows_of_a_batchs_runs_merge_into_one_sorted_list_without_repeats() {
        let runs = [
            vec![
                key("a", "calls", 0),
                key("b", "calls", 1),
                key("c", "tokens", 0),
            ],
            vec![
                key("a", "calls", 0),
                key("a", "calls", 1),
                key("c", "tokens", 0),
            ],
            vec![],
            vec![key("d", "calls", 0)],
        ];
        let merged = runs.iter().cloned().fold(Vec::new(), merge_windows);
        let mut expected: Vec<WindowKey> = runs.concat();
        expected.sort();
        expected.dedup();
        assert_eq!(merged.len(), 5);
        assert_eq!(merged, expected);
    }
}

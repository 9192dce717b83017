//! Loop 1: `usage.raw` into `events_processed`, in four stages joined by channels of one
//! batch (read and meter, settle copies, insert, record).
//!
//! Rule kept here: offsets are committed in batch order and only after the batch's rows are
//! in ClickHouse, its windows marked dirty and its bad messages acknowledged on
//! `usage.raw.dlq`. A stage that stops drops its channel, and the stages before it stop at
//! their next hand-over: batches not committed are read again after a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt};
use meterline_common::kafka::{commit, read_batch, DeadLetter, NextOffsets};
use rdkafka::consumer::StreamConsumer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metering::{meter_batch, settle_batch};
use super::Shared;
use crate::billing::{MeteredEvent, RawEvent};
use crate::config::BatchLimits;
use crate::meter_cache::MeterCache;
use crate::metrics;
use crate::windows::{WindowKey, WindowKeyRef};
use crate::Error;

/// A batch read from `usage.raw` and resolved against the meters: what the write stages need.
pub(super) struct MeteredBatch {
    /// The rows in message order, as the runs the metering threads produced them. Not joined
    /// into one vector: that was a hundred thousand rows (15 MB) copied into freshly mapped
    /// memory per batch.
    pub(super) runs: Vec<Vec<MeteredEvent>>,
    /// Every event parsed, metered or not, as runs too: kept in `events_raw` so that a meter
    /// created later is given them.
    pub(super) raw: Vec<Vec<RawEvent>>,
    /// Every window the rows touch, sorted and without duplicates (rows are locked in this
    /// order when marked).
    pub(super) windows: Vec<WindowKey>,
    /// The windows of `windows` whose meter bills the period to date (MAX, LATEST,
    /// COUNT_UNIQUE): the published windows after them in their period are marked too.
    pub(super) period_windows: Vec<WindowKey>,
    pub(super) dead: Vec<DeadLetter>,
    pub(super) unmetered: u64,
    /// Committed once the batch is done.
    pub(super) offsets: NextOffsets,
}

impl MeteredBatch {
    fn rows(&self) -> impl Iterator<Item = &MeteredEvent> + Send {
        self.runs.iter().flatten()
    }

    fn row_count(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }
}

/// Loop 1: `usage.raw` into ClickHouse, in four stages joined by channels of one batch, so
/// reading and metering the next batch, settling its copies, inserting this one and marking
/// the previous one's windows overlap instead of waiting on each other:
///
/// 1. read a batch and resolve it against the meters (CPU);
/// 2. give each copy of an event its first copy's time, recording the batch's new events in
///    `event_first_seen` (one batch at a time: the next batch's copies must find them);
/// 3. insert its rows into ClickHouse (up to `INSERTS_IN_FLIGHT` batches at once);
/// 4. mark its windows dirty, dead-letter its bad messages, commit its offsets.
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
    let (settled_tx, settled_rx) = mpsc::channel(1);
    let (inserted_tx, inserted_rx) = mpsc::channel(1);
    let reading = tokio::spawn(read_and_meter(
        shared.clone(),
        consumer.clone(),
        limits,
        shutdown.clone(),
        metered_tx,
    ));
    let settling = tokio::spawn(settle_batches(
        shared.clone(),
        metered_rx,
        shutdown.clone(),
        settled_tx,
    ));
    let inserting = tokio::spawn(insert_batches(
        shared.clone(),
        settled_rx,
        shutdown.clone(),
        inserted_tx,
    ));
    record_batches(&shared, &consumer, inserted_rx, &shutdown).await;
    for stage in [reading, settling, inserting] {
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
        let messages = read_batch(&consumer, limits.max_events, limits.max_wait, &shutdown).await;
        if messages.is_empty() {
            return;
        }
        metrics::batch_read(messages.len());
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

/// Stage 2: settles each batch's copies against the first copies ([`settle_batch`]), one
/// batch at a time, with a meter cache of its own for the copies metered again.
async fn settle_batches(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<MeteredBatch>,
    shutdown: CancellationToken,
    tx: mpsc::Sender<MeteredBatch>,
) {
    let mut cache = MeterCache::new(shared.pool.clone());
    while let Some(mut batch) = next_batch(&mut rx, &shutdown).await {
        if !settle_batch(&shared, &mut cache, &mut batch, &shutdown).await {
            return;
        }
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// Inserts into ClickHouse in flight at once. One insert leaves ClickHouse's cores idle while
/// it parses and sorts a part on one of them; with two, a backlog's inserts overlap. Their
/// results are still handed on in batch order.
const INSERTS_IN_FLIGHT: usize = 2;

/// Stage 3: inserts each batch's rows into ClickHouse.
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
    retry!("clickhouse_insert", shutdown, async {
        // Both or neither are redone: copies collapse in either table.
        futures::try_join!(
            shared.warehouse.insert(batch.rows()),
            shared.warehouse.insert_raw(batch.raw.iter().flatten()),
        )
    })?;
    metrics::batch_inserted(started.elapsed(), batch.row_count());
    Some(batch)
}

/// Stage 4: marks each inserted batch's windows dirty, dead-letters its bad messages and
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
        commit(consumer, &batch.offsets, true);
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
    if retry!("mark_later_windows", shutdown, {
        shared.registry.mark_later_in_period(&batch.period_windows)
    })
    .is_none()
    {
        return false;
    }
    let late_events = if late.is_empty() {
        0
    } else {
        let late: HashSet<WindowKeyRef<'_>> = late.iter().map(WindowKey::as_ref).collect();
        let late_events: HashSet<&str> = batch
            .rows()
            .filter(|r| late.contains(&r.window_key()))
            .map(|r| r.event.id.as_str())
            .collect();
        late_events.len()
    };
    let expired: HashSet<&str> = batch
        .rows()
        .filter(|r| r.expired)
        .map(|r| r.event.id.as_str())
        .collect();
    metrics::batch_recorded(
        batch.windows.len(),
        late_events,
        expired.len(),
        batch.unmetered,
    );

    for dead in &batch.dead {
        if retry!("dead_letter", shutdown, shared.dead_letters.send(dead)).is_none() {
            return false;
        }
        metrics::rejected(&dead.headers.error_kind);
    }
    true
}

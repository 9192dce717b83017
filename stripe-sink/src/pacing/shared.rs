//! What every stripe-sink replica shares of one Stripe account, in PostgreSQL
//! (`stripe_account_pacing`, migration 0032): the next free send slot and the circuit
//! breaker. Stripe limits an account, not a process, so N replicas pacing on their own would
//! send N times the rate.
//!
//! Why slots reserved in PostgreSQL, not accounts owned through Kafka partitions: the sink
//! sends windows it claims from the ledger, not from a partition, and one tenant's windows
//! arrive on every partition; owning accounts would mean routing every window to its
//! account's owner. A reservation is one short statement per block of slots (at most a
//! tenth of a second's worth), the ledger's database is already required to send anything,
//! and the row's lock orders the replicas: blocks never overlap, a replica that dies leaves
//! only its block unused, a replica that joins reserves after the others.
//!
//! Slot times are PostgreSQL's clock (`clock_timestamp()`). Each replica turns them into its
//! own time through the offset between the two clocks, estimated from its reservations as NTP
//! does ([`PgClock`]): from the answer that came back fastest, not from whenever this answer
//! was read. A replica whose task was delayed after PostgreSQL answered would otherwise shift
//! its whole block late, next to another replica's (measured: two meter events 2 ms apart
//! with three replicas on a loaded machine).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::PgPool;

use crate::error::db;
use crate::Error;

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reservation {
    /// The block's first slot is this far from now (zero when it starts at once).
    Slots { first_in: Duration },
    /// The account's breaker is open for this long yet: nothing was reserved.
    Open { remaining: Duration },
    /// The breaker's cool-down has passed: a half-open probe decides. Nothing was reserved.
    Probe,
}

/// Who probes, asked by a replica whose breaker went half-open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeClaim {
    /// This replica: its next request is the probe.
    Mine,
    /// Another replica's probe is out.
    Elsewhere,
    /// Another replica's probe succeeded already: the breaker is closed.
    Closed,
}

/// How long a claimed probe stays this replica's when its outcome never comes (it died).
const PROBE_LEASE_SECONDS: f64 = 60.0;

/// The shared pacing rows, through the sink's pool.
#[derive(Clone)]
pub struct SharedPacing {
    pool: PgPool,
    clock: Arc<Mutex<PgClock>>,
}

/// How long the best sample of the clock offset is trusted before any newer one replaces it
/// (the clocks drift apart slowly; NTP slews them).
const OFFSET_TRUSTED_FOR: f64 = 30.0;

/// PostgreSQL's clock as this replica sees it: `offset` = PostgreSQL's time minus ours, from
/// the sample whose round trip was shortest (its error is at most half of that round trip).
#[derive(Debug, Clone, Copy, Default)]
pub struct PgClock {
    best: Option<Sample>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    offset: f64,
    round_trip: f64,
    /// Our time of the sample, Unix seconds.
    at: f64,
}

impl PgClock {
    /// Learns from one statement sent at `sent` and answered at `answered` (our time, Unix
    /// seconds) that read PostgreSQL's clock as `theirs`.
    pub fn observe(&mut self, sent: f64, answered: f64, theirs: f64) {
        let sample = Sample {
            offset: theirs - (sent + answered) / 2.0,
            round_trip: (answered - sent).max(0.0),
            at: answered,
        };
        let better = match self.best {
            None => true,
            Some(best) => {
                sample.round_trip <= best.round_trip || answered - best.at > OFFSET_TRUSTED_FOR
            }
        };
        if better {
            self.best = Some(sample);
        }
    }

    /// How far from our `now` (Unix seconds) PostgreSQL's time `theirs` is; negative when past.
    pub fn until(&self, theirs: f64, now: f64) -> f64 {
        theirs - self.best.map_or(0.0, |b| b.offset) - now
    }
}

/// Our clock, Unix seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl SharedPacing {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            clock: Arc::default(),
        }
    }

    /// Reserves `count` slots `interval` apart for `account`, after every slot any replica
    /// holds and not before now; nothing while the account's breaker is open.
    pub async fn reserve(
        &self,
        account: &str,
        interval: Duration,
        count: u32,
    ) -> Result<Reservation, Error> {
        let block = interval.as_secs_f64() * f64::from(count);
        // One statement: the row's lock orders concurrent replicas. `clock_timestamp()` is
        // read once the lock is held (in the update and in RETURNING), not before: a replica
        // that waited for the lock would otherwise start its block in the past.
        let sent = unix_now();
        let (next_slot, theirs, open_for): (f64, f64, Option<f64>) = sqlx::query_as(
            "INSERT INTO stripe_account_pacing AS p (account_id, next_slot, reserved_at)
             VALUES ($1, clock_timestamp() + make_interval(secs => $2), clock_timestamp())
             ON CONFLICT (account_id) DO UPDATE SET
                 next_slot = CASE WHEN p.open_until IS NOT NULL THEN p.next_slot
                             ELSE greatest(p.next_slot, clock_timestamp())
                                  + make_interval(secs => $2) END,
                 reserved_at = clock_timestamp()
             RETURNING extract(epoch FROM p.next_slot)::float8,
                       extract(epoch FROM clock_timestamp())::float8,
                       extract(epoch FROM p.open_until - clock_timestamp())::float8",
        )
        .bind(account)
        .bind(block)
        .fetch_one(&self.pool)
        .await
        .map_err(db("reserving stripe send slots"))?;
        let answered = unix_now();
        let first_in = {
            let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
            clock.observe(sent, answered, theirs);
            clock.until(next_slot - block, answered)
        };
        Ok(match open_for {
            Some(open) if open > 0.0 => Reservation::Open {
                remaining: seconds(open),
            },
            Some(_) => Reservation::Probe,
            None => Reservation::Slots {
                first_in: seconds(first_in),
            },
        })
    }

    /// Opens the account's breaker for every replica for `cool_down` (never shortening it).
    pub async fn open(&self, account: &str, cool_down: Duration) -> Result<(), Error> {
        sqlx::query(
            "UPDATE stripe_account_pacing
             SET open_until = greatest(open_until, clock_timestamp() + make_interval(secs => $2)),
                 probe_until = NULL
             WHERE account_id = $1",
        )
        .bind(account)
        .bind(cool_down.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db("opening a stripe account's breaker"))?;
        Ok(())
    }

    /// Claims the half-open probe of the account's breaker.
    pub async fn claim_probe(&self, account: &str) -> Result<ProbeClaim, Error> {
        let (open, mine): (bool, bool) = sqlx::query_as(
            "WITH claimed AS (
                 UPDATE stripe_account_pacing
                 SET probe_until = clock_timestamp() + make_interval(secs => $2)
                 WHERE account_id = $1 AND open_until <= clock_timestamp()
                   AND (probe_until IS NULL OR probe_until <= clock_timestamp())
                 RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM stripe_account_pacing
                            WHERE account_id = $1 AND open_until IS NOT NULL),
                    EXISTS (SELECT 1 FROM claimed)",
        )
        .bind(account)
        .bind(PROBE_LEASE_SECONDS)
        .fetch_one(&self.pool)
        .await
        .map_err(db("claiming a stripe account's breaker probe"))?;
        Ok(match (mine, open) {
            (true, _) => ProbeClaim::Mine,
            (false, true) => ProbeClaim::Elsewhere,
            (false, false) => ProbeClaim::Closed,
        })
    }

    /// Closes the account's breaker for every replica: this replica's probe succeeded.
    pub async fn close(&self, account: &str) -> Result<(), Error> {
        sqlx::query(
            "UPDATE stripe_account_pacing SET open_until = NULL, probe_until = NULL
             WHERE account_id = $1",
        )
        .bind(account)
        .execute(&self.pool)
        .await
        .map_err(db("closing a stripe account's breaker"))?;
        Ok(())
    }

    /// Gives the probe back without a verdict (Stripe said our earlier request is still
    /// running): any replica may probe next.
    pub async fn release_probe(&self, account: &str) -> Result<(), Error> {
        sqlx::query("UPDATE stripe_account_pacing SET probe_until = NULL WHERE account_id = $1")
            .bind(account)
            .execute(&self.pool)
            .await
            .map_err(db("releasing a stripe account's breaker probe"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_offset_comes_from_the_fastest_answer() {
        let mut clock = PgClock::default();
        assert_eq!(
            clock.until(100.5, 100.0),
            0.5,
            "no sample yet: the clocks agree"
        );
        // PostgreSQL is 2 s ahead. An answer read 40 ms late (a busy replica) says 1.98 s...
        clock.observe(1000.0, 1000.040, 1002.0);
        assert!((clock.until(1002.0, 1000.0) - 0.02).abs() < 1e-9);
        // ...a 2 ms round trip says 1.999 s (within 1 ms), and replaces it.
        clock.observe(1001.0, 1001.002, 1003.0);
        assert!((clock.until(1003.0, 1001.0) - 0.001).abs() < 1e-9);
        // A slower answer afterwards changes nothing while the fast one is fresh...
        clock.observe(1002.0, 1002.100, 1004.0);
        assert!((clock.until(1003.0, 1001.0) - 0.001).abs() < 1e-9);
        // ...but once it is older than OFFSET_TRUSTED_FOR any newer one replaces it.
        clock.observe(1040.0, 1040.010, 1042.105);
        assert!((clock.until(1042.0, 1040.0) - (-0.1)).abs() < 1e-9);
    }
}

//! Benchmarks judged on rounds (ingest, the aggregator): a round is the baseline then the
//! subject on fresh namespaces, back to back so that the two share one machine state; the
//! baseline is measured alike in both (`Baseline`). Every round but the last is kept as its
//! rates; the last one is kept whole, its subject still running, for the phases after it (its
//! details, the profiled pass); the goals are judged on the round of median ratio.
//!
//! Rule kept: a round's ratio is its subject's rate over its baseline's, and of an even count
//! of rounds the median is the lower middle one. How rounds are written (ratio lines, rows and
//! goals) is [`crate::report`]'s.

use std::future::Future;
use std::time::Duration;

use crate::procstat::{self, Snapshot, Watchlist};

/// The two rates of one round of a benchmark that is judged on a ratio: its baseline's and
/// its subject's (ingest, the aggregator), events per second.
#[derive(Debug, Clone, Copy)]
pub struct RoundRates {
    pub load_before_baseline: f64,
    pub baseline_rate: f64,
    pub rate: f64,
}

impl RoundRates {
    pub fn ratio(&self) -> f64 {
        self.rate / self.baseline_rate
    }

    /// The earlier rounds and then the last (detailed) one, in the order they ran.
    pub fn with_last(
        earlier: &[RoundRates],
        load_before_baseline: f64,
        baseline_rate: f64,
        rate: f64,
    ) -> Vec<RoundRates> {
        let mut rounds = earlier.to_vec();
        rounds.push(RoundRates {
            load_before_baseline,
            baseline_rate,
            rate,
        });
        rounds
    }
}

/// The round of median ratio; of an even count the lower middle one, so that a tie never
/// flatters the result.
pub(crate) fn median_by_ratio(mut rounds: Vec<RoundRates>) -> RoundRates {
    rounds.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    rounds[(rounds.len() - 1) / 2]
}

/// A round's baseline: the 1-minute load before it, how long it took and the CPU each watched
/// process used in it.
pub(crate) struct Baseline {
    pub load_before: f64,
    pub elapsed: Duration,
    pub cpu: Snapshot,
}

impl Baseline {
    /// Runs a round's baseline `phase`, which gives the time it took itself (its clock starts
    /// after its own set-up).
    pub(crate) async fn measure(
        watched: &Watchlist,
        phase: impl Future<Output = anyhow::Result<Duration>>,
    ) -> anyhow::Result<Baseline> {
        let load_before = procstat::load_average();
        let (elapsed, cpu) = watched.during(phase).await?;
        Ok(Baseline {
            load_before,
            elapsed,
            cpu,
        })
    }

    /// The rates of the round: `events` went through this baseline, and through its subject at
    /// `rate` events/s.
    pub(crate) fn rates(&self, events: usize, rate: f64) -> RoundRates {
        RoundRates {
            load_before_baseline: self.load_before,
            baseline_rate: events as f64 / self.elapsed.as_secs_f64(),
            rate,
        }
    }
}

/// One measured round of a benchmark, its subject still running.
pub(crate) trait Round {
    /// The round's rates, `events` having gone through its baseline and its subject.
    fn rates(&self, events: usize) -> RoundRates;

    /// Stops what the round started: its subject, its namespaces.
    async fn finish(self);
}

/// Measures `count` rounds of `events` events one after the other, saying the ratio of each
/// but the last on stderr: the rates of the earlier rounds, each finished before the next
/// starts, and the last round, still running.
pub(crate) async fn run_rounds<R: Round>(
    count: usize,
    events: usize,
    mut measure: impl AsyncFnMut() -> anyhow::Result<R>,
) -> anyhow::Result<(Vec<RoundRates>, R)> {
    let mut earlier = Vec::new();
    for number in 1..count {
        let round = measure().await?;
        let rates = round.rates(events);
        eprintln!("round {number} of {count}: ratio {:.2}", rates.ratio());
        earlier.push(rates);
        round.finish().await;
    }
    Ok((earlier, measure().await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_round_is_the_middle_ratio_and_the_lower_of_two() {
        let round = |aggregator: f64, baseline: f64| RoundRates {
            load_before_baseline: 0.0,
            baseline_rate: baseline,
            rate: aggregator,
        };
        let three = vec![round(60.0, 100.0), round(40.0, 100.0), round(100.0, 200.0)];
        assert_eq!(median_by_ratio(three).ratio(), 0.5);
        let two = vec![round(60.0, 100.0), round(40.0, 100.0)];
        assert_eq!(median_by_ratio(two).rate, 40.0);
    }
}

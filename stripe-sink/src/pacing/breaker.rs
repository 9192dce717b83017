//! The circuit breaker of one Stripe account, as one replica sees it: its own consecutive
//! failures open it; the state every replica shares ([`super::shared`]) holds it open and
//! names the one replica that probes.

use std::time::Duration;

use tokio::time::Instant;

use crate::stripe::ErrorClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A circuit breaker over consecutive failures.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May a request go out now? In half-open state, only one (the probe) at a time.
    /// `Err(wait)` says how long until it may.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state(now) {
            BreakerState::Closed => Ok(()),
            BreakerState::Open => Err(self.open_until.map(|u| u - now).unwrap_or_default()),
            BreakerState::HalfOpen if self.probing => Err(Duration::from_secs(1)),
            BreakerState::HalfOpen => {
                self.probing = true;
                Ok(())
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// Counts a failure; `Some(cool_down)` when it opened the breaker (a failed probe, or the
    /// threshold reached), for the caller to open it for every replica too.
    pub fn failure(&mut self, now: Instant) -> Option<Duration> {
        self.failures += 1;
        if self.probing || self.failures >= self.threshold {
            self.open_until = Some(now + self.cool_down);
            self.probing = false;
            return Some(self.cool_down);
        }
        None
    }
}

impl Breaker {
    /// Holds the breaker open until `until` at least: another replica opened the account's
    /// breaker, and this one obeys it (its own failure count is kept).
    pub fn hold_open_until(&mut self, until: Instant) {
        self.open_until = Some(self.open_until.map_or(until, |mine| mine.max(until)));
        self.probing = false;
    }

    /// The probe this breaker admitted ends without a verdict: another replica claimed it
    /// first, or Stripe said our earlier request is still running. A later request may probe.
    pub fn end_probe(&mut self) {
        self.probing = false;
    }

    /// Counts how a request went: `None` when Stripe accepted it, else the class of its
    /// failure. A refusal or a 429 means Stripe answered (429s only slow down), so it counts as
    /// a success (it also ends a half-open probe); our own earlier request still running (409)
    /// is no sign either way; anything else is a failure. `Some(cool_down)` when it opened
    /// the breaker.
    pub fn record(&mut self, failure: Option<ErrorClass>, now: Instant) -> Option<Duration> {
        match failure {
            None | Some(ErrorClass::Permanent | ErrorClass::RateLimited) => {
                self.success();
                None
            }
            Some(ErrorClass::InProgress) => {
                self.end_probe();
                None
            }
            Some(ErrorClass::Retriable | ErrorClass::Authentication) => self.failure(now),
        }
    }

    /// Whether the request now going out is the half-open probe.
    pub fn probing(&self) -> bool {
        self.probing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_probes_and_closes() {
        let mut b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.failure(t0), None);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(b.failure(t0), Some(Duration::from_secs(30)), "opened now");
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(b.admit(t0).is_err());
        tokio::time::advance(Duration::from_secs(31)).await;
        let t1 = Instant::now();
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.admit(t1).is_ok(), "one probe");
        assert!(b.admit(t1).is_err(), "only one probe at a time");
        assert!(b.failure(t1).is_some(), "a failed probe re-opens");
        assert_eq!(b.state(t1), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(31)).await;
        let t2 = Instant::now();
        assert!(b.admit(t2).is_ok());
        b.success();
        assert_eq!(b.state(t2), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn another_replicas_open_breaker_holds_this_one_open() {
        let mut b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        b.hold_open_until(t0 + Duration::from_secs(10));
        assert_eq!(b.admit(t0), Err(Duration::from_secs(10)));
        b.hold_open_until(t0 + Duration::from_secs(5));
        assert_eq!(b.admit(t0), Err(Duration::from_secs(10)), "never shortened");
        tokio::time::advance(Duration::from_secs(11)).await;
        let t1 = Instant::now();
        assert!(
            b.admit(t1).is_ok() && b.probing(),
            "half-open: this replica may probe"
        );
        b.end_probe();
        assert!(!b.probing());
        assert_eq!(
            b.failures, 0,
            "another replica's outage is not counted as this one's failures"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_on_outages_not_on_answers() {
        let mut b = Breaker::new(10, Duration::from_secs(15));
        let now = Instant::now();
        for _ in 0..20 {
            for answer in [
                ErrorClass::RateLimited,
                ErrorClass::Permanent,
                ErrorClass::InProgress,
            ] {
                assert_eq!(b.record(Some(answer), now), None);
            }
        }
        assert!(b.admit(now).is_ok(), "429s and refusals are answers");
        for _ in 0..9 {
            b.record(Some(ErrorClass::Retriable), now);
        }
        b.record(None, now);
        b.record(Some(ErrorClass::Authentication), now);
        assert!(b.admit(now).is_ok(), "a success resets the count");
        b.record(None, now);
        for _ in 0..9 {
            assert_eq!(b.record(Some(ErrorClass::Retriable), now), None);
        }
        assert_eq!(
            b.record(Some(ErrorClass::Retriable), now),
            Some(Duration::from_secs(15)),
            "ten failures in a row open it"
        );
        assert!(b.admit(now).is_err());
    }
}

//! Retrying a step that talks to another system: one doubling backoff, and the
//! retriable/permanent split that decides whether to retry at all.
//!
//! Rule kept here: a retried step either succeeds, is refused for good (and the caller moves
//! the work aside, e.g. to a dead-letter topic), or is abandoned because the service is
//! shutting down, in which case its Kafka offset stays uncommitted and the work is redone
//! after the restart. Nothing is dropped in between.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::shutdown::pause;

/// Whether a failed step may succeed when tried again.
pub trait Retriable {
    /// True for failures of the moment (a connection, a timeout, a deadlock), false for a
    /// refusal that every retry would get again (invalid data, a constraint).
    fn is_retriable(&self) -> bool;
}

/// Whether a PostgreSQL failure may pass when retried: connection and server trouble can;
/// data the database refuses (SQLSTATE classes 22 and 23) will be refused again.
pub fn postgres_retriable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => !e
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        _ => true,
    }
}

/// A doubling delay: `first`, then twice that, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// The delay the next wait will take.
    pub fn upcoming(&self) -> Duration {
        self.next
    }

    /// The delay to wait now; the one after it is twice as long, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Waits the next delay. False when shutdown began first: the caller abandons the step.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        pause(delay, shutdown).await
    }

    /// Waits the next delay whatever happens: for work that must be finished even during a
    /// shutdown (such as releasing a claim that would otherwise hold a window for minutes).
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_cut_short_by_shutdown() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        assert!(backoff.wait(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        shutdown.cancel();
        assert!(!backoff.wait(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}

//! One delivery at a time per key within this process.
//!
//! Stripe may deliver one event twice at the same moment (retries and duplicates are part of
//! its contract). Without this, both deliveries could find no deduplication row, and both
//! publish. Holding the key's lock from the check until the row is written makes the second
//! one wait and then find the row. Across replicas the race remains, which is acceptable:
//! consumers deduplicate on the event id anyway; this only keeps the common case clean.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct SingleFlight {
    keys: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Held while a key's delivery is in flight; dropping it lets the next one in.
pub struct Flight<'a> {
    owner: &'a SingleFlight,
    key: String,
    // An Option so that Drop can release the lock before cleaning the map.
    guard: Option<OwnedMutexGuard<()>>,
}

impl SingleFlight {
    /// Waits until no other delivery of `key` is in flight in this process.
    pub async fn enter(&self, key: String) -> Flight<'_> {
        let lock = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        Flight {
            owner: self,
            key,
            guard: Some(guard),
        }
    }

    /// Keys with a delivery in flight or waiting (for tests).
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut keys = self.owner.keys.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds the lock now when nobody waits for it: forget the key. Waiters
        // clone the Arc under this same map lock, so the count cannot change underneath.
        if keys
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_key_is_serialised_and_forgotten_afterwards() {
        let flights = Arc::new(SingleFlight::default());
        let first = flights.enter("a".into()).await;
        let waiting = {
            let flights = flights.clone();
            tokio::spawn(async move {
                let _second = flights.enter("a".into()).await;
            })
        };
        // Another key is not held up.
        drop(flights.enter("b".into()).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap();
        assert!(flights.is_empty());
    }
}

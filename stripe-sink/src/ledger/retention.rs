//! Retention of the sync ledger: completed `stripe_sync_batches` rows (and, by the foreign
//! key's cascade, their `stripe_sync_sends`) older than `RETENTION_LEDGER_DAYS` are deleted,
//! by the sink every `RETENTION_PRUNE_INTERVAL_SECONDS` and by `meterline prune`.
//!
//! Rules kept here:
//! - Only rows in a completed state ([`LedgerState::COMPLETED`]) are pruned, and only when both
//!   their window ended and their row last changed before the cutoff: a row still being worked
//!   on, failed, or waiting for an operator stays.
//! - The retention is never under the floor of [`meterline_common::retention`] (Stripe's 35
//!   days plus a week): a younger row may still belong to a window a resync or a late event
//!   sends again, and its ledger entry is what stops a second billing.

use meterline_common::retention::PrunedTable;

#[cfg(doc)]
use super::LedgerState;

/// The sync ledger as retention prunes it (default 400 days).
pub const LEDGER: PrunedTable = PrunedTable {
    records: "sync ledger",
    context: "pruning the sync ledger",
    var: "RETENTION_LEDGER_DAYS",
    default_days: 400,
    // The states of LedgerState::COMPLETED (a test checks that they are).
    delete: "DELETE FROM stripe_sync_batches WHERE id IN (
                 SELECT id FROM stripe_sync_batches
                 WHERE sync_status IN ('synced', 'skipped', 'expired')
                   AND window_end < $1 AND updated_at < $1
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
};

#[cfg(test)]
mod tests {
    use super::super::LedgerState;
    use super::*;

    #[test]
    fn only_completed_states_are_pruned() {
        let listed = LedgerState::names(LedgerState::COMPLETED)
            .map(|s| format!("'{s}'"))
            .join(", ");
        assert!(
            LEDGER
                .delete
                .contains(&format!("sync_status IN ({listed})")),
            "{}",
            LEDGER.delete
        );
    }
}

//! Unit tests of the ledger's pure parts (no database).

use super::*;

#[test]
fn each_finish_sets_its_ledger_state_error_and_retry_delay() {
    let error = || "e".to_owned();
    #[rustfmt::skip]
    let cases = [
        (Finish::Settled, "CASE WHEN aggregated_quantity = accounted_quantity THEN 'synced' ELSE 'pending' END", None, 0.0),
        (Finish::RetryIn { seconds: 2.5, error: error() }, "'pending'", Some("e"), 2.5),
        (Finish::Unanswered { seconds: 9.0, error: error() }, "'in_flight'", Some("e"), 9.0),
        (Finish::PendingMapping, "'pending_mapping'", None, 0.0),
        (Finish::Skipped(error()), "'skipped'", Some("e"), 0.0),
        (Finish::Expired, "'expired'", None, 0.0),
        (Finish::Failed(error()), "'failed'", Some("e"), 0.0),
        (Finish::NeedsReconciliation(error()), "'needs_reconciliation'", Some("e"), 0.0),
    ];
    for (finish, sql, error, delay) in cases {
        let got = finish.status_sql();
        assert_eq!(got.split_whitespace().collect::<Vec<_>>().join(" "), sql);
        assert_eq!(finish.error_and_delay(), (error, delay), "{finish:?}");
    }
}

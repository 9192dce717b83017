//! The ledger's window states ([`LedgerState`]): the values of
//! `stripe_sync_batches.sync_status`.
//!
//! Rule kept here: each state is named once, by [`LedgerState::as_str`]; the lists the code
//! needs (all states, the owed ones, the open ones) are lists of [`LedgerState`], and the
//! states are exactly those the table's CHECK constraint allows (a test reads the embedded
//! migration). The SQL of [`super::Ledger`] names them as literals, which a test here
//! checks against [`LedgerState`].

/// The state of a window in the ledger (`stripe_sync_batches.sync_status`), each named once
/// here: every state the Rust code sets, compares or lists is one of these, and they are
/// exactly what the table's CHECK constraint allows (a test reads the migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LedgerState {
    /// Owed to Stripe; claimed once its `next_attempt_at` has come.
    Pending,
    /// Claimed by a dispatcher until `lease_until`.
    InFlight,
    /// Everything owed was accepted.
    Synced,
    /// The customer has no Stripe mapping yet.
    PendingMapping,
    /// Not to be sent: no meter mapping, or sync disabled.
    Skipped,
    /// Refused for good; waits for `POST /v1/stripe/batches/retry`.
    Failed,
    /// Older than Stripe's 35 days.
    Expired,
    /// A meter event in doubt that Stripe's summaries cannot settle: a person decides
    /// (`POST /v1/stripe/sync/batches/{id}/resolve`).
    NeedsReconciliation,
}

impl LedgerState {
    /// Every state, in the order of the CHECK constraint.
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::InFlight,
        Self::Synced,
        Self::PendingMapping,
        Self::Skipped,
        Self::Failed,
        Self::Expired,
        Self::NeedsReconciliation,
    ];
    /// The names of [`Self::ALL`], in the same order.
    pub const NAMES: [&'static str; 8] = Self::names(Self::ALL);
    /// The states still owed to Stripe: the sync lag is the age of the oldest of them.
    pub const OWED: [Self; 3] = [Self::Pending, Self::InFlight, Self::PendingMapping];
    /// The states a window may leave again (the owed ones, and those waiting for a person);
    /// the others (`synced`, `skipped`, `expired`) only accumulate.
    pub const OPEN: [Self; 5] = [
        Self::Pending,
        Self::InFlight,
        Self::PendingMapping,
        Self::Failed,
        Self::NeedsReconciliation,
    ];

    /// The states nothing is ever sent for again once their window is past Stripe's 35 days:
    /// what retention may prune. `failed` and `needs_reconciliation` wait for an operator,
    /// the others are still being worked on.
    pub const COMPLETED: [Self; 3] = [Self::Synced, Self::Skipped, Self::Expired];

    /// The name stored in `sync_status` and shown by the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Synced => "synced",
            Self::PendingMapping => "pending_mapping",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::NeedsReconciliation => "needs_reconciliation",
        }
    }

    /// The names of `states`, for constants such as [`Self::NAMES`].
    pub const fn names<const N: usize>(states: [Self; N]) -> [&'static str; N] {
        let mut names = [""; N];
        let mut i = 0;
        while i < N {
            names[i] = states[i].as_str();
            i += 1;
        }
        names
    }

    /// Whether a window in this state is still owed to Stripe ([`Self::OWED`]).
    pub fn is_owed(self) -> bool {
        Self::OWED.contains(&self)
    }
}

impl std::fmt::Display for LedgerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is none of the [`LedgerState`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ledger state {0:?}")]
pub struct UnknownLedgerState(pub String);

impl std::str::FromStr for LedgerState {
    type Err = UnknownLedgerState;

    fn from_str(name: &str) -> Result<Self, UnknownLedgerState> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| UnknownLedgerState(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ledger_state_round_trips() {
        for state in LedgerState::ALL {
            assert_eq!(state.as_str().parse::<LedgerState>(), Ok(state));
            assert_eq!(state.to_string(), state.as_str());
        }
        let names: std::collections::BTreeSet<_> = LedgerState::NAMES.into_iter().collect();
        assert_eq!(
            names.len(),
            LedgerState::ALL.len(),
            "two states share a name"
        );
        assert_eq!(
            LedgerState::NAMES,
            LedgerState::ALL.map(LedgerState::as_str)
        );
        for bad in ["", "Pending", "in-flight", "sending", "synced "] {
            assert!(bad.parse::<LedgerState>().is_err(), "{bad:?}");
        }
        assert!(LedgerState::OWED
            .iter()
            .all(|s| LedgerState::OPEN.contains(s)));
    }

    /// The CHECK constraint of `stripe_sync_batches.sync_status` in the embedded migrations
    /// allows exactly [`LedgerState::ALL`], in the same order.
    #[test]
    fn ledger_states_are_what_the_schema_allows() {
        const CHECK: &str = "CHECK (sync_status IN (";
        let checks: Vec<&str> = meterline_common::postgres::MIGRATOR
            .iter()
            .filter_map(|m| m.sql.split_once(CHECK).map(|(_, rest)| rest))
            .collect();
        assert_eq!(checks.len(), 1, "one migration constrains sync_status");
        let (list, _) = checks[0].split_once("))").expect("the CHECK list ends");
        let allowed: Vec<&str> = list
            .split(',')
            .map(|name| name.trim().trim_matches('\''))
            .collect();
        assert_eq!(allowed, LedgerState::NAMES);
    }

    /// Every state the SQL of the ledger's files names (a quoted word other than a send's
    /// status, a mapping's constants or a Stripe meter formula) is a [`LedgerState`].
    #[test]
    fn the_ledger_sql_names_only_ledger_states() {
        let sources = [
            include_str!("../ledger.rs"),
            include_str!("sends.rs"),
            include_str!("doubt.rs"),
            include_str!("reopen.rs"),
            include_str!("reports.rs"),
            include_str!("carry.rs"),
            include_str!("retention.rs"),
        ];
        let code: String = sources
            .iter()
            .map(|source| {
                source
                    .split_once("#[cfg(test)]")
                    .map_or(*source, |(code, _)| code)
            })
            .collect();
        let code = code.as_str();
        let others = [
            "sending", "accepted", "refused", "dropped", "customer", "stripe", "active", "last",
            "sum",
        ];
        let mut named = 0;
        let mut rest = code;
        while let Some(start) = rest.find('\'') {
            rest = &rest[start + 1..];
            let Some(end) = rest.find('\'') else { break };
            let quoted = &rest[..end];
            if quoted.is_empty()
                || !quoted
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-')
            {
                continue; // a lifetime, a char, a format argument
            }
            rest = &rest[end + 1..];
            if !others.contains(&quoted) {
                assert!(
                    quoted.parse::<LedgerState>().is_ok(),
                    "'{quoted}' in the ledger's SQL"
                );
                named += 1;
            }
        }
        assert!(named > 10, "the scan found the states in the SQL");
    }
}

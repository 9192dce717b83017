//! Window sizes of each tenant and environment, as a history of changes.
//!
//! Rules kept here:
//! - Windows never overlap. A size applies to events at or after its `effective_from`, and a
//!   change is scheduled at an instant that is a boundary of BOTH the old and the new size (a
//!   multiple of their least common multiple since the Unix epoch). The last window of the old
//!   size therefore ends exactly where the first window of the new size starts.
//! - A window never changes size once an event is in it. Events may be up to the ingest's
//!   `INGEST_MAX_FUTURE_SECONDS` ahead, so when a change is asked for, events that far ahead
//!   may already be windowed in the old size: the change takes effect no earlier than that
//!   lead, and only a change further ahead than the lead can still be replaced.

use std::collections::HashMap;

use meterline_schemas::{EnvironmentId, TenantId, Window};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::scope_map::ScopeMap;
use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;

/// The size of a window when the tenant never chose one.
pub const DEFAULT_WINDOW_MINUTES: u32 = 60;

/// One tenant environment's sizes, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SizeHistory {
    changes: Vec<(OffsetDateTime, u32)>,
}

impl SizeHistory {
    pub fn new(mut changes: Vec<(OffsetDateTime, u32)>) -> Self {
        changes.sort();
        Self { changes }
    }

    /// The size in force at `ts`.
    pub fn size_at(&self, ts: OffsetDateTime) -> u32 {
        self.changes
            .iter()
            .rev()
            .find(|(from, _)| *from <= ts)
            .map(|(_, minutes)| *minutes)
            .unwrap_or(DEFAULT_WINDOW_MINUTES)
    }

    /// The size in force from now on (the latest change, even if still ahead).
    pub fn latest(&self) -> u32 {
        self.changes
            .last()
            .map(|(_, m)| *m)
            .unwrap_or(DEFAULT_WINDOW_MINUTES)
    }

    /// The window an event at `ts` belongs to.
    pub fn window_at(&self, ts: OffsetDateTime) -> Result<Window, meterline_schemas::SchemaError> {
        Window::containing(ts, self.size_at(ts))
    }
}

/// When a change from `old` to `new` minutes, asked for at `now`, takes effect: the first
/// instant at or after `now` that is a multiple of lcm(old, new) minutes since the epoch.
pub fn change_takes_effect(now: OffsetDateTime, old: u32, new: u32) -> OffsetDateTime {
    let step = i64::from(lcm(old.max(1), new.max(1))) * 60;
    let t = now.unix_timestamp();
    let aligned = if t.rem_euclid(step) == 0 && now.nanosecond() == 0 {
        t
    } else {
        t - t.rem_euclid(step) + step
    };
    OffsetDateTime::from_unix_timestamp(aligned).unwrap_or(now)
}

fn lcm(a: u32, b: u32) -> u32 {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// The sizes of every tenant environment, as read from PostgreSQL.
#[derive(Debug, Clone, Default)]
pub struct AllSizes {
    by_scope: ScopeMap<SizeHistory>,
}

impl AllSizes {
    pub fn history(&self, tenant: &TenantId, environment: &EnvironmentId) -> SizeHistory {
        self.by_scope
            .get(tenant, environment)
            .cloned()
            .unwrap_or_default()
    }

    /// The window an event at `ts` of this tenant environment belongs to.
    pub fn window_at(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        ts: OffsetDateTime,
    ) -> Result<Window, meterline_schemas::SchemaError> {
        match self.by_scope.get(tenant, environment) {
            Some(history) => history.window_at(ts),
            None => Window::containing(ts, DEFAULT_WINDOW_MINUTES),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WindowSizeError {
    #[error("window sizes: {0}")]
    Database(#[from] sqlx::Error),
    #[error("window sizes: stored row is invalid: {0}")]
    Corrupt(String),
    #[error("window size must be between 1 and 1440 minutes, got {0}")]
    OutOfRange(u32),
}

/// Every tenant environment's history: the aggregator reads them all (the one cross-tenant
/// read of this table); the table is small, one row per change.
pub async fn load_all(pool: &PgPool) -> Result<AllSizes, WindowSizeError> {
    let rows: Vec<(String, String, OffsetDateTime, i32)> = sqlx::query_as(
        "SELECT tenant_id, environment_id, effective_from, window_minutes
         FROM aggregation_window_sizes",
    )
    .fetch_all(pool)
    .await?;
    let mut grouped: HashMap<(TenantId, EnvironmentId), Vec<(OffsetDateTime, u32)>> =
        HashMap::new();
    for (tenant, environment, from, minutes) in rows {
        let corrupt = |e: &dyn std::fmt::Display| WindowSizeError::Corrupt(e.to_string());
        let key = (
            TenantId::parse(&tenant).map_err(|e| corrupt(&e))?,
            EnvironmentId::parse(&environment).map_err(|e| corrupt(&e))?,
        );
        let minutes = u32::try_from(minutes).map_err(|e| corrupt(&e))?;
        grouped.entry(key).or_default().push((from, minutes));
    }
    Ok(AllSizes {
        by_scope: grouped
            .into_iter()
            .map(|(k, v)| (k, SizeHistory::new(v)))
            .collect(),
    })
}

/// One tenant environment's history (the default size when it never chose one).
pub async fn load_scope(
    pool: &PgPool,
    scope: &TenantScope,
) -> Result<SizeHistory, WindowSizeError> {
    let rows: Vec<(OffsetDateTime, i32)> = sqlx::query_as(
        "SELECT effective_from, window_minutes FROM aggregation_window_sizes
         WHERE tenant_id = $1 AND environment_id = $2",
    )
    .bind_scope(scope)
    .fetch_all(pool)
    .await?;
    let changes = rows
        .into_iter()
        .map(|(from, minutes)| {
            u32::try_from(minutes)
                .map(|m| (from, m))
                .map_err(|e| WindowSizeError::Corrupt(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(SizeHistory::new(changes))
}

/// Changes the window size of `scope` to `minutes` and returns when the change takes effect.
///
/// `lead` is how far ahead of `now` an event may already have been accepted and windowed (the
/// ingest's `INGEST_MAX_FUTURE_SECONDS` plus clock skew). The change takes effect at the first
/// instant at or after `now + lead` that is a boundary of both sizes: an event windowed before
/// the change was written is then always earlier than it, so no event is ever counted in a
/// window of the old size and another of the new. For the same reason a change still ahead is
/// replaced (or withdrawn) only while it is past `now + lead`; one nearer than that is fixed,
/// and the new change follows it. `None` when nothing new was scheduled: the size in force
/// from then on already is `minutes` (or becomes it again because a pending change was
/// withdrawn).
pub async fn schedule_change(
    pool: &PgPool,
    scope: &TenantScope,
    minutes: u32,
    now: OffsetDateTime,
    lead: std::time::Duration,
) -> Result<Option<OffsetDateTime>, WindowSizeError> {
    if !(1..=1440).contains(&minutes) {
        return Err(WindowSizeError::OutOfRange(minutes));
    }
    let mut tx = pool.begin().await?;
    // Serialise changes of one scope: two concurrent changes must not both align to the
    // same old size.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))")
        .bind_scope(scope)
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(OffsetDateTime, i32)> = sqlx::query_as(
        "SELECT effective_from, window_minutes FROM aggregation_window_sizes
         WHERE tenant_id = $1 AND environment_id = $2",
    )
    .bind_scope(scope)
    .fetch_all(&mut *tx)
    .await?;
    let history = SizeHistory::new(
        rows.into_iter()
            .map(|(from, m)| (from, m.max(1) as u32))
            .collect(),
    );
    let horizon = now + lead;
    let plan = plan_change(&history, minutes, horizon);
    if plan.withdraws {
        sqlx::query(
            "DELETE FROM aggregation_window_sizes
             WHERE tenant_id = $1 AND environment_id = $2 AND effective_from > $3",
        )
        .bind_scope(scope)
        .bind(horizon)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(effective_from) = plan.effective_from {
        sqlx::query(
            "INSERT INTO aggregation_window_sizes
                 (tenant_id, environment_id, effective_from, window_minutes)
             VALUES ($1, $2, $3, $4)",
        )
        .bind_scope(scope)
        .bind(effective_from)
        .bind(minutes as i32)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(plan.effective_from)
}

/// What [`schedule_change`] writes: whether it withdraws the changes past the horizon, and
/// when the new size takes effect (`None`: nothing to schedule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChangePlan {
    withdraws: bool,
    effective_from: Option<OffsetDateTime>,
}

/// The rule of [`schedule_change`] on a history: changes at or before `horizon` may already
/// have windowed events and stay; those past it have windowed nothing yet and are replaced by
/// this one, which follows whatever is in force from `horizon` on.
fn plan_change(history: &SizeHistory, minutes: u32, horizon: OffsetDateTime) -> ChangePlan {
    let kept = SizeHistory::new(
        history
            .changes
            .iter()
            .filter(|(from, _)| *from <= horizon)
            .copied()
            .collect(),
    );
    let base = kept.latest();
    ChangePlan {
        withdraws: kept.changes.len() < history.changes.len(),
        effective_from: (base != minutes).then(|| change_takes_effect(horizon, base, minutes)),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn default_size_without_history() {
        let h = SizeHistory::default();
        assert_eq!(h.size_at(datetime!(2026-11-26 10:30 UTC)), 60);
        let w = h.window_at(datetime!(2026-11-26 10:30 UTC)).unwrap();
        assert_eq!(w.start(), datetime!(2026-11-26 10:00 UTC));
        assert_eq!(w.end(), datetime!(2026-11-26 11:00 UTC));
    }

    #[test]
    fn a_change_applies_from_its_instant() {
        let h = SizeHistory::new(vec![(datetime!(2026-11-26 12:00 UTC), 15)]);
        assert_eq!(h.size_at(datetime!(2026-11-26 11:59:59 UTC)), 60);
        assert_eq!(h.size_at(datetime!(2026-11-26 12:00 UTC)), 15);
        assert_eq!(h.latest(), 15);
    }

    #[test]
    fn changes_take_effect_on_a_boundary_of_both_sizes() {
        let now = datetime!(2026-11-26 10:20:30 UTC);
        // 60 -> 15: the next full hour.
        assert_eq!(
            change_takes_effect(now, 60, 15),
            datetime!(2026-11-26 11:00 UTC)
        );
        // 15 -> 60: also the next full hour (lcm 60).
        assert_eq!(
            change_takes_effect(now, 15, 60),
            datetime!(2026-11-26 11:00 UTC)
        );
        // 10 -> 15: lcm 30 minutes.
        assert_eq!(
            change_takes_effect(now, 10, 15),
            datetime!(2026-11-26 10:30 UTC)
        );
        // Exactly on a boundary: now.
        let on = datetime!(2026-11-26 11:00 UTC);
        assert_eq!(change_takes_effect(on, 60, 30), on);
    }

    #[test]
    fn windows_of_two_sizes_never_overlap_around_a_change() {
        let now = datetime!(2026-11-26 10:20 UTC);
        for (old, new) in [(60, 15), (15, 60), (7, 60), (45, 20), (5, 5)] {
            let from = change_takes_effect(now, old, new);
            let h = SizeHistory::new(vec![(datetime!(2026-01-01 0:00 UTC), old), (from, new)]);
            // Walk minute by minute across the change: consecutive windows either are the
            // same window or touch end-to-start.
            let mut ts = from - time::Duration::hours(8);
            let mut previous = h.window_at(ts).unwrap();
            while ts < from + time::Duration::hours(8) {
                ts += time::Duration::minutes(1);
                let w = h.window_at(ts).unwrap();
                assert!(w.contains(ts), "{old}->{new}: {ts} in {w:?}");
                if w != previous {
                    assert_eq!(previous.end(), w.start(), "{old}->{new} at {ts}");
                    previous = w;
                }
            }
        }
    }

    fn apply(
        history: &SizeHistory,
        plan: ChangePlan,
        horizon: OffsetDateTime,
        minutes: u32,
    ) -> SizeHistory {
        let mut changes: Vec<_> = history
            .changes
            .iter()
            .filter(|(from, _)| !plan.withdraws || *from <= horizon)
            .copied()
            .collect();
        changes.extend(plan.effective_from.map(|from| (from, minutes)));
        SizeHistory::new(changes)
    }

    #[test]
    fn events_already_windowed_keep_their_window_after_a_change() {
        let now = datetime!(2026-11-26 10:58:30 UTC);
        for lead in [0, 5, 65, 240] {
            let horizon = now + time::Duration::minutes(lead);
            for (old, new) in [(60, 15), (15, 60), (7, 60), (45, 20), (1, 1440)] {
                let before = SizeHistory::new(vec![(datetime!(2026-01-01 0:00 UTC), old)]);
                let plan = plan_change(&before, new, horizon);
                let from = plan.effective_from.expect("a change");
                assert!(
                    from >= horizon,
                    "{old}->{new}, lead {lead}: {from} before {horizon}"
                );
                let after = apply(&before, plan, horizon, new);
                // Every event that can have been accepted before the change (up to the lead
                // ahead of now) stays in the window it was counted in.
                let mut ts = now - time::Duration::hours(3);
                while ts < horizon {
                    assert_eq!(
                        before.window_at(ts).unwrap(),
                        after.window_at(ts).unwrap(),
                        "{old}->{new}, lead {lead}, event at {ts}"
                    );
                    ts += time::Duration::seconds(37);
                }
                assert_eq!(after.size_at(from), new);
            }
        }
    }

    #[test]
    fn a_pending_change_is_replaced_only_while_it_is_past_the_lead() {
        let now = datetime!(2026-11-26 10:20 UTC);
        let since = datetime!(2026-01-01 0:00 UTC);
        let pending = datetime!(2026-11-26 11:00 UTC);
        let history = SizeHistory::new(vec![(since, 60), (pending, 15)]);

        // Far enough ahead: replaced, aligned from the size before it.
        let plan = plan_change(&history, 30, now + time::Duration::minutes(5));
        assert!(plan.withdraws);
        assert_eq!(plan.effective_from, Some(pending));
        // Asked back to the size in force: withdrawn, nothing new.
        let plan = plan_change(&history, 60, now + time::Duration::minutes(5));
        assert_eq!(
            plan,
            ChangePlan {
                withdraws: true,
                effective_from: None
            }
        );

        // Within the lead: events of 15-minute windows may exist past 11:00, so it stays and
        // the new size follows it, aligned from 15 minutes.
        let horizon = now + time::Duration::minutes(45);
        let plan = plan_change(&history, 60, horizon);
        assert!(!plan.withdraws);
        assert_eq!(plan.effective_from, Some(datetime!(2026-11-26 12:00 UTC)));
        let plan = plan_change(&history, 15, horizon);
        assert_eq!(
            plan,
            ChangePlan {
                withdraws: false,
                effective_from: None
            }
        );
    }
}

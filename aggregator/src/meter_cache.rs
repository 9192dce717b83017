//! The meters and window sizes of every tenant environment, kept in memory and refreshed
//! from PostgreSQL before each batch.
//!
//! Rule kept here: refresh AFTER a batch was read from Kafka and BEFORE it is resolved. A
//! client creates a meter and then sends events; by the time those events are in a batch,
//! the meter is committed, so the refresh sees it and no event is resolved against a stale
//! set. The refresh reads only meters changed since the last one (minus a margin for
//! late-committing writes), so it costs one small query.

use meterline_catalog::meters::MeterStore;
use meterline_catalog::scope_map::ScopeMap;
use meterline_catalog::window_sizes::{self, AllSizes};
use meterline_schemas::{EnvironmentId, MeterDefinition, MeterId, TenantId};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::Error;

/// A write's `updated_at` is its transaction's start: one that commits later than a
/// concurrent refresh can carry an older time. Re-reading this far back catches it.
const LATE_COMMIT_MARGIN: time::Duration = time::Duration::seconds(30);

pub struct MeterCache {
    store: MeterStore,
    pool: PgPool,
    meters: ScopeMap<Vec<MeterDefinition>>,
    newest: Option<OffsetDateTime>,
    sizes: AllSizes,
}

impl MeterCache {
    pub fn new(pool: PgPool) -> Self {
        Self {
            store: MeterStore::new(pool.clone()),
            pool,
            meters: ScopeMap::default(),
            newest: None,
            sizes: AllSizes::default(),
        }
    }

    /// Reads meters changed since the last refresh, and every window size.
    pub async fn refresh(&mut self) -> Result<(), Error> {
        let since = self
            .newest
            .map(|t| t - LATE_COMMIT_MARGIN)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let changed = self
            .store
            .list_changed_since(since)
            .await
            .map_err(|e| Error::Meters(e.to_string()))?;
        for (scope, stored) in changed {
            self.newest = Some(
                self.newest
                    .map_or(stored.updated_at, |n| n.max(stored.updated_at)),
            );
            let meters = self
                .meters
                .entry_or_default(scope.tenant_id, scope.environment_id);
            match meters.iter_mut().find(|m| m.id == stored.definition.id) {
                Some(existing) => *existing = stored.definition,
                None => meters.push(stored.definition),
            }
        }
        self.sizes = window_sizes::load_all(&self.pool)
            .await
            .map_err(|e| Error::Meters(e.to_string()))?;
        Ok(())
    }

    pub fn meters(&self, tenant: &TenantId, environment: &EnvironmentId) -> &[MeterDefinition] {
        self.meters
            .get(tenant, environment)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn meter(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        id: &MeterId,
    ) -> Option<&MeterDefinition> {
        self.meters(tenant, environment)
            .iter()
            .find(|m| &m.id == id)
    }

    pub fn sizes(&self) -> &AllSizes {
        &self.sizes
    }
}

//! The meters and window sizes of every tenant environment, kept in memory and refreshed
//! from PostgreSQL before each batch.
//!
//! Rule kept here: refresh AFTER a batch was read from Kafka and BEFORE it is resolved. A
//! client creates a meter and then sends events; by the time those events are in a batch,
//! the meter is committed, so the refresh sees it and no event is resolved against a stale
//! set. The refresh reads only meters changed since the last one (minus a margin for
//! late-committing writes), so it costs one small query.

use meterline_catalog::meter_versions;
use meterline_catalog::meters::MeterStore;
use meterline_catalog::scope_map::ScopeMap;
use meterline_catalog::window_sizes::{self, AllSizes};
use meterline_schemas::{Aggregation, EnvironmentId, MeterDefinition, MeterId, TenantId};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::billing::Histories;
use crate::Error;

/// A write's `updated_at` is its transaction's start: one that commits later than a
/// concurrent refresh can carry an older time. Re-reading this far back catches it.
const LATE_COMMIT_MARGIN: time::Duration = time::Duration::seconds(30);

pub struct MeterCache {
    store: MeterStore,
    pool: PgPool,
    meters: ScopeMap<Vec<MeterDefinition>>,
    /// The meters that changed what they count ([`meter_versions`]), re-read whenever a meter
    /// changed (a change writes its version and its meter in one transaction).
    histories: ScopeMap<Histories>,
    newest: Option<OffsetDateTime>,
    sizes: AllSizes,
}

impl MeterCache {
    pub fn new(pool: PgPool) -> Self {
        Self {
            store: MeterStore::new(pool.clone()),
            pool,
            meters: ScopeMap::default(),
            histories: ScopeMap::default(),
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
        if self.newest.is_none() || !changed.is_empty() {
            self.histories = meter_versions::load_all(&self.pool)
                .await
                .map_err(|e| Error::Meters(e.to_string()))?;
        }
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

    /// The aggregation histories of the meters of a tenant environment that changed what
    /// they count; `None` when none did.
    pub fn histories(&self, tenant: &TenantId, environment: &EnvironmentId) -> Option<&Histories> {
        self.histories.get(tenant, environment)
    }

    /// The aggregation of `meter` in force for a window starting at `start`, and since when
    /// (`None`: since the meter was created).
    pub fn aggregation_at<'a>(
        &'a self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        meter: &'a MeterDefinition,
        start: OffsetDateTime,
    ) -> (&'a Aggregation, Option<OffsetDateTime>) {
        match self
            .histories(tenant, environment)
            .and_then(|h| h.get(&meter.id))
        {
            Some(history) => history.at(&meter.aggregation, start),
            None => (&meter.aggregation, None),
        }
    }

    pub fn sizes(&self) -> &AllSizes {
        &self.sizes
    }
}

//! A map keyed by tenant and environment that is searched without building ids.
//!
//! The aggregator looks up the meters and window size of every event's tenant environment;
//! a map keyed by an owned `(TenantId, EnvironmentId)` pair would clone both ids for each
//! lookup. Two levels keyed by the ids themselves are searched with the borrowed text, and
//! hashed with foldhash rather than SipHash: the keys are our own ids (a tenant and
//! environment come from signed tokens), not input an attacker can choose to collide.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use meterline_schemas::{EnvironmentId, TenantId};

#[derive(Debug, Clone)]
pub struct ScopeMap<V> {
    tenants: HashMap<TenantId, HashMap<EnvironmentId, V, RandomState>, RandomState>,
}

impl<V> Default for ScopeMap<V> {
    fn default() -> Self {
        Self {
            tenants: HashMap::default(),
        }
    }
}

impl<V> ScopeMap<V> {
    pub fn get(&self, tenant: &TenantId, environment: &EnvironmentId) -> Option<&V> {
        self.tenants.get(tenant.as_str())?.get(environment.as_str())
    }

    /// The value of a tenant environment, inserted with `V::default()` when absent.
    pub fn entry_or_default(&mut self, tenant: TenantId, environment: EnvironmentId) -> &mut V
    where
        V: Default,
    {
        self.tenants
            .entry(tenant)
            .or_default()
            .entry(environment)
            .or_default()
    }
}

impl<V> FromIterator<((TenantId, EnvironmentId), V)> for ScopeMap<V> {
    fn from_iter<I: IntoIterator<Item = ((TenantId, EnvironmentId), V)>>(iter: I) -> Self {
        let mut map = Self::default();
        for ((tenant, environment), value) in iter {
            map.tenants
                .entry(tenant)
                .or_default()
                .insert(environment, value);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_by_both_ids_and_only_by_both() {
        let t = |s: &str| TenantId::parse(s).unwrap();
        let e = |s: &str| EnvironmentId::parse(s).unwrap();
        let mut map: ScopeMap<Vec<u32>> = [((t("a"), e("prod")), vec![1])].into_iter().collect();
        map.entry_or_default(t("a"), e("test")).push(2);
        map.entry_or_default(t("a"), e("prod")).push(3);
        assert_eq!(map.get(&t("a"), &e("prod")), Some(&vec![1, 3]));
        assert_eq!(map.get(&t("a"), &e("test")), Some(&vec![2]));
        assert_eq!(map.get(&t("b"), &e("prod")), None);
        assert_eq!(map.get(&t("a"), &e("staging")), None);
    }
}

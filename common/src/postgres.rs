//! PostgreSQL: the pool every service uses, the sqlx migrations, and the readiness probe.
//!
//! Migrations live in `common/migrations/postgres` and are embedded into the binary, so the
//! schema a service expects always ships with it; `meterline migrate` applies them.

use std::time::Duration;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{PgPool, Postgres};

use crate::auth::TenantScope;
use crate::config::PostgresSettings;
use crate::Error;

/// The embedded PostgreSQL migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A pool that connects lazily: a service starts (and reports itself unready) while the
/// database is down, and recovers without a restart when it comes back.
pub fn pool(settings: &PostgresSettings, max_connections: u32) -> Result<PgPool, Error> {
    let options: PgConnectOptions = settings.url.parse().map_err(|source| Error::Postgres {
        context: "parsing DATABASE_URL",
        source,
    })?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

pub async fn check(pool: &PgPool) -> Result<(), String> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| format!("query failed: {e}"))
}

/// Binds a tenant scope as a query's next two parameters, the tenant then the environment.
/// Every query of one tenant environment's rows is scoped from the bearer token this way
/// (by convention `WHERE tenant_id = $1 AND environment_id = $2`), never from a body.
pub trait BindScope<'q>: Sized {
    fn bind_scope(self, scope: &'q TenantScope) -> Self;
}

impl<'q> BindScope<'q> for Query<'q, Postgres, PgArguments> {
    fn bind_scope(self, scope: &'q TenantScope) -> Self {
        self.bind(scope.tenant_id.as_str())
            .bind(scope.environment_id.as_str())
    }
}

impl<'q, O> BindScope<'q> for QueryAs<'q, Postgres, O, PgArguments> {
    fn bind_scope(self, scope: &'q TenantScope) -> Self {
        self.bind(scope.tenant_id.as_str())
            .bind(scope.environment_id.as_str())
    }
}

impl<'q, O> BindScope<'q> for QueryScalar<'q, Postgres, O, PgArguments> {
    fn bind_scope(self, scope: &'q TenantScope) -> Self {
        self.bind(scope.tenant_id.as_str())
            .bind(scope.environment_id.as_str())
    }
}

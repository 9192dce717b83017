//! PostgreSQL through the real server with sqlx: migrations applied, rows written and read,
//! constraints enforced.

use meterline_common::postgres::MIGRATOR;
use meterline_tests::Namespace;

#[tokio::test]
async fn meters_are_written_and_read_back() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    sqlx::query(
        "INSERT INTO meters (tenant_id, environment_id, id, event_name, aggregation, property)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind("tenant_123")
    .bind("env_prod")
    .bind("tokens")
    .bind("llm.completion")
    .bind("SUM")
    .bind("tokens")
    .execute(&pool)
    .await
    .expect("inserting a meter");

    let (event_name, aggregation, property): (String, String, Option<String>) = sqlx::query_as(
        "SELECT event_name, aggregation, property FROM meters
         WHERE tenant_id = $1 AND environment_id = $2 AND id = $3",
    )
    .bind("tenant_123")
    .bind("env_prod")
    .bind("tokens")
    .fetch_one(&pool)
    .await
    .expect("reading the meter");
    assert_eq!(
        (
            event_name.as_str(),
            aggregation.as_str(),
            property.as_deref()
        ),
        ("llm.completion", "SUM", Some("tokens"))
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn the_schema_refuses_what_the_domain_forbids() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    let insert = |aggregation: &'static str, property: Option<&'static str>| {
        sqlx::query(
            "INSERT INTO meters (tenant_id, environment_id, id, event_name, aggregation, property)
             VALUES ('t', 'e', $1, 'x', $2, $3)",
        )
        .bind(format!("{aggregation}-{property:?}"))
        .bind(aggregation)
        .bind(property)
        .execute(&pool)
    };
    assert!(
        insert("AVERAGE", Some("p")).await.is_err(),
        "unknown aggregation"
    );
    assert!(insert("SUM", None).await.is_err(), "SUM without a property");
    assert!(
        insert("COUNT", Some("p")).await.is_err(),
        "COUNT with a property"
    );
    assert!(insert("COUNT", None).await.is_ok());
    ns.drop_databases().await;
}

#[tokio::test]
async fn every_migration_is_recorded() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&pool)
            .await
            .expect("reading _sqlx_migrations");
    let expected: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);
    ns.drop_databases().await;
}

//! Marking windows dirty against the real PostgreSQL while a publication holds some of them:
//! the batch marks the free windows at once, waits only for the held one, and that window is
//! dirty again after the publication commits (its new events go out in a later revision).

use std::time::Duration;

use aggregator::windows::{WindowKey, WindowRegistry};
use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId, Window};
use meterline_tests::Namespace;
use time::macros::datetime;

fn key(customer: &str) -> WindowKey {
    WindowKey {
        tenant_id: TenantId::parse("t").unwrap(),
        environment_id: EnvironmentId::parse("e").unwrap(),
        customer_id: CustomerId::parse(customer).unwrap(),
        meter_id: MeterId::parse("calls").unwrap(),
        window: Window::containing(datetime!(2026-11-26 10:00 UTC), 60).unwrap(),
    }
}

#[tokio::test]
async fn a_window_held_by_a_publication_is_marked_after_it_and_reported_late() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    let registry = WindowRegistry::new(pool.clone());
    let keys = vec![key("a-held"), key("b-free")];
    assert!(registry
        .mark_dirty(&keys, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    // Both published once.
    sqlx::query("UPDATE aggregation_windows SET dirty = false, revision = 1")
        .execute(&pool)
        .await
        .unwrap();

    // A publication holds one window, as a claim does.
    let mut publication = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM aggregation_windows WHERE customer_id = 'a-held' FOR UPDATE")
        .execute(&mut *publication)
        .await
        .unwrap();
    let marking = tokio::spawn({
        let registry = registry.clone();
        let keys = keys.clone();
        async move { registry.mark_dirty(&keys, Duration::ZERO).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !marking.is_finished(),
        "the marking waits for the held window"
    );
    // Meanwhile it holds the free window, which sorts after the held one: it did not wait
    // for the held window before marking the rest.
    let free_is_taken = sqlx::query(
        "SELECT 1 FROM aggregation_windows WHERE customer_id = 'b-free' FOR UPDATE NOWAIT",
    )
    .execute(&pool)
    .await
    .is_err();
    assert!(
        free_is_taken,
        "the free window is already marked (locked) by the batch"
    );
    // The publication records revision 2 and clears the mark, as `Claim::finish` does.
    sqlx::query(
        "UPDATE aggregation_windows SET dirty = false, revision = 2 WHERE customer_id = 'a-held'",
    )
    .execute(&mut *publication)
    .await
    .unwrap();
    publication.commit().await.unwrap();

    let mut late = marking.await.unwrap().unwrap();
    late.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(
        late, expected,
        "both windows had been published: their events are late"
    );
    let rows: Vec<(String, bool, i32)> = sqlx::query_as(
        "SELECT customer_id, dirty, revision FROM aggregation_windows ORDER BY customer_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("a-held".to_owned(), true, 2),
            ("b-free".to_owned(), true, 1)
        ],
        "dirty again after the publication, which keeps its revision"
    );
    ns.drop_databases().await;
}

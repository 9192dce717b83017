//! Importing a Stripe account's existing customers and uploading mappings in bulk, through the
//! real stripe-sink binary, PostgreSQL and the local Stripe: an import over several pages maps
//! exactly the customers carrying `metadata.external_id`, survives a SIGKILL of the sink in the
//! middle with the same result as an uninterrupted run, and a second import changes nothing;
//! a CSV upload answers every row (created, unchanged, conflict, invalid with its reason).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterline_tests::api::{get, post_json, send, token, Answer};

use crate::audit::{produce_customer_event, wait_found};
use meterline_tests::standin::Standin;
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::{json, Value};
use sqlx::PgPool;

const TENANT: &str = "tenant_import";
const ENV: &str = "env_prod";
/// Customers in the Stripe account: four pages of 100.
const CUSTOMERS: usize = 350;

async fn sink(ns: &Namespace, standin_base: &str) -> ServiceProcess {
    let mut env = ns.env();
    env.push(("STRIPE_API_BASE".into(), standin_base.to_owned()));
    // Longer than the stand-in's injected slowness below, so a slow page is not a timeout.
    env.push(("STRIPE_API_TIMEOUT_SECONDS".into(), "10".into()));
    ServiceProcess::spawn("stripe-sink", &env).await
}

async fn put_config(sink: &ServiceProcess, token: &str, api_key: &str) {
    let answer = send(
        reqwest::Client::new()
            .put(sink.url("/v1/stripe/config"))
            .bearer_auth(token)
            .json(&json!({"api_key": api_key, "sync_enabled": true,
                          "aggregation_window_minutes": 60, "webhook_secrets": [],
                          "rate_limit_per_second": 5})),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

/// Polls the job's status until `done` holds, failing with the last answer after `within`.
async fn wait_status(
    sink: &ServiceProcess,
    token: &str,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let answer = get(&sink.url(&format!("/v1/stripe/migrate/status/{id}")), token).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        if done(&answer.body) {
            return answer.body;
        }
        if Instant::now() > deadline {
            panic!(
                "import {id} did not get there within {within:?}: {}\n{}",
                answer.body,
                sink.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every active customer mapping in the database, external id -> Stripe customer, with source.
async fn active_mappings(pool: &PgPool) -> BTreeMap<String, (String, String)> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT entity_id, provider_entity_id, source FROM entity_integration_mappings
         WHERE tenant_id = $1 AND environment_id = $2 AND status = 'active'",
    )
    .bind(TENANT)
    .bind(ENV)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(c, p, s)| (c, (p, s))).collect()
}

/// A fingerprint of every mapping and customer state row: equal before and after means the
/// second import wrote nothing.
async fn mapping_fingerprint(pool: &PgPool) -> (i64, String, i64, String) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM entity_integration_mappings),
                (SELECT coalesce(max(updated_at)::text, '') FROM entity_integration_mappings),
                (SELECT count(*) FROM stripe_customer_states),
                (SELECT coalesce(max(updated_at)::text, '') FROM stripe_customer_states)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_import_maps_exactly_the_customers_with_an_external_id_through_a_kill_and_twice() {
    let ns = Namespace::create().await;
    // A generous stand-in limit for creating the customers; the sink paces itself at 5/s.
    let standin = Standin::start(1000).await;
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let mut without = 0;
    for i in 0..CUSTOMERS {
        let email = format!("customer{i}@example.com");
        let mut form = vec![("email", email.as_str())];
        let external = format!("imp_{i:03}");
        // Two in three carry an external id; a few carry one that is only spaces (invalid).
        let invalid = i % 50 == 1;
        if invalid {
            form.push(("metadata[external_id]", "   "));
        } else if i % 3 != 0 {
            form.push(("metadata[external_id]", external.as_str()));
        }
        let body = standin.post("/v1/customers", &form).await;
        let cus = body["id"].as_str().expect("a customer id").to_owned();
        if !invalid && i % 3 != 0 {
            expected.insert(external, cus);
        } else {
            without += 1;
        }
    }
    assert_eq!(expected.len() + without, CUSTOMERS);
    let clock: Value = reqwest::get(format!("{}/_standin/clock", standin.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The second the last customer was created in: the imports' requests come after it.
    let created_by = clock["now"].as_i64().expect("the stand-in's clock");
    let pool = ns.pg_pool().await;
    let t = token(TENANT, ENV);

    let first = sink(&ns, &standin.base).await;
    let start = post_json(&first.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    assert_eq!(start.status, 404, "no config yet: {:?}", start.body);
    put_config(&first, &t, &standin.key).await;
    // Every customer page answers slowly, so the kill below lands in the middle of the job.
    standin
        .control(
            "faults",
            json!({"rate_slow": 1.0, "slow_ms": 3000, "path_prefix": "/v1/customers"}),
        )
        .await;
    let start = post_json(&first.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    assert_eq!(start.status, 202, "{:?}", start.body);
    assert_eq!(start.body["status"], "running");
    let id = start.body["id"].as_str().expect("a job id").to_owned();
    let again = post_json(&first.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    assert_eq!(again.status, 409, "{:?}", again.body);
    assert_eq!(again.error_code(), "import_already_running");
    assert!(again.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&id));
    let other = get(
        &first.url(&format!("/v1/stripe/migrate/status/{id}")),
        &token("tenant_other", ENV),
    )
    .await;
    assert_eq!(other.status, 404, "another tenant's job: {:?}", other.body);

    // SIGKILL once the first page is applied and before the last one is.
    wait_status(&first, &t, &id, Duration::from_secs(120), |s| {
        s["pages"].as_i64() >= Some(1)
    })
    .await;
    first.kill().await;
    let (status, pages): (String, i32) =
        sqlx::query_as("SELECT status, pages FROM stripe_customer_imports WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "running", "the kill must land mid-job");
    assert!(
        (1..4).contains(&pages),
        "pages applied at the kill: {pages}"
    );

    // A new sink takes the job over once the dead one's lease expires, and finishes it.
    let second = sink(&ns, &standin.base).await;
    let done = wait_status(&second, &t, &id, Duration::from_secs(180), |s| {
        s["status"] != "running"
    })
    .await;
    let unmapped = without as i64;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["pages"], 4, "{done}");
    assert_eq!(done["customers_seen"], CUSTOMERS as i64, "{done}");
    assert_eq!(done["mapped"]["created"], expected.len() as i64, "{done}");
    assert_eq!(done["mapped"]["unchanged"], 0, "{done}");
    assert_eq!(done["conflicts"]["count"], 0, "{done}");
    assert_eq!(done["unmapped"]["count"], unmapped, "{done}");
    assert_eq!(done["unmapped"]["sample"].as_array().unwrap().len(), 20);
    assert_eq!(done["requested_by"], "test");
    let reasons: Vec<&str> = done["unmapped"]["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"invalid_external_id"), "{reasons:?}");
    assert!(reasons.contains(&"missing_external_id"), "{reasons:?}");

    // Exactly the customers with an external id are mapped, each to its own Stripe customer.
    let mappings = active_mappings(&pool).await;
    let mapped: BTreeMap<String, String> = mappings
        .iter()
        .map(|(c, (p, _))| (c.clone(), p.clone()))
        .collect();
    assert_eq!(mapped, expected);
    assert!(mappings.values().all(|(_, source)| source == "import"));
    let listed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM stripe_unmapped_customers
         WHERE tenant_id = $1 AND environment_id = $2 AND status = 'unmapped'",
    )
    .bind(TENANT)
    .bind(ENV)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(listed, unmapped, "the unmapped list holds the rest");
    let page = get(&second.url("/v1/stripe/customers/unmapped?limit=5"), &t).await;
    assert_eq!(page.body["data"].as_array().unwrap().len(), 5);
    assert_eq!(page.body["has_more"], true);

    // Each mapping is in the audit trail, made by the import on behalf of the token's subject.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log
         WHERE action = 'customer_mapping.created' AND actor_kind = 'import'
           AND actor_ref = $1 AND actor_subject = 'test'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, expected.len() as i64);
    // The key was decrypted for each page request, each time recorded first.
    let decryptions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log
         WHERE action = 'api_key.decrypted' AND actor_kind = 'import' AND actor_ref = $1
           AND actor_subject = 'test' AND details->>'purpose' = 'customer_import'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(decryptions >= 4, "{decryptions} decryptions for 4 pages");

    // A second import, Stripe answering fast again: it changes nothing.
    standin.control("faults", json!({})).await;
    let before = mapping_fingerprint(&pool).await;
    let start = post_json(&second.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    assert_eq!(start.status, 202, "{:?}", start.body);
    let id2 = start.body["id"].as_str().unwrap().to_owned();
    assert_ne!(id2, id);
    let done = wait_status(&second, &t, &id2, Duration::from_secs(180), |s| {
        s["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["customers_seen"], CUSTOMERS as i64, "{done}");
    assert_eq!(done["mapped"]["created"], 0, "{done}");
    assert_eq!(done["mapped"]["unchanged"], expected.len() as i64, "{done}");
    assert_eq!(done["unmapped"]["count"], unmapped, "{done}");
    assert_eq!(done["conflicts"]["count"], 0, "{done}");
    assert_eq!(done["retired"], 0, "{done}");
    assert_eq!(
        mapping_fingerprint(&pool).await,
        before,
        "the second import wrote"
    );

    // Paced by the account's limiter: from the first import on, never more than the
    // configured 5 requests in any second of the stand-in's clock.
    let inspect = standin.inspect().await;
    let seconds = inspect["requests_per_second"].as_array().unwrap();
    let busiest = seconds
        .iter()
        .filter(|s| s["second"].as_i64().unwrap() > created_by)
        .map(|s| s["count"].as_i64().unwrap())
        .max();
    assert!(
        busiest.is_some_and(|b| b <= 5),
        "busiest second of the imports: {busiest:?}"
    );

    second.terminate(Duration::from_secs(30)).await;
    ns.drop_databases().await;
}

/// Uploads `body` as `content_type` to the bulk route.
async fn upload(sink: &ServiceProcess, token: &str, content_type: &str, body: Vec<u8>) -> Answer {
    send(
        reqwest::Client::new()
            .post(sink.url("/v1/stripe/mappings/bulk"))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body),
    )
    .await
}

fn results(answer: &Answer) -> Vec<(i64, String, Option<String>)> {
    answer.body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["line"].as_i64().unwrap(),
                r["result"].as_str().unwrap().to_owned(),
                r["reason"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_bulk_csv_upload_answers_every_row() {
    let ns = Namespace::create().await;
    let sink = sink(&ns, "http://127.0.0.1:9").await;
    let t = token(TENANT, ENV);
    for (customer, cus) in [("c_taken", "cus_taken"), ("c_pre", "cus_pre")] {
        let answer = post_json(
            &sink.url("/v1/stripe/customers/mapping"),
            &t,
            &json!({"customer_id": customer, "provider_customer_id": cus}),
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
    }
    let file = "customer_id,provider_customer_id\n\
                c1,cus_1\n\
                \"acme, inc\",cus_2\n\
                c_taken,cus_taken\n\
                c5,cus_pre\n\
                c_pre,cus_6\n\
                c7,sub_7\n\
                c8\n\
                c1,cus_9\n\
                ,cus_10\n";
    let answer = upload(&sink, &t, "text/csv", file.into()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let counts = |a: &Answer| {
        ["rows", "created", "unchanged", "conflict", "invalid"].map(|k| a.body[k].as_i64().unwrap())
    };
    assert_eq!(counts(&answer), [9, 2, 1, 2, 4], "{:?}", answer.body);
    let rows = results(&answer);
    let verdicts: Vec<(i64, &str)> = rows.iter().map(|(l, r, _)| (*l, r.as_str())).collect();
    assert_eq!(
        verdicts,
        [
            (2, "created"),
            (3, "created"),
            (4, "unchanged"),
            (5, "conflict"),
            (6, "conflict"),
            (7, "invalid"),
            (8, "invalid"),
            (9, "invalid"),
            (10, "invalid"),
        ]
    );
    let reason = |line: i64| rows[(line - 2) as usize].2.clone().unwrap_or_default();
    assert!(
        reason(5).contains("already mapped to customer c_pre"),
        "{}",
        reason(5)
    );
    assert!(
        reason(6).contains("c_pre is already mapped to cus_pre"),
        "{}",
        reason(6)
    );
    assert!(reason(7).contains("provider_customer_id"), "{}", reason(7));
    assert!(reason(8).contains("expected 2 values"), "{}", reason(8));
    assert_eq!(reason(9), "customer_id already appears on line 2");
    assert!(reason(10).contains("customer_id"), "{}", reason(10));
    assert_eq!(answer.body["results"][1]["customer_id"], "acme, inc");

    let mapping = get(&sink.url("/v1/stripe/customers/mapping/c1"), &t).await;
    assert_eq!(mapping.body["provider_customer_id"], "cus_1");
    assert_eq!(mapping.body["source"], "manual");

    // The same file again: what was created is unchanged now, the rest is judged the same.
    let again = upload(&sink, &t, "text/csv; charset=utf-8", file.into()).await;
    assert_eq!(counts(&again), [9, 0, 3, 2, 4], "{:?}", again.body);

    // Refusals of the whole file write nothing.
    let pool = ns.pg_pool().await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM entity_integration_mappings")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mappings_before = count().await;
    let json_body = upload(&sink, &t, "application/json", b"c9,cus_9\n".to_vec()).await;
    assert_eq!(json_body.status, 415);
    assert_eq!(json_body.error_code(), "unsupported_media_type");
    let empty = upload(
        &sink,
        &t,
        "text/csv",
        b"customer_id,provider_customer_id\n".to_vec(),
    )
    .await;
    assert_eq!((empty.status, empty.error_code()), (400, "empty_file"));
    let huge = upload(&sink, &t, "text/csv", vec![b'a'; (1 << 20) + 1]).await;
    assert_eq!((huge.status, huge.error_code()), (413, "body_too_large"));
    assert_eq!(count().await, mappings_before);

    // A file larger than the other routes' 64 KiB limit is fine.
    let big: String = (0..2000)
        .map(|i| format!("bulk_customer_{i:05},cus_bulkcustomer{i:05}\n"))
        .collect();
    assert!(big.len() > 64 << 10);
    let answer = upload(&sink, &t, "text/csv", big.into_bytes()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(counts(&answer), [2000, 2000, 0, 0, 0]);

    // Another tenant's upload does not see this tenant's mappings.
    let other = upload(
        &sink,
        &token("tenant_other", ENV),
        "text/csv",
        b"c1,cus_1\n".to_vec(),
    )
    .await;
    assert_eq!(other.body["created"], 1, "{:?}", other.body);

    sink.terminate(Duration::from_secs(30)).await;
    ns.drop_databases().await;
}

#[tokio::test]
async fn webhook_events_newer_than_an_import_win_and_older_ones_are_stale() {
    let ns = Namespace::create().await;
    let standin = Standin::start(100).await;
    let moved = standin.customer("c_moved").await;
    let kept = standin.customer("c_kept").await;
    let sink = sink(&ns, &standin.base).await;
    let t = token(TENANT, ENV);
    put_config(&sink, &t, &standin.key).await;
    let start = post_json(&sink.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    let id = start.body["id"].as_str().expect("a job id").to_owned();
    let done = wait_status(&sink, &t, &id, Duration::from_secs(120), |s| {
        s["status"] != "running"
    })
    .await;
    assert_eq!(done["mapped"]["created"], 2, "{done}");

    // Stripe's events about the same customers: one created after the import read the list
    // (it wins), one created long before it (stale: the list already showed what came after).
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let scope = Some((TENANT, ENV));
    produce_customer_event(
        &ns,
        scope,
        "evt_new",
        "customer.updated",
        now + 1,
        &moved,
        "c_moved2",
    )
    .await;
    produce_customer_event(
        &ns,
        scope,
        "evt_old",
        "customer.updated",
        now - 3600,
        &kept,
        "c_gone",
    )
    .await;
    wait_found(&sink, "/v1/stripe/customers/mapping/c_moved2", &t).await;
    // The stale event is read (and counted as ignored) without changing anything.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let metrics = reqwest::get(sink.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let stale = metrics.lines().any(|l| {
            l.starts_with("stripe_sink_webhook_events_ignored_total")
                && l.contains("\"stale\"")
                && !l.ends_with(" 0")
        });
        if stale {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "evt_old was never read:\n{}",
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pool = ns.pg_pool().await;
    let mapped: BTreeMap<String, String> = active_mappings(&pool)
        .await
        .into_iter()
        .map(|(c, (p, _))| (c, p))
        .collect();
    let expected: BTreeMap<String, String> =
        [("c_moved2".to_owned(), moved), ("c_kept".to_owned(), kept)].into();
    assert_eq!(mapped, expected);
    let by_stale: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE actor_ref = 'evt_old'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(by_stale, 0, "a stale event changed a mapping");

    sink.terminate(Duration::from_secs(30)).await;
    ns.drop_databases().await;
}

#[tokio::test]
async fn an_import_with_a_refused_key_fails_and_says_why() {
    let ns = Namespace::create().await;
    let standin = Standin::start(100).await;
    let sink = sink(&ns, &standin.base).await;
    let t = token(TENANT, ENV);
    put_config(&sink, &t, "sk_test_unknownaccount1").await;
    let start = post_json(&sink.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    assert_eq!(start.status, 202, "{:?}", start.body);
    let id = start.body["id"].as_str().unwrap().to_owned();
    let done = wait_status(&sink, &t, &id, Duration::from_secs(120), |s| {
        s["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["errors"]["count"], 1, "{done}");
    let last = done["errors"]["last"].as_str().unwrap();
    assert!(last.contains("refused the api key"), "{last}");
    assert!(!last.contains("unknownaccount"), "the key leaked: {last}");
    assert!(done["finished_at"].is_string(), "{done}");
    // A failed job does not block the next one.
    let again = post_json(&sink.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
    assert_eq!(again.status, 202, "{:?}", again.body);

    sink.terminate(Duration::from_secs(30)).await;
    ns.drop_databases().await;
}

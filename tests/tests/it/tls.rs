//! Production connectivity: PostgreSQL reached over TLS with the server's certificate
//! verified (`sslmode=verify-full`, the CA given with `sslrootcert`), as managed databases
//! require, and ClickHouse over HTTPS through a real TLS terminator (Debian's stunnel4, as
//! the local ClickHouse build serves no TLS itself) with its certificate checked against
//! `CLICKHOUSE_CA_CERT`. A plaintext client, an untrusted certificate and a wrong password
//! each leave a service unready with `/readyz` and one log line naming the dependency and
//! the reason, and never the password.

use std::time::Duration;

use meterline_tests::api::{get, post_json, token};
use meterline_tests::private::PrivatePostgres;
use meterline_tests::tls::{TestCa, TlsTerminator};
use meterline_tests::usage::{create_meter, hour_start, spawn_aggregator, WindowWatcher};
use meterline_tests::{Namespace, ServiceProcess, Stack};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::services::{wait_readyz, SERVICES};

#[tokio::test]
async fn postgres_over_verified_tls_serves_every_service_and_a_plaintext_client_is_refused() {
    let ca = TestCa::new("meterline test CA");
    let postgres = PrivatePostgres::start_tls(&ca).await;

    // The server says the session is encrypted.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&postgres.database_url())
        .await
        .unwrap_or_else(|e| panic!("connecting over TLS: {e}"));
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted, "the session is not encrypted");
    // A password only this test knows, to look for it where it must never appear.
    let secret = format!("pw-{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("ALTER ROLE meterline PASSWORD '{secret}'"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let url = postgres.database_url().replacen(
        "meterline:meterline@",
        &format!("meterline:{secret}@"),
        1,
    );

    // The server refuses a client that does not encrypt.
    let plaintext = url.replace("sslmode=verify-full", "sslmode=disable");
    let refused = PgPoolOptions::new()
        .max_connections(1)
        .connect(&plaintext)
        .await
        .expect_err("a plaintext client must be refused");
    assert!(
        refused.to_string().contains("no encryption"),
        "refused for another reason: {refused}"
    );

    // Every service works over TLS.
    let stack = Stack::get();
    let ns = Namespace::plan(&stack.kafka_brokers, &url);
    ns.create_topics().await;
    ns.create_databases().await;
    for (name, _) in SERVICES {
        let service = ServiceProcess::spawn(name, &ns.env()).await;
        let body = wait_readyz(&service, 200, Duration::from_secs(30)).await;
        assert_eq!(body["checks"]["postgres"], "ok", "{name}: {body}");
    }

    // Each misconfiguration: unready, naming postgres and the reason, never the password.
    let other_ca = TestCa::new("an unrelated CA");
    let untrusted = url.replace(
        ca.ca_pem().to_str().unwrap(),
        other_ca.ca_pem().to_str().unwrap(),
    );
    let wrong_password = url.replacen(&secret, "not-the-password", 1);
    for (case, database_url, reason) in [
        ("plaintext", &plaintext, "no encryption"),
        ("untrusted certificate", &untrusted, "certificate"),
        (
            "wrong password",
            &wrong_password,
            "password authentication failed",
        ),
    ] {
        let env: Vec<(String, String)> = ns
            .env()
            .into_iter()
            .map(|(k, v)| {
                if k == "DATABASE_URL" {
                    (k, with_database_of(database_url, &v))
                } else {
                    (k, v)
                }
            })
            .collect();
        let sink = ServiceProcess::spawn("stripe-sink", &env).await;
        let body = wait_readyz(&sink, 503, Duration::from_secs(30)).await;
        let check = body["checks"]["postgres"].as_str().unwrap_or_default();
        assert!(check.contains(reason), "{case}: /readyz says {body}");
        assert_eq!(body["checks"]["kafka"], "ok", "{case}: {body}");
        let said: Vec<String> = sink
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("postgres is unavailable"))
            .collect();
        assert_eq!(said.len(), 1, "{case}: one log line, got {said:?}");
        assert!(said[0].contains(reason), "{case}: {}", said[0]);
        let everything = format!("{body}\n{}", sink.log_lines().join("\n"));
        assert!(!everything.contains(&secret), "{case}: the password leaked");
        assert!(
            !everything.contains("not-the-password"),
            "{case}: the password leaked"
        );
        sink.terminate(Duration::from_secs(10)).await;
    }
}

/// `url` pointed at the namespace database named in `namespace_url`.
fn with_database_of(url: &str, namespace_url: &str) -> String {
    let database = namespace_url
        .split('?')
        .next()
        .and_then(|base| base.rsplit('/').next())
        .expect("the namespace URL names a database");
    meterline_tests::stack::with_database(url, database)
}

#[tokio::test]
async fn clickhouse_over_https_stores_and_answers_usage_and_a_plaintext_client_is_refused() {
    let ca = TestCa::new("meterline test CA");
    let stack = Stack::get();
    let upstream: u16 = stack
        .clickhouse_url
        .rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .expect("the stack's ClickHouse URL ends with its port");
    let terminator = TlsTerminator::start(&ca, upstream).await;
    let https = format!("https://127.0.0.1:{}", terminator.port);
    let ca_pem = ca.ca_pem().display().to_string();

    // The aggregator stores events and reads window totals over HTTPS; ingest answers the
    // usage API from ClickHouse over HTTPS.
    let ns = Namespace::create().await;
    let over_tls = [
        ("CLICKHOUSE_URL", https.as_str()),
        ("CLICKHOUSE_CA_CERT", ca_pem.as_str()),
    ];
    let aggregator = spawn_aggregator(&ns, &over_tls).await;
    let body = wait_readyz(&aggregator, 200, Duration::from_secs(30)).await;
    assert_eq!(body["checks"]["clickhouse"], "ok", "{body}");
    let mut env = ns.env();
    env.extend(
        over_tls
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let ingest = ServiceProcess::spawn("ingest", &env).await;
    let tenant = "tenant_tls";
    create_meter(
        &ns,
        tenant,
        "env_prod",
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    let window = hour_start(2);
    let events: Vec<_> = (0..3)
        .map(|i| {
            json!({"id": format!("tls-{i}"), "customer_id": "cust_tls",
                   "event_name": "api.request",
                   "timestamp": (window + time::Duration::minutes(i))
                       .format(&time::format_description::well_known::Rfc3339).unwrap()})
        })
        .collect();
    let answer = post_json(
        &ingest.url("/v1/events/bulk"),
        &token(tenant, "env_prod"),
        &json!({"events": events}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let expected = std::collections::BTreeMap::from([(
        (
            "cust_tls".to_owned(),
            "calls".to_owned(),
            window.unix_timestamp(),
        ),
        ("3".parse().unwrap(), 3),
    )]);
    WindowWatcher::new(&ns)
        .wait_for(&expected, Duration::from_secs(60))
        .await;
    let from = window
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let to = (window + time::Duration::HOUR)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let usage = get(
        &ingest.url(&format!(
            "/v1/usage?customer_id=cust_tls&meter_id=calls&from={from}&to={to}"
        )),
        &token(tenant, "env_prod"),
    )
    .await;
    assert_eq!(usage.status, 200, "{}", usage.body);
    assert_eq!(usage.body["data"][0]["quantity"], "3", "{}", usage.body);

    // Each misconfiguration: unready, naming clickhouse and the reason.
    let other_ca = TestCa::new("an unrelated CA");
    let other_pem = other_ca.ca_pem().display().to_string();
    let plaintext = format!("http://127.0.0.1:{}", terminator.port);
    for (case, settings, reason) in [
        (
            "untrusted certificate",
            [
                ("CLICKHOUSE_URL", https.as_str()),
                ("CLICKHOUSE_CA_CERT", other_pem.as_str()),
            ],
            "certificate",
        ),
        (
            "plaintext to the TLS port",
            [
                ("CLICKHOUSE_URL", plaintext.as_str()),
                ("CLICKHOUSE_CA_CERT", ca_pem.as_str()),
            ],
            "query failed",
        ),
    ] {
        let aggregator = spawn_aggregator(&ns, &settings).await;
        let body = wait_readyz(&aggregator, 503, Duration::from_secs(30)).await;
        let check = body["checks"]["clickhouse"].as_str().unwrap_or_default();
        assert!(check.contains(reason), "{case}: /readyz says {body}");
        assert_eq!(body["checks"]["postgres"], "ok", "{case}: {body}");
        let said: Vec<String> = aggregator
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("clickhouse is unavailable"))
            .collect();
        assert_eq!(said.len(), 1, "{case}: one log line, got {said:?}");
        aggregator.terminate(Duration::from_secs(10)).await;
    }
    aggregator.terminate(Duration::from_secs(10)).await;
    ingest.terminate(Duration::from_secs(10)).await;
    ns.drop_databases().await;
}

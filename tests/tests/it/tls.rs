//! Production connectivity: PostgreSQL reached over TLS with the server's certificate
//! verified (`sslmode=verify-full`, the CA given with `sslrootcert`), as managed databases
//! require; ClickHouse over HTTPS through a real TLS terminator (Debian's stunnel4, as the
//! local ClickHouse build serves no TLS itself) with its certificate checked against
//! `CLICKHOUSE_CA_CERT`; Kafka on a SASL_SSL listener with SCRAM credentials made by Kafka's
//! own storage tool and a client certificate required (mutual TLS); and the whole pipeline
//! (ingest -> aggregator -> sink -> the Stripe stand-in) over all three at once. A plaintext
//! client, an untrusted certificate, a missing client certificate, a SASL mechanism the broker
//! does not offer and a wrong password each leave a service unready with `/readyz` and one log
//! line naming the dependency and the reason, and never the password; a password put right on
//! the server while the service runs (PostgreSQL's role, Kafka's SCRAM user) makes it ready
//! again without a restart, saying so once.

use std::time::Duration;

use meterline_tests::api::{get, post_json, token};
use meterline_tests::private::{PrivateKafka, PrivatePostgres};
use meterline_tests::standin::Standin;
use meterline_tests::tls::{TestCa, TlsTerminator};
use meterline_tests::usage::{create_meter, hour_start, spawn_aggregator, WindowWatcher};
use meterline_tests::{Namespace, ServiceProcess, Stack};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::services::{wait_readyz, SERVICES};
use crate::sink::{calls_meter, connect, TENANT};

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
        // Set after the namespace's own, so it wins.
        let mut env = ns.env();
        env.push((
            "DATABASE_URL".to_owned(),
            meterline_tests::stack::with_database(database_url, &ns.id),
        ));
        let sink = ServiceProcess::spawn("stripe-sink", &env).await;
        let body = unready_for(
            &sink,
            "postgres",
            reason,
            case,
            &[&secret, "not-the-password"],
        )
        .await;
        assert_eq!(body["checks"]["kafka"], "ok", "{case}: {body}");
        if case == "wrong password" {
            // Put right on the server while the sink runs: the role's password becomes the
            // one the sink was given.
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connecting with the role's password: {e}"));
            sqlx::query("ALTER ROLE meterline PASSWORD 'not-the-password'")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            recovered(&sink, "postgres", case).await;
        }
        sink.terminate(Duration::from_secs(10)).await;
    }
}

/// Waits for `service`, unready because of `dependency`, to be ready again once the cause
/// was put right, and checks that it said so in exactly one log line.
async fn recovered(service: &ServiceProcess, dependency: &str, case: &str) {
    let body = wait_readyz(service, 200, Duration::from_secs(60)).await;
    assert_eq!(body["checks"][dependency], "ok", "{case}: {body}");
    let headline = format!("{dependency} is available again");
    let said = service
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(&headline))
        .count();
    assert_eq!(said, 1, "{case}: one line saying {headline:?}");
}

/// Waits for `service` to turn unready because of `dependency`, and checks how it says so:
/// `/readyz` names the dependency with `reason` in its check, the log has exactly one line
/// `<dependency> is unavailable: ...` giving the reason, and none of `secrets` appears in
/// either. Returns the `/readyz` body.
async fn unready_for(
    service: &ServiceProcess,
    dependency: &str,
    reason: &str,
    case: &str,
    secrets: &[&str],
) -> serde_json::Value {
    let body = wait_readyz(service, 503, Duration::from_secs(30)).await;
    let check = body["checks"][dependency].as_str().unwrap_or_default();
    assert!(check.contains(reason), "{case}: /readyz says {body}");
    let headline = format!("{dependency} is unavailable");
    let said: Vec<String> = service
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(&headline))
        .collect();
    assert_eq!(said.len(), 1, "{case}: one log line, got {said:?}");
    assert!(said[0].contains(reason), "{case}: {}", said[0]);
    let everything = format!("{body}\n{}", service.log_lines().join("\n"));
    for secret in secrets {
        assert!(!everything.contains(secret), "{case}: a password leaked");
    }
    body
}

/// Posts calls of `cust_tls` to ingest, the n-th at `window` + n minutes with the n-th id
/// (an id given twice is a duplicate), and checks that ingest took them (202).
async fn send_calls(
    ingest: &ServiceProcess,
    tenant: &str,
    window: time::OffsetDateTime,
    ids: &[&str],
) {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let events: Vec<_> = ids
        .iter()
        .zip(0..)
        .map(|(id, minute)| {
            json!({"id": id, "customer_id": "cust_tls", "event_name": "api.request",
                   "timestamp": (window + time::Duration::minutes(minute)).format(rfc3339).unwrap()})
        })
        .collect();
    let answer = post_json(
        &ingest.url("/v1/events/bulk"),
        &token(tenant, "env_prod"),
        &json!({"events": events}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
}

#[tokio::test]
async fn clickhouse_over_https_stores_and_answers_usage_and_a_plaintext_client_is_refused() {
    let ca = TestCa::new("meterline test CA");
    let stack = Stack::get();
    let terminator = TlsTerminator::start(&ca, port_of(&stack.clickhouse_url)).await;
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
    send_calls(&ingest, tenant, window, &["tls-0", "tls-1", "tls-2"]).await;
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
    // A password only this test knows, to look for it where it must never appear.
    let secret = format!("pw-{}", uuid::Uuid::now_v7().simple());
    for (case, settings, reason) in [
        (
            "untrusted certificate",
            vec![
                ("CLICKHOUSE_URL", https.as_str()),
                ("CLICKHOUSE_CA_CERT", other_pem.as_str()),
            ],
            "certificate",
        ),
        (
            "plaintext to the TLS port",
            vec![
                ("CLICKHOUSE_URL", plaintext.as_str()),
                ("CLICKHOUSE_CA_CERT", ca_pem.as_str()),
            ],
            "query failed",
        ),
        (
            "wrong password",
            vec![
                ("CLICKHOUSE_URL", https.as_str()),
                ("CLICKHOUSE_CA_CERT", ca_pem.as_str()),
                ("CLICKHOUSE_USER", "meterline"),
                ("CLICKHOUSE_PASSWORD", secret.as_str()),
            ],
            "Authentication failed",
        ),
    ] {
        let aggregator = spawn_aggregator(&ns, &settings).await;
        let body = unready_for(&aggregator, "clickhouse", reason, case, &[&secret]).await;
        assert_eq!(body["checks"]["postgres"], "ok", "{case}: {body}");
        aggregator.terminate(Duration::from_secs(10)).await;
    }
    aggregator.terminate(Duration::from_secs(10)).await;
    ingest.terminate(Duration::from_secs(10)).await;
    ns.drop_databases().await;
}

#[tokio::test]
async fn the_pipeline_bills_exactly_over_tls_and_authentication_to_kafka_clickhouse_and_postgres() {
    let ca = TestCa::new("meterline test CA");
    let kafka_password = format!("kafka-{}", uuid::Uuid::now_v7().simple());
    let kafka = PrivateKafka::start_sasl_ssl(&ca, "meterline", &kafka_password).await;
    let postgres = PrivatePostgres::start_tls(&ca).await;
    let stack = Stack::get();
    let terminator = TlsTerminator::start(&ca, port_of(&stack.clickhouse_url)).await;

    // The harness creates topics over the broker's plaintext listener and databases over
    // ClickHouse's own HTTP port; every service reaches all three over TLS with credentials.
    let ns = Namespace::plan(&kafka.brokers(), &postgres.database_url());
    ns.create_topics().await;
    ns.create_databases().await;
    let ca_pem = ca.ca_pem().display().to_string();
    let client_pem = ca.client_pem().display().to_string();
    let client_key = ca.client_key().display().to_string();
    let https = format!("https://127.0.0.1:{}", terminator.port);
    let secure = kafka.secure_brokers();
    let over_tls: Vec<(&str, &str)> = vec![
        ("KAFKA_BROKERS", &secure),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
        ("KAFKA_SASL_USERNAME", "meterline"),
        ("KAFKA_SASL_PASSWORD", &kafka_password),
        ("KAFKA_SSL_CA_LOCATION", &ca_pem),
        // The broker requires a client certificate as well (mutual TLS).
        ("KAFKA_SSL_CERTIFICATE_LOCATION", &client_pem),
        ("KAFKA_SSL_KEY_LOCATION", &client_key),
        ("CLICKHOUSE_URL", &https),
        ("CLICKHOUSE_CA_CERT", &ca_pem),
    ];
    let env_with = |extra: &[(&str, &str)]| {
        let mut env = ns.env();
        env.extend(
            over_tls
                .iter()
                .chain(extra)
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env
    };

    let standin = Standin::start(40).await;
    standin.sum_meter("api_calls").await;
    let cus = standin.customer("cust_tls").await;
    calls_meter(&ns, TENANT).await;
    let sink = ServiceProcess::spawn(
        "stripe-sink",
        &env_with(&[("STRIPE_API_BASE", standin.base.as_str())]),
    )
    .await;
    connect(
        &sink,
        &standin,
        &[("calls", "api_calls")],
        &[("cust_tls", &cus)],
    )
    .await;
    let _aggregator = spawn_aggregator(&ns, &over_tls).await;
    // Ingest logs in with the other SCRAM mechanism.
    let ingest = ServiceProcess::spawn(
        "ingest",
        &env_with(&[("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")]),
    )
    .await;
    for service in [&sink, &ingest] {
        let body = wait_readyz(service, 200, Duration::from_secs(30)).await;
        assert_eq!(body["checks"]["kafka"], "ok", "{}: {body}", service.name);
    }

    // Seven calls in a past hour, one of them sent twice: Stripe bills six.
    let ids = [
        "tls-0", "tls-1", "tls-2", "tls-3", "tls-4", "tls-5", "tls-5",
    ];
    send_calls(&ingest, TENANT, hour_start(3), &ids).await;
    let want = std::collections::BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 6.0)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while standin.totals().await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "stripe holds {:?}, expected {want:?}; sink log:\n{}",
            standin.totals().await,
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A plaintext client, an untrusted broker certificate, no client certificate, a mechanism
    // the broker does not offer and a wrong password: each leaves the service unready with the
    // cause, in one log line, never the password.
    // Plaintext: no KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* or KAFKA_SSL_* at all.
    let plaintext: Vec<(String, String)> = env_with(&[])
        .into_iter()
        .filter(|(k, _)| !k.starts_with("KAFKA_S"))
        .collect();
    // Set later, so they win over the right ones.
    let wrong_password = env_with(&[("KAFKA_SASL_PASSWORD", "not-the-password")]);
    let wrong_mechanism = env_with(&[("KAFKA_SASL_MECHANISM", "PLAIN")]);
    let other_ca = TestCa::new("an unrelated CA");
    let other_pem = other_ca.ca_pem().display().to_string();
    let untrusted = env_with(&[("KAFKA_SSL_CA_LOCATION", &other_pem)]);
    let no_client_certificate: Vec<(String, String)> = env_with(&[])
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "KAFKA_SSL_CERTIFICATE_LOCATION" | "KAFKA_SSL_KEY_LOCATION"
            )
        })
        .collect();
    for (case, env, reason) in [
        (
            "plaintext to the SASL_SSL listener",
            plaintext,
            "Disconnected",
        ),
        (
            "untrusted certificate",
            untrusted,
            "certificate verify failed",
        ),
        (
            "no client certificate",
            no_client_certificate,
            "alert bad certificate",
        ),
        (
            "wrong mechanism",
            wrong_mechanism,
            "Unsupported SASL mechanism",
        ),
        ("wrong password", wrong_password, "Authentication failed"),
    ] {
        let refused = ServiceProcess::spawn("stripe-sink", &env).await;
        unready_for(
            &refused,
            "kafka",
            reason,
            case,
            &[&kafka_password, "not-the-password"],
        )
        .await;
        if case == "wrong password" {
            // Put right on the broker while the sink runs (last: the pipeline's services
            // above hold the old password): the SCRAM user's password becomes the one the
            // sink was given.
            kafka
                .set_scram_password("meterline", "not-the-password")
                .await;
            recovered(&refused, "kafka", case).await;
        }
        refused.terminate(Duration::from_secs(10)).await;
    }
}

/// The port at the end of a URL such as `http://127.0.0.1:18123`.
fn port_of(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("the URL ends with its port")
}

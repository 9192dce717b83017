//! Every service binary, started by the harness against a namespace: it answers `/healthz`,
//! `/readyz` and `/metrics`, turns unready when a dependency stops and ready again when it
//! returns, refuses bad configuration with one line and exit code 2, and stops cleanly on
//! SIGTERM.

use std::time::{Duration, Instant};

use meterline_tests::private::{PrivateClickhouse, PrivateKafka, PrivatePostgres};
use meterline_tests::process::run_to_exit;
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::Value;

/// Each service and the dependencies its `/readyz` checks.
pub(crate) const SERVICES: &[(&str, &[&str])] = &[
    ("ingest", &["kafka", "postgres"]),
    ("aggregator", &["kafka", "clickhouse", "postgres"]),
    ("stripe-sink", &["kafka", "postgres"]),
    ("webhook-relay", &["kafka", "postgres"]),
];

async fn readyz(service: &ServiceProcess) -> (u16, Value) {
    let response = reqwest::get(service.url("/readyz"))
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("/readyz answers JSON"))
}

/// Polls `/readyz` until it answers `want`, failing with the last answer after `within`.
pub(crate) async fn wait_readyz(service: &ServiceProcess, want: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = readyz(service).await;
        if status == want {
            return body;
        }
        if Instant::now() > deadline {
            panic!(
                "{} /readyz stayed {status} (wanted {want}) for {within:?}: {body}\n{}",
                service.name,
                service.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn every_service_answers_health_readiness_and_metrics() {
    let ns = Namespace::create().await;
    for (name, dependencies) in SERVICES {
        let service = ServiceProcess::spawn(name, &ns.env()).await;

        let health = reqwest::get(service.url("/healthz")).await.unwrap();
        assert_eq!(health.status().as_u16(), 200, "{name} /healthz");
        assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");

        let body = wait_readyz(&service, 200, Duration::from_secs(20)).await;
        assert_eq!(body["status"], "ready", "{name}: {body}");
        for dependency in *dependencies {
            assert_eq!(body["checks"][dependency], "ok", "{name}: {body}");
        }
        let checked: Vec<&String> = body["checks"].as_object().unwrap().keys().collect();
        assert_eq!(
            checked.len(),
            dependencies.len(),
            "{name} checks {checked:?}"
        );

        let metrics = reqwest::get(service.url("/metrics")).await.unwrap();
        assert_eq!(metrics.status().as_u16(), 200);
        let text = metrics.text().await.unwrap();
        let prefix = name.replace('-', "_");
        assert!(
            text.contains(&format!("meterline_build_info{{service=\"{name}\"")),
            "{name} /metrics:\n{text}"
        );
        assert!(
            text.contains(&format!("{prefix}_dependency_up{{dependency=\"kafka\"}} 1")),
            "{name} /metrics:\n{text}"
        );
        assert!(
            text.contains(&format!("{prefix}_http_requests_total{{")),
            "{name} /metrics:\n{text}"
        );

        let status = service.terminate(Duration::from_secs(10)).await;
        assert!(status.success(), "{name} exits 0 on SIGTERM, got {status}");
    }
    ns.drop_databases().await;
}

#[tokio::test]
async fn logs_are_json_lines() {
    let ns = Namespace::create().await;
    let service = ServiceProcess::spawn("ingest", &ns.env()).await;
    let _ = readyz(&service).await;
    let lines = service.log_lines();
    service.terminate(Duration::from_secs(10)).await;
    assert!(!lines.is_empty());
    for line in lines {
        let parsed: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            parsed["level"].is_string() && parsed["message"].is_string(),
            "{line}"
        );
    }
    ns.drop_databases().await;
}

#[tokio::test]
async fn readiness_follows_a_stopped_kafka() {
    let kafka = PrivateKafka::start().await;
    let stack = meterline_tests::Stack::get();
    let ns = Namespace::plan(&kafka.brokers(), &stack.database_url);
    ns.create_topics().await;
    ns.create_databases().await;
    // Two services on the same private broker: ingest and webhook-relay.
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let relay = ServiceProcess::spawn("webhook-relay", &ns.env()).await;
    wait_readyz(&ingest, 200, Duration::from_secs(20)).await;
    wait_readyz(&relay, 200, Duration::from_secs(20)).await;

    kafka.stop().await;
    for service in [&ingest, &relay] {
        let body = wait_readyz(service, 503, Duration::from_secs(20)).await;
        assert_eq!(body["status"], "unready");
        assert_ne!(body["checks"]["kafka"], "ok", "{body}");
        assert_eq!(body["checks"]["postgres"], "ok", "{body}");
    }

    kafka.resume().await;
    for service in [&ingest, &relay] {
        wait_readyz(service, 200, Duration::from_secs(60)).await;
    }
    ns.drop_databases().await;
}

#[tokio::test]
async fn readiness_follows_a_stopped_clickhouse() {
    let clickhouse = PrivateClickhouse::start().await;
    let mut ns = Namespace::create().await;
    ns.clickhouse.url = clickhouse.url();
    ns.clickhouse.cluster = None;
    meterline_common::clickhouse::migrate(&ns.clickhouse)
        .await
        .expect("migrating the private clickhouse");
    let aggregator = ServiceProcess::spawn("aggregator", &ns.env()).await;
    wait_readyz(&aggregator, 200, Duration::from_secs(20)).await;

    clickhouse.stop().await;
    let body = wait_readyz(&aggregator, 503, Duration::from_secs(20)).await;
    assert_ne!(body["checks"]["clickhouse"], "ok", "{body}");
    assert_eq!(body["checks"]["kafka"], "ok", "{body}");

    clickhouse.resume().await;
    wait_readyz(&aggregator, 200, Duration::from_secs(30)).await;
    ns.drop_databases().await;
}

#[tokio::test]
async fn readiness_follows_a_stopped_postgres() {
    let postgres = PrivatePostgres::start().await;
    let stack = meterline_tests::Stack::get();
    let ns = Namespace::plan(&stack.kafka_brokers, &postgres.database_url());
    ns.create_topics().await;
    ns.create_postgres().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    wait_readyz(&sink, 200, Duration::from_secs(20)).await;

    postgres.stop().await;
    let body = wait_readyz(&sink, 503, Duration::from_secs(20)).await;
    assert_ne!(body["checks"]["postgres"], "ok", "{body}");
    assert_eq!(body["checks"]["kafka"], "ok", "{body}");

    postgres.resume().await;
    wait_readyz(&sink, 200, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn bad_configuration_is_one_line_naming_the_variable_and_exit_code_2() {
    let complete = [
        ("KAFKA_BROKERS", "127.0.0.1:1"),
        ("CLICKHOUSE_URL", "http://127.0.0.1:1"),
        (
            "DATABASE_URL",
            "postgres://u:secret-password@127.0.0.1:1/db",
        ),
    ];
    for (name, _) in SERVICES {
        for missing in ["KAFKA_BROKERS", "DATABASE_URL"] {
            let env: Vec<(&str, &str)> = complete
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let (status, stderr) = run_to_exit(name, &env).await;
            assert_eq!(status.code(), Some(2), "{name} without {missing}: {stderr}");
            assert_eq!(
                stderr.lines().count(),
                1,
                "{name}: one line, got {stderr:?}"
            );
            assert!(stderr.contains(missing), "{name} names {missing}: {stderr}");
        }
        let mut env = complete.to_vec();
        env.push(("HTTP_ADDR", "not-an-address"));
        let (status, stderr) = run_to_exit(name, &env).await;
        assert_eq!(
            status.code(),
            Some(2),
            "{name} with a bad HTTP_ADDR: {stderr}"
        );
        assert!(stderr.contains("HTTP_ADDR"), "{stderr}");

        let env = [
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("CLICKHOUSE_URL", "http://127.0.0.1:1"),
            ("DATABASE_URL", "mysql://u:secret-password@127.0.0.1:1/db"),
        ];
        let (status, stderr) = run_to_exit(name, &env).await;
        assert_eq!(status.code(), Some(2), "{name} with a mysql URL: {stderr}");
        assert!(stderr.contains("DATABASE_URL"), "{stderr}");
        assert!(
            !stderr.contains("secret-password"),
            "never echo secrets: {stderr}"
        );
    }
    let mut env = complete.to_vec();
    env.retain(|(k, _)| *k != "JWT_SECRET");
    env.push(("JWT_SECRET", "short-secret"));
    let (status, stderr) = run_to_exit("ingest", &env).await;
    assert_eq!(
        status.code(),
        Some(2),
        "ingest with a short JWT_SECRET: {stderr}"
    );
    assert!(stderr.contains("JWT_SECRET"), "{stderr}");
    assert!(
        !stderr.contains("short-secret"),
        "never echo secrets: {stderr}"
    );

    let (status, stderr) = run_to_exit(
        "aggregator",
        &[
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
        ],
    )
    .await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("CLICKHOUSE_URL"), "{stderr}");
}

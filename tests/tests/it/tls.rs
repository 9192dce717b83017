//! Production connectivity: PostgreSQL reached over TLS with the server's certificate
//! verified (`sslmode=verify-full`, the CA given with `sslrootcert`), as managed databases
//! require. A plaintext client, an untrusted certificate and a wrong password each leave a
//! service unready with `/readyz` and one log line naming `postgres` and the reason, and
//! never the password.

use std::time::Duration;

use meterline_tests::private::PrivatePostgres;
use meterline_tests::tls::TestCa;
use meterline_tests::{Namespace, ServiceProcess, Stack};
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
